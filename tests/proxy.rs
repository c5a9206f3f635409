//! End-to-end tests of the core proxy (issue 2): a real proxy started in-process on 127.0.0.1,
//! forwarding over real TLS to the in-process mock upstreams of `support`.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bitbucket_auth_proxy::ShutdownOutcome;
use bitbucket_auth_proxy::error::REASON_HEADER;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::proxy::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------
// Credentials
// ---------------------------------------------------------------------------

#[tokio::test]
async fn each_credential_kind_sends_its_exact_authorization_for_rest_and_git() {
    let pki = TestPki::new();
    let api = echo_mock(&pki);
    let git = echo_mock(&pki);
    let routes = r#"
[[routes]]
prefix = "/2.0/repositories/acme/widgets"
credential = "widgets-ci"
[[routes]]
prefix = "/2.0/repositories/acme/web-app"
credential = "acme-web"
[[routes]]
prefix = "/2.0/workspaces/acme"
credential = "acme-all"
[[routes]]
prefix = "/2.0/user"
credential = "release-bot"
[[routes]]
prefix = "/legacy"
upstream_prefix = "/2.0/repositories/acme/legacy"
credential = "legacy-bot"

[[routes]]
prefix = "/git/acme/widgets.git"
upstream = "git"
upstream_prefix = "/acme/widgets.git"
credential = "widgets-ci"
[[routes]]
prefix = "/git/acme/web-app.git"
upstream = "git"
upstream_prefix = "/acme/web-app.git"
credential = "acme-web"
[[routes]]
prefix = "/git/acme/all.git"
upstream = "git"
upstream_prefix = "/acme/all.git"
credential = "acme-all"
[[routes]]
prefix = "/git/acme/release.git"
upstream = "git"
upstream_prefix = "/acme/release.git"
credential = "release-bot"
[[routes]]
prefix = "/git/acme/legacy.git"
upstream = "git"
upstream_prefix = "/acme/legacy.git"
credential = "legacy-bot"
"#;
    let proxy = Setup::new(&api.base_url(), pki.ca_path())
        .git_url(&git.base_url())
        .routes(routes)
        .start()
        .await;

    let git_refs = "/info/refs?service=git-upload-pack";
    let cases: Vec<(&str, String, String, &MockUpstream)> = vec![
        // REST: access tokens are Bearer, API tokens Basic with the email, app passwords Basic.
        (
            "/2.0/repositories/acme/widgets/pullrequests",
            "/2.0/repositories/acme/widgets/pullrequests".into(),
            bearer(REPO_TOKEN),
            &api,
        ),
        (
            "/2.0/repositories/acme/web-app",
            "/2.0/repositories/acme/web-app".into(),
            bearer(PROJECT_TOKEN),
            &api,
        ),
        (
            "/2.0/workspaces/acme/projects",
            "/2.0/workspaces/acme/projects".into(),
            bearer(WORKSPACE_TOKEN),
            &api,
        ),
        (
            "/2.0/user",
            "/2.0/user".into(),
            basic(API_EMAIL, API_TOKEN),
            &api,
        ),
        (
            "/legacy/src",
            "/2.0/repositories/acme/legacy/src".into(),
            basic(APP_USER, APP_PASSWORD),
            &api,
        ),
        // git: access tokens as x-token-auth, API tokens as x-bitbucket-api-token-auth.
        (
            "/git/acme/widgets.git/info/refs?service=git-upload-pack",
            format!("/acme/widgets.git{git_refs}"),
            basic("x-token-auth", REPO_TOKEN),
            &git,
        ),
        (
            "/git/acme/web-app.git/info/refs?service=git-upload-pack",
            format!("/acme/web-app.git{git_refs}"),
            basic("x-token-auth", PROJECT_TOKEN),
            &git,
        ),
        (
            "/git/acme/all.git/info/refs?service=git-upload-pack",
            format!("/acme/all.git{git_refs}"),
            basic("x-token-auth", WORKSPACE_TOKEN),
            &git,
        ),
        (
            "/git/acme/release.git/info/refs?service=git-upload-pack",
            format!("/acme/release.git{git_refs}"),
            basic("x-bitbucket-api-token-auth", API_TOKEN),
            &git,
        ),
        (
            "/git/acme/legacy.git/info/refs?service=git-upload-pack",
            format!("/acme/legacy.git{git_refs}"),
            basic(APP_USER, APP_PASSWORD),
            &git,
        ),
    ];
    for (path, upstream_path, authorization, mock) in cases {
        let (api_before, git_before) = (api.request_count(), git.request_count());
        let response = get(proxy.addr, path).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_eq!(
            body_string(response.into_body()).await,
            format!("GET {upstream_path}")
        );
        let went_to_api = std::ptr::eq(mock, &api);
        assert_eq!(
            api.request_count(),
            api_before + usize::from(went_to_api),
            "{path}"
        );
        assert_eq!(
            git.request_count(),
            git_before + usize::from(!went_to_api),
            "{path}"
        );
        let seen = mock.last_request().unwrap();
        assert_eq!(seen.uri, upstream_path);
        assert_eq!(seen.header_all("authorization"), [authorization], "{path}");
    }
}

// ---------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------

