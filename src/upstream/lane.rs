//! The h2 lane: one multiplexed HTTP/2 connection per upstream origin that offers h2, driven
//! with the `h2` crate directly rather than through hyper's client.
//!
//! Why a lane of its own: an h2 origin needs one connection, shared by every request, and
//! hyper's client does more per request than that calls for. hyper-util's pool adds a lookup
//! under a lock, a boxed send future and clones of the connector and the URI; hyper's
//! connection API beneath it adds a channel to the connection's task, a task and a one-shot
//! channel per request, and a clock reading per frame for its PING bookkeeping. Measured with
//! the floors in `bench/floor` (`floor-hyper`, `floor-conn` and `floor-h2`), each step is
//! about 0.8 µs of CPU per request, 4-5 % of what a proxied request costs
//! (docs/performance.md). Here a request is a stream opened from the caller's own task, and
//! its response head wakes that task directly. The lane keeps what the pool did for h2:
//!
//! - Connections come from the same [`WarmConnector`] as the pool's, so `keep_warm`'s spares,
//!   the egress proxy and each origin's ALPN offer apply unchanged.
//! - One request at a time opens a connection; the rest wait for it and then share it.
//! - A request that finds its connection closing (GOAWAY received, EOF, a failed PING) is sent
//!   on a fresh connection instead: nothing of it went out. One whose connection cannot be
//!   opened is tried once more if [`resent_after_failed_connect`] allows.
//! - hyper's HTTP/2 settings: frame and header-list limits, adaptive flow-control windows and
//!   PING keep-alive, kept by each connection's task ([`crate::upstream::h2_driver`]).
//! - An origin whose TLS server picks HTTP/1.1 is handed to the pool for good (for this client,
//!   that is until `[upstream]` changes): the connection just opened is given back to the
//!   connector, so the pool's first connect takes it rather than opening another.
//!
//! Each request is a stream of the connection ([`crate::upstream::h2_stream`]). Uses
//! [`crate::upstream::warm`], [`crate::upstream::alpn`], [`crate::upstream::h2_driver`],
//! [`crate::upstream::h2_stream`] and [`crate::base::body`]; knows nothing of routes.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use http::{Method, Request, Response, Uri};
use http_body::Body as _;
use hyper_util::client::legacy::connect::Connection;
use hyper_util::rt::TokioIo;
use tower::Service;

use crate::base::body::{BoxError, UpstreamBody, UpstreamRequestBody};
use crate::upstream::alpn::same_origin;
use crate::upstream::h2_driver::{self, Counted, Driver, Ended, KeepAlive};
use crate::upstream::h2_stream::{Abandon, into_upstream_response, send_body};
use crate::upstream::warm::WarmConnector;

type Body = UpstreamRequestBody;

/// How many times one request may find its connection gone before it is failed: a connection
/// that closes again at once means the upstream is shedding connections, not a race.
const MAX_SENDS: usize = 3;

/// hyper's client defaults, so a request sees the connection hyper would have made: a bounded
/// send buffer, and response heads of at most 16 KiB (a larger one is refused before it is
/// buffered). The windows start at HTTP/2's initial size and adapt ([`h2_driver`]).
const MAX_FRAME_SIZE: u32 = 16 << 10;
const MAX_SEND_BUFFER: usize = 1 << 20;
const MAX_HEADER_LIST_SIZE: u32 = 16 << 10;

/// The HTTP/2 settings of the lanes and the pool, so a request sees the same connection
/// through either.
pub struct H2Settings {
    pub keep_alive_interval: Duration,
    pub keep_alive_while_idle: bool,
    /// A connection no request was started on for this long is let go (the pool's
    /// `pool_idle_timeout`); it closes once its last stream ends.
    pub idle_timeout: Duration,
}

/// The lanes of one client, one per origin that offers h2 over TLS.
pub struct Lanes {
    lanes: Box<[Lane]>,
    connector: WarmConnector,
    builder: h2::client::Builder,
    keep_alive_interval: Duration,
    keep_alive_while_idle: bool,
    /// Numbers each connection opened, so its keep-alive can tell whether the lane still holds
    /// it or has moved on to a successor ([`Lane::holds`]).
    opened: AtomicU64,
    /// Itself, for the tasks a connection starts.
    this: Weak<Lanes>,
}

