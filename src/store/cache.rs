//! Response-cache entries in the store, so a replica serves what another one fetched, and the
//! fill lock that keeps replicas from fetching the same answer at once (docs/store.md).
//!
//! This module stores opaque bytes: an entry is a hash of `meta` (what the cache needs to
//! rebuild the response head), `body`, the `gens` it was fetched under and the server time it
//! was `sent` (ms, minus the answer's age then). The HTTP side lives in [`crate::cache`].
//!
//! Invalidation is by generation tokens, not by deleting entries: every entry records the
//! tokens of the generations it depends on (its repository, writes outside every repository,
//! ...); a write replaces those tokens with fresh random ones, so every entry fetched before it
//! stops matching at once, on every replica, with one bounded call. A token that expired or was
//! evicted comes back as a new random value, never as an old one, so a lost generation can only
//! turn entries into misses. An entry is written only if its generations are still the ones
//! read before its request went upstream (checked in the same script), so an answer fetched
//! while a write was under way is never stored after it.

use std::time::Duration;

use bytes::Bytes;
use redis::{Script, Value};

use super::random_hex;
use super::{Store, Unavailable};

/// Looks an entry up; on a miss, optionally takes the fill lock. KEYS: entry, lock, gens...
/// ARGV: token for a missing generation, generation ttl (ms), lock token ('' for none), lock
/// ttl (ms). Answers {'hit', gens, meta, body, age ms} or {'miss', gens, lock state}.
const LOOKUP: &str = r#"
redis.replicate_commands()
local gens = {}
for i = 3, #KEYS do
  local g = redis.call('GET', KEYS[i])
  if g then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
  else
    g = ARGV[1]
    redis.call('SET', KEYS[i], g, 'PX', ARGV[2])
  end
  gens[#gens + 1] = g
end
local current = table.concat(gens, ',')
local found = redis.call('HMGET', KEYS[1], 'gens', 'meta', 'body', 'sent')
if found[1] and found[1] == current and found[2] and found[3] and found[4] then
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  return {'hit', current, found[2], found[3], math.max(0, now - tonumber(found[4]))}
end
local lock = 'free'
if ARGV[3] ~= '' then
  if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[4]) then
    lock = 'mine'
  elseif redis.call('GET', KEYS[2]) == ARGV[3] then
    lock = 'mine'
  else
    lock = 'held'
  end
elseif redis.call('EXISTS', KEYS[2]) == 1 then
  lock = 'held'
end
return {'miss', current, lock}
"#;

/// Stores an entry if its generations are unchanged, and releases the caller's fill lock.
/// KEYS: entry, lock, gens... ARGV: expected gens, meta, body, age when stored (ms), ttl (ms),
/// lock token ('' for none). Answers 1 if stored.
const PUT: &str = r#"
redis.replicate_commands()
local gens = {}
for i = 3, #KEYS do
  gens[#gens + 1] = redis.call('GET', KEYS[i]) or ''
end
local stored = 0
if table.concat(gens, ',') == ARGV[1] then
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'gens', ARGV[1], 'meta', ARGV[2], 'body', ARGV[3], 'sent', tostring(now - tonumber(ARGV[4])))
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  stored = 1
end
if ARGV[6] ~= '' and redis.call('GET', KEYS[2]) == ARGV[6] then
  redis.call('DEL', KEYS[2])
end
return stored
"#;

/// How long a generation token lives without being read or written; longer than any entry.
const GENERATION_TTL: Duration = Duration::from_secs(48 * 3600);

pub(crate) struct CacheScripts {
    lookup: Script,
    put: Script,
    release: Script,
}

impl CacheScripts {
    pub(crate) fn new() -> Self {
        CacheScripts {
            lookup: Script::new(LOOKUP),
            put: Script::new(PUT),
            release: Script::new(super::RELEASE),
        }
    }
}

/// Where one entry lives, its fill lock, and the generations it depends on.
#[derive(Debug, Clone)]
pub struct SharedKey {
    entry: String,
    lock: String,
    gens: Vec<String>,
}

/// An entry found in the store.
#[derive(Debug)]
pub struct Found {
    /// The generations it was stored under, the current ones.
    pub gens: Bytes,
    pub meta: Bytes,
    pub body: Bytes,
    /// How old the answer is now, on the store's clock.
    pub age: Duration,
}

/// Who holds the fill lock of a missing entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// This caller: it fetches the answer and stores it.
    Mine,
    /// Another caller (most likely another replica) is fetching it.
    Held,
    /// Nobody (no lock was asked for).
    Free,
}

/// What a lookup found.
#[derive(Debug)]
pub enum Looked {
    Hit(Found),
    /// Not there: `gens` are the generations to store the answer under.
    Miss {
        gens: Bytes,
        fill: Fill,
    },
}

impl Store {
    /// The key of an entry: the credential's keyed fingerprint (never the secret) and a digest
    /// of the rest of the request's identity; `gens` name the generations it depends on.
    pub fn cache_key(&self, identity: &[u8], digest: &str, gens: &[String]) -> SharedKey {
        let prefix = self.budget.prefix();
        let entry = format!(
            "{prefix}cache:{}:{digest}",
            self.budget.fingerprint(identity)
        );
        SharedKey {
            lock: format!("{entry}:fill"),
            entry,
            gens: gens
                .iter()
                .map(|name| format!("{prefix}cache:gen:{name}"))
                .collect(),
        }
    }

