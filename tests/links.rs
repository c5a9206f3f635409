//! Issue 3: links, pagination and redirects stay behind the proxy. A real proxy in-process,
//! a TLS mock of Bitbucket whose responses use its own origin, and a client that follows them.

mod support;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bitbucket_auth_proxy::{Config, RunningProxy};
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use support::*;

const TOKEN: &str = "links-test-token-Zq81";

struct Fixture {
    upstream: MockUpstream,
    proxy: RunningProxy,
    _pki: TestPki,
}

impl Fixture {
    fn addr(&self) -> SocketAddr {
        self.proxy.local_addrs()[0]
    }
}

/// A proxy with a transparent workspace route, an alias and a raw route, in front of `upstream`.
async fn start_proxy(pki: TestPki, upstream: MockUpstream) -> Fixture {
    start_proxy_with(pki, upstream, "").await
}

async fn start_proxy_with(pki: TestPki, upstream: MockUpstream, server_extra: &str) -> Fixture {
    let text = format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
{server_extra}

[upstream]
api_url = "{base}"
git_url = "{base}"
ca_file = "{ca}"
timeout = "10s"

[credentials.acme-all]
kind = "workspace_access_token"
workspace = "acme"
token = {{ value = "{TOKEN}" }}

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "acme-all"

[[routes]]
prefix = "/release"
upstream_prefix = "/2.0/repositories/acme"
credential = "acme-all"

[[routes]]
prefix = "/raw"
upstream_prefix = "/2.0/repositories/acme"
credential = "acme-all"
rewrite_links = false
"#,
        base = upstream.base_url(),
        ca = pki.ca_path().display(),
    );
    let config = Config::from_toml(Path::new("links.toml"), &text).expect("valid test config");
    let proxy = bitbucket_auth_proxy::start(config)
        .await
        .expect("proxy starts");
    Fixture {
        upstream,
        proxy,
        _pki: pki,
    }
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// Three pages of pull requests, each `next` an absolute URL on the upstream's own origin.
fn paginated_upstream(pki: &TestPki) -> MockUpstream {
    let origin = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
    let origin_for_handler = origin.clone();
    let mock = MockUpstream::start_simple(pki.server_config(), move |head| {
        let origin = origin_for_handler
            .get()
            .expect("origin set before requests");
        let page: u32 = head
            .uri
            .split("page=")
            .nth(1)
            .and_then(|p| p.split('&').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or(1);
        let base = format!("{origin}/2.0/repositories/acme/widgets/pullrequests");
        let values: Vec<String> = (0..2)
            .map(|i| {
                let id = (page - 1) * 2 + i + 1;
                format!(
                    r#"{{"id":{id},"links":{{"self":{{"href":"{base}/{id}"}},"html":{{"href":"https://bitbucket.org/acme/widgets/pull-requests/{id}"}}}}}}"#
                )
            })
            .collect();
        let next = if page < 3 {
            format!(r#","next":"{base}?state=OPEN&page={}""#, page + 1)
        } else {
            String::new()
        };
        json(
            StatusCode::OK,
            format!(
                r#"{{"pagelen":2,"size":6,"page":{page}{next},"values":[{}]}}"#,
                values.join(",")
            ),
        )
    });
    origin.set(mock.base_url()).unwrap();
    mock
}

/// Follows `next` from `first` through the proxy, as a pagination loop in a client would.
async fn collect_all_pages(proxy: SocketAddr, first: &str) -> (Vec<u64>, Vec<String>) {
    let mut ids = Vec::new();
    let mut followed = Vec::new();
    let mut path = first.to_owned();
    loop {
        let response = get(proxy, &path).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let page: serde_json::Value =
            serde_json::from_slice(&collect_body(response.into_body()).await).unwrap();
        for value in page["values"].as_array().unwrap() {
            ids.push(value["id"].as_u64().unwrap());
            let html = value["links"]["html"]["href"].as_str().unwrap();
            assert!(
                html.starts_with("https://bitbucket.org/"),
                "web links are untouched: {html}"
            );
        }
        let Some(next) = page["next"].as_str() else {
            break;
        };
        let origin = format!("http://{proxy}");
        let rest = next
            .strip_prefix(&origin)
            .unwrap_or_else(|| panic!("`next` must point at the proxy, got {next}"));
        followed.push(rest.to_owned());
        path = rest.to_owned();
    }
    (ids, followed)
}

#[tokio::test]
async fn following_next_collects_every_page_through_a_transparent_route() {
    let pki = TestPki::new();
    let upstream = paginated_upstream(&pki);
    let fixture = start_proxy(pki, upstream).await;
    let (ids, followed) = collect_all_pages(
        fixture.addr(),
        "/2.0/repositories/acme/widgets/pullrequests",
    )
    .await;
    assert_eq!(ids, [1, 2, 3, 4, 5, 6]);
    assert_eq!(
        followed,
        [
            "/2.0/repositories/acme/widgets/pullrequests?state=OPEN&page=2",
            "/2.0/repositories/acme/widgets/pullrequests?state=OPEN&page=3"
        ]
    );
    // Every page went to the upstream with the credential.
    let requests = fixture.upstream.requests();
    assert_eq!(requests.len(), 3);
    assert!(
        requests
            .iter()
            .all(|r| r.header("authorization") == Some(&format!("Bearer {TOKEN}")))
    );
}

#[tokio::test]
async fn following_next_collects_every_page_through_an_alias_route() {
    let pki = TestPki::new();
    let upstream = paginated_upstream(&pki);
    let fixture = start_proxy(pki, upstream).await;
    let (ids, followed) = collect_all_pages(fixture.addr(), "/release/widgets/pullrequests").await;
    assert_eq!(ids, [1, 2, 3, 4, 5, 6]);
    assert_eq!(
        followed,
        [
            "/release/widgets/pullrequests?state=OPEN&page=2",
            "/release/widgets/pullrequests?state=OPEN&page=3"
        ]
    );
    let paths: Vec<String> = fixture
        .upstream
        .requests()
        .iter()
        .map(|r| r.uri.clone())
        .collect();
    assert_eq!(
        paths[2],
        "/2.0/repositories/acme/widgets/pullrequests?state=OPEN&page=3"
    );
}

#[tokio::test]
async fn links_use_the_client_host_or_public_url() {
    let pki = TestPki::new();
    let upstream = paginated_upstream(&pki);
    let fixture = start_proxy(pki, upstream).await;
    let page_with_host = |host: &'static str| {
        let addr = fixture.addr();
        async move {
            let request = Request::get("/2.0/repositories/acme/widgets/pullrequests")
                .header(header::HOST, host)
                .body(empty_body())
                .unwrap();
            body_string(send(addr, request).await.unwrap().into_body()).await
        }
    };
    let page: serde_json::Value =
        serde_json::from_str(&page_with_host("proxy.internal:8080").await).unwrap();
    assert_eq!(
        page["next"],
        "http://proxy.internal:8080/2.0/repositories/acme/widgets/pullrequests?state=OPEN&page=2"
    );
    // A Host that is not a plain authority is never echoed into responses.
    let body = page_with_host("evil\"},\"x\":\"").await;
    assert!(!body.contains("evil"), "{body}");

    let pki = TestPki::new();
    let upstream = paginated_upstream(&pki);
    let fixture = start_proxy_with(
        pki,
        upstream,
        r#"public_url = "https://ci-proxy.example:8443""#,
    )
    .await;
    let page: serde_json::Value = serde_json::from_slice(
        &collect_body(
            get(fixture.addr(), "/release/widgets/pullrequests")
                .await
                .into_body(),
        )
        .await,
    )
    .unwrap();
    assert_eq!(
        page["next"],
        "https://ci-proxy.example:8443/release/widgets/pullrequests?state=OPEN&page=2"
    );
}

#[tokio::test]
async fn escaped_slashes_are_rewritten_and_raw_routes_are_left_alone() {
    let pki = TestPki::new();
    let origin = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
    let origin_for_handler = origin.clone();
    let upstream = MockUpstream::start_simple(pki.server_config(), move |_| {
        let escaped = origin_for_handler.get().unwrap().replace('/', "\\/");
        json(
            StatusCode::OK,
            format!(r#"{{"next":"{escaped}\/2.0\/repositories\/acme\/widgets\/commits?page=2"}}"#),
        )
    });
    origin.set(upstream.base_url()).unwrap();
    let upstream_origin = upstream.base_url();
    let fixture = start_proxy(pki, upstream).await;
    let addr = fixture.addr();

    let body = body_string(get(addr, "/release/widgets/commits").await.into_body()).await;
    assert_eq!(
        body,
        format!(r#"{{"next":"http:\/\/{addr}\/release\/widgets\/commits?page=2"}}"#)
    );

    let raw = get(addr, "/raw/widgets/commits").await;
    let body = body_string(raw.into_body()).await;
    assert!(
        body.contains(&upstream_origin.replace('/', "\\/")),
        "rewrite_links = false: {body}"
    );
}

#[tokio::test]
async fn gzip_json_is_decoded_rewritten_and_sent_as_identity() {
    let pki = TestPki::new();
    let origin = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
    let origin_for_handler = origin.clone();
    let upstream = MockUpstream::start_simple(pki.server_config(), move |head| {
        assert_eq!(
            head.header("accept-encoding"),
            Some("gzip, br"),
            "zstd was filtered out"
        );
        let body = format!(
            r#"{{"links":{{"self":{{"href":"{}/2.0/repositories/acme/widgets"}}}}}}"#,
            origin_for_handler.get().unwrap()
        );
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(body.as_bytes()).unwrap();
        let compressed = encoder.finish().unwrap();
        Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_ENCODING, "gzip")
            .header(header::CONTENT_LENGTH, compressed.len())
            .header(header::ETAG, "\"abc\"")
            .body(Full::new(Bytes::from(compressed)))
            .unwrap()
    });
    origin.set(upstream.base_url()).unwrap();
    let fixture = start_proxy(pki, upstream).await;
    let addr = fixture.addr();
    let response = send(
        addr,
        Request::get("/2.0/repositories/acme/widgets")
            .header(header::ACCEPT_ENCODING, "gzip, zstd, br")
            .body(empty_body())
            .unwrap(),
    )
    .await
    .unwrap();
    assert!(response.headers().get(header::CONTENT_ENCODING).is_none());
    assert_eq!(response.headers()[header::ETAG], "W/\"abc\"");
    let body = body_string(response.into_body()).await;
    assert_eq!(
        body,
        format!(
            r#"{{"links":{{"self":{{"href":"http://{addr}/2.0/repositories/acme/widgets"}}}}}}"#
        )
    );
}

#[tokio::test]
async fn same_origin_redirects_are_rewritten_and_others_pass_untouched_without_credentials() {
    let pki = TestPki::new();
    // "Storage": another host (a different origin) that records whether credentials arrive.
    let storage = MockUpstream::start_simple(
        pki.server_config_for_names(&["localhost"], ALPN_H2_H1),
        |_| Response::new(Full::new(Bytes::from_static(b"file contents"))),
    );
    let storage_url = format!(
        "https://localhost:{}/bucket/object?X-Amz-Signature=abc",
        storage.addr().port()
    );
    let origin = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
    let origin_for_handler = origin.clone();
    let storage_for_handler = storage_url.clone();
    let upstream = MockUpstream::start_simple(pki.server_config(), move |head| {
        let location = if head.uri.contains("/downloads/") {
            storage_for_handler.clone()
        } else {
            format!(
                "{}/2.0/repositories/acme/widgets/patch/abc",
                origin_for_handler.get().unwrap()
            )
        };
        Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, location)
            .body(Full::new(Bytes::new()))
            .unwrap()
    });
    origin.set(upstream.base_url()).unwrap();
    let fixture = start_proxy(pki, upstream).await;
    let addr = fixture.addr();

    let same = get(addr, "/release/widgets/diff/abc").await;
    assert_eq!(same.status(), StatusCode::FOUND);
    assert_eq!(
        same.headers()[header::LOCATION],
        format!("http://{addr}/release/widgets/patch/abc")
    );

    let away = get(addr, "/2.0/repositories/acme/widgets/downloads/build.zip").await;
    assert_eq!(away.status(), StatusCode::FOUND);
    assert_eq!(away.headers()[header::LOCATION], storage_url.as_str());
    // The proxy did not follow either redirect.
    assert_eq!(fixture.upstream.request_count(), 2);
    assert_eq!(storage.request_count(), 0);

    // A client following the redirect reaches storage on its own, and no credential goes there.
    let tls = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(fixture._pki.client_config())
        .https_only()
        .enable_http1()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, http_body_util::Empty<Bytes>>(tls);
    let followed = client.get(storage_url.parse().unwrap()).await.unwrap();
    assert_eq!(followed.status(), StatusCode::OK);
    let seen = storage.last_request().unwrap();
    assert_eq!(seen.header("authorization"), None);
    assert!(
        storage
            .requests()
            .iter()
            .all(|r| r.header("authorization").is_none()),
        "the storage host never sees a credential"
    );
}

#[tokio::test]
async fn non_json_bodies_pass_untouched() {
    let pki = TestPki::new();
    let origin = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
    let origin_for_handler = origin.clone();
    let upstream = MockUpstream::start_simple(pki.server_config(), move |_| {
        let diff = format!(
            "--- a/README\n+++ b/README\n+see {}/2.0/repositories/acme/widgets\n",
            origin_for_handler.get().unwrap()
        );
        Response::builder()
            .header(header::CONTENT_TYPE, "text/plain")
            .header(header::CONTENT_LENGTH, diff.len())
            .body(Full::new(Bytes::from(diff)))
            .unwrap()
    });
    origin.set(upstream.base_url()).unwrap();
    let origin = upstream.base_url();
    let fixture = start_proxy(pki, upstream).await;
    let response = get(fixture.addr(), "/2.0/repositories/acme/widgets/diff/a..b").await;
    assert!(
        response.headers().get(header::CONTENT_LENGTH).is_some(),
        "length kept: body untouched"
    );
    let body = body_string(response.into_body()).await;
    assert!(body.contains(&origin), "{body}");
}

#[tokio::test]
async fn a_json_body_streams_with_links_split_across_chunks() {
    // The mock writes each link in several frames so matches straddle chunk boundaries on the
    // wire, not only in unit tests.
    let pki = TestPki::new();
    let origin = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
    let origin_for_handler = origin.clone();
    let upstream = MockUpstream::start(pki.server_config(), move |_, _| {
        let origin = origin_for_handler.get().unwrap().clone();
        async move {
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                let item = format!(r#"{{"href":"{origin}/2.0/repositories/acme/x"}},"#);
                let _ = tx.send(Bytes::from_static(b"[")).await;
                for i in 0..200 {
                    let cut = 1 + i % (item.len() - 1);
                    let _ = tx
                        .send(Bytes::copy_from_slice(&item.as_bytes()[..cut]))
                        .await;
                    let _ = tx
                        .send(Bytes::copy_from_slice(&item.as_bytes()[cut..]))
                        .await;
                }
                let _ = tx.send(Bytes::from_static(b"{}]")).await;
            });
            Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(body)
                .unwrap()
        }
    });
    origin.set(upstream.base_url()).unwrap();
    let fixture = start_proxy(pki, upstream).await;
    let addr = fixture.addr();
    let body = body_string(get(addr, "/release/x").await.into_body()).await;
    let items: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(items.len(), 201);
    for item in &items[..200] {
        assert_eq!(item["href"], format!("http://{addr}/release/x"));
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
}
