//! The edge: the one place where a failure becomes an answer to the caller.
//!
//! Layers return typed errors ([`ProxyError`]); nothing below this module
//! formats a response. Each error maps to an HTTP status for HTTP callers,
//! a gRPC status for gRPC callers (sent as a trailers-only response with
//! HTTP 200, as gRPC requires) and a short machine-readable reason in the
//! `x-breakwater-error` header, so that a calling agent can tell a
//! Breakwater answer from its upstream's.

use std::sync::Arc;
use std::time::Duration;

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Response, StatusCode};

use crate::body::{self, Body, BoxError};

/// The header that carries the reason for a synthetic answer.
pub const ERROR_HEADER: &str = "x-breakwater-error";

/// gRPC status codes used by synthetic answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum GrpcCode {
    /// No upstream serves this request.
    Unimplemented = 12,
    /// The upstream could not be reached or failed mid-call.
    Unavailable = 14,
    /// The request itself is unusable.
    InvalidArgument = 3,
    /// The deadline passed.
    DeadlineExceeded = 4,
    /// Shed by a concurrency limit.
    ResourceExhausted = 8,
}

/// Why the sidecar answered instead of the upstream.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No configured upstream claims the request's host: the sidecar is
    /// not an open proxy.
    #[error("no upstream is configured for host {host:?}")]
    UnknownHost {
        /// The host the caller asked for.
        host: String,
    },
    /// The request names no host at all.
    #[error("the request has no Host header or authority to route by")]
    NoHost,
    /// A method the sidecar does not proxy, such as `CONNECT`.
    #[error("method {method} is not supported by the sidecar")]
    UnsupportedMethod {
        /// The request's method.
        method: http::Method,
    },
    /// No connection to the upstream could be made.
    #[error("cannot connect to upstream {upstream}: {source}")]
    Connect {
        /// The upstream's name.
        upstream: Arc<str>,
        /// The transport error.
        source: BoxError,
    },
    /// The connection failed after the request was sent.
    #[error("upstream {upstream} failed: {source}")]
    Upstream {
        /// The upstream's name.
        upstream: Arc<str>,
        /// The transport error.
        source: BoxError,
    },
    /// The HTTP/2 upstream refused the stream before processing it.
    #[error("upstream {upstream} refused the stream")]
    RefusedStream {
        /// The upstream's name.
        upstream: Arc<str>,
    },
    /// One attempt outlived the per-try timeout.
    #[error("upstream {upstream} did not answer within the per-try timeout of {after:?}")]
    PerTryTimeout {
        /// The upstream's name.
        upstream: Arc<str>,
        /// The per-try timeout.
        after: Duration,
    },
    /// The call's deadline passed before an answer started.
    #[error("upstream {upstream} did not answer before the deadline ({after:?}, set by {by})")]
    DeadlineExceeded {
        /// The upstream's name.
        upstream: Arc<str>,
        /// The time the call had.
        after: Duration,
        /// Whose deadline it was: `policy` or `caller`.
        by: &'static str,
    },
    /// The upstream's circuit is open: it was not contacted.
    #[error("the circuit to upstream {upstream} is open")]
    CircuitOpen {
        /// The upstream's name.
        upstream: Arc<str>,
    },
    /// The upstream's concurrency limit and queue are full: shed.
    #[error("upstream {upstream} is at its concurrency limit; request shed")]
    Overloaded {
        /// The upstream's name.
        upstream: Arc<str>,
    },
}

