//! JSON-RPC over HTTP: MCP's streamable HTTP transport and A2A's JSON-RPC
//! binding, as far as resilience needs to understand them.
//!
//! Both protocols answer a failed call inside a good HTTP answer: a `200`
//! whose JSON (or whose first server-sent event) holds a JSON-RPC
//! `error`. An HTTP proxy that looks only at the status sees every such
//! failure as a success, and retries nothing by method because every call
//! is a `POST`. For an upstream with `protocol: mcp`, `protocol: a2a` or
//! `jsonrpc: true`, the sidecar reads:
//!
//! - of each request, its JSON-RPC `method` (MCP's `Mcp-Method` header
//!   when present, else the body) and `id` ([`Call`]): the method picks
//!   the route and says whether the call may be sent again
//!   ([`Dialect::safe`]); the id goes into the answers the sidecar makes
//!   itself ([`error_answer`]);
//! - of each answer to a `POST`, the JSON-RPC envelope: the whole body of
//!   a JSON answer (up to [`PEEK_LIMIT`]), or a stream's first event that
//!   carries data, never more ([`peek`]). Its verdict ([`Verdict`]) is
//!   what classification, retries, the breaker and metrics see.
//!
//! See docs/agent-protocols.md for what each code means and why.

use std::borrow::Cow;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::resilience::stream::StreamTimeouts;
use crate::telemetry::metrics::UpstreamMetrics;

/// MCP's header naming the request's method (required from 2026-07-28).
pub const MCP_METHOD: HeaderName = HeaderName::from_static("mcp-method");
/// MCP's session header (2025-11-25 and before).
pub const MCP_SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");
/// The most of an answer read to find its verdict. A JSON-RPC error is a
/// few hundred bytes; an answer longer than this is a result.
pub const PEEK_LIMIT: usize = 64 << 10;
/// The most of a request body read ahead to find its method and id.
pub const CALL_LIMIT: u64 = 1 << 20;

/// Which JSON-RPC protocol an upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    /// Plain JSON-RPC 2.0 over HTTP (`jsonrpc: true`).
    Jsonrpc,
    /// The Model Context Protocol's streamable HTTP transport.
    Mcp,
    /// The Agent2Agent protocol's JSON-RPC binding (v1.0).
    A2a,
}

impl std::fmt::Display for Dialect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dialect::Jsonrpc => "jsonrpc",
            Dialect::Mcp => "mcp",
            Dialect::A2a => "a2a",
        })
    }
}

/// MCP methods that read and change nothing (or, for `initialize`, start
/// over): sending one again is safe.
const MCP_SAFE: &[&str] = &[
    "initialize",
    "ping",
    "tools/list",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "prompts/list",
    "prompts/get",
];
/// MCP methods with effects.
const MCP_UNSAFE: &[&str] = &["tools/call"];
/// A2A methods safe to send again: reads (a subscription to a task's
/// events included), and a cancel (cancelling twice is cancelling once).
const A2A_SAFE: &[&str] = &[
    "GetTask",
    "ListTasks",
    "CancelTask",
    "SubscribeToTask",
    "GetTaskPushNotificationConfig",
    "ListTaskPushNotificationConfigs",
    "GetExtendedAgentCard",
];
/// A2A methods that start work.
const A2A_UNSAFE: &[&str] = &["SendMessage", "SendStreamingMessage"];
/// Other methods metrics name: the rest count as `other`.
const MCP_OTHER: &[&str] = &[
    "completion/complete",
    "logging/setLevel",
    "resources/subscribe",
    "resources/unsubscribe",
];
const A2A_OTHER: &[&str] = &[
    "CreateTaskPushNotificationConfig",
    "DeleteTaskPushNotificationConfig",
];

impl Dialect {
    /// Whether a call of `method` may be sent again whatever failed:
    /// `Some(true)` for reads, `Some(false)` for calls with effects,
    /// `None` when the protocol does not say (the HTTP rule applies: a
    /// `POST` is not repeated unless the policy allows it).
    pub fn safe(self, method: &str) -> Option<bool> {
        let (safe, unsafe_) = match self {
            Dialect::Jsonrpc => return None,
            Dialect::Mcp => (MCP_SAFE, MCP_UNSAFE),
            Dialect::A2a => (A2A_SAFE, A2A_UNSAFE),
        };
        if safe.contains(&method) {
            Some(true)
        } else if unsafe_.contains(&method) {
            Some(false)
        } else {
            None
        }
    }

