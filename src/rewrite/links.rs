//! The streaming URL rewriter: scans a response chunk by chunk for upstream URLs under a route
//! and writes the proxy's own in their place, carrying at most one URL's start between chunks.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header;

use crate::bitbucket::credentials::UpstreamKind;
use crate::config::Config;
use crate::routing::{Route, segment_prefix_matches};
use crate::upstream::credential::Credential;

use super::patterns::{RewritePatterns, escape_slashes};

/// The streaming URL rewriter for one response.
pub struct LinkRewriter {
    pub(super) config: Arc<Config>,
    pub(super) patterns: Arc<RewritePatterns>,
    pub(super) route: Arc<Route>,
    /// Per upstream (API, git), the mappings to try in order: the request's own route first,
    /// then the longest upstream prefix (transparent routes first on a tie). Computed once per
    /// response because judging a URL is the rewriter's innermost loop.
    pub(super) candidates: [Box<[usize]>; 2],
    /// `http://host` of the proxy, plain and JSON-escaped.
    pub(super) proxy_origin: [Bytes; 2],
    /// An unfinished match, or a possible start of one, from the previous chunk.
    pub(super) carry: Vec<u8>,
    /// Reused: `carry` joined with the next chunk's head.
    pub(super) joined: Vec<u8>,
}

/// What an origin match turned out to be.
pub(super) enum Verdict {
    /// Rewrite `consumed` bytes after the origin (the matched upstream prefix) into this
    /// mapping's local prefix (`None`: keep the path, replace only the origin).
    Rewrite {
        consumed: usize,
        mapping: Option<usize>,
    },
    /// The input ended before the URL could be judged.
    NeedMore,
    /// Not a URL of that origin (`https://api.bitbucket.org.evil.example`).
    NotOurs,
}

/// Where scanning a buffer stopped.
pub(super) enum Scan {
    /// Everything up to `end` was written out.
    Done { end: usize },
    /// A match starting at `start` needs more input.
    Unfinished { start: usize },
}

impl LinkRewriter {
    /// A rewriter for responses on the route with `prefix`, as the proxy would build it
    /// (for benchmarks and tools; the proxy itself goes through [`rewrite`]).
    #[doc(hidden)]
    pub fn for_route(config: Arc<Config>, prefix: &str, proxy_origin: &str) -> Option<Self> {
        let settings = config.routes.iter().find(|r| &*r.prefix == prefix)?;
        let credential = Arc::new(Credential::from_settings(&settings.credential));
        let route = Arc::new(Route::from_settings(settings, credential));
        let patterns = Arc::new(RewritePatterns::new(&config));
        Some(LinkRewriter::new(
            config,
            patterns,
            route,
            Bytes::from(proxy_origin.to_owned()),
        ))
    }

    pub(super) fn new(
        config: Arc<Config>,
        patterns: Arc<RewritePatterns>,
        route: Arc<Route>,
        proxy_origin: Bytes,
    ) -> Self {
        let preferred = patterns
            .mappings
            .iter()
            .position(|m| m.prefix == route.prefix);
        let order = |upstream: UpstreamKind| -> Box<[usize]> {
            preferred
                .into_iter()
                .chain((0..patterns.mappings.len()).filter(|&i| Some(i) != preferred))
                .filter(|&i| patterns.mappings[i].upstream == upstream)
                .collect()
        };
        let candidates = [order(UpstreamKind::Api), order(UpstreamKind::Git)];
        let escaped = Bytes::from(escape_slashes(&String::from_utf8_lossy(&proxy_origin)));
        LinkRewriter {
            config,
            patterns,
            route,
            candidates,
            proxy_origin: [proxy_origin, escaped],
            carry: Vec::new(),
            joined: Vec::new(),
        }
    }

    /// Rewrites the next piece of a body. With `last`, everything carried is flushed.
    ///
    /// Each input byte is copied once, into the output. Only a URL cut by a chunk boundary is
    /// carried, and joining it with the next chunk copies just that chunk's first few dozen
    /// bytes, never the whole chunk.
    pub fn process(&mut self, input: &[u8], last: bool) -> Bytes {
        let mut out = BytesMut::with_capacity(input.len() + self.carry.len() + 64);
        let mut from = 0;
        if !self.carry.is_empty() {
            let head = input.len().min(self.patterns.lookahead());
            let carried = self.carry.len();
            let mut joined = std::mem::take(&mut self.joined);
            joined.clear();
            joined.append(&mut self.carry);
            joined.extend_from_slice(&input[..head]);
            if head == input.len() {
                // A short chunk: the carry and all of it make one buffer.
                self.finish(&joined, 0, last, &mut out);
                self.joined = joined;
                return out.freeze();
            }
            // Settle the matches that start in the carried bytes; the rest of the input is
            // scanned in place below. `joined` reaches far enough past the carry to judge any
            // URL that starts in it.
            match self.scan(&joined, 0, Some(carried), false, &mut out) {
                Scan::Done { end } if end < carried => out.extend_from_slice(&joined[end..carried]),
                Scan::Done { end } => from = end - carried,
                Scan::Unfinished { start } => {
                    self.carry.extend_from_slice(&joined[start..]);
                    self.carry.extend_from_slice(&input[head..]);
                    self.joined = joined;
                    return out.freeze();
                }
            }
            self.joined = joined;
        }
        self.finish(input, from, last, &mut out);
        out.freeze()
    }