#[tokio::test]
async fn longest_whole_segment_prefix_wins_and_aliases_map_paths() {
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path()).start().await;

    // (request target, upstream target, credential header)
    let cases = [
        (
            "/2.0/repositories/acme/widgets",
            "/2.0/repositories/acme/widgets",
            bearer(REPO_TOKEN),
        ),
        (
            "/2.0/repositories/acme/widgets/pullrequests?state=OPEN",
            "/2.0/repositories/acme/widgets/pullrequests?state=OPEN",
            bearer(REPO_TOKEN),
        ),
        // Not a segment boundary: the workspace route, never the widgets route.
        (
            "/2.0/repositories/acme/widgets-evil",
            "/2.0/repositories/acme/widgets-evil",
            bearer(WORKSPACE_TOKEN),
        ),
        (
            "/2.0/repositories/acme/widgetsx/src",
            "/2.0/repositories/acme/widgetsx/src",
            bearer(WORKSPACE_TOKEN),
        ),
        (
            "/2.0/repositories/acme",
            "/2.0/repositories/acme",
            bearer(WORKSPACE_TOKEN),
        ),
        // The alias forwards as its upstream_prefix.
        (
            "/release/widgets/commits?page=2",
            "/2.0/repositories/acme/widgets/commits?page=2",
            basic(API_EMAIL, API_TOKEN),
        ),
        (
            "/release",
            "/2.0/repositories/acme",
            basic(API_EMAIL, API_TOKEN),
        ),
        (
            "/release/",
            "/2.0/repositories/acme/",
            basic(API_EMAIL, API_TOKEN),
        ),
        (
            "/git/acme/widgets.git/git-upload-pack",
            "/acme/widgets.git/git-upload-pack",
            basic("x-token-auth", REPO_TOKEN),
        ),
        // Other spellings of the same names take the same route, in the route's spelling
        // (tests/aliases.rs has the rest).
        (
            "/2.0/repositories/ACME/widgets",
            "/2.0/repositories/acme/widgets",
            bearer(REPO_TOKEN),
        ),
        (
            "/git/acme/widgets/git-upload-pack",
            "/acme/widgets.git/git-upload-pack",
            basic("x-token-auth", REPO_TOKEN),
        ),
    ];
    for (target, upstream, authorization) in cases {
        let response = get(proxy.addr, target).await;
        assert_eq!(response.status(), StatusCode::OK, "{target}");
        drain_body(response.into_body()).await;
        let seen = mock.last_request().unwrap();
        assert_eq!(seen.uri, upstream, "{target}");
        assert_eq!(
            seen.header("authorization"),
            Some(authorization.as_str()),
            "{target}"
        );
    }

    // The widgets route is GET-only; its segment-boundary neighbour takes any method.
    let response = send(
        proxy.addr,
        Request::post("/2.0/repositories/acme/widgets-evil")
            .body(empty_body())
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // No route: near misses, case differences outside names, siblings of the alias.
    let count = mock.request_count();
    for target in [
        "/2.0/repositories/acmex",
        "/2.0/Repositories/acme/widgets",
        "/releases",
        "/git/acme",
        "/2.0/user",
        "/",
    ] {
        assert_proxy_error(get(proxy.addr, target).await, 404, "no-route").await;
    }
    assert_eq!(mock.request_count(), count, "a 404 reached the upstream");
}

#[tokio::test]
async fn no_route_answers_404_in_bitbucket_error_shape() {
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path()).start().await;
    let response = get(proxy.addr, "/2.0/user/permissions/workspaces").await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(response.headers()[REASON_HEADER], "no-route");
    let body = collect_body(response.into_body()).await;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["type"], "error");
    assert!(json["error"]["message"].is_string(), "{json}");
    assert!(json["error"]["detail"].is_string(), "{json}");
    assert_eq!(json.as_object().unwrap().len(), 2, "{json}");
    assert_eq!(mock.request_count(), 0);
    assert_eq!(mock.connection_count(), 0);
}

#[tokio::test]
async fn ordinary_percent_encoding_and_query_pass_byte_for_byte() {
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path()).start().await;
    for target in [
        "/2.0/repositories/acme/widgets/refs/branches/feature%2Ffoo",
        "/2.0/repositories/acme/widgets/src/main/a%20b.txt?at=feature%2Ffoo",
        "/2.0/repositories/acme/widgets/src/main/%7Euser/100%25",
        "/2.0/repositories/acme/widgets/src/main/.gitignore",
        "/2.0/repositories/acme/widgets/src/main/docs/",
        "/2.0/repositories/acme/widgets/pullrequests?q=state%3D%22OPEN%22&pagelen=50&x=%2F",
        "/2.0/repositories/acme/widgets?a=1&a=2&&b=&c=%25%2e%2e&d=..%2F..",
    ] {
        let response = get(proxy.addr, target).await;
        assert_eq!(response.status(), StatusCode::OK, "{target}");
        assert_eq!(
            body_string(response.into_body()).await,
            format!("GET {target}")
        );
    }
}

/// How a refused path may be answered.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    /// By the proxy's path check: 400 with `x-bitbucket-auth-proxy: bad-path`.
    BadPath,
    /// Raw bytes hyper's HTTP/1 parser itself may refuse with a bare 400 before the proxy runs.
    ParserOrBadPath,
}

