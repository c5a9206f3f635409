//! The store's metrics: whether it answers, how often it failed, and how many requests went
//! ahead without it (`on_error = "local"`) or were refused (`"refuse"`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Registered once in [`crate::telemetry::metrics::Metrics`]; a reload's new [`crate::store::Store`] keeps using
/// the same series.
#[derive(Default, Clone)]
pub struct StoreMetrics {
    pub up: Gauge,
    pub errors: Counter,
    pub fallbacks: Counter,
    pub refused: Counter,
    pub cache_hits: Counter,
    pub cache_stored: Counter,
    pub cache_fallbacks: Counter,
    pub fill_waits: Counter,
    pub probe_waits: Counter,
}

impl StoreMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = StoreMetrics::default();
        registry.register(
            "store_up",
            "1 while the shared store ([store]) answers; 0 while it is down, and always without [store]",
            metrics.up.clone(),
        );
        registry.register(
            "store_errors",
            "Store calls that failed or took longer than store.timeout",
            metrics.errors.clone(),
        );
        registry.register(
            "store_fallbacks",
            "Requests governed by the in-process budget because the store was down (on_error = \"local\")",
            metrics.fallbacks.clone(),
        );
        registry.register(
            "store_refused",
            "Requests refused with 503 store-unavailable because the store was down (on_error = \"refuse\")",
            metrics.refused.clone(),
        );
        registry.register(
            "store_cache_hits",
            "Requests answered from an entry another replica (or this one) put in the shared store",
            metrics.cache_hits.clone(),
        );
        registry.register(
            "store_cache_stored",
            "Response-cache entries written to the shared store",
            metrics.cache_stored.clone(),
        );
        registry.register(
            "store_cache_fallbacks",
            "Shared-cache reads, writes and invalidations skipped or failed because the store was down (the in-process cache still answered)",
            metrics.cache_fallbacks.clone(),
        );
        registry.register(
            "store_fill_waits",
            "Cache misses that waited for another replica's fill lock instead of going upstream at once",
            metrics.fill_waits.clone(),
        );
        registry.register(
            "store_probe_waits",
            "Requests that waited for another replica's probe after a shared cool-down",
            metrics.probe_waits.clone(),
        );
        metrics
    }

    pub fn new(metrics: &crate::telemetry::metrics::Metrics) -> Self {
        metrics.store.clone()
    }
}
