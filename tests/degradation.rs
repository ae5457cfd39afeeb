//! Graceful degradation: an optional upstream's failures are answered with
//! its fallback, marked `x-breakwater-degraded`, for every failure reason,
//! over HTTP and gRPC; a critical upstream's failures are not masked.

mod support;

use std::time::Duration;

use breakwater::echo::EchoRequest;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use support::*;

const FALLBACK: &str = "    criticality: optional\n    fallback:\n      headers: {content-type: application/json}\n      body: '{\"matches\": [], \"suggested\": true}'\n";

/// A sidecar with the optional upstream `matching` at `addr`, with extra
/// policy lines.
async fn optional(addr: std::net::SocketAddr, policy: &str) -> breakwater::sidecar::Sidecar {
    sidecar(&format!(
        "upstreams:\n  matching:\n    address: '{addr}'\n{FALLBACK}{policy}"
    ))
    .await
}

/// Calls `matching` and checks that the fallback answered for `reason`.
async fn assert_degraded(sidecar: &breakwater::sidecar::Sidecar, reason: &str) {
    let (parts, body) = call(sidecar.proxy_addr, "matching", Method::GET, "/", "").await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(parts.headers["x-breakwater-degraded"], reason);
    assert_eq!(parts.headers["content-type"], "application/json");
    assert!(!parts.headers.contains_key("x-breakwater-error"));
    assert_eq!(body, "{\"matches\": [], \"suggested\": true}");
    let series = format!("breakwater_fallbacks_total{{upstream=\"matching\",reason=\"{reason}\"}}");
    assert_eq!(
        metric_value(sidecar.admin_addr, &series).await,
        1.0,
        "{series}"
    );
}

#[tokio::test]
async fn spent_retries_degrade_after_every_attempt() {
    let upstream =
        HttpUpstream::start(|_req: Request<Incoming>| async { answer(503, &[], "down") }).await;
    let sidecar = optional(
        upstream.addr,
        "    retry: {max_attempts: 3, backoff: {base: 1ms}}\n",
    )
    .await;
    assert_degraded(&sidecar, "http-503").await;
    assert_eq!(upstream.requests(), 3, "retries ran before degrading");
    let degraded = metric_value(
        sidecar.admin_addr,
        "breakwater_requests_total{upstream=\"matching\",outcome=\"degraded\"}",
    )
    .await;
    assert_eq!(degraded, 1.0);
}

#[tokio::test]
async fn an_unreachable_upstream_degrades() {
    let sidecar = optional(closed_port().await, "    retry: {max_attempts: 1}\n").await;
    assert_degraded(&sidecar, "connect-failure").await;
}

#[tokio::test]
async fn an_open_circuit_degrades_without_calling() {
    let upstream = HttpUpstream::echo().await;
    let sidecar = optional(upstream.addr, "").await;
    let (parts, _) = admin(
        sidecar.admin_addr,
        Method::POST,
        "/circuits/matching/open",
        "",
    )
    .await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_degraded(&sidecar, "circuit-open").await;
    assert_eq!(upstream.requests(), 0);
}

#[tokio::test]
async fn a_shed_request_degrades() {
    let (upstream, arrived, release) = gated().await;
    let sidecar = optional(
        upstream.addr,
        "    max_concurrent_requests: 1\n    max_pending: 0\n",
    )
    .await;
    let proxy = sidecar.proxy_addr;
    let first = tokio::spawn(async move { call(proxy, "matching", Method::GET, "/", "").await });
    arrived.notified().await;
    assert_degraded(&sidecar, "overloaded").await;
    release.notify_one();
    let (parts, body) = first.await.unwrap();
    assert_eq!(parts.status, StatusCode::OK);
    assert!(!parts.headers.contains_key("x-breakwater-degraded"));
    assert_eq!(body, "done");
}

#[tokio::test(start_paused = true)]
async fn a_passed_deadline_degrades() {
    let upstream = HttpUpstream::start(|_req: Request<Incoming>| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        answer(200, &[], "too late")
    })
    .await;
    let sidecar = optional(upstream.addr, "    timeout: 1s\n").await;
    let started = tokio::time::Instant::now();
    assert_degraded(&sidecar, "deadline-exceeded").await;
    assert!(started.elapsed() < Duration::from_millis(1100));
}

#[tokio::test]
async fn answers_about_the_request_are_not_masked() {
    let upstream =
        HttpUpstream::start(|_req: Request<Incoming>| async { answer(404, &[], "no such po") })
            .await;
    let sidecar = optional(upstream.addr, "").await;
    let (parts, body) = call(sidecar.proxy_addr, "matching", Method::GET, "/", "").await;
    assert_eq!(parts.status, StatusCode::NOT_FOUND);
    assert!(!parts.headers.contains_key("x-breakwater-degraded"));
    assert_eq!(body, "no such po");
}

