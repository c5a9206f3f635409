//! The binary: `check`, `run`, `--version`, config errors, and that secrets never reach the logs.

mod support;

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::{Request, StatusCode};
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_bitbucket-auth-proxy");
const CONFIG_ENV: &str = "BITBUCKET_AUTH_PROXY_CONFIG";

const REPO_TOKEN: &str = "cli-repo-token-Q9wE3r";
const WORKSPACE_TOKEN: &str = "cli-workspace-token-Z7xC1v";
const API_EMAIL: &str = "release-bot@acme.example";
const API_TOKEN: &str = "ATATT-cli-api-token-M4nB8k";
const APP_USER: &str = "acme-legacy-bot";
const APP_PASSWORD: &str = "cli-app-password-P2oL6j";

/// The binary with a clean environment for what it reads (config path, log level).
fn bin() -> Command {
    let mut command = Command::new(BIN);
    command.env_remove(CONFIG_ENV).env_remove("RUST_LOG");
    command
}

fn output(command: &mut Command) -> (Output, String, String) {
    let output = command.output().expect("run the binary");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output, stdout, stderr)
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .expect("write file");
    path
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn basic(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

/// Every form in which one of this file's secrets could leak.
fn secret_forms() -> Vec<String> {
    let mut forms: Vec<String> = [REPO_TOKEN, WORKSPACE_TOKEN, API_TOKEN, APP_PASSWORD]
        .iter()
        .map(|s| s.to_string())
        .collect();
    forms.extend([
        basic("x-token-auth", REPO_TOKEN),
        basic("x-token-auth", WORKSPACE_TOKEN),
        basic(API_EMAIL, API_TOKEN),
        basic("x-bitbucket-api-token-auth", API_TOKEN),
        basic(APP_USER, APP_PASSWORD),
    ]);
    for secret in [REPO_TOKEN, WORKSPACE_TOKEN, API_TOKEN, APP_PASSWORD] {
        forms.push(base64::engine::general_purpose::STANDARD.encode(secret));
    }
    forms
}

fn assert_no_secret(what: &str, text: &str) {
    for form in secret_forms() {
        assert!(
            !text.contains(&form),
            "{what} contains the secret form {form:?}:\n{text}"
        );
    }
}

/// A config with one credential of each kind but project tokens, secrets from a file, the
/// environment (`BBAP_CLI_API_TOKEN`, set per child process) and inline values. `server` and
/// `upstream` are extra lines for those sections.
fn full_config(dir: &Path, server: &str, upstream: &str, api_url: &str, git_url: &str) -> PathBuf {
    write(dir, "repo.token", &format!("{REPO_TOKEN}\n"));
    let text = format!(
        r#"[server]
{server}

[upstream]
api_url = {api_url}
git_url = {git_url}
{upstream}

[credentials.widgets-ci]
kind = "repository_access_token"
repository = "acme/widgets"
token = {{ file = "repo.token" }}

[credentials.acme-all]
kind = "workspace_access_token"
workspace = "acme"
token = {{ value = "{WORKSPACE_TOKEN}" }}

[credentials.release-bot]
kind = "api_token"
email = "{API_EMAIL}"
token = {{ env = "BBAP_CLI_API_TOKEN" }}

[credentials.legacy-bot]
kind = "app_password"
username = "{APP_USER}"
password = {{ value = "{APP_PASSWORD}" }}

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
prefix = "/legacy"
credential = "legacy-bot"

[[routes]]
prefix = "/git/acme/widgets.git"
upstream = "git"
upstream_prefix = "/acme/widgets.git"
credential = "widgets-ci"
"#,
        api_url = toml_string(api_url),
        git_url = toml_string(git_url),
    );
    write(dir, "proxy.toml", &text)
}

/// The row of `check`'s route table whose first column is `prefix`, split into columns.
fn route_row<'a>(table: &'a str, prefix: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&prefix))
        .unwrap_or_else(|| panic!("no row for {prefix} in:\n{table}"))
}

