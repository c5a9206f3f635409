//! Slow and greedy clients (issue 7): each is bounded by a timeout or a cap, and costs bounded
//! memory. Timeouts are short here so the suite stays fast; the bounds asserted are generous
//! for a loaded 2-core machine.

mod support;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bitbucket_auth_proxy::error::REASON_HEADER;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use support::proxy::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

const OPEN: &str = "/2.0/repositories/acme/gadgets";

/// Reads until the peer closes (EOF or reset) or `deadline`; the bytes and when it closed.
async fn read_until_closed(
    stream: &mut (impl AsyncReadExt + Unpin),
    deadline: Duration,
) -> (Vec<u8>, Option<Duration>) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout_at(
            tokio::time::Instant::from_std(started + deadline),
            stream.read(&mut buf),
        )
        .await
        {
            Err(_) => return (out, None),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, Some(started.elapsed())),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

// ---------------------------------------------------------------------------
// Slowloris
// ---------------------------------------------------------------------------

/// Headers dribbled a byte at a time, each byte well inside any per-read timeout: the head as a
/// whole must arrive within `server.header_read_timeout`, or the connection is closed.
#[tokio::test]
async fn slowloris_headers_are_cut_at_the_head_timeout() {
    let panics = PanicWatch::start();
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path())
        .server("header_read_timeout = \"500ms\"\nmax_connections = 4")
        .start()
        .await;
    let a = proxy.addr;
    // As many dribblers as the proxy has connection slots.
    let mut dribblers = Vec::new();
    for i in 0..4 {
        dribblers.push(tokio::spawn(async move {
            let stream = TcpStream::connect(a).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (mut reader, mut writer) = stream.into_split();
            let writing = tokio::spawn(async move {
                let head = format!("GET {OPEN}/{i} HTTP/1.1\r\nHost: {a}\r\n");
                if writer.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for byte in b"X-Slow: ".iter().cycle() {
                    if writer.write_all(&[*byte]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
            let (bytes, closed) = read_until_closed(&mut reader, Duration::from_secs(4)).await;
            writing.abort();
            (bytes, closed)
        }));
    }
    for dribbler in dribblers {
        let (bytes, closed) = dribbler.await.unwrap();
        let closed = closed.expect("a slowloris connection was never closed");
        assert!(
            closed >= Duration::from_millis(400) && closed < Duration::from_millis(2500),
            "closed after {closed:?}"
        );
        // hyper closes without a response, or with a 408; never anything else.
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408 "),
            "{text:?}"
        );
    }
    assert_eq!(mock.request_count(), 0);
    // Every slot is free again.
    assert_still_serving(&proxy).await;
    panics.assert_none();
}

/// Connections that never begin a request hold a connection slot only for
/// `server.header_read_timeout`: silent, half an h2 preface, an h2 connection with no stream,
/// an HTTP/1 keep-alive connection after its response.
#[tokio::test]
async fn connections_without_a_request_are_closed_at_the_head_timeout() {
    let panics = PanicWatch::start();
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path())
        .server("header_read_timeout = \"500ms\"")
        .start()
        .await;
    let a = proxy.addr;
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let settings = [0u8, 0, 0, 4, 0, 0, 0, 0, 0];
    let keep_alive = format!("GET {OPEN}/once HTTP/1.1\r\nHost: {a}\r\n\r\n").into_bytes();
    let cases: [(&str, Vec<u8>); 5] = [
        ("silent", Vec::new()),
        ("first byte of an h2 preface", b"P".to_vec()),
        ("h2 preface, no stream", preface.clone()),
        (
            "h2 preface and SETTINGS, no stream",
            [&preface[..], &settings].concat(),
        ),
        ("HTTP/1.1 keep-alive after a response", keep_alive),
    ];
    let exchanges = futures_util::future::join_all(
        cases
            .iter()
            .map(|(_, bytes)| raw_exchange(a, bytes, Duration::from_secs(4))),
    )
    .await;
    for ((name, _), exchange) in cases.iter().zip(exchanges) {
        assert!(exchange.closed(), "{name}: still open after 4 s");
        assert!(
            exchange.elapsed >= Duration::from_millis(400)
                && exchange.elapsed < Duration::from_millis(2500),
            "{name}: closed after {:?}",
            exchange.elapsed
        );
    }
    assert_eq!(mock.request_count(), 1);
    panics.assert_none();
}

// ---------------------------------------------------------------------------
// Slow uploads
// ---------------------------------------------------------------------------

/// An upload that stops moving for longer than `upstream.idle_timeout` fails cleanly: the client
/// gets a 400 `client-body` (or a close), and the upstream sees the body broken off, never a
/// complete one.
#[tokio::test]
async fn stalled_upload_is_aborted_upstream_after_the_idle_timeout() {
    let panics = PanicWatch::start();
    let pki = TestPki::new();
    let (mock, bodies) = body_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path())
        .upstream("idle_timeout = \"300ms\"")
        .start()
        .await;
    let a = proxy.addr;
    for (name, framing, start) in [
        ("Content-Length", "Content-Length: 100000", "x".repeat(1000)),
        (
            "chunked",
            "Transfer-Encoding: chunked",
            format!("3e8\r\n{}\r\n", "x".repeat(1000)),
        ),
    ] {
        let mut stream = TcpStream::connect(a).await.unwrap();
        let head = format!("PUT {OPEN}/src/big.bin HTTP/1.1\r\nHost: {a}\r\n{framing}\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(start.as_bytes()).await.unwrap();
        let started = Instant::now();
        // ...and then nothing more, with the connection left open.
        let (bytes, closed) = read_until_closed(&mut stream, Duration::from_secs(4)).await;
        let text = String::from_utf8_lossy(&bytes);
        let elapsed = started.elapsed();
        assert!(closed.is_some(), "{name}: the stalled upload was never cut");
        assert!(
            elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(3),
            "{name}: cut after {elapsed:?}"
        );
        let response = RawResponse::parse(&text).unwrap_or_else(|| panic!("{name}: {text:?}"));
        assert_eq!(response.status, 400, "{name}: {text:?}");
        assert_eq!(
            response.header(REASON_HEADER),
            Some("client-body"),
            "{name}"
        );
        assert_error_json(response.body.as_bytes());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(bodies.complete().is_empty(), "{:?}", bodies.complete());
    assert_eq!(
        bodies.aborted(),
        2,
        "the upstream did not see both bodies break off"
    );
    panics.assert_none();
}

/// The bound is on silence, not on total time: an upload that keeps moving, however slowly,
/// arrives whole.
#[tokio::test]
async fn slow_but_moving_upload_arrives_whole() {
    let panics = PanicWatch::start();
    let pki = TestPki::new();
    let (mock, bodies) = body_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path())
        .upstream("idle_timeout = \"600ms\"")
        .start()
        .await;
    let a = proxy.addr;
    let mut stream = TcpStream::connect(a).await.unwrap();
    let head = format!(
        "PUT {OPEN}/src/slow.txt HTTP/1.1\r\nHost: {a}\r\nContent-Length: 12\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // 1.2 s in all, twice the idle timeout, but never 600 ms without a byte.
    for chunk in ["sl", "ow", "ly", " b", "ut", "!!"] {
        tokio::time::sleep(Duration::from_millis(200)).await;
        stream.write_all(chunk.as_bytes()).await.unwrap();
    }
    let (bytes, _) = read_until_closed(&mut stream, Duration::from_secs(3)).await;
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.starts_with("HTTP/1.1 200 "), "{text:?}");
    assert_eq!(bodies.complete(), [Bytes::from("slowly but!!")]);
    panics.assert_none();
}

// ---------------------------------------------------------------------------
// Clients that stop reading
// ---------------------------------------------------------------------------

/// A response body of `len` pattern bytes that counts what it produced and notes being dropped
/// (the proxy gave up on it).
struct WatchedBody {
    offset: u64,
    len: u64,
    produced: Arc<AtomicU64>,
    dropped: Arc<AtomicBool>,
}

impl Body for WatchedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.offset >= self.len {
            return Poll::Ready(None);
        }
        let n = (self.len - self.offset).min(PATTERN_CHUNK as u64) as usize;
        let chunk = Bytes::from(pattern_bytes(self.offset, n));
        self.offset += n as u64;
        self.produced.store(self.offset, Ordering::SeqCst);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len - self.offset)
    }
}