#[tokio::test]
async fn a_critical_upstream_fails_as_it_is() {
    let upstream =
        HttpUpstream::start(|_req: Request<Incoming>| async { answer(503, &[], "down") }).await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  ocr: {{address: '{}', criticality: critical, retry: {{max_attempts: 1}}}}\n  gone: {{address: '{}'}}\n",
        upstream.addr,
        closed_port().await
    ))
    .await;
    let (parts, body) = call(sidecar.proxy_addr, "ocr", Method::GET, "/", "").await;
    assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, "down");
    assert!(!parts.headers.contains_key("x-breakwater-degraded"));
    let (parts, _) = call(sidecar.proxy_addr, "gone", Method::GET, "/", "").await;
    assert_eq!(parts.status, StatusCode::BAD_GATEWAY);
    assert_eq!(parts.headers["x-breakwater-error"], "connect-failure");
    assert!(!parts.headers.contains_key("x-breakwater-degraded"));
}

/// A sidecar with two optional gRPC upstreams: `ranking` with the default
/// fallback, `matching` with a given message; both at `addr`.
async fn grpc_sidecar(addr: std::net::SocketAddr) -> breakwater::sidecar::Sidecar {
    // EchoReply { payload: "hi", count: 7 }
    sidecar(&format!(
        "defaults: {{retry: {{max_attempts: 1}}}}\nupstreams:\n  ranking: {{address: '{addr}', protocol: grpc, criticality: optional, listen: 127.0.0.1:0}}\n  matching:\n    address: '{addr}'\n    protocol: grpc\n    listen: 127.0.0.1:0\n    criticality: optional\n    fallback: {{message_base64: CgJoaRAH}}\n"
    ))
    .await
}

#[tokio::test]
async fn grpc_callers_get_an_ok_answer_marked_in_metadata() {
    let sidecar = grpc_sidecar(closed_port().await).await;

    let mut ranking = grpc_client(sidecar.upstream_addrs["ranking"]).await;
    let response = ranking.unary(EchoRequest::default()).await.unwrap();
    assert_eq!(
        response.metadata().get("x-breakwater-degraded").unwrap(),
        "connect-failure"
    );
    let reply = response.into_inner();
    assert!(
        reply.payload.is_empty() && reply.count == 0,
        "every field at its default"
    );

    let mut matching = grpc_client(sidecar.upstream_addrs["matching"]).await;
    let reply = matching
        .unary(EchoRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((&reply.payload[..], reply.count), (&b"hi"[..], 7));
}

#[tokio::test]
async fn grpc_server_failures_degrade_and_request_errors_do_not() {
    let upstream = GrpcUpstream::start().await;
    let sidecar = grpc_sidecar(upstream.addr).await;
    let mut client = grpc_client(sidecar.upstream_addrs["matching"]).await;
    let mut request = tonic::Request::new(EchoRequest::default());
    request
        .metadata_mut()
        .insert("x-echo-status", "14".parse().unwrap());
    let response = client.unary(request).await.unwrap();
    assert_eq!(
        response.metadata().get("x-breakwater-degraded").unwrap(),
        "grpc-unavailable"
    );
    assert_eq!(response.into_inner().count, 7);

    let mut request = tonic::Request::new(EchoRequest::default());
    request
        .metadata_mut()
        .insert("x-echo-status", "5".parse().unwrap());
    let status = client.unary(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert!(status.metadata().get("x-breakwater-degraded").is_none());
}

#[tokio::test]
async fn a_failed_call_fails_over_to_the_next_upstream_with_its_body() {
    let down =
        HttpUpstream::start(|_req: Request<Incoming>| async { answer(503, &[], "down") }).await;
    let second = HttpUpstream::echo().await;
    let closed = closed_port().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  primary:\n    address: '{}'\n    retry: {{max_attempts: 1}}\n    failover: [gone, second]\n  gone:\n    address: '{closed}'\n    retry: {{max_attempts: 1}}\n  second:\n    address: '{}'\n",
        down.addr, second.addr
    ))
    .await;
    let (parts, body) = call(
        sidecar.proxy_addr,
        "primary",
        Method::POST,
        "/v1/chat/completions",
        "{\"model\": \"big\"}",
    )
    .await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(body, "{\"model\": \"big\"}", "the body was sent again");
    assert_eq!(parts.headers["x-breakwater-failover"], "second");
    assert_eq!((down.requests(), second.requests()), (1, 1));
    for to in ["gone", "second"] {
        let series = format!("breakwater_failovers_total{{upstream=\"primary\",to=\"{to}\"}}");
        assert_eq!(
            metric_value(sidecar.admin_addr, &series).await,
            1.0,
            "{series}"
        );
    }
}

