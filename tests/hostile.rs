//! Hostile clients (issue 7): raw bytes over TCP at the in-process proxy. Every case ends in a
//! clean 4xx or a closed connection, nothing panics, the proxy keeps serving, and nothing the
//! client smuggled reaches the upstream.
//!
//! What hyper does with the ambiguous cases, and what the proxy therefore promises:
//!
//! - `Content-Length` with `Transfer-Encoding: chunked` (either order): hyper applies RFC 9112
//!   §6.3 — chunked wins, `Content-Length` is removed before the proxy sees the request, and the
//!   connection is closed after the response. The request is served (§6.1 allows that instead of
//!   a 400); bytes after the last chunk are never read as a request. Any other
//!   `Transfer-Encoding` (not ending in `chunked`, or on HTTP/1.0) is a 400.
//! - Bad chunk framing is found only when the body is read, after the head went upstream: the
//!   client gets a 400 `client-body` (or a close), and the upstream sees the stream reset — never
//!   a complete body.
//! - Bare LF line endings are accepted (RFC 9112 §2.2 lets a recipient do so); the request is
//!   re-framed with CRLF upstream, so no ambiguity crosses the proxy. A bare CR never ends a line:
//!   such a head never completes and is closed at `server.header_read_timeout`.
//! - HTTP/1.0 without `Host` is served: `Host` is optional in 1.0 and the proxy never uses it to
//!   pick an upstream (routes match on the path, `Host` is not forwarded).
//! - A refused `CONNECT` opens no tunnel: what follows it is read as ordinary requests.

mod support;

use std::time::Duration;

use bitbucket_auth_proxy::error::REASON_HEADER;
use support::proxy::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A route that allows every method, with no narrower route inside it.
const OPEN: &str = "/2.0/repositories/acme/gadgets";
/// Long enough for a loaded 2-core machine, short enough to keep each test under 5 s.
const WAIT: Duration = Duration::from_secs(3);

async fn start(pki: &TestPki, mock: &MockUpstream) -> TestProxy {
    Setup::new(&mock.base_url(), pki.ca_path()).start().await
}

/// A test's world: this thread's panics counted from the start, the PKI, an echoing mock
/// upstream and the proxy in front of it.
async fn echo_arena() -> (PanicWatch, TestPki, MockUpstream, TestProxy) {
    let panics = PanicWatch::start();
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let proxy = start(&pki, &mock).await;
    (panics, pki, mock, proxy)
}

/// How every case ends: the proxy still serves, and nothing panicked.
async fn assert_unharmed(proxy: &TestProxy, panics: PanicWatch) {
    assert_still_serving(proxy).await;
    panics.assert_none();
}

