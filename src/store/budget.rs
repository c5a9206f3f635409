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

use super::{Store, Unavailable};

/// Checks the salt, then the cool-down, then the hour's count, then the pace; admits by
/// recording the admission. KEYS: salt, window (sorted set of admissions by time in ms), pace
/// (theoretical arrival time in ms), cool-down. ARGV: salt, per_hour (0: no cap), interval in
/// ms (0: no pacing), tolerance in ms, admission id.
/// Answers {verdict, milliseconds or count, stored salt}. `replicate_commands` lets Redis 3.2 to
/// 4 write after reading `TIME` (from 5 on it is the default, and the call does nothing).
const ADMIT: &str = r#"
redis.replicate_commands()
local salt = redis.call('GET', KEYS[1])
if not salt then
  redis.call('SET', KEYS[1], ARGV[1])
elseif salt ~= ARGV[1] then
  return {'salt', 0, salt}
end
local cooling = redis.call('PTTL', KEYS[4])
if cooling > 0 then
  return {'cooling', cooling, ''}
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local hour = 3600000
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - hour)
local count = redis.call('ZCARD', KEYS[2])
local per_hour = tonumber(ARGV[2])
if per_hour > 0 and count >= per_hour then
  local leaving = redis.call('ZRANGE', KEYS[2], count - per_hour, count - per_hour, 'WITHSCORES')
  return {'limit', math.max(1, tonumber(leaving[2]) + hour - now), ''}
end
local interval = tonumber(ARGV[3])
if interval > 0 then
  local arrival = math.max(tonumber(redis.call('GET', KEYS[3]) or '0'), now)
  local ahead = arrival - now - tonumber(ARGV[4])
  if ahead > 0 then
    return {'pace', math.ceil(ahead), ''}
  end
  redis.call('SET', KEYS[3], tostring(arrival + interval), 'PX', math.ceil(arrival + interval - now) + 1000)
end
redis.call('ZADD', KEYS[2], now, ARGV[5])
redis.call('PEXPIRE', KEYS[2], hour)
return {'ok', count + 1, ''}
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

/// Starts or lengthens the shared cool-down; never shortens one. KEYS: salt, cool-down. ARGV:
/// salt, length in ms. The value is the deadline in Unix ms (for operators reading the store).
const COOL_DOWN: &str = r#"
redis.replicate_commands()
local salt = redis.call('GET', KEYS[1])
if not salt then
  redis.call('SET', KEYS[1], ARGV[1])
elseif salt ~= ARGV[1] then
  return {'salt', 0, salt}
end
local length = tonumber(ARGV[2])
local left = redis.call('PTTL', KEYS[2])
if left < length then
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  redis.call('SET', KEYS[2], tostring(now + length), 'PX', length)
  left = length
end
return {'ok', left, ''}
"#;

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

pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut buffer)
        .expect("the system random source works");
    hex(&buffer)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
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

    fn salt(&self) -> String {
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
    fn stem(&self, salt: &str, identity: &[u8]) -> String {
        format!("{}budget:{}", self.prefix, Self::keyed(salt, identity))
    }
}

/// How the credential is governed now, from its `rate_limit` and Bitbucket's reports (the
/// local [`crate::governor::Governor`] works it out; the store applies it).
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
}

/// An admission recorded in the store, to be refunded if the request never goes upstream.
#[derive(Debug)]
pub struct SharedAdmission {
    /// Requests admitted in the rolling hour by every replica, this one included.
    pub sent: u64,
    stem: String,
    id: String,
    interval_ms: f64,
}

impl Store {
    /// Admits one request of the credential whose secret material is `identity`, or says why
    /// not, in one atomic step on the server.
    pub async fn admit(&self, identity: &[u8], policy: Policy) -> Result<Verdict, Unavailable> {
        let keys = &self.budget;
        let id = format!(
            "{}-{}",
            keys.replica,
            keys.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let id_ref = &id;
        let (verdict, value, stem) = self
            .call(|mut connection| async move {
                let mut salt = keys.salt();
                loop {
                    let stem = keys.stem(&salt, identity);
                    let (verdict, value, stored): (String, i64, String) = keys
                        .admit
                        .key(keys.salt_key())
                        .key(format!("{stem}:window"))
                        .key(format!("{stem}:pace"))
                        .key(format!("{stem}:cooldown"))
                        .arg(&salt)
                        .arg(policy.per_hour.unwrap_or(0))
                        .arg(policy.interval_ms)
                        .arg(policy.tolerance_ms)
                        .arg(id_ref)
                        .invoke_async(&mut connection)
                        .await?;
                    if verdict == "salt" && stored != salt {
                        // The store was emptied and another replica put its salt back first.
                        keys.adopt_salt(stored.clone());
                        salt = stored;
                        continue;
                    }
                    return Ok((verdict, value, stem));
                }
            })
            .await?;
        let millis = Duration::from_millis(value.max(0) as u64);
        Ok(match verdict.as_str() {
            "ok" => Verdict::Admitted(SharedAdmission {
                sent: value.max(0) as u64,
                stem,
                id,
                interval_ms: policy.interval_ms,
            }),
            "limit" => Verdict::Limited(millis),
            "pace" => Verdict::Paced(millis),
            _ => Verdict::CoolingDown(millis),
        })
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

    /// Starts (or lengthens) the credential's cool-down for every replica.
    pub async fn cool_down(&self, identity: &[u8], length: Duration) -> Result<(), Unavailable> {
        let keys = &self.budget;
        let length_ms = u64::try_from(length.as_millis()).unwrap_or(u64::MAX).max(1);
        self.call(|mut connection| async move {
            let mut salt = keys.salt();
            loop {
                let stem = keys.stem(&salt, identity);
                let (verdict, _, stored): (String, i64, String) = keys
                    .cool_down
                    .key(keys.salt_key())
                    .key(format!("{stem}:cooldown"))
                    .arg(&salt)
                    .arg(length_ms)
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
