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
//!
//! Uses [`crate::config`] (the upstream origins, `server.public_url`), [`crate::routing`] (the
//! route a response belongs to) and the body types of [`crate::base`].

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::response::Parts;
use http::{HeaderMap, HeaderValue, header};
use http_body::Body;

use crate::base::body::{BoxError, ProxyBody, TimedBody, UpstreamBody};
use crate::config::Config;
use crate::routing::Route;

mod body;
mod decode;
mod links;
mod patterns;

pub use body::RewriteBody;
use decode::Decoder;
pub use decode::{DECODE_STEP, DecodeError, EXPANSION_FLOOR, MAX_EXPANSION_RATIO};
pub use links::LinkRewriter;
pub use patterns::RewritePatterns;

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
    body: TimedBody<UpstreamBody>,
) -> ProxyBody {
    match rewrite_any(config, patterns, route, client_host, parts, body) {
        Rewritten::Plain(body) => ProxyBody::Upstream { body },
        Rewritten::Body(body) => ProxyBody::Rewritten {
            body: http_body_util::combinators::UnsyncBoxBody::new(body),
        },
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

#[cfg(test)]
mod tests;
