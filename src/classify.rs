//! Classification: the one place that decides whether an attempt failed,
//! and how.
//!
//! Retry, the circuit breaker, metrics, fallbacks, traces, saga steps and
//! dead-letter replays consume a [`Failure`] and ask it what it means
//! ([`Failure::is_server_side`], [`Failure::is_transient`],
//! [`Failure::is_rate_limit`]); none of them looks at status codes or
//! transport errors on its own. A response is a failure when its HTTP status is 5xx or 429, or
//! when its `grpc-status` (in the headers of a trailers-only answer, or in
//! trailers that arrived before any message, see [`grpc::TrailerStatus`]) is
//! not OK. Other 4xx answers are the caller's problem, not the upstream's:
//! they are successes here.
//!
//! Policies name the failures they react to with [`Conditions`]:
//! `connect-failure`, `reset`, `refused-stream`, `per-try-timeout`,
//! `deadline-exceeded` (a per-try timeout or a gRPC `DEADLINE_EXCEEDED`),
//! HTTP codes (`503`) and classes (`5xx`), and gRPC codes by name
//! (`unavailable`, `resource-exhausted`, ...).

use std::fmt;

use http::Response;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use crate::error::ProxyError;
use crate::grpc::{self, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED};

/// Why an attempt did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    /// No connection could be made: nothing reached the upstream.
    ConnectFailure,
    /// The connection or stream failed after the request was sent.
    Reset,
    /// The HTTP/2 upstream refused the stream before processing it.
    RefusedStream,
    /// The attempt outlived its per-try timeout.
    PerTryTimeout,
    /// The upstream answered with this HTTP status (5xx or 429).
    Http(u16),
    /// The upstream answered with this gRPC status (not OK).
    Grpc(u8),
    /// The upstream's JSON-RPC answer was this error, one that is the
    /// upstream's failure (`jsonrpc::Dialect::judge`).
    JsonRpc(i32),
}

impl Failure {
    /// A short, bounded label for metrics and logs: `connect-failure`,
    /// `http-503`, `grpc-unavailable`.
    pub fn label(self) -> String {
        match self {
            Failure::ConnectFailure => "connect-failure".into(),
            Failure::Reset => "reset".into(),
            Failure::RefusedStream => "refused-stream".into(),
            Failure::PerTryTimeout => "per-try-timeout".into(),
            Failure::Http(code) => format!("http-{code}"),
            Failure::Grpc(code) => format!("grpc-{}", grpc::name(code)),
            Failure::JsonRpc(code) => format!("jsonrpc{code}"),
        }
    }

    /// Rate limiting (429, `RESOURCE_EXHAUSTED`): the upstream is alive and
    /// asking for less load, which is not an outage.
    pub fn is_rate_limit(self) -> bool {
        matches!(self, Failure::Http(429) | Failure::Grpc(RESOURCE_EXHAUSTED))
    }

    /// The upstream could not serve, rather than the request being wrong:
    /// every transport failure, HTTP 5xx and 429, and the gRPC codes that
    /// gRPC's own status mapping attributes to the server (`UNKNOWN`,
    /// `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, `INTERNAL`,
    /// `UNAVAILABLE`, `DATA_LOSS`). An optional upstream degrades to its
    /// fallback only on these.
    pub fn is_server_side(self) -> bool {
        match self {
            Failure::Http(status) => status >= 500 || status == 429,
            Failure::Grpc(code) => matches!(
                code,
                grpc::UNKNOWN
                    | DEADLINE_EXCEEDED
                    | RESOURCE_EXHAUSTED
                    | grpc::INTERNAL
                    | grpc::UNAVAILABLE
                    | grpc::DATA_LOSS
            ),
            Failure::ConnectFailure
            | Failure::Reset
            | Failure::RefusedStream
            | Failure::PerTryTimeout
            | Failure::JsonRpc(_) => true,
        }
    }

