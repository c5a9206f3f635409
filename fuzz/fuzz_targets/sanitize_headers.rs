//! The header invariant on arbitrary request heads: after `headers::sanitize_request`, no
//! hop-by-hop header, nothing named by `Connection`, no client credential, `Host`, `Expect` or
//! forwarding header survives, and every other header is untouched.
//! See `bitbucket_auth_proxy::routing::invariant::check_sanitized_request`.
#![no_main]

use bitbucket_auth_proxy::base::headers::sanitize_request;
use bitbucket_auth_proxy::routing::invariant::check_sanitized_request;
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // One `name:value` per line, as a request head would carry them; lines that hyper would not
    // accept as a header (bad name or value bytes) are skipped, as hyper would refuse them.
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    let before = headers.clone();
    sanitize_request(&mut headers);
    if let Err(violation) = check_sanitized_request(&before, &headers) {
        panic!("header invariant broken: {violation}");
    }
});
