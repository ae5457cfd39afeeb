//! Threads: checkpoints in the shape of LangGraph's checkpointers. A
//! thread has namespaces (`""` is the root); each checkpoint is named by
//! the client (LangGraph: a uuid6, so that ids sort by time), points at
//! its parent, holds its channel versions and metadata, and its channel
//! values are stored once per `(channel, version)`; pending writes are
//! kept per `(checkpoint, task, index)`.
//!
//! | tree | key | value |
//! |---|---|---|
//! | `threads` | `thread 0x01 ns 0x00 checkpoint` | a [`ThreadCheckpoint`] without values and writes |
//! | `threads` | `thread 0x02 ns 0x00 checkpoint 0x00 task 0x00 idx` | a [`PendingWrite`] (`idx`: i32, sign flipped, big-endian) |
//! | `threads` | `thread 0x03 ns 0x00 channel 0x00 version` | a [`TypedValue`] |
//! | `thread_runs` | `run 0x00 thread 0x00 ns 0x00 checkpoint` | empty: the checkpoints of a run |
//!
//! Ids and namespaces contain no control characters, so `0x00` ends each
//! part, and every key of a thread is in `[thread 0x01, thread 0x04)`:
//! thread `a` never takes `a-2`'s keys (`-` sorts above `0x04`). One
//! thread's change is one batch on `threads`; the run index is written
//! first and may hold stale entries, which readers check and drop.
//!
//! The records are the `Threads` gRPC service's own messages
//! (`proto/breakwater/v1/threads.proto`), as the other records are.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use prost::Message;

use super::layout::{millis, timestamp};
use super::{SledStore, StoreError};

pub use crate::api::{ChannelBlob, PendingWrite, ThreadCheckpoint, TypedValue};

impl TypedValue {
    /// Whether it holds no value (`type: "empty"`).
    pub fn is_empty_marker(&self) -> bool {
        self.r#type == "empty"
    }
}

/// A new checkpoint and the channel values it brings.
#[derive(Debug, Clone, Default)]
pub struct NewThreadCheckpoint {
    /// The checkpoint (values, writes and `created_at` are ignored).
    pub checkpoint: ThreadCheckpoint,
    /// The values of the channels whose version moved.
    pub blobs: Vec<ChannelBlob>,
}

/// What a thread listing asks for.
#[derive(Debug, Clone, Default)]
pub struct ThreadQuery {
    /// The thread.
    pub thread_id: String,
    /// One namespace, or every one.
    pub checkpoint_ns: Option<String>,
    /// Only ids below this one.
    pub before: Option<String>,
    /// Metadata keys that must be equal (a JSON object).
    pub filter: Option<serde_json::Map<String, serde_json::Value>>,
    /// At most this many.
    pub limit: usize,
    /// Continue after this position: `(namespace, id)`.
    pub after: Option<(String, String)>,
    /// Stop once the page holds this many bytes (at least one checkpoint).
    pub budget_bytes: usize,
}

/// One page of a listing.
#[derive(Debug, Default)]
pub struct ThreadPage {
    /// The checkpoints, filled in.
    pub checkpoints: Vec<ThreadCheckpoint>,
    /// Where to continue, if there may be more.
    pub next: Option<(String, String)>,
}

/// At most this many records are examined for one page of a filtered
/// listing; the page may then be short, with a token to go on.
const SCAN_LIMIT: usize = 10_000;

const RECORD: u8 = 0x01;
const WRITE: u8 = 0x02;
const BLOB: u8 = 0x03;

fn key(parts: &[&[u8]]) -> Vec<u8> {
    let mut key = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            key.push(0);
        }
        key.extend_from_slice(part);
    }
    key
}

/// `thread kind`, the start of a thread's keys of one kind.
fn kind_prefix(thread: &str, kind: u8) -> Vec<u8> {
    let mut key = thread.as_bytes().to_vec();
    key.push(kind);
    key
}

/// `thread kind ns 0x00`, the start of a namespace's keys of one kind.
fn ns_prefix(thread: &str, kind: u8, ns: &str) -> Vec<u8> {
    let mut key = kind_prefix(thread, kind);
    key.extend_from_slice(ns.as_bytes());
    key.push(0);
    key
}

