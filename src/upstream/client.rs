//! The client that talks to Bitbucket: an h2 lane per origin offered h2 over TLS
//! ([`crate::upstream::lane`]), hyper-util's pooled TLS client for the rest.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{Request, Response, Uri};

use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;

use crate::base::body::{UpstreamBody, UpstreamRequestBody};
use crate::config::{Origin, UpstreamSettings};
use crate::upstream::alpn::{OriginAlpnConnector, same_origin};
use crate::upstream::egress::EgressConnector;
use crate::upstream::lane::{H2Settings, LaneError, LaneRequest, Lanes, Outcome, Start};
use crate::upstream::warm::WarmConnector;

/// The upstream client of one config generation: h2 origins through their [`Lanes`],
/// everything else (HTTP/1.1, plain-HTTP test upstreams) through hyper-util's pool. Cloned
/// with the generation when `[upstream]` is unchanged.
#[derive(Clone)]
pub struct UpstreamClient {
    pooled: Client<WarmConnector, UpstreamRequestBody>,
    lanes: Arc<Lanes>,
}

/// Why the client has no response for a request. Its cause chain holds the hyper, h2, TLS or
/// I/O error underneath, for [`crate::error::ProxyError::from_client_error`] to classify.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0}")]
    Pooled(#[source] hyper_util::client::legacy::Error),
    #[error("{0}")]
    Lane(#[source] LaneError),
}

impl UpstreamError {
    /// A failed connection that sending again may get past. Only the pool's: a lane has
    /// already tried a second connection for the requests that may be sent twice.
    pub fn may_retry(&self) -> bool {
        matches!(self, UpstreamError::Pooled(error) if error.is_connect())
    }
}

impl UpstreamClient {
    /// Whether a request to `uri` goes through a lane, which retries a failed connection
    /// itself, rather than through the pool, whose caller must keep what it takes to retry.
    pub fn uses_lane(&self, uri: &Uri) -> bool {
        self.lanes.serve_origin_of(uri)
    }

    /// Sends `request` (an absolute URI); the future resolves to the response head.
    pub fn request(&self, request: Request<UpstreamRequestBody>) -> UpstreamResponse<'_> {
        match self.lanes.send(request) {
            Start::Lane(through_lane) => UpstreamResponse::Lane {
                through_lane,
                pooled: &self.pooled,
            },
            Start::Pool(request) => UpstreamResponse::Pooled(self.pooled.request(request)),
        }
    }
}

/// [`UpstreamClient::request`]'s future: through a lane, or through the pool.
pub enum UpstreamResponse<'a> {
    Lane {
        through_lane: LaneRequest<'a>,
        /// Takes the request if the lane finds its origin speaks HTTP/1.1.
        pooled: &'a Client<WarmConnector, UpstreamRequestBody>,
    },
    Pooled(ResponseFuture),
}

impl Future for UpstreamResponse<'_> {
    type Output = Result<Response<UpstreamBody>, UpstreamError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match &mut *self {
                UpstreamResponse::Lane {
                    through_lane,
                    pooled,
                } => match ready!(Pin::new(through_lane).poll(cx)) {
                    Outcome::Answered(answer) => {
                        return Poll::Ready(answer.map_err(UpstreamError::Lane));
                    }
                    Outcome::ToPool(request) => {
                        *self = UpstreamResponse::Pooled(pooled.request(request));
                    }
                },
                UpstreamResponse::Pooled(pooled) => {
                    return Pin::new(pooled).poll(cx).map(|answer| {
                        answer
                            .map(|response| response.map(|body| UpstreamBody::Pooled { body }))
                            .map_err(UpstreamError::Pooled)
                    });
                }
            }
        }
    }
}

/// How long an unused pooled connection is kept. Bitbucket's edge closes idle connections on its
/// own schedule; a stale pooled connection is retried by the client, so this only bounds sockets.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// HTTP/2 PINGs keep a quiet pooled connection known-alive through NATs and egress proxies.
const HTTP2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// Built-in web roots plus the configured extra roots.
fn root_store(settings: &UpstreamSettings) -> RootCertStore {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for cert in &settings.extra_roots {
        // Each was checked when the config was validated.
        let _ = roots.add(cert.clone());
    }
    roots
}