/// One origin's lane: its connection, if open, and whether it is in use.
pub struct Lane {
    origin: Uri,
    state: Mutex<State>,
    /// Set by every request sent; cleared by the idle sweep (see [`Lanes::new`]).
    used: AtomicBool,
    /// Set by every request sent; cleared by the connection's keep-alive each interval
    /// ([`KeepAlive::held`]).
    recent: AtomicBool,
    /// Held while a connection is being opened, so concurrent requests share its outcome.
    opening: tokio::sync::Mutex<()>,
}

enum State {
    /// Nothing open yet, or the last connection closed.
    Closed,
    Open {
        sender: SendRequest<Bytes>,
        id: u64,
    },
    /// The origin's TLS server chose HTTP/1.1: the pool serves it.
    Http1,
}

/// Where [`Lanes::send`] put a request.
#[expect(
    clippy::large_enum_variant,
    reason = "matched where it is returned; boxing the request would allocate for nothing"
)]
pub enum Start<'a> {
    Lane(LaneRequest<'a>),
    /// The origin has no lane, or speaks HTTP/1.1.
    Pool(Request<Body>),
}

/// The upstream's answer through a lane, or the request back for the pool.
pub enum Outcome {
    /// The lane sent it; this is the upstream's answer or why there is none.
    Answered(Result<Response<UpstreamBody>, LaneError>),
    /// The origin speaks HTTP/1.1: the pool takes the request.
    ToPool(Request<Body>),
}

type Slow<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

/// A request on its way through a lane. Small on purpose: it is moved with every request's
/// future, so what is large (a connection being opened) is boxed.
pub enum LaneRequest<'a> {
    /// Sent on the open connection, the common case: waiting for the response head. A request
    /// with a body holds its upload's [`Abandon`] signal.
    Sent(ResponseFuture, Option<Abandon>),
    /// Opening a connection first, or sending again after the connection closed.
    Slow(Slow<'a>),
    /// The connection refused the stream; reported on the first poll.
    Refused(Option<h2::Error>),
}

impl Future for LaneRequest<'_> {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        match &mut *self {
            LaneRequest::Sent(response, upload) => {
                let answer = ready!(Pin::new(response).poll(cx));
                if let Some(upload) = upload.take() {
                    upload.answered();
                }
                Poll::Ready(Outcome::Answered(
                    answer
                        .map(into_upstream_response)
                        .map_err(LaneError::Exchange),
                ))
            }
            LaneRequest::Slow(slow) => slow.as_mut().poll(cx),
            LaneRequest::Refused(error) => Poll::Ready(Outcome::Answered(Err(
                LaneError::Exchange(error.take().expect("LaneRequest polled after it completed")),
            ))),
        }
    }
}

