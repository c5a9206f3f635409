//! Issue 13, "Hardening": the reload watcher and a log file in a watched directory. With
//! `RUST_LOG=trace` and stderr written next to the config, the watcher used to feed on its own
//! log lines (about a million in seconds). The binary runs as users run it, logging to a file.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_bitbucket-auth-proxy");

fn free_port() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    listener.local_addr().unwrap()
}

fn config(listen: SocketAddr, workspace: &str) -> String {
    // The upstreams are a loopback port nothing listens on: no request is sent in this test.
    format!(
        r#"[server]
listen = ["{listen}"]

[upstream]
api_url = "https://127.0.0.1:9"
git_url = "https://127.0.0.1:9"

[credentials.acme]
kind = "workspace_access_token"
workspace = "{workspace}"
token = {{ file = "acme.token" }}

[[routes]]
prefix = "/2.0/repositories/{workspace}"
credential = "acme"
"#
    )
}

fn lines(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .count()
}

async fn wait_for(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !done() {
        assert!(Instant::now() < until, "{what} within {deadline:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_log_file_in_a_watched_directory_does_not_feed_the_watcher() {
    let dir = tempfile::tempdir().unwrap();
    let listen = free_port();
    let config_path = dir.path().join("proxy.toml");
    std::fs::write(&config_path, config(listen, "acme")).unwrap();
    std::fs::write(dir.path().join("acme.token"), "watch-test-token-Hy62\n").unwrap();
    let log = dir.path().join("proxy.log");
    let mut child = tokio::process::Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(&config_path)
        .arg("--log-format")
        .arg("json")
        .env_remove("BITBUCKET_AUTH_PROXY_CONFIG")
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the proxy");
    wait_for("the proxy listens", Duration::from_secs(20), || {
        std::net::TcpStream::connect(listen).is_ok()
    })
    .await;
    wait_for("the watcher starts", Duration::from_secs(5), || {
        std::fs::read_to_string(&log).is_ok_and(|text| text.contains("\"started\""))
    })
    .await;

    // Idle, every line the proxy writes is an event in the watched directory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = lines(&log);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = lines(&log) - before;
    assert!(
        idle < 20,
        "{idle} lines logged in 2 s while idle: the watcher feeds on its own log"
    );

    // Events for the config's own files still reload it.
    std::fs::write(&config_path, config(listen, "acme-renamed")).unwrap();
    wait_for(
        "the edited config is reloaded",
        Duration::from_secs(10),
        || std::fs::read_to_string(&log).is_ok_and(|text| text.contains("config reloaded")),
    )
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("watch-test-token-Hy62"));
    child.kill().await.unwrap();
}
