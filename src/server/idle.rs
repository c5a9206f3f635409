//! Idle HTTP/1.1 keep-alive connections in little memory: a connection with no request for
//! [`PARK_AFTER`] is taken away from hyper and kept as the bare socket until its next byte
//! arrives, when a new hyper connection is started on it.
//!
//! Why: hyper's HTTP/1 connection keeps an 8 KiB write buffer from its start and an 8 KiB
//! read buffer from its first read, for as long as it lives, and the connection state and
//! service around them add more; a fleet of idle keep-alive clients costs that much each. A
//! parked connection is the socket, its send-timeout wrapper and the task that waits on it.
//!
//! How: [`ParkingIo`] sits between hyper and the socket. When the connection's task asks it to
//! park (no request open for [`PARK_AFTER`]), the next read that finds no data (hyper polls for
//! the next request head) hands the socket to the task's [`ParkSlot`] and tells hyper the
//! client closed, which ends hyper's connection cleanly. It parks only when that loses
//! nothing: the connection speaks HTTP/1 (h2 keeps its state; its idle cost is the h2
//! connection's), everything hyper wrote was flushed, and no byte was read since the last
//! response was flushed, so no partial request head sits in hyper's buffer. (A client that
//! pipelines a second request behind the first and stops halfway through its head for
//! `PARK_AFTER` would have that partial head dropped with the connection; no HTTP client does.)
//! The byte that wakes a parked socket is kept and replayed to the next hyper connection.
//!
//! Uses only tokio's I/O traits and [`crate::server::trim`] (told of each park, so the memory freed by a
//! wave of parks goes back to the system); what a connection is served with stays in
//! [`crate::server::listener`].

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// How long an HTTP/1 connection has no request open before it is parked. Long enough that a
/// busy keep-alive client never pays for a new hyper connection per request.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// Where a parked socket goes, and the task's request to park.
pub struct ParkSlot<I> {
    requested: AtomicBool,
    /// Set once the connection turned out to be h2, which is never parked.
    never: AtomicBool,
    parked: Mutex<Option<I>>,
}

impl<I> Default for ParkSlot<I> {
    fn default() -> Self {
        ParkSlot {
            requested: AtomicBool::new(false),
            never: AtomicBool::new(false),
            parked: Mutex::new(None),
        }
    }
}

impl<I> ParkSlot<I> {
    /// Asks the connection to park at its next idle read (after the caller polls it again).
    pub fn request(&self) {
        self.requested.store(true, Ordering::Release);
    }

    /// False once parking is known to be impossible for this connection (h2).
    pub fn may_park(&self) -> bool {
        !self.never.load(Ordering::Relaxed)
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// The socket, if the connection parked.
    pub fn take(&self) -> Option<I> {
        self.requested.store(false, Ordering::Release);
        self.parked.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// What the first bytes said about the protocol.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// Fewer than four bytes seen; how many.
    Unknown(u8),
    Http1,
    /// The h2 preface (`PRI * HTTP/2.0`): never parked.
    Http2,
}

const H2_PREFACE_START: &[u8; 4] = b"PRI ";

/// The socket as hyper sees it; see the module doc.
pub struct ParkingIo<I> {
    inner: Option<I>,
    slot: Arc<ParkSlot<I>>,
    /// The byte that woke a parked socket, for hyper's first read.
    first: Option<u8>,
    protocol: Protocol,
    prefix: [u8; 4],
    /// A write was attempted since the last completed flush.
    unflushed: bool,
    /// Bytes were read since the last response was flushed.
    read_since_flush: bool,
}

impl<I: AsyncRead + AsyncWrite + Unpin> ParkingIo<I> {
    pub fn new(inner: I, slot: Arc<ParkSlot<I>>) -> Self {
        ParkingIo {
            inner: Some(inner),
            slot,
            first: None,
            protocol: Protocol::Unknown(0),
            prefix: [0; 4],
            unflushed: false,
            read_since_flush: false,
        }
    }

    /// A parked HTTP/1 socket woken by `first`.
    pub fn resume(inner: I, first: u8, slot: Arc<ParkSlot<I>>) -> Self {
        let mut io = ParkingIo::new(inner, slot);
        io.protocol = Protocol::Http1;
        io.first = Some(first);
        io.read_since_flush = true;
        io
    }

    fn note_read(&mut self, bytes: &[u8]) {
        self.read_since_flush = true;
        if let Protocol::Unknown(seen) = self.protocol {
            let seen = usize::from(seen);
            let take = bytes.len().min(4 - seen);
            self.prefix[seen..seen + take].copy_from_slice(&bytes[..take]);
            let seen = seen + take;
            self.protocol = if seen < 4 {
                Protocol::Unknown(seen as u8)
            } else if &self.prefix == H2_PREFACE_START {
                self.slot.never.store(true, Ordering::Relaxed);
                Protocol::Http2
            } else {
                Protocol::Http1
            };
        }
    }

    fn may_park(&self) -> bool {
        self.slot.is_requested()
            && !self.unflushed
            && !self.read_since_flush
            && self.protocol != Protocol::Http2
    }

    fn inner(&mut self) -> io::Result<&mut I> {
        self.inner
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "connection parked"))
    }
}

