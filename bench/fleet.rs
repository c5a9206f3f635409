//! `cargo bench --bench fleet`: a CI fleet's Bitbucket traffic replayed directly against a mock
//! Bitbucket, through the proxy with its defaults, and through the proxy with microcaching on;
//! reports the upstream requests per client request, latency, and how stale answers were.
//!
//! The trace: `--jobs` jobs (50) for `--prs` open pull requests (5) of one repository, every
//! job started within `--spread` (2 s) of the first, as a push wave dispatches them. Each job
//! lists the open pull requests, reads its pull request, reads `--files` (3) files at the pull
//! request's head commit (`/src/{hash}/{path}`), works for `--work` (3 s, ±1 s), then posts a
//! build status for the commit. The mock answers every request after `--rtt` (40 ms), as
//! Bitbucket would from across the internet, and stamps each answer with the time it made it,
//! so a client can tell how old what it received is.
//!
//! Everything runs on 127.0.0.1 in this process: the mock (plain HTTP), the proxy (started
//! from a config written here), and the jobs (one pooled HTTP/1.1 client).
//!
//! Issue 16 adds two fleet modes: `--replicas` (3) proxies with microcaching, the jobs spread
//! over them, first each on its own, then sharing a real `redis-server` through `[store]`
//! (shared cache, fill lock, one budget). Skipped when redis-server is not installed.

mod bench_support;
use bench_support::{arg, percentile};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

const TOKEN: &str = "fleet-bench-token";

#[derive(Clone, Copy)]
struct Trace {
    jobs: usize,
    prs: usize,
    files: usize,
    spread: Duration,
    work: Duration,
    rtt: Duration,
    max_age: Duration,
    replicas: usize,
}

/// The mock Bitbucket: counts what it is asked, by kind.
struct Mock {
    started: Instant,
    rtt: Duration,
    counts: Mutex<BTreeMap<&'static str, usize>>,
    total: AtomicUsize,
    /// Bumped by each status post: the pull-request list changes (Bitbucket would show the
    /// new status in a PR's page), so a reused list older than a post is detectable.
    version: AtomicU64,
}

fn commit_of(pr: usize) -> String {
    format!("{:040x}", 0xc0ffee_u64 * (pr as u64 + 1))
}

impl Mock {
    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let authorized = request
            .headers()
            .get("authorization")
            .is_some_and(|v| v.as_bytes() == format!("Bearer {TOKEN}").as_bytes());
        let _ = request.into_body().collect().await;
        tokio::time::sleep(self.rtt).await;
        self.total.fetch_add(1, Ordering::Relaxed);
        let repo = "/2.0/repositories/acme/widgets";
        let rest = path.strip_prefix(repo).unwrap_or("");
        let kind = match (method.as_str(), rest) {
            ("GET", "/pullrequests") => "list pull requests",
            ("GET", r) if r.starts_with("/pullrequests/") => "read pull request",
            ("GET", r) if r.starts_with("/src/") => "read file at commit",
            ("POST", r) if r.contains("/statuses/build") => "post build status",
            _ => "other",
        };
        *self.counts.lock().unwrap().entry(kind).or_default() += 1;
        let made_ms = self.started.elapsed().as_millis().to_string();
        let origin = "https://api.bitbucket.org";
        let body = match kind {
            _ if !authorized => return reply(StatusCode::UNAUTHORIZED, "{}", &made_ms),
            "list pull requests" => {
                let values: Vec<String> = (0..8)
                    .map(|pr| {
                        format!(
                            r#"{{"id":{pr},"title":"change {pr}","source":{{"commit":{{"hash":"{}"}}}},"links":{{"self":{{"href":"{origin}{repo}/pullrequests/{pr}"}}}}}}"#,
                            commit_of(pr)
                        )
                    })
                    .collect();
                format!(
                    r#"{{"pagelen":50,"version":{},"values":[{}]}}"#,
                    self.version.load(Ordering::SeqCst),
                    values.join(",")
                )
            }
            "read pull request" => {
                let pr: usize = rest["/pullrequests/".len()..].parse().unwrap_or(0);
                format!(
                    r#"{{"id":{pr},"source":{{"commit":{{"hash":"{}"}}}},"links":{{"self":{{"href":"{origin}{repo}/pullrequests/{pr}"}}}}}}"#,
                    commit_of(pr)
                )
            }
            "read file at commit" => format!("contents of {rest}\n").repeat(20),
            "post build status" => {
                self.version.fetch_add(1, Ordering::SeqCst);
                r#"{"state":"SUCCESSFUL"}"#.to_owned()
            }
            _ => return reply(StatusCode::NOT_FOUND, "{}", &made_ms),
        };
        let status = if method == http::Method::POST {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        reply(status, &body, &made_ms)
    }
}