    /// The method as a bounded metric label: one the protocol defines,
    /// `notification` for MCP's notifications, else `other`.
    pub fn label(self, method: Option<&str>) -> &'static str {
        let Some(method) = method else {
            return "unknown";
        };
        let lists: [&[&'static str]; 3] = match self {
            Dialect::Jsonrpc => return "other",
            Dialect::Mcp => [MCP_SAFE, MCP_UNSAFE, MCP_OTHER],
            Dialect::A2a => [A2A_SAFE, A2A_UNSAFE, A2A_OTHER],
        };
        if let Some(known) = lists.iter().flat_map(|l| l.iter()).find(|m| **m == method) {
            return known;
        }
        if self == Dialect::Mcp && method.starts_with("notifications/") {
            return "notification";
        }
        "other"
    }

    /// What an answer's JSON-RPC error `code` says.
    ///
    /// - `-32603` (internal error) and the server-error range
    ///   `-32099..=-32000` are the upstream's failures, except the codes
    ///   each protocol gives a meaning there: MCP reserves
    ///   `-32020..=-32099` for its own codes (from 2026-07-28: `-32020`
    ///   header mismatch, `-32021` missing client capability, `-32022`
    ///   unsupported protocol version) and retired `-32002` (resource not
    ///   found) and `-32042` (URL elicitation required); A2A's
    ///   `-32001..=-32009` say what is wrong with the request (task not
    ///   found, not cancelable, unsupported operation, version not
    ///   supported, ...), but for `-32006`, an invalid answer of the
    ///   agent's own, which is its failure.
    /// - Every other code (`-32700` parse error, `-32600` invalid request,
    ///   `-32601` method not found, `-32602` invalid params, and codes an
    ///   application defines) is an answer about the request: the same
    ///   call would get it again, so it is never retried and never counts
    ///   against the upstream.
    pub fn judge(self, code: i64) -> Verdict {
        let code = i32::try_from(code).unwrap_or(i32::MIN);
        let defined = match self {
            Dialect::Jsonrpc => false,
            Dialect::Mcp => matches!(code, -32099..=-32020 | -32002),
            Dialect::A2a => matches!(code, -32009..=-32001) && code != -32006,
        };
        match code {
            -32603 => Verdict::Failure(code),
            -32099..=-32000 if !defined => Verdict::Failure(code),
            _ => Verdict::Error(code),
        }
    }
}

/// What the sidecar read of a JSON-RPC request, kept in its extensions.
#[derive(Debug, Clone, Default)]
pub struct Call {
    /// The method, if the request named one.
    pub method: Option<Box<str>>,
    /// The request's id, as it was written; `None` for a notification or
    /// a body that is not one JSON-RPC request.
    pub id: Option<Box<RawValue>>,
    /// Whether it may be sent again, by its method (see [`Dialect::safe`]).
    pub safe: Option<bool>,
}

impl Call {
    /// Reads a request's method (its `Mcp-Method` header first) and id
    /// from its head and `body`, as `dialect` judges its safety.
    pub fn read(dialect: Dialect, headers: &HeaderMap, body: &[u8]) -> Self {
        #[derive(Deserialize)]
        struct Envelope<'a> {
            #[serde(borrow, default)]
            method: Option<Cow<'a, str>>,
            #[serde(borrow, default)]
            id: Option<&'a RawValue>,
        }
        let envelope = serde_json::from_slice::<Envelope<'_>>(body).ok();
        let header = headers.get(MCP_METHOD).and_then(|v| v.to_str().ok());
        let method: Option<Box<str>> = match (header, &envelope) {
            (Some(method), _) => Some(method.into()),
            (None, Some(Envelope { method, .. })) => method.as_deref().map(Into::into),
            (None, None) => None,
        };
        let id = envelope.and_then(|e| e.id).map(RawValue::to_owned);
        let safe = method.as_deref().and_then(|m| dialect.safe(m));
        Self { method, id, safe }
    }
}

