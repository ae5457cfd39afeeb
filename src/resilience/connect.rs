//! Policy for streams the sidecar does not read (TLS it does not
//! terminate, relayed to an upstream): what can be judged is the connect.
//!
//! - Each connect is bounded by [`CONNECT_TIMEOUT`].
//! - A failed connect is tried again, up to the upstream's
//!   `retry.max_attempts` in all, with its backoff, when its `retry.on`
//!   has `connect-failure` (the default): nothing was sent, so another try
//!   is always safe. Counted as `breakwater_retries_total{reason="connect-failure"}`.
//! - The breaker sees each connect: a failure as `connect-failure`, a
//!   connect that succeeds as a success. While it is open, the stream is
//!   refused at once, with no connect.
//!
//! Inside the stream nothing is judged: no per-request timeout, retry or
//! status, since the bytes are someone else's TLS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::breaker::Breaker;
use super::policy::RetryParams;
use super::retry::backoff;
use crate::classify::Failure;
use crate::telemetry::metrics::UpstreamMetrics;

/// How long one connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why no connection was made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The upstream's circuit is open.
    #[error("the circuit of upstream {0} is open")]
    CircuitOpen(Arc<str>),
    /// Every attempt failed; the last one's cause.
    #[error("cannot connect to {to} after {attempts} attempt(s): {cause}")]
    Failed {
        /// Where.
        to: SocketAddr,
        /// Attempts made.
        attempts: u32,
        /// The last attempt's failure.
        cause: String,
    },
}

/// What a connect to one upstream is held to.
#[derive(Debug, Clone, Copy)]
pub struct ConnectPolicy<'a> {
    /// The upstream's name, for the error.
    pub upstream: &'a Arc<str>,
    /// Its retries: attempts, backoff, and whether connect failures are
    /// retried.
    pub retry: &'a RetryParams,
    /// Its breaker, unless disabled.
    pub breaker: Option<&'a Arc<Breaker>>,
    /// Its metrics.
    pub metrics: &'a UpstreamMetrics,
}

/// Connects to `to` under `policy`.
pub async fn connect(to: SocketAddr, policy: ConnectPolicy<'_>) -> Result<TcpStream, ConnectError> {
    let attempts = if policy.retry.on.matches(Failure::ConnectFailure) {
        policy.retry.max_attempts.max(1)
    } else {
        1
    };
    let mut cause = String::new();
    for attempt in 1..=attempts {
        if attempt > 1 {
            policy.metrics.retry("connect-failure");
            let wait = backoff::wait(
                policy.retry.backoff_base,
                policy.retry.backoff_max,
                attempt - 1,
            );
            tokio::time::sleep(wait).await;
        }
        let admission = match policy.breaker.map(Breaker::admit) {
            None => None,
            Some(Ok(admission)) => Some(admission),
            Some(Err(_)) => return Err(ConnectError::CircuitOpen(policy.upstream.clone())),
        };
        let started = Instant::now();
        let result = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to)).await;
        let failure = match &result {
            Ok(Ok(_)) => None,
            Ok(Err(error)) => {
                cause = error.to_string();
                Some(Failure::ConnectFailure)
            }
            Err(_) => {
                cause = format!("no answer within {CONNECT_TIMEOUT:?}");
                Some(Failure::ConnectFailure)
            }
        };
        if let (Some(breaker), Some(admission)) = (policy.breaker, admission) {
            breaker.record(admission, failure, started.elapsed());
        }
        if let Ok(Ok(stream)) = result {
            let _ = stream.set_nodelay(true);
            return Ok(stream);
        }
    }
    Err(ConnectError::Failed {
        to,
        attempts,
        cause,
    })
}
