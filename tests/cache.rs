//! Issue 15, items 1 and 2: request coalescing and the response cache, against a mock
//! Bitbucket that counts the requests it receives and, where a test needs requests to overlap,
//! holds its answers until the test opens a gate.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use support::proxy::{Setup, TestProxy, basic, bearer};
use support::*;
use tokio::sync::{Semaphore, mpsc};

const HASH: &str = "0123456789abcdef0123456789abcdef01234567";

/// A counting mock whose answers wait for permits from `gate` when it is gated.
struct Upstream {
    mock: MockUpstream,
    gate: Arc<Semaphore>,
}

impl Upstream {
    fn start<F>(pki: &TestPki, gated: bool, answer: F) -> Upstream
    where
        F: Fn(&RecordedRequestHead) -> Response<BoxBody> + Send + Sync + 'static,
    {
        let gate = Arc::new(Semaphore::new(if gated {
            0
        } else {
            Semaphore::MAX_PERMITS
        }));
        let answer = Arc::new(answer);
        let waiting = gate.clone();
        let mock = MockUpstream::start(pki.server_config(), move |head, _body| {
            let (gate, answer) = (waiting.clone(), answer.clone());
            async move {
                gate.acquire().await.expect("gate open").forget();
                answer(&head)
            }
        });
        Upstream { mock, gate }
    }

