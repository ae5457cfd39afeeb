//! Fault injection: injected per attempt at the configured rate (seeded, so
//! counts are exact), seen by retries and the breaker like real failures,
//! changed at runtime through the admin API, and triggered by headers only
//! when allowed.

mod support;

use std::time::Duration;

use breakwater::echo::EchoRequest;
use breakwater::resilience::faults::{FaultKind, roll};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use support::*;

fn injected(kind: &str) -> String {
    format!("breakwater_faults_injected_total{{upstream=\"agent\",kind=\"{kind}\"}}")
}

#[tokio::test]
async fn aborts_are_retried_like_real_failures() {
    let upstream = HttpUpstream::echo().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent:\n    address: '{}'\n    retry: {{max_attempts: 3, backoff: {{base: 1ms}}}}\n    faults:\n      abort: {{percent: 100, status: 503, headers: {{retry-after: '0'}}}}\n",
        upstream.addr
    ))
    .await;
    let (parts, body) = call(sidecar.proxy_addr, "agent", Method::GET, "/", "").await;
    assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(parts.headers["x-breakwater-fault"], "abort");
    assert_eq!(parts.headers["retry-after"], "0");
    assert_eq!(body, "injected fault\n");
    assert_eq!(upstream.requests(), 0, "an aborted attempt never leaves");
    assert_eq!(
        metric_value(sidecar.admin_addr, &injected("abort")).await,
        3.0
    );
    let retries = metric_value(
        sidecar.admin_addr,
        "breakwater_retries_total{upstream=\"agent\",reason=\"http-503\"}",
    )
    .await;
    assert_eq!(retries, 2.0);
}

#[tokio::test]
async fn the_seeded_rate_is_exact() {
    const CALLS: u64 = 200;
    let upstream = HttpUpstream::echo().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent:\n    address: '{}'\n    retry: {{max_attempts: 1}}\n    circuit_breaker: {{enabled: false}}\n    faults:\n      seed: 42\n      abort: {{percent: 30, status: 500}}\n",
        upstream.addr
    ))
    .await;
    let mut aborted = 0;
    for _ in 0..CALLS {
        let (parts, _) = call(sidecar.proxy_addr, "agent", Method::GET, "/", "").await;
        if parts.status == StatusCode::INTERNAL_SERVER_ERROR {
            aborted += 1;
        }
    }
    let expected = (0..CALLS)
        .filter(|n| roll(42, FaultKind::Abort, *n) < 0.3)
        .count();
    assert_eq!(aborted, expected);
    assert!((40..80).contains(&aborted), "{aborted} of {CALLS}");
    assert_eq!(upstream.requests(), CALLS as usize - aborted);
    assert_eq!(
        metric_value(sidecar.admin_addr, &injected("abort")).await,
        aborted as f64
    );
}

#[tokio::test]
async fn the_breaker_opens_on_injected_failures() {
    let upstream = HttpUpstream::echo().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent:\n    address: '{}'\n    retry: {{max_attempts: 1}}\n    circuit_breaker: {{consecutive_failures: 3}}\n    faults: {{abort: {{percent: 100, status: 503}}}}\n",
        upstream.addr
    ))
    .await;
    for _ in 0..3 {
        let (parts, _) = call(sidecar.proxy_addr, "agent", Method::GET, "/", "").await;
        assert_eq!(parts.headers["x-breakwater-fault"], "abort");
    }
    let (parts, _) = call(sidecar.proxy_addr, "agent", Method::GET, "/", "").await;
    assert_eq!(parts.headers["x-breakwater-error"], "circuit-open");
}

#[tokio::test(start_paused = true)]
async fn a_delay_runs_inside_the_per_try_timeout() {
    let upstream = HttpUpstream::echo().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent:\n    address: '{}'\n    per_try_timeout: 500ms\n    retry: {{max_attempts: 2, on: [per-try-timeout], backoff: {{base: 1ms}}}}\n    faults: {{delay: {{percent: 100, duration: 2s}}}}\n",
        upstream.addr
    ))
    .await;
    let started = tokio::time::Instant::now();
    let (parts, _) = call(sidecar.proxy_addr, "agent", Method::GET, "/", "").await;
    assert_eq!(parts.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(parts.headers["x-breakwater-error"], "per-try-timeout");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1000) && elapsed < Duration::from_millis(1100),
        "two attempts of 500 ms: {elapsed:?}"
    );
    assert_eq!(upstream.requests(), 0);
    assert_eq!(
        metric_value(sidecar.admin_addr, &injected("delay")).await,
        2.0
    );
}

#[tokio::test]
async fn a_truncated_answer_breaks_after_the_given_bytes() {
    let upstream = HttpUpstream::start(|_req: Request<Incoming>| async {
        answer(200, &[], "0123456789abcdefghijklmnopqrstuvwxyz")
    })
    .await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent:\n    address: '{}'\n    faults: {{truncate: {{percent: 100, after_bytes: 10}}}}\n",
        upstream.addr
    ))
    .await;
    let response = get(sidecar.proxy_addr, "agent", "/").await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut received = Vec::new();
    let error = loop {
        match body.frame().await {
            Some(Ok(frame)) => received.extend_from_slice(&frame.into_data().unwrap()),
            Some(Err(e)) => break e,
            None => panic!("the answer ended whole: {received:?}"),
        }
    };
    assert_eq!(received, b"0123456789", "{error}");
    assert_eq!(
        metric_value(sidecar.admin_addr, &injected("truncate")).await,
        1.0
    );
}

