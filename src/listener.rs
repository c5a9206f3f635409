//! Listeners: bind, accept, and serve each connection with HTTP/1.1 or h2c.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::proxy::{ConnectionInfo, ProxyService};
use crate::state::SharedState;
use crate::telemetry::AccessLogLayer;

/// How long a client may take to send a request head (slowloris bound). hyper only enforces
/// this when a timer is set, which `server_builder` does.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest request head accepted (request line plus headers); beyond it hyper answers 431.
const MAX_REQUEST_HEAD: usize = 64 * 1024;
/// Pause after an accept error such as EMFILE, instead of spinning.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running proxy: its listeners, and the handle to reload or stop it.
pub struct RunningProxy {
    state: Arc<SharedState>,
    local_addrs: Vec<SocketAddr>,
    stop_accepting: watch::Sender<bool>,
    accept_loops: JoinSet<()>,
    graceful: Arc<GracefulShutdown>,
}

/// What a shutdown achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum ShutdownOutcome {
    /// Every in-flight request finished.
    Drained,
    /// The grace period ran out with connections still open; they were cut.
    GraceExpired,
}

/// Binds every `server.listen` address and starts serving.
pub async fn start(config: Config) -> Result<RunningProxy, StartError> {
    let mut listeners = Vec::with_capacity(config.server.listen.len());
    for addr in &config.server.listen {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind {
                addr: *addr,
                source,
            })?;
        listeners.push(listener);
    }
    let local_addrs = listeners
        .iter()
        .map(|l| l.local_addr().expect("a bound listener has an address"))
        .collect::<Vec<_>>();
    let state = Arc::new(SharedState::new(config));
    let (stop_accepting, stop_rx) = watch::channel(false);
    let graceful = Arc::new(GracefulShutdown::new());
    let builder = Arc::new(server_builder());
    let mut accept_loops = JoinSet::new();
    for listener in listeners {
        accept_loops.spawn(accept_loop(
            listener,
            state.clone(),
            builder.clone(),
            graceful.clone(),
            stop_rx.clone(),
        ));
    }
    for addr in &local_addrs {
        tracing::info!(%addr, "listening");
    }
    Ok(RunningProxy {
        state,
        local_addrs,
        stop_accepting,
        accept_loops,
        graceful,
    })
}

fn server_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_REQUEST_HEAD)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_REQUEST_HEAD as u32);
    builder
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<SharedState>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    graceful: Arc<GracefulShutdown>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => return,
        };
        match accepted {
            Ok((stream, peer)) => serve_tcp(stream, peer, &state, &builder, &graceful),
            Err(error) => {
                // EMFILE and friends are transient: keep the listener, slow down.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

fn serve_tcp(
    stream: TcpStream,
    peer: SocketAddr,
    state: &Arc<SharedState>,
    builder: &auto::Builder<TokioExecutor>,
    graceful: &GracefulShutdown,
) {
    let _ = stream.set_nodelay(true);
    let info = ConnectionInfo {
        peer: Some(peer),
        local: stream.local_addr().ok(),
    };
    let service = tower::ServiceBuilder::new()
        .layer(AccessLogLayer)
        .service(ProxyService::new(state.clone(), info));
    let connection = builder
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
        .into_owned();
    let connection = graceful.watch(connection);
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%peer, error = %crate::error::error_chain(error.as_ref()), "connection ended with an error");
        }
    });
}

impl RunningProxy {
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    pub fn state(&self) -> &Arc<SharedState> {
        &self.state
    }

    /// Stops accepting, lets in-flight requests finish for up to `grace`, then returns.
    pub async fn shutdown(mut self, grace: Duration) -> ShutdownOutcome {
        self.state.start_draining();
        let _ = self.stop_accepting.send(true);
        while self.accept_loops.join_next().await.is_some() {}
        // The accept loops held the other references; they have all returned.
        let Ok(graceful) = Arc::try_unwrap(self.graceful) else {
            return ShutdownOutcome::GraceExpired;
        };
        match tokio::time::timeout(grace, graceful.shutdown()).await {
            Ok(()) => ShutdownOutcome::Drained,
            Err(_) => ShutdownOutcome::GraceExpired,
        }
    }
}
