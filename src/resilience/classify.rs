//! Classification: the one place that decides whether an attempt failed,
//! and how.
//!
//! Retry, the circuit breaker, metrics and (later) dead letters consume a
//! [`Failure`]; none of them looks at status codes or transport errors on
//! its own. A response is a failure when its HTTP status is 5xx or 429, or
//! when its `grpc-status` (in the headers of a trailers-only answer, or in
//! trailers that arrived before any message, see [`GrpcTrailerStatus`]) is
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

use crate::edge::{GrpcCode, ProxyError};

/// gRPC status codes by number, as named in policy files.
const GRPC_CODES: [&str; 17] = [
    "ok",
    "cancelled",
    "unknown",
    "invalid-argument",
    "deadline-exceeded",
    "not-found",
    "already-exists",
    "permission-denied",
    "resource-exhausted",
    "failed-precondition",
    "aborted",
    "out-of-range",
    "unimplemented",
    "internal",
    "unavailable",
    "data-loss",
    "unauthenticated",
];

/// A gRPC code by its lower-case, dashed name (`unavailable`), or its
/// number as text (`14`).
pub fn grpc_code(text: &str) -> Option<u8> {
    let text = text.trim().to_ascii_lowercase().replace('_', "-");
    match text.parse::<u8>() {
        Ok(code) => (usize::from(code) < GRPC_CODES.len()).then_some(code),
        Err(_) => GRPC_CODES.iter().position(|c| *c == text).map(|c| c as u8),
    }
}

/// A gRPC code's lower-case, dashed name.
pub fn grpc_name(code: u8) -> &'static str {
    GRPC_CODES.get(usize::from(code)).unwrap_or(&"unknown")
}

/// The gRPC status header (or trailer).
pub const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// The `grpc-status` in a header (or trailer) map, if there is a valid one.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<u8> {
    std::str::from_utf8(headers.get(GRPC_STATUS)?.as_bytes())
        .ok()?
        .parse()
        .ok()
}

/// gRPC `DEADLINE_EXCEEDED`.
pub const GRPC_DEADLINE_EXCEEDED: u8 = GrpcCode::DeadlineExceeded as u8;
/// gRPC `RESOURCE_EXHAUSTED`.
pub const GRPC_RESOURCE_EXHAUSTED: u8 = GrpcCode::ResourceExhausted as u8;

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
            Failure::Grpc(code) => format!("grpc-{}", grpc_name(code)),
        }
    }

    /// Rate limiting (429, `RESOURCE_EXHAUSTED`): the upstream is alive and
    /// asking for less load, which is not an outage.
    pub fn is_rate_limit(self) -> bool {
        matches!(
            self,
            Failure::Http(429) | Failure::Grpc(GRPC_RESOURCE_EXHAUSTED)
        )
    }

    /// The request certainly did not reach the upstream's application, so
    /// sending it again is safe whatever its method.
    pub fn never_processed(self) -> bool {
        matches!(self, Failure::ConnectFailure | Failure::RefusedStream)
    }
}

/// The `grpc-status` of a gRPC answer whose first body frame was its
/// trailers (no message sent), recorded in the response's extensions by
/// the client so that classification needs no body access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcTrailerStatus(pub u8);

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
    let status = response.status().as_u16();
    if status >= 500 || status == 429 {
        return Some(Failure::Http(status));
    }
    if !grpc {
        return None;
    }
    let grpc = grpc_status(response.headers()).or_else(|| {
        response
            .extensions()
            .get::<GrpcTrailerStatus>()
            .map(|s| s.0)
    });
    match grpc {
        Some(0) | None => None,
        Some(code) => Some(Failure::Grpc(code)),
    }
}

/// Classifies an error from below the retry layer. `None` for errors that
/// are not the upstream's doing (an open circuit, the caller's request).
pub fn classify_error(error: &ProxyError) -> Option<Failure> {
    match error {
        ProxyError::Connect { .. } => Some(Failure::ConnectFailure),
        ProxyError::Upstream { .. } => Some(Failure::Reset),
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
            _ => {
                if let Some(code) = GRPC_CODES.iter().position(|c| *c == text) {
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
            (Condition::DeadlineExceeded, Failure::Grpc(code)) => code == GRPC_DEADLINE_EXCEEDED,
            (Condition::Status(want), Failure::Http(code)) => want == code,
            (Condition::Class(class), Failure::Http(code)) => code / 100 == class,
            (Condition::Grpc(want), Failure::Grpc(code)) => want == code,
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
            Condition::Grpc(code) => f.write_str(GRPC_CODES[usize::from(*code)]),
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
                         per-try-timeout, deadline-exceeded, an HTTP status (503) or class (5xx), \
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
        trailers_only.extensions_mut().insert(GrpcTrailerStatus(13));
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
        assert!(c.matches(Failure::Grpc(GRPC_DEADLINE_EXCEEDED)));
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
        assert!(!Failure::Reset.never_processed());
    }
}
