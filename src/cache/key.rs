//! What makes two requests the same request, and which repository a path belongs to.
//!
//! A key always holds the credential's name and the upstream kind, so no answer fetched with
//! one credential is ever given to a request made with another. Keys live within one config
//! generation (the cache is rebuilt on reload), so a name that a reload points at another
//! secret starts empty.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method};

use super::policy::KEYED_REQUEST_HEADERS;
use crate::bitbucket::credentials::UpstreamKind;

/// One upstream request as far as its answer is concerned.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub credential: Arc<str>,
    pub upstream: UpstreamKind,
    pub head: bool,
    /// The upstream path and query, byte for byte.
    pub target: Box<str>,
    /// The values of [`KEYED_REQUEST_HEADERS`] as the upstream will see them (all lines of
    /// each, joined), in that order.
    pub selecting: [Option<Bytes>; 3],
}

impl Key {
    /// `headers` must already be what goes upstream for the keyed headers (the rewriter's
    /// `Accept-Encoding` narrowing applied).
    pub fn new(
        credential: &Arc<str>,
        upstream: UpstreamKind,
        method: &Method,
        target: &str,
        headers: &HeaderMap,
    ) -> Key {
        let selecting = KEYED_REQUEST_HEADERS.clone().map(|name| {
            let mut values = headers.get_all(&name).iter();
            let first = values.next()?;
            let mut joined = first.as_bytes().to_vec();
            for value in values {
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(value.as_bytes());
            }
            Some(Bytes::from(joined))
        });
        Key {
            credential: credential.clone(),
            upstream,
            head: *method == Method::HEAD,
            target: target.into(),
            selecting,
        }
    }

    /// Bytes this key takes in the store, for its memory bound.
    pub fn weight(&self) -> usize {
        std::mem::size_of::<Key>()
            + self.target.len()
            + self
                .selecting
                .iter()
                .flatten()
                .map(Bytes::len)
                .sum::<usize>()
    }
}

/// The keyed request headers of a request, narrowed as the upstream request will be.
pub fn keyed_headers(headers: &HeaderMap, rewrite_links: bool) -> HeaderMap {
    let mut keyed = HeaderMap::new();
    for name in &KEYED_REQUEST_HEADERS {
        for value in headers.get_all(name) {
            keyed.append(name.clone(), value.clone());
        }
    }
    if rewrite_links {
        crate::rewrite::restrict_accept_encoding(&mut keyed);
    }
    keyed
}

/// The repository an upstream path is about, normalised (`acme/widgets`): REST paths under
/// `[/2.0]/repositories/{workspace}/{repo}`, git paths `/{workspace}/{repo}[.git]/...`.
/// Slugs are lower case in Bitbucket; UUIDs in braces may arrive percent-encoded.
///
/// A repository named by its UUID and by its slug are two scopes: the proxy cannot know they
/// are one.
pub fn repository_scope(upstream: UpstreamKind, path: &str) -> Option<Box<str>> {
    let rest = match upstream {
        UpstreamKind::Api => {
            let path = path.strip_prefix("/2.0").unwrap_or(path);
            path.strip_prefix("/repositories/")?
        }
        UpstreamKind::Git => path.strip_prefix('/')?,
    };
    let mut segments = rest.split('/');
    let workspace = normalise_segment(segments.next()?)?;
    let repo = normalise_segment(segments.next()?)?;
    let repo = match upstream {
        UpstreamKind::Git => repo.strip_suffix(".git").unwrap_or(&repo).to_owned(),
        UpstreamKind::Api => repo,
    };
    (!repo.is_empty()).then(|| format!("{workspace}/{repo}").into())
}

