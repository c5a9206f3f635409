//! The rate-limit governor. Bitbucket counts each credential's requests over a rolling hour
//! and answers 429 once the budget is spent; a CI fleet sharing one token can spend it in
//! minutes. Per credential the proxy counts what it sent in the last hour and, with
//! `rate_limit = { per_hour, burst }`, refuses locally (429 with an accurate `Retry-After`)
//! instead of burning the budget.
//!
//! Two rules apply together: never more than `per_hour` in any rolling hour (Bitbucket's own
//! accounting), and a steady pace of `per_hour` per hour with bursts of up to `burst` (a generic
//! cell-rate algorithm), so one job cannot spend the hour's budget in its first minute.
//!
//! What Bitbucket reports ([`crate::budget::reported`]) feeds in: a reported `X-RateLimit-Limit`
//! replaces the configured `per_hour` (which was a guess), and `X-RateLimit-NearLimit` paces
//! every credential, configured or not, to one request per `3600 / limit` seconds (no bursts)
//! until Bitbucket stops reporting it, because that is the rate at which a rolling hour gives
//! budget back. Admissions that never reach Bitbucket are [refunded](Governor::refund).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::bitbucket::rate_limit::RateLimit;
use crate::budget::reported::{Report, Reported};

use crate::bitbucket::rate_limit::{Pace, WINDOW_SECONDS};

/// The budget assumed when Bitbucket says NearLimit without a limit and none is configured:
/// Bitbucket's documented default for `/2.0/repositories/*`.
pub const DEFAULT_PER_HOUR: u32 = 1000;

/// Requests sent per second over the last hour, in a ring of one-second buckets.
struct Window {
    buckets: Box<[u32; WINDOW_SECONDS as usize]>,
    /// The second (since `epoch`) the newest bucket stands for.
    newest: u64,
    total: u64,
    /// The generic cell-rate algorithm's theoretical arrival time, in seconds since `epoch`.
    theoretical_arrival: f64,
    /// The emission interval `theoretical_arrival` was computed with, and when it last moved.
    interval: f64,
    paced_at: f64,
}

struct State {
    window: Window,
    configured: Option<RateLimit>,
    reported: Reported,
}

pub struct Governor {
    epoch: Instant,
    state: Mutex<State>,
}

/// One admitted request, until it is sent or refunded.
#[derive(Debug)]
pub struct Admission {
    /// Requests admitted in the last hour, this one included.
    pub sent: u64,
    /// The hourly limit in force under `rate_limit` (Bitbucket's figure when it reported one).
    pub limit: Option<u32>,
    second: u64,
    /// How far it moved the theoretical arrival time (0 when no pacing applied).
    interval: f64,
}

/// Why and for how long a request cannot be admitted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refusal {
    pub wait: Duration,
    pub pace: Pace,
}

/// The governor's view of a credential, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub sent: u64,
    /// The limit in force: Bitbucket's latest figure, else `rate_limit.per_hour`.
    pub limit: Option<u32>,
    /// What Bitbucket's figures leave: `X-RateLimit-Remaining` if sent, else the reported
    /// limit minus what the proxy sent in the hour.
    pub reported_left: Option<u64>,
}