// ---------------------------------------------------------------------------
// check
// ---------------------------------------------------------------------------

#[test]
fn check_on_a_valid_config_prints_the_route_table_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let config = full_config(
        dir.path(),
        "",
        "",
        "https://api.bitbucket.org",
        "https://bitbucket.org",
    );
    let (out, stdout, stderr) = output(
        bin()
            .arg("check")
            .arg("--config")
            .arg(&config)
            .env("BBAP_CLI_API_TOKEN", API_TOKEN),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let expected = [
        (
            "/2.0/repositories/acme/widgets",
            "https://api.bitbucket.org/2.0/repositories/acme/widgets",
            "widgets-ci",
            "repository_access_token",
            "GET,HEAD",
        ),
        (
            "/2.0/repositories/acme",
            "https://api.bitbucket.org/2.0/repositories/acme",
            "acme-all",
            "workspace_access_token",
            "any",
        ),
        (
            "/release",
            "https://api.bitbucket.org/2.0/repositories/acme",
            "release-bot",
            "api_token",
            "any",
        ),
        (
            "/legacy",
            "https://api.bitbucket.org/legacy",
            "legacy-bot",
            "app_password",
            "any",
        ),
        (
            "/git/acme/widgets.git",
            "https://bitbucket.org/acme/widgets.git",
            "widgets-ci",
            "repository_access_token",
            "any",
        ),
    ];
    for (prefix, upstream, credential, kind, methods) in expected {
        assert_eq!(
            route_row(&stdout, prefix),
            [prefix, upstream, credential, kind, methods],
            "{stdout}"
        );
    }
    // App passwords are accepted with a pointer to API tokens.
    assert!(stderr.contains("2026-07-28"), "{stderr}");
    assert!(stderr.contains("api_token"), "{stderr}");
    assert_no_secret("check stdout", &stdout);
    assert_no_secret("check stderr", &stderr);
}

#[test]
fn config_path_can_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let config = full_config(
        dir.path(),
        "",
        "",
        "https://api.bitbucket.org",
        "https://bitbucket.org",
    );
    let (out, stdout, stderr) = output(
        bin()
            .arg("check")
            .env(CONFIG_ENV, &config)
            .env("BBAP_CLI_API_TOKEN", API_TOKEN),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(route_row(&stdout, "/release")[2], "release-bot");

    // Neither: a clear error, not a panic.
    let (out, _, stderr) = output(bin().arg("check"));
    assert!(!out.status.success());
    assert!(stderr.contains(CONFIG_ENV), "{stderr}");
}

#[test]
fn version_flag_prints_the_version() {
    let (out, stdout, stderr) = output(bin().arg("--version"));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stdout.trim(),
        format!("bitbucket-auth-proxy {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "typo.toml",
        r#"[server]
listen = ["127.0.0.1:8080"]

[upstream]
api_url = "https://api.bitbucket.org"
tiemout = "5s"
"#,
    );
    let (out, stdout, stderr) = output(bin().arg("check").arg("--config").arg(&config));
    assert!(!out.status.success(), "{stdout}");
    assert!(stderr.contains("tiemout"), "{stderr}");
    assert!(stderr.contains("line 6"), "{stderr}");
    assert!(stderr.contains(&config.display().to_string()), "{stderr}");
}

const CREDENTIAL_TYPO: &str = r#"[credentials.acme]
kind = "workspace_access_token"
workspace = "acme"
tokn = { value = "x" }

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "acme"
"#;

#[test]
fn unknown_key_inside_a_credential_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), "typo.toml", CREDENTIAL_TYPO);
    let (out, stdout, stderr) = output(bin().arg("check").arg("--config").arg(&config));
    assert!(!out.status.success(), "{stdout}");
    assert!(stderr.contains("unknown field `tokn`"), "{stderr}");
    assert!(stderr.contains(&config.display().to_string()), "{stderr}");
}

