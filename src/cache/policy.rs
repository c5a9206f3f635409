//! What may be cached and for how long: the route and `[cache]` settings, the list of upstream
//! paths whose answer can never change, and the checks on an upstream response before it is
//! shared or stored.
//!
//! Knows HTTP types, the upstream kind and the settings types of [`crate::config::cache`],
//! nothing of the proxy's state.

use std::time::Duration;

use http::{HeaderMap, Method, StatusCode, header};

use crate::bitbucket::credentials::UpstreamKind;
use crate::error::ProxyError;

pub use crate::config::cache::{
    CacheLimits, DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRY_BYTES, RouteCachePolicy,
};

/// How long a stored answer stays fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// For ever: an [immutable](is_immutable) path.
    Immutable,
    /// The route's `max_age`.
    MaxAge(Duration),
}

/// How long a stored answer to a request stays fresh on a route; `None` when the answer is
/// not stored at all.
pub fn freshness(
    policy: &RouteCachePolicy,
    upstream: UpstreamKind,
    method: &Method,
    path: &str,
) -> Option<Freshness> {
    if *method != Method::GET {
        return None;
    }
    if policy.immutable && is_immutable(upstream, path) {
        return Some(Freshness::Immutable);
    }
    policy.max_age.map(Freshness::MaxAge)
}

/// Whether an upstream path names a resource that pins every commit it depends on with a full
/// 40-hex hash, so every 200 answer to it is the same for ever:
///
/// - `/2.0/repositories/{ws}/{repo}/src/{hash}/{path}`: a file or directory listing in the
///   tree of that commit; a commit's tree is part of its hash.
/// - `/diff/{spec}`, `/diffstat/{spec}`, `/patch/{spec}` under the same repository, with `spec`
///   one hash (against its first parent, which the hash pins) or `hash..hash` (both ends
///   pinned; the default `topic` three-dot form diffs against their merge base, which the two
///   hashes' ancestry fixes).
///
/// Not on the list: `/commit/{hash}` (participants and approvals change), its `statuses`,
/// `comments`, `reports`, `pullrequests`; `/merge-base/{spec}` (answers a commit object, and
/// may pick any of several best ancestors); `/filehistory/{hash}/...` (commit objects again);
/// anything named by a branch, tag or short hash.
pub fn is_immutable(upstream: UpstreamKind, path: &str) -> bool {
    if upstream != UpstreamKind::Api {
        return false;
    }
    let path = path.strip_prefix("/2.0").unwrap_or(path);
    let Some(rest) = path.strip_prefix("/repositories/") else {
        return false;
    };
    let mut segments = rest.splitn(5, '/');
    let (Some(workspace), Some(repo), Some(kind), Some(spec)) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return false;
    };
    let tail = segments.next();
    if workspace.is_empty() || repo.is_empty() {
        return false;
    }
    match kind {
        // A file needs a path after the hash; the tree root is `/src/{hash}/`.
        "src" => tail.is_some() && is_full_hash(spec),
        "diff" | "diffstat" | "patch" => tail.is_none() && is_commit_spec(spec),
        _ => false,
    }
}

fn is_full_hash(text: &str) -> bool {
    text.len() == 40 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_commit_spec(spec: &str) -> bool {
    match spec.split_once("..") {
        Some((a, b)) => is_full_hash(a) && is_full_hash(b),
        None => is_full_hash(spec),
    }
}

/// Request headers that select a representation: requests that differ in them are different
/// requests (they are part of the key).
pub const KEYED_REQUEST_HEADERS: [header::HeaderName; 3] = [
    header::ACCEPT,
    header::ACCEPT_ENCODING,
    header::ACCEPT_LANGUAGE,
];

/// Request headers that make an answer specific to one request: a part of the body, or an
/// answer that depends on what the client already holds. Such requests go upstream alone.
const PRIVATE_REQUEST_HEADERS: [header::HeaderName; 6] = [
    header::RANGE,
    header::IF_RANGE,
    header::IF_MATCH,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_UNMODIFIED_SINCE,
];

/// Why a request is not answered from the cache or shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bypass {
    /// Not GET or HEAD.
    Method,
    /// A body, `Range`, a conditional header, or the route/`[cache]` turns both off.
    Request,
}

