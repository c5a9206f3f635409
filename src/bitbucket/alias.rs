//! Bitbucket's many spellings of one resource, as routing must see them.
//!
//! Bitbucket names a workspace, repository or project in a path by its slug or key, or by its
//! UUID in curly braces (OpenAPI spec: every `{workspace}`, `{repo_slug}` and `{project_key}`);
//! whether it resolves other letter cases of a slug is not documented, so the proxy assumes it
//! does. Git URLs name a repository with or without `.git`. This module owns which segments of
//! an upstream path are such names ([`name_positions`]), how a route's prefix is matched against
//! a request path with them ([`PrefixPattern`]), and what counts as a UUID spelling
//! ([`is_uuid_spelling`]). Routing (`crate::routing`) builds on it; it uses only
//! [`crate::bitbucket::credentials::UpstreamKind`].

use crate::bitbucket::UpstreamKind;

/// How one segment of a route's prefix compares with a request path's segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentKind {
    /// Anything else in a path: byte for byte.
    Literal,
    /// A workspace, a REST repository slug or a project key: ASCII case-insensitive.
    Name,
    /// The repository of a git URL: ASCII case-insensitive, with or without `.git`.
    GitRepository,
}

impl SegmentKind {
    /// Whether `a` and `b`, in a position of this kind, name the same thing.
    pub fn same(self, a: &[u8], b: &[u8]) -> bool {
        match self {
            SegmentKind::Literal => a == b,
            SegmentKind::Name => a.eq_ignore_ascii_case(b),
            SegmentKind::GitRepository => {
                strip_git_suffix(a).eq_ignore_ascii_case(strip_git_suffix(b))
            }
        }
    }
}

/// `widgets.git` (in any case) as `widgets`; anything else, `.git` itself too, unchanged.
pub fn strip_git_suffix(segment: &[u8]) -> &[u8] {
    match segment.len().checked_sub(4) {
        Some(cut) if cut > 0 && segment[cut..].eq_ignore_ascii_case(b".git") => &segment[..cut],
        _ => segment,
    }
}

/// A `{…}` segment: Bitbucket resolves it as a UUID, and the proxy cannot tell which slug it
/// names. A brace anywhere counts, as no slug or key contains one.
pub fn is_uuid_spelling(segment: &[u8]) -> bool {
    segment.iter().any(|&b| b == b'{' || b == b'}')
}

/// The kind of each segment of an upstream path on `upstream`, by the shapes of Bitbucket's
/// paths: on REST (with or without the leading `2.0`, as [`crate::bitbucket::credentials::Scope`] allows)
/// `repositories/{workspace}/{repo_slug}`, `workspaces/{workspace}` with
/// `projects/{project_key}` and `permissions/repositories/{repo_slug}` below it,
/// `snippets/{workspace}`, `teams/{workspace}` and `user/workspaces/{workspace}`; on git
/// `/{workspace}/{repo_slug}[.git]`.
pub fn name_positions(upstream: UpstreamKind, segments: &[&[u8]]) -> Vec<SegmentKind> {
    let mut kinds = vec![SegmentKind::Literal; segments.len()];
    match upstream {
        UpstreamKind::Git => {
            if let Some(kind) = kinds.get_mut(0) {
                *kind = SegmentKind::Name;
            }
            if let Some(kind) = kinds.get_mut(1) {
                *kind = SegmentKind::GitRepository;
            }
        }
        UpstreamKind::Api => {
            let skip = usize::from(segments.first() == Some(&&b"2.0"[..]));
            let s = &segments[skip..];
            let mut name = |index: usize| {
                if let Some(kind) = kinds.get_mut(skip + index) {
                    *kind = SegmentKind::Name;
                }
            };
            match s {
                [b"repositories", ..] => {
                    name(1);
                    name(2);
                }
                [b"workspaces", _, b"projects", ..] => {
                    name(1);
                    name(3);
                }
                [b"workspaces", _, b"permissions", b"repositories", ..] => {
                    name(1);
                    name(4);
                }
                [b"workspaces" | b"snippets" | b"teams", ..] => name(1),
                [b"user", b"workspaces", ..] => name(2),
                _ => {}
            }
        }
    }
    kinds
}

/// The non-empty segments of a prefix (`/` has none).
fn segments(prefix: &str) -> Vec<&[u8]> {
    prefix
        .as_bytes()
        .split(|&b| b == b'/')
        .filter(|s| !s.is_empty())
        .collect()
}

#[derive(Debug, Clone)]
struct PatternSegment {
    text: Box<[u8]>,
    kind: SegmentKind,
}