fn reply(status: StatusCode, body: &str, made_ms: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-made-ms", made_ms)
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

async fn start_mock(trace: &Trace, started: Instant) -> (Arc<Mock>, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mock = Arc::new(Mock {
        started,
        rtt: trace.rtt,
        counts: Mutex::new(BTreeMap::new()),
        total: AtomicUsize::new(0),
        version: AtomicU64::new(0),
    });
    let serving = mock.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let mock = serving.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let mock = mock.clone();
                    async move { Ok::<_, std::convert::Infallible>(mock.answer(request).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (mock, addr)
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Direct,
    Defaults,
    Microcaching,
    /// `replicas` proxies with max_age, each with its own cache and budget.
    Replicas,
    /// The same, sharing one Redis through `[store]`.
    SharedStore,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Defaults => "proxy, defaults",
            Mode::Microcaching => "proxy, max_age",
            Mode::Replicas => "3 replicas, max_age",
            Mode::SharedStore => "3 replicas, max_age, [store]",
        }
    }
}

async fn start_proxy(
    upstream: SocketAddr,
    max_age: Option<Duration>,
    store: &str,
) -> bitbucket_auth_proxy::RunningProxy {
    let cache = max_age.map_or(String::new(), |age| {
        format!("cache = {{ max_age = \"{}ms\" }}", age.as_millis())
    });
    let text = format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
max_in_flight = 4096

[upstream]
api_url = "http://{upstream}"

[credentials.fleet]
kind = "workspace_access_token"
workspace = "acme"
token = {{ value = "{TOKEN}" }}

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "fleet"
{cache}

{store}
"#
    );
    let config = bitbucket_auth_proxy::Config::from_toml(Path::new("fleet.toml"), &text)
        .unwrap_or_else(|e| panic!("{e}"));
    bitbucket_auth_proxy::start(config)
        .await
        .expect("proxy starts")
}

/// What one client request saw.
struct Sample {
    latency: Duration,
    /// How long before the client got it the mock made the answer (mutable answers only).
    staleness: Duration,
    /// The mock's list version in a list answer, with the posts made before the request went.
    list_version: Option<(u64, u64)>,
}

struct Run {
    samples: Vec<Sample>,
    upstream: usize,
    by_kind: BTreeMap<&'static str, usize>,
    wall: Duration,
}