    /// Looks `key` up; on a miss with a `lock` token, takes the fill lock for `lock_ttl` unless
    /// another caller holds it.
    pub async fn cache_lookup(
        &self,
        key: &SharedKey,
        lock: Option<&str>,
        lock_ttl: Duration,
    ) -> Result<Looked, Unavailable> {
        let scripts = &self.cache_scripts;
        let fresh = random_hex(16);
        let reply: Vec<Value> = self
            .call(|mut connection| async move {
                let mut invocation = scripts.lookup.key(&key.entry);
                invocation.key(&key.lock);
                for generation in &key.gens {
                    invocation.key(generation);
                }
                invocation
                    .arg(&fresh)
                    .arg(millis(GENERATION_TTL))
                    .arg(lock.unwrap_or(""))
                    .arg(millis(lock_ttl))
                    .invoke_async(&mut connection)
                    .await
            })
            .await?;
        // An answer in another shape (a foreign script under our prefix?) is a miss to fall
        // back from, like a store that did not answer.
        parse_lookup(reply).ok_or(Unavailable)
    }

    /// Stores an entry for `ttl` if its generations are still `gens`, and releases the fill
    /// lock `lock` if this caller holds it. Returns whether the entry was stored.
    #[allow(clippy::too_many_arguments)]
    pub async fn cache_put(
        &self,
        key: &SharedKey,
        gens: &[u8],
        meta: &[u8],
        body: &[u8],
        age: Duration,
        ttl: Duration,
        lock: Option<&str>,
    ) -> Result<bool, Unavailable> {
        let scripts = &self.cache_scripts;
        self.call(|mut connection| async move {
            let mut invocation = scripts.put.key(&key.entry);
            invocation.key(&key.lock);
            for generation in &key.gens {
                invocation.key(generation);
            }
            invocation
                .arg(gens)
                .arg(meta)
                .arg(body)
                .arg(millis(age))
                .arg(millis(ttl).max(1))
                .arg(lock.unwrap_or(""))
                .invoke_async::<i64>(&mut connection)
                .await
                .map(|stored| stored == 1)
        })
        .await
    }

    /// The current tokens of the generations `key` depends on, joined as an entry records
    /// them: a copy of an entry held elsewhere is still good while they match.
    pub async fn cache_generations(&self, key: &SharedKey) -> Result<Bytes, Unavailable> {
        let names = &key.gens;
        let tokens: Vec<Option<Vec<u8>>> = self
            .call(|mut connection| async move {
                redis::cmd("MGET")
                    .arg(names)
                    .query_async(&mut connection)
                    .await
            })
            .await?;
        Ok(Bytes::from(
            tokens
                .into_iter()
                .map(Option::unwrap_or_default)
                .collect::<Vec<_>>()
                .join(&b","[..]),
        ))
    }

    /// Gives up the fill lock of `key` if `lock` still holds it (the fetch failed, or its
    /// answer is not stored).
    pub async fn cache_release(&self, key: &SharedKey, lock: &str) -> Result<(), Unavailable> {
        let scripts = &self.cache_scripts;
        self.call(|mut connection| async move {
            scripts
                .release
                .key(&key.lock)
                .arg(lock)
                .invoke_async::<i64>(&mut connection)
                .await
                .map(drop)
        })
        .await
    }

    /// Starts new generations `names` (what a write makes stale), on every replica at once.
    pub async fn cache_invalidate(&self, names: &[String]) -> Result<(), Unavailable> {
        let prefix = self.budget.prefix();
        let token = random_hex(16);
        let ttl = millis(GENERATION_TTL);
        let mut pipe = redis::pipe();
        pipe.atomic();
        for name in names {
            pipe.cmd("SET")
                .arg(format!("{prefix}cache:gen:{name}"))
                .arg(&token)
                .arg("PX")
                .arg(ttl)
                .ignore();
        }
        self.call(|mut connection| async move { pipe.query_async::<()>(&mut connection).await })
            .await
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn bytes_of(value: &Value) -> Option<Bytes> {
    match value {
        Value::BulkString(bytes) => Some(Bytes::copy_from_slice(bytes)),
        Value::SimpleString(text) => Some(Bytes::copy_from_slice(text.as_bytes())),
        _ => None,
    }
}

fn parse_lookup(reply: Vec<Value>) -> Option<Looked> {
    let verdict = bytes_of(reply.first()?)?;
    let gens = bytes_of(reply.get(1)?)?;
    match &verdict[..] {
        b"hit" => {
            let age = match reply.get(4)? {
                Value::Int(ms) => Duration::from_millis(u64::try_from(*ms).unwrap_or(0)),
                _ => return None,
            };
            Some(Looked::Hit(Found {
                gens,
                meta: bytes_of(reply.get(2)?)?,
                body: bytes_of(reply.get(3)?)?,
                age,
            }))
        }
        b"miss" => {
            let fill = match &bytes_of(reply.get(2)?)?[..] {
                b"mine" => Fill::Mine,
                b"held" => Fill::Held,
                _ => Fill::Free,
            };
            Some(Looked::Miss { gens, fill })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn lookups_are_parsed_and_odd_replies_refused() {
        let hit = parse_lookup(vec![
            text("hit"),
            text("a,b"),
            text("m"),
            text("{}"),
            Value::Int(1500),
        ]);
        let Some(Looked::Hit(found)) = hit else {
            panic!("{hit:?}")
        };
        assert_eq!(found.age, Duration::from_millis(1500));
        assert_eq!(&found.body[..], b"{}");
        let miss = parse_lookup(vec![text("miss"), text("a"), text("held")]);
        assert!(matches!(
            miss,
            Some(Looked::Miss {
                fill: Fill::Held,
                ..
            })
        ));
        assert!(parse_lookup(vec![text("hit"), text("a")]).is_none());
        assert!(parse_lookup(vec![Value::Int(3)]).is_none());
        assert!(parse_lookup(vec![text("what"), text("a"), text("b")]).is_none());
    }
}
