//! One call of a saga (an action or a compensation) or a dead-letter
//! replay: its templates filled in ([`prepare`]), sent through the
//! sidecar's own [`Upstream`] (the timeouts, retries, budgets and breakers
//! of the policies file), and its answer judged by `classify` and kept
//! for later steps ([`send`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Limited};
use tokio::time::Instant;

use super::record::{CallRecord, Time};
use super::spec::{Call, CallKind};
use super::template::{self, Answer, Scope};
use crate::api::{DeadLetter, Header};
use crate::body;
use crate::classify::{Failure, classify_status};
use crate::config::Config;
use crate::grpc;
use crate::resilience::stack::Observe;
use crate::telemetry::metrics::Metrics;
use crate::upstream::Upstream;

/// Largest answer body kept for later steps' references.
const MAX_ANSWER_BYTES: usize = 256 << 10;
/// How much of an answer `Get` shows.
const SUMMARY_BYTES: usize = 200;
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The upstreams sagas and dead-letter replays call, built once from the
/// policies file, each with its resilience stack.
#[derive(Debug)]
pub struct Upstreams {
    map: HashMap<String, Arc<Upstream>>,
    metrics: Metrics,
}

impl Upstreams {
    /// Builds every upstream of `config`.
    pub fn new(config: &Config) -> Self {
        let metrics = Metrics::new();
        let map = config
            .upstreams
            .iter()
            .map(|u| {
                (
                    u.name.to_string(),
                    Arc::new(Upstream::new(u.clone(), &metrics)),
                )
            })
            .collect();
        Self { map, metrics }
    }

    /// Their metrics (retries, timeouts, circuits), as the sidecar's
    /// `/metrics` shows them.
    pub fn metrics_text(&self) -> String {
        self.metrics.encode()
    }

    /// The upstream called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.map.get(name)
    }
}

/// A call ready to send: templates filled in, the key set (or a dead
/// letter, as it is replayed).
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub(crate) upstream: String,
    method: Method,
    uri: String,
    headers: HeaderMap,
    body: Bytes,
    grpc: bool,
}