/// Reads a JSON-RPC `POST`'s body ahead, up to [`CALL_LIMIT`], and puts
/// what it says ([`Call`]) in the request's extensions; the body goes on
/// as it came. Of a longer body only the `Mcp-Method` header is read.
/// Each wait for the caller's body is bounded by `idle`; a stall or a
/// broken body is the caller's fault.
pub async fn read_call(
    request: Request<Body>,
    dialect: Dialect,
    idle: Option<Duration>,
) -> Result<Request<Body>, ProxyError> {
    let (mut parts, mut body) = request.into_parts();
    let mut read = ReadAhead::new(http_body::Body::is_end_stream(&body));
    while !read.ended && read.buffer.len() as u64 <= CALL_LIMIT {
        let frame = match idle {
            None => body.frame().await,
            Some(after) => tokio::time::timeout(after, body.frame())
                .await
                .map_err(|_| ProxyError::RequestIdle { after })?,
        };
        match frame {
            None => read.ended = true,
            Some(Err(error)) => {
                return Err(ProxyError::RequestBody {
                    reason: error.to_string(),
                });
            }
            Some(Ok(frame)) => read.push(frame),
        }
    }
    let whole: &[u8] = if read.ended { &read.buffer } else { b"" };
    let call = Call::read(dialect, &parts.headers, whole);
    parts.extensions.insert(call);
    let body = read.before(body);
    Ok(Request::from_parts(parts, body))
}

/// What an answer's JSON-RPC envelope said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A result.
    Result,
    /// An MCP tool's result with `isError: true`: the tool's answer, which
    /// the model reads, and no failure of the server.
    ToolError,
    /// An error about the request (see [`Dialect::judge`]).
    Error(i32),
    /// An error that is the upstream's failure.
    Failure(i32),
}

impl Verdict {
    /// A bounded label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Result => "result",
            Verdict::ToolError => "tool-error",
            Verdict::Error(_) => "error",
            Verdict::Failure(_) => "failure",
        }
    }
}

/// Judges one JSON-RPC answer (`text`, one JSON object); `None` when it is
/// not one (a request or notification from the server, a batch, not
/// JSON).
pub fn judge(dialect: Dialect, text: &[u8]) -> Option<Verdict> {
    #[derive(Deserialize)]
    struct Envelope<'a> {
        #[serde(borrow, default)]
        result: Option<&'a RawValue>,
        #[serde(default)]
        error: Option<ErrorObject>,
    }
    #[derive(Deserialize)]
    struct ErrorObject {
        code: i64,
    }
    #[derive(Deserialize)]
    struct ToolResult {
        #[serde(rename = "isError", default)]
        is_error: bool,
    }
    let envelope = serde_json::from_slice::<Envelope<'_>>(text).ok()?;
    match (envelope.error, envelope.result) {
        (Some(error), _) => Some(dialect.judge(error.code)),
        (None, Some(result)) => {
            let tool_error = dialect == Dialect::Mcp
                && result.get().starts_with('{')
                && serde_json::from_str::<ToolResult>(result.get()).is_ok_and(|r| r.is_error);
            Some(match tool_error {
                true => Verdict::ToolError,
                false => Verdict::Result,
            })
        }
        (None, None) => None,
    }
}

/// How an answer is framed, by its content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Json,
    Events,
}

fn framing(headers: &HeaderMap) -> Option<Framing> {
    let value = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    let essence = value.split(';').next()?.trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Some(Framing::Json)
    } else if essence.eq_ignore_ascii_case("text/event-stream") {
        Some(Framing::Events)
    } else {
        None
    }
}

