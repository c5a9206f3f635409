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

/// `0.1.0 (abc1234 2026-12-01)` when built from a git checkout (as this test is), else `0.1.0`.
#[test]
fn version_flag_names_the_commit_it_was_built_from() {
    let (out, stdout, stderr) = output(bin().arg("--version"));
    assert!(out.status.success(), "{stderr}");
    let head = Command::new("git")
        .args(["log", "-1", "--format=%h %cs", "--abbrev=7"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let expected = match head {
        Some(head) => format!(
            "bitbucket-auth-proxy {} ({head})",
            env!("CARGO_PKG_VERSION")
        ),
        None => format!("bitbucket-auth-proxy {}", env!("CARGO_PKG_VERSION")),
    };
    assert_eq!(stdout.trim(), expected);
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

/// Issue 13: a secret file anyone in the group can write, or one over 64 KiB, is refused.
#[test]
fn check_refuses_writable_and_oversized_secret_files() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let config = minimal_config(dir.path(), r#"{ file = "acme.token" }"#);
    let token = write(dir.path(), "acme.token", WORKSPACE_TOKEN);
    let chmod = |mode| std::fs::set_permissions(&token, std::fs::Permissions::from_mode(mode));
    chmod(0o600).unwrap();
    let (out, stdout, stderr) = output(bin().arg("check").arg("--config").arg(&config));
    assert!(out.status.success(), "{stdout}{stderr}");

    chmod(0o664).unwrap();
    let (out, stdout, stderr) = output(bin().arg("check").arg("--config").arg(&config));
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stderr.contains("credentials.acme.token") && stderr.contains("writable by group or others"),
        "{stderr}"
    );

    chmod(0o600).unwrap();
    std::fs::write(&token, "x".repeat(64 * 1024 + 1)).unwrap();
    let (out, stdout, stderr) = output(bin().arg("check").arg("--config").arg(&config));
    assert!(!out.status.success(), "{stdout}");
    assert!(stderr.contains("larger than 64 KiB"), "{stderr}");
    assert_no_secret("check", &stderr);
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

/// docs/configuration.md, the configuration reference.
fn configuration_reference() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .unwrap()
}

/// One section of a page: from its heading to the next heading of any level.
fn section<'a>(page: &'a str, heading: &str) -> &'a str {
    let section = page
        .split_once(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("docs/configuration.md has no {heading}"))
        .1;
    &section[..section.find("\n#").unwrap_or(section.len())]
}

/// The first cell (between backticks) of each row of a section's tables whose header row
/// starts with `first_column`.
fn first_cells(section: &str, first_column: &str) -> Vec<String> {
    let mut cells = Vec::new();
    let mut in_table = false;
    for line in section.lines() {
        if !line.starts_with('|') {
            in_table = false;
        } else if line.starts_with(&format!("| {first_column} |")) {
            in_table = true;
        } else if in_table
            && let Some((cell, _)) = line
                .strip_prefix("| `")
                .and_then(|rest| rest.split_once('`'))
        {
            cells.push(cell.to_owned());
        }
    }
    cells
}

/// `config/example.toml` is where the configuration reference sends readers for "every key":
/// each key in a `| key |` table of docs/configuration.md, and each credential `kind`, must be
/// shown there (set or commented out).
#[test]
fn example_config_shows_every_documented_key() {
    let reference = configuration_reference();
    let example = std::fs::read_to_string(format!("{SHIPPED}/example.toml")).unwrap();
    let shown = |line_start: &str| {
        example
            .lines()
            .any(|line| line.trim_start_matches(['#', ' ']).starts_with(line_start))
    };
    let mut checked = 0;
    for (heading, at_least) in [
        ("## `[server]`", 10),
        ("## `[admin]`", 2),
        ("## `[upstream]`", 11),
        ("## `[credentials.NAME]`", 2),
        ("## `[[routes]]`", 8),
        ("## `[cache]`", 2),
        ("## `[store]`", 7),
    ] {
        let keys = first_cells(section(&reference, heading), "key");
        assert!(keys.len() >= at_least, "{heading}: {keys:?}");
        for key in keys {
            assert!(
                shown(&format!("{key} =")),
                "docs/configuration.md {heading} documents `{key}`; config/example.toml lacks it"
            );
            checked += 1;
        }
    }
    let kinds = first_cells(section(&reference, "## `[credentials.NAME]`"), "`kind`");
    assert_eq!(kinds.len(), 6, "{kinds:?}");
    for kind in kinds {
        assert!(
            shown(&format!("kind = \"{kind}\"")),
            "docs/configuration.md documents kind `{kind}`; config/example.toml lacks it"
        );
        checked += 1;
    }
    assert!(
        checked >= 40,
        "only {checked} keys found in docs/configuration.md's tables"
    );
}

