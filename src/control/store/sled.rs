//! The embedded store, on sled: checkpoints, dead letters and sagas, each
//! change an atomic batch or transaction (see `layout` for the keys).
//!
//! One implementation of the `Store` trait, so one `impl` block; its size
//! is the trait's.

use std::sync::Arc;
use std::time::SystemTime;

use prost::Message;

use super::layout::*;
use super::{NewCheckpoint, Page, Store, StoreError};
use crate::api::{Checkpoint, DeadLetter};

/// The sled-backed store.
#[derive(Debug, Clone)]
pub struct SledStore {
    db: sled::Db,
    pub(super) checkpoints: sled::Tree,
    pub(super) expiry: sled::Tree,
    letters: sled::Tree,
    letters_by_upstream: sled::Tree,
    letters_by_capture: sled::Tree,
    sagas: sled::Tree,
    saga_states: sled::Tree,
    pub(super) threads: sled::Tree,
    pub(super) thread_runs: sled::Tree,
    /// The letter count, kept here: sled's `len` walks the tree.
    letter_count: Arc<std::sync::atomic::AtomicU64>,
}

/// Why storing a letter stopped.
enum Enqueued {
    /// A letter with its capture id is stored already, under this id.
    Already(u64),
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
            letters_by_capture: db.open_tree("dead_letters_by_capture")?,
            sagas: db.open_tree("sagas")?,
            saga_states: db.open_tree("saga_states")?,
            threads: db.open_tree("threads")?,
            thread_runs: db.open_tree("thread_runs")?,
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

    fn list_workflows(
        &self,
        after: Option<&str>,
        limit: usize,
        now: SystemTime,
    ) -> Result<(Vec<Checkpoint>, Option<String>), StoreError> {
        // A workflow's keys are `id 0x00` and `id 0x01 version`: from
        // `id 0x02` on, the next workflow's. One seek per workflow, not a
        // walk over every version.
        let past = |id: &[u8]| [id, &[2]].concat();
        let mut from = after.map_or_else(Vec::new, |id| past(id.as_bytes()));
        let mut latest = Vec::with_capacity(limit.min(64));
        while let Some(entry) = self.checkpoints.range(from.clone()..).next() {
            let (key, value) = entry?;
            let end = key.iter().position(|&b| b < 2).unwrap_or(key.len());
            let id = std::str::from_utf8(&key[..end])
                .map_err(|_| StoreError::Storage("a workflow id is corrupt".into()))?;
            if key.get(end) == Some(&0) {
                let record = Workflow::decode(&value)?;
                if !record.expired(now) {
                    if latest.len() == limit {
                        let last = latest.last().map(|c: &Checkpoint| c.workflow_id.clone());
                        return Ok((latest, last));
                    }
                    let bytes = self
                        .checkpoints
                        .get(version_key(id, record.latest))?
                        .ok_or_else(|| not_found(id))?;
                    latest.push(decode_checkpoint(&bytes)?);
                }
            }
            from = past(&key[..end]);
        }
        Ok((latest, None))
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
        use sled::transaction::ConflictableTransactionError::Abort;
        let id = self.db.generate_id()?;
        letter.id = id.to_string();
        letter.enqueued_at = Some(timestamp(millis(now)));
        let bytes = letter.encode_to_vec();
        let index = upstream_key(&letter.upstream, id);
        let capture = letter.capture_id.as_bytes();
        let stored = (
            &self.letters,
            &self.letters_by_upstream,
            &self.letters_by_capture,
        )
            .transaction(|(letters, by_upstream, by_capture)| {
                if !capture.is_empty() {
                    if let Some(first) = by_capture.get(capture)? {
                        return Err(Abort(Enqueued::Already(id_of(&first))));
                    }
                    by_capture.insert(capture, &id.to_be_bytes())?;
                }
                letters.insert(&id.to_be_bytes(), bytes.as_slice())?;
                by_upstream.insert(index.as_slice(), &[])?;
                Ok(())
            });
        match stored {
            Ok(()) => {}
            Err(sled::transaction::TransactionError::Abort(Enqueued::Already(first))) => {
                return self.get_letter(first);
            }
            Err(sled::transaction::TransactionError::Storage(e)) => return Err(e.into()),
        }
        self.letter_count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(letter)
    }

    fn list_letters(
        &self,
        upstream: Option<&str>,
        after: Option<u64>,
        limit: usize,
        bodies: bool,
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
                letters.push(if bodies {
                    decode_letter(&bytes)?
                } else {
                    decode_letter_head(&bytes)?
                });
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
                if !letter.capture_id.is_empty() {
                    self.letters_by_capture
                        .remove(letter.capture_id.as_bytes())?;
                }
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

    fn threads(&self) -> &dyn super::threads::ThreadStore {
        self
    }
}
