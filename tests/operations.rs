//! Day-two operations (issue 4): reload without restart (file rewrite, Kubernetes symlink swap,
//! invalid config), graceful drain in-process and on SIGTERM, the admin endpoints, unix-socket
//! listeners, credential verification, the `health` subcommand, and no secret in `/-/metrics`.
//!
//! Every proxy here loads its config from a file in its own temporary directory, with the CA and
//! the secrets next to it, so the directories its reload watcher observes belong to that test
//! alone (a CA file in the shared temp directory would make every test's files reload it).

mod support;

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bitbucket_auth_proxy::{Config, RunningProxy, ShutdownOutcome};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::sync::mpsc;

const BIN: &str = env!("CARGO_BIN_EXE_bitbucket-auth-proxy");

const OLD_TOKEN: &str = "old-repo-token-Qm4vT8";
const NEW_TOKEN: &str = "new-repo-token-Zx7pK2";
const WIDGETS_PATH: &str = "/2.0/repositories/acme/widgets/src";

// ---------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------

/// A test's own directory: `ca.pem`, `proxy.toml`, and whatever secrets the test writes.
struct Dir {
    tmp: tempfile::TempDir,
}

impl Dir {
    fn new(pki: &TestPki) -> Dir {
        let dir = Dir {
            tmp: tempfile::tempdir().expect("temp dir"),
        };
        dir.write("ca.pem", &pki.ca_pem);
        dir
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.tmp.path().join(relative)
    }

