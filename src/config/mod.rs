//! Configuration: load the TOML file, validate all of it, and produce the typed settings the
//! proxy runs on. Every problem is reported at once, each naming the file, the key and what
//! would be valid.
//!
//! Produces plain data and builds nothing that connects, spawns or caches: the live objects are
//! built from these settings by [`crate::runtime`]. Uses only [`crate::base`] and
//! [`crate::bitbucket`].

mod admin;
pub mod ca_file;
pub mod cache;
mod checks;
mod credential;
mod fields;
mod file;
mod parse;
mod route;
pub mod schema;
mod store;
mod upstream;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use ipnet::IpNet;
use rustls_pki_types::CertificateDer;
use zeroize::Zeroizing;

use http::{HeaderValue, Method, Uri};

use crate::bitbucket::alias::PrefixPattern;
use crate::bitbucket::credentials::{CredentialSettings, UpstreamKind};

pub use fields::Mode;
pub use file::ConfigFile;
pub use store::{OnStoreError, StoreSettings};
pub use upstream::is_loopback_host;

/// Environment variable that may hold the config path instead of `--config`.
pub const CONFIG_ENV: &str = "BITBUCKET_AUTH_PROXY_CONFIG";

/// A validated configuration: plain settings, with secrets already loaded into the credential
/// settings. The live objects a proxy runs on are built from it by [`crate::runtime`].
#[derive(Debug)]
pub struct Config {
    pub path: PathBuf,
    pub server: ServerSettings,
    /// `[admin]`: where the admin endpoints are served when not on `server.listen`.
    pub admin: AdminSettings,
    pub upstream: UpstreamSettings,
    pub credentials: Vec<Arc<CredentialSettings>>,
    /// `[[routes]]`, most specific first (the order routing tries them in).
    pub routes: Vec<RouteSettings>,
    /// `[cache]`: memory bound and per-response cap of the response cache and coalescing.
    pub cache: cache::CacheLimits,
    /// `[store]`: where replicas share budgets and cool-downs; `None` keeps them in-process.
    pub store: Option<StoreSettings>,
    /// Where each secret was read from, by config key (for readiness and reload watching).
    pub secret_sources: Vec<(String, crate::base::secrets::SecretSource)>,
    /// Things that work but deserve attention (inline secrets, app passwords).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    pub listen: Vec<ListenAddr>,
    pub allowed_clients: Vec<IpNet>,
    pub public_url: Option<Origin>,
    /// File mode for unix-socket listeners.
    pub unix_socket_mode: u32,
    /// How long in-flight requests may finish after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// Open client connections; beyond it new connections get a 503 and are closed.
    pub max_connections: usize,
    /// Requests in flight (until their response body is done); beyond it, 503.
    pub max_in_flight: usize,
    /// Streams open at once on one HTTP/2 connection (announced in SETTINGS).
    pub max_concurrent_streams: u32,
    /// How long a client may take to send a request head.
    pub header_read_timeout: Duration,
    /// How long a write to a client may make no progress (a client that stopped reading).
    pub send_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    /// `admin.listen`; empty: the admin endpoints follow `server.listen` and
    /// `server.allowed_clients`, as without an `[admin]` section.
    pub listen: Vec<ListenAddr>,
    /// `admin.allowed_clients`, checked on the admin listener only (default: loopback).
    pub allowed_clients: Vec<IpNet>,
}

impl AdminSettings {
    /// Whether the admin endpoints have a listener of their own.
    pub fn is_separate(&self) -> bool {
        !self.listen.is_empty()
    }
}

/// A `server.listen` entry: `"host:port"` or `"unix:/path"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The address a local client dials to reach a TCP listener on `addr`: a wildcard listener
/// (`0.0.0.0`, `[::]`) is reached on loopback.
pub fn dialable(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    addr
}

/// `upstream.proxy` with its optional credentials, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressProxy {
    pub url: Uri,
    /// `Basic …` for `Proxy-Authorization`, marked sensitive.
    pub authorization: Option<HeaderValue>,
}

