//! `upstream.keep_warm`: a connected, TLS-established spare connection to every upstream origin
//! the routes use, so that a request finding no pooled connection pays no TCP and TLS handshake.
//!
//! hyper-util's pool has no way to take in a connection it did not open itself, and opening one
//! with a warm-up request would spend Bitbucket's request budget. So the spare lives one level
//! down, in the connector the pool calls: [`WarmConnector`] wraps the TLS connector, and when the
//! pool asks for a connection to a warmed origin it is handed the spare (and a keeper task opens
//! the next one at once); for any other destination, or when no spare is ready, it connects as
//! the plain connector would. The pool then speaks HTTP/1.1 or h2 on the spare exactly as on a
//! connection of its own: the spare is a finished TLS handshake, nothing more. The h2 lanes
//! ([`crate::upstream::lane`]) open their connections through the same connector, spares
//! included, and hand back one that turned out to speak HTTP/1.1
//! ([`WarmConnector::give_back`]) for the pool's next connect to that origin.
//!
//! A parked spare is watched: whatever the server sends before the pool takes it (an h2
//! server's SETTINGS, say) is kept and replayed to the pool, and when the server closes it
//! (idle timeout, GOAWAY then EOF) the keeper opens a replacement straight away. Failed
//! attempts, and spares closed within [`HEALTHY_LIFETIME`] of opening, back off exponentially
//! up to [`MAX_BACKOFF`], so a proxy whose upstream is down does not hammer it; requests in
//! the meantime connect on their own, as without `keep_warm`.
//!
//! Uses only the connector stack of [`crate::upstream::client`] (the lanes call it, it never
//! calls them); knows nothing of requests.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBuf, ReadBufCursor, Write};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tower::Service;

use crate::base::body::BoxError;
use crate::upstream::alpn::{OriginAlpnConnector, same_origin};

type Inner = OriginAlpnConnector;
type InnerStream = MaybeHttpsStream<TokioIo<TcpStream>>;

/// A spare closed sooner than this after opening counts as a failure for the backoff: an
/// upstream that accepts and drops at once must not be reconnected in a tight loop.
pub const HEALTHY_LIFETIME: Duration = Duration::from_secs(1);
/// The first wait after a failed attempt; doubled per consecutive failure.
pub const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// The longest wait between attempts while the upstream stays unreachable.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Bytes an upstream may send on a spare nobody has asked for yet (an h2 server's preface is
/// a few dozen); more than this and the spare is dropped rather than buffered.
const MAX_UNSOLICITED: usize = 16 * 1024;

/// The TLS connector, with a spare connection kept ready for each warmed origin.
///
/// One `Arc`: hyper-util's client clones its connector for every request, pooled connection or
/// not, and a clone of the TLS stack inside would be a dozen reference counts each time. The
/// stack is cloned only in [`Service::call`], when a connection is really opened.
#[derive(Clone)]
pub struct WarmConnector {
    shared: Arc<Shared>,
}

/// Dropped with the last clone of the connector (the generation's client): the keepers see
/// their channel close and end, closing their spares.
struct Shared {
    inner: Inner,
    origins: Vec<KeeperHandle>,
    /// Connections the h2 lane opened and found speaking HTTP/1.1, at most one per origin:
    /// the pool's next connect to that origin takes it (see [`WarmConnector::give_back`]).
    given_back: Mutex<Vec<(Uri, WarmStream)>>,
}

struct KeeperHandle {
    origin: Uri,
    asks: mpsc::Sender<oneshot::Sender<WarmStream>>,
    /// Set once the first attempt has finished, whatever its outcome.
    settled: Arc<AtomicBool>,
}

