//! Tracing: an in-process OTLP collector receives the request and attempt
//! spans with the right parent links and attributes, and the upstream
//! receives a `traceparent` naming the attempt span that reached it.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use breakwater::sidecar::{self, Sidecar};
use breakwater::telemetry::traces::Tracing;
use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use support::*;

/// A collector that keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans);
        self.spans.lock().unwrap().extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn collector() -> (Collector, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let collector = Collector::default();
    let service = TraceServiceServer::new(collector.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (collector, format!("http://{addr}"))
}

async fn traced_sidecar(yaml: &str, tracing: &Tracing) -> Sidecar {
    let config = breakwater::config::parse(
        "test.yaml",
        &format!("admin: {{listen: 127.0.0.1:0}}\nproxy: {{listen: 127.0.0.1:0}}\n{yaml}"),
    )
    .unwrap();
    let options = sidecar::Options {
        tracing: Some(tracing.clone()),
        ..sidecar::Options::default()
    };
    sidecar::start(config, options).await.unwrap()
}

/// Flushes the exporter until the collector holds `at_least` spans. A
/// request's span ends when the sidecar drops the answer's body, which can
/// be just after the client has read it; nothing outside the sidecar sees
/// that moment, so the flush is retried a few times.
async fn flushed(tracing: &Tracing, collector: &Collector, at_least: usize) -> Vec<Span> {
    let what = format!("{at_least} spans at the collector");
    eventually(Duration::from_secs(2), &what, || async {
        let t = tracing.clone();
        tokio::task::spawn_blocking(move || t.flush())
            .await
            .unwrap();
        let spans = collector.spans.lock().unwrap().clone();
        (spans.len() >= at_least).then_some(spans)
    })
    .await
}

fn attribute(span: &Span, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone()?.value)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_attempt_spans_link_up_and_reach_the_upstream() {
    let (collector, endpoint) = collector().await;
    let tracing = Tracing::otlp(&endpoint).unwrap();
    let upstream = HttpUpstream::numbered(|n, _req: Request<Incoming>| async move {
        if n == 0 {
            answer(503, &[], "busy")
        } else {
            answer(200, &[], "ok")
        }
    })
    .await;
    let sidecar = traced_sidecar(
        &format!(
            "upstreams:\n  agent: {{address: '{}', retry: {{backoff: {{base: 1ms}}}}}}\n",
            upstream.addr
        ),
        &tracing,
    )
    .await;
    let mut request = request_to(sidecar.proxy_addr, "agent", Method::GET, "/po/7", "");
    let caller = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    request
        .headers_mut()
        .insert("traceparent", caller.parse().unwrap());
    request
        .headers_mut()
        .insert("tracestate", "vendor=abc".parse().unwrap());
    let (parts, _) = read_body(http1_client().request(request).await.unwrap()).await;
    assert_eq!(parts.status, StatusCode::OK);

    let spans = flushed(&tracing, &collector, 3).await;
    let server: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server as i32)
        .collect();
    let mut attempts: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Client as i32)
        .collect();
    assert_eq!((server.len(), attempts.len()), (1, 2), "{spans:#?}");
    let request_span = server[0];
    assert_eq!(hex(&request_span.trace_id), CALLER_TRACE);
    assert_eq!(hex(&request_span.parent_span_id), CALLER_SPAN);
    assert_eq!(request_span.name, "GET agent");
    assert_eq!(
        attribute(request_span, "breakwater.upstream"),
        Some(Value::StringValue("agent".into()))
    );
    assert_eq!(
        attribute(request_span, "http.response.status_code"),
        Some(Value::IntValue(200))
    );

    attempts.sort_by_key(|s| s.start_time_unix_nano);
    for (i, attempt) in attempts.iter().enumerate() {
        assert_eq!(hex(&attempt.trace_id), CALLER_TRACE);
        assert_eq!(attempt.parent_span_id, request_span.span_id);
        assert_eq!(
            attribute(attempt, "breakwater.attempt"),
            Some(Value::IntValue(i as i64 + 1))
        );
        assert_eq!(
            attribute(attempt, "breakwater.breaker_state"),
            Some(Value::StringValue("closed".into()))
        );
    }
    assert_eq!(attribute(attempts[0], "breakwater.retry_reason"), None);
    assert_eq!(
        attribute(attempts[0], "http.response.status_code"),
        Some(Value::IntValue(503))
    );
    assert_eq!(
        attribute(attempts[1], "breakwater.retry_reason"),
        Some(Value::StringValue("http-503".into()))
    );

    // Each attempt carried its own span as the upstream's parent.
    let seen = upstream.seen.lock().unwrap().clone();
    for (seen, attempt) in seen.iter().zip(&attempts) {
        let expected = format!("00-{CALLER_TRACE}-{}-01", hex(&attempt.span_id));
        assert_eq!(seen.headers["traceparent"], expected.as_str());
        assert_eq!(seen.headers["tracestate"], "vendor=abc");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_a_trace_starts_one_and_records_degradation_and_faults() {
    let (collector, endpoint) = collector().await;
    let tracing = Tracing::otlp(&endpoint).unwrap();
    let upstream = HttpUpstream::echo().await;
    let sidecar = traced_sidecar(
        &format!(
            "upstreams:\n  agent:\n    address: '{}'\n    retry: {{max_attempts: 1}}\n    criticality: optional\n    faults: {{abort: {{percent: 100, status: 503}}}}\n",
            upstream.addr
        ),
        &tracing,
    )
    .await;
    let (parts, _) = call(sidecar.proxy_addr, "agent", Method::GET, "/", "").await;
    assert_eq!(parts.headers["x-breakwater-degraded"], "http-503");

    let spans = flushed(&tracing, &collector, 2).await;
    let request_span = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .unwrap();
    assert!(request_span.parent_span_id.is_empty(), "a new trace's root");
    assert_eq!(
        attribute(request_span, "breakwater.degraded"),
        Some(Value::StringValue("http-503".into()))
    );
    let attempt = spans
        .iter()
        .find(|s| s.kind == SpanKind::Client as i32)
        .unwrap();
    assert_eq!(attempt.trace_id, request_span.trace_id);
    assert_eq!(
        attribute(attempt, "breakwater.fault"),
        Some(Value::StringValue("abort".into()))
    );
    let status = attempt.status.as_ref().expect("the attempt span's status");
    assert_eq!(
        (status.code, status.message.as_str()),
        (2, "http-503"),
        "an error status, named by the classified failure"
    );
}

#[tokio::test]
async fn without_tracing_traceparent_passes_through_untouched() {
    let upstream = HttpUpstream::echo().await;
    let sidecar = sidecar_for(upstream.addr).await;
    let mut request = request_to(sidecar.proxy_addr, "agent", Method::GET, "/", "");
    let caller = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    request
        .headers_mut()
        .insert("traceparent", caller.parse().unwrap());
    read_body(http1_client().request(request).await.unwrap()).await;
    assert_eq!(upstream.last_seen().headers["traceparent"], caller.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_span_names_its_route_and_json_rpc_method_and_error() {
    let (collector, endpoint) = collector().await;
    let tracing = Tracing::otlp(&endpoint).unwrap();
    let upstream = HttpUpstream::start(|_req: Request<Incoming>| async {
        answer(
            200,
            &[("content-type", "application/json")],
            r#"{"jsonrpc":"2.0","id":3,"error":{"code":-32603,"message":"boom"}}"#,
        )
    })
    .await;
    let sidecar = traced_sidecar(
        &format!(
            "upstreams:\n  tools:\n    address: '{}'\n    protocol: mcp\n    retry: {{max_attempts: 1}}\n    routes:\n      - name: calls\n        match: {{jsonrpc: {{method: tools/call}}}}\n",
            upstream.addr
        ),
        &tracing,
    )
    .await;
    let body = r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"x"}}"#;
    let (parts, _) = call(sidecar.proxy_addr, "tools", Method::POST, "/mcp", body).await;
    assert_eq!(parts.status, StatusCode::OK);
    let spans = flushed(&tracing, &collector, 2).await;
    let server = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .unwrap();
    let text = |key| match attribute(server, key) {
        Some(Value::StringValue(text)) => text,
        other => panic!("{key}: {other:?}"),
    };
    assert_eq!(text("breakwater.route"), "calls");
    assert_eq!(text("rpc.system"), "jsonrpc");
    assert_eq!(text("rpc.method"), "tools/call");
    assert_eq!(
        attribute(server, "rpc.jsonrpc.error_code"),
        Some(Value::IntValue(-32603))
    );
    // The server's failure marks the span as an error.
    assert_eq!(server.status.as_ref().unwrap().message, "jsonrpc-32603");
}