/// A route's local prefix as a sequence of segments, each compared by its kind.
///
/// A route forwards `prefix` + rest as `upstream_prefix` + rest, so the prefixes line up from
/// their ends: a local segment takes the kind of the upstream segment it stands for, for as long
/// as the two name the same thing (`/git/acme/widgets.git` onto `/acme/widgets.git`: `acme` is a
/// workspace, `widgets.git` a git repository, `git` literal). Where they stop lining up, the
/// local prefix is the proxy's own name (`/release` onto `/2.0/repositories/acme`) and is literal.
#[derive(Debug, Clone)]
pub struct PrefixPattern {
    segments: Vec<PatternSegment>,
}

impl PrefixPattern {
    pub fn new(upstream: UpstreamKind, local_prefix: &str, upstream_prefix: &str) -> Self {
        let local = segments(local_prefix);
        let remote = segments(upstream_prefix);
        let remote_kinds = name_positions(upstream, &remote);
        let mut kinds = vec![SegmentKind::Literal; local.len()];
        let aligned = local
            .iter()
            .zip(&mut kinds)
            .rev()
            .zip(remote.iter().zip(&remote_kinds).rev());
        for ((local, kind), (remote, remote_kind)) in aligned {
            if !remote_kind.same(local, remote) {
                break;
            }
            *kind = *remote_kind;
        }
        PrefixPattern {
            segments: local
                .into_iter()
                .zip(kinds)
                .map(|(text, kind)| PatternSegment {
                    text: text.into(),
                    kind,
                })
                .collect(),
        }
    }

    /// How many segments the prefix has: the more, the more specific the route.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// The byte length of the part of `path` this prefix matches, on a whole-segment boundary.
    pub fn match_len(&self, path: &[u8]) -> Option<usize> {
        self.walk(path, false)
    }

    /// Whether `path` would match if each UUID spelling in a name position could be any name:
    /// a request that may be meant for this route, though the proxy cannot tell.
    pub fn may_match_by_uuid(&self, path: &[u8]) -> bool {
        self.walk(path, true).is_some()
    }

    fn walk(&self, path: &[u8], uuid_matches_names: bool) -> Option<usize> {
        let mut end = 0;
        for segment in &self.segments {
            let rest = path[end..].strip_prefix(b"/")?;
            let len = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
            let candidate = &rest[..len];
            let matches = segment.kind.same(&segment.text, candidate)
                || (uuid_matches_names
                    && segment.kind != SegmentKind::Literal
                    && is_uuid_spelling(candidate));
            if !matches {
                return None;
            }
            end += 1 + len;
        }
        matches!(path.get(end), None | Some(b'/')).then_some(end)
    }

    /// Whether this prefix and `other` name the same place: each matches the other exactly.
    pub fn same_place(&self, other: &PrefixPattern) -> bool {
        self.segments.len() == other.segments.len()
            && self
                .segments
                .iter()
                .zip(&other.segments)
                .all(|(a, b)| a.kind.same(&a.text, &b.text) || b.kind.same(&a.text, &b.text))
    }
}

