//! Issue 16: replicas share one credential's budget and 429 cool-down through a real
//! `redis-server`. Three proxy processes (the built binary) hold the same token, each with its
//! own mock Bitbucket, so what reaches "Bitbucket" is counted per replica and in total. Also:
//! Redis killed and restarted empty mid-run under `on_error = "local"` and `"refuse"`, and no
//! secret anywhere in the keyspace.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bitbucket_auth_proxy::error::REASON_HEADER;
use http::{Response, StatusCode};
use http_body_util::Full;
use support::fleet::{self, Fleet, TOKEN, assert_no_secret, replica_config, store_lines};
use support::redis::{RedisServer, Replica};
use support::*;

/// A mock Bitbucket answering every API request with `status`.
fn bitbucket(status: StatusCode) -> MockUpstream {
    MockUpstream::start_plain_simple(move |_| {
        let mut response = Response::new(Full::from("{}"));
        *response.status_mut() = status;
        if status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert("retry-after", "60".parse().unwrap());
            response
                .headers_mut()
                .insert("x-upstream-marker", "bitbucket".parse().unwrap());
        }
        response
    })
}

/// A replica's config: one workspace token (under `credential`), `rate_limit` if given, and
/// `[store]` with `store_lines`.
fn config(upstream: &MockUpstream, credential: &str, rate_limit: &str, store: &str) -> String {
    let rest = format!(
        "{}\n[[routes]]\nprefix = \"/2.0/repositories/acme\"\ncredential = \"{credential}\"\n",
        fleet::credential(credential, TOKEN, rate_limit)
    );
    replica_config(&upstream.base_url(), store, &rest)
}

/// Three replicas, each with its own mock Bitbucket (from `upstream(i)`). The third names the
/// credential differently: the same token must still share one budget.
async fn fleet_of(
    store: &str,
    rate_limit: &str,
    upstream: impl Fn(usize) -> MockUpstream,
) -> Fleet {
    let upstreams: Vec<MockUpstream> = (0..3).map(upstream).collect();
    let configs = upstreams
        .iter()
        .enumerate()
        .map(|(i, up)| {
            let credential = if i == 2 { "fleet-token" } else { "ci" };
            config(up, credential, rate_limit, store)
        })
        .collect();
    Fleet::start(configs, upstreams).await
}

async fn start_fleet(
    redis: &RedisServer,
    statuses: [StatusCode; 3],
    rate_limit: &str,
    on_error: &str,
) -> Fleet {
    fleet_of(&store_lines(redis, on_error), rate_limit, |i| {
        bitbucket(statuses[i])
    })
    .await
}

const PATH: &str = "/2.0/repositories/acme/widgets/pullrequests";

async fn status_and_reason(addr: SocketAddr) -> (StatusCode, Option<String>) {
    // Each call a request of its own: identical requests in flight at once would be coalesced
    // into one upstream request, and this counts what the budget admits.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let response = get(addr, &format!("{PATH}?request={n}")).await;
    let reason = response
        .headers()
        .get(REASON_HEADER)
        .map(|v| v.to_str().unwrap().to_owned());
    let status = response.status();
    drain_body(response.into_body()).await;
    (status, reason)
}

async fn ready(addr: SocketAddr) -> (StatusCode, serde_json::Value) {
    let response = get(addr, "/-/ready").await;
    let status = response.status();
    let body = body_string(response.into_body()).await;
    (status, serde_json::from_str(&body).unwrap())
}

