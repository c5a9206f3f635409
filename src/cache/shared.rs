//! The response cache's half of the shared store (`[store]`, docs/store.md): entries this
//! replica would store are also written to Redis with their TTL, a local miss looks there before
//! going upstream, a short fill lock lets one replica fetch while the others wait for its entry,
//! and writes start new generations of what they make stale on every replica.
//!
//! Everything here is best effort: a store that is down, slow or answers oddly turns into
//! "go upstream" (and a count in `store_cache_fallbacks`), never into an error for the client.
//! The same entries, size cap and freshness rules as the in-process store apply.
//! Uses [`crate::store`] for the calls and [`super::key`] / [`super::policy`] for what an entry
//! is; the proxy's phases never call it directly.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::coalesce::Head;
use super::key::Key;
use super::policy::{self, Freshness};
use super::store::Entry;
use super::writes::Write;
use super::{Cache, CacheStatus, Client, Lookup, lock, respond_with};
use crate::base::body::ProxyBody;
use crate::store::Store;
use crate::store::cache::{Fill, Found, Looked, SharedKey};
use http::Response;

/// How long a fill lock holds before it lapses by itself (a replica that died mid-fetch).
pub const FILL_LOCK_TTL: Duration = Duration::from_secs(5);
/// How long an answer to an immutable path stays in the store.
pub const SHARED_IMMUTABLE_TTL: Duration = Duration::from_secs(24 * 3600);
const FIRST_POLL: Duration = Duration::from_millis(10);
const MAX_POLL: Duration = Duration::from_millis(200);

#[derive(Clone)]
pub(super) struct SharedCache {
    store: Arc<Store>,
}

/// A request's place in the store from its lookup until its answer is stored or given up.
pub(super) struct Claim {
    pub(super) key: SharedKey,
    /// The generations read before the request went upstream.
    pub(super) gens: Bytes,
    /// The fill-lock token, while this request holds the lock.
    lock: Option<String>,
}

/// What the store has for a request that missed locally.
pub(super) enum Obtained {
    /// A fresh entry, `age` old now, stored under the generations `gens`.
    Hit {
        head: Arc<Head>,
        body: Bytes,
        age: Duration,
        gens: Bytes,
    },
    /// Go upstream, and store the answer under the claim if there is one.
    Fetch(Option<Claim>),
}

impl SharedCache {
    pub(super) fn new(store: Arc<Store>) -> SharedCache {
        SharedCache { store }
    }

    /// Where `key`'s entry lives in the store: named by the credential's keyed fingerprint and a
    /// digest of the upstream origin, method, target and selecting headers.
    pub(super) fn key(&self, client: &Client<'_>, key: &Key, scope: Option<&str>) -> SharedKey {
        let origin = client.config.upstream.origin(key.upstream);
        let mut digest = Sha256::new();
        let mut field = |bytes: &[u8]| {
            digest.update((bytes.len() as u64).to_be_bytes());
            digest.update(bytes);
        };
        field(origin.scheme.as_str().as_bytes());
        field(origin.authority.as_str().as_bytes());
        field(if key.head { b"HEAD" } else { b"GET" });
        field(key.target.as_bytes());
        for value in &key.selecting {
            match value {
                Some(value) => field(value),
                None => field(b"\0absent"),
            }
        }
        let digest = crate::store::hex(&digest.finalize()[..16]);
        let path = key.target.split('?').next().unwrap_or_default();
        let immutable = policy::is_immutable(key.upstream, path);
        self.store.cache_key(
            client.route.credential.budget_identity(),
            &digest,
            &entry_generations(scope, immutable),
        )
    }

