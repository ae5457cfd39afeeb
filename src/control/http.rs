//! The JSON/HTTP face of the control plane, for curl and for agents
//! without gRPC stubs. The same operations as the gRPC services:
//!
//! | method and path | operation |
//! |---|---|
//! | `PUT /v1/checkpoints/{workflow}` | put (JSON body, below) |
//! | `GET /` | the status page (see `status`) |
//! | `GET /v1/status` | its overview, as JSON |
//! | `GET /v1/status/page` | the overview as the page's HTML `<main>` |
//! | `GET /v1/checkpoints[?page_size=&page_token=]` | every workflow's latest checkpoint, by workflow |
//! | `GET /v1/checkpoints/{workflow}[?version=N]` | get the latest or a version |
//! | `GET /v1/checkpoints/{workflow}/history[?page_size=&page_token=]` | list, newest first |
//! | `DELETE /v1/checkpoints/{workflow}` | delete the workflow |
//! | `POST /v1/checkpoints/{workflow}/prune` | keep the newest `{"keep": N}` |
//! | `POST /v1/dead-letters` | enqueue a letter (JSON body, below) |
//! | `GET /v1/dead-letters[?upstream=&page_size=&page_token=&without_bodies=true]` | list, oldest first |
//! | `GET /v1/dead-letters/{id}` | one letter |
//! | `POST /v1/dead-letters/{id}/replay[?force=true]` | send it again (forced: even unsealed or cut) |
//! | `DELETE /v1/dead-letters/{id}` | purge one |
//! | `DELETE /v1/dead-letters?upstream=U` or `?all=true` | purge an upstream's, or all |
//! | `POST /v1/sagas` | start a saga (its definition; 201, or 200 when it exists) |
//! | `GET /v1/sagas[?state=&page_size=&page_token=]` | list, by id |
//! | `GET /v1/sagas/{id}` | one saga |
//! | `GET /v1/sagas[/{id}]?watch=true` | events as JSON lines |
//! | `POST /v1/sagas/{id}/abort` | abort (`{"reason": "..."}`, optional) |
//! | `PUT /v1/threads/{thread}` | store a thread checkpoint (LangGraph; `threads`) |
//! | `GET /v1/threads/{thread}[?checkpoint_ns=&checkpoint_id=]` | one checkpoint, or the newest of a namespace |
//! | `GET /v1/threads/{thread}/history[?checkpoint_ns=&before=&filter=&page_size=&page_token=]` | list, newest first |
//! | `POST /v1/threads/{thread}/writes` | store pending writes |
//! | `DELETE /v1/threads/{thread}` | delete the thread |
//! | `POST /v1/threads/{thread}/copy` | copy to `{"target_thread_id"}` |
//! | `POST /v1/threads/{thread}/prune` | keep the newest `{"keep": N}` per namespace |
//! | `DELETE /v1/runs/{run_id}` | delete a run's checkpoints, in every thread |
//!
//! Errors answer `{"error": {"code": "NOT_FOUND", "message": "..."}}` with
//! the matching HTTP status (400, 401, 403, 404, 409, 500). `GET`s need
//! either token; the others the operator's, and are refused from a
//! browser page of another origin (its `Origin` is not this port's).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde::{Deserialize, Serialize};

use super::auth::{Access, Auth};
use super::error::ApiError;
use super::plane::ControlPlane;
use super::saga::SagaState;
use super::saga::spec::SagaSpec;
use crate::api::json::{B64, CheckpointJson, LetterJson, rfc3339};
use crate::api::purge_dead_letters_request::Target as PurgeTarget;
use crate::api::{
    GetCheckpointRequest, ListCheckpointsRequest, ListDeadLettersRequest, PruneCheckpointsRequest,
    PutCheckpointRequest,
};
use crate::body::{self, Body};
use crate::values::HumanDuration;

mod threads;

/// The HTTP API's handler.
#[derive(Debug, Clone)]
pub struct HttpApi {
    control: Arc<ControlPlane>,
    auth: Auth,
    /// The gRPC port, named to a gRPC client that came here instead.
    grpc_addr: std::net::SocketAddr,
    /// Status pages served (which tells a refreshed page from the first).
    renders: Arc<AtomicU64>,
    /// It answers on the gRPC port, the requests no gRPC service took.
    on_grpc_port: bool,
}