/// Named attacks on the route boundary. The routes are [`DEFAULT_ROUTES`]: a GET-only
/// `/2.0/repositories/acme/widgets` inside `/2.0/repositories/acme`, the `/release` alias.
const ATTACKS: &[(&str, &str, Refusal)] = &[
    (
        "dot-dot",
        "/2.0/repositories/acme/widgets/../gadgets",
        Refusal::BadPath,
    ),
    (
        "trailing dot-dot",
        "/2.0/repositories/acme/widgets/..",
        Refusal::BadPath,
    ),
    (
        "dot",
        "/2.0/repositories/acme/widgets/./src",
        Refusal::BadPath,
    ),
    (
        "encoded dot-dot",
        "/2.0/repositories/acme/widgets/%2e%2e/gadgets",
        Refusal::BadPath,
    ),
    (
        "encoded dot-dot, upper case",
        "/2.0/repositories/acme/widgets/%2E%2E/gadgets",
        Refusal::BadPath,
    ),
    (
        "half-encoded dot-dot",
        "/2.0/repositories/acme/widgets/.%2e/gadgets",
        Refusal::BadPath,
    ),
    (
        "double-encoded dot-dot",
        "/2.0/repositories/acme/widgets/%252e%252e/gadgets",
        Refusal::BadPath,
    ),
    (
        "double-encoded dot",
        "/2.0/repositories/acme/widgets/%252e/src",
        Refusal::BadPath,
    ),
    (
        "dot-dot with parameter",
        "/2.0/repositories/acme/widgets/..;x=1/gadgets",
        Refusal::BadPath,
    ),
    (
        "encoded slash hiding dot-dot",
        "/2.0/repositories/acme/widgets%2F..%2Fgadgets",
        Refusal::BadPath,
    ),
    (
        "encoded slash and dots",
        "/2.0/repositories/acme/widgets%2f%2e%2e",
        Refusal::BadPath,
    ),
    (
        "double-encoded slash hiding dot-dot",
        "/2.0/repositories/acme/widgets%252F..%252Fgadgets",
        Refusal::BadPath,
    ),
    (
        "empty segment",
        "/2.0/repositories/acme/widgets//src",
        Refusal::BadPath,
    ),
    (
        "leading double slash",
        "//evil.example/2.0/user",
        Refusal::BadPath,
    ),
    (
        "encoded empty segment",
        "/2.0/repositories/acme/widgets/%2F/src",
        Refusal::BadPath,
    ),
    (
        "double-encoded empty segment",
        "/2.0/repositories/acme/widgets/%252F%252Fsrc",
        Refusal::BadPath,
    ),
    (
        "raw backslash",
        "/2.0/repositories/acme/widgets/..\\gadgets",
        Refusal::ParserOrBadPath,
    ),
    (
        "encoded backslash",
        "/2.0/repositories/acme/widgets/%5C..%5Cgadgets",
        Refusal::BadPath,
    ),
    (
        "encoded backslash, lower case",
        "/2.0/repositories/acme/widgets/%5c",
        Refusal::BadPath,
    ),
    (
        "double-encoded backslash",
        "/2.0/repositories/acme/widgets/%255C..",
        Refusal::BadPath,
    ),
    (
        "encoded NUL",
        "/2.0/repositories/acme/widgets/%00",
        Refusal::BadPath,
    ),
    (
        "double-encoded NUL",
        "/2.0/repositories/acme/widgets/%2500",
        Refusal::BadPath,
    ),
    (
        "raw NUL",
        "/2.0/repositories/acme/widgets/\0",
        Refusal::ParserOrBadPath,
    ),
    (
        "raw DEL",
        "/2.0/repositories/acme/widgets/\x7f",
        Refusal::ParserOrBadPath,
    ),
    (
        "raw control character",
        "/2.0/repositories/acme/widgets/\x01",
        Refusal::ParserOrBadPath,
    ),
    (
        "encoded CRLF header injection",
        "/2.0/repositories/acme/widgets/%0d%0aX-Injected:%201",
        Refusal::BadPath,
    ),
    (
        "encoded DEL",
        "/2.0/repositories/acme/widgets/%7f",
        Refusal::BadPath,
    ),
    (
        "malformed escape",
        "/2.0/repositories/acme/widgets/%zz",
        Refusal::BadPath,
    ),
    (
        "truncated escape",
        "/2.0/repositories/acme/widgets/%2",
        Refusal::BadPath,
    ),
    (
        "encoding that changes the route",
        "/2.0/repositories/acme/%77idgets",
        Refusal::BadPath,
    ),
    (
        "encoded slash that changes the route",
        "/2.0/repositories/acme/widgets%2Fsrc",
        Refusal::BadPath,
    ),
    (
        "encoded slash into the workspace",
        "/2.0/repositories/acme%2Fwidgets",
        Refusal::BadPath,
    ),
    ("alias dot-dot", "/release/../user", Refusal::BadPath),
    (
        "alias encoded dot-dot",
        "/release/%2e%2e/%2e%2e/user",
        Refusal::BadPath,
    ),
    (
        "alias encoded slash and dot-dot",
        "/release%2F..%2F..%2Fuser",
        Refusal::BadPath,
    ),
    (
        "git dot-dot",
        "/git/acme/widgets.git/../gadgets.git/info/refs",
        Refusal::BadPath,
    ),
];

#[tokio::test]
async fn every_attack_path_is_refused_and_nothing_reaches_upstream() {
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path()).start().await;
    for &(name, target, refusal) in ATTACKS {
        for method in ["GET", "POST"] {
            let request = format!(
                "{method} {target} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                proxy.addr
            );
            let response = raw(proxy.addr, &request).await;
            assert_eq!(
                response.status, 400,
                "{name} ({method} {target:?}): {response:?}"
            );
            match (refusal, response.header(REASON_HEADER)) {
                (_, Some("bad-path")) => assert_error_json(response.body.as_bytes()),
                (Refusal::ParserOrBadPath, None) => {}
                (_, other) => {
                    panic!("{name} ({method} {target:?}): reason {other:?}: {response:?}")
                }
            }
        }
        assert_eq!(
            mock.request_count(),
            0,
            "{name}: {target:?} reached the upstream"
        );
    }
    assert_eq!(mock.connection_count(), 0);
}

#[tokio::test]
async fn absolute_form_for_another_host_and_connect_are_refused() {
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path()).start().await;
    let m = mock.addr();
    let cases = [
        "GET http://evil.example/2.0/repositories/acme/widgets HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
            .to_owned(),
        // Even naming the real upstream: the proxy only serves its own paths.
        format!(
            "GET https://{m}/2.0/repositories/acme/widgets HTTP/1.1\r\nHost: {m}\r\nConnection: close\r\n\r\n"
        ),
        format!(
            "GET http://{m}/2.0/repositories/acme/widgets HTTP/1.1\r\nHost: {m}\r\nConnection: close\r\n\r\n"
        ),
        // The proxy's host but another port is someone else.
        "GET http://127.0.0.1:1/2.0/repositories/acme/widgets HTTP/1.1\r\nHost: 127.0.0.1:1\r\nConnection: close\r\n\r\n"
            .to_owned(),
    ];
    for request in &cases {
        let response = raw(proxy.addr, request).await;
        assert_eq!(response.status, 400, "{request:?}: {response:?}");
        assert_eq!(
            response.header(REASON_HEADER),
            Some("bad-target"),
            "{request:?}"
        );
        assert_error_json(response.body.as_bytes());
    }
    let mock_authority = m.to_string();
    for target in ["evil.example:443", mock_authority.as_str()] {
        let request =
            format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
        let response = raw(proxy.addr, &request).await;
        assert!(
            matches!(response.status, 400 | 405),
            "CONNECT {target}: {response:?}"
        );
        if let Some(reason) = response.header(REASON_HEADER) {
            assert_eq!(reason, "method-not-allowed");
        }
    }
    // An authority-form target without CONNECT is no better.
    let response = raw(
        proxy.addr,
        "GET evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(response.status, 400, "{response:?}");
    assert_eq!(mock.request_count(), 0);
    assert_eq!(
        mock.connection_count(),
        0,
        "the proxy connected to a client-named host"
    );
}

#[tokio::test]
async fn absolute_form_naming_the_proxy_itself_is_served() {
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path()).start().await;
    let port = proxy.addr.port();
    for authority in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
        let request = format!(
            "GET http://{authority}/2.0/repositories/acme/widgets/src?at=main HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
        );
        let response = raw(proxy.addr, &request).await;
        assert_eq!(response.status, 200, "{authority}: {response:?}");
        assert_eq!(
            response.body,
            "GET /2.0/repositories/acme/widgets/src?at=main"
        );
        let seen = mock.last_request().unwrap();
        assert_eq!(
            seen.header("authorization"),
            Some(bearer(REPO_TOKEN).as_str())
        );
    }
    assert_eq!(mock.request_count(), 2);
}

// ---------------------------------------------------------------------------
// Methods
// ---------------------------------------------------------------------------