/// Why the lane has no response for a request.
#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    /// No connection could be opened: nothing of the request reached the upstream.
    #[error("cannot connect to the upstream")]
    Connect(#[source] BoxError),
    #[error("{0}")]
    Exchange(#[source] h2::Error),
}

impl Lanes {
    /// Lanes for `origins` (each `scheme://authority`, https and offered h2), connecting
    /// through `connector`.
    ///
    /// Every `idle_timeout` a sweep lets go of each connection that no request was sent on
    /// since the last sweep, so an unused connection closes between one and two periods after
    /// its last request: a flag per request rather than a clock reading per request.
    pub fn new(origins: Vec<Uri>, connector: WarmConnector, settings: &H2Settings) -> Arc<Lanes> {
        let mut builder = h2::client::Builder::new();
        builder
            .initial_window_size(h2_driver::INITIAL_WINDOW)
            .initial_connection_window_size(h2_driver::INITIAL_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .enable_push(false);
        let lanes = Arc::new_cyclic(|this| Lanes {
            lanes: origins.into_iter().map(Lane::new).collect(),
            connector,
            builder,
            keep_alive_interval: settings.keep_alive_interval,
            keep_alive_while_idle: settings.keep_alive_while_idle,
            opened: AtomicU64::new(0),
            this: this.clone(),
        });
        if !lanes.lanes.is_empty()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(sweep_idle(Arc::downgrade(&lanes), settings.idle_timeout));
        }
        lanes
    }

    /// The lane of `uri`'s origin, if it has one.
    fn lane_for(&self, uri: &Uri) -> Option<&Lane> {
        self.lanes
            .iter()
            .find(|lane| same_origin(&lane.origin, uri))
    }

    /// Whether requests to `uri`'s origin go through a lane (so far: its server has not chosen
    /// HTTP/1.1).
    pub fn serve_origin_of(&self, uri: &Uri) -> bool {
        self.lane_for(uri)
            .is_some_and(|lane| !matches!(*lane.state(), State::Http1))
    }

    /// Starts `request` on its origin's h2 connection, opening one first if needed; hands it
    /// back when the origin has no lane or the pool serves it.
    pub fn send(&self, request: Request<Body>) -> Start<'_> {
        let Some(lane) = self.lane_for(request.uri()) else {
            return Start::Pool(request);
        };
        match lane.try_send(request) {
            Attempt::Sent(response, upload) => Start::Lane(LaneRequest::Sent(response, upload)),
            Attempt::Refused(error) => Start::Lane(LaneRequest::Refused(Some(error))),
            Attempt::Http1(request) => Start::Pool(request),
            Attempt::NoConnection(request) => {
                Start::Lane(LaneRequest::Slow(self.send_slow(lane, request)))
            }
        }
    }

    /// Sends with a connection opened first, as many times as [`MAX_SENDS`] allows. A GET or
    /// HEAD without a body whose connection could not be opened is tried once more on another
    /// (nothing of it was sent); the proxy retries the pool's failed connections the same way.
    fn send_slow<'a>(&'a self, lane: &'a Lane, request: Request<Body>) -> Slow<'a> {
        Box::pin(async move {
            let mut request = request;
            let mut may_retry_connect =
                resent_after_failed_connect(request.method(), request.body().is_end_stream());
            let mut sends = 0;
            while sends < MAX_SENDS {
                match self.open(lane).await {
                    Ok(true) => {}
                    Ok(false) => return Outcome::ToPool(request),
                    Err(error) if may_retry_connect => {
                        tracing::debug!(origin = %lane.origin, error = %crate::base::error_chain(error.as_ref()), "connecting upstream failed; retrying once");
                        may_retry_connect = false;
                        continue;
                    }
                    Err(error) => return Outcome::Answered(Err(LaneError::Connect(error))),
                }
                sends += 1;
                match lane.try_send(request) {
                    Attempt::Sent(response, upload) => {
                        return LaneRequest::Sent(response, upload).await;
                    }
                    Attempt::Refused(error) => return LaneRequest::Refused(Some(error)).await,
                    Attempt::Http1(back) => return Outcome::ToPool(back),
                    Attempt::NoConnection(back) => request = back,
                }
            }
            Outcome::Answered(Err(LaneError::Connect(
                "the upstream closed each new connection before a request could be sent".into(),
            )))
        })
    }

    /// Opens the lane's connection unless another request did meanwhile. `Ok(false)` when the
    /// origin chose HTTP/1.1.
    async fn open(&self, lane: &Lane) -> Result<bool, BoxError> {
        let _one_at_a_time = lane.opening.lock().await;
        match &mut *lane.state() {
            State::Open { sender, .. } => {
                if is_usable(sender) {
                    return Ok(true);
                }
            }
            State::Http1 => return Ok(false),
            State::Closed => {}
        }
        let stream = self.connector.clone().call(lane.origin.clone()).await?;
        if !stream.connected().is_negotiated_h2() {
            tracing::debug!(origin = %lane.origin, "the upstream chose HTTP/1.1; the pool serves it");
            self.connector.give_back(&lane.origin, stream);
            *lane.state() = State::Http1;
            return Ok(false);
        }
        let (io, received) = Counted::new(TokioIo::new(stream));
        let (sender, connection) = self.builder.handshake::<_, Bytes>(io).await?;
        let id = self.opened.fetch_add(1, Ordering::Relaxed);
        let keep_alive = (!self.keep_alive_interval.is_zero()).then(|| {
            let index = self
                .lanes
                .iter()
                .position(|candidate| std::ptr::eq(candidate, lane))
                .expect("the lane is one of these lanes");
            let lanes = self.this.clone();
            KeepAlive {
                interval: self.keep_alive_interval,
                while_idle: self.keep_alive_while_idle,
                held: Box::new(move || lanes.upgrade()?.lanes[index].holds(id)),
            }
        });
        let driver = Driver::new(connection, received, keep_alive)
            .ok_or("the h2 connection gave no PING handle")?;
        let origin = lane.origin.clone();
        tokio::spawn(async move {
            match driver.await {
                Ended::Closed(Ok(())) => {
                    tracing::debug!(%origin, connection = id, "upstream h2 connection closed");
                }
                Ended::Closed(Err(error)) => {
                    tracing::debug!(%origin, connection = id, %error, "upstream h2 connection ended");
                }
                Ended::Unresponsive => tracing::debug!(
                    %origin,
                    connection = id,
                    "upstream h2 connection left a PING unanswered for {:?}; closed",
                    h2_driver::KEEP_ALIVE_TIMEOUT
                ),
            }
        });
        *lane.state() = State::Open { sender, id };
        Ok(true)
    }
}

