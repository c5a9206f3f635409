//! `upstream.keep_warm` (issue 18): the proxy holds a connected spare to its upstream before any
//! request needs one, replaces it when the upstream closes it, and backs off when the upstream
//! cannot be reached.
//!
//! The mock upstream ([`NumberingUpstream`]) tells which connection a request travelled on: one
//! opened before the request, or one the request had to open itself.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::numbering::{self, NumberingUpstream};
use support::proxy::*;
use support::*;

const PATH: &str = "/2.0/repositories/acme/widgets";

async fn proxy_to(url: &str, pki: &TestPki, upstream_lines: &str) -> TestProxy {
    Setup::new(url, pki.ca_path())
        .keep_warm()
        .upstream(upstream_lines)
        .start()
        .await
}

/// Polls `condition` every 10 ms until it holds; panics naming `what` after `limit`.
async fn wait_until(limit: Duration, what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn served_on(proxy: &TestProxy) -> String {
    let mut served = numbering::served_on(proxy.addr, PATH, 1).await;
    served.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_request_travels_on_a_connection_opened_at_start_up() {
    let pki = TestPki::new();
    for alpn in [ALPN_H2_H1, ALPN_H1] {
        let upstream = NumberingUpstream::start(&pki, alpn, Duration::from_secs(60));
        let proxy = proxy_to(&upstream.raw.base_url(), &pki, "").await;
        // Readiness waits for the spare (bounded by connect_timeout).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let response = get(proxy.addr, "/-/ready").await;
            if response.status() == StatusCode::OK {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{alpn:?}: never ready"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The proxy counts the spare as connected once its side of the TLS handshake is done;
        // the upstream counts it a moment later, when it has read the client's Finished.
        wait_until(Duration::from_secs(5), "the spare's handshake", || {
            upstream.handshakes() >= 1
        })
        .await;
        assert_eq!(
            upstream.handshakes(),
            1,
            "{alpn:?}: one spare before any request"
        );
        assert_eq!(served_on(&proxy).await, "1", "{alpn:?}");
        // The spare was taken: the next is opened without waiting for a request.
        wait_until(Duration::from_secs(5), "a second spare", || {
            upstream.handshakes() == 2
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_the_upstream_closes_is_replaced_without_a_request() {
    let pki = TestPki::new();
    let lifetime = Duration::from_millis(1500);
    let upstream = NumberingUpstream::start(&pki, ALPN_H2_H1, lifetime);
    let proxy = proxy_to(&upstream.raw.base_url(), &pki, "").await;
    wait_until(Duration::from_secs(5), "the replacement spare", || {
        upstream.handshakes() >= 2
    })
    .await;
    assert_eq!(upstream.raw.connection_count(), 2, "nothing but spares");
    // Well inside the replacement's lifetime, and after its handshake has surely finished.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(served_on(&proxy).await, "2");

    // A pooled h2 connection the upstream closed is also not waited for: after the close,
    // the request gets the spare that was opened meanwhile.
    tokio::time::sleep(lifetime + Duration::from_millis(200)).await;
    let before = upstream.handshakes();
    let number: usize = served_on(&proxy).await.parse().unwrap();
    assert!(
        number <= before,
        "served on connection {number}, opened for the request (spares so far: {before})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_retried_with_backoff_and_requests_do_not_wait_for_it() {
    let pki = TestPki::new();
    // Accepts TCP and closes at once: every TLS handshake fails.
    let upstream = RawUpstream::start(|stream| async move { drop(stream) });
    let url = format!("https://{}", upstream.addr());
    let proxy = proxy_to(&url, &pki, "connect_timeout = \"1s\"").await;
    let started = tokio::time::Instant::now();

    let response = get(proxy.addr, PATH).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert!(started.elapsed() < Duration::from_secs(2));

    tokio::time::sleep(Duration::from_secs(3).saturating_sub(started.elapsed())).await;
    // Attempts at about 0, 0.25, 0.75 and 1.75 s, plus the request's own: a tight loop would
    // have made hundreds.
    let attempts = upstream.connection_count();
    assert!((3..=7).contains(&attempts), "{attempts} connections in 3 s");
    // The failure settled the first attempt: readiness does not wait for a down upstream.
    assert_eq!(get(proxy.addr, "/-/ready").await.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_warm_false_opens_nothing_before_a_request() {
    let pki = TestPki::new();
    let upstream = NumberingUpstream::start(&pki, ALPN_H2_H1, Duration::from_secs(60));
    // Setup writes `keep_warm = false` unless told otherwise.
    let proxy = Setup::new(&upstream.raw.base_url(), pki.ca_path())
        .start()
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(upstream.raw.connection_count(), 0);
    assert_eq!(served_on(&proxy).await, "1");
}

#[test]
fn keep_warm_is_on_by_default_and_must_be_a_boolean() {
    use bitbucket_auth_proxy::Config;
    let pki = TestPki::new();
    let setup = Setup::new("https://127.0.0.1:1", pki.ca_path());
    let parse = |toml: &str| Config::from_toml(std::path::Path::new("test.toml"), toml);
    let on = setup.keep_warm().toml();
    assert!(parse(&on).unwrap().upstream.keep_warm);
    let off = Setup::new("https://127.0.0.1:1", pki.ca_path()).toml();
    assert!(!parse(&off).unwrap().upstream.keep_warm);
    let wrong = on.replace("[upstream]\n", "[upstream]\nkeep_warm = \"yes\"\n");
    let error = parse(&wrong).unwrap_err().to_string();
    // A type error names the file, the key, what was expected and the line.
    assert!(
        error.contains("test.toml: upstream.keep_warm: expected a boolean")
            && error.contains("(line 6)"),
        "{error}"
    );
}
