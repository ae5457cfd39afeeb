//! Durable storage for the control plane: a small trait ([`Store`]) with
//! sled as the embedded implementation ([`SledStore`], its keys in
//! `layout`), and the group commit that makes an acknowledged write
//! durable ([`GroupCommit`]).

mod group_commit;
mod layout;
mod sled;
#[cfg(test)]
mod tests;
pub mod threads;

use std::time::{Duration, SystemTime};

use crate::api::{Checkpoint, DeadLetter};

pub use group_commit::GroupCommit;
pub use sled::SledStore;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such workflow (or version), or it expired.
    #[error("{0}")]
    NotFound(String),
    /// A compare-and-swap lost: the latest version is `current`.
    #[error("the latest version is {current}, not {expected}")]
    Conflict {
        /// The version the writer expected.
        expected: u64,
        /// The latest version (0: the workflow does not exist).
        current: u64,
    },
    /// The store cannot do it as things are (a copy onto a thread that
    /// has checkpoints).
    #[error("{0}")]
    Precondition(String),
    /// The storage itself failed.
    #[error("storage error: {0}")]
    Storage(String),
}

impl From<::sled::Error> for StoreError {
    fn from(e: ::sled::Error) -> Self {
        StoreError::Storage(e.to_string())
    }
}

/// A new checkpoint, validated by the caller.
#[derive(Debug, Clone, Default)]
pub struct NewCheckpoint {
    /// The checkpoint (its `version`, `created_at` and `expires_at` are
    /// set by the store).
    pub checkpoint: Checkpoint,
    /// Expire the workflow this long after now.
    pub ttl: Option<Duration>,
    /// Compare-and-swap on the latest version (0: must not exist).
    pub expected_version: Option<u64>,
}

/// One page of a workflow's history, newest first.
#[derive(Debug, Default)]
pub struct Page {
    /// The checkpoints.
    pub checkpoints: Vec<Checkpoint>,
    /// The version to continue below, if there is more.
    pub next: Option<u64>,
}

/// What the control plane stores. Calls are synchronous and fast (they
/// change memory and the log); durability comes from [`Store::flush`].
pub trait Store: Send + Sync + 'static {
    /// Adds a checkpoint version; returns it as stored.
    fn put_checkpoint(&self, new: NewCheckpoint, now: SystemTime)
    -> Result<Checkpoint, StoreError>;
    /// The latest version (`version` 0) or a given one.
    fn get_checkpoint(
        &self,
        workflow: &str,
        version: u64,
        now: SystemTime,
    ) -> Result<Checkpoint, StoreError>;
    /// Versions below `before` (all when `None`), newest first, at most `limit`.
    fn list_checkpoints(
        &self,
        workflow: &str,
        before: Option<u64>,
        limit: usize,
        now: SystemTime,
    ) -> Result<Page, StoreError>;
    /// The latest checkpoint of each workflow after `after`, by workflow
    /// id, at most `limit`, expired ones left out; and the workflow to
    /// continue after, if there are more.
    fn list_workflows(
        &self,
        after: Option<&str>,
        limit: usize,
        now: SystemTime,
    ) -> Result<(Vec<Checkpoint>, Option<String>), StoreError>;
    /// Deletes a workflow; returns how many versions went.
    fn delete_workflow(&self, workflow: &str, now: SystemTime) -> Result<u64, StoreError>;
    /// Keeps the newest `keep` versions; returns how many went.
    fn prune_workflow(&self, workflow: &str, keep: u64, now: SystemTime)
    -> Result<u64, StoreError>;
    /// Deletes the workflows expired at `now`; returns how many.
    fn sweep_expired(&self, now: SystemTime) -> Result<u64, StoreError>;
    /// Stores a dead letter under a new id (ids grow); returns it.
    fn enqueue_letter(&self, letter: DeadLetter, now: SystemTime)
    -> Result<DeadLetter, StoreError>;
    /// Letters after id `after`, oldest first, of one upstream or all, at
    /// most `limit` (without their bodies and seals unless `bodies`); and
    /// the id to continue after, if there are more.
    fn list_letters(
        &self,
        upstream: Option<&str>,
        after: Option<u64>,
        limit: usize,
        bodies: bool,
    ) -> Result<(Vec<DeadLetter>, Option<u64>), StoreError>;
    /// One letter.
    fn get_letter(&self, id: u64) -> Result<DeadLetter, StoreError>;
    /// Rewrites a letter that still exists (a replay recorded).
    fn update_letter(&self, letter: &DeadLetter) -> Result<(), StoreError>;
    /// Removes letters by id; returns how many existed.
    fn remove_letters(&self, ids: &[u64]) -> Result<u64, StoreError>;
    /// The ids of one upstream's letters, or of all letters.
    fn letter_ids(&self, upstream: Option<&str>) -> Result<Vec<u64>, StoreError>;
    /// How many letters are stored.
    fn letter_count(&self) -> u64;
    /// Stores a new saga in `state`; `false` (and nothing written) when
    /// the id exists.
    fn create_saga(&self, id: &str, state: &str, record: &[u8]) -> Result<bool, StoreError>;
    /// Rewrites a saga's record, moving it from state `from` to `to`.
    fn save_saga(&self, id: &str, from: &str, to: &str, record: &[u8]) -> Result<(), StoreError>;
    /// A saga's record.
    fn get_saga(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Records of sagas after id `after`, by id, all or in one state, at
    /// most `limit`; and the id to continue after, if there are more.
    fn list_sagas(
        &self,
        state: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Vec<u8>>, Option<String>), StoreError>;
    /// How many sagas are in each state.
    fn saga_counts(&self) -> Result<Vec<(String, u64)>, StoreError>;
    /// Makes every write so far durable (blocks until it is on disk).
    fn flush(&self) -> Result<(), StoreError>;
    /// Its threads (LangGraph's checkpoints).
    fn threads(&self) -> &dyn threads::ThreadStore;
}
