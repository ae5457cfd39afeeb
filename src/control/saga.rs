//! Running sagas: the durable record of each saga, and the executor that
//! moves it forward (actions, in order) or backward (compensations, in
//! reverse), one persisted transition at a time.
//!
//! The rule that makes a crash harmless: a transition is durable (written
//! and flushed by the group commit) before the call it announces is sent.
//! A restart therefore finds each unfinished saga either between two calls
//! (it goes on) or with a call marked as sent and no answer recorded (it
//! sends it again, with the same `Idempotency-Key`, so a participant that
//! honours the key applies it once).
//!
//! Calls go through the sidecar's own [`Upstream`]: the timeouts, retries,
//! budgets and breakers of the policies file are the ones sagas get.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Limited};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, broadcast};
use tokio::time::Instant;

use super::metrics::ControlMetrics;
use super::saga_spec::{Call, CallKind, Saga, SagaSpec};
use super::service::ApiError;
use super::store::{GroupCommit, Store, StoreError};
use super::template::{self, Answer, Scope};
use crate::api::{DeadLetter, Header};
use crate::body;
use crate::classify::{Failure, classify_status};
use crate::config::Config;
use crate::grpc;
use crate::resilience::stack::Observe;
use crate::telemetry::metrics::Metrics;
use crate::upstream::Upstream;

/// How many sagas run at once by default; the rest wait their turn.
pub const DEFAULT_WORKERS: usize = 256;
/// Largest answer body kept for later steps' references.
const MAX_ANSWER_BYTES: usize = 256 << 10;
/// How much of an answer `Get` shows.
const SUMMARY_BYTES: usize = 200;
/// Events kept for slow watchers before they fall behind.
const EVENT_BUFFER: usize = 4096;
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// A saga's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SagaState {
    /// Its actions run.
    Running,
    /// Every step succeeded (or degraded).
    Completed,
    /// A step failed, the deadline passed or it was aborted: the
    /// compensations run.
    Compensating,
    /// Everything done was undone.
    Compensated,
    /// A compensation failed after every retry: a person must look.
    Failed,
    /// An operator aborted it, and everything done was undone.
    Aborted,
}

impl SagaState {
    /// Every state.
    pub const ALL: [SagaState; 6] = [
        SagaState::Running,
        SagaState::Completed,
        SagaState::Compensating,
        SagaState::Compensated,
        SagaState::Failed,
        SagaState::Aborted,
    ];

    /// Its name, as in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            SagaState::Running => "running",
            SagaState::Completed => "completed",
            SagaState::Compensating => "compensating",
            SagaState::Compensated => "compensated",
            SagaState::Failed => "failed",
            SagaState::Aborted => "aborted",
        }
    }

    /// The state named `text`.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Whether the saga has ended.
    pub fn finished(self) -> bool {
        !matches!(self, SagaState::Running | SagaState::Compensating)
    }
}

/// A step's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Not started.
    Pending,
    /// Its action was sent; no answer is recorded yet.
    Running,
    /// Its action succeeded.
    Succeeded,
    /// Its action failed, and its `default` stands in.
    Degraded,
    /// Its action failed.
    Failed,
    /// Its compensation was sent; no answer is recorded yet.
    Compensating,
    /// Its compensation succeeded.
    Compensated,
    /// Its compensation failed after every retry.
    CompensationFailed,
}

/// A wall-clock time: milliseconds in memory, RFC 3339 in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Time(pub u64);

impl Time {
    /// Now.
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    /// As a `SystemTime`.
    pub fn system(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.0)
    }
}

impl From<SystemTime> for Time {
    fn from(t: SystemTime) -> Self {
        let ms = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
        Self(u64::try_from(ms).unwrap_or(u64::MAX))
    }
}

impl Serialize for Time {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(self.system()))
    }
}

impl<'de> Deserialize<'de> for Time {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text)
            .map(Time::from)
            .map_err(serde::de::Error::custom)
    }
}

/// How one call (an action or a compensation) went.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CallRecord {
    /// Times it was sent; a restart while it was in flight sends it again.
    pub sends: u32,
    /// Attempts made under the upstream's retry policy, over every send.
    pub attempts: u32,
    /// When the latest send started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When its answer (or failure) was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// The answer's HTTP status (0: no answer).
    #[serde(default)]
    pub status: u16,
    /// The answer's gRPC status, for gRPC calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<i32>,
    /// The answer's first bytes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub summary: String,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it is sent again (the step's `retry`), after a failure for
    /// want of the upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_send_at: Option<Time>,
}

