//! Pushback holds: when an upstream answers a rate limit (429,
//! `RESOURCE_EXHAUSTED`) and says how long to wait (`Retry-After`,
//! `retry-after-ms`, `grpc-retry-pushback-ms`, the providers' reset
//! headers), every attempt to it is answered at once, until then, with 429
//! / `RESOURCE_EXHAUSTED`, `x-breakwater-error: pushback` and the time
//! left: agents do not hammer a provider that said wait, and the circuit
//! stays closed, since rate limiting is not an outage.
//!
//! The request path reads one atomic; the hold only ever grows.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use http::Response;
use tokio::time::Instant;

use super::retry::pushback::{self, Pushback};
use crate::classify::Failure;

/// One upstream's hold.
#[derive(Debug)]
pub struct Hold {
    /// When the hold was made: times below are milliseconds after it.
    epoch: Instant,
    /// The end of the hold, in milliseconds after `epoch` (0: none).
    until_ms: AtomicU64,
    /// The longest hold honoured.
    max: Duration,
}

impl Hold {
    /// A hold of at most `max` per answer.
    pub fn new(max: Duration) -> Self {
        Self {
            epoch: Instant::now(),
            until_ms: AtomicU64::new(0),
            max,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// How long the hold still lasts, if it does.
    pub fn remaining(&self) -> Option<Duration> {
        let until = self.until_ms.load(Ordering::Acquire);
        if until == 0 {
            return None;
        }
        let now = self.now_ms();
        (until > now).then(|| Duration::from_millis(until - now))
    }

    /// Holds the upstream after a rate-limited answer that says for how
    /// long; other answers change nothing.
    pub fn observe<B>(&self, response: &Response<B>, failure: Option<Failure>) {
        if !failure.is_some_and(Failure::is_rate_limit) {
            return;
        }
        let Pushback::Wait(wait) = pushback::parse(response.headers(), SystemTime::now()) else {
            return;
        };
        let wait = wait.min(self.max);
        if wait.is_zero() {
            return;
        }
        let until = self
            .now_ms()
            .saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
        self.until_ms.fetch_max(until, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body;

    fn answer(status: u16, header: Option<(&str, &str)>) -> Response<body::Body> {
        let mut r = Response::new(body::empty());
        *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
        if let Some((name, value)) = header {
            r.headers_mut().insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        r
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limit_with_a_wait_holds_until_it_passes() {
        let hold = Hold::new(Duration::from_secs(60));
        assert_eq!(hold.remaining(), None);
        let busy = answer(503, Some(("retry-after", "5")));
        hold.observe(&busy, Some(Failure::Http(503)));
        assert_eq!(hold.remaining(), None, "only rate limits hold");
        hold.observe(&answer(429, None), Some(Failure::Http(429)));
        assert_eq!(hold.remaining(), None, "no wait said, no hold");
        let limited = answer(429, Some(("retry-after-ms", "1500")));
        hold.observe(&limited, Some(Failure::Http(429)));
        assert_eq!(hold.remaining(), Some(Duration::from_millis(1500)));
        tokio::time::advance(Duration::from_millis(1000)).await;
        assert_eq!(hold.remaining(), Some(Duration::from_millis(500)));
        let shorter = answer(429, Some(("retry-after-ms", "100")));
        hold.observe(&shorter, Some(Failure::Http(429)));
        assert_eq!(
            hold.remaining(),
            Some(Duration::from_millis(500)),
            "never shortened"
        );
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(hold.remaining(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_is_capped() {
        let hold = Hold::new(Duration::from_secs(2));
        let grpc = answer(200, Some(("grpc-retry-pushback-ms", "600000")));
        hold.observe(&grpc, Some(Failure::Grpc(crate::grpc::RESOURCE_EXHAUSTED)));
        assert_eq!(hold.remaining(), Some(Duration::from_secs(2)));
    }
}
