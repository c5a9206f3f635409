//! `cargo bench --bench store_latency`: what the shared store (`[store]`, docs/store.md) adds
//! to a request's latency on loopback, path by path. Two proxies run in this process against
//! one mock Bitbucket (plain HTTP, answers at once): one without `[store]`, one with a real
//! `redis-server` (started as tests/support/redis.rs does); a third replica with the store fills
//! the entries the "shared hit" path reads. Each path is measured with `--requests` (2000)
//! sequential keep-alive GETs per proxy, in alternating rounds so both see the same machine:
//!
//! - governed, not cached: the governor's call (one script on Redis) and the upstream request;
//! - cache miss: the governor, a shared-cache lookup that takes the fill lock, the upstream
//!   request, and the entry written back;
//! - local hit: the governor (admission then refund) and an answer from the replica's own
//!   memory, which with `[store]` checks its generations in Redis;
//! - shared hit (store only): an entry another replica fetched, read from Redis.

mod bench_support;
use bench_support::{arg, percentile};

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

const TOKEN: &str = "store-bench-token";

async fn start_mock() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|_request| async {
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from_static(
                                br#"{"pagelen":10,"values":[{"id":1,"title":"a change"}]}"#,
                            )))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

async fn start_proxy(upstream: SocketAddr, store: &str) -> bitbucket_auth_proxy::RunningProxy {
    let text = format!(
        r#"
[server]
listen = ["127.0.0.1:0"]

[upstream]
api_url = "http://{upstream}"

[credentials.bench]
kind = "workspace_access_token"
workspace = "acme"
token = {{ value = "{TOKEN}" }}

[[routes]]
prefix = "/cached"
upstream_prefix = "/2.0/repositories/acme"
credential = "bench"
cache = {{ max_age = "10m" }}

[[routes]]
prefix = "/plain"
upstream_prefix = "/2.0/repositories/acme"
credential = "bench"
cache = {{ immutable = false }}
coalesce = false

{store}
"#
    );
    let config = bitbucket_auth_proxy::Config::from_toml(Path::new("store-bench.toml"), &text)
        .unwrap_or_else(|e| panic!("{e}"));
    bitbucket_auth_proxy::start(config)
        .await
        .expect("proxy starts")
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// One GET's latency to its last body byte, and its `Cache-Status`.
async fn get(client: &HttpClient, addr: SocketAddr, path: &str) -> (Duration, String) {
    let request = Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let sent = Instant::now();
    let response = client.request(request).await.expect("request");
    assert!(
        response.status().is_success(),
        "{path}: {}",
        response.status()
    );
    let status = response
        .headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    response.into_body().collect().await.expect("body");
    (sent.elapsed(), status)
}

/// Measures one request and checks that it took the path it stands for.
async fn measure(client: &HttpClient, addr: SocketAddr, path: Path_, target: &str) -> Duration {
    let (latency, status) = get(client, addr, target).await;
    let expected = match path {
        Path_::Governed => "fwd=bypass",
        Path_::Miss => "fwd=miss",
        Path_::LocalHit => "bitbucket-auth-proxy; hit; ttl=",
        Path_::SharedHit => "detail=shared",
    };
    assert!(status.contains(expected), "{target}: {status}");
    latency
}

#[derive(Clone, Copy, PartialEq)]
enum Path_ {
    Governed,
    Miss,
    LocalHit,
    SharedHit,
}

impl Path_ {
    fn name(self) -> &'static str {
        match self {
            Path_::Governed => "governed, not cached",
            Path_::Miss => "cache miss",
            Path_::LocalHit => "local hit",
            Path_::SharedHit => "shared hit",
        }
    }
}

/// The path of the `n`th request of `round` on `path`, unique where it must miss.
fn target(path: Path_, round: usize, n: usize) -> String {
    match path {
        Path_::Governed => format!("/plain/widgets/pullrequests?r={round}&n={n}"),
        Path_::Miss => format!("/cached/widgets/pullrequests?miss={round}-{n}"),
        Path_::LocalHit => "/cached/widgets/pullrequests?hot=1".to_owned(),
        Path_::SharedHit => format!("/cached/widgets/pullrequests?shared={round}-{n}"),
    }
}

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let requests: usize = arg(&args, "--requests").map_or(2000, |v| v.parse().expect("a number"));
    let rounds = 4;
    let per_round = (requests / rounds).max(1);
    let Some(redis) = bench_support::Redis::start() else {
        println!(
            "{} missing: nothing to measure",
            bench_support::REDIS_SERVER
        );
        return;
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let upstream = start_mock().await;
        let plain = start_proxy(upstream, "").await;
        let stored = start_proxy(upstream, &redis.store_table()).await;
        let filler = start_proxy(upstream, &redis.store_table()).await;
        let (plain, stored, filler) = (
            plain.local_addrs()[0],
            stored.local_addrs()[0],
            filler.local_addrs()[0],
        );
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        // Warm up connections, the scripts, and the hot entry.
        for addr in [plain, stored, filler] {
            for path in [Path_::Governed, Path_::LocalHit] {
                for n in 0..50 {
                    get(&client, addr, &target(path, 99, n)).await;
                }
            }
        }
        println!(
            "store_latency: {} sequential keep-alive GETs per path and proxy, {rounds} alternating rounds, loopback\n",
            per_round * rounds
        );
        println!(
            "| path | without [store] p50 / p99 us | with [store] p50 / p99 us | store adds p50 / p99 us |"
        );
        println!("|---|---|---|---|");
        for path in [Path_::Governed, Path_::Miss, Path_::LocalHit, Path_::SharedHit] {
            let (mut without, mut with) = (Vec::new(), Vec::new());
            for round in 0..rounds {
                if path == Path_::SharedHit {
                    for n in 0..per_round {
                        get(&client, filler, &target(path, round, n)).await;
                    }
                } else {
                    for n in 0..per_round {
                        let target = target(path, round, n);
                        without.push(measure(&client, plain, path, &target).await);
                    }
                }
                for n in 0..per_round {
                    let target = target(path, round, n);
                    with.push(measure(&client, stored, path, &target).await);
                }
            }
            with.sort();
            without.sort();
            let (w50, w99) = (percentile(&with, 0.5), percentile(&with, 0.99));
            if without.is_empty() {
                println!(
                    "| {} | (no such path) | {} / {} | |",
                    path.name(),
                    us(w50),
                    us(w99)
                );
                continue;
            }
            let (p50, p99) = (percentile(&without, 0.5), percentile(&without, 0.99));
            let added = |a: Duration, b: Duration| {
                format!("{:+.0}", (a.as_secs_f64() - b.as_secs_f64()) * 1e6)
            };
            println!(
                "| {} | {} / {} | {} / {} | {} / {} |",
                path.name(),
                us(p50),
                us(p99),
                us(w50),
                us(w99),
                added(w50, p50),
                added(w99, p99)
            );
        }
    });
}