impl Drop for WatchedBody {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

/// A client that asks for 1 GiB and reads nothing: once its socket buffers are full, writes make
/// no progress, and after `server.send_timeout` the proxy closes the connection and cancels the
/// upstream stream. Backpressure keeps what the upstream produced (the most the proxy could
/// have buffered) to a few MiB, independent of the response size.
#[tokio::test]
async fn client_that_never_reads_is_cut_at_the_send_timeout_with_bounded_memory() {
    const BIG: u64 = 1 << 30;
    let panics = PanicWatch::start();
    let pki = TestPki::new();
    let produced = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicBool::new(false));
    let (p, d) = (produced.clone(), dropped.clone());
    let mock = MockUpstream::start(pki.server_config(), move |_, _| {
        let body = WatchedBody {
            offset: 0,
            len: BIG,
            produced: p.clone(),
            dropped: d.clone(),
        };
        async move {
            let mut response = Response::new(BoxBody::new(body));
            response
                .headers_mut()
                .insert("content-type", "application/octet-stream".parse().unwrap());
            response
        }
    });
    let proxy = Setup::new(&mock.base_url(), pki.ca_path())
        .server("send_timeout = \"500ms\"")
        .start()
        .await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let request = format!(
        "GET {OPEN}/downloads/huge.bin HTTP/1.1\r\nHost: {}\r\n\r\n",
        proxy.addr
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let started = Instant::now();
    // Read nothing; wait for the proxy to give up on the upstream body.
    while !dropped.load(Ordering::SeqCst) {
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "still streaming after {:?}: the upstream produced {} bytes",
            started.elapsed(),
            produced.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gave_up = started.elapsed();
    let produced = produced.load(Ordering::SeqCst);
    assert!(
        produced < 64 << 20,
        "the upstream produced {produced} bytes for a client that read nothing"
    );
    // What the client can still read is what sat in socket buffers, then the connection ends
    // without the body ever looking complete.
    let (bytes, closed) = read_until_closed(&mut stream, Duration::from_secs(3)).await;
    assert!(
        closed.is_some(),
        "connection still open after the upstream was cancelled"
    );
    assert!(
        (bytes.len() as u64) < produced + 4096,
        "{} bytes",
        bytes.len()
    );
    assert!(bytes.starts_with(b"HTTP/1.1 200 "));
    assert!(
        gave_up >= Duration::from_millis(400),
        "gave up after only {gave_up:?}"
    );
    panics.assert_none();
}

// ---------------------------------------------------------------------------
// Caps
// ---------------------------------------------------------------------------

/// A mock whose handler waits at `gate` before answering, so requests stay in flight.
fn gated_mock(pki: &TestPki) -> (MockUpstream, Arc<Semaphore>) {
    let gate = Arc::new(Semaphore::new(0));
    let held = gate.clone();
    let mock = MockUpstream::start(pki.server_config(), move |head, _| {
        let held = held.clone();
        async move {
            held.acquire().await.unwrap().forget();
            Response::new(full_body(format!("{} {}", head.method, head.uri)))
        }
    });
    (mock, gate)
}

#[tokio::test]
async fn max_in_flight_sheds_the_third_request_with_503_overloaded() {
    let panics = PanicWatch::start();
    let pki = TestPki::new();
    let (mock, gate) = gated_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path())
        .server("max_in_flight = 2")
        .start()
        .await;
    let a = proxy.addr;
    let held: Vec<_> = (0..2)
        .map(|i| tokio::spawn(async move { get(a, &format!("{OPEN}/held/{i}")).await }))
        .collect();
    assert!(
        mock.wait_for_requests(2, Duration::from_secs(3)).await,
        "the first two never reached the upstream"
    );
    // The third, on its own connection, is answered at once without going upstream.
    let started = Instant::now();
    let third = get(a, &format!("{OPEN}/third")).await;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(third.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_proxy_error(third, 503, "overloaded").await;
    assert_eq!(mock.request_count(), 2);
    // Also over h2: the cap is on requests, not connections.
    let response = h2c_get(a, &format!("{OPEN}/third-h2")).await;
    assert_proxy_error(response, 503, "overloaded").await;

    gate.add_permits(2);
    for response in held {
        let response = response.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        drain_body(response.into_body()).await;
    }
    // The permits came back.
    gate.add_permits(1);
    let response = get(a, &format!("{OPEN}/after")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(mock.request_count(), 3);
    panics.assert_none();
}

/// A GET over h2 with prior knowledge on a fresh connection.
async fn h2c_get(addr: std::net::SocketAddr, path: &str) -> Response<hyper::body::Incoming> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let request = Request::get(format!("http://{addr}{path}"))
        .body(empty_body())
        .unwrap();
    sender.send_request(request).await.unwrap()
}

#[tokio::test]
async fn max_connections_refuses_the_third_connection_with_503_and_closes_it() {
    let panics = PanicWatch::start();
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path())
        .server("max_connections = 2")
        .start()
        .await;
    let a = proxy.addr;
    // Two keep-alive connections, each proven accepted by a served request.
    let mut open = Vec::new();
    for i in 0..2 {
        let mut stream = TcpStream::connect(a).await.unwrap();
        let request = format!("GET {OPEN}/conn/{i} HTTP/1.1\r\nHost: {a}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let head = tokio::time::timeout(Duration::from_secs(3), read_http_head(&mut stream))
            .await
            .unwrap()
            .unwrap();
        assert!(head.starts_with(b"HTTP/1.1 200 "));
        open.push(stream);
    }
    let served = mock.request_count();
    let request = format!("GET {OPEN}/third HTTP/1.1\r\nHost: {a}\r\n\r\n");
    let exchange = raw_exchange(a, request.as_bytes(), Duration::from_secs(3)).await;
    assert!(exchange.closed(), "the refused connection was left open");
    let response =
        RawResponse::parse(&exchange.text()).unwrap_or_else(|| panic!("{:?}", exchange.text()));
    assert_eq!(response.status, 503, "{response:?}");
    assert_eq!(response.header(REASON_HEADER), Some("overloaded"));
    assert_eq!(response.header("connection"), Some("close"));
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_error_json(response.body.as_bytes());
    assert_eq!(
        mock.request_count(),
        served,
        "the refused request went upstream"
    );

    // Closing one frees its slot (as soon as the proxy notices).
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let request =
            format!("GET {OPEN}/fourth HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n\r\n");
        let exchange = raw_exchange(a, request.as_bytes(), Duration::from_secs(3)).await;
        let status = RawResponse::parse(&exchange.text()).map(|r| r.status);
        if status == Some(200) {
            break;
        }
        assert_eq!(status, Some(503), "{:?}", exchange.text());
        assert!(Instant::now() < deadline, "the freed slot never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panics.assert_none();
}
