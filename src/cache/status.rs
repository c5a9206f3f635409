//! How a request was answered by the cache phase: the RFC 9211 `Cache-Status` header for the
//! client and the value the access log records.

use std::time::Duration;

use http::{HeaderName, HeaderValue, Response, StatusCode};

pub(super) const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// How a request was answered, for `Cache-Status` and the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// From the store, fresh.
    Hit,
    /// From the shared store (`[store]`): an entry this or another replica fetched.
    Shared,
    /// From the store, stale, because Bitbucket failed or refused (`stale_if_error`).
    Stale,
    /// This request's own upstream request.
    Miss,
    /// Another identical request's upstream request.
    Coalesced,
    /// Not a GET or HEAD.
    Method,
    /// The client asked for a fresh answer (`no-cache`, `no-store`).
    Request,
    /// Not eligible: a body, `Range`, a conditional header, or caching and coalescing off.
    Bypass,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Shared => "shared",
            CacheStatus::Stale => "stale",
            CacheStatus::Miss => "miss",
            CacheStatus::Coalesced => "coalesced",
            CacheStatus::Method => "method",
            CacheStatus::Request => "request",
            CacheStatus::Bypass => "bypass",
        }
    }

    /// Whether the request was answered without an upstream request of its own: a governor
    /// that counted it may give its budget back.
    pub fn served_locally(self) -> bool {
        matches!(
            self,
            CacheStatus::Hit | CacheStatus::Shared | CacheStatus::Stale | CacheStatus::Coalesced
        )
    }

    /// The `Cache-Status` header (RFC 9211) for a response answered this way. Without a TTL
    /// or forwarded status, as on every response that went upstream, it is a constant checked
    /// at compile time, so the request path neither allocates nor validates it.
    pub fn header(self, ttl: Option<Duration>, fwd_status: Option<StatusCode>) -> HeaderValue {
        let plain = self.plain_header();
        if ttl.is_none() && fwd_status.is_none() {
            return plain;
        }
        let mut text = plain
            .to_str()
            .expect("the Cache-Status constants are ASCII")
            .to_owned();
        if let Some(status) = fwd_status {
            text.push_str(&format!("; fwd-status={}", status.as_u16()));
        }
        if let Some(ttl) = ttl {
            text.push_str(&format!("; ttl={}", ttl.as_secs()));
        }
        HeaderValue::from_str(&text).expect("cache status text is plain ASCII")
    }

    fn plain_header(self) -> HeaderValue {
        /// The RFC 9211 cache name, then the parameters; a `const` so the value is checked when
        /// the proxy is compiled, not each time a response is marked.
        macro_rules! named {
            ($parameters:literal) => {{
                const VALUE: HeaderValue =
                    HeaderValue::from_static(concat!("bitbucket-auth-proxy", $parameters));
                VALUE
            }};
        }
        match self {
            CacheStatus::Hit => named!("; hit"),
            CacheStatus::Shared => named!("; hit; detail=shared"),
            CacheStatus::Stale => named!("; fwd=stale"),
            CacheStatus::Miss => named!("; fwd=miss"),
            CacheStatus::Coalesced => named!("; fwd=miss; collapsed"),
            CacheStatus::Method => named!("; fwd=method"),
            CacheStatus::Request => named!("; fwd=request"),
            CacheStatus::Bypass => named!("; fwd=bypass"),
        }
    }

    /// Marks a response: the header for the client, the extension for the access log.
    pub fn mark<B>(self, response: &mut Response<B>) {
        response
            .headers_mut()
            .insert(CACHE_STATUS, self.header(None, None));
        response.extensions_mut().insert(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_status_follows_rfc_9211() {
        assert_eq!(
            CacheStatus::Hit.header(Some(Duration::from_secs(4)), None),
            "bitbucket-auth-proxy; hit; ttl=4"
        );
        assert_eq!(
            CacheStatus::Shared.header(Some(Duration::from_secs(9)), None),
            "bitbucket-auth-proxy; hit; detail=shared; ttl=9"
        );
        assert_eq!(
            CacheStatus::Coalesced.header(None, None),
            "bitbucket-auth-proxy; fwd=miss; collapsed"
        );
        assert_eq!(
            CacheStatus::Stale.header(None, Some(StatusCode::TOO_MANY_REQUESTS)),
            "bitbucket-auth-proxy; fwd=stale; fwd-status=429"
        );
        assert_eq!(
            CacheStatus::Bypass.header(None, None),
            "bitbucket-auth-proxy; fwd=bypass"
        );
    }
}