fn record_prefix(thread: &str, ns: &str) -> Vec<u8> {
    ns_prefix(thread, RECORD, ns)
}

fn record_key(thread: &str, ns: &str, id: &str) -> Vec<u8> {
    let mut key = record_prefix(thread, ns);
    key.extend_from_slice(id.as_bytes());
    key
}

fn writes_prefix(thread: &str, ns: &str, id: &str) -> Vec<u8> {
    let mut key = ns_prefix(thread, WRITE, ns);
    key.extend_from_slice(id.as_bytes());
    key.push(0);
    key
}

fn write_key(thread: &str, ns: &str, id: &str, task: &str, idx: i32) -> Vec<u8> {
    let mut key = writes_prefix(thread, ns, id);
    key.extend_from_slice(task.as_bytes());
    key.push(0);
    key.extend_from_slice(&((idx as u32) ^ 0x8000_0000).to_be_bytes());
    key
}

fn blobs_prefix(thread: &str, ns: &str) -> Vec<u8> {
    ns_prefix(thread, BLOB, ns)
}

fn blob_key(thread: &str, ns: &str, channel: &str, version: &str) -> Vec<u8> {
    let mut key = blobs_prefix(thread, ns);
    key.extend_from_slice(&self::key(&[channel.as_bytes(), version.as_bytes()]));
    key
}

fn run_key(run: &str, thread: &str, ns: &str, id: &str) -> Vec<u8> {
    key(&[
        run.as_bytes(),
        thread.as_bytes(),
        ns.as_bytes(),
        id.as_bytes(),
    ])
}

/// The `(namespace, id)` of a record key, given its thread's length.
fn record_position(key: &[u8], thread_len: usize) -> Result<(String, String), StoreError> {
    let rest = &key[thread_len + 1..];
    let zero = rest
        .iter()
        .position(|b| *b == 0)
        .ok_or_else(|| corrupt("a thread record key"))?;
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| corrupt("a thread record key"));
    Ok((text(&rest[..zero])?, text(&rest[zero + 1..])?))
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Storage(format!("{what} is corrupt"))
}

fn decode<M: Message + Default>(bytes: &[u8], what: &str) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|_| corrupt(what))
}

/// JSON equality as Python's: numbers by value (`1 == 1.0`).
fn same(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(a), Value::Number(b)) => match (a.as_i64(), b.as_i64()) {
            (Some(a), Some(b)) => a == b,
            _ => a.as_f64() == b.as_f64(),
        },
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same(a, b))
        }
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len() && a.iter().all(|(k, v)| b.get(k).is_some_and(|w| same(v, w)))
        }
        (a, b) => a == b,
    }
}

/// Whether a checkpoint's metadata holds every key of `filter`, equal.
fn passes(record: &ThreadCheckpoint, filter: &serde_json::Map<String, serde_json::Value>) -> bool {
    let Ok(serde_json::Value::Object(metadata)) =
        serde_json::from_str::<serde_json::Value>(&record.metadata_json)
    else {
        return filter.is_empty();
    };
    filter
        .iter()
        .all(|(k, v)| metadata.get(k).is_some_and(|have| same(have, v)))
}

/// What the control plane stores of threads. One implementation, on
/// sled; calls are synchronous, durability comes from the store's flush.
/// A caller serialises the calls that change one thread.
pub trait ThreadStore: Send + Sync {
    /// Stores a checkpoint (replacing one with its id) and its blobs.
    fn put_thread_checkpoint(
        &self,
        new: NewThreadCheckpoint,
        now: SystemTime,
    ) -> Result<ThreadCheckpoint, StoreError>;
    /// Stores writes against a checkpoint, which need not exist: for
    /// `idx >= 0` the first write of `(task_id, idx)` stays, for `idx < 0`
    /// a write replaces the last. Returns how many were stored.
    fn put_thread_writes(
        &self,
        thread: &str,
        ns: &str,
        checkpoint: &str,
        writes: Vec<PendingWrite>,
    ) -> Result<u32, StoreError>;
    /// One checkpoint, or the newest of the namespace, filled in.
    fn get_thread_checkpoint(
        &self,
        thread: &str,
        ns: &str,
        checkpoint: Option<&str>,
    ) -> Result<Option<ThreadCheckpoint>, StoreError>;
    /// A thread's checkpoints, newest first in each namespace, the
    /// namespaces in order.
    fn list_thread_checkpoints(&self, query: &ThreadQuery) -> Result<ThreadPage, StoreError>;
    /// Deletes a thread; returns how many checkpoints went.
    fn delete_thread(&self, thread: &str) -> Result<u64, StoreError>;
    /// Deletes the checkpoints of a run, in every thread; returns how many.
    fn delete_thread_run(&self, run: &str) -> Result<u64, StoreError>;
    /// Copies a thread to one that has no checkpoints; returns how many.
    fn copy_thread(&self, from: &str, to: &str) -> Result<u64, StoreError>;
    /// Keeps the newest `keep` checkpoints of each namespace; returns how
    /// many went.
    fn prune_thread(&self, thread: &str, keep: u64) -> Result<u64, StoreError>;
}

