//! The `git config` lines that send a config's git routes through the proxy, as `check` prints
//! them: one `url.<proxy>.insteadOf <bitbucket>` per git route, scoped to the workspace or
//! repository the route serves, so repositories outside the route table keep going to
//! Bitbucket directly (a whole-host rewrite would send them to the proxy, which has no route
//! for them and answers 404). Uses only the validated config.

use crate::bitbucket::credentials::UpstreamKind;
use crate::config::{Config, ListenAddr};

/// `http://host:port` (or `public_url`) as a git client on this host reaches the proxy: the
/// configured `public_url`, else the first TCP listener, with a wildcard address probed on
/// loopback. `None` when the proxy listens only on unix sockets, which git cannot use.
pub fn proxy_base_url(config: &Config) -> Option<String> {
    if let Some(public) = &config.server.public_url {
        return Some(public.text.clone());
    }
    config.server.listen.iter().find_map(|listen| match listen {
        ListenAddr::Tcp(addr) => Some(format!("http://{}", crate::config::dialable(*addr))),
        ListenAddr::Unix(_) => None,
    })
}

/// `(proxy URL, Bitbucket URL)` per git route, in route-table order.
///
/// git's `insteadOf` matches plain string prefixes, so a workspace-wide route ends both URLs
/// in `/` (else `acme` would also capture `acme-evil`); a route that names a repository does
/// not (so `widgets.git` matches the clone URL itself).
pub fn insteadof_pairs(config: &Config, base: &str) -> Vec<(String, String)> {
    let git = &config.upstream.git.text;
    config
        .routes
        .iter()
        .filter(|route| route.upstream == UpstreamKind::Git)
        .map(|route| {
            let segments = route
                .upstream_prefix
                .split('/')
                .filter(|s| !s.is_empty())
                .count();
            let prefix = route.prefix.trim_end_matches('/');
            let upstream = route.upstream_prefix.trim_end_matches('/');
            if segments >= 2 {
                (format!("{base}{prefix}"), format!("{git}{upstream}"))
            } else {
                (format!("{base}{prefix}/"), format!("{git}{upstream}/"))
            }
        })
        .collect()
}

/// The block `check` prints: empty when there are no git routes.
pub fn describe(config: &Config) -> String {
    if !config
        .routes
        .iter()
        .any(|route| route.upstream == UpstreamKind::Git)
    {
        return String::new();
    }
    let Some(base) = proxy_base_url(config) else {
        return "\ngit routes: the proxy listens only on unix sockets, which git cannot use; \
                add a TCP listener or set server.public_url\n"
            .to_owned();
    };
    let mut out = String::from("\nTo send git through the proxy for these repositories only:\n");
    for (proxy, upstream) in insteadof_pairs(config, &base) {
        out.push_str(&format!(
            "  git config --global url.\"{proxy}\".insteadOf {upstream}\n"
        ));
    }
    out
}
