//! The h2 lane (`src/upstream/lane.rs`, issue 18): requests to an origin that speaks h2 share
//! one connection the proxy drives itself, a connection the upstream closed is replaced for the
//! next request, and an origin that chooses HTTP/1.1 goes to the pool without a wasted
//! handshake. `keep_warm` is off here, so every connection the mock counts was opened for a
//! request.

mod support;

use std::time::Duration;

use support::numbering::{self, NumberingUpstream};
use support::proxy::*;
use support::*;

const PATH: &str = "/2.0/repositories/acme/widgets";

async fn proxy_to(upstream: &NumberingUpstream, pki: &TestPki) -> TestProxy {
    Setup::new(&upstream.raw.base_url(), pki.ca_path())
        .start()
        .await
}

async fn served_on(proxy: &TestProxy, requests: usize) -> Vec<String> {
    numbering::served_on(proxy.addr, PATH, requests).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_to_an_h2_origin_share_one_connection() {
    let pki = TestPki::new();
    let upstream = NumberingUpstream::start(&pki, ALPN_H2_H1, Duration::from_secs(60));
    let proxy = proxy_to(&upstream, &pki).await;
    // The first burst arrives before any connection exists: one request opens it, the others
    // wait for it rather than each opening their own.
    let first = served_on(&proxy, 20).await;
    let later = served_on(&proxy, 20).await;
    assert!(
        first.iter().chain(&later).all(|number| number == "1"),
        "{first:?} {later:?}"
    );
    assert_eq!(upstream.raw.connection_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_upstream_closed_is_replaced_for_the_next_request() {
    let pki = TestPki::new();
    let lifetime = Duration::from_millis(400);
    let upstream = NumberingUpstream::start(&pki, ALPN_H2_H1, lifetime);
    let proxy = proxy_to(&upstream, &pki).await;
    assert_eq!(served_on(&proxy, 3).await, ["1", "1", "1"]);
    tokio::time::sleep(lifetime + Duration::from_millis(300)).await;
    // No 502 for landing on the closed connection: the next request opens a new one.
    assert_eq!(served_on(&proxy, 3).await, ["2", "2", "2"]);
    tokio::time::sleep(lifetime + Duration::from_millis(300)).await;
    assert_eq!(served_on(&proxy, 1).await, ["3"]);
    assert_eq!(upstream.raw.connection_count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_chooses_http1_is_pooled_on_the_connection_the_lane_opened() {
    let pki = TestPki::new();
    let upstream = NumberingUpstream::start(&pki, ALPN_H1, Duration::from_secs(60));
    let proxy = proxy_to(&upstream, &pki).await;
    // One at a time: HTTP/1.1 carries one request per connection at once, so sequential
    // requests reuse the pooled connection, which is the one the lane opened and gave back.
    for _ in 0..3 {
        assert_eq!(served_on(&proxy, 1).await, ["1"]);
    }
    assert_eq!(upstream.raw.connection_count(), 1);
}
