//! Durable storage for the control plane: a small trait ([`Store`]) with
//! sled as the embedded implementation ([`SledStore`]), and the group
//! commit that makes an acknowledged write durable ([`GroupCommit`]).
//!
//! Layout in sled, one tree per kind so that each kind's operations are
//! atomic batches on one tree:
//!
//! | tree | key | value |
//! |---|---|---|
//! | `checkpoints` | `workflow 0x00` | the workflow: latest version, expiry |
//! | `checkpoints` | `workflow 0x01 version(u64 BE)` | a `Checkpoint` message |
//! | `expiry` | `expires_at_ms(u64 BE) workflow` | empty: the TTL sweep's index |
//! | `dead_letters` | `id(u64 BE)` | a `DeadLetter` message |
//! | `dead_letters_by_upstream` | `upstream 0x00 id(u64 BE)` | empty: the per-upstream index |
//! | `sagas` | `saga id` | the saga's record (JSON: definition and progress) |
//! | `saga_states` | `state 0x00 saga id` | empty: the by-state index (resume, list) |
//!
//! Workflow and saga ids contain no control characters, so `0x00` and
//! `0x01` end the id unambiguously, and a workflow's versions sort oldest
//! first. A saga's record and its index entry change in one transaction.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use tokio::sync::{mpsc, oneshot};

use crate::api::{Checkpoint, DeadLetter};

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
    /// The storage itself failed.
    #[error("storage error: {0}")]
    Storage(String),
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
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
    /// most `limit`; and the id to continue after, if there are more.
    fn list_letters(
        &self,
        upstream: Option<&str>,
        after: Option<u64>,
        limit: usize,
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
}

/// The sled-backed store.
#[derive(Debug, Clone)]
pub struct SledStore {
    db: sled::Db,
    checkpoints: sled::Tree,
    expiry: sled::Tree,
    letters: sled::Tree,
    letters_by_upstream: sled::Tree,
    sagas: sled::Tree,
    saga_states: sled::Tree,
    /// The letter count, kept here: sled's `len` walks the tree.
    letter_count: Arc<std::sync::atomic::AtomicU64>,
}

/// A workflow's record: its latest version and expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Workflow {
    latest: u64,
    /// Unix milliseconds; 0 for none.
    expires_at_ms: u64,
}

impl Workflow {
    fn encode(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.latest.to_be_bytes());
        out[8..].copy_from_slice(&self.expires_at_ms.to_be_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let bytes: [u8; 16] = bytes
            .try_into()
            .map_err(|_| StoreError::Storage("a workflow record is corrupt".into()))?;
        Ok(Self {
            latest: u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes")),
            expires_at_ms: u64::from_be_bytes(bytes[8..].try_into().expect("8 bytes")),
        })
    }

    fn expired(self, now: SystemTime) -> bool {
        self.expires_at_ms != 0 && self.expires_at_ms <= millis(now)
    }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((ms % 1000) * 1_000_000).expect("under a second"),
    }
}

fn workflow_key(workflow: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(workflow.len() + 1);
    key.extend_from_slice(workflow.as_bytes());
    key.push(0);
    key
}

fn versions_prefix(workflow: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(workflow.len() + 9);
    key.extend_from_slice(workflow.as_bytes());
    key.push(1);
    key
}

fn version_key(workflow: &str, version: u64) -> Vec<u8> {
    let mut key = versions_prefix(workflow);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

fn expiry_key(expires_at_ms: u64, workflow: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + workflow.len());
    key.extend_from_slice(&expires_at_ms.to_be_bytes());
    key.extend_from_slice(workflow.as_bytes());
    key
}

