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

use crate::base::secrets::SecretSpec;

#[derive(Debug, Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
/// The bitbucket-auth-proxy config file.
pub struct ConfigFile {
    /// Where and for whom the proxy listens.
    #[serde(default)]
    pub server: ServerSection,
    /// A listener of its own for the admin endpoints.
    #[serde(default)]
    pub admin: AdminSection,
    /// Bitbucket's endpoints and how to reach them.
    #[serde(default)]
    pub upstream: UpstreamSection,
    /// One table per credential, `[credentials.NAME]`; routes refer to NAME.
    #[serde(default)]
    pub credentials: BTreeMap<String, CredentialSection>,
    /// The route table: a request is forwarded only if its path matches a route.
    #[serde(default)]
    pub routes: Vec<RouteSection>,
    /// The response cache's bounds.
    #[serde(default)]
    pub cache: CacheSection,
    /// Redis shared by replicas for budgets and cool-downs. Default: none (in-process).
    pub store: Option<StoreSection>,
}

/// `[cache]`: the response cache's memory bound and the per-response size cap.
#[derive(Debug, Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    /// Bytes the response cache may hold in all.
    pub max_bytes: Option<u64>,
    /// The largest response that is stored or shared while it streams.
    pub max_entry_bytes: Option<u64>,
}

/// A route's `cache = { max_age = "5s", stale_if_error = "5m", immutable = true }`.
#[derive(Debug, Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteCacheSection {
    /// Microcaching: how long a mutable GET answer is served from the cache.
    pub max_age: Option<DurationText>,
    /// How long past max_age an entry may answer when the upstream fails or the budget refuses.
    pub stale_if_error: Option<DurationText>,
    /// Cache GETs pinned to full commit hashes (immutable resources). Default: true.
    pub immutable: Option<bool>,
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
    /// Concurrent streams per HTTP/2 client connection. Default: 32.
    pub max_concurrent_streams: Option<u32>,
    /// How long a client may take to send a request head. Default: "30s".
    pub header_read_timeout: Option<DurationText>,
    /// How long a write to a client may make no progress. Default: "60s".
    pub send_timeout: Option<DurationText>,
}

/// `[admin]`: a separate listener for `/-/health`, `/-/ready` and `/-/metrics`.
#[derive(Debug, Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Addresses of the admin listener ("IP:port" or "unix:/absolute/path"). Default: none,
    /// the admin endpoints stay on server.listen.
    pub listen: Option<Vec<String>>,
    /// CIDR allow-list for the admin listener's TCP peers. Default: loopback only.
    pub allowed_clients: Option<Vec<String>>,
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
    /// Offer HTTP/2 to the upstream (to the git origin too when it is the API's). Default: true.
    pub http2: Option<bool>,
    /// Offer HTTP/2 to `git_url` when it is not the API's origin. Default: false.
    pub git_http2: Option<bool>,
    /// Keep a connected spare to each upstream origin the routes use. Default: true.
    pub keep_warm: Option<bool>,
    /// An http:// egress proxy to tunnel through with CONNECT. Default: from HTTPS_PROXY etc.
    pub proxy: Option<String>,
    /// Basic credentials for the egress proxy: user name.
    pub proxy_username: Option<String>,
    /// Basic credentials for the egress proxy: the password (a secret).
    pub proxy_password: Option<SecretSpec>,
}

/// A `[credentials.NAME]` table, by its `kind`. Each kind's keys are a struct of their own, so
/// that `parse` can deserialise a credential's keys with their spans (serde reads an internally
/// tagged enum as one buffered table, and its errors point at the table, not the key).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CredentialSection {
    /// A repository access token; `repository` is "workspace/repository".
    RepositoryAccessToken(RepositoryAccessTokenSection),
    /// A project access token, checked against its workspace.
    ProjectAccessToken(ProjectAccessTokenSection),
    /// A workspace access token.
    WorkspaceAccessToken(WorkspaceAccessTokenSection),
    /// An Atlassian API token; acts as its account on any path.
    ApiToken(ApiTokenSection),
    /// An OAuth consumer (client credentials grant).
    OauthClientCredentials(OauthClientCredentialsSection),
    /// A legacy app password (no longer accepted by Bitbucket Cloud).
    AppPassword(AppPasswordSection),
}

/// `kind = "repository_access_token"`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RepositoryAccessTokenSection {
    /// The repository, "workspace/repository".
    pub repository: String,
    /// The token (a secret).
    pub token: SecretSpec,
    /// Check the credential against Bitbucket at start-up and every upstream.verify_interval.
    #[serde(default)]
    pub verify: bool,
    /// Refuse locally (429) beyond this budget rather than spend Bitbucket's.
    pub rate_limit: Option<RateLimitSection>,
}

/// `kind = "project_access_token"`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProjectAccessTokenSection {
    /// The workspace the project belongs to.
    pub workspace: String,
    /// The project key.
    pub project: String,
    /// The token (a secret).
    pub token: SecretSpec,
    /// Check the credential against Bitbucket at start-up and every upstream.verify_interval.
    #[serde(default)]
    pub verify: bool,
    /// Refuse locally (429) beyond this budget rather than spend Bitbucket's.
    pub rate_limit: Option<RateLimitSection>,
}