/// The only response is a 400 (hyper's own, or the proxy's), and the connection is closed.
fn assert_refused_and_closed(name: &str, exchange: &RawExchange) {
    let responses = exchange.responses();
    assert!(
        exchange.closed(),
        "{name}: connection left open: {:?}",
        exchange.text()
    );
    assert!(
        responses.len() <= 1 && responses.iter().all(|r| (400..500).contains(&r.status)),
        "{name}: {:?}",
        exchange.text()
    );
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_read_chunked_and_closed() {
    let panics = PanicWatch::start();
    let pki = TestPki::new();
    let (mock, bodies) = body_mock(&pki);
    let proxy = start(&pki, &mock).await;
    let a = proxy.addr;
    let smuggled = format!("GET {OPEN}/smuggled HTTP/1.1\r\nHost: {a}\r\n\r\n");
    for (name, framing) in [
        (
            "CL then TE",
            "Content-Length: 40\r\nTransfer-Encoding: chunked",
        ),
        (
            "TE then CL",
            "Transfer-Encoding: chunked\r\nContent-Length: 40",
        ),
        (
            "CL 0 then TE",
            "Content-Length: 0\r\nTransfer-Encoding: chunked",
        ),
    ] {
        let request = format!(
            "POST {OPEN}/upload HTTP/1.1\r\nHost: {a}\r\n{framing}\r\n\r\n3\r\nabc\r\n0\r\n\r\n{smuggled}"
        );
        let exchange = raw_exchange(a, request.as_bytes(), WAIT).await;
        let responses = exchange.responses();
        assert_eq!(responses.len(), 1, "{name}: {:?}", exchange.text());
        assert_eq!(responses[0].status, 200, "{name}: {:?}", exchange.text());
        assert_eq!(responses[0].header("connection"), Some("close"), "{name}");
        assert_eq!(exchange.ending, Ending::Closed, "{name}");
        let seen = mock.last_request().unwrap();
        assert_eq!(seen.uri, format!("{OPEN}/upload"), "{name}");
        assert_eq!(seen.header("content-length"), None, "{name}");
        assert_eq!(seen.header("transfer-encoding"), None, "{name}");
    }
    // Exactly the three chunked bodies, and never the request hidden after them.
    assert_eq!(bodies.complete(), vec![bytes::Bytes::from("abc"); 3]);
    assert!(mock.requests().iter().all(|r| !r.uri.contains("smuggled")));
    assert_unharmed(&proxy, panics).await;
}

#[tokio::test]
async fn other_transfer_encodings_and_conflicting_lengths_are_refused() {
    let (panics, _pki, mock, proxy) = echo_arena().await;
    let a = proxy.addr;
    let cases = [
        (
            "two Content-Lengths",
            "Content-Length: 3\r\nContent-Length: 5",
        ),
        ("Content-Length list", "Content-Length: 3, 5"),
        ("signed Content-Length", "Content-Length: +5"),
        ("negative Content-Length", "Content-Length: -1"),
        ("Content-Length with junk", "Content-Length: 5x"),
        (
            "overflowing Content-Length",
            "Content-Length: 99999999999999999999999",
        ),
        ("Transfer-Encoding gzip", "Transfer-Encoding: gzip"),
        ("chunked not last", "Transfer-Encoding: chunked, gzip"),
        (
            "chunked then another line",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
        ),
        ("xchunked", "Transfer-Encoding: xchunked"),
        ("vertical tab", "Transfer-Encoding:\x0bchunked"),
    ];
    for (name, framing) in cases {
        let request = format!(
            "POST {OPEN} HTTP/1.1\r\nHost: {a}\r\n{framing}\r\n\r\n5\r\nabcde\r\n0\r\n\r\n"
        );
        let exchange = raw_exchange(a, request.as_bytes(), WAIT).await;
        assert_refused_and_closed(name, &exchange);
        assert_eq!(exchange.responses().len(), 1, "{name}: no answer");
    }
    // Transfer-Encoding is HTTP/1.1 only.
    let request = format!(
        "POST {OPEN} HTTP/1.0\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    );
    let exchange = raw_exchange(a, request.as_bytes(), WAIT).await;
    assert_refused_and_closed("chunked on HTTP/1.0", &exchange);
    assert_eq!(mock.request_count(), 0);
    assert_eq!(mock.connection_count(), 0);
    assert_unharmed(&proxy, panics).await;
}

#[tokio::test]
async fn bad_chunk_framing_never_reaches_the_upstream_as_a_complete_body() {
    let panics = PanicWatch::start();
    let pki = TestPki::new();
    let (mock, bodies) = body_mock(&pki);
    let proxy = start(&pki, &mock).await;
    let a = proxy.addr;
    let cases = [
        ("non-hex size", "zz\r\nabc\r\n0\r\n\r\n"),
        ("negative size", "-3\r\nabc\r\n0\r\n\r\n"),
        ("overflowing size", "fffffffffffffffff\r\nabc\r\n0\r\n\r\n"),
        ("size with space inside", "1 0\r\nabc\r\n0\r\n\r\n"),
        ("data longer than size", "2\r\nabc\r\n0\r\n\r\n"),
        ("data shorter than size", "5\r\nabc\r\n0\r\n\r\n"),
        ("no CRLF after data", "3\r\nabcXY0\r\n\r\n"),
        ("good chunk then garbage", "3\r\nabc\r\nqq\r\n"),
    ];
    for (name, body) in cases {
        let request = format!(
            "POST {OPEN}/upload HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
        );
        let exchange = raw_exchange(a, request.as_bytes(), WAIT).await;
        assert_refused_and_closed(name, &exchange);
        if let Some(response) = exchange.responses().first() {
            assert_eq!(response.status, 400, "{name}: {:?}", exchange.text());
            if let Some(reason) = response.header(REASON_HEADER) {
                assert_eq!(reason, "client-body", "{name}: {:?}", exchange.text());
                assert_error_json(response.body.as_bytes());
            }
        }
    }
    // The head may have been forwarded before the framing error was found, but no body ever
    // arrived whole: each one the upstream saw broke off.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(bodies.complete().is_empty(), "{:?}", bodies.complete());
    assert_eq!(bodies.aborted(), mock.request_count());

    // Decision: chunk extensions are skipped up to their CRLF, whatever they hold (hyper is
    // lenient there), and never forwarded: the body is re-framed upstream.
    let request = format!(
        "POST {OPEN}/ext HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3;\x01x=\"\r\nabc\r\n0\r\n\r\n"
    );
    let response = raw(a, &request).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(bodies.complete(), [bytes::Bytes::from("abc")]);
    assert_unharmed(&proxy, panics).await;
}

#[tokio::test]
async fn malformed_header_lines_are_refused() {
    let (panics, _pki, mock, proxy) = echo_arena().await;
    let a = proxy.addr;
    let cases = [
        ("obs-fold with space", "X-Foo: a\r\n b"),
        ("obs-fold with tab", "X-Foo: a\r\n\tb"),
        ("obs-fold continuing Host", "Host2: x\r\n evil.example"),
        ("space inside a name", "X Foo: a"),
        ("space before the colon", "X-Foo : a"),
        ("tab before the colon", "X-Foo\t: a"),
        ("no colon", "X-Foo"),
        ("empty name", ": a"),
        ("CR inside a value", "X-Foo: a\rb"),
        ("NUL inside a value", "X-Foo: a\0b"),
        ("non-token name", "X-F(o)o: a"),
        ("UTF-8 name", "X-Fö: a"),
    ];
    for (name, line) in cases {
        let request =
            format!("GET {OPEN} HTTP/1.1\r\nHost: {a}\r\n{line}\r\nConnection: close\r\n\r\n");
        let exchange = raw_exchange(a, request.as_bytes(), WAIT).await;
        assert_refused_and_closed(name, &exchange);
        assert_eq!(exchange.responses().len(), 1, "{name}: no answer");
    }
    // Whitespace before the first header line is obs-fold too (a folded request line).
    let request = format!("GET {OPEN} HTTP/1.1\r\n Host: {a}\r\nConnection: close\r\n\r\n");
    assert_refused_and_closed(
        "leading whitespace",
        &raw_exchange(a, request.as_bytes(), WAIT).await,
    );
    assert_eq!(mock.request_count(), 0);
    assert_eq!(mock.connection_count(), 0);
    assert_unharmed(&proxy, panics).await;
}

/// Decision: bare LF is accepted and re-framed; bare CR never ends a line, so the head is left
/// incomplete and closed at the head timeout.
#[tokio::test]
async fn bare_lf_is_accepted_and_bare_cr_never_completes_a_head() {
    let panics = PanicWatch::start();
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path())
        .server("header_read_timeout = \"500ms\"")
        .start()
        .await;
    let a = proxy.addr;
    let request = format!("GET {OPEN}/lf HTTP/1.1\nHost: {a}\nConnection: close\n\n");
    let exchange = raw_exchange(a, request.as_bytes(), WAIT).await;
    let responses = exchange.responses();
    assert_eq!(responses.len(), 1, "{:?}", exchange.text());
    assert_eq!(responses[0].status, 200);
    assert_eq!(responses[0].body, format!("GET {OPEN}/lf"));
    assert_eq!(exchange.ending, Ending::Closed);
    assert_eq!(mock.request_count(), 1);

    for (name, request) in [
        (
            "bare CR everywhere",
            format!("GET {OPEN}/cr HTTP/1.1\rHost: {a}\rConnection: close\r\r"),
        ),
        (
            "bare CR ending the head",
            format!("GET {OPEN}/cr HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\r"),
        ),
    ] {
        let exchange = raw_exchange(a, request.as_bytes(), WAIT).await;
        assert_refused_and_closed(name, &exchange);
    }
    assert_eq!(mock.request_count(), 1, "a bare-CR request went upstream");
    assert_unharmed(&proxy, panics).await;
}

#[tokio::test]
async fn a_megabyte_of_headers_gets_431_and_a_64_kib_uri_is_refused() {
    let (panics, _pki, mock, proxy) = echo_arena().await;
    let a = proxy.addr;

    let many: String = (0..17 * 1024)
        .map(|i| format!("X-Filler-{i:05}: {}\r\n", "v".repeat(44)))
        .collect();
    let one_huge = format!("X-Huge: {}\r\n", "v".repeat(1024 * 1024));
    for (name, headers) in [("16 Ki headers", &many), ("one 1 MiB header", &one_huge)] {
        assert!(headers.len() >= 1024 * 1024);
        let request = format!("GET {OPEN} HTTP/1.1\r\nHost: {a}\r\n{headers}\r\n");
        let exchange = raw_exchange(a, request.as_bytes(), WAIT).await;
        let responses = exchange.responses();
        assert!(exchange.closed(), "{name}: left open");
        assert_eq!(responses.len(), 1, "{name}: {:?}", exchange.text());
        assert_eq!(responses[0].status, 431, "{name}");
    }

    let uri = format!("{OPEN}/{}", "a".repeat(64 * 1024));
    let request = format!("GET {uri} HTTP/1.1\r\nHost: {a}\r\n\r\n");
    let exchange = raw_exchange(a, request.as_bytes(), WAIT).await;
    let responses = exchange.responses();
    assert!(exchange.closed(), "64 KiB URI: left open");
    assert_eq!(responses.len(), 1, "{:?}", &exchange.text());
    // 414 from the URI limit, or 431 from the head limit that a 64 KiB request line reaches.
    assert!(
        matches!(responses[0].status, 414 | 431),
        "{:?}",
        responses[0]
    );
    assert_eq!(mock.request_count(), 0);
    assert_eq!(mock.connection_count(), 0);
    assert_unharmed(&proxy, panics).await;
}

#[tokio::test]
async fn invalid_utf8_and_control_characters_in_the_path_are_refused() {
    // Raw NUL, DEL and \x01 are in tests/proxy.rs (ATTACKS); these are the others.
    let (panics, _pki, mock, proxy) = echo_arena().await;
    let a = proxy.addr;
    let cases: [(&str, &[u8]); 9] = [
        ("invalid UTF-8", b"/\xff\xfe"),
        ("overlong slash", b"/\xc0\xafetc"),
        ("lone continuation byte", b"/x\x80y"),
        ("truncated UTF-8 sequence", b"/caf\xc3"),
        ("tab", b"/a\tb"),
        ("vertical tab", b"/a\x0bb"),
        ("escape", b"/a\x1bb"),
        ("bare CR", b"/a\rb"),
        ("space", b"/a b"),
    ];
    for (name, tail) in cases {
        let request = [
            b"GET ",
            OPEN.as_bytes(),
            tail,
            format!(" HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n\r\n").as_bytes(),
        ]
        .concat();
        let exchange = raw_exchange(a, &request, WAIT).await;
        assert_refused_and_closed(name, &exchange);
    }
    assert_eq!(mock.connection_count(), 0);
    // Decision: valid UTF-8 sent unencoded passes byte-for-byte, like the rest of the path: its
    // bytes are all >= 0x80, so it can hide no '/', '.', '%' or backslash.
    let request =
        format!("GET {OPEN}/caf\u{e9} HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n\r\n");
    let response = raw(a, &request).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(
        mock.last_request().unwrap().uri,
        format!("{OPEN}/caf\u{e9}")
    );
    // Encoded, control bytes reach the path check, which refuses them.
    for (name, tail) in [("encoded tab", "/a%09b"), ("encoded escape", "/a%1bb")] {
        let request =
            format!("GET {OPEN}{tail} HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n\r\n");
        let response = raw(a, &request).await;
        assert_eq!(response.status, 400, "{name}: {response:?}");
        assert_eq!(response.header(REASON_HEADER), Some("bad-path"), "{name}");
    }
    assert_eq!(
        mock.request_count(),
        1,
        "only the valid UTF-8 path went upstream"
    );
    assert_unharmed(&proxy, panics).await;
}

/// Absolute-form for other hosts, authority-form with GET and CONNECT to other hosts are in
/// tests/proxy.rs; these are the forms it does not try.
#[tokio::test]
async fn other_request_target_forms_are_refused() {
    let (panics, _pki, mock, proxy) = echo_arena().await;
    let a = proxy.addr;
    let cases = [
        ("asterisk-form", "OPTIONS * HTTP/1.1".to_owned(), "bad-path"),
        (
            "absolute-form with userinfo naming the proxy",
            format!("GET http://{a}@evil.example{OPEN} HTTP/1.1"),
            "bad-target",
        ),
        (
            "authority-form naming the proxy",
            format!("GET {a} HTTP/1.1"),
            "bad-target",
        ),
        (
            "absolute-form naming the proxy, with a dot-segment",
            format!("GET http://{a}{OPEN}/../../user HTTP/1.1"),
            "bad-path",
        ),
        (
            "CONNECT to the proxy itself",
            format!("CONNECT {a} HTTP/1.1"),
            "method-not-allowed",
        ),
    ];
    for (name, line, reason) in cases {
        let request = format!("{line}\r\nHost: {a}\r\nConnection: close\r\n\r\n");
        let response = raw(a, &request).await;
        assert!(
            (400..500).contains(&response.status),
            "{name}: {response:?}"
        );
        assert_eq!(response.header(REASON_HEADER), Some(reason), "{name}");
        assert_error_json(response.body.as_bytes());
    }
    // A scheme that is not http(s), and HTTP versions the proxy does not speak over h1.
    for (name, line) in [
        ("HTTP/2.0 request line", format!("GET {OPEN} HTTP/2.0")),
        ("HTTP/1.2", format!("GET {OPEN} HTTP/1.2")),
        ("HTTP/0.9", format!("GET {OPEN}")),
        ("lower-case version", format!("GET {OPEN} http/1.1")),
    ] {
        let request = format!("{line}\r\nHost: {a}\r\nConnection: close\r\n\r\n");
        assert_refused_and_closed(name, &raw_exchange(a, request.as_bytes(), WAIT).await);
    }
    assert_eq!(mock.request_count(), 0);
    assert_eq!(mock.connection_count(), 0);
    assert_unharmed(&proxy, panics).await;
}

/// A refused CONNECT opens no tunnel: the bytes a client meant for the tunnel (here a TLS
/// ClientHello's first bytes) are read as HTTP and refused, and reach nobody.
#[tokio::test]
async fn connect_opens_no_tunnel() {
    let (panics, _pki, mock, proxy) = echo_arena().await;
    let a = proxy.addr;
    let m = mock.addr();
    let mut request = format!("CONNECT {m} HTTP/1.1\r\nHost: {m}\r\n\r\n").into_bytes();
    request.extend_from_slice(&[0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03]);
    request.extend_from_slice(b"\r\n\r\n");
    let exchange = raw_exchange(a, &request, WAIT).await;
    let responses = exchange.responses();
    assert!(exchange.closed(), "{:?}", exchange.text());
    assert_eq!(responses[0].status, 405, "{:?}", exchange.text());
    assert!(
        responses[1..].iter().all(|r| r.status == 400),
        "{:?}",
        exchange.text()
    );
    assert!(
        !exchange.text().contains("HTTP/1.1 200"),
        "{:?}",
        exchange.text()
    );
    assert_eq!(
        mock.connection_count(),
        0,
        "the proxy connected for a tunnel"
    );
    assert_unharmed(&proxy, panics).await;
}

/// Host decides where a request goes for every hop after us: an HTTP/1.1 request with two, or
/// none, is refused (RFC 9112, section 3.2) and never reaches the upstream.
#[tokio::test]
async fn http11_needs_exactly_one_host_header() {
    let (panics, _pki, mock, proxy) = echo_arena().await;
    let a = proxy.addr;
    let cases = [
        (
            "two Host headers",
            format!(
                "GET {OPEN} HTTP/1.1\r\nHost: {a}\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
            ),
        ),
        (
            "no Host header",
            format!("GET {OPEN} HTTP/1.1\r\nConnection: close\r\n\r\n"),
        ),
    ];
    for (name, request) in cases {
        let exchange = raw_exchange(a, request.as_bytes(), WAIT).await;
        let text = exchange.text();
        assert!(text.starts_with("HTTP/1.1 400 "), "{name}: {text:?}");
        assert!(
            text.contains("x-bitbucket-auth-proxy: bad-target"),
            "{name}: {text:?}"
        );
        assert!(text.contains("Host header"), "{name}: {text:?}");
    }
    assert_eq!(mock.request_count(), 0);
    assert_unharmed(&proxy, panics).await;
}

/// Decision: HTTP/1.0 without `Host` is served (routing uses only the path; `Host` is never
/// forwarded), answered in HTTP/1.0 and closed.
#[tokio::test]
async fn http10_without_host_is_served_and_closed() {
    let (panics, _pki, mock, proxy) = echo_arena().await;
    let request = format!("GET {OPEN}/old HTTP/1.0\r\n\r\n");
    let exchange = raw_exchange(proxy.addr, request.as_bytes(), WAIT).await;
    assert!(
        exchange.text().starts_with("HTTP/1.0 200 "),
        "{:?}",
        exchange.text()
    );
    assert_eq!(exchange.ending, Ending::Closed);
    assert_eq!(exchange.responses()[0].body, format!("GET {OPEN}/old"));
    let seen = mock.last_request().unwrap();
    assert_eq!(
        seen.header("authorization"),
        Some(bearer(WORKSPACE_TOKEN).as_str())
    );
    assert_eq!(mock.request_count(), 1);
    panics.assert_none();
}

/// Pipelined requests after a refused one: answered in order, each on its own merits, or not at
/// all once the connection is closed; never one request's bytes read as another's.
#[tokio::test]
async fn pipelined_requests_after_a_refusal_are_answered_in_order_or_not_at_all() {
    let (panics, _pki, mock, proxy) = echo_arena().await;
    let a = proxy.addr;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: {a}\r\n\r\n");
    let last =
        |path: &str| format!("GET {path} HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n\r\n");

    // Refused by the proxy (bad path, no route, CONNECT, method): the next ones are served.
    let smuggled = get(&format!("{OPEN}/smuggled"));
    let chunked_405 = format!(
        "POST /2.0/repositories/acme/widgets HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{smuggled}\r\n0\r\n\r\n",
        smuggled.len()
    );
    let cases: [(&str, String, &[u16]); 4] = [
        (
            "bad path first",
            get(&format!("{OPEN}/../../user")) + &last(&format!("{OPEN}/second")),
            &[400, 200],
        ),
        (
            "no route between two good ones",
            get(&format!("{OPEN}/first")) + &get("/2.0/user") + &last(&format!("{OPEN}/third")),
            &[200, 404, 200],
        ),
        (
            "CONNECT first",
            format!("CONNECT {a} HTTP/1.1\r\nHost: {a}\r\n\r\n") + &last(&format!("{OPEN}/second")),
            &[405, 200],
        ),
        (
            "405 with a chunked body holding a request",
            chunked_405 + &last(&format!("{OPEN}/second")),
            &[405, 200],
        ),
    ];
    for (name, request, statuses) in cases {
        let before = mock.request_count();
        let exchange = raw_exchange(a, request.as_bytes(), WAIT).await;
        let responses = exchange.responses();
        let got: Vec<u16> = responses.iter().map(|r| r.status).collect();
        // A server may close instead of answering what follows a refusal, but never reorder.
        assert!(
            !got.is_empty() && statuses.starts_with(&got),
            "{name}: got {got:?}, expected (a prefix of) {statuses:?}: {:?}",
            exchange.text()
        );
        assert!(exchange.closed(), "{name}");
        let forwarded: Vec<String> = mock.requests()[before..]
            .iter()
            .map(|r| r.uri.clone())
            .collect();
        for (response, path) in responses.iter().filter(|r| r.status == 200).zip(&forwarded) {
            assert_eq!(response.body, format!("GET {path}"), "{name}: out of order");
        }
        assert!(
            forwarded
                .iter()
                .all(|p| p.ends_with("/first") || p.ends_with("/second") || p.ends_with("/third")),
            "{name}: forwarded {forwarded:?}"
        );
    }

    // Refused by hyper's parser: the connection closes and nothing after it is read.
    let before = mock.request_count();
    let request = format!("GET {OPEN} HTTP/1.1\r\nHost: {a}\r\nX-Foo: a\r\n b\r\n\r\n")
        + &last(&format!("{OPEN}/after-a-parse-error"));
    let exchange = raw_exchange(a, request.as_bytes(), WAIT).await;
    assert_refused_and_closed("parse error first", &exchange);
    assert_eq!(exchange.responses().len(), 1);
    assert_eq!(mock.request_count(), before);
    panics.assert_none();
}

#[tokio::test]
async fn upgrade_requests_are_not_upgraded_and_upgrade_is_not_forwarded() {
    let (panics, _pki, mock, proxy) = echo_arena().await;
    let a = proxy.addr;
    let cases = [
        (
            "websocket",
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13",
        ),
        (
            "h2c",
            "Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
        ),
    ];
    for (name, headers) in cases {
        // A second request on the same connection proves it is still plain HTTP/1.1.
        let request = format!(
            "GET {OPEN}/{name} HTTP/1.1\r\nHost: {a}\r\n{headers}\r\n\r\nGET {OPEN}/after HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n\r\n"
        );
        let exchange = raw_exchange(a, request.as_bytes(), WAIT).await;
        let responses = exchange.responses();
        let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
        assert_eq!(statuses, [200, 200], "{name}: {:?}", exchange.text());
        assert!(
            responses.iter().all(|r| r.header("upgrade").is_none()),
            "{name}"
        );
        assert_eq!(responses[1].body, format!("GET {OPEN}/after"), "{name}");
        let seen = &mock.requests()[mock.request_count() - 2];
        assert_eq!(seen.uri, format!("{OPEN}/{name}"));
        for header in ["upgrade", "connection", "http2-settings"] {
            assert_eq!(seen.header(header), None, "{name}: {header} went upstream");
        }
    }
    panics.assert_none();
}

/// h2 with prior knowledge, then frames no h2 server can accept: a GOAWAY or a close, promptly.
#[tokio::test]
async fn h2c_prior_knowledge_with_bad_frames_closes_the_connection() {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    /// An h2 frame: 24-bit length, type, flags, stream id.
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = len.to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }
    let settings = frame(4, 0, 0, &[]);
    let (panics, _pki, mock, proxy) = echo_arena().await;
    let cases: [(&str, Vec<u8>); 8] = [
        ("garbage after the preface", vec![0xff; 64]),
        ("SETTINGS of a bad length", frame(4, 0, 0, &[0, 1, 0])),
        ("SETTINGS on a stream", frame(4, 0, 1, &[])),
        (
            "frame longer than SETTINGS_MAX_FRAME_SIZE",
            [settings.clone(), frame(0, 0, 1, &vec![0; 20_000])].concat(),
        ),
        (
            "HEADERS with broken HPACK",
            [settings.clone(), frame(1, 0x5, 1, &[0xff; 16])].concat(),
        ),
        (
            "HEADERS on stream 0",
            [settings.clone(), frame(1, 0x5, 0, &[0x82])].concat(),
        ),
        (
            "WINDOW_UPDATE of 0",
            [settings.clone(), frame(8, 0, 0, &[0, 0, 0, 0])].concat(),
        ),
        (
            "DATA on an idle stream",
            [settings.clone(), frame(0, 1, 3, b"x")].concat(),
        ),
    ];
    for (name, frames) in cases {
        let bytes = [PREFACE, &frames].concat();
        let exchange = raw_exchange(proxy.addr, &bytes, WAIT).await;
        assert!(
            exchange.closed(),
            "{name}: connection left open after {:?}",
            exchange.elapsed
        );
        // The server's answer is SETTINGS and a GOAWAY (type 7), never an HTTP/1 response.
        assert!(
            !exchange.bytes.starts_with(b"HTTP/"),
            "{name}: {:?}",
            exchange.text()
        );
    }
    // A truncated preface is not h2 at all: hyper answers it as HTTP/1 and closes.
    let exchange = raw_exchange(proxy.addr, b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", WAIT).await;
    assert_refused_and_closed("bad preface", &exchange);
    assert_eq!(mock.request_count(), 0);
    assert_eq!(mock.connection_count(), 0);
    assert_unharmed(&proxy, panics).await;
}

/// The slowest byte of a hostile client, one at a time, still ends in a refusal and a close:
/// parsing state carried across reads is no way around the checks.
#[tokio::test]
async fn a_conflicting_head_sent_byte_by_byte_is_still_refused() {
    let (panics, _pki, mock, proxy) = echo_arena().await;
    let request = format!(
        "POST {OPEN} HTTP/1.1\r\nHost: {}\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        proxy.addr
    );
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    for byte in request.as_bytes() {
        if stream.write_all(&[*byte]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 400 "), "{text:?}");
    assert_eq!(mock.request_count(), 0);
    panics.assert_none();
}
