//! bitbucket-auth-proxy: an HTTP server that injects Bitbucket Cloud credentials into requests
//! from unauthenticated local clients and forwards them over TLS.
//!
//! The crate is built in layers; each may use the layers listed before it and never one after
//! it (`tests/architecture.rs` checks this, and `docs/architecture.md` draws it):
//!
//! | layer | owns |
//! |---|---|
//! | [`base`] | body types, header hygiene, secret types, build information |
//! | [`bitbucket`] | Bitbucket's vocabulary: hosts, credential kinds and scopes, name aliases, path safety |
//! | [`config`] | the TOML file → validated settings, plain data |
//! | [`telemetry`] | log set-up, metric families, request ids |
//! | [`upstream`] | the pooled TLS client, egress, keep-warm spares, OAuth, live credentials |
//! | [`routing`] | the route table: request path → route and credential |
//! | [`error`] | request-path errors and who is at fault |
//! | [`rewrite`] | response link rewriting and decoding |
//! | [`store`] | the shared Redis store |
//! | [`budget`] | the governor, 429 cool-downs, reported limits |
//! | [`cache`] | coalescing and the response cache |
//! | [`runtime`] | the generation built from settings, reload, credential checks |
//! | [`proxy`] | the request phases and the `/-/` endpoints |
//! | [`server`] | listeners, connection limits, idle parking, the access log |
//! | [`cli`] | the command line |
//!
//! The request path, in order: [`proxy::admit`] → [`proxy::route`] → [`proxy::authorize_method`]
//! → [`proxy::govern`] → [`proxy::cache_phase`] → [`proxy::inject_credential`] →
//! [`proxy::forward`] → [`proxy::rewrite_response`] → [`server::access_log::AccessLogLayer`].

// The layers, bottom first: each uses only those above it in this list (tests/architecture.rs
// reads this order; blank lines keep rustfmt from sorting it).
pub mod base;

pub mod bitbucket;

pub mod config;

pub mod telemetry;

pub mod upstream;

pub mod routing;

pub mod error;

pub mod rewrite;

pub mod store;

pub mod budget;

pub mod cache;

pub mod runtime;

pub mod proxy;

pub mod server;

pub mod cli;

pub use config::Config;
pub use server::listener::{RunningProxy, ShutdownOutcome, start};