    /// Scans `buf[from..]` to its end; what may continue in the next chunk goes to `carry`.
    pub(super) fn finish(&mut self, buf: &[u8], from: usize, last: bool, out: &mut BytesMut) {
        match self.scan(buf, from, None, last, out) {
            Scan::Done { end } => {
                let keep = if last {
                    0
                } else {
                    self.needle_prefix_suffix(&buf[end..])
                };
                out.extend_from_slice(&buf[end..buf.len() - keep]);
                self.carry.extend_from_slice(&buf[buf.len() - keep..]);
            }
            Scan::Unfinished { start } => self.carry.extend_from_slice(&buf[start..]),
        }
    }

    /// Writes `buf[from..]` with upstream origins rewritten, up to the end of the last rewritten
    /// one (`Done`), or up to a match that needs more input (`Unfinished`). With
    /// `starts_before`, only matches starting before that offset are considered.
    pub(super) fn scan(
        &self,
        buf: &[u8],
        from: usize,
        starts_before: Option<usize>,
        last: bool,
        out: &mut BytesMut,
    ) -> Scan {
        let origins = self.patterns.for_route(self.route.upstream);
        // The next occurrence of each authority at or after `search_from`; `None` once
        // exhausted.
        let mut next: [Option<usize>; 2] = [Some(usize::MAX); 2];
        let mut pos = from;
        let mut search_from = from;
        loop {
            for (slot, origin) in next.iter_mut().zip(origins) {
                if matches!(*slot, Some(at) if at == usize::MAX || at < search_from) {
                    *slot = origin
                        .authority
                        .find(&buf[search_from..])
                        .map(|at| at + search_from);
                }
            }
            // Earliest; on a tie (api_url = git_url) the API origin, listed first.
            let Some((index, at)) = next[..origins.len()]
                .iter()
                .enumerate()
                .filter_map(|(i, at)| at.map(|at| (i, at)))
                .min_by_key(|&(i, at)| (at, i))
            else {
                break;
            };
            let origin = &origins[index];
            // The scheme must be unwritten input too: bytes before `pos` are already out.
            let Some(escaped) = origin.form_before(&buf[pos..at]) else {
                search_from = at + 1;
                continue;
            };
            let form = usize::from(escaped);
            let start = at - origin.schemes[form].len();
            if starts_before.is_some_and(|limit| start >= limit) {
                break;
            }
            let end = at + origin.authority.needle().len();
            match self.judge(&buf[end..], origin.upstream, escaped, last) {
                Verdict::Rewrite { consumed, mapping } => {
                    out.extend_from_slice(&buf[pos..start]);
                    out.extend_from_slice(&self.proxy_origin[form]);
                    if let Some(mapping) = mapping {
                        out.extend_from_slice(&self.patterns.mappings[mapping].local_base[form]);
                    }
                    pos = end + consumed;
                    search_from = pos;
                }
                Verdict::NotOurs => search_from = at + 1,
                Verdict::NeedMore => {
                    out.extend_from_slice(&buf[pos..start]);
                    return Scan::Unfinished { start };
                }
            }
        }
        Scan::Done { end: pos }
    }

    /// Decides what follows an origin: a route's upstream prefix on a segment boundary (the
    /// request's own route first, then the longest), just a path no route covers, or a longer
    /// host name that only starts like the origin.
    pub(super) fn judge(
        &self,
        rest: &[u8],
        upstream: UpstreamKind,
        escaped: bool,
        last: bool,
    ) -> Verdict {
        match rest.first() {
            None if !last => return Verdict::NeedMore,
            Some(&b) if is_host_char(b) => return Verdict::NotOurs,
            _ => {}
        }
        let form = usize::from(escaped);
        for index in self.candidates(upstream) {
            let base = &self.patterns.mappings[index].upstream_base[form];
            if rest.len() < base.len() {
                if !last && base.starts_with(rest) {
                    return Verdict::NeedMore;
                }
                continue;
            }
            if !short_equal(&rest[..base.len()], base) {
                continue;
            }
            match segment_boundary(&rest[base.len()..], escaped, last) {
                Some(true) => {
                    return Verdict::Rewrite {
                        consumed: base.len(),
                        mapping: Some(index),
                    };
                }
                Some(false) => {}
                None => return Verdict::NeedMore,
            }
        }
        Verdict::Rewrite {
            consumed: 0,
            mapping: None,
        }
    }

