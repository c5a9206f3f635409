//! Proxy fleets for the shared-store tests (issue 16): replicas of the built binary
//! ([`super::redis::Replica`]) sharing one real `redis-server`, the configs they run, and the
//! check that no secret ever reached the store.

use std::net::SocketAddr;

use super::MockUpstream;
use super::redis::{RedisServer, Replica};

/// The workspace token every fleet shares.
pub const TOKEN: &str = "ws-token-Qm7Zr4Kp9Xc2Vb8N";
/// Another workspace's token, for what must never be shared with [`TOKEN`]'s requests.
pub const OTHER_TOKEN: &str = "ws-token-Jd3Wf8Ta6Ye1Uc5R";

/// `[store]` lines for `redis`, with a timeout generous enough for a loaded CI machine.
pub fn store_lines(redis: &RedisServer, on_error: &str) -> String {
    format!(
        "url = \"{}\"\ntimeout = \"500ms\"\nprefix = \"t16:\"\non_error = \"{on_error}\"",
        redis.url()
    )
}

/// A replica's config without `[server]`: `[upstream]` at `upstream_url`, `[store]` with
/// `store`, then `rest` (credentials and routes).
pub fn replica_config(upstream_url: &str, store: &str, rest: &str) -> String {
    format!(
        r#"[upstream]
api_url = "{upstream_url}"
git_url = "{upstream_url}"
timeout = "10s"

[store]
{store}

{rest}
"#
    )
}

/// A workspace-token credential named `name` for workspace `acme`, with `extra` lines
/// (`rate_limit = ...`).
pub fn credential(name: &str, token: &str, extra: &str) -> String {
    format!(
        r#"[credentials.{name}]
kind = "workspace_access_token"
workspace = "acme"
token = {{ value = "{token}" }}
{extra}
"#
    )
}

/// A route from `prefix` to `/2.0/repositories/acme` with `credential`, and `extra` lines.
pub fn route(prefix: &str, credential: &str, extra: &str) -> String {
    format!(
        r#"[[routes]]
prefix = "{prefix}"
upstream_prefix = "/2.0/repositories/acme"
credential = "{credential}"
{extra}
"#
    )
}

/// Replicas (and the mock upstreams they point at) for one test.
pub struct Fleet {
    _dir: tempfile::TempDir,
    pub replicas: Vec<Replica>,
    pub upstreams: Vec<MockUpstream>,
}

impl Fleet {
    /// One replica per config, in order; `upstreams` are kept alive and counted.
    pub async fn start(configs: Vec<String>, upstreams: Vec<MockUpstream>) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let mut replicas = Vec::new();
        for (i, text) in configs.iter().enumerate() {
            replicas.push(Replica::start(dir.path(), &format!("replica{i}"), text).await);
        }
        Fleet {
            _dir: dir,
            replicas,
            upstreams,
        }
    }

    pub fn addr(&self, i: usize) -> SocketAddr {
        self.replicas[i].addr
    }

    /// Requests that reached any of the mock upstreams.
    pub fn upstream_requests(&self) -> usize {
        self.upstreams.iter().map(MockUpstream::request_count).sum()
    }

    /// The sum over the replicas of one counter in `/-/metrics` (0 where absent).
    pub async fn metric(&self, name: &str) -> u64 {
        let mut total = 0;
        for replica in &self.replicas {
            let text =
                super::body_string(super::get(replica.addr, "/-/metrics").await.into_body()).await;
            total += text
                .lines()
                .filter_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
                .filter_map(|value| value.trim().parse::<f64>().ok())
                .sum::<f64>() as u64;
        }
        total
    }
}

/// Neither a token nor anything made from one without a key is in any key or value of the
/// store: not the token, a part of it, its Basic or Bearer form, nor its plain SHA-256.
pub async fn assert_no_secret(redis: &RedisServer, tokens: &[&str]) {
    use base64::Engine as _;
    use sha2::Digest as _;
    let dump = redis.dump().await;
    assert!(!dump.is_empty(), "the store was used");
    let hex = |bytes: &[u8]| super::hex(bytes);
    for token in tokens {
        let basic =
            base64::engine::general_purpose::STANDARD.encode(format!("x-token-auth:{token}"));
        let sha = hex(&sha2::Sha256::digest(token.as_bytes()));
        let sha_bearer = hex(&sha2::Sha256::digest(format!("Bearer {token}").as_bytes()));
        for (key, values) in &dump {
            for text in std::iter::once(key).chain(values) {
                for needle in [
                    *token,
                    &token[..12],
                    &token[token.len() - 10..],
                    &basic,
                    &sha[..16],
                    &sha_bearer[..16],
                    "Bearer",
                ] {
                    assert!(
                        !text.contains(needle),
                        "the store holds secret material in {key}: {text}"
                    );
                }
            }
        }
    }
}
