//! Git over HTTPS with a real git client (issue 5): the `git` CLI clones, fetches and pushes
//! through an in-process proxy to an upstream that is real git smart HTTP — `git http-backend`
//! run as CGI behind a loopback HTTPS server that demands the route's exact Basic credential.
//!
//! Every git command runs in a sandbox that cannot prompt: `GIT_TERMINAL_PROMPT=0`,
//! `GIT_ASKPASS=/bin/false`, `credential.helper=` emptied, stdin closed, an empty `HOME`, no
//! system config. Had the proxy not authenticated a request, git would fail instead of asking.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bitbucket_auth_proxy::{Config, RunningProxy};
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

const TOKEN: &str = "widgets-git-token-Qz7pLx2";
const API_EMAIL: &str = "release-bot@acme.example";
const API_TOKEN: &str = "ATATT-widgets-api-token-Vb3n";
/// A token the upstream does not accept (for the no-prompt check).
const REVOKED_TOKEN: &str = "gadgets-git-token-revoked";
const REPO: &str = "acme/widgets.git";
/// Generous: a loaded 2-core machine runs several git processes and the proxy at once.
const GIT_TIMEOUT: Duration = Duration::from_secs(60);
const MIB: u64 = 1024 * 1024;

fn basic(user: &str, password: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

/// What Bitbucket expects from git for repository access tokens.
fn access_token_authorization() -> String {
    basic("x-token-auth", TOKEN)
}

// ---------------------------------------------------------------------------
// The git tools: present, or the test is skipped loudly
// ---------------------------------------------------------------------------

/// `$(git --exec-path)/git-http-backend`, or `None` (after a loud message) when git or its
/// HTTP backend is missing. `.ci/run` installs git, so CI never skips.
fn http_backend() -> Option<PathBuf> {
    static BACKEND: OnceLock<Option<PathBuf>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            let output = std::process::Command::new("git")
                .arg("--exec-path")
                .output();
            let backend = match output {
                Ok(out) if out.status.success() => {
                    let exec_path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                    Some(Path::new(&exec_path).join("git-http-backend"))
                }
                _ => None,
            };
            match backend {
                Some(path) if path.is_file() => Some(path),
                other => {
                    eprintln!(
                        "\n\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
                         !!! SKIPPING the git integration tests: `git` or git-http-backend\n\
                         !!! is not installed ({other:?}). Install Debian's `git` package\n\
                         !!! (`bash .ci/run` does it).\n\
                         !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
                    );
                    None
                }
            }
        })
        .clone()
}

// ---------------------------------------------------------------------------
// A git sandbox: isolated config, no way to prompt
// ---------------------------------------------------------------------------