/// The README's first screen gets a newcomer going: within its first 40 lines, the command CI
/// runs (`cargo test --locked`) and a `cargo run` of the shipped example config, which passes
/// `check --offline` (and so needs nothing but the token it names to run).
#[test]
fn readme_first_screen_runs_the_example_config_and_the_tests() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let first_screen: Vec<&str> = readme.lines().take(40).collect();
    assert!(
        first_screen
            .iter()
            .any(|line| line.trim() == "cargo test --locked"),
        "README's first 40 lines lack `cargo test --locked` on a line of its own"
    );
    let run = first_screen
        .iter()
        .find(|line| line.contains("cargo run") && line.contains("--config config/"))
        .expect("README's first 40 lines lack a `cargo run ... --config config/...` command");
    let config = run
        .split_whitespace()
        .skip_while(|word| *word != "--config")
        .nth(1)
        .unwrap();
    assert_eq!(config, "config/example.toml", "{run}");
    let (out, stdout, stderr) = output(
        bin()
            .args(["check", "--offline", "--config"])
            .arg(format!("{}/{config}", env!("CARGO_MANIFEST_DIR")))
            .env_remove("BITBUCKET_TOKEN"),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("offline: no secret or CA file read"),
        "{stdout}"
    );
    // The tour shows `check`'s output for this config (with the token set): every line of it,
    // the route table and the `git config` line, as the binary prints them today.
    let (out, stdout, stderr) = output(
        bin()
            .args(["check", "--config", config])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("BITBUCKET_TOKEN", "readme-token"),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.lines().count() >= 6, "{stdout}");
    for line in stdout.lines().filter(|line| !line.trim().is_empty()) {
        assert!(
            readme.lines().any(|shown| shown == line),
            "README's tour lacks this line of `check`'s output:\n{line}"
        );
    }
    // The variable the first command sets is the one the config reads.
    assert!(run.contains("BITBUCKET_TOKEN="), "{run}");
    let example = std::fs::read_to_string(format!("{SHIPPED}/example.toml")).unwrap();
    assert!(example.contains("{ env = \"BITBUCKET_TOKEN\" }"));
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
            assert!(line["duration_us"].is_u64(), "{line}");
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

    // The cache status of each request: these GETs carry a body, so nothing is shared; the PUT
    // is a write; requests refused before the cache phase have none.
    let cache_of = |method: &str, path: &str| {
        access
            .iter()
            .find(|line| line["method"] == method && line["path"] == path)
            .map(|line| line["cache"].clone())
            .unwrap()
    };
    assert_eq!(cache_of("GET", "/release/widgets/commits"), "bypass");
    assert_eq!(cache_of("PUT", "/2.0/repositories/acme/gadgets"), "method");
    assert!(cache_of("GET", "/2.0/snippets").is_null());
}

async fn read_all<R: tokio::io::AsyncRead + Unpin>(mut reader: R) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let _ = reader.read_to_end(&mut buf).await;
    String::from_utf8_lossy(&buf).into_owned()
}

// ---------------------------------------------------------------------------
// Config linting: check --offline, schema errors, hints, warnings
// ---------------------------------------------------------------------------

/// Every config this repository ships, under config/ and deploy/.
fn shipped_and_deploy_configs() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|ext| ext == "toml") {
                out.push(path);
            }
        }
    }
    let mut configs = Vec::new();
    for dir in ["config", "deploy"] {
        walk(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join(dir),
            &mut configs,
        );
    }
    configs.sort();
    configs
}

