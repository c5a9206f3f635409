//! Drives one upstream h2 connection for a lane ([`crate::upstream::lane`]): h2's connection
//! future, plus what hyper's connection task did beside it, since the lanes use the `h2` crate
//! directly:
//!
//! - **Adaptive flow-control windows.** The windows start at HTTP/2's 64 KiB and grow with the
//!   bandwidth-delay product measured by PINGs, up to 16 MiB (hyper's algorithm, [`Bdp`]). A
//!   connection that carries small answers keeps small windows, so a client that stops reading
//!   holds little of the upstream's data; one that carries a pack across an ocean gets windows
//!   large enough not to wait on them. Fixed windows were measured and rejected: at 20 ms a
//!   2 MiB stream window moved a pack at 0.25× direct, 8 MiB at 0.72× (docs/performance.md).
//! - **Keep-alive PINGs** (`keep_alive_interval`, `keep_alive_while_idle`), and closing the
//!   connection when one goes unanswered for [`KEEP_ALIVE_TIMEOUT`].
//!
//! One PING is in flight at a time, and whichever kind it is, its answer proves the connection
//! alive. Bytes are counted as they are read from the socket ([`Counted`]), so nothing is done
//! per frame or per request: the clock is read once per PING, and between PINGs at most once
//! per [`BDP_MIN_SAMPLE`] received.
//!
//! Uses only `h2` and `tokio`; knows nothing of lanes or requests.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::{Ping, PingPong};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// How long a PING may go unanswered before its connection is closed (hyper's default).
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// HTTP/2's initial window, where the adaptive windows start (as hyper's do).
pub const INITIAL_WINDOW: u32 = 65_535;

/// The largest window the measurements may ask for; any larger would be TCP's to bound.
const BDP_LIMIT: u32 = 16 << 20;

/// What must have arrived since the last measurement for another to be worth a PING: a
/// connection's first frames and a trickle of small answers never fill 2/3 of even the
/// initial window in a round trip, so they could not grow it.
const BDP_MIN_SAMPLE: u64 = 16 << 10;

/// Whether the lane still holds the connection, and whether a request was sent on it since
/// the last call: `None` once the lane has let go of it.
pub type Held = Box<dyn Fn() -> Option<bool> + Send>;

/// Keep-alive settings of one connection.
pub struct KeepAlive {
    pub interval: Duration,
    /// PING a connection no request was sent on during the last interval, too.
    pub while_idle: bool,
    pub held: Held,
}

/// An I/O that counts the bytes read through it, for the window measurements.
pub struct Counted<T> {
    io: T,
    received: Arc<AtomicU64>,
}

