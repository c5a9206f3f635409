//! `[upstream]` validated: the Bitbucket origins (TLS unless loopback), timeouts, the CA file
//! and the egress proxy.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use http::Uri;
use http::uri::{Authority, Scheme};

use super::fields::load_secret;
use super::fields::{Issues, Mode, parse_duration};
use super::file::ConfigFile;
use super::{
    DEFAULT_API_URL, DEFAULT_CONNECT_TIMEOUT, DEFAULT_GIT_URL, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_TIMEOUT, DEFAULT_VERIFY_INTERVAL, Origin, UpstreamSettings,
};

pub(super) fn upstream_settings(
    issues: &mut Issues,
    file: &ConfigFile,
    base_dir: &Path,
) -> UpstreamSettings {
    let section = &file.upstream;
    let mut origin = |key: &str, value: Option<&str>, default: &str| {
        let url = value.unwrap_or(default);
        match parse_origin(url).and_then(require_tls_unless_loopback) {
            Ok(origin) => origin,
            Err(why) => {
                issues.error(format!("upstream.{key}"), format!("`{url}` {why}"));
                parse_origin(default).expect("default upstream URL is valid")
            }
        }
    };
    let api = origin("api_url", section.api_url.as_deref(), DEFAULT_API_URL);
    let git = origin("git_url", section.git_url.as_deref(), DEFAULT_GIT_URL);

    let ca_file = section.ca_file.as_ref().map(|p| base_dir.join(p));
    let extra_roots = match &ca_file {
        None => Vec::new(),
        Some(_) if issues.mode == Mode::Offline => Vec::new(),
        Some(path) => super::ca_file::read_ca_file(path).unwrap_or_else(|why| {
            issues.error("upstream.ca_file", why.to_string());
            Vec::new()
        }),
    };

    let mut duration = |key: &str, value: Option<&str>, default: Duration| {
        parse_duration(issues, &format!("upstream.{key}"), value, default)
    };
    UpstreamSettings {
        api,
        git,
        ca_file,
        extra_roots,
        connect_timeout: duration(
            "connect_timeout",
            section.connect_timeout.as_deref(),
            DEFAULT_CONNECT_TIMEOUT,
        ),
        timeout: duration("timeout", section.timeout.as_deref(), DEFAULT_TIMEOUT),
        idle_timeout: duration(
            "idle_timeout",
            section.idle_timeout.as_deref(),
            DEFAULT_IDLE_TIMEOUT,
        ),
        verify_interval: duration(
            "verify_interval",
            section.verify_interval.as_deref(),
            DEFAULT_VERIFY_INTERVAL,
        ),
        http2: section.http2.unwrap_or(true),
        git_http2: section.git_http2.unwrap_or(false),
        keep_warm: section.keep_warm.unwrap_or(true),
        proxy: egress_proxy(issues, section, base_dir),
    }
}

/// `upstream.proxy` (`http://host:port`) with optional `proxy_username` / `proxy_password`.
pub(super) fn egress_proxy(
    issues: &mut Issues,
    section: &super::file::UpstreamSection,
    base_dir: &Path,
) -> Option<super::EgressProxy> {
    let Some(url) = section.proxy.as_deref() else {
        if section.proxy_username.is_some() || section.proxy_password.is_some() {
            issues.error(
                "upstream.proxy_username",
                "proxy credentials need upstream.proxy (valid: proxy = \"http://proxy.internal:3128\")",
            );
        }
        return None;
    };
    let origin = match parse_origin(url) {
        Ok(origin) if origin.scheme == Scheme::HTTP => origin,
        Ok(_) => {
            issues.error("upstream.proxy", format!("`{url}` must be an http:// proxy (the TLS to Bitbucket runs inside its CONNECT tunnel)"));
            return None;
        }
        Err(why) => {
            issues.error("upstream.proxy", format!("`{url}` {why}"));
            return None;
        }
    };
    let authorization = match (&section.proxy_username, &section.proxy_password) {
        (None, None) => None,
        (Some(user), Some(password)) if !user.is_empty() && !user.contains(':') => {
            let password = load_secret(issues, "upstream.proxy_password", password, base_dir)?;
            Some(crate::base::secrets::basic_auth_header(user, &password))
        }
        _ => {
            issues.error(
                "upstream.proxy_username",
                "give both proxy_username (without ':') and proxy_password, or neither",
            );
            return None;
        }
    };
    let url = origin.text.parse().ok()?;
    Some(super::EgressProxy { url, authorization })
}

/// Parses `scheme://host[:port]` with nothing after the authority but an optional `/`.
pub(crate) fn parse_origin(url: &str) -> Result<Origin, String> {
    let uri: Uri = url
        .parse()
        .map_err(|_| "is not a URL (valid: \"https://api.bitbucket.org\")".to_owned())?;
    let scheme = uri
        .scheme()
        .filter(|s| **s == Scheme::HTTPS || **s == Scheme::HTTP)
        .cloned()
        .ok_or_else(|| "must start with https:// or http://".to_owned())?;
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| "has no host".to_owned())?;
    if authority.as_str().contains('@') {
        return Err("must not contain user information".to_owned());
    }
    if uri.path_and_query().is_some_and(|pq| pq.as_str() != "/") {
        return Err(
            "must be an origin only (scheme://host[:port]), without path or query".to_owned(),
        );
    }
    let authority = strip_default_port(&scheme, authority);
    let text = format!("{scheme}://{authority}");
    Ok(Origin {
        scheme,
        authority,
        text,
    })
}

/// `https://host:443` and `https://host` are the same origin; Bitbucket writes the short form.
pub(super) fn strip_default_port(scheme: &Scheme, authority: Authority) -> Authority {
    let default = if *scheme == Scheme::HTTPS { 443 } else { 80 };
    if authority.port_u16() == Some(default) {
        let host = authority
            .as_str()
            .rsplit_once(':')
            .map_or(authority.as_str(), |(h, _)| h);
        host.parse().unwrap_or(authority)
    } else {
        authority
    }
}

pub(super) fn require_tls_unless_loopback(origin: Origin) -> Result<Origin, String> {
    if origin.scheme == Scheme::HTTPS || is_loopback_host(origin.authority.host()) {
        Ok(origin)
    } else {
        Err(
            "must use https:// (http:// is allowed only for loopback hosts, for local mocks)"
                .to_owned(),
        )
    }
}

pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}
