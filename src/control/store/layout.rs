//! The layout of the control plane's data in sled: one tree per kind, so
//! that each kind's operations are atomic batches on one tree.
//!
//!
//! | tree | key | value |
//! |---|---|---|
//! | `checkpoints` | `workflow 0x00` | the workflow: latest version, expiry |
//! | `checkpoints` | `workflow 0x01 version(u64 BE)` | a `Checkpoint` message |
//! | `expiry` | `expires_at_ms(u64 BE) workflow` | empty: the TTL sweep's index |
//! | `dead_letters` | `id(u64 BE)` | a `DeadLetter` message |
//! | `dead_letters_by_upstream` | `upstream 0x00 id(u64 BE)` | empty: the per-upstream index |
//! | `dead_letters_by_capture` | capture id | `id(u64 BE)`: a letter enqueued twice is stored once |
//! | `sagas` | `saga id` | the saga's record (JSON: definition and progress) |
//! | `saga_states` | `state 0x00 saga id` | empty: the by-state index (resume, list) |
//!
//! Workflow and saga ids contain no control characters, so `0x00` and
//! `0x01` end the id unambiguously, and a workflow's versions sort oldest
//! first. A saga's record and its index entry change in one transaction.

use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

use super::StoreError;
use crate::api::{Checkpoint, DeadLetter};

/// A workflow's record: its latest version and expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Workflow {
    pub(super) latest: u64,
    /// Unix milliseconds; 0 for none.
    pub(super) expires_at_ms: u64,
}

impl Workflow {
    pub(super) fn encode(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.latest.to_be_bytes());
        out[8..].copy_from_slice(&self.expires_at_ms.to_be_bytes());
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let bytes: [u8; 16] = bytes
            .try_into()
            .map_err(|_| StoreError::Storage("a workflow record is corrupt".into()))?;
        Ok(Self {
            latest: u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes")),
            expires_at_ms: u64::from_be_bytes(bytes[8..].try_into().expect("8 bytes")),
        })
    }

    pub(super) fn expired(self, now: SystemTime) -> bool {
        self.expires_at_ms != 0 && self.expires_at_ms <= millis(now)
    }
}

pub(super) fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(super) fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((ms % 1000) * 1_000_000).expect("under a second"),
    }
}

pub(super) fn workflow_key(workflow: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(workflow.len() + 1);
    key.extend_from_slice(workflow.as_bytes());
    key.push(0);
    key
}

pub(super) fn versions_prefix(workflow: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(workflow.len() + 9);
    key.extend_from_slice(workflow.as_bytes());
    key.push(1);
    key
}

pub(super) fn version_key(workflow: &str, version: u64) -> Vec<u8> {
    let mut key = versions_prefix(workflow);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

pub(super) fn expiry_key(expires_at_ms: u64, workflow: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + workflow.len());
    key.extend_from_slice(&expires_at_ms.to_be_bytes());
    key.extend_from_slice(workflow.as_bytes());
    key
}

pub(super) fn upstream_key(upstream: &str, id: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(upstream.len() + 9);
    key.extend_from_slice(upstream.as_bytes());
    key.push(0);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

pub(super) fn state_key(state: &str, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(state.len() + 1 + id.len());
    key.extend_from_slice(state.as_bytes());
    key.push(0);
    key.extend_from_slice(id.as_bytes());
    key
}

pub(super) fn transaction_error(e: sled::transaction::TransactionError<()>) -> StoreError {
    match e {
        sled::transaction::TransactionError::Storage(e) => e.into(),
        sled::transaction::TransactionError::Abort(()) => {
            StoreError::Storage("a saga transaction aborted".into())
        }
    }
}

pub(super) fn id_of(key: &[u8]) -> u64 {
    u64::from_be_bytes(
        key[key.len() - 8..]
            .try_into()
            .expect("keys end with an id"),
    )
}

/// A stored `DeadLetter` read without its body and seal: the same tags
/// (checked against the generated message by a test), so that listing
/// letters does not copy bodies of up to `--max-state` each. prost skips
/// the fields this message does not name.
#[derive(Clone, PartialEq, prost::Message)]
struct LetterHead {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    upstream: String,
    #[prost(string, tag = "3")]
    source: String,
    #[prost(string, tag = "4")]
    method: String,
    #[prost(string, tag = "5")]
    uri: String,
    #[prost(message, repeated, tag = "6")]
    headers: Vec<crate::api::Header>,
    #[prost(bool, tag = "8")]
    body_truncated: bool,
    #[prost(string, tag = "9")]
    reason: String,
    #[prost(uint32, tag = "10")]
    attempts: u32,
    #[prost(message, optional, tag = "11")]
    failed_at: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "12")]
    enqueued_at: Option<prost_types::Timestamp>,
    #[prost(uint32, tag = "13")]
    replays: u32,
    #[prost(string, tag = "14")]
    last_replay_error: String,
    #[prost(message, optional, tag = "15")]
    last_replay_at: Option<prost_types::Timestamp>,
    #[prost(bool, tag = "16")]
    grpc: bool,
    #[prost(string, tag = "17")]
    capture_id: String,
}

/// A stored letter without its body and seal.
pub(super) fn decode_letter_head(bytes: &[u8]) -> Result<DeadLetter, StoreError> {
    let h = LetterHead::decode(bytes)
        .map_err(|e| StoreError::Storage(format!("a dead letter is corrupt: {e}")))?;
    Ok(DeadLetter {
        id: h.id,
        upstream: h.upstream,
        source: h.source,
        method: h.method,
        uri: h.uri,
        headers: h.headers,
        body: bytes::Bytes::new(),
        body_truncated: h.body_truncated,
        reason: h.reason,
        attempts: h.attempts,
        failed_at: h.failed_at,
        enqueued_at: h.enqueued_at,
        replays: h.replays,
        last_replay_error: h.last_replay_error,
        last_replay_at: h.last_replay_at,
        grpc: h.grpc,
        capture_id: h.capture_id,
        seal: bytes::Bytes::new(),
    })
}

pub(super) fn decode_letter(bytes: &[u8]) -> Result<DeadLetter, StoreError> {
    DeadLetter::decode(bytes)
        .map_err(|e| StoreError::Storage(format!("a dead letter is corrupt: {e}")))
}

pub(super) fn not_found(workflow: &str) -> StoreError {
    StoreError::NotFound(format!("no workflow {workflow:?}"))
}

pub(super) fn decode_checkpoint(bytes: &[u8]) -> Result<Checkpoint, StoreError> {
    Checkpoint::decode(bytes)
        .map_err(|e| StoreError::Storage(format!("a checkpoint is corrupt: {e}")))
}