    fn write(&self, relative: &str, contents: &str) -> PathBuf {
        let path = self.path(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn config_path(&self) -> PathBuf {
        self.path("proxy.toml")
    }

    /// Writes `proxy.toml` in place.
    fn write_config(&self, text: &str) -> PathBuf {
        self.write("proxy.toml", text)
    }

    /// Replaces `proxy.toml` the way editors and config management do: write aside, rename over.
    fn replace_config(&self, text: &str) {
        let aside = self.write(".proxy.toml.tmp", text);
        std::fs::rename(aside, self.config_path()).unwrap();
    }
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// A config whose API and git upstreams are `api` and `git`, trusting `ca.pem`. `server` and
/// `upstream` are extra lines for those sections; `rest` holds credentials and routes.
fn config_text(
    api: &str,
    git: &str,
    listen: &[String],
    server: &str,
    upstream: &str,
    rest: &str,
) -> String {
    let listen: Vec<String> = listen.iter().map(|l| toml_string(l)).collect();
    format!(
        "[server]\nlisten = [{}]\n{server}\n\n[upstream]\napi_url = {}\ngit_url = {}\nca_file = \"ca.pem\"\ntimeout = \"10s\"\n{upstream}\n{rest}\n",
        listen.join(", "),
        toml_string(api),
        toml_string(git),
    )
}

/// The `widgets-ci` repository token, read from `secrets/token`, on one route.
const WIDGETS: &str = r#"
[credentials.widgets-ci]
kind = "repository_access_token"
repository = "acme/widgets"
token = { file = "secrets/token" }

[[routes]]
prefix = "/2.0/repositories/acme/widgets"
credential = "widgets-ci"
"#;

fn widgets_config(api: &str) -> String {
    config_text(api, api, &["127.0.0.1:0".into()], "", "", WIDGETS)
}

async fn start(config: &Path) -> RunningProxy {
    let loaded = Config::load(config).unwrap_or_else(|e| panic!("invalid test config:\n{e}"));
    bitbucket_auth_proxy::start(loaded)
        .await
        .expect("start the proxy")
}

/// The common start: a directory whose `secrets/token` holds `OLD_TOKEN`, and the proxy serving
/// `widgets_config` against `api`.
async fn start_widgets(pki: &TestPki, api: &MockUpstream) -> (Dir, RunningProxy, SocketAddr) {
    let dir = Dir::new(pki);
    dir.write("secrets/token", &format!("{OLD_TOKEN}\n"));
    let proxy = start(&dir.write_config(&widgets_config(&api.base_url()))).await;
    let addr = proxy.local_addrs()[0];
    (dir, proxy, addr)
}

/// `start_widgets` with `NEW_TOKEN` waiting in `secrets/next-token`; also returns the config
/// that switches to it.
async fn start_widgets_with_next_token(
    pki: &TestPki,
    api: &MockUpstream,
) -> (Dir, RunningProxy, SocketAddr, String) {
    let (dir, proxy, addr) = start_widgets(pki, api).await;
    dir.write("secrets/next-token", &format!("{NEW_TOKEN}\n"));
    let next = widgets_config(&api.base_url()).replace("secrets/token", "secrets/next-token");
    (dir, proxy, addr, next)
}

async fn assert_drains(proxy: RunningProxy) {
    assert_eq!(
        proxy.shutdown(Duration::from_secs(5)).await,
        ShutdownOutcome::Drained
    );
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn base64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64(&format!("{user}:{password}")))
}

/// A mock that answers every request with the `Authorization` it received as the body.
fn echo_auth(head: &RecordedRequestHead) -> Response<Full<Bytes>> {
    Response::new(Full::from(
        head.header("authorization").unwrap_or("<none>").to_owned(),
    ))
}

/// The `Authorization` the upstream saw for one request through the proxy.
async fn auth_seen(addr: SocketAddr) -> String {
    let response = get(addr, WIDGETS_PATH).await;
    assert_eq!(response.status(), StatusCode::OK, "{response:?}");
    body_string(response.into_body()).await
}

/// Upper bound for something asynchronous to settle (a reload, an access record). Generous
/// because CI machines are small and shared; the waits end as soon as the condition holds.
const SETTLE_WITHIN: Duration = Duration::from_secs(10);

/// Polls until requests carry `expected` upstream; returns how long that took.
async fn wait_for_auth(addr: SocketAddr, expected: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let seen = auth_seen(addr).await;
        if seen == expected {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "still sending {seen:?} upstream {within:?} after the change, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `check` until it returns `Ok`, or panics with its last error after `within`.
async fn eventually<T, F, Fut>(within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(why) if Instant::now() >= deadline => panic!("not within {within:?}: {why}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

async fn metrics(addr: SocketAddr) -> String {
    let response = get(addr, "/-/metrics").await;
    assert_eq!(response.status(), StatusCode::OK, "{response:?}");
    body_string(response.into_body()).await
}

/// The value of one exact series (`name{labels}`) in a metrics exposition.
/// The reload series of `/-/metrics`, as written there.
#[derive(Debug, PartialEq, Eq)]
struct ReloadSeries<'a> {
    generation: Option<&'a str>,
    ok: Option<&'a str>,
    failed: Option<&'a str>,
}

impl<'a> ReloadSeries<'a> {
    fn of(text: &'a str) -> Self {
        ReloadSeries {
            generation: sample(text, "bitbucket_auth_proxy_config_generation"),
            ok: sample(
                text,
                r#"bitbucket_auth_proxy_config_reloads_total{result="ok"}"#,
            ),
            failed: sample(
                text,
                r#"bitbucket_auth_proxy_config_reloads_total{result="failed"}"#,
            ),
        }
    }
}

fn sample<'a>(text: &'a str, series: &str) -> Option<&'a str> {
    text.lines()
        .filter_map(|line| line.rsplit_once(' '))
        .find(|(name, _)| *name == series)
        .map(|(_, value)| value)
}

/// `/-/ready` once `upstream.keep_warm`'s first connection has settled: right after start-up it
/// may still report the spare as connecting, for at most `upstream.connect_timeout`.
async fn ready_after_warm_up(addr: SocketAddr) -> (StatusCode, serde_json::Value) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, json) = ready(addr).await;
        let warming = json["problems"].as_array().is_some_and(|problems| {
            problems.iter().any(|p| {
                p.as_str()
                    .is_some_and(|p| p.starts_with("upstream.keep_warm"))
            })
        });
        if !warming || tokio::time::Instant::now() > deadline {
            return (status, json);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ready(addr: SocketAddr) -> (StatusCode, serde_json::Value) {
    let response = get(addr, "/-/ready").await;
    let status = response.status();
    let body = collect_body(response.into_body()).await;
    let json = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "/-/ready is not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    });
    (status, json)
}

/// A mock whose `/downloads/` responses are held open: each one's body sender goes to the
/// returned receiver, for the test to feed. Every other path echoes the `Authorization` it got.
fn held_downloads_mock(
    pki: &TestPki,
) -> (MockUpstream, mpsc::UnboundedReceiver<mpsc::Sender<Bytes>>) {
    let (feeders_tx, feeders) = mpsc::unbounded_channel::<mpsc::Sender<Bytes>>();
    let api = MockUpstream::start(pki.server_config(), move |head, body| {
        let feeders_tx = feeders_tx.clone();
        async move {
            drain_body(body).await;
            if head.uri.contains("/downloads/") {
                let (tx, body) = fed_body();
                feeders_tx.send(tx).unwrap();
                octet_stream(body)
            } else {
                echo_auth(&head).map(|b| b.map_err(|never| match never {}).boxed())
            }
        }
    });
    (api, feeders)
}

/// A response body the test feeds chunk by chunk; it ends when the sender is dropped.
fn fed_body() -> (mpsc::Sender<Bytes>, BoxBody) {
    let (tx, mut rx) = mpsc::channel::<Bytes>(1);
    let body = http_body_util::StreamBody::new(futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }));
    (tx, BoxBody::new(body))
}

const CHUNK: usize = 16 * 1024;

/// Chunk `i` of a streamed pattern body.
fn chunk(i: usize) -> Bytes {
    Bytes::from(pattern_bytes((i * CHUNK) as u64, CHUNK))
}

/// `chunks` pattern chunks, the first at once and then one every `interval`; `done` is set once
/// the last one was handed over.
fn streamed_body(chunks: usize, interval: Duration, done: Arc<AtomicBool>) -> BoxBody {
    let (tx, body) = fed_body();
    tokio::spawn(async move {
        for i in 0..chunks {
            if i > 0 {
                tokio::time::sleep(interval).await;
            }
            if tx.send(chunk(i)).await.is_err() {
                return;
            }
        }
        done.store(true, Ordering::SeqCst);
    });
    body
}

fn octet_stream(body: BoxBody) -> Response<BoxBody> {
    Response::builder()
        .header("content-type", "application/octet-stream")
        .body(body)
        .unwrap()
}

/// Reads the next data frame of `body`.
async fn next_data(body: &mut Incoming) -> Bytes {
    loop {
        let frame = body
            .frame()
            .await
            .expect("the body ended early")
            .expect("the body failed");
        if let Ok(data) = frame.into_data() {
            return data;
        }
    }
}

/// Reads `body` to its end, appending to `received`.
async fn read_to_end(body: &mut Incoming, received: &mut Vec<u8>) {
    while let Some(frame) = body.frame().await {
        let frame =
            frame.unwrap_or_else(|e| panic!("the body failed after {} bytes: {e}", received.len()));
        if let Ok(data) = frame.into_data() {
            received.extend_from_slice(&data);
        }
    }
}

fn assert_pattern(received: &[u8], chunks: usize) {
    assert_eq!(received.len(), chunks * CHUNK, "the body was cut short");
    assert!(
        received == pattern_bytes(0, chunks * CHUNK).as_slice(),
        "the body arrived corrupted"
    );
}

// ---------------------------------------------------------------------------
// 1. Secrets rotate without a restart
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_file_rewritten_in_place_is_used_within_two_seconds() {
    let pki = TestPki::new();
    let api = MockUpstream::start_simple(pki.server_config(), echo_auth);
    let (dir, proxy, addr) = start_widgets(&pki, &api).await;
    let token = dir.path("secrets/token");
    assert_eq!(auth_seen(addr).await, bearer(OLD_TOKEN));

    use std::os::unix::fs::MetadataExt as _;
    let inode = std::fs::metadata(&token).unwrap().ino();
    std::fs::write(&token, format!("{NEW_TOKEN}\n")).unwrap();
    assert_eq!(
        std::fs::metadata(&token).unwrap().ino(),
        inode,
        "not in place"
    );

    wait_for_auth(addr, &bearer(NEW_TOKEN), SETTLE_WITHIN).await;
    assert!(proxy.state().current().number >= 2);
    assert_eq!(proxy.local_addrs()[0], addr, "same listener, no restart");
    assert_drains(proxy).await;
}

/// Kubernetes updates a Secret volume by writing a new timestamped directory, pointing a
/// temporary `..data_tmp` symlink at it and renaming that over `..data`; the file the config
/// names (`token -> ..data/token`) never changes itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_symlink_swap_is_seen_while_a_request_in_flight_keeps_the_old_token() {
    let pki = TestPki::new();
    let (api, mut feeders) = held_downloads_mock(&pki);

