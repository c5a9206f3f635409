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
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::body::{BoxError, ByteCounter};
use crate::cache::CacheStatus;
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

impl<S, RequestBody, B> Service<Request<RequestBody>> for AccessLog<S>
where
    RequestBody: Body,
    S: Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>,
    B: Body<Data = Bytes, Error = BoxError>,
{
    type Response = Response<LoggedBody<B>>;
    type Error = Infallible;
    type Future = AccessLogFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<RequestBody>) -> Self::Future {
        let started = Instant::now();
        let method = request.method().clone();
        let uri = request.uri().clone();
        // Most API calls have no body: they skip the counter and the extensions map it rides in.
        let bytes_in = (!request.body().is_end_stream()).then(|| {
            let counter = Arc::new(ByteCounter::default());
            request
                .extensions_mut()
                .insert(RequestBytes(counter.clone()));
            counter
        });
        self.metrics.in_flight.inc();
        AccessLogFuture {
            inner: self.inner.call(request),
            pending: Some(PendingRecord {
                metrics: self.metrics.clone(),
                started,
                method,
                uri,
                bytes_in,
            }),
        }
    }
}

/// What the access log knows before the response head exists.
struct PendingRecord {
    metrics: Arc<Metrics>,
    started: Instant,
    method: Method,
    uri: Uri,
    bytes_in: Option<Arc<ByteCounter>>,
}

/// Logged for a request dropped before its response head: the client went away (nginx's
/// "client closed request").
const CLIENT_CLOSED: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => panic!("499 is a valid status code"),
};

impl PendingRecord {
    /// Dropping the returned record writes the access line and the request metrics.
    fn into_record(
        self,
        status: StatusCode,
        route: Option<MatchedRoute>,
        reason: Option<String>,
        cache: Option<CacheStatus>,
        outcome: Outcome,
    ) -> AccessRecord {
        AccessRecord {
            metrics: self.metrics,
            started: self.started,
            method: self.method,
            uri: self.uri,
            status,
            route,
            reason,
            cache,
            bytes_in: self.bytes_in,
            bytes_out: 0,
            outcome,
        }
    }

    fn complete<B: Body>(self, response: Response<B>) -> Response<LoggedBody<B>> {
        let (parts, body) = response.into_parts();
        let route = parts.extensions.get::<MatchedRoute>().cloned();
        let reason = parts
            .headers
            .get(REASON_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // hyper never polls a body that is already at its end (HEAD, 304, local errors).
        let outcome = if body.is_end_stream() {
            Outcome::Complete
        } else {
            Outcome::Incomplete
        };
        let cache = parts.extensions.get::<CacheStatus>().copied();
        let record = self.into_record(parts.status, route, reason, cache, outcome);
        Response::from_parts(
            parts,
            LoggedBody {
                inner: body,
                record,
            },
        )
    }
}

pin_project! {
    /// [`AccessLog`]'s response future: named, so the layer adds no allocation per request.
    pub struct AccessLogFuture<F> {
        #[pin]
        inner: F,
        pending: Option<PendingRecord>,
    }

    impl<F> PinnedDrop for AccessLogFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            // Still pending: the connection went before the response head did.
            if let Some(pending) = this.project().pending.take() {
                drop(pending.into_record(CLIENT_CLOSED, None, None, None, Outcome::Incomplete));
            }
        }
    }
}

impl<F, B> Future for AccessLogFuture<F>
where
    F: Future<Output = Result<Response<B>, Infallible>>,
    B: Body<Data = Bytes, Error = BoxError>,
{
    type Output = Result<Response<LoggedBody<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(response) = std::task::ready!(this.inner.poll(cx));
        let pending = this
            .pending
            .take()
            .expect("AccessLogFuture polled after it completed");
        Poll::Ready(Ok(pending.complete(response)))
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
    /// How the response cache answered (`hit`, `miss`, `coalesced`, ...), when it took part.
    cache: Option<CacheStatus>,
    bytes_in: Option<Arc<ByteCounter>>,
    bytes_out: u64,
    outcome: Outcome,
}

