//! Listeners: bind TCP and unix sockets, accept, and serve each connection with HTTP/1.1 or h2c.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::config::{Config, ListenAddr, ServerSettings};
use crate::proxy::admin::ListenerRole;
use crate::proxy::{ConnectionInfo, ProxyService};
use crate::runtime::reload::ReloadHandle;
use crate::runtime::state::SharedState;
use crate::server::access_log::AccessLogLayer;
use crate::server::idle::{PARK_AFTER, ParkSlot, ParkingIo, wait_for_byte};
use crate::server::limits::{InFlightLimitLayer, OpenRequests, SendTimeoutIo};
use crate::server::stall::StreamExecutor;

/// The largest request head accepted (request line plus headers); beyond it hyper answers 431.
const MAX_REQUEST_HEAD: usize = 64 * 1024;
/// Pause after an accept error such as EMFILE, instead of spinning.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: ListenAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on unix:{}: another process is serving on that socket", .0.display())]
    SocketInUse(PathBuf),
    #[error("cannot listen on unix:{}: the path exists and is not a socket; remove it or pick another path", .0.display())]
    NotASocket(PathBuf),
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A running proxy: its listeners, and the handles to reload or stop it.
pub struct RunningProxy {
    state: Arc<SharedState>,
    local_addrs: Vec<SocketAddr>,
    admin_addrs: Vec<SocketAddr>,
    unix_paths: Vec<PathBuf>,
    stop_accepting: watch::Sender<bool>,
    /// Set when the grace period runs out: every connection still open is closed.
    cut_connections: watch::Sender<bool>,
    accept_loops: JoinSet<()>,
    graceful: Arc<GracefulShutdown>,
    reload: ReloadHandle,
}

/// What a shutdown achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum ShutdownOutcome {
    /// Every in-flight request finished.
    Drained,
    /// The grace period ran out with connections still open; they were cut.
    GraceExpired,
}

/// Binds every `server.listen` and `admin.listen` address and starts serving.
pub async fn start(config: Config) -> Result<RunningProxy, StartError> {
    let mode = config.server.unix_socket_mode;
    let mut listeners = Vec::with_capacity(config.server.listen.len());
    for addr in &config.server.listen {
        listeners.push(bind(addr, mode).await?);
    }
    let mut admin_listeners = Vec::with_capacity(config.admin.listen.len());
    for addr in &config.admin.listen {
        admin_listeners.push(bind(addr, mode).await?);
    }
    let tcp_addrs = |listeners: &[Listener]| {
        listeners
            .iter()
            .filter_map(|l| match l {
                Listener::Tcp(tcp) => tcp.local_addr().ok(),
                Listener::Unix(..) => None,
            })
            .collect::<Vec<_>>()
    };
    let local_addrs = tcp_addrs(&listeners);
    let admin_addrs = tcp_addrs(&admin_listeners);
    let unix_paths = listeners
        .iter()
        .filter_map(|l| match l {
            Listener::Unix(_, path) => Some(path.clone()),
            Listener::Tcp(_) => None,
        })
        .collect::<Vec<_>>();
    log_started(&config, &listeners, &admin_listeners);
    let server = config.server.clone();
    let admin_elsewhere = !admin_listeners.is_empty();
    let state = Arc::new(SharedState::new(config));
    let reload = ReloadHandle::new(state.clone());
    reload.start_verifiers();
    reload.watch();
    let (stop_accepting, stop_rx) = watch::channel(false);
    let (cut_connections, cut_rx) = watch::channel(false);
    let graceful = Arc::new(GracefulShutdown::new());
    // The admin listener gets budgets of its own: a flood of proxied requests must not keep
    // a probe or a scrape out.
    let context = |listener| {
        Arc::new(ServeContext {
            state: state.clone(),
            listener,
            builder: server_builder(&server),
            connections: Arc::new(Semaphore::new(server.max_connections)),
            in_flight: Arc::new(Semaphore::new(server.max_in_flight)),
            send_timeout: server.send_timeout,
            idle_timeout: server.header_read_timeout,
            too_many_connections: too_many_connections(),
            cut: cut_rx.clone(),
            stop: stop_rx.clone(),
        })
    };
    let main_context = context(ListenerRole::Main { admin_elsewhere });
    let admin_context = context(ListenerRole::Admin);
    let mut accept_loops = JoinSet::new();
    let served = listeners
        .into_iter()
        .map(|l| (l, &main_context))
        .chain(admin_listeners.into_iter().map(|l| (l, &admin_context)));
    for (listener, context) in served {
        accept_loops.spawn(accept_loop(
            listener,
            context.clone(),
            graceful.clone(),
            stop_rx.clone(),
        ));
    }
    Ok(RunningProxy {
        state,
        local_addrs,
        admin_addrs,
        unix_paths,
        stop_accepting,
        cut_connections,
        accept_loops,
        graceful,
        reload,
    })
}