impl SledStore {
    fn record(
        &self,
        thread: &str,
        ns: &str,
        id: &str,
    ) -> Result<Option<ThreadCheckpoint>, StoreError> {
        self.threads
            .get(record_key(thread, ns, id))?
            .map(|bytes| decode(&bytes, "a thread checkpoint"))
            .transpose()
    }

    /// A stored record with its values and writes.
    fn filled(&self, mut record: ThreadCheckpoint) -> Result<ThreadCheckpoint, StoreError> {
        let (thread, ns, id) = (
            &record.thread_id,
            &record.checkpoint_ns,
            &record.checkpoint_id,
        );
        let mut values = Vec::new();
        for (channel, version) in &record.channel_versions {
            let Some(bytes) = self.threads.get(blob_key(thread, ns, channel, version))? else {
                continue;
            };
            let value: TypedValue = decode(&bytes, "a channel value")?;
            if !value.is_empty_marker() {
                values.push(ChannelBlob {
                    channel: channel.clone(),
                    version: version.clone(),
                    value: Some(value),
                });
            }
        }
        let mut writes = Vec::new();
        for entry in self.threads.scan_prefix(writes_prefix(thread, ns, id)) {
            let (_, bytes) = entry?;
            writes.push(decode::<PendingWrite>(&bytes, "a pending write")?);
        }
        writes.sort_by(|a, b| {
            (&a.task_path, &a.task_id, a.idx).cmp(&(&b.task_path, &b.task_id, b.idx))
        });
        record.channel_values = values;
        record.pending_writes = writes;
        Ok(record)
    }

    /// Removes a record and its writes (in `batch`); the run index entry
    /// goes at once.
    fn remove_record(
        &self,
        batch: &mut sled::Batch,
        record: &ThreadCheckpoint,
    ) -> Result<(), StoreError> {
        let (thread, ns, id) = (
            &record.thread_id,
            &record.checkpoint_ns,
            &record.checkpoint_id,
        );
        batch.remove(record_key(thread, ns, id));
        for key in self
            .threads
            .scan_prefix(writes_prefix(thread, ns, id))
            .keys()
        {
            batch.remove(key?);
        }
        if !record.run_id.is_empty() {
            self.thread_runs
                .remove(run_key(&record.run_id, thread, ns, id))?;
        }
        Ok(())
    }

    /// Removes (in `batch`) the blobs of `(thread, ns)` that none of
    /// `kept` names.
    fn collect_blobs(
        &self,
        batch: &mut sled::Batch,
        thread: &str,
        ns: &str,
        kept: &[ThreadCheckpoint],
    ) -> Result<(), StoreError> {
        let named: BTreeSet<Vec<u8>> = kept
            .iter()
            .flat_map(|r| r.channel_versions.iter())
            .map(|(channel, version)| blob_key(thread, ns, channel, version))
            .collect();
        for key in self.threads.scan_prefix(blobs_prefix(thread, ns)).keys() {
            let key = key?;
            if !named.contains(key.as_ref()) {
                batch.remove(key);
            }
        }
        Ok(())
    }

