//! Retries and hedging: send an attempt again when it failed in a way the
//! policy names, within a budget, with backoff.
//!
//! A failed attempt is retried only if all of these hold:
//! - attempts are left (`max_attempts` counts the first);
//! - its failure matches `retry.on` (see `classify`);
//! - it is safe: the method is idempotent, the request carries an
//!   `Idempotency-Key`, `retry_non_idempotent` is set, the call is gRPC
//!   (gRFC A6: the policy's codes say what is safe), or the request never
//!   reached the upstream (connect failure, refused stream);
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
pub mod pushback;
pub mod replay;

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http::{HeaderValue, Method, Request, Response};
use tokio::time::Instant;
use tower::ServiceExt;
use tower::retry::budget::{Budget, TpsBudget};

use super::BoxFuture;
use super::classify::{self, Failure};
use super::deadline::Deadline;
use super::policy::{HedgeParams, RetryParams};
use crate::body::{self, Body};
use crate::edge::{self, ProxyError};
use crate::telemetry::metrics::UpstreamMetrics;
use pushback::Pushback;
use replay::ReplayBody;

/// The header numbering attempts after the first.
pub const ATTEMPT_HEADER: &str = "x-breakwater-attempt";

/// How long the budget remembers requests and retries.
const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// Retries (and hedges) failed attempts.
#[derive(Clone)]
pub struct RetryLayer {
    shared: Arc<Shared>,
}

struct Shared {
    params: RetryParams,
    hedge: Option<HedgeParams>,
    budget: TpsBudget,
    metrics: UpstreamMetrics,
}

impl std::fmt::Debug for RetryLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryLayer")
            .field("params", &self.shared.params)
            .finish_non_exhaustive()
    }
}

impl RetryLayer {
    /// A layer with its own budget.
    pub fn new(params: RetryParams, hedge: Option<HedgeParams>, metrics: UpstreamMetrics) -> Self {
        let budget = TpsBudget::new(
            BUDGET_WINDOW,
            params.budget_min_per_second,
            params.budget_ratio as f32,
        );
        Self {
            shared: Arc::new(Shared {
                params,
                hedge,
                budget,
                metrics,
            }),
        }
    }
}

impl<S> tower::Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            shared: self.shared.clone(),
            inner,
        }
    }
}

/// The service of [`RetryLayer`].
#[derive(Clone)]
pub struct Retry<S> {
    shared: Arc<Shared>,
    inner: S,
}

impl<S> tower::Service<Request<Body>> for Retry<S>
where
    S: tower::Service<
            Request<Body>,
            Response = Response<Body>,
            Error = ProxyError,
            Future = BoxFuture,
        > + Clone
        + Send
        + 'static,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> BoxFuture {
        self.shared.budget.deposit();
        let single = self.shared.params.max_attempts <= 1 && self.shared.hedge.is_none();
        if single {
            return self.inner.call(request);
        }
        Box::pin(drive(self.shared.clone(), self.inner.clone(), request))
    }
}

/// What each attempt is built from.
struct Template {
    parts: http::request::Parts,
    body: ReplayBody,
}

impl Template {
    fn attempt(&self, n: u32) -> Request<Body> {
        let mut request = Request::new(body::boxed(self.body.replay()));
        *request.method_mut() = self.parts.method.clone();
        *request.uri_mut() = self.parts.uri.clone();
        *request.version_mut() = self.parts.version;
        *request.headers_mut() = self.parts.headers.clone();
        *request.extensions_mut() = self.parts.extensions.clone();
        request.extensions_mut().insert(self.body.completion());
        if n > 1 {
            request
                .headers_mut()
                .insert(ATTEMPT_HEADER, HeaderValue::from(n));
        }
        request
    }
}

/// Whether sending the request again is safe whatever the failure.
fn safe_to_repeat(parts: &http::request::Parts, params: &RetryParams) -> bool {
    params.retry_non_idempotent
        || edge::is_grpc(&parts.headers)
        || parts.headers.contains_key("idempotency-key")
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

/// Runs attempts until one succeeds or no retry is allowed.
async fn drive<S>(
    shared: Arc<Shared>,
    inner: S,
    request: Request<Body>,
) -> Result<Response<Body>, ProxyError>
where
    S: tower::Service<
            Request<Body>,
            Response = Response<Body>,
            Error = ProxyError,
            Future = BoxFuture,
        > + Clone
        + Send
        + 'static,
{
    let (mut parts, body) = request.into_parts();
    let deadline = parts.extensions.get::<Deadline>().copied();
    let safe = safe_to_repeat(&parts, &shared.params);
    parts.extensions.remove::<replay::Completion>();
    let template = Template {
        body: ReplayBody::new(body, shared.params.buffer_limit),
        parts,
    };
    let hedge = shared.hedge.clone().filter(|_| safe);
    let max_attempts = shared
        .params
        .max_attempts
        .max(hedge.as_ref().map_or(1, |h| h.max_attempts));
    let mut in_flight = FuturesUnordered::new();
    in_flight.push(inner.clone().oneshot(template.attempt(1)));
    let mut sent = 1u32;
    let mut hedge_at = hedge.as_ref().map(|h| Instant::now() + h.delay);
    loop {
        let hedge_due = hedge_at.filter(|_| {
            sent < max_attempts
                && hedge
                    .as_ref()
                    .is_some_and(|h| (in_flight.len() as u32) < h.max_attempts)
        });
        let result = tokio::select! {
            Some(result) = in_flight.next() => result,
            _ = sleep_until(hedge_due), if hedge_due.is_some() => {
                hedge_at = hedge.as_ref().map(|h| Instant::now() + h.delay);
                if template.body.is_complete() && shared.budget.withdraw() {
                    sent += 1;
                    shared.metrics.hedge();
                    in_flight.push(inner.clone().oneshot(template.attempt(sent)));
                }
                continue;
            }
        };
        let Some(failure) = classify::classify(&result) else {
            return result;
        };
        if !in_flight.is_empty() {
            // Hedged attempts are still out: one may yet succeed.
            continue;
        }
        let Some(wait) = retry_wait(&shared, &template, &result, failure, safe, sent, deadline)
        else {
            return result;
        };
        shared.metrics.retry(&failure.label());
        tracing::debug!(attempt = sent + 1, reason = %failure.label(), ?wait, "retrying");
        drop(result);
        tokio::time::sleep(wait).await;
        sent += 1;
        in_flight.push(inner.clone().oneshot(template.attempt(sent)));
        hedge_at = hedge.as_ref().map(|h| Instant::now() + h.delay);
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// How long to wait before retrying, or `None` when the answer stands.
fn retry_wait(
    shared: &Shared,
    template: &Template,
    result: &Result<Response<Body>, ProxyError>,
    failure: Failure,
    safe: bool,
    sent: u32,
    deadline: Option<Deadline>,
) -> Option<Duration> {
    let params = &shared.params;
    if sent >= params.max_attempts
        || !params.on.matches(failure)
        || !(safe || failure.never_processed())
        || !template.body.can_replay()
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
    if !shared.budget.withdraw() {
        shared.metrics.budget_exhausted();
        return None;
    }
    Some(wait)
}
