//! Response rewriting: absolute URLs that point at the upstream are pointed back at the proxy, so
//! clients that follow `next`, `links.*.href`, `Location` or `Link` stay behind it.
//!
//! The body rewrite streams. [`LinkRewriter::process`] works chunk by chunk and carries over at
//! most the start of one URL (an origin and a route prefix, a few dozen bytes) between chunks;
//! nothing else is held.
//!
//! Compressed JSON is decoded on the fly and sent to the client as identity. Re-encoding would
//! cost far more CPU than decoding (gzip level 6 compresses at a fraction of its decode speed)
//! to save bytes on a loopback or local-network hop, and asking Bitbucket for identity instead
//! would multiply the bytes on the slow internet hop. Codings the proxy cannot decode are
//! filtered out of `Accept-Encoding` on rewriting routes, so they never arrive.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::response::Parts;
use http::{HeaderMap, HeaderValue, header};
use http_body::{Body, Frame, SizeHint};
use memchr::memmem;
use pin_project_lite::pin_project;

use crate::body::{BoxError, ProxyBody, TimedBody};
use crate::config::Config;
use crate::credentials::UpstreamKind;
use crate::routing::{Route, RouteTable, segment_prefix_matches};

mod decode;
pub use decode::{DECODE_STEP, DecodeError, EXPANSION_FLOOR, MAX_EXPANSION_RATIO};
use decode::{Decoder, Step};

/// One origin to look for. Its authority is what is searched, so one pass finds both the plain
/// and the JSON-escaped form; the scheme just before it says which form it is.
struct OriginFinder {
    authority: memmem::Finder<'static>,
    /// `https://` and `https:\/\/` (or `http…`).
    schemes: [Vec<u8>; 2],
    upstream: UpstreamKind,
}

