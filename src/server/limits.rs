//! Bounds on what clients can hold: requests in flight (shed with 503), and connections whose
//! peer stopped reading.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use crate::base::body::{BoxError, ProxyBody};
use crate::error::ProxyError;

/// The requests open on one connection (until their response body is done), for the idle
/// bound in [`crate::server::listener`]: a connection that has none open for
/// `server.header_read_timeout` is closed, whatever it is doing: saying nothing at all,
/// sending half an h2 preface, or holding an h2 connection open without a stream. (hyper bounds
/// only an HTTP/1 head once it has begun; it cannot see a connection before it knows the
/// protocol.)
///
/// Opening and closing a request only touches two atomics: the idle watcher is not woken per
/// request but checks the count and the last close time when its own deadline comes.
#[derive(Clone, Debug)]
pub struct OpenRequests(Arc<OpenState>);

#[derive(Debug)]
struct OpenState {
    count: AtomicUsize,
    /// When the count last fell to zero (or the connection opened), in nanoseconds after
    /// `epoch`.
    last_closed: AtomicU64,
    epoch: Instant,
}

impl Default for OpenRequests {
    fn default() -> Self {
        OpenRequests(Arc::new(OpenState {
            count: AtomicUsize::new(0),
            last_closed: AtomicU64::new(0),
            epoch: Instant::now(),
        }))
    }
}

impl OpenRequests {
    fn open(&self) -> OpenRequest {
        self.0.count.fetch_add(1, Ordering::AcqRel);
        OpenRequest(self.0.clone())
    }

