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
//! each to a sled spool (flushed, so a restart loses nothing) and sends the
//! spool's oldest letters to the control plane, in order, backing off while
//! it is unreachable. A full spool drops new letters, counted.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, Method, Uri};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prost::Message;
use tokio::sync::{Notify, mpsc, watch};

use crate::api::dead_letters_client::DeadLettersClient;
use crate::api::{DeadLetter, EnqueueDeadLetterRequest, Header};
use crate::body::{self, Body, BoxError};
use crate::config::{Config, ControlPlaneConfig};
use crate::telemetry::metrics::Metrics;

/// Headers never kept in a letter.
const CREDENTIALS: [&str; 3] = ["authorization", "cookie", "proxy-authorization"];
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
    queue: mpsc::Sender<DeadLetter>,
    redact: Vec<HeaderName>,
    source: String,
    metrics: Arc<Metrics>,
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
        let shipper = tokio::spawn(ship(spool, letters, client, stop));
        Ok(Some((
            Arc::new(Self {
                queue,
                redact,
                source,
                metrics,
                pending: std::sync::atomic::AtomicUsize::new(0),
                settled: Notify::new(),
            }),
            shipper,
        )))
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
    /// and queues it; runs in the background.
    pub fn submit(self: &Arc<Self>, upstream: &str, head: Head, capture: Capture, failure: Failed) {
        let sink = self.clone();
        let upstream = upstream.to_owned();
        self.pending
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        tokio::spawn(async move {
            let (body, truncated) = capture.finish().await;
            let letter = DeadLetter {
                upstream: upstream.clone(),
                source: sink.source.clone(),
                method: head.method.to_string(),
                uri: head
                    .uri
                    .path_and_query()
                    .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
                headers: sink.kept_headers(&head.headers),
                body,
                body_truncated: truncated,
                reason: failure.reason,
                attempts: failure.attempts,
                grpc: failure.grpc,
                failed_at: Some(prost_types::Timestamp::from(SystemTime::now())),
                ..Default::default()
            };
            sink.metrics.dead_letter_captured(&upstream);
            if sink.queue.try_send(letter).is_err() {
                tracing::warn!(upstream, "dead-letter queue full: letter dropped");
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

/// What has been read of a request body.
#[derive(Debug, Default)]
struct Captured {
    bytes: BytesMut,
    truncated: bool,
    ended: bool,
    /// The unread rest, put back when the body was dropped early.
    rest: Option<Incoming>,
    dropped: bool,
}

/// The capture of one request body.
#[derive(Debug, Clone)]
pub struct Capture {
    shared: Arc<Mutex<Captured>>,
    dropped: Arc<Notify>,
    max: usize,
}

impl Capture {
    /// A capture keeping up to `max` bytes.
    pub fn new(max: u64) -> Self {
        Self {
            shared: Arc::default(),
            dropped: Arc::new(Notify::new()),
            max: usize::try_from(max).unwrap_or(usize::MAX),
        }
    }

    /// Wraps the request body so that what is read is kept.
    pub fn wrap(&self, incoming: Incoming) -> Body {
        body::boxed(CaptureBody {
            inner: Some(incoming),
            capture: self.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Captured> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The body as far as it can be had: what was read, then the rest from
    /// the caller (within a second). `true` when it is not whole.
    pub async fn finish(self) -> (Bytes, bool) {
        let waited = tokio::time::timeout(REST_OF_BODY, async {
            loop {
                let notified = self.dropped.notified();
                let rest = {
                    let mut c = self.lock();
                    if c.ended || c.truncated {
                        return;
                    }
                    if !c.dropped {
                        None
                    } else {
                        match c.rest.take() {
                            Some(rest) => Some(rest),
                            None => return,
                        }
                    }
                };
                match rest {
                    None => notified.await,
                    Some(mut rest) => {
                        while let Some(frame) = rest.frame().await {
                            let Ok(frame) = frame else { return };
                            if let Ok(data) = frame.into_data() {
                                let mut c = self.lock();
                                let max = self.max;
                                keep(&mut c, &data, max);
                                if c.truncated {
                                    return;
                                }
                            }
                        }
                        self.lock().ended = true;
                        return;
                    }
                }
            }
        })
        .await;
        let mut c = self.lock();
        let whole = waited.is_ok() && c.ended && !c.truncated;
        (std::mem::take(&mut c.bytes).freeze(), !whole)
    }
}

fn keep(c: &mut Captured, data: &Bytes, max: usize) {
    let room = max.saturating_sub(c.bytes.len());
    if data.len() > room {
        c.bytes.extend_from_slice(&data[..room]);
        c.truncated = true;
    } else {
        c.bytes.extend_from_slice(data);
    }
}

/// A request body that keeps a copy of what is read.
struct CaptureBody {
    inner: Option<Incoming>,
    capture: Capture,
}

impl http_body::Body for CaptureBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let max = self.capture.max;
                    let mut c = self.capture.lock();
                    if !c.truncated {
                        keep(&mut c, data, max);
                    }
                }
            }
            Poll::Ready(None) => self.capture.lock().ended = true,
            _ => {}
        }
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|i| i.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map(|i| i.size_hint())
            .unwrap_or_default()
    }
}

impl Drop for CaptureBody {
    fn drop(&mut self) {
        let mut c = self.capture.lock();
        if !c.ended {
            c.rest = self.inner.take();
        }
        c.dropped = true;
        drop(c);
        self.capture.dropped.notify_waiters();
    }
}

type Client = DeadLettersClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        crate::api::token::Authorization,
    >,
>;

fn client(config: &ControlPlaneConfig) -> Result<Client, SpoolError> {
    let token = crate::api::token::Authorization::from_token_file(config.token_file.as_deref())
        .map_err(SpoolError::ControlPlane)?;
    let channel = tonic::transport::Endpoint::from_shared(config.url.clone())
        .map_err(|e| SpoolError::ControlPlane(e.to_string()))?
        .connect_timeout(DELIVERY_TIMEOUT)
        .timeout(DELIVERY_TIMEOUT)
        .connect_lazy();
    Ok(DeadLettersClient::with_interceptor(channel, token))
}

/// The local spool: letters by arrival, oldest first.
struct Spool {
    db: sled::Db,
    tree: sled::Tree,
    bytes: u64,
    max_bytes: u64,
    metrics: Arc<Metrics>,
}

impl Spool {
    fn open(
        dir: &std::path::Path,
        max_bytes: u64,
        metrics: Arc<Metrics>,
    ) -> Result<Self, SpoolError> {
        let open_error = |message: String| SpoolError::Open {
            dir: dir.to_owned(),
            message,
        };
        let db = sled::Config::new()
            .path(dir)
            .open()
            .map_err(|e| open_error(e.to_string()))?;
        let tree = db
            .open_tree("letters")
            .map_err(|e| open_error(e.to_string()))?;
        let mut bytes = 0;
        for entry in tree.iter() {
            let (_, value) = entry.map_err(|e| open_error(e.to_string()))?;
            bytes += value.len() as u64;
            if let Ok(letter) = DeadLetter::decode(&*value) {
                metrics.dead_letter_spooled(&letter.upstream, 1);
            }
        }
        if !tree.is_empty() {
            tracing::info!(
                letters = tree.len(),
                "dead letters waiting in the spool from before"
            );
        }
        Ok(Self {
            db,
            tree,
            bytes,
            max_bytes,
            metrics,
        })
    }

    /// Adds a letter, unless the spool is full.
    fn push(&mut self, letter: &DeadLetter) -> Result<(), sled::Error> {
        let encoded = letter.encode_to_vec();
        if self.bytes + encoded.len() as u64 > self.max_bytes {
            tracing::warn!(upstream = %letter.upstream, "dead-letter spool full: letter dropped");
            self.metrics.dead_letter_dropped(&letter.upstream);
            return Ok(());
        }
        let id = self.db.generate_id()?;
        self.tree.insert(id.to_be_bytes(), encoded.as_slice())?;
        self.bytes += encoded.len() as u64;
        self.metrics.dead_letter_spooled(&letter.upstream, 1);
        Ok(())
    }

    fn oldest(&self) -> Option<(sled::IVec, DeadLetter)> {
        let (key, value) = self.tree.first().ok()??;
        match DeadLetter::decode(&*value) {
            Ok(letter) => Some((key, letter)),
            Err(_) => {
                tracing::error!("a corrupt letter in the spool was dropped");
                let _ = self.tree.remove(&key);
                self.oldest()
            }
        }
    }

    fn remove(&mut self, key: &sled::IVec, letter: &DeadLetter) -> Result<(), sled::Error> {
        if let Some(value) = self.tree.remove(key)? {
            self.bytes = self.bytes.saturating_sub(value.len() as u64);
            self.metrics.dead_letter_spooled(&letter.upstream, -1);
        }
        Ok(())
    }

    async fn flush(&self) {
        let db = self.db.clone();
        if let Ok(Err(error)) = tokio::task::spawn_blocking(move || db.flush()).await {
            tracing::error!(%error, "flushing the dead-letter spool failed");
        }
    }
}

/// Spools letters as they come and delivers the spool in order.
async fn ship(
    mut spool: Spool,
    mut letters: mpsc::Receiver<DeadLetter>,
    mut client: Client,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let deliver_now = retry_at.is_none_or(|at| tokio::time::Instant::now() >= at);
        if deliver_now && let Some((key, letter)) = spool.oldest() {
            let enqueue = client.enqueue(EnqueueDeadLetterRequest {
                letter: Some(letter.clone()),
            });
            match tokio::time::timeout(DELIVERY_TIMEOUT, enqueue).await {
                Ok(Ok(_)) => {
                    if let Err(error) = spool.remove(&key, &letter) {
                        tracing::error!(%error, "removing a delivered letter from the spool failed");
                    }
                    spool.metrics.dead_letter_delivered(&letter.upstream);
                    backoff = BACKOFF_MIN;
                    retry_at = None;
                    continue;
                }
                failed => {
                    let error = match failed {
                        Ok(Err(status)) => status.message().to_owned(),
                        _ => "timed out".to_owned(),
                    };
                    tracing::warn!(%error, retry_in = ?backoff, "cannot deliver dead letters to the control plane; they wait in the spool");
                    retry_at = Some(tokio::time::Instant::now() + backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        let wait_retry = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            letter = letters.recv() => match letter {
                Some(letter) => {
                    if let Err(error) = spool.push(&letter) {
                        tracing::error!(%error, "spooling a dead letter failed");
                    }
                    while let Ok(more) = letters.try_recv() {
                        let _ = spool.push(&more);
                    }
                    spool.flush().await;
                }
                None => break,
            },
            () = wait_retry => {}
            () = async { let _ = stop.wait_for(|s| *s).await; } => {
                letters.close();
                while let Some(letter) = letters.recv().await {
                    let _ = spool.push(&letter);
                }
                spool.flush().await;
                break;
            }
        }
    }
}
