//! Where secrets come from, and the types that keep them from leaking.
//!
//! A secret is read once, validated, and turned into the exact `Authorization` header value the
//! upstream needs. Every copy the proxy makes lives in memory that is zeroized when the last
//! reference goes away, and no type here can be printed.

use std::fmt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use zeroize::Zeroizing;

/// `{ env = "VAR" }`, `{ file = "/path" }` or `{ value = "..." }` in the config file.
///
/// Deserialised as a struct of options rather than an untagged enum so that a typo gets an error
/// naming the key instead of serde's "did not match any variant".
#[derive(Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretSpec {
    /// An environment variable holding the secret.
    pub env: Option<String>,
    /// A file holding the secret (one trailing newline is trimmed); relative to the config file.
    pub file: Option<PathBuf>,
    /// The secret itself, written in the config (accepted with a warning).
    #[schemars(with = "Option<String>")]
    pub value: Option<SecretString>,
}

impl fmt::Debug for SecretSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.source() {
            Ok(source) => write!(f, "SecretSpec({source})"),
            Err(_) => f.write_str("SecretSpec(<invalid>)"),
        }
    }
}

/// Where a secret is read from; printable, because it never holds the secret itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Env(String),
    File(PathBuf),
    Inline,
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Env(var) => write!(f, "environment variable {var}"),
            SecretSource::File(path) => write!(f, "file {}", path.display()),
            SecretSource::Inline => f.write_str("inline value"),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("give exactly one of `env`, `file` or `value` (found {found})")]
    Ambiguous { found: usize },
    #[error("environment variable {0} is not set")]
    EnvMissing(String),
    #[error("environment variable {0} is not valid UTF-8")]
    EnvNotUnicode(String),
    #[error("cannot read {path}: {reason}")]
    FileUnreadable { path: PathBuf, reason: String },
    #[error("{0} is empty")]
    Empty(SecretSource),
    #[error("{0} contains a control character (a secret must fit in an HTTP header)")]
    ControlCharacter(SecretSource),
}

impl SecretSpec {
    pub fn source(&self) -> Result<SecretSource, SecretError> {
        let found = usize::from(self.env.is_some())
            + usize::from(self.file.is_some())
            + usize::from(self.value.is_some());
        if found != 1 {
            return Err(SecretError::Ambiguous { found });
        }
        Ok(if let Some(var) = &self.env {
            SecretSource::Env(var.clone())
        } else if let Some(path) = &self.file {
            SecretSource::File(path.clone())
        } else {
            SecretSource::Inline
        })
    }

    /// Reads the secret now. File contents lose one trailing newline (`\n` or `\r\n`), which is
    /// what `echo token > file` and Kubernetes secret tooling leave behind.
    pub fn load(&self) -> Result<Secret, SecretError> {
        let source = self.source()?;
        let text: Zeroizing<String> = match &source {
            SecretSource::Env(var) => match std::env::var(var) {
                Ok(value) => Zeroizing::new(value),
                Err(std::env::VarError::NotPresent) => {
                    return Err(SecretError::EnvMissing(var.clone()));
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(SecretError::EnvNotUnicode(var.clone()));
                }
            },
            SecretSource::File(path) => Zeroizing::new(read_secret_file(path)?),
            SecretSource::Inline => Zeroizing::new(
                self.value
                    .as_ref()
                    .map(|v| v.expose_secret().to_owned())
                    .unwrap_or_default(),
            ),
        };
        let trimmed = match source {
            SecretSource::File(_) => trim_one_newline(&text),
            _ => text.as_str(),
        };
        if trimmed.is_empty() {
            return Err(SecretError::Empty(source));
        }
        if trimmed.bytes().any(|b| b.is_ascii_control()) {
            return Err(SecretError::ControlCharacter(source));
        }
        Ok(Secret {
            value: SecretString::from(trimmed.to_owned()),
            source,
        })
    }
}

fn read_secret_file(path: &Path) -> Result<String, SecretError> {
    std::fs::read(path)
        .map_err(|e| SecretError::FileUnreadable {
            path: path.to_owned(),
            reason: e.to_string(),
        })
        .and_then(|bytes| {
            String::from_utf8(bytes).map_err(|e| {
                // The rejected bytes are secret material too.
                let mut bytes = e.into_bytes();
                zeroize::Zeroize::zeroize(&mut bytes);
                SecretError::FileUnreadable {
                    path: path.to_owned(),
                    reason: "not valid UTF-8".into(),
                }
            })
        })
}

fn trim_one_newline(text: &str) -> &str {
    text.strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(text)
}