impl Governor {
    pub fn new(limit: Option<RateLimit>) -> Self {
        Governor {
            epoch: Instant::now(),
            state: Mutex::new(State {
                window: Window {
                    buckets: Box::new([0; WINDOW_SECONDS as usize]),
                    newest: 0,
                    total: 0,
                    theoretical_arrival: 0.0,
                    interval: 0.0,
                    paced_at: 0.0,
                },
                configured: limit,
                reported: Reported::default(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A reload may change the limit; the count of what was sent carries over.
    pub fn set_limit(&self, limit: Option<RateLimit>) {
        self.lock().configured = limit;
    }

    /// The rules in force now: the rolling-hour cap, and the pace (NearLimit's if Bitbucket
    /// reports it, else the cap's). The shared store applies the same rules (see
    /// [`crate::store::budget`]).
    pub fn rules(&self, now: Instant) -> Rules {
        let second = now.saturating_duration_since(self.epoch).as_secs();
        rules(&self.lock(), second)
    }

    /// Admits one request now, or says how long until one would be admitted and by which rule.
    pub fn try_acquire(&self, now: Instant) -> Result<Admission, Refusal> {
        let elapsed = now.saturating_duration_since(self.epoch).as_secs_f64();
        let second = elapsed as u64;
        let mut guard = self.lock();
        let state = &mut *guard;
        state.window.advance(second);
        let Rules { limit, near } = rules(state, second);
        let window = &mut state.window;
        if let Some(pace @ Pace::Limit { per_hour, .. }) = limit
            && window.total >= u64::from(per_hour)
        {
            let leaves_at = window.second_when_count_drops_below(u64::from(per_hour)) as f64;
            return Err(Refusal {
                wait: Duration::from_secs_f64((leaves_at - elapsed).max(0.0)),
                pace,
            });
        }
        let mut interval = 0.0;
        if let Some(pace) = near.or(limit) {
            let burst;
            (interval, burst) = pace.interval_and_burst();
            window.rescale(interval);
            let tolerance = f64::from(burst - 1) * interval;
            let arrival = window.theoretical_arrival.max(elapsed);
            if arrival - elapsed > tolerance {
                return Err(Refusal {
                    wait: Duration::from_secs_f64(arrival - elapsed - tolerance),
                    pace,
                });
            }
            window.theoretical_arrival = arrival + interval;
            window.paced_at = elapsed;
        }
        window.buckets[(second % WINDOW_SECONDS) as usize] += 1;
        window.total += 1;
        Ok(Admission {
            sent: window.total,
            limit: match limit {
                Some(Pace::Limit { per_hour, .. }) => Some(per_hour),
                _ => None,
            },
            second,
            interval,
        })
    }

    /// Gives back an admission whose request never reached Bitbucket (served from a cache,
    /// joined another request, refused later, or abandoned by its client).
    pub fn refund(&self, admission: Admission) {
        let mut state = self.lock();
        let window = &mut state.window;
        let slot = (admission.second % WINDOW_SECONDS) as usize;
        if admission.second + WINDOW_SECONDS > window.newest && window.buckets[slot] > 0 {
            window.buckets[slot] -= 1;
            window.total -= 1;
        }
        window.theoretical_arrival = (window.theoretical_arrival - admission.interval).max(0.0);
    }

    /// Keeps what a Bitbucket response said about the budget.
    pub fn record_report(&self, now: Instant, report: &Report) {
        let second = now.saturating_duration_since(self.epoch).as_secs();
        self.lock().reported.record(report, second);
    }

    pub fn usage(&self, now: Instant) -> Usage {
        let second = now.saturating_duration_since(self.epoch).as_secs();
        let mut state = self.lock();
        state.window.advance(second);
        let sent = state.window.total;
        let reported_limit = state.reported.limit(second);
        Usage {
            sent,
            limit: reported_limit.or(state.configured.map(|c| c.per_hour)),
            reported_left: state
                .reported
                .remaining(second)
                .or_else(|| reported_limit.map(|limit| u64::from(limit).saturating_sub(sent))),
        }
    }

    /// Resources Bitbucket reports near their limit, for `/-/ready`.
    pub fn near_limit_resources(&self, now: Instant) -> Vec<String> {
        let second = now.saturating_duration_since(self.epoch).as_secs();
        self.lock().reported.near_limit_resources(second)
    }
}

/// The rules a credential is governed by at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rules {
    /// `rate_limit` (with Bitbucket's reported limit in place of `per_hour`), if configured.
    pub limit: Option<Pace>,
    /// NearLimit pacing while Bitbucket reports it.
    pub near: Option<Pace>,
}

impl Rules {
    /// The rule that sets the pace: NearLimit's, else the cap's.
    pub fn pacing(&self) -> Option<Pace> {
        self.near.or(self.limit)
    }

    pub fn per_hour_cap(&self) -> Option<u32> {
        match self.limit {
            Some(Pace::Limit { per_hour, .. }) => Some(per_hour),
            _ => None,
        }
    }
}

fn rules(state: &State, second: u64) -> Rules {
    let reported_limit = state.reported.limit(second);
    let limit = state.configured.map(|configured| {
        let per_hour = reported_limit.unwrap_or(configured.per_hour).max(1);
        Pace::Limit {
            per_hour,
            burst: configured.burst.clamp(1, per_hour),
            reported: reported_limit.is_some(),
        }
    });
    let near = state.reported.near_limit(second).map(|near_limit| {
        let per_hour = match limit {
            Some(Pace::Limit { per_hour, .. }) => per_hour,
            _ => near_limit.or(reported_limit).unwrap_or(DEFAULT_PER_HOUR),
        };
        Pace::NearLimit {
            per_hour: per_hour.max(1),
        }
    });
    Rules { limit, near }
}

impl Window {
    /// Keeps the debt of requests already paced when the interval changes (a reported limit
    /// replaced the configured one, or NearLimit began): the same number of requests ahead,
    /// spaced at the new interval.
    fn rescale(&mut self, interval: f64) {
        if self.interval > 0.0 && self.interval != interval {
            let ahead = (self.theoretical_arrival - self.paced_at).max(0.0);
            self.theoretical_arrival = self.paced_at + ahead * interval / self.interval;
        }
        self.interval = interval;
    }

    /// Forgets the buckets that fell out of the hour ending at `second`.
    fn advance(&mut self, second: u64) {
        if second <= self.newest {
            return;
        }
        let stale = (second - self.newest).min(WINDOW_SECONDS);
        for past in 1..=stale {
            let slot = ((self.newest + past) % WINDOW_SECONDS) as usize;
            self.total -= u64::from(self.buckets[slot]);
            self.buckets[slot] = 0;
        }
        self.newest = second;
    }

    /// The second at which enough of the oldest requests leave the window for the count to
    /// fall below `limit`.
    fn second_when_count_drops_below(&self, limit: u64) -> u64 {
        let must_leave = self.total + 1 - limit;
        let oldest = (self.newest + 1).saturating_sub(WINDOW_SECONDS);
        let mut left = 0;
        for second in oldest..=self.newest {
            left += u64::from(self.buckets[(second % WINDOW_SECONDS) as usize]);
            if left >= must_leave {
                return second + WINDOW_SECONDS;
            }
        }
        self.newest + WINDOW_SECONDS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(governor: &Governor, seconds: f64) -> Instant {
        governor.epoch + Duration::from_secs_f64(seconds)
    }

    fn limit(per_hour: u32, burst: u32) -> Option<RateLimit> {
        Some(RateLimit {
            per_hour,
            burst,
            max_wait: Duration::ZERO,
        })
    }

    fn report(limit: Option<u32>, near_limit: Option<bool>) -> Report {
        Report {
            resource: "api".into(),
            limit,
            remaining: None,
            near_limit,
        }
    }

    #[test]
    fn bursts_then_paces() {
        // 3600/h is one per second; bursts of 5.
        let governor = Governor::new(limit(3600, 5));
        for _ in 0..5 {
            assert!(governor.try_acquire(at(&governor, 0.0)).is_ok());
        }
        let refusal = governor.try_acquire(at(&governor, 0.0)).unwrap_err();
        assert_eq!(refusal.wait, Duration::from_secs(1));
        assert!(governor.try_acquire(at(&governor, 1.0)).is_ok());
        assert!(governor.try_acquire(at(&governor, 1.0)).is_err());
    }

    #[test]
    fn never_more_than_per_hour_in_a_rolling_hour() {
        let governor = Governor::new(limit(10, 10));
        for i in 0..10 {
            assert!(
                governor
                    .try_acquire(at(&governor, f64::from(i) * 10.0))
                    .is_ok()
            );
        }
        // The first went out at 0 s: the window frees a slot at 3600 s.
        let refusal = governor.try_acquire(at(&governor, 400.0)).unwrap_err();
        assert_eq!(refusal.wait, Duration::from_secs(3200));
        assert_eq!(
            refusal.pace,
            Pace::Limit {
                per_hour: 10,
                burst: 10,
                reported: false
            }
        );
        assert!(governor.try_acquire(at(&governor, 3600.0)).is_ok());
        assert_eq!(governor.usage(at(&governor, 3600.0)).sent, 10);
        assert_eq!(governor.usage(at(&governor, 7300.0)).sent, 0);
    }

    #[test]
    fn unlimited_credentials_are_counted_only() {
        let governor = Governor::new(None);
        for _ in 0..10_000 {
            assert!(governor.try_acquire(at(&governor, 5.0)).is_ok());
        }
        let usage = governor.usage(at(&governor, 5.0));
        assert_eq!(
            (usage.sent, usage.limit, usage.reported_left),
            (10_000, None, None)
        );
    }

    #[test]
    fn a_reported_limit_replaces_the_configured_guess() {
        let governor = Governor::new(limit(2, 2));
        governor.try_acquire(at(&governor, 0.0)).unwrap();
        governor.try_acquire(at(&governor, 0.0)).unwrap();
        assert!(governor.try_acquire(at(&governor, 0.0)).is_err());
        // Bitbucket says this token is scaled to 10,000 per hour: the guess of 2 is gone, the
        // burst of 2 stays.
        governor.record_report(at(&governor, 0.0), &report(Some(10_000), Some(false)));
        let admitted = governor.try_acquire(at(&governor, 2.0)).unwrap();
        assert_eq!(admitted.sent, 3);
        assert_eq!(admitted.limit, Some(10_000));
        let usage = governor.usage(at(&governor, 2.0));
        assert_eq!(usage.limit, Some(10_000));
        assert_eq!(usage.reported_left, Some(9_997));
        // A smaller figure tightens it as well.
        governor.record_report(at(&governor, 2.0), &report(Some(3), None));
        let refusal = governor.try_acquire(at(&governor, 30.0)).unwrap_err();
        assert_eq!(
            refusal.pace,
            Pace::Limit {
                per_hour: 3,
                burst: 2,
                reported: true
            }
        );
    }

    #[test]
    fn near_limit_paces_even_without_a_configured_limit() {
        let governor = Governor::new(None);
        for _ in 0..100 {
            governor.try_acquire(at(&governor, 0.0)).unwrap();
        }
        governor.record_report(at(&governor, 0.0), &report(Some(1_800), Some(true)));
        // One every 2 s, no bursts.
        governor.try_acquire(at(&governor, 0.0)).unwrap();
        let refusal = governor.try_acquire(at(&governor, 0.5)).unwrap_err();
        assert_eq!(refusal.wait, Duration::from_secs_f64(1.5));
        assert_eq!(refusal.pace, Pace::NearLimit { per_hour: 1_800 });
        assert!(refusal.pace.to_string().contains("one every 2.0 s"));
        governor.try_acquire(at(&governor, 2.0)).unwrap();
        // Bitbucket no longer says so: back to counting only.
        governor.record_report(at(&governor, 2.0), &report(None, Some(false)));
        for _ in 0..10 {
            governor.try_acquire(at(&governor, 2.0)).unwrap();
        }
    }

    #[test]
    fn near_limit_without_any_figure_assumes_bitbuckets_default() {
        let governor = Governor::new(None);
        governor.record_report(at(&governor, 0.0), &report(None, Some(true)));
        governor.try_acquire(at(&governor, 0.0)).unwrap();
        let refusal = governor.try_acquire(at(&governor, 0.0)).unwrap_err();
        assert_eq!(
            refusal.pace,
            Pace::NearLimit {
                per_hour: DEFAULT_PER_HOUR
            }
        );
        assert_eq!(refusal.wait, Duration::from_secs_f64(3.6));
    }

    #[test]
    fn a_refund_gives_the_slot_back() {
        let governor = Governor::new(limit(3600, 1));
        let admitted = governor.try_acquire(at(&governor, 0.0)).unwrap();
        assert!(governor.try_acquire(at(&governor, 0.0)).is_err());
        governor.refund(admitted);
        assert_eq!(governor.usage(at(&governor, 0.0)).sent, 0);
        assert_eq!(governor.try_acquire(at(&governor, 0.0)).unwrap().sent, 1);
    }
}