/// What the client allows: whether the request may be shared at all, read from the store,
/// and its answer stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientDirectives {
    pub read_store: bool,
    pub write_store: bool,
}

/// The methods whose requests may be shared or stored: GET and HEAD.
pub fn shares_method(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD)
}

/// Checks a GET/HEAD request's headers: `Err` when it must go upstream alone.
pub fn client_directives(method: &Method, headers: &HeaderMap) -> Result<ClientDirectives, Bypass> {
    if !shares_method(method) {
        return Err(Bypass::Method);
    }
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body
        || PRIVATE_REQUEST_HEADERS
            .iter()
            .any(|h| headers.contains_key(h))
    {
        return Err(Bypass::Request);
    }
    let mut directives = ClientDirectives {
        read_store: true,
        write_store: true,
    };
    for value in headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .chain(headers.get_all(header::PRAGMA).iter())
    {
        for directive in value.as_bytes().split(|&b| b == b',') {
            let directive = directive.trim_ascii();
            let name = directive
                .split(|&b| b == b'=')
                .next()
                .unwrap_or_default()
                .trim_ascii();
            if name.eq_ignore_ascii_case(b"no-store") {
                directives.read_store = false;
                directives.write_store = false;
            } else if name.eq_ignore_ascii_case(b"no-cache")
                || directive.eq_ignore_ascii_case(b"max-age=0")
            {
                directives.read_store = false;
            }
        }
    }
    Ok(directives)
}

/// Whether an upstream answer may be given to the other requests that waited for it: not when
/// it varies on a request header that is not part of the key.
pub fn shareable(headers: &HeaderMap) -> bool {
    headers.get_all(header::VARY).iter().all(|value| {
        value.as_bytes().split(|&b| b == b',').all(|name| {
            let name = name.trim_ascii();
            name.is_empty()
                || name.eq_ignore_ascii_case(b"authorization")
                || KEYED_REQUEST_HEADERS
                    .iter()
                    .any(|h| name.eq_ignore_ascii_case(h.as_str().as_bytes()))
        })
    })
}

/// Whether a complete upstream answer may be stored: a shareable 200 without `no-store`.
///
/// Other `Cache-Control` directives (`private`, `no-cache`, `max-age`) are not obeyed: the
/// store belongs to one credential, like a private cache, and how long an answer is reused
/// is the route's explicit `max_age` (or never changes, for immutable paths).
pub fn storable(status: StatusCode, headers: &HeaderMap) -> bool {
    status == StatusCode::OK
        && shareable(headers)
        && !headers.get_all(header::CACHE_CONTROL).iter().any(|value| {
            value
                .as_bytes()
                .split(|&b| b == b',')
                .any(|d| d.trim_ascii().eq_ignore_ascii_case(b"no-store"))
        })
}