/// One `[[routes]]` entry, validated.
#[derive(Debug, Clone)]
pub struct RouteSettings {
    /// The local prefix as configured (`/` or without a trailing slash); also its metrics label.
    pub prefix: Arc<str>,
    pub upstream: UpstreamKind,
    /// The upstream prefix as configured (`/` or without a trailing slash).
    pub upstream_prefix: String,
    pub credential: Arc<CredentialSettings>,
    /// `None` allows every method.
    pub methods: Option<Vec<Method>>,
    /// The `Allow` header for a 405, computed once.
    pub allow_header: Option<HeaderValue>,
    /// Whether responses get their upstream URLs rewritten to point back at the proxy.
    pub rewrite_links: bool,
    /// Whether identical GET/HEAD requests in flight at once share one upstream request.
    pub coalesce: bool,
    /// What the response cache may keep of this route's answers.
    pub cache: cache::RouteCachePolicy,
    /// `prefix` as matched: workspace, repository and project segments in any spelling.
    pub pattern: PrefixPattern,
}

impl RouteSettings {
    /// Routing's order: most segments first, then the longer prefix, so the first match is the
    /// most specific.
    pub fn most_specific_first(
        (a_pattern, a_prefix): (&PrefixPattern, &str),
        (b_pattern, b_prefix): (&PrefixPattern, &str),
    ) -> std::cmp::Ordering {
        let trimmed = |prefix: &str| prefix.trim_end_matches('/').len();
        b_pattern
            .segment_count()
            .cmp(&a_pattern.segment_count())
            .then_with(|| trimmed(b_prefix).cmp(&trimmed(a_prefix)))
            .then_with(|| a_prefix.cmp(b_prefix))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSettings {
    pub api: Origin,
    pub git: Origin,
    pub ca_file: Option<PathBuf>,
    /// The certificates read from `ca_file`, trusted in addition to the built-in roots.
    pub extra_roots: Vec<CertificateDer<'static>>,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub idle_timeout: Duration,
    /// How often credentials with `verify = true` are checked against Bitbucket.
    pub verify_interval: Duration,
    /// `upstream.http2`: offer HTTP/2 in ALPN (else HTTP/1.1 only) to the API origin, and to
    /// the git origin when it is the same.
    pub http2: bool,
    /// `upstream.git_http2`: offer HTTP/2 to the git origin when it is not the API's.
    pub git_http2: bool,
    /// `upstream.keep_warm`: hold a connected spare to every origin the routes use.
    pub keep_warm: bool,
    /// `upstream.proxy`: the HTTP proxy to tunnel through (else the environment's, if any).
    pub proxy: Option<EgressProxy>,
}

impl UpstreamSettings {
    pub fn origin(&self, kind: UpstreamKind) -> &Origin {
        match kind {
            UpstreamKind::Api => &self.api,
            UpstreamKind::Git => &self.git,
        }
    }
}

/// `scheme://authority` with no path, kept both parsed and as text for link rewriting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub scheme: Scheme,
    pub authority: Authority,
    /// `scheme://authority`, exactly as it appears in absolute URLs (default port omitted).
    pub text: String,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_API_URL: &str = "https://api.bitbucket.org";
pub const DEFAULT_GIT_URL: &str = "https://bitbucket.org";
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_VERIFY_INTERVAL: Duration = Duration::from_secs(600);
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
pub const DEFAULT_UNIX_SOCKET_MODE: u32 = 0o660;
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;
/// Well under hyper's 200, so a few HTTP/2 connections cannot take every in-flight slot.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 32;
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// Methods refused with 405 on every path, admin paths included, before routing, and refused in
/// a route's `methods`: CONNECT (this is not a forward proxy), and TRACE and TRACK, which an
/// upstream answers by echoing the request, `Authorization` included, back to the client.
pub const REFUSED_METHODS: [&str; 3] = ["CONNECT", "TRACE", "TRACK"];
/// Paths under this prefix belong to the proxy (`/-/health`, `/-/ready`, `/-/metrics`); no
/// Bitbucket workspace can be named `-`, so no route can need it.
pub const ADMIN_PREFIX: &str = "/-";

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted key path (`routes[2].credential`), empty for whole-file problems.
    pub key: String,
    pub message: String,
    /// Set when the cause is an unset environment variable, so the CLI can say just that.
    pub missing_env: Option<String>,
}

/// Everything wrong with a config file, reported together.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub path: PathBuf,
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}: ", self.path.display())?;
            if !issue.key.is_empty() {
                write!(f, "{}: ", issue.key)?;
            }
            f.write_str(&issue.message)?;
        }
        Ok(())
    }
}

