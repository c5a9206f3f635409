//! Everything that talks to Bitbucket below the request path: the pooled TLS client
//! ([`client`]), the corporate egress proxy ([`egress`]), the keep-warm spare connections
//! ([`warm`]), OAuth token renewal ([`oauth`]) and the live credentials that hold it
//! ([`credential`]).
//!
//! Built from settings by [`crate::runtime`]. Uses [`crate::base`], [`crate::bitbucket`],
//! [`crate::config`] (settings only) and [`crate::telemetry`]; knows nothing of routes.

pub mod alpn;
pub mod client;
pub mod credential;
pub mod egress;
pub mod oauth;
pub mod warm;
