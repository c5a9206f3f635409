//! Issue 5: OAuth consumers. A mock token endpoint on loopback counts its calls and issues
//! short-lived tokens; a mock API accepts only the current token.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use support::proxy::{config_head, start_config, toml_string};
use support::*;

const CLIENT_ID: &str = "AbCdEf";
const CLIENT_SECRET: &str = "consumer-secret-Qw7";

/// A token endpoint that hands out `token-1`, `token-2`, … with a given lifetime.
struct TokenEndpoint {
    mock: MockUpstream,
    calls: Arc<AtomicUsize>,
}

impl TokenEndpoint {
    fn start(pki: &TestPki, expires_in: u64, delay: Duration, status: StatusCode) -> TokenEndpoint {
        TokenEndpoint::answering(pki, delay, move |n| {
            let json = if status == StatusCode::OK {
                format!(
                    r#"{{"access_token":"token-{n}","expires_in":{expires_in},"token_type":"bearer","scopes":"repository"}}"#
                )
            } else {
                r#"{"error":"invalid_client","error_description":"Invalid OAuth client credentials"}"#.to_owned()
            };
            (status, json)
        })
    }

    /// A token endpoint whose `n`th answer (counted from 1) is `answer(n)`.
    fn answering(
        pki: &TestPki,
        delay: Duration,
        answer: impl Fn(usize) -> (StatusCode, String) + Send + Sync + 'static,
    ) -> TokenEndpoint {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let answer = Arc::new(answer);
        let mock = MockUpstream::start(pki.server_config(), move |head, body| {
            let counter = counter.clone();
            let answer = answer.clone();
            async move {
                let body = collect_body(body).await;
                assert_eq!(head.method, Method::POST);
                assert_eq!(&body[..], b"grant_type=client_credentials");
                let expected = format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD
                        .encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
                );
                assert_eq!(head.header("authorization"), Some(expected.as_str()));
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(delay).await;
                let (status, json) = answer(n);
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(full_body(json))
                    .unwrap()
            }
        });
        TokenEndpoint { mock, calls }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// An API that accepts only `Bearer token-N` for the newest N it has been told about
/// (`accept_from`): older tokens get a 401, as Bitbucket answers for a revoked token.
fn api(pki: &TestPki, accept_from: Arc<AtomicUsize>) -> MockUpstream {
    MockUpstream::start_simple(pki.server_config(), move |head| {
        let auth = head.header("authorization").unwrap_or_default().to_owned();
        let number = token_number(&auth);
        if number == 0 || number < accept_from.load(Ordering::SeqCst) {
            return Response::builder()
                .status(StatusCode::UNAUTHORIZED)
                .header("www-authenticate", "Basic realm=\"Bitbucket.org HTTP\"")
                .body(Full::new(Bytes::from_static(
                    b"{\"type\":\"error\",\"error\":{\"message\":\"Access token expired.\"}}",
                )))
                .unwrap();
        }
        Response::new(Full::new(Bytes::from(format!("ok with {auth}"))))
    })
}

/// N for `Bearer token-N` or git's `Basic base64(x-token-auth:token-N)`; 0 for anything else.
fn token_number(authorization: &str) -> usize {
    if let Some(n) = authorization.strip_prefix("Bearer token-") {
        return n.parse().unwrap_or(0);
    }
    authorization
        .strip_prefix("Basic ")
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .and_then(|plain| String::from_utf8(plain).ok())
        .and_then(|plain| plain.strip_prefix("x-token-auth:token-")?.parse().ok())
        .unwrap_or(0)
}

async fn start_proxy(
    pki: &TestPki,
    api: &MockUpstream,
    tokens: &TokenEndpoint,
) -> bitbucket_auth_proxy::RunningProxy {
    start_proxy_with(pki, api, tokens, "", "").await
}

/// [`start_proxy`] with `token_query` after the token URL's path and `extra` lines in the
/// credential's table.
async fn start_proxy_with(
    pki: &TestPki,
    api: &MockUpstream,
    tokens: &TokenEndpoint,
    token_query: &str,
    extra: &str,
) -> bitbucket_auth_proxy::RunningProxy {
    let api = api.base_url();
    let upstream_lines = format!("git_url = {}\ntimeout = \"5s\"", toml_string(&api));
    let head = config_head(&api, pki.ca_path(), &upstream_lines);
    let text = format!(
        r#"{head}
[credentials.ci-consumer]
kind = "oauth_client_credentials"
client_id = "{CLIENT_ID}"
client_secret = {{ value = "{CLIENT_SECRET}" }}
token_url = "{tokens}/site/oauth2/access_token{token_query}"
{extra}

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "ci-consumer"

[[routes]]
prefix = "/git/acme"
upstream = "git"
upstream_prefix = "/acme"
credential = "ci-consumer"
"#,
        tokens = tokens.mock.base_url(),
    );
    start_config("oauth.toml", &text).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_fetched_once_cached_and_sent_as_bearer_and_git_basic() {
    let pki = TestPki::new();
    let tokens = TokenEndpoint::start(&pki, 3600, Duration::ZERO, StatusCode::OK);
    let api = api(&pki, Arc::new(AtomicUsize::new(1)));
    let proxy = start_proxy(&pki, &api, &tokens).await;
    let addr = proxy.local_addrs()[0];
    for _ in 0..5 {
        let response = get(addr, "/2.0/repositories/acme/widgets").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            body_string(response.into_body()).await,
            "ok with Bearer token-1"
        );
    }
    let git = get(
        addr,
        "/git/acme/widgets.git/info/refs?service=git-upload-pack",
    )
    .await;
    assert_eq!(git.status(), StatusCode::OK);
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("x-token-auth:token-1")
    );
    assert_eq!(
        api.last_request().unwrap().header("authorization"),
        Some(expected.as_str())
    );
    assert_eq!(tokens.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_token_request() {
    let pki = TestPki::new();
    let tokens = TokenEndpoint::start(&pki, 3600, Duration::from_millis(300), StatusCode::OK);
    let api = api(&pki, Arc::new(AtomicUsize::new(1)));
    let proxy = start_proxy(&pki, &api, &tokens).await;
    let addr = proxy.local_addrs()[0];
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..20 {
        requests.spawn(async move { get(addr, "/2.0/repositories/acme/widgets").await.status() });
    }
    while let Some(status) = requests.join_next().await {
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
    assert_eq!(tokens.calls(), 1, "single-flight renewal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_renewed_before_they_expire() {
    let pki = TestPki::new();
    let tokens = TokenEndpoint::start(&pki, 1, Duration::ZERO, StatusCode::OK);
    let api = api(&pki, Arc::new(AtomicUsize::new(1)));
    let proxy = start_proxy(&pki, &api, &tokens).await;
    let addr = proxy.local_addrs()[0];
    let first = body_string(
        get(addr, "/2.0/repositories/acme/widgets")
            .await
            .into_body(),
    )
    .await;
    assert_eq!(first, "ok with Bearer token-1");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let second = body_string(
        get(addr, "/2.0/repositories/acme/widgets")
            .await
            .into_body(),
    )
    .await;
    assert_eq!(second, "ok with Bearer token-2");
    assert_eq!(tokens.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_renewed_once_and_idempotent_requests_retried() {
    let pki = TestPki::new();
    let tokens = TokenEndpoint::start(&pki, 3600, Duration::ZERO, StatusCode::OK);
    let accept_from = Arc::new(AtomicUsize::new(1));
    let api = api(&pki, accept_from.clone());
    let proxy = start_proxy(&pki, &api, &tokens).await;
    let addr = proxy.local_addrs()[0];
    assert_eq!(
        get(addr, "/2.0/repositories/acme/widgets").await.status(),
        StatusCode::OK
    );

    // Bitbucket revokes token-1 early: the next GET is answered with token-2, transparently.
    accept_from.store(2, Ordering::SeqCst);
    let response = get(addr, "/2.0/repositories/acme/widgets").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        body_string(response.into_body()).await,
        "ok with Bearer token-2"
    );
    assert_eq!(tokens.calls(), 2);

    // A POST with a body is not resent: the client sees the 401, and the token is renewed
    // for the next request only once.
    accept_from.store(3, Ordering::SeqCst);
    let before = api.request_count();
    let post = Request::post("/2.0/repositories/acme/widgets/pullrequests")
        .header("content-type", "application/json")
        .body(full_body("{\"title\":\"x\"}"))
        .unwrap();
    let response = send(addr, post).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        api.request_count(),
        before + 1,
        "the POST went upstream once"
    );

    // A token that is refused even after renewal is not renewed in a loop.
    accept_from.store(100, Ordering::SeqCst);
    let calls = tokens.calls();
    let response = get(addr, "/2.0/repositories/acme/widgets").await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(
        tokens.calls() <= calls + 1,
        "renewed at most once per request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_failures_are_502_naming_the_credential_never_the_secret() {
    let pki = TestPki::new();
    let tokens = TokenEndpoint::start(&pki, 3600, Duration::ZERO, StatusCode::UNAUTHORIZED);
    let api = api(&pki, Arc::new(AtomicUsize::new(1)));
    let proxy = start_proxy(&pki, &api, &tokens).await;
    let response = get(proxy.local_addrs()[0], "/2.0/repositories/acme/widgets").await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        response.headers()["x-bitbucket-auth-proxy"],
        "token-endpoint"
    );
    let body = body_string(response.into_body()).await;
    assert!(
        body.contains("ci-consumer") && body.contains("invalid_client"),
        "{body}"
    );
    assert!(!body.contains(CLIENT_SECRET));
    assert_eq!(
        api.request_count(),
        0,
        "nothing is sent without a credential"
    );
}

/// Issue 13: ten requests answered 401 whatever the token caused eleven token requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_renew_at_most_once_per_token_and_interval() {
    let pki = TestPki::new();
    let tokens = TokenEndpoint::start(&pki, 3600, Duration::from_millis(50), StatusCode::OK);
    let api = api(&pki, Arc::new(AtomicUsize::new(usize::MAX)));
    let proxy = start_proxy(&pki, &api, &tokens).await;
    let addr = proxy.local_addrs()[0];
    for _ in 0..5 {
        let response = get(addr, "/2.0/repositories/acme/widgets").await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..5 {
        requests.spawn(async move { get(addr, "/2.0/repositories/acme/widgets").await.status() });
    }
    while let Some(status) = requests.join_next().await {
        assert_eq!(status.unwrap(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        tokens.calls(),
        2,
        "the first token, and one renewal for the first refusal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_refusals_of_one_token_share_one_renewal() {
    let pki = TestPki::new();
    let tokens = TokenEndpoint::start(&pki, 3600, Duration::from_millis(200), StatusCode::OK);
    let accept_from = Arc::new(AtomicUsize::new(1));
    let api = api(&pki, accept_from.clone());
    let proxy = start_proxy(&pki, &api, &tokens).await;
    let addr = proxy.local_addrs()[0];
    assert_eq!(
        get(addr, "/2.0/repositories/acme/widgets").await.status(),
        StatusCode::OK
    );
    accept_from.store(2, Ordering::SeqCst);
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..10 {
        requests.spawn(async move {
            body_string(
                get(addr, "/2.0/repositories/acme/widgets")
                    .await
                    .into_body(),
            )
            .await
        });
    }
    while let Some(body) = requests.join_next().await {
        assert_eq!(body.unwrap(), "ok with Bearer token-2");
    }
    assert_eq!(tokens.calls(), 2);
}

const LEAKED_TOKEN: &str = "leaked-access-token-Zx81";
const QUERY_SECRET: &str = "query-secret-Pw42";

/// What a token-endpoint failure shows the client, and `/-/ready` with `verify = true`.
async fn failure_texts(answer: (StatusCode, String)) -> (String, String) {
    let pki = TestPki::new();
    let tokens = TokenEndpoint::answering(&pki, Duration::ZERO, move |_| answer.clone());
    let api = api(&pki, Arc::new(AtomicUsize::new(1)));
    let query = format!("?client_key={QUERY_SECRET}");
    let proxy = start_proxy_with(&pki, &api, &tokens, &query, "verify = true").await;
    let addr = proxy.local_addrs()[0];
    let response = get(addr, "/2.0/repositories/acme/widgets").await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let body = body_string(response.into_body()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let ready = body_string(get(addr, "/-/ready").await.into_body()).await;
        if ready.contains("unreachable") {
            return (body, ready);
        }
        assert!(tokio::time::Instant::now() < deadline, "{ready}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_bodies_are_never_copied() {
    // A 201 carrying a token, an error object with a description and a non-standard code, and
    // a plain-text page: only the status and a standard `error` code are reported.
    let cases = [
        (
            StatusCode::CREATED,
            format!(r#"{{"access_token":"{LEAKED_TOKEN}","expires_in":7200}}"#),
            "201 Created",
        ),
        (
            StatusCode::BAD_REQUEST,
            format!(r#"{{"error":"invalid_grant","error_description":"{LEAKED_TOKEN}"}}"#),
            "400 Bad Request with OAuth error `invalid_grant`",
        ),
        (
            StatusCode::UNAUTHORIZED,
            format!(r#"{{"error":"{LEAKED_TOKEN}"}}"#),
            "401 Unauthorized",
        ),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("<html>{LEAKED_TOKEN}</html>"),
            "500 Internal Server Error",
        ),
        (
            StatusCode::OK,
            format!(r#"{{"access_token":"{LEAKED_TOKEN}","expires_in":"{LEAKED_TOKEN}"}}"#),
            "`expires_in`",
        ),
        // A token no header can carry used to panic building the header.
        (
            StatusCode::OK,
            format!(r#"{{"access_token":"{LEAKED_TOKEN}\n","expires_in":7200}}"#),
            "`access_token`",
        ),
        (
            StatusCode::OK,
            format!(r#"{{"access_token":{{"value":"{LEAKED_TOKEN}"}},"expires_in":7200}}"#),
            "`access_token`",
        ),
    ];
    for (status, body, expected) in cases {
        let (error, ready) = failure_texts((status, body)).await;
        for text in [&error, &ready] {
            assert!(text.contains(expected), "{expected}: {text}");
            assert!(text.contains("ci-consumer"), "{text}");
            assert!(text.contains("/site/oauth2/access_token"), "{text}");
            assert!(!text.contains(LEAKED_TOKEN), "{text}");
            assert!(!text.contains(QUERY_SECRET), "{text}");
            assert!(!text.contains(CLIENT_SECRET), "{text}");
        }
    }
}

/// `expires_in` near `u64::MAX` panicked ("overflow when adding duration to instant").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enormous_expires_in_is_capped() {
    let pki = TestPki::new();
    let tokens = TokenEndpoint::start(&pki, u64::MAX, Duration::ZERO, StatusCode::OK);
    let api = api(&pki, Arc::new(AtomicUsize::new(1)));
    let proxy = start_proxy(&pki, &api, &tokens).await;
    let addr = proxy.local_addrs()[0];
    for _ in 0..3 {
        let response = get(addr, "/2.0/repositories/acme/widgets").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            body_string(response.into_body()).await,
            "ok with Bearer token-1"
        );
    }
    assert_eq!(tokens.calls(), 1);
}