#[tokio::test]
async fn grpc_callers_get_the_injected_status() {
    let upstream = GrpcUpstream::start().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent:\n    address: '{}'\n    protocol: grpc\n    listen: 127.0.0.1:0\n    retry: {{max_attempts: 2, backoff: {{base: 1ms}}}}\n    faults: {{abort: {{percent: 100, grpc_status: unavailable}}}}\n",
        upstream.addr
    ))
    .await;
    let mut client = grpc_client(sidecar.upstream_addrs["agent"]).await;
    let status = client.unary(EchoRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(status.message(), "injected fault");
    assert_eq!(upstream.calls(), 0);
    assert_eq!(
        metric_value(sidecar.admin_addr, &injected("abort")).await,
        2.0
    );
}

#[tokio::test]
async fn operators_change_faults_at_runtime() {
    let upstream = HttpUpstream::echo().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent:\n    address: '{}'\n    retry: {{max_attempts: 1}}\n    faults: {{delay: {{percent: 0, duration: 1s}}}}\n",
        upstream.addr
    ))
    .await;
    let admin_addr = sidecar.admin_addr;
    let faults = admin_json(admin_addr, "/faults").await;
    assert_eq!(
        faults["agent"],
        serde_json::json!({"delay": {"percent": 0.0, "duration": "1s"}, "allow_header_control": false})
    );

    let spec = r#"{"abort": {"percent": 100, "status": 500}}"#;
    let (parts, body) = admin(admin_addr, Method::PUT, "/faults/agent", spec).await;
    assert_eq!(parts.status, StatusCode::OK, "{body:?}");
    let (parts, _) = call(sidecar.proxy_addr, "agent", Method::GET, "/", "").await;
    assert_eq!(parts.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(parts.headers["x-breakwater-fault"], "abort");

    // A bad spec is refused with its reason; the faults in force stay.
    let bad = r#"{"abort": {"percent": 150, "status": 500}}"#;
    let (parts, body) = admin(admin_addr, Method::PUT, "/faults/agent", bad).await;
    assert_eq!(parts.status, StatusCode::BAD_REQUEST);
    let message = String::from_utf8_lossy(&body);
    assert!(
        message.starts_with("abort.percent: 150 is not a percentage"),
        "{message}"
    );
    let (parts, body) = admin(
        admin_addr,
        Method::PUT,
        "/faults/agent",
        r#"{"abort": {"percent": 5}}"#,
    )
    .await;
    assert_eq!(parts.status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).starts_with("abort: give status"));
    assert_eq!(
        admin_json(admin_addr, "/faults").await["agent"]["abort"]["status"],
        500
    );
    let (parts, _) = admin(admin_addr, Method::PUT, "/faults/nobody", spec).await;
    assert_eq!(parts.status, StatusCode::NOT_FOUND);

    let (parts, _) = admin(admin_addr, Method::DELETE, "/faults/agent", "").await;
    assert_eq!(parts.status, StatusCode::OK);
    assert!(admin_json(admin_addr, "/faults").await["agent"].is_null());
    let (parts, _) = call(sidecar.proxy_addr, "agent", Method::GET, "/", "").await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(upstream.requests(), 1);
}

#[tokio::test]
async fn header_faults_only_when_allowed() {
    let upstream = HttpUpstream::echo().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent: {{address: '{0}', retry: {{max_attempts: 1}}, faults: {{allow_header_control: true}}}}\n  closed: {{address: '{0}', retry: {{max_attempts: 1}}}}\n",
        upstream.addr
    ))
    .await;
    let mut request = request_to(sidecar.proxy_addr, "agent", Method::GET, "/", Bytes::new());
    request
        .headers_mut()
        .insert("x-breakwater-fault-abort", "429".parse().unwrap());
    let (parts, _) = read_body(http1_client().request(request).await.unwrap()).await;
    assert_eq!(parts.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(parts.headers["x-breakwater-fault"], "abort");
    assert_eq!(upstream.requests(), 0);

    let mut request = request_to(sidecar.proxy_addr, "closed", Method::GET, "/", Bytes::new());
    request
        .headers_mut()
        .insert("x-breakwater-fault-abort", "429".parse().unwrap());
    let (parts, _) = read_body(http1_client().request(request).await.unwrap()).await;
    assert_eq!(
        parts.status,
        StatusCode::OK,
        "not allowed: passed on untouched"
    );
    assert_eq!(
        upstream.last_seen().headers["x-breakwater-fault-abort"],
        "429"
    );
}

#[tokio::test]
async fn a_truncated_grpc_stream_fails_mid_stream() {
    let upstream = GrpcUpstream::start().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent:\n    address: '{}'\n    protocol: grpc\n    listen: 127.0.0.1:0\n    faults: {{truncate: {{percent: 100, after_bytes: 250}}}}\n",
        upstream.addr
    ))
    .await;
    let mut client = grpc_client(sidecar.upstream_addrs["agent"]).await;
    let request = EchoRequest {
        payload: Bytes::from(vec![b'x'; 100]),
        repeat: 5,
        ..Default::default()
    };
    // Each reply is a 5-byte frame header and about 105 bytes of message:
    // two pass whole, the third is cut.
    let mut stream = client.server_stream(request).await.unwrap().into_inner();
    let mut received = 0;
    let error = loop {
        match stream.message().await {
            Ok(Some(_)) => received += 1,
            Ok(None) => panic!("the stream ended whole after {received} replies"),
            Err(status) => break status,
        }
    };
    assert_eq!(received, 2, "{error:?}");
}
