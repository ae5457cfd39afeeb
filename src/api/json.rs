//! The JSON shapes of the control plane's records: what its HTTP API
//! answers and takes, and what the CLI prints with `--json`. One
//! definition for the server and its clients.

use std::collections::BTreeMap;

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{Checkpoint, DeadLetter, Header};

/// Base64 as the JSON shapes write bytes.
pub const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A checkpoint as JSON (the HTTP API's and the CLI's `--json` form).
#[derive(Debug, Serialize)]
pub struct CheckpointJson {
    workflow_id: String,
    version: u64,
    step: String,
    completed_steps: Vec<String>,
    /// The state, when it is JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<serde_json::Value>,
    /// The state's bytes, always.
    state_base64: String,
    metadata: BTreeMap<String, String>,
    created_at: Option<String>,
    expires_at: Option<String>,
}

/// A timestamp as RFC 3339 text, to the millisecond.
pub fn rfc3339(t: Option<&prost_types::Timestamp>) -> Option<String> {
    let t = std::time::SystemTime::try_from(*t?).ok()?;
    Some(humantime::format_rfc3339_millis(t).to_string())
}

impl From<Checkpoint> for CheckpointJson {
    fn from(c: Checkpoint) -> Self {
        Self {
            state: serde_json::from_slice(&c.state).ok(),
            state_base64: B64.encode(&c.state),
            created_at: rfc3339(c.created_at.as_ref()),
            expires_at: rfc3339(c.expires_at.as_ref()),
            workflow_id: c.workflow_id,
            version: c.version,
            step: c.step,
            completed_steps: c.completed_steps,
            metadata: c.metadata.into_iter().collect(),
        }
    }
}

/// A dead letter as JSON.
#[derive(Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LetterJson {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    id: String,
    upstream: String,
    #[serde(default)]
    source: String,
    method: String,
    uri: String,
    #[serde(default)]
    headers: Vec<HeaderJson>,
    /// The body as text, when it is UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body: Option<String>,
    /// The body's bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body_base64: Option<String>,
    #[serde(default)]
    body_truncated: bool,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    attempts: u32,
    #[serde(default)]
    grpc: bool,
    #[serde(default, skip_deserializing)]
    failed_at: Option<String>,
    #[serde(default, skip_deserializing)]
    enqueued_at: Option<String>,
    #[serde(default, skip_deserializing)]
    replays: u32,
    #[serde(default, skip_deserializing, skip_serializing_if = "String::is_empty")]
    last_replay_error: String,
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    last_replay_at: Option<String>,
    /// Made by whoever captured the letter: enqueued twice, stored once.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    capture_id: String,
    /// The capturing sidecar's seal, in base64 (see `seal.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seal: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderJson {
    name: String,
    value: String,
}

impl From<DeadLetter> for LetterJson {
    fn from(l: DeadLetter) -> Self {
        Self {
            body: std::str::from_utf8(&l.body).ok().map(str::to_owned),
            body_base64: Some(B64.encode(&l.body)),
            headers: l
                .headers
                .iter()
                .map(|h| HeaderJson {
                    name: h.name.clone(),
                    value: String::from_utf8_lossy(&h.value).into_owned(),
                })
                .collect(),
            failed_at: rfc3339(l.failed_at.as_ref()),
            enqueued_at: rfc3339(l.enqueued_at.as_ref()),
            last_replay_at: rfc3339(l.last_replay_at.as_ref()),
            id: l.id,
            upstream: l.upstream,
            source: l.source,
            method: l.method,
            uri: l.uri,
            body_truncated: l.body_truncated,
            reason: l.reason,
            attempts: l.attempts,
            grpc: l.grpc,
            replays: l.replays,
            last_replay_error: l.last_replay_error,
            capture_id: l.capture_id,
            seal: (!l.seal.is_empty()).then(|| B64.encode(&l.seal)),
        }
    }
}

impl LetterJson {
    /// The letter it describes, as the control plane enqueues it; the
    /// error says what is wrong with it.
    pub fn into_letter(self) -> Result<DeadLetter, String> {
        let body = match (self.body, self.body_base64) {
            (Some(_), Some(_)) => return Err("give body or body_base64, not both".to_owned()),
            (Some(text), None) => Bytes::from(text),
            (None, Some(text)) => Bytes::from(
                B64.decode(text.trim())
                    .map_err(|e| format!("body_base64 is not base64: {e}"))?,
            ),
            (None, None) => Bytes::new(),
        };
        let seal = match self.seal {
            Some(text) => Bytes::from(
                B64.decode(text.trim())
                    .map_err(|e| format!("seal is not base64: {e}"))?,
            ),
            None => Bytes::new(),
        };
        Ok(DeadLetter {
            upstream: self.upstream,
            source: self.source,
            method: self.method,
            uri: self.uri,
            headers: self
                .headers
                .into_iter()
                .map(|h| Header {
                    name: h.name,
                    value: Bytes::from(h.value),
                })
                .collect(),
            body,
            body_truncated: self.body_truncated,
            reason: self.reason,
            attempts: self.attempts,
            grpc: self.grpc,
            failed_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            capture_id: self.capture_id,
            seal,
            ..Default::default()
        })
    }
}
