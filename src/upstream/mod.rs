//! Everything that talks to Bitbucket below the request path: the client ([`client`]), with
//! one h2 connection per h2 origin ([`lane`], each driven by [`h2_driver`], each request a
//! stream of it through [`h2_stream`]) and a pool for the rest, the corporate egress
//! proxy ([`egress`]), the keep-warm spare connections ([`warm`]), OAuth token renewal
//! ([`oauth`]) and the live credentials that hold it ([`credential`]).
//!
//! Built from settings by [`crate::runtime`]. Uses [`crate::base`], [`crate::bitbucket`],
//! [`crate::config`] (settings only) and [`crate::telemetry`]; knows nothing of routes.

pub mod alpn;
pub mod client;
pub mod credential;
pub mod egress;
pub mod h2_driver;
pub mod h2_stream;
pub mod lane;
pub mod oauth;
pub mod warm;
