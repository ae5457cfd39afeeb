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
use super::saga::call::{Prepared, Upstreams, send};
use super::store::{GroupCommit, NewCheckpoint, Page, Store};
use crate::api::purge_dead_letters_request::Target as PurgeTarget;
use crate::api::seal::{LetterKey, Seal};
use crate::api::{
    Checkpoint, DeleteCheckpointsResponse, GetCheckpointRequest, ListCheckpointsRequest,
    ListCheckpointsResponse, PruneCheckpointsRequest, PruneCheckpointsResponse,
    PutCheckpointRequest, PutCheckpointResponse,
};
use crate::api::{
    DeadLetter, ListDeadLettersRequest, ListDeadLettersResponse, ReplayDeadLetterResponse,
};

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

    /// Stores a dead letter; answers once it is durable.
    pub async fn enqueue_letter(&self, letter: Option<DeadLetter>) -> Result<DeadLetter, ApiError> {
        let _timer = self.timer("dead_letters.Enqueue");
        let letter = letter.ok_or_else(|| ApiError::Invalid("letter is missing".into()))?;
        check_id("upstream", &letter.upstream)?;
        if !letter.capture_id.is_empty() {
            check_id("capture_id", &letter.capture_id)?;
        }
        if letter.method.is_empty() || http::Method::from_bytes(letter.method.as_bytes()).is_err() {
            return Err(ApiError::Invalid(format!(
                "method {:?} is not an HTTP method",
                letter.method
            )));
        }
        if !letter.uri.starts_with('/') || letter.uri.parse::<http::uri::PathAndQuery>().is_err() {
            return Err(ApiError::Invalid(format!(
                "uri {:?} is not a path and query",
                letter.uri
            )));
        }
        if letter.body.len() > self.max_state_bytes {
            return Err(ApiError::Invalid(format!(
                "body is {} bytes, over the limit of {} bytes",
                letter.body.len(),
                self.max_state_bytes
            )));
        }
        for header in &letter.headers {
            if http::HeaderName::from_bytes(header.name.as_bytes()).is_err()
                || http::HeaderValue::from_bytes(&header.value).is_err()
            {
                return Err(ApiError::Invalid(format!(
                    "header {:?} is not valid",
                    header.name
                )));
            }
        }
        let stored = self.store.enqueue_letter(letter, SystemTime::now())?;
        self.commit.durable().await?;
        self.metrics.set_dead_letters(self.store.letter_count());
        Ok(stored)
    }

    /// Letters, oldest first, optionally of one upstream.
    pub fn list_letters(
        &self,
        request: &ListDeadLettersRequest,
    ) -> Result<ListDeadLettersResponse, ApiError> {
        let _timer = self.timer("dead_letters.List");
        let after = page_token(&request.page_token)?;
        let upstream = (!request.upstream.is_empty()).then_some(request.upstream.as_str());
        let (letters, next) = self.store.list_letters(
            upstream,
            after,
            page_size(request.page_size),
            !request.without_bodies,
        )?;
        Ok(ListDeadLettersResponse {
            letters,
            next_page_token: next.map(|v| v.to_string()).unwrap_or_default(),
        })
    }

    /// One letter.
    pub fn get_letter(&self, id: &str) -> Result<DeadLetter, ApiError> {
        let _timer = self.timer("dead_letters.Get");
        Ok(self.store.get_letter(letter_id(id)?)?)
    }

    /// Sends a letter again under its upstream's policy: delivered, it is
    /// removed; failed, the attempt is recorded on it. Refused, unless
    /// `force`, when it is not sealed by a sidecar holding the letter key
    /// (if the control plane has one) or its body was cut at capture.
    pub async fn replay_letter(
        &self,
        id: &str,
        force: bool,
    ) -> Result<ReplayDeadLetterResponse, ApiError> {
        let _timer = self.timer("dead_letters.Replay");
        let id = letter_id(id)?;
        let mut letter = self.store.get_letter(id)?;
        if let Some(refusal) = self.replay_refusal(id, &letter) {
            if !force {
                self.metrics.replay_refused();
                return Err(ApiError::Precondition(format!(
                    "{refusal}; replay it with force (breakwater dlq replay --force) to send it anyway"
                )));
            }
            tracing::warn!(letter = id, upstream = %letter.upstream, "{refusal}; replayed anyway (forced)");
        }
        let Some(upstreams) = &self.upstreams else {
            return Err(ApiError::Precondition(
                "replay needs the upstreams' policies: start the control plane with --config policies.yaml".into(),
            ));
        };
        if upstreams.get(&letter.upstream).is_none() {
            return Err(ApiError::Precondition(format!(
                "upstream {:?} is not in the policies file, so the letter cannot be sent",
                letter.upstream
            )));
        }
        if !self
            .replaying
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id)
        {
            return Err(ApiError::Precondition(format!(
                "dead letter {id} is being replayed already"
            )));
        }
        let outcome = replay(upstreams, &letter).await;
        self.replaying
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        let response = match outcome {
            Ok(delivered) => {
                self.store.remove_letters(&[id])?;
                self.metrics.replayed(true);
                delivered
            }
            Err(failed) => {
                letter.replays += 1;
                letter.last_replay_error = failed.error.clone();
                letter.last_replay_at = Some(prost_types::Timestamp::from(SystemTime::now()));
                self.store.update_letter(&letter)?;
                self.metrics.replayed(false);
                failed
            }
        };
        self.commit.durable().await?;
        self.metrics.set_dead_letters(self.store.letter_count());
        Ok(response)
    }

    /// Why a letter should not be replayed as it is, if it should not.
    fn replay_refusal(&self, id: u64, letter: &DeadLetter) -> Option<String> {
        let seal = self.letter_key.as_ref().map(|key| key.check(letter));
        match seal {
            Some(Seal::Missing) => Some(format!(
                "dead letter {id} has no seal: it was not captured by a sidecar holding the \
                 letter key (enqueued by hand, or by a sidecar without \
                 control_plane.letter_key_file)"
            )),
            Some(Seal::Invalid) => Some(format!(
                "dead letter {id}'s seal does not match it: it was altered after its capture, \
                 or sealed with another key"
            )),
            Some(Seal::Valid) | None if letter.body_truncated => Some(format!(
                "dead letter {id}'s body was cut when it was captured (longer than max_body, \
                 or not all sent by the caller): a replay would send a different request"
            )),
            Some(Seal::Valid) | None => None,
        }
    }

    /// Removes one letter, an upstream's, or all.
    pub async fn purge_letters(&self, target: Option<PurgeTarget>) -> Result<u64, ApiError> {
        let _timer = self.timer("dead_letters.Purge");
        let ids = match target {
            None => {
                return Err(ApiError::Invalid(
                    "say what to purge: id, upstream or all".into(),
                ));
            }
            Some(PurgeTarget::Id(id)) => vec![letter_id(&id)?],
            Some(PurgeTarget::Upstream(upstream)) => {
                check_id("upstream", &upstream)?;
                self.store.letter_ids(Some(&upstream))?
            }
            Some(PurgeTarget::All(true)) => self.store.letter_ids(None)?,
            Some(PurgeTarget::All(false)) => {
                return Err(ApiError::Invalid(
                    "all must be true to purge every letter".into(),
                ));
            }
        };
        let purged = self.store.remove_letters(&ids)?;
        self.commit.durable().await?;
        self.metrics.set_dead_letters(self.store.letter_count());
        Ok(purged)
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

fn letter_id(id: &str) -> Result<u64, ApiError> {
    id.parse()
        .map_err(|_| ApiError::Invalid(format!("{id:?} is not a dead letter id")))
}

/// Sends a letter through its upstream; `Ok` when the upstream took it (a
/// 2xx answer, and gRPC status 0 for gRPC calls).
async fn replay(
    upstreams: &Upstreams,
    letter: &DeadLetter,
) -> Result<ReplayDeadLetterResponse, ReplayDeadLetterResponse> {
    let failed = |error: String| ReplayDeadLetterResponse {
        delivered: false,
        status: 0,
        grpc_status: -1,
        error,
    };
    let prepared = Prepared::from_letter(letter, REPLAY_HEADER).map_err(failed)?;
    let outcome = send(upstreams, &prepared, None).await;
    let response = ReplayDeadLetterResponse {
        delivered: outcome.ok,
        status: u32::from(outcome.status),
        grpc_status: outcome.grpc_status.unwrap_or(0),
        error: outcome.error.unwrap_or_default(),
    };
    if response.delivered {
        Ok(response)
    } else {
        Err(response)
    }
}

/// Marks a request sent by a replay, with the letter's id.
pub const REPLAY_HEADER: &str = "x-breakwater-replay";

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
