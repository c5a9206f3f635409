//! `[cache]` and a route's `cache = { ... }`: their validated settings, and the validation
//! that produces them. The response cache ([`crate::cache::policy`]) runs on these.

use super::fields::{Issues, parse_duration};
use super::file::{CacheSection, DurationText, RouteCacheSection};

use std::time::Duration;

/// `[cache] max_bytes` default: room for a few thousand API pages.
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// `[cache] max_entry_bytes` default: a large API page or source file, not an archive.
pub const DEFAULT_MAX_ENTRY_BYTES: u64 = 1024 * 1024;

/// `[cache]`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// What the stored bodies, headers and keys may take together; 0 turns the store off
    /// (coalescing still works).
    pub max_bytes: u64,
    /// The largest body that is stored, or shared between coalesced requests while it streams.
    pub max_entry_bytes: u64,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits {
            max_bytes: DEFAULT_MAX_BYTES,
            max_entry_bytes: DEFAULT_MAX_ENTRY_BYTES,
        }
    }
}

/// A route's `cache = { ... }`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteCachePolicy {
    /// Microcaching: any 200 GET on the route is served from the cache this long.
    pub max_age: Option<Duration>,
    /// How long past `max_age` an entry may still answer when Bitbucket fails or refuses.
    pub stale_if_error: Option<Duration>,
    /// Whether GETs of [immutable paths](crate::cache::policy::is_immutable) are cached without a `max_age`.
    pub immutable: bool,
}

impl Default for RouteCachePolicy {
    fn default() -> Self {
        RouteCachePolicy {
            max_age: None,
            stale_if_error: None,
            immutable: true,
        }
    }
}

pub(super) fn cache_limits(issues: &mut Issues, section: &CacheSection) -> CacheLimits {
    let max_bytes = section.max_bytes.unwrap_or(DEFAULT_MAX_BYTES);
    let max_entry_bytes = section.max_entry_bytes.unwrap_or(DEFAULT_MAX_ENTRY_BYTES);
    if max_entry_bytes == 0 {
        issues.error(
            "cache.max_entry_bytes",
            "must be at least 1 (a byte count, e.g. 1048576)",
        );
    } else if max_bytes != 0 && max_entry_bytes > max_bytes {
        issues.error(
            "cache.max_entry_bytes",
            format!(
                "{max_entry_bytes} is larger than cache.max_bytes ({max_bytes}); valid: at most max_bytes"
            ),
        );
    }
    // Responses are held in memory: a bound past the address space is a typo.
    if usize::try_from(max_bytes).is_err() {
        issues.error("cache.max_bytes", "is larger than this machine can address");
    }
    CacheLimits {
        max_bytes,
        max_entry_bytes,
    }
}

pub(super) fn route_cache_policy(
    issues: &mut Issues,
    key: &str,
    section: &Option<RouteCacheSection>,
) -> RouteCachePolicy {
    let Some(section) = section else {
        return RouteCachePolicy::default();
    };
    let parse = |issues: &mut Issues, name: &str, value: &Option<DurationText>| {
        value.as_deref().map(|text| {
            parse_duration(
                issues,
                &format!("{key}.{name}"),
                Some(text),
                std::time::Duration::from_secs(1),
            )
        })
    };
    let max_age = parse(issues, "max_age", &section.max_age);
    let stale_if_error = parse(issues, "stale_if_error", &section.stale_if_error);
    if stale_if_error.is_some() && max_age.is_none() {
        issues.error(
            format!("{key}.stale_if_error"),
            "only applies to entries that expire: set max_age too (immutable entries never go stale)",
        );
    }
    RouteCachePolicy {
        max_age,
        stale_if_error,
        immutable: section.immutable.unwrap_or(true),
    }
}
