//! A real `redis-server` (the Debian package) for the shared-store tests, and proxy replicas
//! run as separate processes of the built binary.
//!
//! [`RedisServer`] starts the server on a free loopback port in a temporary directory with no
//! persistence (`--save "" --appendonly no`), so a restart comes back empty, as a crashed
//! cache would; it is killed when dropped. [`Replica`] writes a config and runs
//! `bitbucket-auth-proxy run` on a free loopback port until dropped.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

pub const REDIS_SERVER: &str = "/usr/bin/redis-server";
const BIN: &str = env!("CARGO_BIN_EXE_bitbucket-auth-proxy");

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .expect("bind a free port")
        .port()
}

/// Polls until something accepts connections on `addr`, or panics after `within`.
async fn wait_listening(addr: SocketAddr, within: Duration, child: &mut Child, what: &str) {
    let deadline = Instant::now() + within;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("{what} exited with {status} before listening on {addr}");
        }
        assert!(Instant::now() < deadline, "{what} never listened on {addr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Extra arguments (TLS, a password), kept for restarts.
    extra: Vec<String>,
    tls: bool,
}

impl RedisServer {
    /// Starts `redis-server`; panics with a hint if the package is missing.
    pub async fn start() -> RedisServer {
        Self::start_with(tempfile::tempdir().expect("tempdir"), Vec::new(), false).await
    }

    /// With `requirepass`, and TLS only (no plain port) with the test PKI's leaf for
    /// 127.0.0.1, not asking clients for certificates.
    pub async fn start_tls(pki: &super::TestPki, password: &str) -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = pki.write_server_pem(dir.path());
        let mut extra: Vec<String> = vec!["--requirepass".into(), password.into()];
        for (flag, path) in [
            ("--tls-cert-file", cert.as_path()),
            ("--tls-key-file", key.as_path()),
            ("--tls-ca-cert-file", pki.ca_path()),
        ] {
            extra.push(flag.into());
            extra.push(path.display().to_string());
        }
        extra.extend(["--tls-auth-clients".into(), "no".into()]);
        Self::start_with(dir, extra, true).await
    }

    async fn start_with(dir: tempfile::TempDir, extra: Vec<String>, tls: bool) -> RedisServer {
        assert!(
            Path::new(REDIS_SERVER).exists(),
            "{REDIS_SERVER} is missing: install the redis-server package (.ci/run does)"
        );
        let mut server = RedisServer {
            port: free_port(),
            dir,
            child: None,
            extra,
            tls,
        };
        server.run().await;
        server
    }

    async fn run(&mut self) {
        let (port_flag, other_port) = if self.tls {
            ("--tls-port", ["--port", "0"])
        } else {
            ("--port", ["--tls-port", "0"])
        };
        let mut child = Command::new(REDIS_SERVER)
            .args(["--bind", "127.0.0.1", port_flag])
            .arg(self.port.to_string())
            .args(other_port)
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(self.dir.path())
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn redis-server");
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        wait_listening(addr, Duration::from_secs(10), &mut child, "redis-server").await;
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server at once (SIGKILL: no shutdown save, nothing flushed).
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill redis-server");
        }
    }

    /// Starts it again on the same port, empty.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.run().await;
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test redis-server")
    }

    /// Every key with everything it holds (strings, hashes, sorted sets with their scores,
    /// lists, sets), as text, by a full SCAN of the keyspace.
    pub async fn dump(&self) -> Vec<(String, Vec<String>)> {
        let mut connection = self.connection().await;
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut connection)
                .await
                .expect("SCAN");
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let mut dump = Vec::new();
        for key in keys {
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut connection)
                .await
                .expect("TYPE");
            let read = |command: &str, args: &[&str]| {
                let mut cmd = redis::cmd(command);
                cmd.arg(&key);
                for arg in args {
                    cmd.arg(*arg);
                }
                cmd
            };
            // Bodies need not be UTF-8: read bytes, compare as lossy text.
            let values: Vec<Vec<u8>> = match kind.as_str() {
                "string" => vec![
                    read("GET", &[])
                        .query_async(&mut connection)
                        .await
                        .expect("GET"),
                ],
                "hash" => read("HGETALL", &[])
                    .query_async(&mut connection)
                    .await
                    .expect("HGETALL"),
                "zset" => read("ZRANGE", &["0", "-1", "WITHSCORES"])
                    .query_async(&mut connection)
                    .await
                    .expect("ZRANGE"),
                "list" => read("LRANGE", &["0", "-1"])
                    .query_async(&mut connection)
                    .await
                    .expect("LRANGE"),
                "set" => read("SMEMBERS", &[])
                    .query_async(&mut connection)
                    .await
                    .expect("SMEMBERS"),
                "none" => continue,
                other => panic!("unexpected key type {other} for {key}"),
            };
            let values = values
                .iter()
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect();
            dump.push((key, values));
        }
        dump
    }
}

/// A proxy replica: the built binary, run with `config` on its own loopback port.
pub struct Replica {
    pub addr: SocketAddr,
    pub config: PathBuf,
    child: Child,
}

impl Replica {
    /// `config` is the whole file without `[server]`; the replica listens on a free port.
    pub async fn start(dir: &Path, name: &str, config: &str) -> Replica {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!("[server]\nlisten = [\"{addr}\"]\n\n{config}"),
        )
        .expect("write the replica's config");
        let mut child = Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env_remove("BITBUCKET_AUTH_PROXY_CONFIG")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the proxy");
        wait_listening(addr, Duration::from_secs(20), &mut child, "the proxy").await;
        Replica {
            addr,
            config: path,
            child,
        }
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