impl WarmConnector {
    /// Starts one keeper per origin (`scheme://authority`). Needs a tokio runtime; without
    /// one (or with no origins) this is the plain connector.
    /// Each attempt is bounded by `attempt_timeout` (the TCP connect has its own, shorter
    /// bound; this one also covers a TLS handshake that never finishes).
    pub fn new(inner: Inner, origins: &[Uri], attempt_timeout: Duration) -> Self {
        let runtime = tokio::runtime::Handle::try_current().ok();
        let origins = match runtime {
            Some(runtime) => origins
                .iter()
                .map(|origin| {
                    let (asks, receiver) = mpsc::channel(8);
                    let settled = Arc::new(AtomicBool::new(false));
                    let keeper = Keeper {
                        origin: origin.clone(),
                        connector: inner.clone(),
                        attempt_timeout,
                        asks: receiver,
                        settled: settled.clone(),
                    };
                    runtime.spawn(keeper.run());
                    KeeperHandle {
                        origin: origin.clone(),
                        asks,
                        settled,
                    }
                })
                .collect(),
            None => Vec::new(),
        };
        WarmConnector {
            shared: Arc::new(Shared {
                inner,
                origins,
                given_back: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Keeps `stream`, a connection to `origin` nobody has used yet, for the next connect to
    /// that origin (see [`crate::upstream::lane`]). One per origin: an older one is closed.
    pub fn give_back(&self, origin: &Uri, stream: WarmStream) {
        let mut given_back = self.given_back();
        given_back.retain(|(kept, _)| !same_origin(kept, origin));
        given_back.push((origin.clone(), stream));
    }

    fn take_given_back(&self, dst: &Uri) -> Option<WarmStream> {
        let mut given_back = self.given_back();
        let at = given_back
            .iter()
            .position(|(origin, _)| same_origin(origin, dst))?;
        Some(given_back.swap_remove(at).1)
    }

    fn given_back(&self) -> MutexGuard<'_, Vec<(Uri, WarmStream)>> {
        self.shared
            .given_back
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Origins whose first warm connection attempt has not finished yet.
    pub fn unsettled(&self) -> Vec<String> {
        self.shared
            .origins
            .iter()
            .filter(|k| !k.settled.load(Ordering::Acquire))
            .map(|k| k.origin.to_string())
            .collect()
    }

    fn keeper_for(&self, dst: &Uri) -> Option<&KeeperHandle> {
        self.shared
            .origins
            .iter()
            .find(|k| same_origin(&k.origin, dst))
    }
}

impl Service<Uri> for WarmConnector {
    type Response = WarmStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<WarmStream, BoxError>> + Send>>;

    /// Always ready: the TLS stack is made ready on its own clone in [`Service::call`].
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        if let Some(stream) = self.take_given_back(&dst) {
            return Box::pin(std::future::ready(Ok(stream)));
        }
        let asks = self.keeper_for(&dst).map(|k| k.asks.clone());
        let mut inner = self.shared.inner.clone();
        Box::pin(async move {
            if let Some(asks) = asks {
                let (reply, spare) = oneshot::channel();
                // A keeper with no spare ready drops the reply at once: then connect as usual.
                if asks.try_send(reply).is_ok()
                    && let Ok(stream) = spare.await
                {
                    return Ok(stream);
                }
            }
            poll_fn(|cx| inner.poll_ready(cx)).await?;
            inner.call(dst).await.map(WarmStream::fresh)
        })
    }
}

/// What a keeper was woken for while it held a spare.
enum ParkedEvent {
    Asked(Option<oneshot::Sender<WarmStream>>),
    Closed,
}

struct Keeper {
    origin: Uri,
    connector: Inner,
    attempt_timeout: Duration,
    asks: mpsc::Receiver<oneshot::Sender<WarmStream>>,
    settled: Arc<AtomicBool>,
}

impl Keeper {
    async fn run(mut self) {
        let mut failures: u32 = 0;
        loop {
            let Some(result) = self.connect().await else {
                return;
            };
            self.settled.store(true, Ordering::Release);
            let mut spare = match result {
                Ok(stream) => WarmStream::fresh(stream),
                Err(error) => {
                    failures = failures.saturating_add(1);
                    let wait = backoff(failures);
                    if failures == 1 {
                        tracing::warn!(origin = %self.origin, error = %error, retry_in = ?wait, "keep_warm: cannot connect to the upstream");
                    } else {
                        tracing::debug!(origin = %self.origin, error = %error, retry_in = ?wait, "keep_warm: still cannot connect");
                    }
                    if !self.wait_refusing(wait).await {
                        return;
                    }
                    continue;
                }
            };
            tracing::debug!(origin = %self.origin, "keep_warm: spare connection ready");
            let opened = Instant::now();
            let handed = loop {
                // The spare is looked at first, so a close that has already arrived is seen
                // before the spare is handed to a request.
                let event = poll_fn(|cx| {
                    if spare.poll_watch(cx).is_ready() {
                        return Poll::Ready(ParkedEvent::Closed);
                    }
                    self.asks.poll_recv(cx).map(ParkedEvent::Asked)
                })
                .await;
                match event {
                    ParkedEvent::Asked(None) => return,
                    ParkedEvent::Asked(Some(reply)) => match reply.send(spare) {
                        Ok(()) => break true,
                        // The asker gave up waiting; keep the spare for the next one.
                        Err(back) => spare = back,
                    },
                    ParkedEvent::Closed => break false,
                }
            };
            if handed || opened.elapsed() >= HEALTHY_LIFETIME {
                failures = 0;
                if !handed {
                    tracing::debug!(origin = %self.origin, "keep_warm: upstream closed the spare; replacing it");
                }
            } else {
                failures = failures.saturating_add(1);
                let wait = backoff(failures);
                tracing::debug!(origin = %self.origin, retry_in = ?wait, "keep_warm: spare closed right after opening");
                if !self.wait_refusing(wait).await {
                    return;
                }
            }
        }
    }

    /// One connection attempt, bounded by the connector's own connect timeout and the TLS
    /// handshake. Asks meanwhile are refused (the asker connects itself rather than waiting
    /// on an attempt that may be slow to fail). `None` when the connector is gone.
    async fn connect(&mut self) -> Option<Result<InnerStream, BoxError>> {
        let mut connecting = std::pin::pin!(tokio::time::timeout(
            self.attempt_timeout,
            self.connector.call(self.origin.clone())
        ));
        loop {
            tokio::select! {
                result = &mut connecting => {
                    return Some(result.unwrap_or_else(|_| Err("TLS handshake timed out".into())));
                }
                ask = self.asks.recv() => drop(ask?),
            }
        }
    }

    /// Sleeps `wait`, refusing asks; false when the connector is gone.
    async fn wait_refusing(&mut self, wait: Duration) -> bool {
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return true,
                ask = self.asks.recv() => if ask.is_none() { return false },
            }
        }
    }
}

/// `MIN_BACKOFF × 2^(failures-1)`, at most `MAX_BACKOFF`.
pub fn backoff(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    MIN_BACKOFF.saturating_mul(1 << exponent).min(MAX_BACKOFF)
}

/// A connection from [`WarmConnector`]: the TLS stream, preceded by whatever the server sent
/// while it was parked.
pub struct WarmStream {
    inner: InnerStream,
    early: Vec<u8>,
    /// How much of `early` was already read.
    replayed: usize,
}

impl WarmStream {
    fn fresh(inner: InnerStream) -> Self {
        WarmStream {
            inner,
            early: Vec::new(),
            replayed: 0,
        }
    }