/// Upstream answers after which a stale entry may be served instead (`stale_if_error`):
/// Bitbucket's 429 and 5xx.
pub fn serves_stale_on_status(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// Failures after which a stale entry may be served instead (`stale_if_error`): the upstream
/// could not be reached or did not answer, or the proxy's own budget refused the request (the
/// governor, or a 429 cool-down).
pub fn serves_stale_on_error(error: &ProxyError) -> bool {
    matches!(
        error,
        ProxyError::UpstreamUnreachable(_)
            | ProxyError::UpstreamTls(_)
            | ProxyError::UpstreamTimeout(_)
            | ProxyError::Token(_)
            | ProxyError::RateLimited { .. }
            | ProxyError::CoolingDown { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const H1: &str = "0123456789abcdef0123456789abcdef01234567";
    const H2: &str = "fedcba9876543210fedcba9876543210fedcba98";

    fn immutable(path: &str) -> bool {
        is_immutable(UpstreamKind::Api, path)
    }

    #[test]
    fn only_paths_pinned_by_full_hashes_are_immutable() {
        let base = "/2.0/repositories/acme/widgets";
        for path in [
            format!("{base}/src/{H1}/README.md"),
            format!("{base}/src/{H1}/"),
            format!("{base}/src/{H1}/dir/sub/file.rs"),
            format!("{base}/diff/{H1}"),
            format!("{base}/diff/{H1}..{H2}"),
            format!("{base}/diffstat/{H1}..{H2}"),
            format!("{base}/patch/{H1}"),
            format!("/repositories/{{0c6d5c2e-1111-2222-3333-444455556666}}/widgets/src/{H1}/a"),
        ] {
            assert!(immutable(&path), "{path}");
        }
        for path in [
            format!("{base}/commit/{H1}"),
            format!("{base}/commit/{H1}/statuses"),
            format!("{base}/merge-base/{H1}..{H2}"),
            format!("{base}/filehistory/{H1}/README.md"),
            format!("{base}/src/main/README.md"),
            format!("{base}/src/{}/README.md", &H1[..12]),
            format!("{base}/src/{H1}"),
            format!("{base}/diff/{H1}..main"),
            format!("{base}/diff/{H1}/extra"),
            format!("{base}/diff/{H1}...{H2}"),
            format!("{base}/pullrequests/7/diff"),
            format!("{base}/src"),
            "/2.0/repositories/acme".to_owned(),
            format!("/2.0/repositories//widgets/src/{H1}/a"),
        ] {
            assert!(!immutable(&path), "{path}");
        }
        assert!(!is_immutable(
            UpstreamKind::Git,
            &format!("{base}/src/{H1}/README.md")
        ));
    }

    #[test]
    fn freshness_follows_the_route() {
        let default = RouteCachePolicy::default();
        let src = format!("/2.0/repositories/acme/widgets/src/{H1}/a");
        let list = "/2.0/repositories/acme/widgets/pullrequests";
        assert_eq!(
            freshness(&default, UpstreamKind::Api, &Method::GET, &src),
            Some(Freshness::Immutable)
        );
        assert!(freshness(&default, UpstreamKind::Api, &Method::GET, list).is_none());
        assert!(freshness(&default, UpstreamKind::Api, &Method::HEAD, &src).is_none());
        let micro = RouteCachePolicy {
            max_age: Some(Duration::from_secs(5)),
            ..default
        };
        assert_eq!(
            freshness(&micro, UpstreamKind::Api, &Method::GET, list),
            Some(Freshness::MaxAge(Duration::from_secs(5)))
        );
        let off = RouteCachePolicy {
            immutable: false,
            ..default
        };
        assert!(freshness(&off, UpstreamKind::Api, &Method::GET, &src).is_none());
    }

    #[test]
    fn private_requests_bypass_and_client_directives_are_read() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            client_directives(&Method::POST, &headers),
            Err(Bypass::Method)
        );
        assert!(
            client_directives(&Method::GET, &headers)
                .unwrap()
                .read_store
        );
        headers.insert(header::CACHE_CONTROL, "No-Cache".parse().unwrap());
        let d = client_directives(&Method::GET, &headers).unwrap();
        assert!(!d.read_store && d.write_store);
        headers.insert(
            header::CACHE_CONTROL,
            "max-age=60, no-store".parse().unwrap(),
        );
        let d = client_directives(&Method::GET, &headers).unwrap();
        assert!(!d.read_store && !d.write_store);
        for (name, value) in [
            (header::RANGE, "bytes=0-10"),
            (header::IF_NONE_MATCH, "\"x\""),
            (header::IF_MODIFIED_SINCE, "Tue, 01 Dec 2026 00:00:00 GMT"),
            (header::CONTENT_LENGTH, "3"),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(name.clone(), value.parse().unwrap());
            assert_eq!(
                client_directives(&Method::GET, &headers),
                Err(Bypass::Request),
                "{name}"
            );
        }
    }

    #[test]
    fn responses_are_stored_only_when_whole_and_unrestricted() {
        let mut headers = HeaderMap::new();
        assert!(storable(StatusCode::OK, &headers));
        assert!(!storable(StatusCode::NOT_FOUND, &headers));
        assert!(!storable(StatusCode::PARTIAL_CONTENT, &headers));
        headers.insert(
            header::VARY,
            "Accept-Encoding, Authorization".parse().unwrap(),
        );
        assert!(storable(StatusCode::OK, &headers));
        headers.insert(header::CACHE_CONTROL, "private, no-store".parse().unwrap());
        assert!(!storable(StatusCode::OK, &headers));
        let mut cookie = HeaderMap::new();
        cookie.insert(header::VARY, "Cookie".parse().unwrap());
        assert!(!shareable(&cookie));
        cookie.insert(header::VARY, "*".parse().unwrap());
        assert!(!shareable(&cookie));
    }
}