/// Whether an upstream path is a repository object itself (`[/2.0]/repositories/{ws}/{repo}`):
/// a write there renames, transfers or deletes the repository.
pub fn is_repository_itself(upstream: UpstreamKind, path: &str) -> bool {
    if upstream != UpstreamKind::Api {
        return false;
    }
    let path = path.strip_prefix("/2.0").unwrap_or(path);
    let Some(rest) = path.strip_prefix("/repositories/") else {
        return false;
    };
    let segments: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    segments.len() == 2 && segments.iter().all(|s| !s.is_empty())
}

fn normalise_segment(segment: &str) -> Option<String> {
    if segment.is_empty() {
        return None;
    }
    let lower = segment.to_ascii_lowercase();
    Some(lower.replace("%7b", "{").replace("%7d", "}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// The header value of `Key::selecting`, for tests and logs.
    fn selecting_value(key: &Key, index: usize) -> Option<HeaderValue> {
        key.selecting[index]
            .as_ref()
            .and_then(|b| HeaderValue::from_maybe_shared(b.clone()).ok())
    }

    #[test]
    fn scopes_of_rest_and_git_paths_meet() {
        let api = repository_scope(
            UpstreamKind::Api,
            "/2.0/repositories/Acme/Widgets/pullrequests/7",
        );
        let git = repository_scope(UpstreamKind::Git, "/acme/widgets.git/git-receive-pack");
        assert_eq!(api.as_deref(), Some("acme/widgets"));
        assert_eq!(api, git);
        assert_eq!(
            repository_scope(UpstreamKind::Api, "/2.0/repositories/%7Bab%7D/widgets").as_deref(),
            Some("{ab}/widgets")
        );
        assert_eq!(
            repository_scope(UpstreamKind::Api, "/2.0/repositories/acme"),
            None
        );
        assert!(is_repository_itself(
            UpstreamKind::Api,
            "/2.0/repositories/acme/widgets"
        ));
        assert!(!is_repository_itself(
            UpstreamKind::Api,
            "/2.0/repositories/acme/widgets/pullrequests"
        ));
        assert!(!is_repository_itself(
            UpstreamKind::Api,
            "/2.0/repositories/acme"
        ));
        assert_eq!(
            repository_scope(UpstreamKind::Api, "/2.0/workspaces/acme/projects"),
            None
        );
    }

    #[test]
    fn keys_differ_by_credential_method_target_and_selecting_headers() {
        let a: Arc<str> = Arc::from("a");
        let b: Arc<str> = Arc::from("b");
        let mut json = HeaderMap::new();
        json.insert(http::header::ACCEPT, "application/json".parse().unwrap());
        let key = |cred: &Arc<str>, method: &Method, target: &str, headers: &HeaderMap| {
            Key::new(cred, UpstreamKind::Api, method, target, headers)
        };
        let base = key(&a, &Method::GET, "/x?page=2", &json);
        assert_eq!(base, key(&a, &Method::GET, "/x?page=2", &json));
        assert_ne!(base, key(&b, &Method::GET, "/x?page=2", &json));
        assert_ne!(base, key(&a, &Method::HEAD, "/x?page=2", &json));
        assert_ne!(base, key(&a, &Method::GET, "/x?page=3", &json));
        assert_ne!(base, key(&a, &Method::GET, "/x?page=2", &HeaderMap::new()));
        assert_eq!(
            selecting_value(&base, 0).unwrap(),
            HeaderValue::from_static("application/json")
        );
    }

    #[test]
    fn narrowing_applies_to_the_keyed_encoding() {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::ACCEPT_ENCODING, "gzip, zstd".parse().unwrap());
        headers.insert(http::header::USER_AGENT, "ci".parse().unwrap());
        let keyed = keyed_headers(&headers, true);
        assert_eq!(keyed.get(http::header::ACCEPT_ENCODING).unwrap(), "gzip");
        assert!(keyed.get(http::header::USER_AGENT).is_none());
        let raw = keyed_headers(&headers, false);
        assert_eq!(
            raw.get(http::header::ACCEPT_ENCODING).unwrap(),
            "gzip, zstd"
        );
    }
}
