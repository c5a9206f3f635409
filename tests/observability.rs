//! What an operator sees (issue 17): the access log's fields and request ids on a spawned
//! proxy's JSON log, the start-up and reload lines, and the admin listener (its endpoints, its
//! `allowed_clients`, and probes kept out of the request metrics).

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use http_body_util::Full;
use support::proxy::*;
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_bitbucket-auth-proxy");
const WIDGETS_PATH: &str = "/2.0/repositories/acme/widgets/src";
/// What the mock upstream sends as its own request id (Bitbucket's envoy header).
const UPSTREAM_TRACE_ID: &str = "c5cd43f1db956227";
/// A second loopback address, outside `allowed_clients = ["127.0.0.1/32"]`.
const OTHER_LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

// ---------------------------------------------------------------------------
// Fixture: the binary with a JSON log read as it is written
// ---------------------------------------------------------------------------

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    listener.local_addr().unwrap()
}

/// The binary, running `config`, its stderr collected line by line as JSON.
struct SpawnedProxy {
    child: tokio::process::Child,
    lines: Arc<Mutex<Vec<serde_json::Value>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl SpawnedProxy {
    fn spawn(config: &Path) -> SpawnedProxy {
        let mut child = tokio::process::Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(config)
            .arg("--log-format")
            .arg("json")
            .env_remove("BITBUCKET_AUTH_PROXY_CONFIG")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the proxy");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = lines.clone();
        let reader = tokio::spawn(async move {
            let mut stderr = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = stderr.next_line().await {
                let json = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
                sink.lock().unwrap().push(json);
            }
        });
        SpawnedProxy {
            child,
            lines,
            reader,
        }
    }

    fn lines(&self) -> Vec<serde_json::Value> {
        self.lines.lock().unwrap().clone()
    }

    async fn wait_for_line(
        &mut self,
        what: &str,
        matches: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(line) = self.lines().into_iter().find(&matches) {
                return line;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the proxy exited with {status}; no {what} line in {:#?}",
                    self.lines()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {what} line in {:#?}",
                self.lines()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGTERM, wait for the exit, and return every line logged.
    async fn stop(mut self) -> Vec<serde_json::Value> {
        let pid = self.child.id().expect("pid");
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(killed.success());
        let status = tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .expect("no exit after SIGTERM")
            .unwrap();
        assert!(status.success(), "exit status {status}");
        let lines = self.lines.clone();
        self.reader.await.unwrap();
        lines.lock().unwrap().clone()
    }
}

fn access_line<'a>(lines: &'a [serde_json::Value], request_id: &str) -> &'a serde_json::Value {
    let mut found = lines
        .iter()
        .filter(|l| l["target"] == "access" && l["request_id"] == request_id);
    let line = found
        .next()
        .unwrap_or_else(|| panic!("no access line for {request_id} in {lines:#?}"));
    assert!(found.next().is_none(), "two access lines for {request_id}");
    line
}

fn response_id<B>(response: &Response<B>) -> String {
    response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

/// `<12 hex digits>-<counter>`, the shape of an id the proxy made.
fn is_made_id(id: &str) -> bool {
    id.split_once('-').is_some_and(|(prefix, n)| {
        prefix.len() == 12
            && prefix.bytes().all(|b| b.is_ascii_hexdigit())
            && n.parse::<u64>().is_ok()
    })
}

/// A GET sent from `source` (a loopback address other than 127.0.0.1, to be refused).
async fn get_from(source: IpAddr, addr: SocketAddr, path: &str) -> RawResponse {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut text))
        .await
        .expect("no answer")
        .unwrap();
    RawResponse::parse(&text).unwrap_or_else(|| panic!("not an HTTP response: {text:?}"))
}

async fn get_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Response<hyper::body::Incoming> {
    let mut request = Request::get(path).header("connection", "close");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(addr, request.body(empty_body()).unwrap())
        .await
        .unwrap()
}

fn write_spawned_config(
    dir: &Path,
    listen: SocketAddr,
    admin: SocketAddr,
    api_url: &str,
    ca: &Path,
) -> PathBuf {
    std::fs::write(dir.join("token"), "observability-token-1\n").unwrap();
    let config = format!(
        r#"[server]
listen = ["{listen}"]
allowed_clients = ["127.0.0.1/32"]

[admin]
listen = ["{admin}"]

[upstream]
api_url = {api}
git_url = "https://{git_down}"
ca_file = {ca}
timeout = "10s"

[credentials.widgets-ci]
kind = "repository_access_token"
repository = "acme/widgets"
token = {{ file = "token" }}

[[routes]]
prefix = "/2.0/repositories/acme/widgets"
credential = "widgets-ci"

[[routes]]
prefix = "/git/acme/widgets.git"
upstream = "git"
upstream_prefix = "/acme/widgets.git"
credential = "widgets-ci"
"#,
        api = toml_string(api_url),
        git_down = closed_port(),
        ca = toml_string(&ca.display().to_string()),
    );
    let path = dir.join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    path
}

// ---------------------------------------------------------------------------
// The binary's log
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_log_names_the_client_the_request_id_and_the_upstreams_answer() {
    let pki = TestPki::new();
    let api = MockUpstream::start_simple(pki.server_config(), |_head| {
        Response::builder()
            .header("x-b3-traceid", UPSTREAM_TRACE_ID)
            .body(Full::from("{}"))
            .unwrap()
    });
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (free_port(), free_port());
    let config = write_spawned_config(dir.path(), listen, admin, &api.base_url(), pki.ca_path());
    let mut proxy = SpawnedProxy::spawn(&config);

    // The start-up line: what runs, from where, serving how much.
    let started = proxy
        .wait_for_line("start-up", |l| l["message"] == "started")
        .await;
    assert_eq!(
        started["version"],
        bitbucket_auth_proxy::base::build_info::long_version(),
        "{started}"
    );
    let config_resolved = config.canonicalize().unwrap().display().to_string();
    assert_eq!(started["config"], config_resolved, "{started}");
    assert_eq!(started["listen"], listen.to_string(), "{started}");
    assert_eq!(started["admin_listen"], admin.to_string(), "{started}");
    assert_eq!(started["routes"], 2, "{started}");
    assert_eq!(started["credentials"], 1, "{started}");

    // A valid incoming id goes upstream and comes back.
    let response = get_with(
        listen,
        WIDGETS_PATH,
        &[
            ("x-request-id", "ci-job-42"),
            ("user-agent", "observability-test/1.0"),
        ],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response_id(&response), "ci-job-42");
    drain_body(response.into_body()).await;
    assert_eq!(
        api.last_request().unwrap().header("x-request-id"),
        Some("ci-job-42")
    );

    // Invalid ones (a space; two ids; too long) are replaced by one the proxy makes, and
    // that one is what goes upstream.
    let too_long = "a".repeat(129);
    let mut made = Vec::new();
    for headers in [
        vec![("x-request-id", "has space")],
        vec![("x-request-id", "one"), ("x-request-id", "two")],
        vec![("x-request-id", too_long.as_str())],
        vec![],
    ] {
        let response = get_with(listen, WIDGETS_PATH, &headers).await;
        assert_eq!(response.status(), StatusCode::OK);
        let id = response_id(&response);
        drain_body(response.into_body()).await;
        assert!(is_made_id(&id), "{headers:?}: {id}");
        let sent = api.last_request().unwrap().header_all("x-request-id");
        assert_eq!(sent, [id.as_str()], "{headers:?}");
        made.push(id);
    }
    let distinct: std::collections::HashSet<&String> = made.iter().collect();
    assert_eq!(distinct.len(), made.len(), "ids repeat: {made:?}");

    // An upstream failure: the WARN line carries the same id as the access line.
    let response = get_with(listen, "/git/acme/widgets.git/info/refs", &[]).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let failed_id = response_id(&response);
    drain_body(response.into_body()).await;

    // A refused client: turned away at accept, before any request is read (so no request id);
    // the refusal's line says who.
    let refused = get_from(OTHER_LOOPBACK, listen, WIDGETS_PATH).await;
    assert_eq!(refused.status, 403);
    assert_eq!(
        refused.header("x-bitbucket-auth-proxy"),
        Some("client-not-allowed")
    );

    // A liveness probe on the main listener: answered, logged at debug only.
    let probe = get_with(listen, "/-/health", &[]).await;
    assert_eq!(probe.status(), StatusCode::OK);
    drain_body(probe.into_body()).await;

    // A reload names the file that changed.
    std::fs::write(dir.path().join("token"), "observability-token-2\n").unwrap();
    let token_path = dir.path().join("token").canonicalize().unwrap();
    let token_path = token_path.display().to_string();
    let reloaded = proxy
        .wait_for_line("reload", |l| l["message"] == "config reloaded")
        .await;
    assert_eq!(reloaded["config"], config_resolved, "{reloaded}");
    assert!(
        reloaded["cause"]
            .as_str()
            .is_some_and(|cause| cause.contains(&token_path)),
        "{reloaded}"
    );

    let lines = proxy.stop().await;

    let ok = access_line(&lines, "ci-job-42");
    assert_eq!(ok["client"], "127.0.0.1", "{ok}");
    assert_eq!(ok["method"], "GET", "{ok}");
    assert_eq!(ok["path"], WIDGETS_PATH, "{ok}");
    assert_eq!(ok["route"], "/2.0/repositories/acme/widgets", "{ok}");
    assert_eq!(ok["credential"], "widgets-ci", "{ok}");
    assert_eq!(ok["status"], 200, "{ok}");
    assert_eq!(ok["upstream_status"], 200, "{ok}");
    assert_eq!(ok["upstream_request_id"], UPSTREAM_TRACE_ID, "{ok}");
    assert_eq!(ok["user_agent"], "observability-test/1.0", "{ok}");
    assert_eq!(ok["outcome"], "complete", "{ok}");
    assert_eq!(ok["bytes_out"], 2, "{ok}");
    assert_eq!(ok["span"]["request_id"], "ci-job-42", "{ok}");
    let head_us = ok["upstream_head_us"]
        .as_u64()
        .unwrap_or_else(|| panic!("{ok}"));
    let total_us = ok["duration_us"].as_u64().unwrap_or_else(|| panic!("{ok}"));
    assert!(0 < head_us && head_us <= total_us, "{ok}");
    for id in &made {
        assert_eq!(access_line(&lines, id)["status"], 200);
    }

    let failed = access_line(&lines, &failed_id);
    assert_eq!(failed["status"], 502, "{failed}");
    assert!(failed["upstream_status"].is_null(), "{failed}");
    assert!(failed["upstream_head_us"].is_null(), "{failed}");
    let warn = lines
        .iter()
        .find(|l| l["message"] == "upstream failed")
        .unwrap_or_else(|| panic!("no upstream failure line in {lines:#?}"));
    assert_eq!(warn["level"], "WARN", "{warn}");
    assert_eq!(warn["span"]["request_id"], failed_id.as_str(), "{warn}");
    assert_eq!(warn["reason"], failed["reason"], "{warn}\n{failed}");

    let refused = lines
        .iter()
        .find(|l| l["message"] == "refused a connection from outside allowed_clients")
        .unwrap_or_else(|| panic!("no refusal line in {lines:#?}"));
    assert_eq!(refused["client"], OTHER_LOOPBACK.to_string(), "{refused}");
    assert_eq!(refused["reason"], "client-not-allowed", "{refused}");

    let access: Vec<_> = lines.iter().filter(|l| l["target"] == "access").collect();
    assert!(
        access.iter().all(|l| l["path"] != "/-/health"),
        "a successful probe was logged at info: {access:#?}"
    );
    // Every number on an access line is an integer: no 0.025086999999999998.
    for line in &access {
        for (key, value) in line.as_object().unwrap() {
            assert!(!value.is_f64(), "{key} is a float: {line}");
        }
    }
}

#[test]
fn version_matches_the_build_info_the_metrics_carry() {
    let output = std::process::Command::new(BIN)
        .arg("--version")
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let long = bitbucket_auth_proxy::base::build_info::long_version();
    assert_eq!(stdout.trim(), format!("bitbucket-auth-proxy {long}"));
    let metrics = bitbucket_auth_proxy::telemetry::metrics::Metrics::new().encode();
    let commit = bitbucket_auth_proxy::base::build_info::COMMIT.unwrap_or("");
    assert!(
        metrics.contains(&format!("commit=\"{commit}\"")),
        "{metrics}"
    );
    if let Some(commit) = bitbucket_auth_proxy::base::build_info::COMMIT {
        assert!(long.contains(commit), "{long}");
        assert_eq!(commit.len(), 7, "{long}");
    }
}

// ---------------------------------------------------------------------------
// The admin listener
// ---------------------------------------------------------------------------

fn sample<'a>(text: &'a str, series: &str) -> Option<&'a str> {
    text.lines()
        .filter_map(|line| line.rsplit_once(' '))
        .find(|(name, _)| *name == series)
        .map(|(_, value)| value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_serves_only_the_admin_endpoints_to_its_own_clients() {
    let pki = TestPki::new();
    let api = echo_mock(&pki);
    let proxy = Setup::new(&api.base_url(), pki.ca_path())
        .server("\n[admin]\nlisten = [\"127.0.0.1:0\"]\nallowed_clients = [\"127.0.0.2/32\"]\n")
        .start()
        .await;
    let main = proxy.addr;
    let admin = proxy.running.as_ref().unwrap().admin_addrs()[0];
    assert_ne!(main, admin);

    // The admin listener, from an allowed client: the three endpoints, and no route.
    for path in ["/-/health", "/-/ready", "/-/metrics"] {
        assert_eq!(
            get_from(OTHER_LOOPBACK, admin, path).await.status,
            200,
            "{path}"
        );
    }
    let not_a_route = get_from(OTHER_LOOPBACK, admin, WIDGETS_PATH).await;
    assert_eq!(not_a_route.status, 404);
    assert_eq!(
        not_a_route.header("x-bitbucket-auth-proxy"),
        Some("no-route")
    );
    assert_eq!(
        api.request_count(),
        0,
        "the admin listener forwarded a request"
    );

    // From a client outside admin.allowed_clients (but inside server.allowed_clients).
    let response = get(admin, "/-/health").await;
    assert_proxy_error(response, 403, "client-not-allowed").await;

    // The main listener keeps /-/health for simple probes; readiness and metrics moved.
    let response = get(main, "/-/health").await;
    assert_eq!(response.status(), StatusCode::OK);
    drain_body(response.into_body()).await;
    for path in ["/-/ready", "/-/metrics"] {
        assert_proxy_error(get(main, path).await, 404, "no-route").await;
    }
    let response = get(main, WIDGETS_PATH).await;
    assert_eq!(response.status(), StatusCode::OK);
    drain_body(response.into_body()).await;
    assert_eq!(api.request_count(), 1);

    // Probes are counted by endpoint, never as requests under an empty route.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = get_from(OTHER_LOOPBACK, admin, "/-/metrics").await.body;
        let health =
            r#"bitbucket_auth_proxy_admin_requests_total{endpoint="/-/health",status_class="2xx"}"#;
        let routed = r#"bitbucket_auth_proxy_requests_total{route="/2.0/repositories/acme/widgets",credential="widgets-ci",method="GET",status_class="2xx"}"#;
        if sample(&text, health) == Some("2") && sample(&text, routed) == Some("1") {
            break text;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for (series, value) in [
        (
            r#"bitbucket_auth_proxy_admin_requests_total{endpoint="/-/ready",status_class="2xx"}"#,
            "1",
        ),
        (
            r#"bitbucket_auth_proxy_admin_requests_total{endpoint="/-/ready",status_class="4xx"}"#,
            "1",
        ),
        (
            r#"bitbucket_auth_proxy_admin_requests_total{endpoint="/-/metrics",status_class="4xx"}"#,
            "1",
        ),
        (
            r#"bitbucket_auth_proxy_admin_requests_total{endpoint="other",status_class="4xx"}"#,
            "1",
        ),
    ] {
        assert_eq!(sample(&text, series), Some(value), "{series}:\n{text}");
    }
    assert!(
        !text.contains(r#"requests_total{route="""#),
        "an admin request was counted under an empty route:\n{text}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_admin_listener_probes_stay_on_the_main_listener_and_out_of_requests_total() {
    let pki = TestPki::new();
    let api = echo_mock(&pki);
    let proxy = Setup::new(&api.base_url(), pki.ca_path()).start().await;
    for path in ["/-/health", "/-/ready", "/-/health"] {
        let response = get(proxy.addr, path).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        drain_body(response.into_body()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = body_string(get(proxy.addr, "/-/metrics").await.into_body()).await;
        let health =
            r#"bitbucket_auth_proxy_admin_requests_total{endpoint="/-/health",status_class="2xx"}"#;
        if sample(&text, health) == Some("2") {
            assert!(!text.contains(r#"requests_total{route="""#), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.shutdown().await;
}
