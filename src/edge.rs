//! The edge: the one place where a failure becomes an answer to the caller.
//!
//! Each [`ProxyError`] maps to an HTTP status for HTTP callers, a gRPC
//! status for gRPC callers (sent as a trailers-only response with HTTP 200,
//! as gRPC requires) and a short machine-readable reason in the
//! `x-breakwater-error` header, so that a calling agent can tell a
//! Breakwater answer from its upstream's.

use http::Response;
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};

use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::grpc;

/// The header that carries the reason for a synthetic answer.
pub const ERROR_HEADER: &str = "x-breakwater-error";

/// Builds the caller's answer for an error: a gRPC trailers-only response
/// for gRPC calls, a plain-text HTTP error otherwise.
pub fn error_response(error: &ProxyError, grpc: bool) -> Response<Body> {
    let reason = HeaderValue::from_static(error.reason());
    let message = error.to_string();
    if grpc {
        let mut response = grpc::trailers_only(error.grpc_code(), &message);
        response.headers_mut().insert(ERROR_HEADER, reason);
        if let ProxyError::Pushback { retry_after, .. } = error {
            let ms = u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX);
            response
                .headers_mut()
                .insert("grpc-retry-pushback-ms", HeaderValue::from(ms));
        }
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
    if let ProxyError::Pushback { retry_after, .. } = error {
        let ms = u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX);
        headers.insert("retry-after-ms", HeaderValue::from(ms));
        headers.insert(RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000)));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;
    use std::sync::Arc;

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
    fn a_pushback_answer_says_how_long_to_wait() {
        let err = ProxyError::Pushback {
            upstream: Arc::from("llm"),
            retry_after: std::time::Duration::from_millis(1500),
        };
        let http = error_response(&err, false);
        assert_eq!(http.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(http.headers()[ERROR_HEADER], "pushback");
        assert_eq!(http.headers()["retry-after"], "2");
        assert_eq!(http.headers()["retry-after-ms"], "1500");
        let grpc = error_response(&err, true);
        assert_eq!(grpc.headers()["grpc-status"], "8");
        assert_eq!(grpc.headers()["grpc-retry-pushback-ms"], "1500");
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
}