impl ConfigError {
    fn whole_file(path: &Path, message: String) -> Self {
        ConfigError {
            path: path.to_owned(),
            issues: vec![ConfigIssue {
                key: String::new(),
                message,
                missing_env: None,
            }],
        }
    }

    /// The unset environment variables, when they are the only problem.
    pub fn only_missing_env(&self) -> Option<Vec<&str>> {
        self.issues
            .iter()
            .map(|issue| issue.missing_env.as_deref())
            .collect()
    }
}

impl Config {
    /// Every file the config depends on: itself, file secrets and the CA file.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.path.clone()];
        files.extend(
            self.secret_sources
                .iter()
                .filter_map(|(_, source)| match source {
                    crate::base::secrets::SecretSource::File(path) => Some(path.clone()),
                    _ => None,
                }),
        );
        files.extend(self.upstream.ca_file.clone());
        files.extend(self.store.as_ref().and_then(|store| store.ca_file.clone()));
        files
    }

    /// Reads, parses and validates `path`, loading every secret it names.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with(path, Mode::Full)
    }

    /// [`Config::load`] in a given [`Mode`]; an [`Mode::Offline`] result holds placeholder
    /// secrets and is for reporting only, never for serving.
    pub fn load_with(path: &Path, mode: Mode) -> Result<Config, ConfigError> {
        // Inline secrets pass through this buffer: wipe it once parsed.
        let text = std::fs::read_to_string(path)
            .map(Zeroizing::new)
            .map_err(|e| {
                ConfigError::whole_file(path, format!("cannot read the config file: {e}"))
            })?;
        Config::from_toml_with(path, &text, mode)
    }

    /// Parses and validates config text; `path` is used for messages and relative `file =` paths.
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_with(path, text, Mode::Full)
    }

    fn from_toml_with(path: &Path, text: &str, mode: Mode) -> Result<Config, ConfigError> {
        let file = parse::parse(text).map_err(|issues| ConfigError {
            path: path.to_owned(),
            issues,
        })?;
        validate::validate(path, file, mode)
    }
}

#[cfg(test)]
mod tests;

/// The route table as `check` prints it: prefix → upstream URL, credential, kind, methods.
/// Never shows a secret: only names and kinds.
pub fn describe_routes(config: &Config) -> String {
    let rows: Vec<[String; 5]> = config
        .routes
        .iter()
        .map(|route| {
            [
                route.prefix.to_string(),
                format!(
                    "{}{}",
                    config.upstream.origin(route.upstream),
                    route.upstream_prefix
                ),
                route.credential.name.to_string(),
                route.credential.kind.to_string(),
                route.methods.as_ref().map_or_else(
                    || "any".to_owned(),
                    |m| {
                        m.iter()
                            .map(http::Method::as_str)
                            .collect::<Vec<_>>()
                            .join(",")
                    },
                ),
            ]
        })
        .collect();
    let header = ["PREFIX", "UPSTREAM", "CREDENTIAL", "KIND", "METHODS"].map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows.iter()) {
        let line = format!(
            "{:w0$}  {:w1$}  {:w2$}  {:w3$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
