//! The order of the mechanisms, in one place.
//!
//! Each upstream gets one [`Stack`], built when the config loads. A call
//! goes through, outer to inner:
//!
//! | step | per | why here |
//! |---|---|---|
//! | deadline | call | Outermost: the call's deadline covers waiting for a slot, every attempt and every backoff. |
//! | concurrency | call | Above retry, so a call holds one slot for all its attempts (retries cannot multiply in-flight load), and a shed call is never retried. Below the deadline, so waiting for a slot counts against it. |
//! | retry | call | Sees each attempt's classified result and decides; replays the body. |
//! | circuit breaker | attempt | Below retry, so every attempt counts and an open circuit fails an attempt at once; `circuit-open` is not a retryable failure, so retries stop there. |
//! | per-try timeout | attempt | Below the breaker, so a timed-out attempt counts as a failure; the outgoing deadline header carries the time left. |
//! | client | attempt | Sends one attempt on the pooled (HTTP/1.1) or shared (HTTP/2) connection, and reads the first frame of a unary-like gRPC answer so a status in its trailers is classified too. |
//! | JSON-RPC peek | attempt's answer | For an upstream that speaks JSON-RPC, reads an answer to a `POST` up to its verdict (`jsonrpc::peek`), inside the per-try timeout, so that an error in a `200` is classified before the breaker and retry see the attempt. |
//! | stream watch | attempt's answer | Wraps the answer's body (`stream`): a stall or a break after the headers is cut, counted and reported to this attempt's breaker; a good streaming answer is recorded by the breaker when its body ends. |
//!
//! The order is pinned by `tests/resilience.rs::layer_order`.
//!
//! Why one `async fn` and not a tower `ServiceBuilder` of layers? The
//! first version was a tower stack, one boxed future per layer and a boxed
//! clone of the stack per request. Measured with callgrind on the gRPC
//! benchmark, it cost 21 thousand instructions per request over plain
//! pass-through (+28%), most of it allocation and moving futures between
//! boxes. Composed as plain calls in one function, the whole call is one
//! future plus one box per attempt (an attempt's future is a few KiB, and
//! inline it made every call's future that large: moving it cost more than
//! the allocation, see docs/BENCHMARKS.md). Each mechanism still lives in
//! its own module with its own tests; only their composition is here.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use tokio::time::Instant;

use super::breaker::{Admission, Breaker};
use super::concurrency::Limiter;
use super::deadline::{self, Deadline};
use super::faults::{self, FaultCell, FaultKind, Faults, Injection, Overrides};
use super::hold::Hold;
use super::policy::Policy;
use super::retry::{Attempt, Cause, Retry};
use super::stream::{self, StreamTimeouts};
use crate::body::Body;
use crate::body::Completion;
use crate::classify::{self, Failure};
use crate::error::ProxyError;
use crate::jsonrpc::{self, Dialect};
use crate::telemetry::metrics::UpstreamMetrics;
use crate::telemetry::traces::{AttemptStart, RequestSpan};
use crate::transport::client::UpstreamClient;

/// What a caller of [`Stack::call`] watches of the call.
#[derive(Debug, Clone, Copy, Default)]
pub struct Observe<'a> {
    /// The request's trace span, when tracing is on.
    pub span: Option<&'a RequestSpan>,
    /// Counts the attempts made (breaker refusals included).
    pub attempts: Option<&'a std::sync::atomic::AtomicU32>,
}

/// What a route's stack may take from its upstream's.
struct Shared {
    limiter: Arc<Limiter>,
    breaker: Option<Arc<Breaker>>,
    hold: Option<Arc<Hold>>,
    faults: Arc<FaultCell>,
    client: Arc<UpstreamClient>,
    jsonrpc: Option<Dialect>,
}

/// One upstream's resilience stack.
#[derive(Debug)]
pub struct Stack {
    name: Arc<str>,
    timeout: Duration,
    per_try_timeout: Option<Duration>,
    stream_timeouts: Option<StreamTimeouts>,
    limiter: Arc<Limiter>,
    retry: Retry,
    breaker: Option<Arc<Breaker>>,
    hold: Option<Arc<Hold>>,
    faults: Arc<FaultCell>,
    client: Arc<UpstreamClient>,
    jsonrpc: Option<Dialect>,
    metrics: UpstreamMetrics,
}