    let dir = Dir::new(&pki);
    dir.write("secrets/..2026_a/token", &format!("{OLD_TOKEN}\n"));
    let secrets = dir.path("secrets");
    std::os::unix::fs::symlink("..2026_a", secrets.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/token", secrets.join("token")).unwrap();
    let proxy = start(&dir.write_config(&widgets_config(&api.base_url()))).await;
    let addr = proxy.local_addrs()[0];
    assert_eq!(auth_seen(addr).await, bearer(OLD_TOKEN));

    // A slow download starts before the swap: head and first chunk arrive, the rest is held.
    let slow_path = "/2.0/repositories/acme/widgets/downloads/slow";
    let mut slow = get(addr, slow_path).await;
    assert_eq!(slow.status(), StatusCode::OK);
    let feeder = feeders.recv().await.unwrap();
    feeder.send(chunk(0)).await.unwrap();
    let mut received = next_data(slow.body_mut()).await.to_vec();

    dir.write("secrets/..2026_b/token", &format!("{NEW_TOKEN}\n"));
    std::os::unix::fs::symlink("..2026_b", secrets.join("..data_tmp")).unwrap();
    std::fs::rename(secrets.join("..data_tmp"), secrets.join("..data")).unwrap();
    std::fs::remove_dir_all(secrets.join("..2026_a")).unwrap();

    wait_for_auth(addr, &bearer(NEW_TOKEN), SETTLE_WITHIN).await;
    let (status, ready_json) = ready(addr).await;
    assert_eq!(status, StatusCode::OK, "{ready_json}");

    // The download started with the old token and is still streaming; it now completes intact.
    const CHUNKS: usize = 8;
    let finish = tokio::spawn(async move {
        for i in 1..CHUNKS {
            feeder.send(chunk(i)).await.unwrap();
        }
    });
    read_to_end(slow.body_mut(), &mut received).await;
    finish.await.unwrap();
    assert_pattern(&received, CHUNKS);
    let slow_head = api
        .requests()
        .into_iter()
        .find(|r| r.uri == slow_path)
        .expect("the mock saw the slow request");
    assert_eq!(
        slow_head.header("authorization"),
        Some(bearer(OLD_TOKEN).as_str())
    );
    assert_drains(proxy).await;
}

// ---------------------------------------------------------------------------
// 2. An invalid config on reload keeps the old one serving
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_on_reload_is_refused_and_the_old_one_keeps_serving() {
    let pki = TestPki::new();
    let api = MockUpstream::start_simple(pki.server_config(), echo_auth);
    let (dir, proxy, addr, next) = start_widgets_with_next_token(&pki, &api).await;
    let reload = proxy.reload_handle();
    // Only explicit reloads here, so the counts below are exact (the file watcher would reload
    // on the same writes; the next test covers it).
    reload.stop();

    // Points at the next token, but with an unknown key: nothing of it may be applied.
    dir.write_config(&format!("unknown_key = true\n{next}"));
    let error = reload
        .reload()
        .await
        .expect_err("an invalid config was accepted");
    assert!(error.to_string().contains("unknown_key"), "{error}");

    assert_eq!(auth_seen(addr).await, bearer(OLD_TOKEN));
    let text = metrics(addr).await;
    assert_eq!(
        ReloadSeries::of(&text),
        ReloadSeries {
            generation: Some("1"),
            ok: None,
            failed: Some("1"),
        },
        "{text}"
    );
    let (status, json) = ready(addr).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["config_generation"], 1, "{json}");

