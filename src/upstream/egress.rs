//! Corporate egress: reaching Bitbucket through an HTTP proxy with `CONNECT`. TLS still runs end
//! to end inside the tunnel and is verified against the upstream's own name.
//!
//! The proxy is `upstream.proxy` when set; otherwise the standard `HTTPS_PROXY` / `https_proxy`
//! / `ALL_PROXY` and `NO_PROXY` environment, read at start-up and on reload. Loopback
//! upstreams never take the environment's proxy (an egress proxy cannot reach this host's
//! loopback); an explicit `upstream.proxy` applies to every upstream.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower::Service;

use crate::base::body::BoxError;
use crate::config::{EgressProxy, is_loopback_host};

/// Where the proxy's connections to upstream go.
#[derive(Clone)]
enum Route {
    Direct,
    /// Every destination through this proxy.
    Fixed(Arc<EgressProxy>),
    /// Per destination, as the environment says.
    Environment(Arc<Matcher>),
}

/// A failure to open a tunnel, naming the egress proxy. The cause stays attached (not turned
/// into text) so a connect timeout is still told apart from a refusal.
#[derive(Debug, thiserror::Error)]
#[error("through egress proxy {proxy}")]
pub struct EgressError {
    proxy: Uri,
    #[source]
    source: BoxError,
}

/// A connector that opens TCP directly or through a `CONNECT` tunnel.
#[derive(Clone)]
pub struct EgressConnector {
    direct: HttpConnector,
    route: Route,
}

impl EgressConnector {
    pub fn new(direct: HttpConnector, proxy: Option<&EgressProxy>) -> Self {
        let route = match proxy {
            Some(proxy) => Route::Fixed(Arc::new(proxy.clone())),
            None => {
                let matcher = Matcher::from_env();
                let probe: Uri = "https://bitbucket.org/".parse().expect("valid URI");
                if matcher.intercept(&probe).is_some() {
                    Route::Environment(Arc::new(matcher))
                } else {
                    Route::Direct
                }
            }
        };
        EgressConnector { direct, route }
    }

    /// The proxy and its credentials for `dst`, if it goes through one.
    fn proxy_for(&self, dst: &Uri) -> Option<(Uri, Option<HeaderValue>)> {
        match &self.route {
            Route::Direct => None,
            Route::Fixed(proxy) => Some((proxy.url.clone(), proxy.authorization.clone())),
            Route::Environment(matcher) => {
                if dst.host().is_some_and(is_loopback_host) {
                    return None;
                }
                let intercept = matcher.intercept(dst)?;
                Some((intercept.uri().clone(), intercept.basic_auth().cloned()))
            }
        }
    }
}

impl Service<Uri> for EgressConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.direct.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        match self.proxy_for(&dst) {
            None => {
                let connecting = self.direct.call(dst);
                Box::pin(async move { connecting.await.map_err(Into::into) })
            }
            Some((proxy, authorization)) => {
                let mut tunnel = Tunnel::new(proxy.clone(), self.direct.clone());
                if let Some(authorization) = authorization {
                    tunnel = tunnel.with_auth(authorization);
                }
                let tunnelling = tunnel.call(dst);
                Box::pin(async move {
                    tunnelling.await.map_err(|source| {
                        Box::new(EgressError {
                            proxy,
                            source: source.into(),
                        }) as BoxError
                    })
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connector(route: Route) -> EgressConnector {
        EgressConnector {
            direct: HttpConnector::new(),
            route,
        }
    }

    #[test]
    fn the_environment_proxy_honours_no_proxy_and_skips_loopback() {
        let matcher = Matcher::builder()
            .https("http://user:pw@egress.corp:3128")
            .no("internal.example")
            .build();
        let egress = connector(Route::Environment(Arc::new(matcher)));
        let (proxy, auth) = egress
            .proxy_for(&"https://api.bitbucket.org/".parse().unwrap())
            .unwrap();
        assert_eq!(proxy.host(), Some("egress.corp"));
        assert!(auth.is_some_and(|a| a.is_sensitive()));
        assert!(
            egress
                .proxy_for(&"https://git.internal.example/".parse().unwrap())
                .is_none()
        );
        assert!(
            egress
                .proxy_for(&"https://127.0.0.1:8443/".parse().unwrap())
                .is_none()
        );
    }

    #[test]
    fn an_explicit_proxy_takes_everything() {
        let fixed = EgressProxy {
            url: "http://egress.corp:3128".parse().unwrap(),
            authorization: None,
        };
        let egress = connector(Route::Fixed(Arc::new(fixed)));
        assert!(
            egress
                .proxy_for(&"https://127.0.0.1:8443/".parse().unwrap())
                .is_some()
        );
        assert!(
            connector(Route::Direct)
                .proxy_for(&"https://api.bitbucket.org/".parse().unwrap())
                .is_none()
        );
    }
}
