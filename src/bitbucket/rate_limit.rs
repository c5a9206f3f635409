//! Bitbucket's rate limits as the proxy models them: each credential's requests are counted
//! over a rolling hour; a credential's `rate_limit` paces it, and `X-RateLimit-NearLimit` paces
//! it to the rate at which the rolling hour gives budget back.

use std::fmt;

/// Bitbucket's accounting window: a rolling hour.
pub const WINDOW_SECONDS: u64 = 3600;

/// `rate_limit = { per_hour = N, burst = M, max_wait = "5s" }` on a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_hour: u32,
    pub burst: u32,
    /// How long the governor may hold a request for a free slot before refusing it (zero:
    /// refuse at once).
    pub max_wait: std::time::Duration,
}

/// The rule that refused a request, for the error detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// The credential's `rate_limit`; `per_hour` is Bitbucket's figure when `reported`.
    Limit {
        per_hour: u32,
        burst: u32,
        reported: bool,
    },
    /// Bitbucket reported the credential near its limit of `per_hour`.
    NearLimit { per_hour: u32 },
}

impl fmt::Display for Pace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Pace::Limit {
                per_hour,
                burst,
                reported: false,
            } => write!(
                f,
                "is at its rate_limit ({per_hour} per hour, bursts of {burst})"
            ),
            Pace::Limit {
                per_hour, burst, ..
            } => write!(
                f,
                "is at its rate_limit ({per_hour} per hour as Bitbucket reported it, bursts of {burst})"
            ),
            Pace::NearLimit { per_hour } => write!(
                f,
                "is near its limit of {per_hour} per hour (X-RateLimit-NearLimit), so requests are paced to one every {:.1} s",
                WINDOW_SECONDS as f64 / f64::from(per_hour)
            ),
        }
    }
}

impl Pace {
    /// Seconds between requests at this pace, and the bursts allowed.
    pub fn interval_and_burst(self) -> (f64, u32) {
        match self {
            Pace::Limit {
                per_hour, burst, ..
            } => (WINDOW_SECONDS as f64 / f64::from(per_hour), burst),
            Pace::NearLimit { per_hour } => (WINDOW_SECONDS as f64 / f64::from(per_hour), 1),
        }
    }
}
