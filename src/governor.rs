//! The rate-limit governor. Bitbucket counts each credential's requests over a rolling hour
//! and answers 429 once the budget is spent; a CI fleet sharing one token can spend it in
//! minutes. Per credential the proxy counts what it sent in the last hour and, with
//! `rate_limit = { per_hour, burst }`, refuses locally (429 with an accurate `Retry-After`)
//! instead of burning the budget.
//!
//! Two rules apply together: never more than `per_hour` in any rolling hour (Bitbucket's own
//! accounting), and a steady pace of `per_hour` per hour with bursts of up to `burst` (a generic
//! cell-rate algorithm), so one job cannot spend the hour's budget in its first minute.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::credentials::RateLimit;

const WINDOW_SECONDS: u64 = 3600;

/// Requests sent per second over the last hour, in a ring of one-second buckets.
struct Window {
    buckets: Box<[u32; WINDOW_SECONDS as usize]>,
    /// The second (since `epoch`) the newest bucket stands for.
    newest: u64,
    total: u64,
    /// The generic cell-rate algorithm's theoretical arrival time, in seconds since `epoch`.
    theoretical_arrival: f64,
}

pub struct Governor {
    epoch: Instant,
    window: Mutex<(Window, Option<RateLimit>)>,
}

impl Governor {
    pub fn new(limit: Option<RateLimit>) -> Self {
        Governor {
            epoch: Instant::now(),
            window: Mutex::new((
                Window {
                    buckets: Box::new([0; WINDOW_SECONDS as usize]),
                    newest: 0,
                    total: 0,
                    theoretical_arrival: 0.0,
                },
                limit,
            )),
        }
    }

    /// A reload may change the limit; the count of what was sent carries over.
    pub fn set_limit(&self, limit: Option<RateLimit>) {
        self.window.lock().unwrap_or_else(|p| p.into_inner()).1 = limit;
    }

    /// Admits one request now (returning how many went out in the last hour, this one
    /// included), or says how long until one would be admitted.
    pub fn try_acquire(&self, now: Instant) -> Result<u64, Duration> {
        let elapsed = now.saturating_duration_since(self.epoch).as_secs_f64();
        let second = elapsed as u64;
        let mut guard = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let (window, limit) = &mut *guard;
        window.advance(second);
        if let Some(limit) = *limit {
            let per_hour = u64::from(limit.per_hour.max(1));
            if window.total >= per_hour {
                let leaves_at = window.second_when_count_drops_below(per_hour) as f64;
                return Err(Duration::from_secs_f64((leaves_at - elapsed).max(0.0)));
            }
            let interval = WINDOW_SECONDS as f64 / per_hour as f64;
            let tolerance = f64::from(limit.burst.max(1) - 1) * interval;
            let arrival = window.theoretical_arrival.max(elapsed);
            if arrival - elapsed > tolerance {
                return Err(Duration::from_secs_f64(arrival - elapsed - tolerance));
            }
            window.theoretical_arrival = arrival + interval;
        }
        window.buckets[(second % WINDOW_SECONDS) as usize] += 1;
        window.total += 1;
        Ok(window.total)
    }

    /// Requests admitted in the last hour, and the limit if one is set.
    pub fn usage(&self, now: Instant) -> (u64, Option<RateLimit>) {
        let second = now.saturating_duration_since(self.epoch).as_secs();
        let mut guard = self.window.lock().unwrap_or_else(|p| p.into_inner());
        guard.0.advance(second);
        (guard.0.total, guard.1)
    }
}

impl Window {
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

    #[test]
    fn bursts_then_paces() {
        // 3600/h is one per second; bursts of 5.
        let governor = Governor::new(Some(RateLimit {
            per_hour: 3600,
            burst: 5,
        }));
        for _ in 0..5 {
            assert!(governor.try_acquire(at(&governor, 0.0)).is_ok());
        }
        let wait = governor.try_acquire(at(&governor, 0.0)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        assert!(governor.try_acquire(at(&governor, 1.0)).is_ok());
        assert!(governor.try_acquire(at(&governor, 1.0)).is_err());
    }

    #[test]
    fn never_more_than_per_hour_in_a_rolling_hour() {
        let governor = Governor::new(Some(RateLimit {
            per_hour: 10,
            burst: 10,
        }));
        for i in 0..10 {
            assert!(
                governor
                    .try_acquire(at(&governor, f64::from(i) * 10.0))
                    .is_ok()
            );
        }
        // The first went out at 0 s: the window frees a slot at 3600 s.
        let wait = governor.try_acquire(at(&governor, 400.0)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(3200));
        assert!(governor.try_acquire(at(&governor, 3600.0)).is_ok());
        assert_eq!(governor.usage(at(&governor, 3600.0)).0, 10);
        assert_eq!(governor.usage(at(&governor, 7300.0)).0, 0);
    }

    #[test]
    fn unlimited_credentials_are_counted_only() {
        let governor = Governor::new(None);
        for _ in 0..10_000 {
            assert!(governor.try_acquire(at(&governor, 5.0)).is_ok());
        }
        assert_eq!(governor.usage(at(&governor, 5.0)), (10_000, None));
    }
}