/// Tiny deterministic generator, so every mode replays the same trace.
fn spread(seed: u64, n: usize, span: Duration) -> Duration {
    let mut x =
        seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (n as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 31;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 29;
    span.mul_f64((x % 10_000) as f64 / 10_000.0)
}

async fn run(mode: Mode, trace: Trace, store: &str) -> Run {
    let started = Instant::now();
    let (mock, upstream) = start_mock(&trace, started).await;
    let mut proxies = Vec::new();
    match mode {
        Mode::Direct => {}
        Mode::Defaults => proxies.push(start_proxy(upstream, None, "").await),
        Mode::Microcaching => proxies.push(start_proxy(upstream, Some(trace.max_age), "").await),
        Mode::Replicas | Mode::SharedStore => {
            let store = if mode == Mode::SharedStore { store } else { "" };
            for _ in 0..trace.replicas {
                proxies.push(start_proxy(upstream, Some(trace.max_age), store).await);
            }
        }
    }
    let targets: Vec<SocketAddr> = if proxies.is_empty() {
        vec![upstream]
    } else {
        proxies.iter().map(|p| p.local_addrs()[0]).collect()
    };
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http();
    let posts = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let begin = Instant::now();
    let jobs: Vec<_> = (0..trace.jobs)
        .map(|job| {
            let (client, samples, posts, mock) =
                (client.clone(), samples.clone(), posts.clone(), mock.clone());
            let target = targets[job % targets.len()];
            tokio::spawn(async move {
                tokio::time::sleep(spread(1, job, trace.spread)).await;
                let repo = "/2.0/repositories/acme/widgets";
                let pr = job % trace.prs;
                let commit = commit_of(pr);
                let call = |method: &'static str, path: String| {
                    let (client, samples, posts, mock) =
                        (client.clone(), samples.clone(), posts.clone(), mock.clone());
                    async move {
                        let mut request = Request::builder()
                            .method(method)
                            .uri(format!("http://{target}{path}"));
                        if mode == Mode::Direct {
                            request = request.header("authorization", format!("Bearer {TOKEN}"));
                        }
                        let body = if method == "POST" {
                            Full::new(Bytes::from_static(br#"{"state":"SUCCESSFUL","key":"ci"}"#))
                        } else {
                            Full::new(Bytes::new())
                        };
                        let posted_before = posts.load(Ordering::SeqCst);
                        let sent = Instant::now();
                        let response = client
                            .request(request.body(body).unwrap())
                            .await
                            .expect("request");
                        let made: u64 = response
                            .headers()
                            .get("x-made-ms")
                            .and_then(|v| v.to_str().ok()?.parse().ok())
                            .unwrap_or(0);
                        assert!(
                            response.status().is_success(),
                            "{method} {path}: {}",
                            response.status()
                        );
                        let body = response
                            .into_body()
                            .collect()
                            .await
                            .expect("body")
                            .to_bytes();
                        let latency = sent.elapsed();
                        let now_ms = mock.started.elapsed().as_millis() as u64;
                        let list_version = path.ends_with("/pullrequests?state=OPEN").then(|| {
                            let text = String::from_utf8_lossy(&body);
                            let version = text
                                .split("\"version\":")
                                .nth(1)
                                .and_then(|v| v.split(',').next()?.parse().ok())
                                .unwrap_or(0);
                            (version, posted_before)
                        });
                        if method == "POST" {
                            posts.fetch_add(1, Ordering::SeqCst);
                        }
                        // Answers pinned by a commit never change: only the others can be stale.
                        let mutable = method == "GET" && !path.contains("/src/");
                        let staleness = if mutable {
                            Duration::from_millis(now_ms.saturating_sub(made))
                        } else {
                            Duration::ZERO
                        };
                        samples.lock().unwrap().push(Sample {
                            latency,
                            staleness,
                            list_version,
                        });
                    }
                };
                call("GET", format!("{repo}/pullrequests?state=OPEN")).await;
                call("GET", format!("{repo}/pullrequests/{pr}")).await;
                for file in 0..trace.files {
                    call("GET", format!("{repo}/src/{commit}/dir/file{file}.txt")).await;
                }
                let half = trace.work / 3;
                tokio::time::sleep(trace.work - half + spread(2, job, half * 2)).await;
                call("POST", format!("{repo}/commit/{commit}/statuses/build")).await;
            })
        })
        .collect();
    for job in jobs {
        job.await.expect("job");
    }
    let wall = begin.elapsed();
    for proxy in proxies {
        proxy.shutdown(Duration::from_secs(5)).await;
    }
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    Run {
        samples,
        upstream: mock.total.load(Ordering::Relaxed),
        by_kind: mock.counts.lock().unwrap().clone(),
        wall,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let number = |name: &str, default: usize| -> usize {
        arg(&args, name).map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number"))
        })
    };
    let duration = |name: &str, default: &str| -> Duration {
        humantime::parse_duration(&arg(&args, name).unwrap_or_else(|| default.to_owned()))
            .unwrap_or_else(|_| panic!("{name} takes a duration such as 2s"))
    };
    let trace = Trace {
        jobs: number("--jobs", 50),
        prs: number("--prs", 5).max(1),
        files: number("--files", 3),
        spread: duration("--spread", "2s"),
        work: duration("--work", "3s"),
        rtt: duration("--rtt", "40ms"),
        max_age: duration("--max-age", "5s"),
        replicas: number("--replicas", 3).max(1),
    };
    let redis = bench_support::Redis::start();
    let store = redis.as_ref().map_or(String::new(), |r| r.store_table());
    let mut modes = vec![
        Mode::Direct,
        Mode::Defaults,
        Mode::Microcaching,
        Mode::Replicas,
    ];
    if redis.is_some() {
        modes.push(Mode::SharedStore);
    } else {
        println!(
            "{} missing: the [store] mode is skipped\n",
            bench_support::REDIS_SERVER
        );
    }
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    println!(
        "fleet: {} jobs, {} pull requests, {} files each, started within {:?}, {:?} of work, upstream RTT {:?}, max_age {:?}, {} replicas in the fleet modes\n",
        trace.jobs,
        trace.prs,
        trace.files,
        trace.spread,
        trace.work,
        trace.rtt,
        trace.max_age,
        trace.replicas
    );
    println!(
        "| mode | client requests | upstream requests | upstream per client request | p50 ms | p95 ms | max ms | oldest mutable answer ms | lists older than a post | wall s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut kinds = Vec::new();
    for &mode in &modes {
        let result = runtime.block_on(run(mode, trace, &store));
        let mut latencies: Vec<Duration> = result.samples.iter().map(|s| s.latency).collect();
        latencies.sort();
        let oldest = result
            .samples
            .iter()
            .map(|s| s.staleness)
            .max()
            .unwrap_or_default();
        let outdated = result
            .samples
            .iter()
            .filter_map(|s| s.list_version)
            .filter(|(version, posted)| version < posted)
            .count();
        let requests = result.samples.len();
        println!(
            "| {} | {} | {} | {:.3} | {} | {} | {} | {} | {} | {:.1} |",
            mode.name(),
            requests,
            result.upstream,
            result.upstream as f64 / requests as f64,
            ms(percentile(&latencies, 0.5)),
            ms(percentile(&latencies, 0.95)),
            ms(*latencies.last().unwrap()),
            ms(oldest),
            outdated,
            result.wall.as_secs_f64()
        );
        if mode != Mode::Direct && mode != Mode::Defaults && oldest > trace.max_age + trace.rtt {
            println!("\nFAIL: an answer was {} ms old, past max_age", ms(oldest));
        }
        kinds.push((mode, result.by_kind));
    }
    println!("\nUpstream requests by kind:\n");
    let names: Vec<&str> = modes.iter().map(|m| m.name()).collect();
    println!("| kind | {} |", names.join(" | "));
    println!("|---|{}", "---|".repeat(names.len()));
    let names: std::collections::BTreeSet<&str> =
        kinds.iter().flat_map(|(_, k)| k.keys().copied()).collect();
    for name in names {
        let cells: Vec<String> = kinds
            .iter()
            .map(|(_, k)| k.get(name).copied().unwrap_or(0).to_string())
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
}
