//! What the proxy reports about itself: the tracing subscriber's set-up ([`logging`]), the
//! Prometheus registry and every metric family ([`metrics`], with the budget, cache and store
//! families in its submodules), and request ids ([`request_id`]). The access log that puts these together per
//! request is a layer of the server ([`crate::server::access_log`]).
//!
//! Uses [`crate::base`] and [`crate::bitbucket`] only: metric families take plain labels and
//! numbers, never the live objects they describe.

pub mod logging;
pub mod metrics;
pub mod request_id;