/// One step's progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    /// The step's name.
    pub name: String,
    /// Where it is.
    pub state: StepState,
    /// Its action.
    pub action: CallRecord,
    /// Its compensation, once started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<CallRecord>,
    /// What later steps see: the action's answer, or the step's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<Answer>,
}

/// A saga as stored and as the APIs show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SagaRecord {
    /// Its id.
    pub id: String,
    /// Its state.
    pub state: SagaState,
    /// Why it compensated, failed or was aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it was started.
    pub created_at: Time,
    /// Its latest transition.
    pub updated_at: Time,
    /// When its deadline passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_at: Option<Time>,
    /// An operator asked to abort it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub abort_requested: bool,
    /// The dead letter of the compensation that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_id: Option<String>,
    /// Each step's progress, in order.
    pub steps: Vec<StepRecord>,
    /// The definition, as submitted.
    pub definition: SagaSpec,
}

impl SagaRecord {
    fn new(spec: SagaSpec, saga: &Saga, now: Time) -> Self {
        let deadline_at = saga.deadline.map(|d| {
            Time(
                now.0
                    .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            )
        });
        Self {
            id: spec.id.clone(),
            state: SagaState::Running,
            error: None,
            created_at: now,
            updated_at: now,
            deadline_at,
            abort_requested: false,
            dead_letter_id: None,
            steps: saga
                .steps
                .iter()
                .map(|s| StepRecord {
                    name: s.name.clone(),
                    state: StepState::Pending,
                    action: CallRecord::default(),
                    compensation: None,
                    answer: None,
                })
                .collect(),
            definition: spec,
        }
    }

    /// Decodes a stored record.
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        serde_json::from_slice(bytes)
            .map_err(|e| StoreError::Storage(format!("a saga record does not decode: {e}")))
    }

    fn answers(&self) -> BTreeMap<String, Answer> {
        self.steps
            .iter()
            .filter_map(|s| Some((s.name.clone(), s.answer.clone()?)))
            .collect()
    }
}

/// Something that happened to a saga, for watchers.
#[derive(Debug, Clone, Serialize)]
pub struct SagaEvent {
    /// The saga.
    pub saga_id: String,
    /// Its state after the event.
    pub state: SagaState,
    /// The step it is about, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// That step's state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_state: Option<StepState>,
    /// What happened.
    pub message: String,
    /// When.
    pub at: Time,
}

impl SagaEvent {
    /// The event that describes a saga as it is now (the first one a
    /// watcher of one saga gets).
    pub fn snapshot(record: &SagaRecord) -> Self {
        Self {
            saga_id: record.id.clone(),
            state: record.state,
            step: None,
            step_state: None,
            message: format!("saga is {}", record.state.as_str()),
            at: record.updated_at,
        }
    }
}

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
pub(super) struct Prepared {
    upstream: String,
    method: Method,
    uri: String,
    headers: HeaderMap,
    body: Bytes,
    grpc: bool,
}

