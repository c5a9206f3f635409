//! The in-process proxy fixture shared by the end-to-end suites: one credential of every kind,
//! the issue's example routes, a [`Setup`] builder for the config and a [`TestProxy`] running in
//! the test's runtime, plus checks for the proxy's own error responses.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use bitbucket_auth_proxy::error::REASON_HEADER;
use bitbucket_auth_proxy::{Config, RunningProxy, ShutdownOutcome};
use bytes::Bytes;
use http::Response;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::{
    MockUpstream, RawResponse, RecordedRequestHead, TestPki, collect_body, full_body, raw_request,
};

pub const REPO_TOKEN: &str = "repo-token-7Hq2xVb9";
pub const PROJECT_TOKEN: &str = "project-token-Lk3pW8";
pub const WORKSPACE_TOKEN: &str = "workspace-token-Rt5mZ1";
pub const API_EMAIL: &str = "release-bot@acme.example";
pub const API_TOKEN: &str = "ATATT-api-token-Nc4yD6";
pub const APP_USER: &str = "acme-legacy-bot";
pub const APP_PASSWORD: &str = "app-password-Gf8sJ2";

/// One credential of every kind, inline so parallel tests need no environment variables.
pub fn credentials_toml() -> String {
    format!(
        r#"
[credentials.widgets-ci]
kind = "repository_access_token"
repository = "acme/widgets"
token = {{ value = "{REPO_TOKEN}" }}

[credentials.acme-web]
kind = "project_access_token"
workspace = "acme"
project = "WEB"
token = {{ value = "{PROJECT_TOKEN}" }}

[credentials.acme-all]
kind = "workspace_access_token"
workspace = "acme"
token = {{ value = "{WORKSPACE_TOKEN}" }}

[credentials.release-bot]
kind = "api_token"
email = "{API_EMAIL}"
token = {{ value = "{API_TOKEN}" }}

[credentials.legacy-bot]
kind = "app_password"
username = "{APP_USER}"
password = {{ value = "{APP_PASSWORD}" }}
"#
    )
}

/// The issue's example routes: a GET-only repository route inside a workspace route, an alias,
/// and a git route.
pub const DEFAULT_ROUTES: &str = r#"
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
prefix = "/git/acme/widgets.git"
upstream = "git"
upstream_prefix = "/acme/widgets.git"
credential = "widgets-ci"
"#;

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

pub fn basic(user: &str, password: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

pub fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// A proxy config under construction: upstream URLs, the test CA, and extra TOML lines.
pub struct Setup {
    api_url: String,
    git_url: String,
    ca_file: String,
    server: String,
    upstream: String,
    routes: String,
    keep_warm: bool,
}

impl Setup {
    /// Both upstreams at `url`, trusting the test CA, with [`DEFAULT_ROUTES`].
    pub fn new(url: &str, ca: &Path) -> Setup {
        Setup {
            api_url: url.to_owned(),
            git_url: url.to_owned(),
            ca_file: ca.display().to_string(),
            server: String::new(),
            upstream: "timeout = \"10s\"\n".to_owned(),
            routes: DEFAULT_ROUTES.to_owned(),
            keep_warm: false,
        }
    }

    pub fn git_url(mut self, url: &str) -> Setup {
        self.git_url = url.to_owned();
        self
    }

    /// Extra lines for `[server]`.
    pub fn server(mut self, lines: &str) -> Setup {
        self.server = lines.to_owned();
        self
    }

    /// Replaces the extra lines of `[upstream]` (default: `timeout = "10s"`).
    pub fn upstream(mut self, lines: &str) -> Setup {
        self.upstream = lines.to_owned();
        self
    }

    /// Leaves `upstream.keep_warm` at its default (on). Off otherwise: most tests count the
    /// upstream connections their requests open, and a spare would be one more.
    pub fn keep_warm(mut self) -> Setup {
        self.keep_warm = true;
        self
    }

    pub fn routes(mut self, routes: &str) -> Setup {
        self.routes = routes.to_owned();
        self
    }

    pub fn toml(&self) -> String {
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n{}\n\n[upstream]\napi_url = {}\ngit_url = {}\nca_file = {}\n{}{}\n{}\n{}",
            self.server,
            toml_string(&self.api_url),
            toml_string(&self.git_url),
            toml_string(&self.ca_file),
            if self.keep_warm {
                ""
            } else {
                "keep_warm = false\n"
            },
            self.upstream,
            credentials_toml(),
            self.routes,
        )
    }

    pub async fn start(self) -> TestProxy {
        let text = self.toml();
        let config = Config::from_toml(Path::new("test.toml"), &text)
            .unwrap_or_else(|e| panic!("invalid test config:\n{e}\n---\n{text}"));
        let running = bitbucket_auth_proxy::start(config)
            .await
            .expect("start proxy");
        let addr = running.local_addrs()[0];
        TestProxy {
            running: Some(running),
            addr,
        }
    }
}

/// The head of a test config: a loopback listener on a free port, and `[upstream]` pointing
/// the API at `api_url`, trusting the test CA at `ca`. Tests append their `upstream_lines`
/// (still in `[upstream]`), then their own credentials and routes.
pub fn config_head(api_url: &str, ca: &Path, upstream_lines: &str) -> String {
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n\n[upstream]\napi_url = {}\nca_file = {}\n{upstream_lines}\n",
        toml_string(api_url),
        toml_string(&ca.display().to_string()),
    )
}