#[tokio::test]
async fn method_outside_the_route_list_gets_405_with_allow_and_nothing_forwarded() {
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path()).start().await;
    for method in [
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::OPTIONS,
    ] {
        let request = Request::builder()
            .method(method.clone())
            .uri("/2.0/repositories/acme/widgets/pullrequests")
            .body(full_body("{\"title\":\"x\"}"))
            .unwrap();
        let response = send(proxy.addr, request).await.unwrap();
        assert_eq!(
            response.headers().get("allow").unwrap(),
            "GET, HEAD",
            "{method}"
        );
        assert_proxy_error(response, 405, "method-not-allowed").await;
    }
    assert_eq!(mock.request_count(), 0);

    // The listed methods pass.
    for method in [Method::GET, Method::HEAD] {
        let request = Request::builder()
            .method(method.clone())
            .uri("/2.0/repositories/acme/widgets")
            .body(empty_body())
            .unwrap();
        let response = send(proxy.addr, request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{method}");
        drain_body(response.into_body()).await;
        assert_eq!(mock.last_request().unwrap().method, method);
    }
}

/// A refused request's unread body is discarded, never parsed as a next request on the same
/// keep-alive connection.
#[tokio::test]
async fn refused_request_body_is_not_parsed_as_another_request() {
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path()).start().await;
    let smuggled = format!(
        "GET /2.0/repositories/acme/widgets/smuggled HTTP/1.1\r\nHost: {}\r\n\r\n",
        proxy.addr
    );
    let request = format!(
        "POST /2.0/repositories/acme/widgets HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n{smuggled}",
        proxy.addr,
        smuggled.len()
    );
    let text = raw_request_timeout(proxy.addr, request.as_bytes(), Duration::from_secs(1)).await;
    assert!(text.starts_with("HTTP/1.1 405 "), "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    assert_eq!(mock.request_count(), 0);
}

#[tokio::test]
async fn expect_continue_client_is_refused_before_uploading() {
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path()).start().await;

    // Refused: the 405 arrives while the client still waits to be told to send its body.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "POST /2.0/repositories/acme/widgets/pullrequests HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\nExpect: 100-continue\r\n\r\n",
        proxy.addr
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(3), read_http_head(&mut stream))
        .await
        .expect("no answer before the body was sent")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    let response = RawResponse::parse(&answer).unwrap_or_else(|| panic!("{answer:?}"));
    assert!(answer.starts_with("HTTP/1.1 405 "), "{answer:?}");
    assert_eq!(response.header("allow"), Some("GET, HEAD"));
    assert_eq!(response.header(REASON_HEADER), Some("method-not-allowed"));
    drop(stream);
    assert_eq!(mock.request_count(), 0);

    // Allowed: 100 Continue, then the body goes upstream without the Expect header.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "PUT /2.0/repositories/acme/gadgets/x HTTP/1.1\r\nHost: {}\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        proxy.addr
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let interim = tokio::time::timeout(Duration::from_secs(3), read_http_head(&mut stream))
        .await
        .expect("no 100 Continue")
        .unwrap();
    assert!(
        interim.starts_with(b"HTTP/1.1 100 "),
        "{}",
        String::from_utf8_lossy(&interim)
    );
    stream.write_all(b"hello").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut rest))
        .await
        .expect("no final response")
        .unwrap();
    let rest = String::from_utf8_lossy(&rest);
    let response = RawResponse::parse(&rest).unwrap_or_else(|| panic!("{rest:?}"));
    assert_eq!(response.status, 200, "{rest:?}");
    let seen = mock.last_request().unwrap();
    assert_eq!(seen.method, Method::PUT);
    assert_eq!(seen.header("expect"), None, "Expect went upstream");
}

// ---------------------------------------------------------------------------
// Headers
// ---------------------------------------------------------------------------

#[tokio::test]
async fn client_credentials_and_hop_by_hop_headers_never_reach_upstream() {
    let pki = TestPki::new();
    let h2 = MockUpstream::start_simple(pki.server_config(), upstream_with_cookie_and_hop_headers);
    let h1 = MockUpstream::start_simple(
        pki.server_config_with_alpn(ALPN_H1),
        upstream_with_cookie_and_hop_headers,
    );
    for (mock, version) in [(&h2, Version::HTTP_2), (&h1, Version::HTTP_11)] {
        let proxy = Setup::new(&mock.base_url(), pki.ca_path()).start().await;
        let target =
            "/2.0/repositories/acme/widgets/pullrequests?q=state%3D%22OPEN%22&pagelen=50&x=%2F";
        let request = format!(
            "GET {target} HTTP/1.1\r\n\
             Host: {addr}\r\n\
             Authorization: Basic Y2xpZW50OmNsaWVudC1zZWNyZXQ=\r\n\
             Authorization: Bearer second-client-token\r\n\
             Cookie: session=client-cookie\r\n\
             Proxy-Authorization: Basic cHJveHk6cHJveHktc2VjcmV0\r\n\
             Connection: close, X-Hop-One\r\n\
             Connection: x-hop-two\r\n\
             X-Hop-One: 1\r\n\
             X-Hop-Two: 2\r\n\
             Keep-Alive: timeout=5\r\n\
             Proxy-Connection: keep-alive\r\n\
             TE: trailers\r\n\
             Upgrade: websocket\r\n\
             X-Forwarded-For: 10.1.2.3\r\n\
             Forwarded: for=10.1.2.3\r\n\
             X-Real-IP: 10.1.2.3\r\n\
             Accept: application/json\r\n\
             X-Custom: kept\r\n\
             \r\n",
            addr = proxy.addr
        );
        let response = raw(proxy.addr, &request).await;
        assert_eq!(response.status, 200, "{response:?}");

        // Upstream: only the injected credential, no client secrets, nothing hop-by-hop.
        let seen = mock.last_request().unwrap();
        assert_eq!(seen.version, version);
        assert_eq!(seen.uri, target, "query not preserved byte-for-byte");
        assert_eq!(seen.header_all("authorization"), [bearer(REPO_TOKEN)]);
        for name in [
            "cookie",
            "proxy-authorization",
            "connection",
            "x-hop-one",
            "x-hop-two",
            "keep-alive",
            "proxy-connection",
            "te",
            "upgrade",
            "x-forwarded-for",
            "forwarded",
            "x-real-ip",
            "via",
        ] {
            assert_eq!(
                seen.header_all(name),
                Vec::<String>::new(),
                "{name} reached {version:?}"
            );
        }
        assert_eq!(seen.header("accept"), Some("application/json"));
        assert_eq!(seen.header("x-custom"), Some("kept"));
        // Host / :authority is the upstream's, never the proxy's.
        let upstream = mock.addr().to_string();
        match version {
            Version::HTTP_2 => {
                assert_eq!(seen.authority.as_deref(), Some(upstream.as_str()));
                assert!(
                    seen.header("host").is_none_or(|h| h == upstream),
                    "{seen:?}"
                );
            }
            _ => assert_eq!(seen.header_all("host"), [upstream]),
        }
        let proxy_addr = proxy.addr.to_string();
        for (name, value) in &seen.headers {
            assert!(
                !value
                    .as_bytes()
                    .windows(proxy_addr.len())
                    .any(|w| w == proxy_addr.as_bytes()),
                "{name} reveals the proxy's address"
            );
        }

        // Client: the upstream's cookie and hop-by-hop headers stay behind, the rest arrives.
        assert_eq!(response.header("set-cookie"), None, "{response:?}");
        if version == Version::HTTP_11 {
            // The mock really sends them (so their absence is the proxy's doing).
            let direct = direct_h1_get(&pki, mock).await;
            for name in [
                "x-resp-hop",
                "keep-alive",
                "proxy-authenticate",
                "set-cookie",
            ] {
                assert!(direct.headers().contains_key(name), "mock omits {name}");
            }
        }
        for name in ["x-resp-hop", "keep-alive", "proxy-authenticate"] {
            assert_eq!(response.header(name), None, "{name}: {response:?}");
        }
        assert_eq!(response.header("x-upstream"), Some("yes"));
        assert_eq!(
            response.header("www-authenticate"),
            Some("Basic realm=\"Bitbucket.org HTTP\"")
        );
    }
}

