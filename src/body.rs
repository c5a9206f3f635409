//! Body types: streaming wrappers that bound idleness and count bytes, never buffering.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
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
    }
}

impl<B> TimedBody<B> {
    pub fn new(
        inner: B,
        idle: Duration,
        direction: Direction,
        counter: Option<Arc<ByteCounter>>,
    ) -> Self {
        TimedBody {
            inner,
            deadline: None,
            idle,
            direction,
            counter,
        }
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

pin_project! {
    /// The body of a request on its way to the upstream: a client's stream, or one the proxy
    /// makes itself (credential checks, token requests).
    #[project = UpstreamRequestBodyProj]
    pub enum UpstreamRequestBody {
        Client { #[pin] body: TimedBody<Incoming> },
        Local { body: Option<Bytes> },
    }
}

impl UpstreamRequestBody {
    pub fn local(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        UpstreamRequestBody::Local {
            body: (!bytes.is_empty()).then_some(bytes),
        }
    }
}

impl Body for UpstreamRequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            UpstreamRequestBodyProj::Client { body } => body.poll_frame(cx),
            UpstreamRequestBodyProj::Local { body } => {
                Poll::Ready(body.take().map(|b| Ok(Frame::data(b))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamRequestBody::Client { body } => body.is_end_stream(),
            UpstreamRequestBody::Local { body } => body.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamRequestBody::Client { body } => body.size_hint(),
            UpstreamRequestBody::Local { body } => {
                SizeHint::with_exact(body.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

pin_project! {
    /// Every response body the proxy sends: an upstream stream, or a small local answer.
    #[project = ProxyBodyProj]
    pub enum ProxyBody {
        Upstream { #[pin] body: TimedBody<Incoming> },
        Rewritten { #[pin] body: crate::rewrite::RewriteBody<TimedBody<Incoming>> },
        Local { body: Option<Bytes> },
    }
}

impl ProxyBody {
    pub fn local(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        ProxyBody::Local {
            body: (!bytes.is_empty()).then_some(bytes),
        }
    }

    pub fn empty() -> Self {
        ProxyBody::Local { body: None }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            ProxyBodyProj::Upstream { body } => body.poll_frame(cx),
            ProxyBodyProj::Rewritten { body } => body.poll_frame(cx),
            ProxyBodyProj::Local { body } => Poll::Ready(body.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body } => body.is_end_stream(),
            ProxyBody::Rewritten { body } => body.is_end_stream(),
            ProxyBody::Local { body } => body.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body } => body.size_hint(),
            ProxyBody::Rewritten { body } => body.size_hint(),
            ProxyBody::Local { body } => {
                SizeHint::with_exact(body.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

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

    fn tokio_stream_from<T>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
