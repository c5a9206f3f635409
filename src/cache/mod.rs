//! Spending Bitbucket's request budget once: identical GET/HEAD requests in flight at the same
//! time share one upstream request ([`coalesce`]), and answers that cannot change, or that a
//! route allows to be reused for `max_age`, are answered from memory ([`store`]).
//!
//! This is the phase after `govern` and before `inject_credential` in [`crate::proxy`]: a
//! request reaches it admitted, routed and with its method allowed. [`Cache::plan`] decides
//! whether a request takes part ([`policy`], [`key`]); [`Cache::respond`] answers it from the
//! store, from another request's upstream answer, or by leading an upstream request of its
//! own through the `fetch` the proxy hands in (the credential, forwarding and renewal phases).
//! Every client's response is built from the shared upstream bytes by the link rewriter for
//! that client's route and host.
//!
//! A write (any method but GET, HEAD, OPTIONS, TRACE) drops the mutable entries of its
//! repository (and those that belong to no repository), and stops new requests from joining
//! upstream requests that started before it. Immutable entries go only with a write to the
//! repository itself (a rename, transfer or deletion): no other write changes a commit.
//!
//! With `[store]`, `shared` extends this across replicas: a local miss looks in Redis (in the
//! leader of the local flight, so in-process coalescing stays exact), answers are written there
//! too, and writes start new generations of what they drop on every replica.
//!
//! The cache belongs to one config generation: a reload starts an empty one.
//!
//! Uses [`crate::rewrite`] (each client's copy is rewritten for its route and host),
//! [`crate::routing`] (the route a request matched), [`crate::error`] and the metrics; the
//! upstream request itself is the `fetch` the proxy hands in, so nothing here forwards.

pub mod coalesce;
pub mod key;
pub mod policy;
mod shared;
pub mod status;
pub mod store;
mod writes;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::base::body::{BoxError, LocalBody, ProxyBody, UpstreamBody};
use crate::config::Config;
use crate::error::ProxyError;
use crate::rewrite;
use crate::rewrite::RewritePatterns;
use crate::routing::Route;
use crate::telemetry::metrics::{CredentialLabels, Metrics};
use coalesce::{Filled, Flight, Head, Ready};
use key::Key;
use policy::{Bypass, CacheLimits, ClientDirectives, Freshness};
pub use shared::{FILL_LOCK_TTL, SHARED_IMMUTABLE_TTL};
use shared::{Obtained, SharedCache};
use status::CACHE_STATUS;
pub use status::CacheStatus;
use store::{Entry, Store};
use writes::Epochs;
pub use writes::Write;

/// Whether and how a request takes part.
pub enum Plan {
    Bypass(CacheStatus),
    Shared(Lookup),
}

/// A request that takes part: its key and what may be done with its answer.
pub struct Lookup {
    key: Key,
    /// How long a stored answer stays fresh on this route; `None` when none is stored.
    freshness: Option<Freshness>,
    directives: ClientDirectives,
    scope: Option<Box<str>>,
}

/// The request a response is built for.
pub struct Client<'a> {
    /// The generation's config and link patterns, for rewriting a shared answer per client.
    pub config: &'a Arc<Config>,
    pub patterns: &'a Arc<RewritePatterns>,
    pub route: &'a Arc<Route>,
    pub host: Option<&'a HeaderValue>,
    pub metrics: &'a Arc<Metrics>,
}

impl Client<'_> {
    fn labels(&self) -> CredentialLabels {
        CredentialLabels {
            credential: self.route.credential.name.clone(),
        }
    }

    /// Counts one answer in `family`'s series for this request's credential.
    fn count(&self, family: &Family<CredentialLabels, Counter>) {
        family.get_or_create(&self.labels()).inc();
    }
}