/// CI lints the deploy/ configs away from their hosts: no secret files, no token variables.
#[test]
fn check_offline_passes_on_every_config_under_deploy_and_config() {
    let configs = shipped_and_deploy_configs();
    assert!(configs.len() >= 7, "{configs:?}");
    for config in configs {
        let (out, stdout, stderr) = output(
            bin()
                .args(["check", "--offline", "--config"])
                .arg(&config)
                .env_remove("BITBUCKET_TOKEN")
                .env_remove("BB_PROXY_TOKEN"),
        );
        let name = config.display();
        assert!(out.status.success(), "{name}:\n{stdout}{stderr}");
        assert!(stdout.contains("OK ("), "{name}:\n{stdout}");
        assert!(stdout.contains("offline"), "{name}:\n{stdout}");
        assert!(!stderr.contains("error"), "{name}:\n{stderr}");
    }
}

/// Offline still checks everything in the file, and still refuses a malformed secret spec.
#[test]
fn check_offline_reads_no_secret_but_validates_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let unread = minimal_config(dir.path(), r#"{ file = "/nonexistent/bbap-token" }"#);
    let (out, stdout, stderr) = output(bin().args(["check", "--offline", "-c"]).arg(&unread));
    assert!(out.status.success(), "{stdout}{stderr}");
    // Without --offline the same file fails on the secret, naming the resolved path.
    let (out, _, stderr) = output(bin().arg("check").arg("-c").arg(&unread));
    assert!(!out.status.success());
    assert!(stderr.contains("/nonexistent/bbap-token"), "{stderr}");

    let broken = minimal_config(dir.path(), r#"{ env = "A", file = "b" }"#);
    let (out, _, stderr) = output(bin().args(["check", "--offline", "-c"]).arg(&broken));
    assert!(!out.status.success());
    assert!(
        stderr.contains("credentials.acme.token: give exactly one of"),
        "{stderr}"
    );
}

/// A relative secret file is reported at the path it was looked for, not as written.
#[test]
fn relative_secret_paths_are_shown_resolved() {
    let dir = tempfile::tempdir().unwrap();
    let config = minimal_config(dir.path(), r#"{ file = "secrets/token" }"#);
    let (out, _, stderr) = output(bin().arg("check").arg("-c").arg(&config));
    assert!(!out.status.success());
    let resolved = dir.path().join("secrets/token");
    assert!(stderr.contains(&resolved.display().to_string()), "{stderr}");
}

#[test]
fn a_type_error_names_the_key_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "typed.toml",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:8080\"]\n\n[upstream]\napi_url = \"https://api.bitbucket.org\"\ntimeout = 60\n\n{}",
            std::fs::read_to_string(minimal_config(dir.path(), r#"{ value = "t" }"#)).unwrap()
        ),
    );
    let (out, _, stderr) = output(bin().arg("check").arg("-c").arg(&config));
    assert!(!out.status.success());
    let expected = format!(
        "error: {}: upstream.timeout: expected a duration like \"60s\"",
        config.display()
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with(&expected), "{stderr}");
    assert!(lines[0].contains("line 6"), "{stderr}");
}

/// Schema errors in different tables are all reported, in the order they appear in the file.
#[test]
fn schema_errors_are_reported_together_in_file_order() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "schema.toml",
        r#"[upstream]
http2 = "yes"

[server]
max_in_flight = -1
listen = "127.0.0.1:8080"

[credentials.acme]
kind = "workspace_access_token"
workspace = "acme"
token = { env = "T" }
verify = "yes"
rate_limit = { per_hour = 10, brust = 5 }

[[routes]]
prefix = 5
credential = "acme"

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "acme"
methods = "GET"
"#,
    );
    let (out, _, stderr) = output(bin().arg("check").arg("-c").arg(&config));
    assert!(!out.status.success());
    let keys: Vec<&str> = stderr
        .lines()
        .map(|line| {
            let rest = line
                .strip_prefix(&format!("error: {}: ", config.display()))
                .unwrap_or_else(|| panic!("no FILE: prefix: {line}"));
            rest.split(": ").next().unwrap()
        })
        .collect();
    assert_eq!(
        keys,
        [
            "upstream.http2",
            "server.max_in_flight",
            "server.listen",
            "credentials.acme.verify",
            "credentials.acme.rate_limit.brust",
            "routes[0].prefix",
            "routes[1].methods",
        ],
        "{stderr}"
    );
    let lines: Vec<usize> = stderr
        .lines()
        .map(|line| {
            let at = line.rfind("(line ").expect("a line number");
            line[at + 6..line.len() - 1].parse().unwrap()
        })
        .collect();
    assert_eq!(lines, [2, 5, 6, 12, 13, 16, 22], "{stderr}");
}