    /// Resolves once no request has been open for `idle` in a row.
    pub async fn idle_for(&self, idle: Duration) {
        let state = &self.0;
        loop {
            if state.count.load(Ordering::Acquire) > 0 {
                // Busy: look again after a whole idle period, which a request closing meanwhile
                // cannot cut short.
                tokio::time::sleep(idle).await;
                continue;
            }
            // Read after the count: a close that brought it to zero stored its time first, so
            // the deadline below is never computed from an older close.
            let last_closed = state.last_closed.load(Ordering::Acquire);
            let deadline = state.epoch + Duration::from_nanos(last_closed) + idle;
            if Instant::now() >= deadline && state.count.load(Ordering::Acquire) == 0 {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// One open request; counted down when dropped.
#[derive(Debug)]
struct OpenRequest(Arc<OpenState>);

impl Drop for OpenRequest {
    fn drop(&mut self) {
        let state = &self.0;
        let since_epoch = u64::try_from(state.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        state.last_closed.fetch_max(since_epoch, Ordering::AcqRel);
        state.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Caps requests in flight across all connections. A request holds its permit until its
/// response body has been sent or dropped (a streaming download counts for as long as it
/// streams); when none is free the request is answered 503 at once rather than queued.
/// Also counts each request into its connection's [`OpenRequests`].
#[derive(Clone)]
pub struct InFlightLimitLayer {
    permits: Arc<Semaphore>,
    open: OpenRequests,
}

impl InFlightLimitLayer {
    pub fn new(permits: Arc<Semaphore>, open: OpenRequests) -> Self {
        InFlightLimitLayer { permits, open }
    }
}

impl<S> Layer<S> for InFlightLimitLayer {
    type Service = InFlightLimit<S>;

    fn layer(&self, inner: S) -> InFlightLimit<S> {
        InFlightLimit {
            inner,
            permits: self.permits.clone(),
            open: self.open.clone(),
        }
    }
}

#[derive(Clone)]
pub struct InFlightLimit<S> {
    inner: S,
    permits: Arc<Semaphore>,
    open: OpenRequests,
}

impl<S, B> Service<Request<B>> for InFlightLimit<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>, Error = Infallible>,
{
    type Response = Response<PermitBody>;
    type Error = Infallible;
    type Future = InFlightFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let open = self.open.open();
        // Health and metrics must answer when the proxy is saturated: that is when they matter.
        let exempt = crate::proxy::admin::is_admin_path(request.uri().path());
        let permit = if exempt {
            None
        } else {
            self.permits.clone().try_acquire_owned().ok()
        };
        let state = if permit.is_none() && !exempt {
            InFlightState::Refused {
                refusal: Some(ProxyError::Overloaded.into_response()),
            }
        } else {
            InFlightState::Admitted {
                inner: self.inner.call(request),
            }
        };
        InFlightFuture {
            state,
            held: Some((permit, open)),
        }
    }
}

pin_project! {
    /// [`InFlightLimit`]'s response future: named, so the layer adds no allocation per request.
    pub struct InFlightFuture<F> {
        #[pin]
        state: InFlightState<F>,
        // Handed to the response body, which holds them until it is done.
        held: Option<(Option<OwnedSemaphorePermit>, OpenRequest)>,
    }
}

pin_project! {
    #[project = InFlightStateProjection]
    enum InFlightState<F> {
        Refused { refusal: Option<Response<ProxyBody>> },
        Admitted { #[pin] inner: F },
    }
}

impl<F> Future for InFlightFuture<F>
where
    F: Future<Output = Result<Response<ProxyBody>, Infallible>>,
{
    type Output = Result<Response<PermitBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        const DONE: &str = "InFlightFuture polled after it completed";
        let this = self.project();
        let response = match this.state.project() {
            InFlightStateProjection::Refused { refusal } => refusal.take().expect(DONE),
            InFlightStateProjection::Admitted { inner } => {
                let Ok(response) = ready!(inner.poll(cx));
                response
            }
        };
        let (permit, open) = this.held.take().expect(DONE);
        Poll::Ready(Ok(response.map(|body| PermitBody {
            inner: body,
            _permit: permit,
            _open: open,
        })))
    }
}

pin_project! {
    /// A response body that keeps its request's in-flight permit, and its place among its
    /// connection's open requests, until it is done.
    pub struct PermitBody {
        #[pin]
        inner: ProxyBody,
        _permit: Option<OwnedSemaphorePermit>,
        _open: OpenRequest,
    }
}

impl Body for PermitBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = self.project().inner.poll_frame(cx);
        // Over HTTP/2, the stream's send bound is judged from what the body hands to hyper.
        crate::server::stall::note_body_poll(&polled);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// Connection I/O that fails a write which has made no progress for `timeout`: a client
    /// that stops reading its response cannot pin a connection, an upstream stream and their
    /// buffers forever. The timer exists only while a write is blocked.
    pub struct SendTimeoutIo<T> {
        #[pin]
        inner: T,
        timeout: Duration,
        stalled: Option<Pin<Box<Sleep>>>,
    }
}

impl<T> SendTimeoutIo<T> {
    pub fn new(inner: T, timeout: Duration) -> Self {
        SendTimeoutIo {
            inner,
            timeout,
            stalled: None,
        }
    }
}

/// Runs a write-side poll under the stall timer.
fn guard<R>(
    stalled: &mut Option<Pin<Box<Sleep>>>,
    timeout: Duration,
    cx: &mut Context<'_>,
    poll: Poll<io::Result<R>>,
) -> Poll<io::Result<R>> {
    match poll {
        Poll::Ready(result) => {
            *stalled = None;
            Poll::Ready(result)
        }
        Poll::Pending => {
            let timer = stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
            ready!(timer.as_mut().poll(cx));
            Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {timeout:?}"),
            )))
        }
    }
}

impl<T: AsyncRead> AsyncRead for SendTimeoutIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for SendTimeoutIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let poll = this.inner.poll_write(cx, buf);
        guard(this.stalled, *this.timeout, cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let poll = this.inner.poll_write_vectored(cx, bufs);
        guard(this.stalled, *this.timeout, cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let poll = this.inner.poll_flush(cx);
        guard(this.stalled, *this.timeout, cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let poll = this.inner.poll_shutdown(cx);
        guard(this.stalled, *this.timeout, cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn idle_is_counted_only_while_no_request_is_open() {
        let open = OpenRequests::default();
        let idle = Duration::from_secs(5);
        let started = tokio::time::Instant::now();
        let request = open.open();
        let watch = open.clone();
        let done = tokio::spawn(async move { watch.idle_for(idle).await });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!done.is_finished(), "idle while a request was open");
        drop(request);
        done.await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(65));
    }

    /// The watcher is not woken by closes: one that lands between its checks still counts from
    /// the close, not from when the watcher next looks.
    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_last_close_between_checks() {
        let open = OpenRequests::default();
        let idle = Duration::from_secs(5);
        let started = tokio::time::Instant::now();
        let first = open.open();
        let second = open.open();
        let watch = open.clone();
        let done = tokio::spawn(async move { watch.idle_for(idle).await });
        tokio::time::sleep(Duration::from_secs(6)).await;
        drop(first);
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(second);
        done.await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(12));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fresh_connection_with_no_request_is_idle_after_the_bound() {
        let open = OpenRequests::default();
        let started = tokio::time::Instant::now();
        open.idle_for(Duration::from_secs(3)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test]
    async fn a_permit_is_held_until_the_response_body_is_done_and_admin_paths_are_exempt() {
        use tower::ServiceExt;
        let permits = Arc::new(Semaphore::new(1));
        let open = OpenRequests::default();
        let answer = tower::service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(Response::new(ProxyBody::local("streaming")))
        });
        let limited = InFlightLimitLayer::new(permits.clone(), open.clone()).layer(answer);
        let get = |path: &str| Request::get(path).body(()).unwrap();

        let first = limited.clone().oneshot(get("/2.0/user")).await.unwrap();
        assert_eq!(first.status(), http::StatusCode::OK);
        assert_eq!(permits.available_permits(), 0);
        assert_eq!(open.0.count.load(Ordering::Acquire), 1);

        let refused = limited.clone().oneshot(get("/2.0/user")).await.unwrap();
        assert_eq!(refused.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        let health = limited.clone().oneshot(get("/-/health")).await.unwrap();
        assert_eq!(health.status(), http::StatusCode::OK);
        drop((refused, health));
        assert_eq!(open.0.count.load(Ordering::Acquire), 1);

        drop(first);
        assert_eq!(permits.available_permits(), 1);
        assert_eq!(open.0.count.load(Ordering::Acquire), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_times_out_the_write() {
        let (client, _server) = tokio::io::duplex(16);
        let mut io = SendTimeoutIo::new(client, Duration::from_secs(5));
        io.write_all(&[0; 16]).await.unwrap();
        let started = tokio::time::Instant::now();
        let error = io.write_all(&[0; 16]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }
}
