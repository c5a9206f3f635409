//! The forwarding service. A request passes these phases, in order, each a function that can be
//! tested alone:
//!
//! 1. [`admit`] — is the TCP peer in `allowed_clients`?
//! 2. [`check_target`] and [`route`] — a path on this server, safe, matching a route; paths
//!    under `/-/` are the proxy's own endpoints and go to [`crate::proxy::admin`] instead.
//! 3. [`authorize_method`] — the route's `methods` list, before any body byte is read.
//!    [`govern`] — the credential's budget: a 429 cool-down, `rate_limit`, NearLimit pacing;
//!    answered locally with 429 when spent. Returns a permit that is spent when the request is
//!    forwarded and refunds the budget if dropped (a request answered without going upstream).
//!    [`cache_phase`] — identical GET/HEAD requests share one upstream request, and stored
//!    answers are served ([`crate::cache`]); writes drop their repository's entries.
//! 4. [`inject_credential`] — the upstream URI, clean headers, the route's `Authorization`.
//! 5. [`forward`] — over the upstream client (an h2 lane or the pool), bounded by
//!    `upstream.timeout`.
//! 6. [`rewrite_response`] — hop-by-hop headers out, links pointed back at the proxy.
//! 7. Logging happens in [`crate::server::access_log::AccessLogLayer`] around this service.
//!
//! The proxy layer: uses [`crate::runtime`] (the generation a request runs on) and every layer
//! below it; only [`crate::server`] and [`crate::cli`] use it.

pub mod admin;

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body::Body as _;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::base::body::RequestBytes;
use crate::base::body::{Direction, ProxyBody, TimedBody, UpstreamBody, UpstreamRequestBody};
use crate::base::headers;
use crate::budget::{BudgetPermit, Shared};
use crate::cache::{self, Plan};
use crate::config::Config;
use crate::error::ProxyError;
use crate::rewrite;
use crate::routing::{Route, RouteTable};
use crate::runtime::state::{Generation, SharedState};
use crate::telemetry::metrics::{KindLabels, Metrics};
use crate::telemetry::request_id::UpstreamExchange;
use admin::ListenerRole;

/// What the proxy knows about the connection a request arrived on.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// The TCP peer; `None` for unix sockets, whose peers are trusted by file permissions.
    pub peer: Option<SocketAddr>,
    /// The local address the connection was accepted on.
    pub local: Option<SocketAddr>,
    /// Which listener accepted it: the main one or `admin.listen`.
    pub listener: ListenerRole,
}

/// The route a request matched, left in response extensions for the access log.
#[derive(Debug, Clone)]
pub struct MatchedRoute(pub Arc<Route>);

/// The proxy for one connection: the shared state and what is known about the connection.
/// [`ProxyService::into_service`] makes the tower service hyper serves.
#[derive(Clone)]
pub struct ProxyService {
    state: Arc<SharedState>,
    connection: Arc<ConnectionInfo>,
}

impl ProxyService {
    pub fn new(state: Arc<SharedState>, connection: ConnectionInfo) -> Self {
        ProxyService {
            state,
            connection: Arc::new(connection),
        }
    }

    /// This connection's tower service. Its future is not boxed: hyper keeps each request's
    /// future in the one slot it holds per connection. A boxed future was an allocation of
    /// about 4.5 KiB per request, too large for the allocator's per-thread cache
    /// (docs/performance.md, "The request's future").
    pub fn into_service(
        self,
    ) -> impl tower::Service<
        Request<Incoming>,
        Response = Response<ProxyBody>,
        Error = std::convert::Infallible,
        Future: Send,
    > + Clone
    + Send {
        tower::service_fn(move |request: Request<Incoming>| {
            let proxy = self.clone();
            async move {
                Ok::<_, std::convert::Infallible>(
                    handle(&proxy.state, &proxy.connection, request).await,
                )
            }
        })
    }
}

/// Runs the phases; every failure becomes a response in Bitbucket's error shape.
pub async fn handle(
    state: &SharedState,
    connection: &ConnectionInfo,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    // A request keeps the generation it started with, even if a reload swaps config meanwhile.
    let generation = state.current();
    let mut matched: Option<Arc<Route>> = None;
    let result = run_phases(state, &generation, connection, request, &mut matched).await;
    let mut response = result.unwrap_or_else(|error| {
        log_error(&error);
        if error.fault() == crate::error::Fault::Upstream {
            state
                .metrics
                .upstream_errors
                .get_or_create(&KindLabels {
                    kind: error.reason(),
                })
                .inc();
        }
        error.into_response()
    });
    if let Some(route) = matched {
        response.extensions_mut().insert(MatchedRoute(route));
    }
    response
}

