use std::path::Path;

use super::*;
use crate::bitbucket::credentials::CredentialKind;

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(Path::new("/etc/bbap/test.toml"), text)
}

fn messages(text: &str) -> Vec<String> {
    let error = load(text).expect_err("config should be refused");
    error.to_string().lines().map(str::to_owned).collect()
}

const VALID: &str = r#"
[server]
listen = ["127.0.0.1:0"]

[credentials.widgets-ci]
kind = "repository_access_token"
repository = "acme/widgets"
token = { value = "repo-token" }

[credentials.release-bot]
kind = "api_token"
email = "release-bot@acme.example"
token = { value = "api-token" }

[[routes]]
prefix = "/2.0/repositories/acme/widgets"
credential = "widgets-ci"
methods = ["get", "HEAD"]

[[routes]]
prefix = "/release"
upstream_prefix = "/2.0/repositories/acme"
credential = "release-bot"

[[routes]]
prefix = "/git/acme/widgets.git"
upstream = "git"
upstream_prefix = "/acme/widgets.git"
credential = "widgets-ci"
"#;

#[test]
fn valid_config_has_defaults_and_routes() {
    let config = load(VALID).unwrap();
    assert_eq!(config.upstream.api.text, "https://api.bitbucket.org");
    assert_eq!(config.upstream.git.text, "https://bitbucket.org");
    assert_eq!(config.upstream.timeout, DEFAULT_TIMEOUT);
    assert_eq!(config.server.allowed_clients.len(), 2);
    assert_eq!(config.routes.len(), 3);
    let widgets = route_table(&config)
        .route("/2.0/repositories/acme/widgets/src")
        .unwrap()
        .unwrap()
        .clone();
    assert_eq!(
        widgets.methods.as_deref(),
        Some(&[http::Method::GET, http::Method::HEAD][..])
    );
    assert_eq!(widgets.allow_header.as_ref().unwrap(), "GET, HEAD");
    assert_eq!(
        widgets.credential.kind,
        CredentialKind::RepositoryAccessToken
    );
    // Two inline secrets, each warned about.
    assert_eq!(
        config
            .warnings
            .iter()
            .filter(|w| w.contains("written in the config file"))
            .count(),
        2
    );
    let table = describe_routes(&config);
    let release_row: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("/release"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        release_row,
        [
            "/release",
            "https://api.bitbucket.org/2.0/repositories/acme",
            "release-bot",
            "api_token",
            "any"
        ]
    );
    assert!(!table.contains("repo-token") && !table.contains("api-token"));
}

#[test]
fn unknown_key_names_key_and_line() {
    let text = VALID.replace("methods = [\"get\", \"HEAD\"]", "method = [\"GET\"]");
    let lines = messages(&text);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("/etc/bbap/test.toml"), "{lines:?}");
    assert!(lines[0].contains("line 18"), "{lines:?}");
    assert!(lines[0].contains("unknown field `method`"), "{lines:?}");
}