/// Whether a request whose connection failed before a byte of it went out is sent once more on
/// another: a GET or HEAD without a body, which the upstream cannot have acted on. A lane
/// retries its own connections; the proxy retries the pool's (`crate::proxy::forward`).
pub fn resent_after_failed_connect(method: &Method, bodiless: bool) -> bool {
    bodiless && matches!(*method, Method::GET | Method::HEAD)
}

/// Whether a connection still takes new streams: no GOAWAY received, not closed. A fresh
/// handle has no stream of its own waiting to open, so this never waits and needs no waker.
fn is_usable(sender: &mut SendRequest<Bytes>) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    matches!(sender.poll_ready(&mut cx), Poll::Ready(Ok(())))
}

/// Readies the lane's handle for one more stream; false when the connection takes no new ones.
///
/// Requests share the handle rather than each cloning it (a clone and its drop each lock the
/// connection's state). A handle whose last stream still waits for a free slot (the upstream's
/// SETTINGS_MAX_CONCURRENT_STREAMS) is not ready; it is replaced by a fresh clone, which has
/// no stream of its own, so that one waiting stream does not stop the requests after it. The
/// waiting stream stays queued in the connection, and its request holds its own reference.
fn make_ready(sender: &mut SendRequest<Bytes>) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    match sender.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => true,
        Poll::Ready(Err(_)) => false,
        Poll::Pending => {
            *sender = sender.clone();
            is_usable(sender)
        }
    }
}

/// What a lane's state allows for one request.
enum Attempt {
    Sent(ResponseFuture, Option<Abandon>),
    /// The connection took the request and refused it (a malformed head).
    Refused(h2::Error),
    NoConnection(Request<Body>),
    Http1(Request<Body>),
}

impl Lane {
    /// Opens a stream for `request` on the open connection, if there is one that takes new
    /// streams, and starts its body on the way. A connection that has closed or received
    /// GOAWAY is let go here, so the caller opens another.
    fn try_send(&self, request: Request<Body>) -> Attempt {
        let (parts, body) = request.into_parts();
        let end_of_stream = body.is_end_stream();
        let sent = {
            let mut state = self.state();
            let State::Open { sender, id } = &mut *state else {
                let request = Request::from_parts(parts, body);
                return match &*state {
                    State::Http1 => Attempt::Http1(request),
                    _ => Attempt::NoConnection(request),
                };
            };
            if !make_ready(sender) {
                tracing::debug!(origin = %self.origin, connection = *id, "upstream h2 connection closing; opening another");
                *state = State::Closed;
                return Attempt::NoConnection(Request::from_parts(parts, body));
            }
            sender.send_request(Request::from_parts(parts, ()), end_of_stream)
        };
        self.used.store(true, Ordering::Relaxed);
        self.recent.store(true, Ordering::Relaxed);
        match sent {
            Ok((response, stream)) => {
                let upload = (!end_of_stream).then(|| {
                    let (abandon, abandoned) = Abandon::new();
                    tokio::spawn(send_body(body, stream, abandoned));
                    abandon
                });
                Attempt::Sent(response, upload)
            }
            Err(error) => Attempt::Refused(error),
        }
    }

