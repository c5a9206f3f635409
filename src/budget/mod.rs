//! One credential's request budget: the [governor] (rate_limit, Bitbucket's
//! reported figures, NearLimit pacing), the [429 cool-down](cooldown), and their metrics, behind
//! the two calls the request path makes:
//!
//! - [`CredentialBudget::acquire`] in the `govern` phase: passes, delays (bounded) or refuses a
//!   request, and returns a [`BudgetPermit`]. Dropping the permit gives the budget back, so a
//!   request answered without going upstream (cache hit, coalesced follower, a failed token
//!   fetch, a client that left) costs nothing.
//! - [`BudgetPermit::spend`] right before the request is forwarded, and
//!   [`UpstreamAttempt::answered`] with Bitbucket's answer: its `X-RateLimit-*` headers and a
//!   429 feed the governor and the cool-down.
//!
//! Budgets are per credential name and outlive config generations (see [`crate::runtime::state`]).
//! With `[store]`, the governor's rules and the cool-down are applied in the shared store
//! ([`crate::store::budget`]) so that every replica holding the secret spends one budget; the
//! in-process governor then only works out the rules, and takes over while the store is down
//! (`store.on_error = "local"`).
//! Uses the governor, the store, the metrics registry and the error type; nothing here knows
//! routes.

pub mod cooldown;
pub mod governor;
pub mod reported;
mod shared_reports;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode, header};
use tokio::time::Instant;

use crate::bitbucket::rate_limit::Pace;
use crate::bitbucket::rate_limit::RateLimit;
use crate::budget::governor::{Admission, DEFAULT_PER_HOUR, Governor, Refusal, Rules};
use crate::config::OnStoreError;
use crate::error::ProxyError;
use crate::store::Store;
use crate::store::budget::{Policy, SharedAdmission, Verdict};
use crate::store::probe::ProbeClaim;
use crate::telemetry::metrics::budget::CredentialMetrics;
use crate::upstream::credential::Credential;
use cooldown::{Cooldown, CooldownStatus, Gate, ceil_seconds};
use reported::Report;

/// The store a request's budget is shared through, and the credential whose secret names it.
#[derive(Clone)]
pub struct Shared {
    pub store: Arc<Store>,
    pub credential: Arc<Credential>,
}

/// An admission, until the request is sent or given back.
enum Spent {
    Local(Admission),
    Shared(SharedAdmission),
}

/// What one attempt to admit a request came to.
enum Attempt {
    Admitted(Spent, u64, Option<u32>),
    Refused(Refusal),
    /// The shared store holds a cool-down another replica (or this one) started.
    CoolingDown(Duration),
    /// Another request probes Bitbucket for the fleet after a cool-down.
    Probing,
}

/// The longest pause between two looks at the store while another replica's probe is out.
const PROBE_POLL_MAX: Duration = Duration::from_millis(250);

pub struct CredentialBudget {
    name: Arc<str>,
    governor: Governor,
    cooldown: Cooldown,
    metrics: CredentialMetrics,
    /// The last report stored for the other replicas, and when.
    shared_report: std::sync::Mutex<Option<(Report, Instant)>>,
}

impl CredentialBudget {
    pub fn new(
        name: Arc<str>,
        limit: Option<RateLimit>,
        metrics: &crate::telemetry::metrics::Metrics,
    ) -> Self {
        CredentialBudget {
            metrics: CredentialMetrics::new(metrics, &name),
            name,
            governor: Governor::new(limit),
            cooldown: Cooldown::default(),
            shared_report: std::sync::Mutex::new(None),
        }
    }