impl ProxyError {
    /// The machine-readable reason sent in `x-breakwater-error`.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::UnknownHost { .. } => "unknown-host",
            ProxyError::NoHost => "no-host",
            ProxyError::UnsupportedMethod { .. } => "unsupported-method",
            ProxyError::Connect { .. } => "connect-failure",
            ProxyError::Upstream { .. } => "upstream-reset",
            ProxyError::RefusedStream { .. } => "refused-stream",
            ProxyError::PerTryTimeout { .. } => "per-try-timeout",
            ProxyError::DeadlineExceeded { .. } => "deadline-exceeded",
            ProxyError::CircuitOpen { .. } => "circuit-open",
            ProxyError::Overloaded { .. } => "overloaded",
        }
    }

    fn http_status(&self) -> StatusCode {
        match self {
            ProxyError::UnknownHost { .. } => StatusCode::NOT_FOUND,
            ProxyError::NoHost => StatusCode::BAD_REQUEST,
            ProxyError::UnsupportedMethod { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Connect { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::RefusedStream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::PerTryTimeout { .. } | ProxyError::DeadlineExceeded { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::CircuitOpen { .. } | ProxyError::Overloaded { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    fn grpc_code(&self) -> GrpcCode {
        match self {
            ProxyError::UnknownHost { .. } | ProxyError::UnsupportedMethod { .. } => {
                GrpcCode::Unimplemented
            }
            ProxyError::NoHost => GrpcCode::InvalidArgument,
            ProxyError::Connect { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::RefusedStream { .. }
            | ProxyError::CircuitOpen { .. } => GrpcCode::Unavailable,
            ProxyError::PerTryTimeout { .. } | ProxyError::DeadlineExceeded { .. } => {
                GrpcCode::DeadlineExceeded
            }
            ProxyError::Overloaded { .. } => GrpcCode::ResourceExhausted,
        }
    }
}

/// Whether a request is a gRPC call, judged by its content type.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Builds the caller's answer for an error: a gRPC trailers-only response
/// for gRPC calls, a plain-text HTTP error otherwise.
pub fn error_response(error: &ProxyError, grpc: bool) -> Response<Body> {
    let reason = HeaderValue::from_static(error.reason());
    let message = error.to_string();
    if grpc {
        let mut response = Response::new(body::empty());
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(
            crate::resilience::classify::GRPC_STATUS,
            HeaderValue::from(error.grpc_code() as i32),
        );
        if let Ok(value) = HeaderValue::from_str(&percent_encode(&message)) {
            headers.insert("grpc-message", value);
        }
        headers.insert(ERROR_HEADER, reason);
        return response;
    }
    let mut response = Response::new(body::full(message + "\n"));
    *response.status_mut() = error.http_status();
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(ERROR_HEADER, reason);
    response
}

/// An error and its causes in one line (`client error (Connect): tcp
/// connect error: Connection refused`), for logs and answers.
pub fn error_text(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Percent-encodes a `grpc-message` as the gRPC HTTP/2 spec asks: every
/// byte outside printable ASCII, and `%` itself.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes (a path segment, a `grpc-message`); `None` for a
/// broken escape or a result that is not UTF-8.
pub fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_escapes_round_trip() {
        let message = "not 100% done: ümlaut";
        assert_eq!(
            percent_decode(&percent_encode(message)).as_deref(),
            Some(message)
        );
        assert_eq!(percent_decode("bad%zz"), None);
        assert_eq!(percent_decode("cut%4"), None);
    }

    #[test]
    fn grpc_answers_are_trailers_only_with_status_and_reason() {
        let err = ProxyError::Connect {
            upstream: Arc::from("ocr"),
            source: "connection refused".into(),
        };
        let response = error_response(&err, true);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "14");
        assert_eq!(response.headers()[ERROR_HEADER], "connect-failure");
        assert_eq!(
            response.headers()["grpc-message"],
            "cannot connect to upstream ocr: connection refused"
        );
    }

    #[test]
    fn http_answers_carry_status_and_reason() {
        let err = ProxyError::UnknownHost {
            host: "nope".into(),
        };
        let response = error_response(&err, false);
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(response.headers()[ERROR_HEADER], "unknown-host");
        let grpc = error_response(&err, true);
        assert_eq!(grpc.headers()["grpc-status"], "12");
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(percent_encode("50% é"), "50%25 %C3%A9");
    }
}
