//! Concurrency limit with load shedding.
//!
//! At most `max_concurrent_requests` calls are in flight to an upstream,
//! from the moment they are admitted until their answer has been streamed
//! to the caller; at most `max_pending` more wait for a slot, bounded by
//! the call's deadline. Anything beyond is shed at once with 503 /
//! `RESOURCE_EXHAUSTED` and `x-breakwater-error: overloaded`: a queue
//! without a bound only turns overload into latency and memory growth.
//!
//! One caller connection may hold at most `max_connection_share` of the
//! slots, waiting calls included: an HTTP/2 connection
//! carries up to 1024 calls at once, and one that keeps them all (a
//! caller that stopped reading, a runaway loop) would leave every other
//! caller shed. Its calls beyond its share are shed at once. An HTTP/1.1
//! connection carries one call at a time and is not counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ProxyError;
use crate::telemetry::metrics::UpstreamMetrics;
use crate::transport::server;

/// One upstream's slots and queue.
#[derive(Debug)]
pub struct Limiter {
    upstream: Arc<str>,
    slots: Arc<Semaphore>,
    waiting: AtomicU32,
    max_pending: u32,
    /// Slots one caller connection may hold; none: no bound but the slots.
    per_caller: Option<u32>,
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
    /// `max_concurrent` in flight, `max_pending` waiting, and at most
    /// `share` of `max_concurrent` (at least one) for one caller
    /// connection.
    pub fn new(
        upstream: Arc<str>,
        max_concurrent: u32,
        max_pending: u32,
        share: f64,
        metrics: UpstreamMetrics,
    ) -> Self {
        let per_caller = (f64::from(max_concurrent) * share).ceil().max(1.0) as u32;
        Self {
            upstream,
            slots: Arc::new(Semaphore::new(max_concurrent as usize)),
            waiting: AtomicU32::new(0),
            max_pending,
            per_caller: (per_caller < max_concurrent).then_some(per_caller),
            metrics,
        }
    }

    /// A slot for one call: at once, after waiting in the bounded queue,
    /// or not at all (shed), and shed too when the HTTP/2 connection it
    /// came on holds its share (`transport::server::take_share`, held
    /// until the call's stream ends). Hold the permit until the answer is
    /// streamed.
    pub async fn acquire(&self) -> Result<OwnedSemaphorePermit, ProxyError> {
        if let Some(share) = self.per_caller {
            let key = Arc::as_ptr(&self.slots) as usize;
            if server::take_share(key, share) == Some(false) {
                self.metrics.shed();
                return Err(ProxyError::OverShare {
                    upstream: self.upstream.clone(),
                    share,
                });
            }
        }
        self.slot().await
    }

    /// A slot of the upstream's, whoever asks.
    async fn slot(&self) -> Result<OwnedSemaphorePermit, ProxyError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::Metrics;

    fn limiter(max: u32, share: f64) -> Limiter {
        let metrics = Metrics::new().upstream("u");
        Limiter::new("u".into(), max, 0, share, metrics)
    }

    #[test]
    fn a_connections_share_is_rounded_up_never_none_and_the_whole_one_is_not_counted() {
        assert_eq!(limiter(5, 0.5).per_caller, Some(3));
        assert_eq!(limiter(10, 0.0).per_caller, Some(1));
        assert_eq!(limiter(1024, 0.5).per_caller, Some(512));
        assert_eq!(limiter(2, 1.0).per_caller, None);
        assert_eq!(limiter(1, 0.5).per_caller, None, "one slot: all of it");
    }

    #[tokio::test]
    async fn outside_an_http2_stream_only_the_slots_count() {
        let limiter = limiter(2, 0.5);
        let _both = (
            limiter.acquire().await.unwrap(),
            limiter.acquire().await.unwrap(),
        );
        let shed = limiter.acquire().await.unwrap_err();
        assert!(matches!(shed, ProxyError::Overloaded { .. }), "{shed}");
    }
}
