//! Rules `validate` applies that need nothing but a value or the settings: a route prefix's
//! syntax, with a suggested fix that is itself valid, and listeners that no allowed client
//! could use. Pure functions returning messages; they may use `routing` and `path`.

use std::net::IpAddr;

use super::{ADMIN_PREFIX, ListenAddr, ServerSettings};
use crate::bitbucket::path::check_path;
use crate::bitbucket::path::segment_prefix_matches;

/// What is wrong with a `prefix` or `upstream_prefix` at `key`, with a hint; `None` when valid.
pub(super) fn prefix_error(key: &str, prefix: &str) -> Option<String> {
    let why = prefix_problem(key, prefix)?;
    // Suggest the corrected prefix only when it is itself valid: "2.0/repositories/acme/" needs
    // a leading slash as much as it must lose the trailing one.
    let fixed = format!(
        "/{}",
        prefix
            .split('/')
            .filter(|segment| !segment.is_empty())
            .collect::<Vec<_>>()
            .join("/")
    );
    let hint = if fixed != prefix && prefix_problem(key, &fixed).is_none() {
        format!("write \"{fixed}\"")
    } else {
        "valid: \"/2.0/repositories/acme/widgets\"".to_owned()
    };
    Some(format!("`{prefix}` {why} ({hint})"))
}

fn prefix_problem(key: &str, prefix: &str) -> Option<String> {
    if segment_prefix_matches(ADMIN_PREFIX.as_bytes(), prefix.as_bytes())
        && key.ends_with(".prefix")
    {
        Some(format!(
            "is reserved: `{ADMIN_PREFIX}/` holds the proxy's own endpoints"
        ))
    } else if prefix.contains(['?', '#']) {
        Some("must be a path only, without '?' or '#'".to_owned())
    } else if prefix.len() > 1 && prefix.ends_with('/') {
        Some("must not end with '/'".to_owned())
    } else {
        check_path(prefix).err().map(|e| {
            let e = e.to_string();
            e.strip_prefix("the path ").map(str::to_owned).unwrap_or(e)
        })
    }
}

/// A listener other hosts can reach while `allowed_clients` admits loopback only: every remote
/// client would get 403, which is rarely what was meant.
pub(super) fn unreachable_listener_warnings(server: &ServerSettings) -> Vec<String> {
    let loopback = |ip: IpAddr| ip.to_canonical().is_loopback();
    let loopback_only = server
        .allowed_clients
        .iter()
        .all(|net| loopback(net.network()) && loopback(net.broadcast()));
    if !loopback_only {
        return Vec::new();
    }
    server
        .listen
        .iter()
        .enumerate()
        .filter_map(|(i, listen)| match listen {
            ListenAddr::Tcp(addr) if !addr.ip().is_loopback() => Some(format!(
                "server.listen[{i}]: `{addr}` accepts connections from other hosts, but allowed_clients admits loopback only, \
                 so every remote client gets 403; add their network to server.allowed_clients (e.g. \"10.0.0.0/8\") or listen on 127.0.0.1"
            )),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_suggested_prefix_is_offered_only_when_valid() {
        let error = prefix_error("routes[0].prefix", "2.0/repositories/acme/").unwrap();
        assert!(
            error.contains("write \"/2.0/repositories/acme\""),
            "{error}"
        );
        // No valid rewrite exists for a reserved path: the generic example instead.
        let error = prefix_error("routes[0].prefix", "/-/metrics/").unwrap();
        assert!(!error.contains("write"), "{error}");
        assert!(
            error.contains("valid: \"/2.0/repositories/acme/widgets\""),
            "{error}"
        );
        assert_eq!(
            prefix_error("routes[0].prefix", "/2.0/repositories/acme"),
            None
        );
    }
}