fn upstream_key(upstream: &str, id: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(upstream.len() + 9);
    key.extend_from_slice(upstream.as_bytes());
    key.push(0);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

fn state_key(state: &str, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(state.len() + 1 + id.len());
    key.extend_from_slice(state.as_bytes());
    key.push(0);
    key.extend_from_slice(id.as_bytes());
    key
}

fn transaction_error(e: sled::transaction::TransactionError<()>) -> StoreError {
    match e {
        sled::transaction::TransactionError::Storage(e) => e.into(),
        sled::transaction::TransactionError::Abort(()) => {
            StoreError::Storage("a saga transaction aborted".into())
        }
    }
}

fn id_of(key: &[u8]) -> u64 {
    u64::from_be_bytes(
        key[key.len() - 8..]
            .try_into()
            .expect("keys end with an id"),
    )
}

fn decode_letter(bytes: &[u8]) -> Result<DeadLetter, StoreError> {
    DeadLetter::decode(bytes)
        .map_err(|e| StoreError::Storage(format!("a dead letter is corrupt: {e}")))
}

fn not_found(workflow: &str) -> StoreError {
    StoreError::NotFound(format!("no workflow {workflow:?}"))
}

fn decode_checkpoint(bytes: &[u8]) -> Result<Checkpoint, StoreError> {
    Checkpoint::decode(bytes)
        .map_err(|e| StoreError::Storage(format!("a checkpoint is corrupt: {e}")))
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &std::path::Path) -> Result<Self, StoreError> {
        // Flushes are ours (group commit): sled's own periodic flush would
        // only compete with them.
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(None)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let letters = db.open_tree("dead_letters")?;
        let count = letters.len() as u64;
        Ok(Self {
            checkpoints: db.open_tree("checkpoints")?,
            expiry: db.open_tree("expiry")?,
            letters_by_upstream: db.open_tree("dead_letters_by_upstream")?,
            sagas: db.open_tree("sagas")?,
            saga_states: db.open_tree("saga_states")?,
            letters,
            letter_count: Arc::new(std::sync::atomic::AtomicU64::new(count)),
            db,
        })
    }

    /// The workflow's record, unless absent or expired.
    fn workflow(&self, workflow: &str, now: SystemTime) -> Result<Workflow, StoreError> {
        let record = self
            .checkpoints
            .get(workflow_key(workflow))?
            .ok_or_else(|| not_found(workflow))?;
        let record = Workflow::decode(&record)?;
        if record.expired(now) {
            return Err(not_found(workflow));
        }
        Ok(record)
    }

    /// Every version key of a workflow, oldest first.
    fn version_keys(&self, workflow: &str) -> Result<Vec<sled::IVec>, StoreError> {
        self.checkpoints
            .scan_prefix(versions_prefix(workflow))
            .keys()
            .collect::<Result<_, _>>()
            .map_err(Into::into)
    }

    /// Removes a workflow and its versions in one atomic batch.
    fn remove_workflow(&self, workflow: &str) -> Result<u64, StoreError> {
        let keys = self.version_keys(workflow)?;
        let mut batch = sled::Batch::default();
        batch.remove(workflow_key(workflow));
        for key in &keys {
            batch.remove(key.clone());
        }
        self.checkpoints.apply_batch(batch)?;
        Ok(keys.len() as u64)
    }
}

