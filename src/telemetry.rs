//! Logging: subscriber set-up and the access log, one structured line per request.

use std::convert::Infallible;
use std::future::Future;
use std::io::IsTerminal;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::body::{BoxError, ByteCounter};
use crate::error::REASON_HEADER;
use crate::metrics::{Metrics, RequestRecord};
use crate::proxy::MatchedRoute;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The level used when `RUST_LOG` is unset.
const DEFAULT_FILTER: &str = "info";

/// Installs the global subscriber: `RUST_LOG` filtering, text on a terminal, JSON otherwise.
///
/// Lines are written by a background thread (a bounded queue that blocks rather than drops
/// when full), so request threads never wait on the stderr pipe. Keep the returned guard alive
/// until exit: dropping it flushes what is queued.
pub fn init_logging(format: Option<LogFormat>) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
    let format = format.unwrap_or(if std::io::stderr().is_terminal() {
        LogFormat::Text
    } else {
        LogFormat::Json
    });
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        // The default queue preallocates 128,000 lines (4 MiB resident at idle); 8,192 absorbs
        // bursts and blocks beyond them.
        .buffered_lines_limit(8192)
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(format == LogFormat::Text && std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    guard
}

/// Request-body bytes, counted by the forwarding phase, read by the access log.
#[derive(Clone)]
pub struct RequestBytes(pub Arc<ByteCounter>);

/// Tower layer that writes the access log line, and records request metrics, when the response
/// body finishes or is dropped.
#[derive(Clone)]
pub struct AccessLogLayer {
    metrics: Arc<Metrics>,
}

impl AccessLogLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        AccessLogLayer { metrics }
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AccessLog<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B> Service<Request<Incoming>> for AccessLog<S>
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes, Error = BoxError>,
{
    type Response = Response<LoggedBody<B>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        let started = Instant::now();
        let method = request.method().clone();
        let uri = request.uri().clone();
        let bytes_in = Arc::new(ByteCounter::default());
        request
            .extensions_mut()
            .insert(RequestBytes(bytes_in.clone()));
        let metrics = self.metrics.clone();
        metrics.in_flight.inc();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            let (parts, body) = response.into_parts();
            let record = AccessRecord {
                metrics,
                started,
                method,
                uri,
                status: parts.status,
                route: parts.extensions.get::<MatchedRoute>().cloned(),
                reason: parts
                    .headers
                    .get(REASON_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
                bytes_in,
                bytes_out: 0,
                // hyper never polls a body that is already at its end (HEAD, 304, local errors).
                outcome: if body.is_end_stream() {
                    Outcome::Complete
                } else {
                    Outcome::Incomplete
                },
            };
            Ok(Response::from_parts(
                parts,
                LoggedBody {
                    inner: body,
                    record,
                },
            ))
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Complete,
    Failed,
    /// Dropped before the end: the client went away, or the connection was cut.
    Incomplete,
}

/// Everything the access line needs; logged on drop, so aborted transfers are logged too.
struct AccessRecord {
    metrics: Arc<Metrics>,
    started: Instant,
    method: Method,
    uri: Uri,
    status: StatusCode,
    route: Option<MatchedRoute>,
    reason: Option<String>,
    bytes_in: Arc<ByteCounter>,
    bytes_out: u64,
    outcome: Outcome,
}

impl Drop for AccessRecord {
    fn drop(&mut self) {
        let route = self.route.as_ref().map(|r| &r.0);
        let duration = self.started.elapsed();
        self.metrics.in_flight.dec();
        self.metrics.record_request(&RequestRecord {
            route: route.map(|r| (&r.prefix, &r.credential.name)),
            method: &self.method,
            status: self.status,
            duration,
            bytes_in: self.bytes_in.get(),
            bytes_out: self.bytes_out,
        });
        tracing::info!(
            target: "access",
            method = %self.method,
            // The query is left out: it may carry identifiers nobody meant to log.
            path = self.uri.path(),
            route = route.map(|r| &*r.prefix),
            credential = route.map(|r| &*r.credential.name),
            status = self.status.as_u16(),
            duration_ms = duration.as_secs_f64() * 1000.0,
            bytes_in = self.bytes_in.get(),
            bytes_out = self.bytes_out,
            outcome = match self.outcome {
                Outcome::Complete => "complete",
                Outcome::Failed => "failed",
                Outcome::Incomplete => "incomplete",
            },
            reason = self.reason.as_deref(),
            "request"
        );
    }
}

pin_project! {
    /// The response body as sent to the client, counting bytes for the access log.
    pub struct LoggedBody<B> {
        #[pin]
        inner: B,
        record: AccessRecord,
    }
}

impl<B: Body<Data = Bytes, Error = BoxError>> Body for LoggedBody<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.record.bytes_out += data.len() as u64;
                }
                // hyper stops polling once the body says it has ended.
                if this.inner.is_end_stream() {
                    this.record.outcome = Outcome::Complete;
                }
            }
            Poll::Ready(Some(Err(_))) => this.record.outcome = Outcome::Failed,
            Poll::Ready(None) => this.record.outcome = Outcome::Complete,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