/// The start-up line: what runs, from which config, where, serving how much.
fn log_started(config: &Config, listeners: &[Listener], admin_listeners: &[Listener]) {
    let describe = |listeners: &[Listener]| {
        listeners
            .iter()
            .map(|l| match l {
                Listener::Tcp(tcp) => tcp
                    .local_addr()
                    .map_or_else(|e| format!("tcp ({e})"), |a| a.to_string()),
                Listener::Unix(_, path) => format!("unix:{}", path.display()),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let admin_listen = (!admin_listeners.is_empty()).then(|| describe(admin_listeners));
    tracing::info!(
        version = crate::base::build_info::long_version(),
        config = %crate::telemetry::logging::resolved(&config.path).display(),
        listen = %describe(listeners),
        admin_listen,
        routes = config.routes.len(),
        credentials = config.credentials.len(),
        "started"
    );
}

async fn bind(addr: &ListenAddr, unix_mode: u32) -> Result<Listener, StartError> {
    let bind_error = |source| StartError::Bind {
        addr: addr.clone(),
        source,
    };
    match addr {
        ListenAddr::Tcp(socket) => TcpListener::bind(socket)
            .await
            .map(Listener::Tcp)
            .map_err(bind_error),
        ListenAddr::Unix(path) => {
            remove_stale_socket(path).await?;
            // Bind beside the final path, set the mode, then rename into place: the socket
            // is never reachable with the default mode.
            let staging = path.with_file_name(format!(
                ".{}.{}.tmp",
                path.file_name()
                    .map_or_else(|| "socket".into(), |n| n.to_string_lossy()),
                std::process::id()
            ));
            let _ = std::fs::remove_file(&staging);
            let listener = UnixListener::bind(&staging).map_err(bind_error)?;
            use std::os::unix::fs::PermissionsExt;
            let placed =
                std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(unix_mode))
                    .and_then(|()| std::fs::rename(&staging, path));
            if let Err(error) = placed {
                let _ = std::fs::remove_file(&staging);
                return Err(bind_error(error));
            }
            Ok(Listener::Unix(listener, path.clone()))
        }
    }
}

/// A socket file left by a process that died is removed; one that still answers, or a path
/// that is not a socket at all, is left alone and reported.
async fn remove_stale_socket(path: &Path) -> Result<(), StartError> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !metadata.file_type().is_socket() {
        return Err(StartError::NotASocket(path.to_owned()));
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(StartError::SocketInUse(path.to_owned()));
    }
    tracing::info!(path = %path.display(), "removing stale socket file");
    std::fs::remove_file(path).map_err(|source| StartError::Bind {
        addr: ListenAddr::Unix(path.to_owned()),
        source,
    })
}

/// What every connection is served with. Listener-level settings (head timeout, caps) are
/// fixed at start-up; a reload that changes them is reported, not applied.
struct ServeContext {
    state: Arc<SharedState>,
    listener: ListenerRole,
    builder: auto::Builder<StreamExecutor>,
    connections: Arc<Semaphore>,
    in_flight: Arc<Semaphore>,
    send_timeout: Duration,
    /// `server.header_read_timeout`, also the bound on a connection with no request open.
    idle_timeout: Duration,
    too_many_connections: Bytes,
    /// Becomes `true` when shutdown's grace period has run out.
    cut: watch::Receiver<bool>,
    /// Becomes `true` when shutdown begins: connections finish their requests and close.
    stop: watch::Receiver<bool>,
}

fn server_builder(server: &ServerSettings) -> auto::Builder<StreamExecutor> {
    let mut builder = auto::Builder::new(StreamExecutor::new(server.send_timeout));
    // No head timeout of hyper's: each connection's task closes a connection with no request
    // open for `server.header_read_timeout` (`OpenRequests::idle_for`), which bounds a
    // trickled head (slowloris) the same way, counted from the end of the previous request.
    // hyper's would arm, allocate and cancel a timer for every request on top of it, and it is
    // what hyper's HTTP/1 side would use a timer for, so it has none.
    builder
        .http1()
        .header_read_timeout(None)
        .max_buf_size(MAX_REQUEST_HEAD)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_REQUEST_HEAD as u32)
        .max_concurrent_streams(server.max_concurrent_streams);
    builder
}

