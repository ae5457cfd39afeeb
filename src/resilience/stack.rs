//! The order of the layers, in one place.
//!
//! Each upstream gets one stack, built when the config loads, outer to
//! inner:
//!
//! | layer | per | why here |
//! |---|---|---|
//! | deadline | call | Outermost: the call's deadline covers waiting for a slot, every attempt and every backoff. |
//! | concurrency | call | Above retry, so a call holds one slot for all its attempts (retries cannot multiply in-flight load), and a shed call is never retried. Below the deadline, so waiting for a slot counts against it. |
//! | retry | call | Sees each attempt's classified result and decides; replays the body. |
//! | circuit breaker | attempt | Below retry, so every attempt counts and an open circuit fails an attempt at once; `circuit-open` is not a retryable failure, so retries stop there. |
//! | per-try timeout | attempt | Below the breaker, so a timed-out attempt counts as a failure; sets the outgoing deadline header to the time left. |
//! | client | attempt | Sends one attempt on the pooled (HTTP/1.1) or shared (HTTP/2) connection, and reads the first frame of a unary-like gRPC answer so a status in its trailers is classified too. |
//!
//! The order is pinned by `tests/resilience.rs::layer_order`.

use std::sync::Arc;

use http::{Request, Response};
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

use super::BoxFuture;
use super::breaker::{Breaker, BreakerLayer};
use super::concurrency::ConcurrencyLayer;
use super::deadline::DeadlineLayer;
use super::policy::Policy;
use super::retry::RetryLayer;
use super::timeout::PerTryTimeoutLayer;
use crate::body::Body;
use crate::edge::ProxyError;
use crate::sidecar::UpstreamClient;
use crate::telemetry::metrics::UpstreamMetrics;

/// One upstream's stack, type-erased and cheap to clone.
pub type Stack = BoxCloneSyncService<Request<Body>, Response<Body>, ProxyError>;

/// Builds the stack for an upstream. Returns its breaker too, for the
/// admin endpoint.
pub fn build(
    name: Arc<str>,
    policy: &Policy,
    client: Arc<UpstreamClient>,
    metrics: &UpstreamMetrics,
) -> (Stack, Option<Arc<Breaker>>) {
    let breaker = policy
        .circuit_breaker
        .clone()
        .map(|params| Breaker::new(name.clone(), params, metrics.clone()));
    let stack = ServiceBuilder::new()
        .layer(DeadlineLayer::new(
            name.clone(),
            policy.timeout,
            metrics.clone(),
        ))
        .layer(ConcurrencyLayer::new(
            name.clone(),
            policy.max_concurrent_requests,
            policy.max_pending,
            metrics.clone(),
        ))
        .layer(RetryLayer::new(
            policy.retry.clone(),
            policy.hedge.clone(),
            metrics.clone(),
        ))
        .layer(BreakerLayer::new(name.clone(), breaker.clone()))
        .layer(PerTryTimeoutLayer::new(
            name,
            policy.per_try_timeout,
            metrics.clone(),
        ))
        .service(Client(client));
    (BoxCloneSyncService::new(stack), breaker)
}

/// The innermost service: one attempt on the wire.
#[derive(Debug, Clone)]
struct Client(Arc<UpstreamClient>);

impl tower::Service<Request<Body>> for Client {
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = BoxFuture;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), ProxyError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> BoxFuture {
        let client = self.0.clone();
        Box::pin(async move { client.send(request).await })
    }
}
