//! Validation of `[cache]` and of a route's `cache = { ... }` into the settings the response
//! cache runs on ([`crate::cache::policy`]).

use super::file::{CacheSection, DurationText, RouteCacheSection};
use super::validate::{Issues, parse_duration};
use crate::cache::policy::{
    CacheLimits, DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRY_BYTES, RouteCachePolicy,
};

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
