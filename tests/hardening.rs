//! Issue 13, "Leaks and panics": what a client sends that must never reach Bitbucket, and what
//! Bitbucket sends that must never point a client past the proxy. Raw TCP and an h2 client
//! against the in-process proxy and the TLS mocks of `support`.

mod support;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::proxy::*;
use support::*;
use tokio::net::TcpStream;

#[tokio::test]
async fn trace_and_track_are_refused_on_every_path_and_never_forwarded() {
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path()).start().await;
    // The workspace route has no `methods`: before, TRACE went upstream with its credential.
    for method in ["TRACE", "TRACK", "trace"] {
        for path in [
            "/2.0/repositories/acme/gadgets",
            "/2.0/repositories/acme/widgets",
            "/-/health",
            "/nowhere",
        ] {
            let response = raw(
                proxy.addr,
                &format!(
                    "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                    proxy.addr
                ),
            )
            .await;
            assert_eq!(response.status, 405, "{method} {path}: {response:?}");
            assert_eq!(
                response.header("x-bitbucket-auth-proxy"),
                Some("method-not-allowed"),
                "{method} {path}"
            );
            assert_error_json(response.body.as_bytes());
        }
    }
    assert_eq!(mock.request_count(), 0);
}

/// The headers some front ends act on: method overrides, URL rewrites, and forwarded client
/// addresses, hosts and schemes.
const FRONT_END_HEADERS: [&str; 11] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "forwarded",
    "x-real-ip",
    "true-client-ip",
];

#[tokio::test]
async fn headers_front_ends_act_on_never_reach_the_upstream() {
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path()).start().await;
    let mut request = format!(
        "GET /2.0/repositories/acme/widgets HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nX-Kept: 1\r\n",
        proxy.addr
    );
    for name in FRONT_END_HEADERS {
        let value = match name {
            "x-original-url" | "x-rewrite-url" => "/2.0/repositories/acme/gadgets",
            name if name.contains("method") => "DELETE",
            _ => "10.0.0.1",
        };
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let response = raw(proxy.addr, &request).await;
    assert_eq!(response.status, 200, "{response:?}");
    let seen = mock.last_request().unwrap();
    for name in FRONT_END_HEADERS {
        assert_eq!(seen.header_all(name), Vec::<String>::new(), "{name} passed");
    }
    assert_eq!(seen.header("x-kept"), Some("1"));
}

/// A TLS mock (h2 + HTTP/1.1) that reads each request body with its trailers and records the
/// trailer fields it received.
fn trailer_mock(pki: &TestPki) -> (MockUpstream, Arc<Mutex<Vec<HeaderMap>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let mock = MockUpstream::start(pki.server_config(), move |_head, body| {
        let log = log.clone();
        async move {
            let collected = body.collect().await.expect("whole body");
            log.lock()
                .unwrap()
                .push(collected.trailers().cloned().unwrap_or_default());
            Response::new(full_body(collected.to_bytes()))
        }
    });
    (mock, seen)
}

#[tokio::test]
async fn request_trailers_are_dropped_for_h2_and_http1_clients() {
    let pki = TestPki::new();
    let (mock, seen) = trailer_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path()).start().await;

    // An h2 client: DATA, then a HEADERS frame of trailers with a credential in it.
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let mut trailers = HeaderMap::new();
    trailers.insert("authorization", "Bearer client-chosen".parse().unwrap());
    trailers.insert("x-trailer", "1".parse().unwrap());
    let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
        Ok(Frame::data(Bytes::from_static(b"payload"))),
        Ok(Frame::trailers(trailers)),
    ];
    let body = StreamBody::new(futures_util::stream::iter(frames));
    let request = Request::post(format!(
        "http://{}/2.0/repositories/acme/gadgets/src",
        proxy.addr
    ))
    .body(body)
    .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        body_string(response.into_body()).await,
        "payload",
        "the body itself still goes through"
    );

    // An HTTP/1.1 client: a chunked body with a trailer section.
    let response = raw(
        proxy.addr,
        &format!(
            "POST /2.0/repositories/acme/gadgets/src HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
             Transfer-Encoding: chunked\r\nTE: trailers\r\n\r\n\
             7\r\npayload\r\n0\r\nAuthorization: Bearer client-chosen\r\nX-Trailer: 1\r\n\r\n",
            proxy.addr
        ),
    )
    .await;
    assert_eq!(response.status, 200, "{response:?}");

    let requests = mock.requests();
    assert_eq!(requests.len(), 2);
    assert!(requests.iter().all(|r| r.version == Version::HTTP_2));
    for (head, trailers) in requests.iter().zip(seen.lock().unwrap().iter()) {
        assert!(
            trailers.is_empty(),
            "trailers reached the upstream: {trailers:?}"
        );
        assert_eq!(head.header_all("authorization"), [bearer(WORKSPACE_TOKEN)]);
    }
}