    /// Looks `key` up. On a miss a request that will store its answer takes the fill lock; if
    /// another replica holds it, waits for its entry (polling, at most `wait_max`), then goes
    /// upstream itself.
    pub(super) async fn obtain(
        &self,
        key: SharedKey,
        read: bool,
        write: bool,
        freshness: Freshness,
        wait_max: Duration,
    ) -> Obtained {
        let metrics = self.store.metrics();
        let token = (read && write).then(|| crate::store::random_hex(16));
        let deadline = Instant::now() + wait_max;
        let mut pause = FIRST_POLL;
        let mut waited = false;
        loop {
            let looked = self
                .store
                .cache_lookup(&key, token.as_deref(), FILL_LOCK_TTL)
                .await;
            let (gens, fill) = match looked {
                Err(_) => {
                    metrics.cache_fallbacks.inc();
                    return Obtained::Fetch(None);
                }
                Ok(Looked::Hit(found)) => {
                    let gens = found.gens.clone();
                    if read && let Some((head, body, age)) = fresh(found, freshness) {
                        metrics.cache_hits.inc();
                        return Obtained::Hit {
                            head,
                            body,
                            age,
                            gens,
                        };
                    }
                    (gens, Fill::Free)
                }
                Ok(Looked::Miss { gens, fill }) => (gens, fill),
            };
            let claim = |lock| Claim {
                key: key.clone(),
                gens: gens.clone(),
                lock,
            };
            match fill {
                Fill::Mine => return Obtained::Fetch(Some(claim(token.clone()))),
                Fill::Held if Instant::now() + pause < deadline => {
                    if !waited {
                        metrics.fill_waits.inc();
                        waited = true;
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_POLL);
                }
                Fill::Held | Fill::Free => return Obtained::Fetch(write.then(|| claim(None))),
            }
        }
    }

    /// Stores a complete answer `age` old under its claim (within `cap` and the freshness
    /// left), and releases the claim's fill lock either way.
    pub(super) async fn put(
        &self,
        claim: Claim,
        head: &Head,
        body: &Bytes,
        age: Duration,
        freshness: Freshness,
        cap: usize,
    ) {
        let ttl = match freshness {
            Freshness::Immutable => SHARED_IMMUTABLE_TTL,
            Freshness::MaxAge(max_age) => max_age.saturating_sub(age),
        };
        if body.len() > cap || ttl.is_zero() {
            self.release(claim).await;
            return;
        }
        let meta = encode_head(head);
        let stored = self
            .store
            .cache_put(
                &claim.key,
                &claim.gens,
                &meta,
                body,
                age,
                ttl,
                claim.lock.as_deref(),
            )
            .await;
        match stored {
            Ok(true) => {
                self.store.metrics().cache_stored.inc();
            }
            Ok(false) => {}
            Err(_) => {
                self.store.metrics().cache_fallbacks.inc();
            }
        }
    }

    /// Whether a copy of an entry fetched under `gens` is still good: no write made it stale
    /// on any replica. A store that cannot tell leaves the copy good (`on_error` never turns a
    /// cache read into an error).
    pub(super) async fn current(&self, key: &SharedKey, gens: &Bytes) -> bool {
        match self.store.cache_generations(key).await {
            Ok(now) => now == *gens,
            Err(_) => {
                self.store.metrics().cache_fallbacks.inc();
                true
            }
        }
    }

    /// Gives up the claim's fill lock, if it holds one: the waiting replicas go upstream.
    pub(super) async fn release(&self, claim: Claim) {
        if let Some(lock) = &claim.lock
            && self.store.cache_release(&claim.key, lock).await.is_err()
        {
            // The lock lapses by itself within FILL_LOCK_TTL.
            self.store.metrics().cache_fallbacks.inc();
        }
    }

    /// Makes what `write` drops stale on every replica.
    pub(super) async fn invalidate(&self, write: &Write) {
        if self
            .store
            .cache_invalidate(&write_generations(write))
            .await
            .is_err()
        {
            self.store.metrics().cache_fallbacks.inc();
        }
    }
}

