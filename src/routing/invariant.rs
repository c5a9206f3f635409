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

/// Where Bitbucket reads a workspace (`W`), repository (`R`) or project (`P`) name in a REST
/// path, after the optional `2.0`, transcribed from the OpenAPI spec's path templates. A
/// placeholder counts once the literal segments before it match.
const REST_NAME_TEMPLATES: &[&[&str]] = &[
    &["repositories", "W", "R"],
    &["workspaces", "W", "projects", "P"],
    &["workspaces", "W", "permissions", "repositories", "R"],
    &["snippets", "W"],
    &["teams", "W"],
    &["user", "workspaces", "W"],
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Position {
    Other,
    Name,
    GitRepository,
}

fn split(path: &[u8]) -> Vec<&[u8]> {
    path.split(|&b| b == b'/')
        .filter(|s| !s.is_empty())
        .collect()
}

/// What each segment of an upstream path is, by the spec's templates (REST) or git's URL shape.
fn positions(route: &Route, segments: &[&[u8]]) -> Vec<Position> {
    let mut out = vec![Position::Other; segments.len()];
    if route.upstream == crate::bitbucket::credentials::UpstreamKind::Git {
        for (i, position) in out.iter_mut().enumerate().take(2) {
            *position = [Position::Name, Position::GitRepository][i];
        }
        return out;
    }
    let skip = usize::from(segments.first().is_some_and(|s| *s == b"2.0"));
    for template in REST_NAME_TEMPLATES {
        for (i, placeholder) in template.iter().enumerate() {
            let literals_match = template[..i]
                .iter()
                .zip(&segments[skip..])
                .all(|(t, s)| t.len() == 1 || t.as_bytes() == *s);
            if placeholder.len() == 1 && literals_match && skip + i < segments.len() {
                out[skip + i] = Position::Name;
            }
        }
    }
    out
}

/// Bitbucket's canonical spelling of one segment: names in lower case, no `.git`.
fn canonical(position: Position, segment: &[u8]) -> Vec<u8> {
    let lower = segment.to_ascii_lowercase();
    match position {
        Position::Other => segment.to_vec(),
        Position::Name => lower,
        // A repository has a name: `.git` alone is not an empty one.
        Position::GitRepository => match lower.strip_suffix(b".git") {
            Some(stripped) if !stripped.is_empty() => stripped.to_vec(),
            _ => lower,
        },
    }
}

/// A route's local prefix in canonical spelling, and which of its segments are names: the
/// segments that line up (from the end) with the same name in `upstream_prefix`.
fn canonical_local_prefix(route: &Route) -> Vec<(Vec<u8>, Position)> {
    let local = split(route.prefix.as_bytes());
    let upstream = split(route.upstream_prefix.as_bytes());
    let kinds = positions(route, &upstream);
    let mut out: Vec<(Vec<u8>, Position)> = local
        .iter()
        .map(|s| (s.to_vec(), Position::Other))
        .collect();
    for (j, slot) in out.iter_mut().rev().enumerate() {
        let Some(u) = upstream.len().checked_sub(j + 1) else {
            break;
        };
        let spelled = canonical(kinds[u], &slot.0);
        if spelled != canonical(kinds[u], upstream[u]) {
            break;
        }
        *slot = (spelled, kinds[u]);
    }
    out
}

/// Whether `route` claims the local path `segments`: its canonical prefix equals theirs. With
/// `uuid_is_any_name`, a `{…}` segment in a name position matches any name.
fn claims(route: &Route, segments: &[&[u8]], uuid_is_any_name: bool) -> bool {
    let prefix = canonical_local_prefix(route);
    prefix.len() <= segments.len()
        && prefix.iter().zip(segments).all(|((text, position), s)| {
            canonical(*position, s) == *text
                || (uuid_is_any_name
                    && *position != Position::Other
                    && s.iter().any(|&b| b == b'{' || b == b'}'))
        })
}

fn same(a: Option<&Arc<Route>>, b: Option<&Arc<Route>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

fn depth(route: &Route) -> usize {
    split(route.prefix.as_bytes()).len()
}

/// The route Bitbucket's canonical spelling of `local` belongs to, by brute force: the one with
/// the most prefix segments among those claiming it. `Err` when a `{UUID}` in it could also
/// belong to another route at least as deep, so the proxy must refuse it.
fn expected_route<'a>(table: &'a RouteTable, local: &[u8]) -> Result<Option<&'a Arc<Route>>, ()> {
    let segments = split(local);
    let best = table
        .routes()
        .iter()
        .filter(|r| claims(r, &segments, false))
        .max_by_key(|r| depth(r));
    if let Some(best) = best
        && table
            .routes()
            .iter()
            .any(|r| !Arc::ptr_eq(r, best) && depth(r) >= depth(best) && claims(r, &segments, true))
    {
        return Err(());
    }
    Ok(best)
}

