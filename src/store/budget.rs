//! A credential's budget and cool-down in the store, shared by every replica that holds the
//! same secret.
//!
//! Keys are named by a fingerprint of the credential: HMAC-SHA256 of its secret material (the
//! `Authorization` it sends, or an OAuth consumer's key and secret) under a random salt that
//! the first replica creates in the store (`{prefix}salt`). Never the secret, never an
//! unsalted hash of it; the same secret gives the same key on every replica, a rotated one a
//! new key. If the store restarts empty, the first script call puts the caller's salt back and
//! a replica holding another one adopts the stored salt and retries (docs/store.md).
//!
//! The rolling-hour cap and the pacing are one Lua script run atomically on the server, on the
//! server's clock (`TIME`), so replicas with skewed clocks still agree. The same call reports
//! a shared cool-down, so checking it costs nothing extra.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use redis::Script;
use sha2::Sha256;

use super::{Store, Unavailable, hex, random_hex};

/// Checks the salt, then the cool-down (and whether this request is the fleet's one probe
/// after it), then the hour's count, then the pace; admits by recording the admission. KEYS:
/// salt, window (sorted set of admissions by time in ms), pace (theoretical arrival time in ms),
/// cool-down (its deadline in Unix ms; it outlives the deadline until a probe is answered),
/// probe (the probing admission's id), reported (Bitbucket's figures, see [`super::reports`]).
/// ARGV: salt, per_hour (0: no cap), interval in ms (0: no pacing), tolerance in ms, admission
/// id, probe ttl in ms.
/// Answers {verdict, milliseconds or count, stored salt, 1 if this is the probe, reports}.
/// `replicate_commands` lets Redis 3.2 to 4 write after reading `TIME` (from 5 on it is the
/// default, and the call does nothing).
const ADMIT: &str = r#"
redis.replicate_commands()
local salt = redis.call('GET', KEYS[1])
if not salt then
  redis.call('SET', KEYS[1], ARGV[1])
elseif salt ~= ARGV[1] then
  return {'salt', 0, salt, 0, {}}
end
local reports = redis.call('HGETALL', KEYS[6])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local deadline = tonumber(redis.call('GET', KEYS[4]) or '0') or 0
if deadline > now then
  return {'cooling', deadline - now, '', 0, reports}
end
local probe = 0
if deadline > 0 then
  local holder = redis.call('GET', KEYS[5])
  if holder and holder ~= ARGV[5] then
    return {'probing', math.max(1, redis.call('PTTL', KEYS[5])), '', 0, reports}
  end
  probe = 1
end
local hour = 3600000
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - hour)
local count = redis.call('ZCARD', KEYS[2])
local per_hour = tonumber(ARGV[2])
if per_hour > 0 and count >= per_hour then
  local leaving = redis.call('ZRANGE', KEYS[2], count - per_hour, count - per_hour, 'WITHSCORES')
  return {'limit', math.max(1, tonumber(leaving[2]) + hour - now), '', 0, reports}
end
local interval = tonumber(ARGV[3])
if interval > 0 then
  local arrival = math.max(tonumber(redis.call('GET', KEYS[3]) or '0'), now)
  local ahead = arrival - now - tonumber(ARGV[4])
  if ahead > 0 then
    return {'pace', math.ceil(ahead), '', 0, reports}
  end
  redis.call('SET', KEYS[3], tostring(arrival + interval), 'PX', math.ceil(arrival + interval - now) + 1000)
end
if probe == 1 then
  redis.call('SET', KEYS[5], ARGV[5], 'PX', ARGV[6])
end
redis.call('ZADD', KEYS[2], now, ARGV[5])
redis.call('PEXPIRE', KEYS[2], hour)
return {'ok', count + 1, '', probe, reports}
"#;

/// Gives an admission back. KEYS: window, pace. ARGV: admission id, interval in ms.
const REFUND: &str = r#"
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 and tonumber(ARGV[2]) > 0 then
  local arrival = redis.call('GET', KEYS[2])
  if arrival then
    redis.call('SET', KEYS[2], tostring(math.max(0, tonumber(arrival) - tonumber(ARGV[2]))), 'KEEPTTL')
  end
end
return 1
"#;

/// Starts or lengthens the shared cool-down; never shortens one. Ends the caller's turn as
/// the probe if it was one. KEYS: salt, cool-down, probe. ARGV: salt, length in ms, probe id
/// ('' if none), how long the key outlives the deadline in ms. The value is the deadline in
/// Unix ms, kept past it so that the next request knows to probe.
const COOL_DOWN: &str = r#"
redis.replicate_commands()
local salt = redis.call('GET', KEYS[1])
if not salt then
  redis.call('SET', KEYS[1], ARGV[1])