/// The hint for a prefix written as a relative path with a trailing slash is itself valid.
#[test]
fn the_suggested_prefix_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let text = |prefix: &str| {
        format!(
            "[credentials.acme]\nkind = \"workspace_access_token\"\nworkspace = \"acme\"\ntoken = {{ value = \"t\" }}\n\n[[routes]]\nprefix = {}\ncredential = \"acme\"\n",
            toml_string(prefix)
        )
    };
    let config = write(dir.path(), "hint.toml", &text("2.0/repositories/acme/"));
    let (out, _, stderr) = output(bin().arg("check").arg("-c").arg(&config));
    assert!(!out.status.success());
    let suggested = stderr
        .split_once("write \"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(prefix, _)| prefix.to_owned())
        .unwrap_or_else(|| panic!("no suggestion:\n{stderr}"));
    assert_eq!(suggested, "/2.0/repositories/acme");
    let fixed = write(dir.path(), "fixed.toml", &text(&suggested));
    let (out, stdout, stderr) = output(bin().arg("check").arg("-c").arg(&fixed));
    assert!(out.status.success(), "{stdout}{stderr}");
}

#[test]
fn warnings_name_the_file_and_a_public_listener_with_loopback_clients_is_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "public.toml",
        &format!(
            "[server]\nlisten = [\"0.0.0.0:8080\", \"127.0.0.1:8081\"]\n\n{}",
            std::fs::read_to_string(minimal_config(dir.path(), r#"{ value = "t" }"#)).unwrap()
        ),
    );
    let (out, stdout, stderr) = output(bin().arg("check").arg("-c").arg(&config));
    assert!(out.status.success(), "{stdout}{stderr}");
    let prefix = format!("warning: {}: ", config.display());
    for line in stderr.lines() {
        assert!(line.starts_with(&prefix), "{line}");
    }
    let listen: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("server.listen"))
        .collect();
    assert_eq!(listen.len(), 1, "{stderr}");
    assert!(
        listen[0].contains("server.listen[0]")
            && listen[0].contains("0.0.0.0:8080")
            && listen[0].contains("403"),
        "{stderr}"
    );
    // Naming the clients' network removes the warning.
    let open = write(
        dir.path(),
        "open.toml",
        &std::fs::read_to_string(&config).unwrap().replace(
            "[server]\n",
            "[server]\nallowed_clients = [\"10.0.0.0/8\"]\n",
        ),
    );
    let (out, _, stderr) = output(bin().arg("check").arg("-c").arg(&open));
    assert!(out.status.success());
    assert!(!stderr.contains("server.listen"), "{stderr}");
}

// ---------------------------------------------------------------------------
// git config lines, schema, completions, man page
// ---------------------------------------------------------------------------

