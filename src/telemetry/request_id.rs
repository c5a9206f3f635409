//! Request ids: the `X-Request-Id` a request carries through the proxy (taken from the client
//! when valid, made here otherwise), and the upstream's own id for the same exchange.
//!
//! Owns the header names and the id format; the access log (`crate::telemetry::logging`) applies them,
//! and the forwarding phase (`crate::proxy`) reports what the upstream answered in an
//! [`UpstreamExchange`].

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use crate::base::headers::first_values;

/// Taken from the client, sent upstream, returned to the client.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The upstream's own ids, first found wins: Bitbucket Cloud answers through envoy with
/// `X-B3-TraceId`; Atlassian's edge adds `Atl-Traceid`. Either is what Atlassian support can
/// look a request up by.
const UPSTREAM_ID_HEADERS: [&str; 2] = ["atl-traceid", "x-b3-traceid"];

/// The longest incoming id accepted.
pub const MAX_LEN: usize = 128;

/// 1 to 128 of `A-Z a-z 0-9 . _ : -`: enough for UUIDs, ULIDs and the ids of common tracers
/// and load balancers, and nothing that could forge a log field or split a log line.
pub fn is_valid(id: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&id.len())
        && id
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The client's id when it sent exactly one valid one, else a new id.
pub fn take_or_make(headers: &HeaderMap) -> HeaderValue {
    let mut sent = headers.get_all(&REQUEST_ID_HEADER).iter();
    match (sent.next(), sent.next()) {
        (Some(id), None) if is_valid(id.as_bytes()) => id.clone(),
        _ => next_id(),
    }
}

/// The id as it goes upstream: marked sensitive, which only HPACK heeds. An h2 connection's
/// header table is for values that repeat; an id never does, so indexing it would push out the
/// entries that do, and h2's encoder would compare each new id with every one still in the
/// table (0.2 µs of CPU per request at 64 concurrent requests, measured with `perf`).
pub fn for_upstream(id: &HeaderValue) -> HeaderValue {
    let mut id = id.clone();
    id.set_sensitive(true);
    id
}

/// `<12 hex digits chosen at start-up>-<counter>`: unique within the process by the counter
/// and, with 48 random bits, across restarts and replicas in practice.
pub fn next_id() -> HeaderValue {
    static PREFIX: OnceLock<String> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let prefix = PREFIX.get_or_init(random_prefix).as_bytes();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut id = IdBytes {
        bytes: [0; ID_CAPACITY],
        len: prefix.len() + 1,
    };
    id.bytes[..prefix.len()].copy_from_slice(prefix);
    id.bytes[prefix.len()] = b'-';
    id.len += write_decimal(n, &mut id.bytes[id.len..]);
    HeaderValue::from_maybe_shared(Bytes::from_owner(id))
        .expect("hex digits, '-' and digits are valid")
}

/// Writes `n` in decimal at the start of `out` (room for 20 digits) and returns how many
/// digits it took: by hand, as `write!` goes through the formatting machinery for every id.
fn write_decimal(mut n: u64, out: &mut [u8]) -> usize {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let len = digits.len() - start;
    out[..len].copy_from_slice(&digits[start..]);
    len
}

/// 12 hex digits, `-`, and at most the 20 digits of a `u64`.
const ID_CAPACITY: usize = 12 + 1 + 20;

/// A new id's bytes, kept in place by [`Bytes::from_owner`]: one allocation per id, and the
/// clones on the upstream request, in the log record and on the response only count references.
struct IdBytes {
    bytes: [u8; ID_CAPACITY],
    len: usize,
}

impl AsRef<[u8]> for IdBytes {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// 48 bits from the OS-seeded keys of std's `RandomState`, mixed with the pid and the clock.
fn random_prefix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    hasher.write_u128(now.as_nanos());
    format!("{:012x}", hasher.finish() & 0xffff_ffff_ffff)
}

/// What the upstream's answer told about the exchange, left in the response's extensions for
/// the access log.
#[derive(Debug, Clone)]
pub struct UpstreamExchange {
    pub status: StatusCode,
    /// From sending the request until the response head arrived (including one renewal of an
    /// OAuth token and its resend).
    pub head_after: Duration,
    /// The upstream's own request id, when it sent one.
    pub request_id: Option<HeaderValue>,
}

