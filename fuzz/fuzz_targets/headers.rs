//! The header parsers: `grpc-timeout`, `x-breakwater-deadline-ms`,
//! `Retry-After` and the rate-limit reset family, `grpc-status`. Any bytes
//! give an answer, never a panic.
#![no_main]

use std::time::{Duration, SystemTime};

use breakwater::resilience::{classify, deadline, retry::pushback};
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 10] = [
    "grpc-timeout",
    "x-breakwater-deadline-ms",
    "retry-after",
    "retry-after-ms",
    "grpc-retry-pushback-ms",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "ratelimit-reset",
    "anthropic-ratelimit-requests-reset",
    "grpc-status",
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, value)) = data.split_first() else {
        return;
    };
    let Ok(value) = HeaderValue::from_bytes(value) else {
        return;
    };
    let name = HeaderName::from_static(NAMES[usize::from(selector) % NAMES.len()]);
    let mut headers = HeaderMap::new();
    headers.insert(name, value.clone());
    let _ = deadline::caller_timeout(&headers, true);
    let _ = deadline::caller_timeout(&headers, false);
    if let Ok(text) = value.to_str() {
        if let Some(left) = deadline::parse_grpc_timeout(text) {
            // What is parsed encodes again.
            let _ = deadline::encode_grpc_timeout(left.min(Duration::from_secs(1 << 30)));
        }
        let _ = pushback::parse_go_duration(text);
    }
    let _ = pushback::parse(
        &headers,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    );
    let _ = classify::grpc_status(&headers);
});
