//! The config file as written: serde types that mirror the TOML one to one.
//!
//! Every table denies unknown keys, so a typo fails at start-up (with its line) instead of
//! silently disabling something. Values stay strings here; `super::validate` turns them into
//! typed settings and reports every problem at once. The same types generate the config's JSON
//! Schema (`super::schema`), so the doc comments on keys are what editors show.

use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::Deserialize;

use crate::secrets::SecretSpec;

#[derive(Debug, Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
/// The bitbucket-auth-proxy config file.
pub struct ConfigFile {
    /// Where and for whom the proxy listens.
    #[serde(default)]
    pub server: ServerSection,
    /// Bitbucket's endpoints and how to reach them.
    #[serde(default)]
    pub upstream: UpstreamSection,
    /// One table per credential, `[credentials.NAME]`; routes refer to NAME.
    #[serde(default)]
    pub credentials: BTreeMap<String, CredentialSection>,
    /// The route table: a request is forwarded only if its path matches a route.
    #[serde(default)]
    pub routes: Vec<RouteSection>,
}

#[derive(Debug, Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Addresses to listen on: "IP:port" or "unix:/absolute/path". Default: ["127.0.0.1:8080"].
    pub listen: Option<Vec<String>>,
    /// CIDR allow-list for TCP peers. Default: loopback only, ["127.0.0.0/8", "::1/128"].
    pub allowed_clients: Option<Vec<String>>,
    /// Origin ("scheme://host[:port]") under which clients reach the proxy, for rewritten links.
    pub public_url: Option<String>,
    /// File mode of unix-socket listeners, an octal string. Default: "0660".
    pub unix_socket_mode: Option<String>,
    /// How long in-flight requests may finish after SIGTERM/SIGINT. Default: "30s".
    pub shutdown_grace: Option<DurationText>,
    /// Open client connections; one more gets a 503. Default: 4096.
    pub max_connections: Option<usize>,
    /// Requests in flight; one more gets a 503. Default: 1024.
    pub max_in_flight: Option<usize>,
    /// How long a client may take to send a request head. Default: "30s".
    pub header_read_timeout: Option<DurationText>,
    /// How long a write to a client may make no progress. Default: "60s".
    pub send_timeout: Option<DurationText>,
}

#[derive(Debug, Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    /// Where REST routes go. Default: "https://api.bitbucket.org".
    pub api_url: Option<String>,
    /// Where git routes go. Default: "https://bitbucket.org".
    pub git_url: Option<String>,
    /// PEM file of extra trusted CA certificates, added to the built-in roots.
    pub ca_file: Option<PathBuf>,
    /// TCP connect to the upstream or egress proxy. Default: "5s".
    pub connect_timeout: Option<DurationText>,
    /// Until the upstream's response head arrives; then 504. Default: "60s".
    pub timeout: Option<DurationText>,
    /// Longest pause with no bytes moving while a body streams. Default: "60s".
    pub idle_timeout: Option<DurationText>,
    /// How often credentials with `verify = true` are checked. Default: "10m".
    pub verify_interval: Option<DurationText>,
    /// Offer HTTP/2 to the upstream. Default: true.
    pub http2: Option<bool>,
    /// An http:// egress proxy to tunnel through with CONNECT. Default: from HTTPS_PROXY etc.
    pub proxy: Option<String>,
    /// Basic credentials for the egress proxy: user name.
    pub proxy_username: Option<String>,
    /// Basic credentials for the egress proxy: the password (a secret).
    pub proxy_password: Option<SecretSpec>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CredentialSection {
    /// A repository access token; `repository` is "workspace/repository".
    RepositoryAccessToken {
        repository: String,
        token: SecretSpec,
        #[serde(default)]
        verify: bool,
        rate_limit: Option<RateLimitSection>,
    },
    /// A project access token, checked against its workspace.
    ProjectAccessToken {
        workspace: String,
        project: String,
        token: SecretSpec,
        #[serde(default)]
        verify: bool,
        rate_limit: Option<RateLimitSection>,
    },
    /// A workspace access token.
    WorkspaceAccessToken {
        workspace: String,
        token: SecretSpec,
        #[serde(default)]
        verify: bool,
        rate_limit: Option<RateLimitSection>,
    },
    /// An Atlassian API token; `email` is the account's email.
    ApiToken {
        email: String,
        token: SecretSpec,
        #[serde(default)]
        verify: bool,
        rate_limit: Option<RateLimitSection>,
    },
    /// An OAuth consumer (client credentials grant).
    OauthClientCredentials {
        client_id: String,
        client_secret: SecretSpec,
        token_url: Option<String>,
        #[serde(default)]
        verify: bool,
        rate_limit: Option<RateLimitSection>,
    },
    /// A legacy app password (no longer accepted by Bitbucket Cloud).
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

    pub fn rate_limit(&self) -> Option<RateLimitSection> {
        match self {
            CredentialSection::RepositoryAccessToken { rate_limit, .. }
            | CredentialSection::ProjectAccessToken { rate_limit, .. }
            | CredentialSection::WorkspaceAccessToken { rate_limit, .. }
            | CredentialSection::ApiToken { rate_limit, .. }
            | CredentialSection::AppPassword { rate_limit, .. }
            | CredentialSection::OauthClientCredentials { rate_limit, .. } => *rate_limit,
        }
    }
}

/// `rate_limit = { per_hour = 1000, burst = 50 }`.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSection {
    /// Requests per rolling hour.
    pub per_hour: u32,
    /// Requests that may go back to back. Default: 10, or per_hour if smaller.
    pub burst: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    /// Local path prefix: starts with '/', no trailing '/', unique; matches whole segments.
    pub prefix: String,
    /// The [credentials.NAME] to inject.
    pub credential: String,
    /// "api" (api_url) or "git" (git_url). Default: "api".
    pub upstream: Option<String>,
    /// Upstream path that replaces `prefix`. Default: the same as prefix.
    pub upstream_prefix: Option<String>,
    /// Allowed methods; others get 405. Default: every method.
    pub methods: Option<Vec<String>>,
    /// Point upstream URLs in responses back at the proxy. Default: true.
    pub rewrite_links: Option<bool>,
}

/// A duration as written (`"500ms"`, `"5s"`, `"2m"`, `"1h"`); validated into a `Duration` later.
/// Its own type so that `timeout = 60` is refused as "expected a duration like \"60s\"".
#[derive(Debug, Clone)]
pub struct DurationText(pub String);

impl std::ops::Deref for DurationText {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = DurationText;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration like \"60s\"")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<DurationText, E> {
                Ok(DurationText(text.to_owned()))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

impl JsonSchema for DurationText {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A positive duration in humantime syntax: \"500ms\", \"5s\", \"2m\", \"1h\".",
            "examples": ["60s"]
        })
    }
}