/// GET `/` straight from a TLS mock, over HTTP/1.1.
async fn direct_h1_get(pki: &TestPki, mock: &MockUpstream) -> Response<Incoming> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(pki.client_config())
        .https_only()
        .enable_http1()
        .build();
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(https);
    let request = Request::get(mock.base_url() + "/")
        .body(empty_body())
        .unwrap();
    client
        .request(request)
        .await
        .expect("direct request to the mock")
}

fn upstream_with_cookie_and_hop_headers(head: &RecordedRequestHead) -> Response<Full<Bytes>> {
    let mut response = echo(head);
    let headers = response.headers_mut();
    headers.insert(
        "set-cookie",
        "bb_session=upstream-session; Secure".parse().unwrap(),
    );
    headers.insert("x-upstream", "yes".parse().unwrap());
    headers.insert(
        "www-authenticate",
        "Basic realm=\"Bitbucket.org HTTP\"".parse().unwrap(),
    );
    // Hop-by-hop headers only exist in HTTP/1.1 (an h2 server may not send them).
    if head.version == Version::HTTP_11 {
        headers.insert("connection", "x-resp-hop".parse().unwrap());
        headers.insert("x-resp-hop", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert(
            "proxy-authenticate",
            "Basic realm=\"proxy\"".parse().unwrap(),
        );
    }
    response
}

#[tokio::test]
async fn client_outside_allowed_clients_gets_403_and_nothing_is_forwarded() {
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path())
        .server("allowed_clients = [\"10.0.0.0/8\"]")
        .start()
        .await;
    let response = get(proxy.addr, "/2.0/repositories/acme/widgets").await;
    assert_proxy_error(response, 403, "client-not-allowed").await;
    // Before anything else: an unroutable or refused path gets 403 too.
    let response = get(proxy.addr, "/nowhere").await;
    assert_proxy_error(response, 403, "client-not-allowed").await;
    assert_eq!(mock.request_count(), 0);
    assert_eq!(mock.connection_count(), 0);
}

// ---------------------------------------------------------------------------
// Streaming
// ---------------------------------------------------------------------------

const BIG: u64 = 64 * 1024 * 1024;

#[tokio::test]
async fn response_of_64_mib_streams_intact() {
    let pki = TestPki::new();
    let mock = MockUpstream::start(pki.server_config(), |_head, _body| async {
        let mut response = Response::new(pattern_body(BIG));
        response
            .headers_mut()
            .insert("content-type", "application/octet-stream".parse().unwrap());
        response
    });
    let proxy = Setup::new(&mock.base_url(), pki.ca_path()).start().await;
    let response = get(
        proxy.addr,
        "/2.0/repositories/acme/widgets/downloads/big.bin",
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-length"], BIG.to_string());
    check_pattern_body(response.into_body(), BIG).await.unwrap();
}

#[tokio::test]
async fn request_body_of_64_mib_streams_intact() {
    let pki = TestPki::new();
    let mock = MockUpstream::start(pki.server_config(), |_head, body| async move {
        match check_pattern_body(body, BIG).await {
            Ok(()) => Response::new(full_body("intact")),
            Err(error) => {
                let mut response = Response::new(full_body(error));
                *response.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
                response
            }
        }
    });
    let proxy = Setup::new(&mock.base_url(), pki.ca_path()).start().await;
    for (body, framing) in [
        (pattern_body(BIG), "content-length"),
        (pattern_body_unsized(BIG), "chunked"),
    ] {
        let request = Request::put("/2.0/repositories/acme/gadgets/downloads")
            .header("content-type", "application/octet-stream")
            .body(body)
            .unwrap();
        let response = send(proxy.addr, request).await.unwrap();
        let status = response.status();
        let text = body_string(response.into_body()).await;
        assert_eq!(
            (status, text.as_str()),
            (StatusCode::OK, "intact"),
            "{framing}"
        );
    }
    let requests = mock.requests();
    assert_eq!(
        requests[0].header("content-length"),
        Some(BIG.to_string().as_str())
    );
}

/// The response reaches the client chunk by chunk: the first chunk arrives while the upstream
/// has not sent the rest yet.
#[tokio::test]
async fn response_is_streamed_as_it_arrives() {
    let pki = TestPki::new();
    let (mock, sender) = fed_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path()).start().await;
    let response = get(proxy.addr, "/2.0/repositories/acme/widgets/pipelines/1/log").await;
    assert_eq!(response.status(), StatusCode::OK);
    let tx = sender.lock().unwrap().take().expect("handler ran");
    let mut body = response.into_body();

    tx.send(Bytes::from_static(b"first chunk")).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(3), next_data(&mut body))
        .await
        .expect("the first chunk was held back until the upstream sent more");
    assert_eq!(first, "first chunk");

    tx.send(Bytes::from_static(b"second chunk")).await.unwrap();
    drop(tx);
    let rest = tokio::time::timeout(Duration::from_secs(3), collect_body(body))
        .await
        .unwrap();
    assert_eq!(rest, "second chunk");
}

