//! The access log: one structured line per request, with the request's id (see
//! [`crate::telemetry::request_id`]) on it and on every line logged while serving it, and the
//! request metrics recorded when the response body finishes or is dropped.
//!
//! A tower layer around the proxy service, applied per connection by the listener. It reads
//! what the phases left in the response's extensions ([`crate::proxy::MatchedRoute`],
//! [`crate::base::body::RequestBytes`], the cache status, the upstream's request id), so it may
//! use the proxy layer and everything below it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::base::body::{BoxError, ByteCounter, RequestBytes};
use crate::cache::CacheStatus;
use crate::error::REASON_HEADER;
use crate::proxy::admin::{self, ListenerRole};
use crate::proxy::{ConnectionInfo, MatchedRoute};
use crate::telemetry::metrics::{Metrics, RequestRecord};
use crate::telemetry::request_id::{self, REQUEST_ID_HEADER, UpstreamExchange};

/// Tower layer that gives each request its id and span, writes the access log line, and
/// records request metrics, when the response body finishes or is dropped.
#[derive(Clone)]
pub struct AccessLogLayer {
    metrics: Arc<Metrics>,
    peer: Option<SocketAddr>,
    listener: ListenerRole,
}

impl AccessLogLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        AccessLogLayer {
            metrics,
            peer: None,
            listener: ListenerRole::Main {
                admin_elsewhere: false,
            },
        }
    }

    /// The connection the requests arrive on: its peer is logged, its listener decides which
    /// requests are admin requests.
    pub fn with_connection(mut self, connection: &ConnectionInfo) -> Self {
        self.peer = connection.peer;
        self.listener = connection.listener;
        self
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog {
            inner,
            metrics: self.metrics.clone(),
            peer: self.peer,
            listener: self.listener,
        }
    }
}

#[derive(Clone)]
pub struct AccessLog<S> {
    inner: S,
    metrics: Arc<Metrics>,
    peer: Option<SocketAddr>,
    listener: ListenerRole,
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
        // Set on the request, so it goes upstream as it is logged.
        let request_id = request_id::take_or_make(request.headers());
        request
            .headers_mut()
            .insert(REQUEST_ID_HEADER, request_id::for_upstream(&request_id));
        let span = tracing::info_span!(
            "request",
            request_id = request_id.to_str().unwrap_or_default()
        );
        let method = request.method().clone();
        let uri = request.uri().clone();
        let admin_endpoint = admin::is_admin_request(self.listener, uri.path())
            .then(|| admin::endpoint_label(uri.path()));
        let user_agent = request.headers().get(header::USER_AGENT).cloned();
        // Most API calls have no body: they skip the counter and the extensions map it rides in.
        let bytes_in = (!request.body().is_end_stream()).then(|| {
            let counter = Arc::new(ByteCounter::default());
            request
                .extensions_mut()
                .insert(RequestBytes(counter.clone()));
            counter
        });
        self.metrics.in_flight.inc();
        let inner = span.in_scope(|| self.inner.call(request));
        AccessLogFuture {
            inner,
            span: span.clone(),
            pending: Some(PendingRecord {
                metrics: self.metrics.clone(),
                started,
                request_id,
                span,
                peer: self.peer,
                method,
                uri,
                admin_endpoint,
                user_agent,
                bytes_in,
            }),
        }
    }
}

/// What the access log knows before the response head exists.
struct PendingRecord {
    metrics: Arc<Metrics>,
    started: Instant,
    request_id: HeaderValue,
    span: tracing::Span,
    peer: Option<SocketAddr>,
    method: Method,
    uri: Uri,
    /// The `endpoint` label when the request is for the proxy's own endpoints.
    admin_endpoint: Option<&'static str>,
    user_agent: Option<HeaderValue>,
    bytes_in: Option<Arc<ByteCounter>>,
}

/// Logged for a request dropped before its response head: the client went away (nginx's
/// "client closed request").
const CLIENT_CLOSED: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => panic!("499 is a valid status code"),
};

/// Where the request ended up: the route it matched and what the upstream answered, when
/// it got that far, and the reason when the proxy answered itself.
#[derive(Default)]
struct Answer {
    route: Option<MatchedRoute>,
    upstream: Option<UpstreamExchange>,
    reason: Option<String>,
    /// How the response cache answered (`hit`, `miss`, `coalesced`, ...), when it took part.
    cache: Option<CacheStatus>,
}