/// A loaded secret. `Debug` shows only where it came from; the value is zeroized on drop.
pub struct Secret {
    value: SecretString,
    pub source: SecretSource,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({}, [REDACTED])", self.source)
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        self.value.expose_secret()
    }

    /// A secret made in code rather than read from config (OAuth access tokens, tests).
    pub fn from_runtime(value: String) -> Self {
        Secret {
            value: SecretString::from(value),
            source: SecretSource::Inline,
        }
    }
}

/// Owner of header bytes that wipes them when the last `Bytes` handle is dropped.
struct ZeroizingBytes(Zeroizing<Vec<u8>>);

impl AsRef<[u8]> for ZeroizingBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Builds a sensitive `HeaderValue` whose bytes are zeroized when the last clone is dropped.
///
/// `HeaderValue::from_maybe_shared` keeps a `Bytes` as is, so cloning the header per request
/// only bumps a reference count and never copies the secret into unmanaged memory. Marking it
/// sensitive makes `Debug` print `Sensitive` and has HTTP/2 send it never-indexed.
pub fn sensitive_header(
    value: Zeroizing<Vec<u8>>,
) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    let bytes = Bytes::from_owner(ZeroizingBytes(value));
    let mut header = HeaderValue::from_maybe_shared(bytes)?;
    header.set_sensitive(true);
    Ok(header)
}

/// `Basic base64(user:password)` as a sensitive header.
pub fn basic_auth_header(user: &str, password: &Secret) -> HeaderValue {
    use base64::Engine;
    let mut plain = Zeroizing::new(Vec::with_capacity(user.len() + 1 + password.expose().len()));
    plain.extend_from_slice(user.as_bytes());
    plain.push(b':');
    plain.extend_from_slice(password.expose().as_bytes());
    let mut value = Zeroizing::new(b"Basic ".to_vec());
    let encoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&*plain));
    value.extend_from_slice(encoded.as_bytes());
    sensitive_header(value).expect("base64 output is always a valid header value")
}

/// `Bearer <token>` as a sensitive header.
pub fn bearer_header(token: &Secret) -> HeaderValue {
    let mut value = Zeroizing::new(Vec::with_capacity(7 + token.expose().len()));
    value.extend_from_slice(b"Bearer ");
    value.extend_from_slice(token.expose().as_bytes());
    sensitive_header(value).expect("secrets are checked for control characters when loaded")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn spec_file(contents: &[u8]) -> (tempfile::NamedTempFile, SecretSpec) {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(contents).unwrap();
        let spec = SecretSpec {
            file: Some(file.path().to_owned()),
            ..Default::default()
        };
        (file, spec)
    }

    #[test]
    fn file_secret_loses_exactly_one_trailing_newline() {
        let (_f, spec) = spec_file(b"tok\n");
        assert_eq!(spec.load().unwrap().expose(), "tok");
        let (_f, spec) = spec_file(b"tok\r\n");
        assert_eq!(spec.load().unwrap().expose(), "tok");
        let (_f, spec) = spec_file(b"tok\n\n");
        assert!(matches!(spec.load(), Err(SecretError::ControlCharacter(_))));
    }

    #[test]
    fn empty_and_missing_secrets_are_errors() {
        let (_f, spec) = spec_file(b"\n");
        assert!(matches!(spec.load(), Err(SecretError::Empty(_))));
        let spec = SecretSpec {
            env: Some("BBAP_TEST_SURELY_UNSET_VARIABLE".into()),
            ..Default::default()
        };
        assert_eq!(
            spec.load().unwrap_err(),
            SecretError::EnvMissing("BBAP_TEST_SURELY_UNSET_VARIABLE".into())
        );
        let spec = SecretSpec::default();
        assert_eq!(
            spec.source().unwrap_err(),
            SecretError::Ambiguous { found: 0 }
        );
    }

    #[test]
    fn debug_never_shows_the_value() {
        let secret = Secret::from_runtime("hunter2-very-secret".into());
        assert!(!format!("{secret:?}").contains("hunter2"));
        let header = bearer_header(&secret);
        assert!(header.is_sensitive());
        assert!(!format!("{header:?}").contains("hunter2"));
        let spec: SecretSpec = toml::from_str(r#"value = "hunter2-very-secret""#).unwrap();
        assert!(!format!("{spec:?}").contains("hunter2"));
    }

    #[test]
    fn basic_header_is_standard_base64() {
        let secret = Secret::from_runtime("pass".into());
        let header = basic_auth_header("user", &secret);
        assert_eq!(header.as_bytes(), b"Basic dXNlcjpwYXNz");
    }
}
