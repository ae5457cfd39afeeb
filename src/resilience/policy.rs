//! An upstream's resilience policy: the YAML blocks ([`RawPolicy`]) and
//! the resolved parameters the layers run on ([`Policy`]).
//!
//! The same fields appear in the `defaults` block and in each upstream;
//! an upstream's values win field by field, nested blocks included, so
//! `retry: {max_attempts: 5}` keeps the default backoff and budget. What
//! neither sets takes the built-in default documented on each field.

use std::num::NonZeroU32;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::classify::Conditions;
use crate::values::{
    ByteSize, HumanDuration, Ratio, merge_fields, serialize_duration, serialize_opt_duration,
};

/// How long a streamed answer may stall by default: Envoy's default, long
/// enough for any live stream, short enough that a stalled one does not
/// hold its concurrency slot for ever.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// The policy fields of an upstream or of `defaults`, as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    pub timeout: Option<HumanDuration>,
    pub per_try_timeout: Option<HumanDuration>,
    pub stream_idle_timeout: Option<HumanDuration>,
    pub first_byte_timeout: Option<HumanDuration>,
    pub retry: Option<RawRetry>,
    pub hedge: Option<RawHedge>,
    pub circuit_breaker: Option<RawBreaker>,
    pub max_concurrent_requests: Option<NonZeroU32>,
    pub max_pending: Option<u32>,
    pub max_connection_share: Option<Ratio>,
}
merge_fields!(RawPolicy { timeout, per_try_timeout, stream_idle_timeout, first_byte_timeout, max_concurrent_requests, max_pending, max_connection_share } nested { retry, hedge, circuit_breaker });

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetry {
    pub max_attempts: Option<NonZeroU32>,
    pub backoff: Option<RawBackoff>,
    pub on: Option<Conditions>,
    pub budget: Option<RawBudget>,
    pub buffer_limit: Option<ByteSize>,
    pub retry_non_idempotent: Option<bool>,
    pub hold_on_pushback: Option<bool>,
    pub idempotency_key: Option<KeySource>,
}
merge_fields!(RawRetry { max_attempts, on, buffer_limit, retry_non_idempotent, hold_on_pushback, idempotency_key } nested { backoff, budget });

/// `retry.idempotency_key`: where a call's `Idempotency-Key` comes from
/// when the caller sent none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeySource {
    /// The sidecar makes one per call, the same for all its attempts, so
    /// that an upstream honouring the header sees every retry as the same
    /// call (and the call may be retried whatever its method).
    Generate,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBackoff {
    pub base: Option<HumanDuration>,
    pub max: Option<HumanDuration>,
    pub max_pushback: Option<HumanDuration>,
}
merge_fields!(RawBackoff { base, max, max_pushback } nested {});

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBudget {
    pub ratio: Option<Ratio>,
    pub min_per_second: Option<u32>,
}
merge_fields!(RawBudget { ratio, min_per_second } nested {});

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHedge {
    pub delay: Option<HumanDuration>,
    pub max_attempts: Option<NonZeroU32>,
}
merge_fields!(RawHedge { delay, max_attempts } nested {});

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBreaker {
    pub enabled: Option<bool>,
    pub consecutive_failures: Option<u32>,
    pub failure_rate: Option<RawFailureRate>,
    pub slow_call: Option<RawSlowCall>,
    pub open_for: Option<HumanDuration>,
    pub max_open_for: Option<HumanDuration>,
    pub half_open_probes: Option<NonZeroU32>,
    pub failure_on: Option<Conditions>,
}
merge_fields!(RawBreaker { enabled, consecutive_failures, open_for, max_open_for, half_open_probes, failure_on } nested { failure_rate, slow_call });

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFailureRate {
    pub threshold: Option<Ratio>,
    pub window: Option<NonZeroU32>,
    pub min_calls: Option<u32>,
}
merge_fields!(RawFailureRate { threshold, window, min_calls } nested {});

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSlowCall {
    pub duration: Option<HumanDuration>,
    pub rate_threshold: Option<Ratio>,
}
merge_fields!(RawSlowCall { duration, rate_threshold } nested {});