impl UpstreamExchange {
    pub fn of<B>(response: &Response<B>, head_after: Duration) -> Self {
        let headers = response.headers();
        UpstreamExchange {
            status: response.status(),
            head_after,
            request_id: first_values(headers, UPSTREAM_ID_HEADERS)
                .into_iter()
                .flatten()
                .next()
                .filter(|id| is_valid(id.as_bytes()))
                .cloned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_written_in_decimal() {
        for n in [0, 7, 10, 1234567890, u64::MAX] {
            let mut out = [0u8; 20];
            let len = write_decimal(n, &mut out);
            assert_eq!(std::str::from_utf8(&out[..len]).unwrap(), n.to_string());
        }
    }

    #[test]
    fn valid_ids_are_short_and_plain() {
        for id in [
            "a",
            "0b7c1f5e-3d2a-4c4e-9a55-6f2d8e1b7c90",
            "01HZX3K4M5N6P7Q8R9S0T1V2W3",
            "1-67891233-abcdef012345678912345678",
            "trace.id_42",
        ] {
            assert!(is_valid(id.as_bytes()), "{id}");
        }
        let too_long = "a".repeat(MAX_LEN + 1);
        for id in [
            "",
            "has space",
            "new\nline",
            "quote\"",
            "a,b",
            "k=v",
            "ü",
            &too_long,
        ] {
            assert!(!is_valid(id.as_bytes()), "{id:?}");
        }
        assert!(is_valid("a".repeat(MAX_LEN).as_bytes()));
    }

    #[test]
    fn one_valid_incoming_id_is_kept_and_anything_else_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert(&REQUEST_ID_HEADER, HeaderValue::from_static("ci-job-42"));
        assert_eq!(take_or_make(&headers), "ci-job-42");

        headers.append(&REQUEST_ID_HEADER, HeaderValue::from_static("ci-job-43"));
        let made = take_or_make(&headers);
        assert!(made != "ci-job-42" && made != "ci-job-43", "{made:?}");

        headers.insert(&REQUEST_ID_HEADER, HeaderValue::from_static("bad id"));
        assert!(is_valid(take_or_make(&headers).as_bytes()));
        assert!(is_valid(take_or_make(&HeaderMap::new()).as_bytes()));
    }

    #[test]
    fn made_ids_share_the_process_prefix_and_never_repeat() {
        let ids: Vec<HeaderValue> = (0..1000).map(|_| next_id()).collect();
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        let prefix = |id: &HeaderValue| id.to_str().unwrap().split('-').next().unwrap().to_owned();
        assert_eq!(prefix(&ids[0]).len(), 12);
        assert!(ids.iter().all(|id| prefix(id) == prefix(&ids[0])));
        assert!(ids.iter().all(|id| is_valid(id.as_bytes())));
        let counter = |id: &HeaderValue| id.to_str().unwrap()[13..].parse::<u64>().unwrap();
        assert!(ids.windows(2).all(|w| counter(&w[1]) > counter(&w[0])));
    }

    #[test]
    fn the_id_goes_upstream_unchanged_but_kept_out_of_the_hpack_table() {
        let id = next_id();
        let upstream = for_upstream(&id);
        assert_eq!(upstream, id);
        assert!(upstream.is_sensitive());
        assert!(
            !id.is_sensitive(),
            "the logged and returned id is not marked"
        );
    }

    #[test]
    fn the_upstream_id_is_read_from_the_known_headers() {
        let response = Response::builder()
            .status(502)
            .header("x-b3-traceid", "c5cd43f1db956227")
            .body(())
            .unwrap();
        let exchange = UpstreamExchange::of(&response, Duration::from_millis(3));
        assert_eq!(exchange.status, 502);
        assert_eq!(exchange.request_id.unwrap(), "c5cd43f1db956227");

        let response = Response::builder()
            .header("atl-traceid", "d99ae7c156c84ec3")
            .header("x-b3-traceid", "c5cd43f1db956227")
            .body(())
            .unwrap();
        let exchange = UpstreamExchange::of(&response, Duration::ZERO);
        assert_eq!(exchange.request_id.unwrap(), "d99ae7c156c84ec3");

        let response = Response::builder()
            .header("x-b3-traceid", "not valid")
            .body(())
            .unwrap();
        assert!(
            UpstreamExchange::of(&response, Duration::ZERO)
                .request_id
                .is_none()
        );
    }
}
