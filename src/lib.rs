//! bitbucket-auth-proxy: an HTTP server that injects Bitbucket Cloud credentials into requests
//! from unauthenticated local clients and forwards them over TLS.
//!
//! The request path, in order: [`proxy::admit`] → [`proxy::route`] → [`proxy::authorize_method`]
//! → [`proxy::govern`] → [`proxy::cache_phase`]
//! → [`proxy::inject_credential`] → [`proxy::forward`] → [`proxy::rewrite_response`] →
//! [`telemetry::AccessLogLayer`].

pub mod admin;
pub mod alias;
pub mod alpn;
pub mod body;
pub mod budget;
pub mod build_info;
pub mod cache;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod egress;
pub mod error;
pub mod gate;
pub mod git_config;
pub mod governor;
pub mod headers;
pub mod health;
pub mod idle;
#[doc(hidden)]
pub mod invariant;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod oauth;
pub mod path;
pub mod proxy;
pub mod reload;
pub mod request_id;
pub mod rewrite;
pub mod routing;
pub mod secrets;
pub mod stall;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod trim;
pub mod upstream;
pub mod verify;
pub mod warm;

pub use config::Config;
pub use listener::{RunningProxy, ShutdownOutcome, start};