impl Cache {
    /// A fresh entry in the shared store for a request the budget refused: it costs no budget,
    /// so it answers (and fills this replica's memory). No fill lock is taken; one held by
    /// another replica is waited for as on a miss.
    pub(super) async fn shared_answer(
        &self,
        client: &Client<'_>,
        lookup: &Lookup,
    ) -> Option<Response<ProxyBody>> {
        let (shared, freshness) = (self.shared.as_ref()?, lookup.freshness?);
        if !lookup.directives.read_store {
            return None;
        }
        let started = lock(&self.epochs).seq;
        let key = shared.key(client, &lookup.key, lookup.scope.as_deref());
        // An entry being filled by another replica is worth the wait a miss would make.
        let wait_max = FILL_LOCK_TTL.min(client.config.upstream.timeout);
        let found = shared
            .obtain(key.clone(), true, false, freshness, wait_max)
            .await;
        let Obtained::Hit {
            head,
            body,
            age,
            gens,
        } = found
        else {
            return None;
        };
        client.count(&client.metrics.cache.hits);
        if lookup.directives.write_store {
            let since = (std::time::Instant::now(), age);
            let place = Some((key, gens));
            let scope = lookup.scope.clone();
            let (kept_head, kept_body) = (head.clone(), body.clone());
            self.keep(
                &lookup.key,
                kept_head,
                kept_body,
                since,
                started,
                scope,
                place,
            );
        }
        let ttl = match freshness {
            Freshness::MaxAge(max_age) => Some(max_age.saturating_sub(age)),
            Freshness::Immutable => None,
        };
        let body = crate::base::body::LocalBody::new(body);
        Some(respond_with(
            client,
            &head,
            body,
            CacheStatus::Shared,
            age,
            ttl,
            None,
        ))
    }

    /// [`Self::stored`], less a copy that a write through another replica made stale (with
    /// `[store]`; one bounded call to compare its generations).
    pub(super) async fn stored_current(
        &self,
        client: &Client<'_>,
        lookup: &Lookup,
        now: std::time::Instant,
    ) -> Option<Result<Arc<Entry>, Arc<Entry>>> {
        let found = self.stored(client, lookup, now)?;
        let entry = match &found {
            Ok(entry) | Err(entry) => entry,
        };
        if let (Some(shared), Some((key, gens))) = (&self.shared, &entry.shared)
            && !Box::pin(shared.current(key, gens)).await
        {
            let mut store = lock(&self.store);
            // Only this copy: another request may have stored a newer one meanwhile.
            if store
                .peek(&lookup.key)
                .is_some_and(|held| Arc::ptr_eq(&held, entry))
            {
                store.remove(&lookup.key);
            }
            return None;
        }
        Some(found)
    }
}

/// A found entry's head, body and age, if it decodes and is still fresh.
fn fresh(found: Found, freshness: Freshness) -> Option<(Arc<Head>, Bytes, Duration)> {
    if let Freshness::MaxAge(max_age) = freshness
        && found.age >= max_age
    {
        return None;
    }
    let head = decode_head(&found.meta, found.body.len())?;
    Some((Arc::new(head), found.body, found.age))
}

/// A repository scope as it appears in a generation's name: hashed, so a long or odd path
/// cannot make a long or odd key.
fn scope_name(scope: &str) -> String {
    crate::store::hex(&Sha256::digest(scope.as_bytes())[..12])
}

/// The generations an entry depends on, mirroring [`Write::drops`]: an entry outside every
/// repository goes with any write; a mutable one with a write to its repository or outside
/// every repository; an immutable one only with a write to the repository object itself.
fn entry_generations(scope: Option<&str>, immutable: bool) -> Vec<String> {
    match (scope, immutable) {
        (None, _) => vec!["any".into()],
        (Some(scope), true) => vec![format!("itself:{}", scope_name(scope))],
        (Some(scope), false) => vec!["global".into(), format!("repo:{}", scope_name(scope))],
    }
}

/// The generations a write starts anew.
fn write_generations(write: &Write) -> Vec<String> {
    let mut names = vec!["any".to_owned()];
    match write.scope.as_deref() {
        None => names.push("global".into()),
        Some(scope) => {
            names.push(format!("repo:{}", scope_name(scope)));
            if write.repository_itself {
                names.push(format!("itself:{}", scope_name(scope)));
            }
        }
    }
    names
}

const META_VERSION: &[u8] = b"v1 ";