    /// Reads what the server sends while parked. Ready when the spare is no longer usable:
    /// closed, failed, or sent more than a spare should.
    fn poll_watch(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut scratch = [0u8; 4096];
        loop {
            if self.early.len() > MAX_UNSOLICITED {
                return Poll::Ready(());
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, buf.unfilled()) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(()),
                Poll::Ready(Ok(())) => self.early.extend_from_slice(buf.filled()),
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Connection for WarmStream {
    /// What the TCP and TLS layers report, less the `extra` that hyper-util's `HttpConnector`
    /// attaches (`HttpInfo`, the socket's addresses): the client copies a connection's extra
    /// into the extensions of every response on it, an allocation per request for something
    /// the proxy never reads.
    fn connected(&self) -> Connected {
        let reported = self.inner.connected();
        let connected = Connected::new().proxy(reported.is_proxied());
        if reported.is_negotiated_h2() {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl Read for WarmStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replayed < this.early.len() {
            let pending = &this.early[this.replayed..];
            let n = pending.len().min(buf.remaining());
            buf.put_slice(&pending[..n]);
            this.replayed += n;
            if this.replayed == this.early.len() {
                this.early = Vec::new();
                this.replayed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl Write for WarmStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_minimum_and_stops_at_the_maximum() {
        assert_eq!(backoff(1), MIN_BACKOFF);
        assert_eq!(backoff(2), MIN_BACKOFF * 2);
        assert_eq!(backoff(3), MIN_BACKOFF * 4);
        assert_eq!(backoff(8), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
