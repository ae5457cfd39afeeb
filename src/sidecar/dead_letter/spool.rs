//! The local spool (sled, flushed) and the shipper that delivers it to the
//! control plane, oldest first.
//!
//! The shipper does two things at once, in one task: it spools letters as
//! they come (reading the queue whatever else it does, so a burst waits
//! in the spool, not in the queue), and it delivers the spool, oldest
//! first. A delivered letter's removal is not flushed: after a crash it
//! may be sent again, and the control plane stores it once, by its
//! capture id.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use super::{BACKOFF_MAX, BACKOFF_MIN, DELIVERY_TIMEOUT, SpoolError};
use crate::api::dead_letters_client::DeadLettersClient;
use crate::api::{DeadLetter, EnqueueDeadLetterRequest};
use crate::config::ControlPlaneConfig;
use crate::telemetry::metrics::Metrics;

pub(super) type Client = DeadLettersClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        crate::api::token::Authorization,
    >,
>;

pub(super) fn client(config: &ControlPlaneConfig) -> Result<Client, SpoolError> {
    let token = crate::api::token::Authorization::reading(config.token_file.as_deref());
    let channel = crate::transport::channel::ControlChannel::new(
        &config.url,
        config.ca_file.as_deref(),
        DELIVERY_TIMEOUT,
        Some(DELIVERY_TIMEOUT),
    )
    .map_err(SpoolError::ControlPlane)?
    .connect_lazy();
    Ok(DeadLettersClient::with_interceptor(channel, token))
}

/// How delivery to the control plane goes, for `/readyz`.
#[derive(Debug)]
pub struct Delivery {
    url: String,
    /// Since when, and why, letters cannot be delivered.
    failing: std::sync::Mutex<Option<(tokio::time::Instant, String)>>,
}

impl Delivery {
    pub(super) fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            failing: Default::default(),
        }
    }

    fn failed(&self, error: &str) {
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *failing {
            Some((_, why)) => error.clone_into(why),
            None => *failing = Some((tokio::time::Instant::now(), error.to_owned())),
        }
    }

    fn delivered(&self) {
        *self.failing.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// One line: `control plane: <url> ok`, or since when and why letters
    /// cannot be delivered.
    pub fn detail(&self) -> String {
        match &*self.failing.lock().unwrap_or_else(|e| e.into_inner()) {
            None => format!("control plane: {} ok\n", self.url),
            Some((since, why)) => format!(
                "control plane: {} cannot take dead letters for {}s ({why}); they wait in the spool\n",
                self.url,
                since.elapsed().as_secs()
            ),
        }
    }
}

/// The local spool: letters by arrival, oldest first.
pub(super) struct Spool {
    db: sled::Db,
    tree: sled::Tree,
    bytes: AtomicU64,
    max_bytes: u64,
    metrics: Arc<Metrics>,
    /// A letter was spooled.
    spooled: Notify,
}

impl Spool {
    pub(super) fn open(
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
            bytes: AtomicU64::new(bytes),
            max_bytes,
            metrics,
            spooled: Notify::new(),
        })
    }

    /// Adds a letter, unless the spool is full.
    fn push(&self, letter: &DeadLetter) -> Result<(), sled::Error> {
        let encoded = letter.encode_to_vec();
        if self.bytes.load(Ordering::Relaxed) + encoded.len() as u64 > self.max_bytes {
            tracing::warn!(upstream = %letter.upstream, "dead-letter spool full: letter dropped");
            self.metrics.dead_letter_dropped(&letter.upstream);
            return Ok(());
        }
        let id = self.db.generate_id()?;
        self.tree.insert(id.to_be_bytes(), encoded.as_slice())?;
        self.bytes
            .fetch_add(encoded.len() as u64, Ordering::Relaxed);
        self.metrics.dead_letter_spooled(&letter.upstream, 1);
        self.spooled.notify_one();
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

    fn remove(&self, key: &sled::IVec, letter: &DeadLetter) -> Result<(), sled::Error> {
        if let Some(value) = self.tree.remove(key)? {
            self.bytes.fetch_sub(value.len() as u64, Ordering::Relaxed);
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

/// Resolves once `stop` is true.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A letter for the spool, and who waits until it is flushed.
pub(super) type Queued = (DeadLetter, Option<oneshot::Sender<()>>);

/// Spools letters as they come and delivers the spool in order, until
/// `stop` turns true; then spools what is queued and returns.
pub(super) async fn ship(
    spool: Spool,
    letters: mpsc::Receiver<Queued>,
    client: Client,
    delivery: Arc<Delivery>,
    stop: watch::Receiver<bool>,
) {
    // Both end on stop, spooling once it has spooled what was queued.
    tokio::join!(
        spool_letters(&spool, letters, stop.clone()),
        deliver(&spool, client, &delivery, stop),
    );
}

/// Writes letters to the spool as they come, in batches, one flush per
/// batch; answers those who wait once their letter is flushed.
async fn spool_letters(
    spool: &Spool,
    mut letters: mpsc::Receiver<Queued>,
    mut stop: watch::Receiver<bool>,
) {
    let mut waiting = Vec::new();
    loop {
        let first = tokio::select! {
            letter = letters.recv() => letter,
            () = stopped(&mut stop) => {
                letters.close();
                letters.recv().await
            }
        };
        let Some(first) = first else {
            return;
        };
        let mut batch = Some(first);
        while let Some((letter, ack)) = batch.take().or_else(|| letters.try_recv().ok()) {
            if let Err(error) = spool.push(&letter) {
                tracing::error!(%error, "spooling a dead letter failed");
            }
            waiting.extend(ack);
        }
        spool.flush().await;
        for ack in waiting.drain(..) {
            let _ = ack.send(());
        }
    }
}

/// Delivers the spool to the control plane, oldest first, backing off
/// while it is unreachable; returns when `stop` turns true.
async fn deliver(
    spool: &Spool,
    mut client: Client,
    delivery: &Delivery,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let Some((key, letter)) = spool.oldest() else {
            tokio::select! {
                () = spool.spooled.notified() => continue,
                () = stopped(&mut stop) => return,
            }
        };
        let enqueue = client.enqueue(EnqueueDeadLetterRequest {
            letter: Some(letter.clone()),
        });
        let error = tokio::select! {
            delivered = tokio::time::timeout(DELIVERY_TIMEOUT, enqueue) => match delivered {
                Ok(Ok(_)) => {
                    if let Err(error) = spool.remove(&key, &letter) {
                        tracing::error!(%error, "removing a delivered letter from the spool failed");
                    }
                    spool.metrics.dead_letter_delivered(&letter.upstream);
                    spool.metrics.control_plane_reachable(true);
                    delivery.delivered();
                    backoff = BACKOFF_MIN;
                    continue;
                }
                Ok(Err(status)) => status.message().to_owned(),
                Err(_) => "timed out".to_owned(),
            },
            () = stopped(&mut stop) => return,
        };
        spool.metrics.control_plane_reachable(false);
        delivery.failed(&error);
        tracing::warn!(%error, retry_in = ?backoff, "cannot deliver dead letters to the control plane; they wait in the spool");
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stopped(&mut stop) => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}
