//! Turns a parsed `ConfigFile` into a `Config`, collecting every problem rather than stopping at
//! the first.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Method, Uri};
use ipnet::IpNet;

use super::file::{
    ApiTokenSection, AppPasswordSection, ConfigFile, CredentialSection,
    OauthClientCredentialsSection, ProjectAccessTokenSection, RepositoryAccessTokenSection,
    RouteSection, WorkspaceAccessTokenSection,
};
use super::{
    Config, ConfigError, ConfigIssue, DEFAULT_API_URL, DEFAULT_CONNECT_TIMEOUT, DEFAULT_GIT_URL,
    DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_LISTEN,
    DEFAULT_MAX_CONCURRENT_STREAMS, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_SEND_TIMEOUT, DEFAULT_SHUTDOWN_GRACE, DEFAULT_TIMEOUT, DEFAULT_UNIX_SOCKET_MODE,
    DEFAULT_VERIFY_INTERVAL, ListenAddr, Origin, ServerSettings, UpstreamSettings,
};
use crate::alias::PrefixPattern;
use crate::credentials::{Credential, CredentialKind, Scope, UpstreamKind};
use crate::routing::{Route, RouteTable, same_place};
use crate::secrets::{SecretError, SecretSource, SecretSpec};

/// Collects issues while validation walks the file.
pub(super) struct Issues {
    /// `check --offline`: read no secret and no CA file (see [`Mode::Offline`]).
    mode: Mode,
    issues: Vec<ConfigIssue>,
    warnings: Vec<String>,
    secret_sources: Vec<(String, SecretSource)>,
}

impl Issues {
    pub(super) fn count(&self) -> usize {
        self.issues.len()
    }

    pub(super) fn error(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.issues.push(ConfigIssue {
            key: key.into(),
            message: message.into(),
            missing_env: None,
        });
    }
}

/// What validation may read besides the config text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Everything: secrets and the CA file, as `run` needs them.
    Full,
    /// Nothing outside the config file, for linting a config away from its target host: each
    /// secret's form is checked but its value is not read (the credential gets a placeholder,
    /// so the result must never serve), and `ca_file` is not read.
    Offline,
}

/// The secret an offline check puts where the real one would be.
const OFFLINE_PLACEHOLDER: &str = "offline-check-placeholder";

pub(super) fn validate(path: &Path, file: ConfigFile, mode: Mode) -> Result<Config, ConfigError> {
    let mut issues = Issues {
        mode,
        issues: Vec::new(),
        warnings: Vec::new(),
        secret_sources: Vec::new(),
    };
    // Absolute, so that paths in messages say which file was really meant.
    let parent = path.parent().unwrap_or(Path::new("."));
    let base_dir = std::path::absolute(parent).unwrap_or_else(|_| parent.to_owned());
    let base_dir = base_dir.as_path();

    let server = server_settings(&mut issues, &file);
    let admin = super::admin::admin_settings(&file.admin, &server, &mut issues.issues);
    let upstream = upstream_settings(&mut issues, &file, base_dir);
    let credentials = credentials(&mut issues, file.credentials, base_dir);
    let routes = routes(&mut issues, &file.routes, &credentials);
    let cache = super::cache::cache_limits(&mut issues, &file.cache);
    issues
        .warnings
        .extend(super::checks::unreachable_listener_warnings(&server));
    let store = file
        .store
        .as_ref()
        .and_then(|section| super::store::store_settings(&mut issues, section, base_dir));

    if issues.issues.is_empty() {
        Ok(Config {
            path: path.to_owned(),
            server,
            admin,
            upstream,
            credentials: credentials.into_values().flatten().collect(),
            routes,
            cache,
            store,
            secret_sources: issues.secret_sources,
            // The same `FILE: ` prefix errors carry: with several configs (CI linting deploy/),
            // a warning must say which file it is about.
            warnings: issues
                .warnings
                .into_iter()
                .map(|warning| format!("{}: {warning}", path.display()))
                .collect(),
        })
    } else {
        Err(ConfigError {
            path: path.to_owned(),
            issues: issues.issues,
        })
    }
}