impl OriginFinder {
    fn new(origin: &str, upstream: UpstreamKind) -> Self {
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
    fn form_before(&self, before: &[u8]) -> Option<bool> {
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
struct Mapping {
    prefix: Arc<str>,
    upstream: UpstreamKind,
    upstream_base: [Vec<u8>; 2],
    local_base: [Vec<u8>; 2],
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
    origins: Vec<OriginFinder>,
    /// Each origin as it appears in a body, plain and escaped: what a chunk may end in the
    /// middle of.
    needles: Vec<Vec<u8>>,
    /// Longest upstream prefix first; on a tie a transparent route (prefix = upstream_prefix)
    /// first, so links keep their familiar shape.
    mappings: Vec<Mapping>,
    longest_needle: usize,
    longest_base: usize,
}

impl std::fmt::Debug for RewritePatterns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RewritePatterns")
            .field("origins", &self.origins.len())
            .field("mappings", &self.mappings.len())
            .finish()
    }
}

fn escape_slashes(text: &str) -> String {
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
            .routes()
            .iter()
            .map(|route| {
                let upstream_base = route.upstream_prefix.trim_end_matches('/');
                let local_base = RouteTable::local_base(route);
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

    fn for_route(&self, upstream: UpstreamKind) -> &[OriginFinder] {
        match upstream {
            UpstreamKind::Api => &self.origins[..1],
            UpstreamKind::Git => &self.origins,
        }
    }

    /// How far past an origin the rewriter may need to look to settle a URL.
    fn lookahead(&self) -> usize {
        self.longest_needle + self.longest_base + 2
    }
}

/// Whether the client's `Accept-Encoding` needs narrowing to codings the rewriter can decode.
pub fn restrict_accept_encoding(headers: &mut HeaderMap) {
    let Some(value) = headers.get(header::ACCEPT_ENCODING) else {
        return;
    };
    let Ok(text) = value.to_str() else {
        headers.remove(header::ACCEPT_ENCODING);
        return;
    };
    let kept: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|item| {
            let coding = item.split(';').next().unwrap_or("").trim();
            Decoder::supports(coding) || coding.eq_ignore_ascii_case("identity")
        })
        .collect();
    if kept.len() == text.split(',').count() {
        return;
    }
    match HeaderValue::from_str(&kept.join(", ")) {
        Ok(v) if !kept.is_empty() => {
            headers.insert(header::ACCEPT_ENCODING, v);
        }
        _ => {
            headers.remove(header::ACCEPT_ENCODING);
        }
    }
}

/// Rewrites `Location`, `Link` and (for JSON) the body of an upstream response.
pub fn rewrite(
    config: &Arc<Config>,
    patterns: &Arc<RewritePatterns>,
    route: &Arc<Route>,
    client_host: Option<&HeaderValue>,
    parts: &mut Parts,
    body: TimedBody<hyper::body::Incoming>,
) -> ProxyBody {
    match rewrite_any(config, patterns, route, client_host, parts, body) {
        Rewritten::Plain(body) => ProxyBody::Upstream { body },
        Rewritten::Body(body) => ProxyBody::Rewritten { body },
    }
}

/// A body as it goes to the client: unchanged, or through the rewriter.
pub enum Rewritten<B> {
    Plain(B),
    Body(Pin<Box<RewriteBody<B>>>),
}

/// [`rewrite`] for any body: the response cache rewrites a stored or shared upstream body
/// for each client that receives it.
pub fn rewrite_any<B: Body<Data = Bytes, Error = BoxError>>(
    config: &Arc<Config>,
    patterns: &Arc<RewritePatterns>,
    route: &Arc<Route>,
    client_host: Option<&HeaderValue>,
    parts: &mut Parts,
    body: B,
) -> Rewritten<B> {
    use Rewritten::Plain as Upstream;
    if !route.rewrite_links {
        return Upstream(body);
    }
    let Some(proxy_origin) = proxy_origin(config, client_host) else {
        return Upstream(body);
    };
    let rewriter = LinkRewriter::new(
        config.clone(),
        patterns.clone(),
        route.clone(),
        proxy_origin,
    );
    rewrite_headers(&rewriter, &mut parts.headers);

    if body.is_end_stream() || !is_json(&parts.headers) {
        return Upstream(body);
    }
    let decoder = match parts
        .headers
        .get(header::CONTENT_ENCODING)
        .map(HeaderValue::to_str)
    {
        None => None,
        Some(Ok(coding)) => match Decoder::for_coding(coding.trim()) {
            Some(decoder) => Some(decoder),
            None if coding.trim().eq_ignore_ascii_case("identity") => None,
            // An encoding the proxy cannot read: pass the body on untouched.
            None => return Upstream(body),
        },
        Some(Err(_)) => return Upstream(body),
    };
    if decoder.is_some() {
        parts.headers.remove(header::CONTENT_ENCODING);
    }
    // The length changes with every rewritten URL; framing falls back to chunked / h2 frames.
    parts.headers.remove(header::CONTENT_LENGTH);
    weaken_etag(&mut parts.headers);
    Rewritten::Body(Box::pin(RewriteBody {
        inner: body,
        rewriter,
        decoder,
        trailers: None,
        done: false,
    }))
}

/// `server.public_url`, else `http://` + the request's `Host` when it is a plain authority.
fn proxy_origin(config: &Config, client_host: Option<&HeaderValue>) -> Option<Bytes> {
    if let Some(public) = &config.server.public_url {
        return Some(Bytes::from(public.text.clone()));
    }
    let host = client_host?.to_str().ok()?;
    // The Host goes into JSON and headers verbatim: only a well-formed authority is used.
    let authority: http::uri::Authority = host.parse().ok()?;
    let plain = authority
        .as_str()
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    plain.then(|| Bytes::from(format!("http://{authority}")))
}

/// The rewritten bytes differ from the upstream's: a strong validator would promise otherwise.
/// A weak one still lets `If-None-Match` revalidate (weak comparison) against Bitbucket.
fn weaken_etag(headers: &mut HeaderMap) {
    if let Some(etag) = headers.get(header::ETAG)
        && !etag.as_bytes().starts_with(b"W/")
    {
        let mut weak = b"W/".to_vec();
        weak.extend_from_slice(etag.as_bytes());
        if let Ok(value) = HeaderValue::from_bytes(&weak) {
            headers.insert(header::ETAG, value);
        }
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| {
            let mime = mime.trim();
            mime.eq_ignore_ascii_case("application/json")
                || (mime.len() > 5 && mime[mime.len() - 5..].eq_ignore_ascii_case("+json"))
        })
        .unwrap_or(false)
}

fn rewrite_headers(rewriter: &LinkRewriter, headers: &mut HeaderMap) {
    for name in [header::LOCATION, header::LINK, header::CONTENT_LOCATION] {
        let values: Vec<HeaderValue> = headers.get_all(&name).iter().cloned().collect();
        if values.is_empty() {
            continue;
        }
        headers.remove(&name);
        for value in values {
            let rewritten = rewriter.rewrite_header(&name, value.as_bytes());
            let value = HeaderValue::from_maybe_shared(rewritten).unwrap_or(value);
            headers.append(&name, value);
        }
    }
}

/// The streaming URL rewriter for one response.
pub struct LinkRewriter {
    config: Arc<Config>,
    patterns: Arc<RewritePatterns>,
    route: Arc<Route>,
    /// Per upstream (API, git), the mappings to try in order: the request's own route first,
    /// then the longest upstream prefix (transparent routes first on a tie). Computed once per
    /// response because judging a URL is the rewriter's innermost loop.
    candidates: [Box<[usize]>; 2],
    /// `http://host` of the proxy, plain and JSON-escaped.
    proxy_origin: [Bytes; 2],
    /// An unfinished match, or a possible start of one, from the previous chunk.
    carry: Vec<u8>,
    /// Reused: `carry` joined with the next chunk's head.
    joined: Vec<u8>,
}

/// What an origin match turned out to be.
enum Verdict {
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
enum Scan {
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
        let route = config
            .routes
            .routes()
            .iter()
            .find(|r| &*r.prefix == prefix)?
            .clone();
        let patterns = Arc::new(RewritePatterns::new(&config));
        Some(LinkRewriter::new(
            config,
            patterns,
            route,
            Bytes::from(proxy_origin.to_owned()),
        ))
    }

    fn new(
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
    fn finish(&mut self, buf: &[u8], from: usize, last: bool, out: &mut BytesMut) {
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
    fn scan(
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
    fn judge(&self, rest: &[u8], upstream: UpstreamKind, escaped: bool, last: bool) -> Verdict {
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
    fn needle_prefix_suffix(&self, tail: &[u8]) -> usize {
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

    fn candidates(&self, upstream: UpstreamKind) -> impl Iterator<Item = usize> + '_ {
        let kind = match upstream {
            UpstreamKind::Api => 0,
            UpstreamKind::Git => 1,
        };
        self.candidates[kind].iter().copied()
    }

    /// The same inverse mapping for a whole path (relative redirects); an uncovered path is
    /// kept. Returns the local prefix and the rest of the path to append to it.
    fn map_path<'p>(&self, upstream: UpstreamKind, path: &'p [u8]) -> (&[u8], &'p [u8]) {
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

    fn rewrite_header(&self, name: &header::HeaderName, value: &[u8]) -> Bytes {
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
fn short_equal(a: &[u8], b: &[u8]) -> bool {
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
fn segment_boundary(after: &[u8], escaped: bool, last: bool) -> Option<bool> {
    match after.first() {
        None => last.then_some(true),
        Some(b'/') => Some(true),
        // `\/` or an escape that ends the string: a boundary either way, once it can be seen.
        Some(b'\\') if escaped && after.len() < 2 => last.then_some(true),
        Some(&b) => Some(!PATH_CHARS[usize::from(b)]),
    }
}

/// Bytes that would continue a host name or port (so the match was a longer host).
fn is_host_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'@')
}

/// RFC 3986 `pchar`: bytes that continue a path segment.
static PATH_CHARS: [bool; 256] = {
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

pin_project! {
    /// A JSON body with upstream URLs rewritten on the fly.
    pub struct RewriteBody<B> {
        #[pin]
        inner: B,
        rewriter: LinkRewriter,
        // Owns the compressed input not yet decoded; each poll decodes one bounded step.
        decoder: Option<Decoder>,
        trailers: Option<HeaderMap>,
        done: bool,
    }
}

impl<B> Body for RewriteBody<B>
where
    B: Body<Data = Bytes, Error = BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        loop {
            if *this.done {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            if let Some(decoder) = this.decoder.as_mut() {
                match decoder.step() {
                    Ok(Step::Data(decoded)) => {
                        let out = this.rewriter.process(decoded, false);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                        continue;
                    }
                    Ok(Step::NeedInput) => {}
                    Ok(Step::End) => return finish(this.rewriter, this.done),
                    Err(error) => {
                        tracing::warn!(
                            reason = error.reason(),
                            route = &*this.rewriter.route.prefix,
                            error = %error,
                            "response aborted"
                        );
                        return Poll::Ready(Some(Err(error.into())));
                    }
                }
            }
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if let Some(decoder) = this.decoder.as_mut() {
                            decoder.push(data);
                            continue;
                        }
                        let out = this.rewriter.process(&data, false);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(frame) => {
                        *this.trailers = frame.into_trailers().ok();
                        match this.decoder.as_mut() {
                            Some(decoder) => decoder.end_input(),
                            None => return finish(this.rewriter, this.done),
                        }
                    }
                },
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => match this.decoder.as_mut() {
                    Some(decoder) => decoder.end_input(),
                    None => return finish(this.rewriter, this.done),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// The input is over and fully decoded: settles a URL the last chunk may have cut short.
fn finish(
    rewriter: &mut LinkRewriter,
    done: &mut bool,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    *done = true;
    let out = rewriter.process(&[], true);
    if out.is_empty() {
        Poll::Ready(None)
    } else {
        Poll::Ready(Some(Ok(Frame::data(out))))
    }
}

#[cfg(test)]
mod tests;