#[test]
fn check_prints_scoped_git_config_lines_for_the_git_routes() {
    let dir = tempfile::tempdir().unwrap();
    let config = full_config(
        dir.path(),
        "listen = [\"0.0.0.0:8080\"]\nallowed_clients = [\"10.0.0.0/8\", \"127.0.0.1\"]",
        "",
        "https://api.bitbucket.org",
        "https://bitbucket.org",
    );
    let text = std::fs::read_to_string(&config).unwrap()
        + "\n[[routes]]\nprefix = \"/git/acme\"\nupstream = \"git\"\nupstream_prefix = \"/acme\"\ncredential = \"acme-all\"\n";
    std::fs::write(&config, text).unwrap();
    let (out, stdout, stderr) = output(bin().args(["check", "--offline", "-c"]).arg(&config));
    assert!(out.status.success(), "{stdout}{stderr}");
    let lines: Vec<&str> = stdout
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("git config"))
        .collect();
    assert_eq!(
        lines,
        [
            // A repository route: exactly that repository's URL.
            "git config --global url.\"http://127.0.0.1:8080/git/acme/widgets.git\".insteadOf https://bitbucket.org/acme/widgets.git",
            // A workspace route: the workspace with its slash, so `acme-evil/` stays direct.
            "git config --global url.\"http://127.0.0.1:8080/git/acme/\".insteadOf https://bitbucket.org/acme/",
        ],
        "{stdout}"
    );

    // public_url, when set, is where clients reach the proxy.
    let public = std::fs::read_to_string(&config).unwrap().replace(
        "[server]\n",
        "[server]\npublic_url = \"http://bitbucket-proxy.ci.internal:8080\"\n",
    );
    std::fs::write(&config, public).unwrap();
    let (out, stdout, _) = output(bin().args(["check", "--offline", "-c"]).arg(&config));
    assert!(out.status.success());
    assert!(
        stdout.contains("url.\"http://bitbucket-proxy.ci.internal:8080/git/acme/\".insteadOf https://bitbucket.org/acme/"),
        "{stdout}"
    );
}

const SCHEMA_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/schema.json");

/// Editors validate configs against config/schema.json: it must match the types the proxy
/// really deserialises.
#[test]
fn committed_json_schema_is_current() {
    let generated = bitbucket_auth_proxy::config::schema::json_schema();
    let committed = std::fs::read_to_string(SCHEMA_FILE).unwrap_or_default();
    assert!(
        committed == generated,
        "config/schema.json is out of date with src/config/file.rs; regenerate it with\n\n    \
         cargo run --quiet -- schema > config/schema.json\n"
    );
    let (out, stdout, stderr) = output(bin().arg("schema"));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout, generated);
    let schema: serde_json::Value = serde_json::from_str(&generated).unwrap();
    let keys = schema["$defs"]["UpstreamSection"]["properties"]
        .as_object()
        .unwrap();
    assert!(keys.contains_key("timeout") && keys.contains_key("proxy_password"));
    assert_eq!(schema["additionalProperties"], false);
}

/// Every shipped config names the schema for taplo / Even Better TOML.
#[test]
fn shipped_configs_name_the_schema() {
    for config in shipped_and_deploy_configs() {
        let text = std::fs::read_to_string(&config).unwrap();
        let directive = text
            .lines()
            .find(|line| line.starts_with("#:schema "))
            .unwrap_or_else(|| panic!("{} has no #:schema line", config.display()));
        let target = directive.trim_start_matches("#:schema ").trim();
        let resolved = config.parent().unwrap().join(target);
        assert!(
            resolved.canonicalize().ok() == Path::new(SCHEMA_FILE).canonicalize().ok(),
            "{}: {directive} does not lead to config/schema.json",
            config.display()
        );
    }
}

#[test]
fn completions_and_man_page_generate() {
    for shell in ["bash", "zsh", "fish"] {
        let (out, stdout, stderr) = output(bin().args(["completions", shell]));
        assert!(out.status.success(), "{shell}: {stderr}");
        for word in ["check", "health", "offline", "config"] {
            assert!(stdout.contains(word), "{shell} completions lack {word}");
        }
    }
    let (out, _, stderr) = output(bin().args(["completions", "tcsh"]));
    assert_eq!(out.status.code(), Some(2), "{stderr}");

    let (out, stdout, stderr) = output(bin().arg("man"));
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.starts_with(".ie") || stdout.contains(".TH"),
        "{stdout}"
    );
    assert!(stdout.contains("bitbucket\\-auth\\-proxy"), "{stdout}");
    for subcommand in ["check", "health", "schema", "completions"] {
        assert!(stdout.contains(subcommand), "man page lacks {subcommand}");
    }
    // Each subcommand has its own page, with its options.
    let (out, stdout, stderr) = output(bin().args(["man", "check"]));
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains(".TH bitbucket-auth-proxy-check 1"),
        "{stdout}"
    );
    assert!(stdout.contains("\\-\\-offline"), "{stdout}");
    let (out, _, stderr) = output(bin().args(["man", "serve"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("`serve` is not a subcommand"), "{stderr}");
}

/// A whole-host `insteadOf https://bitbucket.org/` sends unrouted repositories to the proxy
/// (404): no shipped file may show it.
#[test]
fn no_shipped_file_shows_the_unscoped_git_rewrite() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md"), root.join("SECURITY.md")];
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    walk(&root.join("deploy"), &mut files);
    walk(&root.join("config"), &mut files);
    walk(&root.join("docs"), &mut files);
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for (i, line) in text.lines().enumerate() {
            let unscoped = line.contains("/git/.insteadOf")
                || line.contains("/git/\".insteadOf")
                || line.trim_end().ends_with("https://bitbucket.org/")
                    && line.contains("insteadOf");
            assert!(!unscoped, "{}:{}: {line}", file.display(), i + 1);
        }
    }
}

