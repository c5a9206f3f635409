//! Serving clients: binding listeners and accepting connections ([`listener`]), the accept-time
//! client check ([`gate`]), limits on connections and requests in flight ([`limits`]), the send
//! bound for HTTP/2 streams ([`stall`]), idle keep-alive parking ([`idle`]), and the access log
//! around the proxy service ([`access_log`]).
//!
//! Uses [`crate::proxy`] for the service it serves and [`crate::runtime`] for the live state;
//! only [`crate::cli`] uses it.

pub mod access_log;
pub mod gate;
pub mod idle;
pub mod limits;
pub mod listener;
pub mod stall;
pub mod trim;