    /// Every record of a thread, by namespace (in order), oldest first.
    fn records_by_ns(
        &self,
        thread: &str,
    ) -> Result<BTreeMap<String, Vec<ThreadCheckpoint>>, StoreError> {
        let mut by_ns: BTreeMap<String, Vec<ThreadCheckpoint>> = BTreeMap::new();
        for entry in self.threads.scan_prefix(kind_prefix(thread, RECORD)) {
            let (_, bytes) = entry?;
            let record: ThreadCheckpoint = decode(&bytes, "a thread checkpoint")?;
            by_ns
                .entry(record.checkpoint_ns.clone())
                .or_default()
                .push(record);
        }
        Ok(by_ns)
    }
}

impl ThreadStore for SledStore {
    fn put_thread_checkpoint(
        &self,
        new: NewThreadCheckpoint,
        now: SystemTime,
    ) -> Result<ThreadCheckpoint, StoreError> {
        let mut record = new.checkpoint;
        record.channel_values.clear();
        record.pending_writes.clear();
        record.created_at = Some(timestamp(millis(now)));
        let (thread, ns, id) = (
            record.thread_id.clone(),
            record.checkpoint_ns.clone(),
            record.checkpoint_id.clone(),
        );
        let old = self.record(&thread, &ns, &id)?;
        if !record.run_id.is_empty() {
            self.thread_runs
                .insert(run_key(&record.run_id, &thread, &ns, &id), &[])?;
        }
        let mut batch = sled::Batch::default();
        for blob in &new.blobs {
            let value = blob.value.clone().unwrap_or_default();
            batch.insert(
                blob_key(&thread, &ns, &blob.channel, &blob.version),
                value.encode_to_vec(),
            );
        }
        batch.insert(record_key(&thread, &ns, &id), record.encode_to_vec());
        self.threads.apply_batch(batch)?;
        if let Some(old) = old
            && !old.run_id.is_empty()
            && old.run_id != record.run_id
        {
            self.thread_runs
                .remove(run_key(&old.run_id, &thread, &ns, &id))?;
        }
        Ok(record)
    }

    fn put_thread_writes(
        &self,
        thread: &str,
        ns: &str,
        checkpoint: &str,
        writes: Vec<PendingWrite>,
    ) -> Result<u32, StoreError> {
        let mut batch = sled::Batch::default();
        let mut stored = 0;
        let mut seen = BTreeSet::new();
        for write in writes {
            let key = write_key(thread, ns, checkpoint, &write.task_id, write.idx);
            let first = write.idx >= 0;
            if first && (seen.contains(&key) || self.threads.contains_key(&key)?) {
                continue;
            }
            seen.insert(key.clone());
            batch.insert(key, write.encode_to_vec());
            stored += 1;
        }
        self.threads.apply_batch(batch)?;
        Ok(stored)
    }

    fn get_thread_checkpoint(
        &self,
        thread: &str,
        ns: &str,
        checkpoint: Option<&str>,
    ) -> Result<Option<ThreadCheckpoint>, StoreError> {
        let record = match checkpoint {
            Some(id) => self.record(thread, ns, id)?,
            None => match self
                .threads
                .scan_prefix(record_prefix(thread, ns))
                .next_back()
            {
                Some(entry) => Some(decode(&entry?.1, "a thread checkpoint")?),
                None => None,
            },
        };
        record.map(|r| self.filled(r)).transpose()
    }

    fn list_thread_checkpoints(&self, query: &ThreadQuery) -> Result<ThreadPage, StoreError> {
        let thread = &query.thread_id;
        // Each namespace's ids, newest last (keys only: cheap).
        let mut positions: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let prefix = match &query.checkpoint_ns {
            Some(ns) => record_prefix(thread, ns),
            None => kind_prefix(thread, RECORD),
        };
        for key in self.threads.scan_prefix(prefix).keys() {
            let (ns, id) = record_position(&key?, thread.len())?;
            positions.entry(ns).or_default().push(id);
        }
        let mut page = ThreadPage::default();
        let mut examined = 0;
        let mut bytes = 0;
        let mut resumed = query.after.is_none();
        for (ns, ids) in &positions {
            for id in ids.iter().rev() {
                if !resumed {
                    if query
                        .after
                        .as_ref()
                        .is_some_and(|(n, i)| n == ns && i == id)
                    {
                        resumed = true;
                    }
                    continue;
                }
                if query
                    .before
                    .as_ref()
                    .is_some_and(|b| id.as_str() >= b.as_str())
                {
                    continue;
                }
                if page.checkpoints.len() >= query.limit || examined >= SCAN_LIMIT {
                    return Ok(page);
                }
                examined += 1;
                page.next = Some((ns.clone(), id.clone()));
                let Some(record) = self.record(thread, ns, id)? else {
                    continue;
                };
                if query.filter.as_ref().is_some_and(|f| !passes(&record, f)) {
                    continue;
                }
                let record = self.filled(record)?;
                bytes += record.encoded_len();
                page.checkpoints.push(record);
                if bytes >= query.budget_bytes {
                    return Ok(page);
                }
            }
        }
        page.next = None;
        Ok(page)
    }

