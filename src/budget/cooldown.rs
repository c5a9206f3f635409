//! The 429 cool-down of one credential. Once Bitbucket answers 429, clients that retry on
//! their own timers keep a spent budget spent; the proxy instead holds every request of that
//! credential (all routes sharing it) until the cool-down ends, answering them itself. Then
//! exactly one request probes Bitbucket while the others wait for its answer: a success opens
//! the gate for all, another 429 starts a longer cool-down.
//!
//! The length comes from the 429's `Retry-After` (seconds or an HTTP-date) when present,
//! otherwise from [`DEFAULT_COOLDOWN`] doubling per consecutive 429 up to [`MAX_BACKOFF`].
//! Uses only tokio's clock and `Notify`; knows nothing of HTTP beyond parsing `Retry-After`.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The first cool-down after a 429 without `Retry-After`.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(30);
/// The longest cool-down the doubling reaches without `Retry-After`.
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// The longest `Retry-After` obeyed: Bitbucket's budget is a rolling hour, so any longer value
/// is a mistake (or hostile), and would silence the credential for no reason.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// The shortest cool-down: a `Retry-After: 0` must not turn into a stream of probes.
const MIN_COOLDOWN: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Open,
    Cooling {
        until: Instant,
    },
    /// The cool-down is over and one request is asking Bitbucket whether the budget is back.
    Probing,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// 429s in a row without a successful answer in between; drives the backoff.
    strikes: u32,
    /// When the cool-down in progress started, and whether its length came from `Retry-After`.
    started: Option<(SystemTime, bool)>,
}

/// What a request may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// No cool-down: go ahead.
    Pass,
    /// The cool-down is over: this request is the one probe.
    Probe,
    /// Cooling down for this much longer.
    Refuse(Duration),
}

/// A snapshot for `/-/ready`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CooldownStatus {
    /// Whole seconds until a request may probe again (0 while a probe is under way).
    pub retry_after_s: u64,
    pub probing: bool,
    pub consecutive_429s: u32,
    /// Unix seconds of the 429 that started it.
    pub since: u64,
    /// Whether Bitbucket's `Retry-After` set the length (otherwise the default backoff did).
    pub from_retry_after: bool,
}

pub struct Cooldown {
    state: Mutex<State>,
    changed: Notify,
}

impl Default for Cooldown {
    fn default() -> Self {
        Cooldown {
            state: Mutex::new(State {
                phase: Phase::Open,
                strikes: 0,
                started: None,
            }),
            changed: Notify::new(),
        }
    }
}