/// A temporary directory holding an empty `HOME` and the work trees of one test.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        let dir = tempfile::Builder::new()
            .prefix("git-sandbox-")
            .tempdir()
            .expect("sandbox dir");
        std::fs::create_dir_all(dir.path().join("home/.config")).expect("home dir");
        Sandbox { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `git` with a clean environment (no inherited `GIT_*`, proxies or user config) that
    /// fails rather than asks for credentials.
    fn git(&self, dir: &Path) -> Command {
        let home = self.path("home");
        let mut cmd = Command::new("git");
        cmd.current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "/bin/false")
            .env("SSH_ASKPASS", "/bin/false")
            .env("LC_ALL", "C")
            .env("GIT_AUTHOR_NAME", "CI Runner")
            .env("GIT_AUTHOR_EMAIL", "ci@acme.example")
            .env("GIT_COMMITTER_NAME", "CI Runner")
            .env("GIT_COMMITTER_EMAIL", "ci@acme.example")
            .args(["-c", "credential.helper=", "-c", "init.defaultBranch=main"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Runs git in `dir`, bounded by [`GIT_TIMEOUT`]; returns the output whatever the status.
    async fn try_run(&self, dir: &Path, args: &[&str]) -> Output {
        self.try_run_env(dir, args, &[]).await
    }

    async fn try_run_env(&self, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = self.git(dir);
        cmd.args(args);
        for (key, value) in env {
            cmd.env(key, value);
        }
        let child = cmd.spawn().expect("spawn git");
        match tokio::time::timeout(GIT_TIMEOUT, child.wait_with_output()).await {
            Ok(output) => output.expect("wait for git"),
            Err(_) => {
                panic!("git {args:?} still running after {GIT_TIMEOUT:?} (waiting for a prompt?)")
            }
        }
    }

    /// Runs git in `dir` and returns its trimmed stdout; panics with stderr on failure.
    async fn run(&self, dir: &Path, args: &[&str]) -> String {
        self.run_env(dir, args, &[]).await
    }

    async fn run_env(&self, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
        let output = self.try_run_env(dir, args, env).await;
        assert!(
            output.status.success(),
            "git {args:?} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// Commits `files` (name, contents) in the work tree `dir`; returns the new commit id.
    async fn commit(&self, dir: &Path, message: &str, files: &[(&str, &[u8])]) -> String {
        for (name, contents) in files {
            std::fs::write(dir.join(name), contents).expect("write work tree file");
        }
        self.run(dir, &["add", "--all"]).await;
        self.run(dir, &["commit", "--quiet", "-m", message]).await;
        self.run(dir, &["rev-parse", "HEAD"]).await
    }
}

// ---------------------------------------------------------------------------
// The upstream: git http-backend as CGI behind loopback HTTPS
// ---------------------------------------------------------------------------

/// What the upstream saw of one request body on its way into the CGI.
#[derive(Debug, Clone)]
struct BodySeen {
    path: String,
    bytes: u64,
    /// Bytes the client had sent through the [`Relay`] when the first body byte arrived here.
    client_bytes_at_first_byte: Option<u64>,
    /// From the first to the last body byte.
    span: Duration,
}

struct CgiShared {
    backend: PathBuf,
    project_root: PathBuf,
    home: PathBuf,
    authorization: String,
    /// Fed by a [`Relay`] between git and the proxy, when a test uses one.
    client_bytes: Arc<AtomicU64>,
    bodies: Mutex<Vec<BodySeen>>,
    cgi_stderr: Mutex<String>,
    /// Answer only after the whole request body was read (a buffering front end).
    respond_after_body: bool,
    /// Pause after each MiB of request body (a slow uplink).
    pause_per_mib: Duration,
}

/// A loopback HTTPS server running `git http-backend` per request, over a tempdir of bare
/// repositories.
struct GitUpstream {
    mock: MockUpstream,
    shared: Arc<CgiShared>,
    _root: tempfile::TempDir,
}

impl GitUpstream {
    fn start(
        tls: Arc<rustls::ServerConfig>,
        backend: PathBuf,
        home: PathBuf,
        authorization: String,
        respond_after_body: bool,
        pause_per_mib: Duration,
    ) -> GitUpstream {
        let root = tempfile::Builder::new()
            .prefix("git-upstream-")
            .tempdir()
            .expect("project root");
        let shared = Arc::new(CgiShared {
            backend,
            project_root: root.path().to_owned(),
            home,
            authorization,
            client_bytes: Arc::new(AtomicU64::new(0)),
            bodies: Mutex::new(Vec::new()),
            cgi_stderr: Mutex::new(String::new()),
            respond_after_body,
            pause_per_mib,
        });
        let handler_shared = shared.clone();
        let mock = MockUpstream::start(tls, move |head, body| {
            serve_git(handler_shared.clone(), head, body)
        });
        GitUpstream {
            mock,
            shared,
            _root: root,
        }
    }

    fn bare_repo(&self) -> PathBuf {
        self.shared.project_root.join(REPO)
    }

    fn bodies(&self) -> Vec<BodySeen> {
        self.shared.bodies.lock().unwrap().clone()
    }

    /// Every request carried exactly the route's credential, and no `Expect` got through.
    fn assert_every_request_authenticated(&self) {
        let requests = self.mock.requests();
        assert!(!requests.is_empty(), "the upstream saw no request");
        let expected = &self.shared.authorization;
        for request in &requests {
            assert_eq!(
                request.header_all("authorization"),
                [expected.as_str()],
                "{} {}",
                request.method,
                request.uri
            );
            assert!(
                request.header("expect").is_none(),
                "Expect reached the upstream: {request:?}"
            );
        }
    }

    fn stderr(&self) -> String {
        self.shared.cgi_stderr.lock().unwrap().clone()
    }
}

fn plain_response(status: StatusCode, text: &str) -> Response<BoxBody> {
    let mut response = Response::new(full_body(text.to_owned()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("content-type", "text/plain".parse().unwrap());
    response
}

async fn serve_git(
    shared: Arc<CgiShared>,
    head: RecordedRequestHead,
    body: Incoming,
) -> Response<BoxBody> {
    if head.header("authorization") != Some(shared.authorization.as_str()) {
        let mut response = plain_response(StatusCode::UNAUTHORIZED, "Unauthorized");
        response.headers_mut().insert(
            "www-authenticate",
            r#"Basic realm="Bitbucket.org HTTP""#.parse().unwrap(),
        );
        return response;
    }
    match run_cgi(&shared, &head, body).await {
        Ok(response) => response,
        Err(error) => plain_response(StatusCode::INTERNAL_SERVER_ERROR, &error),
    }
}

/// Runs the CGI: request body streamed into its stdin, its stdout streamed back once the CGI
/// header block is parsed. Nothing is buffered beyond one read.
async fn run_cgi(
    shared: &Arc<CgiShared>,
    head: &RecordedRequestHead,
    body: Incoming,
) -> Result<Response<BoxBody>, String> {
    let uri: http::Uri = head.uri.parse().map_err(|e| format!("bad target: {e}"))?;
    let mut cmd = Command::new(&shared.backend);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &shared.home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_PROJECT_ROOT", &shared.project_root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("REQUEST_METHOD", head.method.as_str())
        .env("PATH_INFO", uri.path())
        .env("QUERY_STRING", uri.query().unwrap_or(""))
        .env("REMOTE_USER", "x-token-auth")
        .env("REMOTE_ADDR", "127.0.0.1");
    if let Some(value) = head.header("content-type") {
        cmd.env("CONTENT_TYPE", value);
    }
    // Without a length (chunked HTTP/1.1, or h2 without content-length) the CGI reads to EOF.
    if let Some(value) = head.header("content-length") {
        cmd.env("CONTENT_LENGTH", value);
    }
    // Every other header as HTTP_*, as web servers do: HTTP_GIT_PROTOCOL selects protocol v2,
    // HTTP_CONTENT_ENCODING announces gzipped upload-pack requests.
    for (name, value) in &head.headers {
        if matches!(
            name.as_str(),
            "authorization" | "content-type" | "content-length" | "connection"
        ) {
            continue;
        }
        if let Ok(value) = value.to_str() {
            let key = format!(
                "HTTP_{}",
                name.as_str().to_ascii_uppercase().replace('-', "_")
            );
            cmd.env(key, value);
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("spawn http-backend: {e}"))?;
    let stdin = child.stdin.take().expect("piped stdin");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");

    let err_shared = shared.clone();
    tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        if !text.is_empty() {
            err_shared.cgi_stderr.lock().unwrap().push_str(&text);
        }
    });

    let (body_done_tx, body_done_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(pump_request_body(
        shared.clone(),
        uri.path().to_owned(),
        body,
        stdin,
        body_done_tx,
    ));
    if shared.respond_after_body {
        let _ = body_done_rx.await;
    }

    // The CGI header block, up to the blank line; what follows starts the body.
    let mut buf = Vec::with_capacity(8192);
    let (head_end, body_start) = loop {
        // CGI allows bare LF line ends; whichever blank line comes first ends the block.
        let crlf = find(&buf, b"\r\n\r\n").map(|at| (at, at + 4));
        let lf = find(&buf, b"\n\n").map(|at| (at, at + 2));
        if let Some(end) = [crlf, lf].into_iter().flatten().min() {
            break end;
        }
        if buf.len() > 64 * 1024 {
            return Err("CGI header block over 64 KiB".into());
        }
        let mut chunk = [0u8; 8192];
        let n = stdout
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read CGI stdout: {e}"))?;
        if n == 0 {
            let _ = child.wait().await;
            return Err(format!(
                "http-backend wrote no header block: {:?}\nstderr: {}",
                String::from_utf8_lossy(&buf),
                shared.cgi_stderr.lock().unwrap()
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let header_text = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let first_body = Bytes::copy_from_slice(&buf[body_start..]);
    let mut response = Response::builder();
    for line in header_text.lines().filter(|l| !l.trim().is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad CGI header line {line:?}"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split(' ').next().unwrap_or("");
            response = response.status(code.parse::<u16>().map_err(|_| "bad Status")?);
        } else {
            response = response.header(name.trim(), value);
        }
    }

    let (tx, body) = channel_body();
    tokio::spawn(async move {
        // The child lives here: a client that goes away drops it, which kills it.
        let mut child = child;
        if first_body.is_empty() || tx.send(first_body).await.is_ok() {
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                match stdout.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send(Bytes::copy_from_slice(&chunk[..n])).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
        drop(tx);
        let _ = child.wait().await;
    });
    response
        .body(body)
        .map_err(|e| format!("CGI response: {e}"))
}

/// Streams the request body into the CGI's stdin frame by frame and records what it saw; EOF
/// (stdin closed) tells the CGI the body is over.
async fn pump_request_body(
    shared: Arc<CgiShared>,
    path: String,
    body: Incoming,
    mut stdin: tokio::process::ChildStdin,
    done: tokio::sync::oneshot::Sender<()>,
) {
    let mut body = pin!(body);
    let mut seen = BodySeen {
        path,
        bytes: 0,
        client_bytes_at_first_byte: None,
        span: Duration::ZERO,
    };
    let mut first_at = None;
    let mut stdin_open = true;
    while let Some(frame) = body.as_mut().frame().await {
        let Ok(frame) = frame else { break };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        if first_at.is_none() {
            first_at = Some(Instant::now());
            seen.client_bytes_at_first_byte = Some(shared.client_bytes.load(Ordering::SeqCst));
        }
        let before = seen.bytes;
        seen.bytes += data.len() as u64;
        if !shared.pause_per_mib.is_zero() && before / MIB != seen.bytes / MIB {
            tokio::time::sleep(shared.pause_per_mib).await;
        }
        // A CGI that stopped reading (it answered an error) gets no more; the body is drained.
        if stdin_open && stdin.write_all(&data).await.is_err() {
            stdin_open = false;
        }
    }
    seen.span = first_at.map(|t| t.elapsed()).unwrap_or_default();
    shared.bodies.lock().unwrap().push(seen);
    drop(stdin);
    let _ = done.send(());
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------
// A counting TCP relay between git and the proxy
// ---------------------------------------------------------------------------

/// Forwards TCP from git to the proxy, counting the bytes git sent, so the upstream can tell
/// how much the client had sent when the first body byte reached it.
async fn relay_connection(client: TcpStream, proxy: SocketAddr, sent: Arc<AtomicU64>) {
    let Ok(server) = TcpStream::connect(proxy).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upload = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if server_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    sent.fetch_add(n as u64, Ordering::SeqCst);
                }
            }
        }
        let _ = server_write.shutdown().await;
    };
    let download = async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::join!(upload, download);
}

// ---------------------------------------------------------------------------
// Fixture: seeded upstream repository, proxy in front of it
// ---------------------------------------------------------------------------

struct Options {
    alpn: &'static [&'static [u8]],
    upstream_lines: &'static str,
    respond_after_body: bool,
    pause_per_mib: Duration,
    /// The widgets route uses an API token instead of a repository access token.
    api_token: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            alpn: ALPN_H2_H1,
            upstream_lines: "timeout = \"30s\"",
            respond_after_body: false,
            pause_per_mib: Duration::ZERO,
            api_token: false,
        }
    }
}

struct Fixture {
    sandbox: Sandbox,
    upstream: GitUpstream,
    _pki: TestPki,
    _proxy: RunningProxy,
    proxy_addr: SocketAddr,
    /// The work tree the upstream repository was seeded from (pushes to it directly).
    seed: PathBuf,
    seeded_head: String,
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

impl Fixture {
    /// `None` when git is unavailable (the skip message is already printed).
    async fn start(options: Options) -> Option<Fixture> {
        let backend = http_backend()?;
        let pki = TestPki::new();
        let sandbox = Sandbox::new();
        let upstream = GitUpstream::start(
            pki.server_config_with_alpn(options.alpn),
            backend,
            sandbox.path("home"),
            if options.api_token {
                basic("x-bitbucket-api-token-auth", API_TOKEN)
            } else {
                access_token_authorization()
            },
            options.respond_after_body,
            options.pause_per_mib,
        );

        // Seed acme/widgets.git with a few commits.
        let seed = sandbox.path("seed");
        std::fs::create_dir_all(&seed).unwrap();
        sandbox.run(&seed, &["init", "--quiet"]).await;
        sandbox
            .commit(&seed, "Initial commit", &[("README.md", b"# widgets\n")])
            .await;
        sandbox
            .commit(&seed, "Add the widget", &[("widget.txt", b"a widget\n")])
            .await;
        let seeded_head = sandbox
            .commit(
                &seed,
                "Document it",
                &[("README.md", b"# widgets\n\nWidgets.\n")],
            )
            .await;
        let bare = upstream.bare_repo();
        std::fs::create_dir_all(bare.parent().unwrap()).unwrap();
        let bare_str = bare.to_str().unwrap();
        sandbox
            .run(&seed, &["clone", "--quiet", "--bare", ".", bare_str])
            .await;
        sandbox
            .run(&bare, &["config", "http.receivepack", "true"])
            .await;
        // Keep received packs as they are (as big servers do) instead of exploding them into
        // recompressed loose objects: a 64 MiB blob costs seconds less.
        sandbox
            .run(&bare, &["config", "receive.unpackLimit", "1"])
            .await;
        sandbox
            .run(&seed, &["remote", "add", "upstream", bare_str])
            .await;

        let text = format!(
            r#"[server]
listen = ["127.0.0.1:0"]

[upstream]
git_url = {git_url}
ca_file = {ca_file}
{upstream_lines}

[credentials.widgets-ci]
kind = "repository_access_token"
repository = "acme/widgets"
token = {{ value = "{TOKEN}" }}

[credentials.release-bot]
kind = "api_token"
email = "{API_EMAIL}"
token = {{ value = "{API_TOKEN}" }}

[credentials.gadgets-ci]
kind = "repository_access_token"
repository = "acme/gadgets"
token = {{ value = "{REVOKED_TOKEN}" }}

[[routes]]
prefix = "/git/acme/widgets.git"
upstream = "git"
upstream_prefix = "/acme/widgets.git"
credential = "{widgets_credential}"

[[routes]]
prefix = "/git/acme/gadgets.git"
upstream = "git"
upstream_prefix = "/acme/gadgets.git"
credential = "gadgets-ci"
"#,
            git_url = toml_string(&upstream.mock.base_url()),
            ca_file = toml_string(&pki.ca_path().display().to_string()),
            upstream_lines = options.upstream_lines,
            widgets_credential = if options.api_token {
                "release-bot"
            } else {
                "widgets-ci"
            },
        );
        let config = Config::from_toml(Path::new("git-test.toml"), &text)
            .unwrap_or_else(|e| panic!("invalid test config:\n{e}\n---\n{text}"));
        let proxy = bitbucket_auth_proxy::start(config)
            .await
            .expect("start proxy");
        let proxy_addr = proxy.local_addrs()[0];
        Some(Fixture {
            sandbox,
            upstream,
            _pki: pki,
            _proxy: proxy,
            proxy_addr,
            seed,
            seeded_head,
        })
    }

    fn url(&self) -> String {
        format!("http://{}/git/{REPO}", self.proxy_addr)
    }

    /// `git clone <proxy url> <name>`; returns the work tree.
    async fn clone(&self, name: &str) -> PathBuf {
        let url = self.url();
        self.sandbox
            .run(self.sandbox.dir.path(), &["clone", "--quiet", &url, name])
            .await;
        self.sandbox.path(name)
    }

    /// A ref in the upstream's bare repository, read directly.
    async fn upstream_ref(&self, name: &str) -> String {
        self.sandbox
            .run(&self.upstream.bare_repo(), &["rev-parse", name])
            .await
    }

    /// Upstream checks that hold after any successful exchange.
    fn assert_upstream_clean(&self) {
        self.upstream.assert_every_request_authenticated();
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn clone_then_fetch_a_new_upstream_commit() {
    let Some(fx) = Fixture::start(Options::default()).await else {
        return;
    };
    let work = fx.clone("widgets").await;
    assert_eq!(
        fx.sandbox.run(&work, &["rev-parse", "HEAD"]).await,
        fx.seeded_head
    );
    assert_eq!(
        std::fs::read_to_string(work.join("widget.txt")).unwrap(),
        "a widget\n"
    );
    let log = fx.sandbox.run(&work, &["log", "--format=%s"]).await;
    assert_eq!(log, "Document it\nAdd the widget\nInitial commit");

    // Someone else pushes upstream; a fetch through the proxy brings the commit in.
    let new_head = fx
        .sandbox
        .commit(&fx.seed, "Upstream change", &[("gear.txt", b"a gear\n")])
        .await;
    fx.sandbox
        .run(&fx.seed, &["push", "--quiet", "upstream", "main"])
        .await;
    fx.sandbox.run(&work, &["fetch", "--quiet", "origin"]).await;
    assert_eq!(
        fx.sandbox.run(&work, &["rev-parse", "origin/main"]).await,
        new_head
    );
    fx.sandbox
        .run(&work, &["merge", "--quiet", "--ff-only", "origin/main"])
        .await;
    assert_eq!(
        std::fs::read_to_string(work.join("gear.txt")).unwrap(),
        "a gear\n"
    );

    fx.assert_upstream_clean();
    // Protocol v2 reached http-backend: the `Git-Protocol` header passed the proxy.
    let requests = fx.upstream.mock.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.header("git-protocol") == Some("version=2")),
        "no Git-Protocol header upstream: {requests:#?}"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.method == http::Method::POST && r.uri.ends_with("/git-upload-pack")),
        "{requests:#?}"
    );
    assert!(
        requests
            .iter()
            .all(|r| r.uri.starts_with("/acme/widgets.git/"))
    );
}

#[tokio::test]
async fn push_a_new_commit() {
    let Some(fx) = Fixture::start(Options::default()).await else {
        return;
    };
    let work = fx.clone("widgets").await;
    let pushed = fx
        .sandbox
        .commit(
            &work,
            "Add a sprocket",
            &[("sprocket.txt", b"a sprocket\n")],
        )
        .await;
    fx.sandbox
        .run(&work, &["push", "--quiet", "origin", "main"])
        .await;
    assert_eq!(fx.upstream_ref("refs/heads/main").await, pushed);

    // A new branch too, and a fresh clone through the proxy sees both.
    fx.sandbox
        .run(
            &work,
            &["push", "--quiet", "origin", "main:refs/heads/feature"],
        )
        .await;
    assert_eq!(fx.upstream_ref("refs/heads/feature").await, pushed);
    let other = fx.clone("again").await;
    assert_eq!(fx.sandbox.run(&other, &["rev-parse", "HEAD"]).await, pushed);
    assert_eq!(
        fx.sandbox
            .run(&other, &["rev-parse", "origin/feature"])
            .await,
        pushed
    );

    fx.assert_upstream_clean();
    assert!(
        fx.upstream
            .mock
            .requests()
            .iter()
            .any(|r| r.method == http::Method::POST && r.uri.ends_with("/git-receive-pack")),
    );
}

/// Resident set size of this test process (proxy and upstream included), in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// Samples [`rss_bytes`] every 10 ms until dropped; reports the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start() -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_bytes()));
        let thread = {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    peak.fetch_max(rss_bytes(), Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        RssSampler {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.peak.load(Ordering::SeqCst)
    }
}

/// The large push: 64 MiB of incompressible bytes in one file.
const LARGE_FILE: u64 = 64 * MIB;

/// Writes `len` incompressible (pseudo-random) bytes to `path`, 1 MiB at a time.
fn write_random_file(path: &Path, len: u64, seed: u64) {
    use std::io::Write as _;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut buf = vec![0u8; MIB as usize];
    let mut offset = 0;
    while offset < len {
        let n = (len - offset).min(MIB) as usize;
        pattern_fill(seed + offset, &mut buf[..n]);
        file.write_all(&buf[..n]).unwrap();
        offset += n as u64;
    }
    file.flush().unwrap();
}

/// A push bigger than any buffer the proxy could hide it in streams through: the upstream sees
/// the pack's first bytes while git has sent only a small part of it, and the test process
/// (proxy plus upstream) grows by far less than the pack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_push_streams_through_the_proxy() {
    let Some(fx) = Fixture::start(Options::default()).await else {
        return;
    };
    let relay = {
        let proxy = fx.proxy_addr;
        let sent = fx.upstream.shared.client_bytes.clone();
        RawUpstream::start(move |client| relay_connection(client, proxy, sent.clone()))
    };
    let url = format!("http://{}/git/{REPO}", relay.addr());
    fx.sandbox
        .run(fx.sandbox.dir.path(), &["clone", "--quiet", &url, "big"])
        .await;
    let work = fx.sandbox.path("big");
    // Store objects uncompressed: zlib on 64 MiB of noise only costs time on both sides.
    fx.sandbox
        .run(&work, &["config", "core.compression", "0"])
        .await;
    write_random_file(&work.join("blob.bin"), LARGE_FILE, 0x5eed);
    fx.sandbox.run(&work, &["add", "blob.bin"]).await;
    fx.sandbox
        .run(&work, &["commit", "--quiet", "-m", "Add a large blob"])
        .await;
    let pushed = fx.sandbox.run(&work, &["rev-parse", "HEAD"]).await;

    let before = fx.upstream.shared.client_bytes.load(Ordering::SeqCst);
    let rss_before = rss_bytes();
    let sampler = RssSampler::start();
    let started = Instant::now();
    fx.sandbox
        .run(&work, &["push", "--quiet", "origin", "main"])
        .await;
    let elapsed = started.elapsed();
    let rss_peak = sampler.finish();
    let sent = fx.upstream.shared.client_bytes.load(Ordering::SeqCst) - before;

    assert_eq!(fx.upstream_ref("refs/heads/main").await, pushed);
    let size = fx
        .sandbox
        .run(
            &fx.upstream.bare_repo(),
            &["cat-file", "-s", "main:blob.bin"],
        )
        .await;
    assert_eq!(size, LARGE_FILE.to_string());

    let pack = fx
        .upstream
        .bodies()
        .into_iter()
        .filter(|b| b.path.ends_with("/git-receive-pack"))
        .max_by_key(|b| b.bytes)
        .expect("a receive-pack body");
    let at_first = pack.client_bytes_at_first_byte.expect("first byte") - before;
    let growth = rss_peak.saturating_sub(rss_before);
    eprintln!(
        "large push: pack body {:.1} MiB upstream ({:.1} MiB sent by git in all) in {:.2?}; \
         upstream saw its first byte after git had sent {:.2} MiB; body span upstream {:.2?}; \
         test-process RSS {:.1} MiB -> peak {:.1} MiB (+{:.1} MiB)",
        pack.bytes as f64 / MIB as f64,
        sent as f64 / MIB as f64,
        elapsed,
        at_first as f64 / MIB as f64,
        pack.span,
        rss_before as f64 / MIB as f64,
        rss_peak as f64 / MIB as f64,
        growth as f64 / MIB as f64,
    );
    assert!(pack.bytes > LARGE_FILE, "pack of {} bytes", pack.bytes);
    assert!(
        at_first < pack.bytes / 4,
        "the upstream saw nothing until git had sent {at_first} of {} bytes: buffered?",
        pack.bytes
    );
    assert!(
        growth < pack.bytes / 2,
        "the process grew by {growth} bytes during a {}-byte push",
        pack.bytes
    );
    fx.assert_upstream_clean();
    drop(relay);
}

/// Stock git asks for `100 Continue` only when the server offered Negotiate; force it with an
/// extra header, over an HTTP/1.1-only upstream (so the proxy's upstream body is chunked too).
/// The proxy answers `100 Continue` itself and strips `Expect` towards the upstream.
#[tokio::test]
async fn expect_100_continue_from_git_works() {
    let Some(fx) = Fixture::start(Options {
        alpn: ALPN_H1,
        ..Options::default()
    })
    .await
    else {
        return;
    };
    let work = fx.clone("widgets").await;
    // Over http.postBuffer (1 MiB), so git streams the pack chunked.
    write_random_file(&work.join("medium.bin"), 3 * MIB, 7);
    let pushed = fx.sandbox.commit(&work, "Add a medium blob", &[]).await;
    let trace = fx.sandbox.path("curl-trace.txt");
    let trace_str = trace.to_str().unwrap();
    let env = [
        ("GIT_TRACE_CURL", trace_str),
        ("GIT_TRACE_CURL_NO_DATA", "1"),
    ];
    fx.sandbox
        .run_env(
            &work,
            &[
                "-c",
                "http.extraHeader=Expect: 100-continue",
                "push",
                "--quiet",
                "origin",
                "main",
            ],
            &env,
        )
        .await;
    assert_eq!(fx.upstream_ref("refs/heads/main").await, pushed);

    let trace_text = std::fs::read_to_string(&trace).unwrap();
    let sent_expect = trace_text
        .lines()
        .filter(|l| l.contains("=> Send header: Expect: 100-continue"))
        .count();
    let got_continue = trace_text
        .lines()
        .filter(|l| l.contains("<= Recv header: HTTP/1.1 100 Continue"))
        .count();
    assert!(
        trace_text.contains("=> Send header: Transfer-Encoding: chunked"),
        "the push was not chunked:\n{trace_text}"
    );
    assert!(sent_expect > 0, "git sent no Expect:\n{trace_text}");
    assert!(
        got_continue > 0,
        "the proxy never answered 100 Continue:\n{trace_text}"
    );

    // Fetching with Expect works too (upload-pack POSTs).
    fx.sandbox
        .run(
            &work,
            &[
                "-c",
                "http.extraHeader=Expect: 100-continue",
                "fetch",
                "--quiet",
                "origin",
            ],
        )
        .await;
    fx.assert_upstream_clean();
    let requests = fx.upstream.mock.requests();
    assert!(requests.iter().all(|r| r.version == http::Version::HTTP_11));
    // The pack went upstream chunked, so the CGI read it to EOF without a CONTENT_LENGTH.
    assert!(
        requests.iter().any(|r| r.uri.ends_with("/git-receive-pack")
            && r.header("transfer-encoding") == Some("chunked")
            && r.header("content-length").is_none()),
        "{requests:#?}"
    );
}

/// The `git config` line `check` prints for a repository route (README, CI runners): the
/// existing `https://bitbucket.org/acme/widgets.git` remote goes through the proxy unchanged,
/// and a repository outside the route table is left alone.
#[tokio::test]
async fn scoped_insteadof_line_clones_through_the_proxy() {
    let Some(fx) = Fixture::start(Options::default()).await else {
        return;
    };
    let rewrite = format!(
        "url.http://{}/git/acme/widgets.git.insteadOf=https://bitbucket.org/acme/widgets.git",
        fx.proxy_addr
    );
    // `ls-remote --get-url` only expands the URL: no network.
    let expanded = |url: &'static str| {
        let rewrite = rewrite.clone();
        let sandbox = &fx.sandbox;
        async move {
            sandbox
                .run(
                    sandbox.dir.path(),
                    &["-c", &rewrite, "ls-remote", "--get-url", url],
                )
                .await
        }
    };
    assert_eq!(
        expanded("https://bitbucket.org/atlassian/python-bitbucket.git").await,
        "https://bitbucket.org/atlassian/python-bitbucket.git"
    );
    assert_eq!(
        expanded("https://bitbucket.org/acme/widgets.git").await,
        format!("http://{}/git/acme/widgets.git", fx.proxy_addr)
    );
    fx.sandbox
        .run(
            fx.sandbox.dir.path(),
            &[
                "-c",
                &rewrite,
                "clone",
                "--quiet",
                "https://bitbucket.org/acme/widgets.git",
                "ci-checkout",
            ],
        )
        .await;
    let work = fx.sandbox.path("ci-checkout");
    assert_eq!(
        fx.sandbox.run(&work, &["rev-parse", "HEAD"]).await,
        fx.seeded_head
    );
    // The remote stays the Bitbucket URL; the rewrite happens on every use.
    assert_eq!(
        fx.sandbox
            .run(&work, &["config", "remote.origin.url"])
            .await,
        "https://bitbucket.org/acme/widgets.git"
    );
    fx.assert_upstream_clean();
}

/// The sandbox really cannot prompt: when the upstream refuses the proxy's credential, git
/// fails at once with an authentication error instead of waiting for a password.
#[tokio::test]
async fn refused_credential_fails_fast_without_a_prompt() {
    let Some(fx) = Fixture::start(Options::default()).await else {
        return;
    };
    let url = format!("http://{}/git/acme/gadgets.git", fx.proxy_addr);
    let started = Instant::now();
    let output = fx
        .sandbox
        .try_run(fx.sandbox.dir.path(), &["clone", &url, "gadgets"])
        .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("could not read Username") || stderr.contains("Authentication failed"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    let requests = fx.upstream.mock.requests();
    assert!(!requests.is_empty());
    for request in requests {
        assert_eq!(
            request.header("authorization"),
            Some(basic("x-token-auth", REVOKED_TOKEN).as_str())
        );
    }
    assert!(fx.upstream.stderr().is_empty(), "{}", fx.upstream.stderr());
}

/// `upstream.timeout` bounds the wait for the response head, not the upload: an upstream that
/// answers only once the whole push has arrived (as a buffering front end does) must not turn a
/// slow but moving push into a 504. Over h2 (`git_http2 = true`), where the upstream's flow
/// control paces the upload, so the proxy sees it move for as long as the upstream reads it.
/// Over HTTP/1.1 (git's default) the proxy sees it move only while it can write: the socket
/// buffers (several MiB on loopback) take in the last MiB of this push long before this mock,
/// reading 300 ms per MiB, has read it, so a 1 s `timeout` runs out (docs/configuration.md).
#[tokio::test]
async fn slow_push_outlasts_the_response_head_timeout() {
    let Some(fx) = Fixture::start(Options {
        upstream_lines: "timeout = \"1s\"\nidle_timeout = \"10s\"\ngit_http2 = true",
        respond_after_body: true,
        pause_per_mib: Duration::from_millis(300),
        ..Options::default()
    })
    .await
    else {
        return;
    };
    let work = fx.clone("widgets").await;
    write_random_file(&work.join("medium.bin"), 8 * MIB, 11);
    let pushed = fx.sandbox.commit(&work, "Add a medium blob", &[]).await;
    let started = Instant::now();
    let output = fx
        .sandbox
        .try_run(&work, &["push", "--quiet", "origin", "main"])
        .await;
    let elapsed = started.elapsed();
    assert!(
        output.status.success(),
        "push failed after {elapsed:?}:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        elapsed > Duration::from_secs(2),
        "the upload was not slow: {elapsed:?}"
    );
    assert_eq!(fx.upstream_ref("refs/heads/main").await, pushed);
    fx.assert_upstream_clean();
}

/// API tokens authenticate git as `x-bitbucket-api-token-auth`; clone and push work with one.
#[tokio::test]
async fn clone_and_push_with_an_api_token() {
    let Some(fx) = Fixture::start(Options {
        api_token: true,
        ..Options::default()
    })
    .await
    else {
        return;
    };
    let work = fx.clone("widgets").await;
    assert_eq!(
        fx.sandbox.run(&work, &["rev-parse", "HEAD"]).await,
        fx.seeded_head
    );
    let pushed = fx
        .sandbox
        .commit(&work, "Release notes", &[("NOTES.md", b"v1\n")])
        .await;
    fx.sandbox
        .run(&work, &["push", "--quiet", "origin", "main"])
        .await;
    assert_eq!(fx.upstream_ref("refs/heads/main").await, pushed);
    fx.assert_upstream_clean();
    assert_eq!(
        fx.upstream.mock.requests()[0].header("authorization"),
        Some(basic("x-bitbucket-api-token-auth", API_TOKEN).as_str())
    );
}