/// The data of the first server-sent event in `buffer` that carries any
/// (MCP servers may open a stream with an event that only primes its
/// `Last-Event-ID`), once that event is complete; `None` while more bytes
/// are needed. Lines end with LF, CRLF or CR; an event ends at a blank
/// line (the HTML Living Standard's event-stream format).
fn first_event(buffer: &[u8]) -> Option<Vec<u8>> {
    let mut data: Option<Vec<u8>> = None;
    let mut rest = buffer;
    loop {
        let end = rest.iter().position(|&b| b == b'\n' || b == b'\r')?;
        let line = &rest[..end];
        let mut next = end + 1;
        if rest[end] == b'\r' {
            match rest.get(next) {
                Some(b'\n') => next += 1,
                // A CR at the end of what arrived may be half a CRLF.
                None => return None,
                Some(_) => {}
            }
        }
        rest = &rest[next..];
        if line.is_empty() {
            match data.take() {
                Some(data) if !data.is_empty() => return Some(data),
                _ => continue,
            }
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        if field == b"data" {
            let data = data.get_or_insert_with(Vec::new);
            if !data.is_empty() {
                data.push(b'\n');
            }
            data.extend_from_slice(value);
        }
    }
}

/// Reads the start of an answer to a JSON-RPC `POST` until its verdict is
/// known, and records it in the answer's extensions for classification:
/// a JSON answer is read whole (up to [`PEEK_LIMIT`]); an event stream up
/// to the end of its first event that carries data, and not a byte
/// further. What was read is put back in front of the rest, untouched.
///
/// The wait for each frame is bounded as the stream watch bounds it
/// (`first_byte_timeout`, then `stream_idle_timeout`): a stall is a cut
/// stream, counted and failed as the upstream's (a reset). An answer
/// that is neither JSON nor an event stream, or is not `2xx`, is left
/// alone.
pub async fn peek(
    response: Response<Body>,
    dialect: Dialect,
    timeouts: Option<StreamTimeouts>,
    metrics: &UpstreamMetrics,
    upstream: &std::sync::Arc<str>,
) -> Result<Response<Body>, ProxyError> {
    let framing = match framing(response.headers()) {
        Some(framing) if response.status().is_success() => framing,
        _ => return Ok(response),
    };
    let (mut parts, mut body) = response.into_parts();
    let mut read = ReadAhead::new(false);
    let mut verdict = None;
    while !read.ended {
        // The first frame waits for `first_byte_timeout` if set, as the
        // stream watch would; every other wait for the idle timeout.
        let first_byte = timeouts
            .and_then(|t| t.first_byte)
            .filter(|_| read.buffer.is_empty());
        let wait = first_byte.or(timeouts.and_then(|t| t.idle));
        let frame = match wait {
            None => body.frame().await,
            Some(wait) => match tokio::time::timeout(wait, body.frame()).await {
                Ok(frame) => frame,
                Err(_) => {
                    metrics.stream_cut(first_byte.is_some());
                    return Err(ProxyError::StreamStalled {
                        upstream: upstream.clone(),
                        after: wait,
                        first_byte: first_byte.is_some(),
                    });
                }
            },
        };
        match frame {
            None => read.ended = true,
            Some(Err(error)) => {
                return Err(ProxyError::Upstream {
                    upstream: upstream.clone(),
                    source: error,
                });
            }
            Some(Ok(frame)) => read.push(frame),
        }
        if framing == Framing::Events
            && let Some(event) = first_event(&read.buffer)
        {
            verdict = judge(dialect, &event);
            break;
        }
        if read.buffer.len() > PEEK_LIMIT {
            break;
        }
    }
    if framing == Framing::Json && read.ended {
        verdict = judge(dialect, &read.buffer);
    }
    if let Some(verdict) = verdict {
        parts.extensions.insert(verdict);
    }
    let body = read.before(body);
    Ok(Response::from_parts(parts, body))
}

/// What was read of a body ahead of its reader.
struct ReadAhead {
    buffer: BytesMut,
    trailers: Option<HeaderMap>,
    /// The body ended (with or without trailers).
    ended: bool,
}

impl ReadAhead {
    fn new(ended: bool) -> Self {
        Self {
            buffer: BytesMut::new(),
            trailers: None,
            ended,
        }
    }

    /// Keeps a frame: data is added, trailers end the body.
    fn push(&mut self, frame: http_body::Frame<Bytes>) {
        match frame.into_data() {
            Ok(data) => self.buffer.extend_from_slice(&data),
            Err(frame) => {
                self.trailers = frame.into_trailers().ok();
                self.ended = true;
            }
        }
    }

    /// The body as its reader gets it: what was read, then the `rest`.
    fn before(self, rest: Body) -> Body {
        let read = self.buffer.freeze();
        match (self.ended, self.trailers) {
            (true, None) => body::full(read),
            (true, Some(trailers)) => body::ahead(read, body::trailers(trailers)),
            (false, _) => body::ahead(read, rest),
        }
    }
}

/// The answer to the JSON-RPC call `id`, which is an event stream: when
/// the stream fails (the sidecar cut it for stalling, the upstream broke
/// it off) between two events, it ends instead with one more event, a
/// JSON-RPC error for the call (`-31001` for a stall, `-31005` for a
/// break), so that the caller's client fails the call with a reason
/// rather than with a stream that ended without an answer. A stream that
/// fails inside an event (part of it was sent) fails as it would
/// elsewhere: an event cannot be finished for the upstream.
pub fn close_with_error(response: Response<Body>, id: Box<RawValue>) -> Response<Body> {
    if framing(response.headers()) != Some(Framing::Events) {
        return response;
    }
    response.map(|body| {
        body::boxed(Closing {
            inner: body,
            id: Some(id),
            tail: Vec::new(),
            done: false,
        })
    })
}

/// An event stream that ends with a JSON-RPC error event when it fails.
struct Closing {
    inner: Body,
    /// Taken when the closing event is made.
    id: Option<Box<RawValue>>,
    /// The last bytes passed on (up to four): whether they end an event.
    tail: Vec<u8>,
    done: bool,
}

impl http_body::Body for Closing {
    type Data = Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let tail = &mut self.tail;
                    tail.extend_from_slice(&data[data.len().saturating_sub(4)..]);
                    let extra = tail.len().saturating_sub(4);
                    tail.drain(..extra);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) if self.at_boundary() && self.id.is_some() => {
                self.done = true;
                let id = self.id.take().expect("checked");
                let (code, reason) =
                    match error.downcast_ref::<crate::resilience::stream::StreamCut>() {
                        Some(cut) if cut.cut.is_timeout() => (-31001, cut.cut.reason()),
                        Some(cut) => (-31005, cut.cut.reason()),
                        None => (-31005, "truncated"),
                    };
                let message = crate::error::error_text(&*error);
                Poll::Ready(Some(Ok(http_body::Frame::data(error_event(
                    &id, code, &message, reason,
                )))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }
}

impl Closing {
    /// What was passed on so far ends an event (or nothing was).
    fn at_boundary(&self) -> bool {
        let tail = &self.tail[..];
        tail.is_empty()
            || tail.ends_with(b"\n\n")
            || tail.ends_with(b"\r\r")
            || tail.ends_with(b"\r\n\r\n")
    }
}

/// One server-sent event holding a JSON-RPC error for the call `id`.
fn error_event(id: &RawValue, code: i32, message: &str, reason: &str) -> Bytes {
    let mut event = b"event: message\ndata: ".to_vec();
    event.extend_from_slice(&error_body(id, code, message, reason));
    event.extend_from_slice(b"\n\n");
    event.into()
}

/// The JSON-RPC error code of an answer the sidecar makes for `error`:
/// outside the range JSON-RPC reserves (`-32768..=-32000`), as MCP asks of
/// implementations, so that no caller mistakes it for the server's own.
pub fn error_code(error: &ProxyError) -> i32 {
    match error {
        ProxyError::DeadlineExceeded { .. }
        | ProxyError::PerTryTimeout { .. }
        | ProxyError::StreamStalled { .. } => -31001,
        ProxyError::CircuitOpen { .. } => -31002,
        ProxyError::Overloaded { .. } | ProxyError::OverShare { .. } => -31003,
        ProxyError::Pushback { .. } => -31004,
        ProxyError::Connect { .. }
        | ProxyError::TlsHandshake { .. }
        | ProxyError::Upstream { .. }
        | ProxyError::RefusedStream { .. } => -31005,
        _ => -31000,
    }
}

/// The code of the error a degraded call answers with when its fallback
/// body is not a JSON value to give as the result.
pub const DEGRADED_CODE: i32 = -31010;

/// The sidecar's answer to the JSON-RPC request `id` for `error`: the
/// answer it makes for plain HTTP (its `x-breakwater-error`, its
/// `Retry-After` for pushback), as a JSON-RPC error in a `200` (see
/// [`error_answer`]).
pub fn answer_error(id: &RawValue, error: &ProxyError) -> Response<Body> {
    let plain = crate::edge::error_response(error, false);
    let mut answer = error_answer(id, error_code(error), &error.to_string(), error.reason());
    for (name, value) in plain.headers() {
        if name != CONTENT_TYPE {
            answer.headers_mut().insert(name, value.clone());
        }
    }
    answer
}

/// An answer to the JSON-RPC request `id` made by the sidecar: a JSON-RPC
/// error in a `200`, so that the caller's client fails this one call and
/// keeps its session (an MCP client drops the whole session on an HTTP
/// `5xx`). `x-breakwater-error` says why, as on every answer the sidecar
/// makes; `data.reason` says it in the body.
pub fn error_answer(id: &RawValue, code: i32, message: &str, reason: &str) -> Response<Body> {
    let text = error_body(id, code, message, reason);
    let mut response = body::typed(StatusCode::OK, "application/json", text);
    if let Ok(reason) = HeaderValue::from_str(reason) {
        response
            .headers_mut()
            .insert(crate::edge::ERROR_HEADER, reason);
    }
    response
}

/// A JSON-RPC error for the call `id`, as JSON.
fn error_body(id: &RawValue, code: i32, message: &str, reason: &str) -> Vec<u8> {
    #[derive(Serialize)]
    struct Answer<'a> {
        jsonrpc: &'static str,
        id: &'a RawValue,
        error: ErrorObject<'a>,
    }
    #[derive(Serialize)]
    struct ErrorObject<'a> {
        code: i32,
        message: &'a str,
        data: Data<'a>,
    }
    #[derive(Serialize)]
    struct Data<'a> {
        reason: &'a str,
    }
    let answer = Answer {
        jsonrpc: "2.0",
        id,
        error: ErrorObject {
            code,
            message,
            data: Data { reason },
        },
    };
    serde_json::to_vec(&answer).expect("an answer serialises")
}

