//! Idle HTTP/1.1 keep-alive connections are parked after a second without a request (issue 18,
//! src/idle.rs): hyper's connection ends, the socket stays open, and the next request on it is
//! served by a new one. These tests hold the promises around that: the client sees one
//! ordinary keep-alive connection, a request arriving in pieces across the park is whole, an
//! h2 connection is untouched, a parked connection still closes at `header_read_timeout`, and
//! shutdown closes parked connections without waiting for them.

mod support;

use std::time::Duration;

use bitbucket_auth_proxy::ShutdownOutcome;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::proxy::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longer than `idle::PARK_AFTER` and the turn after it: the connection is parked by then.
const PARKED: Duration = Duration::from_millis(1600);
const REQUEST: &[u8] = b"GET /2.0/repositories/acme/widgets HTTP/1.1\r\nHost: proxy\r\n\r\n";

/// Reads `n` responses with `content-length` bodies, and nothing more; returns their heads.
async fn read_responses(stream: &mut TcpStream, n: usize) -> Vec<String> {
    let mut data = Vec::new();
    let mut heads = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        while let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_string();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let l = l.to_ascii_lowercase();
                    l.strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("content-length");
            if data.len() < end + 4 + length {
                break;
            }
            data.drain(..end + 4 + length);
            heads.push(head);
        }
        if heads.len() == n {
            assert!(data.is_empty(), "bytes beyond {n} responses: {data:?}");
            return heads;
        }
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("response in time")
            .expect("read");
        assert!(
            read > 0,
            "connection closed after {heads:?}; got {:?}",
            String::from_utf8_lossy(&data)
        );
        data.extend_from_slice(&buf[..read]);
    }
}

async fn ok(stream: &mut TcpStream) {
    let head = read_responses(stream, 1).await.remove(0);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

async fn start(pki: &TestPki, mock: &MockUpstream, server: &str) -> TestProxy {
    Setup::new(&mock.base_url(), pki.ca_path())
        .server(server)
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_keep_alive_connection_serves_its_next_requests() {
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let proxy = start(&pki, &mock, "").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(REQUEST).await.unwrap();
    ok(&mut stream).await;
    tokio::time::sleep(PARKED).await;
    // The next request arrives in pieces: the byte that wakes the socket, then the rest.
    stream.write_all(&REQUEST[..1]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream.write_all(&REQUEST[1..20]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream.write_all(&REQUEST[20..]).await.unwrap();
    ok(&mut stream).await;
    // Parked again, then two pipelined requests: both answered, in order.
    tokio::time::sleep(PARKED).await;
    stream
        .write_all(&[REQUEST, REQUEST].concat())
        .await
        .unwrap();
    let heads = read_responses(&mut stream, 2).await;
    assert!(
        heads.iter().all(|h| h.starts_with("HTTP/1.1 200")),
        "{heads:?}"
    );
    assert_eq!(mock.request_count(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_idle_before_its_first_request_is_parked_and_served() {
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let proxy = start(&pki, &mock, "").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    tokio::time::sleep(PARKED).await;
    stream.write_all(REQUEST).await.unwrap();
    ok(&mut stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_head_is_not_parked_away() {
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let proxy = start(&pki, &mock, "").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(REQUEST).await.unwrap();
    ok(&mut stream).await;
    stream.write_all(&REQUEST[..30]).await.unwrap();
    tokio::time::sleep(PARKED).await;
    stream.write_all(&REQUEST[30..]).await.unwrap();
    ok(&mut stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2_connection_keeps_serving() {
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let proxy = start(&pki, &mock, "").await;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let uri = format!("http://{}/2.0/repositories/acme/widgets", proxy.addr);
    for _ in 0..2 {
        let response = client.get(uri.parse().unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        drain_body(response.into_body()).await;
        tokio::time::sleep(PARKED).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_still_closes_at_header_read_timeout_and_at_shutdown() {
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let proxy = start(&pki, &mock, "header_read_timeout = \"2500ms\"").await;
    let mut timed_out = TcpStream::connect(proxy.addr).await.unwrap();
    timed_out.write_all(REQUEST).await.unwrap();
    ok(&mut timed_out).await;
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), timed_out.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");

    let mut held = TcpStream::connect(proxy.addr).await.unwrap();
    held.write_all(REQUEST).await.unwrap();
    ok(&mut held).await;
    tokio::time::sleep(PARKED).await;
    let started = tokio::time::Instant::now();
    assert_eq!(proxy.shutdown().await, ShutdownOutcome::Drained);
    assert!(started.elapsed() < Duration::from_secs(2));
    let closed = tokio::time::timeout(Duration::from_secs(2), held.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
}