    /// Opens the gate once `arrived` requests reached the mock and the proxy had a moment to
    /// let identical requests join them.
    async fn release_after(&self, arrived: usize) {
        assert!(
            self.mock
                .wait_for_requests(arrived, Duration::from_secs(10))
                .await,
            "{arrived} upstream requests expected, saw {}",
            self.mock.request_count()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.gate.add_permits(1000);
    }

    fn count(&self) -> usize {
        self.mock.request_count()
    }
}

/// A JSON page with a link back to the upstream, as Bitbucket writes them.
fn json_page(head: &RecordedRequestHead, base: &str) -> Response<BoxBody> {
    let path = head.uri.split('?').next().unwrap_or_default();
    let body = format!(r#"{{"next":"{base}{path}?page=2","path":"{path}"}}"#);
    Response::builder()
        .header("content-type", "application/json")
        .body(full_body(body))
        .unwrap()
}

async fn start(upstream: &MockUpstream, pki: &TestPki, routes: &str) -> TestProxy {
    Setup::new(&upstream.base_url(), pki.ca_path())
        .routes(routes)
        .start()
        .await
}

/// A workspace route, a microcached alias of it on the same credential, and an alias on
/// another credential.
const ROUTES: &str = r#"
[[routes]]
prefix = "/2.0/repositories/acme"
credential = "acme-all"

[[routes]]
prefix = "/micro"
upstream_prefix = "/2.0/repositories/acme"
credential = "acme-all"
cache = { max_age = "1s" }

[[routes]]
prefix = "/release"
upstream_prefix = "/2.0/repositories/acme"
credential = "release-bot"
"#;

async fn get_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Response<Incoming> {
    let mut request = Request::get(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(addr, request.body(empty_body()).unwrap())
        .await
        .expect("send")
}

fn header(response: &Response<Incoming>, name: &str) -> String {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

async fn text(response: Response<Incoming>) -> String {
    body_string(response.into_body()).await
}

#[tokio::test]
async fn a_hundred_concurrent_identical_gets_make_one_upstream_request() {
    let pki = TestPki::new();
    let base = Arc::new(std::sync::Mutex::new(String::new()));
    let seen = base.clone();
    let upstream = Upstream::start(&pki, true, move |head| {
        json_page(head, &seen.lock().unwrap())
    });
    *base.lock().unwrap() = upstream.mock.base_url();
    let proxy = start(&upstream.mock, &pki, ROUTES).await;
    let path = "/2.0/repositories/acme/widgets/pullrequests?state=OPEN";
    let clients = join_all((0..100).map(|_| get_with(proxy.addr, path, &[])));
    let (responses, ()) = tokio::join!(clients, upstream.release_after(1));
    assert_eq!(upstream.count(), 1, "one upstream request for all of them");
    let mut collapsed = 0;
    let mut bodies = Vec::new();
    for response in responses {
        assert_eq!(response.status(), StatusCode::OK);
        let status = header(&response, "cache-status");
        collapsed += usize::from(status.ends_with("fwd=miss; collapsed"));
        bodies.push(text(response).await);
    }
    assert_eq!(collapsed, 99, "all but the leader were coalesced");
    let expected = format!(
        r#"{{"next":"http://{}/2.0/repositories/acme/widgets/pullrequests?page=2","path":"/2.0/repositories/acme/widgets/pullrequests"}}"#,
        proxy.addr
    );
    assert!(bodies.iter().all(|b| *b == expected), "{}", bodies[0]);

    // Not in flight any more, and a pull-request list is not cached by default.
    let again = get_with(proxy.addr, path, &[]).await;
    assert_eq!(
        header(&again, "cache-status"),
        "bitbucket-auth-proxy; fwd=miss"
    );
    text(again).await;
    assert_eq!(upstream.count(), 2);
}

#[tokio::test]
async fn a_shared_body_is_rewritten_for_each_clients_route_and_host() {
    let pki = TestPki::new();
    let base = Arc::new(std::sync::Mutex::new(String::new()));
    let seen = base.clone();
    let upstream = Upstream::start(&pki, true, move |head| {
        json_page(head, &seen.lock().unwrap())
    });
    *base.lock().unwrap() = upstream.mock.base_url();
    // `/mirror` is `/2.0/repositories/acme` again on the same credential: same upstream request.
    let routes = format!(
        "{ROUTES}\n[[routes]]\nprefix = \"/mirror\"\nupstream_prefix = \"/2.0/repositories/acme\"\ncredential = \"acme-all\"\n"
    );
    let proxy = start(&upstream.mock, &pki, &routes).await;
    let requests = async {
        tokio::join!(
            get_with(
                proxy.addr,
                "/2.0/repositories/acme/w/refs",
                &[("host", "a.test:1")]
            ),
            get_with(proxy.addr, "/mirror/w/refs", &[("host", "b.test:2")]),
        )
    };
    let ((a, b), ()) = tokio::join!(requests, upstream.release_after(1));
    assert_eq!(upstream.count(), 1);
    let (a, b) = (text(a).await, text(b).await);
    assert!(
        a.contains(r#""next":"http://a.test:1/2.0/repositories/acme/w/refs?page=2""#),
        "{a}"
    );
    assert!(
        b.contains(r#""next":"http://b.test:2/mirror/w/refs?page=2""#),
        "{b}"
    );
}

#[tokio::test]
async fn immutable_paths_are_cached_and_mutable_ones_are_not() {
    let pki = TestPki::new();
    let upstream = Upstream::start(&pki, false, |head| {
        Response::new(full_body(format!("file at {}", head.uri)))
    });
    let proxy = start(&upstream.mock, &pki, ROUTES).await;
    let pinned = format!("/2.0/repositories/acme/widgets/src/{HASH}/README.md");
    let first = get_with(proxy.addr, &pinned, &[]).await;
    assert_eq!(
        header(&first, "cache-status"),
        "bitbucket-auth-proxy; fwd=miss"
    );
    let first = text(first).await;
    let second = get_with(proxy.addr, &pinned, &[]).await;
    assert_eq!(header(&second, "cache-status"), "bitbucket-auth-proxy; hit");
    assert!(second.headers().contains_key("age"));
    assert_eq!(text(second).await, first);
    assert_eq!(upstream.count(), 1);

    for mutable in [
        "/2.0/repositories/acme/widgets/src/main/README.md".to_owned(),
        format!("/2.0/repositories/acme/widgets/commit/{HASH}"),
        format!(
            "/2.0/repositories/acme/widgets/src/{}/README.md",
            &HASH[..12]
        ),
    ] {
        let before = upstream.count();
        for _ in 0..2 {
            text(get_with(proxy.addr, &mutable, &[]).await).await;
        }
        assert_eq!(upstream.count(), before + 2, "{mutable} is not cached");
    }

    // A range or a conditional request goes upstream alone, even for a pinned path.
    let before = upstream.count();
    for extra in [("range", "bytes=0-3"), ("if-none-match", "\"abc\"")] {
        let response = get_with(proxy.addr, &pinned, &[extra]).await;
        assert_eq!(
            header(&response, "cache-status"),
            "bitbucket-auth-proxy; fwd=bypass"
        );
        text(response).await;
    }
    assert_eq!(upstream.count(), before + 2);
}

#[tokio::test]
async fn microcached_entries_expire_after_max_age() {
    let pki = TestPki::new();
    let upstream = Upstream::start(&pki, false, |head| {
        Response::new(full_body(format!("list {}", head.uri)))
    });
    let proxy = start(&upstream.mock, &pki, ROUTES).await;
    let path = "/micro/widgets/pullrequests";
    text(get_with(proxy.addr, path, &[]).await).await;
    let hit = get_with(proxy.addr, path, &[]).await;
    let status = header(&hit, "cache-status");
    assert!(
        status.starts_with("bitbucket-auth-proxy; hit; ttl="),
        "{status}"
    );
    assert!(header(&hit, "age").parse::<u64>().unwrap() < 1);
    text(hit).await;
    assert_eq!(upstream.count(), 1);
    // The route without max_age never reads the entry the microcached one stored.
    text(
        get_with(
            proxy.addr,
            "/2.0/repositories/acme/widgets/pullrequests",
            &[],
        )
        .await,
    )
    .await;
    assert_eq!(upstream.count(), 2);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let expired = get_with(proxy.addr, path, &[]).await;
    assert_eq!(
        header(&expired, "cache-status"),
        "bitbucket-auth-proxy; fwd=miss"
    );
    text(expired).await;
    assert_eq!(upstream.count(), 3);

    // A client's no-cache goes upstream, and its fresh answer replaces the entry.
    let fresh = get_with(proxy.addr, path, &[("cache-control", "no-cache")]).await;
    assert_eq!(
        header(&fresh, "cache-status"),
        "bitbucket-auth-proxy; fwd=request"
    );
    text(fresh).await;
    assert_eq!(upstream.count(), 4);
}

#[tokio::test]
async fn a_write_drops_the_entries_of_its_repository() {
    let pki = TestPki::new();
    let upstream = Upstream::start(&pki, false, |head| {
        Response::new(full_body(format!("{} {}", head.method, head.uri)))
    });
    let proxy = start(&upstream.mock, &pki, ROUTES).await;
    let gadgets = "/micro/gadgets/pullrequests";
    let other = "/micro/widgets/pullrequests";
    let pinned = format!("/micro/gadgets/src/{HASH}/README.md");
    for path in [gadgets, other, &pinned] {
        text(get_with(proxy.addr, path, &[]).await).await;
        text(get_with(proxy.addr, path, &[]).await).await;
    }
    assert_eq!(upstream.count(), 3);

    let post = Request::post("/micro/gadgets/pullrequests")
        .body(full_body("{\"title\":\"new\"}"))
        .unwrap();
    let created = send(proxy.addr, post).await.unwrap();
    assert_eq!(
        header(&created, "cache-status"),
        "bitbucket-auth-proxy; fwd=method"
    );
    text(created).await;
    assert_eq!(upstream.count(), 4);

    // The job that opened a pull request sees it in the next list.
    let listed = get_with(proxy.addr, gadgets, &[]).await;
    assert_eq!(
        header(&listed, "cache-status"),
        "bitbucket-auth-proxy; fwd=miss"
    );
    text(listed).await;
    assert_eq!(upstream.count(), 5, "the list of acme/gadgets went");
    let untouched = get_with(proxy.addr, other, &[]).await;
    assert!(header(&untouched, "cache-status").contains("hit"));
    text(untouched).await;
    let pinned_hit = get_with(proxy.addr, &pinned, &[]).await;
    assert!(
        header(&pinned_hit, "cache-status").contains("hit"),
        "no write changes a commit"
    );
    text(pinned_hit).await;
    assert_eq!(upstream.count(), 5, "another repository's entry stays");

    // Deleting the repository drops even what a commit pinned.
    let delete = Request::delete("/micro/gadgets")
        .body(empty_body())
        .unwrap();
    text(send(proxy.addr, delete).await.unwrap()).await;
    text(get_with(proxy.addr, &pinned, &[]).await).await;
    assert_eq!(upstream.count(), 7);
}

#[tokio::test]
async fn two_credentials_never_share_an_answer() {
    let pki = TestPki::new();
    let upstream = Upstream::start(&pki, true, |head| {
        let who = head.header("authorization").unwrap_or("nobody").to_owned();
        Response::new(full_body(who))
    });
    let proxy = start(&upstream.mock, &pki, ROUTES).await;
    let tail = format!("/widgets/src/{HASH}/README.md");
    let workspace = format!("/2.0/repositories/acme{tail}");
    let release = format!("/release{tail}");
    let both = async {
        tokio::join!(
            get_with(proxy.addr, &workspace, &[]),
            get_with(proxy.addr, &release, &[]),
        )
    };
    let ((a, b), ()) = tokio::join!(both, upstream.release_after(2));
    assert_eq!(
        upstream.count(),
        2,
        "in flight together, still two requests"
    );
    let (a, b) = (text(a).await, text(b).await);
    assert_eq!(a, bearer(proxy::WORKSPACE_TOKEN));
    assert_eq!(b, basic(proxy::API_EMAIL, proxy::API_TOKEN));
    // And each credential's stored entry answers only that credential.
    assert_eq!(text(get_with(proxy.addr, &workspace, &[]).await).await, a);
    assert_eq!(text(get_with(proxy.addr, &release, &[]).await).await, b);
    assert_eq!(upstream.count(), 2);
}

/// Upstream answers whose bodies the test feeds chunk by chunk.
fn streaming_upstream(
    pki: &TestPki,
    length: Option<usize>,
) -> (Upstream, mpsc::Receiver<mpsc::Sender<Bytes>>) {
    let (senders, bodies) = mpsc::channel(16);
    let upstream = Upstream::start(pki, true, move |_| {
        let (tx, body) = channel_body();
        senders.try_send(tx).expect("test reads the senders");
        let mut response = Response::builder();
        if let Some(length) = length {
            response = response.header("content-length", length);
        }
        response.body(body).unwrap()
    });
    (upstream, bodies)
}

#[tokio::test]
async fn a_client_that_leaves_does_not_cancel_the_shared_request() {
    let pki = TestPki::new();
    let (upstream, mut bodies) = streaming_upstream(&pki, Some(8));
    let proxy = start(&upstream.mock, &pki, ROUTES).await;
    let path = "/2.0/repositories/acme/widgets/pullrequests";
    let clients = join_all((0..3).map(|_| get_with(proxy.addr, path, &[])));
    let (mut responses, ()) = tokio::join!(clients, upstream.release_after(1));
    let feed = bodies.recv().await.unwrap();
    feed.send(Bytes::from_static(b"abcd")).await.unwrap();
    let mut leaving = responses.remove(0).into_body();
    let first = leaving.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "abcd");
    drop(leaving);
    tokio::time::sleep(Duration::from_millis(100)).await;
    feed.send(Bytes::from_static(b"efgh")).await.unwrap();
    drop(feed);
    for response in responses {
        assert_eq!(text(response).await, "abcdefgh");
    }
    assert_eq!(upstream.count(), 1);
}

#[tokio::test]
async fn an_upstream_failure_mid_body_aborts_every_sharing_client_and_nothing_is_stored() {
    let pki = TestPki::new();
    for length in [Some(1000), None] {
        let (upstream, mut bodies) = streaming_upstream(&pki, length);
        let proxy = start(&upstream.mock, &pki, ROUTES).await;
        let pinned = format!("/2.0/repositories/acme/widgets/src/{HASH}/big.bin");
        let clients = join_all((0..3).map(|_| get_with(proxy.addr, &pinned, &[])));
        let feeding = async {
            upstream.release_after(1).await;
            let feed = bodies.recv().await.unwrap();
            feed.send(Bytes::from(vec![b'x'; 100])).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            // The mock's connection dies with the body unfinished.
            drop(feed);
            drop(upstream.mock);
        };
        let (responses, ()) = tokio::join!(clients, feeding);
        let mut aborted = 0;
        for response in responses {
            match response.status() {
                // Streamed: the transfer is cut, never completed short.
                StatusCode::OK => {
                    let result = response.into_body().collect().await;
                    assert!(
                        result.is_err(),
                        "{length:?}: a cut body must not look complete"
                    );
                    aborted += 1;
                }
                // A body of unknown length reaches the others only whole: they get the failure.
                status => {
                    assert_eq!(length, None);
                    assert_eq!(status, StatusCode::BAD_GATEWAY);
                }
            }
        }
        let expected = if length.is_some() { 3 } else { 1 };
        assert_eq!(aborted, expected, "{length:?}");
        // Nothing partial was stored: the next request goes upstream (and finds it gone).
        let after = get_with(proxy.addr, &pinned, &[]).await;
        assert_ne!(after.status(), StatusCode::OK, "{length:?}");
    }
}

#[tokio::test]
async fn a_body_over_the_cap_is_not_shared_and_every_client_gets_it_whole() {
    let pki = TestPki::new();
    let (upstream, mut bodies) = streaming_upstream(&pki, None);
    let routes = format!("{ROUTES}\n[cache]\nmax_entry_bytes = 1000\n");
    let proxy = start(&upstream.mock, &pki, &routes).await;
    let path = "/2.0/repositories/acme/widgets/downloads/x";
    let clients = join_all((0..3).map(|_| get_with(proxy.addr, path, &[])));
    let feeding = async {
        upstream.release_after(1).await;
        // The first answer, then those of the waiting requests that went on their own.
        for _ in 0..3 {
            let feed = bodies.recv().await.unwrap();
            tokio::spawn(async move {
                for _ in 0..5 {
                    feed.send(Bytes::from(vec![b'y'; 1000])).await.unwrap();
                }
            });
        }
    };
    let (responses, ()) = tokio::join!(clients, feeding);
    for response in responses {
        assert_eq!(collect_body(response.into_body()).await.len(), 5000);
    }
    assert_eq!(upstream.count(), 3);
}

#[tokio::test]
async fn coalesce_false_sends_every_request() {
    let pki = TestPki::new();
    let upstream = Upstream::start(&pki, true, |_| Response::new(full_body("page")));
    let routes = "[[routes]]\nprefix = \"/2.0/repositories/acme\"\ncredential = \"acme-all\"\ncoalesce = false\n";
    let proxy = start(&upstream.mock, &pki, routes).await;
    let path = "/2.0/repositories/acme/widgets/pullrequests";
    let clients = join_all((0..5).map(|_| get_with(proxy.addr, path, &[])));
    let (responses, ()) = tokio::join!(clients, upstream.release_after(5));
    for response in responses {
        assert_eq!(text(response).await, "page");
    }
    assert_eq!(upstream.count(), 5);
}

#[tokio::test]
async fn stale_if_error_answers_with_the_last_entry_when_bitbucket_refuses() {
    let pki = TestPki::new();
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = served.clone();
    let upstream = Upstream::start(&pki, false, move |_| {
        if counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            return Response::new(full_body("fresh list"));
        }
        Response::builder()
            .status(StatusCode::TOO_MANY_REQUESTS)
            .body(full_body("Rate limit for this resource has been exceeded"))
            .unwrap()
    });
    let routes = "[[routes]]\nprefix = \"/2.0/repositories/acme\"\ncredential = \"acme-all\"\ncache = { max_age = \"1s\", stale_if_error = \"1m\" }\n\n[[routes]]\nprefix = \"/plain\"\nupstream_prefix = \"/2.0/repositories/acme\"\ncredential = \"acme-all\"\ncache = { max_age = \"1s\" }\n";
    let proxy = start(&upstream.mock, &pki, routes).await;
    let path = "/2.0/repositories/acme/widgets/pullrequests";
    assert_eq!(
        text(get_with(proxy.addr, path, &[]).await).await,
        "fresh list"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stale = get_with(proxy.addr, path, &[]).await;
    assert_eq!(stale.status(), StatusCode::OK);
    assert_eq!(
        header(&stale, "cache-status"),
        "bitbucket-auth-proxy; fwd=stale; fwd-status=429"
    );
    assert!(header(&stale, "age").parse::<u64>().unwrap() >= 1);
    assert_eq!(text(stale).await, "fresh list");
    // That 429 started the credential's cool-down: the next request is not sent, and the
    // route's stale entry answers it.
    let during = get_with(proxy.addr, path, &[]).await;
    assert_eq!(during.status(), StatusCode::OK);
    assert_eq!(
        header(&during, "cache-status"),
        "bitbucket-auth-proxy; fwd=stale"
    );
    assert_eq!(text(during).await, "fresh list");
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 2);
    // Without stale_if_error the route passes the 429 on.
    let refused = get_with(proxy.addr, "/plain/widgets/pullrequests", &[]).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn a_cache_full_of_large_bodies_stays_within_max_bytes() {
    let pki = TestPki::new();
    let upstream = Upstream::start(&pki, false, |_| {
        Response::new(full_body(vec![b'z'; 50_000]))
    });
    let routes = format!("{ROUTES}\n[cache]\nmax_bytes = 200000\nmax_entry_bytes = 60000\n");
    let proxy = start(&upstream.mock, &pki, &routes).await;
    let metrics_value = |text: &str, name: &str| -> u64 {
        text.lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    for n in 0..20 {
        let path = format!("/2.0/repositories/acme/widgets/src/{HASH}/file{n}");
        assert_eq!(
            collect_body(get_with(proxy.addr, &path, &[]).await.into_body())
                .await
                .len(),
            50_000
        );
        let metrics = text(get_with(proxy.addr, "/-/metrics", &[]).await).await;
        let bytes = metrics_value(&metrics, "bitbucket_auth_proxy_cache_bytes ");
        assert!(bytes <= 200_000, "{bytes} bytes held after {n} files");
        assert!(bytes > 0);
    }
    // The most recent file is still there; the first was evicted.
    let count = upstream.count();
    text(
        get_with(
            proxy.addr,
            &format!("/2.0/repositories/acme/widgets/src/{HASH}/file19"),
            &[],
        )
        .await,
    )
    .await;
    assert_eq!(upstream.count(), count);
    text(
        get_with(
            proxy.addr,
            &format!("/2.0/repositories/acme/widgets/src/{HASH}/file0"),
            &[],
        )
        .await,
    )
    .await;
    assert_eq!(upstream.count(), count + 1);
}

/// A proxy whose `acme-all` credential may send `per_hour` requests (all at once), with a
/// microcached route that may serve stale answers and one that may not.
async fn start_budgeted(
    upstream: &Upstream,
    pki: &TestPki,
    per_hour: u32,
) -> bitbucket_auth_proxy::RunningProxy {
    let text_config = format!(
        r#"
[server]
listen = ["127.0.0.1:0"]

[upstream]
api_url = "{base}"
ca_file = "{ca}"

[credentials.acme-all]
kind = "workspace_access_token"
workspace = "acme"
token = {{ value = "t" }}
rate_limit = {{ per_hour = {per_hour}, burst = {per_hour} }}

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "acme-all"
cache = {{ max_age = "1s", stale_if_error = "1m" }}

[[routes]]
prefix = "/strict"
upstream_prefix = "/2.0/repositories/acme"
credential = "acme-all"
cache = {{ max_age = "1s" }}
"#,
        base = upstream.mock.base_url(),
        ca = pki.ca_path().display(),
    );
    let config =
        bitbucket_auth_proxy::Config::from_toml(std::path::Path::new("c.toml"), &text_config)
            .expect("valid config");
    bitbucket_auth_proxy::start(config).await.expect("starts")
}

#[tokio::test]
async fn the_rate_limit_refusal_is_answered_from_the_cache_fresh_or_stale() {
    let pki = TestPki::new();
    let upstream = Upstream::start(&pki, false, |_| Response::new(full_body("list")));
    let proxy = start_budgeted(&upstream, &pki, 1).await;
    let addr = proxy.local_addrs()[0];
    let path = "/2.0/repositories/acme/widgets/pullrequests";
    assert_eq!(text(get_with(addr, path, &[]).await).await, "list");
    // The budget is spent, but a fresh entry costs none.
    let fresh = get_with(addr, path, &[]).await;
    assert_eq!(fresh.status(), StatusCode::OK);
    assert!(header(&fresh, "cache-status").contains("; hit"));
    text(fresh).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stale = get_with(addr, path, &[]).await;
    assert_eq!(stale.status(), StatusCode::OK);
    assert_eq!(
        header(&stale, "cache-status"),
        "bitbucket-auth-proxy; fwd=stale"
    );
    assert_eq!(text(stale).await, "list");
    // A route without stale_if_error gets the refusal.
    let refused = get_with(addr, "/strict/widgets/pullrequests", &[]).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(upstream.count(), 1);
}

/// A request answered from the cache never reached Bitbucket: the budget `govern` took for it
/// is given back, so it does not crowd out a request that must go upstream.
#[tokio::test]
async fn a_cache_hit_gives_back_the_budget_it_was_counted_against() {
    let pki = TestPki::new();
    let upstream = Upstream::start(&pki, false, |_| Response::new(full_body("list")));
    let proxy = start_budgeted(&upstream, &pki, 2).await;
    let addr = proxy.local_addrs()[0];
    let first = "/2.0/repositories/acme/widgets/pullrequests";
    assert_eq!(text(get_with(addr, first, &[]).await).await, "list");
    for _ in 0..3 {
        let hit = get_with(addr, first, &[]).await;
        assert!(header(&hit, "cache-status").contains("; hit"));
        text(hit).await;
    }
    let second = get_with(addr, "/2.0/repositories/acme/gadgets/pullrequests", &[]).await;
    assert_eq!(second.status(), StatusCode::OK, "the hits spent the budget");
    text(second).await;
    let third = get_with(addr, "/2.0/repositories/acme/sprockets/pullrequests", &[]).await;
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(upstream.count(), 2);
}

#[test]
fn cache_settings_are_validated_with_their_keys() {
    let text = r#"
[credentials.acme-all]
kind = "workspace_access_token"
workspace = "acme"
token = { value = "t" }

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "acme-all"
cache = { stale_if_error = "5m", max_age = "soon" }

[cache]
max_bytes = 1000
max_entry_bytes = 2000
"#;
    let error = bitbucket_auth_proxy::Config::from_toml(std::path::Path::new("c.toml"), text)
        .expect_err("invalid")
        .to_string();
    for expected in [
        "routes[0].cache.max_age: `soon` is not a positive duration",
        "cache.max_entry_bytes: 2000 is larger than cache.max_bytes (1000)",
    ] {
        assert!(error.contains(expected), "{error}");
    }
    let unknown = "[[routes]]\nprefix = \"/x\"\ncredential = \"c\"\ncache = { ttl = \"5s\" }\n";
    let error = bitbucket_auth_proxy::Config::from_toml(std::path::Path::new("c.toml"), unknown)
        .expect_err("unknown key")
        .to_string();
    assert!(error.contains("ttl"), "{error}");
}