impl Cooldown {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets a request through, makes it the probe, or says how long to wait. While a probe is
    /// out, waits up to `probe_wait` for its answer; if none comes in time the request is
    /// refused for a second rather than sent alongside the probe.
    /// The second value says whether the request waited for a probe.
    pub async fn enter(&self, now: Instant, probe_wait: Duration) -> (Gate, bool) {
        // The common case takes one uncontended lock and no waiter registration.
        if let Some(gate) = self.gate(now) {
            return (gate, false);
        }
        let deadline = now + probe_wait;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before the state is read, so an answer between the two is not missed.
            notified.as_mut().enable();
            if let Some(gate) = self.gate(Instant::now()) {
                return (gate, true);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return (Gate::Refuse(MIN_COOLDOWN), true);
            }
        }
    }

    /// `None` while another request probes.
    fn gate(&self, now: Instant) -> Option<Gate> {
        let mut state = self.lock();
        match state.phase {
            Phase::Open => Some(Gate::Pass),
            Phase::Cooling { until } if now < until => Some(Gate::Refuse(until - now)),
            Phase::Cooling { .. } => {
                state.phase = Phase::Probing;
                Some(Gate::Probe)
            }
            Phase::Probing => None,
        }
    }

    /// How long the cool-down in progress still lasts: `None` when none is, zero while a probe
    /// is out.
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        match self.lock().phase {
            Phase::Open => None,
            Phase::Cooling { until } => Some(until.saturating_duration_since(now)),
            Phase::Probing => Some(Duration::ZERO),
        }
    }

    /// Bitbucket answered 429. Returns the cool-down's length if this answer started one (the
    /// first 429, or the probe's); a 429 to a request sent before the cool-down began only
    /// stretches it to its own `Retry-After`.
    pub fn on_too_many(
        &self,
        now: Instant,
        retry_after: Option<Duration>,
        from_probe: bool,
    ) -> Option<Duration> {
        let mut state = self.lock();
        let started = match state.phase {
            Phase::Cooling { until } if !from_probe => {
                if let Some(wait) = retry_after.map(clamp)
                    && now + wait > until
                {
                    state.phase = Phase::Cooling { until: now + wait };
                }
                None
            }
            // A straggler's 429 while another request probes: the probe's answer decides.
            Phase::Probing if !from_probe => None,
            _ => {
                state.strikes = state.strikes.saturating_add(1);
                let wait = retry_after
                    .map(clamp)
                    .unwrap_or_else(|| backoff(state.strikes));
                state.phase = Phase::Cooling { until: now + wait };
                state.started = Some((SystemTime::now(), retry_after.is_some()));
                Some(wait)
            }
        };
        drop(state);
        self.changed.notify_waiters();
        started
    }

    /// Bitbucket answered with anything but 429. The probe's answer ends the cool-down; an
    /// answer to a request sent before it began does not.
    pub fn on_answer(&self, from_probe: bool) {
        let mut state = self.lock();
        match state.phase {
            Phase::Probing if from_probe => {
                state.phase = Phase::Open;
                state.strikes = 0;
                state.started = None;
                drop(state);
                self.changed.notify_waiters();
            }
            Phase::Open => state.strikes = 0,
            _ => {}
        }
    }

    /// The shared store reports a cool-down (another replica's 429): hold requests here until
    /// `until` as well. Never shortens a local one; a probe in flight here yields to it.
    pub fn adopt(&self, until: Instant) {
        let mut state = self.lock();
        match state.phase {
            Phase::Cooling { until: current } if current >= until => return,
            Phase::Open => state.started = Some((SystemTime::now(), false)),
            _ => {}
        }
        state.phase = Phase::Cooling { until };
        drop(state);
        self.changed.notify_waiters();
    }

    /// The probe never got an answer (the client left, the upstream failed, the request was
    /// served without going upstream): the next request probes instead.
    pub fn release_probe(&self, now: Instant) {
        let mut state = self.lock();
        if state.phase == Phase::Probing {
            state.phase = Phase::Cooling { until: now };
            drop(state);
            self.changed.notify_waiters();
        }
    }

    pub fn status(&self, now: Instant) -> Option<CooldownStatus> {
        let state = self.lock();
        let (retry_after_s, probing) = match state.phase {
            Phase::Open => return None,
            Phase::Cooling { until } => (ceil_seconds(until.saturating_duration_since(now)), false),
            Phase::Probing => (0, true),
        };
        let (since, from_retry_after) = state.started.unwrap_or((SystemTime::UNIX_EPOCH, false));
        Some(CooldownStatus {
            retry_after_s,
            probing,
            consecutive_429s: state.strikes,
            since: since
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            from_retry_after,
        })
    }
}

fn clamp(wait: Duration) -> Duration {
    wait.clamp(MIN_COOLDOWN, MAX_RETRY_AFTER)
}

/// 30 s, 60 s, 120 s … up to [`MAX_BACKOFF`], for the `strikes`-th 429 in a row.
fn backoff(strikes: u32) -> Duration {
    let doublings = strikes.saturating_sub(1).min(16);
    DEFAULT_COOLDOWN
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF)
}

