//! The h2 lane: one multiplexed HTTP/2 connection per upstream origin that offers h2, driven
//! through hyper's connection API (`hyper::client::conn::http2`) rather than hyper-util's pool.
//!
//! Why a lane of its own: an h2 origin needs one connection, shared by every request, and
//! hyper-util's pool does more per request than that calls for (a pool lookup under a lock, a
//! boxed send future, clones of the connector and the URI). Measured with the floors in
//! `bench/floor` (`floor-conn` against `floor-hyper`), that is about 0.8 µs of CPU per request,
//! 4-5 % of what a proxied request costs (docs/performance.md). The lane keeps what the pool
//! did for h2 and nothing more:
//!
//! - Connections come from the same [`WarmConnector`] as the pool's, so `keep_warm`'s spares,
//!   the egress proxy and each origin's ALPN offer apply unchanged.
//! - One request at a time opens a connection; the rest wait for it and then share it.
//! - A request the connection hands back unsent (it was closing: GOAWAY, EOF) is sent once more
//!   on a fresh connection, as hyper-util's `retry_canceled_requests` does.
//! - An origin whose TLS server picks HTTP/1.1 is handed to the pool for good (for this client,
//!   that is until `[upstream]` changes): the connection just opened is given back to the
//!   connector, so the pool's first connect takes it rather than opening another.
//!
//! Uses [`crate::upstream::warm`] and [`crate::upstream::alpn`]; knows nothing of routes.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http2};
use hyper_util::client::legacy::connect::Connection;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::Service;

use crate::base::body::{BoxError, UpstreamRequestBody};
use crate::upstream::alpn::same_origin;
use crate::upstream::warm::WarmConnector;

type Body = UpstreamRequestBody;

/// How many times one request may find its connection gone before it is failed: a connection
/// that closes again at once means the upstream is shedding connections, not a race.
const MAX_SENDS: usize = 3;

/// The h2 settings the pool used, so a request sees the same connection through the lane.
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
    builder: http2::Builder<TokioExecutor>,
}

/// One origin's lane: its connection, if open, and whether it is in use.
pub struct Lane {
    origin: Uri,
    state: Mutex<State>,
    /// Set by every request sent; cleared by the idle sweep (see [`Lanes::new`]).
    used: AtomicBool,
    /// Held while a connection is being opened, so concurrent requests share its outcome.
    opening: tokio::sync::Mutex<()>,
}

enum State {
    /// Nothing open yet, or the last connection closed.
    Closed,
    Open(http2::SendRequest<Body>),
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
    Answered(Result<Response<Incoming>, LaneError>),
    /// The origin speaks HTTP/1.1: the pool takes the request.
    ToPool(Request<Body>),
}

type Sending =
    Pin<Box<dyn Future<Output = Result<Response<Incoming>, TrySendError<Request<Body>>>> + Send>>;
type Slow<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

/// A request on its way through a lane. Small on purpose: it is built and moved with every
/// request's future, so what is large (hyper's send, a connection being opened) is boxed.
pub enum LaneRequest<'a> {
    /// On the open connection, the common case.
    Sending {
        lanes: &'a Lanes,
        lane: &'a Lane,
        sending: Sending,
    },
    /// Opening a connection first, or sending again after the connection closed.
    Slow(Slow<'a>),
}

impl Future for LaneRequest<'_> {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        match &mut *self {
            LaneRequest::Sending {
                lanes,
                lane,
                sending,
            } => {
                let outcome = match ready!(sending.as_mut().poll(cx)) {
                    Ok(response) => Outcome::Answered(Ok(response)),
                    Err(error) => match unsent(error) {
                        Ok(request) => {
                            let mut slow = lanes.send_slow(lane, request, 1);
                            let polled = slow.as_mut().poll(cx);
                            *self = LaneRequest::Slow(slow);
                            return polled;
                        }
                        Err(error) => Outcome::Answered(Err(LaneError::Exchange(error))),
                    },
                };
                Poll::Ready(outcome)
            }
            LaneRequest::Slow(slow) => slow.as_mut().poll(cx),
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
    Exchange(#[source] hyper::Error),
}

