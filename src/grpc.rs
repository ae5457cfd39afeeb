//! gRPC on the wire, as far as a proxy needs it: status codes and their
//! names, the status in headers or trailers, the content type, the
//! length-prefixed message frame, `grpc-message` escaping, and the one
//! builder of a trailers-only answer (every synthetic gRPC error the
//! sidecar sends: its own failures, injected aborts).
//!
//! Deciding what a status *means* for a call (a failure? the upstream's
//! fault? worth waiting for?) is not here: that is
//! [`crate::classify`].

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode};

use crate::body::{self, Body};

/// The gRPC status header (or trailer).
pub const STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// The gRPC status message header (or trailer), percent-encoded.
pub const MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// The content type of a gRPC call.
pub const CONTENT_TYPE_GRPC: HeaderValue = HeaderValue::from_static("application/grpc");

/// `OK`.
pub const OK: u8 = 0;
/// `UNKNOWN`.
pub const UNKNOWN: u8 = 2;
/// `INVALID_ARGUMENT`: the request itself is unusable.
pub const INVALID_ARGUMENT: u8 = 3;
/// `DEADLINE_EXCEEDED`.
pub const DEADLINE_EXCEEDED: u8 = 4;
/// `RESOURCE_EXHAUSTED`: rate limited, or shed.
pub const RESOURCE_EXHAUSTED: u8 = 8;
/// `UNIMPLEMENTED`: no upstream serves this request.
pub const UNIMPLEMENTED: u8 = 12;
/// `INTERNAL`.
pub const INTERNAL: u8 = 13;
/// `UNAVAILABLE`: the upstream could not be reached or failed mid-call.
pub const UNAVAILABLE: u8 = 14;
/// `DATA_LOSS`.
pub const DATA_LOSS: u8 = 15;

/// gRPC status codes by number, as named in policy files.
pub(crate) const NAMES: [&str; 17] = [
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
pub fn code(text: &str) -> Option<u8> {
    let text = text.trim().to_ascii_lowercase().replace('_', "-");
    match text.parse::<u8>() {
        Ok(code) => (usize::from(code) < NAMES.len()).then_some(code),
        Err(_) => NAMES.iter().position(|c| *c == text).map(|c| c as u8),
    }
}

/// A gRPC code's lower-case, dashed name (`unknown` for a code gRPC does
/// not define).
pub fn name(code: u8) -> &'static str {
    NAMES.get(usize::from(code)).unwrap_or(&"unknown")
}

/// The `grpc-status` in a header (or trailer) map, if there is a valid one.
pub fn status(headers: &HeaderMap) -> Option<u8> {
    std::str::from_utf8(headers.get(STATUS)?.as_bytes())
        .ok()?
        .parse()
        .ok()
}

/// The status of a whole answer: in its headers (a trailers-only answer),
/// else in its trailers.
pub fn answer_status(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> Option<u8> {
    status(headers).or_else(|| trailers.and_then(status))
}

/// The `grpc-status` of a gRPC answer whose first body frame was its
/// trailers (no message sent), recorded in the response's extensions by
/// the transport client so that classification needs no body access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrailerStatus(pub u8);

/// Whether a message is a gRPC call or answer, judged by its content type.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// One message as a length-prefixed, uncompressed gRPC frame.
pub fn frame(message: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(5 + message.len());
    frame.put_u8(0);
    frame.put_u32(u32::try_from(message.len()).expect("a gRPC message under 4 GiB"));
    frame.put_slice(message);
    frame.freeze()
}

/// A trailers-only answer: HTTP 200, `application/grpc`, `grpc-status:
/// code` and the percent-encoded `grpc-message`, and no body.
pub fn trailers_only(code: u8, message: &str) -> Response<Body> {
    let mut response = Response::new(body::empty());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, CONTENT_TYPE_GRPC);
    headers.insert(STATUS, HeaderValue::from(u16::from(code)));
    if let Ok(value) = HeaderValue::from_str(&percent_encode(message)) {
        headers.insert(MESSAGE, value);
    }
    response
}

/// gRPC's mapping of an HTTP status to a code (gRPC's
/// `http-grpc-status-mapping`).
pub fn code_for_http(status: StatusCode) -> u8 {
    match status.as_u16() {
        400 => INTERNAL,
        401 => 16,
        403 => 7,
        404 => UNIMPLEMENTED,
        429 | 502..=504 => UNAVAILABLE,
        _ => UNKNOWN,
    }
}

/// The HTTP status closest to a gRPC code, for an HTTP caller of a
/// failure written as a gRPC code.
pub fn http_for_code(code: u8) -> StatusCode {
    StatusCode::from_u16(match code {
        3 | 9 | 11 => 400,
        16 => 401,
        7 => 403,
        5 => 404,
        6 | 10 => 409,
        8 => 429,
        12 => 501,
        14 => 503,
        4 => 504,
        _ => 500,
    })
    .expect("listed statuses are valid")
}

/// Percent-encodes a `grpc-message` as the gRPC HTTP/2 spec asks: every
/// byte outside printable ASCII, and `%` itself.
pub fn percent_encode(message: &str) -> String {
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

/// Decodes `%XX` escapes (a `grpc-message`, and a URL path segment, which
/// escapes the same way); `None` for a broken escape or a result that is
/// not UTF-8.
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
        assert_eq!(percent_encode("50% é"), "50%25 %C3%A9");
    }

    #[test]
    fn codes_by_name_and_number() {
        assert_eq!(code("unavailable"), Some(UNAVAILABLE));
        assert_eq!(code("RESOURCE_EXHAUSTED"), Some(RESOURCE_EXHAUSTED));
        assert_eq!(code("16"), Some(16));
        assert_eq!(code("17"), None);
        assert_eq!(name(99), "unknown");
        assert_eq!(name(DATA_LOSS), "data-loss");
    }

    #[test]
    fn a_trailers_only_answer_has_status_message_and_no_body() {
        let answer = trailers_only(UNAVAILABLE, "down: ü");
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(answer.headers()[CONTENT_TYPE], "application/grpc");
        assert_eq!(status(answer.headers()), Some(UNAVAILABLE));
        assert_eq!(answer.headers()[MESSAGE], "down: %C3%BC");
        assert!(is_grpc(answer.headers()));
    }

    #[test]
    fn frames_are_length_prefixed() {
        assert_eq!(&frame(b"\x0a\x02hi")[..], b"\0\0\0\0\x04\x0a\x02hi");
        let mut trailers = HeaderMap::new();
        trailers.insert(STATUS, HeaderValue::from_static("13"));
        assert_eq!(answer_status(&HeaderMap::new(), Some(&trailers)), Some(13));
    }

    #[test]
    fn http_and_grpc_statuses_map_both_ways() {
        assert_eq!(code_for_http(StatusCode::SERVICE_UNAVAILABLE), UNAVAILABLE);
        assert_eq!(code_for_http(StatusCode::IM_A_TEAPOT), UNKNOWN);
        assert_eq!(http_for_code(UNAVAILABLE), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            http_for_code(DEADLINE_EXCEEDED),
            StatusCode::GATEWAY_TIMEOUT
        );
    }
}