impl Stack {
    /// Builds the stack for an upstream, with the faults to inject (if
    /// any), reading its answers as `jsonrpc` frames them if it speaks it.
    pub fn new(
        name: Arc<str>,
        policy: &Policy,
        faults: Option<Faults>,
        client: Arc<UpstreamClient>,
        jsonrpc: Option<Dialect>,
        metrics: &UpstreamMetrics,
    ) -> Self {
        let shared = Shared {
            limiter: Arc::new(Limiter::new(
                name.clone(),
                policy.max_concurrent_requests,
                policy.max_pending,
                policy.max_connection_share,
                metrics.clone(),
            )),
            breaker: policy
                .circuit_breaker
                .clone()
                .map(|params| Breaker::new(name.clone(), params, metrics.clone())),
            hold: policy
                .retry
                .hold_on_pushback
                .then(|| Arc::new(Hold::new(policy.retry.max_pushback))),
            faults: Arc::new(FaultCell::new(faults)),
            client,
            jsonrpc,
        };
        Self::with(name, policy, shared, metrics)
    }

    /// The stack of one of this upstream's routes (`name`: `upstream/route`):
    /// its own timeouts, retries and budget under `policy`; the upstream's
    /// slots, pushback hold and client; the upstream's breaker unless
    /// `own_breaker`, the upstream's faults unless it has its own
    /// (`faults`). `metrics` count for the route and the upstream.
    pub fn route(
        &self,
        name: Arc<str>,
        policy: &Policy,
        own_breaker: bool,
        faults: Option<Option<Faults>>,
        metrics: &UpstreamMetrics,
    ) -> Self {
        let shared = Shared {
            limiter: self.limiter.clone(),
            breaker: match own_breaker {
                false => self.breaker.clone(),
                true => policy
                    .circuit_breaker
                    .clone()
                    .map(|params| Breaker::new(name, params, metrics.clone())),
            },
            hold: self.hold.clone(),
            faults: match faults {
                Some(own) => Arc::new(FaultCell::new(own)),
                None => self.faults.clone(),
            },
            client: self.client.clone(),
            jsonrpc: self.jsonrpc,
        };
        Self::with(self.name.clone(), policy, shared, metrics)
    }

    /// A stack with `policy`'s timeouts and retries over `shared`.
    fn with(name: Arc<str>, policy: &Policy, shared: Shared, metrics: &UpstreamMetrics) -> Self {
        Self {
            timeout: policy.timeout,
            per_try_timeout: policy.per_try_timeout,
            stream_timeouts: StreamTimeouts::new(
                policy.first_byte_timeout,
                policy.stream_idle_timeout,
            ),
            limiter: shared.limiter,
            retry: Retry::new(
                policy.retry.clone(),
                policy.hedge.clone(),
                policy.stream_idle_timeout,
                metrics.clone(),
            ),
            breaker: shared.breaker,
            hold: shared.hold,
            faults: shared.faults,
            client: shared.client,
            jsonrpc: shared.jsonrpc,
            metrics: metrics.clone(),
            name,
        }
    }

    /// The faults in force, which the admin API may replace.
    pub fn faults(&self) -> &FaultCell {
        &self.faults
    }

    /// The circuit breaker, unless disabled.
    pub fn breaker(&self) -> Option<&Arc<Breaker>> {
        self.breaker.as_ref()
    }

    /// Retries the budget allows now, if the upstream retries or hedges.
    pub fn budget_left(&self) -> Option<u64> {
        self.retry.budget_left()
    }

    /// Sends a call through every step (`grpc`: the call is gRPC).
    pub async fn call(
        &self,
        mut request: Request<Body>,
        grpc: bool,
        observe: Observe<'_>,
    ) -> Result<Response<Body>, ProxyError> {
        let deadline = deadline::start(self.timeout, request.headers(), grpc);
        let faults = self.faults.current();
        let overrides = match &faults {
            Some(f) if f.allow_header_control() => faults::overrides(request.headers_mut(), grpc),
            _ => Overrides::default(),
        };
        let faults = faults.as_deref().map(|f| (f, overrides));
        let call = async {
            let permit = self.limiter.acquire().await?;
            let response = self
                .retry
                .run(request, grpc, Some(deadline), |request, attempt| {
                    self.attempt(request, grpc, deadline, attempt, faults, observe)
                })
                .await?;
            Ok(response.map(|b| b.with_permit(permit)))
        };
        match tokio::time::timeout_at(deadline.at, call).await {
            Ok(result) => result,
            Err(_) => {
                self.metrics.timeout(false);
                Err(ProxyError::DeadlineExceeded {
                    upstream: self.name.clone(),
                    after: deadline.budget,
                    by: deadline.by,
                })
            }
        }
    }