async fn run_phases(
    state: &SharedState,
    generation: &Arc<Generation>,
    connection: &ConnectionInfo,
    request: Request<Incoming>,
    matched: &mut Option<Arc<Route>>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let config = &generation.config;
    admit(config, connection)?;
    check_target(config, connection, &request)?;
    // The proxy's own endpoints; no route can claim `/-/` (config validation refuses it), and
    // nothing on the admin listener reaches a route.
    if admin::is_admin_request(connection.listener, request.uri().path()) {
        let path = request.uri().path();
        return admin::serve(
            state,
            generation,
            connection.listener,
            request.method(),
            path,
        )
        .await;
    }
    let route = route(&generation.routes, request.uri().path())?;
    *matched = Some(route.clone());
    authorize_method(&route, request.method())?;
    let client_host = client_origin_host(&request, connection);
    let plan = generation.cache.plan(&route, &request);
    let client = cache::Client {
        config: &generation.config,
        patterns: &generation.patterns,
        route: &route,
        host: client_host.as_ref(),
        metrics: &state.metrics,
    };
    let permit = match govern(generation, &route).await {
        Ok(permit) => permit,
        // A stored answer costs no budget: it may still answer a refused request.
        Err(refused) => {
            return match &plan {
                // Boxed: rare, and inline it would add its size to every request's future.
                Plan::Shared(lookup) => {
                    Box::pin(generation.cache.answer_refusal(&client, lookup, &refused))
                        .await
                        .ok_or(refused)
                }
                Plan::Bypass(_) => Err(refused),
            };
        }
    };
    match plan {
        // Boxed: the cache's own state would otherwise size every request's future, including
        // the requests that bypass it; a shared request already spawns its upstream request.
        Plan::Shared(lookup) => {
            Box::pin(cache_phase(generation, &client, lookup, request, permit)).await
        }
        Plan::Bypass(status) => {
            let write = generation
                .cache
                .note_write(&route, request.method(), request.uri().path())
                .await;
            let response =
                fetch_upstream(generation, &state.metrics, &route, request, permit).await;
            if let Some(write) = write {
                // Again once it is done: a read sent while the write was under way may have
                // fetched the old state.
                generation.cache.drop_written(&write).await;
            }
            let mut response =
                rewrite_response(generation, &route, client_host.as_ref(), response?);
            status.mark(&mut response);
            Ok(response)
        }
    }
}

/// Phase 3c: answers a GET/HEAD that may be shared from the cache, from an identical request
/// in flight, or through its own upstream request, which then runs in a task of its own so it
/// completes for the requests that joined it even if this client leaves.
///
/// The budget `permit` from [`govern`] moves into that upstream request; a hit or a coalesced
/// follower never runs it, so dropping the permit gives the budget back.
pub async fn cache_phase(
    generation: &Arc<Generation>,
    client: &cache::Client<'_>,
    lookup: cache::Lookup,
    request: Request<Incoming>,
    permit: Option<BudgetPermit>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let generation = generation.clone();
    let metrics = client.metrics.clone();
    let route = client.route.clone();
    let cache = generation.cache.clone();
    let fetch = move |request| async move {
        fetch_upstream(&generation, &metrics, &route, request, permit).await
    };
    cache.respond(client, lookup, request, fetch).await
}