impl Lanes {
    /// Lanes for `origins` (each `scheme://authority`, https and offered h2), connecting
    /// through `connector`.
    ///
    /// Every `idle_timeout` a sweep lets go of each connection that no request was sent on
    /// since the last sweep, so an unused connection closes between one and two periods after
    /// its last request: a flag per request rather than a clock reading per request.
    pub fn new(origins: Vec<Uri>, connector: WarmConnector, settings: &H2Settings) -> Arc<Lanes> {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .keep_alive_interval(settings.keep_alive_interval)
            .keep_alive_while_idle(settings.keep_alive_while_idle)
            .adaptive_window(true);
        let lanes = origins.into_iter().map(Lane::new).collect();
        let lanes = Arc::new(Lanes {
            lanes,
            connector,
            builder,
        });
        if !lanes.lanes.is_empty()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(sweep_idle(Arc::downgrade(&lanes), settings.idle_timeout));
        }
        lanes
    }

    /// Starts `request` on its origin's h2 connection, opening one first if needed; hands it
    /// back when the origin has no lane or the pool serves it.
    pub fn send(&self, request: Request<Body>) -> Start<'_> {
        let Some(lane) = self
            .lanes
            .iter()
            .find(|lane| same_origin(&lane.origin, request.uri()))
        else {
            return Start::Pool(request);
        };
        match lane.try_send(request) {
            Attempt::Sending(sending) => Start::Lane(LaneRequest::Sending {
                lanes: self,
                lane,
                sending: Box::pin(sending),
            }),
            Attempt::Http1(request) => Start::Pool(request),
            Attempt::NoConnection(request) => {
                Start::Lane(LaneRequest::Slow(self.send_slow(lane, request, 0)))
            }
        }
    }

    /// Sends with a connection opened first when there is none; `sends` were tried already.
    fn send_slow<'a>(&'a self, lane: &'a Lane, request: Request<Body>, sends: usize) -> Slow<'a> {
        Box::pin(async move {
            let mut request = request;
            for _ in sends..MAX_SENDS {
                let sending = match lane.try_send(request) {
                    Attempt::Sending(sending) => sending,
                    Attempt::Http1(back) => return Outcome::ToPool(back),
                    Attempt::NoConnection(back) => {
                        request = back;
                        match self.open(lane).await {
                            Ok(true) => match lane.try_send(request) {
                                Attempt::Sending(sending) => sending,
                                Attempt::Http1(back) => return Outcome::ToPool(back),
                                Attempt::NoConnection(back) => {
                                    request = back;
                                    continue;
                                }
                            },
                            Ok(false) => return Outcome::ToPool(request),
                            Err(error) => {
                                return Outcome::Answered(Err(LaneError::Connect(error)));
                            }
                        }
                    }
                };
                match sending.await {
                    Ok(response) => return Outcome::Answered(Ok(response)),
                    Err(error) => match unsent(error) {
                        Ok(back) => request = back,
                        Err(error) => return Outcome::Answered(Err(LaneError::Exchange(error))),
                    },
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
        match &*lane.state() {
            State::Open(sender) if !sender.is_closed() => return Ok(true),
            State::Http1 => return Ok(false),
            _ => {}
        }
        let stream = self.connector.clone().call(lane.origin.clone()).await?;
        if !stream.connected().is_negotiated_h2() {
            tracing::debug!(origin = %lane.origin, "the upstream chose HTTP/1.1; the pool serves it");
            self.connector.give_back(&lane.origin, stream);
            *lane.state() = State::Http1;
            return Ok(false);
        }
        let (sender, connection) = self.builder.handshake(stream).await?;
        let origin = lane.origin.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%origin, error = %crate::base::error_chain(&error), "upstream h2 connection ended");
            }
        });
        *lane.state() = State::Open(sender);
        Ok(true)
    }
}

/// What a lane's state allows for one request.
enum Attempt<F> {
    Sending(F),
    NoConnection(Request<Body>),
    Http1(Request<Body>),
}

impl Lane {
    /// Hands `request` to the open connection, if there is one. A connection that has closed
    /// is let go here, so the caller opens another.
    fn try_send(
        &self,
        request: Request<Body>,
    ) -> Attempt<
        impl Future<Output = Result<Response<Incoming>, TrySendError<Request<Body>>>> + use<>,
    > {
        let mut state = self.state();
        match &mut *state {
            State::Open(sender) if !sender.is_closed() => {
                self.used.store(true, Ordering::Relaxed);
                Attempt::Sending(sender.try_send_request(request))
            }
            State::Http1 => Attempt::Http1(request),
            _ => {
                *state = State::Closed;
                Attempt::NoConnection(request)
            }
        }
    }

    fn new(origin: Uri) -> Lane {
        Lane {
            origin,
            state: Mutex::new(State::Closed),
            used: AtomicBool::new(false),
            opening: tokio::sync::Mutex::new(()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
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
            if matches!(*state, State::Open(_)) {
                tracing::debug!(origin = %lane.origin, "upstream h2 connection idle; letting it go");
                *state = State::Closed;
            }
        }
    }
}

/// The request back when the connection never took it.
fn unsent(mut error: TrySendError<Request<Body>>) -> Result<Request<Body>, hyper::Error> {
    match error.take_message() {
        Some(request) => Ok(request),
        None => Err(error.into_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    /// A lane holding an h2 connection to an in-memory server.
    async fn open_lane() -> Lane {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let service = service_fn(|_request| async {
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::new())))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(server_io), service)
                .await;
        });
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .handshake::<_, Body>(TokioIo::new(client_io))
            .await
            .unwrap();
        tokio::spawn(connection);
        let lane = Lane::new("https://bitbucket.example".parse().unwrap());
        *lane.state() = State::Open(sender);
        lane
    }

    fn is_open(lane: &Lane) -> bool {
        matches!(&*lane.state(), State::Open(sender) if !sender.is_closed())
    }

    fn get() -> Request<Body> {
        Request::get("https://bitbucket.example/2.0/user")
            .body(UpstreamRequestBody::local(Bytes::new()))
            .unwrap()
    }

    #[tokio::test]
    async fn a_connection_is_let_go_after_a_whole_sweep_period_without_requests() {
        let lane = open_lane().await;
        let Attempt::Sending(sending) = lane.try_send(get()) else {
            panic!("the open connection takes the request");
        };
        let Ok(response) = sending.await else {
            panic!("the in-memory server answers");
        };
        assert_eq!(response.status(), 200);
        // Used since the last sweep: kept.
        sweep(std::slice::from_ref(&lane));
        assert!(is_open(&lane));
        // Nothing sent for a whole period: let go, and the next request opens another.
        sweep(std::slice::from_ref(&lane));
        assert!(!is_open(&lane));
        assert!(matches!(lane.try_send(get()), Attempt::NoConnection(_)));
    }
}
