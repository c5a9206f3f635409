//! A TLS mock upstream that numbers its connections in the order their handshakes finish and
//! answers every request with `x-connection: N`, so a test can tell which connection a request
//! travelled on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::join_all;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

use super::{RawUpstream, TestPki, get};

/// A TLS upstream (h2 and http/1.1, as `alpn` offers) that closes every connection `lifetime`
/// after its handshake, whether it carried requests or not: an idle timeout, the way
/// Bitbucket's edge and nginx's `keepalive_timeout` end quiet connections.
pub struct NumberingUpstream {
    pub raw: RawUpstream,
    handshakes: Arc<AtomicUsize>,
}

impl NumberingUpstream {
    pub fn start(pki: &TestPki, alpn: &[&[u8]], lifetime: Duration) -> NumberingUpstream {
        let handshakes = Arc::new(AtomicUsize::new(0));
        let counter = handshakes.clone();
        let raw = RawUpstream::start_tls(pki.server_config_with_alpn(alpn), move |tls| {
            let number = counter.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                let service = service_fn(move |_request| async move {
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .header("x-connection", number.to_string())
                            .body(Full::new(bytes::Bytes::from_static(b"{}")))
                            .unwrap(),
                    )
                });
                let builder = auto::Builder::new(TokioExecutor::new());
                let serving = builder.serve_connection(TokioIo::new(tls), service);
                let _ = tokio::time::timeout(lifetime, serving).await;
            }
        });
        NumberingUpstream { raw, handshakes }
    }

    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }
}

/// The `x-connection` of each of `requests` concurrent GETs of `path` through the proxy at
/// `addr`, all of which must be answered 200.
pub async fn served_on(addr: SocketAddr, path: &str, requests: usize) -> Vec<String> {
    let responses = join_all((0..requests).map(|_| get(addr, path))).await;
    responses
        .into_iter()
        .map(|response| {
            assert_eq!(response.status(), StatusCode::OK);
            response.headers()["x-connection"]
                .to_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}