/// Phases 4 and 5 for one request: the credential, the upstream request (spending the budget
/// `permit`), and one renewal and resend when Bitbucket refuses an OAuth token the proxy
/// believed valid.
pub async fn fetch_upstream(
    generation: &Generation,
    metrics: &Metrics,
    route: &Arc<Route>,
    request: Request<Incoming>,
    permit: Option<BudgetPermit>,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let config = &generation.config;
    let credential = &route.credential;
    let timeout = config.upstream.timeout;
    let authorization = credential
        .authorization(route.upstream, &generation.client, timeout)
        .await?;
    let upstream_request = inject_credential(config, route, authorization.clone(), request)?;
    // Kept for the two reasons to send again: an OAuth token refused, and a connection that
    // failed in the pool (a lane retries its own). Copying the headers costs every request.
    let replay =
        if credential.renews_tokens() || !generation.client.uses_lane(upstream_request.uri()) {
            Replay::of(&upstream_request)
        } else {
            None
        };
    let started = Instant::now();
    let attempt = permit.map(BudgetPermit::spend);
    let mut forwarded = forward(generation, upstream_request, replay.as_ref(), started).await;
    // A 401 for an OAuth token the proxy believed valid: renew (at most once per token, see
    // `crate::upstream::oauth`) and resend, if the request can be sent again unchanged.
    if let (Ok(response), Some(replay)) = (&forwarded, &replay)
        && response.status() == StatusCode::UNAUTHORIZED
        && credential.renews_tokens()
        && let Some(renewed) = credential
            .renew_refused(&authorization, route.upstream, &generation.client, timeout)
            .await?
    {
        let resend = replay.request(Some(renewed));
        forwarded = forward(generation, resend, Some(replay), Instant::now()).await;
    }
    let response = forwarded?;
    let answered_at = Instant::now();
    let head_after = answered_at - started;
    // Answers that arrived only (their `X-RateLimit-*` values go to the budget); failures are
    // counted in `handle`, where every error ends up.
    metrics.record_upstream_head(route.metrics(), head_after);
    if let Some(attempt) = attempt {
        attempt
            .answered(answered_at, response.status(), response.headers())
            .await;
    }
    let exchange = UpstreamExchange::of(&response, head_after);
    let mut response = response;
    response.extensions_mut().insert(exchange);
    Ok(response)
}

/// Phase 1: only peers in `allowed_clients` (the admin listener's own on that listener) are
/// served. Unix-socket peers have no address and are admitted by the socket's file mode.
pub fn admit(config: &Config, connection: &ConnectionInfo) -> Result<(), ProxyError> {
    let allowed = match connection.listener {
        ListenerRole::Main { .. } => &config.server.allowed_clients,
        ListenerRole::Admin => &config.admin.allowed_clients,
    };
    match connection.peer {
        Some(peer) if !allowed.iter().any(|net| net.contains(&peer.ip())) => {
            Err(ProxyError::ClientNotAllowed(peer.ip().to_string()))
        }
        _ => Ok(()),
    }
}

/// Phase 2a: origin-form targets only, or absolute-form naming this proxy itself; no CONNECT,
/// TRACE or TRACK.
///
/// HTTP/2 requests always carry `:authority` (the equivalent of `Host`), so only HTTP/1
/// absolute-form targets are checked; the proxy never connects to a client-chosen host anyway.
pub fn check_target<B>(
    config: &Config,
    connection: &ConnectionInfo,
    request: &Request<B>,
) -> Result<(), ProxyError> {
    // Method names are case-sensitive (RFC 9110 §9.1), but a front end that upper-cases them
    // would turn `trace` into TRACE.
    let method = request.method().as_str();
    if crate::config::REFUSED_METHODS
        .iter()
        .any(|refused| refused.eq_ignore_ascii_case(method))
    {
        return Err(ProxyError::MethodRefused(request.method().clone()));
    }
    // Two Host headers mean two readings of where the request goes: whichever one a later
    // phase picked, another hop could pick the other. HTTP/1.0 predates Host and h2 carries
    // `:authority`, so only HTTP/1.1 must have one.
    let hosts = request.headers().get_all(header::HOST).iter().count();
    if hosts > 1 || (hosts == 0 && request.version() == Version::HTTP_11) {
        return Err(ProxyError::HostHeaders(hosts));
    }
    let uri = request.uri();
    match (uri.scheme(), uri.authority()) {
        (None, None) => Ok(()),
        (Some(_), Some(_)) if request.version() == Version::HTTP_2 => Ok(()),
        (Some(_), Some(authority)) if is_self(config, connection, authority) => Ok(()),
        (_, Some(authority)) => Err(ProxyError::ForeignTarget(authority.to_string())),
        (_, None) => Err(ProxyError::ForeignTarget(uri.to_string())),
    }
}

/// Whether an absolute-form authority names this proxy: a loopback name or the local address
/// on the port the connection came in on, or the authority of `server.public_url`.
fn is_self(config: &Config, connection: &ConnectionInfo, authority: &Authority) -> bool {
    if let Some(public) = &config.server.public_url
        && public
            .authority
            .as_str()
            .eq_ignore_ascii_case(authority.as_str())
    {
        return true;
    }
    let Some(local) = connection.local else {
        return false;
    };
    let port = authority.port_u16().unwrap_or(80);
    if port != local.port() {
        return false;
    }
    let host = authority.host();
    crate::config::is_loopback_host(host)
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip == local.ip())
}

