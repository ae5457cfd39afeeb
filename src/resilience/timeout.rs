//! Per-try timeout: bounds one attempt, and tells the upstream how long it
//! has.
//!
//! Each attempt gets the sooner of `per_try_timeout` and the call's time
//! left (the [`Deadline`] extension), and carries it in `grpc-timeout`
//! (gRPC) or `x-breakwater-deadline-ms` (HTTP), overwriting what the caller
//! sent: the upstream never sees more time than is left. An attempt that
//! outlives `per_try_timeout` fails with `PerTryTimeout`, which the retry
//! layer above may retry (condition `per-try-timeout` or
//! `deadline-exceeded`) and the breaker counts.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request, Response};

use super::BoxFuture;
use super::deadline::{DEADLINE_HEADER, Deadline, encode_grpc_timeout};
use crate::body::Body;
use crate::edge::{self, ProxyError};
use crate::telemetry::metrics::UpstreamMetrics;

/// Bounds each attempt.
#[derive(Debug, Clone)]
pub struct PerTryTimeoutLayer {
    upstream: Arc<str>,
    per_try: Option<Duration>,
    metrics: UpstreamMetrics,
}

impl PerTryTimeoutLayer {
    /// A layer bounding each attempt by `per_try` (if any) and the deadline.
    pub fn new(upstream: Arc<str>, per_try: Option<Duration>, metrics: UpstreamMetrics) -> Self {
        Self {
            upstream,
            per_try,
            metrics,
        }
    }
}

impl<S> tower::Layer<S> for PerTryTimeoutLayer {
    type Service = PerTryTimeout<S>;

    fn layer(&self, inner: S) -> <Self as tower::Layer<S>>::Service {
        PerTryTimeout {
            layer: self.clone(),
            inner,
        }
    }
}

/// The service of [`PerTryTimeoutLayer`].
#[derive(Debug, Clone)]
pub struct PerTryTimeout<S> {
    layer: PerTryTimeoutLayer,
    inner: S,
}

impl<S> tower::Service<Request<Body>> for PerTryTimeout<S>
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
        let left = request
            .extensions()
            .get::<Deadline>()
            .map(Deadline::remaining);
        let budget = match (left, self.layer.per_try) {
            (Some(left), Some(per_try)) => Some(left.min(per_try)),
            (left, per_try) => left.or(per_try),
        };
        if let Some(budget) = budget {
            let headers = request.headers_mut();
            if edge::is_grpc(headers) {
                headers.insert("grpc-timeout", encode_grpc_timeout(budget));
            } else {
                headers.insert(
                    DEADLINE_HEADER,
                    HeaderValue::from(budget.as_millis() as u64),
                );
            }
        }
        let call = self.inner.call(request);
        let Some(per_try) = self.layer.per_try else {
            return Box::pin(call);
        };
        let layer = self.layer.clone();
        Box::pin(async move {
            match tokio::time::timeout(per_try, call).await {
                Ok(result) => result,
                Err(_) => {
                    layer.metrics.timeout(true);
                    Err(ProxyError::PerTryTimeout {
                        upstream: layer.upstream,
                        after: per_try,
                    })
                }
            }
        })
    }
}