elseif salt ~= ARGV[1] then
  return {'salt', 0, salt}
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local length = tonumber(ARGV[2])
local left = (tonumber(redis.call('GET', KEYS[2]) or '0') or 0) - now
if left < length then
  redis.call('SET', KEYS[2], tostring(now + length), 'PX', length + tonumber(ARGV[4]))
  left = length
end
if ARGV[3] ~= '' and redis.call('GET', KEYS[3]) == ARGV[3] then
  redis.call('DEL', KEYS[3])
end
return {'ok', left, ''}
"#;

/// How long a cool-down's key outlives its deadline when no probe comes: the first request in
/// that time probes for the fleet; after it, requests flow as if there had been none.
const COOLED_GRACE: Duration = Duration::from_secs(3600);

/// The salt, the scripts and the admission ids of one store.
pub(crate) struct BudgetKeys {
    prefix: String,
    /// The salt this replica uses, hex; replaced by the store's if they differ.
    salt: Mutex<String>,
    /// Makes admission ids unique across replicas.
    replica: String,
    next_id: AtomicU64,
    admit: Script,
    refund: Script,
    cool_down: Script,
}

impl BudgetKeys {
    pub(crate) fn new(prefix: &str) -> Self {
        BudgetKeys {
            prefix: prefix.to_owned(),
            salt: Mutex::new(random_hex(32)),
            replica: random_hex(8),
            next_id: AtomicU64::new(0),
            admit: Script::new(ADMIT),
            refund: Script::new(REFUND),
            cool_down: Script::new(COOL_DOWN),
        }
    }

    pub(super) fn salt(&self) -> String {
        self.salt.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn adopt_salt(&self, salt: String) {
        *self.salt.lock().unwrap_or_else(|p| p.into_inner()) = salt;
    }

    fn salt_key(&self) -> String {
        format!("{}salt", self.prefix)
    }

    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The keyed fingerprint of the credential whose secret material is `identity`, under
    /// `salt`: 32 hex digits.
    fn keyed(salt: &str, identity: &[u8]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(salt.as_bytes()).expect("HMAC takes keys of any length");
        mac.update(identity);
        let digest = mac.finalize().into_bytes();
        hex(&digest[..16])
    }

    /// The fingerprint under the salt this replica uses now (the store's, once a budget call
    /// has run).
    pub(super) fn fingerprint(&self, identity: &[u8]) -> String {
        Self::keyed(&self.salt(), identity)
    }

    /// The key stem of the credential whose secret material is `identity`, under `salt`.
    pub(super) fn stem(&self, salt: &str, identity: &[u8]) -> String {
        format!("{}budget:{}", self.prefix, Self::keyed(salt, identity))
    }
}

/// How the credential is governed now, from its `rate_limit` and Bitbucket's reports (the
/// local [`crate::budget::governor::Governor`] works it out; the store applies it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// The rolling-hour cap, if any.
    pub per_hour: Option<u32>,
    /// One request per this many ms (0: no pacing), with `tolerance_ms` of burst.
    pub interval_ms: f64,
    pub tolerance_ms: f64,
}

/// The store's answer to one admission.
#[derive(Debug)]
pub enum Verdict {
    Admitted(SharedAdmission),
    /// The rolling hour is full until a request leaves it.
    Limited(Duration),
    /// The pace allows the next request in this long.
    Paced(Duration),
    /// Another replica (or this one) saw a 429: the cool-down lasts this long.
    CoolingDown(Duration),
    /// The cool-down is over and another request probes Bitbucket for the fleet; its turn
    /// lapses in this long at most.
    Probing(Duration),
}

/// Bitbucket's figures as another replica stored them: (resource, figures) pairs.
pub type SharedReports = Vec<(String, String)>;

/// An admission recorded in the store, to be refunded if the request never goes upstream.
#[derive(Debug)]
pub struct SharedAdmission {
    /// Requests admitted in the rolling hour by every replica, this one included.
    pub sent: u64,
    stem: String,
    id: String,
    interval_ms: f64,
    /// This request is the fleet's one probe after a cool-down.
    probe: bool,
}

impl SharedAdmission {
    /// The probe's turn, if this admission has it: to be ended by its answer.
    pub fn probe_claim(&self) -> Option<super::probe::ProbeClaim> {
        self.probe
            .then(|| super::probe::ProbeClaim::new(&self.stem, &self.id))
    }
}

