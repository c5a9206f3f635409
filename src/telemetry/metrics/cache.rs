//! The cache's Prometheus metrics, registered beside the proxy's own: requests answered from
//! the store, coalesced into another's upstream request, or given a stale entry, per
//! credential; and what the store holds.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::telemetry::metrics::CredentialLabels;

#[derive(Default)]
pub struct CacheMetrics {
    pub hits: Family<CredentialLabels, Counter>,
    pub coalesced: Family<CredentialLabels, Counter>,
    pub stale: Family<CredentialLabels, Counter>,
    pub stored_bytes: Gauge,
    pub stored_entries: Gauge,
}

impl CacheMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "cache_hits",
            "Requests answered from the response cache without an upstream request, per credential",
            self.hits.clone(),
        );
        registry.register(
            "coalesced",
            "Requests that shared another identical request's upstream request, per credential",
            self.coalesced.clone(),
        );
        registry.register(
            "cache_stale_served",
            "Requests answered with a stale entry because Bitbucket failed or refused (stale_if_error)",
            self.stale.clone(),
        );
        registry.register(
            "cache_bytes",
            "Bytes the response cache holds (bodies, headers and keys; bounded by cache.max_bytes)",
            self.stored_bytes.clone(),
        );
        registry.register(
            "cache_entries",
            "Responses the response cache holds",
            self.stored_entries.clone(),
        );
    }
}
