//! Body types: streaming wrappers that bound idleness and count bytes, never buffering.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::error::Elapsed;
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body stream stayed silent for longer than the idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("no data for {0:?} while the {1} body was streaming")]
pub struct BodyIdleTimeout(pub Duration, pub Direction);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to upstream.
    Request,
    /// Upstream to client.
    Response,
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::Request => "request",
            Direction::Response => "response",
        })
    }
}

/// Bytes counted as they pass, shared between a body and whoever logs the request.
#[derive(Debug, Default)]
pub struct ByteCounter(AtomicU64);

impl ByteCounter {
    pub fn add(&self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Request-body bytes: the access log puts a counter in the request's extensions, and the
/// forwarding phase counts the body through it.
#[derive(Clone)]
pub struct RequestBytes(pub Arc<ByteCounter>);

/// When a body last moved (a frame or its end was read), shared with whoever bounds a wait by
/// it: the upstream's response head may come only after a long upload.
#[derive(Debug, Clone)]
pub struct Progress {
    start: Instant,
    /// Nanoseconds after `start` of the latest movement.
    last: Arc<AtomicU64>,
}

impl Progress {
    fn new() -> Self {
        Progress {
            start: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let nanos = self.start.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.last.fetch_max(nanos, Ordering::Relaxed);
    }

    /// When the body last moved (its creation if it never did).
    pub fn last(&self) -> Instant {
        self.start + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }
}

/// `tokio::time::timeout_at`, except that while `progress` keeps moving the deadline moves
/// with it: the wait fails only once `idle` has passed since both `deadline - idle` and the
/// last movement. An upload that streams for longer than `idle` is not cut; an upstream that
/// stops reading it, or stays silent after it, still is.
pub async fn timeout_at_unless_moving<F: Future>(
    deadline: Instant,
    idle: Duration,
    progress: Option<Progress>,
    future: F,
) -> Result<F::Output, Elapsed> {
    let mut future = std::pin::pin!(future);
    let mut deadline = deadline;
    loop {
        match tokio::time::timeout_at(deadline, future.as_mut()).await {
            Ok(output) => return Ok(output),
            Err(elapsed) => {
                let Some(next) = progress.as_ref().map(|p| p.last() + idle) else {
                    return Err(elapsed);
                };
                if next <= Instant::now() {
                    return Err(elapsed);
                }
                deadline = next;
            }
        }
    }
}

pin_project! {
    /// Streams `inner` frame by frame; fails if no frame arrives within `idle`, and counts data
    /// bytes. The timer runs only while the body is being polled, so a peer that is slow to
    /// *read* (backpressure) is not mistaken for an upstream that stopped sending. The timer is
    /// created on the first wait, so bodiless requests never allocate one.
    pub struct TimedBody<B> {
        #[pin]
        inner: B,
        deadline: Option<Pin<Box<Sleep>>>,
        idle: Duration,
        direction: Direction,
        counter: Option<Arc<ByteCounter>>,
        // Only an upload can hold back the upstream's answer; nothing waits on a response
        // body's progress or on an empty body's, so those never allocate one.
        progress: Option<Progress>,
    }
}

impl<B: Body> TimedBody<B> {
    pub fn new(
        inner: B,
        idle: Duration,
        direction: Direction,
        counter: Option<Arc<ByteCounter>>,
    ) -> Self {
        let progress =
            (direction == Direction::Request && !inner.is_end_stream()).then(Progress::new);
        TimedBody {
            inner,
            deadline: None,
            idle,
            direction,
            counter,
            progress,
        }
    }

    /// When this upload last moved; `None` for responses and empty bodies.
    pub fn progress(&self) -> Option<&Progress> {
        self.progress.as_ref()
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                // Data arrived: the next wait starts a fresh idle period.
                if let Some(deadline) = this.deadline.as_mut() {
                    deadline.as_mut().reset(Instant::now() + *this.idle);
                }
                if let Some(progress) = this.progress {
                    progress.touch();
                }
                // Request trailers are dropped, not cleaned: they are headers that arrive after
                // the credential is injected and after every header check, so an
                // `authorization` trailer would reach an HTTP/2 upstream. Trailers end a body.
                if *this.direction == Direction::Request
                    && matches!(&frame, Some(Ok(frame)) if frame.is_trailers())
                {
                    return Poll::Ready(None);
                }
                if let (Some(Ok(frame)), Some(counter)) = (&frame, this.counter.as_ref())
                    && let Some(data) = frame.data_ref()
                {
                    counter.add(data.len());
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let idle = *this.idle;
                let deadline = this
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                ready!(deadline.as_mut().poll(cx));
                Poll::Ready(Some(Err(Box::new(BodyIdleTimeout(
                    *this.idle,
                    *this.direction,
                )))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body the proxy writes itself: one chunk, or nothing.
#[derive(Debug, Default)]
pub struct LocalBody(Option<Bytes>);

impl LocalBody {
    pub fn new(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        LocalBody((!bytes.is_empty()).then_some(bytes))
    }
}

impl Body for LocalBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.0.take().map(|bytes| Ok(Frame::data(bytes))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0.as_ref().map_or(0, |bytes| bytes.len() as u64))
    }
}

pin_project! {
    /// The body of a request on its way to the upstream: a client's stream, or one the proxy
    /// makes itself (credential checks, token requests).
    #[project = UpstreamRequestBodyProj]
    pub enum UpstreamRequestBody {
        Client { #[pin] body: TimedBody<Incoming> },
        Local { #[pin] body: LocalBody },
    }
}

impl UpstreamRequestBody {
    pub fn local(bytes: impl Into<Bytes>) -> Self {
        UpstreamRequestBody::Local {
            body: LocalBody::new(bytes),
        }
    }

    /// When a client's upload last moved towards the upstream; `None` for local and empty bodies.
    pub fn progress(&self) -> Option<Progress> {
        match self {
            UpstreamRequestBody::Client { body } => body.progress().cloned(),
            UpstreamRequestBody::Local { .. } => None,
        }
    }
}

/// `Body` for an enum whose every variant holds a pinned body in a field `body`: each call goes
/// to that body, and its errors become a `BoxError`.
macro_rules! delegate_body {
    ($name:ident, $projection:ident { $($variant:ident),+ }) => {
        impl Body for $name {
            type Data = Bytes;
            type Error = BoxError;

            fn poll_frame(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
                match self.project() {
                    $($projection::$variant { body } => body.poll_frame(cx).map_err(Into::into),)+
                }
            }

            fn is_end_stream(&self) -> bool {
                match self {
                    $($name::$variant { body } => body.is_end_stream(),)+
                }
            }

            fn size_hint(&self) -> SizeHint {
                match self {
                    $($name::$variant { body } => body.size_hint(),)+
                }
            }
        }
    };
}

delegate_body!(
    UpstreamRequestBody,
    UpstreamRequestBodyProj { Client, Local }
);

pin_project! {
    /// A response body from the upstream: hyper's for a pooled connection (HTTP/1.1), an h2
    /// stream for a lane (`crate::upstream::lane`).
    #[project = UpstreamBodyProj]
    pub enum UpstreamBody {
        Pooled { #[pin] body: Incoming },
        Lane { #[pin] body: H2Body },
    }
}

delegate_body!(UpstreamBody, UpstreamBodyProj { Pooled, Lane });

/// An h2 response stream as a body. Flow-control credit goes back to the upstream as each
/// chunk is taken, so what is buffered for a slow client stays within the stream's window.
#[derive(Debug)]
pub struct H2Body {
    stream: h2::RecvStream,
    /// `Content-Length` minus what has been taken, for an exact size hint.
    remaining: Option<u64>,
    data_done: bool,
}

impl H2Body {
    pub fn new(stream: h2::RecvStream, content_length: Option<u64>) -> Self {
        H2Body {
            stream,
            remaining: content_length,
            data_done: false,
        }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Fails only once the stream is gone, which the next poll reports.
                    let _ = self.stream.flow_control().release_capacity(data.len());
                    if let Some(remaining) = &mut self.remaining {
                        *remaining = remaining.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => self.data_done = true,
            }
        }
        Poll::Ready(match ready!(self.stream.poll_trailers(cx)) {
            Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Ok(None) => None,
            Err(error) => Some(Err(error)),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.remaining
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

pin_project! {
    /// Every response body the proxy sends: an upstream stream, or a small local answer.
    #[project = ProxyBodyProj]
    pub enum ProxyBody {
        Upstream { #[pin] body: TimedBody<UpstreamBody> },
        // A body the link rewriter streams (`crate::rewrite`, a layer above this one, hence
        // the box). Boxed anyway: the rewriter's state is six times the size of the other
        // variants, and every response in flight, rewritten or not, would otherwise hold room
        // for it (648 bytes against 104).
        Rewritten { #[pin] body: http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError> },
        Local { #[pin] body: LocalBody },
        // Answers built from a shared or stored upstream answer (the response cache): a box,
        // so this enum does not grow for them or depend on their types.
        Boxed { #[pin] body: http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError> },
    }
}

impl ProxyBody {
    pub fn local(bytes: impl Into<Bytes>) -> Self {
        ProxyBody::Local {
            body: LocalBody::new(bytes),
        }
    }
}

delegate_body!(
    ProxyBody,
    ProxyBodyProj {
        Upstream,
        Rewritten,
        Local,
        Boxed
    }
);

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    #[tokio::test(start_paused = true)]
    async fn idle_body_times_out_and_active_body_does_not() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let stream = tokio_stream_from(rx);
        let counter = Arc::new(ByteCounter::default());
        let mut body = std::pin::pin!(TimedBody::new(
            StreamBody::new(stream),
            Duration::from_secs(5),
            Direction::Response,
            Some(counter.clone()),
        ));
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(4)).await;
            tx.send(Ok(Frame::data(Bytes::from_static(b"abc"))))
                .await
                .unwrap();
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "abc");
        }
        assert_eq!(counter.get(), 9);
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.downcast_ref::<BodyIdleTimeout>().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn head_deadline_moves_with_the_upload_only() {
        let idle = Duration::from_secs(5);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let mut body = Box::pin(TimedBody::new(
            StreamBody::new(tokio_stream_from(rx)),
            Duration::from_secs(60),
            Direction::Request,
            None,
        ));
        let progress = body.progress().cloned();
        assert!(
            progress.is_some(),
            "an upload that has not ended is watched"
        );
        let started = Instant::now();
        // The "response" arrives 3 s after a 12 s upload: 15 s in all, past `idle`.
        let upload = async {
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_secs(3)).await;
                tx.send(Ok(Frame::data(Bytes::from_static(b"pack"))))
                    .await
                    .unwrap();
                body.frame().await.unwrap().unwrap();
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
        };
        let result = timeout_at_unless_moving(started + idle, idle, progress.clone(), upload).await;
        assert!(result.is_ok());
        assert_eq!(started.elapsed(), Duration::from_secs(15));

        // Once the body stops moving, the wait ends `idle` after its last movement.
        let silent = std::future::pending::<()>();
        let again = Instant::now();
        let result = timeout_at_unless_moving(again + idle, idle, progress, silent).await;
        assert!(result.is_err());
        assert_eq!(again.elapsed(), idle);

        // Without a body to watch it is a plain deadline.
        let result = timeout_at_unless_moving(
            Instant::now() + idle,
            idle,
            None,
            std::future::pending::<()>(),
        )
        .await;
        assert!(result.is_err());
    }

    #[test]
    fn only_uploads_with_a_body_track_progress() {
        let idle = Duration::from_secs(5);
        let upload = TimedBody::new(
            http_body_util::Full::new(Bytes::from_static(b"pack")),
            idle,
            Direction::Request,
            None,
        );
        assert!(upload.progress().is_some());
        let empty = TimedBody::new(
            http_body_util::Empty::<Bytes>::new(),
            idle,
            Direction::Request,
            None,
        );
        assert!(empty.progress().is_none());
        let response = TimedBody::new(
            http_body_util::Full::new(Bytes::from_static(b"page")),
            idle,
            Direction::Response,
            None,
        );
        assert!(response.progress().is_none());
    }

    fn tokio_stream_from<T>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
