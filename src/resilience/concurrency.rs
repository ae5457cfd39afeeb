//! Concurrency limit with load shedding.
//!
//! At most `max_concurrent_requests` calls are in flight to an upstream,
//! from the moment they are admitted until their answer has been streamed
//! to the caller; at most `max_pending` more wait for a slot, bounded by
//! the call's deadline. Anything beyond is shed at once with 503 /
//! `RESOURCE_EXHAUSTED` and `x-breakwater-error: overloaded`: a queue
//! without a bound only turns overload into latency and memory growth.
//!
//! Why a semaphore taken in `call` rather than in `poll_ready`: the sidecar
//! serves each request with a fresh clone of the stack (`oneshot`), so the
//! permit's life is the request's either way, and taking it in `call` lets
//! the queue length be counted and bounded, which `poll_ready` cannot say.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::sync::Semaphore;

use super::BoxFuture;
use crate::body::{self, Body};
use crate::edge::ProxyError;
use crate::telemetry::metrics::UpstreamMetrics;

/// Limits and queues calls to one upstream.
#[derive(Debug, Clone)]
pub struct ConcurrencyLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    upstream: Arc<str>,
    slots: Arc<Semaphore>,
    waiting: AtomicU32,
    max_pending: u32,
    metrics: UpstreamMetrics,
}

impl ConcurrencyLayer {
    /// `max_concurrent` in flight, `max_pending` waiting.
    pub fn new(
        upstream: Arc<str>,
        max_concurrent: u32,
        max_pending: u32,
        metrics: UpstreamMetrics,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                upstream,
                slots: Arc::new(Semaphore::new(max_concurrent as usize)),
                waiting: AtomicU32::new(0),
                max_pending,
                metrics,
            }),
        }
    }
}

impl<S> tower::Layer<S> for ConcurrencyLayer {
    type Service = Concurrency<S>;

    fn layer(&self, inner: S) -> <Self as tower::Layer<S>>::Service {
        Concurrency {
            shared: self.shared.clone(),
            inner,
        }
    }
}

/// The service of [`ConcurrencyLayer`].
#[derive(Debug, Clone)]
pub struct Concurrency<S> {
    shared: Arc<Shared>,
    inner: S,
}

/// Leaves the queue when dropped, so a cancelled waiter frees its place.
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S> tower::Service<Request<Body>> for Concurrency<S>
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
        let shared = self.shared.clone();
        // Take the service that was polled ready; leave a clone behind.
        let inner = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, inner);
        Box::pin(async move {
            let permit = match shared.slots.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    let queued = shared.waiting.fetch_add(1, Ordering::AcqRel);
                    let _waiting = Waiting(&shared.waiting);
                    if queued >= shared.max_pending {
                        shared.metrics.shed();
                        return Err(ProxyError::Overloaded {
                            upstream: shared.upstream.clone(),
                        });
                    }
                    shared
                        .slots
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("the semaphore is never closed")
                }
            };
            let response = inner.call(request).await?;
            Ok(response.map(|b| body::with_guard(b, permit)))
        })
    }
}
