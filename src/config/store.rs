//! `[store]`: the Redis server through which replicas share each credential's budget and
//! cool-down (see docs/store.md). Validated here into [`StoreSettings`]; the live client is
//! built from them in [`crate::store`]. Without the table everything stays in-process.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::fields::load_secret;
use super::fields::{Issues, parse_duration};
use super::file::StoreSection;
use crate::base::secrets::Secret;

/// The default `store.timeout`: a budget check on a healthy Redis takes well under a
/// millisecond; a store slower than this costs every request more than it saves.
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_millis(50);
/// The default `store.prefix`.
pub const DEFAULT_STORE_PREFIX: &str = "bbap:";
const DEFAULT_PORT: u16 = 6379;

/// What requests get while the store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    /// The in-process governor and cool-down take over until the store answers again.
    Local,
    /// Requests that need the budget are refused with 503 `store-unavailable`.
    Refuse,
}

pub struct StoreSettings {
    /// `redis://host:port/db` or `rediss://…`, without user or password.
    pub url: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub db: i64,
    pub ca_file: Option<PathBuf>,
    /// The PEM read from `ca_file`: the only roots trusted for `rediss://` when given (else the
    /// system's).
    pub ca_pem: Option<Vec<u8>>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub prefix: String,
    pub timeout: Duration,
    pub on_error: OnStoreError,
}

impl fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreSettings")
            .field("url", &self.url)
            .field("ca_file", &self.ca_file)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("on_error", &self.on_error)
            .finish()
    }
}

impl PartialEq for StoreSettings {
    /// Whether a reload can keep the connection: everything, the password included, is the same.
    fn eq(&self, other: &Self) -> bool {
        self.url == other.url
            && self.ca_pem == other.ca_pem
            && self.username == other.username
            && self.password.as_ref().map(Secret::expose)
                == other.password.as_ref().map(Secret::expose)
            && self.prefix == other.prefix
            && self.timeout == other.timeout
            && self.on_error == other.on_error
    }
}

pub(super) fn store_settings(
    issues: &mut Issues,
    section: &StoreSection,
    base_dir: &Path,
) -> Option<StoreSettings> {
    let before = issues.count();
    let address = parse_store_url(&section.url)
        .map_err(|why| issues.error("store.url", format!("`{}` {why}", section.url)))
        .ok();
    let ca_file = section.ca_file.as_ref().map(|p| base_dir.join(p));
    let ca_pem = match &ca_file {
        None => None,
        Some(path) => match read_ca_pem(path) {
            Ok(pem) => Some(pem),
            Err(why) => {
                issues.error("store.ca_file", why);
                None
            }
        },
    };
    if ca_file.is_some() && address.as_ref().is_some_and(|a| !a.tls) {
        issues.error(
            "store.ca_file",
            "applies to rediss:// only (valid: a rediss:// store.url, or no ca_file)",
        );
    }
    if let Some(username) = &section.username
        && (username.is_empty() || username.chars().any(|c| c.is_control() || c == ' '))
    {
        issues.error(
            "store.username",
            "must be a non-empty Redis ACL user name without spaces or control characters",
        );
    }
    if section.username.is_some() && section.password.is_none() {
        issues.error(
            "store.password",
            "store.username needs a password (valid: { env = \"VAR\" }, { file = \"/path\" } or { value = \"...\" })",
        );
    }
    let password = section
        .password
        .as_ref()
        .and_then(|spec| load_secret(issues, "store.password", spec, base_dir));
    let prefix = section
        .prefix
        .clone()
        .unwrap_or_else(|| DEFAULT_STORE_PREFIX.to_owned());
    if prefix.is_empty()
        || prefix.len() > 64
        || !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_:.{}".contains(&b))
    {
        issues.error(
            "store.prefix",
            format!(
                "`{prefix}` is not a valid key prefix (valid: 1 to 64 of A-Z a-z 0-9 - _ : . {{ }}, such as \"bbap:\")"
            ),
        );
    }
    let timeout = parse_duration(
        issues,
        "store.timeout",
        section.timeout.as_deref(),
        DEFAULT_STORE_TIMEOUT,
    );
    if timeout > Duration::from_secs(5) {
        issues.error(
            "store.timeout",
            "is longer than 5s; every request may wait this long for the store (valid: \"10ms\" to \"5s\")",
        );
    }
    let on_error = match section.on_error.as_deref() {
        None | Some("local") => OnStoreError::Local,
        Some("refuse") => OnStoreError::Refuse,
        Some(other) => {
            issues.error(
                "store.on_error",
                format!("`{other}` is not valid (valid: \"local\" or \"refuse\")"),
            );
            OnStoreError::Local
        }
    };
    if issues.count() > before {
        return None;
    }
    let address = address?;
    Some(StoreSettings {
        url: section.url.clone(),
        tls: address.tls,
        host: address.host,
        port: address.port,
        db: address.db,
        ca_file,
        ca_pem,
        username: section.username.clone(),
        password,
        prefix,
        timeout,
        on_error,
    })
}

#[derive(Debug, PartialEq, Eq)]
struct StoreAddress {
    tls: bool,
    host: String,
    port: u16,
    db: i64,
}