    // A later valid config is taken.
    dir.write_config(&next);
    assert_eq!(reload.reload().await.expect("a valid config"), 2);
    assert_eq!(auth_seen(addr).await, bearer(NEW_TOKEN));
    let text = metrics(addr).await;
    assert_eq!(
        ReloadSeries::of(&text),
        ReloadSeries {
            generation: Some("2"),
            ok: Some("1"),
            failed: Some("1"),
        },
        "{text}"
    );
    assert_eq!(ready(addr).await.1["config_generation"], 2);
    assert_drains(proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_ignores_an_invalid_config_and_applies_the_next_valid_one() {
    let pki = TestPki::new();
    let api = MockUpstream::start_simple(pki.server_config(), echo_auth);
    let (dir, proxy, addr, next) = start_widgets_with_next_token(&pki, &api).await;
    dir.replace_config(&format!("unknown_key = true\n{next}"));
    eventually(SETTLE_WITHIN, move || async move {
        let text = metrics(addr).await;
        match ReloadSeries::of(&text).failed {
            Some(_) => Ok(()),
            None => Err(format!("no failed reload counted:\n{text}")),
        }
    })
    .await;
    assert_eq!(proxy.state().current().number, 1);
    assert_eq!(auth_seen(addr).await, bearer(OLD_TOKEN));

    dir.replace_config(&next);
    wait_for_auth(addr, &bearer(NEW_TOKEN), SETTLE_WITHIN).await;
    assert!(proxy.state().current().number >= 2);
    assert_drains(proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrelated_files_beside_the_config_do_not_trigger_reloads() {
    let pki = TestPki::new();
    let api = MockUpstream::start_simple(pki.server_config(), echo_auth);
    let (dir, proxy, addr) = start_widgets(&pki, &api).await;
    // A log file written next to the config, and an editor's swap file beside the secret.
    for i in 0..10 {
        dir.write("proxy.log", &format!("line {i}\n").repeat(i + 1));
        dir.write("secrets/.token.swp", &format!("{i}"));
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        proxy.state().current().number,
        1,
        "no reload for unrelated files"
    );
    // A real change still reloads.
    dir.write("secrets/token", &format!("{NEW_TOKEN}\n"));
    wait_for_auth(addr, &bearer(NEW_TOKEN), SETTLE_WITHIN).await;
    assert_eq!(proxy.state().current().number, 2);
    proxy.shutdown(Duration::from_secs(5)).await;
}

// ---------------------------------------------------------------------------
// 3. Graceful drain
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_streaming_response_finish_and_refuses_new_connections() {
    const CHUNKS: usize = 16;
    let pki = TestPki::new();
    let done = Arc::new(AtomicBool::new(false));
    let mock_done = done.clone();
    // About 1.5 s of body: a chunk every 100 ms.
    let api = MockUpstream::start(pki.server_config(), move |_head, body| {
        let done = mock_done.clone();
        async move {
            drain_body(body).await;
            octet_stream(streamed_body(CHUNKS, Duration::from_millis(100), done))
        }
    });
    let (_dir, proxy, addr) = start_widgets(&pki, &api).await;

    let mut response = get(addr, "/2.0/repositories/acme/widgets/downloads/big").await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut received = next_data(response.body_mut()).await.to_vec();

    let shutdown = tokio::spawn(proxy.shutdown(Duration::from_secs(10)));
    eventually(Duration::from_secs(1), move || async move {
        match tokio::net::TcpStream::connect(addr).await {
            Err(_) => Ok(()),
            Ok(_) => Err("a new connection was still accepted after shutdown began".to_owned()),
        }
    })
    .await;
    assert!(
        !done.load(Ordering::SeqCst),
        "the stream ended before new connections were refused; the test proves nothing"
    );
    assert!(
        !shutdown.is_finished(),
        "shutdown did not wait for the stream"
    );

    read_to_end(response.body_mut(), &mut received).await;
    assert_pattern(&received, CHUNKS);
    let outcome = tokio::time::timeout(Duration::from_secs(3), shutdown)
        .await
        .expect("shutdown did not return once the stream finished")
        .unwrap();
    assert_eq!(outcome, ShutdownOutcome::Drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cuts_what_is_still_running_when_the_grace_period_ends() {
    let pki = TestPki::new();
    let (api, mut feeders) = held_downloads_mock(&pki);
    let (_dir, proxy, addr) = start_widgets(&pki, &api).await;

    let mut response = get(addr, "/2.0/repositories/acme/widgets/downloads/endless").await;
    let _feeder = feeders.recv().await.unwrap();
    let started = Instant::now();
    let outcome = proxy.shutdown(Duration::from_millis(300)).await;
    assert_eq!(outcome, ShutdownOutcome::GraceExpired);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // The client sees a cut connection, not a complete body.
    let ended = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match response.body_mut().frame().await {
                Some(Ok(_)) => continue,
                Some(Err(_)) => return true,
                None => return false,
            }
        }
    })
    .await;
    assert_eq!(
        ended,
        Ok(true),
        "the response was not cut (Err: still open)"
    );
}

/// A port that was free a moment ago (the binary must be told a fixed port to be reachable).
fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    listener.local_addr().unwrap()
}

async fn read_all<R: tokio::io::AsyncRead + Unpin>(mut reader: R) -> String {
    use tokio::io::AsyncReadExt as _;
    let mut buf = Vec::new();
    let _ = reader.read_to_end(&mut buf).await;
    String::from_utf8_lossy(&buf).into_owned()
}

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_reloads_on_sighup_and_drains_a_streaming_response_on_sigterm_then_exits_zero() {
    const CHUNKS: usize = 6;
    let pki = TestPki::new();
    let (api, mut feeders) = held_downloads_mock(&pki);
    let dir = Dir::new(&pki);
    dir.write("secrets/token", &format!("{OLD_TOKEN}\n"));
    let listen = free_port();
    let config = dir.write_config(&config_text(
        &api.base_url(),
        &api.base_url(),
        &[listen.to_string()],
        "shutdown_grace = \"10s\"",
        "",
        WIDGETS,
    ));

    let mut child = tokio::process::Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .arg("--log-format")
        .arg("json")
        .env_remove("BITBUCKET_AUTH_PROXY_CONFIG")
        .env("RUST_LOG", "info")
        // One worker runs on tokio's current-thread scheduler (src/cli/mod.rs), as a sidecar on
        // one CPU does; the library's tests run on multi-thread runtimes.
        .env("TOKIO_WORKER_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the proxy");
    let pid = child.id().expect("pid");
    let stderr = tokio::spawn(read_all(child.stderr.take().unwrap()));

    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(listen).await.is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the proxy exited with {status} before listening:\n{}",
                stderr.await.unwrap()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the proxy never listened on {listen}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(auth_seen(listen).await, bearer(OLD_TOKEN));

    // SIGHUP reloads (nothing changed, so only the generation moves).
    signal(pid, "HUP");
    eventually(SETTLE_WITHIN, move || async move {
        let (_, json) = ready(listen).await;
        if json["config_generation"] == 2 {
            Ok(())
        } else {
            Err(format!("no reload after SIGHUP: {json}"))
        }
    })
    .await;

    // A slow download is running when SIGTERM arrives.
    let mut slow = get(listen, "/2.0/repositories/acme/widgets/downloads/slow").await;
    assert_eq!(slow.status(), StatusCode::OK);
    let feeder = feeders.recv().await.unwrap();
    feeder.send(chunk(0)).await.unwrap();
    let mut received = next_data(slow.body_mut()).await.to_vec();

    signal(pid, "TERM");
    eventually(Duration::from_secs(3), move || async move {
        match tokio::net::TcpStream::connect(listen).await {
            Err(_) => Ok(()),
            Ok(_) => Err("still accepting connections after SIGTERM".to_owned()),
        }
    })
    .await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the proxy exited with a request in flight"
    );
    let finish = tokio::spawn(async move {
        for i in 1..CHUNKS {
            tokio::time::sleep(Duration::from_millis(50)).await;
            feeder.send(chunk(i)).await.unwrap();
        }
    });
    read_to_end(slow.body_mut(), &mut received).await;
    finish.await.unwrap();
    assert_pattern(&received, CHUNKS);

    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("the proxy did not exit after draining")
        .unwrap();
    let log = stderr.await.unwrap();
    assert_eq!(status.code(), Some(0), "exit status {status}:\n{log}");
    assert!(log.contains("drained, exiting"), "{log}");
    assert!(!log.contains(OLD_TOKEN), "{log}");
}

// ---------------------------------------------------------------------------
// 4. Admin endpoints
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_answer_with_the_documented_content() {
    let pki = TestPki::new();
    let api = MockUpstream::start_simple(pki.server_config(), |_head| {
        Response::builder()
            .header("x-ratelimit-limit", "1000")
            .header("x-ratelimit-nearlimit", "false")
            .body(Full::from("{}"))
            .unwrap()
    });
    let (_dir, proxy, addr) = start_widgets(&pki, &api).await;

    let response = get(addr, "/-/health").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body = collect_body(response.into_body()).await;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json, serde_json::json!({ "status": "ok" }));

