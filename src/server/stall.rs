//! The send bound for HTTP/2 streams: a stream whose response makes no progress for
//! `server.send_timeout` is reset, freeing its in-flight slot.
//!
//! Over HTTP/1 a client that stops reading blocks the socket, and [`crate::server::limits::SendTimeoutIo`]
//! sees the write stall. Over HTTP/2 the socket stays writable: a client that never sends
//! WINDOW_UPDATE stalls each stream inside hyper, which simply stops polling the response body
//! until the peer grants flow-control capacity. Nothing on the socket or in the body can see
//! that, so each stream's task is watched instead: [`StreamExecutor`] spawns hyper's stream
//! tasks inside a [`StallGuard`], and the response body reports through [`note_body_poll`]
//! (a task-local, so nothing is threaded through hyper) whether it handed data to hyper or is
//! itself waiting for the upstream. While data handed over has not been taken (the body was
//! not polled again), the stream waits on the client; after `send_timeout` of that the guard
//! drops the stream, which makes h2 send RST_STREAM(CANCEL) and drops the body with its permit.
//!
//! A stream waiting for the upstream is not the client's fault and is bounded by
//! `upstream.idle_timeout` instead.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::Frame;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

tokio::task_local! {
    static STREAM: Arc<StreamProgress>;
}

/// What the response body of one stream last did.
#[derive(Debug, Default)]
struct StreamProgress {
    /// The body's last poll handed a data frame to hyper, and it has not been polled since.
    waiting_on_client: AtomicBool,
    /// Data frames handed over so far: a change is progress.
    handed: AtomicU64,
}

/// Records a response body poll for the stream task it runs in (a no-op outside a
/// [`StallGuard`], as for HTTP/1). `data` says whether the poll handed a data frame to hyper.
pub fn note_body_poll<D, E>(polled: &Poll<Option<Result<Frame<D>, E>>>) {
    let handed_data = matches!(polled, Poll::Ready(Some(Ok(frame))) if frame.is_data());
    let _ = STREAM.try_with(|progress| {
        if handed_data {
            progress.handed.fetch_add(1, Ordering::Relaxed);
        }
        progress
            .waiting_on_client
            .store(handed_data, Ordering::Relaxed);
    });
}

/// Spawns hyper's HTTP/2 stream tasks on tokio, each under a [`StallGuard`].
#[derive(Clone, Debug)]
pub struct StreamExecutor {
    send_timeout: Duration,
}

impl StreamExecutor {
    pub fn new(send_timeout: Duration) -> Self {
        StreamExecutor { send_timeout }
    }
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(StallGuard::new(future, self.send_timeout));
    }
}

pin_project! {
    /// A stream task that ends (dropping the stream) once its response has waited on the
    /// client for `timeout` without progress.
    pub struct StallGuard<F> {
        #[pin]
        inner: F,
        progress: Arc<StreamProgress>,
        timeout: Duration,
        // Allocated at the first wait on the client, then re-armed in place.
        timer: Option<Pin<Box<Sleep>>>,
        // `handed` when the timer was last armed; `None` while it is not armed.
        armed_at: Option<u64>,
    }
}

impl<F> StallGuard<F> {
    pub fn new(inner: F, timeout: Duration) -> Self {
        StallGuard {
            inner,
            progress: Arc::default(),
            timeout,
            timer: None,
            armed_at: None,
        }
    }
}

impl<F: Future<Output = ()>> Future for StallGuard<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let mut inner = this.inner;
        if STREAM
            .sync_scope(this.progress.clone(), || inner.as_mut().poll(cx))
            .is_ready()
        {
            return Poll::Ready(());
        }
        if !this.progress.waiting_on_client.load(Ordering::Relaxed) {
            *this.armed_at = None;
            return Poll::Pending;
        }
        let handed = this.progress.handed.load(Ordering::Relaxed);
        let deadline = Instant::now() + *this.timeout;
        let timer = match this.timer {
            Some(timer) => {
                if *this.armed_at != Some(handed) {
                    timer.as_mut().reset(deadline);
                }
                timer
            }
            None => this
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        *this.armed_at = Some(handed);
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        tracing::info!(
            timeout = ?this.timeout,
            "an HTTP/2 response made no progress for server.send_timeout (the client granted no flow-control window): stream reset"
        );
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// A stand-in for hyper's stream task: polls a "body" that hands over one frame, then waits
    /// for capacity that `capacity` grants (or never, when it is `None`).
    async fn stream_task(frames_granted: Arc<tokio::sync::Notify>, grants: usize) {
        for _ in 0..=grants {
            note_body_poll::<Bytes, ()>(&Poll::Ready(Some(Ok(Frame::data(Bytes::new())))));
            frames_granted.notified().await;
        }
        note_body_poll::<Bytes, ()>(&Poll::Ready(None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_waiting_on_the_client_ends_after_the_timeout() {
        let started = Instant::now();
        let never = Arc::new(tokio::sync::Notify::new());
        StallGuard::new(stream_task(never, 1), Duration::from_secs(3)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn each_frame_taken_restarts_the_timeout() {
        let started = Instant::now();
        let grant = Arc::new(tokio::sync::Notify::new());
        let granter = grant.clone();
        tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(2)).await;
                granter.notify_one();
            }
        });
        // Three grants 2 s apart, each inside the 3 s bound; then none: 6 s + 3 s.
        StallGuard::new(stream_task(grant, 5), Duration::from_secs(3)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(9));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_waiting_on_the_upstream_is_not_cut() {
        let started = Instant::now();
        StallGuard::new(
            async {
                note_body_poll::<Bytes, ()>(&Poll::Pending);
                tokio::time::sleep(Duration::from_secs(60)).await;
            },
            Duration::from_secs(3),
        )
        .await;
        assert_eq!(started.elapsed(), Duration::from_secs(60));
    }
}
