//! Graceful degradation: the declared answer of an `optional` upstream.
//!
//! A `critical` upstream's failure goes back to the caller as it is, so
//! the calling agent can stop its workflow. An `optional` upstream's final
//! failure (retries spent, circuit open, shed, deadline passed, upstream
//! unreachable, or a server-side error answer) is replaced by its
//! [`Fallback`], marked with `x-breakwater-degraded: <reason>` so that the
//! caller, and whoever reads its output, knows what is missing.
//!
//! The decision is made once, on the final result, above every other
//! mechanism: retries and the breaker see the real failures, and only
//! what would have reached the caller is replaced.

use std::borrow::Cow;

use bytes::Bytes;
use futures_util::stream;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use http_body::Frame;
use http_body_util::StreamBody;
use serde::{Deserialize, Serialize, Serializer};

use crate::body::{self, Body, BoxError};
use crate::classify;
use crate::error::ProxyError;
use crate::grpc;

/// The header (or gRPC metadata) that marks a degraded answer.
pub const DEGRADED_HEADER: &str = "x-breakwater-degraded";

/// Whether an upstream's failure may be replaced by a fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Criticality {
    /// Its failure is the caller's failure (the default).
    #[default]
    Critical,
    /// Its failure is answered with the fallback, marked as degraded.
    Optional,
}

/// The answer an optional upstream gives when it fails.
#[derive(Debug, Clone, PartialEq)]
pub struct Fallback {
    /// HTTP status for HTTP callers (default 200, or 204 without a body).
    pub status: StatusCode,
    /// Headers for HTTP callers, metadata for gRPC callers.
    pub headers: HeaderMap,
    /// The body for HTTP callers.
    pub body: Bytes,
    /// The message for gRPC callers (default empty: every field at its
    /// proto default).
    pub message: Bytes,
    /// `message` as a gRPC length-prefixed frame, built once.
    frame: Bytes,
}

impl Default for Fallback {
    fn default() -> Self {
        Self::new(
            StatusCode::NO_CONTENT,
            HeaderMap::new(),
            Bytes::new(),
            Bytes::new(),
        )
    }
}

impl Fallback {
    /// A fallback answering `status`, `headers` and `body` to HTTP
    /// callers and `message` to gRPC callers.
    pub fn new(status: StatusCode, headers: HeaderMap, body: Bytes, message: Bytes) -> Self {
        Self {
            status,
            headers,
            body,
            frame: grpc::frame(&message),
            message,
        }
    }

    /// The degraded answer, marked with `reason` (`grpc`: answer as gRPC,
    /// with the message and `grpc-status: 0` in trailers).
    pub fn answer(&self, reason: &str, grpc: bool) -> Response<Body> {
        let marker = HeaderValue::from_str(reason).unwrap_or(HeaderValue::from_static("failure"));
        if !grpc {
            let mut response = Response::new(body::full(self.body.clone()));
            *response.status_mut() = self.status;
            *response.headers_mut() = self.headers.clone();
            response.headers_mut().insert(DEGRADED_HEADER, marker);
            return response;
        }
        let mut trailers = HeaderMap::with_capacity(1);
        trailers.insert(grpc::STATUS, HeaderValue::from_static("0"));
        let frames: [Result<Frame<Bytes>, BoxError>; 2] = [
            Ok(Frame::data(self.frame.clone())),
            Ok(Frame::trailers(trailers)),
        ];
        let mut response = Response::new(body::boxed(StreamBody::new(stream::iter(frames))));
        let headers = response.headers_mut();
        *headers = self.headers.clone();
        if !grpc::is_grpc(headers) {
            headers.insert(CONTENT_TYPE, grpc::CONTENT_TYPE_GRPC);
        }
        headers.insert(DEGRADED_HEADER, marker);
        response
    }
}

impl Serialize for Fallback {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine as _;
        use serde::ser::SerializeStruct;
        let headers: std::collections::BTreeMap<&str, Cow<'_, str>> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), String::from_utf8_lossy(v.as_bytes())))
            .collect();
        let mut out = s.serialize_struct("Fallback", 4)?;
        out.serialize_field("status", &self.status.as_u16())?;
        out.serialize_field("headers", &headers)?;
        out.serialize_field("body", &String::from_utf8_lossy(&self.body))?;
        out.serialize_field(
            "message_base64",
            &base64::engine::general_purpose::STANDARD.encode(&self.message),
        )?;
        out.end()
    }
}

/// Why a call's final result should be replaced by the fallback: the
/// sidecar's own error reason (`circuit-open`, `overloaded`,
/// `deadline-exceeded`, `connect-failure`, ...), or the label of a
/// server-side failure answer (`http-503`, `grpc-unavailable`). `None`
/// when the result stands: a success, or an answer that is about the
/// request (a 404, gRPC `NOT_FOUND`), which a fallback must not mask.
pub fn reason(
    result: &Result<Response<Body>, ProxyError>,
    grpc: bool,
) -> Option<Cow<'static, str>> {
    match result {
        Err(error) if error.is_callers() => None,
        Err(error) => Some(Cow::Borrowed(error.reason())),
        Ok(response) => classify::classify_response(response, grpc)
            .filter(|f| f.is_server_side())
            .map(|f| Cow::Owned(f.label())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn answered(status: u16, grpc_status: Option<&str>) -> Result<Response<Body>, ProxyError> {
        let mut response = Response::new(body::empty());
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        if let Some(code) = grpc_status {
            response
                .headers_mut()
                .insert(grpc::STATUS, code.parse().unwrap());
        }
        Ok(response)
    }

    #[test]
    fn only_server_side_failures_degrade() {
        assert_eq!(reason(&answered(200, None), false), None);
        assert_eq!(reason(&answered(404, None), false), None);
        assert_eq!(reason(&answered(503, None), false).unwrap(), "http-503");
        assert_eq!(reason(&answered(429, None), false).unwrap(), "http-429");
        assert_eq!(reason(&answered(200, Some("5")), true), None, "NOT_FOUND");
        assert_eq!(
            reason(&answered(200, Some("3")), true),
            None,
            "INVALID_ARGUMENT"
        );
        assert_eq!(
            reason(&answered(200, Some("14")), true).unwrap(),
            "grpc-unavailable"
        );
        let open: Result<Response<Body>, _> = Err(ProxyError::CircuitOpen {
            upstream: "ocr".into(),
        });
        assert_eq!(reason(&open, false).unwrap(), "circuit-open");
    }

    #[tokio::test]
    async fn a_grpc_fallback_is_one_message_then_ok_in_trailers() {
        let fallback = Fallback::new(
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::new(),
            Bytes::from_static(b"\x0a\x02hi"),
        );
        let response = fallback.answer("circuit-open", true);
        assert_eq!(response.headers()[DEGRADED_HEADER], "circuit-open");
        assert_eq!(response.headers()[CONTENT_TYPE], "application/grpc");
        let collected = response.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()[grpc::STATUS], "0");
        assert_eq!(collected.to_bytes(), &b"\0\0\0\0\x04\x0a\x02hi"[..]);
    }

    #[tokio::test]
    async fn an_http_fallback_keeps_status_headers_and_body() {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let fallback = Fallback::new(
            StatusCode::OK,
            headers,
            Bytes::from_static(b"{\"matches\":[]}"),
            Bytes::new(),
        );
        let response = fallback.answer("http-503", false);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(response.headers()[DEGRADED_HEADER], "http-503");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "{\"matches\":[]}");
        assert_eq!(Fallback::default().status, StatusCode::NO_CONTENT);
    }
}
