//! Retries and hedging: send an attempt again when it failed in a way the
//! policy names, within a budget, with backoff.
//!
//! A failed attempt is retried only if all of these hold:
//! - attempts are left (`max_attempts` counts the first);
//! - its failure matches `retry.on` (see `classify`);
//! - it is safe: the request carries an `Idempotency-Key` (its own, or
//!   one the sidecar made: `idempotency_key: generate`); its route says
//!   `idempotent: true` (and not `false`); a JSON-RPC call's method is one
//!   its protocol makes safe (`jsonrpc::Dialect::safe`: `tools/list`, not
//!   `tools/call`); else the HTTP method is idempotent,
//!   `retry_non_idempotent` is set or the call is gRPC (gRFC A6: the
//!   policy's codes say what is safe); or the upstream did
//!   not process it (connect failure, refused stream, 429, 503:
//!   `Failure::never_processed`);
//! - the request body can be replayed (`replay`);
//! - the upstream did not say "do not retry" (`grpc-retry-pushback-ms`
//!   negative or malformed);
//! - the retry budget allows it;
//! - the wait (the larger of the backoff and the upstream's pushback,
//!   capped by `max_pushback`) ends before the deadline.
//!
//! Otherwise the caller gets the last attempt's answer as it is. Nothing
//! is retried once the answer has started towards the caller: this layer
//! returns only whole decisions, before any response byte is sent.
//!
//! Why a budget and not only `max_attempts`? Retries multiply load exactly
//! when an upstream is struggling: with 3 attempts, a dead upstream gets
//! three times its normal traffic. The budget (as in Linkerd and Finagle)
//! caps retries at `ratio` of recent requests plus `min_per_second`, so a
//! failing upstream sees at most that much extra load, while isolated
//! failures are still retried.
//!
//! Hedging sends another attempt of an idempotent call when no answer came
//! within `hedge.delay`; the first success wins and the others are
//! cancelled (their streams reset). Each attempt after the first carries
//! `x-breakwater-attempt: N`.

pub mod backoff;
pub mod budget;
pub mod pushback;

use std::future::Future;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http::header::HeaderName;
use http::{HeaderValue, Method, Request, Response};
use tokio::time::Instant;

use self::budget::RetryBudget;
use super::deadline::Deadline;
use super::policy::{HedgeParams, RetryParams};
use crate::body::{self, Body};
use crate::body::{Completion, ReplayBody};
use crate::classify::{self, Failure};
use crate::error::ProxyError;
use crate::telemetry::metrics::UpstreamMetrics;
use pushback::Pushback;

/// The header numbering attempts after the first.
pub const ATTEMPT_HEADER: HeaderName = HeaderName::from_static("x-breakwater-attempt");
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// How long the budget remembers requests and retries.
const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// What an attempt is, beyond its request.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// 1 for the first attempt.
    pub number: u32,
    /// Whether the request body had been read whole when the answer
    /// started (`None` when no copy of the body is kept).
    pub completion: Option<Completion>,
    /// Why this attempt was sent (`None` for the first).
    pub cause: Option<Cause>,
}

/// Why an attempt after the first was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The previous attempt failed this way.
    Retry(Failure),
    /// No answer came within the hedging delay.
    Hedge,
}

impl Cause {
    /// A short label for spans and logs: the failure's label, or `hedge`.
    pub fn label(self) -> String {
        match self {
            Cause::Retry(failure) => failure.label(),
            Cause::Hedge => "hedge".into(),
        }
    }
}

/// One upstream's retry policy and budget.
pub struct Retry {
    params: RetryParams,
    hedge: Option<HedgeParams>,
    /// How long the caller's body may stall (`stream_idle_timeout`).
    request_idle: Option<Duration>,
    budget: RetryBudget,
    metrics: UpstreamMetrics,
}

impl std::fmt::Debug for Retry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retry")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

/// What each attempt is built from.
struct Template {
    parts: http::request::Parts,
    /// The body to replay; `None` for a request without one (most GETs),
    /// which needs no copy at all.
    body: Option<ReplayBody>,
}

impl Template {
    fn new(parts: http::request::Parts, body: Body, limit: u64, idle: Option<Duration>) -> Self {
        use http_body::Body as _;
        let body = (!body.is_end_stream()).then(|| ReplayBody::new(body, limit, idle));
        Self { parts, body }
    }

    /// Whether the whole body is known, so attempts can run side by side.
    fn is_complete(&self) -> bool {
        self.body.as_ref().is_none_or(ReplayBody::is_complete)
    }