    fn delete_thread(&self, thread: &str) -> Result<u64, StoreError> {
        let mut batch = sled::Batch::default();
        let mut deleted = 0;
        for entry in self
            .threads
            .range(kind_prefix(thread, RECORD)..kind_prefix(thread, BLOB + 1))
        {
            let (key, bytes) = entry?;
            if key.get(thread.len()) == Some(&RECORD) {
                let record: ThreadCheckpoint = decode(&bytes, "a thread checkpoint")?;
                if !record.run_id.is_empty() {
                    self.thread_runs.remove(run_key(
                        &record.run_id,
                        thread,
                        &record.checkpoint_ns,
                        &record.checkpoint_id,
                    ))?;
                }
                deleted += 1;
            }
            batch.remove(key);
        }
        self.threads.apply_batch(batch)?;
        Ok(deleted)
    }

    fn delete_thread_run(&self, run: &str) -> Result<u64, StoreError> {
        let mut prefix = run.as_bytes().to_vec();
        prefix.push(0);
        let mut deleted = 0;
        let mut touched: BTreeSet<(String, String)> = BTreeSet::new();
        let mut batch = sled::Batch::default();
        for key in self.thread_runs.scan_prefix(&prefix).keys() {
            let key = key?;
            let parts: Vec<&[u8]> = key[prefix.len()..].splitn(3, |b| *b == 0).collect();
            let [thread, ns, id] = parts.as_slice() else {
                self.thread_runs.remove(&key)?;
                continue;
            };
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            let (thread, ns, id) = (text(thread), text(ns), text(id));
            match self.record(&thread, &ns, &id)? {
                Some(record) if record.run_id == run => {
                    self.remove_record(&mut batch, &record)?;
                    touched.insert((thread, ns));
                    deleted += 1;
                }
                // A stale entry: the checkpoint went, or is another run's.
                _ => {
                    self.thread_runs.remove(&key)?;
                }
            }
        }
        self.threads.apply_batch(batch)?;
        let mut batch = sled::Batch::default();
        for (thread, ns) in touched {
            let kept = self.records_by_ns(&thread)?.remove(&ns).unwrap_or_default();
            self.collect_blobs(&mut batch, &thread, &ns, &kept)?;
        }
        self.threads.apply_batch(batch)?;
        Ok(deleted)
    }

    fn copy_thread(&self, from: &str, to: &str) -> Result<u64, StoreError> {
        if self
            .threads
            .scan_prefix(kind_prefix(to, RECORD))
            .next()
            .is_some()
        {
            return Err(StoreError::Precondition(format!(
                "thread {to:?} has checkpoints already: copy only to a thread without any"
            )));
        }
        let mut batch = sled::Batch::default();
        let mut copied = 0;
        for entry in self
            .threads
            .range(kind_prefix(from, RECORD)..kind_prefix(from, BLOB + 1))
        {
            let (key, bytes) = entry?;
            let mut target = to.as_bytes().to_vec();
            target.extend_from_slice(&key[from.len()..]);
            if key.get(from.len()) == Some(&RECORD) {
                let mut record: ThreadCheckpoint = decode(&bytes, "a thread checkpoint")?;
                record.thread_id = to.to_owned();
                if !record.run_id.is_empty() {
                    self.thread_runs.insert(
                        run_key(
                            &record.run_id,
                            to,
                            &record.checkpoint_ns,
                            &record.checkpoint_id,
                        ),
                        &[],
                    )?;
                }
                batch.insert(target, record.encode_to_vec());
                copied += 1;
            } else {
                batch.insert(target, bytes);
            }
        }
        self.threads.apply_batch(batch)?;
        Ok(copied)
    }

