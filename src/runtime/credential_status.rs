//! What the last check of a credential found (`verify = true`), as `/-/ready` and the
//! metrics show it. Kept by [`crate::runtime::state::SharedState`], written by
//! [`crate::runtime::verify`].

use serde::Serialize;

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