/// The routing invariants for one raw request path:
///
/// - a credential is only ever chosen with a route, and that route is the one Bitbucket's
///   canonical spelling of the path belongs to (names in lower case, git repositories without
///   `.git`), for the path as sent and once and twice percent-decoded (so no spelling or
///   encoding picks another route's credential or slips past a narrower route's method list,
///   for an upstream that decodes up to twice, the model of [`crate::bitbucket::path`]);
/// - the same holds for the path as the upstream will see it, mapped back through the route;
/// - a `{UUID}` that another route as specific may claim is refused, never forwarded;
/// - the forwarded path, however the upstream reads it, stays inside the route's
///   `upstream_prefix`.
pub fn check_route(table: &RouteTable, path: &str) -> Result<(), String> {
    let found = match table.route(path) {
        Err(_) => return Ok(()),
        Ok(found) => found,
    };
    let once = percent_decode(path.as_bytes());
    let twice = percent_decode(&once);
    for (form, local) in [
        ("as sent", path.as_bytes()),
        ("decoded once", &once),
        ("decoded twice", &twice),
    ] {
        match expected_route(table, local) {
            Err(()) => {
                return Err(format!(
                    "{path:?} ({form}) routed to {:?}, but a {{UUID}} in it may name a resource of another route",
                    found.map(|r| &r.prefix)
                ));
            }
            Ok(expected) if !same(found, expected) => {
                return Err(format!(
                    "{path:?} routed to {:?}, but its canonical spelling {form} belongs to {:?}",
                    found.map(|r| &r.prefix),
                    expected.map(|r| &r.prefix)
                ));
            }
            Ok(_) => {}
        }
    }
    let Some(route) = found else {
        return Ok(());
    };
    let upstream = route.upstream_path(path);
    check_upstream_spelling(table, route, path, &upstream)?;
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

/// The resource Bitbucket will see (the forwarded path as sent, decoded once and twice), in its
/// canonical spelling and mapped back through `route` to a local path, belongs to `route`.
fn check_upstream_spelling(
    table: &RouteTable,
    route: &Arc<Route>,
    path: &str,
    upstream: &str,
) -> Result<(), String> {
    let base = split(route.upstream_prefix.as_bytes());
    let local_base = canonical_local_prefix(route);
    let once = percent_decode(upstream.as_bytes());
    let twice = percent_decode(&once);
    for seen in [upstream.as_bytes(), &once, &twice] {
        let segments = split(seen);
        let kinds = positions(route, &segments);
        let spelled: Vec<Vec<u8>> = segments
            .iter()
            .zip(&kinds)
            .map(|(s, k)| canonical(*k, s))
            .collect();
        let base_spelled: Vec<Vec<u8>> = base
            .iter()
            .zip(&kinds)
            .map(|(s, k)| canonical(*k, s))
            .collect();
        if !spelled.starts_with(&base_spelled) {
            return Err(format!(
                "{path:?} is forwarded as {:?}, outside {:?}",
                String::from_utf8_lossy(seen),
                route.upstream_prefix
            ));
        }
        // Written back as a path, a git repository keeps one `.git`: `widgets.git.git` is the
        // repository `widgets.git`, not `widgets`.
        let mut local = Vec::new();
        let rest = spelled[base.len()..].iter().zip(&kinds[base.len()..]);
        for (segment, position) in local_base.iter().map(|(s, p)| (s, p)).chain(rest) {
            local.push(b'/');
            local.extend_from_slice(segment);
            if *position == Position::GitRepository {
                local.extend_from_slice(b".git");
            }
        }
        match expected_route(table, &local) {
            Ok(expected) if same(Some(route), expected) => {}
            Ok(expected) => {
                return Err(format!(
                    "{path:?} routed to {:?}; Bitbucket sees {:?}, canonically {:?}, which belongs to {:?}",
                    route.prefix,
                    String::from_utf8_lossy(seen),
                    String::from_utf8_lossy(&local),
                    expected.map(|r| &r.prefix)
                ));
            }
            Err(()) => {
                return Err(format!(
                    "{path:?} routed to {:?}; Bitbucket sees {:?}, whose {{UUID}} may name a resource of another route",
                    route.prefix,
                    String::from_utf8_lossy(seen),
                ));
            }
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

/// The header invariants of [`crate::base::headers::sanitize_request`], given the headers before and
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