fn server_settings(issues: &mut Issues, file: &ConfigFile) -> ServerSettings {
    let listen_specs = file
        .server
        .listen
        .clone()
        .unwrap_or_else(|| vec![DEFAULT_LISTEN.to_owned()]);
    if listen_specs.is_empty() {
        issues.error(
            "server.listen",
            "must name at least one address, e.g. [\"127.0.0.1:8080\"]",
        );
    }
    let listen = listen_specs
        .iter()
        .enumerate()
        .filter_map(|(i, spec)| match parse_listen(spec) {
            Some(addr) => Some(addr),
            None => {
                issues.error(
                    format!("server.listen[{i}]"),
                    format!("`{spec}` is not an IP:port address or unix socket (valid: \"127.0.0.1:8080\", \"[::1]:8080\", \"0.0.0.0:8080\", \"unix:/run/bitbucket-auth-proxy.sock\")"),
                );
                None
            }
        })
        .collect();
    let unix_socket_mode = match file.server.unix_socket_mode.as_deref() {
        None => DEFAULT_UNIX_SOCKET_MODE,
        Some(text) => match u32::from_str_radix(text.trim_start_matches("0o"), 8) {
            Ok(mode) if mode <= 0o777 => mode,
            _ => {
                issues.error(
                    "server.unix_socket_mode",
                    format!("`{text}` is not an octal file mode (valid: \"0660\", \"0600\")"),
                );
                DEFAULT_UNIX_SOCKET_MODE
            }
        },
    };
    let shutdown_grace = parse_duration(
        issues,
        "server.shutdown_grace",
        file.server.shutdown_grace.as_deref(),
        DEFAULT_SHUTDOWN_GRACE,
    );

    let allowed_clients = match &file.server.allowed_clients {
        None => loopback_clients(),
        Some(specs) => specs
            .iter()
            .enumerate()
            .filter_map(|(i, spec)| match parse_cidr(spec) {
                Some(net) => Some(net),
                None => {
                    issues.error(
                        format!("server.allowed_clients[{i}]"),
                        format!("`{spec}` is not a CIDR block (valid: \"127.0.0.1/32\", \"10.0.0.0/8\", \"::1/128\")"),
                    );
                    None
                }
            })
            .collect(),
    };

    let public_url = file.server.public_url.as_deref().and_then(|url| {
        parse_origin(url)
            .map_err(|why| issues.error("server.public_url", format!("`{url}` {why}")))
            .ok()
    });

    let header_read_timeout = parse_duration(
        issues,
        "server.header_read_timeout",
        file.server.header_read_timeout.as_deref(),
        DEFAULT_HEADER_READ_TIMEOUT,
    );
    let send_timeout = parse_duration(
        issues,
        "server.send_timeout",
        file.server.send_timeout.as_deref(),
        DEFAULT_SEND_TIMEOUT,
    );
    let mut positive = |key: &str, value: Option<usize>, default: usize| match value {
        Some(0) => {
            issues.error(key, "must be at least 1");
            default
        }
        Some(n) => n,
        None => default,
    };
    let max_connections = positive(
        "server.max_connections",
        file.server.max_connections,
        DEFAULT_MAX_CONNECTIONS,
    );
    let max_in_flight = positive(
        "server.max_in_flight",
        file.server.max_in_flight,
        DEFAULT_MAX_IN_FLIGHT,
    );
    let max_concurrent_streams = match file.server.max_concurrent_streams {
        Some(0) => {
            issues.error("server.max_concurrent_streams", "must be at least 1");
            DEFAULT_MAX_CONCURRENT_STREAMS
        }
        Some(n) => n,
        None => DEFAULT_MAX_CONCURRENT_STREAMS,
    };
    ServerSettings {
        listen,
        allowed_clients,
        public_url,
        unix_socket_mode,
        shutdown_grace,
        max_connections,
        max_in_flight,
        max_concurrent_streams,
        header_read_timeout,
        send_timeout,
    }
}

/// The default `allowed_clients`: this host only.
pub(super) fn loopback_clients() -> Vec<IpNet> {
    vec![
        "127.0.0.0/8".parse().expect("valid CIDR"),
        "::1/128".parse().expect("valid CIDR"),
    ]
}

pub(super) fn parse_listen(spec: &str) -> Option<ListenAddr> {
    match spec.strip_prefix("unix:") {
        Some(path) if path.starts_with('/') => Some(ListenAddr::Unix(path.into())),
        Some(_) => None,
        None => spec.parse::<SocketAddr>().ok().map(ListenAddr::Tcp),
    }
}

