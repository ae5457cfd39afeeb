//! Deadlines: the call's overall timeout, and how it crosses agent hops.
//!
//! The effective deadline is the sooner of the policy's `timeout` and the
//! caller's own: `grpc-timeout` for gRPC, `x-breakwater-deadline-ms`
//! (milliseconds left) for HTTP. It bounds every attempt and backoff until
//! the answer starts; when it passes first, the caller gets 504 /
//! `DEADLINE_EXCEEDED` with `x-breakwater-error: deadline-exceeded`.
//!
//! The deadline travels with the request as a [`Deadline`] extension; the
//! per-try layer (`timeout.rs`) writes the time left into each attempt's
//! headers, so the next agent's sidecar, or a gRPC server, honours it. A
//! deadline set by a user at the edge of a workflow therefore holds across
//! every agent the call passes through.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Request, Response};
use tokio::time::Instant;

use super::BoxFuture;
use crate::body::Body;
use crate::edge::{self, ProxyError};
use crate::telemetry::metrics::UpstreamMetrics;

/// The HTTP header that carries the milliseconds left to a call.
pub const DEADLINE_HEADER: &str = "x-breakwater-deadline-ms";

/// A call's deadline, carried in the request's extensions.
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
pub fn caller_timeout(headers: &HeaderMap) -> Option<Duration> {
    if edge::is_grpc(headers) {
        let value = headers.get("grpc-timeout")?.to_str().ok()?;
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
    const MAX: u128 = 99_999_999;
    let value = [
        (left.as_nanos(), 'n'),
        (left.as_micros(), 'u'),
        (left.as_millis(), 'm'),
        (u128::from(left.as_secs()), 'S'),
        (u128::from(left.as_secs() / 60), 'M'),
        (u128::from(left.as_secs() / 3600), 'H'),
    ]
    .into_iter()
    .find(|(n, _)| *n <= MAX)
    .map_or_else(|| format!("{MAX}H"), |(n, unit)| format!("{n}{unit}"));
    HeaderValue::from_str(&value).expect("digits and a unit are a valid header value")
}

/// Applies the call's deadline.
#[derive(Debug, Clone)]
pub struct DeadlineLayer {
    upstream: Arc<str>,
    timeout: Duration,
    metrics: UpstreamMetrics,
}

impl DeadlineLayer {
    /// A layer giving each call at most `timeout`.
    pub fn new(upstream: Arc<str>, timeout: Duration, metrics: UpstreamMetrics) -> Self {
        Self {
            upstream,
            timeout,
            metrics,
        }
    }
}

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;

    fn layer(&self, inner: S) -> <Self as tower::Layer<S>>::Service {
        DeadlineService {
            layer: self.clone(),
            inner,
        }
    }
}

/// The service of [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct DeadlineService<S> {
    layer: DeadlineLayer,
    inner: S,
}

impl<S> tower::Service<Request<Body>> for DeadlineService<S>
where
    S: tower::Service<
            Request<Body>,
            Response = Response<Body>,
            Error = ProxyError,
            Future = BoxFuture,
        >,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> BoxFuture {
        let deadline = effective(self.layer.timeout, caller_timeout(request.headers()));
        request.extensions_mut().insert(deadline);
        let call = self.inner.call(request);
        let layer = self.layer.clone();
        Box::pin(async move {
            match tokio::time::timeout_at(deadline.at, call).await {
                Ok(result) => result,
                Err(_) => {
                    layer.metrics.timeout(false);
                    Err(ProxyError::DeadlineExceeded {
                        upstream: layer.upstream,
                        after: deadline.budget,
                        by: deadline.by,
                    })
                }
            }
        })
    }
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
        assert_eq!(caller_timeout(&h), Some(Duration::from_millis(250)));
        h.insert("content-type", HeaderValue::from_static("application/grpc"));
        assert_eq!(caller_timeout(&h), None, "gRPC calls use grpc-timeout");
        h.insert("grpc-timeout", HeaderValue::from_static("3S"));
        assert_eq!(caller_timeout(&h), Some(Duration::from_secs(3)));
    }
}
