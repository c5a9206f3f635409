//! Prometheus metrics. Labels are bounded: route prefixes and credential names from the config,
//! methods folded to the standard set, status classes; never raw paths. The
//! budget, cache and store families live in submodules of their own.

pub mod budget;
pub mod cache;
pub mod store;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::{Method, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label value for requests that matched no route.
const NO_ROUTE: &str = "";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: Arc<str>,
    pub credential: Arc<str>,
    pub method: &'static str,
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdminLabels {
    /// `/-/health`, `/-/ready`, `/-/metrics` or `other`.
    pub endpoint: &'static str,
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: Arc<str>,
    pub credential: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredentialLabels {
    pub credential: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerifyLabels {
    pub credential: Arc<str>,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    /// Short commit hash; empty when the build could not see git.
    commit: &'static str,
    commit_date: &'static str,
}

fn latency_histogram() -> Histogram {
    // 1 ms to ~65 s: covers a cached API answer up to a slow git pack.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Every metric the proxy exports, registered once for the life of the process.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    /// Requests for the proxy's own endpoints, kept out of `requests` so probes and scrapes
    /// do not swell the no-route series.
    pub admin_requests: Family<AdminLabels, Counter>,
    pub request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub upstream_latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub bytes_in: Family<RouteLabels, Counter>,
    pub bytes_out: Family<RouteLabels, Counter>,
    pub in_flight: Gauge,
    pub upstream_errors: Family<KindLabels, Counter>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub config_generation: Gauge,
    pub ratelimit_limit: Family<CredentialLabels, Gauge>,
    pub ratelimit_near_limit: Family<CredentialLabels, Gauge>,
    pub ratelimit_remaining: Family<CredentialLabels, Gauge>,
    pub credential_verify: Family<VerifyLabels, Gauge>,
    pub ratelimit_local_sent: Family<CredentialLabels, Gauge>,
    pub ratelimit_local_remaining: Family<CredentialLabels, Gauge>,
    pub ratelimit_local_refused: Family<CredentialLabels, Counter>,
    /// Issue 15's per-credential budget metrics.
    pub budget: crate::telemetry::metrics::budget::BudgetMetrics,
    pub cache: crate::telemetry::metrics::cache::CacheMetrics,
    /// The shared store's metrics (issue 16); registered always, set only with `[store]`.
    pub store: crate::telemetry::metrics::store::StoreMetrics,
    /// The empty route and credential label of requests no route took (admin paths, 404s),
    /// allocated once rather than per request.
    no_route: Arc<str>,
    /// The series of requests no route took.
    no_route_series: RouteSeries,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut metrics = Metrics {
            no_route: Arc::from(NO_ROUTE),
            no_route_series: RouteSeries::default(),
            requests: Family::default(),
            admin_requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            upstream_latency: Family::new_with_constructor(latency_histogram),
            bytes_in: Family::default(),
            bytes_out: Family::default(),
            in_flight: Gauge::default(),
            upstream_errors: Family::default(),
            config_reloads: Family::default(),
            config_generation: Gauge::default(),
            ratelimit_limit: Family::default(),
            ratelimit_near_limit: Family::default(),
            ratelimit_remaining: Family::default(),
            credential_verify: Family::default(),
            ratelimit_local_sent: Family::default(),
            ratelimit_local_remaining: Family::default(),
            ratelimit_local_refused: Family::default(),
            budget: crate::telemetry::metrics::budget::BudgetMetrics::default(),
            cache: Default::default(),
            store: crate::telemetry::metrics::store::StoreMetrics::default(),
            registry: Registry::with_prefix("bitbucket_auth_proxy"),
        };
        metrics.budget =
            crate::telemetry::metrics::budget::BudgetMetrics::register(&mut metrics.registry);
        metrics.store =
            crate::telemetry::metrics::store::StoreMetrics::register(&mut metrics.registry);
        metrics.registry.register(
            "requests",
            "Requests by route, credential, method and status class",
            metrics.requests.clone(),
        );
        metrics.registry.register(
            "admin_requests",
            "Requests for /-/health, /-/ready and /-/metrics (on either listener), by endpoint and status class",
            metrics.admin_requests.clone(),
        );
        metrics.registry.register(
            "request_duration_seconds",
            "Time from request to the end of the response body",
            metrics.request_duration.clone(),
        );
        metrics.registry.register(
            "upstream_response_seconds",
            "Time until Bitbucket's response headers arrived",
            metrics.upstream_latency.clone(),
        );
        metrics.registry.register(
            "request_bytes",
            "Request body bytes sent upstream",
            metrics.bytes_in.clone(),
        );
        metrics.registry.register(
            "response_bytes",
            "Response body bytes sent to clients",
            metrics.bytes_out.clone(),
        );
        metrics.registry.register(
            "in_flight_requests",
            "Requests being served",
            metrics.in_flight.clone(),
        );
        metrics.registry.register(
            "upstream_errors",
            "Failures reaching Bitbucket, by kind",
            metrics.upstream_errors.clone(),
        );
        metrics.registry.register(
            "config_reloads",
            "Config reloads by result",
            metrics.config_reloads.clone(),
        );
        metrics.registry.register(
            "config_generation",
            "Generation of the config in use (1 at start-up)",
            metrics.config_generation.clone(),
        );
        metrics.registry.register(
            "ratelimit_limit",
            "Last X-RateLimit-Limit Bitbucket reported, per credential",
            metrics.ratelimit_limit.clone(),
        );
        metrics.registry.register(
            "ratelimit_near_limit",
            "Last X-RateLimit-NearLimit Bitbucket reported (1 = true), per credential",
            metrics.ratelimit_near_limit.clone(),
        );
        metrics.registry.register(
            "ratelimit_remaining",
            "Last X-RateLimit-Remaining Bitbucket reported, per credential",
            metrics.ratelimit_remaining.clone(),
        );
        metrics.registry.register(
            "credential_verify",
            "Result of the last credential check (1 for the current state)",
            metrics.credential_verify.clone(),
        );
        metrics.registry.register(
            "ratelimit_local_sent",
            "Requests the proxy sent upstream with this credential in the last hour",
            metrics.ratelimit_local_sent.clone(),
        );
        metrics.registry.register(
            "ratelimit_local_remaining",
            "What is left of the credential's rate_limit.per_hour budget for the rolling hour",
            metrics.ratelimit_local_remaining.clone(),
        );
        metrics.registry.register(
            "ratelimit_local_refused",
            "Requests refused locally with 429 by the governor (rate_limit or NearLimit pacing)",
            metrics.ratelimit_local_refused.clone(),
        );
        metrics.cache.register(&mut metrics.registry);
        let build_info: Family<BuildLabels, Gauge> = Family::default();
        build_info
            .get_or_create(&BuildLabels {
                version: crate::base::build_info::VERSION,
                commit: crate::base::build_info::COMMIT.unwrap_or(""),
                commit_date: crate::base::build_info::COMMIT_DATE.unwrap_or(""),
            })
            .set(1);
        metrics.registry.register(
            "build_info",
            "Version and commit of the running binary",
            build_info,
        );
        metrics
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn record_request(&self, request: &RequestRecord<'_>) {
        let route = request.route.unwrap_or(RouteRef {
            prefix: &self.no_route,
            credential: &self.no_route,
            series: &self.no_route_series,
        });
        let (method_index, method) = method_label(request.method);
        let (class_index, status_class) = status_class(request.status);
        route.series.requests[method_index][class_index]
            .get_or_init(|| {
                self.requests
                    .get_or_create(&RequestLabels {
                        route: route.prefix.clone(),
                        credential: route.credential.clone(),
                        method,
                        status_class,
                    })
                    .clone()
            })
            .inc();
        route
            .kept(&route.series.request_duration, &self.request_duration)
            .observe(request.duration.as_secs_f64());
        if request.bytes_in > 0 {
            route
                .kept(&route.series.bytes_in, &self.bytes_in)
                .inc_by(request.bytes_in);
        }
        if request.bytes_out > 0 {
            route
                .kept(&route.series.bytes_out, &self.bytes_out)
                .inc_by(request.bytes_out);
        }
    }

    /// How long the upstream took to send a response head for a request through `route`.
    pub fn record_upstream_head(&self, route: RouteRef<'_>, head_after: Duration) {
        route
            .kept(&route.series.upstream_latency, &self.upstream_latency)
            .observe(head_after.as_secs_f64());
    }

    /// Counts a request for an admin endpoint; nothing else about it is recorded.
    pub fn record_admin_request(&self, endpoint: &'static str, status: StatusCode) {
        self.admin_requests
            .get_or_create(&AdminLabels {
                endpoint,
                status_class: status_class(status).1,
            })
            .inc();
    }
}

/// What one finished request contributes.
pub struct RequestRecord<'a> {
    /// `None` for a request no route took.
    pub route: Option<RouteRef<'a>>,
    pub method: &'a Method,
    pub status: StatusCode,
    pub duration: Duration,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// A route as its metrics see it: the label values and the route's [`RouteSeries`].
#[derive(Clone, Copy)]
pub struct RouteRef<'a> {
    pub prefix: &'a Arc<str>,
    pub credential: &'a Arc<str>,
    pub series: &'a RouteSeries,
}

impl<'a> RouteRef<'a> {
    /// The series `slot` keeps: looked up in `family` by this route's labels the first time.
    fn kept<M: Clone, C: MetricConstructor<M>>(
        &self,
        slot: &'a OnceLock<M>,
        family: &Family<RouteLabels, M, C>,
    ) -> &'a M {
        slot.get_or_init(|| {
            family
                .get_or_create(&RouteLabels {
                    route: self.prefix.clone(),
                    credential: self.credential.clone(),
                })
                .clone()
        })
    }
}

/// The label sets `method_label` folds methods into.
const METHODS: usize = 8;
/// The label sets `status_class` folds statuses into.
const STATUS_CLASSES: usize = 5;

/// One route's series, each looked up in its family on first use and kept: a family lookup
/// hashes and compares every label under a lock, and a request records four or five series.
/// A series appears in the exposition only once something is recorded in it, as before.
/// Looked up by label values in a registry that outlives config generations, so a route that a
/// reload keeps goes on counting in the same series.
#[derive(Default)]
pub struct RouteSeries {
    requests: [[OnceLock<Counter>; STATUS_CLASSES]; METHODS],
    request_duration: OnceLock<Histogram>,
    upstream_latency: OnceLock<Histogram>,
    bytes_in: OnceLock<Counter>,
    bytes_out: OnceLock<Counter>,
}

impl std::fmt::Debug for RouteSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteSeries").finish_non_exhaustive()
    }
}

