//! Bitbucket Cloud's vocabulary, as plain data and pure functions: the two upstream hosts, the
//! credential kinds with the exact `Authorization` header each needs and the scope each can
//! reach, the rate-limit rules of a rolling hour, the spellings under which a path names a
//! workspace, repository or project, and the path-safety check that keeps a forwarded path
//! inside its route.
//!
//! Uses only [`crate::base`].

pub mod alias;
pub mod credentials;
pub mod path;
pub mod rate_limit;

use std::fmt;

/// Which Bitbucket host a route forwards to; credentials authenticate differently on each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamKind {
    /// The REST API (`api.bitbucket.org`).
    Api,
    /// Git over HTTPS (`bitbucket.org`).
    Git,
}

impl fmt::Display for UpstreamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UpstreamKind::Api => "api",
            UpstreamKind::Git => "git",
        })
    }
}