impl<T> Counted<T> {
    pub fn new(io: T) -> (Self, Arc<AtomicU64>) {
        let received = Arc::new(AtomicU64::new(0));
        (
            Counted {
                io,
                received: received.clone(),
            },
            received,
        )
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.received.fetch_add(read as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// How one connection ended.
#[derive(Debug)]
pub enum Ended {
    /// h2's connection future finished: closed by either side, or failed.
    Closed(Result<(), h2::Error>),
    /// A PING went unanswered for [`KEEP_ALIVE_TIMEOUT`].
    Unresponsive,
}

/// The PING in flight.
struct InFlight {
    sent_at: Instant,
    /// Bytes received when it was sent.
    received: u64,
}

/// One connection's task: resolves when the connection is over.
pub struct Driver<T> {
    connection: h2::client::Connection<Counted<T>, Bytes>,
    pings: PingPong,
    received: Arc<AtomicU64>,
    /// `None` once the windows are at their limit.
    bdp: Option<Bdp>,
    /// Bytes received when a measurement was last considered: the clock is read only once
    /// another [`BDP_MIN_SAMPLE`] has arrived since.
    considered: u64,
    /// No BDP PING before this (the measurements' pause), checked only once enough has
    /// arrived since the last look: a deadline rather than a timer, since only arriving data
    /// needs it.
    next_bdp_at: Option<Instant>,
    ping: Option<InFlight>,
    keep_alive: Option<KeepAlive>,
    /// With keep-alive: the next check, or sooner the deadline of the PING in flight.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Driver<T> {
    /// `received` counts the bytes read through the connection's [`Counted`] I/O. `None` if
    /// h2 gives no PING handle (taken already).
    pub fn new(
        mut connection: h2::client::Connection<Counted<T>, Bytes>,
        received: Arc<AtomicU64>,
        keep_alive: Option<KeepAlive>,
    ) -> Option<Self> {
        let pings = connection.ping_pong()?;
        let timer = keep_alive
            .as_ref()
            .map(|keep_alive| Box::pin(tokio::time::sleep(keep_alive.interval)));
        Some(Driver {
            connection,
            pings,
            received,
            bdp: Some(Bdp::new(INITIAL_WINDOW)),
            considered: 0,
            next_bdp_at: None,
            ping: None,
            keep_alive,
            timer,
        })
    }

    fn send_ping(&mut self, now: Instant) -> bool {
        if self.pings.send_ping(Ping::opaque()).is_err() {
            return false;
        }
        self.ping = Some(InFlight {
            sent_at: now,
            received: self.received.load(Ordering::Relaxed),
        });
        true
    }

    /// The PING in flight was answered: measure, and maybe grow the windows.
    fn answered(&mut self, ping: InFlight) -> Result<(), h2::Error> {
        let Some(bdp) = self.bdp.as_mut() else {
            return Ok(());
        };
        let now = Instant::now();
        let bytes = self.received.load(Ordering::Relaxed) - ping.received;
        if let Some(window) = bdp.calculate(bytes, now - ping.sent_at) {
            self.connection.set_target_window_size(window);
            self.connection.set_initial_window_size(window)?;
        }
        if bdp.window == BDP_LIMIT {
            self.bdp = None;
        } else {
            self.next_bdp_at = Some(now + bdp.ping_delay);
        }
        Ok(())
    }

    /// With no PING in flight, one for a measurement when enough has arrived since the last
    /// look and the pause is over. True when one went. During the pause the clock is read once
    /// per [`BDP_MIN_SAMPLE`] received, not on every poll: small answers arriving steadily
    /// would otherwise cost a clock reading each.
    fn maybe_measure(&mut self) -> bool {
        if self.bdp.is_none() {
            return false;
        }
        let received = self.received.load(Ordering::Relaxed);
        if received - self.considered < BDP_MIN_SAMPLE {
            return false;
        }
        self.considered = received;
        let now = Instant::now();
        if self.next_bdp_at.is_some_and(|at| now < at) {
            return false;
        }
        self.send_ping(now)
    }

    /// The keep-alive timer fired: the PING in flight is overdue, or it is time for one.
    /// `Err` when the connection is to be closed; `Ok(true)` when a PING went.
    fn keep_alive_due(&mut self) -> Result<bool, Ended> {
        let now = Instant::now();
        let (Some(timer), Some(keep_alive)) = (self.timer.as_mut(), &self.keep_alive) else {
            return Ok(false);
        };
        if let Some(ping) = &self.ping {
            let deadline = ping.sent_at + KEEP_ALIVE_TIMEOUT;
            if now >= deadline {
                return Err(Ended::Unresponsive);
            }
            timer.as_mut().reset(deadline);
            return Ok(false);
        }
        match (keep_alive.held)() {
            None => {
                // The lane let go: no more keep-alive; the connection ends with its streams.
                self.keep_alive = None;
                self.timer = None;
                Ok(false)
            }
            Some(false) if !keep_alive.while_idle => {
                timer.as_mut().reset(now + keep_alive.interval);
                Ok(false)
            }
            Some(_) => {
                timer.as_mut().reset(now + KEEP_ALIVE_TIMEOUT);
                Ok(self.send_ping(now))
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Future for Driver<T> {
    type Output = Ended;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Ended> {
        let this = &mut *self;
        loop {
            if let Poll::Ready(closed) = Pin::new(&mut this.connection).poll(cx) {
                return Poll::Ready(Ended::Closed(closed));
            }
            if this.ping.is_some() {
                match this.pings.poll_pong(cx) {
                    Poll::Ready(Ok(_pong)) => {
                        let ping = this.ping.take().expect("checked above");
                        if let Err(error) = this.answered(ping) {
                            return Poll::Ready(Ended::Closed(Err(error)));
                        }
                    }
                    // The connection is closing (GOAWAY) and takes no more PINGs: no more
                    // measurements or keep-alive deadlines, so streams still finishing on it
                    // are not cut; its own future reports how it ends.
                    Poll::Ready(Err(_)) => {
                        this.ping = None;
                        this.bdp = None;
                        this.keep_alive = None;
                        this.timer = None;
                    }
                    Poll::Pending => {}
                }
            }
            // A PING just queued goes round again: the connection writes it.
            let mut pinged = this.ping.is_none() && this.maybe_measure();
            if let Some(timer) = this.timer.as_mut()
                && timer.as_mut().poll(cx).is_ready()
            {
                match this.keep_alive_due() {
                    Ok(sent) => pinged |= sent,
                    Err(ended) => return Poll::Ready(ended),
                }
                // Registers the timer as reset.
                if let Some(timer) = this.timer.as_mut() {
                    let _ = timer.as_mut().poll(cx);
                }
            }
            if !pinged {
                return Poll::Pending;
            }
        }
    }
}

/// The bandwidth-delay product estimate behind the adaptive windows: hyper's (`proto::h2::ping`)
/// as it stands, so the lanes' windows grow as hyper's connections' did.
#[derive(Debug)]
struct Bdp {
    /// The current window, in bytes.
    window: u32,
    /// The largest bandwidth seen, bytes per second.
    max_bandwidth: f64,
    /// Moving average of the round trip, seconds.
    rtt: f64,
    /// The pause between measurements: halved when the window grows, quadrupled (up to 10 s)
    /// after two measurements in a row that do not grow it.
    ping_delay: Duration,
    stable_count: u32,
}

impl Bdp {
    fn new(window: u32) -> Self {
        Bdp {
            window,
            max_bandwidth: 0.0,
            rtt: 0.0,
            ping_delay: Duration::from_millis(100),
            stable_count: 0,
        }
    }

    /// `bytes` arrived during one PING's round trip of `rtt`: the new window, if it grows.
    fn calculate(&mut self, bytes: u64, rtt: Duration) -> Option<u32> {
        if self.window == BDP_LIMIT {
            self.stabilize_delay();
            return None;
        }
        let rtt = rtt.as_secs_f64();
        if self.rtt == 0.0 {
            self.rtt = rtt;
        } else {
            self.rtt += (rtt - self.rtt) * 0.125;
        }
        let bandwidth = bytes as f64 / (self.rtt * 1.5);
        if bandwidth < self.max_bandwidth {
            self.stabilize_delay();
            return None;
        }
        self.max_bandwidth = bandwidth;
        // A sample of at least 2/3 of the window means the window may be what limits it.
        if bytes >= u64::from(self.window) * 2 / 3 {
            self.window = u32::try_from((bytes * 2).min(u64::from(BDP_LIMIT))).unwrap_or(BDP_LIMIT);
            self.stable_count = 0;
            self.ping_delay /= 2;
            Some(self.window)
        } else {
            self.stabilize_delay();
            None
        }
    }

    fn stabilize_delay(&mut self) {
        if self.ping_delay < Duration::from_secs(10) {
            self.stable_count += 1;
            if self.stable_count >= 2 {
                self.ping_delay *= 4;
                self.stable_count = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A driven client connection whose server completed the handshake and then stopped
    /// reading: no PING of its is ever answered. Its handle comes back too: a connection with
    /// none left closes.
    async fn unanswered(
        keep_alive: KeepAlive,
    ) -> (
        h2::client::SendRequest<Bytes>,
        tokio::task::JoinHandle<Ended>,
    ) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let server = h2::server::handshake(server_io).await.unwrap();
            // Its SETTINGS are sent; from here on nothing is read or answered.
            std::future::pending::<()>().await;
            drop(server);
        });
        let (io, received) = Counted::new(client_io);
        let (sender, connection) = h2::client::handshake(io).await.unwrap();
        let driver = Driver::new(connection, received, Some(keep_alive)).unwrap();
        (sender, tokio::spawn(driver))
    }

    const INTERVAL: Duration = Duration::from_secs(30);

    fn every_interval(while_idle: bool, held: fn() -> Option<bool>) -> KeepAlive {
        KeepAlive {
            interval: INTERVAL,
            while_idle,
            held: Box::new(held),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_leaves_a_ping_unanswered_is_closed() {
        let keep_alive = every_interval(true, || Some(false));
        let (_sender, driver) = unanswered(keep_alive).await;
        // The first PING goes out after an interval; its answer may take the whole timeout.
        tokio::time::sleep(INTERVAL + KEEP_ALIVE_TIMEOUT - Duration::from_secs(1)).await;
        assert!(!driver.is_finished());
        assert!(matches!(driver.await.unwrap(), Ended::Unresponsive));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_pinged_only_when_asked_to_be() {
        // Not `while_idle`, and no request sent: no PING, so the silent peer is never noticed.
        let keep_alive = every_interval(false, || Some(false));
        let (_sender, driver) = unanswered(keep_alive).await;
        tokio::time::sleep(INTERVAL * 5).await;
        assert!(!driver.is_finished());
        driver.abort();
        // Nor one the lane has let go of.
        let keep_alive = every_interval(true, || None);
        let (_sender, driver) = unanswered(keep_alive).await;
        tokio::time::sleep(INTERVAL * 5).await;
        assert!(!driver.is_finished());
        driver.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_in_use_is_pinged_each_interval() {
        let keep_alive = every_interval(false, || Some(true));
        let (_sender, driver) = unanswered(keep_alive).await;
        tokio::time::sleep(INTERVAL + KEEP_ALIVE_TIMEOUT + Duration::from_secs(1)).await;
        assert!(matches!(driver.await.unwrap(), Ended::Unresponsive));
    }

    #[test]
    fn the_window_doubles_a_sample_that_fills_two_thirds_of_it_up_to_the_limit() {
        let mut bdp = Bdp::new(INITIAL_WINDOW);
        let rtt = Duration::from_millis(20);
        // Less than 2/3 of the window in a round trip: the window is not what limits.
        assert_eq!(bdp.calculate(10_000, rtt), None);
        assert_eq!(bdp.calculate(50_000, rtt), Some(100_000));
        assert_eq!(bdp.calculate(90_000, rtt), Some(180_000));
        let mut window = 180_000;
        for _ in 0..20 {
            if let Some(grown) = bdp.calculate(u64::from(window), rtt) {
                window = grown;
            }
        }
        assert_eq!(window, BDP_LIMIT);
        assert_eq!(bdp.calculate(u64::from(BDP_LIMIT) * 4, rtt), None);
    }

    #[test]
    fn measurements_slow_down_once_the_window_stops_growing() {
        let mut bdp = Bdp::new(INITIAL_WINDOW);
        let rtt = Duration::from_millis(20);
        assert!(bdp.calculate(60_000, rtt).is_some());
        assert_eq!(bdp.ping_delay, Duration::from_millis(50));
        for _ in 0..4 {
            assert_eq!(bdp.calculate(1_000, rtt), None);
        }
        assert_eq!(bdp.ping_delay, Duration::from_millis(800));
    }
}