    fn new(origin: Uri) -> Lane {
        Lane {
            origin,
            state: Mutex::new(State::Closed),
            used: AtomicBool::new(false),
            recent: AtomicBool::new(false),
            opening: tokio::sync::Mutex::new(()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the lane still holds connection `id`, and whether a request was sent since
    /// the last call.
    fn holds(&self, id: u64) -> Option<bool> {
        match &*self.state() {
            State::Open { id: open, .. } if *open == id => {
                Some(self.recent.swap(false, Ordering::Relaxed))
            }
            _ => None,
        }
    }
}

/// Lets go of the connections unused for a whole `period`, until the lanes are dropped.
async fn sweep_idle(lanes: Weak<Lanes>, period: Duration) {
    loop {
        tokio::time::sleep(period).await;
        let Some(lanes) = lanes.upgrade() else {
            return;
        };
        sweep(&lanes.lanes);
    }
}

/// One sweep: lets go of the connections no request was sent on since the last.
fn sweep(lanes: &[Lane]) {
    for lane in lanes {
        if !lane.used.swap(false, Ordering::Relaxed) {
            let mut state = lane.state();
            if matches!(*state, State::Open { .. }) {
                tracing::debug!(origin = %lane.origin, "upstream h2 connection idle; letting it go");
                *state = State::Closed;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioExecutor;

    /// A lane holding an h2 connection to an in-memory hyper server that answers each request
    /// with its own body.
    async fn open_lane() -> Lane {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let service = service_fn(|request: Request<hyper::body::Incoming>| async move {
                let body = request.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>(Response::new(Full::new(body)))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(server_io), service)
                .await;
        });
        let (sender, connection) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(connection);
        let lane = Lane::new("https://bitbucket.example".parse().unwrap());
        *lane.state() = State::Open { sender, id: 0 };
        lane
    }

    fn is_open(lane: &Lane) -> bool {
        match &mut *lane.state() {
            State::Open { sender, .. } => is_usable(sender),
            _ => false,
        }
    }

    fn request(body: &'static str) -> Request<Body> {
        Request::post("https://bitbucket.example/2.0/user")
            .body(UpstreamRequestBody::local(body))
            .unwrap()
    }

    async fn answer(attempt: Attempt) -> Response<UpstreamBody> {
        let Attempt::Sent(response, upload) = attempt else {
            panic!("the open connection takes the request");
        };
        let response = response.await.expect("the in-memory server answers");
        if let Some(upload) = upload {
            upload.answered();
        }
        into_upstream_response(response)
    }

    #[tokio::test]
    async fn a_request_and_its_body_go_as_one_stream_and_the_answer_streams_back() {
        let lane = open_lane().await;
        let response = answer(lane.try_send(request("{\"n\": 1}"))).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.body().size_hint().exact(), Some(8));
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"{\"n\": 1}");
        // A bodiless request ends its stream with its head.
        let response = answer(lane.try_send(request(""))).await;
        assert!(response.body().is_end_stream());
    }

    /// The upstream allows one stream at a time: a request that waits for the slot leaves the
    /// lane's handle for the requests after it, and the connection is kept.
    #[tokio::test]
    async fn a_stream_waiting_for_a_slot_does_not_stop_the_requests_after_it() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let held = release.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let held = held.clone();
                async move {
                    if request.uri().path() == "/slow" {
                        let _ = held.acquire().await;
                    }
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::new())))
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .max_concurrent_streams(1)
                .serve_connection(TokioIo::new(server_io), service)
                .await;
        });
        let (sender, connection) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(connection);
        let lane = Lane::new("https://bitbucket.example".parse().unwrap());
        *lane.state() = State::Open { sender, id: 7 };
        let get = |path: &str| {
            Request::get(format!("https://bitbucket.example{path}"))
                .body(UpstreamRequestBody::local(""))
                .unwrap()
        };
        // One exchange first, so the server's SETTINGS (one stream at a time) are in force.
        assert_eq!(answer(lane.try_send(get("/"))).await.status(), 200);
        let slow = tokio::spawn(answer(lane.try_send(get("/slow"))));
        let waiting = [lane.try_send(get("/a")), lane.try_send(get("/b"))];
        assert!(matches!(&*lane.state(), State::Open { id: 7, .. }));
        release.add_permits(1);
        assert_eq!(slow.await.unwrap().status(), 200);
        for attempt in waiting {
            assert_eq!(answer(attempt).await.status(), 200);
        }
    }

    #[tokio::test]
    async fn a_connection_is_let_go_after_a_whole_sweep_period_without_requests() {
        let lane = open_lane().await;
        let response = answer(lane.try_send(request(""))).await;
        assert_eq!(response.status(), 200);
        // Used since the last sweep: kept.
        sweep(std::slice::from_ref(&lane));
        assert!(is_open(&lane));
        // Nothing sent for a whole period: let go, and the next request opens another.
        sweep(std::slice::from_ref(&lane));
        assert!(!is_open(&lane));
        assert!(matches!(
            lane.try_send(request("")),
            Attempt::NoConnection(_)
        ));
    }
}

