//! The config file as written: serde types that mirror the TOML one to one.
//!
//! Every table denies unknown keys, so a typo fails at start-up (with its line) instead of
//! silently disabling something. Values stay strings here; `super::validate` turns them into
//! typed settings and reports every problem at once.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::secrets::SecretSpec;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub upstream: UpstreamSection,
    #[serde(default)]
    pub credentials: BTreeMap<String, CredentialSection>,
    #[serde(default)]
    pub routes: Vec<RouteSection>,
    pub store: Option<StoreSection>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub listen: Option<Vec<String>>,
    pub allowed_clients: Option<Vec<String>>,
    pub public_url: Option<String>,
    pub unix_socket_mode: Option<String>,
    pub shutdown_grace: Option<String>,
    pub max_connections: Option<usize>,
    pub max_in_flight: Option<usize>,
    pub header_read_timeout: Option<String>,
    pub send_timeout: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    pub api_url: Option<String>,
    pub git_url: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Option<String>,
    pub timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub verify_interval: Option<String>,
    pub http2: Option<bool>,
    pub proxy: Option<String>,
    pub proxy_username: Option<String>,
    pub proxy_password: Option<SecretSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CredentialSection {
    RepositoryAccessToken {
        repository: String,
        token: SecretSpec,
        #[serde(default)]
        verify: bool,
        rate_limit: Option<RateLimitSection>,
    },
    ProjectAccessToken {
        workspace: String,
        project: String,
        token: SecretSpec,
        #[serde(default)]
        verify: bool,
        rate_limit: Option<RateLimitSection>,
    },
    WorkspaceAccessToken {
        workspace: String,
        token: SecretSpec,
        #[serde(default)]
        verify: bool,
        rate_limit: Option<RateLimitSection>,
    },
    ApiToken {
        email: String,
        token: SecretSpec,
        #[serde(default)]
        verify: bool,
        rate_limit: Option<RateLimitSection>,
    },
    OauthClientCredentials {
        client_id: String,
        client_secret: SecretSpec,
        token_url: Option<String>,
        #[serde(default)]
        verify: bool,
        rate_limit: Option<RateLimitSection>,
    },
    AppPassword {
        username: String,
        password: SecretSpec,
        #[serde(default)]
        verify: bool,
        rate_limit: Option<RateLimitSection>,
    },
}

impl CredentialSection {
    pub fn verify(&self) -> bool {
        match self {
            CredentialSection::RepositoryAccessToken { verify, .. }
            | CredentialSection::ProjectAccessToken { verify, .. }
            | CredentialSection::WorkspaceAccessToken { verify, .. }
            | CredentialSection::ApiToken { verify, .. }
            | CredentialSection::AppPassword { verify, .. }
            | CredentialSection::OauthClientCredentials { verify, .. } => *verify,
        }
    }

    pub fn rate_limit(&self) -> Option<&RateLimitSection> {
        match self {
            CredentialSection::RepositoryAccessToken { rate_limit, .. }
            | CredentialSection::ProjectAccessToken { rate_limit, .. }
            | CredentialSection::WorkspaceAccessToken { rate_limit, .. }
            | CredentialSection::ApiToken { rate_limit, .. }
            | CredentialSection::AppPassword { rate_limit, .. }
            | CredentialSection::OauthClientCredentials { rate_limit, .. } => rate_limit.as_ref(),
        }
    }
}

/// `rate_limit = { per_hour = 1000, burst = 50, max_wait = "5s" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSection {
    pub per_hour: u32,
    pub burst: Option<u32>,
    pub max_wait: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub prefix: String,
    pub credential: String,
    pub upstream: Option<String>,
    pub upstream_prefix: Option<String>,
    pub methods: Option<Vec<String>>,
    pub rewrite_links: Option<bool>,
}

/// `[store]`: the Redis server replicas share budgets and cool-downs through.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    pub url: String,
    pub ca_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<SecretSpec>,
    pub prefix: Option<String>,
    pub timeout: Option<String>,
    pub on_error: Option<String>,
}
