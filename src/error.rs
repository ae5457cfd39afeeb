//! The sidecar's own failures, typed where they happen.
//!
//! Layers return a [`ProxyError`]; nothing below the edge formats an
//! answer. What a failure *means* for retries, breakers and fallbacks is
//! decided by [`crate::classify`]; how it is *answered* by
//! [`crate::edge`].

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

use crate::body::BoxError;
use crate::grpc;

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
    /// A `CONNECT` to a host no upstream claims: the sidecar is not an
    /// open proxy.
    #[error("no upstream claims {host:?}: a CONNECT goes only to an upstream's host")]
    UnknownTunnel {
        /// The `CONNECT`'s authority.
        host: String,
    },
    /// The request carries more than one `Host` header (RFC 9112 §3.2
    /// asks for a 400): which one a proxy routes by is ambiguous.
    #[error("the request has more than one Host header")]
    DuplicateHost,
    /// The request names no host at all.
    #[error("the request has no Host header or authority to route by")]
    NoHost,
    /// An `Upgrade` the sidecar does not proxy (a WebSocket): refused
    /// rather than forwarded as a plain request.
    #[error(
        "an upgrade to {protocol:?} is not proxied: call the service directly, or leave its port out of interception"
    )]
    UnsupportedUpgrade {
        /// The `Upgrade` header's value.
        protocol: String,
    },
    /// The caller's request body could not be read, or is too large to
    /// keep.
    #[error("the request body cannot be used: {reason}")]
    RequestBody {
        /// Why.
        reason: String,
    },
    /// The request, with the headers the sidecar adds (its deadline,
    /// trace context, configured `request_headers`), has more header
    /// fields than an HTTP/1.1 upstream takes.
    #[error(
        "the request has {count} header fields with the sidecar's own (deadline, trace context, request_headers); an HTTP/1.1 upstream takes {limit} at most"
    )]
    TooManyHeaders {
        /// The fields the request would have had.
        count: usize,
        /// The most sent.
        limit: usize,
    },
    /// The caller's request body stalled longer than the upstream's
    /// `stream_idle_timeout`.
    #[error("the request body stalled: no data for {}", humantime::format_duration(*after))]
    RequestIdle {
        /// The idle timeout.
        after: Duration,
    },
    /// No connection to the upstream could be made.
    #[error("cannot connect to upstream {upstream}: {source}")]
    Connect {
        /// The upstream's name.
        upstream: Arc<str>,
        /// The transport error.
        source: BoxError,
    },
    /// The TLS handshake with the upstream failed: nothing was sent.
    #[error("TLS with upstream {upstream} failed: {reason}")]
    TlsHandshake {
        /// The upstream's name.
        upstream: Arc<str>,
        /// Why, in words.
        reason: String,
    },
    /// The connection failed after the request was sent.
    #[error("upstream {upstream} failed: {source}")]
    Upstream {
        /// The upstream's name.
        upstream: Arc<str>,
        /// The transport error.
        source: BoxError,
    },
    /// The answer's stream stalled before the part the sidecar reads to
    /// classify it (a JSON-RPC answer's first event) came.
    #[error("upstream {upstream}'s answer stalled: no data for {} before its JSON-RPC answer", humantime::format_duration(*after))]
    StreamStalled {
        /// The upstream's name.
        upstream: Arc<str>,
        /// The stream timeout that passed.
        after: Duration,
        /// It was the wait for the first data (`first_byte_timeout`).
        first_byte: bool,
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
    /// The upstream asked for no calls for a while (a rate limit with a
    /// wait): answered at once until then.
    #[error("upstream {upstream} asked for no calls for another {}s", retry_after.as_secs_f64().ceil())]
    Pushback {
        /// The upstream's name.
        upstream: Arc<str>,
        /// How long it still asked for.
        retry_after: Duration,
    },
    /// The upstream's concurrency limit and queue are full: shed.
    #[error("upstream {upstream} is at its concurrency limit; request shed")]
    Overloaded {
        /// The upstream's name.
        upstream: Arc<str>,
    },
    /// The caller's connection holds its share of the upstream's slots
    /// (`max_connection_share`): shed.
    #[error(
        "this connection already holds its share of upstream {upstream}'s concurrency slots ({share}); request shed"
    )]
    OverShare {
        /// The upstream's name.
        upstream: Arc<str>,
        /// The slots one connection may hold.
        share: u32,
    },
}