    /// Whether the body can be sent again.
    fn can_replay(&self) -> bool {
        self.body.as_ref().is_none_or(ReplayBody::can_replay)
    }

    fn completion(&self) -> Completion {
        self.body
            .as_ref()
            .map_or_else(Completion::complete, ReplayBody::completion)
    }

    /// The `n`-th attempt's request and description.
    fn attempt(&self, n: u32, cause: Option<Cause>) -> (Request<Body>, Attempt) {
        let attempt = Attempt {
            number: n,
            completion: Some(self.completion()),
            cause,
        };
        (self.request(n), attempt)
    }

    fn request(&self, n: u32) -> Request<Body> {
        let body = match &self.body {
            Some(body) => Body::replay(body.replay()),
            None => body::empty(),
        };
        let mut request = Request::new(body);
        *request.method_mut() = self.parts.method.clone();
        *request.uri_mut() = self.parts.uri.clone();
        *request.version_mut() = self.parts.version;
        *request.headers_mut() = self.parts.headers.clone();
        if n > 1 {
            request
                .headers_mut()
                .insert(ATTEMPT_HEADER, HeaderValue::from(n));
        }
        request
    }
}

/// A new idempotency key: 128 random bits in hex.
fn new_key() -> HeaderValue {
    let key = format!("{:032x}", fastrand::u128(..));
    HeaderValue::from_str(&key).expect("hex is a header value")
}

/// Whether sending the request again is safe whatever the failure.
fn safe_to_repeat(parts: &http::request::Parts, params: &RetryParams, grpc: bool) -> bool {
    if parts.headers.contains_key(IDEMPOTENCY_KEY) {
        return true;
    }
    if let Some(idempotent) = params.idempotent {
        return idempotent;
    }
    if let Some(safe) = parts
        .extensions
        .get::<crate::jsonrpc::Call>()
        .and_then(|c| c.safe)
    {
        return safe;
    }
    params.retry_non_idempotent
        || grpc
        || matches!(
            parts.method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        )
}

impl Retry {
    /// A policy with its own budget; the caller's body may stall for
    /// `request_idle` at most.
    pub fn new(
        params: RetryParams,
        hedge: Option<HedgeParams>,
        request_idle: Option<Duration>,
        metrics: UpstreamMetrics,
    ) -> Self {
        let budget = RetryBudget::new(
            BUDGET_WINDOW,
            params.budget_min_per_second,
            params.budget_ratio,
        );
        Self {
            params,
            hedge,
            request_idle,
            budget,
            metrics,
        }
    }

    /// Retries (and hedges) the budget allows now; `None` when the
    /// upstream neither retries nor hedges.
    pub fn budget_left(&self) -> Option<u64> {
        (self.params.max_attempts > 1 || self.hedge.is_some()).then(|| self.budget.left())
    }

    /// Runs `attempt` until it succeeds or no retry is allowed (`grpc`: the
    /// call is gRPC, whose listed codes say what is safe to retry). `attempt`
    /// gets each attempt's request and its [`Attempt`] description.
    pub async fn run<F, Fut>(
        &self,
        request: Request<Body>,
        grpc: bool,
        deadline: Option<Deadline>,
        attempt: F,
    ) -> Result<Response<Body>, ProxyError>
    where
        F: Fn(Request<Body>, Attempt) -> Fut,
        Fut: Future<Output = Result<Response<Body>, ProxyError>>,
    {
        if self.params.max_attempts <= 1 && self.hedge.is_none() {
            // No copy is kept, but the body is watched all the same: its
            // failures are the caller's, and it may not stall for ever.
            let mut completion = None;
            let request = request.map(|body| {
                if http_body::Body::is_end_stream(&body) {
                    return body;
                }
                let watched = ReplayBody::new(body, 0, self.request_idle);
                completion = Some(watched.completion());
                Body::replay(watched)
            });
            let first = Attempt {
                number: 1,
                completion,
                cause: None,
            };
            // Boxed: an attempt's future is a few KiB (client, timeouts,
            // faults, spans); inline, it made every caller's future that
            // large, and moving it cost more than this allocation.
            return Box::pin(attempt(request, first)).await;
        }
        // Only a call that may be retried or hedged pays into the budget
        // (an atomic add, mostly); with retries off nothing withdraws.
        self.budget.deposit();
        let (mut parts, body) = request.into_parts();
        if self.params.generate_idempotency_key && !parts.headers.contains_key(IDEMPOTENCY_KEY) {
            parts.headers.insert(IDEMPOTENCY_KEY, new_key());
        }
        let safe = safe_to_repeat(&parts, &self.params, grpc);
        let template = Template::new(parts, body, self.params.buffer_limit, self.request_idle);
        if let Some(hedge) = self.hedge.clone().filter(|_| safe) {
            // Boxed: the rare path should not grow every call's future.
            return Box::pin(self.hedged(template, hedge, grpc, deadline, &attempt)).await;
        }
        let mut sent = 1u32;
        let mut cause = None;
        loop {
            let (request, description) = template.attempt(sent, cause);
            let result = Box::pin(attempt(request, description)).await;
            let Some(failure) = classify::classify(&result, grpc) else {
                return result;
            };
            let Some(wait) = self.retry_wait(&template, &result, failure, safe, sent, deadline)
            else {
                return result;
            };
            self.metrics.retry(&failure.label());
            tracing::debug!(attempt = sent + 1, reason = %failure.label(), ?wait, "retrying");
            drop(result);
            tokio::time::sleep(wait).await;
            sent += 1;
            cause = Some(Cause::Retry(failure));
        }
    }

