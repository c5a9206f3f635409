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
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub listen: Option<Vec<String>>,
    pub allowed_clients: Option<Vec<String>>,
    pub public_url: Option<String>,
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
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CredentialSection {
    RepositoryAccessToken {
        repository: String,
        token: SecretSpec,
    },
    ProjectAccessToken {
        workspace: String,
        project: String,
        token: SecretSpec,
    },
    WorkspaceAccessToken {
        workspace: String,
        token: SecretSpec,
    },
    ApiToken {
        email: String,
        token: SecretSpec,
    },
    AppPassword {
        username: String,
        password: SecretSpec,
    },
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
