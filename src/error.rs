//! Errors on the request path, each knowing who is at fault and how it reaches the client.
//!
//! Wraps the typed errors of the layers below (path safety, routing, OAuth tokens, bodies) so
//! that mapping any of them to 4xx/502/504 is one match; uses nothing above [`crate::routing`].

use std::error::Error as StdError;

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header};

use crate::base::body::{BodyIdleTimeout, BoxError, Direction, ProxyBody};
use crate::base::error_chain;
use crate::bitbucket::path::PathError;
use crate::routing::RouteError;

/// Response header naming why the proxy itself answered.
pub const REASON_HEADER: &str = "x-bitbucket-auth-proxy";

/// Who caused a failure; decides the status class and how loudly it is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request was refused: 4xx.
    Client,
    /// Bitbucket (or the network to it) failed: 502/504.
    Upstream,
    /// A bug or resource problem in the proxy: 500.
    Proxy,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("client address {0} is not in server.allowed_clients")]
    ClientNotAllowed(String),
    #[error(
        "this is not a forward proxy: only paths on this server are served (got a request for {0})"
    )]
    ForeignTarget(String),
    /// CONNECT, TRACE and TRACK, on every path: see [`crate::config::REFUSED_METHODS`].
    #[error("{} is refused on every path: {}", .0, refused_method_why(.0))]
    MethodRefused(Method),
    #[error(
        "the request has {0} Host headers; an HTTP/1.1 request needs exactly one (RFC 9112, section 3.2)"
    )]
    HostHeaders(usize),
    #[error("the request path is refused: {0}")]
    BadPath(#[from] PathError),
    #[error(
        "the path names a workspace, repository or project by {{UUID}}, and a more specific route may cover what it names; the proxy cannot tell, so name it by its slug or key instead (for example /2.0/repositories/acme/widgets)"
    )]
    UuidAlias,
    #[error("no route matches this path")]
    NoRoute,
    #[error("method {method} is not allowed on routes under {prefix}")]
    MethodNotAllowed {
        method: Method,
        prefix: String,
        allow: Option<HeaderValue>,
    },
    #[error("the client stopped sending the request body: {0}")]
    ClientBody(BoxError),
    #[error("cannot reach the upstream: {0}")]
    UpstreamUnreachable(String),
    #[error("TLS with the upstream failed: {0}")]
    UpstreamTls(String),
    #[error("the upstream did not answer in time: {0}")]
    UpstreamTimeout(String),
    #[error(
        "the proxy is at its limit of requests in flight (server.max_in_flight); retry shortly"
    )]
    Overloaded,
    #[error("{0}")]
    Token(#[from] crate::upstream::oauth::TokenError),
    #[error("credential `{credential}` {pace}; retry in {retry_after_s} s")]
    RateLimited {
        credential: String,
        pace: crate::bitbucket::rate_limit::Pace,
        retry_after_s: u64,
    },
    /// Bitbucket answered 429 for this credential; its requests are held until the cool-down
    /// ends. Its own variant so a cache may serve a stale entry instead.
    #[error(
        "Bitbucket answered 429 for credential `{credential}`; the proxy holds its requests until the cool-down ends; retry in {retry_after_s} s"
    )]
    CoolingDown {
        credential: String,
        retry_after_s: u64,
    },
    /// `store.on_error = "refuse"` and the shared store did not answer within
    /// `store.timeout`: the request is not sent on an unshared budget.
    #[error(
        "the shared store ([store]) did not answer for credential `{credential}`, and store.on_error = \"refuse\" forbids spending its budget without it; retry shortly"
    )]
    StoreUnavailable { credential: String },
}