#[test]
fn unknown_credential_kind_lists_valid_kinds() {
    let lines = messages(
        r#"
[credentials.x]
kind = "bearer"
token = { value = "t" }
"#,
    );
    assert!(lines[0].contains("unknown variant `bearer`"), "{lines:?}");
    assert!(lines[0].contains("api_token"), "{lines:?}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let lines = messages(
        r#"
[server]
listen = ["localhost"]
allowed_clients = ["10.0.0.0/33"]
public_url = "ftp://proxy"

[upstream]
api_url = "http://api.bitbucket.org"
timeout = "soon"
ca_file = "does-not-exist.pem"

[credentials.widgets-ci]
kind = "repository_access_token"
repository = "acme/widgets"
token = { file = "/nonexistent/secret", env = "X" }

[credentials.apps]
kind = "api_token"
email = "release-bot"
token = { value = "t" }

[credentials.ws]
kind = "workspace_access_token"
workspace = "acme"
token = { value = "t" }

[[routes]]
prefix = "2.0/x"
credential = "nobody"

[[routes]]
prefix = "/2.0/repositories/acme/gadgets"
credential = "ws"
methods = ["GET", "FETCH IT"]

[[routes]]
prefix = "/2.0/repositories/acme/gadgets"
credential = "ws"
upstream = "svn"

[[routes]]
prefix = "/2.0/repositories/acme/../x/"
credential = "ws"
"#,
    );
    let expect = [
        "server.listen[0]: `localhost` is not an IP:port",
        "server.allowed_clients[0]: `10.0.0.0/33` is not a CIDR block",
        "server.public_url: `ftp://proxy` must start with https:// or http://",
        "upstream.api_url: `http://api.bitbucket.org` must use https://",
        "upstream.timeout: `soon` is not a positive duration",
        "upstream.ca_file: cannot read /etc/bbap/does-not-exist.pem",
        "credentials.widgets-ci.token: give exactly one of `env`, `file` or `value`",
        "credentials.apps.email: `release-bot` is not an email address",
        "routes[0].prefix: `2.0/x` must start with '/'",
        "routes[0].credential: `nobody` is not a defined credential (defined: apps, widgets-ci, ws)",
        "routes[1].methods: `FETCH IT` is not an HTTP method",
        "routes[2].prefix: `/2.0/repositories/acme/gadgets` is already used by another route",
        "routes[2].upstream: `svn` is not an upstream (valid: \"api\", \"git\")",
        "routes[3].prefix: `/2.0/repositories/acme/../x/` must not end with '/'",
    ];
    for expected in expect {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("/etc/bbap/test.toml: ") && l.contains(expected)),
            "missing {expected:?} in\n{}",
            lines.join("\n")
        );
    }
    assert_eq!(lines.len(), expect.len(), "{}", lines.join("\n"));
}

#[test]
fn token_scoped_to_a_resource_cannot_route_outside_it() {
    let lines = messages(
        r#"
[credentials.widgets-ci]
kind = "repository_access_token"
repository = "acme/widgets"
token = { value = "t" }

[credentials.acme-web]
kind = "project_access_token"
workspace = "acme"
project = "WEB"
token = { value = "t" }

[[routes]]
prefix = "/2.0/repositories/acme/gadgets"
credential = "widgets-ci"

[[routes]]
prefix = "/git/other"
upstream = "git"
upstream_prefix = "/other"
credential = "acme-web"

[[routes]]
prefix = "/2.0/repositories/acme/widgets"
credential = "widgets-ci"

[[routes]]
prefix = "/2.0/workspaces/acme/projects/WEB"
credential = "acme-web"
"#,
    );
    assert_eq!(lines.len(), 2, "{}", lines.join("\n"));
    assert!(lines[0].contains("routes[0].credential: `widgets-ci` is a repository_access_token for repository acme/widgets"));
    assert!(lines[0].contains("outside that repository"));
    assert!(lines[1].contains("routes[1].credential: `acme-web` is a project_access_token"));
}

#[test]
fn scope_checks_compare_names_as_routing_does() {
    let lines = messages(
        r#"
[credentials.widgets-ci]
kind = "repository_access_token"
repository = "Acme/Widgets"
token = { value = "t" }

[credentials.acme-web]
kind = "project_access_token"
workspace = "acme"
project = "WEB"
token = { value = "t" }

[[routes]]
prefix = "/2.0/repositories/acme/widgets"
credential = "widgets-ci"

[[routes]]
prefix = "/git/acme/widgets"
upstream = "git"
upstream_prefix = "/ACME/widgets.git"
credential = "widgets-ci"

[[routes]]
prefix = "/2.0/workspaces/acme/projects/web"
credential = "acme-web"

[[routes]]
prefix = "/2.0/workspaces/acme/projects/OPS"
credential = "acme-web"
"#,
    );
    assert_eq!(lines.len(), 1, "{}", lines.join("\n"));
    assert!(
        lines[0].contains("routes[3].credential: `acme-web` is a project_access_token"),
        "{}",
        lines[0]
    );
}