/// deploy/ci/start-proxy.sh, sourced by a POSIX shell: the proxy serves, git is rewritten for
/// the config's git routes only, and the proxy stops when the shell exits.
#[test]
fn ci_start_script_rewrites_only_the_routed_workspace() {
    let dir = tempfile::tempdir().unwrap();
    let listen = free_port();
    let config = write(
        dir.path(),
        "ci.toml",
        &format!(
            "[server]\nlisten = [\"{listen}\"]\n\n{}\n[[routes]]\nprefix = \"/git/acme\"\nupstream = \"git\"\nupstream_prefix = \"/acme\"\ncredential = \"acme\"\n",
            std::fs::read_to_string(minimal_config(dir.path(), r#"{ value = "t" }"#)).unwrap()
        ),
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/ci/start-proxy.sh");
    let (out, stdout, stderr) = output(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                ". {script} >/dev/null && env | grep -E '^(GIT_CONFIG|GIT_TERMINAL|BITBUCKET_API_URL)' | sort"
            ))
            .current_dir(dir.path())
            .env("BITBUCKET_AUTH_PROXY_BIN", BIN)
            .env("BITBUCKET_AUTH_PROXY_URL", format!("http://{listen}"))
            // The script's variable and the binary's are the same one.
            .env("BITBUCKET_AUTH_PROXY_CONFIG", &config)
            .env_remove("GIT_CONFIG_COUNT"),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    let env: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        env,
        [
            format!("BITBUCKET_API_URL=http://{listen}"),
            "GIT_CONFIG_COUNT=1".to_owned(),
            format!("GIT_CONFIG_KEY_0=url.http://{listen}/git/acme/.insteadOf"),
            "GIT_CONFIG_VALUE_0=https://bitbucket.org/acme/".to_owned(),
            "GIT_TERMINAL_PROMPT=0".to_owned(),
        ],
        "{stderr}"
    );
    // The EXIT trap stopped the proxy.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(listen).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the proxy still listens on {listen}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The image's OCI labels match Cargo.toml, and the compose example's token file (written
/// inside the build context) is never sent to the builder.
#[test]
fn container_labels_match_the_package_and_the_token_stays_out_of_the_build_context() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let label = |name: &str| {
        dockerfile
            .lines()
            .find_map(|line| {
                line.trim_start()
                    .trim_start_matches("LABEL ")
                    .strip_prefix(&format!("org.opencontainers.image.{name}="))
            })
            .map(|value| value.trim_end_matches(" \\").trim_matches('"').to_owned())
            .unwrap_or_else(|| panic!("Dockerfile has no {name} label"))
    };
    assert_eq!(label("licenses"), env!("CARGO_PKG_LICENSE"));
    assert_eq!(label("title"), env!("CARGO_PKG_NAME"));
    assert_eq!(label("version"), "${VERSION}");
    assert!(
        dockerfile.contains(&format!("ARG VERSION={}\n", env!("CARGO_PKG_VERSION"))),
        "Dockerfile's ARG VERSION is not Cargo.toml's version"
    );
    let ignored = std::fs::read_to_string(root.join(".dockerignore")).unwrap();
    for pattern in ["deploy/bitbucket-token", "target/", ".git"] {
        assert!(
            ignored.lines().any(|line| line.trim() == pattern),
            ".dockerignore lacks {pattern}"
        );
    }
}