/// An upstream's resolved policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Policy {
    /// The call's deadline (default 30 s), unless the caller's is sooner:
    /// it covers every attempt and backoff until the answer starts, and
    /// the time left is passed on to the upstream.
    #[serde(serialize_with = "serialize_duration")]
    pub timeout: Duration,
    /// Bound on one attempt (default: none, only the deadline).
    #[serde(serialize_with = "serialize_opt_duration")]
    pub per_try_timeout: Option<Duration>,
    /// The longest gap between two frames of an answer's body before the
    /// stream is cut (default 5 minutes, as Envoy's; `0s`: none).
    #[serde(serialize_with = "serialize_opt_duration")]
    pub stream_idle_timeout: Option<Duration>,
    /// The longest wait from an answer's headers to its first body frame
    /// (default: the idle timeout).
    #[serde(serialize_with = "serialize_opt_duration")]
    pub first_byte_timeout: Option<Duration>,
    /// Retries.
    pub retry: RetryParams,
    /// Hedged requests, if configured.
    pub hedge: Option<HedgeParams>,
    /// The circuit breaker, unless disabled.
    pub circuit_breaker: Option<BreakerParams>,
    /// Requests in flight at most (default 1024).
    pub max_concurrent_requests: u32,
    /// Requests waiting for a slot at most (default 1024); more are shed.
    pub max_pending: u32,
    /// The share of `max_concurrent_requests` one caller connection may
    /// hold, waiting calls included (default 0.5; at least one slot).
    pub max_connection_share: f64,
}

/// Retry parameters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryParams {
    /// Attempts in all, the first included (default 3; 1 turns retries off).
    pub max_attempts: u32,
    /// First backoff ceiling (default 100 ms): attempt n waits a random
    /// time in `[0, min(max, base * 2^(n-1))]` (full jitter).
    #[serde(serialize_with = "serialize_duration")]
    pub backoff_base: Duration,
    /// Largest backoff ceiling (default 10 s).
    #[serde(serialize_with = "serialize_duration")]
    pub backoff_max: Duration,
    /// Longest server-requested wait honoured (default 60 s).
    #[serde(serialize_with = "serialize_duration")]
    pub max_pushback: Duration,
    /// Failures that are retried (default connect-failure, refused-stream,
    /// reset, 502, 503, 504, unavailable).
    pub on: Conditions,
    /// Share of requests that may be retried (default 0.2).
    pub budget_ratio: f64,
    /// Retries always allowed per second (default 10).
    pub budget_min_per_second: u32,
    /// Largest request body kept for replay (default 64 KiB).
    pub buffer_limit: u64,
    /// Retry POST and PATCH without an `Idempotency-Key` (default false).
    pub retry_non_idempotent: bool,
    /// After a rate limit that says how long to wait, answer every attempt
    /// at once until then (default true; see `hold`).
    pub hold_on_pushback: bool,
    /// A route's `idempotent`: whether its calls may be sent again
    /// whatever their method (`true`), or only when the upstream never
    /// processed them (`false`, even for gRPC or GET); unset: by method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotent: Option<bool>,
    /// Calls without an `Idempotency-Key` get one made by the sidecar.
    pub generate_idempotency_key: bool,
}

/// Hedging parameters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HedgeParams {
    /// How long to wait for an answer before sending another attempt.
    #[serde(serialize_with = "serialize_duration")]
    pub delay: Duration,
    /// Attempts in flight at most, the first included (default 2).
    pub max_attempts: u32,
}

/// Circuit breaker parameters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakerParams {
    /// Trip after this many failures in a row (default 5; 0 turns it off).
    pub consecutive_failures: u32,
    /// Trip when this share of the last `window` calls failed (default 0.5).
    pub failure_rate_threshold: f64,
    /// Calls in the sliding window (default 20).
    pub window: u32,
    /// Calls needed in the window before the rate counts (default 10).
    pub min_calls: u32,
    /// A call slower than this counts as slow (default: slow calls off).
    #[serde(serialize_with = "serialize_opt_duration")]
    pub slow_call_duration: Option<Duration>,
    /// Trip when this share of the window was slow (default 1.0).
    pub slow_call_rate_threshold: f64,
    /// How long the circuit stays open on its first trip (default 30 s).
    #[serde(serialize_with = "serialize_duration")]
    pub open_for: Duration,
    /// Longest open period as repeated trips double it (default 5 min).
    #[serde(serialize_with = "serialize_duration")]
    pub max_open_for: Duration,
    /// Probe calls let through when half-open; all must succeed to close
    /// (default 1).
    pub half_open_probes: u32,
    /// Failures that count (default: transport errors, timeouts, 5xx but
    /// 501, and gRPC unavailable, internal, unknown, deadline-exceeded,
    /// data-loss, and JSON-RPC errors that are the upstream's). Rate limiting (429, resource-exhausted) is not an
    /// outage: it counts only when listed, and then toward the failure
    /// rate only.
    pub failure_on: Conditions,
}