/// The request body reaches the upstream chunk by chunk: the upstream sees the first chunk
/// while the client still holds the rest.
#[tokio::test]
async fn request_body_is_streamed_as_it_arrives() {
    let pki = TestPki::new();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let mock = MockUpstream::start(pki.server_config(), move |_head, mut body| {
        let seen_tx = seen_tx.clone();
        async move {
            while let Some(chunk) = next_data_opt(&mut body).await {
                let _ = seen_tx.send(chunk);
            }
            Response::new(full_body("done"))
        }
    });
    let proxy = Setup::new(&mock.base_url(), pki.ca_path()).start().await;
    let (tx, body) = channel_body();
    let request = Request::post("/2.0/repositories/acme/gadgets/src")
        .body(body)
        .unwrap();
    let addr = proxy.addr;
    let response = tokio::spawn(async move { send(addr, request).await.unwrap() });

    tx.send(Bytes::from_static(b"first chunk")).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(3), seen_rx.recv())
        .await
        .expect("the upstream saw nothing until the client sent more")
        .unwrap();
    assert_eq!(first, "first chunk");

    tx.send(Bytes::from_static(b"second chunk")).await.unwrap();
    drop(tx);
    let response = tokio::time::timeout(Duration::from_secs(3), response)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut rest = Vec::new();
    while let Ok(chunk) = seen_rx.try_recv() {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"second chunk");
}

/// A client that stops reading stops the upstream too (backpressure): the proxy does not read a
/// 64 MiB body ahead into memory. Flow-control windows and socket buffers hold some megabytes.
#[tokio::test]
async fn slow_client_applies_backpressure_to_the_upstream() {
    let pki = TestPki::new();
    let produced: Arc<Mutex<Option<Arc<std::sync::atomic::AtomicU64>>>> = Arc::default();
    let slot = produced.clone();
    let mock = MockUpstream::start(pki.server_config(), move |_head, _body| {
        let (body, counter) = pattern_body_counted(BIG);
        *slot.lock().unwrap() = Some(counter);
        async move {
            let mut response = Response::new(body);
            response
                .headers_mut()
                .insert("content-type", "application/octet-stream".parse().unwrap());
            response
        }
    });
    let proxy = Setup::new(&mock.base_url(), pki.ca_path()).start().await;
    let response = get(
        proxy.addr,
        "/2.0/repositories/acme/widgets/downloads/big.bin",
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let counter = produced.lock().unwrap().clone().expect("handler ran");
    let load = || counter.load(std::sync::atomic::Ordering::SeqCst);

    // Let the pipeline fill up, then check it stays put while the client reads nothing.
    let mut last = load();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = load();
        if now == last {
            break;
        }
        last = now;
    }
    assert!(
        last < BIG / 2,
        "the upstream sent {last} of {BIG} bytes to a client that read nothing"
    );
    check_pattern_body(response.into_body(), BIG).await.unwrap();
}

async fn next_data_opt<B>(body: &mut B) -> Option<Bytes>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("body error").into_data() {
            return Some(data);
        }
    }
    None
}

async fn next_data<B>(body: &mut B) -> Bytes
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    next_data_opt(body).await.expect("body ended early")
}

// ---------------------------------------------------------------------------
// Upstream failures
// ---------------------------------------------------------------------------

/// A mock whose response body the test feeds through the returned slot's sender.
fn fed_mock(pki: &TestPki) -> (MockUpstream, FeedSlot) {
    let slot: FeedSlot = Arc::default();
    let handler_slot = slot.clone();
    let mock = MockUpstream::start(pki.server_config(), move |_head, _body| {
        let (tx, body) = channel_body();
        *handler_slot.lock().unwrap() = Some(tx);
        async move {
            let mut response = Response::new(body);
            response
                .headers_mut()
                .insert("content-type", "application/octet-stream".parse().unwrap());
            response
        }
    });
    (mock, slot)
}

type FeedSlot = Arc<Mutex<Option<tokio::sync::mpsc::Sender<Bytes>>>>;

/// `upstream.timeout` bounds the wait for the response head only: a body that keeps moving may
/// take longer.
#[tokio::test]
async fn timeout_bounds_the_response_head_not_a_moving_body() {
    let pki = TestPki::new();
    let (mock, slot) = fed_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path())
        .upstream("timeout = \"300ms\"\nidle_timeout = \"5s\"")
        .start()
        .await;
    let response = get(proxy.addr, "/2.0/repositories/acme/widgets/pipelines/1/log").await;
    assert_eq!(response.status(), StatusCode::OK);
    let tx = slot.lock().unwrap().take().expect("handler ran");
    tokio::spawn(async move {
        for i in 0..6 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            tx.send(Bytes::from(format!("line {i}\n"))).await.unwrap();
        }
    });
    let body = tokio::time::timeout(Duration::from_secs(5), collect_body(response.into_body()))
        .await
        .expect("body never finished");
    assert_eq!(body.iter().filter(|&&b| b == b'\n').count(), 6);
}

/// `upstream.idle_timeout`: a response body that stalls is cut, not left hanging forever.
#[tokio::test]
async fn stalled_response_body_is_cut_after_idle_timeout() {
    let pki = TestPki::new();
    let (mock, slot) = fed_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path())
        .upstream("idle_timeout = \"300ms\"")
        .start()
        .await;
    let response = get(proxy.addr, "/2.0/repositories/acme/widgets/pipelines/1/log").await;
    assert_eq!(response.status(), StatusCode::OK);
    let tx = slot.lock().unwrap().take().expect("handler ran");
    tx.send(Bytes::from_static(b"partial")).await.unwrap();
    let started = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        try_sha256_and_len_of_body(response.into_body()),
    )
    .await
    .expect("a stalled body was never cut");
    assert!(result.is_err(), "a cut body looked complete to the client");
    assert!(started.elapsed() >= Duration::from_millis(250));
    drop(tx);
}