/// Links in a JSON body, the way Bitbucket writes them, with the mock's own origin.
fn linking_mock(pki: &TestPki) -> MockUpstream {
    let origin: Arc<Mutex<String>> = Arc::default();
    let own = origin.clone();
    let mock = MockUpstream::start_simple(pki.server_config(), move |head| {
        let origin = own.lock().unwrap().clone();
        Response::builder()
            .header("content-type", "application/json")
            .header("location", format!("{origin}{}", head.uri))
            .body(Full::new(Bytes::from(format!(
                r#"{{"links":{{"self":{{"href":"{origin}{}"}}}}}}"#,
                head.uri
            ))))
            .unwrap()
    });
    *origin.lock().unwrap() = mock.base_url();
    mock
}

#[tokio::test]
async fn http10_without_host_gets_links_to_the_address_it_connected_to() {
    let pki = TestPki::new();
    let mock = linking_mock(&pki);
    let proxy = Setup::new(&mock.base_url(), pki.ca_path()).start().await;
    let response = raw(
        proxy.addr,
        "GET /2.0/repositories/acme/gadgets HTTP/1.0\r\n\r\n",
    )
    .await;
    assert_eq!(response.status, 200, "{response:?}");
    let local = format!("http://{}/2.0/repositories/acme/gadgets", proxy.addr);
    assert_eq!(response.header("location"), Some(local.as_str()));
    assert!(response.body.contains(&local), "{}", response.body);
    assert!(
        !response.body.contains(&mock.base_url()),
        "{}",
        response.body
    );
}

/// `/-/ready` watches `{ file = }` secrets while the proxy runs: a file that became writable by
/// others, grew past 64 KiB or went away makes it not ready, named by credential, not by path.
#[tokio::test]
async fn ready_names_the_credential_of_a_refused_secret_file_never_its_path() {
    use std::os::unix::fs::PermissionsExt;
    let pki = TestPki::new();
    let mock = echo_mock(&pki);
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("filed.token");
    std::fs::write(&token, "filed-token-Vb31").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = format!(
        "{}\n[credentials.filed]\nkind = \"workspace_access_token\"\nworkspace = \"other\"\ntoken = {{ file = {} }}\n",
        Setup::new(&mock.base_url(), pki.ca_path()).toml(),
        toml_string(&token.display().to_string()),
    );
    let config = bitbucket_auth_proxy::Config::from_toml(&dir.path().join("proxy.toml"), &text)
        .unwrap_or_else(|e| panic!("{e}"));
    let proxy = bitbucket_auth_proxy::start(config).await.unwrap();
    let addr = proxy.local_addrs()[0];
    let ready = || async move {
        let response = get(addr, "/-/ready").await;
        (response.status(), body_string(response.into_body()).await)
    };
    assert_eq!(ready().await.0, StatusCode::OK);

    let chmod = |mode| std::fs::set_permissions(&token, std::fs::Permissions::from_mode(mode));
    let cases: [(&dyn Fn(), &str); 3] = [
        (&|| chmod(0o620).unwrap(), "is writable by group or others"),
        (
            &|| {
                chmod(0o600).unwrap();
                std::fs::write(&token, "x".repeat(70_000)).unwrap();
            },
            "is larger than 64 KiB",
        ),
        (
            &|| std::fs::remove_file(&token).unwrap(),
            "is no longer readable",
        ),
    ];
    let dir_text = dir.path().display().to_string();
    for (change, expected) in cases {
        change();
        let (status, body) = ready().await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(
            body.contains(&format!(
                "credentials.filed.token: the secret file {expected}"
            )),
            "{body}"
        );
        assert!(!body.contains(&dir_text), "{body}");
    }
}
