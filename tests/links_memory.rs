//! Issue 3: a 256 MiB JSON body is rewritten as it streams, with flat memory. In its own test
//! binary so the process's resident set measures this transfer alone.

mod support;

use std::path::Path;
use std::time::Duration;

use bitbucket_auth_proxy::Config;
use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::BodyExt;
use support::*;

const TOTAL: u64 = 256 * 1024 * 1024;
/// A budget for everything the transfer may add to the process: buffers of the mock, the proxy
/// and the client, allocator slack. The body is 256 MiB; collecting any of it would blow this.
const RSS_BUDGET: u64 = 48 * 1024 * 1024;

fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_json_body_is_rewritten_with_flat_memory() {
    let pki = TestPki::new();
    let origin = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
    let origin_for_handler = origin.clone();
    let upstream = MockUpstream::start(pki.server_config(), move |_, _| {
        let origin = origin_for_handler.get().unwrap().clone();
        async move {
            let item = format!(
                r#"{{"href":"{origin}/2.0/repositories/acme/widgets/commits/0123456789abcdef"}},"#
            );
            let per_block = (64 * 1024) / item.len();
            let block = Bytes::from(item.repeat(per_block));
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                let mut sent = 0u64;
                let _ = tx.send(Bytes::from_static(b"[")).await;
                while sent + (block.len() as u64) <= TOTAL {
                    if tx.send(block.clone()).await.is_err() {
                        return;
                    }
                    sent += block.len() as u64;
                }
                let _ = tx.send(Bytes::from_static(b"{}]")).await;
            });
            Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(body)
                .unwrap()
        }
    });
    let upstream_origin = upstream.base_url();
    origin.set(upstream_origin.clone()).unwrap();
    let text = format!(
        r#"
[server]
listen = ["127.0.0.1:0"]

[upstream]
api_url = "{upstream_origin}"
ca_file = "{ca}"

[credentials.acme-all]
kind = "workspace_access_token"
workspace = "acme"
token = {{ value = "t" }}

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "acme-all"
"#,
        ca = pki.ca_path().display(),
    );
    let proxy = bitbucket_auth_proxy::start(Config::from_toml(Path::new("m.toml"), &text).unwrap())
        .await
        .unwrap();
    let addr = proxy.local_addrs()[0];
    let proxy_origin = format!("http://{addr}");

    let item_len = format!(
        r#"{{"href":"{upstream_origin}/2.0/repositories/acme/widgets/commits/0123456789abcdef"}},"#
    )
    .len();
    let per_block = (64 * 1024) / item_len;
    let items = (TOTAL / (per_block * item_len) as u64) * per_block as u64;
    let growth_per_item = proxy_origin.len() as i64 - upstream_origin.len() as i64;
    let expected_len = (items as i64 * (item_len as i64 + growth_per_item)) as u64 + 1 + 3;

    let baseline = resident_bytes();
    let response = get(addr, "/2.0/repositories/acme/widgets/commits").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().get(header::CONTENT_LENGTH).is_none());
    let mut body = response.into_body();
    let mut received = 0u64;
    let mut peak = baseline;
    let mut first = Vec::new();
    let mut frames = 0u64;
    let started = std::time::Instant::now();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("the stream completes cleanly");
        if let Some(data) = frame.data_ref() {
            if first.len() < 200 {
                first.extend_from_slice(&data[..data.len().min(200 - first.len())]);
            }
            received += data.len() as u64;
            frames += 1;
            if frames.is_multiple_of(256) {
                peak = peak.max(resident_bytes());
            }
        }
    }
    peak = peak.max(resident_bytes());
    let elapsed = started.elapsed();
    let first = String::from_utf8_lossy(&first);
    assert!(
        first.starts_with(&format!(
            r#"[{{"href":"{proxy_origin}/2.0/repositories/acme/widgets/commits/"#
        )),
        "{first}"
    );
    // Every link grew by the same amount: the exact length proves each one was rewritten.
    assert_eq!(received, expected_len, "{items} items");
    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "256 MiB rewritten in {elapsed:?} ({:.0} MiB/s); RSS baseline {} MiB, peak {} MiB",
        TOTAL as f64 / 1048576.0 / elapsed.as_secs_f64(),
        baseline / 1048576,
        peak / 1048576
    );
    assert!(
        growth < RSS_BUDGET,
        "resident set grew by {} MiB",
        growth / 1048576
    );
    proxy.shutdown(Duration::from_secs(1)).await;
}
