//! The JSON face of threads (LangGraph's checkpoints): the routes under
//! `/v1/threads` and `/v1/runs`, their bodies, and a checkpoint as JSON.
//! Values are typed (`{"type", "data_base64"}`, LangGraph's
//! `serde.dumps_typed`); metadata is a JSON object.

use std::collections::BTreeMap;

use base64::Engine as _;
use http::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::{HttpApi, invalid, json, percent_decode, query};
use crate::api::json::{B64, rfc3339};
use crate::body::Body;
use crate::control::error::ApiError;
use crate::control::plane::ThreadListing;
use crate::control::store::threads::{
    ChannelBlob, NewThreadCheckpoint, PendingWrite, ThreadCheckpoint, TypedValue,
};

/// A typed value.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Typed {
    r#type: String,
    #[serde(default)]
    data_base64: String,
}

impl Typed {
    fn decode(self, field: &str) -> Result<TypedValue, ApiError> {
        let data = B64
            .decode(self.data_base64.trim())
            .map_err(|_| invalid(format!("{field}.data_base64 is not base64")))?;
        Ok(TypedValue {
            r#type: self.r#type,
            data: data.into(),
        })
    }

    fn of(value: Option<TypedValue>) -> Self {
        let value = value.unwrap_or_default();
        Self {
            r#type: value.r#type,
            data_base64: B64.encode(value.data),
        }
    }
}

/// A channel's value at a version.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BlobJson {
    channel: String,
    version: String,
    r#type: String,
    #[serde(default)]
    data_base64: String,
}

/// A pending write.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteJson {
    task_id: String,
    idx: i32,
    channel: String,
    #[serde(default)]
    task_path: String,
    r#type: String,
    #[serde(default)]
    data_base64: String,
}

/// `PUT /v1/threads/{thread}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    #[serde(default)]
    checkpoint_ns: String,
    checkpoint_id: String,
    #[serde(default)]
    parent_checkpoint_id: String,
    checkpoint: Typed,
    #[serde(default)]
    metadata: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    channel_versions: BTreeMap<String, String>,
    #[serde(default)]
    blobs: Vec<BlobJson>,
}

/// `POST /v1/threads/{thread}/writes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WritesBody {
    #[serde(default)]
    checkpoint_ns: String,
    checkpoint_id: String,
    writes: Vec<WriteJson>,
}

/// `POST /v1/threads/{thread}/copy`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CopyBody {
    target_thread_id: String,
}

/// `POST /v1/threads/{thread}/prune`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PruneBody {
    keep: u64,
}

/// A checkpoint as JSON.
#[derive(Debug, Serialize)]
struct CheckpointJson {
    thread_id: String,
    checkpoint_ns: String,
    checkpoint_id: String,
    parent_checkpoint_id: String,
    checkpoint: Typed,
    metadata: serde_json::Value,
    channel_versions: BTreeMap<String, String>,
    channel_values: Vec<BlobJson>,
    pending_writes: Vec<WriteJson>,
    created_at: Option<String>,
}

impl From<ThreadCheckpoint> for CheckpointJson {
    fn from(c: ThreadCheckpoint) -> Self {
        Self {
            created_at: rfc3339(c.created_at.as_ref()),
            metadata: serde_json::from_str(&c.metadata_json)
                .unwrap_or_else(|_| serde_json::json!({})),
            channel_values: c
                .channel_values
                .into_iter()
                .map(|b| {
                    let value = Typed::of(b.value);
                    BlobJson {
                        channel: b.channel,
                        version: b.version,
                        r#type: value.r#type,
                        data_base64: value.data_base64,
                    }
                })
                .collect(),
            pending_writes: c
                .pending_writes
                .into_iter()
                .map(|w| {
                    let value = Typed::of(w.value);
                    WriteJson {
                        task_id: w.task_id,
                        idx: w.idx,
                        channel: w.channel,
                        task_path: w.task_path,
                        r#type: value.r#type,
                        data_base64: value.data_base64,
                    }
                })
                .collect(),
            checkpoint: Typed::of(c.checkpoint),
            channel_versions: c.channel_versions,
            thread_id: c.thread_id,
            checkpoint_ns: c.checkpoint_ns,
            checkpoint_id: c.checkpoint_id,
            parent_checkpoint_id: c.parent_checkpoint_id,
        }
    }
}

impl HttpApi {
    /// The routes under `/v1/threads` and `/v1/runs`; `None` for a path
    /// that is none of theirs.
    pub(super) async fn threads(
        &self,
        request: Request<Body>,
        segments: &[&str],
    ) -> Option<Result<Response<Body>, ApiError>> {
        let method = request.method().clone();
        Some(match (method, segments) {
            (method, ["v1", "threads", thread]) => {
                let thread = match percent_decode(thread) {
                    Ok(thread) => thread,
                    Err(e) => return Some(Err(e)),
                };
                match method {
                    Method::PUT => self.put_thread(thread, request).await,
                    Method::GET => self.get_thread(&thread, &request),
                    Method::DELETE => self
                        .control
                        .delete_thread(&thread)
                        .await
                        .map(|n| json(StatusCode::OK, &serde_json::json!({"deleted": n}))),
                    _ => Err(invalid("use PUT, GET or DELETE on /v1/threads/{thread}")),
                }
            }
            (Method::GET, ["v1", "threads", thread, "history"]) => {
                self.thread_history(thread, &request)
            }
            (Method::POST, ["v1", "threads", thread, "writes"]) => {
                self.thread_writes(thread, request).await
            }
            (Method::POST, ["v1", "threads", thread, "copy"]) => {
                self.copy_thread(thread, request).await
            }
            (Method::POST, ["v1", "threads", thread, "prune"]) => {
                self.prune_thread(thread, request).await
            }
            (Method::DELETE, ["v1", "runs", run]) => match percent_decode(run) {
                Ok(run) => self
                    .control
                    .delete_thread_run(&run)
                    .await
                    .map(|n| json(StatusCode::OK, &serde_json::json!({"deleted": n}))),
                Err(e) => Err(e),
            },
            _ => return None,
        })
    }