    /// The retry loop with hedged attempts: another attempt goes out
    /// whenever `delay` passes without an answer, up to `max_attempts` in
    /// flight; the first success wins and dropping the others cancels them.
    async fn hedged<F, Fut>(
        &self,
        template: Template,
        hedge: HedgeParams,
        grpc: bool,
        deadline: Option<Deadline>,
        attempt: &F,
    ) -> Result<Response<Body>, ProxyError>
    where
        F: Fn(Request<Body>, Attempt) -> Fut,
        Fut: Future<Output = Result<Response<Body>, ProxyError>>,
    {
        let send = |n: u32, cause: Option<Cause>| {
            let (request, description) = template.attempt(n, cause);
            attempt(request, description)
        };
        let max_attempts = self.params.max_attempts.max(hedge.max_attempts);
        let mut in_flight = FuturesUnordered::new();
        in_flight.push(send(1, None));
        let mut sent = 1u32;
        let mut hedge_at = Instant::now() + hedge.delay;
        loop {
            let can_hedge = sent < max_attempts && (in_flight.len() as u32) < hedge.max_attempts;
            let result = tokio::select! {
                Some(result) = in_flight.next() => result,
                _ = tokio::time::sleep_until(hedge_at), if can_hedge => {
                    hedge_at = Instant::now() + hedge.delay;
                    if template.is_complete() && self.budget.withdraw() {
                        sent += 1;
                        self.metrics.hedge();
                        in_flight.push(send(sent, Some(Cause::Hedge)));
                    }
                    continue;
                }
            };
            let Some(failure) = classify::classify(&result, grpc) else {
                return result;
            };
            if !in_flight.is_empty() {
                // Hedged attempts are still out: one may yet succeed.
                continue;
            }
            let Some(wait) = self.retry_wait(&template, &result, failure, true, sent, deadline)
            else {
                return result;
            };
            self.metrics.retry(&failure.label());
            drop(result);
            tokio::time::sleep(wait).await;
            sent += 1;
            in_flight.push(send(sent, Some(Cause::Retry(failure))));
            hedge_at = Instant::now() + hedge.delay;
        }
    }

    /// How long to wait before retrying, or `None` when the answer stands.
    fn retry_wait(
        &self,
        template: &Template,
        result: &Result<Response<Body>, ProxyError>,
        failure: Failure,
        safe: bool,
        sent: u32,
        deadline: Option<Deadline>,
    ) -> Option<Duration> {
        let params = &self.params;
        if sent >= params.max_attempts
            || !params.on.matches(failure)
            || !(safe || failure.never_processed())
            || !template.can_replay()
        {
            return None;
        }
        let pushback = match result {
            Ok(response) => pushback::parse(response.headers(), SystemTime::now()),
            Err(_) => Pushback::None,
        };
        let pushback = match pushback {
            Pushback::Stop => return None,
            Pushback::Wait(wait) => wait.min(params.max_pushback),
            Pushback::None => Duration::ZERO,
        };
        let wait = backoff::wait(params.backoff_base, params.backoff_max, sent).max(pushback);
        if deadline.is_some_and(|d| Instant::now() + wait >= d.at) {
            return None;
        }
        if !self.budget.withdraw() {
            self.metrics.budget_exhausted();
            return None;
        }
        Some(wait)
    }
}
