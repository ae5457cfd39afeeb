//! Group commit: one flush for every writer waiting when it starts.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{Store, StoreError};

/// Group commit: writers wait for a flush that started after their write,
/// and writers that arrive while a flush runs share the next one.
#[derive(Debug, Clone)]
pub struct GroupCommit {
    waiters: mpsc::UnboundedSender<oneshot::Sender<Result<(), String>>>,
}

impl GroupCommit {
    /// Starts the flusher for `store`; `observe` gets each flush's time.
    pub fn start(store: Arc<dyn Store>, observe: impl Fn(Duration) + Send + 'static) -> Self {
        let (waiters, mut queue) = mpsc::unbounded_channel::<oneshot::Sender<Result<(), String>>>();
        tokio::spawn(async move {
            while let Some(first) = queue.recv().await {
                let mut batch = vec![first];
                while let Ok(more) = queue.try_recv() {
                    batch.push(more);
                }
                let store = store.clone();
                let started = tokio::time::Instant::now();
                let result = tokio::task::spawn_blocking(move || store.flush())
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()));
                observe(started.elapsed());
                for waiter in batch {
                    let _ = waiter.send(result.clone());
                }
            }
        });
        Self { waiters }
    }

    /// Returns once every write made before the call is durable.
    pub async fn durable(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .send(tx)
            .map_err(|_| StoreError::Storage("the flusher stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Storage("the flusher stopped".into()))?
            .map_err(StoreError::Storage)
    }
}