fn method_label(method: &Method) -> (usize, &'static str) {
    match *method {
        Method::GET => (0, "GET"),
        Method::HEAD => (1, "HEAD"),
        Method::POST => (2, "POST"),
        Method::PUT => (3, "PUT"),
        Method::PATCH => (4, "PATCH"),
        Method::DELETE => (5, "DELETE"),
        Method::OPTIONS => (6, "OPTIONS"),
        _ => (7, "OTHER"),
    }
}

fn status_class(status: StatusCode) -> (usize, &'static str) {
    match status.as_u16() {
        100..=199 => (0, "1xx"),
        200..=299 => (1, "2xx"),
        300..=399 => (2, "3xx"),
        400..=499 => (3, "4xx"),
        _ => (4, "5xx"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_bounded_labels() {
        let metrics = Metrics::new();
        let route: Arc<str> = Arc::from("/2.0/repositories/acme");
        let credential: Arc<str> = Arc::from("acme-all");
        let series = RouteSeries::default();
        metrics.record_request(&RequestRecord {
            route: Some(RouteRef {
                prefix: &route,
                credential: &credential,
                series: &series,
            }),
            method: &Method::from_bytes(b"PROPFIND").unwrap(),
            status: StatusCode::NOT_FOUND,
            duration: Duration::from_millis(3),
            bytes_in: 0,
            bytes_out: 12,
        });
        crate::telemetry::metrics::budget::CredentialMetrics::new(&metrics, &credential).reported(
            Some(1000),
            None,
            Some(false),
            None,
        );
        let text = metrics.encode();
        assert!(text.contains(
            r#"bitbucket_auth_proxy_requests_total{route="/2.0/repositories/acme",credential="acme-all",method="OTHER",status_class="4xx"} 1"#
        ), "{text}");
        assert!(
            text.contains(r#"bitbucket_auth_proxy_ratelimit_limit{credential="acme-all"} 1000"#),
            "{text}"
        );
        assert!(text.contains("bitbucket_auth_proxy_build_info"), "{text}");
    }
}