impl Store for SledStore {
    fn put_checkpoint(
        &self,
        new: NewCheckpoint,
        now: SystemTime,
    ) -> Result<Checkpoint, StoreError> {
        let workflow = new.checkpoint.workflow_id.clone();
        let now_ms = millis(now);
        let expires_at_ms = new
            .ttl
            .map(|ttl| now_ms.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)));
        // The sweep's index gets the new expiry before the record does, so
        // the index never misses an expiring workflow; stale entries are
        // skipped by the sweep.
        if let Some(at) = expires_at_ms {
            self.expiry.insert(expiry_key(at, &workflow), &[])?;
        }
        let meta_key = workflow_key(&workflow);
        let checkpoint = new.checkpoint;
        let outcome = self.checkpoints.transaction(|tx| {
            use sled::transaction::ConflictableTransactionError::Abort;
            let previous = match tx.get(&meta_key)? {
                Some(bytes) => Some(Workflow::decode(&bytes).map_err(Abort)?),
                None => None,
            };
            // An expired workflow counts as absent; its old versions are
            // replaced as the new history starts over at 1.
            let live = previous.filter(|w| !w.expired(now));
            let current = live.map_or(0, |w| w.latest);
            if let Some(expected) = new.expected_version
                && expected != current
            {
                return Err(Abort(StoreError::Conflict { expected, current }));
            }
            let expires = match (expires_at_ms, live) {
                (Some(at), _) => at,
                (None, Some(w)) => w.expires_at_ms,
                (None, None) => 0,
            };
            let version = current + 1;
            let mut stored = checkpoint.clone();
            stored.version = version;
            stored.created_at = Some(timestamp(now_ms));
            stored.expires_at = (expires != 0).then(|| timestamp(expires));
            tx.insert(version_key(&workflow, version), stored.encode_to_vec())?;
            let record = Workflow {
                latest: version,
                expires_at_ms: expires,
            };
            tx.insert(meta_key.as_slice(), &record.encode())?;
            Ok((stored, previous))
        });
        let (stored, previous) = match outcome {
            Ok(done) => done,
            Err(sled::transaction::TransactionError::Abort(e)) => return Err(e),
            Err(sled::transaction::TransactionError::Storage(e)) => return Err(e.into()),
        };
        if let Some(previous) = previous {
            if previous.expired(now) {
                // Versions of the expired history above 1 would otherwise
                // linger under the new one.
                for key in self.version_keys(&workflow)? {
                    let version =
                        u64::from_be_bytes(key[key.len() - 8..].try_into().expect("8 bytes"));
                    if version > stored.version {
                        self.checkpoints.remove(key)?;
                    }
                }
            }
            let kept =
                stored.expires_at.is_some() && expires_at_ms.is_none() && !previous.expired(now);
            if previous.expires_at_ms != 0 && !kept && Some(previous.expires_at_ms) != expires_at_ms
            {
                self.expiry
                    .remove(expiry_key(previous.expires_at_ms, &workflow))?;
            }
        }
        Ok(stored)
    }

    fn get_checkpoint(
        &self,
        workflow: &str,
        version: u64,
        now: SystemTime,
    ) -> Result<Checkpoint, StoreError> {
        let record = self.workflow(workflow, now)?;
        let version = if version == 0 { record.latest } else { version };
        let bytes = self
            .checkpoints
            .get(version_key(workflow, version))?
            .filter(|_| version <= record.latest)
            .ok_or_else(|| {
                StoreError::NotFound(format!("workflow {workflow:?} has no version {version}"))
            })?;
        decode_checkpoint(&bytes)
    }

    fn list_checkpoints(
        &self,
        workflow: &str,
        before: Option<u64>,
        limit: usize,
        now: SystemTime,
    ) -> Result<Page, StoreError> {
        let record = self.workflow(workflow, now)?;
        let upper = before
            .unwrap_or(u64::MAX)
            .min(record.latest.saturating_add(1));
        let range = version_key(workflow, 0)..version_key(workflow, upper);
        let mut checkpoints = Vec::with_capacity(limit.min(64));
        let mut next = None;
        for entry in self.checkpoints.range(range).rev() {
            let (_, bytes) = entry?;
            if checkpoints.len() == limit {
                next = checkpoints.last().map(|c: &Checkpoint| c.version);
                break;
            }
            checkpoints.push(decode_checkpoint(&bytes)?);
        }
        Ok(Page { checkpoints, next })
    }

    fn delete_workflow(&self, workflow: &str, now: SystemTime) -> Result<u64, StoreError> {
        self.workflow(workflow, now)?;
        self.remove_workflow(workflow)
    }

    fn prune_workflow(
        &self,
        workflow: &str,
        keep: u64,
        now: SystemTime,
    ) -> Result<u64, StoreError> {
        let record = self.workflow(workflow, now)?;
        let cut = record.latest.saturating_sub(keep.max(1)) + 1;
        let keys: Vec<sled::IVec> = self
            .checkpoints
            .range(version_key(workflow, 0)..version_key(workflow, cut))
            .keys()
            .collect::<Result<_, _>>()?;
        let mut batch = sled::Batch::default();
        for key in &keys {
            batch.remove(key.clone());
        }
        self.checkpoints.apply_batch(batch)?;
        Ok(keys.len() as u64)
    }

    fn sweep_expired(&self, now: SystemTime) -> Result<u64, StoreError> {
        let now_ms = millis(now);
        let mut swept = 0;
        for entry in self
            .expiry
            .range(..expiry_key(now_ms.saturating_add(1), ""))
        {
            let (key, _) = entry?;
            let at = u64::from_be_bytes(key[..8].try_into().expect("8 bytes"));
            let workflow = std::str::from_utf8(&key[8..])
                .map_err(|_| StoreError::Storage("an expiry entry is corrupt".into()))?;
            let record = self.checkpoints.get(workflow_key(workflow))?;
            let record = record.map(|r| Workflow::decode(&r)).transpose()?;
            // Only if the record still expires at this time: a later put
            // may have moved its expiry.
            if record.is_some_and(|r| r.expires_at_ms == at && r.expired(now)) {
                self.remove_workflow(workflow)?;
                swept += 1;
            }
            self.expiry.remove(key)?;
        }
        Ok(swept)
    }

    fn enqueue_letter(
        &self,
        mut letter: DeadLetter,
        now: SystemTime,
    ) -> Result<DeadLetter, StoreError> {
        use sled::Transactional;
        let id = self.db.generate_id()?;
        letter.id = id.to_string();
        letter.enqueued_at = Some(timestamp(millis(now)));
        let bytes = letter.encode_to_vec();
        let index = upstream_key(&letter.upstream, id);
        (&self.letters, &self.letters_by_upstream)
            .transaction(|(letters, by_upstream)| {
                letters.insert(&id.to_be_bytes(), bytes.as_slice())?;
                by_upstream.insert(index.as_slice(), &[])?;
                Ok::<_, sled::transaction::ConflictableTransactionError<StoreError>>(())
            })
            .map_err(|e| match e {
                sled::transaction::TransactionError::Abort(e) => e,
                sled::transaction::TransactionError::Storage(e) => e.into(),
            })?;
        self.letter_count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(letter)
    }

    fn list_letters(
        &self,
        upstream: Option<&str>,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, Option<u64>), StoreError> {
        let start = after.map_or(0, |a| a.saturating_add(1));
        let ids: Box<dyn Iterator<Item = Result<u64, StoreError>>> = match upstream {
            Some(upstream) => Box::new(
                self.letters_by_upstream
                    .range(upstream_key(upstream, start)..upstream_key(upstream, u64::MAX))
                    .keys()
                    .map(|k| Ok(id_of(&k?))),
            ),
            None => Box::new(
                self.letters
                    .range(start.to_be_bytes()..)
                    .keys()
                    .map(|k| Ok(id_of(&k?))),
            ),
        };
        let mut letters = Vec::with_capacity(limit.min(64));
        for id in ids {
            let id = id?;
            if letters.len() == limit {
                let last = letters
                    .last()
                    .map(|l: &DeadLetter| l.id.parse().unwrap_or(id));
                return Ok((letters, last));
            }
            // An index entry whose letter is gone (a purge cut short) is
            // skipped.
            if let Some(bytes) = self.letters.get(id.to_be_bytes())? {
                letters.push(decode_letter(&bytes)?);
            }
        }
        Ok((letters, None))
    }

    fn get_letter(&self, id: u64) -> Result<DeadLetter, StoreError> {
        let bytes = self
            .letters
            .get(id.to_be_bytes())?
            .ok_or_else(|| StoreError::NotFound(format!("no dead letter {id}")))?;
        decode_letter(&bytes)
    }

    fn update_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        let id: u64 = letter
            .id
            .parse()
            .map_err(|_| StoreError::NotFound(format!("no dead letter {:?}", letter.id)))?;
        let bytes = letter.encode_to_vec();
        let key = id.to_be_bytes();
        // Only if it is still there: a purge may have raced the replay.
        let updated = self
            .letters
            .update_and_fetch(key, |old| old.map(|_| bytes.clone()))?;
        if updated.is_none() {
            return Err(StoreError::NotFound(format!("no dead letter {id}")));
        }
        Ok(())
    }

    fn remove_letters(&self, ids: &[u64]) -> Result<u64, StoreError> {
        let mut removed = 0;
        for id in ids {
            let Some(bytes) = self.letters.remove(id.to_be_bytes())? else {
                continue;
            };
            removed += 1;
            if let Ok(letter) = decode_letter(&bytes) {
                self.letters_by_upstream
                    .remove(upstream_key(&letter.upstream, *id))?;
            }
        }
        self.letter_count
            .fetch_sub(removed, std::sync::atomic::Ordering::Relaxed);
        Ok(removed)
    }

    fn letter_ids(&self, upstream: Option<&str>) -> Result<Vec<u64>, StoreError> {
        match upstream {
            Some(upstream) => self
                .letters_by_upstream
                .range(upstream_key(upstream, 0)..=upstream_key(upstream, u64::MAX))
                .keys()
                .map(|k| Ok(id_of(&k?)))
                .collect(),
            None => self.letters.iter().keys().map(|k| Ok(id_of(&k?))).collect(),
        }
    }

    fn letter_count(&self) -> u64 {
        self.letter_count.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn create_saga(&self, id: &str, state: &str, record: &[u8]) -> Result<bool, StoreError> {
        use sled::Transactional;
        let index = state_key(state, id);
        (&self.sagas, &self.saga_states)
            .transaction(|(sagas, states)| {
                if sagas.get(id)?.is_some() {
                    return Ok(false);
                }
                sagas.insert(id, record)?;
                states.insert(index.as_slice(), &[])?;
                Ok(true)
            })
            .map_err(transaction_error)
    }

    fn save_saga(&self, id: &str, from: &str, to: &str, record: &[u8]) -> Result<(), StoreError> {
        if from == to {
            self.sagas.insert(id, record)?;
            return Ok(());
        }
        use sled::Transactional;
        let (old, new) = (state_key(from, id), state_key(to, id));
        (&self.sagas, &self.saga_states)
            .transaction(|(sagas, states)| {
                sagas.insert(id, record)?;
                states.remove(old.as_slice())?;
                states.insert(new.as_slice(), &[])?;
                Ok(())
            })
            .map_err(transaction_error)
    }

    fn get_saga(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.sagas.get(id)?.map(|v| v.to_vec()))
    }

    fn list_sagas(
        &self,
        state: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Vec<u8>>, Option<String>), StoreError> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let ids: Box<dyn Iterator<Item = Result<String, StoreError>>> = match state {
            None => {
                let start = after.map_or(Unbounded, |a| Excluded(a.as_bytes().to_vec()));
                Box::new(self.sagas.range((start, Unbounded)).map(|entry| {
                    let (key, _) = entry?;
                    Ok(String::from_utf8_lossy(&key).into_owned())
                }))
            }
            Some(state) => {
                let prefix = state_key(state, "");
                let start =
                    after.map_or(Included(prefix.clone()), |a| Excluded(state_key(state, a)));
                Box::new(
                    self.saga_states
                        .range((start, Unbounded))
                        .take_while(move |entry| {
                            entry.as_ref().map_or(true, |(k, _)| k.starts_with(&prefix))
                        })
                        .map(move |entry| {
                            let (key, _) = entry?;
                            Ok(String::from_utf8_lossy(&key[state.len() + 1..]).into_owned())
                        }),
                )
            }
        };
        let mut records = Vec::new();
        let mut last = None;
        for id in ids {
            let id = id?;
            if records.len() == limit {
                return Ok((records, last));
            }
            if let Some(record) = self.sagas.get(id.as_bytes())? {
                records.push(record.to_vec());
                last = Some(id);
            }
        }
        Ok((records, None))
    }

    fn saga_counts(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut counts: Vec<(String, u64)> = Vec::new();
        for entry in self.saga_states.iter() {
            let (key, _) = entry?;
            let state = key.split(|b| *b == 0).next().unwrap_or_default();
            match counts.last_mut() {
                Some((s, n)) if s.as_bytes() == state => *n += 1,
                _ => counts.push((String::from_utf8_lossy(state).into_owned(), 1)),
            }
        }
        Ok(counts)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn put(
        store: &SledStore,
        workflow: &str,
        step: &str,
        expected: Option<u64>,
        ttl_ms: Option<u64>,
        now: u64,
    ) -> Result<Checkpoint, StoreError> {
        store.put_checkpoint(
            NewCheckpoint {
                checkpoint: Checkpoint {
                    workflow_id: workflow.into(),
                    step: step.into(),
                    ..Default::default()
                },
                ttl: ttl_ms.map(Duration::from_millis),
                expected_version: expected,
            },
            at(now),
        )
    }

    fn store() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        (dir, store)
    }

    #[test]
    fn versions_count_up_and_compare_and_swap_holds() {
        let (_dir, store) = store();
        assert_eq!(
            put(&store, "inv-1", "ocr", Some(0), None, 1)
                .unwrap()
                .version,
            1
        );
        assert_eq!(
            put(&store, "inv-1", "validate", None, None, 2)
                .unwrap()
                .version,
            2
        );
        match put(&store, "inv-1", "match", Some(1), None, 3) {
            Err(StoreError::Conflict {
                expected: 1,
                current: 2,
            }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(
            put(&store, "inv-1", "match", Some(2), None, 3)
                .unwrap()
                .version,
            3
        );
        assert!(matches!(
            put(&store, "inv-1", "x", Some(0), None, 4),
            Err(StoreError::Conflict { current: 3, .. })
        ));
        let latest = store.get_checkpoint("inv-1", 0, at(5)).unwrap();
        assert_eq!((latest.version, latest.step.as_str()), (3, "match"));
        assert_eq!(store.get_checkpoint("inv-1", 1, at(5)).unwrap().step, "ocr");
        assert!(matches!(
            store.get_checkpoint("inv-1", 9, at(5)),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            store.get_checkpoint("inv-10", 0, at(5)),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn history_pages_newest_first_and_prune_keeps_the_newest() {
        let (_dir, store) = store();
        for i in 0..7 {
            put(&store, "w", &format!("s{i}"), None, None, i).unwrap();
        }
        put(&store, "w2", "other", None, None, 1).unwrap();
        let first = store.list_checkpoints("w", None, 3, at(10)).unwrap();
        let versions: Vec<u64> = first.checkpoints.iter().map(|c| c.version).collect();
        assert_eq!(versions, [7, 6, 5]);
        let second = store.list_checkpoints("w", first.next, 3, at(10)).unwrap();
        let versions: Vec<u64> = second.checkpoints.iter().map(|c| c.version).collect();
        assert_eq!(versions, [4, 3, 2]);
        let last = store.list_checkpoints("w", second.next, 3, at(10)).unwrap();
        assert_eq!(last.checkpoints.len(), 1);
        assert_eq!(last.next, None);

        assert_eq!(store.prune_workflow("w", 2, at(10)).unwrap(), 5);
        let left: Vec<u64> = store
            .list_checkpoints("w", None, 10, at(10))
            .unwrap()
            .checkpoints
            .iter()
            .map(|c| c.version)
            .collect();
        assert_eq!(left, [7, 6]);
        assert_eq!(
            put(&store, "w", "s7", Some(7), None, 11).unwrap().version,
            8
        );
        assert_eq!(store.delete_workflow("w", at(12)).unwrap(), 3);
        assert!(matches!(
            store.get_checkpoint("w", 0, at(12)),
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(store.get_checkpoint("w2", 0, at(12)).unwrap().step, "other");
    }

    #[test]
    fn expired_workflows_vanish_at_once_and_are_swept() {
        let (_dir, store) = store();
        let put1 = put(&store, "short", "a", None, Some(100), 1_000).unwrap();
        assert_eq!(put1.expires_at, Some(timestamp(1_100)));
        put(&store, "short", "b", None, None, 1_050).unwrap();
        put(&store, "kept", "a", None, None, 1_000).unwrap();
        // Refreshed: a put with a TTL moves the expiry.
        put(&store, "refreshed", "a", None, Some(100), 1_000).unwrap();
        put(&store, "refreshed", "b", None, Some(1_000), 1_050).unwrap();
        assert_eq!(
            store.get_checkpoint("short", 0, at(1_099)).unwrap().step,
            "b"
        );
        assert!(matches!(
            store.get_checkpoint("short", 0, at(1_100)),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            store.list_checkpoints("short", None, 5, at(1_100)),
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(store.sweep_expired(at(1_200)).unwrap(), 1);
        assert_eq!(store.checkpoints.scan_prefix(b"short").count(), 0);
        assert_eq!(
            store
                .get_checkpoint("refreshed", 0, at(1_200))
                .unwrap()
                .step,
            "b"
        );
        assert_eq!(store.sweep_expired(at(3_000)).unwrap(), 1);
        assert_eq!(
            store.get_checkpoint("kept", 0, at(9_000)).unwrap().step,
            "a"
        );
        assert!(store.expiry.is_empty());
    }

    fn letter(upstream: &str, reason: &str) -> DeadLetter {
        DeadLetter {
            upstream: upstream.into(),
            method: "POST".into(),
            uri: "/post".into(),
            body: bytes::Bytes::from_static(b"{}"),
            reason: reason.into(),
            ..Default::default()
        }
    }

    #[test]
    fn letters_are_listed_oldest_first_by_upstream_and_removed() {
        let (_dir, store) = store();
        let a1 = store.enqueue_letter(letter("a", "r1"), at(1)).unwrap();
        let b1 = store.enqueue_letter(letter("b", "r2"), at(2)).unwrap();
        let a2 = store.enqueue_letter(letter("a", "r3"), at(3)).unwrap();
        assert_eq!(store.letter_count(), 3);
        let ids = |letters: &[DeadLetter]| letters.iter().map(|l| l.id.clone()).collect::<Vec<_>>();
        let (all, next) = store.list_letters(None, None, 2).unwrap();
        assert_eq!(ids(&all), [a1.id.clone(), b1.id.clone()]);
        let (rest, end) = store.list_letters(None, next, 2).unwrap();
        assert_eq!(ids(&rest), std::slice::from_ref(&a2.id));
        assert_eq!(end, None);
        let (of_a, _) = store.list_letters(Some("a"), None, 10).unwrap();
        assert_eq!(ids(&of_a), [a1.id.clone(), a2.id.clone()]);
        assert_eq!(
            store.get_letter(b1.id.parse().unwrap()).unwrap().reason,
            "r2"
        );

        let mut replayed = a1.clone();
        replayed.replays = 1;
        store.update_letter(&replayed).unwrap();
        assert_eq!(store.get_letter(a1.id.parse().unwrap()).unwrap().replays, 1);

        let of_a = store.letter_ids(Some("a")).unwrap();
        assert_eq!(store.remove_letters(&of_a).unwrap(), 2);
        assert_eq!(store.letter_count(), 1);
        assert!(
            store
                .list_letters(Some("a"), None, 10)
                .unwrap()
                .0
                .is_empty()
        );
        assert!(matches!(
            store.update_letter(&replayed),
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(
            store
                .remove_letters(&store.letter_ids(None).unwrap())
                .unwrap(),
            1
        );
        assert_eq!(store.letter_count(), 0);
    }

    #[test]
    fn an_expired_workflow_starts_over() {
        let (_dir, store) = store();
        put(&store, "w", "a", None, Some(10), 0).unwrap();
        put(&store, "w", "b", None, None, 5).unwrap();
        let fresh = put(&store, "w", "new", Some(0), None, 100).unwrap();
        assert_eq!(fresh.version, 1);
        let history = store.list_checkpoints("w", None, 10, at(100)).unwrap();
        assert_eq!(history.checkpoints.len(), 1);
        assert_eq!(history.checkpoints[0].step, "new");
    }
}