    /// One attempt: through the breaker, bounded by the per-try timeout,
    /// with the faults drawn for it.
    ///
    /// Longer than most functions on purpose: it is on every call, and each
    /// `async fn` split out of it is one more future nested in its state,
    /// moved at every poll that builds it (the regressions in
    /// docs/BENCHMARKS.md were such moves). Split it only with
    /// `bench/instructions.sh` before and after.
    async fn attempt(
        &self,
        mut request: Request<Body>,
        grpc: bool,
        deadline: Deadline,
        attempt: Attempt,
        faults: Option<(&Faults, Overrides)>,
        observe: Observe<'_>,
    ) -> Result<Response<Body>, ProxyError> {
        if let Some(attempts) = observe.attempts {
            attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let span = observe.span;
        if let Some(retry_after) = self.hold.as_deref().and_then(Hold::remaining) {
            return Err(ProxyError::Pushback {
                upstream: self.name.clone(),
                retry_after,
            });
        }
        let Attempt {
            number,
            completion,
            cause,
        } = attempt;
        let admission = match self.breaker.as_ref().map(|b| b.admit()) {
            None => None,
            Some(Ok(admission)) => Some(admission),
            Some(Err(_)) => {
                let refused = Err(ProxyError::CircuitOpen {
                    upstream: self.name.clone(),
                });
                if let Some(span) = span {
                    let start = self.span_start(number, cause, Some("open"), None);
                    span.attempt(start, request.headers_mut())
                        .finish(&refused, None);
                }
                return refused;
            }
        };
        let injection = faults.map(|(f, o)| f.draw(o, grpc));
        let span = span.map(|s| {
            let breaker = admission.as_ref().map(|a| match a {
                Admission::Normal => "closed",
                Admission::Probe(_) => "half-open",
            });
            let start = self.span_start(number, cause, breaker, injection.as_ref());
            s.attempt(start, request.headers_mut())
        });
        let left = deadline.remaining();
        let budget = self.per_try_timeout.map_or(left, |t| t.min(left));
        deadline::set_header(request.headers_mut(), budget, grpc);
        let started = Instant::now();
        let mut unanswered = Unanswered {
            // A deadline the caller set may be shorter than any upstream
            // could meet: its expiry says nothing of the upstream.
            breaker: self.breaker.as_deref().filter(|_| deadline.by == "policy"),
            admission,
            deadline: deadline.at,
            started,
        };
        let peek = self
            .jsonrpc
            .filter(|_| request.method() == http::Method::POST);
        let send = async {
            if injection.is_none() && peek.is_none() {
                return self.client.send(request, completion).await;
            }
            // Boxed: faults and JSON-RPC answers are the rare paths; their
            // futures should not grow the common one.
            Box::pin(self.send_rare(injection, peek, request, completion)).await
        };
        let result = match self.per_try_timeout {
            None => send.await,
            Some(per_try) => match tokio::time::timeout(per_try, send).await {
                Ok(result) => result,
                Err(_) => {
                    self.metrics.timeout(true);
                    Err(ProxyError::PerTryTimeout {
                        upstream: self.name.clone(),
                        after: per_try,
                    })
                }
            },
        };
        let admission = unanswered.admission.take();
        // A hold can only start on a rate limit: a 429, or a gRPC answer
        // (whose status needs classifying); other answers skip the work
        // when nothing else needs the verdict.
        let may_hold = self.hold.is_some()
            && matches!(&result, Ok(response) if grpc || response.status() == 429);
        if admission.is_none() && span.is_none() && !may_hold {
            return result.map(|response| self.watch(response, grpc, None));
        }
        let failure = classify::classify(&result, grpc);
        if let (Some(hold), Ok(response)) = (&self.hold, &result) {
            hold.observe(response, failure);
        }
        // The caller's fault says nothing of the upstream: not recorded
        // (a probe's slot is given back). A good answer still streaming is
        // recorded when its body ends, so that one the upstream breaks off
        // counts as a failure, not a success and then a failure; a probe
        // is recorded at once, not to hold the half-open circuit for as
        // long as its stream lasts.
        let callers = matches!(&result, Err(e) if e.is_callers());
        let streaming = matches!(&result, Ok(r) if !http_body::Body::is_end_stream(r.body()));
        let mut deferred = None;
        if let (Some(breaker), Some(admission), false) = (&self.breaker, admission, callers) {
            match admission {
                Admission::Normal if failure.is_none() && streaming => {
                    deferred = Some(started.elapsed());
                }
                admission => breaker.record(admission, failure, started.elapsed()),
            }
        }
        if let Some(span) = span {
            span.finish(&result, failure);
        }
        result.map(|response| self.watch(response, grpc, deferred))
    }

    /// The answer, its body watched (`stream`): cut when it stalls longer
    /// than the stream timeouts allow, reported when it breaks off; each
    /// counted, and reported to the breaker as a reset. `deferred`: the
    /// breaker has not heard of this answer yet (it took that long to
    /// start), and hears of its success when the body ends whole. An empty
    /// body (a trailers-only gRPC answer, a 204) can neither stall nor
    /// break.
    fn watch(
        &self,
        response: Response<Body>,
        grpc: bool,
        deferred: Option<Duration>,
    ) -> Response<Body> {
        if http_body::Body::is_end_stream(response.body()) {
            return response;
        }
        let status_seen = grpc && response.headers().contains_key(crate::grpc::STATUS);
        let metrics = self.metrics.clone();
        let breaker = self.breaker.clone();
        let started = Instant::now();
        let on_end: stream::OnEnd = Box::new(move |cut| {
            let Some(breaker) = breaker else {
                if let Some(cut) = cut {
                    count(&metrics, cut);
                }
                return;
            };
            match (cut, deferred) {
                // The caller stopped reading: it says nothing of the
                // upstream, which had answered well so far.
                (Some(stream::Cut::Caller), headers) => {
                    count(&metrics, stream::Cut::Caller);
                    if let Some(headers) = headers {
                        breaker.record(Admission::Normal, None, headers);
                    }
                }
                (Some(cut), headers) => {
                    count(&metrics, cut);
                    let elapsed = headers.unwrap_or_default() + started.elapsed();
                    breaker.record(Admission::Normal, Some(Failure::Reset), elapsed);
                }
                (None, Some(headers)) => breaker.record(Admission::Normal, None, headers),
                (None, None) => {}
            }
        });
        response.map(|body| stream::watch(body, self.stream_timeouts, grpc, status_seen, on_end))
    }

    /// What an attempt's span starts with.
    fn span_start(
        &self,
        number: u32,
        cause: Option<Cause>,
        breaker: Option<&'static str>,
        injection: Option<&Injection>,
    ) -> AttemptStart<'_> {
        AttemptStart {
            upstream: &self.name,
            number,
            cause: cause.map(Cause::label),
            breaker,
            faults: injection.map(Injection::kinds).unwrap_or_default(),
        }
    }

