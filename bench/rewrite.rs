//! What link rewriting costs: throughput of a 1 MiB Bitbucket-style JSON page (paginated, every
//! value full of `links.*.href`) through the proxy with `rewrite_links` on and off.
//!
//! Run: `cargo bench --bench rewrite` (release build; `-- --rewriter-only` for the rewriter alone). Everything is in one process on
//! loopback: an upstream, the proxy with two routes to it (rewriting on and off), and a client.
//! Two upstreams are measured: TLS with h2 offered, as Bitbucket is, and plain HTTP, where
//! nothing hides the rewriting cost. Modes are interleaved A B A B … so drift on a shared
//! machine hits both.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Response, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

const PAGE_BYTES: usize = 1024 * 1024;
const ROUND: Duration = Duration::from_secs(3);
const ROUNDS: usize = 4;
const CONCURRENCY: usize = 4;

/// A page shaped like `GET /2.0/repositories/{ws}/{repo}/pullrequests`: about 1 MiB.
fn page(origin: &str) -> Bytes {
    let mut values = Vec::new();
    let mut size = 0;
    let mut id = 1;
    while size < PAGE_BYTES - 2048 {
        let base = format!("{origin}/2.0/repositories/acme/widgets/pullrequests/{id}");
        let value = format!(
            r#"{{"id":{id},"title":"Change number {id} with a reasonably long title","state":"OPEN","author":{{"display_name":"Dev {id}","links":{{"self":{{"href":"{origin}/2.0/users/%7B{id:08x}-1111-2222-3333-444455556666%7D"}},"avatar":{{"href":"https://secure.gravatar.com/avatar/{id:032x}?d=retro"}},"html":{{"href":"https://bitbucket.org/%7B{id:08x}%7D/"}}}}}},"links":{{"self":{{"href":"{base}"}},"html":{{"href":"https://bitbucket.org/acme/widgets/pull-requests/{id}"}},"commits":{{"href":"{base}/commits"}},"approve":{{"href":"{base}/approve"}},"diff":{{"href":"{origin}/2.0/repositories/acme/widgets/diff/acme/widgets:abc{id}%0Ddef{id}?from_pullrequest_id={id}"}},"diffstat":{{"href":"{origin}/2.0/repositories/acme/widgets/diffstat/acme/widgets:abc{id}%0Ddef{id}?from_pullrequest_id={id}"}},"comments":{{"href":"{base}/comments"}},"activity":{{"href":"{base}/activity"}},"statuses":{{"href":"{base}/statuses"}}}},"summary":{{"raw":"Fixes a thing.","markup":"markdown","html":"<p>Fixes a thing.</p>"}}}}"#
        );
        size += value.len() + 1;
        values.push(value);
        id += 1;
    }
    Bytes::from(format!(
        r#"{{"pagelen":{},"page":1,"size":100000,"next":"{origin}/2.0/repositories/acme/widgets/pullrequests?page=2","values":[{}]}}"#,
        values.len(),
        values.join(",")
    ))
}

#[path = "../tests/support/mod.rs"]
mod support;

/// The page server: TLS (the test CA, ALPN h2 + http/1.1) or plain HTTP.
fn upstream(pki: Option<&support::TestPki>) -> support::MockUpstream {
    let origin = std::sync::Arc::new(std::sync::OnceLock::<Bytes>::new());
    let page_for_handler = origin.clone();
    let handler = move |_: &support::RecordedRequestHead| {
        Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(
                page_for_handler.get().expect("page built").clone(),
            ))
            .unwrap()
    };
    let mock = match pki {
        Some(pki) => support::MockUpstream::start_simple(pki.server_config(), handler),
        None => support::MockUpstream::start_plain_simple(handler),
    };
    let _ = origin.set(page(&mock.base_url()));
    mock
}

/// Fetches `path` from `CONCURRENCY` workers for `ROUND`; returns bytes per second.
async fn measure(
    client: &Client<HttpConnector, Empty<Bytes>>,
    proxy: SocketAddr,
    path: &str,
) -> f64 {
    let deadline = Instant::now() + ROUND;
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let client = client.clone();
        let uri: http::Uri = format!("http://{proxy}{path}").parse().unwrap();
        workers.spawn(async move {
            let mut bytes = 0u64;
            while Instant::now() < deadline {
                let response = client.get(uri.clone()).await.expect("proxy answers");
                assert!(response.status().is_success());
                bytes += response
                    .into_body()
                    .collect()
                    .await
                    .unwrap()
                    .to_bytes()
                    .len() as u64;
            }
            bytes
        });
    }
    let mut total = 0;
    while let Some(bytes) = workers.join_next().await {
        total += bytes.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}