/// Whole seconds, rounded up: a client that waits exactly that long must not be refused again.
pub fn ceil_seconds(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

/// `Retry-After` as delay-seconds or an HTTP-date (RFC 9110, section 10.2.3), relative to
/// `now`. Unreadable values are `None`; a date in the past is zero; huge numbers saturate.
pub fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(text.parse::<u64>().unwrap_or(u64::MAX)));
    }
    let date = httpdate::parse_http_date(text).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`Cooldown::enter`] at the current instant, waiting at most 5 s for a probe.
    async fn enter_now(cooldown: &Cooldown) -> (Gate, bool) {
        cooldown.enter(Instant::now(), Duration::from_secs(5)).await
    }

    #[test]
    fn retry_after_takes_seconds_and_dates_and_never_panics() {
        let now = httpdate::parse_http_date("Tue, 01 Dec 2026 05:00:00 GMT").unwrap();
        let parse = |v: &str| parse_retry_after(&HeaderValue::from_str(v).unwrap(), now);
        assert_eq!(parse("120"), Some(Duration::from_secs(120)));
        assert_eq!(parse(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(
            parse("Tue, 01 Dec 2026 05:01:30 GMT"),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse("Tuesday, 01-Dec-26 05:00:10 GMT"),
            Some(Duration::from_secs(10))
        );
        assert_eq!(parse("Tue, 01 Dec 2026 04:00:00 GMT"), Some(Duration::ZERO));
        assert_eq!(
            parse("999999999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
        for bad in [
            "",
            "-1",
            "1.5",
            "soon",
            "0x10",
            "Tue, 99 Dec 2026 05:00:00 GMT",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(clamp(Duration::from_secs(u64::MAX)), MAX_RETRY_AFTER);
        assert_eq!(clamp(Duration::ZERO), MIN_COOLDOWN);
    }

    #[test]
    fn backoff_doubles_up_to_its_bound() {
        let waits: Vec<u64> = (1..=7).map(|s| backoff(s).as_secs()).collect();
        assert_eq!(waits, [30, 60, 120, 240, 480, 600, 600]);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    #[tokio::test(start_paused = true)]
    async fn one_probe_after_the_cool_down_then_open_or_longer() {
        let cooldown = Cooldown::default();
        assert_eq!(enter_now(&cooldown).await.0, Gate::Pass);
        let now = Instant::now();
        assert_eq!(
            cooldown.on_too_many(now, None, false),
            Some(DEFAULT_COOLDOWN)
        );
        // A second 429 from a request already in flight does not stack a strike.
        assert_eq!(cooldown.on_too_many(now, None, false), None);
        assert_eq!(enter_now(&cooldown).await.0, Gate::Refuse(DEFAULT_COOLDOWN));
        tokio::time::advance(DEFAULT_COOLDOWN).await;
        assert_eq!(enter_now(&cooldown).await.0, Gate::Probe);
        // The probe gets 429 again: twice as long.
        assert_eq!(
            cooldown.on_too_many(Instant::now(), None, true),
            Some(DEFAULT_COOLDOWN * 2)
        );
        tokio::time::advance(DEFAULT_COOLDOWN * 2).await;
        assert_eq!(enter_now(&cooldown).await.0, Gate::Probe);
        cooldown.on_answer(true);
        assert_eq!(enter_now(&cooldown).await.0, Gate::Pass);
        assert!(cooldown.status(Instant::now()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_follow_the_probes_answer_or_take_over_its_role() {
        let cooldown = std::sync::Arc::new(Cooldown::default());
        cooldown.on_too_many(Instant::now(), Some(Duration::from_secs(2)), false);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(enter_now(&cooldown).await.0, Gate::Probe);
        let waiter = {
            let cooldown = cooldown.clone();
            tokio::spawn(async move { enter_now(&cooldown).await })
        };
        tokio::task::yield_now().await;
        // The probe went nowhere: the waiter becomes the probe.
        cooldown.release_probe(Instant::now());
        assert_eq!(waiter.await.unwrap(), (Gate::Probe, true));
        let waiter = {
            let cooldown = cooldown.clone();
            tokio::spawn(async move { enter_now(&cooldown).await })
        };
        tokio::task::yield_now().await;
        cooldown.on_too_many(Instant::now(), Some(Duration::from_secs(40)), true);
        assert_eq!(
            waiter.await.unwrap(),
            (Gate::Refuse(Duration::from_secs(40)), true)
        );
        let status = cooldown.status(Instant::now()).unwrap();
        assert_eq!(status.retry_after_s, 40);
        assert_eq!(status.consecutive_429s, 2);
        assert!(status.from_retry_after);
        // A probe that never answers holds the others at most `probe_wait`.
        tokio::time::advance(Duration::from_secs(40)).await;
        assert_eq!(enter_now(&cooldown).await.0, Gate::Probe);
        let started = Instant::now();
        assert_eq!(
            enter_now(&cooldown).await,
            (Gate::Refuse(MIN_COOLDOWN), true)
        );
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }
}
