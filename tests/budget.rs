//! Issue 15, items 3 to 5: the 429 cool-down per credential and its single probe, Bitbucket's
//! `X-RateLimit-*` figures in the governor (a reported limit replaces the configured guess,
//! NearLimit paces), `rate_limit.max_wait`, a budget given back by a request that never went
//! upstream, and what metrics and `/-/ready` show of it all. Against a mock Bitbucket that
//! scripts its answers and records when each request arrived.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http::{Response, StatusCode};
use support::proxy::assert_proxy_error;
use support::proxy::{config_head, start_config};
use support::*;

/// One scripted answer of the mock Bitbucket.
struct Answer {
    status: StatusCode,
    headers: Vec<(&'static str, String)>,
    delay: Duration,
}

impl Answer {
    fn ok() -> Answer {
        Answer {
            status: StatusCode::OK,
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    /// Bitbucket's 429, marked so a test can tell it from the proxy's own.
    fn too_many() -> Answer {
        Answer {
            status: StatusCode::TOO_MANY_REQUESTS,
            ..Answer::ok()
        }
        .header("x-upstream-marker", "bitbucket")
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Answer {
        self.headers.push((name, value.into()));
        self
    }

    fn after(mut self, delay: Duration) -> Answer {
        self.delay = delay;
        self
    }
}

/// The mock Bitbucket: `answer(n, path)` scripts the n-th API request (1-based). Token
/// requests (`/site/oauth2/...`) go to `tokens` and are not counted as API requests.
struct Bitbucket {
    mock: MockUpstream,
    arrivals: Arc<Mutex<Vec<Instant>>>,
}

impl Bitbucket {
    fn start(
        pki: &TestPki,
        answer: impl Fn(usize, &str) -> Answer + Send + Sync + 'static,
    ) -> Bitbucket {
        Self::with_tokens(pki, answer, |_| StatusCode::OK)
    }

    fn with_tokens(
        pki: &TestPki,
        answer: impl Fn(usize, &str) -> Answer + Send + Sync + 'static,
        tokens: impl Fn(usize) -> StatusCode + Send + Sync + 'static,
    ) -> Bitbucket {
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let token_calls = Arc::new(Mutex::new(0));
        let answer = Arc::new(answer);
        let tokens = Arc::new(tokens);
        let seen = arrivals.clone();
        let mock = MockUpstream::start(pki.server_config(), move |head, body| {
            let (seen, answer, tokens, token_calls) = (
                seen.clone(),
                answer.clone(),
                tokens.clone(),
                token_calls.clone(),
            );
            async move {
                drain_body(body).await;
                if head.uri.starts_with("/site/oauth2/") {
                    let call = {
                        let mut calls = token_calls.lock().unwrap();
                        *calls += 1;
                        *calls
                    };
                    let status = tokens(call);
                    return Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(full_body(
                            r#"{"access_token":"tok","expires_in":3600,"token_type":"bearer"}"#,
                        ))
                        .unwrap();
                }
                let n = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(Instant::now());
                    seen.len()
                };
                let scripted = answer(n, &head.uri);
                tokio::time::sleep(scripted.delay).await;
                let mut response = Response::builder().status(scripted.status);
                for (name, value) in scripted.headers {
                    response = response.header(name, value);
                }
                let body = if scripted.status == StatusCode::TOO_MANY_REQUESTS {
                    r#"{"type":"error","error":{"message":"Rate limit for this resource has been exceeded"}}"#
                } else {
                    "{}"
                };
                response.body(full_body(body)).unwrap()
            }
        });
        Bitbucket { mock, arrivals }
    }

    fn served(&self) -> usize {
        self.arrivals.lock().unwrap().len()
    }

    fn arrivals(&self) -> Vec<Instant> {
        self.arrivals.lock().unwrap().clone()
    }
}

/// Workspace token `acme-all` on two routes (the cool-down covers both), plus `extra` TOML.
fn acme(rate_limit: &str) -> String {
    format!(
        r#"
[credentials.acme-all]
kind = "workspace_access_token"
workspace = "acme"
token = {{ value = "t" }}
{rate_limit}

[[routes]]
prefix = "/2.0/repositories/acme/widgets"
credential = "acme-all"

[[routes]]
prefix = "/2.0/repositories/acme/gadgets"
credential = "acme-all"
"#
    )
}

async fn start_proxy(
    pki: &TestPki,
    upstream: &Bitbucket,
    credentials_and_routes: &str,
) -> bitbucket_auth_proxy::RunningProxy {
    let head = config_head(&upstream.mock.base_url(), pki.ca_path(), "timeout = \"5s\"");
    start_config("budget.toml", &format!("{head}{credentials_and_routes}")).await
}

/// Asserts the proxy's own 429 with `reason` and returns its `Retry-After` and error detail.
async fn local_429(response: Response<hyper::body::Incoming>, reason: &str) -> (u64, String) {
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["x-bitbucket-auth-proxy"], reason);
    assert!(response.headers().get("x-upstream-marker").is_none());
    let retry_after = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After is whole seconds");
    let body: serde_json::Value =
        serde_json::from_str(&body_string(response.into_body()).await).unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(
        body["error"]["message"],
        "Rate limit for this resource has been exceeded"
    );
    (
        retry_after,
        body["error"]["detail"].as_str().unwrap().to_owned(),
    )
}

async fn ready(addr: SocketAddr) -> serde_json::Value {
    let response = get(addr, "/-/ready").await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "a cool-down is not a fault"
    );
    serde_json::from_str(&body_string(response.into_body()).await).unwrap()
}

/// The value of one series in `/-/metrics`.
async fn metric(addr: SocketAddr, series: &str) -> Option<String> {
    let text = body_string(get(addr, "/-/metrics").await.into_body()).await;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(str::to_owned)
}

fn series(name: &str, credential: &str) -> String {
    format!("bitbucket_auth_proxy_{name}{{credential=\"{credential}\"}}")
}

const WIDGETS: &str = "/2.0/repositories/acme/widgets/pullrequests";
const GADGETS: &str = "/2.0/repositories/acme/gadgets/refs/branches";

#[tokio::test]
async fn a_429_holds_every_route_of_the_credential_until_retry_after_then_one_probe_reopens() {
    let pki = TestPki::new();
    let upstream = Bitbucket::start(&pki, |n, _| match n {
        1 => Answer::too_many().header("retry-after", "2"),
        _ => Answer::ok(),
    });
    let proxy = start_proxy(&pki, &upstream, &acme("")).await;
    let addr = proxy.local_addrs()[0];
    let started = Instant::now();

    // Bitbucket's own 429 reaches the client unchanged.
    let first = get(addr, WIDGETS).await;
    assert_eq!(first.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(first.headers()["x-upstream-marker"], "bitbucket");
    assert_eq!(first.headers()["retry-after"], "2");

    // The other route shares the credential: answered locally, with an exact Retry-After.
    let (retry_after, detail) = local_429(get(addr, GADGETS).await, "cooling-down").await;
    assert!((1..=2).contains(&retry_after), "Retry-After: {retry_after}");
    assert!(detail.contains("acme-all"), "{detail}");
    assert_eq!(upstream.served(), 1);

    let cooldown = &ready(addr).await["cooldowns"]["acme-all"];
    assert_eq!(cooldown["probing"], false, "{cooldown}");
    assert_eq!(cooldown["consecutive_429s"], 1, "{cooldown}");
    assert_eq!(cooldown["from_retry_after"], true, "{cooldown}");
    assert!(
        (1..=2).contains(&cooldown["retry_after_s"].as_u64().unwrap()),
        "{cooldown}"
    );
    assert_eq!(
        metric(addr, &series("ratelimit_budget_left", "acme-all")).await,
        Some("0".into())
    );

    tokio::time::sleep(
        (started + Duration::from_millis(2100)).saturating_duration_since(Instant::now()),
    )
    .await;
    assert_eq!(get(addr, GADGETS).await.status(), StatusCode::OK);
    assert_eq!(get(addr, WIDGETS).await.status(), StatusCode::OK);
    assert_eq!(upstream.served(), 3);
    assert_eq!(ready(addr).await["cooldowns"], serde_json::json!({}));

    for (name, value) in [
        ("upstream_requests_total", "3"),
        ("cooldowns_total", "1"),
        ("cooldown_refused_total", "1"),
        ("ratelimit_local_refused_total", "0"),
        ("governor_delayed_total", "0"),
    ] {
        assert_eq!(
            metric(addr, &series(name, "acme-all")).await.as_deref(),
            Some(value),
            "{name}"
        );
    }
}

#[tokio::test]
async fn retry_after_as_an_http_date_and_the_default_cool_down_without_one() {
    let pki = TestPki::new();
    let upstream = Bitbucket::start(&pki, |_, path| {
        if path.contains("/dated/") {
            let at = SystemTime::now() + Duration::from_secs(3);
            Answer::too_many().header("retry-after", httpdate::fmt_http_date(at))
        } else {
            Answer::too_many()
        }
    });
    let config = r#"
[credentials.dated]
kind = "workspace_access_token"
workspace = "acme"
token = { value = "d" }

[credentials.bare]
kind = "workspace_access_token"
workspace = "acme"
token = { value = "b" }

[[routes]]
prefix = "/2.0/repositories/acme/dated"
credential = "dated"

[[routes]]
prefix = "/2.0/repositories/acme/bare"
credential = "bare"
"#;
    let proxy = start_proxy(&pki, &upstream, config).await;
    let addr = proxy.local_addrs()[0];
    for path in [
        "/2.0/repositories/acme/dated/",
        "/2.0/repositories/acme/bare/",
    ] {
        let response = get(addr, path).await;
        assert_eq!(response.headers()["x-upstream-marker"], "bitbucket");
    }
    // An HTTP-date has whole seconds: 3 s from the mock's clock is 2 to 3 s from the proxy's.
    let (dated, _) = local_429(
        get(addr, "/2.0/repositories/acme/dated/").await,
        "cooling-down",
    )
    .await;
    assert!((2..=3).contains(&dated), "Retry-After: {dated}");
    // No Retry-After: the documented 30 s.
    let (bare, _) = local_429(
        get(addr, "/2.0/repositories/acme/bare/").await,
        "cooling-down",
    )
    .await;
    assert!((29..=30).contains(&bare), "Retry-After: {bare}");
    let cooldowns = &ready(addr).await["cooldowns"];
    assert_eq!(cooldowns["bare"]["from_retry_after"], false, "{cooldowns}");
    assert_eq!(cooldowns["dated"]["from_retry_after"], true, "{cooldowns}");
    assert_eq!(upstream.served(), 2);
}

/// After the cool-down, 20 clients at once: one request reaches Bitbucket, the rest wait for
/// its answer. `probe_answer` is what Bitbucket answers that probe (after 400 ms).
async fn twenty_after_a_cool_down(
    probe_answer: fn() -> Answer,
) -> (
    Bitbucket,
    Vec<Response<hyper::body::Incoming>>,
    SocketAddr,
    bitbucket_auth_proxy::RunningProxy,
) {
    let pki = TestPki::new();
    let upstream = Bitbucket::start(&pki, move |n, _| match n {
        1 => Answer::too_many().header("retry-after", "1"),
        2 => probe_answer().after(Duration::from_millis(400)),
        _ => Answer::ok(),
    });
    let proxy = start_proxy(&pki, &upstream, &acme("")).await;
    let addr = proxy.local_addrs()[0];
    assert_eq!(
        get(addr, WIDGETS).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let clients: Vec<_> = (0..20)
        .map(|i| {
            // Distinct queries, so that coalescing does not merge them into one request.
            let path = format!("{}?page={i}", if i % 2 == 0 { WIDGETS } else { GADGETS });
            tokio::spawn(async move { get(addr, &path).await })
        })
        .collect();
    let mut responses = Vec::new();
    for client in clients {
        responses.push(client.await.unwrap());
    }
    (upstream, responses, addr, proxy)
}

#[tokio::test]
async fn after_the_cool_down_exactly_one_request_probes_and_the_rest_follow_its_success() {
    let (upstream, responses, addr, _proxy) = twenty_after_a_cool_down(Answer::ok).await;
    assert!(responses.iter().all(|r| r.status() == StatusCode::OK));
    assert_eq!(upstream.served(), 21);
    let arrivals = upstream.arrivals();
    let probe = arrivals[1];
    assert!(
        arrivals[2..]
            .iter()
            .all(|&at| at >= probe + Duration::from_millis(350)),
        "a request reached Bitbucket while the probe was out"
    );
    let waited: u64 = metric(addr, &series("cooldown_waited_total", "acme-all"))
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=19).contains(&waited), "cooldown_waited_total {waited}");
}

#[tokio::test]
async fn a_probe_answered_429_renews_the_cool_down_for_everyone_waiting() {
    let (upstream, responses, addr, _proxy) =
        twenty_after_a_cool_down(|| Answer::too_many().header("retry-after", "5")).await;
    assert_eq!(upstream.served(), 2, "only the probe went upstream");
    let mut from_bitbucket = 0;
    for response in responses {
        if response.headers().contains_key("x-upstream-marker") {
            from_bitbucket += 1;
            continue;
        }
        let (retry_after, _) = local_429(response, "cooling-down").await;
        assert!((4..=5).contains(&retry_after), "Retry-After: {retry_after}");
    }
    assert_eq!(from_bitbucket, 1);
    let cooldown = &ready(addr).await["cooldowns"]["acme-all"];
    assert_eq!(cooldown["consecutive_429s"], 2, "{cooldown}");
}

#[tokio::test]
async fn near_limit_paces_a_credential_that_has_no_rate_limit() {
    let pki = TestPki::new();
    // 3600 per hour is one per second once Bitbucket says the budget is nearly spent.
    let upstream = Bitbucket::start(&pki, |_, _| {
        Answer::ok()
            .header("x-ratelimit-limit", "3600")
            .header("x-ratelimit-resource", "api/repositories")
            .header("x-ratelimit-nearlimit", "true")
    });
    let proxy = start_proxy(&pki, &upstream, &acme("")).await;
    let addr = proxy.local_addrs()[0];
    assert_eq!(get(addr, WIDGETS).await.status(), StatusCode::OK);
    assert_eq!(get(addr, WIDGETS).await.status(), StatusCode::OK);
    let (retry_after, detail) = local_429(get(addr, GADGETS).await, "rate-limited").await;
    assert_eq!(retry_after, 1);
    assert!(detail.contains("near its limit of 3600"), "{detail}");
    assert_eq!(upstream.served(), 2);
    assert_eq!(
        ready(addr).await["near_limit"]["acme-all"],
        serde_json::json!(["api/repositories"])
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(addr, GADGETS).await.status(), StatusCode::OK);
    assert_eq!(
        metric(addr, &series("ratelimit_near_limit", "acme-all")).await,
        Some("1".into())
    );
    assert_eq!(
        metric(addr, &series("ratelimit_local_refused_total", "acme-all")).await,
        Some("1".into())
    );
}

#[tokio::test]
async fn max_wait_delays_a_request_for_its_slot_then_refuses_beyond_it() {
    let pki = TestPki::new();
    let upstream = Bitbucket::start(&pki, |_, _| Answer::ok());
    let proxy = start_proxy(
        &pki,
        &upstream,
        &acme(r#"rate_limit = { per_hour = 3600, burst = 1, max_wait = "1500ms" }"#),
    )
    .await;
    let addr = proxy.local_addrs()[0];
    assert_eq!(get(addr, WIDGETS).await.status(), StatusCode::OK);
    // The next slot is 1 s away (within max_wait), the one after 2 s (beyond it).
    let started = Instant::now();
    let (a, b) = tokio::join!(get(addr, WIDGETS), get(addr, GADGETS));
    let (admitted, refused) = if a.status() == StatusCode::OK {
        (a, b)
    } else {
        (b, a)
    };
    assert_eq!(admitted.status(), StatusCode::OK);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    let (retry_after, _) = local_429(refused, "rate-limited").await;
    assert!((1..=2).contains(&retry_after), "Retry-After: {retry_after}");
    assert_eq!(upstream.served(), 2);
    for (name, value) in [
        ("governor_delayed_total", "1"),
        ("ratelimit_local_refused_total", "1"),
        ("upstream_requests_total", "2"),
    ] {
        assert_eq!(
            metric(addr, &series(name, "acme-all")).await.as_deref(),
            Some(value),
            "{name}"
        );
    }
}

#[tokio::test]
async fn the_limit_bitbucket_reports_replaces_the_configured_guess() {
    let pki = TestPki::new();
    let upstream = Bitbucket::start(&pki, |_, _| {
        Answer::ok().header("x-ratelimit-limit", "3600")
    });
    // A guess of 2 per hour would refuse the third request for an hour.
    let proxy = start_proxy(
        &pki,
        &upstream,
        &acme("rate_limit = { per_hour = 2, burst = 2 }"),
    )
    .await;
    let addr = proxy.local_addrs()[0];
    assert_eq!(get(addr, WIDGETS).await.status(), StatusCode::OK);
    assert_eq!(get(addr, WIDGETS).await.status(), StatusCode::OK);
    // Bitbucket's 3600 per hour with the configured burst of 2: the next slot is 1 s away.
    let (retry_after, detail) = local_429(get(addr, WIDGETS).await, "rate-limited").await;
    assert_eq!(retry_after, 1);
    assert!(
        detail.contains("3600 per hour as Bitbucket reported it"),
        "{detail}"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(addr, WIDGETS).await.status(), StatusCode::OK);
    assert_eq!(upstream.served(), 3);
    for (name, value) in [
        ("ratelimit_limit", "3600"),
        ("ratelimit_local_sent", "3"),
        ("ratelimit_local_remaining", "3597"),
        ("ratelimit_budget_left", "3597"),
    ] {
        assert_eq!(
            metric(addr, &series(name, "acme-all")).await.as_deref(),
            Some(value),
            "{name}"
        );
    }
}

#[tokio::test]
async fn a_request_that_never_reached_bitbucket_gives_its_budget_back() {
    let pki = TestPki::new();
    // The token endpoint fails once: that request is governed, then answered 502 without
    // going upstream.
    let upstream = Bitbucket::with_tokens(
        &pki,
        |_, _| Answer::ok(),
        |call| {
            if call == 1 {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::OK
            }
        },
    );
    let config = format!(
        r#"
[credentials.consumer]
kind = "oauth_client_credentials"
client_id = "AbCdEf"
client_secret = {{ value = "s" }}
token_url = "{base}/site/oauth2/access_token"
rate_limit = {{ per_hour = 1, burst = 1 }}

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "consumer"
"#,
        base = upstream.mock.base_url()
    );
    let proxy = start_proxy(&pki, &upstream, &config).await;
    let addr = proxy.local_addrs()[0];
    assert_proxy_error(get(addr, WIDGETS).await, 502, "token-endpoint").await;
    // The one request of the hour is still available.
    assert_eq!(get(addr, WIDGETS).await.status(), StatusCode::OK);
    assert_eq!(upstream.served(), 1);
    let (retry_after, _) = local_429(get(addr, WIDGETS).await, "rate-limited").await;
    assert!(
        (3590..=3600).contains(&retry_after),
        "Retry-After: {retry_after}"
    );
    assert_eq!(
        metric(addr, &series("upstream_requests_total", "consumer")).await,
        Some("1".into())
    );
}
