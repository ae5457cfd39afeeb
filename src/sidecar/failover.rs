//! Failover: a call that finally failed on its upstream, before any of an
//! answer went to the caller, sent to the next upstream of its `failover`
//! list under that upstream's own policy, with the request body kept and
//! sent again, changed as the target's `rewrite` says.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use http::{Request, Response};
use http_body_util::BodyExt;
use serde_json::value::RawValue;
use tokio::time::Instant;

use crate::body::{self, Body};
use crate::classify;
use crate::config::{Entries, Rewrite};
use crate::error::ProxyError;
use crate::resilience::fallback;
use crate::resilience::stack::Observe;
use crate::telemetry::metrics::Outcome;
use crate::upstream::Upstream;

/// The largest request body kept to send again to a failover upstream.
const BODY_LIMIT: usize = 32 << 20;
/// The header naming the failover upstream that answered.
pub const HEADER: &str = "x-breakwater-failover";

/// Calls `upstream`, then each of `targets` in order while the call fails
/// as a fallback would replace it (no answer, or a server-side failure
/// answer: nothing of it has gone to the caller yet). Each target's own
/// metrics count the calls it was given.
pub async fn call(
    upstream: &Upstream,
    targets: &[(Arc<Upstream>, Option<Arc<Rewrite>>)],
    request: Request<Body>,
    grpc: bool,
    observe: Observe<'_>,
) -> Result<Response<Body>, ProxyError> {
    let (parts, body) = request.into_parts();
    let idle = upstream.config.policy.stream_idle_timeout;
    let bytes = collect(body, idle).await?;
    let copy = |rewrite: Option<&Rewrite>| {
        let mut headers = parts.headers.clone();
        let body = match rewrite {
            None => bytes.clone(),
            Some(rewrite) => {
                for (name, value) in &rewrite.headers {
                    headers.insert(name.clone(), value.clone());
                }
                rewrite_json(&rewrite.json_body, &mut headers, &bytes)
            }
        };
        let mut request = Request::new(body::full(body));
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = parts.uri.clone();
        *request.version_mut() = parts.version;
        *request.headers_mut() = headers;
        request
    };
    let mut result = upstream.call(copy(None), grpc, observe).await;
    for (next, rewrite) in targets {
        if fallback::reason(&result, grpc).is_none() {
            break;
        }
        upstream.metrics.failover(&next.config.name);
        tracing::debug!(upstream = %upstream.config.name, to = %next.config.name, "failing over");
        let started = Instant::now();
        let _in_flight = next.metrics.start();
        result = next.call(copy(rewrite.as_deref()), grpc, observe).await;
        let outcome = match &result {
            Err(_) => Outcome::Failure,
            Ok(response) => match classify::classify_response(response, grpc) {
                None => Outcome::Success,
                Some(_) => Outcome::Error,
            },
        };
        next.metrics
            .record(outcome, started.elapsed().as_secs_f64());
        if let Ok(response) = &mut result
            && let Ok(name) = HeaderValue::from_str(&next.config.name)
        {
            response.headers_mut().insert(HEADER, name);
        }
    }
    result
}

/// Reads the caller's whole body, to send again: failing when it is over
/// the limit, breaks off, or stalls longer than `idle` between frames.
async fn collect(mut body: Body, idle: Option<std::time::Duration>) -> Result<Bytes, ProxyError> {
    let mut bytes = bytes::BytesMut::new();
    loop {
        let frame = match idle {
            None => body.frame().await,
            Some(after) => tokio::time::timeout(after, body.frame())
                .await
                .map_err(|_| ProxyError::RequestIdle { after })?,
        };
        let Some(frame) = frame else {
            return Ok(bytes.freeze());
        };
        let frame = frame.map_err(|error| ProxyError::RequestBody {
            reason: crate::error::error_text(&*error),
        })?;
        if let Some(data) = frame.data_ref() {
            if bytes.len() + data.len() > BODY_LIMIT {
                return Err(ProxyError::RequestBody {
                    reason: format!("over {} MiB, the most kept for failover", BODY_LIMIT >> 20),
                });
            }
            bytes.extend_from_slice(data);
        }
    }
}

/// The body with `fields` set at its top level, when it is a JSON object
/// (and `content-length` made to match); any other body as it was. Only
/// the fields set change: every other field keeps its bytes and its place.
fn rewrite_json(fields: &[(String, String)], headers: &mut http::HeaderMap, body: &Bytes) -> Bytes {
    if fields.is_empty() {
        return body.clone();
    }
    let json = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| {
            let t = t.trim();
            t.eq_ignore_ascii_case("application/json") || t.ends_with("+json")
        });
    let object = json
        .then(|| serde_json::from_slice::<Entries<String, Box<RawValue>>>(body).ok())
        .flatten();
    let Some(Entries(entries)) = object else {
        tracing::debug!("failover rewrite: the request body is not a JSON object; sent as it was");
        return body.clone();
    };
    let mut out = Vec::with_capacity(body.len() + 64);
    out.push(b'{');
    let mut first = true;
    let mut push = |out: &mut Vec<u8>, key: &str, value: &str| {
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, key).expect("a string serializes");
        out.push(b':');
        out.extend_from_slice(value.as_bytes());
    };
    for (key, value) in &entries {
        match fields.iter().find(|(k, _)| k == key) {
            Some((_, new)) => push(&mut out, key, new),
            None => push(&mut out, key, value.get()),
        }
    }
    for (key, value) in fields {
        if !entries.iter().any(|(k, _)| k == key) {
            push(&mut out, key, value);
        }
    }
    out.push(b'}');
    headers.insert(CONTENT_LENGTH, HeaderValue::from(out.len()));
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(content_type: Option<&str>, body: &str) -> (String, Option<String>) {
        let mut headers = http::HeaderMap::new();
        if let Some(t) = content_type {
            headers.insert(CONTENT_TYPE, t.parse().unwrap());
        }
        let fields = [("model".to_owned(), "\"m2\"".to_owned())];
        let out = rewrite_json(&fields, &mut headers, &Bytes::from(body.to_owned()));
        let length = headers
            .get(CONTENT_LENGTH)
            .map(|v| v.to_str().unwrap().to_owned());
        (String::from_utf8(out.to_vec()).unwrap(), length)
    }

    #[test]
    fn only_a_json_object_body_is_rewritten() {
        assert_eq!(
            rewritten(Some("application/json; charset=utf-8"), r#"{"model":"m1"}"#),
            (r#"{"model":"m2"}"#.to_owned(), Some("14".to_owned()))
        );
        assert_eq!(
            rewritten(Some("application/vnd.api+json"), "{}"),
            (r#"{"model":"m2"}"#.to_owned(), Some("14".to_owned()))
        );
        for (content_type, body) in [
            (None, r#"{"model":"m1"}"#),
            (Some("text/plain"), r#"{"model":"m1"}"#),
            (Some("application/json"), "[1, 2]"),
            (Some("application/json"), r#"{"model": "#),
        ] {
            assert_eq!(
                rewritten(content_type, body),
                (body.to_owned(), None),
                "{content_type:?} {body}"
            );
        }
    }
}