/// `PUT /v1/checkpoints/{workflow}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    #[serde(default)]
    step: String,
    #[serde(default)]
    completed_steps: Vec<String>,
    /// The state as JSON, stored as its compact text.
    state: Option<serde_json::Value>,
    /// The state as bytes, base64-encoded.
    state_base64: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    ttl: Option<HumanDuration>,
    expected_version: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PruneBody {
    keep: u32,
}

impl ApiError {
    fn http(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Invalid(_) => (StatusCode::BAD_REQUEST, "INVALID_ARGUMENT"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "NOT_FOUND"),
            ApiError::Conflict { .. } => (StatusCode::CONFLICT, "ABORTED"),
            ApiError::Precondition(_) => (StatusCode::BAD_REQUEST, "FAILED_PRECONDITION"),
            ApiError::Unauthenticated => (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"),
            ApiError::ReadOnly | ApiError::Forbidden(_) => {
                (StatusCode::FORBIDDEN, "PERMISSION_DENIED")
            }
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL"),
        }
    }
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let mut body = serde_json::to_vec_pretty(value).expect("answers serialize");
    body.push(b'\n');
    let mut response = Response::new(body::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error(e: &ApiError) -> Response<Body> {
    let (status, code) = e.http();
    let mut detail = serde_json::json!({"code": code, "message": e.to_string()});
    if let ApiError::Conflict { current, .. } = e {
        detail["current_version"] = (*current).into();
    }
    json(status, &serde_json::json!({ "error": detail }))
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::Invalid(message.into())
}

/// Parses a JSON body; errors name the field.
fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let e = e.into_inner();
        if path == "." {
            invalid(format!("invalid JSON body: {e}"))
        } else {
            invalid(format!("invalid JSON body: {path}: {e}"))
        }
    })
}

fn watching(query: &BTreeMap<String, String>) -> bool {
    query.get("watch").is_some_and(|v| v == "true" || v == "1")
}

/// `POST /v1/sagas/{id}/abort`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AbortBody {
    #[serde(default)]
    reason: String,
}

/// Decodes `%XX` escapes in a path segment.
fn percent_decode(segment: &str) -> Result<String, ApiError> {
    crate::grpc::percent_decode(segment)
        .ok_or_else(|| invalid(format!("bad percent-escape, or not UTF-8, in {segment:?}")))
}

/// The query's `key=value` pairs.
fn query(request: &Request<Body>) -> Result<BTreeMap<String, String>, ApiError> {
    let mut pairs = BTreeMap::new();
    for pair in request
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        pairs.insert(percent_decode(key)?, percent_decode(value)?);
    }
    Ok(pairs)
}

fn number<T: std::str::FromStr>(
    query: &BTreeMap<String, String>,
    key: &str,
) -> Result<Option<T>, ApiError> {
    query
        .get(key)
        .map(|v| {
            v.parse()
                .map_err(|_| invalid(format!("{key}={v:?} is not a number")))
        })
        .transpose()
}

impl HttpApi {
    /// The API over `control`, checking `auth`; the gRPC API is on
    /// `grpc_addr`.
    pub fn new(control: Arc<ControlPlane>, auth: Auth, grpc_addr: std::net::SocketAddr) -> Self {
        Self {
            control,
            auth,
            grpc_addr,
            renders: Arc::default(),
            on_grpc_port: false,
        }
    }

    /// The same API, answering on the gRPC port: what is not a gRPC call
    /// there (JSON over HTTP/1.1 or HTTP/2, the status page) is served as
    /// on the JSON port, so that a client given the gRPC URL (as the CLI
    /// takes it) can speak JSON to it.
    pub fn on_grpc_port(self) -> Self {
        Self {
            on_grpc_port: true,
            ..self
        }
    }