#[test]
fn prefixes_naming_the_same_place_are_refused() {
    let lines = messages(
        r#"
[credentials.widgets-ci]
kind = "repository_access_token"
repository = "acme/widgets"
token = { value = "t" }

[[routes]]
prefix = "/2.0/repositories/acme/widgets"
credential = "widgets-ci"

[[routes]]
prefix = "/2.0/repositories/ACME/Widgets"
credential = "widgets-ci"

[[routes]]
prefix = "/git/acme/widgets.git"
upstream = "git"
upstream_prefix = "/acme/widgets.git"
credential = "widgets-ci"

[[routes]]
prefix = "/git/acme/widgets"
upstream = "git"
upstream_prefix = "/acme/widgets"
credential = "widgets-ci"

[[routes]]
prefix = "/git/acme/Widgets-2"
upstream = "git"
upstream_prefix = "/acme/widgets"
credential = "widgets-ci"
"#,
    );
    assert_eq!(lines.len(), 2, "{}", lines.join("\n"));
    assert!(
        lines[0].contains("routes[1].prefix: `/2.0/repositories/ACME/Widgets` names the same place as route `/2.0/repositories/acme/widgets`"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains("routes[3].prefix: `/git/acme/widgets` names the same place as route `/git/acme/widgets.git`"),
        "{}",
        lines[1]
    );
}

#[test]
fn app_password_is_accepted_with_a_deprecation_warning() {
    let config = load(
        r#"
[credentials.legacy]
kind = "app_password"
username = "acme-legacy-bot"
password = { value = "p" }

[[routes]]
prefix = "/"
credential = "legacy"
"#,
    )
    .unwrap();
    assert!(
        config
            .warnings
            .iter()
            .any(|w| w.contains("2026-07-28") && w.contains("api_token"))
    );
}

#[test]
fn missing_env_vars_are_reported_as_such() {
    let error = load(
        r#"
[credentials.a]
kind = "workspace_access_token"
workspace = "acme"
token = { env = "BBAP_CONFIG_TEST_UNSET_A" }

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "a"
"#,
    )
    .unwrap_err();
    assert_eq!(
        error.only_missing_env(),
        Some(vec!["BBAP_CONFIG_TEST_UNSET_A"])
    );
}

#[test]
fn loopback_upstreams_may_use_plain_http_and_default_ports_are_dropped() {
    let config = load(
        r#"
[upstream]
api_url = "http://127.0.0.1:9999"
git_url = "https://bitbucket.org:443/"

[credentials.a]
kind = "api_token"
email = "a@b.example"
token = { value = "t" }

[[routes]]
prefix = "/"
credential = "a"
"#,
    )
    .unwrap();
    assert_eq!(config.upstream.api.text, "http://127.0.0.1:9999");
    assert_eq!(config.upstream.git.text, "https://bitbucket.org");
}

#[test]
fn relative_secret_files_resolve_against_the_config_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "from-file\n").unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        r#"
[credentials.a]
kind = "workspace_access_token"
workspace = "acme"
token = { file = "token" }

[[routes]]
prefix = "/2.0/workspaces/acme"
credential = "a"
"#,
    )
    .unwrap();
    let config = Config::load(&path).unwrap();
    let route = route_table(&config)
        .route("/2.0/workspaces/acme")
        .unwrap()
        .unwrap()
        .clone();
    assert_eq!(
        route
            .credential
            .static_authorization(crate::bitbucket::credentials::UpstreamKind::Api)
            .unwrap(),
        "Bearer from-file"
    );
}

#[test]
fn oauth_rate_limit_and_egress_keys_are_validated() {
    let lines = messages(
        r#"
[upstream]
proxy = "https://egress.corp:3128"
proxy_username = "ci"

[credentials.consumer]
kind = "oauth_client_credentials"
client_id = "Ab:Cd"
client_secret = { value = "s" }
token_url = "http://bitbucket.org/site/oauth2/access_token"
rate_limit = { per_hour = 0 }

[credentials.ws]
kind = "workspace_access_token"
workspace = "acme"
token = { value = "t" }
rate_limit = { per_hour = 10, burst = 11 }

[credentials.slow]
kind = "workspace_access_token"
workspace = "acme"
token = { value = "t" }
rate_limit = { per_hour = 10, max_wait = "2m" }

[credentials.odd]
kind = "workspace_access_token"
workspace = "acme"
token = { value = "t" }
rate_limit = { per_hour = 10, max_wait = "soon" }

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "ws"
"#,
    );
    let expect = [
        "upstream.proxy: `https://egress.corp:3128` must be an http:// proxy",
        "credentials.consumer.client_id: must not contain ':'",
        "credentials.consumer.token_url: `http://bitbucket.org/site/oauth2/access_token` must use https://",
        "credentials.consumer.rate_limit.per_hour: must be at least 1",
        "credentials.ws.rate_limit.burst: must be between 1 and per_hour (10)",
        "credentials.slow.rate_limit.max_wait: `2m` is not a duration between \"0s\" and \"1m\"",
        "credentials.odd.rate_limit.max_wait: `soon` is not a duration",
    ];
    for expected in expect {
        assert!(
            lines.iter().any(|l| l.contains(expected)),
            "missing {expected:?} in\n{}",
            lines.join("\n")
        );
    }
    assert_eq!(lines.len(), expect.len(), "{}", lines.join("\n"));
}

