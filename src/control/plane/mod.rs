//! The control plane's core: its operations, once for both faces. The
//! gRPC services and the JSON/HTTP API call these, and turn
//! [`ApiError`] into a gRPC status or an HTTP status with a JSON body.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use std::collections::HashSet;
use std::sync::Mutex;

use super::error::{ApiError, after_id, id_token, page_size};
use super::metrics::ControlMetrics;
use super::saga::Sagas;
use super::saga::call::Upstreams;
use super::store::{GroupCommit, NewCheckpoint, Page, Store};
use crate::api::seal::LetterKey;
use crate::api::{
    Checkpoint, DeleteCheckpointsResponse, GetCheckpointRequest, ListCheckpointsRequest,
    ListCheckpointsResponse, PruneCheckpointsRequest, PruneCheckpointsResponse,
    PutCheckpointRequest, PutCheckpointResponse,
};

mod letters;
mod threads;
pub use letters::REPLAY_HEADER;
pub use threads::ThreadListing;

/// Default largest checkpoint state.
pub const DEFAULT_MAX_STATE_BYTES: usize = 4 << 20;
const MAX_ID_BYTES: usize = 256;
const MAX_STEP_BYTES: usize = 256;
const MAX_COMPLETED_STEPS: usize = 1000;
const MAX_METADATA_ENTRIES: usize = 64;
const MAX_METADATA_KEY_BYTES: usize = 128;
const MAX_METADATA_VALUE_BYTES: usize = 4096;
/// Longest TTL accepted (ten years).
const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The control plane's state: the store, its group commit, limits and
/// metrics.
pub struct ControlPlane {
    pub(super) store: Arc<dyn Store>,
    commit: GroupCommit,
    metrics: Arc<ControlMetrics>,
    max_state_bytes: usize,
    upstreams: Option<Arc<Upstreams>>,
    /// The saga executor.
    pub sagas: Arc<Sagas>,
    /// Letters being replayed now: a second replay of one waits its turn
    /// rather than sending it twice.
    replaying: Mutex<HashSet<u64>>,
    /// The key sidecars seal letters with, if the control plane has it.
    letter_key: Option<LetterKey>,
    /// Held around each change to threads (see `threads`).
    threads_lock: Mutex<()>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("max_state_bytes", &self.max_state_bytes)
            .finish_non_exhaustive()
    }
}

/// Times one API call into the latency histogram.
struct Timer<'a> {
    metrics: &'a ControlMetrics,
    method: &'static str,
    started: Instant,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.metrics
            .observe_request(self.method, self.started.elapsed());
    }
}

fn check_id(kind: &str, id: &str) -> Result<(), ApiError> {
    if id.is_empty() {
        return Err(ApiError::Invalid(format!("{kind} is empty")));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(ApiError::Invalid(format!(
            "{kind} is {} bytes, over the limit of {MAX_ID_BYTES}",
            id.len()
        )));
    }
    if id.chars().any(char::is_control) {
        return Err(ApiError::Invalid(format!(
            "{kind} contains control characters"
        )));
    }
    Ok(())
}

fn check_len(what: &str, text: &str, limit: usize) -> Result<(), ApiError> {
    if text.len() > limit {
        return Err(ApiError::Invalid(format!(
            "{what} is {} bytes, over the limit of {limit}",
            text.len()
        )));
    }
    Ok(())
}

/// Parses a history page token: the version to continue below.
fn page_token(token: &str) -> Result<Option<u64>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .parse::<u64>()
        .ok()
        .filter(|v| *v > 0)
        .map(Some)
        .ok_or_else(|| ApiError::Invalid(format!("page_token {token:?} is not one this API gave")))
}