impl Drop for AccessRecord {
    fn drop(&mut self) {
        let route = self.route.as_ref().map(|r| &r.0);
        let duration = self.started.elapsed();
        let bytes_in = self.bytes_in.as_ref().map_or(0, |counter| counter.get());
        self.metrics.in_flight.dec();
        self.metrics.record_request(&RequestRecord {
            route: route.map(|r| (&r.prefix, &r.credential.name)),
            method: &self.method,
            status: self.status,
            duration,
            bytes_in,
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
            bytes_in,
            bytes_out = self.bytes_out,
            outcome = match self.outcome {
                Outcome::Complete => "complete",
                Outcome::Failed => "failed",
                Outcome::Incomplete => "incomplete",
            },
            reason = self.reason.as_deref(),
            cache = self.cache.map(CacheStatus::as_str),
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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;

    use http_body_util::{BodyExt, Empty, Full};
    use tower::ServiceExt;

    use super::*;
    use crate::body::ProxyBody;

    /// Collects what the subscriber writes, for the assertions.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn access_lines(&self) -> Vec<serde_json::Value> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines()
                .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
                .filter(|line| line["target"] == "access")
                .collect()
        }
    }

    fn subscriber(captured: &Captured) -> impl tracing::Subscriber + Send + Sync {
        let captured = captured.clone();
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || captured.clone())
            .finish()
    }

    fn sample(metrics: &Metrics, series: &str) -> Option<String> {
        metrics
            .encode()
            .lines()
            .find(|line| line.starts_with(series))
            .map(|line| line.rsplit(' ').next().unwrap().to_owned())
    }

    #[tokio::test]
    async fn a_request_dropped_before_its_head_is_logged_as_client_closed() {
        let captured = Captured::default();
        let _logging = tracing::subscriber::set_default(subscriber(&captured));
        let metrics = Arc::new(Metrics::new());
        let never = tower::service_fn(|_: Request<Full<Bytes>>| {
            std::future::pending::<Result<Response<ProxyBody>, Infallible>>()
        });
        let mut service = AccessLogLayer::new(metrics.clone()).layer(never);
        let request = Request::post("/2.0/repositories/acme/widgets/issues?secret=1")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let pending = service.ready().await.unwrap().call(request);
        assert_eq!(metrics.in_flight.get(), 1);
        drop(pending);

        assert_eq!(metrics.in_flight.get(), 0);
        let counted = r#"bitbucket_auth_proxy_requests_total{route="",credential="",method="POST",status_class="4xx"}"#;
        assert_eq!(sample(&metrics, counted).as_deref(), Some("1"));
        let lines = captured.access_lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["status"], 499);
        assert_eq!(lines[0]["outcome"], "incomplete");
        assert_eq!(lines[0]["path"], "/2.0/repositories/acme/widgets/issues");
    }

    #[tokio::test]
    async fn a_request_without_a_body_gets_no_byte_counter_and_logs_its_response() {
        let captured = Captured::default();
        let _logging = tracing::subscriber::set_default(subscriber(&captured));
        let metrics = Arc::new(Metrics::new());
        let answer = tower::service_fn(|request: Request<Empty<Bytes>>| async move {
            assert!(request.extensions().get::<RequestBytes>().is_none());
            Ok::<_, Infallible>(Response::new(ProxyBody::local("{\"ok\":true}")))
        });
        let service = AccessLogLayer::new(metrics.clone()).layer(answer);
        let request = Request::get("/2.0/user").body(Empty::new()).unwrap();
        let response = service.oneshot(request).await.unwrap();
        assert_eq!(metrics.in_flight.get(), 1, "the body is still to be sent");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"{\"ok\":true}");

        assert_eq!(metrics.in_flight.get(), 0);
        let lines = captured.access_lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["status"], 200);
        assert_eq!(lines[0]["outcome"], "complete");
        assert_eq!(lines[0]["bytes_in"], 0);
        assert_eq!(lines[0]["bytes_out"], 11);
    }
}
