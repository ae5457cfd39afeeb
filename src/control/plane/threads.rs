//! The thread operations (LangGraph's checkpointers): checkpoints with
//! namespaces, parents and channel values stored once per version, and
//! pending writes per task. Checked here, stored by the store's
//! `ThreadStore`, acknowledged once durable.
//!
//! Every change to threads is made under one lock, held only around the
//! store call (microseconds) and never across the wait for the disk: a
//! prune that collects the channel values no checkpoint names must not
//! meet a put that has just written one, and a copy must see one state.

use std::time::SystemTime;

use base64::Engine as _;

use super::{ControlPlane, check_id};
use crate::control::error::{ApiError, page_size};
use crate::control::store::threads::{
    NewThreadCheckpoint, PendingWrite, ThreadCheckpoint, ThreadQuery,
};

const MAX_NS_BYTES: usize = 1024;
const MAX_METADATA_BYTES: usize = 64 << 10;
const MAX_WRITES: usize = 10_000;
const TOKEN: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn check_ns(ns: &str) -> Result<(), ApiError> {
    if ns.len() > MAX_NS_BYTES {
        return Err(ApiError::Invalid(format!(
            "checkpoint_ns is {} bytes, over the limit of {MAX_NS_BYTES}",
            ns.len()
        )));
    }
    if ns.chars().any(char::is_control) {
        return Err(ApiError::Invalid(
            "checkpoint_ns contains control characters".into(),
        ));
    }
    Ok(())
}

/// A listing's page token: where the last page stopped.
fn token(position: Option<(String, String)>) -> String {
    position.map_or_else(String::new, |(ns, id)| {
        TOKEN.encode(format!("{ns}\u{0}{id}"))
    })
}

fn position(token: &str) -> Result<Option<(String, String)>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    TOKEN
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|t| {
            let (ns, id) = t.split_once('\u{0}')?;
            Some((ns.to_owned(), id.to_owned()))
        })
        .map(Some)
        .ok_or_else(|| ApiError::Invalid(format!("page_token {token:?} is not one this API gave")))
}

/// A listing as the API asks for it.
#[derive(Debug, Default)]
pub struct ThreadListing {
    /// The thread.
    pub thread_id: String,
    /// One namespace, or every one.
    pub checkpoint_ns: Option<String>,
    /// Only ids below this one (`""`: all).
    pub before: String,
    /// Metadata keys that must be equal: a JSON object, or `""`.
    pub filter: String,
    /// 0: the default (50); at most 1000.
    pub page_size: u32,
    /// Where the last page stopped (`""`: the start).
    pub page_token: String,
}

impl ControlPlane {
    fn threads_changing(&self) -> std::sync::MutexGuard<'_, ()> {
        self.threads_lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores a checkpoint (replacing one with its id) with the values of
    /// the channels whose version moved; answers once durable.
    pub async fn put_thread_checkpoint(
        &self,
        new: NewThreadCheckpoint,
    ) -> Result<ThreadCheckpoint, ApiError> {
        let _timer = self.timer("threads.Put");
        let c = &new.checkpoint;
        check_id("thread_id", &c.thread_id)?;
        check_ns(&c.checkpoint_ns)?;
        check_id("checkpoint_id", &c.checkpoint_id)?;
        if !c.parent_checkpoint_id.is_empty() {
            check_id("parent_checkpoint_id", &c.parent_checkpoint_id)?;
        }
        if !c.run_id.is_empty() {
            check_id("metadata.run_id", &c.run_id)?;
        }
        if c.metadata_json.len() > MAX_METADATA_BYTES {
            return Err(ApiError::Invalid(format!(
                "metadata is {} bytes, over the limit of {MAX_METADATA_BYTES}",
                c.metadata_json.len()
            )));
        }
        for (channel, version) in &c.channel_versions {
            check_id("a channel", channel)?;
            check_id("a channel version", version)?;
        }
        for blob in &new.blobs {
            check_id("a channel", &blob.channel)?;
            check_id("a channel version", &blob.version)?;
        }
        let size = c.checkpoint.as_ref().map_or(0, |v| v.data.len())
            + c.metadata_json.len()
            + new
                .blobs
                .iter()
                .map(|b| b.value.as_ref().map_or(0, |v| v.data.len()))
                .sum::<usize>();
        if size > self.max_state_bytes {
            return Err(ApiError::Invalid(format!(
                "the checkpoint with its new channel values is {size} bytes, over the limit of {} bytes",
                self.max_state_bytes
            )));
        }
        let stored = {
            let _changing = self.threads_changing();
            self.store
                .threads()
                .put_thread_checkpoint(new, SystemTime::now())?
        };
        self.commit.durable().await?;
        Ok(stored)
    }