    fn prune_thread(&self, thread: &str, keep: u64) -> Result<u64, StoreError> {
        if keep == 0 {
            return self.delete_thread(thread);
        }
        let keep = usize::try_from(keep).unwrap_or(usize::MAX);
        let mut batch = sled::Batch::default();
        let mut deleted = 0;
        for (ns, records) in self.records_by_ns(thread)? {
            let cut = records.len().saturating_sub(keep);
            for record in &records[..cut] {
                self.remove_record(&mut batch, record)?;
                deleted += 1;
            }
            self.collect_blobs(&mut batch, thread, &ns, &records[cut..])?;
        }
        self.threads.apply_batch(batch)?;
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        (dir, store)
    }

    fn typed(text: &str) -> Option<TypedValue> {
        Some(TypedValue {
            r#type: "json".into(),
            data: bytes::Bytes::copy_from_slice(text.as_bytes()),
        })
    }

    /// Puts checkpoint `id` of `thread`/`ns` with channel `a` at `version`
    /// (a new value when `value` is set) and `metadata`.
    fn put(
        store: &SledStore,
        thread: &str,
        ns: &str,
        id: &str,
        version: &str,
        value: Option<&str>,
        metadata: &str,
    ) {
        let run_id = serde_json::from_str::<serde_json::Value>(metadata).unwrap()["run_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        store
            .put_thread_checkpoint(
                NewThreadCheckpoint {
                    checkpoint: ThreadCheckpoint {
                        thread_id: thread.into(),
                        checkpoint_ns: ns.into(),
                        checkpoint_id: id.into(),
                        checkpoint: typed("{}"),
                        metadata_json: metadata.into(),
                        channel_versions: BTreeMap::from([("a".into(), version.into())]),
                        run_id,
                        ..Default::default()
                    },
                    blobs: value
                        .map(|v| ChannelBlob {
                            channel: "a".into(),
                            version: version.into(),
                            value: typed(v),
                        })
                        .into_iter()
                        .collect(),
                },
                SystemTime::now(),
            )
            .unwrap();
    }

    fn ids(page: &ThreadPage) -> Vec<(&str, &str)> {
        page.checkpoints
            .iter()
            .map(|c| (c.checkpoint_ns.as_str(), c.checkpoint_id.as_str()))
            .collect()
    }

    fn listing(thread: &str) -> ThreadQuery {
        ThreadQuery {
            thread_id: thread.into(),
            limit: 100,
            budget_bytes: usize::MAX,
            ..Default::default()
        }
    }

    #[test]
    fn checkpoints_list_newest_first_by_namespace_and_keep_values_per_version() {
        let (_dir, store) = store();
        put(&store, "t", "", "1", "v1", Some("one"), r#"{"step": 1}"#);
        put(&store, "t", "", "2", "v1", None, r#"{"step": 2.0}"#);
        put(
            &store,
            "t",
            "sub:x",
            "3",
            "v2",
            Some("two"),
            r#"{"step": 3}"#,
        );
        // Another thread whose id starts with this one's.
        put(&store, "t-2", "", "9", "v9", Some("nine"), "{}");

        let all = store.list_thread_checkpoints(&listing("t")).unwrap();
        assert_eq!(ids(&all), [("", "2"), ("", "1"), ("sub:x", "3")]);
        assert!(all.next.is_none());
        // Checkpoint 2 did not change channel a: it reads version v1's value.
        let newest = store.get_thread_checkpoint("t", "", None).unwrap().unwrap();
        assert_eq!(newest.checkpoint_id, "2");
        assert_eq!(newest.channel_values[0].value, typed("one"));
        let root = ThreadQuery {
            checkpoint_ns: Some(String::new()),
            before: Some("2".into()),
            ..listing("t")
        };
        assert_eq!(
            ids(&store.list_thread_checkpoints(&root).unwrap()),
            [("", "1")]
        );
        // Numbers compare by value, as in Python.
        let filtered = ThreadQuery {
            filter: Some(serde_json::from_str(r#"{"step": 2}"#).unwrap()),
            ..listing("t")
        };
        assert_eq!(
            ids(&store.list_thread_checkpoints(&filtered).unwrap()),
            [("", "2")]
        );
        // Pages continue where they stopped.
        let first = store
            .list_thread_checkpoints(&ThreadQuery {
                limit: 2,
                ..listing("t")
            })
            .unwrap();
        assert_eq!(ids(&first), [("", "2"), ("", "1")]);
        let rest = store
            .list_thread_checkpoints(&ThreadQuery {
                after: first.next.clone(),
                ..listing("t")
            })
            .unwrap();
        assert_eq!(ids(&rest), [("sub:x", "3")]);
        assert!(
            store
                .get_thread_checkpoint("t", "", Some("9"))
                .unwrap()
                .is_none()
        );
        assert!(
            store
                .get_thread_checkpoint("nobody", "", None)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn writes_keep_the_first_of_a_task_index_and_replace_special_ones() {
        let (_dir, store) = store();
        let write = |idx: i32, value: &str| PendingWrite {
            task_id: "task".into(),
            idx,
            channel: if idx < 0 {
                "__error__".into()
            } else {
                "a".into()
            },
            value: typed(value),
            task_path: "p".into(),
        };
        // Writes may come before their checkpoint.
        assert_eq!(
            store
                .put_thread_writes("t", "", "1", vec![write(0, "first"), write(-1, "e1")])
                .unwrap(),
            2
        );
        assert_eq!(
            store
                .put_thread_writes("t", "", "1", vec![write(0, "second"), write(-1, "e2")])
                .unwrap(),
            1
        );
        put(&store, "t", "", "1", "v1", Some("x"), "{}");
        let read = store
            .get_thread_checkpoint("t", "", Some("1"))
            .unwrap()
            .unwrap();
        let writes: Vec<(i32, Option<TypedValue>)> = read
            .pending_writes
            .iter()
            .map(|w| (w.idx, w.value.clone()))
            .collect();
        assert_eq!(writes, [(-1, typed("e2")), (0, typed("first"))]);
    }

    #[test]
    fn prune_runs_and_deletes_collect_what_nothing_names() {
        let (_dir, store) = store();
        put(
            &store,
            "t",
            "",
            "1",
            "v1",
            Some("one"),
            r#"{"run_id": "r1"}"#,
        );
        put(
            &store,
            "t",
            "",
            "2",
            "v2",
            Some("two"),
            r#"{"run_id": "r2"}"#,
        );
        put(&store, "t", "", "3", "v2", None, r#"{"run_id": "r2"}"#);
        store
            .put_thread_writes(
                "t",
                "",
                "1",
                vec![PendingWrite {
                    task_id: "k".into(),
                    ..Default::default()
                }],
            )
            .unwrap();
        let blobs = |store: &SledStore| store.threads.scan_prefix(blobs_prefix("t", "")).count();
        let writes = |store: &SledStore| store.threads.scan_prefix(kind_prefix("t", WRITE)).count();
        assert_eq!(store.delete_thread_run("r1").unwrap(), 1);
        assert_eq!(
            (blobs(&store), writes(&store)),
            (1, 0),
            "v1 and checkpoint 1's write went"
        );
        assert_eq!(store.delete_thread_run("r1").unwrap(), 0);
        // A copy takes everything, ids kept, and refuses a thread in use.
        assert_eq!(store.copy_thread("t", "u").unwrap(), 2);
        assert!(matches!(
            store.copy_thread("t", "u"),
            Err(StoreError::Precondition(_))
        ));
        assert_eq!(
            store
                .get_thread_checkpoint("u", "", Some("3"))
                .unwrap()
                .unwrap()
                .channel_values[0]
                .value,
            typed("two")
        );
        // The newest stays, with the value it names.
        assert_eq!(store.prune_thread("t", 1).unwrap(), 1);
        assert_eq!(
            ids(&store.list_thread_checkpoints(&listing("t")).unwrap()),
            [("", "3")]
        );
        assert_eq!(blobs(&store), 1);
        // The copy's run index: deleting run r2 reaches both threads.
        assert_eq!(store.delete_thread_run("r2").unwrap(), 3);
        assert_eq!(blobs(&store), 0);
        put(&store, "t", "", "4", "v4", Some("four"), "{}");
        assert_eq!(store.delete_thread("t").unwrap(), 1);
        assert_eq!(store.threads.scan_prefix(b"t").count(), 0);
        assert_eq!(store.delete_thread("t").unwrap(), 0);
    }
}