/// Phase 2b: the path is safe and matches a route; a `{UUID}` that may name a more specific
/// route's resource is refused (400 `uuid-alias`).
pub fn route(routes: &RouteTable, path: &str) -> Result<Arc<Route>, ProxyError> {
    routes.route(path)?.cloned().ok_or(ProxyError::NoRoute)
}

/// Phase 3: the route's method list. Runs before the body is polled, so a client that sent
/// `Expect: 100-continue` is refused without uploading anything.
pub fn authorize_method(route: &Route, method: &Method) -> Result<(), ProxyError> {
    if route.allows(method) {
        Ok(())
    } else {
        Err(ProxyError::MethodNotAllowed {
            method: method.clone(),
            prefix: route.prefix.to_string(),
            allow: route.allow_header.clone(),
        })
    }
}

/// Phase 3b: the credential's budget (see [`crate::budget`]): a 429 cool-down refuses with
/// `cooling-down` (or makes this request its one probe), then the governor admits, delays up
/// to `rate_limit.max_wait`, or refuses with `rate-limited`. Both answer 429 with `Retry-After`.
///
/// The permit must be [spent](BudgetPermit::spend) when the request is forwarded; a request
/// answered without going upstream drops it, which gives the budget back. `None` only if the
/// generation has no budget for the credential, which [`Generation`] rules out.
pub async fn govern(
    generation: &Generation,
    route: &Route,
) -> Result<Option<BudgetPermit>, ProxyError> {
    let credential = &route.credential;
    let Some(budget) = generation.budgets.get(&credential.name) else {
        return Ok(None);
    };
    let max_wait = credential
        .rate_limit
        .map_or(std::time::Duration::ZERO, |limit| limit.max_wait);
    // Waiting for a probe is bounded by how long the probe itself may take to be answered.
    let probe_wait = generation.config.upstream.timeout;
    let shared = generation.store.as_ref().map(|store| Shared {
        store: store.clone(),
        credential: credential.clone(),
    });
    budget.acquire(max_wait, probe_wait, shared).await.map(Some)
}

/// Phase 4: the upstream request. The URI is rebuilt from the upstream origin and the mapped
/// path (the query passes byte-for-byte), `Host` goes so the client sets the upstream's,
/// client credentials and hop-by-hop headers go, and the route's credential is inserted.
pub fn inject_credential(
    config: &Config,
    route: &Route,
    authorization: HeaderValue,
    request: Request<Incoming>,
) -> Result<Request<UpstreamRequestBody>, ProxyError> {
    let (mut parts, body) = request.into_parts();
    let origin = config.upstream.origin(route.upstream);
    let path_and_query = match (
        route.upstream_path(parts.uri.path()),
        parts.uri.path_and_query(),
    ) {
        // The route forwards the path as the client spelled it: the client's target, unparsed.
        (Cow::Borrowed(_), Some(unchanged)) => unchanged.clone(),
        (path, _) => {
            let mut target = path.into_owned();
            if let Some(query) = parts.uri.query() {
                target.push('?');
                target.push_str(query);
            }
            PathAndQuery::from_maybe_shared(Bytes::from(target)).map_err(|_| {
                ProxyError::BadPath(crate::bitbucket::path::PathError::ControlCharacter)
            })?
        }
    };
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(origin.scheme.clone());
    uri.authority = Some(origin.authority.clone());
    uri.path_and_query = Some(path_and_query);
    parts.uri = Uri::from_parts(uri).expect("scheme, authority and path are all set");
    // The pooled connection decides HTTP/1.1 or HTTP/2; hyper-util accepts 1.1 on both.
    parts.version = Version::HTTP_11;
    let counter = parts
        .extensions
        .remove::<RequestBytes>()
        .map(|bytes| bytes.0);
    parts.extensions = http::Extensions::new();
    headers::sanitize_request(&mut parts.headers);
    if route.rewrite_links {
        rewrite::restrict_accept_encoding(&mut parts.headers);
    }
    parts.headers.insert(header::AUTHORIZATION, authorization);
    let body = TimedBody::new(
        body,
        config.upstream.idle_timeout,
        Direction::Request,
        counter,
    );
    Ok(Request::from_parts(
        parts,
        UpstreamRequestBody::Client { body },
    ))
}