/// The response head as stored: `v1 {status}` then one `name:value` line per header. Header
/// values cannot hold CR or LF, so the lines cannot be confused.
fn encode_head(head: &Head) -> Vec<u8> {
    let mut meta = META_VERSION.to_vec();
    meta.extend_from_slice(head.status.as_str().as_bytes());
    for (name, value) in &head.headers {
        meta.push(b'\n');
        meta.extend_from_slice(name.as_str().as_bytes());
        meta.push(b':');
        meta.extend_from_slice(value.as_bytes());
    }
    meta
}

/// The head of a stored entry; `None` for anything malformed (it is then a miss).
fn decode_head(meta: &[u8], body_len: usize) -> Option<Head> {
    let rest = meta.strip_prefix(META_VERSION)?;
    let mut lines = rest.split(|&b| b == b'\n');
    let status = StatusCode::from_bytes(lines.next()?).ok()?;
    let mut headers = HeaderMap::new();
    for line in lines {
        let colon = line.iter().position(|&b| b == b':')?;
        headers.append(
            HeaderName::from_bytes(&line[..colon]).ok()?,
            HeaderValue::from_bytes(&line[colon + 1..]).ok()?,
        );
    }
    // Only what the in-process store would keep comes back: a whole, shareable 200, with no
    // header that could frame or route the response differently from the stored body (an entry
    // is data from another process, so it is checked like an upstream answer).
    crate::base::headers::sanitize_response(&mut headers);
    let length_matches = headers
        .get_all(http::header::CONTENT_LENGTH)
        .iter()
        .all(|v| v.to_str().ok().and_then(|v| v.trim().parse::<usize>().ok()) == Some(body_len));
    if !policy::storable(status, &headers) || !length_matches {
        return None;
    }
    Some(Head {
        status,
        headers,
        shareable: true,
        length: Some(body_len as u64),
        upstream: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_round_trip_and_garbage_is_a_miss() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/json".parse().unwrap());
        headers.append("x-multi", "a".parse().unwrap());
        headers.append("x-multi", HeaderValue::from_bytes(b"b:\xe9").unwrap());
        let head = Head {
            status: StatusCode::OK,
            headers,
            shareable: true,
            length: Some(2),
            upstream: None,
        };
        let decoded = decode_head(&encode_head(&head), 2).unwrap();
        assert_eq!(decoded.status, StatusCode::OK);
        assert_eq!(decoded.headers, head.headers);
        let mut framed = encode_head(&head);
        framed.extend_from_slice(b"\ncontent-length:3");
        assert!(
            decode_head(&framed, 2).is_none(),
            "a length that is not the body's"
        );
        assert!(decode_head(&framed, 3).is_some());
        let mut hop = encode_head(&head);
        hop.extend_from_slice(b"\ntransfer-encoding:chunked\nconnection:x-multi");
        let cleaned = decode_head(&hop, 2).unwrap();
        assert!(cleaned.headers.get("transfer-encoding").is_none());
        assert!(cleaned.headers.get("x-multi").is_none());
        for bad in [
            &b""[..],
            b"v2 200",
            b"v1 abc",
            b"v1 200\nno-colon",
            b"v1 200\nbad name:x",
            b"v1 404",
        ] {
            assert!(decode_head(bad, 0).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn generations_mirror_what_a_write_drops() {
        let write = |scope: Option<&str>, itself| Write {
            scope: scope.map(Into::into),
            repository_itself: itself,
        };
        let cases = [
            (None, false),
            (Some("acme/widgets"), false),
            (Some("acme/widgets"), true),
            (Some("acme/gadgets"), false),
        ];
        for written in [
            write(None, false),
            write(Some("acme/widgets"), false),
            write(Some("acme/widgets"), true),
        ] {
            let started = write_generations(&written);
            for (scope, immutable) in cases {
                let depends = entry_generations(scope, immutable);
                assert_eq!(
                    depends.iter().any(|g| started.contains(g)),
                    written.drops(scope, immutable),
                    "{:?} {:?} {scope:?} {immutable}",
                    written.scope,
                    written.repository_itself
                );
            }
        }
        assert!(!scope_name("acme/widgets").contains("acme"));
    }
}
