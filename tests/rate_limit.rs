//! Issue 5: the rate-limit governor, against a mock Bitbucket that counts and enforces a small
//! budget of its own.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use support::proxy::{config_head, start_config};
use support::*;

/// Bitbucket with a budget of `budget` requests, then its own 429. With `reports`, answers
/// carry `X-RateLimit-Limit` (which replaces a configured `per_hour`, so tests of the configured
/// limit alone leave it out).
fn budgeted_upstream(
    pki: &TestPki,
    budget: usize,
    reports: bool,
) -> (MockUpstream, Arc<AtomicUsize>) {
    let served = Arc::new(AtomicUsize::new(0));
    let counter = served.clone();
    let mock = MockUpstream::start_simple(pki.server_config(), move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        if n > budget {
            return Response::builder()
                .status(StatusCode::TOO_MANY_REQUESTS)
                .header("x-upstream-marker", "bitbucket")
                .header("retry-after", "1800")
                .body(Full::new(Bytes::from_static(
                    b"{\"type\":\"error\",\"error\":{\"message\":\"Rate limit for this resource has been exceeded\"}}",
                )))
                .unwrap();
        }
        let mut response = Response::builder();
        if reports {
            response = response.header("x-ratelimit-limit", budget.to_string());
        }
        response.body(Full::new(Bytes::from_static(b"{}"))).unwrap()
    });
    (mock, served)
}

async fn start_proxy(
    pki: &TestPki,
    upstream: &MockUpstream,
    rate_limit: &str,
) -> bitbucket_auth_proxy::RunningProxy {
    let head = config_head(&upstream.base_url(), pki.ca_path(), "");
    let text = format!(
        r#"{head}
[credentials.acme-all]
kind = "workspace_access_token"
workspace = "acme"
token = {{ value = "t" }}
{rate_limit}

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "acme-all"
"#
    );
    start_config("rate.toml", &text).await
}

#[tokio::test]
async fn without_a_local_limit_bitbuckets_own_429_passes_through_unchanged() {
    let pki = TestPki::new();
    let (upstream, served) = budgeted_upstream(&pki, 3, true);
    let proxy = start_proxy(&pki, &upstream, "").await;
    let addr = proxy.local_addrs()[0];
    for _ in 0..3 {
        assert_eq!(
            get(addr, "/2.0/repositories/acme/widgets").await.status(),
            StatusCode::OK
        );
    }
    let refused = get(addr, "/2.0/repositories/acme/widgets").await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers()["x-upstream-marker"], "bitbucket");
    assert_eq!(refused.headers()["retry-after"], "1800");
    assert!(refused.headers().get("x-bitbucket-auth-proxy").is_none());
    assert!(
        body_string(refused.into_body())
            .await
            .contains("Rate limit for this resource")
    );
    assert_eq!(served.load(Ordering::SeqCst), 4);
    // That 429 started a cool-down: the next request is answered locally, with what is left of
    // Bitbucket's Retry-After.
    let held = get(addr, "/2.0/repositories/acme/widgets").await;
    assert_eq!(held.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(held.headers()["x-bitbucket-auth-proxy"], "cooling-down");
    let retry_after = held.headers()["retry-after"].to_str().unwrap().to_owned();
    assert!(
        ["1799", "1800"].contains(&retry_after.as_str()),
        "{retry_after}"
    );
    assert_eq!(served.load(Ordering::SeqCst), 4);
    // The last X-RateLimit-* values and the hour's count show in the metrics.
    let metrics = body_string(get(addr, "/-/metrics").await.into_body()).await;
    assert!(
        metrics.contains(r#"bitbucket_auth_proxy_ratelimit_limit{credential="acme-all"} 3"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"bitbucket_auth_proxy_ratelimit_local_sent{credential="acme-all"} 4"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_spent_local_budget_answers_429_with_retry_after_and_spares_bitbucket() {
    let pki = TestPki::new();
    let (upstream, served) = budgeted_upstream(&pki, 100, false);
    let proxy = start_proxy(&pki, &upstream, "rate_limit = { per_hour = 3, burst = 3 }").await;
    let addr = proxy.local_addrs()[0];
    for _ in 0..3 {
        assert_eq!(
            get(addr, "/2.0/repositories/acme/widgets").await.status(),
            StatusCode::OK
        );
    }
    let refused = get(addr, "/2.0/repositories/acme/widgets").await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers()["x-bitbucket-auth-proxy"], "rate-limited");
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // The first request leaves the rolling hour 3600 s after it was sent.
    assert!(
        (3590..=3600).contains(&retry_after),
        "Retry-After: {retry_after}"
    );
    let body: serde_json::Value =
        serde_json::from_str(&body_string(refused.into_body()).await).unwrap();
    assert_eq!(body["type"], "error");
    assert!(
        body["error"]["detail"]
            .as_str()
            .unwrap()
            .contains("acme-all")
    );
    assert_eq!(
        served.load(Ordering::SeqCst),
        3,
        "the refused request never reached Bitbucket"
    );
    let metrics = body_string(get(addr, "/-/metrics").await.into_body()).await;
    assert!(
        metrics
            .contains(r#"bitbucket_auth_proxy_ratelimit_local_remaining{credential="acme-all"} 0"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"bitbucket_auth_proxy_ratelimit_local_refused_total{credential="acme-all"} 1"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn bursts_are_paced_to_the_hourly_rate() {
    let pki = TestPki::new();
    let (upstream, _) = budgeted_upstream(&pki, 1000, false);
    // 3600 per hour is one per second, after a burst of 2.
    let proxy = start_proxy(
        &pki,
        &upstream,
        "rate_limit = { per_hour = 3600, burst = 2 }",
    )
    .await;
    let addr = proxy.local_addrs()[0];
    assert_eq!(
        get(addr, "/2.0/repositories/acme/x").await.status(),
        StatusCode::OK
    );
    assert_eq!(
        get(addr, "/2.0/repositories/acme/x").await.status(),
        StatusCode::OK
    );
    let paced = get(addr, "/2.0/repositories/acme/x").await;
    assert_eq!(paced.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(paced.headers()["retry-after"], "1");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(
        get(addr, "/2.0/repositories/acme/x").await.status(),
        StatusCode::OK
    );
}
