//! The official Anthropic Python SDK through the sidecar, against an
//! Anthropic-compatible Messages endpoint on loopback: a message, a
//! streamed one (its typed events arrive one by one), a 429 whose
//! `anthropic-ratelimit-requests-reset` time the sidecar waits for before
//! retrying (the SDK's own retries are off), and a stream that stalls, cut
//! by `stream_idle_timeout`. The agent's `x-api-key` is replaced by the
//! sidecar's.
//!
//! The SDK lives in the virtualenv `.ci/run` makes (see
//! `tests/support/python.rs`).

mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use breakwater::body::{self, BoxError};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use support::*;

async fn sdk(python: PathBuf, base_url: String, scenario: &'static str) -> Value {
    support::python::sdk(python, "anthropic", base_url, scenario).await
}

/// What the provider saw: each request's model, `x-api-key` and
/// `anthropic-version`.
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

/// A Messages endpoint. Model `limited` is answered 429 the first time,
/// with the reset time 400 ms ahead; `stream` sends its text in three
/// deltas 150 ms apart; `stall` sends one delta, then nothing.
async fn provider(seen: Seen) -> HttpUpstream {
    let limited_once = Arc::new(AtomicBool::new(false));
    HttpUpstream::start(move |request: Request<Incoming>| {
        let (seen, limited_once) = (seen.clone(), limited_once.clone());
        async move {
            let header = |name: &str| {
                request
                    .headers()
                    .get(name)
                    .map_or("", |v| v.to_str().unwrap())
                    .to_owned()
            };
            let (key, version) = (header("x-api-key"), header("anthropic-version"));
            let body: Value =
                serde_json::from_slice(&request.into_body().collect().await.unwrap().to_bytes())
                    .unwrap();
            let model = body["model"].as_str().unwrap().to_owned();
            seen.lock().unwrap().push((model.clone(), key, version));
            if model == "limited" && !limited_once.swap(true, Ordering::SeqCst) {
                let reset = humantime::format_rfc3339_millis(
                    SystemTime::now() + Duration::from_millis(400),
                )
                .to_string();
                let mut response = answer(
                    429,
                    &[("content-type", "application/json")],
                    r#"{"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limited"}}"#,
                );
                response
                    .headers_mut()
                    .insert("anthropic-ratelimit-requests-reset", reset.parse().unwrap());
                return response;
            }
            if body["stream"] == json!(true) {
                return events(&model);
            }
            let message = json!({
                "id": "msg_1", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": "1200 EUR"}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 5, "output_tokens": 2}
            });
            let mut response = Response::new(body::full(message.to_string()));
            response
                .headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            response
        }
    })
    .await
}

/// A Messages stream: typed server-sent events.
fn events(model: &str) -> Response<breakwater::body::Body> {
    let stall = model == "stall";
    let event = |kind: &str, data: Value| Bytes::from(format!("event: {kind}\ndata: {data}\n\n"));
    let delta = |text: &str| {
        event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "text_delta", "text": text}}),
        )
    };
    let start = [
        event(
            "message_start",
            json!({"type": "message_start", "message": {
                "id": "msg_2", "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 5, "output_tokens": 0}}}),
        ),
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "text", "text": ""}}),
        ),
    ]
    .concat();
    let end = [
        event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        event(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                   "usage": {"output_tokens": 3}}),
        ),
        event("message_stop", json!({"type": "message_stop"})),
    ]
    .concat();
    let parts = vec![
        Bytes::from([start, delta("12").to_vec()].concat()),
        delta("00"),
        delta(" EUR"),
        Bytes::from(end),
    ];
    let stream = futures_util::stream::unfold(0usize, move |i| {
        let parts = parts.clone();
        async move {
            if i > 0 && i < parts.len() {
                let gap = if stall { 10_000 } else { 150 };
                tokio::time::sleep(Duration::from_millis(gap)).await;
            }
            let data = parts.get(i)?.clone();
            Some((Ok::<_, BoxError>(Frame::data(data)), i + 1))
        }
    });
    let mut response = Response::new(body::boxed(StreamBody::new(stream)));
    response
        .headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    response
}

async fn through_breakwater(seen: &Seen) -> (HttpUpstream, breakwater::sidecar::Sidecar, String) {
    let upstream = provider(seen.clone()).await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  anthropic:\n    address: '{}'\n    listen: 127.0.0.1:0\n    retry: {{on: [429, 503], backoff: {{base: 1ms, max: 5ms}}}}\n    stream_idle_timeout: 500ms\n    request_headers: {{x-api-key: sk-ant-the-sidecars}}\n",
        upstream.addr
    ))
    .await;
    let base_url = format!("http://{}", sidecar.upstream_addrs["anthropic"]);
    (upstream, sidecar, base_url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_sdk_completes_and_streams_through_the_sidecar_with_its_key() {
    let Some(python) = support::python::python("anthropic") else {
        return;
    };
    let seen = Seen::default();
    let (_upstream, _sidecar, base_url) = through_breakwater(&seen).await;
    let plain = sdk(python.clone(), base_url.clone(), "plain").await;
    assert_eq!(plain["content"], "1200 EUR", "{plain}");
    let streamed = sdk(python, base_url, "stream").await;
    support::python::assert_streamed(&streamed, "1200 EUR", 0.1);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    for (model, key, version) in seen.iter() {
        assert_eq!(
            key, "sk-ant-the-sidecars",
            "{model}: the agent's key never reaches the provider"
        );
        assert!(
            !version.is_empty(),
            "{model}: the SDK's version header kept"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_to_the_sdk_is_retried_after_the_anthropic_reset_time() {
    let Some(python) = support::python::python("anthropic") else {
        return;
    };
    let seen = Seen::default();
    let (_upstream, sidecar, base_url) = through_breakwater(&seen).await;
    let limited = sdk(python, base_url, "limited").await;
    assert_eq!(limited["content"], "1200 EUR", "{limited}");
    assert!(
        limited["seconds"].as_f64().unwrap() >= 0.3,
        "waited for the reset time: {limited}"
    );
    let models: Vec<String> = seen.lock().unwrap().iter().map(|s| s.0.clone()).collect();
    assert_eq!(
        models,
        ["limited", "limited"],
        "one refusal, one retry of the POST"
    );
    let retries = metric_value(
        sidecar.admin_addr,
        "breakwater_retries_total{upstream=\"anthropic\",reason=\"http-429\"}",
    )
    .await;
    assert_eq!(retries, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_reaches_the_anthropic_sdk_as_an_error() {
    let Some(python) = support::python::python("anthropic") else {
        return;
    };
    let seen = Seen::default();
    let (_upstream, sidecar, base_url) = through_breakwater(&seen).await;
    let stalled = sdk(python, base_url, "stall").await;
    support::python::assert_cut(&stalled, "12", 0.5);
    let cut = metric_value(
        sidecar.admin_addr,
        "breakwater_timeouts_total{upstream=\"anthropic\",kind=\"stream-idle\"}",
    )
    .await;
    assert_eq!(cut, 1.0);
}
