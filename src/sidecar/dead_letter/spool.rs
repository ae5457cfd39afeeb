//! The local spool (sled, flushed) and the shipper that delivers it to the
//! control plane, oldest first.

use std::sync::Arc;

use prost::Message;
use tokio::sync::{mpsc, watch};

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
    let token = crate::api::token::Authorization::from_token_file(config.token_file.as_deref())
        .map_err(SpoolError::ControlPlane)?;
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

/// The local spool: letters by arrival, oldest first.
pub(super) struct Spool {
    db: sled::Db,
    tree: sled::Tree,
    bytes: u64,
    max_bytes: u64,
    metrics: Arc<Metrics>,
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
pub(super) async fn ship(
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