fn origin_uri(origin: &Origin) -> Uri {
    Uri::builder()
        .scheme(origin.scheme.clone())
        .authority(origin.authority.clone())
        .path_and_query("/")
        .build()
        .expect("a validated origin is a valid URI")
}

pub fn tls_config(settings: &UpstreamSettings) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(root_store(settings))
        .with_no_client_auth()
}

/// The API origin and, when it is another origin, the git origin, each with whether h2 is
/// offered to it: `upstream.http2` for the API's, `upstream.git_http2` for git's own. Any other
/// origin (an OAuth `token_url` elsewhere) gets the API's offer.
fn origin_offers(settings: &UpstreamSettings) -> Vec<(Uri, bool)> {
    let api = origin_uri(&settings.api);
    let git = origin_uri(&settings.git);
    if same_origin(&api, &git) {
        vec![(api, settings.http2)]
    } else {
        vec![(api, settings.http2), (git, settings.git_http2)]
    }
}

/// One client per config generation: pooled, HTTP/2 when the upstream offers it via ALPN and
/// the proxy offers it to that origin (`upstream.http2`, `upstream.git_http2`: see
/// [`crate::upstream::alpn`]), HTTP/1.1 otherwise. Certificates are always verified; there is
/// no switch to turn that off. With `upstream.keep_warm`, `warm_origins` get a connected spare
/// (see [`crate::upstream::warm`]); the returned connector reports on them.
pub fn build_client(
    settings: &UpstreamSettings,
    warm_origins: &[Uri],
) -> (UpstreamClient, WarmConnector) {
    let mut http = HttpConnector::new();
    // The scheme is enforced by config validation (https, or http on loopback only).
    http.enforce_http(false);
    http.set_connect_timeout(Some(settings.connect_timeout));
    http.set_nodelay(true);
    http.set_keepalive(Some(TCP_KEEPALIVE));
    let egress = EgressConnector::new(http, settings.proxy.as_ref());
    let tls = tls_config(settings);
    // ALPN offers `h2, http/1.1` or `http/1.1` alone; the server picks from what is offered.
    let connector = |offer_h2: bool| {
        let http1 = HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .enable_http1();
        if offer_h2 {
            http1.enable_http2().wrap_connector(egress.clone())
        } else {
            http1.wrap_connector(egress.clone())
        }
    };
    let offers = origin_offers(settings);
    // Git's own offer needs an origin of its own: one origin is one pool.
    let https = match offers.as_slice() {
        [(_, api_h2), (git, git_h2)] if api_h2 != git_h2 => {
            OriginAlpnConnector::with_git(connector(*api_h2), git.clone(), connector(*git_h2))
        }
        _ => OriginAlpnConnector::uniform(connector(settings.http2)),
    };
    let warm_origins = if settings.keep_warm {
        warm_origins
    } else {
        &[]
    };
    let warm = WarmConnector::new(https, warm_origins, settings.connect_timeout * 2);
    let h2 = H2Settings {
        keep_alive_interval: HTTP2_KEEP_ALIVE_INTERVAL,
        // Keeping warm, a quiet h2 connection is PINGed too: a dead one is found and dropped
        // before a request lands on it, and NATs and egress proxies keep its mapping.
        keep_alive_while_idle: settings.keep_warm,
        idle_timeout: POOL_IDLE_TIMEOUT,
    };
    let pooled = Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .http2_keep_alive_interval(h2.keep_alive_interval)
        .http2_keep_alive_while_idle(h2.keep_alive_while_idle)
        .http2_adaptive_window(true)
        .build(warm.clone());
    // Every origin offered h2 over TLS gets a lane; plain HTTP (loopback mocks) never speaks h2.
    let h2_origins = offers
        .into_iter()
        .filter(|(origin, h2)| *h2 && origin.scheme() == Some(&http::uri::Scheme::HTTPS))
        .map(|(origin, _)| origin)
        .collect();
    let lanes = Lanes::new(h2_origins, warm.clone(), &h2);
    let client = UpstreamClient { pooled, lanes };
    (client, warm)
}