impl ProxyError {
    pub fn fault(&self) -> Fault {
        match self {
            ProxyError::ClientNotAllowed(_)
            | ProxyError::ForeignTarget(_)
            | ProxyError::HostHeaders(_)
            | ProxyError::MethodRefused(_)
            | ProxyError::BadPath(_)
            | ProxyError::UuidAlias
            | ProxyError::NoRoute
            | ProxyError::MethodNotAllowed { .. }
            | ProxyError::ClientBody(_)
            | ProxyError::RateLimited { .. }
            | ProxyError::CoolingDown { .. } => Fault::Client,
            ProxyError::UpstreamUnreachable(_)
            | ProxyError::UpstreamTls(_)
            | ProxyError::UpstreamTimeout(_)
            | ProxyError::Token(_) => Fault::Upstream,
            ProxyError::Overloaded | ProxyError::StoreUnavailable { .. } => Fault::Proxy,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::ClientNotAllowed(_) => StatusCode::FORBIDDEN,
            ProxyError::ForeignTarget(_)
            | ProxyError::HostHeaders(_)
            | ProxyError::BadPath(_)
            | ProxyError::UuidAlias
            | ProxyError::ClientBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::MethodRefused(_) | ProxyError::MethodNotAllowed { .. } => {
                StatusCode::METHOD_NOT_ALLOWED
            }
            ProxyError::UpstreamUnreachable(_) | ProxyError::UpstreamTls(_) => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Overloaded | ProxyError::StoreUnavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Token(_) => StatusCode::BAD_GATEWAY,
            ProxyError::RateLimited { .. } | ProxyError::CoolingDown { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
        }
    }

    /// The value of the `x-bitbucket-auth-proxy` header.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::ClientNotAllowed(_) => "client-not-allowed",
            ProxyError::ForeignTarget(_) | ProxyError::HostHeaders(_) => "bad-target",
            ProxyError::MethodRefused(_) | ProxyError::MethodNotAllowed { .. } => {
                "method-not-allowed"
            }
            ProxyError::BadPath(_) => "bad-path",
            ProxyError::UuidAlias => "uuid-alias",
            ProxyError::NoRoute => "no-route",
            ProxyError::ClientBody(_) => "client-body",
            ProxyError::UpstreamUnreachable(_) => "upstream-unreachable",
            ProxyError::UpstreamTls(_) => "upstream-tls",
            ProxyError::UpstreamTimeout(_) => "upstream-timeout",
            ProxyError::Overloaded => "overloaded",
            ProxyError::StoreUnavailable { .. } => "store-unavailable",
            ProxyError::Token(_) => "token-endpoint",
            ProxyError::RateLimited { .. } => "rate-limited",
            ProxyError::CoolingDown { .. } => "cooling-down",
        }
    }

    /// Short, stable text for the `message` field; `detail` carries the specifics.
    fn message(&self) -> &'static str {
        match self {
            ProxyError::ClientNotAllowed(_) => "Client not allowed",
            ProxyError::ForeignTarget(_) => "Not a forward proxy",
            ProxyError::HostHeaders(_) => "Bad Host header",
            ProxyError::MethodRefused(_) => "Method not supported",
            ProxyError::BadPath(_) => "Bad request path",
            ProxyError::UuidAlias => "Name the resource by its slug, not its UUID",
            ProxyError::NoRoute => "No route for this path",
            ProxyError::MethodNotAllowed { .. } => "Method not allowed",
            ProxyError::ClientBody(_) => "Request body incomplete",
            ProxyError::UpstreamUnreachable(_) => "Bitbucket is unreachable",
            ProxyError::UpstreamTls(_) => "TLS handshake with Bitbucket failed",
            ProxyError::UpstreamTimeout(_) => "Bitbucket did not answer in time",
            ProxyError::Overloaded => "Too many requests in flight",
            ProxyError::StoreUnavailable { .. } => "Shared store unavailable",
            ProxyError::Token(_) => "Could not obtain an OAuth access token",
            ProxyError::RateLimited { .. } | ProxyError::CoolingDown { .. } => {
                "Rate limit for this resource has been exceeded"
            }
        }
    }

    /// The body of [`ProxyError::into_response`]: Bitbucket's error JSON.
    pub fn body_json(&self) -> Bytes {
        error_json(self.message(), &self.to_string())
    }

    /// The error as Bitbucket's own error shape, plus the reason header.
    pub fn into_response(self) -> Response<ProxyBody> {
        let body = self.body_json();
        let mut response = Response::new(ProxyBody::local(body));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(REASON_HEADER, HeaderValue::from_static(self.reason()));
        match self {
            ProxyError::MethodNotAllowed {
                allow: Some(allow), ..
            } => {
                headers.insert(header::ALLOW, allow);
            }
            ProxyError::RateLimited { retry_after_s, .. }
            | ProxyError::CoolingDown { retry_after_s, .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
            }
            ProxyError::StoreUnavailable { .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ProxyError::MethodRefused(_) => {
                headers.insert(
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
                );
            }
            _ => {}
        }
        response
    }

    /// Classifies a failure of the upstream client into who is at fault.
    pub fn from_client_error(error: &(dyn StdError + 'static)) -> ProxyError {
        if let Some(idle) = find_cause::<BodyIdleTimeout>(error)
            && idle.1 == Direction::Request
        {
            return ProxyError::ClientBody(Box::new(BodyIdleTimeout(idle.0, idle.1)));
        }
        if find_cause::<hyper::Error>(error).is_some_and(|e| e.is_user()) {
            // hyper reports a failing request body (the client went away mid-upload) as a user error.
            return ProxyError::ClientBody(error_chain(error).into());
        }
        if find_cause::<h2::Error>(error)
            .is_some_and(|e| e.is_reset() && !e.is_remote() && !e.is_library())
        {
            // Over h2, hyper reports a failing request body (a client that went away, broke its
            // chunked framing or stalled past `upstream.idle_timeout`) only as the RST_STREAM it
            // sent for it: a reset the proxy's side initiated, not Bitbucket nor the h2 library.
            return ProxyError::ClientBody(error_chain(error).into());
        }
        if let Some(tls) = find_tls_error(error) {
            return ProxyError::UpstreamTls(tls);
        }
        if find_cause::<std::io::Error>(error)
            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
        {
            return ProxyError::UpstreamTimeout(error_chain(error));
        }
        ProxyError::UpstreamUnreachable(error_chain(error))
    }
}

/// Why a method in [`crate::config::REFUSED_METHODS`] is refused.
fn refused_method_why(method: &Method) -> &'static str {
    if method == Method::CONNECT {
        "this is not a forward proxy"
    } else {
        "an upstream that echoes the request would hand the injected credential to the client"
    }
}