    let (status, json) = ready_after_warm_up(addr).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["status"], "ready", "{json}");
    assert_eq!(json["config_generation"], 1, "{json}");
    assert_eq!(json["draining"], false, "{json}");
    assert_eq!(json["problems"], serde_json::json!([]), "{json}");

    // One proxied request; its query must not become a label.
    let response = get(addr, &format!("{WIDGETS_PATH}?at=main")).await;
    assert_eq!(response.status(), StatusCode::OK);
    drain_body(response.into_body()).await;

    let response = get(addr, "/-/metrics").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{response:?}"
    );
    // The access record is written when the response body is done, which may trail the client.
    let text = eventually(SETTLE_WITHIN, move || async move {
        let text = metrics(addr).await;
        let series = r#"bitbucket_auth_proxy_requests_total{route="/2.0/repositories/acme/widgets",credential="widgets-ci",method="GET",status_class="2xx"}"#;
        match sample(&text, series) {
            Some("1") => Ok(text),
            other => Err(format!("{series} is {other:?}:\n{text}")),
        }
    })
    .await;
    let labels = r#"{route="/2.0/repositories/acme/widgets",credential="widgets-ci"}"#;
    for (series, value) in [
        (
            format!("bitbucket_auth_proxy_upstream_response_seconds_count{labels}"),
            Some("1"),
        ),
        (
            format!("bitbucket_auth_proxy_request_duration_seconds_count{labels}"),
            Some("1"),
        ),
        (
            r#"bitbucket_auth_proxy_ratelimit_limit{credential="widgets-ci"}"#.to_owned(),
            Some("1000"),
        ),
        (
            r#"bitbucket_auth_proxy_ratelimit_near_limit{credential="widgets-ci"}"#.to_owned(),
            Some("0"),
        ),
        (
            format!(
                "bitbucket_auth_proxy_build_info{{version=\"{}\",commit=\"{}\",commit_date=\"{}\"}}",
                env!("CARGO_PKG_VERSION"),
                bitbucket_auth_proxy::base::build_info::COMMIT.unwrap_or(""),
                bitbucket_auth_proxy::base::build_info::COMMIT_DATE.unwrap_or(""),
            ),
            Some("1"),
        ),
        (
            "bitbucket_auth_proxy_config_generation".to_owned(),
            Some("1"),
        ),
    ] {
        assert_eq!(sample(&text, &series), value, "{series}:\n{text}");
    }
    let in_flight: i64 = sample(&text, "bitbucket_auth_proxy_in_flight_requests")
        .unwrap_or_else(|| panic!("no in_flight_requests:\n{text}"))
        .parse()
        .unwrap();
    assert!((0..=1).contains(&in_flight), "{text}");
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(!text.contains("/src"), "a raw path became a label:\n{text}");
    assert!(!text.contains("at=main"), "a query became a label:\n{text}");

    let response = send(
        addr,
        Request::post("/-/health").body(full_body("x")).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(response.headers()["allow"], "GET, HEAD");

    let response = send(addr, Request::head("/-/health").body(empty_body()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(collect_body(response.into_body()).await.is_empty());

    for unknown in ["/-/nope", "/-", "/-/health/extra"] {
        let response = get(addr, unknown).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{unknown}");
    }
    assert_eq!(
        api.request_count(),
        1,
        "an admin request reached the upstream"
    );
    proxy.shutdown(Duration::from_secs(5)).await;
}

/// A client that leaves while the upstream has not answered is no longer in flight, and its
/// request is counted (as 4xx: logged as 499, "client closed request").
#[tokio::test]
async fn a_client_leaving_before_the_response_head_is_not_left_in_flight() {
    let pki = TestPki::new();
    let api = TlsThenHang::start(pki.server_config());
    let dir = Dir::new(&pki);
    dir.write("secrets/token", &format!("{OLD_TOKEN}\n"));
    let proxy = start(&dir.write_config(&widgets_config(&api.base_url()))).await;
    let addr = proxy.local_addrs()[0];

    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::AsyncWriteExt as _;
    client
        .write_all(b"GET /2.0/repositories/acme/widgets HTTP/1.1\r\nHost: proxy\r\n\r\n")
        .await
        .unwrap();
    eventually(Duration::from_secs(5), || async {
        let in_flight = sample(
            &metrics(addr).await,
            "bitbucket_auth_proxy_in_flight_requests",
        )
        .map(str::to_owned);
        // The metrics request itself is one.
        (in_flight.as_deref() == Some("2"))
            .then_some(())
            .ok_or(format!("{in_flight:?}"))
    })
    .await;
    drop(client);

    let closed = r#"bitbucket_auth_proxy_requests_total{route="",credential="",method="GET",status_class="4xx"}"#;
    eventually(Duration::from_secs(5), || async {
        let text = metrics(addr).await;
        let in_flight = sample(&text, "bitbucket_auth_proxy_in_flight_requests");
        let counted = sample(&text, closed);
        (in_flight == Some("1") && counted == Some("1"))
            .then_some(())
            .ok_or(format!(
                "in flight {in_flight:?}, counted {counted:?}:\n{text}"
            ))
    })
    .await;
    assert_drains(proxy).await;
}

#[test]
fn a_route_under_the_admin_prefix_is_rejected() {
    for prefix in ["/-/x", "/-"] {
        let text = format!(
            r#"
[credentials.bot]
kind = "api_token"
email = "bot@acme.example"
token = {{ value = "t" }}

[[routes]]
prefix = "{prefix}"
credential = "bot"
"#
        );
        let error = Config::from_toml(Path::new("proxy.toml"), &text)
            .expect_err("a route under /-/ was accepted")
            .to_string();
        assert!(
            error.contains("routes[0].prefix") && error.contains("reserved"),
            "{prefix}: {error}"
        );
    }
}

// ---------------------------------------------------------------------------
// 5. Unix sockets
// ---------------------------------------------------------------------------

async fn unix_get(path: &Path, target: &str) -> Response<Incoming> {
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::get(target)
        .header("host", "localhost")
        .body(empty_body())
        .unwrap();
    sender.send_request(request).await.unwrap()
}

fn unix_config(api: &str, socket: &Path, mode: &str) -> String {
    config_text(
        api,
        api,
        &[format!("unix:{}", socket.display())],
        &format!("unix_socket_mode = {}", toml_string(mode)),
        "",
        WIDGETS,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_listener_replaces_a_stale_socket_and_serves_with_the_configured_mode() {
    let pki = TestPki::new();
    let api = MockUpstream::start_simple(pki.server_config(), echo_auth);
    let dir = Dir::new(&pki);
    dir.write("secrets/token", &format!("{OLD_TOKEN}\n"));
    let socket = dir.path("p.sock");
    // Left behind by a process that died: bound, never unlinked.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());

    let proxy = start(&dir.write_config(&unix_config(&api.base_url(), &socket, "0600"))).await;
    assert_eq!(proxy.unix_paths(), std::slice::from_ref(&socket));
    assert!(proxy.local_addrs().is_empty());
    let mode = std::fs::symlink_metadata(&socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");

    let response = unix_get(&socket, WIDGETS_PATH).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body_string(response.into_body()).await, bearer(OLD_TOKEN));
    let response = unix_get(&socket, "/-/health").await;
    assert_eq!(response.status(), StatusCode::OK);

    assert_drains(proxy).await;
    assert!(!socket.exists(), "the socket file outlived the proxy");
}

#[tokio::test]
async fn unix_socket_path_holding_a_regular_file_or_a_live_socket_fails_start_clearly() {
    let pki = TestPki::new();
    let dir = Dir::new(&pki);
    dir.write("secrets/token", &format!("{OLD_TOKEN}\n"));
    let api = "https://127.0.0.1:9";

    let file = dir.write("not-a.sock", "precious data");
    let config = Config::load(&dir.write_config(&unix_config(api, &file, "0660"))).unwrap();
    let error = bitbucket_auth_proxy::start(config)
        .await
        .err()
        .expect("started over a regular file")
        .to_string();
    assert!(
        error.contains(&file.display().to_string()) && error.contains("not a socket"),
        "{error}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious data");

    let live = dir.path("live.sock");
    let _other = tokio::net::UnixListener::bind(&live).unwrap();
    let config = Config::load(&dir.write_config(&unix_config(api, &live, "0660"))).unwrap();
    let error = bitbucket_auth_proxy::start(config)
        .await
        .err()
        .expect("took over a socket another process serves")
        .to_string();
    assert!(error.contains("another process"), "{error}");
    assert!(live.exists());
}

// ---------------------------------------------------------------------------
// 6. Credential verification
// ---------------------------------------------------------------------------

const EMAIL: &str = "release-bot@acme.example";
const API_TOKEN: &str = "ATATT-api-token-Nc4yD6";
const WORKSPACE_TOKEN: &str = "workspace-token-Rt5mZ1";

/// Answers the probe of each credential by its `Authorization`: the expired repository token
/// gets 401, the workspace token 403, everything else 200.
fn bitbucket_probe(head: &RecordedRequestHead) -> Response<Full<Bytes>> {
    let status = match head.header("authorization") {
        Some(auth) if auth == bearer(OLD_TOKEN) => StatusCode::UNAUTHORIZED,
        Some(auth) if auth == bearer(WORKSPACE_TOKEN) => StatusCode::FORBIDDEN,
        Some(_) => StatusCode::OK,
        None => StatusCode::UNAUTHORIZED,
    };
    json_status(status)
}

fn json_status(status: StatusCode) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::from("{}"))
        .unwrap()
}

/// Polls `/-/ready` until no credential is `pending`.
async fn checked_ready(addr: SocketAddr) -> (StatusCode, serde_json::Value) {
    eventually(Duration::from_secs(3), move || async move {
        let (status, json) = ready(addr).await;
        let pending = json["credentials"]
            .as_object()
            .is_some_and(|c| c.values().any(|v| v["state"] == "pending"));
        if pending {
            Err(format!("still pending: {json}"))
        } else {
            Ok((status, json))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_an_expired_token_as_unauthorized_until_it_is_rotated() {
    let pki = TestPki::new();
    let api = MockUpstream::start_simple(pki.server_config(), bitbucket_probe);
    let dir = Dir::new(&pki);
    dir.write("secrets/token", &format!("{OLD_TOKEN}\n"));
    dir.write("secrets/api-token", API_TOKEN);
    let rest = format!(
        r#"
[credentials.widgets-ci]
kind = "repository_access_token"
repository = "acme/widgets"
token = {{ file = "secrets/token" }}
verify = true

[credentials.release-bot]
kind = "api_token"
email = "{EMAIL}"
token = {{ file = "secrets/api-token" }}
verify = true

[[routes]]
prefix = "/2.0/repositories/acme/widgets"
credential = "widgets-ci"

[[routes]]
prefix = "/2.0/user"
credential = "release-bot"
"#
    );
    let url = api.base_url();
    let proxy = start(&dir.write_config(&config_text(
        &url,
        &url,
        &["127.0.0.1:0".into()],
        "",
        "",
        &rest,
    )))
    .await;
    let addr = proxy.local_addrs()[0];

    let (status, json) = checked_ready(addr).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
    assert_eq!(json["status"], "not_ready", "{json}");
    let widgets = &json["credentials"]["widgets-ci"];
    assert_eq!(widgets["state"], "unauthorized", "{json}");
    assert!(
        widgets["detail"].as_str().unwrap().contains("401"),
        "{json}"
    );
    assert!(widgets["checked_at"].as_u64().unwrap() > 0, "{json}");
    assert_eq!(
        json["credentials"]["release-bot"]["state"], "valid",
        "{json}"
    );
    let problems = json["problems"].to_string();
    assert!(problems.contains("credentials.widgets-ci"), "{json}");
    assert!(!problems.contains("release-bot"), "{json}");

    let text = metrics(addr).await;
    for (credential, state, value) in [
        ("widgets-ci", "unauthorized", "1"),
        ("widgets-ci", "valid", "0"),
        ("widgets-ci", "pending", "0"),
        ("release-bot", "valid", "1"),
        ("release-bot", "unauthorized", "0"),
    ] {
        let series = format!(
            "bitbucket_auth_proxy_credential_verify{{credential=\"{credential}\",state=\"{state}\"}}"
        );
        assert_eq!(sample(&text, &series), Some(value), "{series}:\n{text}");
    }

    // Each probe went to the cheapest endpoint its credential can read, with its credential.
    let probes = api.requests();
    let probe = |uri: &str| {
        probes
            .iter()
            .find(|r| r.uri == uri)
            .unwrap_or_else(|| panic!("no probe of {uri}: {probes:?}"))
            .header("authorization")
            .map(str::to_owned)
    };
    assert_eq!(
        probe("/2.0/repositories/acme/widgets"),
        Some(bearer(OLD_TOKEN))
    );
    assert_eq!(probe("/2.0/user"), Some(basic(EMAIL, API_TOKEN)));

    // Rotating the token reloads, re-checks, and the proxy becomes ready.
    std::fs::write(dir.path("secrets/token"), NEW_TOKEN).unwrap();
    let json = eventually(Duration::from_secs(3), move || async move {
        match ready(addr).await {
            (StatusCode::OK, json) => Ok(json),
            (_, json) => Err(format!("not ready after the rotation: {json}")),
        }
    })
    .await;
    assert_eq!(
        json["credentials"]["widgets-ci"]["state"], "valid",
        "{json}"
    );
    proxy.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_rechecks_every_interval_and_reports_forbidden_tokens() {
    let pki = TestPki::new();
    let revoked = Arc::new(AtomicBool::new(false));
    let mock_revoked = revoked.clone();
    // The workspace token always lacks read access (403); the repository token is valid until
    // it is revoked.
    let api = MockUpstream::start_simple(pki.server_config(), move |head| {
        let auth = head.header("authorization");
        if mock_revoked.load(Ordering::SeqCst) && auth == Some(bearer(NEW_TOKEN).as_str()) {
            return json_status(StatusCode::UNAUTHORIZED);
        }
        bitbucket_probe(head)
    });
    let dir = Dir::new(&pki);
    dir.write("secrets/token", NEW_TOKEN);
    let rest = format!(
        r#"
[credentials.widgets-ci]
kind = "repository_access_token"
repository = "acme/widgets"
token = {{ file = "secrets/token" }}
verify = true

[credentials.acme-all]
kind = "workspace_access_token"
workspace = "acme"
token = {{ value = "{WORKSPACE_TOKEN}" }}
verify = true

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "acme-all"
"#
    );
    let url = api.base_url();
    let proxy = start(&dir.write_config(&config_text(
        &url,
        &url,
        &["127.0.0.1:0".into()],
        "",
        "verify_interval = \"1s\"",
        &rest,
    )))
    .await;
    let addr = proxy.local_addrs()[0];

    let (status, json) = checked_ready(addr).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
    assert_eq!(
        json["credentials"]["acme-all"]["state"], "forbidden",
        "{json}"
    );
    assert_eq!(
        json["credentials"]["widgets-ci"]["state"], "valid",
        "{json}"
    );
    assert!(
        api.requests()
            .iter()
            .any(|r| r.uri == "/2.0/repositories/acme?pagelen=1"),
        "the workspace token was not probed on its workspace"
    );

    // The token is revoked while the proxy runs: the next periodic check notices.
    revoked.store(true, Ordering::SeqCst);
    eventually(Duration::from_secs(3), move || async move {
        let (_, json) = ready(addr).await;
        if json["credentials"]["widgets-ci"]["state"] == "unauthorized" {
            Ok(())
        } else {
            Err(format!("the revocation went unnoticed: {json}"))
        }
    })
    .await;
    let text = metrics(addr).await;
    let series =
        r#"bitbucket_auth_proxy_credential_verify{credential="acme-all",state="forbidden"}"#;
    assert_eq!(sample(&text, series), Some("1"), "{text}");
    proxy.shutdown(Duration::from_secs(5)).await;
}

// ---------------------------------------------------------------------------
// 7. The `health` subcommand
// ---------------------------------------------------------------------------

async fn health_command(url: &str) -> (Option<i32>, String, String) {
    let output = tokio::process::Command::new(BIN)
        .arg("health")
        .arg("--url")
        .arg(url)
        .env_remove("BITBUCKET_AUTH_PROXY_CONFIG")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run the health subcommand");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_subcommand_succeeds_against_a_running_proxy_and_fails_on_a_closed_port() {
    let pki = TestPki::new();
    let dir = Dir::new(&pki);
    dir.write("secrets/token", &format!("{OLD_TOKEN}\n"));
    let socket = dir.path("h.sock");
    let proxy = start(&dir.write_config(&config_text(
        "https://127.0.0.1:9",
        "https://127.0.0.1:9",
        &["127.0.0.1:0".into(), format!("unix:{}", socket.display())],
        "",
        "",
        WIDGETS,
    )))
    .await;
    let addr = proxy.local_addrs()[0];

    let (code, stdout, stderr) = health_command(&format!("http://{addr}")).await;
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("healthy"), "{stdout}");

    let (code, stdout, stderr) = health_command(&format!("unix:{}", socket.display())).await;
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("healthy"), "{stdout}");

    let (code, stdout, stderr) = health_command(&format!("http://{}", closed_port())).await;
    assert_eq!(code, Some(1), "stdout: {stdout}\nstderr: {stderr}");
    assert!(!stdout.contains("healthy"), "{stdout}");
    assert!(stderr.contains("unhealthy"), "{stderr}");
    proxy.shutdown(Duration::from_secs(5)).await;
}

// ---------------------------------------------------------------------------
// 8. No secret in /-/metrics (or /-/ready)
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_readiness_never_contain_a_secret() {
    const PROJECT_TOKEN: &str = "project-token-Lk3pW8";
    const APP_USER: &str = "acme-legacy-bot";
    const APP_PASSWORD: &str = "app-password-Gf8sJ2";
    let secrets = [
        OLD_TOKEN,
        PROJECT_TOKEN,
        WORKSPACE_TOKEN,
        API_TOKEN,
        APP_PASSWORD,
    ];
    let users = [
        "x-token-auth",
        "x-bitbucket-api-token-auth",
        EMAIL,
        APP_USER,
    ];

    let pki = TestPki::new();
    let api = MockUpstream::start_simple(pki.server_config(), |head| {
        let status = if head.uri.ends_with("/denied") {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::OK
        };
        Response::builder()
            .status(status)
            .header("x-ratelimit-limit", "1000")
            .header("x-ratelimit-remaining", "998")
            .header("x-ratelimit-nearlimit", "false")
            .body(Full::from("{}"))
            .unwrap()
    });
    let dir = Dir::new(&pki);
    dir.write("secrets/token", &format!("{OLD_TOKEN}\n"));
    dir.write("secrets/api-token", API_TOKEN);
    let rest = format!(
        r#"
[credentials.widgets-ci]
kind = "repository_access_token"
repository = "acme/widgets"
token = {{ file = "secrets/token" }}
verify = true

[credentials.acme-web]
kind = "project_access_token"
workspace = "acme"
project = "WEB"
token = {{ value = "{PROJECT_TOKEN}" }}

[credentials.acme-all]
kind = "workspace_access_token"
workspace = "acme"
token = {{ value = "{WORKSPACE_TOKEN}" }}
verify = true

[credentials.release-bot]
kind = "api_token"
email = "{EMAIL}"
token = {{ file = "secrets/api-token" }}
verify = true

[credentials.legacy-bot]
kind = "app_password"
username = "{APP_USER}"
password = {{ value = "{APP_PASSWORD}" }}
verify = true

[[routes]]
prefix = "/2.0/repositories/acme/widgets"
credential = "widgets-ci"
methods = ["GET", "HEAD"]

[[routes]]
prefix = "/2.0/repositories/acme/web-app"
credential = "acme-web"

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "acme-all"

[[routes]]
prefix = "/release"
upstream_prefix = "/2.0/repositories/acme"
credential = "release-bot"

[[routes]]
prefix = "/legacy"
upstream_prefix = "/2.0"
credential = "legacy-bot"

[[routes]]
prefix = "/git/acme/widgets.git"
upstream = "git"
upstream_prefix = "/acme/widgets.git"
credential = "widgets-ci"
"#
    );
    // git goes nowhere: a 502 and an upstream error by kind.
    let git = format!("https://{}", closed_port());
    let proxy = start(&dir.write_config(&config_text(
        &api.base_url(),
        &git,
        &["127.0.0.1:0".into()],
        "",
        "connect_timeout = \"1s\"",
        &rest,
    )))
    .await;
    let addr = proxy.local_addrs()[0];

    let requests = [
        ("GET", "/2.0/repositories/acme/widgets/src?at=main", 200),
        ("HEAD", "/2.0/repositories/acme/widgets/src", 200),
        ("POST", "/2.0/repositories/acme/widgets/pullrequests", 405),
        ("GET", "/2.0/repositories/acme/widgets/denied", 401),
        ("GET", "/2.0/repositories/acme/web-app/src", 200),
        ("PUT", "/2.0/repositories/acme/gadgets", 200),
        ("GET", "/release/widgets/commits", 200),
        ("GET", "/legacy/user", 200),
        ("GET", "/2.0/snippets", 404),
        ("GET", "/git/acme/widgets.git/info/refs", 502),
        ("GET", "/-/nope", 404),
    ];
    for (method, target, status) in requests {
        let body = match method {
            "POST" | "PUT" => full_body("payload"),
            _ => empty_body(),
        };
        let request = Request::builder()
            .method(method)
            .uri(target)
            .header("authorization", "Basic Y2xpZW50OmNsaWVudA==")
            .body(body)
            .unwrap();
        let response = send(addr, request).await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{method} {target}");
        drain_body(response.into_body()).await;
    }
    let (_, ready_json) = checked_ready(addr).await;
    let ready_text = ready_json.to_string();
    let text = eventually(SETTLE_WITHIN, move || async move {
        let text = metrics(addr).await;
        let series = r#"bitbucket_auth_proxy_requests_total{route="/git/acme/widgets.git",credential="widgets-ci",method="GET",status_class="5xx"}"#;
        match sample(&text, series) {
            Some(_) => Ok(text),
            None => Err(format!("{series} missing:\n{text}")),
        }
    })
    .await;
    // The check is not vacuous: the exposition carries routes, credentials and verify states.
    for needle in [
        r#"credential="legacy-bot""#,
        r#"route="/release""#,
        r#"bitbucket_auth_proxy_upstream_errors_total{kind="upstream-unreachable"} 1"#,
        r#"bitbucket_auth_proxy_credential_verify{credential="release-bot",state="valid"} 1"#,
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }

    let mut forms: Vec<String> = Vec::new();
    for secret in secrets {
        forms.push(secret.to_owned());
        forms.push(base64(secret));
        for user in users {
            forms.push(base64(&format!("{user}:{secret}")));
        }
    }
    for (what, body) in [("/-/metrics", &text), ("/-/ready", &ready_text)] {
        for form in &forms {
            assert!(
                !body.contains(form.as_str()),
                "{what} contains the secret form {form:?}:\n{body}"
            );
        }
    }
    proxy.shutdown(Duration::from_secs(5)).await;
}