    /// The same call may well succeed later, once the upstream is back or
    /// less loaded: every transport failure, HTTP 5xx and 429, and gRPC
    /// `UNAVAILABLE`, `DEADLINE_EXCEEDED` and `RESOURCE_EXHAUSTED` (not
    /// `INTERNAL` or `UNKNOWN`, which say the upstream met the request and
    /// broke on it, as a JSON-RPC internal or server error does). A saga
    /// step's own `retry` waits out only these.
    pub fn is_transient(self) -> bool {
        match self {
            Failure::JsonRpc(_) => false,
            Failure::Grpc(code) => {
                matches!(
                    code,
                    DEADLINE_EXCEEDED | RESOURCE_EXHAUSTED | grpc::UNAVAILABLE
                )
            }
            _ => self.is_server_side(),
        }
    }

    /// The upstream did not process the request, so sending it again is
    /// safe whatever its method: nothing reached it (a connect failure, a
    /// failed TLS handshake, a refused HTTP/2 stream), or it refused the
    /// request before acting on it (429 Too Many Requests, RFC 6585 §4;
    /// 503 Service Unavailable, RFC 9110 §15.6.4). Other failures (other
    /// 5xx, a reset after the request was sent, a timeout) may have left
    /// the request half done.
    pub fn never_processed(self) -> bool {
        matches!(
            self,
            Failure::ConnectFailure
                | Failure::RefusedStream
                | Failure::Http(429)
                | Failure::Http(503)
        )
    }
}

/// Classifies an attempt's result (`grpc`: the call is gRPC). `None`
/// means success.
pub fn classify<B>(result: &Result<Response<B>, ProxyError>, grpc: bool) -> Option<Failure> {
    match result {
        Ok(response) => classify_response(response, grpc),
        Err(error) => classify_error(error),
    }
}

/// Classifies an answer from the upstream (`grpc`: the call is gRPC, so
/// its `grpc-status` counts). `None` means success.
pub fn classify_response<B>(response: &Response<B>, grpc: bool) -> Option<Failure> {
    if let Some(crate::jsonrpc::Verdict::Failure(code)) = response.extensions().get() {
        return Some(Failure::JsonRpc(*code));
    }
    let grpc_status = grpc.then(|| {
        grpc::status(response.headers()).or_else(|| {
            response
                .extensions()
                .get::<grpc::TrailerStatus>()
                .map(|s| s.0)
        })
    });
    classify_status(response.status(), grpc_status.flatten())
}

/// Classifies an answer by its HTTP status and, for a gRPC call, its
/// `grpc-status` wherever it was read (headers, trailers). `None` means
/// success.
pub fn classify_status(status: http::StatusCode, grpc_status: Option<u8>) -> Option<Failure> {
    let status = status.as_u16();
    if status >= 500 || status == 429 {
        return Some(Failure::Http(status));
    }
    match grpc_status {
        Some(grpc::OK) | None => None,
        Some(code) => Some(Failure::Grpc(code)),
    }
}

/// Classifies an error from below the retry layer. `None` for errors that
/// are not the upstream's doing (an open circuit, the caller's request).
pub fn classify_error(error: &ProxyError) -> Option<Failure> {
    match error {
        // A failed handshake sent nothing: a connect failure.
        ProxyError::Connect { .. } | ProxyError::TlsHandshake { .. } => {
            Some(Failure::ConnectFailure)
        }
        // A stream cut for stalling counts as the stream watch counts it.
        ProxyError::Upstream { .. } | ProxyError::StreamStalled { .. } => Some(Failure::Reset),
        ProxyError::RefusedStream { .. } => Some(Failure::RefusedStream),
        ProxyError::PerTryTimeout { .. } => Some(Failure::PerTryTimeout),
        _ => None,
    }
}

/// One condition a policy reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// `connect-failure`
    ConnectFailure,
    /// `reset`
    Reset,
    /// `refused-stream`
    RefusedStream,
    /// `per-try-timeout`
    PerTryTimeout,
    /// `deadline-exceeded`: a per-try timeout or gRPC `DEADLINE_EXCEEDED`.
    DeadlineExceeded,
    /// An HTTP status such as `503`.
    Status(u16),
    /// An HTTP class such as `5xx` (the hundreds digit).
    Class(u16),
    /// A gRPC code by name, such as `unavailable`.
    Grpc(u8),
    /// `jsonrpc-error`: a JSON-RPC error that is the upstream's failure.
    JsonRpc,
}

