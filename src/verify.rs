//! Credential checks: with `verify = true`, a cheap Bitbucket call at start-up and every
//! `upstream.verify_interval`, so an expired or revoked token shows in `/-/ready` and metrics
//! before a pipeline fails on it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use serde::Serialize;

use crate::body::UpstreamRequestBody;
use crate::credentials::{Credential, CredentialKind, Scope, UpstreamKind};
use crate::error::error_chain;
use crate::metrics::VerifyLabels;
use crate::state::{Generation, SharedState};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyState {
    Pending,
    Valid,
    Unauthorized,
    Forbidden,
    Unreachable,
}

impl VerifyState {
    pub const ALL: [VerifyState; 5] = [
        VerifyState::Pending,
        VerifyState::Valid,
        VerifyState::Unauthorized,
        VerifyState::Forbidden,
        VerifyState::Unreachable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VerifyState::Pending => "pending",
            VerifyState::Valid => "valid",
            VerifyState::Unauthorized => "unauthorized",
            VerifyState::Forbidden => "forbidden",
            VerifyState::Unreachable => "unreachable",
        }
    }

    /// A credential Bitbucket refuses makes the proxy not ready; an unreachable Bitbucket does
    /// not (restarting the proxy would not help).
    pub fn blocks_readiness(self) -> bool {
        matches!(self, VerifyState::Unauthorized | VerifyState::Forbidden)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyStatus {
    pub state: VerifyState,
    pub detail: String,
    /// Seconds since the Unix epoch of the last check; 0 before the first.
    pub checked_at: u64,
}

impl VerifyStatus {
    pub fn pending() -> Self {
        VerifyStatus {
            state: VerifyState::Pending,
            detail: "not checked yet".into(),
            checked_at: 0,
        }
    }
}

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
