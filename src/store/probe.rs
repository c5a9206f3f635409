//! The one probe after a shared cool-down. When a cool-down's deadline passes, the admission
//! script ([`super::budget`]) gives the next request of the fleet the probe's turn (a token in
//! `{stem}:probe` with a lifetime); requests on every replica are answered `probing` until the
//! probe's answer ends the turn: a success deletes the cool-down, another 429 lengthens it (see
//! [`Store::cool_down`]). A probe that never gets an answer gives its turn up, or the turn lapses.

use redis::Script;

use super::RELEASE;
use super::{Store, Unavailable};

/// Ends the probe's turn after a success, and with it the cool-down unless another 429 set a
/// new deadline meanwhile. KEYS: cool-down, probe. ARGV: probe id.
const ANSWERED: &str = r#"
redis.replicate_commands()
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
if (tonumber(redis.call('GET', KEYS[1]) or '0') or 0) <= now then
  redis.call('DEL', KEYS[1])
end
return 1
"#;

/// The fleet's probe turn held by one admission.
#[derive(Debug, Clone)]
pub struct ProbeClaim {
    stem: String,
    id: String,
}

impl ProbeClaim {
    pub(super) fn new(stem: &str, id: &str) -> ProbeClaim {
        ProbeClaim {
            stem: stem.to_owned(),
            id: id.to_owned(),
        }
    }

    pub(super) fn id(&self) -> &str {
        &self.id
    }
}

impl Store {
    /// Bitbucket answered the probe with anything but 429: the credential's requests flow again
    /// on every replica.
    pub async fn probe_answered(&self, probe: &ProbeClaim) -> Result<(), Unavailable> {
        self.call(|mut connection| async move {
            Script::new(ANSWERED)
                .key(format!("{}:cooldown", probe.stem))
                .key(format!("{}:probe", probe.stem))
                .arg(&probe.id)
                .invoke_async::<i64>(&mut connection)
                .await
                .map(drop)
        })
        .await
    }

    /// The probe got no answer (its client left, the upstream failed, it was answered without
    /// going upstream): the next request of the fleet probes instead.
    pub async fn probe_release(&self, probe: &ProbeClaim) -> Result<(), Unavailable> {
        self.call(|mut connection| async move {
            Script::new(RELEASE)
                .key(format!("{}:probe", probe.stem))
                .arg(&probe.id)
                .invoke_async::<i64>(&mut connection)
                .await
                .map(drop)
        })
        .await
    }
}