impl From<RouteError> for ProxyError {
    fn from(error: RouteError) -> ProxyError {
        match error {
            RouteError::Path(path) => ProxyError::BadPath(path),
            RouteError::UuidAlias => ProxyError::UuidAlias,
        }
    }
}

/// `{"type":"error","error":{"message":...,"detail":...}}`, as Bitbucket writes errors.
pub fn error_json(message: &str, detail: &str) -> Bytes {
    let value = serde_json::json!({
        "type": "error",
        "error": { "message": message, "detail": detail },
    });
    Bytes::from(serde_json::to_vec(&value).expect("JSON values always serialise"))
}

fn find_cause<'a, T: StdError + 'static>(error: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        // io::Error::source skips the error it wraps; look inside explicitly.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            && let Some(found) = find_cause::<T>(inner)
        {
            return Some(found);
        }
        current = e.source();
    }
    None
}

fn find_tls_error(error: &(dyn StdError + 'static)) -> Option<String> {
    find_cause::<rustls::Error>(error).map(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn errors_use_bitbucket_shape_and_reason_header() {
        let response = ProxyError::NoRoute.into_response();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(response.headers()[REASON_HEADER], "no-route");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["type"], "error");
        assert_eq!(json["error"]["message"], "No route for this path");
        assert!(json["error"]["detail"].is_string());
    }

    #[test]
    fn status_follows_fault() {
        let cases = [
            (
                ProxyError::ClientNotAllowed("10.0.0.1".into()),
                403,
                Fault::Client,
            ),
            (
                ProxyError::BadPath(PathError::DotSegment),
                400,
                Fault::Client,
            ),
            (
                ProxyError::MethodRefused(Method::CONNECT),
                405,
                Fault::Client,
            ),
            (ProxyError::UuidAlias, 400, Fault::Client),
            (ProxyError::UpstreamTls("x".into()), 502, Fault::Upstream),
            (
                ProxyError::UpstreamUnreachable("x".into()),
                502,
                Fault::Upstream,
            ),
            (
                ProxyError::UpstreamTimeout("x".into()),
                504,
                Fault::Upstream,
            ),
        ];
        for (error, status, fault) in cases {
            assert_eq!(error.status().as_u16(), status, "{error}");
            assert_eq!(error.fault(), fault, "{error}");
        }
    }
}