impl Condition {
    fn parse(text: &str) -> Option<Self> {
        let text = text.trim().to_ascii_lowercase();
        Some(match text.as_str() {
            "connect-failure" => Condition::ConnectFailure,
            "reset" => Condition::Reset,
            "refused-stream" => Condition::RefusedStream,
            "per-try-timeout" => Condition::PerTryTimeout,
            "deadline-exceeded" => Condition::DeadlineExceeded,
            "jsonrpc-error" => Condition::JsonRpc,
            _ => {
                if let Some(code) = grpc::NAMES.iter().position(|c| *c == text) {
                    return (code != 0).then_some(Condition::Grpc(code as u8));
                }
                let bytes = text.as_bytes();
                if bytes.len() == 3 && bytes[1..] == *b"xx" && (b'1'..=b'5').contains(&bytes[0]) {
                    Condition::Class(u16::from(bytes[0] - b'0'))
                } else {
                    let code: u16 = text.parse().ok()?;
                    (100..=599)
                        .contains(&code)
                        .then_some(Condition::Status(code))?
                }
            }
        })
    }

    fn matches(self, failure: Failure) -> bool {
        match (self, failure) {
            (Condition::ConnectFailure, Failure::ConnectFailure)
            | (Condition::Reset, Failure::Reset)
            | (Condition::RefusedStream, Failure::RefusedStream)
            | (Condition::PerTryTimeout, Failure::PerTryTimeout)
            | (Condition::DeadlineExceeded, Failure::PerTryTimeout) => true,
            (Condition::DeadlineExceeded, Failure::Grpc(code)) => code == DEADLINE_EXCEEDED,
            (Condition::Status(want), Failure::Http(code)) => want == code,
            (Condition::Class(class), Failure::Http(code)) => code / 100 == class,
            (Condition::Grpc(want), Failure::Grpc(code)) => want == code,
            (Condition::JsonRpc, Failure::JsonRpc(_)) => true,
            _ => false,
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Condition::ConnectFailure => f.write_str("connect-failure"),
            Condition::Reset => f.write_str("reset"),
            Condition::RefusedStream => f.write_str("refused-stream"),
            Condition::PerTryTimeout => f.write_str("per-try-timeout"),
            Condition::DeadlineExceeded => f.write_str("deadline-exceeded"),
            Condition::Status(code) => write!(f, "{code}"),
            Condition::Class(class) => write!(f, "{class}xx"),
            Condition::Grpc(code) => f.write_str(grpc::name(*code)),
            Condition::JsonRpc => f.write_str("jsonrpc-error"),
        }
    }
}

/// A set of conditions, as listed in a policy file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Conditions(pub Vec<Condition>);

impl Conditions {
    /// Parses a list of condition names; the error names the bad one.
    pub fn parse<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        names
            .into_iter()
            .map(|name| {
                Condition::parse(name).ok_or_else(|| {
                    format!(
                        "unknown condition {name:?}: expected connect-failure, reset, refused-stream, \
                         per-try-timeout, deadline-exceeded, jsonrpc-error, an HTTP status (503) or class (5xx), \
                         or a gRPC code name (unavailable, resource-exhausted, ...)"
                    )
                })
            })
            .collect::<Result<_, _>>()
            .map(Conditions)
    }

    /// Whether any condition matches `failure`.
    pub fn matches(&self, failure: Failure) -> bool {
        self.0.iter().any(|c| c.matches(failure))
    }
}

impl<'de> Deserialize<'de> for Conditions {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(deserializer)?;
        Conditions::parse(names.iter().map(String::as_str)).map_err(de::Error::custom)
    }
}

impl Serialize for Conditions {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|c| c.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body;

