//! Credential checks: with `verify = true`, a cheap Bitbucket call at start-up and every
//! `upstream.verify_interval`, so an expired or revoked token shows in `/-/ready` and metrics
//! before a pipeline fails on it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Limited};

use crate::base::body::UpstreamRequestBody;
use crate::base::error_chain;
use crate::bitbucket::credentials::{CredentialKind, Scope, UpstreamKind};
use crate::runtime::state::{Generation, SharedState};
use crate::telemetry::metrics::VerifyLabels;
use crate::upstream::credential::Credential;

pub use super::credential_status::{VerifyState, VerifyStatus};

/// The cheapest endpoint each kind of credential can read.
pub fn probe_path(credential: &Credential) -> String {
    match &credential.scope {
        Scope::Repository {
            workspace,
            repository,
        } => format!("/2.0/repositories/{workspace}/{repository}"),
        Scope::Workspace { workspace } | Scope::Project { workspace, .. } => {
            format!("/2.0/repositories/{workspace}?pagelen=1")
        }
        Scope::Account => "/2.0/user".into(),
    }
}

/// Known causes of a 401, by kind: what the operator should check.
fn unauthorized_hint(kind: CredentialKind) -> &'static str {
    match kind {
        CredentialKind::ApiToken => {
            "API tokens authenticate with the Atlassian account email (not the Bitbucket username) and expire within a year: check `email`, then whether the token expired"
        }
        CredentialKind::OauthClientCredentials => {
            "the consumer's access token was refused: check the consumer still exists and has the scopes this resource needs"
        }
        CredentialKind::AppPassword => {
            "app passwords authenticate with the Bitbucket username (not the email), and Bitbucket Cloud stopped accepting them on 2026-07-28: replace it with an API token"
        }
        CredentialKind::RepositoryAccessToken
        | CredentialKind::ProjectAccessToken
        | CredentialKind::WorkspaceAccessToken => {
            "the access token was revoked or expired, or its repository was transferred (which revokes repository tokens)"
        }
    }
}

/// One check. Never fails: every outcome is a state with a human-readable detail.
pub async fn verify_once(generation: &Generation, credential: &Credential) -> VerifyStatus {
    let origin = &generation.config.upstream.api;
    let uri = format!("{origin}{}", probe_path(credential));
    let timeout = generation.config.upstream.timeout;
    let authorization = match credential
        .authorization(UpstreamKind::Api, &generation.client, timeout)
        .await
    {
        Ok(authorization) => authorization,
        Err(error) => return checked(VerifyState::Unreachable, error.to_string()),
    };
    let request = Request::get(uri)
        .header(header::AUTHORIZATION, authorization)
        .header(header::ACCEPT, "application/json")
        .body(UpstreamRequestBody::local(Bytes::new()));
    let (state, detail) = match request {
        Err(error) => (
            VerifyState::Unreachable,
            format!("cannot build the check request: {error}"),
        ),
        Ok(request) => {
            match tokio::time::timeout(timeout, generation.client.request(request)).await {
                Err(_) => (
                    VerifyState::Unreachable,
                    format!("no answer within {}", humantime::format_duration(timeout)),
                ),
                Ok(Err(error)) => (VerifyState::Unreachable, error_chain(&error)),
                Ok(Ok(response)) => {
                    let status = response.status();
                    // Read (bounded) so the pooled connection can be reused.
                    let _ = Limited::new(response.into_body(), 64 * 1024)
                        .collect()
                        .await;
                    classify(status, credential.kind)
                }
            }
        }
    };
    checked(state, detail)
}

fn checked(state: VerifyState, detail: String) -> VerifyStatus {
    VerifyStatus {
        state,
        detail,
        checked_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    }
}

fn classify(status: StatusCode, kind: CredentialKind) -> (VerifyState, String) {
    match status.as_u16() {
        200..=299 => (VerifyState::Valid, format!("Bitbucket answered {status}")),
        401 => (
            VerifyState::Unauthorized,
            format!("Bitbucket answered {status}: {}", unauthorized_hint(kind)),
        ),
        403 => (
            VerifyState::Forbidden,
            format!(
                "Bitbucket answered {status}: the credential is valid but lacks the scope or permission to read this resource"
            ),
        ),
        _ => (
            VerifyState::Unreachable,
            format!("Bitbucket answered {status}"),
        ),
    }
}

/// Checks `credential` now and then every `verify_interval`, for as long as the task lives.
pub async fn run_verifier(state: Arc<SharedState>, credential: Arc<Credential>) {
    loop {
        let generation = state.current();
        let status = verify_once(&generation, &credential).await;
        match status.state {
            VerifyState::Valid => tracing::info!(
                credential = &*credential.name,
                state = status.state.as_str(),
                "credential verified"
            ),
            _ => tracing::warn!(
                credential = &*credential.name,
                state = status.state.as_str(),
                detail = %status.detail,
                "credential check failed"
            ),
        }
        record(&state, &credential.name, status);
        tokio::time::sleep(
            generation
                .config
                .upstream
                .verify_interval
                .max(Duration::from_secs(1)),
        )
        .await;
    }
}

pub fn record(state: &SharedState, name: &Arc<str>, status: VerifyStatus) {
    for candidate in VerifyState::ALL {
        state
            .metrics
            .credential_verify
            .get_or_create(&VerifyLabels {
                credential: name.clone(),
                state: candidate.as_str(),
            })
            .set(i64::from(candidate == status.state));
    }
    state.set_verify_status(name.clone(), status);
}