async fn accept_loop(
    listener: Listener,
    context: Arc<ServeContext>,
    graceful: Arc<GracefulShutdown>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = accept(&listener) => accepted,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        match accepted {
            Ok(Accepted::Tcp(stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let info = ConnectionInfo {
                    peer: Some(peer),
                    local: stream.local_addr().ok(),
                    listener: context.listener,
                };
                // Before the connection counts against server.max_connections.
                if let Some(refusal) = crate::server::gate::refusal(&context.state, &info) {
                    crate::server::gate::refuse(stream, peer, refusal);
                    continue;
                }
                serve(stream, info, &context, &graceful);
            }
            Ok(Accepted::Unix(stream)) => {
                let info = ConnectionInfo {
                    peer: None,
                    local: None,
                    listener: context.listener,
                };
                serve(stream, info, &context, &graceful);
            }
            Err(error) => {
                // EMFILE and friends are transient: keep the listener, slow down.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream, SocketAddr),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> std::io::Result<Accepted> {
    match listener {
        Listener::Tcp(tcp) => tcp.accept().await.map(|(s, peer)| Accepted::Tcp(s, peer)),
        Listener::Unix(unix, _) => unix.accept().await.map(|(s, _)| Accepted::Unix(s)),
    }
}

/// Sent, then the connection closed, when `server.max_connections` are already open: the
/// connection is refused before hyper sees it, so the response is written by hand.
fn too_many_connections() -> Bytes {
    let body = crate::error::error_json(
        "Too many connections",
        "the proxy is at server.max_connections; retry shortly",
    );
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\n{}: overloaded\r\ncontent-type: application/json\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n",
        crate::error::REASON_HEADER,
        body.len()
    );
    [head.as_bytes(), &body].concat().into()
}

fn serve<I>(
    mut io: I,
    info: ConnectionInfo,
    context: &Arc<ServeContext>,
    graceful: &GracefulShutdown,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok(connection_permit) = context.connections.clone().try_acquire_owned() else {
        tracing::warn!(peer = ?info.peer, "server.max_connections reached; refusing a connection");
        let refusal = context.too_many_connections.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = tokio::time::timeout(Duration::from_secs(1), io.write_all(&refusal)).await;
        });
        return;
    };
    let open = OpenRequests::default();
    let slot = Arc::new(ParkSlot::default());
    let io = ParkingIo::new(SendTimeoutIo::new(io, context.send_timeout), slot.clone());
    // Never used to watch a connection: shutdown waits until every connection task has
    // dropped it, parked ones included; the task itself follows `stop`.
    let drain_guard = graceful.watcher();
    let context = context.clone();
    tokio::spawn(async move {
        let mut io = Some(io);
        while let Some(current) = io.take() {
            if !context.serve_http(current, &info, &open, &slot).await {
                break;
            }
            let Some(parked) = slot.take() else {
                break;
            };
            io = context.wait_parked(parked, &info, &open, &slot).await;
        }
        drop(drain_guard);
        drop(connection_permit);
    });
}

/// What ends or changes a connection's service besides hyper's connection itself.
enum Control {
    /// Shutdown's grace period is over.
    Cut,
    /// Shutdown began: finish the requests open, take no more.
    Stop,
    /// No request open for `server.header_read_timeout`.
    Idle,
    /// No request open for [`PARK_AFTER`]: park, if the connection can.
    Park,
}

/// Resolves when `signal` turns true; never, if its sender is gone (a `RunningProxy` dropped
/// without `shutdown` leaves its connections be).
async fn signalled(mut signal: watch::Receiver<bool>) {
    if signal.wait_for(|on| *on).await.is_err() {
        std::future::pending::<()>().await;
    }
}

type ConnectionIo<I> = ParkingIo<SendTimeoutIo<I>>;