    /// Answers one request. A gRPC call (the CLI or a client pointed at
    /// this port by mistake) is answered as gRPC, `UNIMPLEMENTED`, with
    /// where the gRPC port is: JSON would read as a garbled message.
    pub async fn handle(&self, request: Request<Body>) -> Result<Response<Body>, Infallible> {
        if crate::grpc::is_grpc(request.headers()) {
            let message = match self.on_grpc_port {
                // A gRPC call no service took (the gRPC port's fallback).
                true => format!("no such gRPC method: {}", request.uri().path()),
                false => format!(
                    "this is the control plane's JSON port; its gRPC port is {}",
                    self.grpc_addr.port()
                ),
            };
            return Ok(crate::grpc::trailers_only(
                crate::grpc::UNIMPLEMENTED,
                &message,
            ));
        }
        Ok(match self.route(request).await {
            Ok(response) => response,
            Err(e) => error(&e),
        })
    }

    /// A JSON body, or `T::default()` when there is none.
    async fn optional_body<T: serde::de::DeserializeOwned + Default>(
        &self,
        request: Request<Body>,
    ) -> Result<T, ApiError> {
        let bytes = self.bytes(request).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(T::default());
        }
        parse(&bytes)
    }

    async fn body<T: serde::de::DeserializeOwned>(
        &self,
        request: Request<Body>,
    ) -> Result<T, ApiError> {
        parse(&self.bytes(request).await?)
    }

    async fn bytes(&self, request: Request<Body>) -> Result<Bytes, ApiError> {
        // Base64 and JSON escaping make a state up to ~4/3 its size.
        let limit = self.control.max_state_bytes() * 2 + (64 << 10);
        match Limited::new(request.into_body(), limit).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(_) => Err(invalid(format!(
                "the body is over {limit} bytes, or was cut short"
            ))),
        }
    }

    /// Streams events as JSON lines until the watch ends.
    fn watch(&self, id: Option<String>) -> Result<Response<Body>, ApiError> {
        let events = self.control.sagas.watch(id)?;
        let lines = futures_util::StreamExt::map(events, |event| {
            let mut line = match event {
                Ok(event) => serde_json::to_vec(&event),
                Err(message) => serde_json::to_vec(
                    &serde_json::json!({"error": {"code": "DATA_LOSS", "message": message}}),
                ),
            }
            .expect("events serialize");
            line.push(b'\n');
            Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(line)))
        });
        let mut response = Response::new(body::boxed(http_body_util::StreamBody::new(lines)));
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        );
        Ok(response)
    }

    /// One arm per endpoint of the table above: long, and clearer as one
    /// table than split.
    async fn route(&self, request: Request<Body>) -> Result<Response<Body>, ApiError> {
        let path = request.uri().path().to_owned();
        if path == "/" && request.method() == Method::GET {
            // The page's shell holds no data: its script asks for the
            // token and fetches the overview with it.
            return Ok(body::typed(
                StatusCode::OK,
                "text/html; charset=utf-8",
                super::status::SHELL,
            ));
        }
        let access = Access::of_http(request.method());
        if access == Access::Operate && crate::web::cross_origin(&request) {
            return Err(ApiError::Forbidden(
                "a page of another origin may not change the control plane".into(),
            ));
        }
        self.auth.check(request.headers(), access)?;
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        if matches!(segments.as_slice(), ["v1", "threads" | "runs", ..]) {
            return match self.threads(request, &segments).await {
                Some(answer) => answer,
                None => Err(ApiError::NotFound(format!(
                    "no such endpoint: {path}: see the API in docs/control-plane.md"
                ))),
            };
        }
        match (request.method().clone(), segments.as_slice()) {
            (Method::GET, ["v1", "status"]) => Ok(json(
                StatusCode::OK,
                &super::status::overview(&self.control)?,
            )),
            (Method::GET, ["v1", "status", "page"]) => {
                let render = self.renders.fetch_add(1, Ordering::Relaxed) + 1;
                let overview = super::status::overview(&self.control)?;
                Ok(body::typed(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    super::status::page(&overview, render, std::time::SystemTime::now()),
                ))
            }
            (Method::GET, ["v1", "checkpoints"]) => {
                let query = query(&request)?;
                let (latest, next_page_token) = self.control.list_workflows(
                    number(&query, "page_size")?.unwrap_or(0),
                    query.get("page_token").map_or("", String::as_str),
                )?;
                let checkpoints: Vec<CheckpointJson> =
                    latest.into_iter().map(CheckpointJson::from).collect();
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({
                        "checkpoints": checkpoints,
                        "next_page_token": next_page_token,
                    }),
                ))
            }
            (method, ["v1", "checkpoints", workflow]) => {
                let workflow = percent_decode(workflow)?;
                match method {
                    Method::PUT => self.put(workflow, request).await,
                    Method::GET => {
                        let version = number(&query(&request)?, "version")?.unwrap_or(0);
                        let checkpoint = self.control.get_checkpoint(&GetCheckpointRequest {
                            workflow_id: workflow,
                            version,
                        })?;
                        Ok(json(StatusCode::OK, &CheckpointJson::from(checkpoint)))
                    }
                    Method::DELETE => {
                        let deleted = self.control.delete_workflow(&workflow).await?;
                        Ok(json(
                            StatusCode::OK,
                            &serde_json::json!({"deleted": deleted.deleted}),
                        ))
                    }
                    _ => Err(invalid(
                        "use PUT, GET or DELETE on /v1/checkpoints/{workflow}",
                    )),
                }
            }
            (Method::GET, ["v1", "checkpoints", workflow, "history"]) => {
                let query = query(&request)?;
                let page = self.control.list_checkpoints(&ListCheckpointsRequest {
                    workflow_id: percent_decode(workflow)?,
                    page_size: number(&query, "page_size")?.unwrap_or(0),
                    page_token: query.get("page_token").cloned().unwrap_or_default(),
                })?;
                let checkpoints: Vec<CheckpointJson> = page
                    .checkpoints
                    .into_iter()
                    .map(CheckpointJson::from)
                    .collect();
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({
                        "checkpoints": checkpoints,
                        "next_page_token": page.next_page_token,
                    }),
                ))
            }
            (Method::POST, ["v1", "checkpoints", workflow, "prune"]) => {
                let workflow_id = percent_decode(workflow)?;
                let body: PruneBody = self.body(request).await?;
                let pruned = self
                    .control
                    .prune_workflow(&PruneCheckpointsRequest {
                        workflow_id,
                        keep: body.keep,
                    })
                    .await?;
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({"deleted": pruned.deleted}),
                ))
            }
            (Method::POST, ["v1", "dead-letters"]) => {
                let letter: LetterJson = self.body(request).await?;
                let stored = self
                    .control
                    .enqueue_letter(Some(letter.into_letter().map_err(ApiError::Invalid)?))
                    .await?;
                Ok(json(StatusCode::OK, &LetterJson::from(stored)))
            }
            (Method::GET, ["v1", "dead-letters"]) => {
                let query = query(&request)?;
                let page = self.control.list_letters(&ListDeadLettersRequest {
                    upstream: query.get("upstream").cloned().unwrap_or_default(),
                    page_size: number(&query, "page_size")?.unwrap_or(0),
                    page_token: query.get("page_token").cloned().unwrap_or_default(),
                    without_bodies: query.get("without_bodies").is_some_and(|v| v == "true"),
                })?;
                let letters: Vec<LetterJson> =
                    page.letters.into_iter().map(LetterJson::from).collect();
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({"letters": letters, "next_page_token": page.next_page_token}),
                ))
            }
            (Method::DELETE, ["v1", "dead-letters"]) => {
                let query = query(&request)?;
                let target = match (query.get("upstream"), query.get("all")) {
                    (Some(upstream), None) => PurgeTarget::Upstream(upstream.clone()),
                    (None, Some(all)) => PurgeTarget::All(all == "true"),
                    _ => return Err(invalid("purge with ?upstream=NAME or ?all=true")),
                };
                let purged = self.control.purge_letters(Some(target)).await?;
                Ok(json(StatusCode::OK, &serde_json::json!({"purged": purged})))
            }
            (Method::GET, ["v1", "dead-letters", id]) => {
                let letter = self.control.get_letter(id)?;
                Ok(json(StatusCode::OK, &LetterJson::from(letter)))
            }
            (Method::DELETE, ["v1", "dead-letters", id]) => {
                let purged = self
                    .control
                    .purge_letters(Some(PurgeTarget::Id((*id).to_owned())))
                    .await?;
                if purged == 0 {
                    return Err(ApiError::NotFound(format!("no dead letter {id}")));
                }
                Ok(json(StatusCode::OK, &serde_json::json!({"purged": purged})))
            }
            (Method::POST, ["v1", "dead-letters", id, "replay"]) => {
                let force = match query(&request)?.get("force").map(String::as_str) {
                    None | Some("false") => false,
                    Some("true") => true,
                    Some(other) => {
                        return Err(invalid(format!(
                            "force must be true or false, not {other:?}"
                        )));
                    }
                };
                let outcome = self.control.replay_letter(id, force).await?;
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({
                        "delivered": outcome.delivered,
                        "status": outcome.status,
                        "grpc_status": outcome.grpc_status,
                        "error": outcome.error,
                    }),
                ))
            }
            (Method::POST, ["v1", "sagas"]) => {
                let spec: SagaSpec = self.body(request).await?;
                let (record, created) = self.control.sagas.start(spec).await?;
                let status = if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                Ok(json(status, &record))
            }
            (Method::GET, ["v1", "sagas"]) => {
                let query = query(&request)?;
                if watching(&query) {
                    return self.watch(None);
                }
                let state = query
                    .get("state")
                    .map(|s| {
                        SagaState::parse(s).ok_or_else(|| {
                            invalid(format!(
                                "state {s:?} is not one of running, completed, compensating, \
                                 compensated, failed, aborted"
                            ))
                        })
                    })
                    .transpose()?;
                let (sagas, next_page_token) = self.control.sagas.list_page(
                    state,
                    number(&query, "page_size")?.unwrap_or(0),
                    query.get("page_token").map_or("", String::as_str),
                )?;
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({"sagas": sagas, "next_page_token": next_page_token}),
                ))
            }
            (Method::GET, ["v1", "sagas", id]) => {
                let id = percent_decode(id)?;
                if watching(&query(&request)?) {
                    return self.watch(Some(id));
                }
                Ok(json(StatusCode::OK, &self.control.sagas.get(&id)?))
            }
            (Method::POST, ["v1", "sagas", id, "abort"]) => {
                let id = percent_decode(id)?;
                let body: AbortBody = self.optional_body(request).await?;
                let record = self.control.sagas.abort(&id, &body.reason).await?;
                Ok(json(StatusCode::OK, &record))
            }
            _ => Err(ApiError::NotFound(format!(
                "no {} {path}: see the API in docs/control-plane.md",
                request.method()
            ))),
        }
    }

    async fn put(
        &self,
        workflow_id: String,
        request: Request<Body>,
    ) -> Result<Response<Body>, ApiError> {
        let body: PutBody = self.body(request).await?;
        let state = match (body.state, body.state_base64) {
            (Some(_), Some(_)) => return Err(invalid("give state or state_base64, not both")),
            (Some(value), None) => {
                Bytes::from(serde_json::to_vec(&value).expect("JSON values serialize"))
            }
            (None, Some(text)) => Bytes::from(
                B64.decode(text.trim())
                    .map_err(|e| invalid(format!("state_base64 is not base64: {e}")))?,
            ),
            (None, None) => Bytes::new(),
        };
        let put = self
            .control
            .put_checkpoint(PutCheckpointRequest {
                workflow_id,
                step: body.step,
                completed_steps: body.completed_steps,
                state,
                metadata: body.metadata.into_iter().collect(),
                ttl: body
                    .ttl
                    .map(|t| prost_types::Duration::try_from(t.0).unwrap_or_default()),
                expected_version: body.expected_version,
            })
            .await?;
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({
                "version": put.version,
                "created_at": rfc3339(put.created_at.as_ref()),
                "expires_at": rfc3339(put.expires_at.as_ref()),
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_escapes_decode() {
        assert_eq!(percent_decode("inv%2F17%20a").unwrap(), "inv/17 a");
        assert!(percent_decode("bad%zz").is_err());
        assert!(percent_decode("cut%4").is_err());
    }
}