/// Credential tables are a tagged enum that serde reads whole; the line must still be the key's,
/// also for a typo inside a secret's inline table.
#[test]
fn unknown_key_inside_a_credential_reports_the_key_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), "typo.toml", CREDENTIAL_TYPO);
    let (out, _, stderr) = output(bin().arg("check").arg("--config").arg(&config));
    assert!(!out.status.success());
    assert!(stderr.contains("line 4"), "{stderr}");
    let nested = write(
        dir.path(),
        "nested.toml",
        &CREDENTIAL_TYPO.replace("tokn = { value = \"x\" }", "token = { envv = \"X\" }"),
    );
    let (out, _, stderr) = output(bin().arg("check").arg("--config").arg(&nested));
    assert!(!out.status.success());
    assert!(
        stderr.contains("line 4") && stderr.contains("`envv`"),
        "{stderr}"
    );
}

#[test]
fn invalid_config_reports_every_error_at_once_with_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "bad.toml",
        &format!(
            r#"[server]
allowed_clients = ["127.0.0.1/32", "10.0.0.0/33"]

[upstream]
timeout = "soon"

[credentials.widgets-ci]
kind = "repository_access_token"
repository = "acme/widgets"
token = {{ value = "{REPO_TOKEN}" }}

[credentials.acme-all]
kind = "workspace_access_token"
workspace = "acme"
token = {{ value = "{WORKSPACE_TOKEN}" }}

[[routes]]
prefix = "/2.0/repositories/acme/widgets"
credential = "widgets-cl"

[[routes]]
prefix = "/2.0/repositories/acme/gadgets"
credential = "widgets-ci"

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "acme-all"

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "acme-all"
"#
        ),
    );
    let (out, stdout, stderr) = output(bin().arg("check").arg("--config").arg(&config));
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(
        !stdout.contains("PREFIX"),
        "a route table for a broken config:\n{stdout}"
    );
    let file = config.display().to_string();
    // (key, something the message must say)
    let expected = [
        ("server.allowed_clients[1]", "10.0.0.0/33"),
        ("upstream.timeout", "soon"),
        ("routes[0].credential", "widgets-cl"),
        ("routes[1].credential", "/2.0/repositories/acme/gadgets"),
        ("routes[3].prefix", "already used"),
    ];
    for (key, detail) in expected {
        let line = stderr
            .lines()
            .find(|line| line.contains(&format!(": {key}: ")))
            .unwrap_or_else(|| panic!("no error for {key}:\n{stderr}"));
        assert!(line.contains(&file), "{line}");
        assert!(line.contains(detail), "{line}");
    }
    assert!(stderr.lines().count() >= expected.len(), "{stderr}");
    assert_no_secret("check stderr", &stderr);
}

/// One workspace token on one route, the token given as `token` (an inline TOML table).
fn minimal_config(dir: &Path, token: &str) -> PathBuf {
    write(
        dir,
        "minimal.toml",
        &format!(
            r#"[credentials.acme]
kind = "workspace_access_token"
workspace = "acme"
token = {token}

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "acme"
"#
        ),
    )
}

#[test]
fn missing_secret_env_var_gives_one_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = minimal_config(dir.path(), r#"{ env = "BBAP_CLI_SURELY_UNSET_TOKEN" }"#);
    for command in ["check", "run"] {
        let (out, stdout, stderr) = output(
            bin()
                .arg(command)
                .arg("--config")
                .arg(&config)
                .env_remove("BBAP_CLI_SURELY_UNSET_TOKEN"),
        );
        assert!(!out.status.success(), "{command}: {stdout}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{command}: {stderr}");
        assert!(
            lines[0].contains("BBAP_CLI_SURELY_UNSET_TOKEN"),
            "{command}: {stderr}"
        );
    }
}