impl Prepared {
    /// A dead letter as it is sent again, marked with `header: <id>`.
    pub(super) fn from_letter(letter: &DeadLetter, header: &'static str) -> Result<Self, String> {
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

    fn letter(&self, saga: &str, reason: String, attempts: u32) -> DeadLetter {
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
fn prepare(call: &Call, scope: &Scope<'_>, key: &str) -> Result<Prepared, String> {
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
pub(super) struct Outcome {
    pub(super) ok: bool,
    pub(super) status: u16,
    pub(super) grpc_status: Option<i32>,
    /// The answer's failure, as classified (`None` for a success, for an
    /// answer about the request such as a 404, and when there was no
    /// answer).
    failure: Option<Failure>,
    answer: Option<Answer>,
    summary: String,
    pub(super) error: Option<String>,
    attempts: u32,
    took: Duration,
}

impl Outcome {
    /// Whether it failed for want of the upstream: no answer (unreachable,
    /// an open circuit, shed, timed out), or a transient failure as
    /// classified ([`Failure::is_transient`]), rather than because of the
    /// request.
    fn upstream_wanting(&self) -> bool {
        !self.ok && (self.status == 0 || self.failure.is_some_and(Failure::is_transient))
    }
}

fn summary(body: &[u8]) -> String {
    let cut = &body[..body.len().min(SUMMARY_BYTES)];
    String::from_utf8_lossy(cut).into_owned()
}

/// Sends a prepared call through its upstream, within `deadline`: the one
/// way sagas and dead-letter replays call upstreams and judge the answer.
pub(super) async fn send(
    upstreams: &Upstreams,
    prepared: &Prepared,
    deadline: Option<Time>,
) -> Outcome {
    let started = Instant::now();
    let attempts = AtomicU32::new(0);
    let mut outcome = Outcome::default();
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
    outcome: &mut Outcome,
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
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
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
        for (name, value) in trailers {
            headers.insert(
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            );
        }
    }
    let body_value = match &bytes {
        Some(bytes) if !prepared.grpc && !bytes.is_empty() => {
            Some(serde_json::from_slice(bytes).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned())
            }))
        }
        _ => None,
    };
    outcome.summary = match &bytes {
        Some(bytes) if !prepared.grpc => summary(bytes),
        Some(_) => headers
            .get("grpc-message")
            .map(|m| grpc::percent_decode(m).unwrap_or_else(|| m.clone()))
            .unwrap_or_default(),
        None => format!("(an answer over {} KiB, not kept)", MAX_ANSWER_BYTES >> 10),
    };
    outcome.grpc_status = prepared.grpc.then(|| grpc_status.unwrap_or(-1));
    outcome.answer = Some(Answer {
        status: if prepared.grpc {
            u16::try_from(grpc_status.unwrap_or(2)).unwrap_or(2)
        } else {
            outcome.status
        },
        headers,
        body: body_value,
    });
    let success = parts.status.is_success();
    if prepared.grpc {
        match grpc_status {
            Some(0) if success => Ok(()),
            Some(code) if success => Err(format!(
                "the upstream answered gRPC status {code} ({})",
                grpc::name(u8::try_from(code).unwrap_or(grpc::UNKNOWN))
            )),
            _ if success && bytes.is_none() => Err("the answer is too large".to_owned()),
            _ => Err(format!("the upstream answered HTTP {}", outcome.status)),
        }
    } else if success {
        Ok(())
    } else {
        Err(format!("the upstream answered HTTP {}", outcome.status))
    }
}

/// When a failed call is sent again under its step's `retry`: only for a
/// failure for want of the upstream, while sends remain, and before the
/// deadline.
fn resend_at(
    retry: Option<super::saga_spec::StepRetry>,
    outcome: &Outcome,
    sends: u32,
    deadline: Option<Time>,
) -> Option<Time> {
    let retry = retry?;
    if !outcome.upstream_wanting() || sends >= retry.max_sends {
        return None;
    }
    let at = Time::from(SystemTime::now() + retry.wait_after(sends));
    deadline.is_none_or(|d| at < d).then_some(at)
}

/// What the executor does next for one saga.
enum Move {
    /// Send a call for step `step` (its compensation when `undo`).
    Send {
        step: usize,
        undo: bool,
        prepared: Box<Prepared>,
    },
    /// A transition was made; decide again.
    Again,
    /// A step waits to be sent again: decide again at this time.
    Wait(Time),
    /// The saga has ended (or is not this executor's to run).
    Done,
}

/// A running saga: its record behind the lock its transitions take, and a
/// bell that ends a wait early (an abort).
struct Live {
    record: tokio::sync::Mutex<SagaRecord>,
    wake: tokio::sync::Notify,
}

type Cell = Arc<Live>;

/// Starts, runs, resumes, aborts and shows sagas.
pub struct Sagas {
    store: Arc<dyn Store>,
    commit: GroupCommit,
    metrics: Arc<ControlMetrics>,
    upstreams: Option<Arc<Upstreams>>,
    pool: Arc<Semaphore>,
    max_record_bytes: usize,
    /// The sagas running in this process, each record behind the lock its
    /// transitions take.
    live: Mutex<HashMap<String, Cell>>,
    events: broadcast::Sender<SagaEvent>,
    /// Set when the control plane stops: watches end.
    stopping: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for Sagas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sagas").finish_non_exhaustive()
    }
}