/// `kind = "workspace_access_token"`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceAccessTokenSection {
    /// The workspace.
    pub workspace: String,
    /// The token (a secret).
    pub token: SecretSpec,
    /// Check the credential against Bitbucket at start-up and every upstream.verify_interval.
    #[serde(default)]
    pub verify: bool,
    /// Refuse locally (429) beyond this budget rather than spend Bitbucket's.
    pub rate_limit: Option<RateLimitSection>,
}

/// `kind = "api_token"`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiTokenSection {
    /// The Atlassian account email (not the username).
    pub email: String,
    /// The token (a secret).
    pub token: SecretSpec,
    /// Check the credential against Bitbucket at start-up and every upstream.verify_interval.
    #[serde(default)]
    pub verify: bool,
    /// Refuse locally (429) beyond this budget rather than spend Bitbucket's.
    pub rate_limit: Option<RateLimitSection>,
}

/// `kind = "oauth_client_credentials"`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OauthClientCredentialsSection {
    /// The consumer's key.
    pub client_id: String,
    /// The consumer's secret.
    pub client_secret: SecretSpec,
    /// The token endpoint. Default: "https://bitbucket.org/site/oauth2/access_token".
    pub token_url: Option<String>,
    /// Check the credential against Bitbucket at start-up and every upstream.verify_interval.
    #[serde(default)]
    pub verify: bool,
    /// Refuse locally (429) beyond this budget rather than spend Bitbucket's.
    pub rate_limit: Option<RateLimitSection>,
}

/// `kind = "app_password"`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AppPasswordSection {
    /// The Bitbucket username (not the email).
    pub username: String,
    /// The app password (a secret).
    pub password: SecretSpec,
    /// Check the credential against Bitbucket at start-up and every upstream.verify_interval.
    #[serde(default)]
    pub verify: bool,
    /// Refuse locally (429) beyond this budget rather than spend Bitbucket's.
    pub rate_limit: Option<RateLimitSection>,
}

impl CredentialSection {
    /// Deserialises a credential's keys (its table without `kind`) as the given kind's struct,
    /// only for the errors, which then carry the span of the offending key. `None` for an
    /// unknown kind.
    pub fn check_keys<'de, D: serde::Deserializer<'de>>(
        kind: &str,
        deserializer: D,
    ) -> Option<Result<(), D::Error>> {
        Some(match kind {
            "repository_access_token" => {
                RepositoryAccessTokenSection::deserialize(deserializer).map(drop)
            }
            "project_access_token" => {
                ProjectAccessTokenSection::deserialize(deserializer).map(drop)
            }
            "workspace_access_token" => {
                WorkspaceAccessTokenSection::deserialize(deserializer).map(drop)
            }
            "api_token" => ApiTokenSection::deserialize(deserializer).map(drop),
            "oauth_client_credentials" => {
                OauthClientCredentialsSection::deserialize(deserializer).map(drop)
            }
            "app_password" => AppPasswordSection::deserialize(deserializer).map(drop),
            _ => return None,
        })
    }

    pub fn verify(&self) -> bool {
        match self {
            CredentialSection::RepositoryAccessToken(section) => section.verify,
            CredentialSection::ProjectAccessToken(section) => section.verify,
            CredentialSection::WorkspaceAccessToken(section) => section.verify,
            CredentialSection::ApiToken(section) => section.verify,
            CredentialSection::OauthClientCredentials(section) => section.verify,
            CredentialSection::AppPassword(section) => section.verify,
        }
    }

    pub fn rate_limit(&self) -> Option<&RateLimitSection> {
        match self {
            CredentialSection::RepositoryAccessToken(section) => section.rate_limit.as_ref(),
            CredentialSection::ProjectAccessToken(section) => section.rate_limit.as_ref(),
            CredentialSection::WorkspaceAccessToken(section) => section.rate_limit.as_ref(),
            CredentialSection::ApiToken(section) => section.rate_limit.as_ref(),
            CredentialSection::OauthClientCredentials(section) => section.rate_limit.as_ref(),
            CredentialSection::AppPassword(section) => section.rate_limit.as_ref(),
        }
    }
}

/// `rate_limit = { per_hour = 1000, burst = 50, max_wait = "5s" }`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSection {
    /// Requests per rolling hour.
    pub per_hour: u32,
    /// Requests that may go back to back. Default: 10, or per_hour if smaller.
    pub burst: Option<u32>,
    /// How long a request may wait for the governor before its 429. Default: "0s".
    pub max_wait: Option<DurationText>,
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
    /// Share one upstream request among identical GET/HEAD requests in flight. Default: true.
    pub coalesce: Option<bool>,
    /// Response caching for this route (microcaching, stale_if_error, immutable resources).
    pub cache: Option<RouteCacheSection>,
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

/// `[store]`: the Redis server replicas share budgets and cool-downs through.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// "redis://host[:port][/db]" or "rediss://..." (TLS).
    pub url: String,
    /// PEM file of CA certificates for rediss://, added to the built-in roots.
    pub ca_file: Option<PathBuf>,
    /// The Redis ACL user name (with `password`).
    pub username: Option<String>,
    /// The Redis password (a secret).
    pub password: Option<SecretSpec>,
    /// Prefix of every key the proxy writes. Default: "bbap:".
    pub prefix: Option<String>,
    /// Longest wait for one store call. Default: "50ms".
    pub timeout: Option<DurationText>,
    /// "local" (fall back to in-process budgets) or "refuse" (503). Default: "local".
    pub on_error: Option<String>,
}