    /// How many trailing bytes of `tail` could begin an origin cut by the chunk boundary.
    pub(super) fn needle_prefix_suffix(&self, tail: &[u8]) -> usize {
        let max = tail
            .len()
            .min(self.patterns.longest_needle.saturating_sub(1));
        let window = &tail[tail.len() - max..];
        let needles = &self.patterns.needles;
        // Only offsets holding an origin's first byte (`h`) can start a cut one: checking that
        // first spares a comparison per offset on every chunk.
        window
            .iter()
            .enumerate()
            .filter(|&(_, &b)| needles.iter().any(|n| n.first() == Some(&b)))
            .map(|(at, _)| &window[at..])
            .find(|suffix| needles.iter().any(|needle| needle.starts_with(suffix)))
            .map_or(0, <[u8]>::len)
    }

    pub(super) fn candidates(&self, upstream: UpstreamKind) -> impl Iterator<Item = usize> + '_ {
        let kind = match upstream {
            UpstreamKind::Api => 0,
            UpstreamKind::Git => 1,
        };
        self.candidates[kind].iter().copied()
    }

    /// The same inverse mapping for a whole path (relative redirects); an uncovered path is
    /// kept. Returns the local prefix and the rest of the path to append to it.
    pub(super) fn map_path<'p>(&self, upstream: UpstreamKind, path: &'p [u8]) -> (&[u8], &'p [u8]) {
        for index in self.candidates(upstream) {
            let mapping = &self.patterns.mappings[index];
            let base = &mapping.upstream_base[0];
            if segment_prefix_matches(base, path) {
                let (local, rest) = (&mapping.local_base[0][..], &path[base.len()..]);
                return if local.is_empty() && rest.is_empty() {
                    (b"/", rest)
                } else {
                    (local, rest)
                };
            }
        }
        (b"", path)
    }

    pub(super) fn rewrite_header(&self, name: &header::HeaderName, value: &[u8]) -> Bytes {
        // Relative redirects are resolved against the proxy by the client: map their path too.
        if *name == header::LOCATION && value.starts_with(b"/") && !value.starts_with(b"//") {
            let end = value
                .iter()
                .position(|&b| b == b'?' || b == b'#')
                .unwrap_or(value.len());
            let (base, rest) = self.map_path(self.route.upstream, &value[..end]);
            let mut out = Vec::with_capacity(value.len() + base.len());
            out.extend_from_slice(base);
            out.extend_from_slice(rest);
            out.extend_from_slice(&value[end..]);
            return Bytes::from(out);
        }
        let mut once = LinkRewriter::new(
            self.config.clone(),
            self.patterns.clone(),
            self.route.clone(),
            self.proxy_origin[0].clone(),
        );
        once.process(value, true)
    }
}

/// `a == b` for the few dozen bytes of a route prefix, inline: a call into libc's `memcmp`
/// costs more than the comparison, and this runs for nearly every URL in a body.
#[inline]
pub(super) fn short_equal(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (mut a_words, mut b_words) = (a.chunks_exact(8), b.chunks_exact(8));
    let word = |w: &[u8]| u64::from_ne_bytes(w.try_into().expect("chunks of 8"));
    if (&mut a_words)
        .zip(&mut b_words)
        .any(|(x, y)| word(x) != word(y))
    {
        return false;
    }
    a_words
        .remainder()
        .iter()
        .zip(b_words.remainder())
        .all(|(x, y)| x == y)
}

/// Whether a path continues past a prefix on a segment boundary: `Some(true)` at `/` (`\/` in
/// the escaped form) or the end of the URL, `Some(false)` inside a segment (`widgets-evil`
/// after `widgets`), `None` when the input ends too soon to tell.
pub(super) fn segment_boundary(after: &[u8], escaped: bool, last: bool) -> Option<bool> {
    match after.first() {
        None => last.then_some(true),
        Some(b'/') => Some(true),
        // `\/` or an escape that ends the string: a boundary either way, once it can be seen.
        Some(b'\\') if escaped && after.len() < 2 => last.then_some(true),
        Some(&b) => Some(!PATH_CHARS[usize::from(b)]),
    }
}

/// Bytes that would continue a host name or port (so the match was a longer host).
pub(super) fn is_host_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'@')
}

/// RFC 3986 `pchar`: bytes that continue a path segment.
pub(super) static PATH_CHARS: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'@'
            );
        b += 1;
    }
    table
};