impl Prepared {
    /// A dead letter as it is sent again, marked with `header: <id>`.
    pub(crate) fn from_letter(letter: &DeadLetter, header: &'static str) -> Result<Self, String> {
        let method = Method::from_bytes(letter.method.as_bytes())
            .map_err(|_| "the letter's method is invalid".to_owned())?;
        let mut headers = HeaderMap::new();
        for header in &letter.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(header.name.as_bytes()),
                HeaderValue::from_bytes(&header.value),
            ) {
                headers.append(name, value);
            }
        }
        if let Ok(value) = HeaderValue::from_str(&letter.id) {
            headers.insert(header, value);
        }
        Ok(Self {
            upstream: letter.upstream.clone(),
            method,
            uri: letter.uri.clone(),
            headers,
            body: letter.body.clone(),
            grpc: letter.grpc,
        })
    }

    fn request(&self) -> Result<Request<body::Body>, String> {
        let mut request = Request::new(body::full(self.body.clone()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self
            .uri
            .parse()
            .map_err(|_| format!("{:?} is not a valid path", self.uri))?;
        *request.headers_mut() = self.headers.clone();
        Ok(request)
    }

    /// The call as a dead letter, for a person to look at.
    pub(crate) fn letter(&self, saga: &str, reason: String, attempts: u32) -> DeadLetter {
        DeadLetter {
            upstream: self.upstream.clone(),
            source: format!("saga {saga}"),
            method: self.method.to_string(),
            uri: self.uri.clone(),
            headers: self
                .headers
                .iter()
                .map(|(name, value)| Header {
                    name: name.to_string(),
                    value: Bytes::copy_from_slice(value.as_bytes()),
                })
                .collect(),
            body: self.body.clone(),
            reason,
            attempts,
            grpc: self.grpc,
            failed_at: Some(prost_types::Timestamp::from(SystemTime::now())),
            ..Default::default()
        }
    }
}

/// Fills in a call's templates; an unresolvable reference is an error
/// naming it.
pub(crate) fn prepare(call: &Call, scope: &Scope<'_>, key: &str) -> Result<Prepared, String> {
    let mut headers = HeaderMap::new();
    let render_headers = |headers: &mut HeaderMap, entries: &[(HeaderName, template::Template)]| {
        for (name, value) in entries {
            let text = value.render(scope).map_err(|e| e.to_string())?;
            let value = HeaderValue::from_str(&text)
                .map_err(|_| format!("header {name}: {text:?} is not a valid value"))?;
            headers.append(name.clone(), value);
        }
        Ok::<_, String>(())
    };
    let (method, uri, body, grpc) = match &call.kind {
        CallKind::Http {
            method,
            path,
            headers: entries,
            body,
        } => {
            render_headers(&mut headers, entries)?;
            let uri = path.render(scope).map_err(|e| e.to_string())?;
            if uri.parse::<http::uri::PathAndQuery>().is_err() {
                return Err(format!("the path {uri:?} is not a valid path"));
            }
            let body = match body {
                None => Bytes::new(),
                Some(value) => {
                    let value = template::render_json(value, scope).map_err(|e| e.to_string())?;
                    if !headers.contains_key(CONTENT_TYPE) {
                        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    }
                    Bytes::from(serde_json::to_vec(&value).expect("JSON values serialize"))
                }
            };
            (method.clone(), uri, body, false)
        }
        CallKind::Grpc {
            method,
            message,
            metadata,
        } => {
            render_headers(&mut headers, metadata)?;
            headers.insert(CONTENT_TYPE, grpc::CONTENT_TYPE_GRPC);
            headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
            (Method::POST, method.clone(), grpc::frame(message), true)
        }
    };
    let key = HeaderValue::from_str(key).map_err(|_| format!("{key:?} is not a valid key"))?;
    headers.insert(IDEMPOTENCY_KEY, key);
    Ok(Prepared {
        upstream: call.upstream.clone(),
        method,
        uri,
        headers,
        body,
        grpc,
    })
}

/// How a send ended.
#[derive(Debug, Default)]
pub(crate) struct CallOutcome {
    pub(crate) ok: bool,
    pub(crate) status: u16,
    pub(crate) grpc_status: Option<i32>,
    /// The answer's failure, as classified (`None` for a success, for an
    /// answer about the request such as a 404, and when there was no
    /// answer).
    pub(crate) failure: Option<Failure>,
    pub(crate) answer: Option<Answer>,
    pub(crate) summary: String,
    pub(crate) error: Option<String>,
    pub(crate) attempts: u32,
    pub(crate) took: Duration,
}

impl CallOutcome {
    /// Whether it failed for want of the upstream: no answer (unreachable,
    /// an open circuit, shed, timed out), or a transient failure as
    /// classified ([`Failure::is_transient`]), rather than because of the
    /// request.
    pub(crate) fn upstream_wanting(&self) -> bool {
        !self.ok && (self.status == 0 || self.failure.is_some_and(Failure::is_transient))
    }
}

fn summary(body: &[u8]) -> String {
    let cut = &body[..body.len().min(SUMMARY_BYTES)];
    String::from_utf8_lossy(cut).into_owned()
}

/// Sends a prepared call through its upstream, within `deadline`: the one
/// way sagas and dead-letter replays call upstreams and judge the answer.
pub(crate) async fn send(
    upstreams: &Upstreams,
    prepared: &Prepared,
    deadline: Option<Time>,
) -> CallOutcome {
    let started = Instant::now();
    let attempts = AtomicU32::new(0);
    let mut outcome = CallOutcome::default();
    let result = match upstreams.get(&prepared.upstream) {
        None => Err(format!(
            "upstream {:?} is not in the policies file",
            prepared.upstream
        )),
        Some(upstream) => {
            let exchange = exchange(upstream, prepared, &attempts, &mut outcome);
            match deadline {
                None => exchange.await,
                Some(at) => {
                    let left = at
                        .system()
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    tokio::time::timeout(left, exchange)
                        .await
                        .unwrap_or_else(|_| Err("the saga's deadline passed".to_owned()))
                }
            }
        }
    };
    outcome.ok = result.is_ok();
    outcome.error = result.err();
    outcome.attempts = attempts.load(Ordering::Relaxed).max(1);
    outcome.took = started.elapsed();
    outcome
}

async fn exchange(
    upstream: &Upstream,
    prepared: &Prepared,
    attempts: &AtomicU32,
    outcome: &mut CallOutcome,
) -> Result<(), String> {
    let request = prepared.request()?;
    let observe = Observe {
        span: None,
        attempts: Some(attempts),
    };
    let response = upstream
        .call(request, prepared.grpc, observe)
        .await
        .map_err(|e| e.to_string())?;
    let (parts, body) = response.into_parts();
    outcome.status = parts.status.as_u16();
    let mut headers = header_text(&parts.headers);
    let (bytes, trailers) = match Limited::new(body, MAX_ANSWER_BYTES).collect().await {
        Ok(collected) => {
            let trailers = collected.trailers().cloned();
            (Some(collected.to_bytes()), trailers)
        }
        Err(e) if e.is::<http_body_util::LengthLimitError>() => (None, None),
        Err(e) => return Err(format!("the answer failed: {e}")),
    };
    let grpc_status = grpc::answer_status(&parts.headers, trailers.as_ref());
    outcome.failure = classify_status(parts.status, grpc_status.filter(|_| prepared.grpc));
    let grpc_status = grpc_status.map(i32::from);
    if let Some(trailers) = &trailers {
        headers.extend(header_text(trailers));
    }
    keep_answer(outcome, prepared.grpc, grpc_status, headers, bytes.as_ref());
    judge(parts.status, prepared.grpc, grpc_status, bytes.is_some())
}

/// Headers as text, for later steps' references: repeated ones joined
/// with `, `.
fn header_text(map: &HeaderMap) -> BTreeMap<String, String> {
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in map {
        let value = String::from_utf8_lossy(value.as_bytes());
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    headers
}

/// Keeps what later steps and `Get` see of an answer: its status (the
/// gRPC code for gRPC calls), headers and trailers, body (as JSON when it
/// is JSON) and a summary.
fn keep_answer(
    outcome: &mut CallOutcome,
    grpc: bool,
    grpc_status: Option<i32>,
    headers: BTreeMap<String, String>,
    bytes: Option<&Bytes>,
) {
    let body = match bytes {
        Some(bytes) if !grpc && !bytes.is_empty() => {
            Some(serde_json::from_slice(bytes).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned())
            }))
        }
        _ => None,
    };
    outcome.summary = match bytes {
        Some(bytes) if !grpc => summary(bytes),
        Some(_) => headers
            .get("grpc-message")
            .map(|m| grpc::percent_decode(m).unwrap_or_else(|| m.clone()))
            .unwrap_or_default(),
        None => format!("(an answer over {} KiB, not kept)", MAX_ANSWER_BYTES >> 10),
    };
    outcome.grpc_status = grpc.then(|| grpc_status.unwrap_or(-1));
    let status = if grpc {
        u16::try_from(grpc_status.unwrap_or(2)).unwrap_or(2)
    } else {
        outcome.status
    };
    outcome.answer = Some(Answer {
        status,
        headers,
        body,
    });
}

/// Whether a step's call succeeded: a 2xx answer, and for gRPC `OK`. A
/// step needs its call done, so a 4xx fails it though `classify` does not
/// count it against the upstream.
fn judge(
    status: http::StatusCode,
    grpc: bool,
    grpc_status: Option<i32>,
    kept: bool,
) -> Result<(), String> {
    let success = status.is_success();
    let http_error = || Err(format!("the upstream answered HTTP {}", status.as_u16()));
    if !grpc {
        return if success { Ok(()) } else { http_error() };
    }
    match grpc_status {
        Some(0) if success => Ok(()),
        Some(code) if success => Err(format!(
            "the upstream answered gRPC status {code} ({})",
            grpc::name(u8::try_from(code).unwrap_or(grpc::UNKNOWN))
        )),
        _ if success && !kept => Err("the answer is too large".to_owned()),
        _ => http_error(),
    }
}

impl CallRecord {
    /// Records how one send of the call ended.
    pub(crate) fn record(&mut self, outcome: &CallOutcome) {
        self.attempts += outcome.attempts;
        self.status = outcome.status;
        self.grpc_status = outcome.grpc_status;
        self.summary.clone_from(&outcome.summary);
        self.error.clone_from(&outcome.error);
    }
}
