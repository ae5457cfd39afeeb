//! Deadlines: the call's overall timeout, and how it crosses agent hops.
//!
//! The effective deadline is the sooner of the policy's `timeout` and the
//! caller's own: `grpc-timeout` for gRPC, `x-breakwater-deadline-ms`
//! (milliseconds left) for HTTP. It bounds every attempt and backoff until
//! the answer starts; when it passes first, the caller gets 504 /
//! `DEADLINE_EXCEEDED` with `x-breakwater-error: deadline-exceeded`.
//!
//! Each attempt writes the time left into its headers ([`set_header`]), so the next agent's sidecar, or a gRPC server, honours it. A
//! deadline set by a user at the edge of a workflow therefore holds across
//! every agent the call passes through.

use std::time::Duration;

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue};
use tokio::time::Instant;

/// The HTTP header that carries the milliseconds left to a call.
pub const DEADLINE_HEADER: HeaderName = HeaderName::from_static("x-breakwater-deadline-ms");
/// The gRPC deadline header.
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// A call's deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    /// When the call must have its answer.
    pub at: Instant,
    /// The time the call had when it arrived.
    pub budget: Duration,
    /// Whose deadline it is: `policy` or `caller`.
    pub by: &'static str,
}

impl Deadline {
    /// The time left, zero once passed.
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }
}

/// The caller's own deadline, from `grpc-timeout` (gRPC) or
/// `x-breakwater-deadline-ms` (HTTP). Malformed values are ignored.
pub fn caller_timeout(headers: &HeaderMap, grpc: bool) -> Option<Duration> {
    if grpc {
        let value = headers.get(GRPC_TIMEOUT)?.to_str().ok()?;
        return parse_grpc_timeout(value);
    }
    let ms = headers.get(DEADLINE_HEADER)?.to_str().ok()?;
    ms.trim().parse::<u64>().ok().map(Duration::from_millis)
}

/// Parses a gRPC `grpc-timeout` value: up to 8 digits and a unit (`H`
/// hours, `M` minutes, `S` seconds, `m` milliseconds, `u`
/// microseconds, `n` nanoseconds).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Encodes a `grpc-timeout` value, rounding down to the finest unit that
/// fits in 8 digits, so the upstream never gets more time than is left.
pub fn encode_grpc_timeout(left: Duration) -> HeaderValue {
    const MAX: u64 = 99_999_999;
    let nanos = u64::try_from(left.as_nanos()).unwrap_or(u64::MAX);
    let (n, unit) = [
        (nanos, b'n'),
        (nanos / 1_000, b'u'),
        (nanos / 1_000_000, b'm'),
        (left.as_secs(), b'S'),
        (left.as_secs() / 60, b'M'),
        (left.as_secs() / 3600, b'H'),
    ]
    .into_iter()
    .find(|(n, _)| *n <= MAX)
    .unwrap_or((MAX, b'H'));
    deadline_value(n, unit)
}

/// A deadline header value: digits and an optional unit, marked sensitive
/// so that HPACK never indexes it. Every request carries a different
/// value; indexing them would only churn the connection's header table and
/// evict the entries that do repeat.
fn deadline_value(mut n: u64, unit: u8) -> HeaderValue {
    let mut buf = [0u8; 24];
    let mut at = buf.len();
    if unit != 0 {
        at -= 1;
        buf[at] = unit;
    }
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut value =
        HeaderValue::from_bytes(&buf[at..]).expect("digits and a unit are a valid header value");
    value.set_sensitive(true);
    value
}

/// Tells the upstream how long it has: `grpc-timeout` for gRPC calls,
/// `x-breakwater-deadline-ms` otherwise, replacing what the caller sent.
pub fn set_header(headers: &mut HeaderMap, left: Duration, grpc: bool) {
    if grpc {
        headers.insert(GRPC_TIMEOUT, encode_grpc_timeout(left));
    } else {
        headers.insert(DEADLINE_HEADER, encode_deadline_ms(left));
    }
}

/// Encodes `x-breakwater-deadline-ms`.
pub fn encode_deadline_ms(left: Duration) -> HeaderValue {
    deadline_value(u64::try_from(left.as_millis()).unwrap_or(u64::MAX), 0)
}

/// The call's deadline: the sooner of the policy's timeout and the
/// caller's own, from the request's headers.
pub fn start(policy: Duration, headers: &HeaderMap, grpc: bool) -> Deadline {
    effective(policy, caller_timeout(headers, grpc))
}

/// The sooner of the policy's timeout and the caller's.
fn effective(policy: Duration, caller: Option<Duration>) -> Deadline {
    let (budget, by) = match caller {
        Some(caller) if caller < policy => (caller, "caller"),
        _ => (policy, "policy"),
    };
    Deadline {
        at: Instant::now() + budget,
        budget,
        by,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_round_trip() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse_grpc_timeout("123456789m"), None, "at most 8 digits");
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout(""), None);
        for left in [
            Duration::from_nanos(7),
            Duration::from_millis(1500),
            Duration::from_secs(250_000),
            Duration::from_secs(3600 * 200_000_000),
        ] {
            let encoded = encode_grpc_timeout(left);
            let back = parse_grpc_timeout(encoded.to_str().unwrap()).unwrap();
            assert!(back <= left, "{encoded:?} gives more than {left:?}");
        }
        assert_eq!(encode_grpc_timeout(Duration::from_millis(1500)), "1500000u");
        assert_eq!(encode_grpc_timeout(Duration::ZERO), "0n");
        assert!(encode_grpc_timeout(Duration::from_secs(1)).is_sensitive());
        assert_eq!(encode_deadline_ms(Duration::from_millis(250)), "250");
    }

    #[test]
    fn the_sooner_deadline_wins() {
        let d = effective(Duration::from_secs(30), Some(Duration::from_secs(2)));
        assert_eq!((d.budget, d.by), (Duration::from_secs(2), "caller"));
        let d = effective(Duration::from_secs(1), Some(Duration::from_secs(2)));
        assert_eq!((d.budget, d.by), (Duration::from_secs(1), "policy"));
        let d = effective(Duration::from_secs(1), None);
        assert_eq!(d.by, "policy");
    }

    #[test]
    fn caller_deadline_headers() {
        let mut h = HeaderMap::new();
        h.insert(DEADLINE_HEADER, HeaderValue::from_static("250"));
        assert_eq!(caller_timeout(&h, false), Some(Duration::from_millis(250)));
        assert_eq!(
            caller_timeout(&h, true),
            None,
            "gRPC calls use grpc-timeout"
        );
        h.insert(GRPC_TIMEOUT, HeaderValue::from_static("3S"));
        assert_eq!(caller_timeout(&h, true), Some(Duration::from_secs(3)));
    }
}