#[test]
fn oauth_consumers_default_to_bitbuckets_token_endpoint() {
    let config = load(
        r#"
[credentials.consumer]
kind = "oauth_client_credentials"
client_id = "AbCdEf"
client_secret = { value = "s" }
rate_limit = { per_hour = 1000, burst = 50, max_wait = "2s" }

[[routes]]
prefix = "/2.0"
credential = "consumer"
"#,
    )
    .unwrap();
    let credential = &config.credentials[0];
    assert_eq!(credential.kind, CredentialKind::OauthClientCredentials);
    assert!(matches!(
        credential.auth,
        crate::bitbucket::credentials::CredentialAuth::OAuthConsumer { .. }
    ));
    assert_eq!(
        credential.rate_limit,
        Some(crate::bitbucket::rate_limit::RateLimit {
            per_hour: 1000,
            burst: 50,
            max_wait: std::time::Duration::from_secs(2),
        })
    );
}

#[test]
fn trace_and_track_cannot_be_allowed_on_a_route() {
    for method in ["TRACE", "track", "CONNECT"] {
        let text = VALID.replacen(
            r#"methods = ["get", "HEAD"]"#,
            &format!(r#"methods = ["GET", "{method}"]"#),
            1,
        );
        let messages = messages(&text);
        assert!(
            messages.iter().any(|m| m.contains(&format!(
                "routes[0].methods: `{method}` is not an HTTP method the proxy forwards"
            ))),
            "{messages:?}"
        );
    }
}

/// A duration of centuries overflowed `Instant + Duration` (a panic on the first request).
#[test]
fn durations_past_a_year_are_refused_not_overflowed() {
    let text = format!("{VALID}\n[upstream]\ntimeout = \"500000000years\"\n");
    let text = text.replacen("[server]", "[server]\nshutdown_grace = \"366days\"", 1);
    let messages = messages(&text);
    for expected in [
        "upstream.timeout: `500000000years` is longer than the longest duration accepted, 365 days",
        "server.shutdown_grace: `366days` is longer than the longest duration accepted, 365 days",
    ] {
        assert!(
            messages.iter().any(|m| m.contains(expected)),
            "{expected}: {messages:?}"
        );
    }
    let text = VALID.replacen("[server]", "[server]\nshutdown_grace = \"365days\"", 1);
    assert!(load(&text).is_ok());
}

#[test]
fn max_concurrent_streams_defaults_well_under_hypers_200_and_refuses_zero() {
    let config = load(VALID).unwrap();
    assert_eq!(config.server.max_concurrent_streams, 32);
    let text = VALID.replace(
        "listen = [\"127.0.0.1:0\"]",
        "listen = [\"127.0.0.1:0\"]\nmax_concurrent_streams = 0",
    );
    let lines = messages(&text);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("server.max_concurrent_streams: must be at least 1")),
        "{}",
        lines.join("\n")
    );
    let text = VALID.replace(
        "listen = [\"127.0.0.1:0\"]",
        "listen = [\"127.0.0.1:0\"]\nmax_concurrent_streams = 8",
    );
    assert_eq!(load(&text).unwrap().server.max_concurrent_streams, 8);
}

/// The live route table a generation would build from `config`.
fn route_table(config: &Config) -> crate::routing::RouteTable {
    crate::routing::RouteTable::from_config(config)
}
