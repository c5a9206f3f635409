//! Per-credential budget metrics: what went upstream, what the governor and the cool-down held
//! back, and what Bitbucket says is left.
//!
//! Each credential's series handles are looked up once, when its budget is created, so the
//! request path only touches atomics. Gauges whose zero would be a claim (a limit of 0, nothing
//! left) appear only once there is a value to show.

use std::sync::{Arc, OnceLock};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::telemetry::metrics::{CredentialLabels, Metrics};

/// The families added for issue 15; the older `ratelimit_*` ones live in [`Metrics`].
#[derive(Default)]
pub struct BudgetMetrics {
    upstream_requests: Family<CredentialLabels, Counter>,
    governor_delayed: Family<CredentialLabels, Counter>,
    cooldown_refused: Family<CredentialLabels, Counter>,
    cooldown_waited: Family<CredentialLabels, Counter>,
    cooldowns: Family<CredentialLabels, Counter>,
    budget_left: Family<CredentialLabels, Gauge>,
}

impl BudgetMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = BudgetMetrics::default();
        let families: [(&str, &str, &Family<CredentialLabels, Counter>); 5] = [
            (
                "upstream_requests",
                "Requests sent to Bitbucket with this credential",
                &metrics.upstream_requests,
            ),
            (
                "governor_delayed",
                "Requests the governor held for a free slot (rate_limit.max_wait) before sending them",
                &metrics.governor_delayed,
            ),
            (
                "cooldown_refused",
                "Requests answered 429 by the proxy during a 429 cool-down",
                &metrics.cooldown_refused,
            ),
            (
                "cooldown_waited",
                "Requests that waited for the answer of a cool-down's probe",
                &metrics.cooldown_waited,
            ),
            (
                "cooldowns",
                "Cool-downs started by a 429 from Bitbucket",
                &metrics.cooldowns,
            ),
        ];
        for (name, help, family) in families {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "ratelimit_budget_left",
            "Requests left in the credential's budget as far as Bitbucket reported it (X-RateLimit-Remaining, else X-RateLimit-Limit minus requests sent in the hour; 0 after a 429)",
            metrics.budget_left.clone(),
        );
        metrics
    }
}

/// A gauge series created on its first value.
struct LazyGauge {
    family: Family<CredentialLabels, Gauge>,
    labels: CredentialLabels,
    gauge: OnceLock<Gauge>,
}

impl LazyGauge {
    fn new(family: &Family<CredentialLabels, Gauge>, labels: &CredentialLabels) -> Self {
        LazyGauge {
            family: family.clone(),
            labels: labels.clone(),
            gauge: OnceLock::new(),
        }
    }

    fn set(&self, value: i64) {
        self.gauge
            .get_or_init(|| self.family.get_or_create_owned(&self.labels))
            .set(value);
    }
}

/// One credential's series.
pub struct CredentialMetrics {
    pub upstream_requests: Counter,
    pub delayed: Counter,
    /// Refusals by `rate_limit` or NearLimit pacing (`ratelimit_local_refused_total`).
    pub refused: Counter,
    pub cooldown_refused: Counter,
    pub cooldown_waited: Counter,
    pub cooldowns: Counter,
    local_sent: LazyGauge,
    local_remaining: LazyGauge,
    limit: LazyGauge,
    remaining: LazyGauge,
    near_limit: LazyGauge,
    budget_left: LazyGauge,
}

impl CredentialMetrics {
    pub fn new(metrics: &Metrics, credential: &Arc<str>) -> Self {
        let labels = CredentialLabels {
            credential: credential.clone(),
        };
        let budget = &metrics.budget;
        CredentialMetrics {
            upstream_requests: budget.upstream_requests.get_or_create_owned(&labels),
            delayed: budget.governor_delayed.get_or_create_owned(&labels),
            refused: metrics.ratelimit_local_refused.get_or_create_owned(&labels),
            cooldown_refused: budget.cooldown_refused.get_or_create_owned(&labels),
            cooldown_waited: budget.cooldown_waited.get_or_create_owned(&labels),
            cooldowns: budget.cooldowns.get_or_create_owned(&labels),
            local_sent: LazyGauge::new(&metrics.ratelimit_local_sent, &labels),
            local_remaining: LazyGauge::new(&metrics.ratelimit_local_remaining, &labels),
            limit: LazyGauge::new(&metrics.ratelimit_limit, &labels),
            remaining: LazyGauge::new(&metrics.ratelimit_remaining, &labels),
            near_limit: LazyGauge::new(&metrics.ratelimit_near_limit, &labels),
            budget_left: LazyGauge::new(&budget.budget_left, &labels),
        }
    }

    /// After an admission: the hour's count, and what `rate_limit` leaves of it.
    pub fn admitted(&self, sent: u64, limit: Option<u32>) {
        self.local_sent.set(saturating_i64(sent));
        if let Some(limit) = limit {
            self.local_remaining
                .set(i64::from(limit) - saturating_i64(sent));
        }
    }

    /// The `X-RateLimit-*` values of a response (`limit`, `remaining`, `near_limit`), and the
    /// budget they leave.
    pub fn reported(
        &self,
        limit: Option<u32>,
        remaining: Option<u64>,
        near_limit: Option<bool>,
        left: Option<u64>,
    ) {
        if let Some(limit) = limit {
            self.limit.set(i64::from(limit));
        }
        if let Some(remaining) = remaining {
            self.remaining.set(saturating_i64(remaining));
        }
        if let Some(near) = near_limit {
            self.near_limit.set(i64::from(near));
        }
        if let Some(left) = left {
            self.budget_left.set(saturating_i64(left));
        }
    }

    /// Bitbucket answered 429: nothing is left, whatever the last figures said.
    pub fn spent(&self) {
        self.budget_left.set(0);
    }
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
