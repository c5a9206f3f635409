//! Header hygiene in both directions: hop-by-hop headers, client secrets, internal addresses.

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the proxy-auth pair: they describe one connection
/// and must never cross the proxy.
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
    )
}

/// Client headers that must not reach Bitbucket: credentials the proxy replaces, the client's
/// `Expect` (the proxy answers refusals before reading the body; hyper's client has no Expect
/// logic), forwarding headers that would reveal internal addresses, and the headers front ends
/// act on: a method override would turn a GET the route allows into a DELETE it does not, a
/// rewrite header would send the request to another path than the one routed, and a forwarded
/// host, scheme, port or client address would be believed by a front end that trusts its peer.
fn is_client_only(name: &str) -> bool {
    matches!(
        name,
        "authorization"
            | "cookie"
            | "expect"
            | "host"
            | "forwarded"
            | "x-forwarded-for"
            | "x-forwarded-host"
            | "x-forwarded-proto"
            | "x-forwarded-port"
            | "x-real-ip"
            | "true-client-ip"
            | "x-http-method-override"
            | "x-http-method"
            | "x-method-override"
            | "x-original-url"
            | "x-rewrite-url"
    )
}

/// Removes every header named on any `Connection` line (hop-by-hop by the sender's word).
///
/// The lines are split as bytes: an obs-text byte elsewhere on a line (which hyper accepts)
/// must not hide the tokens listed beside it.
fn remove_connection_listed(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .filter_map(|token| HeaderName::from_bytes(token.trim_ascii()).ok())
        .filter(|name| *name != header::CONNECTION)
        .collect();
    for name in listed {
        headers.remove(name);
    }
}

/// Removes every header whose (lower-case) name `doomed` picks, and the names a `Connection`
/// line lists when `doomed` picks `Connection` (both directions do). A map holds few names and a
/// lookup hashes its name, so one pass over the map's names beats a lookup per name on the
/// lists (25 for a request), and a `match` on the name beats comparing it with each of them.
fn remove_where(headers: &mut HeaderMap, doomed: impl Fn(&str) -> bool) {
    while let Some(name) = headers.keys().find(|name| doomed(name.as_str())).cloned() {
        if name == header::CONNECTION {
            remove_connection_listed(headers);
        }
        headers.remove(name);
    }
}

/// The first value of each of `names` (lower case, as names are stored). One pass over the
/// map: an answer carries few headers, and a lookup hashes the name it looks for, which for a
/// name outside the standard set costs more than comparing it with each name present.
pub fn first_values<'a, const N: usize>(
    headers: &'a HeaderMap,
    names: [&str; N],
) -> [Option<&'a HeaderValue>; N] {
    let mut found = [None; N];
    for (name, value) in headers {
        let name = name.as_str();
        if let Some(i) = names.iter().position(|wanted| *wanted == name)
            && found[i].is_none()
        {
            found[i] = Some(value);
        }
    }
    found
}

/// Prepares client headers for the upstream; the caller then inserts the credential.
pub fn sanitize_request(headers: &mut HeaderMap) {
    remove_where(headers, |name| is_hop_by_hop(name) || is_client_only(name));
}

