//! The official OpenAI Python SDK through the sidecar, against an
//! OpenAI-compatible upstream on loopback: a completion, a streamed one
//! (chunks arrive one by one), a 429 the sidecar retries after the time the
//! provider asked for (the SDK's own retries are off), and a stream that
//! stalls, cut by `stream_idle_timeout`; a dead provider failed over to a
//! second one with another model. The agent's key is replaced by the
//! sidecar's.
//!
//! The SDK lives in the virtualenv `.ci/run` makes (see
//! `tests/support/python.rs`).

mod support;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use breakwater::body::{self, BoxError};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use support::*;

fn python() -> Option<PathBuf> {
    support::python::python("openai")
}

async fn sdk(python: PathBuf, base_url: String, scenario: &'static str) -> Value {
    support::python::sdk(python, "openai", base_url, scenario).await
}

/// What the provider saw: each request's model and authorization.
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// An OpenAI-compatible chat completions endpoint. Model `limited` is
/// answered 429 (with `retry-after-ms: 300`) the first time; `stream`
/// sends three chunks 150 ms apart; `stall` sends one chunk, then nothing.
async fn provider(seen: Seen) -> HttpUpstream {
    let limited_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    HttpUpstream::start(move |request: Request<Incoming>| {
        let (seen, limited_once) = (seen.clone(), limited_once.clone());
        async move {
            let auth = request.headers()["authorization"]
                .to_str()
                .unwrap()
                .to_owned();
            let body: Value =
                serde_json::from_slice(&request.into_body().collect().await.unwrap().to_bytes())
                    .unwrap();
            let model = body["model"].as_str().unwrap().to_owned();
            seen.lock().unwrap().push((model.clone(), auth));
            if model == "limited" && !limited_once.swap(true, std::sync::atomic::Ordering::SeqCst) {
                return answer(
                    429,
                    &[
                        ("retry-after-ms", "300"),
                        ("content-type", "application/json"),
                    ],
                    r#"{"error": {"message": "Rate limit reached", "type": "requests"}}"#,
                );
            }
            if body["stream"] == json!(true) {
                return events(&model);
            }
            let completion = json!({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1_700_000_000,
                "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "1200 EUR"}}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
            });
            let mut response = Response::new(body::full(completion.to_string()));
            response
                .headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            response
        }
    })
    .await
}

fn events(model: &str) -> Response<breakwater::body::Body> {
    let stall = model == "stall";
    let chunk = |text: &str| {
        let chunk = json!({
            "id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": "m", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]
        });
        Bytes::from(format!("data: {chunk}\n\n"))
    };
    let parts = vec![chunk("12"), chunk("00"), chunk(" EUR")];
    let stream = futures_util::stream::unfold(0usize, move |i| {
        let parts = parts.clone();
        async move {
            if i > 0 {
                let gap = if stall { 10_000 } else { 150 };
                tokio::time::sleep(Duration::from_millis(gap)).await;
            }
            let data = match i {
                0..=2 => parts[i].clone(),
                3 => Bytes::from_static(b"data: [DONE]\n\n"),
                _ => return None,
            };
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
        "upstreams:\n  openai:\n    address: '{}'\n    listen: 127.0.0.1:0\n    retry: {{on: [429, 503], backoff: {{base: 1ms, max: 5ms}}}}\n    stream_idle_timeout: 500ms\n    request_headers: {{authorization: 'Bearer sk-the-sidecars'}}\n",
        upstream.addr
    ))
    .await;
    let base_url = format!("http://{}/v1", sidecar.upstream_addrs["openai"]);
    (upstream, sidecar, base_url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_completes_and_streams_through_the_sidecar_with_its_key() {
    let Some(python) = python() else { return };
    let seen = Seen::default();
    let (_upstream, _sidecar, base_url) = through_breakwater(&seen).await;
    let plain = sdk(python.clone(), base_url.clone(), "plain").await;
    assert_eq!(plain["content"], "1200 EUR", "{plain}");
    let streamed = sdk(python, base_url, "stream").await;
    support::python::assert_streamed(&streamed, "1200 EUR", 0.1);
    for (model, auth) in seen.lock().unwrap().iter() {
        assert_eq!(
            auth, "Bearer sk-the-sidecars",
            "{model}: the agent's key never reaches the provider"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_to_the_sdk_is_retried_by_the_sidecar_after_the_asked_time() {
    let Some(python) = python() else { return };
    let seen = Seen::default();
    let (_upstream, sidecar, base_url) = through_breakwater(&seen).await;
    let limited = sdk(python, base_url, "limited").await;
    assert_eq!(limited["content"], "1200 EUR", "{limited}");
    assert!(
        limited["seconds"].as_f64().unwrap() >= 0.3,
        "waited as asked: {limited}"
    );
    let models: Vec<String> = seen.lock().unwrap().iter().map(|s| s.0.clone()).collect();
    assert_eq!(
        models,
        ["limited", "limited"],
        "one refusal, one retry of the POST"
    );
    let retries = metric_value(
        sidecar.admin_addr,
        "breakwater_retries_total{upstream=\"openai\",reason=\"http-429\"}",
    )
    .await;
    assert_eq!(retries, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_reaches_the_sdk_as_an_error_within_the_idle_timeout() {
    let Some(python) = python() else { return };
    let seen = Seen::default();
    let (_upstream, sidecar, base_url) = through_breakwater(&seen).await;
    let stalled = sdk(python, base_url, "stall").await;
    support::python::assert_cut(&stalled, "12", 0.5);
    let cut = metric_value(
        sidecar.admin_addr,
        "breakwater_timeouts_total{upstream=\"openai\",kind=\"stream-idle\"}",
    )
    .await;
    assert_eq!(cut, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_fails_over_from_a_dead_provider_to_a_second_model() {
    let Some(python) = python() else { return };
    let seen = Seen::default();
    let backup = provider(seen.clone()).await;
    let dead = closed_port().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  openai:\n    address: '{dead}'\n    listen: 127.0.0.1:0\n    retry: {{max_attempts: 2, backoff: {{base: 1ms, max: 5ms}}}}\n    failover:\n      - upstream: backup\n        rewrite: {{json_body: {{model: small-model}}}}\n  backup:\n    address: '{}'\n    request_headers: {{authorization: 'Bearer sk-backup'}}\n",
        backup.addr
    ))
    .await;
    let base_url = format!("http://{}/v1", sidecar.upstream_addrs["openai"]);
    let answer = sdk(python, base_url, "failover").await;
    assert_eq!(answer["content"], "1200 EUR", "{answer}");
    assert_eq!(answer["model"], "small-model", "{answer}");
    assert_eq!(answer["failover"], "backup", "{answer}");
    assert_eq!(
        *seen.lock().unwrap(),
        [("small-model".to_owned(), "Bearer sk-backup".to_owned())],
        "the second provider got the rewritten model with its own key"
    );
    let moved = metric_value(
        sidecar.admin_addr,
        "breakwater_failovers_total{upstream=\"openai\",to=\"backup\"}",
    )
    .await;
    assert_eq!(moved, 1.0);
}
