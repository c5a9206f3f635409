//! The routing invariant on arbitrary request paths: a credential only with the route that
//! Bitbucket's canonical spelling of the path belongs to (names in any case, git repositories
//! with or without `.git`; as sent, decoded once and twice), a `{UUID}` that may name a narrower
//! route's resource refused, and a forwarded path that stays inside the route's
//! `upstream_prefix` however the upstream decodes it or removes dot-segments.
//! See `bitbucket_auth_proxy::routing::invariant::check_route`.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use bitbucket_auth_proxy::Config;
use bitbucket_auth_proxy::routing::RouteTable;
use bitbucket_auth_proxy::routing::invariant::check_route;
use libfuzzer_sys::fuzz_target;

const CREDENTIALS: &str = r#"
[credentials.widgets-ci]
kind = "repository_access_token"
repository = "acme/widgets"
token = { value = "repo-token" }

[credentials.acme-all]
kind = "workspace_access_token"
workspace = "acme"
token = { value = "workspace-token" }

[credentials.acme-web]
kind = "project_access_token"
workspace = "acme"
project = "WEB"
token = { value = "project-token" }

[credentials.release-bot]
kind = "api_token"
email = "bot@acme.example"
token = { value = "api-token" }
"#;

/// Nested routes with a narrower method list, aliases, a project and git routes: the shape of
/// docs/configuration.md's routing example, with a narrower route under each kind of name.
const NESTED: &str = r#"
[[routes]]
prefix = "/2.0/repositories/acme/widgets"
credential = "widgets-ci"
methods = ["GET", "HEAD"]

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "acme-all"

[[routes]]
prefix = "/release"
upstream_prefix = "/2.0/repositories/acme"
credential = "release-bot"

[[routes]]
prefix = "/all"
upstream_prefix = "/2.0/repositories/acme"
credential = "acme-all"

[[routes]]
prefix = "/all/widgets"
upstream_prefix = "/2.0/repositories/acme/widgets"
credential = "widgets-ci"
methods = ["GET"]

[[routes]]
prefix = "/2.0/workspaces/acme"
credential = "acme-all"

[[routes]]
prefix = "/2.0/workspaces/acme/projects/WEB"
credential = "acme-web"
methods = ["GET"]

[[routes]]
prefix = "/git/acme"
upstream = "git"
upstream_prefix = "/acme"
credential = "acme-all"

[[routes]]
prefix = "/git/acme/widgets.git"
upstream = "git"
upstream_prefix = "/acme/widgets.git"
credential = "widgets-ci"
methods = ["GET"]
"#;

/// A catch-all alias: `/` onto an upstream sub-tree.
const ROOT: &str = r#"
[[routes]]
prefix = "/"
upstream_prefix = "/2.0/repositories/acme"
credential = "acme-all"
"#;

fn tables() -> &'static [RouteTable; 2] {
    static CONFIGS: OnceLock<[RouteTable; 2]> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let load = |routes: &str| {
            let text = format!("{CREDENTIALS}\n{routes}");
            let config = Config::from_toml(Path::new("fuzz.toml"), &text)
                .unwrap_or_else(|e| panic!("fuzz config is invalid: {e}"));
            RouteTable::from_config(&config)
        };
        [load(NESTED), load(ROOT)]
    })
}

fuzz_target!(|data: &[u8]| {
    // Request paths reach routing as `&str` (hyper's `Uri::path`); anything else cannot arrive.
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    for table in tables() {
        if let Err(violation) = check_route(table, path) {
            panic!("routing invariant broken: {violation}");
        }
    }
});
