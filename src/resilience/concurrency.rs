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
//! slots, waiting calls included ([`CallerShare`]): an HTTP/2 connection
//! carries up to 1024 calls at once, and one that keeps them all (a
//! caller that stopped reading, a runaway loop) would leave every other
//! caller shed. Its calls beyond its share are shed at once. An HTTP/1.1
//! connection carries one call at a time and is not counted.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

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
    /// Slots one caller connection may hold; none: no bound but the slots.
    per_caller: Option<u32>,
    metrics: UpstreamMetrics,
}

/// A call's slot, and its place in its caller connection's share when
/// that is counted: both given back when dropped.
pub type Slot = (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>);

/// What one caller connection holds of each upstream's slots: a
/// semaphore of its share per upstream, made at its first call there.
#[derive(Debug, Default)]
pub struct CallerShare {
    shares: Mutex<Vec<(usize, Arc<Semaphore>)>>,
}

impl CallerShare {
    /// A place in this connection's share of the slots `key` names, which
    /// holds `share` places; none when they are all taken.
    fn take(&self, key: usize, share: u32) -> Option<OwnedSemaphorePermit> {
        let mut shares = self.shares.lock().unwrap_or_else(|e| e.into_inner());
        let semaphore = match shares.iter().find(|(k, _)| *k == key) {
            Some((_, semaphore)) => semaphore.clone(),
            None => {
                // Shares nothing holds (of upstreams the connection no
                // longer calls, or a reload replaced) are forgotten.
                shares.retain(|(_, s)| Arc::strong_count(s) > 1);
                let semaphore = Arc::new(Semaphore::new(share as usize));
                shares.push((key, semaphore.clone()));
                semaphore
            }
        };
        drop(shares);
        semaphore.try_acquire_owned().ok()
    }
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
    /// or not at all (shed), and shed too when `caller`, the connection it
    /// came on, holds its share. Hold the slot until the answer is
    /// streamed.
    pub async fn acquire(&self, caller: Option<&CallerShare>) -> Result<Slot, ProxyError> {
        let share = match (caller, self.per_caller) {
            (Some(caller), Some(share)) => {
                let key = Arc::as_ptr(&self.slots) as usize;
                let Some(place) = caller.take(key, share) else {
                    self.metrics.shed();
                    return Err(ProxyError::OverShare {
                        upstream: self.upstream.clone(),
                        share,
                    });
                };
                Some(place)
            }
            _ => None,
        };
        Ok((self.slot().await?, share))
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

    #[tokio::test]
    async fn one_connection_holds_its_share_at_most_and_others_the_rest() {
        // Half of 5, rounded up.
        let limiter = limiter(5, 0.5);
        let (greedy, other) = (CallerShare::default(), CallerShare::default());
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(limiter.acquire(Some(&greedy)).await.unwrap());
        }
        let shed = limiter.acquire(Some(&greedy)).await.unwrap_err();
        assert!(
            matches!(shed, ProxyError::OverShare { share: 3, .. }),
            "{shed}"
        );
        assert_eq!(shed.reason(), "overloaded");
        held.push(limiter.acquire(Some(&other)).await.unwrap());
        held.push(limiter.acquire(None).await.unwrap());
        assert!(matches!(
            limiter.acquire(Some(&other)).await.unwrap_err(),
            ProxyError::Overloaded { .. }
        ));
        // A place given back is the connection's to take again.
        drop(held.swap_remove(0));
        held.push(limiter.acquire(Some(&greedy)).await.unwrap());
    }

    #[tokio::test]
    async fn the_whole_share_counts_nothing_and_a_tiny_one_still_allows_one_call() {
        let whole = limiter(2, 1.0);
        assert_eq!(whole.per_caller, None);
        let caller = CallerShare::default();
        let _both = (
            whole.acquire(Some(&caller)).await.unwrap(),
            whole.acquire(Some(&caller)).await.unwrap(),
        );
        assert!(caller.shares.lock().unwrap().is_empty());
        let tiny = limiter(10, 0.0);
        let _one = tiny.acquire(Some(&caller)).await.unwrap();
        assert!(tiny.acquire(Some(&caller)).await.is_err());
    }
}
