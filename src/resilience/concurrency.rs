//! Concurrency limit with load shedding.
//!
//! At most `max_concurrent_requests` calls are in flight to an upstream,
//! from the moment they are admitted until their answer has been streamed
//! to the caller; at most `max_pending` more wait for a slot, bounded by
//! the call's deadline. Anything beyond is shed at once with 503 /
//! `RESOURCE_EXHAUSTED` and `x-breakwater-error: overloaded`: a queue
//! without a bound only turns overload into latency and memory growth.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ProxyError;
use crate::telemetry::metrics::UpstreamMetrics;

/// One upstream's slots and queue.
#[derive(Debug)]
pub struct Limiter {
    upstream: Arc<str>,
    slots: Arc<Semaphore>,
    waiting: AtomicU32,
    max_pending: u32,
    metrics: UpstreamMetrics,
}

/// Leaves the queue when dropped, so a cancelled waiter frees its place.
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Limiter {
    /// `max_concurrent` in flight, `max_pending` waiting.
    pub fn new(
        upstream: Arc<str>,
        max_concurrent: u32,
        max_pending: u32,
        metrics: UpstreamMetrics,
    ) -> Self {
        Self {
            upstream,
            slots: Arc::new(Semaphore::new(max_concurrent as usize)),
            waiting: AtomicU32::new(0),
            max_pending,
            metrics,
        }
    }

    /// A slot for one call: at once, after waiting in the bounded queue,
    /// or not at all (shed). Hold the permit until the answer is streamed.
    pub async fn acquire(&self) -> Result<OwnedSemaphorePermit, ProxyError> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let queued = self.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.waiting);
        if queued >= self.max_pending {
            self.metrics.shed();
            return Err(ProxyError::Overloaded {
                upstream: self.upstream.clone(),
            });
        }
        Ok(self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed"))
    }
}