impl ProxyError {
    /// Whether the caller caused it (its request could not be routed or
    /// used): answered as a client error, never counted against the
    /// upstream, never degraded, failed over or dead-lettered.
    pub fn is_callers(&self) -> bool {
        matches!(
            self,
            ProxyError::UnknownHost { .. }
                | ProxyError::NoHost
                | ProxyError::DuplicateHost
                | ProxyError::UnsupportedUpgrade { .. }
                | ProxyError::RequestBody { .. }
                | ProxyError::RequestIdle { .. }
                | ProxyError::TooManyHeaders { .. }
                | ProxyError::OverShare { .. }
        )
    }

    /// The machine-readable reason sent in `x-breakwater-error`.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::UnknownHost { .. } | ProxyError::UnknownTunnel { .. } => "unknown-host",
            ProxyError::NoHost => "no-host",
            ProxyError::DuplicateHost => "duplicate-host",
            ProxyError::UnsupportedUpgrade { .. } => "unsupported-upgrade",
            ProxyError::RequestBody { .. } => "request-body",
            ProxyError::TooManyHeaders { .. } => "request-headers",
            ProxyError::RequestIdle { .. } => "request-idle-timeout",
            ProxyError::Connect { .. } => "connect-failure",
            ProxyError::TlsHandshake { .. } => "tls-handshake",
            ProxyError::Upstream { .. } => "upstream-reset",
            ProxyError::StreamStalled {
                first_byte: true, ..
            } => "first-byte-timeout",
            ProxyError::StreamStalled { .. } => "stream-idle-timeout",
            ProxyError::RefusedStream { .. } => "refused-stream",
            ProxyError::PerTryTimeout { .. } => "per-try-timeout",
            ProxyError::DeadlineExceeded { .. } => "deadline-exceeded",
            ProxyError::CircuitOpen { .. } => "circuit-open",
            ProxyError::Overloaded { .. } | ProxyError::OverShare { .. } => "overloaded",
            ProxyError::Pushback { .. } => "pushback",
        }
    }

    /// The HTTP status an HTTP caller gets.
    pub fn http_status(&self) -> StatusCode {
        match self {
            ProxyError::UnknownHost { .. } => StatusCode::NOT_FOUND,
            ProxyError::UnknownTunnel { .. } => StatusCode::FORBIDDEN,
            ProxyError::NoHost | ProxyError::DuplicateHost | ProxyError::RequestBody { .. } => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::UnsupportedUpgrade { .. } => StatusCode::NOT_IMPLEMENTED,
            ProxyError::RequestIdle { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::TooManyHeaders { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::Connect { .. }
            | ProxyError::TlsHandshake { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::RefusedStream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::PerTryTimeout { .. }
            | ProxyError::DeadlineExceeded { .. }
            | ProxyError::StreamStalled { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::CircuitOpen { .. }
            | ProxyError::Overloaded { .. }
            | ProxyError::OverShare { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Pushback { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The gRPC status a gRPC caller gets.
    pub fn grpc_code(&self) -> u8 {
        match self {
            ProxyError::UnknownHost { .. }
            | ProxyError::UnknownTunnel { .. }
            | ProxyError::UnsupportedUpgrade { .. } => grpc::UNIMPLEMENTED,
            ProxyError::NoHost | ProxyError::DuplicateHost | ProxyError::RequestBody { .. } => {
                grpc::INVALID_ARGUMENT
            }
            ProxyError::Connect { .. }
            | ProxyError::TlsHandshake { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::RefusedStream { .. }
            | ProxyError::CircuitOpen { .. } => grpc::UNAVAILABLE,
            ProxyError::PerTryTimeout { .. }
            | ProxyError::DeadlineExceeded { .. }
            | ProxyError::StreamStalled { .. }
            | ProxyError::RequestIdle { .. } => grpc::DEADLINE_EXCEEDED,
            ProxyError::Overloaded { .. }
            | ProxyError::OverShare { .. }
            | ProxyError::TooManyHeaders { .. }
            | ProxyError::Pushback { .. } => grpc::RESOURCE_EXHAUSTED,
        }
    }
}