/// A request abandoned before its answer: its upload stops with a reset.
#[cfg(test)]
mod abandoned {
    use super::*;
    use crate::base::body::{Direction, TimedBody};
    use tokio::io::AsyncWriteExt;

    /// A client's upload still streaming: the body of a chunked request whose first chunk came
    /// and whose end never does, as hyper's server hands it over.
    async fn streaming_upload() -> (Body, tokio::io::DuplexStream) {
        let (mut client, server_io) = tokio::io::duplex(64 * 1024);
        let (handed, body) = tokio::sync::oneshot::channel();
        let handed = std::sync::Mutex::new(Some(handed));
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    if let Some(handed) = handed.lock().unwrap().take() {
                        let _ = handed.send(request.into_body());
                    }
                    std::future::pending::<
                        Result<Response<http_body_util::Empty<Bytes>>, hyper::Error>,
                    >()
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server_io), service)
                .await;
        });
        client
            .write_all(b"POST /upload HTTP/1.1\r\nhost: proxy\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
            .await
            .unwrap();
        let incoming = body.await.unwrap();
        let body = UpstreamRequestBody::Client {
            body: TimedBody::new(incoming, Duration::from_secs(60), Direction::Request, None),
        };
        // The client's end of the connection stays open: the upload neither ends nor fails.
        (body, client)
    }

    #[tokio::test]
    async fn an_upload_whose_request_is_dropped_before_its_answer_is_reset() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let (got_chunk, chunk) = tokio::sync::oneshot::channel();
        let upstream = tokio::spawn(async move {
            let mut connection = h2::server::handshake(server_io).await.unwrap();
            let (request, _respond) = connection.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            let mut body = request.into_body();
            let first = body.data().await.unwrap().unwrap();
            got_chunk.send(first).unwrap();
            // Never answered; what comes next of the body is the question.
            body.data().await
        });
        let (sender, connection) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(connection);
        let lane = Lane::new("https://bitbucket.example".parse().unwrap());
        *lane.state() = State::Open { sender, id: 0 };
        let (body, _client) = streaming_upload().await;
        let request = Request::post("https://bitbucket.example/2.0/upload")
            .body(body)
            .unwrap();
        let Attempt::Sent(response, upload) = lane.try_send(request) else {
            panic!("the open connection takes the request");
        };
        assert_eq!(&chunk.await.unwrap()[..], b"hello");
        // The proxy gives up on the answer (upstream.timeout, or its client left).
        drop((response, upload));
        let next = tokio::time::timeout(Duration::from_secs(5), upstream)
            .await
            .expect("the upload stopped")
            .unwrap();
        let error = next.expect("a reset, not the body's end").unwrap_err();
        assert_eq!(error.reason(), Some(h2::Reason::CANCEL));
    }
}