/// The byte length of the first `count` segments of `path` (all of it if it has fewer).
pub fn leading_segments_len(path: &str, count: usize) -> usize {
    let bytes = path.as_bytes();
    let mut end = 0;
    for _ in 0..count {
        match bytes.get(end) {
            Some(b'/') => {
                end += 1 + bytes[end + 1..]
                    .iter()
                    .position(|&b| b == b'/')
                    .unwrap_or(bytes.len() - end - 1);
            }
            _ => break,
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;
    use SegmentKind::{GitRepository as G, Literal as L, Name as N};

    fn kinds(upstream: UpstreamKind, path: &str) -> Vec<SegmentKind> {
        name_positions(upstream, &segments(path))
    }

    #[test]
    fn name_positions_follow_the_openapi_shapes() {
        let api = UpstreamKind::Api;
        assert_eq!(
            kinds(api, "/2.0/repositories/acme/widgets/src/main/acme"),
            [L, L, N, N, L, L, L]
        );
        assert_eq!(kinds(api, "/repositories/acme"), [L, N]);
        assert_eq!(kinds(api, "/2.0/repositories"), [L, L]);
        assert_eq!(
            kinds(api, "/2.0/workspaces/acme/projects/WEB/deploy-keys"),
            [L, L, N, L, N, L]
        );
        assert_eq!(
            kinds(api, "/2.0/workspaces/acme/permissions/repositories/widgets"),
            [L, L, N, L, L, N]
        );
        assert_eq!(
            kinds(api, "/2.0/workspaces/acme/members/x"),
            [L, L, N, L, L]
        );
        assert_eq!(kinds(api, "/2.0/snippets/acme/abc"), [L, L, N, L]);
        assert_eq!(kinds(api, "/2.0/teams/acme/search/code"), [L, L, N, L, L]);
        assert_eq!(
            kinds(api, "/2.0/user/workspaces/acme/permission"),
            [L, L, L, N, L]
        );
        assert_eq!(kinds(api, "/2.0/users/acme"), [L, L, L]);
        assert_eq!(kinds(api, "/2.0/Repositories/acme"), [L, L, L]);
        let git = UpstreamKind::Git;
        assert_eq!(kinds(git, "/acme/widgets.git/info/refs"), [N, G, L, L]);
        assert_eq!(kinds(git, "/"), []);
    }

    #[test]
    fn names_compare_without_case_and_git_suffix() {
        assert!(N.same(b"Widgets", b"widgets"));
        assert!(!N.same(b"widgets.git", b"widgets"));
        assert!(!L.same(b"Widgets", b"widgets"));
        assert!(G.same(b"widgets.git", b"WIDGETS"));
        assert!(G.same(b"widgets.GIT", b"widgets"));
        assert!(!G.same(b"widgets.git.git", b"widgets"));
        assert!(!G.same(b"widgets-evil", b"widgets"));
        assert_eq!(strip_git_suffix(b".git"), b".git");
        assert_eq!(strip_git_suffix(b"git"), b"git");
    }

    #[test]
    fn local_prefixes_take_kinds_where_they_line_up_with_the_upstream() {
        let pattern = |upstream, local, remote| {
            let p = PrefixPattern::new(upstream, local, remote);
            p.segments.iter().map(|s| s.kind).collect::<Vec<_>>()
        };
        let api = UpstreamKind::Api;
        let git = UpstreamKind::Git;
        let same = "/2.0/repositories/acme/widgets";
        assert_eq!(pattern(api, same, same), [L, L, N, N]);
        assert_eq!(
            pattern(git, "/git/acme/widgets.git", "/acme/widgets.git"),
            [L, N, G]
        );
        assert_eq!(
            pattern(git, "/git/acme/widgets", "/acme/widgets.git"),
            [L, N, G]
        );
        assert_eq!(pattern(api, "/release", "/2.0/repositories/acme"), [L]);
        assert_eq!(
            pattern(api, "/all/widgets", "/2.0/repositories/acme/widgets"),
            [L, N]
        );
        assert_eq!(pattern(api, "/", "/2.0"), []);
    }

    #[test]
    fn patterns_match_spellings_of_their_resource() {
        let narrow = PrefixPattern::new(
            UpstreamKind::Api,
            "/2.0/repositories/acme/widgets",
            "/2.0/repositories/acme/widgets",
        );
        assert_eq!(
            narrow.match_len(b"/2.0/repositories/acme/widgets"),
            Some(30)
        );
        assert_eq!(
            narrow.match_len(b"/2.0/repositories/ACME/Widgets/src"),
            Some(30)
        );
        assert_eq!(
            narrow.match_len(b"/2.0/repositories/acme/widgets/"),
            Some(30)
        );
        assert_eq!(
            narrow.match_len(b"/2.0/repositories/acme/widgets-evil"),
            None
        );
        assert_eq!(narrow.match_len(b"/2.0/Repositories/acme/widgets"), None);
        assert_eq!(narrow.match_len(b"/2.0/repositories/acme"), None);
        assert!(!narrow.may_match_by_uuid(b"/2.0/repositories/acme/gadgets"));
        assert!(narrow.may_match_by_uuid(b"/2.0/repositories/acme/{1234}/src"));
        assert!(narrow.may_match_by_uuid(b"/2.0/repositories/{ws}/widgets"));
        assert!(!narrow.may_match_by_uuid(b"/2.0/{x}/acme/widgets"));
        let git = PrefixPattern::new(
            UpstreamKind::Git,
            "/git/acme/widgets.git",
            "/acme/widgets.git",
        );
        assert_eq!(git.match_len(b"/git/acme/widgets/info/refs"), Some(17));
        assert_eq!(git.match_len(b"/git/Acme/Widgets.Git"), Some(21));
        assert_eq!(git.match_len(b"/Git/acme/widgets"), None);
        let root = PrefixPattern::new(UpstreamKind::Api, "/", "/");
        assert_eq!(root.match_len(b"/anything"), Some(0));
        assert!(narrow.same_place(&PrefixPattern::new(
            UpstreamKind::Api,
            "/2.0/repositories/Acme/WIDGETS",
            "/2.0/repositories/Acme/WIDGETS",
        )));
        assert!(git.same_place(&PrefixPattern::new(
            UpstreamKind::Git,
            "/git/acme/widgets",
            "/acme/widgets"
        )));
        assert!(!git.same_place(&narrow));
    }

    #[test]
    fn leading_segments_are_measured_in_the_request_spelling() {
        assert_eq!(leading_segments_len("/git/acme/widgets/info/refs", 3), 17);
        assert_eq!(leading_segments_len("/git/acme/widgets", 3), 17);
        assert_eq!(leading_segments_len("/git/acme", 3), 9);
        assert_eq!(leading_segments_len("/anything", 0), 0);
        assert_eq!(leading_segments_len("/a/", 1), 2);
        assert_eq!(leading_segments_len("", 2), 0);
    }
}
