//! `[[credentials]]` validated: each kind's keys, its secrets (read from their sources, or a
//! placeholder offline), its scope and `rate_limit`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::fields::{Issues, load_secret};
use super::file::{
    ApiTokenSection, AppPasswordSection, CredentialSection, OauthClientCredentialsSection,
    ProjectAccessTokenSection, RepositoryAccessTokenSection, WorkspaceAccessTokenSection,
};
use super::upstream::{parse_origin, require_tls_unless_loopback};
use crate::bitbucket::credentials::{CredentialKind, CredentialSettings, Scope};

/// Loads every credential. A credential that failed is kept as `None` so routes naming it do not
/// also report "undefined credential".
pub(super) fn credentials(
    issues: &mut Issues,
    sections: BTreeMap<String, CredentialSection>,
    base_dir: &Path,
) -> BTreeMap<String, Option<Arc<CredentialSettings>>> {
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
pub(super) fn is_label_safe(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

pub(super) fn credential(
    issues: &mut Issues,
    key: &str,
    name: String,
    section: CredentialSection,
    base_dir: &Path,
) -> Option<CredentialSettings> {
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
            Some(CredentialSettings::access_token(
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
                CredentialSettings::access_token(
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
                CredentialSettings::access_token(
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
            ok.then(|| CredentialSettings::api_token(name, &email, &token))
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
            ok.then(|| CredentialSettings::app_password(name, &username, &password))
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
                .unwrap_or(crate::bitbucket::credentials::DEFAULT_TOKEN_URL);
            let token_url = match parse_token_url(url) {
                Ok(uri) => Some(uri),
                Err(why) => {
                    let shown = crate::base::secrets::display_url(url);
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
            Some(CredentialSettings::oauth_client_credentials(
                name, token_url, &client_id, &secret,
            ))
        }
    }
}

/// The token endpoint: an https URL (http only on loopback, for mocks) with a path.
pub(super) fn parse_token_url(url: &str) -> Result<http::Uri, String> {
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

pub(super) fn rate_limit(
    issues: &mut Issues,
    key: &str,
    section: &super::file::RateLimitSection,
) -> Option<crate::bitbucket::rate_limit::RateLimit> {
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
    Some(crate::bitbucket::rate_limit::RateLimit {
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