fn conditions(names: &[&str]) -> Conditions {
    Conditions::parse(names.iter().copied()).expect("built-in conditions parse")
}

/// The default failures the breaker counts.
pub fn default_breaker_failures() -> Conditions {
    conditions(&[
        "connect-failure",
        "reset",
        "refused-stream",
        "per-try-timeout",
        "500",
        "502",
        "503",
        "504",
        "505",
        "506",
        "507",
        "508",
        "509",
        "510",
        "511",
        "unavailable",
        "internal",
        "unknown",
        "deadline-exceeded",
        "data-loss",
        "jsonrpc-error",
    ])
}

impl RawPolicy {
    /// Resolves this (already merged) policy, applying built-in defaults.
    pub(crate) fn resolve(&self) -> Policy {
        let d = |v: &Option<HumanDuration>, default: Duration| v.map_or(default, |h| h.0);
        let retry = self.retry.clone().unwrap_or_default();
        let backoff = retry.backoff.unwrap_or_default();
        let budget = retry.budget.unwrap_or_default();
        let breaker = self.circuit_breaker.clone().unwrap_or_default();
        let rate = breaker.failure_rate.clone().unwrap_or_default();
        let slow = breaker.slow_call.clone().unwrap_or_default();
        Policy {
            timeout: d(&self.timeout, Duration::from_secs(30)),
            per_try_timeout: self.per_try_timeout.map(|h| h.0),
            stream_idle_timeout: match self.stream_idle_timeout {
                None => Some(DEFAULT_STREAM_IDLE_TIMEOUT),
                Some(h) => Some(h.0).filter(|d| !d.is_zero()),
            },
            first_byte_timeout: self
                .first_byte_timeout
                .map(|h| h.0)
                .filter(|d| !d.is_zero()),
            retry: RetryParams {
                max_attempts: retry.max_attempts.map_or(3, NonZeroU32::get),
                backoff_base: d(&backoff.base, Duration::from_millis(100)),
                backoff_max: d(&backoff.max, Duration::from_secs(10)),
                max_pushback: d(&backoff.max_pushback, Duration::from_secs(60)),
                on: retry.on.unwrap_or_else(|| {
                    conditions(&[
                        "connect-failure",
                        "refused-stream",
                        "reset",
                        "502",
                        "503",
                        "504",
                        "unavailable",
                    ])
                }),
                budget_ratio: budget.ratio.map_or(0.2, |r| r.0),
                budget_min_per_second: budget.min_per_second.unwrap_or(10),
                buffer_limit: retry.buffer_limit.map_or(64 << 10, |b| b.0),
                retry_non_idempotent: retry.retry_non_idempotent.unwrap_or(false),
                hold_on_pushback: retry.hold_on_pushback.unwrap_or(true),
                idempotent: None,
                generate_idempotency_key: retry.idempotency_key == Some(KeySource::Generate),
            },
            hedge: self.hedge.as_ref().and_then(|h| {
                Some(HedgeParams {
                    delay: h.delay?.0,
                    max_attempts: h.max_attempts.map_or(2, NonZeroU32::get),
                })
            }),
            circuit_breaker: breaker.enabled.unwrap_or(true).then(|| BreakerParams {
                consecutive_failures: breaker.consecutive_failures.unwrap_or(5),
                failure_rate_threshold: rate.threshold.map_or(0.5, |r| r.0),
                window: rate.window.map_or(20, NonZeroU32::get),
                min_calls: rate.min_calls.unwrap_or(10),
                slow_call_duration: slow.duration.map(|h| h.0),
                slow_call_rate_threshold: slow.rate_threshold.map_or(1.0, |r| r.0),
                open_for: d(&breaker.open_for, Duration::from_secs(30)),
                max_open_for: d(&breaker.max_open_for, Duration::from_secs(300)),
                half_open_probes: breaker.half_open_probes.map_or(1, NonZeroU32::get),
                failure_on: breaker
                    .failure_on
                    .clone()
                    .unwrap_or_else(default_breaker_failures),
            }),
            max_concurrent_requests: self.max_concurrent_requests.map_or(1024, NonZeroU32::get),
            max_pending: self.max_pending.unwrap_or(1024),
            max_connection_share: self.max_connection_share.map_or(0.5, |r| r.0),
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        RawPolicy::default().resolve()
    }
}
