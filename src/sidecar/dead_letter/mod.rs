//! Dead letters, sidecar side: capture a request that finally failed, keep
//! it in a local spool, and ship it to the control plane.
//!
//! Capture costs nothing for upstreams without `dead_letter`. With it, the
//! request body is teed as the upstream reads it ([`Capture`]), up to
//! `max_body`; if the call fails before the body was read whole (an
//! unreachable upstream reads nothing), the rest is read from the caller
//! after the answer has been sent, within a second. The caller's answer is
//! never delayed by dead-lettering.
//!
//! Letters go through a bounded channel to one shipper task, which writes
//! each to a sled spool (flushed, so a restart loses nothing) as they come
//! and, at the same time, sends the spool's oldest letters to the control
//! plane, in order, backing off while it is unreachable. Only a full spool
//! drops new letters, counted (and a queue full because the disk cannot
//! keep up, counted the same way). Each letter gets a capture id when it
//! is captured; the control plane stores a letter sent twice (after a
//! crash between its delivery and its removal from the spool) once.
//!
//! With `dead_letter.durable: true`, the caller's answer waits until its
//! letter is in the spool and flushed: a crash of the sidecar right after
//! the answer loses nothing, at the cost of a disk flush (batched with the
//! other letters of the moment) on the failing call's answer.

mod capture;
mod spool;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method, Uri};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::api::seal::LetterKey;
use crate::api::{DeadLetter, Header};
use crate::config::Config;
use crate::telemetry::metrics::Metrics;

pub use capture::Capture;
use spool::{Queued, Spool, client, ship};

/// Headers never kept in a letter: the generic credentials, and the API
/// keys of the model providers agents call (Anthropic and others'
/// `x-api-key`, Azure OpenAI's `api-key`, Google's `x-goog-api-key`).
const CREDENTIALS: [&str; 6] = [
    "authorization",
    "cookie",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
];
/// Headers that describe the failed call, not the request: a replay gets
/// its own deadline and attempt number.
const CALL_HEADERS: [&str; 4] = [
    "grpc-timeout",
    "x-breakwater-deadline-ms",
    "x-breakwater-attempt",
    "content-length",
];
/// How long the rest of a request body may take to arrive after a failure.
const REST_OF_BODY: Duration = Duration::from_secs(1);
/// Letters waiting for the shipper at most.
const QUEUE: usize = 1024;
/// How long one delivery may take.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Why the dead-letter spool could not start.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool directory cannot be opened.
    #[error("cannot open the dead-letter spool in {dir}: {message}")]
    Open {
        /// The directory.
        dir: PathBuf,
        /// Why.
        message: String,
    },
    /// The control plane's token or URL is unusable.
    #[error("control_plane: {0}")]
    ControlPlane(String),
}

/// A started sink and its shipper task.
pub type Started = (Arc<DeadLetters>, tokio::task::JoinHandle<()>);

/// The sidecar's dead-letter sink: where captured letters go.
#[derive(Debug)]
pub struct DeadLetters {
    queue: mpsc::Sender<Queued>,
    redact: Vec<HeaderName>,
    source: String,
    /// Seals letters, when the control plane shares a key.
    key: Option<LetterKey>,
    metrics: Arc<Metrics>,
    /// How delivery to the control plane goes.
    delivery: Arc<spool::Delivery>,
    /// Letters being finished in the background.
    pending: std::sync::atomic::AtomicUsize,
    settled: Notify,
}