    /// Sends an attempt with its injected faults, if any, and reads its
    /// JSON-RPC answer's verdict (`jsonrpc::peek`) when `peek` says which
    /// protocol it speaks.
    async fn send_rare(
        &self,
        injection: Option<Injection>,
        peek: Option<Dialect>,
        request: Request<Body>,
        completion: Option<Completion>,
    ) -> Result<Response<Body>, ProxyError> {
        let answer = match injection {
            None => self.client.send(request, completion).await,
            Some(injection) => self.inject(injection, request, completion).await,
        };
        match (peek, answer) {
            (Some(dialect), Ok(response)) => {
                let timeouts = self.stream_timeouts;
                jsonrpc::peek(response, dialect, timeouts, &self.metrics, &self.name).await
            }
            (_, answer) => answer,
        }
    }

    /// Sends an attempt with its injected faults.
    async fn inject(
        &self,
        injection: Injection,
        request: Request<Body>,
        completion: Option<Completion>,
    ) -> Result<Response<Body>, ProxyError> {
        if let Some(delay) = injection.delay {
            self.metrics.fault(FaultKind::Delay.label());
            tokio::time::sleep(delay).await;
        }
        if let Some(answer) = injection.abort {
            self.metrics.fault(FaultKind::Abort.label());
            return Ok(answer);
        }
        let response = self.client.send(request, completion).await?;
        Ok(match injection.truncate {
            Some(after) => response.map(|b| faults::truncate(b, after, self.metrics.clone())),
            None => response,
        })
    }
}

/// Counts a stream that was cut.
fn count(metrics: &UpstreamMetrics, cut: stream::Cut) {
    match cut {
        stream::Cut::FirstByte => metrics.stream_cut(true),
        stream::Cut::Idle => metrics.stream_cut(false),
        stream::Cut::Caller => metrics.caller_idle(),
        broken => metrics.broken_stream(broken.label()),
    }
}

/// An attempt's admission while it waits for its answer. An attempt
/// dropped unanswered because the call's deadline passed (the overall
/// timeout, with no `per_try_timeout` shorter) counts for the breaker as
/// a timed-out attempt: an upstream that accepts calls and never answers
/// must open the circuit. Dropped for another reason (the caller went
/// away, another hedged attempt won, the caller's own deadline passed),
/// it counts for nothing.
struct Unanswered<'a> {
    breaker: Option<&'a Breaker>,
    admission: Option<Admission>,
    deadline: Instant,
    started: Instant,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if let (Some(breaker), Some(admission)) = (self.breaker, self.admission.take())
            && Instant::now() >= self.deadline
        {
            breaker.record(
                admission,
                Some(Failure::PerTryTimeout),
                self.started.elapsed(),
            );
        }
    }
}