    fn response(status: u16, grpc: Option<&str>) -> Response<crate::body::Body> {
        let mut r = Response::new(body::empty());
        *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
        if let Some(g) = grpc {
            r.headers_mut().insert("grpc-status", g.parse().unwrap());
        }
        r
    }

    #[test]
    fn responses() {
        assert_eq!(classify_response(&response(200, None), true), None);
        assert_eq!(
            classify_response(&response(404, None), true),
            None,
            "a client error is not the upstream failing"
        );
        assert_eq!(
            classify_response(&response(429, None), true),
            Some(Failure::Http(429))
        );
        assert_eq!(
            classify_response(&response(503, None), true),
            Some(Failure::Http(503))
        );
        assert_eq!(classify_response(&response(200, Some("0")), true), None);
        assert_eq!(
            classify_response(&response(200, Some("14")), true),
            Some(Failure::Grpc(14))
        );
        let mut trailers_only = response(200, None);
        trailers_only
            .extensions_mut()
            .insert(grpc::TrailerStatus(13));
        assert_eq!(
            classify_response(&response(200, Some("14")), false),
            None,
            "a grpc-status on a plain HTTP call is just a header"
        );
        assert_eq!(
            classify_response(&trailers_only, true),
            Some(Failure::Grpc(13))
        );
    }

    #[test]
    fn conditions_parse_and_match() {
        let c = Conditions::parse([
            "connect-failure",
            "5xx",
            "429",
            "unavailable",
            "deadline-exceeded",
        ])
        .unwrap();
        assert!(c.matches(Failure::ConnectFailure));
        assert!(c.matches(Failure::Http(502)));
        assert!(c.matches(Failure::Http(429)));
        assert!(!c.matches(Failure::Http(430)));
        assert!(c.matches(Failure::Grpc(14)));
        assert!(!c.matches(Failure::Grpc(13)));
        assert!(c.matches(Failure::PerTryTimeout));
        assert!(c.matches(Failure::Grpc(DEADLINE_EXCEEDED)));
        assert!(!c.matches(Failure::Reset));
        let err = Conditions::parse(["unavailabel"]).unwrap_err();
        assert!(
            err.starts_with("unknown condition \"unavailabel\""),
            "{err}"
        );
        assert!(Conditions::parse(["ok"]).is_err(), "OK is never a failure");
        assert!(Conditions::parse(["600"]).is_err());
    }

    #[test]
    fn labels_are_bounded_names() {
        assert_eq!(Failure::Grpc(14).label(), "grpc-unavailable");
        assert_eq!(Failure::Grpc(99).label(), "grpc-unknown");
        assert_eq!(Failure::Http(503).label(), "http-503");
        assert!(Failure::Grpc(8).is_rate_limit());
        assert!(Failure::RefusedStream.never_processed());
        assert!(Failure::Http(429).never_processed() && Failure::Http(503).never_processed());
        assert!(!Failure::Reset.never_processed());
        assert!(!Failure::Http(502).never_processed() && !Failure::Http(500).never_processed());
        assert!(!Failure::PerTryTimeout.never_processed());
    }

    #[test]
    fn server_side_and_transient_failures() {
        for code in [2, 4, 8, 13, 14, 15] {
            assert!(Failure::Grpc(code).is_server_side(), "grpc {code}");
        }
        for code in [1, 3, 5, 6, 7, 9, 10, 11, 12, 16] {
            assert!(!Failure::Grpc(code).is_server_side(), "grpc {code}");
            assert!(!Failure::Grpc(code).is_transient(), "grpc {code}");
        }
        let transient: Vec<u8> = (0..17)
            .filter(|c| Failure::Grpc(*c).is_transient())
            .collect();
        assert_eq!(transient, [4, 8, 14]);
        assert!(Failure::Http(429).is_transient() && Failure::Http(503).is_server_side());
        assert!(Failure::ConnectFailure.is_transient() && Failure::PerTryTimeout.is_server_side());
        assert_eq!(classify_status(http::StatusCode::OK, Some(0)), None);
        assert_eq!(
            classify_status(http::StatusCode::BAD_GATEWAY, Some(0)),
            Some(Failure::Http(502))
        );
    }
}
