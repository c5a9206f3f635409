//! Issue 13, bounds on the client side: refused peers cannot hold connection slots, and HTTP/2
//! clients that never open their flow-control window cannot hold in-flight slots.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bitbucket_auth_proxy::error::REASON_HEADER;
use http::StatusCode;
use support::proxy::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const OPEN: &str = "/2.0/repositories/acme/gadgets";

/// A connection to `addr` from `source` (any 127.0.0.0/8 address is local on Linux).
async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Everything read until the peer closes, and how long that took; `None` if still open at
/// `deadline`.
async fn read_to_close(stream: &mut TcpStream, deadline: Duration) -> (String, Option<Duration>) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(
            deadline.saturating_sub(started.elapsed()),
            stream.read(&mut buf),
        )
        .await
        {
            Err(_) => return (String::from_utf8_lossy(&out).into(), None),
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (
                    String::from_utf8_lossy(&out).into(),
                    Some(started.elapsed()),
                );
            }
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

fn assert_client_not_allowed(text: &str) {
    let response = RawResponse::parse(text).unwrap_or_else(|| panic!("no response: {text:?}"));
    assert_eq!(response.status, 403, "{text:?}");
    assert_eq!(response.header(REASON_HEADER), Some("client-not-allowed"));
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_eq!(response.header("connection"), Some("close"));
    assert_error_json(response.body.as_bytes());
}

// ---------------------------------------------------------------------------
// allowed_clients at accept
// ---------------------------------------------------------------------------

/// Peers outside `allowed_clients` that connect and say nothing are answered 403 and closed at
/// once, and never take one of the `max_connections` slots: with more of them open than there
/// are slots, allowed clients are still served.
#[tokio::test]
async fn refused_peers_are_answered_at_accept_and_take_no_connection_slot() {
    let panics = PanicWatch::start();
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path())
        .server(
            "allowed_clients = [\"127.0.0.1/32\"]\nmax_connections = 2\nheader_read_timeout = \"20s\"",
        )
        .start()
        .await;
    let a = proxy.addr;
    // Three silent refused peers, each kept open by the client after the proxy's answer.
    let mut refused = Vec::new();
    for _ in 0..3 {
        let mut stream = connect_from("127.0.0.2", a).await;
        let (text, closed) = read_to_close(&mut stream, Duration::from_secs(3)).await;
        let closed = closed.expect("a refused peer was left open");
        assert!(closed < Duration::from_secs(1), "closed after {closed:?}");
        assert_client_not_allowed(&text);
        refused.push(stream);
    }
    // A refused peer that sends its request at once gets the same answer.
    let mut stream = connect_from("127.0.0.2", a).await;
    let request = format!("GET {OPEN}/x HTTP/1.1\r\nHost: {a}\r\n\r\n");
    let _ = stream.write_all(request.as_bytes()).await;
    let (text, closed) = read_to_close(&mut stream, Duration::from_secs(3)).await;
    assert!(closed.is_some());
    assert_client_not_allowed(&text);
    refused.push(stream);

    // Both slots are free for allowed clients.
    let mut allowed = Vec::new();
    for i in 0..2 {
        let mut stream = connect_from("127.0.0.1", a).await;
        let request = format!("GET {OPEN}/allowed/{i} HTTP/1.1\r\nHost: {a}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let head = tokio::time::timeout(Duration::from_secs(3), read_http_head(&mut stream))
            .await
            .unwrap()
            .unwrap();
        assert!(
            head.starts_with(b"HTTP/1.1 200 "),
            "{}",
            String::from_utf8_lossy(&head)
        );
        allowed.push(stream);
    }
    assert_eq!(mock.request_count(), 2, "a refused request went upstream");
    drop(refused);
    panics.assert_none();
}

// ---------------------------------------------------------------------------
// HTTP/2 flow control
// ---------------------------------------------------------------------------

/// A raw h2 connection that grants a stream window of `window` bytes and never sends a
/// WINDOW_UPDATE: it holds its responses without releasing any capacity.
async fn stalling_h2_client(
    addr: SocketAddr,
    window: u32,
) -> h2::client::SendRequest<bytes::Bytes> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake::<_, bytes::Bytes>(stream)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender
}

/// Opens a GET stream for `path` on `sender` and waits for its response head.
async fn open_stream(
    sender: &mut h2::client::SendRequest<bytes::Bytes>,
    addr: SocketAddr,
    path: &str,
) -> http::Response<h2::RecvStream> {
    let request = http::Request::get(format!("http://{addr}{path}"))
        .body(())
        .unwrap();
    let mut ready = sender.clone().ready().await.unwrap();
    let (response, _) = ready.send_request(request, true).unwrap();
    *sender = ready;
    tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("no response head")
        .unwrap()
}

