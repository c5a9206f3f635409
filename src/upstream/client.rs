//! The pooled TLS client that talks to Bitbucket.

use std::sync::Arc;
use std::time::Duration;

use http::Uri;

use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;

use crate::base::body::UpstreamRequestBody;
use crate::config::{Origin, UpstreamSettings};
use crate::upstream::alpn::{OriginAlpnConnector, same_origin};
use crate::upstream::egress::EgressConnector;
use crate::upstream::warm::WarmConnector;

pub type UpstreamClient = Client<WarmConnector, UpstreamRequestBody>;

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
    // Git's own offer needs an origin of its own: one origin is one pool.
    let git_origin = origin_uri(&settings.git);
    let https = if settings.git_http2 != settings.http2
        && !same_origin(&origin_uri(&settings.api), &git_origin)
    {
        OriginAlpnConnector::with_git(
            connector(settings.http2),
            git_origin,
            connector(settings.git_http2),
        )
    } else {
        OriginAlpnConnector::uniform(connector(settings.http2))
    };
    let warm_origins = if settings.keep_warm {
        warm_origins
    } else {
        &[]
    };
    let warm = WarmConnector::new(https, warm_origins, settings.connect_timeout * 2);
    let client = Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .http2_keep_alive_interval(HTTP2_KEEP_ALIVE_INTERVAL)
        // Keeping warm, a quiet h2 connection is PINGed too: a dead one is found and dropped
        // before a request lands on it, and NATs and egress proxies keep its mapping.
        .http2_keep_alive_while_idle(settings.keep_warm)
        .http2_adaptive_window(true)
        .build(warm.clone());
    (client, warm)
}