fn config_text(upstream: &support::MockUpstream, pki: Option<&support::TestPki>) -> String {
    let ca = pki.map_or(String::new(), |pki| {
        format!("ca_file = \"{}\"", pki.ca_path().display())
    });
    format!(
        r#"
[server]
listen = ["127.0.0.1:0"]

[upstream]
api_url = "{base}"
{ca}

[credentials.acme-all]
kind = "workspace_access_token"
workspace = "acme"
token = {{ value = "bench-token" }}

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "acme-all"

[[routes]]
prefix = "/raw"
upstream_prefix = "/2.0/repositories/acme"
credential = "acme-all"
rewrite_links = false
"#,
        base = upstream.base_url()
    )
}

/// The rewriter alone, on the page in 16 KiB chunks: its ceiling, without the network.
fn rewriter_alone(config: bitbucket_auth_proxy::Config, body: &Bytes) {
    let mut rewriter = bitbucket_auth_proxy::rewrite::LinkRewriter::for_route(
        std::sync::Arc::new(config),
        "/2.0/repositories/acme",
        "http://127.0.0.1:8080",
    )
    .expect("route exists");
    let started = Instant::now();
    let (mut rewritten, mut passes) = (0usize, 0usize);
    while started.elapsed() < ROUND {
        for chunk in body.chunks(16 * 1024) {
            rewritten += rewriter.process(chunk, false).len();
        }
        rewritten += rewriter.process(&[], true).len();
        passes += 1;
    }
    println!(
        "rewriter alone: {:8.1} MiB/s over {passes} passes (output {} KiB per page)",
        (body.len() * passes) as f64 / 1048576.0 / started.elapsed().as_secs_f64(),
        rewritten / passes / 1024
    );
}

/// Rewriting on vs off through the proxy, interleaved; prints one line per mode.
async fn compare(label: &str, upstream: &support::MockUpstream, pki: Option<&support::TestPki>) {
    let text = config_text(upstream, pki);
    let config = bitbucket_auth_proxy::Config::from_toml(Path::new("bench.toml"), &text).unwrap();
    let proxy = bitbucket_auth_proxy::start(config).await.unwrap();
    let proxy_addr = proxy.local_addrs()[0];
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let on_path = "/2.0/repositories/acme/widgets/pullrequests";
    let off_path = "/raw/widgets/pullrequests";
    // Warm up pools and caches.
    let _ = measure(&client, proxy_addr, on_path).await;
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        off.push(measure(&client, proxy_addr, off_path).await);
        on.push(measure(&client, proxy_addr, on_path).await);
    }
    let mib = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64 / 1048576.0;
    let rounds = |v: &[f64]| {
        v.iter()
            .map(|v| (v / 1048576.0).round())
            .collect::<Vec<_>>()
    };
    let (on_mib, off_mib) = (mib(&on), mib(&off));
    println!(
        "{label}: rewrite_links = false {off_mib:8.1} MiB/s  rounds {:?}",
        rounds(&off)
    );
    println!(
        "{label}: rewrite_links = true  {on_mib:8.1} MiB/s  rounds {:?}",
        rounds(&on)
    );
    println!(
        "{label}: cost of rewriting {:.1} % of throughput",
        (1.0 - on_mib / off_mib) * 100.0
    );
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::main]
async fn main() {
    let pki = support::TestPki::new();
    let tls = upstream(Some(&pki));
    let plain = upstream(None);
    let page_len = page(&tls.base_url()).len();
    println!(
        "page: {} KiB JSON, concurrency {CONCURRENCY}, {ROUNDS} interleaved rounds of {ROUND:?} per mode",
        page_len / 1024
    );
    let text = config_text(&plain, None);
    rewriter_alone(
        bitbucket_auth_proxy::Config::from_toml(Path::new("bench.toml"), &text).unwrap(),
        &page(&plain.base_url()),
    );
    // `-- --rewriter-only` stops here: a quick loop while tuning the rewriter.
    if std::env::args().any(|arg| arg == "--rewriter-only") {
        return;
    }
    compare("TLS upstream (h2)", &tls, Some(&pki)).await;
    compare("plain upstream  ", &plain, None).await;
}
