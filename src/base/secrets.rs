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
    #[error("{} {problem}", path.display())]
    FileRefused { path: PathBuf, problem: FileProblem },
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

/// The most a `{ file = }` secret may weigh. Tokens are a few hundred bytes; anything larger is
/// the wrong file (a log, a key store), which the proxy would otherwise send as a header.
pub const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// Why a secret file is refused, judged from its metadata: at start-up, on reload, and by
/// `/-/ready` while the proxy runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FileProblem {
    #[error("is not a regular file")]
    NotAFile,
    #[error("is empty")]
    Empty,
    #[error("is larger than 64 KiB ({0} bytes); a secret is a few hundred bytes")]
    TooLarge(u64),
    #[error(
        "is writable by group or others (mode {0:03o}): whoever can write it chooses what the proxy sends as the credential; run chmod go-w on it"
    )]
    WritableByOthers(u32),
}

/// Checks a secret file's metadata (following symlinks, as Kubernetes secret mounts need).
pub fn judge_secret_file(metadata: &std::fs::Metadata) -> Result<(), FileProblem> {
    use std::os::unix::fs::PermissionsExt;
    if !metadata.is_file() {
        return Err(FileProblem::NotAFile);
    }
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(FileProblem::WritableByOthers(mode));
    }
    match metadata.len() {
        0 => Err(FileProblem::Empty),
        len if len > MAX_SECRET_FILE_BYTES => Err(FileProblem::TooLarge(len)),
        _ => Ok(()),
    }
}

fn read_secret_file(path: &Path) -> Result<String, SecretError> {
    use std::io::Read;
    let unreadable = |e: std::io::Error| SecretError::FileUnreadable {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let file = std::fs::File::open(path).map_err(unreadable)?;
    // Judged on the opened file, so a swap between the check and the read changes nothing.
    let metadata = file.metadata().map_err(unreadable)?;
    match judge_secret_file(&metadata) {
        // An empty file gets the error of an empty secret, which says where it came from.
        Ok(()) | Err(FileProblem::Empty) => {}
        Err(problem) => {
            return Err(SecretError::FileRefused {
                path: path.to_owned(),
                problem,
            });
        }
    }
    // Bounded even if the file grows after the check; wiped however the read ends.
    // Sized from the metadata so that the buffer never reallocates, leaving unwiped copies.
    let capacity = metadata.len().min(MAX_SECRET_FILE_BYTES) as usize + 1;
    let mut bytes = Zeroizing::new(Vec::with_capacity(capacity));
    file.take(MAX_SECRET_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(SecretError::FileRefused {
            path: path.to_owned(),
            problem: FileProblem::TooLarge(bytes.len() as u64),
        });
    }
    match std::str::from_utf8(&bytes) {
        Ok(text) => Ok(text.to_owned()),
        Err(_) => Err(SecretError::FileUnreadable {
            path: path.to_owned(),
            reason: "not valid UTF-8".into(),
        }),
    }
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

/// A URL for messages: scheme, host, port and path, without user information, query or
/// fragment, which may carry secrets. Works on text that is not a valid URL too.
pub fn display_url(url: &str) -> String {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    let url = &url[..end];
    let (scheme, rest) = match url.find("://") {
        Some(at) => url.split_at(at + 3),
        None => ("", url),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    format!("{scheme}{host}{path}")
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
    fn large_and_group_or_world_writable_files_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let set_mode = |file: &tempfile::NamedTempFile, mode: u32| {
            std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(mode)).unwrap()
        };
        let (file, spec) = spec_file(&vec![b'a'; MAX_SECRET_FILE_BYTES as usize]);
        set_mode(&file, 0o644);
        assert_eq!(spec.load().unwrap().expose().len(), 64 * 1024);
        let (_f, spec) = spec_file(&vec![b'a'; MAX_SECRET_FILE_BYTES as usize + 1]);
        let error = spec.load().unwrap_err();
        assert!(
            matches!(
                error,
                SecretError::FileRefused {
                    problem: FileProblem::TooLarge(65537),
                    ..
                }
            ),
            "{error}"
        );
        assert!(error.to_string().contains("larger than 64 KiB"), "{error}");
        for mode in [0o620, 0o602, 0o666] {
            let (file, spec) = spec_file(b"tok");
            set_mode(&file, mode);
            let error = spec.load().unwrap_err();
            assert_eq!(
                error,
                SecretError::FileRefused {
                    path: file.path().to_owned(),
                    problem: FileProblem::WritableByOthers(mode)
                }
            );
            assert!(error.to_string().contains("chmod go-w"), "{error}");
        }
        let dir = tempfile::tempdir().unwrap();
        let spec = SecretSpec {
            file: Some(dir.path().to_owned()),
            ..Default::default()
        };
        assert!(matches!(
            spec.load(),
            Err(SecretError::FileRefused {
                problem: FileProblem::NotAFile,
                ..
            })
        ));
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