/// The answer a degraded call to the JSON-RPC request `id` gets: its
/// fallback's `body` as the call's `result` when it is JSON, else a
/// JSON-RPC error ([`DEGRADED_CODE`]); either way marked as degraded for
/// `reason`, as every fallback answer is.
pub fn degraded_answer(id: &RawValue, body: &Bytes, reason: &str) -> Response<Body> {
    let mut response = match serde_json::from_slice::<&RawValue>(body) {
        Ok(result) => {
            #[derive(Serialize)]
            struct Answer<'a> {
                jsonrpc: &'static str,
                id: &'a RawValue,
                result: &'a RawValue,
            }
            let text = serde_json::to_vec(&Answer {
                jsonrpc: "2.0",
                id,
                result,
            })
            .expect("an answer serialises");
            body::typed(StatusCode::OK, "application/json", text)
        }
        Err(_) => error_answer(id, DEGRADED_CODE, "degraded: the upstream failed", reason),
    };
    let marker = HeaderValue::from_str(reason).unwrap_or(HeaderValue::from_static("failure"));
    response
        .headers_mut()
        .insert(crate::resilience::fallback::DEGRADED_HEADER, marker);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_read_from_the_header_first_then_the_body() {
        let body = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"x"}}"#;
        let call = Call::read(Dialect::Mcp, &HeaderMap::new(), body);
        assert_eq!(call.method.as_deref(), Some("tools/call"));
        assert_eq!(call.id.as_ref().map(|i| i.get()), Some("7"));
        assert_eq!(call.safe, Some(false));

        let mut headers = HeaderMap::new();
        headers.insert(MCP_METHOD, HeaderValue::from_static("tools/list"));
        let call = Call::read(Dialect::Mcp, &headers, body);
        assert_eq!(call.method.as_deref(), Some("tools/list"));
        assert_eq!(call.safe, Some(true));

        let call = Call::read(
            Dialect::A2a,
            &HeaderMap::new(),
            br#"{"id":"a-1","method":"GetTask"}"#,
        );
        assert_eq!(call.id.as_ref().map(|i| i.get()), Some(r#""a-1""#));
        assert_eq!(call.safe, Some(true));

        let notification = Call::read(
            Dialect::Mcp,
            &HeaderMap::new(),
            br#"{"method":"notifications/initialized"}"#,
        );
        assert!(notification.id.is_none());
        assert_eq!(notification.safe, None);
        assert!(
            Call::read(Dialect::Mcp, &HeaderMap::new(), b"[1,2]")
                .method
                .is_none()
        );
    }

    #[test]
    fn codes_are_judged_by_protocol() {
        use Verdict::*;
        for (dialect, code, verdict) in [
            (Dialect::Mcp, -32603, Failure(-32603)),
            (Dialect::Mcp, -32000, Failure(-32000)),
            (Dialect::Mcp, -32600, Error(-32600)),
            (Dialect::Mcp, -32601, Error(-32601)),
            (Dialect::Mcp, -32602, Error(-32602)),
            (Dialect::Mcp, -32700, Error(-32700)),
            (Dialect::Mcp, -32002, Error(-32002)),
            (Dialect::Mcp, -32020, Error(-32020)),
            (Dialect::Mcp, -32022, Error(-32022)),
            (Dialect::Mcp, -32099, Error(-32099)),
            (Dialect::Mcp, -32019, Failure(-32019)),
            (Dialect::A2a, -32006, Failure(-32006)),
            (Dialect::Mcp, -32042, Error(-32042)),
            (Dialect::Mcp, 42, Error(42)),
            (Dialect::A2a, -32001, Error(-32001)),
            (Dialect::A2a, -32009, Error(-32009)),
            (Dialect::A2a, -32010, Failure(-32010)),
            (Dialect::A2a, -32002, Error(-32002)),
            (Dialect::Jsonrpc, -32001, Failure(-32001)),
            (Dialect::Jsonrpc, -32100, Error(-32100)),
        ] {
            assert_eq!(dialect.judge(code), verdict, "{dialect} {code}");
        }
    }

    #[test]
    fn answers_are_judged_by_their_envelope() {
        let mcp = Dialect::Mcp;
        assert_eq!(
            judge(mcp, br#"{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}"#),
            Some(Verdict::Result)
        );
        assert_eq!(
            judge(
                mcp,
                br#"{"jsonrpc":"2.0","id":1,"result":{"content":[],"isError":true}}"#
            ),
            Some(Verdict::ToolError)
        );
        // Only MCP's tool results carry isError.
        assert_eq!(
            judge(
                Dialect::A2a,
                br#"{"jsonrpc":"2.0","id":1,"result":{"isError":true}}"#
            ),
            Some(Verdict::Result)
        );
        assert_eq!(
            judge(mcp, br#"{"jsonrpc":"2.0","id":1,"result":"text"}"#),
            Some(Verdict::Result)
        );
        assert_eq!(
            judge(
                mcp,
                br#"{"id":1,"jsonrpc":"2.0","error":{"message":"boom","code":-32603}}"#
            ),
            Some(Verdict::Failure(-32603))
        );
        assert_eq!(
            judge(
                mcp,
                br#"{"jsonrpc":"2.0","method":"notifications/progress"}"#
            ),
            None
        );
        assert_eq!(judge(mcp, b"not json"), None);
    }

    #[test]
    fn the_first_event_with_data_is_found_in_any_line_ending() {
        assert_eq!(
            first_event(b"data: {\"a\":1}\n\n").as_deref(),
            Some(&b"{\"a\":1}"[..])
        );
        assert_eq!(
            first_event(b"data: {\"a\":1}\r\n\r\nrest").as_deref(),
            Some(&b"{\"a\":1}"[..])
        );
        assert_eq!(
            first_event(b"data:x\rdata:y\r\rid: 3").as_deref(),
            Some(&b"x\ny"[..])
        );
        // A priming event (an id and empty data) is skipped.
        assert_eq!(
            first_event(b"id: 1\ndata:\n\nevent: message\nid: 2\ndata: {}\n\n").as_deref(),
            Some(&b"{}"[..])
        );
        // Comments and other fields are not data.
        assert_eq!(
            first_event(b": keep-alive\n\nretry: 10\ndata: 1\n\n").as_deref(),
            Some(&b"1"[..])
        );
        // Incomplete: more bytes are needed.
        assert_eq!(first_event(b"data: {\"a\":1}\n"), None);
        assert_eq!(first_event(b"data: {\"a\":1}\r\n\r"), None);
        assert_eq!(first_event(b""), None);
    }

    #[test]
    fn synthetic_codes_stay_outside_the_reserved_range() {
        let upstream: std::sync::Arc<str> = "mcp".into();
        for error in [
            ProxyError::CircuitOpen {
                upstream: upstream.clone(),
            },
            ProxyError::DeadlineExceeded {
                upstream: upstream.clone(),
                after: Duration::from_secs(1),
                by: "policy",
            },
            ProxyError::RefusedStream {
                upstream: upstream.clone(),
            },
            ProxyError::NoHost,
        ] {
            let code = error_code(&error);
            assert!(!(-32768..=-32000).contains(&code), "{code}");
        }
        assert!(!(-32768..=-32000).contains(&DEGRADED_CODE));
    }

    #[test]
    fn made_answers_carry_the_request_id_and_reason() {
        let id = RawValue::from_string(r#""req-9""#.into()).unwrap();
        let answer = error_answer(&id, -31002, "circuit open", "circuit-open");
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(answer.headers()[crate::edge::ERROR_HEADER], "circuit-open");
        assert_eq!(answer.headers()[CONTENT_TYPE], "application/json");
    }
}