/// Waits for a parked socket's next byte: `None` when the client closed it.
pub async fn wait_for_byte<I: AsyncRead + Unpin>(io: &mut I) -> io::Result<Option<u8>> {
    let mut byte = [0u8; 1];
    Ok((io.read(&mut byte).await? == 1).then_some(byte[0]))
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncRead for ParkingIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(byte) = this.first.take() {
            buf.put_slice(&[byte]);
            return Poll::Ready(Ok(()));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let before = buf.filled().len();
        match Pin::new(inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if !read.is_empty() {
                    // A request is arriving: whatever asked to park is out of date.
                    this.slot.requested.store(false, Ordering::Release);
                    this.note_read(read);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if this.may_park() => {
                if let Some(inner) = this.inner.take() {
                    *this.slot.parked.lock().unwrap_or_else(|p| p.into_inner()) = Some(inner);
                    crate::server::trim::note_parked();
                }
                // Hyper reads the end of the stream between requests: a clean close.
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ParkingIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.unflushed = true;
        Pin::new(this.inner()?).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.unflushed = true;
        Pin::new(this.inner()?).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let flushed = Pin::new(inner).poll_flush(cx);
        // hyper also flushes with nothing written (after reading part of a head, say): only a
        // flush of a write, i.e. of a response, settles what was read before it.
        if this.unflushed && matches!(flushed, Poll::Ready(Ok(()))) {
            this.unflushed = false;
            this.read_since_flush = false;
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A parked socket is not closed: hyper's connection ended, the client's did not.
        match self.get_mut().inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncWriteExt, duplex};

    #[tokio::test]
    async fn parks_only_when_asked_and_everything_was_flushed() {
        let (client, server) = duplex(1024);
        let slot = Arc::new(ParkSlot::default());
        let mut io = ParkingIo::new(server, slot.clone());
        let mut client = client;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let n = io.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n\r\n");
        // A request was read and no response flushed yet: asking to park does nothing.
        slot.request();
        let pending = futures_poll(&mut io).await;
        assert!(pending, "parked with a request unanswered");
        io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        io.flush().await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 0, "parks as a clean end");
        let mut parked = slot.take().expect("the socket was parked");
        client.write_all(b"G").await.unwrap();
        let first = wait_for_byte(&mut parked).await.unwrap().unwrap();
        let mut io = ParkingIo::resume(parked, first, slot.clone());
        client
            .write_all(b"ET /next HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"\r\n\r\n") {
            let n = io.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"GET /next HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn an_h2_connection_is_never_parked() {
        let (mut client, server) = duplex(1024);
        let slot = Arc::new(ParkSlot::default());
        let mut io = ParkingIo::new(server, slot.clone());
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let _ = io.read(&mut buf).await.unwrap();
        io.flush().await.unwrap();
        slot.request();
        assert!(futures_poll(&mut io).await, "an h2 connection parked");
        assert!(slot.take().is_none());
    }

    /// True when a read is still pending after a short wait.
    async fn futures_poll<I: AsyncRead + AsyncWrite + Unpin>(io: &mut ParkingIo<I>) -> bool {
        let mut buf = [0u8; 8];
        tokio::time::timeout(Duration::from_millis(50), io.read(&mut buf))
            .await
            .is_err()
    }
}