/// The store, the upstream requests in flight, and the write record of one generation.
pub struct Cache {
    limits: CacheLimits,
    store: Mutex<Store>,
    flights: Mutex<HashMap<Key, Arc<Flight>>>,
    epochs: Mutex<Epochs>,
    /// `[store]`: entries shared with the other replicas.
    shared: Option<SharedCache>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Cache {
    pub fn new(limits: CacheLimits, store: Option<Arc<crate::store::Store>>) -> Cache {
        Cache {
            limits,
            store: Mutex::new(Store::new(
                usize::try_from(limits.max_bytes).unwrap_or(usize::MAX),
            )),
            flights: Mutex::new(HashMap::new()),
            epochs: Mutex::new(Epochs::default()),
            shared: store.map(SharedCache::new),
        }
    }

    fn cap(&self) -> usize {
        usize::try_from(self.limits.max_entry_bytes).unwrap_or(usize::MAX)
    }

    /// Decides whether a request takes part, from its method, headers and route.
    pub fn plan<B>(&self, route: &Route, request: &Request<B>) -> Plan {
        if !policy::shares_method(request.method()) {
            return Plan::Bypass(CacheStatus::Method);
        }
        let upstream_path = route.upstream_path(request.uri().path());
        let freshness = if self.limits.max_bytes == 0 {
            None
        } else {
            policy::freshness(
                &route.cache,
                route.upstream,
                request.method(),
                &upstream_path,
            )
        };
        // Before the headers: a route that neither stores nor shares this path bypasses
        // whatever they say, and a look-up per header costs more than the path's checks.
        if freshness.is_none() && !route.coalesce {
            return Plan::Bypass(CacheStatus::Bypass);
        }
        let directives = match policy::client_directives(request.method(), request.headers()) {
            Ok(directives) => directives,
            Err(Bypass::Method) => return Plan::Bypass(CacheStatus::Method),
            Err(Bypass::Request) => return Plan::Bypass(CacheStatus::Bypass),
        };
        let scope = key::repository_scope(route.upstream, &upstream_path);
        let mut target = upstream_path.into_owned();
        if let Some(query) = request.uri().query() {
            target.push('?');
            target.push_str(query);
        }
        let keyed = key::keyed_headers(request.headers(), route.rewrite_links);
        let key = Key::new(
            &route.credential.name,
            route.upstream,
            request.method(),
            &target,
            &keyed,
        );
        Plan::Shared(Lookup {
            key,
            freshness,
            directives,
            scope,
        })
    }

    /// Records a request through `route` to the local `path` if it is a write (any method
    /// but GET, HEAD, OPTIONS, TRACE): its repository's entries go, and requests in flight for
    /// them take no new joiners. Returns the write, to [drop](Self::drop_written) again when
    /// its answer has arrived.
    pub async fn note_write(&self, route: &Route, method: &Method, path: &str) -> Option<Write> {
        if matches!(
            *method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
        ) {
            return None;
        }
        let upstream_path = route.upstream_path(path);
        let write = Write {
            scope: key::repository_scope(route.upstream, &upstream_path),
            repository_itself: key::is_repository_itself(route.upstream, &upstream_path),
        };
        self.drop_written(&write).await;
        Some(write)
    }

    /// Drops what `write` makes stale, here and (with `[store]`, bounded by `store.timeout`)
    /// on every replica, and keeps answers already under way out of the store.
    pub async fn drop_written(&self, write: &Write) {
        lock(&self.epochs).record(write);
        let in_scope = |key: &Key| {
            let path = key.target.split('?').next().unwrap_or_default();
            let scope = key::repository_scope(key.upstream, path);
            write.drops(scope.as_deref(), policy::is_immutable(key.upstream, path))
        };
        lock(&self.flights).retain(|key, _| !in_scope(key));
        lock(&self.store).retain(|key, _| !in_scope(key));
        if let Some(shared) = &self.shared {
            Box::pin(shared.invalidate(write)).await;
        }
    }

    /// A stored entry for the lookup: `Ok` when fresh, `Err` when stale but still within the
    /// route's `stale_if_error`. Expired entries past that are dropped.
    fn stored(
        &self,
        client: &Client<'_>,
        lookup: &Lookup,
        now: Instant,
    ) -> Option<Result<Arc<Entry>, Arc<Entry>>> {
        let freshness = lookup.freshness?;
        let mut store = lock(&self.store);
        let entry = store.get(&lookup.key)?;
        let Freshness::MaxAge(max_age) = freshness else {
            return Some(Ok(entry));
        };
        let age = entry.age(now);
        if age < max_age {
            return Some(Ok(entry));
        }
        match client.route.cache.stale_if_error {
            Some(window) if age < max_age + window => Some(Err(entry)),
            _ => {
                store.remove(&lookup.key);
                None
            }
        }
    }

    /// After the governor refused a request: a fresh entry answers it anyway (it costs no
    /// budget), here or in the shared store, and a stale one of this replica's when the route
    /// allows `stale_if_error` for this refusal.
    pub async fn answer_refusal(
        &self,
        client: &Client<'_>,
        lookup: &Lookup,
        refusal: &ProxyError,
    ) -> Option<Response<ProxyBody>> {
        let now = Instant::now();
        let Some(stored) = self.stored_current(client, lookup, now).await else {
            // Not here: another replica may have it (with `[store]`).
            return self.shared_answer(client, lookup).await;
        };
        match stored {
            Ok(entry) if lookup.directives.read_store => {
                Some(self.entry_response(client, lookup, &entry, CacheStatus::Hit, None, now))
            }
            Ok(entry) | Err(entry) if policy::serves_stale_on_error(refusal) => {
                Some(self.entry_response(client, lookup, &entry, CacheStatus::Stale, None, now))
            }
            _ => None,
        }
    }

    /// Answers a request that takes part: from the store, from an identical request in
    /// flight, or by leading an upstream request through `fetch`.
    pub async fn respond<F, Fut>(
        self: &Arc<Self>,
        client: &Client<'_>,
        lookup: Lookup,
        request: Request<Incoming>,
        fetch: F,
    ) -> Result<Response<ProxyBody>, ProxyError>
    where
        F: FnOnce(Request<Incoming>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Response<UpstreamBody>, ProxyError>> + Send + 'static,
    {
        let now = Instant::now();
        let mut stale = None;
        match self.stored_current(client, &lookup, now).await {
            Some(Ok(entry)) if lookup.directives.read_store => {
                return Ok(self.entry_response(
                    client,
                    &lookup,
                    &entry,
                    CacheStatus::Hit,
                    None,
                    now,
                ));
            }
            Some(Err(entry)) => stale = Some(entry),
            _ => {}
        }
        let mut request = Some(request);
        let mut fetch = Some(fetch);
        let mut alone = !client.route.coalesce;
        loop {
            let (flight, owner) = {
                let mut flights = lock(&self.flights);
                match flights.get(&lookup.key) {
                    // A flight that has ended but is not yet out of the table (its task is still
                    // storing the answer) fetched before this request came: not joined.
                    Some(flight) if !alone && !flight.ended() => (flight.clone(), false),
                    _ => {
                        let flight = Flight::new(self.cap());
                        if !alone {
                            flights.insert(lookup.key.clone(), flight.clone());
                        }
                        (flight, true)
                    }
                }
            };
            if owner {
                // A leader is never detached, so a request leads at most once.
                let (Some(request), Some(fetch)) = (request.take(), fetch.take()) else {
                    unreachable!("a request leads at most once");
                };
                self.lead(client, &lookup, &flight, request, fetch, !alone);
            }
            match flight.ready(owner).await {
                Ready::Head(head) => {
                    if let Some(age) = flight.stored_age() {
                        // Filled from the shared store: a hit for every request that waited.
                        client.count(&client.metrics.cache.hits);
                        let ttl = match lookup.freshness {
                            Some(Freshness::MaxAge(max_age)) => Some(max_age.saturating_sub(age)),
                            _ => None,
                        };
                        let body = flight.body(&head, owner);
                        let status = CacheStatus::Shared;
                        return Ok(respond_with(client, &head, body, status, age, ttl, None));
                    }
                    if let Some(entry) = &stale
                        && policy::serves_stale_on_status(head.status)
                    {
                        return Ok(self.entry_response(
                            client,
                            &lookup,
                            entry,
                            CacheStatus::Stale,
                            Some(head.status),
                            Instant::now(),
                        ));
                    }
                    let status = if owner {
                        if lookup.directives.read_store {
                            CacheStatus::Miss
                        } else {
                            CacheStatus::Request
                        }
                    } else {
                        client.count(&client.metrics.cache.coalesced);
                        CacheStatus::Coalesced
                    };
                    let age = upstream_age(&head.headers) + flight.sent_at().elapsed();
                    let body = flight.body(&head, owner);
                    let mut response = respond_with(client, &head, body, status, age, None, None);
                    if owner && let Some(upstream) = &head.upstream {
                        response.extensions_mut().insert(upstream.clone());
                    }
                    return Ok(response);
                }
                Ready::Failed(error) => {
                    if let Some(entry) = &stale
                        && policy::serves_stale_on_error(&error)
                    {
                        return Ok(self.entry_response(
                            client,
                            &lookup,
                            entry,
                            CacheStatus::Stale,
                            None,
                            Instant::now(),
                        ));
                    }
                    return Err(error);
                }
                Ready::Detached => alone = true,
            }
        }
    }

    /// Runs the upstream request for `lookup` into `flight` in a task of its own, so it
    /// finishes for the others (and the store) even if this client leaves. A `registered`
    /// flight leaves the table of joinable requests when it ends.
    fn lead<F, Fut>(
        self: &Arc<Self>,
        client: &Client<'_>,
        lookup: &Lookup,
        flight: &Arc<Flight>,
        request: Request<Incoming>,
        fetch: F,
        registered: bool,
    ) where
        F: FnOnce(Request<Incoming>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Response<UpstreamBody>, ProxyError>> + Send + 'static,
    {
        let started = lock(&self.epochs).seq;
        let keep = lookup.freshness.is_some() && lookup.directives.write_store;
        let directives = lookup.directives;
        let shared = match (&self.shared, lookup.freshness) {
            (Some(shared), Some(freshness)) => Some((
                shared.clone(),
                shared.key(client, &lookup.key, lookup.scope.as_deref()),
                freshness,
            )),
            _ => None,
        };
        let config = &client.config;
        let wait_max = FILL_LOCK_TTL.min(config.upstream.timeout);
        let cap = self.cap();
        let cache = self.clone();
        let key = lookup.key.clone();
        let scope = lookup.scope.clone();
        let idle = config.upstream.idle_timeout;
        let metrics = client.metrics.clone();
        let flight = flight.clone();
        tokio::spawn(async move {
            let mut claim = None;
            let mut hit = None;
            if let Some((shared, shared_key, freshness)) = &shared {
                let (read, write) = (directives.read_store, directives.write_store);
                match shared
                    .obtain(shared_key.clone(), read, write, *freshness, wait_max)
                    .await
                {
                    Obtained::Hit {
                        head,
                        body,
                        age,
                        gens,
                    } => hit = Some((head, body, age, (shared_key.clone(), gens))),
                    Obtained::Fetch(taken) => claim = taken,
                }
            }
            if let Some((head, body, age, place)) = hit {
                // Not sent: the budget permit inside `fetch` goes back, as for a local hit.
                drop((fetch, request));
                flight.fill_stored(head.clone(), body.clone(), age);
                if keep {
                    let since = (Instant::now(), age);
                    cache.keep(&key, head, body, since, started, scope, Some(place));
                }
            } else {
                if shared.is_some() {
                    flight.mark_sent();
                }
                let answer = fetch(request).await;
                let filled = flight.fill(answer, idle).await;
                if let (true, Filled::Complete(head, body)) = (keep, filled) {
                    let age = upstream_age(&head.headers);
                    let since = (flight.sent_at(), age);
                    let place = claim.as_ref().map(|c| (c.key.clone(), c.gens.clone()));
                    let (head_kept, body_kept) = (head.clone(), body.clone());
                    let kept = cache.keep(&key, head_kept, body_kept, since, started, scope, place);
                    if let (true, Some((shared, _, freshness)), Some(taken)) =
                        (kept, &shared, claim.take())
                    {
                        let age = age + flight.sent_at().elapsed();
                        shared.put(taken, &head, &body, age, *freshness, cap).await;
                    }
                }
                if let (Some((shared, ..)), Some(taken)) = (&shared, claim) {
                    shared.release(taken).await;
                }
            }
            {
                let store = lock(&cache.store);
                metrics.cache.stored_bytes.set(store.bytes() as i64);
                metrics.cache.stored_entries.set(store.len() as i64);
            }
            if registered {
                let mut flights = lock(&cache.flights);
                if flights
                    .get(&key)
                    .is_some_and(|current| Arc::ptr_eq(current, &flight))
                {
                    flights.remove(&key);
                }
            }
        });
    }

    /// Stores a complete answer unless a write to its repository happened since its request
    /// went out; `since` is when its age was the second value. Returns false after such a
    /// write.
    #[allow(clippy::too_many_arguments)]
    fn keep(
        &self,
        key: &Key,
        head: Arc<Head>,
        body: bytes::Bytes,
        since: (Instant, Duration),
        started: u64,
        scope: Option<Box<str>>,
        shared: Option<(crate::store::cache::SharedKey, bytes::Bytes)>,
    ) -> bool {
        let path = key.target.split('?').next().unwrap_or_default();
        let immutable = policy::is_immutable(key.upstream, path);
        let epochs = lock(&self.epochs);
        if !epochs.unchanged_since(started, scope.as_deref(), immutable) {
            return false;
        }
        let entry = Entry::new(key, head, body, since.0, since.1, scope).with_shared(shared);
        // Inserted while the write record is locked: a write cannot slip between the check and
        // the insert.
        lock(&self.store).insert(key.clone(), entry);
        drop(epochs);
        true
    }

    fn entry_response(
        &self,
        client: &Client<'_>,
        lookup: &Lookup,
        entry: &Entry,
        status: CacheStatus,
        fwd_status: Option<StatusCode>,
        now: Instant,
    ) -> Response<ProxyBody> {
        client.count(match status {
            CacheStatus::Stale => &client.metrics.cache.stale,
            _ => &client.metrics.cache.hits,
        });
        let age = entry.age(now);
        let ttl = match (status, lookup.freshness) {
            (CacheStatus::Hit, Some(Freshness::MaxAge(max_age))) => {
                Some(max_age.saturating_sub(age))
            }
            _ => None,
        };
        let body = if lookup.key.head {
            LocalBody::default()
        } else {
            LocalBody::new(entry.body.clone())
        };
        respond_with(client, &entry.head, body, status, age, ttl, fwd_status)
    }
}

/// The upstream's `Age`, if it sent one.
fn upstream_age(headers: &http::HeaderMap) -> Duration {
    headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_secs)
}

/// One client's response from a shared head and body: links rewritten for its route and host,
/// `Age` and `Cache-Status` set.
fn respond_with<B>(
    client: &Client<'_>,
    head: &Head,
    body: B,
    status: CacheStatus,
    age: Duration,
    ttl: Option<Duration>,
    fwd_status: Option<StatusCode>,
) -> Response<ProxyBody>
where
    B: Body<Data = bytes::Bytes, Error = BoxError> + Send + 'static,
{
    let (mut parts, ()) = Response::new(()).into_parts();
    parts.status = head.status;
    parts.headers = head.headers.clone();
    let body = match rewrite::rewrite_any(
        client.config,
        client.patterns,
        client.route,
        client.host,
        &mut parts,
        body,
    ) {
        rewrite::Rewritten::Plain(body) => body.boxed_unsync(),
        rewrite::Rewritten::Body(body) => body.boxed_unsync(),
    };
    parts
        .headers
        .insert(header::AGE, HeaderValue::from(age.as_secs()));
    parts
        .headers
        .insert(CACHE_STATUS, status.header(ttl, fwd_status));
    parts.extensions.insert(status);
    Response::from_parts(parts, ProxyBody::Boxed { body })
}