/// Redirects are not followed: the client gets the 3xx, and a `Location` on another host (a
/// presigned download URL) unchanged.
#[tokio::test]
async fn redirects_pass_through_unfollowed() {
    let pki = TestPki::new();
    let location = "https://bbuseruploads.s3.amazonaws.com/acme/widgets/big.bin?Signature=abc";
    let mock = MockUpstream::start_simple(pki.server_config(), move |_| {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::FOUND;
        response
            .headers_mut()
            .insert("location", location.parse().unwrap());
        response
    });
    let proxy = Setup::new(&mock.base_url(), pki.ca_path()).start().await;
    let response = get(
        proxy.addr,
        "/2.0/repositories/acme/widgets/downloads/big.bin",
    )
    .await;
    assert_eq!(response.status(), StatusCode::FOUND);
    assert_eq!(response.headers()["location"], location);
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test]
async fn upstream_down_gives_502_unreachable() {
    let pki = TestPki::new();
    let down = format!("https://{}", closed_port());
    let proxy = Setup::new(&down, pki.ca_path()).start().await;
    let response = get(proxy.addr, "/2.0/repositories/acme/widgets").await;
    assert_proxy_error(response, 502, "upstream-unreachable").await;
}

#[tokio::test]
async fn hanging_upstream_gives_504_after_the_timeout() {
    let pki = TestPki::new();
    let no_handshake = HangingUpstream::start();
    let no_answer = TlsThenHang::start(pki.server_config());
    for (what, url) in [
        (
            "no TLS handshake",
            format!("https://{}", no_handshake.addr()),
        ),
        ("no HTTP answer", no_answer.base_url()),
    ] {
        let proxy = Setup::new(&url, pki.ca_path())
            .upstream("timeout = \"500ms\"")
            .start()
            .await;
        let started = Instant::now();
        let response = get(proxy.addr, "/2.0/repositories/acme/widgets").await;
        let elapsed = started.elapsed();
        assert_proxy_error(response, 504, "upstream-timeout").await;
        assert!(
            elapsed >= Duration::from_millis(450) && elapsed < Duration::from_secs(4),
            "{what}: answered after {elapsed:?}"
        );
    }
    assert!(no_handshake.connection_count() >= 1);
    assert!(no_answer.connection_count() >= 1);
}

#[tokio::test]
async fn bad_upstream_certificate_gives_502_and_never_reaches_the_handler() {
    let pki = TestPki::new();
    for (what, tls) in [
        ("untrusted CA", TestPki::untrusted_server_config()),
        ("wrong name", pki.wrong_name_server_config()),
        ("expired", pki.expired_server_config()),
    ] {
        let mock = MockUpstream::start_simple(tls, echo);
        let proxy = Setup::new(&mock.base_url(), pki.ca_path()).start().await;
        // Twice: a failed handshake must not be retried without verification either.
        for _ in 0..2 {
            let response = get(proxy.addr, "/2.0/repositories/acme/widgets").await;
            assert_proxy_error(response, 502, "upstream-tls").await;
        }
        assert!(mock.connection_count() >= 1, "{what}: never tried");
        assert_eq!(mock.request_count(), 0, "{what}: the handler ran");
    }
}

// ---------------------------------------------------------------------------
// HTTP versions and pooling
// ---------------------------------------------------------------------------

#[tokio::test]
async fn h2c_prior_knowledge_client_is_served() {
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path()).start().await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    for path in ["/2.0/repositories/acme/widgets", "/release/widgets/refs"] {
        let request = Request::get(format!("http://{}{path}?x=%2F", proxy.addr))
            .header("authorization", "Bearer client-token")
            .body(empty_body())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.version(), Version::HTTP_2);
        drain_body(response.into_body()).await;
    }
    let requests = mock.requests();
    assert_eq!(requests[0].uri, "/2.0/repositories/acme/widgets?x=%2F");
    assert_eq!(
        requests[0].header_all("authorization"),
        [bearer(REPO_TOKEN)]
    );
    assert_eq!(
        requests[0].authority.as_deref(),
        Some(mock.addr().to_string().as_str())
    );
    assert_eq!(requests[1].uri, "/2.0/repositories/acme/widgets/refs?x=%2F");

    // Refusals work over h2 as well.
    let request = Request::post(format!(
        "http://{}/2.0/repositories/acme/widgets",
        proxy.addr
    ))
    .body(empty_body())
    .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_proxy_error(response, 405, "method-not-allowed").await;
    assert_eq!(mock.request_count(), 2);
}

#[tokio::test]
async fn upstream_version_follows_alpn_and_connections_are_pooled() {
    let pki = TestPki::new();
    let h2 = echo_mock(&pki);
    let h1 = MockUpstream::start_simple(pki.server_config_with_alpn(ALPN_H1), echo);
    let h2_declined = echo_mock(&pki);
    for (mock, upstream, version) in [
        (&h2, "", Version::HTTP_2),
        (&h1, "", Version::HTTP_11),
        // The upstream offers h2, but `http2 = false` offers it only HTTP/1.1.
        (&h2_declined, "http2 = false", Version::HTTP_11),
    ] {
        let proxy = Setup::new(&mock.base_url(), pki.ca_path())
            .upstream(upstream)
            .start()
            .await;
        for i in 0..20 {
            let response = get(
                proxy.addr,
                &format!("/2.0/repositories/acme/widgets/commits?page={i}"),
            )
            .await;
            assert_eq!(response.status(), StatusCode::OK, "{version:?} #{i}");
            assert_eq!(
                body_string(response.into_body()).await,
                format!("GET /2.0/repositories/acme/widgets/commits?page={i}")
            );
        }
        let requests = mock.requests();
        assert_eq!(requests.len(), 20);
        assert!(requests.iter().all(|r| r.version == version), "{version:?}");
        assert_eq!(mock.connection_count(), 1, "{version:?}: not pooled");
    }
}

/// A git origin of its own gets HTTP/1.1 (one connection per transfer) unless
/// `upstream.git_http2`, while the API keeps h2; with keep_warm the spare follows the same offer.
#[tokio::test]
async fn git_origin_is_offered_http1_unless_git_http2() {
    let pki = TestPki::new();
    for (upstream, git_version) in [
        ("", Version::HTTP_11),
        ("git_http2 = true", Version::HTTP_2),
    ] {
        for warm in [false, true] {
            let api = echo_mock(&pki);
            let git = echo_mock(&pki);
            let mut setup = Setup::new(&api.base_url(), pki.ca_path())
                .git_url(&git.base_url())
                .upstream(upstream);
            if warm {
                setup = setup.keep_warm();
            }
            let proxy = setup.start().await;
            for path in [
                "/git/acme/widgets.git/info/refs?service=git-upload-pack",
                "/2.0/repositories/acme/widgets",
            ] {
                let response = get(proxy.addr, path).await;
                assert_eq!(response.status(), StatusCode::OK, "{upstream:?} {path}");
                drain_body(response.into_body()).await;
            }
            let case = format!("{upstream:?}, keep_warm {warm}");
            assert_eq!(git.requests()[0].version, git_version, "{case}");
            assert_eq!(api.requests()[0].version, Version::HTTP_2, "{case}");
        }
    }
}