#[tokio::test]
async fn a_failover_target_gets_the_request_rewritten_and_counts_the_call() {
    let down =
        HttpUpstream::start(|_req: Request<Incoming>| async { answer(429, &[], "slow down") })
            .await;
    let second = HttpUpstream::echo().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  primary:\n    address: '{}'\n    retry: {{max_attempts: 1}}\n    failover:\n      - upstream: second\n        rewrite:\n          headers: {{anthropic-version: '2023-06-01'}}\n          json_body: {{model: small, max_tokens: 64}}\n  second:\n    address: '{}'\n",
        down.addr, second.addr
    ))
    .await;
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/v1/messages", sidecar.proxy_addr))
        .header("host", "primary")
        .header("content-type", "application/json")
        .body(breakwater::body::full(
            r#"{"model": "big", "messages": [{"role": "user", "content": "0.10"}], "temperature":0.30000000000000004}"#,
        ))
        .unwrap();
    let (parts, body) = read_body(http1_client().request(request).await.unwrap()).await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(
        body,
        r#"{"model":"small","messages":[{"role": "user", "content": "0.10"}],"temperature":0.30000000000000004,"max_tokens":64}"#,
        "the model set, a field added, every other field kept byte for byte in its place"
    );
    let seen = second.last_seen();
    assert_eq!(seen.headers["anthropic-version"], "2023-06-01");
    assert_eq!(
        seen.headers["content-length"],
        body.len().to_string().as_str()
    );
    assert_eq!(parts.headers["x-breakwater-failover"], "second");
    let second_calls = "breakwater_requests_total{upstream=\"second\",outcome=\"success\"}";
    assert_eq!(metric_value(sidecar.admin_addr, second_calls).await, 1.0);

    // A body that is not a JSON object goes as it was.
    let (parts, body) = call(
        sidecar.proxy_addr,
        "primary",
        Method::POST,
        "/",
        "plain text",
    )
    .await;
    assert_eq!(
        (parts.status, body),
        (StatusCode::OK, Bytes::from("plain text"))
    );
}

#[test]
fn failover_rewrites_are_checked_with_their_position() {
    let error = breakwater::config::parse(
        "p.yaml",
        "upstreams:\n  a:\n    address: 'a:1'\n    failover:\n      - upstream: b\n        rewrite: {headers: {host: x, 'bad name': y}}\n      - upstream: g\n        rewrite: {json_body: {model: m}}\n  b: {address: 'b:1'}\n  g: {address: 'g:1', protocol: grpc}\n",
    )
    .unwrap_err()
    .to_string();
    for expected in [
        "p.yaml:6:",
        "upstreams.a.failover[0].rewrite.headers.host: this header is set by the sidecar itself",
        "upstreams.a.failover[0].rewrite.headers.bad name: \"bad name\" is not a valid header name",
        "p.yaml:8:",
        "upstreams.a.failover[1].rewrite.json_body.model: a gRPC upstream's requests have no JSON body to rewrite",
    ] {
        assert!(error.contains(expected), "{expected:?} in:\n{error}");
    }
    let error = breakwater::config::parse(
        "p.yaml",
        "upstreams:\n  a:\n    address: 'a:1'\n    failover:\n      - {upstream: b, rewrites: {}}\n  b: {address: 'b:1'}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("p.yaml:5:23: upstreams.a.failover[0].rewrites: unknown field \"rewrites\""),
        "a misspelt key inside the block keeps its position: {error}"
    );
}

#[tokio::test]
async fn an_answer_about_the_request_does_not_fail_over() {
    let refusing =
        HttpUpstream::start(|_req: Request<Incoming>| async { answer(404, &[], "no such model") })
            .await;
    let second = HttpUpstream::echo().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  primary:\n    address: '{}'\n    failover: [second]\n  second:\n    address: '{}'\n",
        refusing.addr, second.addr
    ))
    .await;
    let (parts, body) = call(sidecar.proxy_addr, "primary", Method::POST, "/", "{}").await;
    assert_eq!(
        (parts.status, body),
        (StatusCode::NOT_FOUND, Bytes::from("no such model"))
    );
    assert!(!parts.headers.contains_key("x-breakwater-failover"));
    assert_eq!(second.requests(), 0);
}

#[test]
fn failover_lists_name_other_upstreams_without_cycles() {
    let error = breakwater::config::parse(
        "p.yaml",
        "upstreams:\n  a: {address: 'a:1', failover: [b, nope]}\n  b: {address: 'b:1', failover: [c]}\n  c: {address: 'c:1', failover: [a, c]}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("upstreams.a.failover[0]: failing over to \"b\" comes back to \"a\""),
        "{error}"
    );
    assert!(
        error.contains("upstreams.a.failover[1]: there is no upstream \"nope\""),
        "{error}"
    );
    assert!(
        error.contains("upstreams.c.failover[1]: an upstream cannot fail over to itself"),
        "{error}"
    );
}