/// Prepares upstream headers for the client. `Set-Cookie` is dropped: a session cookie issued
/// to the proxy's credential would let a client act as that credential without the proxy.
pub fn sanitize_response(headers: &mut HeaderMap) {
    remove_where(headers, |name| is_hop_by_hop(name) || name == "set-cookie");
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    #[test]
    fn every_connection_line_is_honoured() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Foo"),
        );
        headers.append(header::CONNECTION, HeaderValue::from_static("x-bar"));
        headers.insert("x-foo", HeaderValue::from_static("1"));
        headers.insert("x-bar", HeaderValue::from_static("2"));
        headers.insert("x-kept", HeaderValue::from_static("3"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        sanitize_request(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key("x-kept"));
    }

    /// Found by the `sanitize_headers` fuzz target: a `Connection` line with an obs-text byte was
    /// skipped whole, so the headers it listed went upstream.
    #[test]
    fn obs_text_on_a_connection_line_does_not_hide_its_tokens() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-secret, x-\xbb, close").unwrap(),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("x-kept", HeaderValue::from_static("2"));
        sanitize_request(&mut headers);
        assert_eq!(headers.keys().collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn first_values_takes_the_first_of_each_name() {
        let mut headers = HeaderMap::new();
        headers.append("x-one", HeaderValue::from_static("a"));
        headers.append("x-one", HeaderValue::from_static("b"));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let [one, content_type, absent] =
            first_values(&headers, ["x-one", "content-type", "x-absent"]);
        assert_eq!(one.unwrap(), "a");
        assert_eq!(content_type.unwrap(), "text/plain");
        assert!(absent.is_none());
    }

    #[test]
    fn client_credentials_and_addresses_never_pass() {
        let mut headers = HeaderMap::new();
        for name in [
            "authorization",
            "cookie",
            "proxy-authorization",
            "expect",
            "host",
            "x-forwarded-for",
            "forwarded",
            "x-http-method-override",
            "x-http-method",
            "x-method-override",
            "x-original-url",
            "x-rewrite-url",
            "x-forwarded-host",
            "x-forwarded-proto",
            "x-forwarded-port",
            "x-real-ip",
            "true-client-ip",
        ] {
            headers.insert(HeaderName::from_static(name), HeaderValue::from_static("v"));
        }
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        sanitize_request(&mut headers);
        assert_eq!(headers.keys().collect::<Vec<_>>(), [&header::ACCEPT]);
    }

    #[test]
    fn responses_lose_cookies_and_hop_by_hop() {
        let mut headers = HeaderMap::new();
        headers.insert(header::SET_COOKIE, HeaderValue::from_static("session=1"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        sanitize_response(&mut headers);
        assert_eq!(headers.keys().collect::<Vec<_>>(), [&header::CONTENT_TYPE]);
    }

    fn header_name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("connection".to_owned()),
            Just("keep-alive".to_owned()),
            Just("te".to_owned()),
            Just("upgrade".to_owned()),
            Just("authorization".to_owned()),
            Just("cookie".to_owned()),
            Just("x-http-method-override".to_owned()),
            Just("x-original-url".to_owned()),
            Just("true-client-ip".to_owned()),
            "[a-z][a-z0-9-]{0,12}",
        ]
    }

    /// Header values as hyper accepts them: visible ASCII, spaces, tabs and obs-text bytes.
    fn header_value() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![8 => 0x20u8..0x7f, 1 => Just(b'\t'), 1 => 0x80u8..=0xff],
            0..20,
        )
    }

    proptest! {
        /// Whatever the client sends, nothing hop-by-hop, nothing listed in Connection, and no
        /// client credential survives sanitising; everything else passes untouched.
        #[test]
        fn no_hop_by_hop_header_survives(
            headers in proptest::collection::vec((header_name(), header_value()), 0..16),
            listed in proptest::collection::vec(header_name(), 0..4),
            obs_text in proptest::option::of(0x80u8..=0xff),
        ) {
            let mut map = HeaderMap::new();
            for (name, value) in &headers {
                if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(value)) {
                    map.append(n, v);
                }
            }
            if !listed.is_empty() {
                let mut line = listed.join(", ").into_bytes();
                // A stray obs-text byte must not hide the tokens listed beside it.
                line.extend(obs_text.map(|b| [b',', b' ', b]).iter().flatten());
                map.append(header::CONNECTION, HeaderValue::from_bytes(&line).unwrap());
            }
            let before = map.clone();
            sanitize_request(&mut map);
            if let Err(violation) = crate::routing::invariant::check_sanitized_request(&before, &map) {
                prop_assert!(false, "{}", violation);
            }
        }
    }
}