impl ControlPlane {
    /// A control plane over `store`, calling `upstreams` for sagas and
    /// dead-letter replays, running at most `saga_workers` sagas at once;
    /// with `letter_key`, replaying only letters sealed with it (unless
    /// forced) and sealing the letters of failed compensations. Must run
    /// inside a tokio runtime (the group commit's flusher is a task).
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Arc<ControlMetrics>,
        max_state_bytes: usize,
        upstreams: Option<Arc<Upstreams>>,
        saga_workers: usize,
        letter_key: Option<LetterKey>,
    ) -> Self {
        let flushes = metrics.clone();
        let commit = GroupCommit::start(store.clone(), move |d| flushes.observe_flush(d));
        metrics.set_dead_letters(store.letter_count());
        let sagas = Arc::new(Sagas::new(
            store.clone(),
            commit.clone(),
            metrics.clone(),
            upstreams.clone(),
            saga_workers,
            max_state_bytes,
            letter_key.clone(),
        ));
        Self {
            store,
            commit,
            metrics,
            max_state_bytes,
            upstreams,
            sagas,
            replaying: Mutex::default(),
            letter_key,
            threads_lock: Mutex::default(),
        }
    }

    /// The metrics of the calls sagas and replays make, if there are
    /// upstreams.
    pub fn upstream_metrics(&self) -> Option<String> {
        self.upstreams.as_ref().map(|u| u.metrics_text())
    }

    /// The largest state accepted.
    pub fn max_state_bytes(&self) -> usize {
        self.max_state_bytes
    }

    fn timer(&self, method: &'static str) -> Timer<'_> {
        Timer {
            metrics: &self.metrics,
            method,
            started: Instant::now(),
        }
    }

    /// Stores a checkpoint version; answers once it is durable.
    pub async fn put_checkpoint(
        &self,
        request: PutCheckpointRequest,
    ) -> Result<PutCheckpointResponse, ApiError> {
        let _timer = self.timer("checkpoints.Put");
        check_id("workflow_id", &request.workflow_id)?;
        check_len("step", &request.step, MAX_STEP_BYTES)?;
        if request.completed_steps.len() > MAX_COMPLETED_STEPS {
            return Err(ApiError::Invalid(format!(
                "completed_steps has {} entries, over the limit of {MAX_COMPLETED_STEPS}",
                request.completed_steps.len()
            )));
        }
        for step in &request.completed_steps {
            check_len("a completed step", step, MAX_STEP_BYTES)?;
        }
        if request.state.len() > self.max_state_bytes {
            return Err(ApiError::Invalid(format!(
                "state is {} bytes, over the limit of {} bytes",
                request.state.len(),
                self.max_state_bytes
            )));
        }
        if request.metadata.len() > MAX_METADATA_ENTRIES {
            return Err(ApiError::Invalid(format!(
                "metadata has {} entries, over the limit of {MAX_METADATA_ENTRIES}",
                request.metadata.len()
            )));
        }
        for (key, value) in &request.metadata {
            check_len("a metadata key", key, MAX_METADATA_KEY_BYTES)?;
            check_len("a metadata value", value, MAX_METADATA_VALUE_BYTES)?;
        }
        let ttl = match request.ttl {
            None => None,
            Some(ttl) => {
                let ttl = Duration::try_from(ttl)
                    .ok()
                    .filter(|t| !t.is_zero() && *t <= MAX_TTL)
                    .ok_or_else(|| {
                        ApiError::Invalid("ttl must be positive and at most ten years".into())
                    })?;
                Some(ttl)
            }
        };
        let new = NewCheckpoint {
            checkpoint: Checkpoint {
                workflow_id: request.workflow_id,
                version: 0,
                step: request.step,
                completed_steps: request.completed_steps,
                state: request.state,
                metadata: request.metadata,
                created_at: None,
                expires_at: None,
            },
            ttl,
            expected_version: request.expected_version,
        };
        // A put changes memory and sled's log buffer: microseconds, too
        // short to be worth a hop to the blocking pool. The wait for the
        // disk is the group commit's.
        let stored = self.store.put_checkpoint(new, SystemTime::now())?;
        self.commit.durable().await?;
        self.metrics.checkpoint_written();
        Ok(PutCheckpointResponse {
            version: stored.version,
            created_at: stored.created_at,
            expires_at: stored.expires_at,
        })
    }

    /// The latest checkpoint or a given version.
    pub fn get_checkpoint(&self, request: &GetCheckpointRequest) -> Result<Checkpoint, ApiError> {
        let _timer = self.timer("checkpoints.Get");
        check_id("workflow_id", &request.workflow_id)?;
        Ok(self
            .store
            .get_checkpoint(&request.workflow_id, request.version, SystemTime::now())?)
    }

    /// A workflow's history, newest first.
    pub fn list_checkpoints(
        &self,
        request: &ListCheckpointsRequest,
    ) -> Result<ListCheckpointsResponse, ApiError> {
        let _timer = self.timer("checkpoints.List");
        check_id("workflow_id", &request.workflow_id)?;
        let before = page_token(&request.page_token)?;
        let Page { checkpoints, next } = self.store.list_checkpoints(
            &request.workflow_id,
            before,
            page_size(request.page_size),
            SystemTime::now(),
        )?;
        Ok(ListCheckpointsResponse {
            checkpoints,
            next_page_token: next.map(|v| v.to_string()).unwrap_or_default(),
        })
    }

    /// The latest checkpoint of each workflow, by workflow id; the token
    /// continues a listing (empty: from the start), and the next one is
    /// empty at the end.
    pub fn list_workflows(
        &self,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<Checkpoint>, String), ApiError> {
        let _timer = self.timer("checkpoints.ListWorkflows");
        let after = after_id(page_token)?;
        let (latest, next) = self.store.list_workflows(
            after.as_deref(),
            self::page_size(page_size),
            SystemTime::now(),
        )?;
        Ok((latest, next.as_deref().map_or_else(String::new, id_token)))
    }

    /// Deletes a workflow; answers once the deletion is durable.
    pub async fn delete_workflow(
        &self,
        workflow: &str,
    ) -> Result<DeleteCheckpointsResponse, ApiError> {
        let _timer = self.timer("checkpoints.Delete");
        check_id("workflow_id", workflow)?;
        let deleted = self.store.delete_workflow(workflow, SystemTime::now())?;
        self.commit.durable().await?;
        Ok(DeleteCheckpointsResponse { deleted })
    }

    /// Keeps a workflow's newest versions; answers once durable.
    pub async fn prune_workflow(
        &self,
        request: &PruneCheckpointsRequest,
    ) -> Result<PruneCheckpointsResponse, ApiError> {
        let _timer = self.timer("checkpoints.Prune");
        check_id("workflow_id", &request.workflow_id)?;
        if request.keep == 0 {
            return Err(ApiError::Invalid("keep must be at least 1".into()));
        }
        let deleted = self.store.prune_workflow(
            &request.workflow_id,
            u64::from(request.keep),
            SystemTime::now(),
        )?;
        self.commit.durable().await?;
        Ok(PruneCheckpointsResponse { deleted })
    }

    /// Deletes expired workflows (the background sweep).
    pub async fn sweep(&self) -> Result<u64, ApiError> {
        let store = self.store.clone();
        let swept = tokio::task::spawn_blocking(move || store.sweep_expired(SystemTime::now()))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??;
        if swept > 0 {
            self.commit.durable().await?;
        }
        Ok(swept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_tokens_are_checked() {
        assert!(check_id("workflow_id", "invoice-17").is_ok());
        assert_eq!(
            check_id("workflow_id", ""),
            Err(ApiError::Invalid("workflow_id is empty".into()))
        );
        assert!(check_id("workflow_id", &"x".repeat(257)).is_err());
        assert!(check_id("workflow_id", "a\0b").is_err());
        assert_eq!(page_token("").unwrap(), None);
        assert_eq!(page_token("42").unwrap(), Some(42));
        assert!(page_token("zz").is_err());
        assert_eq!(page_size(0), 50);
        assert_eq!(page_size(5000), 1000);
    }
}