    /// A reload may change `rate_limit`; counts, reports and a cool-down carry over.
    pub fn set_limit(&self, limit: Option<RateLimit>) {
        self.governor.set_limit(limit);
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The `govern` phase. A cool-down refuses (or, once over, makes this request its probe or
    /// waits up to `probe_wait` for the probe's answer); then the governor admits, delays up to
    /// `max_wait`, or refuses. Cancel-safe: dropping the future gives back what it took.
    pub async fn acquire(
        self: &Arc<Self>,
        max_wait: Duration,
        probe_wait: Duration,
        shared: Option<Shared>,
    ) -> Result<BudgetPermit, ProxyError> {
        // One reading of the clock for the whole admission unless it has to wait: a request
        // reads it often enough on its way through.
        let arrived = Instant::now();
        let (gate, waited) = self.cooldown.enter(arrived, probe_wait).await;
        if waited {
            self.metrics.cooldown_waited.inc();
        }
        let mut permit = BudgetPermit {
            budget: self.clone(),
            admission: None,
            probe: match gate {
                Gate::Pass => false,
                Gate::Probe => true,
                Gate::Refuse(wait) => return Err(self.cooling_down(wait)),
            },
            shared,
        };
        let mut now = if waited { Instant::now() } else { arrived };
        let deadline = now + max_wait;
        let probe_deadline = now + probe_wait;
        // The fleet's probe holds its turn as long as a local probe may wait for its answer.
        let probe_ttl = probe_wait + Duration::from_secs(1);
        let mut delayed = false;
        let mut poll = Duration::from_millis(10);
        let mut probe_waited = false;
        let (admission, sent, limit) = loop {
            match self.attempt(permit.shared.as_ref(), now, probe_ttl).await? {
                Attempt::Admitted(admission, sent, limit) => break (admission, sent, limit),
                Attempt::CoolingDown(wait) => {
                    self.cooldown.adopt(now + wait);
                    return Err(self.cooling_down(wait));
                }
                // Another replica probes: wait for its answer as for a local probe, bounded
                // the same way, then refuse for a second rather than probe alongside it.
                Attempt::Probing if now < probe_deadline => {
                    if let (false, Some(shared)) = (probe_waited, &permit.shared) {
                        shared.store.metrics().probe_waits.inc();
                        probe_waited = true;
                    }
                    tokio::time::sleep(poll.min(probe_deadline - now)).await;
                    poll = (poll * 2).min(PROBE_POLL_MAX);
                }
                Attempt::Probing => return Err(self.cooling_down(Duration::from_secs(1))),
                // Waiters are not queued: each retries when its slot should be free, and one
                // that finds it taken waits again while its deadline allows.
                Attempt::Refused(refusal) if now + refusal.wait <= deadline => {
                    delayed = true;
                    tokio::time::sleep(refusal.wait).await;
                }
                Attempt::Refused(refusal) => {
                    self.metrics.refused.inc();
                    return Err(ProxyError::RateLimited {
                        credential: self.name.to_string(),
                        pace: refusal.pace,
                        retry_after_s: ceil_seconds(refusal.wait).max(1),
                    });
                }
            }
            // Only after a wait.
            now = Instant::now();
        };
        self.metrics.admitted(sent, limit);
        permit.admission = Some(admission);
        if delayed {
            self.metrics.delayed.inc();
            // A 429 may have arrived while this request waited: it must not go out now.
            if !permit.probe
                && let Some(wait) = self.cooldown.remaining(Instant::now())
            {
                return Err(self.cooling_down(wait.max(Duration::from_secs(1))));
            }
        }
        Ok(permit)
    }

    /// One admission attempt: in the shared store when there is one and it answers, else in
    /// this process (or a refusal, under `store.on_error = "refuse"`).
    async fn attempt(
        &self,
        shared: Option<&Shared>,
        now: Instant,
        probe_ttl: Duration,
    ) -> Result<Attempt, ProxyError> {
        if let Some(shared) = shared {
            let rules = self.governor.rules(now);
            let policy = policy(&rules);
            let pace = || {
                rules.pacing().unwrap_or(Pace::NearLimit {
                    per_hour: DEFAULT_PER_HOUR,
                })
            };
            // Boxed, as every store call on the request path: only a fleet makes it, and inline
            // it would add its size to every request's future (docs/performance.md).
            let answer = Box::pin(shared.store.admit(
                shared.credential.budget_identity(),
                policy,
                probe_ttl,
            ))
            .await
            .map(|(verdict, reports)| {
                self.adopt_reports(now, &reports);
                verdict
            });
            match answer {
                Ok(Verdict::Admitted(admission)) => {
                    let sent = admission.sent;
                    return Ok(Attempt::Admitted(
                        Spent::Shared(admission),
                        sent,
                        policy.per_hour,
                    ));
                }
                Ok(Verdict::Limited(wait)) => {
                    return Ok(Attempt::Refused(Refusal {
                        wait,
                        pace: rules.limit.unwrap_or_else(pace),
                    }));
                }
                Ok(Verdict::Paced(wait)) => {
                    return Ok(Attempt::Refused(Refusal { wait, pace: pace() }));
                }
                Ok(Verdict::CoolingDown(wait)) => return Ok(Attempt::CoolingDown(wait)),
                Ok(Verdict::Probing(_)) => return Ok(Attempt::Probing),
                Err(_unavailable) => {
                    shared.store.count_fallback();
                    if shared.store.on_error() == OnStoreError::Refuse {
                        return Err(ProxyError::StoreUnavailable {
                            credential: self.name.to_string(),
                        });
                    }
                }
            }
        }
        Ok(match self.governor.try_acquire(now) {
            Ok(admission) => {
                let (sent, limit) = (admission.sent, admission.limit);
                Attempt::Admitted(Spent::Local(admission), sent, limit)
            }
            Err(refusal) => Attempt::Refused(refusal),
        })
    }

    fn cooling_down(&self, wait: Duration) -> ProxyError {
        self.metrics.cooldown_refused.inc();
        ProxyError::CoolingDown {
            credential: self.name.to_string(),
            retry_after_s: ceil_seconds(wait).max(1),
        }
    }

    /// The cool-down in progress, if any.
    pub fn cooldown(&self) -> Option<CooldownStatus> {
        self.cooldown.status(Instant::now())
    }

    /// Resources Bitbucket currently reports near their limit.
    pub fn near_limit_resources(&self) -> Vec<String> {
        self.governor.near_limit_resources(Instant::now())
    }
}

/// A request's claim on its credential's budget, from `govern` until it is forwarded. Dropped
/// unspent, it is given back: the slot to the governor, the probe role to the next request.
#[must_use = "dropping the permit refunds the budget; spend() it when forwarding"]
pub struct BudgetPermit {
    budget: Arc<CredentialBudget>,
    admission: Option<Spent>,
    probe: bool,
    shared: Option<Shared>,
}

/// The store's form of the governor's rules.
fn policy(rules: &Rules) -> Policy {
    let (interval_ms, tolerance_ms) = rules.pacing().map_or((0.0, 0.0), |pace| {
        let (interval, burst) = pace.interval_and_burst();
        let interval_ms = interval * 1000.0;
        (
            interval_ms,
            f64::from(burst.saturating_sub(1)) * interval_ms,
        )
    });
    Policy {
        per_hour: rules.per_hour_cap(),
        interval_ms,
        tolerance_ms,
    }
}

impl BudgetPermit {
    /// Whether this request is the one probing Bitbucket after a cool-down.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// The request is being sent upstream.
    pub fn spend(mut self) -> UpstreamAttempt {
        let shared_probe = match self.admission.take() {
            Some(Spent::Shared(admission)) => admission.probe_claim(),
            _ => None,
        };
        self.budget.metrics.upstream_requests.inc();
        UpstreamAttempt {
            budget: self.budget.clone(),
            probe: std::mem::take(&mut self.probe),
            shared: self.shared.take(),
            shared_probe,
        }
    }
}

impl Drop for BudgetPermit {
    fn drop(&mut self) {
        match self.admission.take() {
            Some(Spent::Local(admission)) => self.budget.governor.refund(admission),
            Some(Spent::Shared(admission)) => {
                // Drop cannot wait for the store: the refund goes out on its own, bounded by
                // store.timeout like every call. If it fails, the slot comes back within the
                // hour like any other.
                if let (Some(shared), Ok(runtime)) =
                    (&self.shared, tokio::runtime::Handle::try_current())
                {
                    let store = shared.store.clone();
                    runtime.spawn(async move {
                        if let Some(probe) = admission.probe_claim() {
                            let _ = store.probe_release(&probe).await;
                        }
                        store.refund(admission).await
                    });
                }
            }
            None => {}
        }
        if self.probe {
            self.budget.cooldown.release_probe(Instant::now());
        }
    }
}

/// A request sent upstream, until Bitbucket's answer is known. Dropped without an answer (the
/// upstream failed, the client left), a probe hands its role on.
#[must_use = "report the answer with answered()"]
pub struct UpstreamAttempt {
    budget: Arc<CredentialBudget>,
    probe: bool,
    shared: Option<Shared>,
    /// This request's turn as the fleet's probe, if it has it.
    shared_probe: Option<ProbeClaim>,
}

impl UpstreamAttempt {
    /// Bitbucket answered: keep its `X-RateLimit-*` figures, start a cool-down on 429, end one
    /// if this was the probe and the answer is anything else. A cool-down is written to the
    /// shared store before the 429 goes back to the client (at most `store.timeout`), so the
    /// other replicas hold their requests from then on. `now` is when the answer's head arrived.
    pub async fn answered(mut self, now: Instant, status: StatusCode, headers: &HeaderMap) {
        let budget = &self.budget;
        let probe = std::mem::take(&mut self.probe);
        let shared = self.shared.take();
        let mut shared_probe = self.shared_probe.take();
        if let Some(report) = Report::parse(headers) {
            budget.governor.record_report(now, &report);
            let left = budget.governor.usage(now).reported_left;
            budget
                .metrics
                .reported(report.limit, report.remaining, report.near_limit, left);
            if let Some(shared) = &shared {
                Box::pin(budget.share_report(shared, &report, now)).await;
            }
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            budget.metrics.spent();
            let retry_after = headers
                .get(header::RETRY_AFTER)
                .and_then(|value| cooldown::parse_retry_after(value, SystemTime::now()));
            if let Some(length) = budget.cooldown.on_too_many(now, retry_after, probe) {
                budget.metrics.cooldowns.inc();
                tracing::warn!(
                    credential = &*budget.name,
                    cooldown_s = ceil_seconds(length),
                    from_retry_after = retry_after.is_some(),
                    "Bitbucket answered 429: holding this credential's requests until the cool-down ends"
                );
                if let Some(shared) = &shared {
                    // Unavailable: the other replicas learn of it from their own 429s.
                    let identity = shared.credential.budget_identity();
                    let probe = shared_probe.take();
                    let _ =
                        Box::pin(shared.store.cool_down(identity, length, probe.as_ref())).await;
                }
            }
            // A 429 that started nothing here still ends this request's turn as the probe.
            if let (Some(shared), Some(probe)) = (&shared, shared_probe.take()) {
                let _ = Box::pin(shared.store.probe_release(&probe)).await;
            }
        } else {
            if let (Some(shared), Some(probe)) = (&shared, shared_probe.take()) {
                // Unavailable: the turn lapses, and the next request probes again.
                let _ = Box::pin(shared.store.probe_answered(&probe)).await;
            }
            if probe {
                tracing::info!(
                    credential = &*budget.name,
                    "Bitbucket answered the cool-down's probe: requests flow again"
                );
            }
            budget.cooldown.on_answer(probe);
        }
    }
}

impl Drop for UpstreamAttempt {
    fn drop(&mut self) {
        if self.probe {
            self.budget.cooldown.release_probe(Instant::now());
        }
        if let (Some(shared), Some(probe), Ok(runtime)) = (
            &self.shared,
            self.shared_probe.take(),
            tokio::runtime::Handle::try_current(),
        ) {
            let store = shared.store.clone();
            runtime.spawn(async move { store.probe_release(&probe).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROBE_WAIT: Duration = Duration::from_secs(5);

    fn budget(per_hour: u32, burst: u32, max_wait: Duration) -> Arc<CredentialBudget> {
        Arc::new(CredentialBudget::new(
            Arc::from("ci"),
            Some(RateLimit {
                per_hour,
                burst,
                max_wait,
            }),
            &crate::telemetry::metrics::Metrics::new(),
        ))
    }

    fn too_many(retry_after: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::RETRY_AFTER, retry_after.parse().unwrap());
        headers
    }

    #[tokio::test(start_paused = true)]
    async fn an_unspent_permit_gives_its_slot_back() {
        let budget = budget(1, 1, Duration::ZERO);
        let permit = budget
            .acquire(Duration::ZERO, PROBE_WAIT, None)
            .await
            .unwrap();
        drop(permit);
        let spent = budget
            .acquire(Duration::ZERO, PROBE_WAIT, None)
            .await
            .unwrap();
        spent
            .spend()
            .answered(Instant::now(), StatusCode::OK, &HeaderMap::new())
            .await;
        assert!(matches!(
            budget.acquire(Duration::ZERO, PROBE_WAIT, None).await,
            Err(ProxyError::RateLimited { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_goes_nowhere_hands_its_role_to_a_waiter() {
        let budget = budget(3600, 100, Duration::ZERO);
        let first = budget
            .acquire(Duration::ZERO, PROBE_WAIT, None)
            .await
            .unwrap();
        first
            .spend()
            .answered(
                Instant::now(),
                StatusCode::TOO_MANY_REQUESTS,
                &too_many("1"),
            )
            .await;
        tokio::time::advance(Duration::from_secs(1)).await;
        let probe = budget
            .acquire(Duration::ZERO, PROBE_WAIT, None)
            .await
            .unwrap();
        assert!(probe.is_probe());
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.acquire(Duration::ZERO, PROBE_WAIT, None).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "waits for the probe's answer");
        // Served without going upstream (a cache hit, say): the waiter probes instead.
        drop(probe);
        let next = waiter.await.unwrap().unwrap();
        assert!(next.is_probe());
        // Sent, but no answer came (upstream failure): the role moves on again.
        drop(next.spend());
        let again = budget
            .acquire(Duration::ZERO, PROBE_WAIT, None)
            .await
            .unwrap();
        assert!(again.is_probe());
        again
            .spend()
            .answered(Instant::now(), StatusCode::OK, &HeaderMap::new())
            .await;
        let open = budget
            .acquire(Duration::ZERO, PROBE_WAIT, None)
            .await
            .unwrap();
        assert!(!open.is_probe());
        assert!(budget.cooldown().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_delayed_into_a_cool_down_is_not_sent() {
        let budget = budget(3600, 1, Duration::from_secs(2));
        let first = budget
            .acquire(Duration::from_secs(2), PROBE_WAIT, None)
            .await
            .unwrap()
            .spend();
        let delayed = {
            let budget = budget.clone();
            tokio::spawn(async move {
                budget
                    .acquire(Duration::from_secs(2), PROBE_WAIT, None)
                    .await
            })
        };
        tokio::task::yield_now().await;
        first
            .answered(
                Instant::now(),
                StatusCode::TOO_MANY_REQUESTS,
                &too_many("30"),
            )
            .await;
        match delayed.await.unwrap() {
            Err(ProxyError::CoolingDown { retry_after_s, .. }) => assert_eq!(retry_after_s, 29),
            other => panic!("expected a cool-down refusal, got {:?}", other.map(|_| ())),
        }
        // Its slot was given back: the governor counts only the first request.
        assert_eq!(budget.governor.usage(Instant::now()).sent, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_leaves_while_delayed_costs_nothing() {
        let budget = budget(3600, 1, Duration::from_secs(5));
        drop(
            budget
                .acquire(Duration::ZERO, PROBE_WAIT, None)
                .await
                .unwrap()
                .spend(),
        );
        let waiting = budget.acquire(Duration::from_secs(5), PROBE_WAIT, None);
        assert!(
            tokio::time::timeout(Duration::from_millis(500), waiting)
                .await
                .is_err()
        );
        assert_eq!(budget.governor.usage(Instant::now()).sent, 1);
    }
}