#[tokio::test]
async fn shutdown_drains_when_idle() {
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path()).start().await;
    let addr = proxy.addr;
    let response = get(addr, "/2.0/repositories/acme/widgets").await;
    drain_body(response.into_body()).await;
    assert_eq!(proxy.shutdown().await, ShutdownOutcome::Drained);
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
}

// ---------------------------------------------------------------------------
// Property: no path escapes its route's upstream prefix
// ---------------------------------------------------------------------------

mod path_property {
    use super::*;
    use proptest::prelude::*;

    /// Pieces that combine into tricky segments: dots, escapes (once and twice), separators.
    const PIECES: &[&str] = &[
        "a", "widgets", "gadgets", "acme", "src", ".", "..", "...", "%2e", "%2E", "%252e", "%2f",
        "%2F", "%252F", "%5c", "%5C", "%255c", "%00", "%20", "%25", "%7E", "~", ";", "%3B", "x.y",
        "-", "_",
    ];

    fn segment() -> impl Strategy<Value = String> {
        proptest::collection::vec(proptest::sample::select(PIECES), 0..4).prop_map(|p| p.concat())
    }

    fn path() -> impl Strategy<Value = String> {
        (
            proptest::sample::select(
                &[
                    "/2.0/repositories/acme/widgets",
                    "/2.0/repositories/acme",
                    "/release",
                ][..],
            ),
            proptest::collection::vec(segment(), 0..5),
        )
            .prop_map(|(prefix, segments)| {
                let mut path = prefix.to_owned();
                for s in segments {
                    path.push('/');
                    path.push_str(&s);
                }
                path
            })
    }

    fn percent_decode(input: &[u8]) -> Vec<u8> {
        let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
        let mut out = Vec::with_capacity(input.len());
        let mut i = 0;
        while i < input.len() {
            if input[i] == b'%'
                && i + 2 < input.len()
                && let (Some(h), Some(l)) = (hex(input[i + 1]), hex(input[i + 2]))
            {
                out.push(h << 4 | l);
                i += 3;
            } else {
                out.push(input[i]);
                i += 1;
            }
        }
        out
    }

    /// RFC 3986 dot-segment removal, pessimistically treating `\` as `/` and `..;x` as `..`.
    fn remove_dot_segments(path: &[u8]) -> Vec<u8> {
        let path: Vec<u8> = path
            .iter()
            .map(|&b| if b == b'\\' { b'/' } else { b })
            .collect();
        let mut out: Vec<&[u8]> = Vec::new();
        for segment in path.split(|&b| b == b'/').skip(1) {
            let bare = segment.split(|&b| b == b';').next().unwrap_or(segment);
            match bare {
                b"." => {}
                b".." => {
                    out.pop();
                }
                _ => out.push(segment),
            }
        }
        let mut joined = Vec::new();
        for segment in out {
            joined.push(b'/');
            joined.extend_from_slice(segment);
        }
        joined
    }

    fn within(prefix: &str, path: &[u8]) -> bool {
        path.starts_with(prefix.as_bytes()) && matches!(path.get(prefix.len()), None | Some(b'/'))
    }

    /// Whatever the path, the upstream either sees nothing, or a path that stays inside the
    /// matched route's upstream prefix under zero, one or two rounds of percent-decoding
    /// followed by dot-segment removal, and equal byte-for-byte to prefix + rest.
    #[test]
    fn upstream_never_sees_a_path_outside_the_route() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let pki = TestPki::new();
        let (mock, proxy, client) = rt.block_on(async {
            let mock = echo_mock(&pki);
            let proxy = Setup::new(&mock.base_url(), pki.ca_path()).start().await;
            (mock, proxy, http1_client())
        });
        let config = ProptestConfig {
            cases: 256,
            failure_persistence: None,
            ..ProptestConfig::default()
        };
        let mut runner = proptest::test_runner::TestRunner::new(config);
        let result = runner.run(&path(), |path| {
            let url = format!("http://{}{}", proxy.addr, path);
            let Ok(uri) = url.parse::<http::Uri>() else {
                return Ok(());
            };
            let before = mock.request_count();
            let outcome = rt.block_on(async {
                let request = Request::get(uri).body(empty_body()).unwrap();
                let response = client.request(request).await.unwrap();
                let status = response.status();
                let reason = response.headers().get(REASON_HEADER).cloned();
                drain_body(response.into_body()).await;
                (status, reason)
            });
            match outcome {
                (StatusCode::OK, None) => {
                    let seen = mock.last_request().unwrap();
                    let auth = seen.header("authorization").unwrap().to_owned();
                    let (local, upstream) = if auth == bearer(REPO_TOKEN) {
                        (
                            "/2.0/repositories/acme/widgets",
                            "/2.0/repositories/acme/widgets",
                        )
                    } else if auth == bearer(WORKSPACE_TOKEN) {
                        ("/2.0/repositories/acme", "/2.0/repositories/acme")
                    } else {
                        prop_assert_eq!(&auth, &basic(API_EMAIL, API_TOKEN));
                        ("/release", "/2.0/repositories/acme")
                    };
                    prop_assert!(
                        within(local, path.as_bytes()),
                        "{} routed via {}",
                        path,
                        local
                    );
                    prop_assert_eq!(&seen.uri, &format!("{upstream}{}", &path[local.len()..]));
                    let once = percent_decode(seen.uri.as_bytes());
                    let twice = percent_decode(&once);
                    for form in [seen.uri.as_bytes(), &once[..], &twice[..]] {
                        let normal = remove_dot_segments(form);
                        prop_assert!(
                            within(upstream, &normal),
                            "{} reached upstream as {}, which normalises to {}",
                            path,
                            seen.uri,
                            String::from_utf8_lossy(&normal)
                        );
                    }
                }
                (StatusCode::BAD_REQUEST, Some(reason)) => {
                    prop_assert_eq!(reason, "bad-path");
                    prop_assert_eq!(mock.request_count(), before);
                }
                other => prop_assert!(false, "{}: unexpected {:?}", path, other),
            }
            Ok(())
        });
        if let Err(error) = result {
            panic!("{error}");
        }
        drop((proxy, mock));
    }
}