/// A proxy started in this test's runtime from config text; `name` is the file name its
/// errors would carry.
pub async fn start_config(name: &str, text: &str) -> RunningProxy {
    let config = Config::from_toml(Path::new(name), text)
        .unwrap_or_else(|e| panic!("invalid test config:\n{e}\n---\n{text}"));
    bitbucket_auth_proxy::start(config)
        .await
        .expect("proxy starts")
}

/// A proxy running in this test's runtime; dropping it stops accepting.
pub struct TestProxy {
    pub running: Option<RunningProxy>,
    pub addr: SocketAddr,
}

impl TestProxy {
    pub async fn shutdown(mut self) -> ShutdownOutcome {
        let running = self.running.take().expect("running");
        running.shutdown(Duration::from_secs(5)).await
    }
}

/// A TLS mock (h2 + http/1.1) answering `200 <METHOD> <target>`.
pub fn echo_mock(pki: &TestPki) -> MockUpstream {
    MockUpstream::start_simple(pki.server_config(), echo)
}

pub fn echo(head: &RecordedRequestHead) -> Response<Full<Bytes>> {
    Response::new(Full::from(format!("{} {}", head.method, head.uri)))
}

/// Checks a response made by the proxy itself: status, reason header, Bitbucket's error JSON.
pub async fn assert_proxy_error(response: Response<Incoming>, status: u16, reason: &str) {
    assert_eq!(response.status().as_u16(), status, "{response:?}");
    assert_eq!(
        response.headers().get(REASON_HEADER).map(|v| v.as_bytes()),
        Some(reason.as_bytes()),
        "{response:?}"
    );
    assert_eq!(response.headers()["content-type"], "application/json");
    let body = collect_body(response.into_body()).await;
    assert_error_json(&body);
}

/// `{"type":"error","error":{"message":"...","detail":"..."}}`.
pub fn assert_error_json(body: &[u8]) {
    let json: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)));
    assert_eq!(json["type"], "error", "{json}");
    assert!(
        json["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{json}"
    );
    assert!(
        json["error"]["detail"]
            .as_str()
            .is_some_and(|d| !d.is_empty()),
        "{json}"
    );
}

/// Sends raw bytes (which should include `Connection: close`) and parses the response.
pub async fn raw(addr: SocketAddr, request: &str) -> RawResponse {
    let text = raw_request(addr, request.as_bytes()).await;
    RawResponse::parse(&text).unwrap_or_else(|| panic!("no HTTP response to {request:?}: {text:?}"))
}

/// What a [`body_mock`] saw of request bodies: the ones that arrived whole, and how many broke
/// off (reset, truncated, or cut by the proxy).
#[derive(Clone, Default)]
pub struct BodyLog {
    pub complete: Arc<Mutex<Vec<Bytes>>>,
    pub aborted: Arc<AtomicUsize>,
}

impl BodyLog {
    pub fn complete(&self) -> Vec<Bytes> {
        self.complete.lock().unwrap().clone()
    }

    pub fn aborted(&self) -> usize {
        self.aborted.load(Ordering::SeqCst)
    }
}

/// A TLS mock (h2 + http/1.1) that reads every request body to its end before answering
/// `200 <METHOD> <target> <body>`, logging whole and broken bodies.
pub fn body_mock(pki: &TestPki) -> (MockUpstream, BodyLog) {
    let log = BodyLog::default();
    let seen = log.clone();
    let mock = MockUpstream::start(pki.server_config(), move |head, body| {
        let seen = seen.clone();
        async move {
            match body.collect().await {
                Ok(body) => {
                    let body = body.to_bytes();
                    seen.complete.lock().unwrap().push(body.clone());
                    let text = format!(
                        "{} {} {}",
                        head.method,
                        head.uri,
                        String::from_utf8_lossy(&body)
                    );
                    Response::new(full_body(text))
                }
                Err(_) => {
                    seen.aborted.fetch_add(1, Ordering::SeqCst);
                    let mut response = Response::new(full_body("aborted"));
                    *response.status_mut() = http::StatusCode::BAD_REQUEST;
                    response
                }
            }
        }
    });
    (mock, log)
}

/// Counts panics on the test's thread. A `#[tokio::test]` runs the proxy's tasks on that same
/// thread (current-thread runtime), so a panicking connection task — caught by tokio, and
/// otherwise unnoticed — is counted, while other tests' failures are not.
pub struct PanicWatch(usize);

thread_local! {
    static PANICS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl PanicWatch {
    pub fn start() -> PanicWatch {
        static HOOK: OnceLock<()> = OnceLock::new();
        HOOK.get_or_init(|| {
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                PANICS.with(|p| p.set(p.get() + 1));
                default(info);
            }));
        });
        PanicWatch(PANICS.with(|p| p.get()))
    }

    pub fn assert_none(&self) {
        let now = PANICS.with(|p| p.get());
        assert_eq!(now, self.0, "{} panic(s) during the test", now - self.0);
    }
}

/// Still serving: an ordinary GET through `proxy` gets the mock's 200.
pub async fn assert_still_serving(proxy: &TestProxy) {
    let response = super::get(proxy.addr, "/2.0/repositories/acme/gadgets/alive").await;
    assert_eq!(response.status(), 200, "the proxy stopped serving");
    super::drain_body(response.into_body()).await;
}