impl Store {
    /// Admits one request of the credential whose secret material is `identity`, or says why
    /// not, in one atomic step on the server; also answers the figures Bitbucket reported to
    /// any replica. A request that becomes the fleet's probe holds that turn for `probe_ttl`
    /// at most.
    pub async fn admit(
        &self,
        identity: &[u8],
        policy: Policy,
        probe_ttl: Duration,
    ) -> Result<(Verdict, SharedReports), Unavailable> {
        let keys = &self.budget;
        let id = format!(
            "{}-{}",
            keys.replica,
            keys.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let id_ref = &id;
        let probe_ttl_ms = u64::try_from(probe_ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let (verdict, value, probe, reports, stem) = self
            .call(|mut connection| async move {
                let mut salt = keys.salt();
                loop {
                    let stem = keys.stem(&salt, identity);
                    let (verdict, value, stored, probe, reports): (
                        String,
                        i64,
                        String,
                        i64,
                        Vec<Vec<u8>>,
                    ) = keys
                        .admit
                        .key(keys.salt_key())
                        .key(format!("{stem}:window"))
                        .key(format!("{stem}:pace"))
                        .key(format!("{stem}:cooldown"))
                        .key(format!("{stem}:probe"))
                        .key(format!("{stem}:reported"))
                        .arg(&salt)
                        .arg(policy.per_hour.unwrap_or(0))
                        .arg(policy.interval_ms)
                        .arg(policy.tolerance_ms)
                        .arg(id_ref)
                        .arg(probe_ttl_ms)
                        .invoke_async(&mut connection)
                        .await?;
                    if verdict == "salt" && stored != salt {
                        // The store was emptied and another replica put its salt back first.
                        keys.adopt_salt(stored.clone());
                        salt = stored;
                        continue;
                    }
                    return Ok((verdict, value, probe == 1, reports, stem));
                }
            })
            .await?;
        let millis = Duration::from_millis(value.max(0) as u64);
        let verdict = match verdict.as_str() {
            "ok" => Verdict::Admitted(SharedAdmission {
                sent: value.max(0) as u64,
                stem,
                id,
                interval_ms: policy.interval_ms,
                probe,
            }),
            "limit" => Verdict::Limited(millis),
            "pace" => Verdict::Paced(millis),
            "probing" => Verdict::Probing(millis),
            _ => Verdict::CoolingDown(millis),
        };
        let reports = reports
            .chunks_exact(2)
            .map(|pair| {
                (
                    String::from_utf8_lossy(&pair[0]).into_owned(),
                    String::from_utf8_lossy(&pair[1]).into_owned(),
                )
            })
            .collect();
        Ok((verdict, reports))
    }

    /// Gives an admission back, bounded by `store.timeout` like every call.
    pub async fn refund(&self, admission: SharedAdmission) -> Result<(), Unavailable> {
        let keys = &self.budget;
        self.call(|mut connection| async move {
            keys.refund
                .key(format!("{}:window", admission.stem))
                .key(format!("{}:pace", admission.stem))
                .arg(&admission.id)
                .arg(admission.interval_ms)
                .invoke_async::<i64>(&mut connection)
                .await
                .map(drop)
        })
        .await
    }

    /// Starts (or lengthens) the credential's cool-down for every replica; ends `probe`'s turn
    /// if this 429 answered the fleet's probe.
    pub async fn cool_down(
        &self,
        identity: &[u8],
        length: Duration,
        probe: Option<&super::probe::ProbeClaim>,
    ) -> Result<(), Unavailable> {
        let keys = &self.budget;
        let length_ms = u64::try_from(length.as_millis()).unwrap_or(u64::MAX).max(1);
        let grace_ms = COOLED_GRACE.as_millis() as u64;
        let probe_id = probe.map_or("", |p| p.id());
        self.call(|mut connection| async move {
            let mut salt = keys.salt();
            loop {
                let stem = keys.stem(&salt, identity);
                let (verdict, _, stored): (String, i64, String) = keys
                    .cool_down
                    .key(keys.salt_key())
                    .key(format!("{stem}:cooldown"))
                    .key(format!("{stem}:probe"))
                    .arg(&salt)
                    .arg(length_ms)
                    .arg(probe_id)
                    .arg(grace_ms)
                    .invoke_async(&mut connection)
                    .await?;
                if verdict == "salt" && stored != salt {
                    keys.adopt_salt(stored.clone());
                    salt = stored;
                    continue;
                }
                return Ok(());
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_keyed_stable_and_hide_the_secret() {
        let keys = BudgetKeys::new("p:");
        let token = b"Bearer ATCTT3xFfGN0-secret";
        let a = keys.stem("salt-a", token);
        assert_eq!(a, keys.stem("salt-a", token), "same secret, same key");
        assert_ne!(a, keys.stem("salt-b", token), "the salt changes the key");
        assert_ne!(
            a,
            keys.stem("salt-a", b"Bearer rotated"),
            "a new token starts anew"
        );
        assert!(a.starts_with("p:budget:") && a.len() == "p:budget:".len() + 32);
        assert!(!a.contains("ATCTT3x") && !a.contains("secret"));
        // Not the unsalted SHA-256 of the secret either.
        use sha2::Digest;
        let plain = hex(&Sha256::digest(token)[..16]);
        assert!(!a.ends_with(&plain));
        assert_ne!(
            BudgetKeys::new("p:").salt(),
            keys.salt(),
            "salts are random"
        );
    }
}