impl ServeContext {
    /// Serves HTTP on `io` until hyper's connection ends; true when it ended by parking (the
    /// socket is then in `slot`) or cleanly, false when the connection is to be closed.
    async fn serve_http<I>(
        &self,
        io: ConnectionIo<I>,
        info: &ConnectionInfo,
        open: &OpenRequests,
        slot: &ParkSlot<SendTimeoutIo<I>>,
    ) -> bool
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = info.peer;
        let service = tower::ServiceBuilder::new()
            .layer(AccessLogLayer::new(self.state.metrics.clone()).with_connection(info))
            .layer(InFlightLimitLayer::new(
                self.in_flight.clone(),
                open.clone(),
            ))
            .service(ProxyService::new(self.state.clone(), info.clone()).into_service());
        // Boxed: a parked connection's task must not keep room for hyper's connection.
        let mut connection = Box::pin(
            self.builder
                .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
                .into_owned(),
        );
        let mut stopping = *self.stop.borrow();
        if stopping {
            connection.as_mut().graceful_shutdown();
        }
        // What else ends or changes the connection. Held apart and polled only when one of
        // them was woken: the task wakes several times per request, and each poll of a watcher
        // takes a lock (the shutdown signals) or registers a waker (the idle timers).
        let mut controls: FuturesUnordered<Pin<Box<dyn Future<Output = Control> + Send + '_>>> =
            FuturesUnordered::new();
        controls.push(Box::pin(async {
            signalled(self.cut.clone()).await;
            Control::Cut
        }));
        if !stopping {
            controls.push(Box::pin(async {
                signalled(self.stop.clone()).await;
                Control::Stop
            }));
        }
        // Before its first request, between requests, or an h2 connection with no stream.
        controls.push(Box::pin(async {
            open.idle_for(self.idle_timeout).await;
            Control::Idle
        }));
        controls.push(Box::pin(async {
            open.idle_for(PARK_AFTER).await;
            Control::Park
        }));
        loop {
            tokio::select! {
                biased;
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(?peer, error = %crate::base::error_chain(error.as_ref()), "connection ended with an error");
                    }
                    return !stopping;
                }
                Some(control) = controls.next() => match control {
                    Control::Cut => {
                        tracing::debug!(?peer, "shutdown grace period over: connection closed");
                        return false;
                    }
                    Control::Stop => {
                        stopping = true;
                        connection.as_mut().graceful_shutdown();
                    }
                    Control::Idle => {
                        tracing::debug!(?peer, "no request for server.header_read_timeout: connection closed");
                        return false;
                    }
                    // An h2 connection never parks, nor one that is closing.
                    Control::Park if !stopping && slot.may_park() => {
                        // The connection is polled again on the next turn, and parks if it can.
                        slot.request();
                        controls.push(Box::pin(async {
                            tokio::time::sleep(PARK_AFTER).await;
                            open.idle_for(PARK_AFTER).await;
                            Control::Park
                        }));
                    }
                    Control::Park => {}
                },
            }
        }
    }

    /// Holds a parked socket until its next byte (a new hyper connection then), the client's
    /// close, `header_read_timeout`, or shutdown.
    async fn wait_parked<I>(
        &self,
        mut parked: SendTimeoutIo<I>,
        info: &ConnectionInfo,
        open: &OpenRequests,
        slot: &Arc<ParkSlot<SendTimeoutIo<I>>>,
    ) -> Option<ConnectionIo<I>>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        tokio::select! {
            byte = wait_for_byte(&mut parked) => match byte {
                Ok(Some(first)) => Some(ParkingIo::resume(parked, first, slot.clone())),
                _ => None,
            },
            () = open.idle_for(self.idle_timeout) => {
                tracing::debug!(peer = ?info.peer, "no request for server.header_read_timeout: connection closed");
                None
            }
            () = signalled(self.stop.clone()) => None,
        }
    }
}

impl RunningProxy {
    /// TCP addresses actually bound (port 0 resolved).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// TCP addresses of the `admin.listen` listeners actually bound.
    pub fn admin_addrs(&self) -> &[SocketAddr] {
        &self.admin_addrs
    }

    pub fn unix_paths(&self) -> &[PathBuf] {
        &self.unix_paths
    }

    pub fn state(&self) -> &Arc<SharedState> {
        &self.state
    }

    /// The handle that re-reads config and secrets; clone it into signal or file watchers.
    pub fn reload_handle(&self) -> ReloadHandle {
        self.reload.clone()
    }

    /// Stops accepting, lets in-flight requests finish for up to `grace`, then returns.
    pub async fn shutdown(mut self, grace: Duration) -> ShutdownOutcome {
        self.state.start_draining();
        self.reload.stop();
        let _ = self.stop_accepting.send(true);
        while self.accept_loops.join_next().await.is_some() {}
        // The accept loops held the other references, and they have all returned.
        let drained = match Arc::try_unwrap(self.graceful) {
            Ok(graceful) => tokio::time::timeout(grace, graceful.shutdown())
                .await
                .is_ok(),
            Err(_) => false,
        };
        if drained {
            ShutdownOutcome::Drained
        } else {
            let _ = self.cut_connections.send(true);
            ShutdownOutcome::GraceExpired
        }
    }
}