impl PendingRecord {
    /// Dropping the returned record writes the access line and the request metrics.
    fn into_record(self, status: StatusCode, answer: Answer, outcome: Outcome) -> AccessRecord {
        AccessRecord {
            pending: self,
            status,
            answer,
            bytes_out: 0,
            outcome,
        }
    }

    fn complete<B: Body>(self, response: Response<B>) -> Response<LoggedBody<B>> {
        let (mut parts, body) = response.into_parts();
        parts
            .headers
            .insert(REQUEST_ID_HEADER, self.request_id.clone());
        let answer = Answer {
            route: parts.extensions.get::<MatchedRoute>().cloned(),
            upstream: parts.extensions.remove::<UpstreamExchange>(),
            reason: parts
                .headers
                .get(REASON_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            cache: parts.extensions.get::<CacheStatus>().copied(),
        };
        // hyper never polls a body that is already at its end (HEAD, 304, local errors).
        let outcome = if body.is_end_stream() {
            Outcome::Complete
        } else {
            Outcome::Incomplete
        };
        // hyper stops polling a body once it has written `Content-Length` bytes, whether or
        // not the body has said it ended (a body shared from the cache may learn that later).
        let length = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let record = self.into_record(parts.status, answer, outcome);
        Response::from_parts(
            parts,
            LoggedBody {
                inner: body,
                length,
                record,
            },
        )
    }
}

pin_project! {
    /// [`AccessLog`]'s response future: named, so the layer adds no allocation per request.
    /// Polled inside the request's span, so every line logged on the way carries its id.
    pub struct AccessLogFuture<F> {
        #[pin]
        inner: F,
        span: tracing::Span,
        pending: Option<PendingRecord>,
    }

    impl<F> PinnedDrop for AccessLogFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            // Still pending: the connection went before the response head did.
            if let Some(pending) = this.project().pending.take() {
                drop(pending.into_record(CLIENT_CLOSED, Answer::default(), Outcome::Incomplete));
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
        let Ok(response) = std::task::ready!(this.span.in_scope(|| this.inner.poll(cx)));
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
    pending: PendingRecord,
    status: StatusCode,
    answer: Answer,
    bytes_out: u64,
    outcome: Outcome,
}

/// Whole microseconds: exact enough for any request, and an integer for log queries.
fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// The longest `User-Agent` logged; the rest is cut off (a head may carry 64 KiB).
const MAX_USER_AGENT: usize = 256;

fn user_agent(value: &HeaderValue) -> std::borrow::Cow<'_, str> {
    let bytes = value.as_bytes();
    let bytes = &bytes[..bytes.len().min(MAX_USER_AGENT)];
    String::from_utf8_lossy(bytes)
}

/// The access line at a level chosen at run time (tracing's macros take a constant one).
macro_rules! access_line {
    ($level:expr, $($fields:tt)*) => {
        if $level == tracing::Level::DEBUG {
            tracing::debug!(target: "access", $($fields)*)
        } else {
            tracing::info!(target: "access", $($fields)*)
        }
    };
}

impl Drop for AccessRecord {
    fn drop(&mut self) {
        let pending = &self.pending;
        let _in_request = pending.span.enter();
        let route = self.answer.route.as_ref().map(|r| &r.0);
        let upstream = self.answer.upstream.as_ref();
        let duration = pending.started.elapsed();
        let bytes_in = pending.bytes_in.as_ref().map_or(0, |counter| counter.get());
        let metrics = &pending.metrics;
        metrics.in_flight.dec();
        match pending.admin_endpoint {
            Some(endpoint) => metrics.record_admin_request(endpoint, self.status),
            None => metrics.record_request(&RequestRecord {
                route: route.map(|r| r.metrics()),
                method: &pending.method,
                status: self.status,
                duration,
                bytes_in,
                bytes_out: self.bytes_out,
            }),
        }
        // Probes and scrapes that succeed are routine: debug, not a line every few seconds.
        let level = if pending.admin_endpoint.is_some() && self.status.as_u16() < 400 {
            tracing::Level::DEBUG
        } else {
            tracing::Level::INFO
        };
        access_line!(
            level,
            request_id = pending.request_id.to_str().unwrap_or_default(),
            // A v4 client of a `[::]` listener as `10.0.0.7`, not `::ffff:10.0.0.7`.
            client = pending.peer.map(|peer| tracing::field::display(peer.ip().to_canonical())),
            method = %pending.method,
            // The query is left out: it may carry identifiers nobody meant to log.
            path = pending.uri.path(),
            route = route.map(|r| &*r.prefix),
            credential = route.map(|r| &*r.credential.name),
            status = self.status.as_u16(),
            upstream_status = upstream.map(|u| u.status.as_u16()),
            upstream_head_us = upstream.map(|u| micros(u.head_after)),
            upstream_request_id = upstream
                .and_then(|u| u.request_id.as_ref())
                .and_then(|id| id.to_str().ok()),
            duration_us = micros(duration),
            bytes_in,
            bytes_out = self.bytes_out,
            outcome = match self.outcome {
                Outcome::Complete => "complete",
                Outcome::Failed => "failed",
                Outcome::Incomplete => "incomplete",
            },
            reason = self.answer.reason.as_deref(),
            user_agent = pending.user_agent.as_ref().map(|ua| tracing::field::display(user_agent(ua))),
            cache = self.answer.cache.map(CacheStatus::as_str),
            "request"
        );
    }
}

pin_project! {
    /// The response body as sent to the client, counting bytes for the access log.
    pub struct LoggedBody<B> {
        #[pin]
        inner: B,
        // The response's `Content-Length`, when it has one.
        length: Option<u64>,
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
                // hyper stops polling once the body says it has ended, or once it has
                // written `Content-Length` bytes.
                if this.inner.is_end_stream() || *this.length == Some(this.record.bytes_out) {
                    this.record.outcome = Outcome::Complete;
                }
            }
            Poll::Ready(Some(Err(error))) => {
                this.record.outcome = Outcome::Failed;
                // A body the proxy itself aborted says why (`decompression-limit`).
                if let Some(decode) = error.downcast_ref::<crate::rewrite::DecodeError>() {
                    this.record.answer.reason = Some(decode.reason().to_owned());
                }
            }
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
    use crate::base::body::ProxyBody;

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

    #[tokio::test]
    async fn the_request_id_reaches_the_service_and_the_client_and_probes_are_not_requests() {
        let captured = Captured::default();
        let _logging = tracing::subscriber::set_default(subscriber(&captured));
        let metrics = Arc::new(Metrics::new());
        let answer = tower::service_fn(|request: Request<Empty<Bytes>>| async move {
            let id = request.headers()[REQUEST_ID_HEADER].clone();
            Ok::<_, Infallible>(Response::new(ProxyBody::local(id.as_bytes().to_vec())))
        });
        let service = AccessLogLayer::new(metrics.clone()).layer(answer);
        let request = Request::get("/-/health")
            .header("x-request-id", "probe-7")
            .body(Empty::new())
            .unwrap();
        let response = service.clone().oneshot(request).await.unwrap();
        assert_eq!(response.headers()[REQUEST_ID_HEADER], "probe-7");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"probe-7", "the service saw another id");

        let request = Request::get("/2.0/user")
            .header("x-request-id", "not valid")
            .body(Empty::new())
            .unwrap();
        let response = service.oneshot(request).await.unwrap();
        let made = response.headers()[REQUEST_ID_HEADER].clone();
        assert!(made != "not valid" && request_id::is_valid(made.as_bytes()));
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], made.as_bytes());

        let health =
            r#"bitbucket_auth_proxy_admin_requests_total{endpoint="/-/health",status_class="2xx"}"#;
        assert_eq!(sample(&metrics, health).as_deref(), Some("1"));
        let text = metrics.encode();
        let requests: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("bitbucket_auth_proxy_requests_total{"))
            .collect();
        assert_eq!(requests.len(), 1, "{text}");
        assert!(requests[0].contains("method=\"GET\""), "{text}");
        // The successful probe is below the subscriber's INFO; the other request is not.
        let lines = captured.access_lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["level"], "INFO");
        assert_eq!(lines[0]["path"], "/2.0/user");
        assert_eq!(lines[0]["request_id"], made.to_str().unwrap());
        assert_eq!(lines[0]["span"]["request_id"], made.to_str().unwrap());
    }
}