/// `redis://host[:port][/db]` or `rediss://…`. User, password, query and fragment are refused:
/// secrets belong in `store.password` (a URL ends up in logs and process listings), and
/// redis-rs reads `#insecure` as "skip certificate verification".
fn parse_store_url(url: &str) -> Result<StoreAddress, String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("redis://") {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix("rediss://") {
        (true, rest)
    } else {
        return Err(
            "is not a Redis URL (valid: redis://host:port/db or rediss://host:port/db)".into(),
        );
    };
    if rest.contains('@') {
        return Err(
            "holds a user or password; give them as store.username and store.password".into(),
        );
    }
    if rest.contains(['?', '#']) {
        return Err("has a query or fragment (valid: redis://host:port/db)".into());
    }
    let (authority, db) = match rest.split_once('/') {
        None => (rest, 0),
        Some((authority, "")) => (authority, 0),
        Some((authority, db)) => match db.parse::<u16>() {
            Ok(db) => (authority, i64::from(db)),
            Err(_) => {
                return Err(format!(
                    "has `{db}` as database (valid: a number such as 0)"
                ));
            }
        },
    };
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or("has an unclosed `[` in its host")?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() || host.contains(['[', ']', '/', ' ']) {
        return Err("has no valid host (valid: redis://host:port/db)".into());
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("has `{port}` as port (valid: 1 to 65535)"))?,
    };
    Ok(StoreAddress {
        tls,
        host: host.to_owned(),
        port,
        db,
    })
}

fn read_ca_pem(path: &Path) -> Result<Vec<u8>, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not PEM: {e}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (valid: one or more -----BEGIN CERTIFICATE----- blocks)",
            path.display()
        ));
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigError};

    fn load(store: &str) -> Result<Config, ConfigError> {
        let text = format!(
            "[credentials.ci]\nkind = \"workspace_access_token\"\nworkspace = \"acme\"\ntoken = {{ value = \"t\" }}\n\n[[routes]]\nprefix = \"/2.0/repositories/acme\"\ncredential = \"ci\"\n\n[store]\n{store}\n"
        );
        Config::from_toml(Path::new("/etc/proxy.toml"), &text)
    }

    #[test]
    fn defaults_and_every_key() {
        let config = load("url = \"redis://127.0.0.1:6380/3\"").unwrap();
        let store = config.store.unwrap();
        assert_eq!((store.port, store.db, store.tls), (6380, 3, false));
        assert_eq!(store.prefix, DEFAULT_STORE_PREFIX);
        assert_eq!(store.timeout, DEFAULT_STORE_TIMEOUT);
        assert_eq!(store.on_error, OnStoreError::Local);
        assert!(
            load("")
                .unwrap_err()
                .to_string()
                .contains("store.url: `url` is required here")
        );
        let config = load(
            "url = \"redis://r\"\nusername = \"bbap\"\npassword = { value = \"pw-Zq8\" }\nprefix = \"ci:\"\ntimeout = \"20ms\"\non_error = \"refuse\"",
        )
        .unwrap();
        let store = config.store.as_ref().unwrap();
        assert_eq!(store.on_error, OnStoreError::Refuse);
        assert_eq!(store.password.as_ref().unwrap().expose(), "pw-Zq8");
        assert!(!format!("{config:?}").contains("pw-Zq8"));
        assert!(
            load("url = \"redis://r\"\nport = 1")
                .unwrap_err()
                .to_string()
                .contains("unknown field `port`")
        );
    }

    #[test]
    fn every_problem_names_the_file_the_key_and_what_is_valid() {
        let error = load(
            "url = \"redis://u:pw@r\"\nca_file = \"/nonexistent/ca.pem\"\nusername = \"bbap\"\nprefix = \"a b\"\ntimeout = \"10s\"\non_error = \"maybe\"",
        )
        .unwrap_err()
        .to_string();
        for expected in [
            "/etc/proxy.toml: store.url: `redis://u:pw@r` holds a user or password; give them as store.username and store.password",
            "/etc/proxy.toml: store.ca_file: cannot read /nonexistent/ca.pem",
            "store.password: store.username needs a password",
            "store.prefix: `a b` is not a valid key prefix (valid: 1 to 64 of",
            "store.timeout: is longer than 5s",
            "store.on_error: `maybe` is not valid (valid: \"local\" or \"refuse\")",
        ] {
            assert!(error.contains(expected), "{expected}\n---\n{error}");
        }
        let error = load("url = \"redis://r\"\npassword = { env = \"BBAP_TEST_UNSET_REDIS_PW\" }")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(
                "store.password: environment variable BBAP_TEST_UNSET_REDIS_PW is not set"
            ),
            "{error}"
        );
    }

    #[test]
    fn store_urls() {
        let ok = |url: &str| parse_store_url(url).unwrap();
        assert_eq!(
            ok("redis://127.0.0.1:6380/2"),
            StoreAddress {
                tls: false,
                host: "127.0.0.1".into(),
                port: 6380,
                db: 2
            }
        );
        assert_eq!(ok("rediss://cache.internal").port, 6379);
        assert!(ok("rediss://cache.internal/").tls);
        assert_eq!(ok("redis://[::1]:7000/0").host, "::1");
        for bad in [
            "http://x",
            "redis://user:pw@host",
            "redis://:pw@host",
            "rediss://host#insecure",
            "redis://host?db=1",
            "redis://host:0",
            "redis://host:99999",
            "redis://host/x",
            "redis://host/-1",
            "redis://",
            "redis://:6379",
            "redis://[::1",
        ] {
            assert!(parse_store_url(bad).is_err(), "{bad}");
        }
    }
}