#[test]
fn a_bad_worker_thread_count_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let config = minimal_config(dir.path(), r#"{ value = "not-a-real-token" }"#);
    for bad in ["0", "two"] {
        let (out, stdout, stderr) = output(
            bin()
                .arg("run")
                .arg("--config")
                .arg(&config)
                .env("TOKIO_WORKER_THREADS", bad),
        );
        assert_eq!(out.status.code(), Some(2), "{bad}: {stdout}{stderr}");
        assert!(!stderr.contains("panicked"), "{bad}: {stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "{bad}: {stderr}");
        assert!(
            errors[0].contains("TOKIO_WORKER_THREADS") && errors[0].contains("1 or more"),
            "{bad}: {stderr}"
        );
    }
}

// ---------------------------------------------------------------------------
// The shipped configs
// ---------------------------------------------------------------------------

const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config");

/// README's first command runs `config/example.toml`; the Docker image runs `container.toml`.
#[test]
fn shipped_configs_pass_check() {
    for name in ["example.toml", "minimal.toml", "container.toml"] {
        let (out, stdout, stderr) = output(
            bin()
                .arg("check")
                .arg("--config")
                .arg(format!("{SHIPPED}/{name}"))
                .env("BITBUCKET_TOKEN", "shipped-config-token"),
        );
        assert!(out.status.success(), "{name}:\n{stdout}{stderr}");
    }
}

/// The keys of one README table: the first cell of each row, between backticks.
fn documented_keys(readme: &str, heading: &str) -> Vec<String> {
    let section = readme
        .split_once(heading)
        .unwrap_or_else(|| panic!("README has no {heading}"))
        .1;
    let end = section.find("\n#").unwrap_or(section.len());
    section[..end]
        .lines()
        .filter_map(|line| line.strip_prefix("| `")?.split_once('`'))
        .map(|(key, _)| key.to_owned())
        .collect()
}

/// `config/example.toml` is where the README sends readers for "every key".
#[test]
fn example_config_shows_every_documented_key() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let example = std::fs::read_to_string(format!("{SHIPPED}/example.toml")).unwrap();
    let shown = |key: &str| {
        example.lines().any(|line| {
            let line = line.trim_start_matches(['#', ' ']);
            line.starts_with(&format!("{key} ="))
        })
    };
    let mut checked = 0;
    for heading in [
        "### `[server]`",
        "### `[upstream]`",
        "### `[[routes]]`",
        "### `[store]`",
    ] {
        let keys = documented_keys(&readme, heading);
        assert!(keys.len() >= 4, "{heading}: {keys:?}");
        for key in keys {
            assert!(
                shown(&key),
                "{heading} documents `{key}`; config/example.toml lacks it"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 20,
        "only {checked} keys found in the README tables"
    );
}

// ---------------------------------------------------------------------------
// run: secrets never in the logs
// ---------------------------------------------------------------------------

/// A port that was free a moment ago (the binary must be told a fixed port to be reachable).
fn free_port() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn run_with_trace_logging_never_logs_a_secret_and_stops_cleanly_on_sigterm() {
    let pki = TestPki::new();
    let api = MockUpstream::start_simple(pki.server_config(), |head| {
        http::Response::new(http_body_util::Full::from(format!(
            "{} {}",
            head.method, head.uri
        )))
    });
    let git_down = format!("https://{}", closed_port());
    let listen = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = full_config(
        dir.path(),
        &format!("listen = [\"{listen}\"]"),
        &format!(
            "ca_file = {}",
            toml_string(&pki.ca_path().display().to_string())
        ),
        &api.base_url(),
        &git_down,
    );

    // kill_on_drop: a failing assertion does not leave the proxy running.
    let mut child = tokio::process::Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .arg("--log-format")
        .arg("json")
        .env_remove(CONFIG_ENV)
        .env("RUST_LOG", "trace")
        .env("BBAP_CLI_API_TOKEN", API_TOKEN)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the proxy");
    let pid = child.id().expect("pid");
    // Drain both pipes as the child writes, so trace logging never blocks on a full pipe.
    let stderr = tokio::spawn(read_all(child.stderr.take().unwrap()));
    let stdout = tokio::spawn(read_all(child.stdout.take().unwrap()));

    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(listen).await.is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            let log = stderr.await.unwrap();
            panic!("the proxy exited with {status} before listening:\n{log}");
        }
        assert!(
            Instant::now() < deadline,
            "the proxy never listened on {listen}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // (method, target, status); every request on its own connection, closed afterwards.
    let requests = [
        ("GET", "/2.0/repositories/acme/widgets/src?at=main", 200),
        ("GET", "/release/widgets/commits", 200),
        ("GET", "/legacy/user", 200),
        ("PUT", "/2.0/repositories/acme/gadgets", 200),
        ("GET", "/2.0/snippets", 404),
        ("POST", "/2.0/repositories/acme/widgets/pullrequests", 405),
        ("GET", "/git/acme/widgets.git/info/refs", 502),
    ];
    for (method, target, status) in requests {
        let request = Request::builder()
            .method(method)
            .uri(target)
            .header("connection", "close")
            .header("authorization", "Basic Y2xpZW50OmNsaWVudA==")
            .body(full_body("payload"))
            .unwrap();
        let response = send(listen, request).await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::from_u16(status).unwrap(),
            "{method} {target}"
        );
        drain_body(response.into_body()).await;
    }
    assert_eq!(api.request_count(), 4);

    let killed = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("the proxy did not exit after SIGTERM")
        .unwrap();
    let log = stderr.await.unwrap();
    let out = stdout.await.unwrap();
    assert!(
        status.success(),
        "exit status {status} after SIGTERM:\n{log}"
    );

    assert!(
        log.contains("\"level\":\"TRACE\""),
        "not logging at trace level:\n{log}"
    );
    assert_no_secret("stderr", &log);
    assert_no_secret("stdout", &out);
    assert!(
        !log.contains("Y2xpZW50OmNsaWVudA=="),
        "the client's Authorization was logged"
    );

    // One access line per request, with method, path (no query), route, credential, status.
    let access: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["target"] == "access")
        .collect();
    let expect_line =
        |method: &str, path: &str, route: Option<&str>, credential: Option<&str>, status: u64| {
            let found = access
                .iter()
                .find(|line| line["method"] == method && line["path"] == path);
            let line =
                found.unwrap_or_else(|| panic!("no access line for {method} {path}:\n{log}"));
            assert_eq!(line["status"], status, "{line}");
            assert_eq!(line["route"].as_str(), route, "{line}");
            assert_eq!(line["credential"].as_str(), credential, "{line}");
            assert!(line["duration_ms"].is_number(), "{line}");
        };
    expect_line(
        "GET",
        "/2.0/repositories/acme/widgets/src",
        Some("/2.0/repositories/acme/widgets"),
        Some("widgets-ci"),
        200,
    );
    expect_line(
        "GET",
        "/release/widgets/commits",
        Some("/release"),
        Some("release-bot"),
        200,
    );
    expect_line(
        "GET",
        "/legacy/user",
        Some("/legacy"),
        Some("legacy-bot"),
        200,
    );
    expect_line(
        "PUT",
        "/2.0/repositories/acme/gadgets",
        Some("/2.0/repositories/acme"),
        Some("acme-all"),
        200,
    );
    expect_line("GET", "/2.0/snippets", None, None, 404);
    expect_line(
        "POST",
        "/2.0/repositories/acme/widgets/pullrequests",
        Some("/2.0/repositories/acme/widgets"),
        Some("widgets-ci"),
        405,
    );
    expect_line(
        "GET",
        "/git/acme/widgets.git/info/refs",
        Some("/git/acme/widgets.git"),
        Some("widgets-ci"),
        502,
    );
    assert_eq!(access.len(), requests.len(), "{log}");
}

async fn read_all<R: tokio::io::AsyncRead + Unpin>(mut reader: R) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let _ = reader.read_to_end(&mut buf).await;
    String::from_utf8_lossy(&buf).into_owned()
}