/// Phase 5: send upstream and wait for the response head, at most `upstream.timeout` after
/// `sent_at` (or after the request body's last movement while it still uploads).
///
/// A GET or HEAD without a body whose connection could not be made (refused, reset or TLS
/// failure before a byte of the request went out) is tried once more on a fresh connection.
/// Nothing else is retried: the upstream may already have acted on it.
///
/// The request starts on its way when this is called, not when the future is first polled:
/// the future then holds the client's answer in progress rather than the request, which keeps
/// every request's future smaller (docs/performance.md, "The request's future").
pub fn forward<'a>(
    generation: &'a Generation,
    request: Request<UpstreamRequestBody>,
    replay: Option<&'a Replay>,
    sent_at: Instant,
) -> impl Future<Output = Result<Response<UpstreamBody>, ProxyError>> + Send + 'a {
    let timeout = generation.config.upstream.timeout;
    let deadline = sent_at + timeout;
    // A body still uploading pushes the deadline out: some upstreams answer only once it is in.
    let progress = request.body().progress();
    let sending = generation.client.request(request);
    async move {
        let first =
            crate::base::body::timeout_at_unless_moving(deadline, timeout, progress, sending).await;
        let result = match (first, replay) {
            (Ok(Err(error)), Some(replay)) if error.may_retry() && replay.is_safe() => {
                tracing::debug!(error = %crate::base::error_chain(&error), "connecting upstream failed; retrying once");
                let again = generation.client.request(replay.request(None));
                tokio::time::timeout_at(deadline, again).await
            }
            (first, _) => first,
        };
        match result {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => Err(ProxyError::from_client_error(&error)),
            Err(_) => Err(ProxyError::UpstreamTimeout(format!(
                "no response headers within {}",
                humantime::format_duration(timeout)
            ))),
        }
    }
}

/// What it takes to send a request again: only for idempotent requests without a body, the
/// only ones that can be resent unchanged.
pub struct Replay {
    method: Method,
    uri: Uri,
    headers: http::HeaderMap,
}

impl Replay {
    pub fn of(request: &Request<UpstreamRequestBody>) -> Option<Replay> {
        let idempotent = matches!(
            *request.method(),
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
        );
        (idempotent && request.body().is_end_stream()).then(|| Replay {
            method: request.method().clone(),
            uri: request.uri().clone(),
            headers: request.headers().clone(),
        })
    }

    /// Whether it is sent again after a failed connection (a replay has no body).
    fn is_safe(&self) -> bool {
        crate::upstream::lane::resent_after_failed_connect(&self.method, true)
    }

    /// The request again, with a new `Authorization` if given.
    pub fn request(&self, authorization: Option<HeaderValue>) -> Request<UpstreamRequestBody> {
        let mut request = Request::new(UpstreamRequestBody::local(Bytes::new()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = self.headers.clone();
        if let Some(authorization) = authorization {
            request
                .headers_mut()
                .insert(header::AUTHORIZATION, authorization);
        }
        request
    }
}

/// The `Host` the client used, for link rewriting when `server.public_url` is unset; for an
/// HTTP/1.0 request without one, the local address the connection was accepted on, so links
/// never keep pointing at the upstream.
fn client_origin_host<B>(request: &Request<B>, connection: &ConnectionInfo) -> Option<HeaderValue> {
    request
        .headers()
        .get(header::HOST)
        .cloned()
        .or_else(|| {
            request
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        })
        .or_else(|| {
            connection
                .local
                .and_then(|local| HeaderValue::from_str(&local.to_string()).ok())
        })
}

/// Phase 6: clean response headers, stream the body with an idle bound, and rewrite upstream
/// URLs so clients that follow them come back through the proxy.
pub fn rewrite_response(
    generation: &Generation,
    route: &Arc<Route>,
    client_host: Option<&HeaderValue>,
    response: Response<UpstreamBody>,
) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    headers::sanitize_response(&mut parts.headers);
    parts.version = Version::HTTP_11;
    let config = &generation.config;
    let body = TimedBody::new(
        body,
        config.upstream.idle_timeout,
        Direction::Response,
        None,
    );
    let body = rewrite::rewrite(
        config,
        &generation.patterns,
        route,
        client_host,
        &mut parts,
        body,
    );
    Response::from_parts(parts, body)
}

fn log_error(error: &ProxyError) {
    match error.fault() {
        crate::error::Fault::Client => {
            tracing::debug!(reason = error.reason(), %error, "request refused")
        }
        crate::error::Fault::Upstream => {
            tracing::warn!(reason = error.reason(), %error, "upstream failed")
        }
        crate::error::Fault::Proxy => {
            tracing::error!(reason = error.reason(), %error, "proxy failed")
        }
    }
}
