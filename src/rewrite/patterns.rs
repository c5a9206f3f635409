//! What the link rewriter looks for (each upstream origin, plain and JSON-escaped) and what it
//! writes instead (each route's local prefix), compiled once per config generation.

use std::sync::Arc;

use memchr::memmem;

use crate::bitbucket::credentials::UpstreamKind;
use crate::config::Config;

/// One origin to look for. Its authority is what is searched, so one pass finds both the plain
/// and the JSON-escaped form; the scheme just before it says which form it is.
pub(super) struct OriginFinder {
    pub(super) authority: memmem::Finder<'static>,
    /// `https://` and `https:\/\/` (or `http…`).
    pub(super) schemes: [Vec<u8>; 2],
    pub(super) upstream: UpstreamKind,
}

impl OriginFinder {
    pub(super) fn new(origin: &str, upstream: UpstreamKind) -> Self {
        let (scheme, authority) = origin.split_once("://").unwrap_or(("https", origin));
        OriginFinder {
            authority: memmem::Finder::new(authority.as_bytes()).into_owned(),
            schemes: [
                format!("{scheme}://").into_bytes(),
                format!("{scheme}:\\/\\/").into_bytes(),
            ],
            upstream,
        }
    }

    /// Whether `before` (the unwritten bytes up to a found authority) ends with this origin's
    /// scheme: `Some(escaped)`, or `None` when the authority is not part of such a URL.
    pub(super) fn form_before(&self, before: &[u8]) -> Option<bool> {
        // Neither scheme form ends the other, so the order only matters for speed: plain first.
        if before.ends_with(&self.schemes[0]) {
            Some(false)
        } else if before.ends_with(&self.schemes[1]) {
            Some(true)
        } else {
            None
        }
    }
}

/// One route read backwards: an upstream path prefix and the local prefix that replaces it,
/// in both the plain and the JSON-escaped form.
pub(super) struct Mapping {
    pub(super) prefix: Arc<str>,
    pub(super) upstream: UpstreamKind,
    pub(super) upstream_base: [Vec<u8>; 2],
    pub(super) local_base: [Vec<u8>; 2],
}

/// What the rewriter looks for and what it writes instead, compiled once per config generation.
///
/// Each origin's authority is searched with its own SIMD substring finder, one pass for the plain
/// and the escaped form (a finder per form cost a second pass over every chunk for a form that is
/// rarely there). URLs are so dense in Bitbucket's JSON that a multi-pattern automaton keyed on
/// rare bytes kept stopping on false candidates (`bench/rewrite.rs` measured it at a third of
/// this speed). After an origin only the route prefix is compared; the rest of the URL is copied
/// like any other byte.
pub struct RewritePatterns {
    /// The API origin, then the git origin. REST routes look for the first; git routes both.
    pub(super) origins: Vec<OriginFinder>,
    /// Each origin as it appears in a body, plain and escaped: what a chunk may end in the
    /// middle of.
    pub(super) needles: Vec<Vec<u8>>,
    /// Longest upstream prefix first; on a tie a transparent route (prefix = upstream_prefix)
    /// first, so links keep their familiar shape.
    pub(super) mappings: Vec<Mapping>,
    pub(super) longest_needle: usize,
    pub(super) longest_base: usize,
}

impl std::fmt::Debug for RewritePatterns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RewritePatterns")
            .field("origins", &self.origins.len())
            .field("mappings", &self.mappings.len())
            .finish()
    }
}

pub(super) fn escape_slashes(text: &str) -> String {
    text.replace('/', "\\/")
}

impl RewritePatterns {
    pub fn new(config: &Config) -> Self {
        let (api, git) = (&config.upstream.api, &config.upstream.git);
        let origins = vec![
            OriginFinder::new(&api.text, UpstreamKind::Api),
            OriginFinder::new(&git.text, UpstreamKind::Git),
        ];
        // The same origins whole, for the chunk-boundary check: built from the finders so the two
        // can never disagree about what an escaped origin looks like.
        let needles: Vec<Vec<u8>> = origins
            .iter()
            .flat_map(|origin| {
                origin
                    .schemes
                    .iter()
                    .map(|scheme| [scheme.as_slice(), origin.authority.needle()].concat())
            })
            .collect();
        let mut mappings: Vec<Mapping> = config
            .routes
            .iter()
            .map(|route| {
                let upstream_base = route.upstream_prefix.trim_end_matches('/');
                let local_base = route.prefix.trim_end_matches('/');
                Mapping {
                    prefix: route.prefix.clone(),
                    upstream: route.upstream,
                    upstream_base: [upstream_base.into(), escape_slashes(upstream_base).into()],
                    local_base: [local_base.into(), escape_slashes(local_base).into()],
                }
            })
            .collect();
        mappings.sort_by_key(|m| {
            let transparent = m.upstream_base[0] == m.local_base[0];
            (std::cmp::Reverse(m.upstream_base[0].len()), !transparent)
        });
        RewritePatterns {
            longest_needle: needles.iter().map(Vec::len).max().unwrap_or(0),
            longest_base: mappings
                .iter()
                .map(|m| m.upstream_base[1].len())
                .max()
                .unwrap_or(0),
            origins,
            needles,
            mappings,
        }
    }

    pub(super) fn for_route(&self, upstream: UpstreamKind) -> &[OriginFinder] {
        match upstream {
            UpstreamKind::Api => &self.origins[..1],
            UpstreamKind::Git => &self.origins,
        }
    }

    /// How far past an origin the rewriter may need to look to settle a URL.
    pub(super) fn lookahead(&self) -> usize {
        self.longest_needle + self.longest_base + 2
    }
}