impl DeadLetters {
    /// Opens the spool and starts the shipper, if the config names a
    /// control plane. The shipper stops (after spooling what is queued)
    /// when `stop` turns true; await the returned handle for that.
    pub fn start(
        config: &Config,
        metrics: Arc<Metrics>,
        stop: watch::Receiver<bool>,
    ) -> Result<Option<Started>, SpoolError> {
        let Some(control_plane) = &config.control_plane else {
            return Ok(None);
        };
        let settings = &config.dead_letters;
        let spool = Spool::open(
            &settings.spool_dir,
            settings.max_spool_bytes,
            metrics.clone(),
        )?;
        let client = client(control_plane)?;
        let key = control_plane
            .letter_key_file
            .as_deref()
            .map(LetterKey::read)
            .transpose()
            .map_err(SpoolError::ControlPlane)?;
        let (queue, letters) = mpsc::channel(QUEUE);
        let mut redact: Vec<HeaderName> = CREDENTIALS
            .iter()
            .chain(&CALL_HEADERS)
            .map(|h| HeaderName::from_static(h))
            .collect();
        redact.extend(
            settings
                .redact_headers
                .iter()
                .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
        );
        let source = std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| "sidecar".into());
        let delivery = Arc::new(spool::Delivery::new(&control_plane.url));
        let shipper = tokio::spawn(ship(spool, letters, client, delivery.clone(), stop));
        Ok(Some((
            Arc::new(Self {
                queue,
                redact,
                source,
                key,
                metrics,
                delivery,
                pending: std::sync::atomic::AtomicUsize::new(0),
                settled: Notify::new(),
            }),
            shipper,
        )))
    }

    /// `/readyz`'s line on delivery to the control plane.
    pub fn delivery_detail(&self) -> String {
        self.delivery.detail()
    }

    /// The parts of a request a letter keeps, taken before it is sent: a
    /// clone of the head (shared bytes, no copies); it becomes the letter's
    /// text only if the call fails.
    pub fn head(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Head {
        Head {
            method: method.clone(),
            uri: uri.clone(),
            headers: headers.clone(),
        }
    }

    /// A head's headers as a letter keeps them: without credentials
    /// (`redact_headers`) and hop-by-hop headers.
    fn kept_headers(&self, headers: &HeaderMap) -> Vec<Header> {
        headers
            .iter()
            .filter(|(name, _)| {
                !self.redact.contains(*name) && !crate::transport::headers::is_hop_by_hop(name)
            })
            .map(|(name, value)| Header {
                name: name.as_str().to_owned(),
                value: Bytes::copy_from_slice(value.as_bytes()),
            })
            .collect()
    }

    /// Finishes a failed call's letter (reading what is left of the body)
    /// and queues it, in the background. `durable`: the returned receiver
    /// answers once the letter is flushed to the spool (or dropped).
    pub fn submit(
        self: &Arc<Self>,
        upstream: &str,
        head: Head,
        capture: Capture,
        failure: Failed,
        durable: bool,
    ) -> Option<oneshot::Receiver<()>> {
        let sink = self.clone();
        let upstream = upstream.to_owned();
        let (ack, flushed) = match durable {
            true => {
                let (ack, flushed) = oneshot::channel();
                (Some(ack), Some(flushed))
            }
            false => (None, None),
        };
        self.pending
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        tokio::spawn(async move {
            let (body, truncated) = capture.finish().await;
            let mut letter = DeadLetter {
                upstream: upstream.clone(),
                source: sink.source.clone(),
                method: head.method.to_string(),
                uri: redacted_target(&head.uri),
                headers: sink.kept_headers(&head.headers),
                body,
                body_truncated: truncated,
                reason: failure.reason,
                attempts: failure.attempts,
                grpc: failure.grpc,
                failed_at: Some(prost_types::Timestamp::from(SystemTime::now())),
                capture_id: capture_id(),
                ..Default::default()
            };
            if let Some(key) = &sink.key {
                letter.seal = key.seal(&letter);
            }
            sink.metrics.dead_letter_captured(&upstream);
            if sink.queue.try_send((letter, ack)).is_err() {
                tracing::warn!(
                    upstream,
                    "dead-letter queue full: the spool cannot keep up; letter dropped"
                );
                sink.metrics.dead_letter_dropped(&upstream);
            }
            if sink
                .pending
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
                == 1
            {
                sink.settled.notify_waiters();
            }
        });
        flushed
    }

    /// Waits (up to `limit`) until every letter being finished is queued,
    /// so that a shutdown spools them.
    pub async fn settle(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            loop {
                let settled = self.settled.notified();
                if self.pending.load(std::sync::atomic::Ordering::Acquire) == 0 {
                    return;
                }
                settled.await;
            }
        })
        .await;
    }
}

/// A new capture id: 128 random bits, in hex.
fn capture_id() -> String {
    format!("{:032x}", fastrand::u128(..))
}

/// Query parameters whose values are credentials, left out of letters.
const SECRET_PARAMS: [&str; 8] = [
    "token",
    "access_token",
    "api_key",
    "apikey",
    "key",
    "sig",
    "signature",
    "password",
];

/// A request's path and query as a letter keeps it: the values of
/// credential parameters (`?api_key=`, `?token=`, ...) replaced by
/// `redacted`.
fn redacted_target(uri: &Uri) -> String {
    let Some(target) = uri.path_and_query() else {
        return "/".to_owned();
    };
    let Some(query) = target.query() else {
        return target.as_str().to_owned();
    };
    let params: Vec<String> = query
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((name, _)) if SECRET_PARAMS.iter().any(|s| s.eq_ignore_ascii_case(name)) => {
                format!("{name}=redacted")
            }
            _ => param.to_owned(),
        })
        .collect();
    format!("{}?{}", target.path(), params.join("&"))
}

/// A request's method, target and headers, as a letter keeps them.
#[derive(Debug)]
pub struct Head {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

/// How a call finally failed.
#[derive(Debug)]
pub struct Failed {
    /// The reason (`connect-failure`, `http-503`, ...).
    pub reason: String,
    /// Attempts made.
    pub attempts: u32,
    /// Whether it was a gRPC call.
    pub grpc: bool,
}

#[cfg(test)]
mod tests {
    #[test]
    fn credential_parameters_are_left_out_of_the_target() {
        let uri: http::Uri = "/v1/x?batch=7&api_key=abc&TOKEN=t&keyword=k&sig"
            .parse()
            .unwrap();
        assert_eq!(
            super::redacted_target(&uri),
            "/v1/x?batch=7&api_key=redacted&TOKEN=redacted&keyword=k&sig"
        );
        let plain: http::Uri = "/orders?batch=7".parse().unwrap();
        assert_eq!(super::redacted_target(&plain), "/orders?batch=7");
    }
}
