//! Configuration: load the TOML file, validate all of it, and produce the typed settings the
//! proxy runs on. Every problem is reported at once, each naming the file, the key and what
//! would be valid.

mod file;
mod store;
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

use crate::credentials::{Credential, UpstreamKind};
use crate::routing::RouteTable;

pub use file::ConfigFile;
pub use store::{OnStoreError, StoreSettings};
pub use validate::is_loopback_host;

/// Environment variable that may hold the config path instead of `--config`.
pub const CONFIG_ENV: &str = "BITBUCKET_AUTH_PROXY_CONFIG";

/// A validated, ready-to-run configuration. Secrets are already loaded into credentials.
#[derive(Debug)]
pub struct Config {
    pub path: PathBuf,
    pub server: ServerSettings,
    pub upstream: UpstreamSettings,
    pub credentials: Vec<Arc<Credential>>,
    pub routes: RouteTable,
    /// `[store]`: where replicas share budgets and cool-downs; `None` keeps them in-process.
    pub store: Option<StoreSettings>,
    /// Where each secret was read from, by config key (for readiness and reload watching).
    pub secret_sources: Vec<(String, crate::secrets::SecretSource)>,
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
    /// How long a client may take to send a request head.
    pub header_read_timeout: Duration,
    /// How long a write to a client may make no progress (a client that stopped reading).
    pub send_timeout: Duration,
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
    /// `upstream.http2`: offer HTTP/2 in ALPN (else HTTP/1.1 only).
    pub http2: bool,
    /// `upstream.proxy`: the HTTP proxy to tunnel through (else the environment's, if any).
    pub proxy: Option<crate::egress::EgressProxy>,
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
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);
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
                    crate::secrets::SecretSource::File(path) => Some(path.clone()),
                    _ => None,
                }),
        );
        files.extend(self.upstream.ca_file.clone());
        files.extend(self.store.as_ref().and_then(|store| store.ca_file.clone()));
        files
    }

    /// Reads, parses and validates `path`, loading every secret it names.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        // Inline secrets pass through this buffer: wipe it once parsed.
        let text = std::fs::read_to_string(path)
            .map(Zeroizing::new)
            .map_err(|e| {
                ConfigError::whole_file(path, format!("cannot read the config file: {e}"))
            })?;
        Config::from_toml(path, &text)
    }

    /// Parses and validates config text; `path` is used for messages and relative `file =` paths.
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let file: ConfigFile = toml::from_str(text)
            .map_err(|e| ConfigError::whole_file(path, describe_toml_error(text, &e)))?;
        validate::validate(path, file)
    }
}

/// toml's message names the key; add the line, which is what people look for.
fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end();
    let Some(span) = error.span() else {
        return message.to_owned();
    };
    let start = span.start.min(text.len());
    // Credentials are a tagged enum, which serde reads as a whole table: its errors point at the
    // table. Find the offending key inside that table instead.
    let start = unknown_field(message)
        .and_then(|key| find_key(text, start, key))
        .unwrap_or(start);
    let line = text[..start].matches('\n').count() + 1;
    format!("line {line}: {message}")
}

fn unknown_field(message: &str) -> Option<&str> {
    message.strip_prefix("unknown field `")?.split('`').next()
}

/// The offset of `key =` at or after `from`, before the next table header.
fn find_key(text: &str, from: usize, key: &str) -> Option<usize> {
    let mut offset = from;
    for (i, line) in text[from..].split_inclusive('\n').enumerate() {
        if i > 0 && line.trim_start().starts_with('[') {
            return None;
        }
        let mut search = 0;
        while let Some(found) = line[search..].find(key) {
            let at = search + found;
            let before = line[..at].chars().next_back();
            let after = line[at + key.len()..].trim_start();
            let bounded = before.is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '-'));
            if bounded && after.starts_with('=') {
                return Some(offset + at);
            }
            search = at + key.len();
        }
        offset += line.len();
    }
    None
}

#[cfg(test)]
mod tests;

/// The route table as `check` prints it: prefix → upstream URL, credential, kind, methods.
/// Never shows a secret: only names and kinds.
pub fn describe_routes(config: &Config) -> String {
    let rows: Vec<[String; 5]> = config
        .routes
        .routes()
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