impl Sagas {
    /// The executor over `store`, calling `upstreams`, running at most
    /// `workers` sagas at once.
    pub fn new(
        store: Arc<dyn Store>,
        commit: GroupCommit,
        metrics: Arc<ControlMetrics>,
        upstreams: Option<Arc<Upstreams>>,
        workers: usize,
        max_record_bytes: usize,
    ) -> Self {
        Self {
            store,
            commit,
            metrics,
            upstreams,
            pool: Arc::new(Semaphore::new(workers.max(1))),
            max_record_bytes,
            live: Mutex::default(),
            events: broadcast::channel(EVENT_BUFFER).0,
            stopping: tokio::sync::watch::channel(false).0,
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cell>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends every watch (the control plane is stopping).
    pub fn end_watches(&self) {
        self.stopping.send_replace(true);
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<SagaEvent> {
        self.events.subscribe()
    }

    /// Checks and starts a saga; answers once it is durable. A saga with
    /// that id already exists: it is answered as it is, with `false`.
    pub async fn start(self: &Arc<Self>, spec: SagaSpec) -> Result<(SagaRecord, bool), ApiError> {
        let Some(upstreams) = &self.upstreams else {
            return Err(ApiError::Precondition(
                "sagas need the upstreams' policies: start the control plane with --config policies.yaml"
                    .into(),
            ));
        };
        if let Some(existing) = self.store.get_saga(&spec.id)? {
            // It may have been written by a start still waiting for its
            // flush: answer once it is durable too.
            self.commit.durable().await?;
            return Ok((SagaRecord::decode(&existing)?, false));
        }
        let saga = spec.clone().check().map_err(|problems| {
            ApiError::Invalid(format!("the saga is invalid: {}", problems.join("; ")))
        })?;
        let mut unknown = Vec::new();
        for (i, step) in saga.steps.iter().enumerate() {
            let calls = [
                ("action", Some(&step.action)),
                ("compensation", step.compensation.as_ref()),
            ];
            for (what, call) in calls {
                if let Some(call) = call.filter(|c| upstreams.get(&c.upstream).is_none()) {
                    unknown.push(format!(
                        "steps[{i}].{what}.upstream: there is no upstream {:?} in the policies file",
                        call.upstream
                    ));
                }
            }
        }
        if !unknown.is_empty() {
            return Err(ApiError::Invalid(format!(
                "the saga is invalid: {}",
                unknown.join("; ")
            )));
        }
        let record = SagaRecord::new(spec, &saga, Time::now());
        let bytes = serde_json::to_vec(&record).expect("records serialize");
        if bytes.len() > self.max_record_bytes {
            return Err(ApiError::Invalid(format!(
                "the saga is {} bytes, over the limit of {} bytes",
                bytes.len(),
                self.max_record_bytes
            )));
        }
        let created = self
            .store
            .create_saga(&record.id, SagaState::Running.as_str(), &bytes)?;
        self.commit.durable().await?;
        if !created {
            let existing = self
                .store
                .get_saga(&record.id)?
                .ok_or_else(|| ApiError::Internal("a saga vanished".into()))?;
            return Ok((SagaRecord::decode(&existing)?, false));
        }
        self.metrics.saga_entered(SagaState::Running.as_str());
        self.emit(&record, None, "started".to_owned());
        self.spawn(record.clone(), saga);
        Ok((record, true))
    }

    fn spawn(self: &Arc<Self>, record: SagaRecord, saga: Saga) {
        let cell = Arc::new(Live {
            record: tokio::sync::Mutex::new(record),
            wake: tokio::sync::Notify::new(),
        });
        self.live().insert(saga.id.clone(), cell.clone());
        tokio::spawn(self.clone().drive(cell, saga));
    }

    /// Resumes every unfinished saga (at start); returns how many.
    pub async fn resume(self: &Arc<Self>) -> Result<usize, StoreError> {
        for (state, count) in self.store.saga_counts()? {
            if let Some(state) = SagaState::parse(&state) {
                self.metrics.set_sagas(state.as_str(), count);
            }
        }
        let mut resumed = 0;
        for state in [SagaState::Running, SagaState::Compensating] {
            let mut after: Option<String> = None;
            loop {
                let (records, next) =
                    self.store
                        .list_sagas(Some(state.as_str()), after.as_deref(), 1000)?;
                for bytes in records {
                    // One unreadable record must not keep the others (and
                    // the control plane) from starting.
                    let record = match SagaRecord::decode(&bytes) {
                        Ok(record) => record,
                        Err(error) => {
                            tracing::error!(%error, "a stored saga is unreadable; it is left as it is");
                            continue;
                        }
                    };
                    if record.state.finished() || self.live().contains_key(&record.id) {
                        continue;
                    }
                    match record.definition.clone().check() {
                        Ok(saga) => {
                            self.spawn(record, saga);
                            resumed += 1;
                        }
                        Err(problems) => tracing::error!(
                            saga = %record.id,
                            problems = %problems.join("; "),
                            "a stored saga no longer passes its checks; it is left as it is"
                        ),
                    }
                }
                match next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
        }
        Ok(resumed)
    }

    /// One saga, as last persisted.
    pub fn get(&self, id: &str) -> Result<SagaRecord, ApiError> {
        let bytes = self
            .store
            .get_saga(id)?
            .ok_or_else(|| ApiError::NotFound(format!("no saga {id:?}")))?;
        Ok(SagaRecord::decode(&bytes)?)
    }

    /// Sagas by id after `after`, all or in one state.
    pub fn list(
        &self,
        state: Option<SagaState>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<SagaRecord>, Option<String>), ApiError> {
        let (records, next) = self
            .store
            .list_sagas(state.map(SagaState::as_str), after, limit)?;
        let records = records
            .iter()
            .map(|b| SagaRecord::decode(b))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((records, next))
    }

    /// A page of sagas, all or in one state, by id; the token continues
    /// a listing (empty: from the start), and the next one is empty at
    /// the end.
    pub fn list_page(
        &self,
        state: Option<SagaState>,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<SagaRecord>, String), ApiError> {
        const TOKEN: base64::engine::GeneralPurpose =
            base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let after = if page_token.is_empty() {
            None
        } else {
            let bytes = base64::Engine::decode(&TOKEN, page_token)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    ApiError::Invalid(format!(
                        "page_token {page_token:?} is not one this API gave"
                    ))
                })?;
            Some(bytes)
        };
        let (records, next) = self.list(
            state,
            after.as_deref(),
            super::service::page_size(page_size),
        )?;
        let next = next.map_or_else(String::new, |id| base64::Engine::encode(&TOKEN, id));
        Ok((records, next))
    }

    /// Events of one saga (its current state first, then each transition
    /// until it ends) or of every saga (from now on, endless). A watcher
    /// that falls more than a few thousand events behind gets an error
    /// and should watch again.
    pub fn watch(
        &self,
        id: Option<String>,
    ) -> Result<
        impl futures_util::Stream<Item = Result<SagaEvent, String>> + Send + 'static,
        ApiError,
    > {
        let events = self.subscribe();
        let first = match &id {
            Some(id) => Some(SagaEvent::snapshot(&self.get(id)?)),
            None => None,
        };
        let stopping = self.stopping.subscribe();
        let state = (events, stopping, first, id, false);
        Ok(futures_util::stream::unfold(
            state,
            |(mut events, mut stopping, mut first, id, ended)| async move {
                if ended {
                    return None;
                }
                if let Some(event) = first.take() {
                    let end = event.state.finished();
                    return Some((Ok(event), (events, stopping, None, id, end)));
                }
                loop {
                    let received = tokio::select! {
                        received = events.recv() => received,
                        _ = stopping.wait_for(|s| *s) => return None,
                    };
                    match received {
                        Ok(event) if id.as_ref().is_some_and(|id| *id != event.saga_id) => {}
                        Ok(event) => {
                            let end = id.is_some() && event.state.finished();
                            return Some((Ok(event), (events, stopping, None, id, end)));
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let error = format!("the watch fell {n} events behind; watch again");
                            return Some((Err(error), (events, stopping, None, id, true)));
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            },
        ))
    }

    /// Asks a running saga to stop: once the step in flight (if any) has
    /// its answer, what was done is compensated and the saga ends
    /// `aborted`; a step waiting to be sent again stops waiting. Durable
    /// when it answers.
    pub async fn abort(&self, id: &str, reason: &str) -> Result<SagaRecord, ApiError> {
        let cell = self.live().get(id).cloned();
        let Some(cell) = cell else {
            let record = self.get(id)?;
            return Err(ApiError::Precondition(format!(
                "saga {id:?} is {}, not running",
                record.state.as_str()
            )));
        };
        let mut record = cell.record.lock().await;
        match record.state {
            SagaState::Running if !record.abort_requested => {
                record.abort_requested = true;
                let reason = if reason.is_empty() {
                    "aborted by an operator".to_owned()
                } else {
                    format!("aborted by an operator: {reason}")
                };
                record.error = Some(reason.clone());
                self.save(&mut record, SagaState::Running, None, reason)
                    .await?;
                cell.wake.notify_one();
            }
            SagaState::Running | SagaState::Compensating => {}
            other => {
                return Err(ApiError::Precondition(format!(
                    "saga {id:?} is {}, not running",
                    other.as_str()
                )));
            }
        }
        Ok(record.clone())
    }

    /// Writes a transition durably, then tells metrics and watchers.
    async fn save(
        &self,
        record: &mut SagaRecord,
        from: SagaState,
        step: Option<usize>,
        message: String,
    ) -> Result<(), StoreError> {
        record.updated_at = Time::now();
        let bytes = serde_json::to_vec(record).expect("records serialize");
        self.store
            .save_saga(&record.id, from.as_str(), record.state.as_str(), &bytes)?;
        self.commit.durable().await?;
        if from != record.state {
            self.metrics.saga_left(from.as_str());
            self.metrics.saga_entered(record.state.as_str());
        }
        self.emit(record, step, message);
        Ok(())
    }

    fn emit(&self, record: &SagaRecord, step: Option<usize>, message: String) {
        if self.events.receiver_count() == 0 {
            return;
        }
        let step = step.and_then(|i| record.steps.get(i));
        let _ = self.events.send(SagaEvent {
            saga_id: record.id.clone(),
            state: record.state,
            step: step.map(|s| s.name.clone()),
            step_state: step.map(|s| s.state),
            message,
            at: record.updated_at,
        });
    }

    async fn drive(self: Arc<Self>, cell: Cell, saga: Saga) {
        let permit = self.pool.clone().acquire_owned().await;
        if let Err(error) = self.run(&cell, &saga).await {
            tracing::error!(
                saga = %saga.id,
                %error,
                "a saga stopped: its transition could not be stored; it resumes when the control plane restarts"
            );
        }
        drop(permit);
        self.live().remove(&saga.id);
    }

    async fn run(&self, cell: &Cell, saga: &Saga) -> Result<(), StoreError> {
        let upstreams = self
            .upstreams
            .clone()
            .expect("sagas only start with upstreams");
        loop {
            let next = {
                let mut record = cell.record.lock().await;
                self.decide(&mut record, saga).await?
            };
            match next {
                Move::Done => return Ok(()),
                Move::Again => {}
                Move::Wait(until) => {
                    let left = until
                        .system()
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    // An abort rings the bell: it need not wait out a step's
                    // retry interval.
                    tokio::select! {
                        () = tokio::time::sleep(left) => {}
                        () = cell.wake.notified() => {}
                    }
                }
                Move::Send {
                    step,
                    undo,
                    prepared,
                } => {
                    let deadline = if undo {
                        None
                    } else {
                        cell.record.lock().await.deadline_at
                    };
                    let outcome = send(&upstreams, &prepared, deadline).await;
                    let mut record = cell.record.lock().await;
                    if undo {
                        self.undone(&mut record, saga, step, outcome, &prepared)
                            .await?;
                    } else {
                        self.done(&mut record, saga, step, outcome).await?;
                    }
                }
            }
        }
    }

    /// Decides and persists the next transition.
    async fn decide(&self, record: &mut SagaRecord, saga: &Saga) -> Result<Move, StoreError> {
        match record.state {
            SagaState::Running => self.decide_forward(record, saga).await,
            SagaState::Compensating => self.decide_backward(record, saga).await,
            _ => Ok(Move::Done),
        }
    }

    async fn decide_forward(
        &self,
        record: &mut SagaRecord,
        saga: &Saga,
    ) -> Result<Move, StoreError> {
        let from = record.state;
        if record.abort_requested || record.deadline_at.is_some_and(|at| at <= Time::now()) {
            // A step waiting to be sent again is given up.
            for step in &mut record.steps {
                if step.state == StepState::Running && step.action.next_send_at.take().is_some() {
                    step.state = StepState::Failed;
                }
            }
        }
        if record.abort_requested {
            record.state = SagaState::Compensating;
            let message = "aborted: compensating".to_owned();
            self.save(record, from, None, message).await?;
            return Ok(Move::Again);
        }
        if record.deadline_at.is_some_and(|at| at <= Time::now()) {
            record.state = SagaState::Compensating;
            record.error = Some("the saga's deadline passed".into());
            let message = "deadline passed: compensating".to_owned();
            self.save(record, from, None, message).await?;
            return Ok(Move::Again);
        }
        let Some(i) = record
            .steps
            .iter()
            .position(|s| matches!(s.state, StepState::Pending | StepState::Running))
        else {
            record.state = SagaState::Completed;
            self.save(record, from, None, "completed".into()).await?;
            return Ok(Move::Done);
        };
        if let Some(at) = record.steps[i]
            .action
            .next_send_at
            .filter(|at| *at > Time::now())
        {
            return Ok(Move::Wait(at));
        }
        let step = &saga.steps[i];
        let answers = record.answers();
        let scope = Scope {
            saga_id: &saga.id,
            input: &saga.input,
            steps: &answers,
        };
        let key = format!("{}/{}/action", saga.id, step.name);
        match prepare(&step.action, &scope, &key) {
            Err(error) => {
                record.steps[i].action.error = Some(error.clone());
                self.fail_step(record, saga, i, error).await?;
                Ok(Move::Again)
            }
            Ok(prepared) => {
                let entry = &mut record.steps[i];
                entry.state = StepState::Running;
                entry.action.sends += 1;
                entry.action.next_send_at = None;
                entry.action.started_at = Some(Time::now());
                let message = format!("step {} sent (send {})", step.name, entry.action.sends);
                self.save(record, from, Some(i), message).await?;
                Ok(Move::Send {
                    step: i,
                    undo: false,
                    prepared: Box::new(prepared),
                })
            }
        }
    }

    /// A step's action finally failed: it degrades, or the saga compensates.
    async fn fail_step(
        &self,
        record: &mut SagaRecord,
        saga: &Saga,
        i: usize,
        error: String,
    ) -> Result<(), StoreError> {
        let from = record.state;
        let step = &saga.steps[i];
        let entry = &mut record.steps[i];
        entry.action.finished_at = Some(Time::now());
        let message = if let Some(default) = &step.degrade_to {
            entry.state = StepState::Degraded;
            entry.answer = Some(Answer {
                status: 0,
                headers: BTreeMap::new(),
                body: Some(default.clone()),
            });
            format!("step {} degraded to its default: {error}", step.name)
        } else {
            entry.state = StepState::Failed;
            record.state = SagaState::Compensating;
            record.error = Some(format!("step {} failed: {error}", step.name));
            format!("step {} failed: {error}; compensating", step.name)
        };
        self.save(record, from, Some(i), message).await
    }

    async fn done(
        &self,
        record: &mut SagaRecord,
        saga: &Saga,
        i: usize,
        outcome: Outcome,
    ) -> Result<(), StoreError> {
        let upstream = &saga.steps[i].action.upstream;
        self.metrics
            .observe_saga_call(upstream, "action", outcome.ok, outcome.took);
        let entry = &mut record.steps[i];
        entry.action.attempts += outcome.attempts;
        entry.action.status = outcome.status;
        entry.action.grpc_status = outcome.grpc_status;
        entry.action.summary = outcome.summary.clone();
        entry.action.error = outcome.error.clone();
        if let Some(at) = resend_at(
            saga.steps[i].retry,
            &outcome,
            entry.action.sends,
            record.deadline_at,
        ) {
            let error = outcome.error.clone().unwrap_or_default();
            entry.action.next_send_at = Some(at);
            let message = format!(
                "step {} failed (send {}): {error}; sent again at {}",
                saga.steps[i].name,
                entry.action.sends,
                humantime::format_rfc3339_millis(at.system())
            );
            let from = record.state;
            return self.save(record, from, Some(i), message).await;
        }
        match outcome.error {
            None => {
                entry.state = StepState::Succeeded;
                entry.answer = outcome.answer;
                entry.action.finished_at = Some(Time::now());
                let message = format!("step {} succeeded", saga.steps[i].name);
                let from = record.state;
                self.save(record, from, Some(i), message).await
            }
            Some(error) => self.fail_step(record, saga, i, error).await,
        }
    }

    async fn decide_backward(
        &self,
        record: &mut SagaRecord,
        saga: &Saga,
    ) -> Result<Move, StoreError> {
        let from = record.state;
        // Steps without a compensation have nothing to undo.
        let pending = record
            .steps
            .iter()
            .enumerate()
            .rev()
            .find(|(i, s)| {
                matches!(s.state, StepState::Succeeded | StepState::Compensating)
                    && saga.steps[*i].compensation.is_some()
            })
            .map(|(i, _)| i);
        let Some(i) = pending else {
            record.state = if record.abort_requested {
                SagaState::Aborted
            } else {
                SagaState::Compensated
            };
            let message = record.state.as_str().to_owned();
            self.save(record, from, None, message).await?;
            return Ok(Move::Done);
        };
        let waiting = record.steps[i]
            .compensation
            .as_ref()
            .and_then(|c| c.next_send_at)
            .filter(|at| *at > Time::now());
        if let Some(at) = waiting {
            return Ok(Move::Wait(at));
        }
        let step = &saga.steps[i];
        let compensation = step.compensation.as_ref().expect("filtered above");
        let answers = record.answers();
        let scope = Scope {
            saga_id: &saga.id,
            input: &saga.input,
            steps: &answers,
        };
        let key = format!("{}/{}/compensation", saga.id, step.name);
        let entry = &mut record.steps[i];
        let call = entry.compensation.get_or_insert_with(CallRecord::default);
        match prepare(compensation, &scope, &key) {
            Err(error) => {
                call.error = Some(error.clone());
                call.finished_at = Some(Time::now());
                entry.state = StepState::CompensationFailed;
                record.state = SagaState::Failed;
                record.error = Some(format!(
                    "the compensation of step {} cannot be sent: {error}",
                    step.name
                ));
                self.metrics.compensated(false);
                let message = format!("compensation of {} failed: {error}", step.name);
                self.save(record, from, Some(i), message).await?;
                Ok(Move::Done)
            }
            Ok(prepared) => {
                entry.state = StepState::Compensating;
                call.sends += 1;
                call.next_send_at = None;
                call.started_at = Some(Time::now());
                let message = format!("compensation of {} sent (send {})", step.name, call.sends);
                self.save(record, from, Some(i), message).await?;
                Ok(Move::Send {
                    step: i,
                    undo: true,
                    prepared: Box::new(prepared),
                })
            }
        }
    }

    async fn undone(
        &self,
        record: &mut SagaRecord,
        saga: &Saga,
        i: usize,
        outcome: Outcome,
        prepared: &Prepared,
    ) -> Result<(), StoreError> {
        let from = record.state;
        let name = &saga.steps[i].name;
        self.metrics.observe_saga_call(
            &prepared.upstream,
            "compensation",
            outcome.ok,
            outcome.took,
        );
        let entry = &mut record.steps[i];
        let call = entry.compensation.get_or_insert_with(CallRecord::default);
        call.attempts += outcome.attempts;
        call.status = outcome.status;
        call.grpc_status = outcome.grpc_status;
        call.summary = outcome.summary.clone();
        call.error = outcome.error.clone();
        call.finished_at = Some(Time::now());
        if let Some(at) = resend_at(saga.steps[i].retry, &outcome, call.sends, None) {
            call.next_send_at = Some(at);
            let message = format!(
                "compensation of {name} failed (send {}): {}; sent again at {}",
                call.sends,
                outcome.error.unwrap_or_default(),
                humantime::format_rfc3339_millis(at.system())
            );
            return self.save(record, from, Some(i), message).await;
        }
        self.metrics.compensated(outcome.ok);
        let attempts = call.attempts;
        let message = match outcome.error {
            None => {
                entry.state = StepState::Compensated;
                format!("step {name} compensated")
            }
            Some(error) => {
                entry.state = StepState::CompensationFailed;
                let reason = format!(
                    "saga {}: the compensation of step {name} failed: {error}",
                    saga.id
                );
                // The letter first: the record names it.
                let letter = self.store.enqueue_letter(
                    prepared.letter(&saga.id, reason.clone(), attempts),
                    SystemTime::now(),
                )?;
                self.metrics.set_dead_letters(self.store.letter_count());
                record.dead_letter_id = Some(letter.id.clone());
                record.state = SagaState::Failed;
                record.error = Some(format!(
                    "the compensation of step {name} failed: {error}; it is dead letter {}",
                    letter.id
                ));
                tracing::error!(saga = %saga.id, step = %name, %error, letter = %letter.id, "a compensation failed: the saga needs a person");
                format!("compensation of {name} failed: {error}; needs a person")
            }
        };
        self.save(record, from, Some(i), message).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::store::SledStore;

    #[tokio::test]
    async fn an_unreadable_record_does_not_keep_the_others_from_resuming() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        store
            .create_saga("broken", "running", b"{not json")
            .unwrap();
        let spec: SagaSpec = serde_json::from_value(serde_json::json!({
            "id": "fine",
            "steps": [{"name": "a", "action": {"upstream": "u", "method": "GET", "path": "/"}}]
        }))
        .unwrap();
        let saga = spec.clone().check().unwrap();
        let record = SagaRecord::new(spec, &saga, Time::now());
        let bytes = serde_json::to_vec(&record).unwrap();
        store.create_saga("fine", "running", &bytes).unwrap();
        let config =
            crate::config::parse("t.yaml", "upstreams:\n  u: {address: '127.0.0.1:9'}\n").unwrap();
        let commit = GroupCommit::start(store.clone(), |_| {});
        let sagas = Arc::new(Sagas::new(
            store,
            commit,
            Arc::new(ControlMetrics::new()),
            Some(Arc::new(Upstreams::new(&config))),
            4,
            1 << 20,
        ));
        assert_eq!(sagas.resume().await.unwrap(), 1);
    }

    #[test]
    fn states_round_trip_and_times_read_as_rfc3339() {
        for state in SagaState::ALL {
            assert_eq!(SagaState::parse(state.as_str()), Some(state));
        }
        assert!(SagaState::Failed.finished());
        assert!(!SagaState::Compensating.finished());
        let t = Time(1_700_000_000_123);
        let text = serde_json::to_string(&t).unwrap();
        assert_eq!(text, "\"2023-11-14T22:13:20.123Z\"");
        assert_eq!(serde_json::from_str::<Time>(&text).unwrap(), t);
    }
}
