//! Issue 5: corporate egress. The proxy reaches its (TLS) upstream through a real forward proxy
//! on loopback, Debian's tinyproxy, with `CONNECT`; TLS is verified end to end inside the tunnel.
//! `.ci/run` installs tinyproxy; without it these tests say so loudly and skip.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use support::proxy::{config_head, start_config};
use support::*;

const TOKEN: &str = "egress-test-token-P0q";

/// A tinyproxy on a free loopback port, logging every connection it opens.
struct Tinyproxy {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tinyproxy {
    fn start(extra: &str) -> Option<Tinyproxy> {
        let binary = ["/usr/bin/tinyproxy", "/usr/sbin/tinyproxy"]
            .into_iter()
            .find(|p| Path::new(p).exists());
        let Some(binary) = binary else {
            eprintln!(
                "\n*** SKIPPED: tinyproxy is not installed (apt-get install tinyproxy; .ci/run does) ***\n"
            );
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.path().join("tinyproxy.log");
        let conf = dir.path().join("tinyproxy.conf");
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 30\nLogFile \"{}\"\nLogLevel Info\nMaxClients 50\n\
                 Allow 127.0.0.1\nDisableViaHeader Yes\n{extra}\n",
                log.display()
            ),
        )
        .unwrap();
        let child = Command::new(binary)
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tinyproxy starts");
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tinyproxy did not start listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Tinyproxy {
            child,
            port,
            log,
            _dir: dir,
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_proxy(
    upstream: &MockUpstream,
    pki: &TestPki,
    egress: &str,
) -> bitbucket_auth_proxy::RunningProxy {
    // These tests count the tunnels and connections requests open; a warm spare would add one.
    let upstream_lines = format!("timeout = \"5s\"\nkeep_warm = false\n{egress}");
    let head = config_head(&upstream.base_url(), pki.ca_path(), &upstream_lines);
    let text = format!(
        r#"{head}
[credentials.acme-all]
kind = "workspace_access_token"
workspace = "acme"
token = {{ value = "{TOKEN}" }}

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "acme-all"
"#
    );
    start_config("egress.toml", &text).await
}

fn upstream(pki: &TestPki) -> MockUpstream {
    MockUpstream::start_simple(pki.server_config(), |head| {
        assert_eq!(
            head.header("authorization"),
            Some(&*format!("Bearer {TOKEN}"))
        );
        Response::new(Full::new(Bytes::from_static(b"{\"ok\":true}")))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_tunnel_through_the_configured_egress_proxy() {
    let Some(tinyproxy) = Tinyproxy::start("") else {
        return;
    };
    let pki = TestPki::new();
    let upstream = upstream(&pki);
    let proxy = start_proxy(
        &upstream,
        &pki,
        &format!("proxy = \"http://127.0.0.1:{}\"", tinyproxy.port),
    )
    .await;
    let addr = proxy.local_addrs()[0];
    for _ in 0..3 {
        let response = get(addr, "/2.0/repositories/acme/widgets").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body_string(response.into_body()).await, "{\"ok\":true}");
    }
    let log = tinyproxy.log();
    let target = format!("127.0.0.1:{}", upstream.addr().port());
    assert!(
        log.contains("CONNECT") && log.contains(&target),
        "tinyproxy must have tunnelled to {target}:\n{log}"
    );
    // The tunnel is pooled like a direct connection.
    assert_eq!(upstream.connection_count(), 1);
    assert_eq!(upstream.request_count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_proxy_credentials_are_sent_and_a_refusal_is_a_502() {
    let Some(tinyproxy) = Tinyproxy::start("BasicAuth ci-runner s3cret-egress") else {
        return;
    };
    let pki = TestPki::new();
    let upstream = upstream(&pki);
    let good = start_proxy(
        &upstream,
        &pki,
        &format!(
            "proxy = \"http://127.0.0.1:{}\"\nproxy_username = \"ci-runner\"\nproxy_password = {{ value = \"s3cret-egress\" }}",
            tinyproxy.port
        ),
    )
    .await;
    let response = get(good.local_addrs()[0], "/2.0/repositories/acme/widgets").await;
    assert_eq!(response.status(), StatusCode::OK);

    let bad = start_proxy(
        &upstream,
        &pki,
        &format!(
            "proxy = \"http://127.0.0.1:{}\"\nproxy_username = \"ci-runner\"\nproxy_password = {{ value = \"wrong\" }}",
            tinyproxy.port
        ),
    )
    .await;
    let response = get(bad.local_addrs()[0], "/2.0/repositories/acme/widgets").await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        response.headers()["x-bitbucket-auth-proxy"],
        "upstream-unreachable"
    );
    assert_eq!(
        upstream.request_count(),
        1,
        "only the authorised tunnel reached upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_verified_inside_the_tunnel() {
    let Some(tinyproxy) = Tinyproxy::start("") else {
        return;
    };
    let pki = TestPki::new();
    // An upstream whose certificate does not name 127.0.0.1: the tunnel works, TLS must not.
    let impostor = MockUpstream::start_simple(pki.wrong_name_server_config(), |_| {
        Response::new(Full::new(Bytes::from_static(b"impostor")))
    });
    let proxy = start_proxy(
        &impostor,
        &pki,
        &format!("proxy = \"http://127.0.0.1:{}\"", tinyproxy.port),
    )
    .await;
    let response = get(proxy.local_addrs()[0], "/2.0/repositories/acme/widgets").await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(response.headers()["x-bitbucket-auth-proxy"], "upstream-tls");
    assert_eq!(impostor.request_count(), 0);
    assert!(tinyproxy.log().contains("CONNECT"));
}

#[tokio::test]
async fn an_unreachable_egress_proxy_is_a_502_not_a_direct_connection() {
    let pki = TestPki::new();
    let upstream = upstream(&pki);
    let proxy = start_proxy(
        &upstream,
        &pki,
        &format!("proxy = \"http://{}\"", closed_port()),
    )
    .await;
    let response = get(proxy.local_addrs()[0], "/2.0/repositories/acme/widgets").await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        upstream.connection_count(),
        0,
        "never around the egress proxy"
    );
}
