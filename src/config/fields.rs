//! What the config sections share: the [`Issues`] collector every check reports into, the
//! validation [`Mode`], and the parsers for field types several sections use (listen
//! addresses, durations, CIDRs).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;

use super::{ConfigIssue, ListenAddr};
use std::path::Path;

use crate::base::secrets::{SecretError, SecretSource, SecretSpec};

/// Collects issues while validation walks the file.
pub(super) struct Issues {
    /// `check --offline`: read no secret and no CA file (see [`Mode::Offline`]).
    pub(super) mode: Mode,
    pub(super) issues: Vec<ConfigIssue>,
    pub(super) warnings: Vec<String>,
    pub(super) secret_sources: Vec<(String, SecretSource)>,
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
pub(super) const OFFLINE_PLACEHOLDER: &str = "offline-check-placeholder";

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

pub(super) fn load_secret(
    issues: &mut Issues,
    key: &str,
    spec: &SecretSpec,
    base_dir: &Path,
) -> Option<crate::base::secrets::Secret> {
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
            let mut placeholder =
                crate::base::secrets::Secret::from_runtime(OFFLINE_PLACEHOLDER.into());
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