/// The longest duration a setting accepts: deadlines are computed as now + duration, and a
/// duration of centuries would overflow the clock instead of meaning "never".
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

pub(super) fn parse_duration(
    issues: &mut Issues,
    key: &str,
    value: Option<&str>,
    default: Duration,
) -> Duration {
    match value {
        None => default,
        Some(text) => match humantime::parse_duration(text) {
            Ok(d) if d > MAX_DURATION => {
                issues.error(
                    key,
                    format!("`{text}` is longer than the longest duration accepted, 365 days"),
                );
                default
            }
            Ok(d) if !d.is_zero() => d,
            _ => {
                issues.error(
                    key,
                    format!(
                        "`{text}` is not a positive duration (valid: \"500ms\", \"5s\", \"2m\")"
                    ),
                );
                default
            }
        },
    }
}

pub(super) fn parse_cidr(spec: &str) -> Option<IpNet> {
    spec.parse::<IpNet>()
        .ok()
        .or_else(|| spec.parse::<IpAddr>().ok().map(IpNet::from))
}

fn upstream_settings(issues: &mut Issues, file: &ConfigFile, base_dir: &Path) -> UpstreamSettings {
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
        Some(path) => crate::upstream::read_ca_file(path).unwrap_or_else(|why| {
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
fn egress_proxy(
    issues: &mut Issues,
    section: &super::file::UpstreamSection,
    base_dir: &Path,
) -> Option<crate::egress::EgressProxy> {
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
            Some(crate::secrets::basic_auth_header(user, &password))
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
    Some(crate::egress::EgressProxy { url, authorization })
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
fn strip_default_port(scheme: &Scheme, authority: Authority) -> Authority {
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

fn require_tls_unless_loopback(origin: Origin) -> Result<Origin, String> {
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

/// Loads every credential. A credential that failed is kept as `None` so routes naming it do not
/// also report "undefined credential".
fn credentials(
    issues: &mut Issues,
    sections: BTreeMap<String, CredentialSection>,
    base_dir: &Path,
) -> BTreeMap<String, Option<Arc<Credential>>> {
    sections
        .into_iter()
        .map(|(name, section)| {
            let key = format!("credentials.{name}");
            if !is_label_safe(&name) {
                issues.error(
                    &key,
                    "credential names may use only letters, digits, '-', '_' and '.'",
                );
            }
            let verify = section.verify();
            let rate_limit = section
                .rate_limit()
                .and_then(|limit| rate_limit(issues, &key, limit));
            let credential =
                credential(issues, &key, name.clone(), section, base_dir).map(|mut credential| {
                    credential.verify = verify;
                    credential.rate_limit = rate_limit;
                    credential
                });
            (name, credential.map(Arc::new))
        })
        .collect()
}

/// Names end up in metric labels and log fields: keep them plain.
fn is_label_safe(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn credential(
    issues: &mut Issues,
    key: &str,
    name: String,
    section: CredentialSection,
    base_dir: &Path,
) -> Option<Credential> {
    let non_empty = |issues: &mut Issues, field: &str, value: &str| {
        if value.trim().is_empty() {
            issues.error(format!("{key}.{field}"), "must not be empty");
            false
        } else {
            true
        }
    };
    match section {
        CredentialSection::RepositoryAccessToken(RepositoryAccessTokenSection {
            repository,
            token,
            ..
        }) => {
            let scope = match repository.split_once('/') {
                Some((ws, repo)) if !ws.is_empty() && !repo.is_empty() && !repo.contains('/') => {
                    Some(Scope::Repository {
                        workspace: ws.to_owned(),
                        repository: repo.to_owned(),
                    })
                }
                _ => {
                    issues.error(
                        format!("{key}.repository"),
                        format!(
                            "`{repository}` is not workspace/repository (valid: \"acme/widgets\")"
                        ),
                    );
                    None
                }
            };
            let token = load_secret(issues, &format!("{key}.token"), &token, base_dir)?;
            Some(Credential::access_token(
                name,
                CredentialKind::RepositoryAccessToken,
                scope?,
                &token,
            ))
        }
        CredentialSection::ProjectAccessToken(ProjectAccessTokenSection {
            workspace,
            project,
            token,
            ..
        }) => {
            let ok =
                non_empty(issues, "workspace", &workspace) & non_empty(issues, "project", &project);
            let token = load_secret(issues, &format!("{key}.token"), &token, base_dir)?;
            ok.then(|| {
                Credential::access_token(
                    name,
                    CredentialKind::ProjectAccessToken,
                    Scope::Project { workspace, project },
                    &token,
                )
            })
        }
        CredentialSection::WorkspaceAccessToken(WorkspaceAccessTokenSection {
            workspace,
            token,
            ..
        }) => {
            let ok = non_empty(issues, "workspace", &workspace);
            let token = load_secret(issues, &format!("{key}.token"), &token, base_dir)?;
            ok.then(|| {
                Credential::access_token(
                    name,
                    CredentialKind::WorkspaceAccessToken,
                    Scope::Workspace { workspace },
                    &token,
                )
            })
        }
        CredentialSection::ApiToken(ApiTokenSection { email, token, .. }) => {
            let mut ok = non_empty(issues, "email", &email);
            if ok && !email.contains('@') {
                issues.error(
                    format!("{key}.email"),
                    format!("`{email}` is not an email address: API tokens authenticate with the Atlassian account email, not the username"),
                );
                ok = false;
            }
            let token = load_secret(issues, &format!("{key}.token"), &token, base_dir)?;
            ok.then(|| Credential::api_token(name, &email, &token))
        }
        CredentialSection::AppPassword(AppPasswordSection {
            username, password, ..
        }) => {
            let mut ok = non_empty(issues, "username", &username);
            if ok && username.contains(':') {
                issues.error(format!("{key}.username"), "must not contain ':'");
                ok = false;
            }
            issues.warnings.push(format!(
                "{key}: app passwords are no longer accepted by Bitbucket Cloud (removed 2026-07-28); \
                 replace it with an API token (kind = \"api_token\") — this one works only with Bitbucket-compatible servers"
            ));
            let password = load_secret(issues, &format!("{key}.password"), &password, base_dir)?;
            ok.then(|| Credential::app_password(name, &username, &password))
        }
        CredentialSection::OauthClientCredentials(OauthClientCredentialsSection {
            client_id,
            client_secret,
            token_url,
            ..
        }) => {
            let mut ok = non_empty(issues, "client_id", &client_id);
            if ok && client_id.contains(':') {
                issues.error(format!("{key}.client_id"), "must not contain ':'");
                ok = false;
            }
            let url = token_url
                .as_deref()
                .unwrap_or(crate::oauth::DEFAULT_TOKEN_URL);
            let token_url = match parse_token_url(url) {
                Ok(uri) => Some(uri),
                Err(why) => {
                    let shown = crate::oauth::display_url(url);
                    issues.error(format!("{key}.token_url"), format!("`{shown}` {why}"));
                    None
                }
            };
            let secret = load_secret(
                issues,
                &format!("{key}.client_secret"),
                &client_secret,
                base_dir,
            )?;
            let token_url = token_url.filter(|_| ok)?;
            Some(Credential::oauth_client_credentials(
                name, token_url, &client_id, &secret,
            ))
        }
    }
}

/// The token endpoint: an https URL (http only on loopback, for mocks) with a path.
fn parse_token_url(url: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = url.parse().map_err(|_| {
        "is not a URL (valid: \"https://bitbucket.org/site/oauth2/access_token\")".to_owned()
    })?;
    let origin = format!(
        "{}://{}",
        uri.scheme_str().unwrap_or(""),
        uri.authority().map_or("", |a| a.as_str())
    );
    parse_origin(&origin).and_then(require_tls_unless_loopback)?;
    Ok(uri)
}

fn rate_limit(
    issues: &mut Issues,
    key: &str,
    section: &super::file::RateLimitSection,
) -> Option<crate::credentials::RateLimit> {
    if section.per_hour == 0 {
        issues.error(
            format!("{key}.rate_limit.per_hour"),
            "must be at least 1 (Bitbucket's budget is 1000/h for most APIs)",
        );
        return None;
    }
    let burst = section.burst.unwrap_or(DEFAULT_BURST.min(section.per_hour));
    if burst == 0 || burst > section.per_hour {
        issues.error(
            format!("{key}.rate_limit.burst"),
            format!("must be between 1 and per_hour ({})", section.per_hour),
        );
        return None;
    }
    let max_wait = match section.max_wait.as_deref() {
        None => Duration::ZERO,
        Some(text) => match humantime::parse_duration(text) {
            Ok(wait) if wait <= MAX_RATE_LIMIT_WAIT => wait,
            _ => {
                issues.error(
                    format!("{key}.rate_limit.max_wait"),
                    format!(
                        "`{text}` is not a duration between \"0s\" and \"{}\" (valid: \"0s\", \"500ms\", \"10s\")",
                        humantime::format_duration(MAX_RATE_LIMIT_WAIT)
                    ),
                );
                return None;
            }
        },
    };
    Some(crate::credentials::RateLimit {
        per_hour: section.per_hour,
        burst,
        max_wait,
    })
}

/// The longest `rate_limit.max_wait`: a request held longer than this is better told to come
/// back (clients and their own timeouts give up around a minute).
const MAX_RATE_LIMIT_WAIT: Duration = Duration::from_secs(60);

/// Requests a credential with `rate_limit` may send back to back when `burst` is not given.
const DEFAULT_BURST: u32 = 10;

pub(super) fn load_secret(
    issues: &mut Issues,
    key: &str,
    spec: &SecretSpec,
    base_dir: &Path,
) -> Option<crate::secrets::Secret> {
    let written = spec.source().map(drop);
    let resolved;
    let spec = match &spec.file {
        Some(path) if path.is_relative() => {
            resolved = SecretSpec {
                file: Some(base_dir.join(path)),
                env: None,
                value: None,
            };
            &resolved
        }
        _ => spec,
    };
    // Ambiguity is judged on the spec as written: the resolved one above keeps only the file,
    // which would hide `{ env = .., file = .. }` given together.
    let loaded = match (issues.mode, written.and_then(|_| spec.source())) {
        (_, Err(error)) => Err(error),
        (Mode::Offline, Ok(source)) if source != SecretSource::Inline => {
            let mut placeholder = crate::secrets::Secret::from_runtime(OFFLINE_PLACEHOLDER.into());
            placeholder.source = source;
            Ok(placeholder)
        }
        _ => spec.load(),
    };
    match loaded {
        Ok(secret) => {
            issues
                .secret_sources
                .push((key.to_owned(), secret.source.clone()));
            if secret.source == SecretSource::Inline {
                issues.warnings.push(format!(
                    "{key}: the secret is written in the config file; prefer {{ env = \"VAR\" }} or {{ file = \"/path\" }}"
                ));
            }
            Some(secret)
        }
        Err(error) => {
            let missing_env = match &error {
                SecretError::EnvMissing(var) => Some(var.clone()),
                _ => None,
            };
            let hint = match &error {
                SecretError::Ambiguous { .. } => {
                    " (valid: { env = \"VAR\" }, { file = \"/path\" } or { value = \"...\" })"
                }
                SecretError::EnvMissing(_) => "; set it before starting the proxy",
                _ => "",
            };
            issues.issues.push(ConfigIssue {
                key: key.to_owned(),
                message: format!("{error}{hint}"),
                missing_env,
            });
            None
        }
    }
}

/// A prefix as configured: absolute, clean, without query, and without a trailing slash.
fn check_prefix(issues: &mut Issues, key: &str, prefix: &str) -> bool {
    match super::checks::prefix_error(key, prefix) {
        Some(message) => {
            issues.error(key, message);
            false
        }
        None => true,
    }
}

fn routes(
    issues: &mut Issues,
    sections: &[RouteSection],
    credentials: &BTreeMap<String, Option<Arc<Credential>>>,
) -> RouteTable {
    let mut seen_prefixes = HashSet::new();
    let mut routes = Vec::with_capacity(sections.len());
    for (i, section) in sections.iter().enumerate() {
        let key = format!("routes[{i}]");
        let mut ok = check_prefix(issues, &format!("{key}.prefix"), &section.prefix);
        if ok && !seen_prefixes.insert(section.prefix.clone()) {
            issues.error(
                format!("{key}.prefix"),
                format!(
                    "`{}` is already used by another route; prefixes must be unique",
                    section.prefix
                ),
            );
            ok = false;
        }
        let upstream = match section.upstream.as_deref() {
            None | Some("api") => UpstreamKind::Api,
            Some("git") => UpstreamKind::Git,
            Some(other) => {
                issues.error(
                    format!("{key}.upstream"),
                    format!("`{other}` is not an upstream (valid: \"api\", \"git\")"),
                );
                ok = false;
                UpstreamKind::Api
            }
        };
        let upstream_prefix = section
            .upstream_prefix
            .clone()
            .unwrap_or_else(|| section.prefix.clone());
        if section.upstream_prefix.is_some() {
            ok &= check_prefix(issues, &format!("{key}.upstream_prefix"), &upstream_prefix);
        }
        let methods = section.methods.as_ref().map(|methods| {
            if methods.is_empty() {
                issues.error(format!("{key}.methods"), "must list at least one method, or be left out to allow every method");
                ok = false;
            }
            methods
                .iter()
                .filter_map(|m| match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                    Ok(method) if !super::REFUSED_METHODS.contains(&method.as_str()) => {
                        Some(method)
                    }
                    _ => {
                        issues.error(format!("{key}.methods"), format!("`{m}` is not an HTTP method the proxy forwards (valid: \"GET\", \"HEAD\", \"POST\", \"PUT\", \"PATCH\", \"DELETE\", \"OPTIONS\")"));
                        ok = false;
                        None
                    }
                })
                .collect::<Vec<_>>()
        });
        let credential = match credentials.get(&section.credential) {
            Some(Some(credential)) => Some(credential.clone()),
            Some(None) => None, // its own errors are already reported
            None => {
                let defined: Vec<&str> = credentials.keys().map(String::as_str).collect();
                issues.error(
                    format!("{key}.credential"),
                    format!(
                        "`{}` is not a defined credential (defined: {})",
                        section.credential,
                        if defined.is_empty() {
                            "none".to_owned()
                        } else {
                            defined.join(", ")
                        }
                    ),
                );
                None
            }
        };
        if let Some(credential) = &credential
            && ok
            && !credential.scope.covers(upstream, &upstream_prefix)
        {
            issues.error(
                format!("{key}.credential"),
                format!(
                    "`{}` is a {} for {}, but this route forwards to `{upstream_prefix}` on the {upstream} upstream, outside that {}; \
                     narrow the route's upstream_prefix to the {} or use a credential that covers it",
                    credential.name,
                    credential.kind,
                    credential.scope,
                    scope_noun(&credential.scope),
                    scope_noun(&credential.scope),
                ),
            );
            ok = false;
        }
        let route_cache =
            super::cache::route_cache_policy(issues, &format!("{key}.cache"), &section.cache);
        if let (true, Some(credential)) = (ok, credential) {
            let allow_header = methods.as_ref().map(|methods| {
                let list: Vec<&str> = methods.iter().map(Method::as_str).collect();
                HeaderValue::from_str(&list.join(", ")).expect("method names are valid header text")
            });
            let route = Route {
                pattern: PrefixPattern::new(upstream, &section.prefix, &upstream_prefix),
                prefix: section.prefix.as_str().into(),
                upstream,
                upstream_prefix,
                credential,
                methods,
                allow_header,
                rewrite_links: section.rewrite_links.unwrap_or(true),
                coalesce: section.coalesce.unwrap_or(true),
                cache: route_cache,
            };
            match routes.iter().find(|other: &&Arc<Route>| same_place(other, &route)) {
                Some(other) => issues.error(
                    format!("{key}.prefix"),
                    format!(
                        "`{}` names the same place as route `{}` (workspace, repository and project names match in any case, git repositories with or without .git); prefixes must be unique",
                        route.prefix, other.prefix
                    ),
                ),
                None => routes.push(Arc::new(route)),
            }
        }
    }
    if sections.is_empty() {
        issues.error(
            "routes",
            "no routes are defined; add at least one [[routes]] with a prefix and a credential",
        );
    }
    RouteTable::new(routes)
}

fn scope_noun(scope: &Scope) -> &'static str {
    match scope {
        Scope::Repository { .. } => "repository",
        Scope::Project { .. } | Scope::Workspace { .. } => "workspace",
        Scope::Account => "account",
    }
}