    /// Stores a task's writes against a checkpoint; answers once durable.
    pub async fn put_thread_writes(
        &self,
        thread: &str,
        ns: &str,
        checkpoint: &str,
        writes: Vec<PendingWrite>,
    ) -> Result<u32, ApiError> {
        let _timer = self.timer("threads.PutWrites");
        check_id("thread_id", thread)?;
        check_ns(ns)?;
        check_id("checkpoint_id", checkpoint)?;
        if writes.len() > MAX_WRITES {
            return Err(ApiError::Invalid(format!(
                "{} writes, over the limit of {MAX_WRITES}",
                writes.len()
            )));
        }
        let mut size = 0;
        for write in &writes {
            check_id("task_id", &write.task_id)?;
            check_id("a channel", &write.channel)?;
            size += write.value.as_ref().map_or(0, |v| v.data.len());
        }
        if size > self.max_state_bytes {
            return Err(ApiError::Invalid(format!(
                "the writes are {size} bytes, over the limit of {} bytes",
                self.max_state_bytes
            )));
        }
        let stored = {
            let _changing = self.threads_changing();
            self.store
                .threads()
                .put_thread_writes(thread, ns, checkpoint, writes)?
        };
        self.commit.durable().await?;
        Ok(stored)
    }

    /// One checkpoint, or the newest of a namespace.
    pub fn get_thread_checkpoint(
        &self,
        thread: &str,
        ns: &str,
        checkpoint: Option<&str>,
    ) -> Result<ThreadCheckpoint, ApiError> {
        let _timer = self.timer("threads.Get");
        check_id("thread_id", thread)?;
        check_ns(ns)?;
        self.store
            .threads()
            .get_thread_checkpoint(thread, ns, checkpoint)?
            .ok_or_else(|| {
                ApiError::NotFound(match checkpoint {
                    Some(id) => {
                        format!("thread {thread:?} has no checkpoint {id:?} in namespace {ns:?}")
                    }
                    None => format!("thread {thread:?} has no checkpoint in namespace {ns:?}"),
                })
            })
    }

    /// A thread's checkpoints, newest first in each namespace; and the
    /// token of the next page (`""` on the last).
    pub fn list_thread_checkpoints(
        &self,
        listing: ThreadListing,
    ) -> Result<(Vec<ThreadCheckpoint>, String), ApiError> {
        let _timer = self.timer("threads.List");
        check_id("thread_id", &listing.thread_id)?;
        if let Some(ns) = &listing.checkpoint_ns {
            check_ns(ns)?;
        }
        let filter = match listing.filter.trim() {
            "" => None,
            text => match serde_json::from_str(text) {
                Ok(serde_json::Value::Object(map)) => Some(map),
                _ => {
                    return Err(ApiError::Invalid(
                        "filter must be a JSON object of metadata keys and their values".into(),
                    ));
                }
            },
        };
        let query = ThreadQuery {
            thread_id: listing.thread_id,
            checkpoint_ns: listing.checkpoint_ns,
            before: Some(listing.before).filter(|b| !b.is_empty()),
            filter,
            limit: page_size(listing.page_size),
            after: position(&listing.page_token)?,
            budget_bytes: 2 * self.max_state_bytes,
        };
        let page = self.store.threads().list_thread_checkpoints(&query)?;
        Ok((page.checkpoints, token(page.next)))
    }

    /// Deletes a thread: every namespace, checkpoint, write and value.
    pub async fn delete_thread(&self, thread: &str) -> Result<u64, ApiError> {
        let _timer = self.timer("threads.Delete");
        check_id("thread_id", thread)?;
        let deleted = {
            let _changing = self.threads_changing();
            self.store.threads().delete_thread(thread)?
        };
        self.commit.durable().await?;
        Ok(deleted)
    }

    /// Deletes, in every thread, the checkpoints of a run (their
    /// metadata's `run_id`).
    pub async fn delete_thread_run(&self, run: &str) -> Result<u64, ApiError> {
        let _timer = self.timer("threads.DeleteRuns");
        check_id("run_id", run)?;
        let deleted = {
            let _changing = self.threads_changing();
            self.store.threads().delete_thread_run(run)?
        };
        self.commit.durable().await?;
        Ok(deleted)
    }

    /// Copies a thread to one without checkpoints, ids kept.
    pub async fn copy_thread(&self, from: &str, to: &str) -> Result<u64, ApiError> {
        let _timer = self.timer("threads.Copy");
        check_id("thread_id", from)?;
        check_id("target_thread_id", to)?;
        if from == to {
            return Err(ApiError::Invalid(
                "a thread cannot be copied onto itself".into(),
            ));
        }
        let copied = {
            let _changing = self.threads_changing();
            self.store.threads().copy_thread(from, to)?
        };
        self.commit.durable().await?;
        Ok(copied)
    }

    /// Keeps the newest `keep` checkpoints of each namespace (0: none).
    pub async fn prune_thread(&self, thread: &str, keep: u64) -> Result<u64, ApiError> {
        let _timer = self.timer("threads.Prune");
        check_id("thread_id", thread)?;
        let deleted = {
            let _changing = self.threads_changing();
            self.store.threads().prune_thread(thread, keep)?
        };
        self.commit.durable().await?;
        Ok(deleted)
    }
}