/// A mock answering every request with 1 MiB of pattern bytes, far more than any window.
fn big_mock(pki: &TestPki) -> MockUpstream {
    MockUpstream::start(pki.server_config(), |_, _| async {
        let mut response = http::Response::new(pattern_body(1 << 20));
        response.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/octet-stream"),
        );
        response
    })
}

/// Retries an ordinary GET until it is served or `within` has passed; how long it took.
async fn served_within(addr: SocketAddr, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        let response = get(addr, &format!("{OPEN}/other")).await;
        let status = response.status();
        drain_body(response.into_body()).await;
        if status == StatusCode::OK {
            return Some(started.elapsed());
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// A client that reads response heads but never opens its flow-control window holds every
/// in-flight slot only until `server.send_timeout`: then its streams are reset and the slots
/// come back, as they would for an HTTP/1 client that stopped reading.
///
/// The bodies are larger than `cache.max_entry_bytes`, so each streams from the upstream. A
/// body the response cache already holds whole goes to hyper as one slice of the cached bytes
/// (nothing copied), and its slot comes back at once; whether a 1 MiB answer was whole before
/// its client's first read is a race with the upstream, which this test must not run.
#[tokio::test]
async fn h2_streams_that_make_no_progress_are_reset_at_the_send_timeout() {
    let panics = PanicWatch::start();
    let pki = TestPki::new();
    let mock = big_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path())
        .server("send_timeout = \"1s\"\nmax_in_flight = 4")
        .upstream("timeout = \"10s\"\nidle_timeout = \"1s\"")
        .routes(&format!(
            "{DEFAULT_ROUTES}\n[cache]\nmax_entry_bytes = 65536\n"
        ))
        .start()
        .await;
    let a = proxy.addr;
    let mut sender = stalling_h2_client(a, 16).await;
    let mut held = Vec::new();
    for i in 0..4 {
        let response = open_stream(&mut sender, a, &format!("{OPEN}/big/{i}")).await;
        assert_eq!(response.status(), StatusCode::OK);
        held.push(response);
    }
    let stalled_at = Instant::now();
    // Every slot is taken: another client is shed at once.
    let response = get(a, &format!("{OPEN}/shed")).await;
    assert_proxy_error(response, 503, "overloaded").await;

    let served = served_within(a, Duration::from_secs(6)).await;
    let after = stalled_at.elapsed();
    let served = served.unwrap_or_else(|| panic!("still shed {after:?} after the stall"));
    assert!(
        after >= Duration::from_millis(800),
        "served after only {served:?}: the stalled streams never held their slots"
    );
    // The stalled streams end in a reset, never in a complete-looking body.
    for response in held {
        let mut body = response.into_body();
        let ended = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                match body.data().await {
                    Some(Ok(_)) => continue,
                    Some(Err(error)) => return Err(error),
                    None => return Ok(()),
                }
            }
        })
        .await
        .expect("a stalled stream was never reset");
        assert!(ended.is_err(), "a stalled stream ended as if complete");
    }
    // All four slots are back.
    let others = futures_util::future::join_all(
        (0..4).map(|i| async move { get(a, &format!("{OPEN}/after/{i}")).await.status() }),
    )
    .await;
    assert!(others.iter().all(|s| *s == StatusCode::OK), "{others:?}");
    panics.assert_none();
}

/// `server.max_concurrent_streams` is announced in SETTINGS and enforced: one connection asking
/// for more streams gets only that many in flight, so it cannot take every slot.
#[tokio::test]
async fn one_h2_connection_cannot_take_every_in_flight_slot() {
    let panics = PanicWatch::start();
    let pki = TestPki::new();
    let mock = big_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path())
        .server("send_timeout = \"20s\"\nmax_in_flight = 4\nmax_concurrent_streams = 2")
        // One upstream connection per request: over one shared h2 upstream connection, the
        // stalled streams' unread data would hold its flow-control window, which is not what
        // this test is about.
        .upstream("timeout = \"10s\"\nhttp2 = false")
        .start()
        .await;
    let a = proxy.addr;
    let mut sender = stalling_h2_client(a, 16).await;
    let mut held = Vec::new();
    for i in 0..2 {
        held.push(open_stream(&mut sender, a, &format!("{OPEN}/big/{i}")).await);
    }
    let request = http::Request::get(format!("http://{a}{OPEN}/big/more"))
        .body(())
        .unwrap();
    let (response, _) = sender
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(request, true)
        .unwrap();
    let more = tokio::spawn(response);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !more.is_finished(),
        "a third stream was opened past the cap"
    );
    // The other two slots serve other clients.
    for i in 0..2 {
        let response = get(a, &format!("{OPEN}/other/{i}")).await;
        assert_eq!(response.status(), StatusCode::OK);
        drain_body(response.into_body()).await;
    }
    more.abort();
    drop(held);
    panics.assert_none();
}
