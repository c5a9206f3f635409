//! The proxy's security invariants as plain checks, shared by the property tests that run in
//! `cargo test` and the cargo-fuzz targets in `fuzz/`. Not part of the proxy's interface.
//!
//! The oracles here are written from the specs (RFC 3986 §5.2.4, RFC 9110 §7.6.1), not from the
//! code they check: a check that mirrored the implementation would agree with its bugs.

use std::sync::Arc;

use http::HeaderMap;
use http::header::HeaderName;

use crate::routing::{Route, RouteTable, segment_prefix_matches};

/// RFC 3986 §5.2.4 remove_dot_segments, as an upstream might apply it to an absolute path.
pub fn remove_dot_segments(path: &[u8]) -> Vec<u8> {
    let mut output: Vec<&[u8]> = Vec::new();
    let segments: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
    for (i, segment) in segments.iter().enumerate().skip(1) {
        match *segment {
            b"." => {}
            b".." => {
                output.pop();
            }
            s => output.push(s),
        }
        if i == segments.len() - 1 && matches!(*segment, b"." | b"..") {
            output.push(b"");
        }
    }
    let mut out = Vec::new();
    for s in output {
        out.push(b'/');
        out.extend_from_slice(s);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out
}

/// One round of lenient percent-decoding: a `%` that starts no valid escape stays literal.
pub fn percent_decode(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        if path[i] == b'%'
            && let Some(hex) = path.get(i + 1..i + 3)
            && let Ok(text) = std::str::from_utf8(hex)
            && let Ok(byte) = u8::from_str_radix(text, 16)
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(path[i]);
        i += 1;
    }
    out
}

/// Every way an upstream might read a forwarded path: as sent, decoded once or twice, with or
/// without backslashes read as slashes and repeated slashes merged, then dot-segments removed.
pub fn interpretations(path: &[u8]) -> Vec<Vec<u8>> {
    let once = percent_decode(path);
    let twice = percent_decode(&once);
    let mut all = Vec::new();
    for form in [path.to_vec(), once, twice] {
        let backslashes_as_slashes: Vec<u8> = form
            .iter()
            .map(|&b| if b == b'\\' { b'/' } else { b })
            .collect();
        for form in [form, backslashes_as_slashes] {
            let mut merged = form.clone();
            merged.dedup_by(|a, b| *a == b'/' && *b == b'/');
            all.push(remove_dot_segments(&form));
            all.push(remove_dot_segments(&merged));
        }
    }
    all
}

/// The longest route whose prefix covers `path` on a segment boundary, found by brute force.
fn longest_covering<'a>(table: &'a RouteTable, path: &[u8]) -> Option<&'a Arc<Route>> {
    table
        .routes()
        .iter()
        .filter(|r| segment_prefix_matches(r.prefix.trim_end_matches('/').as_bytes(), path))
        .max_by_key(|r| r.prefix.trim_end_matches('/').len())
}

/// The routing invariants for one raw request path:
///
/// - a credential is only ever chosen with a route, and that route is the longest one covering
///   the path as sent, once and twice percent-decoded (so no encoding picks another route's
///   credential or slips past a narrower route's method list, for an upstream that decodes up
///   to twice, the model of [`crate::path`]);
/// - the forwarded path, however the upstream reads it, stays inside the route's
///   `upstream_prefix`.
pub fn check_route(table: &RouteTable, path: &str) -> Result<(), String> {
    let found = match table.route(path) {
        Err(_) => return Ok(()),
        Ok(found) => found,
    };
    let expected = longest_covering(table, path.as_bytes());
    let same = |a: Option<&Arc<Route>>, b: Option<&Arc<Route>>| match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    };
    if !same(found, expected) {
        return Err(format!(
            "{path:?} routed to {:?}, but the longest covering route is {:?}",
            found.map(|r| &r.prefix),
            expected.map(|r| &r.prefix)
        ));
    }
    let once = percent_decode(path.as_bytes());
    let twice = percent_decode(&once);
    for (rounds, decoded) in [("once", &once), ("twice", &twice)] {
        let other = longest_covering(table, decoded);
        if !same(found, other) {
            return Err(format!(
                "{path:?} routed to {:?}, but decoded {rounds} it belongs to {:?}",
                found.map(|r| &r.prefix),
                other.map(|r| &r.prefix)
            ));
        }
    }
    let Some(route) = found else {
        return Ok(());
    };
    let upstream = route.upstream_path(path);
    let base = route.upstream_prefix.trim_end_matches('/').as_bytes();
    for seen in interpretations(upstream.as_bytes()) {
        if !segment_prefix_matches(base, &seen) {
            return Err(format!(
                "{path:?} -> {upstream:?} read as {:?} escapes {:?}",
                String::from_utf8_lossy(&seen),
                route.upstream_prefix
            ));
        }
    }
    Ok(())
}

/// Headers that must never reach the upstream: hop-by-hop (RFC 9110 §7.6.1, plus the legacy
/// `Keep-Alive`/`Proxy-Connection` and the proxy-auth pair), and client credentials, `Expect`,
/// `Host`, forwarding headers, and the method-override and URL-rewrite headers front ends act on.
pub const NEVER_FORWARDED: [&str; 25] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "authorization",
    "cookie",
    "expect",
    "host",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-real-ip",
    "true-client-ip",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
];

/// Every header name listed on any `Connection` line, read as bytes: a value with obs-text in
/// it still names the tokens it lists.
pub fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .filter_map(|token| HeaderName::from_bytes(token.trim_ascii()).ok())
        .collect()
}

/// The header invariants of [`crate::headers::sanitize_request`], given the headers before and
/// after: nothing in [`NEVER_FORWARDED`] or named by `Connection` survives, and every other
/// header survives with all its values in order.
pub fn check_sanitized_request(before: &HeaderMap, after: &HeaderMap) -> Result<(), String> {
    let listed = connection_listed(before);
    let removed = |name: &HeaderName| {
        NEVER_FORWARDED.contains(&name.as_str()) || listed.iter().any(|l| l == name)
    };
    for name in after.keys() {
        if removed(name) {
            return Err(format!("{name} survived sanitising: {after:?}"));
        }
    }
    for name in before.keys().filter(|n| !removed(n)) {
        let was: Vec<_> = before.get_all(name).iter().collect();
        let is: Vec<_> = after.get_all(name).iter().collect();
        if was != is {
            return Err(format!("{name} changed from {was:?} to {is:?}"));
        }
    }
    Ok(())
}