    async fn put_thread(
        &self,
        thread: String,
        request: Request<Body>,
    ) -> Result<Response<Body>, ApiError> {
        let body: PutBody = self.body(request).await?;
        let run_id = match body.metadata.get("run_id") {
            Some(serde_json::Value::String(run)) => run.clone(),
            _ => String::new(),
        };
        let mut blobs = Vec::with_capacity(body.blobs.len());
        for (i, blob) in body.blobs.into_iter().enumerate() {
            let value = Typed {
                r#type: blob.r#type,
                data_base64: blob.data_base64,
            }
            .decode(&format!("blobs[{i}]"))?;
            blobs.push(ChannelBlob {
                channel: blob.channel,
                version: blob.version,
                value: Some(value),
            });
        }
        let new = NewThreadCheckpoint {
            checkpoint: ThreadCheckpoint {
                thread_id: thread,
                checkpoint_ns: body.checkpoint_ns,
                checkpoint_id: body.checkpoint_id,
                parent_checkpoint_id: body.parent_checkpoint_id,
                checkpoint: Some(body.checkpoint.decode("checkpoint")?),
                metadata_json: serde_json::Value::Object(body.metadata).to_string(),
                channel_versions: body.channel_versions,
                run_id,
                ..ThreadCheckpoint::default()
            },
            blobs,
        };
        let stored = self.control.put_thread_checkpoint(new).await?;
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({
                "checkpoint_ns": stored.checkpoint_ns,
                "checkpoint_id": stored.checkpoint_id,
                "created_at": rfc3339(stored.created_at.as_ref()),
            }),
        ))
    }

    fn get_thread(
        &self,
        thread: &str,
        request: &Request<Body>,
    ) -> Result<Response<Body>, ApiError> {
        let query = query(request)?;
        let ns = query.get("checkpoint_ns").map_or("", String::as_str);
        let id = query
            .get("checkpoint_id")
            .map(String::as_str)
            .filter(|i| !i.is_empty());
        let checkpoint = self.control.get_thread_checkpoint(thread, ns, id)?;
        Ok(json(StatusCode::OK, &CheckpointJson::from(checkpoint)))
    }

    fn thread_history(
        &self,
        thread: &str,
        request: &Request<Body>,
    ) -> Result<Response<Body>, ApiError> {
        let mut query = query(request)?;
        let listing = ThreadListing {
            thread_id: percent_decode(thread)?,
            checkpoint_ns: query.remove("checkpoint_ns"),
            before: query.remove("before").unwrap_or_default(),
            filter: query.remove("filter").unwrap_or_default(),
            page_size: super::number(&query, "page_size")?.unwrap_or(0),
            page_token: query.remove("page_token").unwrap_or_default(),
        };
        let (checkpoints, next_page_token) = self.control.list_thread_checkpoints(listing)?;
        let checkpoints: Vec<CheckpointJson> =
            checkpoints.into_iter().map(CheckpointJson::from).collect();
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({"checkpoints": checkpoints, "next_page_token": next_page_token}),
        ))
    }

    async fn thread_writes(
        &self,
        thread: &str,
        request: Request<Body>,
    ) -> Result<Response<Body>, ApiError> {
        let thread = percent_decode(thread)?;
        let body: WritesBody = self.body(request).await?;
        let mut writes = Vec::with_capacity(body.writes.len());
        for (i, w) in body.writes.into_iter().enumerate() {
            let value = Typed {
                r#type: w.r#type,
                data_base64: w.data_base64,
            }
            .decode(&format!("writes[{i}]"))?;
            writes.push(PendingWrite {
                task_id: w.task_id,
                idx: w.idx,
                channel: w.channel,
                value: Some(value),
                task_path: w.task_path,
            });
        }
        let stored = self
            .control
            .put_thread_writes(&thread, &body.checkpoint_ns, &body.checkpoint_id, writes)
            .await?;
        Ok(json(StatusCode::OK, &serde_json::json!({"stored": stored})))
    }

    async fn copy_thread(
        &self,
        thread: &str,
        request: Request<Body>,
    ) -> Result<Response<Body>, ApiError> {
        let thread = percent_decode(thread)?;
        let body: CopyBody = self.body(request).await?;
        let copied = self
            .control
            .copy_thread(&thread, &body.target_thread_id)
            .await?;
        Ok(json(StatusCode::OK, &serde_json::json!({"copied": copied})))
    }

    async fn prune_thread(
        &self,
        thread: &str,
        request: Request<Body>,
    ) -> Result<Response<Body>, ApiError> {
        let thread = percent_decode(thread)?;
        let body: PruneBody = self.body(request).await?;
        let deleted = self.control.prune_thread(&thread, body.keep).await?;
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({"deleted": deleted}),
        ))
    }
}
