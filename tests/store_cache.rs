//! Issue 16: the response cache shared through a real `redis-server`. Three proxy processes (the
//! built binary) share one mock Bitbucket, so every upstream request of the fleet is counted in
//! one place: an answer fetched by one replica is served by the others, never across
//! credentials, writes make it stale everywhere, concurrent misses across replicas fetch once,
//! and a dead Redis leaves each replica its own cache.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use support::fleet::{
    Fleet, OTHER_TOKEN, TOKEN, assert_no_secret, credential, replica_config, route, store_lines,
};
use support::proxy::bearer;
use support::redis::RedisServer;
use support::*;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// The fleet's one mock Bitbucket: a GET is answered after `delay` with a body naming the
/// request's number and which of the two tokens it carried (never the token itself), padded to
/// 4000 bytes when the query has `big=1`, and answered 503 the first time a query with
/// `fail-first=1` arrives; anything else with 201.
fn bitbucket(delay: Duration) -> MockUpstream {
    let served = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    MockUpstream::start_plain(move |head, _body| {
        let n = served.fetch_add(1, Ordering::SeqCst) + 1;
        let fail =
            head.uri.contains("fail-first=1") && failed.lock().unwrap().insert(head.uri.clone());
        async move {
            let who = match head.header("authorization") {
                Some(v) if v == bearer(TOKEN) => "x",
                Some(v) if v == bearer(OTHER_TOKEN) => "y",
                _ => "unknown",
            };
            let status = if head.method != http::Method::GET {
                StatusCode::CREATED
            } else {
                tokio::time::sleep(delay).await;
                if fail {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                }
            };
            let mut body = format!(r#"{{"n":{n},"credential":"{who}"}}"#);
            if head.uri.contains("big=1") {
                body = format!("{body:<4000}");
            }
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(full_body(body))
                .unwrap()
        }
    })
}

/// Three replicas on one mock: route `/x` with the credential holding [`TOKEN`], route `/y`
/// with [`OTHER_TOKEN`], both onto `/2.0/repositories/acme` with a 60 s `max_age`.
async fn fleet(redis: &RedisServer, delay: Duration) -> Fleet {
    fleet_with(redis, delay, "").await
}

/// [`fleet`], with `x_extra` lines (`rate_limit = ...`) on credential `x`.
async fn fleet_with(redis: &RedisServer, delay: Duration, x_extra: &str) -> Fleet {
    let upstream = bitbucket(delay);
    let cache = "cache = { max_age = \"60s\" }";
    let rest = [
        credential("x", TOKEN, x_extra),
        credential("y", OTHER_TOKEN, ""),
        route("/x", "x", cache),
        route("/y", "y", cache),
        "[cache]\nmax_entry_bytes = 2048\n".to_owned(),
    ]
    .join("\n");
    let store = store_lines(redis, "local");
    let configs = (0..3)
        .map(|_| replica_config(&upstream.base_url(), &store, &rest))
        .collect();
    Fleet::start(configs, vec![upstream]).await
}

/// A GET's status, `Cache-Status` (its `ttl` apart), `Age` and body.
struct Answer {
    status: StatusCode,
    cache: String,
    ttl: Option<u64>,
    age: u64,
    body: String,
}

async fn fetch(addr: SocketAddr, path: &str) -> Answer {
    fetch_with(addr, path, &[]).await
}

async fn fetch_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut request = Request::get(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = send(addr, request.body(empty_body()).unwrap())
        .await
        .expect("the proxy answers");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let (cache, age) = (header("cache-status"), header("age"));
    let (cache, ttl) = match cache.split_once("; ttl=") {
        Some((cache, ttl)) => (cache.to_owned(), ttl.parse().ok()),
        None => (cache, None),
    };
    Answer {
        status: response.status(),
        cache,
        ttl,
        age: age.parse().unwrap_or(u64::MAX),
        body: body_string(response.into_body()).await,
    }
}

const SHARED: &str = "bitbucket-auth-proxy; hit; detail=shared";
const HIT: &str = "bitbucket-auth-proxy; hit";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_cached_by_one_replica_is_served_by_the_others_from_the_store() {
    let redis = RedisServer::start().await;
    let fleet = fleet(&redis, Duration::ZERO).await;
    let path = "/x/widgets/pullrequests?state=OPEN";
    let first = fetch(fleet.addr(0), path).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.cache, "bitbucket-auth-proxy; fwd=miss");
    assert_eq!(first.body, r#"{"n":1,"credential":"x"}"#);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for i in [1, 2] {
        let shared = fetch(fleet.addr(i), path).await;
        assert_eq!(shared.status, StatusCode::OK);
        assert_eq!(shared.body, first.body, "replica {i}");
        // Age counts from when replica 0's request went out, on the store's clock.
        assert_eq!(shared.cache, SHARED, "replica {i}");
        // 60 s max_age: the TTL left and the age add up to it (less the rounding of each).
        let ttl = shared.ttl.unwrap();
        assert!((1..=5).contains(&shared.age), "replica {i}: {}", shared.age);
        assert!(
            (59..=60).contains(&(ttl + shared.age)),
            "replica {i}: {ttl} {}",
            shared.age
        );
    }
    // Now in replica 1's own memory: a plain hit.
    let local = fetch(fleet.addr(1), path).await;
    assert!(local.cache == HIT, "{}", local.cache);
    // A path pinned by a commit is shared too, with no max_age of its own.
    let file = format!("/x/widgets/src/{COMMIT}/README.md");
    assert_eq!(
        fetch(fleet.addr(2), &file).await.cache,
        "bitbucket-auth-proxy; fwd=miss"
    );
    assert_eq!(fetch(fleet.addr(0), &file).await.cache, SHARED);
    assert_eq!(
        fleet.upstream_requests(),
        2,
        "one upstream request per answer"
    );
    assert_eq!(
        fleet
            .metric("bitbucket_auth_proxy_store_cache_hits_total")
            .await,
        3
    );
    assert_eq!(
        fleet
            .metric("bitbucket_auth_proxy_store_cache_stored_total")
            .await,
        2
    );
    let dump = redis.dump().await;
    assert!(
        dump.iter()
            .any(|(key, values)| key.starts_with("t16:cache:")
                && values.iter().any(|v| v.contains(r#""credential":"x""#))),
        "entries and their bodies are in the store: {dump:?}"
    );
    assert_no_secret(&redis, &[TOKEN, OTHER_TOKEN]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_credentials_never_share_an_entry_through_the_store() {
    let redis = RedisServer::start().await;
    let fleet = fleet(&redis, Duration::ZERO).await;
    // The same upstream path through two routes holding two tokens.
    let x = fetch(fleet.addr(0), "/x/widgets/pullrequests").await;
    let y = fetch(fleet.addr(1), "/y/widgets/pullrequests").await;
    assert_eq!(x.body, r#"{"n":1,"credential":"x"}"#);
    assert_eq!(
        y.body, r#"{"n":2,"credential":"y"}"#,
        "route y's client got its own"
    );
    assert_eq!(y.cache, "bitbucket-auth-proxy; fwd=miss");
    // Each is shared only with its own credential's requests.
    let y_again = fetch(fleet.addr(2), "/y/widgets/pullrequests").await;
    let x_again = fetch(fleet.addr(2), "/x/widgets/pullrequests").await;
    assert_eq!(
        (y_again.cache.as_str(), y_again.body.as_str()),
        (SHARED, y.body.as_str())
    );
    assert_eq!(
        (x_again.cache.as_str(), x_again.body.as_str()),
        (SHARED, x.body.as_str())
    );
    // A header that selects a representation is part of the key.
    let other = fetch_with(
        fleet.addr(1),
        "/x/widgets/pullrequests",
        &[("accept", "text/plain")],
    )
    .await;
    assert_eq!(other.cache, "bitbucket-auth-proxy; fwd=miss");
    assert_eq!(fleet.upstream_requests(), 3);
    assert_no_secret(&redis, &[TOKEN, OTHER_TOKEN]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_replica_makes_the_repositorys_entries_stale_on_the_others() {
    let redis = RedisServer::start().await;
    let fleet = fleet(&redis, Duration::ZERO).await;
    let list = "/x/widgets/pullrequests";
    let other_repo = "/x/gadgets/pullrequests";
    let file = format!("/x/widgets/src/{COMMIT}/README.md");
    for path in [list, other_repo, file.as_str()] {
        assert_eq!(
            fetch(fleet.addr(0), path).await.cache,
            "bitbucket-auth-proxy; fwd=miss"
        );
        assert_eq!(fetch(fleet.addr(1), path).await.cache, SHARED, "{path}");
    }
    assert!(fetch(fleet.addr(1), list).await.cache == HIT);
    let before = fleet.upstream_requests();
    // A write to acme/widgets through replica 2.
    let response = send(
        fleet.addr(2),
        Request::post("/x/widgets/pullrequests/1/approve")
            .body(empty_body())
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    drain_body(response.into_body()).await;
    // Replica 1 held the list in its own memory: that copy is stale now too.
    let fresh = fetch(fleet.addr(1), list).await;
    assert_eq!(fresh.cache, "bitbucket-auth-proxy; fwd=miss");
    assert_eq!(
        fresh.body,
        format!(r#"{{"n":{},"credential":"x"}}"#, before + 2)
    );
    // Replica 0 gets what replica 1 fetched after the write, not its own older copy.
    let after = fetch(fleet.addr(0), list).await;
    assert_eq!(
        (after.cache.as_str(), after.body.as_str()),
        (SHARED, fresh.body.as_str())
    );
    // Another repository, and a file pinned by a commit, did not change.
    assert!(fetch(fleet.addr(1), other_repo).await.cache == HIT);
    assert!(fetch(fleet.addr(1), &file).await.cache == HIT);
    assert_eq!(
        fleet.upstream_requests(),
        before + 2,
        "the write and one refetch"
    );
    assert_no_secret(&redis, &[TOKEN, OTHER_TOKEN]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_misses_across_three_replicas_fetch_once() {
    let redis = RedisServer::start().await;
    // Slow enough that every request arrives while the first is upstream.
    let fleet = fleet(&redis, Duration::from_millis(600)).await;
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let addr = fleet.addr(i % 3);
            tokio::spawn(async move { fetch(addr, "/x/widgets/pullrequests?page=1").await })
        })
        .collect();
    let mut statuses = Vec::new();
    let mut bodies = std::collections::BTreeSet::new();
    for task in tasks {
        let answer = task.await.unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        bodies.insert(answer.body);
        statuses.push(answer.cache);
    }
    let upstream = fleet.upstream_requests();
    // One replica took the fill lock and went upstream (its other requests coalesced in
    // process); the others waited for its entry. The only way to more than one upstream
    // request is a store call over store.timeout (500 ms) on a loaded machine: that replica
    // then goes upstream itself, as it must, and the failed call is counted.
    if fleet
        .metric("bitbucket_auth_proxy_store_errors_total")
        .await
        == 0
    {
        assert_eq!(upstream, 1, "{statuses:?}");
        assert_eq!(
            bodies.len(),
            1,
            "every client got the one answer: {bodies:?}"
        );
        let misses = statuses.iter().filter(|s| s.ends_with("fwd=miss")).count();
        let shared = statuses.iter().filter(|s| s.starts_with(SHARED)).count();
        assert_eq!(misses, 1, "{statuses:?}");
        assert!(shared >= 2, "{statuses:?}");
        assert!(
            fleet
                .metric("bitbucket_auth_proxy_store_fill_waits_total")
                .await
                >= 2
        );
    } else {
        assert!(upstream <= 3, "{upstream}: {statuses:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_cache_reads_fall_back_to_each_replicas_own_cache() {
    let mut redis = RedisServer::start().await;
    let fleet = fleet(&redis, Duration::ZERO).await;
    let path = "/x/widgets/pullrequests";
    assert_eq!(
        fetch(fleet.addr(0), path).await.cache,
        "bitbucket-auth-proxy; fwd=miss"
    );
    redis.kill().await;
    // Replica 0 still answers from its own memory; the others go upstream once, then hold
    // their own copies. Nothing fails.
    for _ in 0..2 {
        let local = fetch(fleet.addr(0), path).await;
        assert_eq!(local.status, StatusCode::OK);
        assert!(local.cache == HIT, "{}", local.cache);
    }
    for i in [1, 2] {
        let first = fetch(fleet.addr(i), path).await;
        assert_eq!(
            (first.status, first.cache.as_str()),
            (StatusCode::OK, "bitbucket-auth-proxy; fwd=miss")
        );
        let again = fetch(fleet.addr(i), path).await;
        assert!(again.cache == HIT, "{}", again.cache);
    }
    assert_eq!(fleet.upstream_requests(), 3);
    assert!(
        fleet
            .metric("bitbucket_auth_proxy_store_cache_fallbacks_total")
            .await
            > 0
    );
    // Back, empty: the replicas share again.
    redis.restart().await;
    let mut shared = false;
    for page in 2..100 {
        let next = format!("/x/widgets/pullrequests?page={page}");
        let _ = fetch(fleet.addr(0), &next).await;
        if fetch(fleet.addr(1), &next).await.cache == SHARED {
            shared = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        shared,
        "the replicas share entries again after Redis came back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fill_releases_the_lock_at_once_and_a_waiter_fetches_instead() {
    let redis = RedisServer::start().await;
    let fleet = fleet(&redis, Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..3)
        .map(|i| {
            let addr = fleet.addr(i);
            tokio::spawn(async move { fetch(addr, "/x/widgets/pullrequests?fail-first=1").await })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        let answer = task.await.unwrap();
        statuses.push((answer.status, answer.cache));
    }
    let elapsed = started.elapsed();
    statuses.sort();
    if fleet
        .metric("bitbucket_auth_proxy_store_errors_total")
        .await
        == 0
    {
        // The lock holder's 503 is not stored and frees the lock at once: one waiter takes it
        // and fetches, the other gets its entry. Nobody waited out the lock's 5 s.
        assert_eq!(fleet.upstream_requests(), 2, "{statuses:?}");
        assert_eq!(
            statuses,
            [
                (StatusCode::OK, "bitbucket-auth-proxy; fwd=miss".to_owned()),
                (StatusCode::OK, SHARED.to_owned()),
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "bitbucket-auth-proxy; fwd=miss".to_owned()
                ),
            ]
        );
    }
    assert!(
        elapsed < Duration::from_secs(3),
        "{elapsed:?}: {statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_max_entry_bytes_never_reach_the_store() {
    let redis = RedisServer::start().await;
    let fleet = fleet(&redis, Duration::ZERO).await;
    let path = "/x/widgets/pullrequests?big=1";
    let first = fetch(fleet.addr(0), path).await;
    assert_eq!((first.status, first.body.len()), (StatusCode::OK, 4000));
    let started = std::time::Instant::now();
    let second = fetch(fleet.addr(1), path).await;
    assert_eq!(second.cache, "bitbucket-auth-proxy; fwd=miss", "not shared");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the fill lock was released"
    );
    assert_eq!(fleet.upstream_requests(), 2);
    let dump = redis.dump().await;
    assert!(
        !dump.iter().any(|(key, _)| key.starts_with("t16:cache:")
            && !key.starts_with("t16:cache:gen:")
            && !key.ends_with(":fill")),
        "no entry: {dump:?}"
    );
    // The fill lock goes as soon as the fetching task sees the body is too big (just after the
    // client got it).
    let mut locked = true;
    for _ in 0..40 {
        locked = redis
            .dump()
            .await
            .iter()
            .any(|(key, _)| key.ends_with(":fill"));
        if !locked {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!locked, "the fill lock was released");
    assert_eq!(
        fleet
            .metric("bitbucket_auth_proxy_store_cache_stored_total")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_entry_answers_a_request_the_fleets_budget_refuses() {
    let redis = RedisServer::start().await;
    // One request an hour for the whole fleet.
    let fleet = fleet_with(&redis, Duration::ZERO, "rate_limit = { per_hour = 1 }").await;
    let path = "/x/widgets/pullrequests";
    let first = fetch(fleet.addr(0), path).await;
    assert_eq!(first.cache, "bitbucket-auth-proxy; fwd=miss");
    // Replica 1's budget is spent by replica 0's request; the entry costs none.
    let shared = fetch(fleet.addr(1), path).await;
    assert_eq!(
        (shared.status, shared.cache.as_str(), shared.body.as_str()),
        (StatusCode::OK, SHARED, first.body.as_str())
    );
    // And now from its own memory.
    assert_eq!(fetch(fleet.addr(1), path).await.cache, HIT);
    let other = fetch(fleet.addr(2), "/x/widgets/pullrequests?page=2").await;
    assert_eq!(other.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(fleet.upstream_requests(), 1);
}
