//! Smoke tests for the shared test support module.

mod support;

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode, Version};
use http_body_util::Full;
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::ServerName;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type HttpsClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    BoxBody,
>;

/// Client that only offers h2 via ALPN.
fn h2_client(pki: &TestPki) -> HttpsClient {
    let conn = HttpsConnectorBuilder::new()
        .with_tls_config(pki.client_config())
        .https_only()
        .enable_http2()
        .build();
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(conn)
}

/// Client that offers h2 and http/1.1 via ALPN.
fn any_client(pki: &TestPki) -> HttpsClient {
    let conn = HttpsConnectorBuilder::new()
        .with_tls_config(pki.client_config())
        .https_only()
        .enable_all_versions()
        .build();
    Client::builder(TokioExecutor::new()).build(conn)
}

/// Client without ALPN (HTTP/1.1 only).
fn h1_client(pki: &TestPki) -> HttpsClient {
    let conn = HttpsConnectorBuilder::new()
        .with_tls_config(pki.client_config())
        .https_only()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(conn)
}

fn echo_target(head: &RecordedRequestHead) -> Response<Full<bytes::Bytes>> {
    Response::new(Full::from(format!("{} {}", head.method, head.uri)))
}

#[tokio::test]
async fn tls_mock_serves_and_records_h2_and_http1() {
    let pki = TestPki::new();
    assert!(
        std::fs::read_to_string(pki.ca_path())
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    let mock = MockUpstream::start_simple(pki.server_config(), echo_target);
    assert!(mock.base_url().starts_with("https://127.0.0.1:"));

    let url = format!("{}/a%2Fb/c?x=1&y=%20", mock.base_url());
    let resp = h2_client(&pki)
        .request(Request::get(&url).body(empty_body()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(
        body_string(resp.into_body()).await,
        "GET /a%2Fb/c?x=1&y=%20"
    );

    let resp = h1_client(&pki)
        .request(
            Request::post(&url)
                .header("x-test", "one")
                .body(full_body("payload"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.version(), Version::HTTP_11);
    assert_eq!(
        body_string(resp.into_body()).await,
        "POST /a%2Fb/c?x=1&y=%20"
    );

    let reqs = mock.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(mock.request_count(), 2);
    assert_eq!(reqs[0].version, Version::HTTP_2);
    assert_eq!(reqs[0].uri, "/a%2Fb/c?x=1&y=%20");
    assert_eq!(
        reqs[0].authority.as_deref(),
        Some(&mock.base_url()["https://".len()..])
    );
    assert_eq!(reqs[1].version, Version::HTTP_11);
    assert_eq!(reqs[1].method, http::Method::POST);
    assert_eq!(reqs[1].uri, "/a%2Fb/c?x=1&y=%20");
    assert_eq!(reqs[1].header("x-test"), Some("one"));
    assert_eq!(reqs[1].header("content-length"), Some("7"));
    assert_eq!(mock.connection_count(), 2);
}

#[tokio::test]
async fn http1_only_alpn_is_respected_and_connections_pool() {
    let pki = TestPki::new();
    let mock = MockUpstream::start_simple(pki.server_config_with_alpn(ALPN_H1), echo_target);
    let client = any_client(&pki);
    for _ in 0..3 {
        let resp = client
            .request(
                Request::get(mock.base_url() + "/p")
                    .body(empty_body())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.version(), Version::HTTP_11);
        drain_body(resp.into_body()).await;
    }
    assert_eq!(mock.request_count(), 3);
    assert_eq!(mock.connection_count(), 1, "keep-alive connection reused");
}

#[tokio::test]
async fn bad_certificates_are_rejected() {
    let pki = TestPki::new();
    for (what, cfg) in [
        ("wrong name", pki.wrong_name_server_config()),
        ("untrusted", TestPki::untrusted_server_config()),
        ("expired", pki.expired_server_config()),
    ] {
        let mock = MockUpstream::start_simple(cfg, echo_target);
        let res = any_client(&pki)
            .request(Request::get(mock.base_url()).body(empty_body()).unwrap())
            .await;
        assert!(res.is_err(), "{what}: request unexpectedly succeeded");
        assert_eq!(mock.request_count(), 0, "{what}");
    }
    // The same CA with a custom name is trusted when the name matches.
    let mock = MockUpstream::start_simple(
        pki.server_config_for_names(&["localhost"], ALPN_H2_H1),
        echo_target,
    );
    let url = format!("https://localhost:{}/ok", mock.addr().port());
    let resp = any_client(&pki)
        .request(Request::get(url).body(empty_body()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[test]
fn pattern_is_deterministic_and_chunk_independent() {
    let whole = pattern_bytes(0, 200_000);
    assert_eq!(pattern_bytes(12_345, 100), whole[12_345..12_445]);
    assert_ne!(whole[..8], whole[8..16]);
    use sha2::Digest;
    for len in [0usize, 1, 7, 65_536, 65_537, 200_000] {
        let expected: [u8; 32] = sha2::Sha256::digest(&whole[..len]).into();
        assert_eq!(sha256_of_pattern(len as u64), expected, "len {len}");
    }
}

#[tokio::test]
async fn pattern_bodies_stream_intact_through_plain_mock() {
    const LEN: u64 = 2 * 1024 * 1024 + 3;
    // Upstream hashes the request body and answers with a pattern body.
    let mock = MockUpstream::start_plain(|_head, body| async move {
        let (hash, len) = sha256_and_len_of_body(body).await;
        let mut resp = Response::new(pattern_body(len));
        resp.headers_mut()
            .insert("x-sha256", hex(&hash).parse().unwrap());
        resp
    });
    assert!(mock.base_url().starts_with("http://127.0.0.1:"));

    for body in [pattern_body(LEN), pattern_body_unsized(LEN)] {
        let resp = send(mock.addr(), Request::put("/upload").body(body).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.headers()["x-sha256"], hex(&sha256_of_pattern(LEN)));
        assert_eq!(resp.headers()["content-length"], LEN.to_string());
        let (hash, len) = sha256_and_len_of_body(resp.into_body()).await;
        assert_eq!((hash, len), (sha256_of_pattern(LEN), LEN));
    }
    let reqs = mock.requests();
    assert_eq!(
        reqs[0].header("content-length"),
        Some(LEN.to_string().as_str())
    );
    assert_eq!(reqs[1].header("transfer-encoding"), Some("chunked"));
    assert_eq!(
        reqs[1].header("host"),
        Some(mock.addr().to_string().as_str())
    );

    let resp = get(mock.addr(), "/check").await;
    check_pattern_body(resp.into_body(), 0).await.unwrap();
    let resp = http1_client()
        .request(
            Request::post(mock.base_url() + "/x")
                .body(pattern_body(100_000))
                .unwrap(),
        )
        .await
        .unwrap();
    check_pattern_body(resp.into_body(), 100_000).await.unwrap();
    assert!(
        check_pattern_body(full_body(&b"nope"[..]), 4)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn raw_request_and_fault_helpers() {
    let mock = MockUpstream::start_plain_simple(|_| Response::new(Full::from("hi")));
    let out = raw_request(
        mock.addr(),
        b"GET /raw HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(out.ends_with("\r\n\r\nhi"), "{out}");
    assert_eq!(mock.last_request().unwrap().uri, "/raw");
    assert!(mock.wait_for_requests(1, Duration::from_secs(1)).await);

    // Dropping the mock stops it.
    let addr = mock.addr();
    drop(mock);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(TcpStream::connect(addr).await.is_err());

    assert!(TcpStream::connect(closed_port()).await.is_err());

    let hanging = HangingUpstream::start();
    let mut s = TcpStream::connect(hanging.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
    assert!(read.is_err(), "hanging upstream answered");
    assert_eq!(hanging.connection_count(), 1);

    let pki = TestPki::new();
    let tls_hang = TlsThenHang::start(pki.server_config());
    assert!(tls_hang.base_url().starts_with("https://"));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(pki.client_config()));
    let tcp = TcpStream::connect(tls_hang.addr()).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .expect("TLS handshake completes");
    tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let read = tokio::time::timeout(Duration::from_millis(200), tls.read(&mut buf)).await;
    assert!(read.is_err(), "TlsThenHang answered");

    // RawUpstream: canned bytes after reading the request head.
    let raw = RawUpstream::start(|mut s| async move {
        let head = read_http_head(&mut s).await.unwrap();
        assert!(head.starts_with(b"GET /canned"));
        let _ = s
            .write_all(b"HTTP/1.1 418 I'm a teapot\r\ncontent-length: 0\r\n\r\n")
            .await;
    });
    let resp = get(raw.addr(), "/canned").await;
    assert_eq!(resp.status(), StatusCode::IM_A_TEAPOT);
}
