//! What the proxy offers each upstream origin in TLS ALPN: `upstream.http2` decides for the API
//! origin, `upstream.git_http2` for the git origin (`git_url`) when that is a different origin.
//!
//! Why git defaults to HTTP/1.1: a git route carries packs, the largest bodies the proxy moves.
//! Over HTTP/1.1 each transfer has a TCP connection of its own; over h2 every transfer shares
//! one connection, its framing and its flow-control windows. Measured with `bench/bulk.sh`
//! (docs/performance.md), HTTP/1.1 moved a 256 MiB pack faster than h2 in every run, on
//! loopback and behind a 20 ms round trip. And a client that stops reading a pack holds, over
//! HTTP/1.1, only its own connection; over h2 its unread data counts against the window of the
//! connection every other transfer shares (with hyper's adaptive window a stream's window grows
//! as large as the connection's) until `server.send_timeout` resets the stream. API responses
//! are small and many: they keep h2's single shared connection.
//!
//! When `git_url` and `api_url` are the same origin, both share one pool and one connection
//! kind, and `upstream.http2` decides for both.
//!
//! Uses only the connector stack (hyper-rustls over [`crate::upstream::egress`]).

use std::task::{Context, Poll};

use http::Uri;
use hyper_rustls::HttpsConnector;
use tower::Service;

use crate::upstream::egress::EgressConnector;

/// The TLS connector for one ALPN offer.
pub type TlsConnector = HttpsConnector<EgressConnector>;

/// Connects with `git`'s offer to the git origin and with `default`'s to every other origin.
#[derive(Clone)]
pub struct OriginAlpnConnector {
    default: TlsConnector,
    /// The git origin and its connector; `None` when git shares the default's offer.
    git: Option<(Uri, TlsConnector)>,
}

impl OriginAlpnConnector {
    /// One offer for every origin.
    pub fn uniform(connector: TlsConnector) -> Self {
        OriginAlpnConnector {
            default: connector,
            git: None,
        }
    }

    /// `git` for connections to `git_origin`, `default` for the rest.
    pub fn with_git(default: TlsConnector, git_origin: Uri, git: TlsConnector) -> Self {
        OriginAlpnConnector {
            default,
            git: Some((git_origin, git)),
        }
    }
}

impl Service<Uri> for OriginAlpnConnector {
    type Response = <TlsConnector as Service<Uri>>::Response;
    type Error = <TlsConnector as Service<Uri>>::Error;
    type Future = <TlsConnector as Service<Uri>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self.default.poll_ready(cx) {
            Poll::Ready(Ok(())) => {}
            not_ready => return not_ready,
        }
        match &mut self.git {
            Some((_, git)) => git.poll_ready(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        match &mut self.git {
            Some((origin, git)) if same_origin(origin, &dst) => git.call(dst),
            _ => self.default.call(dst),
        }
    }
}

fn default_port(uri: &Uri) -> Option<u16> {
    uri.port_u16().or_else(|| match uri.scheme_str() {
        Some("https") => Some(443),
        Some("http") => Some(80),
        _ => None,
    })
}

/// Same scheme, host (ASCII case-insensitive) and port, the scheme's default port included.
pub fn same_origin(a: &Uri, b: &Uri) -> bool {
    if a.scheme() != b.scheme() {
        return false;
    }
    // Upstream URIs are built from the configured origins, so their authorities are usually
    // the same bytes; parsing out host and port (a scan each) is for the rest.
    if let (Some(x), Some(y)) = (a.authority(), b.authority())
        && x.as_str() == y.as_str()
    {
        return true;
    }
    a.host()
        .zip(b.host())
        .is_some_and(|(x, y)| x.eq_ignore_ascii_case(y))
        && default_port(a) == default_port(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_match_on_scheme_host_and_effective_port() {
        let origin: Uri = "https://api.bitbucket.org".parse().unwrap();
        assert!(same_origin(
            &origin,
            &"https://api.bitbucket.org/2.0/user".parse().unwrap()
        ));
        assert!(same_origin(
            &origin,
            &"https://API.bitbucket.org:443/".parse().unwrap()
        ));
        assert!(!same_origin(
            &origin,
            &"http://api.bitbucket.org/".parse().unwrap()
        ));
        assert!(!same_origin(
            &origin,
            &"https://api.bitbucket.org:8443/".parse().unwrap()
        ));
        assert!(!same_origin(
            &origin,
            &"https://bitbucket.org/".parse().unwrap()
        ));
    }
}