async fn metrics(addr: SocketAddr) -> String {
    body_string(get(addr, "/-/metrics").await.into_body()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_spend_one_budget_and_one_cool_down_with_no_secret_in_redis() {
    let redis = RedisServer::start().await;
    let fleet = start_fleet(
        &redis,
        [StatusCode::OK; 3],
        "rate_limit = { per_hour = 10 }",
        "local",
    )
    .await;
    // 60 requests over the three, 20 at a time: exactly 10 reach Bitbucket.
    let mut statuses = Vec::new();
    for round in 0..3 {
        let batch: Vec<_> = (0..20)
            .map(|i| {
                let addr = fleet.addr((round * 20 + i) % 3);
                tokio::spawn(status_and_reason(addr))
            })
            .collect();
        for task in batch {
            statuses.push(task.await.unwrap());
        }
    }
    let admitted = statuses
        .iter()
        .filter(|(s, _)| *s == StatusCode::OK)
        .count();
    let limited = statuses
        .iter()
        .filter(|(s, r)| {
            *s == StatusCode::TOO_MANY_REQUESTS && r.as_deref() == Some("rate-limited")
        })
        .count();
    assert_eq!((admitted, limited), (10, 50), "{statuses:?}");
    assert_eq!(fleet.upstream_requests(), 10);
    for i in 0..3 {
        let (status, body) = ready(fleet.addr(i)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["store"]["state"], "up", "{body}");
        assert!(
            metrics(fleet.addr(i))
                .await
                .contains("bitbucket_auth_proxy_store_up 1")
        );
    }
    assert_no_secret(&redis, &[TOKEN]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replicas_429_stops_the_other_two_at_once() {
    let redis = RedisServer::start().await;
    let fleet = start_fleet(
        &redis,
        [
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::OK,
            StatusCode::OK,
        ],
        "",
        "local",
    )
    .await;
    assert_eq!(status_and_reason(fleet.addr(1)).await.0, StatusCode::OK);
    // Replica 0's Bitbucket says the budget is spent.
    let response = get(fleet.addr(0), PATH).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["x-upstream-marker"], "bitbucket");
    drain_body(response.into_body()).await;
    let before = (
        fleet.upstreams[1].request_count(),
        fleet.upstreams[2].request_count(),
    );
    for i in [1, 2, 1, 2] {
        let response = get(fleet.addr(i), PATH).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[REASON_HEADER], "cooling-down");
        let retry_after: u64 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((55..=60).contains(&retry_after), "{retry_after}");
        drain_body(response.into_body()).await;
    }
    assert_eq!(
        (
            fleet.upstreams[1].request_count(),
            fleet.upstreams[2].request_count()
        ),
        before,
        "nothing more reached Bitbucket from the other replicas"
    );
    let (_, body) = ready(fleet.addr(2)).await;
    assert!(
        body["cooldowns"]["fleet-token"]["retry_after_s"]
            .as_u64()
            .unwrap()
            > 50,
        "{body}"
    );
    assert_no_secret(&redis, &[TOKEN]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pace_and_its_burst_are_shared_too() {
    let redis = RedisServer::start().await;
    // One every 3 s, bursts of 3: the fleet gets 3 at once, not 3 each.
    let fleet = start_fleet(
        &redis,
        [StatusCode::OK; 3],
        "rate_limit = { per_hour = 1200, burst = 3 }",
        "local",
    )
    .await;
    for i in 0..3 {
        assert_eq!(status_and_reason(fleet.addr(i)).await.0, StatusCode::OK);
    }
    let response = get(fleet.addr(1), PATH).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()[REASON_HEADER], "rate-limited");
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3).contains(&retry_after), "{retry_after}");
    drain_body(response.into_body()).await;
    assert_eq!(fleet.upstream_requests(), 3);
    // Then the pace lets one more through, on any replica.
    tokio::time::sleep(Duration::from_secs(retry_after) + Duration::from_millis(100)).await;
    assert_eq!(status_and_reason(fleet.addr(2)).await.0, StatusCode::OK);
    assert_eq!(
        status_and_reason(fleet.addr(0)).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
}

/// Polls `check` every 100 ms until it holds, or panics after `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_local_keeps_serving_and_recovers_without_restart() {
    let mut redis = RedisServer::start().await;
    let fleet = start_fleet(&redis, [StatusCode::OK; 3], "", "local").await;
    for i in 0..3 {
        assert_eq!(status_and_reason(fleet.addr(i)).await.0, StatusCode::OK);
    }
    redis.kill().await;
    for round in 0..4 {
        for i in 0..3 {
            assert_eq!(
                status_and_reason(fleet.addr(i)).await.0,
                StatusCode::OK,
                "round {round}, replica {i}"
            );
        }
    }
    let (status, body) = ready(fleet.addr(0)).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a store down under local is no reason to be unready"
    );
    assert_eq!(body["store"]["state"], "down", "{body}");
    let text = metrics(fleet.addr(0)).await;
    assert!(text.contains("bitbucket_auth_proxy_store_up 0"), "{text}");
    assert!(
        !text.contains("bitbucket_auth_proxy_store_fallbacks_total 0"),
        "{text}"
    );
    // Back, and empty: requests find it again by themselves.
    redis.restart().await;
    eventually(
        Duration::from_secs(20),
        "every replica uses the store again",
        || async {
            let mut all = true;
            for i in 0..3 {
                assert_eq!(status_and_reason(fleet.addr(i)).await.0, StatusCode::OK);
                all &= ready(fleet.addr(i)).await.1["store"]["state"] == "up";
            }
            all
        },
    )
    .await;
    // And they share again: one 429 stops them all.
    let dump = redis.dump().await;
    assert!(
        dump.iter().any(|(key, _)| key.ends_with(":window")),
        "{dump:?}"
    );
    assert_no_secret(&redis, &[TOKEN]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_refuse_answers_503_then_recovers() {
    let mut redis = RedisServer::start().await;
    let fleet = start_fleet(&redis, [StatusCode::OK; 3], "", "refuse").await;
    assert_eq!(status_and_reason(fleet.addr(0)).await.0, StatusCode::OK);
    redis.kill().await;
    let started = Instant::now();
    for i in [0, 1, 2, 0] {
        let response = get(fleet.addr(i), PATH).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[REASON_HEADER], "store-unavailable");
        assert_eq!(response.headers()["retry-after"], "1");
        drain_body(response.into_body()).await;
    }
    // Each waited at most store.timeout (500 ms), most not at all.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(fleet.upstream_requests(), 1);
    let (status, body) = ready(fleet.addr(0)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["store"]["on_error"], "refuse");
    assert!(
        metrics(fleet.addr(0))
            .await
            .contains("bitbucket_auth_proxy_store_refused_total")
    );
    redis.restart().await;
    eventually(
        Duration::from_secs(20),
        "replica 0 serves again",
        || async { status_and_reason(fleet.addr(0)).await.0 == StatusCode::OK },
    )
    .await;
    assert_eq!(ready(fleet.addr(0)).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_never_answers_costs_each_request_at_most_its_timeout() {
    // Accepts connections and never says a word: a hung Redis.
    let hung = HangingUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let upstream = bitbucket(StatusCode::OK);
    let store = |on_error: &str| {
        format!(
            "url = \"redis://{}/0\"\ntimeout = \"300ms\"\non_error = \"{on_error}\"",
            hung.addr()
        )
    };
    let local = Replica::start(
        dir.path(),
        "local",
        &config(&upstream, "ci", "", &store("local")),
    )
    .await;
    let refuse = Replica::start(
        dir.path(),
        "refuse",
        &config(&upstream, "ci", "", &store("refuse")),
    )
    .await;
    let started = Instant::now();
    for _ in 0..10 {
        assert_eq!(status_and_reason(local.addr).await.0, StatusCode::OK);
        let (status, reason) = status_and_reason(refuse.addr).await;
        assert_eq!(
            (status, reason.as_deref()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("store-unavailable"))
        );
    }
    // 20 requests: the first of each replica waits out the 300 ms, the rest skip the store
    // while it is down (one retry per backoff interval). Without the bound they would wait
    // for upstream.timeout (10 s) or forever.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(upstream.request_count(), 10);
    let (_, body) = ready(local.addr).await;
    assert_eq!(body["store"]["state"], "down", "{body}");
    assert!(
        body["store"]["last_error"]
            .as_str()
            .unwrap()
            .contains("store.timeout"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_ca_file_and_a_password_shares_the_budget_and_refuses_a_wrong_ca() {
    let pki = TestPki::new();
    let redis = RedisServer::start_tls(&pki, "redis-pw-Hy6Lq3").await;
    let store = |ca: &std::path::Path, password: &str| {
        format!(
            "{}\nca_file = \"{}\"\npassword = {{ value = \"{password}\" }}",
            store_lines(&redis, "local"),
            ca.display()
        )
    };
    let fleet = fleet_of(
        &store(pki.ca_path(), "redis-pw-Hy6Lq3"),
        "rate_limit = { per_hour = 4 }",
        |_| bitbucket(StatusCode::OK),
    )
    .await;
    let mut admitted = 0;
    for i in 0..9 {
        admitted += usize::from(status_and_reason(fleet.addr(i % 3)).await.0 == StatusCode::OK);
    }
    assert_eq!((admitted, fleet.upstream_requests()), (4, 4));
    assert_eq!(ready(fleet.addr(0)).await.1["store"]["state"], "up");

    // Trusting another CA, or with the wrong password, the store is down (and the budget local).
    let other = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let upstream = bitbucket(StatusCode::OK);
    for (name, store) in [
        ("wrong-ca", store(other.ca_path(), "redis-pw-Hy6Lq3")),
        ("wrong-password", store(pki.ca_path(), "not-the-password")),
    ] {
        let replica = Replica::start(dir.path(), name, &config(&upstream, "ci", "", &store)).await;
        assert_eq!(
            status_and_reason(replica.addr).await.0,
            StatusCode::OK,
            "{name}"
        );
        let (_, body) = ready(replica.addr).await;
        assert_eq!(body["store"]["state"], "down", "{name}: {body}");
        assert!(!body.to_string().contains("Hy6Lq3"), "{body}");
    }
}

/// One mock Bitbucket for the whole fleet that answers after `delay`: 429 with
/// `Retry-After: 2` while `failing` holds, else 200; it notes when each request arrived.
fn switchable(
    delay: Duration,
    failing: Arc<AtomicBool>,
    arrivals: Arc<Mutex<Vec<Instant>>>,
) -> MockUpstream {
    MockUpstream::start_plain(move |_, _| {
        arrivals.lock().unwrap().push(Instant::now());
        let failing = failing.load(Ordering::SeqCst);
        async move {
            tokio::time::sleep(delay).await;
            let mut response = Response::builder().header("x-upstream-marker", "bitbucket");
            if failing {
                response = response
                    .status(StatusCode::TOO_MANY_REQUESTS)
                    .header("retry-after", "2");
            }
            response.body(full_body("{}")).unwrap()
        }
    })
}

/// `n` requests at once, spread over the three replicas; their statuses and reasons.
async fn burst(fleet: &Fleet, n: usize) -> Vec<(StatusCode, Option<String>)> {
    let tasks: Vec<_> = (0..n)
        .map(|i| tokio::spawn(status_and_reason(fleet.addr(i % 3))))
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_shared_cool_down_one_probe_reaches_bitbucket_for_the_whole_fleet() {
    let redis = RedisServer::start().await;
    let failing = Arc::new(AtomicBool::new(true));
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let upstream = switchable(
        Duration::from_millis(400),
        failing.clone(),
        arrivals.clone(),
    );
    let store = store_lines(&redis, "local");
    let configs = ["ci", "ci", "fleet-token"]
        .iter()
        .map(|name| config(&upstream, name, "", &store))
        .collect();
    let fleet = Fleet::start(configs, vec![upstream]).await;
    // Replica 0's request is answered 429: a 2 s cool-down for the fleet.
    assert_eq!(
        status_and_reason(fleet.addr(0)).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    tokio::time::sleep(Duration::from_millis(2300)).await;
    // Over: 9 requests at once on the three replicas. One probes, and is answered 429 again;
    // the other 8 wait for its answer and are refused with the new cool-down.
    let answers = burst(&fleet, 9).await;
    assert_eq!(
        fleet.upstream_requests(),
        2,
        "one probe for three replicas: {answers:?}"
    );
    let cooling = answers
        .iter()
        .filter(|(s, r)| {
            *s == StatusCode::TOO_MANY_REQUESTS && r.as_deref() == Some("cooling-down")
        })
        .count();
    assert_eq!(cooling, 8, "{answers:?}");
    assert!(
        fleet
            .metric("bitbucket_auth_proxy_store_probe_waits_total")
            .await
            >= 2
    );
    // Bitbucket recovers. After the new cool-down, again one probe first; the others go once
    // it is answered, not beside it.
    failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2300)).await;
    arrivals.lock().unwrap().clear();
    let answers = burst(&fleet, 9).await;
    assert!(
        answers.iter().all(|(s, _)| *s == StatusCode::OK),
        "{answers:?}"
    );
    let arrivals = arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len(), 9);
    assert!(
        arrivals[1] - arrivals[0] >= Duration::from_millis(350),
        "the second request reached Bitbucket {:?} after the probe",
        arrivals[1] - arrivals[0]
    );
    assert_no_secret(&redis, &[TOKEN]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_bitbucket_reports_to_one_replica_paces_the_others() {
    let redis = RedisServer::start().await;
    // Only replica 0's Bitbucket sends X-RateLimit-Limit: 4 (an hour's budget of 4).
    let fleet = fleet_of(
        &store_lines(&redis, "local"),
        "rate_limit = { per_hour = 1000, burst = 1000 }",
        |i| {
            MockUpstream::start_plain_simple(move |_| {
                let mut response = Response::new(Full::from("{}"));
                if i == 0 {
                    let limit = "4".parse().unwrap();
                    response.headers_mut().insert("x-ratelimit-limit", limit);
                }
                response
            })
        },
    )
    .await;
    assert_eq!(status_and_reason(fleet.addr(0)).await.0, StatusCode::OK);
    // Replica 1 never saw the header; it learns the figure from the store on its first
    // admission and holds the fleet to 4: three more, then rate-limited.
    let mut answers = Vec::new();
    for _ in 0..6 {
        answers.push(status_and_reason(fleet.addr(1)).await);
    }
    let ok = answers.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    assert_eq!(ok, 3, "{answers:?}");
    assert!(
        answers[3..]
            .iter()
            .all(|(s, r)| *s == StatusCode::TOO_MANY_REQUESTS
                && r.as_deref() == Some("rate-limited")),
        "{answers:?}"
    );
    assert_eq!(fleet.upstream_requests(), 4);
    let dump = redis.dump().await;
    assert!(
        dump.iter()
            .any(|(key, values)| key.ends_with(":reported") && values.contains(&"4,,".to_owned())),
        "{dump:?}"
    );
    assert_no_secret(&redis, &[TOKEN]).await;
}
