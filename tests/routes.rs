//! Routes: each policy block set on a route applies to the requests it
//! matches and to no others, against real upstreams; metrics and
//! `/circuits` per route.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use support::*;
use tokio::time::Instant;

/// One request through the sidecar to `llm`, with the elapsed time.
async fn timed(
    sidecar: &breakwater::sidecar::Sidecar,
    method: Method,
    path: &str,
) -> (http::response::Parts, Duration) {
    let started = Instant::now();
    let (parts, _) = call(sidecar.proxy_addr, "llm", method, path, "").await;
    (parts, started.elapsed())
}

#[tokio::test(start_paused = true)]
async fn a_route_s_timeout_applies_to_its_requests_only() {
    let upstream = HttpUpstream::start(|_req: Request<Incoming>| async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        answer(200, &[], "late but fine")
    })
    .await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  llm:\n    address: '{}'\n    timeout: 10s\n    routes:\n      - name: models\n        match: {{path: {{exact: /v1/models}}, method: GET}}\n        timeout: 1s\n",
        upstream.addr
    ))
    .await;
    let (parts, elapsed) = timed(&sidecar, Method::GET, "/v1/models").await;
    assert_eq!(parts.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(parts.headers["x-breakwater-error"], "deadline-exceeded");
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_millis(1100),
        "{elapsed:?}"
    );
    // The same path with another method, and another path: the
    // upstream's 10 s.
    for (method, path) in [(Method::POST, "/v1/models"), (Method::GET, "/v1/chat")] {
        let (parts, elapsed) = timed(&sidecar, method, path).await;
        assert_eq!(parts.status, StatusCode::OK, "{path}");
        assert!(elapsed >= Duration::from_secs(3), "{elapsed:?}");
    }
    let admin = sidecar.admin_addr;
    let route = "upstream=\"llm\",route=\"models\"";
    assert_eq!(
        metric_value(
            admin,
            &format!("breakwater_route_timeouts_total{{{route},kind=\"deadline\"}}")
        )
        .await,
        1.0
    );
    assert_eq!(
        metric_value(
            admin,
            &format!("breakwater_route_requests_total{{{route},outcome=\"failure\"}}")
        )
        .await,
        1.0
    );
    assert_eq!(
        metric_value(
            admin,
            &format!("breakwater_route_request_duration_seconds_count{{{route}}}")
        )
        .await,
        1.0
    );
    // The upstream's own series count every request, routed or not.
    for (series, value) in [
        (
            "breakwater_requests_total{upstream=\"llm\",outcome=\"success\"}",
            2.0,
        ),
        (
            "breakwater_requests_total{upstream=\"llm\",outcome=\"failure\"}",
            1.0,
        ),
        (
            "breakwater_timeouts_total{upstream=\"llm\",kind=\"deadline\"}",
            1.0,
        ),
    ] {
        assert_eq!(metric_value(admin, series).await, value, "{series}");
    }
    assert_eq!(upstream.requests(), 3);
}

#[tokio::test]
async fn retries_follow_the_route_and_idempotent_says_what_may_be_sent_again() {
    // Every request fails with a 502: retryable, but processed, so only
    // a call that is safe to repeat is sent again.
    let upstream =
        HttpUpstream::start(|_req: Request<Incoming>| async { answer(502, &[], "bad gateway") })
            .await;
    let sidecar = sidecar(&format!(
        "upstreams:
  llm:
    address: '{}'
    circuit_breaker: {{enabled: false}}
    retry: {{max_attempts: 2, backoff: {{base: 1ms}}}}
    routes:
      - name: reads
        match: {{path: {{prefix: /read}}}}
        retry: {{max_attempts: 4}}
      - name: writes
        match: {{path: {{prefix: /write}}}}
        retry: {{max_attempts: 1}}
      - name: search
        match: {{path: {{exact: /search}}, method: POST}}
        idempotent: true
      - name: charge
        match: {{path: {{exact: /charge}}}}
        idempotent: false
",
        upstream.addr
    ))
    .await;
    let mut before = 0;
    for (method, path, attempts) in [
        (Method::GET, "/read/a", 4),
        (Method::GET, "/write/a", 1),
        (Method::GET, "/other", 2),
        // POST without an Idempotency-Key: not sent again...
        (Method::POST, "/other", 1),
        // ...unless its route says it may be.
        (Method::POST, "/search", 2),
        // A GET its route says is not idempotent: not sent again.
        (Method::GET, "/charge", 1),
    ] {
        let (parts, _) = timed(&sidecar, method.clone(), path).await;
        assert_eq!(parts.status, StatusCode::BAD_GATEWAY, "{method} {path}");
        let made = upstream.requests() - before;
        assert_eq!(made, attempts, "{method} {path}: attempts");
        before = upstream.requests();
    }
    let admin = sidecar.admin_addr;
    for (route, retries) in [("reads", 3.0), ("search", 1.0)] {
        let series = format!(
            "breakwater_route_retries_total{{upstream=\"llm\",route=\"{route}\",reason=\"http-502\"}}"
        );
        assert_eq!(metric_value(admin, &series).await, retries, "{series}");
    }
    // A route that never retried has no retry series.
    assert_eq!(
        metric(
            admin,
            "breakwater_route_retries_total{upstream=\"llm\",route=\"writes\",reason=\"http-502\"}"
        )
        .await,
        None
    );
    assert_eq!(
        metric_value(
            admin,
            "breakwater_retries_total{upstream=\"llm\",reason=\"http-502\"}"
        )
        .await,
        5.0,
        "the upstream's count has every route's retries and its own"
    );
}

#[tokio::test]
async fn a_route_with_its_own_breaker_opens_alone_and_one_without_shares_the_upstream_s() {
    let upstream = HttpUpstream::start(|req: Request<Incoming>| async move {
        if req.uri().path().starts_with("/flaky") || req.uri().path().starts_with("/shared") {
            answer(500, &[], "broken")
        } else {
            answer(200, &[], "fine")
        }
    })
    .await;
    let sidecar = sidecar(&format!(
        "upstreams:
  llm:
    address: '{}'
    retry: {{max_attempts: 1}}
    circuit_breaker: {{consecutive_failures: 2, open_for: 1h}}
    routes:
      - name: flaky
        match: {{path: {{prefix: /flaky}}}}
        circuit_breaker: {{consecutive_failures: 3}}
      - name: shared
        match: {{path: {{prefix: /shared}}}}
",
        upstream.addr
    ))
    .await;
    let admin = sidecar.admin_addr;
    for _ in 0..3 {
        let (parts, _) = timed(&sidecar, Method::GET, "/flaky").await;
        assert_eq!(parts.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    let (parts, _) = timed(&sidecar, Method::GET, "/flaky").await;
    assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(parts.headers["x-breakwater-error"], "circuit-open");
    assert_eq!(upstream.requests(), 3, "the open circuit sent nothing");
    // The upstream's circuit heard of none of it.
    let (parts, _) = timed(&sidecar, Method::GET, "/fine").await;
    assert_eq!(parts.status, StatusCode::OK);
    let circuits = admin_json(admin, "/circuits").await;
    assert_eq!(circuits["llm/flaky"]["state"], "open", "{circuits}");
    assert_eq!(circuits["llm"]["state"], "closed", "{circuits}");
    assert_eq!(
        metric_value(
            admin,
            "breakwater_route_circuit_state{upstream=\"llm\",route=\"flaky\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric_value(admin, "breakwater_circuit_state{upstream=\"llm\"}").await,
        0.0
    );
    // An operator closes the route's circuit by its name.
    let (parts, _) = support::admin(admin, Method::POST, "/circuits/llm/flaky/close", "").await;
    assert_eq!(parts.status, StatusCode::OK);
    let (parts, _) = timed(&sidecar, Method::GET, "/flaky").await;
    assert_eq!(
        parts.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "sent again"
    );
    // A route without a breaker of its own counts on the upstream's: two
    // failures there open the upstream's circuit for every request.
    for _ in 0..2 {
        let (parts, _) = timed(&sidecar, Method::GET, "/shared").await;
        assert_eq!(parts.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    let (parts, _) = timed(&sidecar, Method::GET, "/fine").await;
    assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(parts.headers["x-breakwater-error"], "circuit-open");
    assert_eq!(admin_json(admin, "/circuits").await["llm"]["state"], "open");
}

#[tokio::test]
async fn a_route_degrades_and_injects_faults_on_its_own() {
    let upstream = HttpUpstream::start(|_req: Request<Incoming>| async {
        answer(200, &[], "from the upstream")
    })
    .await;
    let sidecar = sidecar(&format!(
        "upstreams:
  llm:
    address: '{}'
    retry: {{max_attempts: 1}}
    routes:
      - name: models
        match: {{path: {{exact: /v1/models}}}}
        criticality: optional
        fallback: {{body: '{{\"data\": []}}', headers: {{content-type: application/json}}}}
        faults: {{abort: {{percent: 100, status: 503}}}}
      - name: broken
        match: {{path: {{exact: /broken}}}}
        faults: {{abort: {{percent: 100, status: 500}}}}
      - name: chat
        match: {{path: {{prefix: /v1/chat}}}}
",
        upstream.addr
    ))
    .await;
    let (parts, body) = call(sidecar.proxy_addr, "llm", Method::GET, "/v1/models", "").await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(parts.headers["x-breakwater-degraded"], "http-503");
    assert_eq!(&body[..], br#"{"data": []}"#);
    let (parts, _) = call(sidecar.proxy_addr, "llm", Method::GET, "/broken", "").await;
    assert_eq!(parts.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(parts.headers.get("x-breakwater-degraded").is_none());
    let (parts, body) = call(sidecar.proxy_addr, "llm", Method::GET, "/other", "").await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(&body[..], b"from the upstream");
    assert_eq!(
        upstream.requests(),
        1,
        "only the unrouted request got through"
    );
    let admin = sidecar.admin_addr;
    assert_eq!(
        metric_value(
            admin,
            "breakwater_route_requests_total{upstream=\"llm\",route=\"models\",outcome=\"degraded\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric_value(
            admin,
            "breakwater_faults_injected_total{upstream=\"llm\",kind=\"abort\"}"
        )
        .await,
        2.0
    );
    // Faults the operator sets on the upstream reach routes without
    // faults of their own, not the routes that have theirs.
    let (parts, _) = support::admin(
        admin,
        Method::PUT,
        "/faults/llm",
        r#"{"abort": {"percent": 100, "status": 418}}"#,
    )
    .await;
    assert_eq!(parts.status, StatusCode::OK);
    for path in ["/other", "/v1/chat/completions"] {
        let (parts, _) = call(sidecar.proxy_addr, "llm", Method::GET, path, "").await;
        assert_eq!(parts.status.as_u16(), 418, "{path}");
    }
    let (parts, _) = call(sidecar.proxy_addr, "llm", Method::GET, "/broken", "").await;
    assert_eq!(parts.status, StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn a_grpc_method_its_route_says_is_not_idempotent_is_not_sent_again() {
    let upstream = HttpUpstream::start(|request: Request<Incoming>| async move {
        let _ = http_body_util::BodyExt::collect(request.into_body()).await;
        grpc_failure("14")
    })
    .await;
    let sidecar = sidecar(&format!(
        "upstreams:
  billing:
    address: '{}'
    protocol: grpc
    circuit_breaker: {{enabled: false}}
    retry: {{backoff: {{base: 1ms}}}}
    routes:
      - name: create
        match: {{grpc: {{service: billing.v1.Invoices, method: Create}}}}
        idempotent: false
",
        upstream.addr
    ))
    .await;
    let mut before = 0;
    // UNAVAILABLE is retried for gRPC (gRFC A6), but not for a method
    // whose route says a repeat is not safe.
    for (method, attempts) in [("Create", 1), ("Get", 3)] {
        let mut conn = h2_connect(sidecar.proxy_addr).await;
        let request = Request::post(format!("http://billing/billing.v1.Invoices/{method}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(breakwater::body::full(&b"\0\0\0\0\x02\x0a\x00"[..]))
            .unwrap();
        let response = conn.send_request(request).await.unwrap();
        let collected = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "14");
        assert_eq!(upstream.requests() - before, attempts, "{method}");
        before = upstream.requests();
    }
    assert_eq!(
        metric_value(
            sidecar.admin_addr,
            "breakwater_route_requests_total{upstream=\"billing\",route=\"create\",outcome=\"error\"}"
        )
        .await,
        1.0
    );
}

/// An upstream for `per_try_timeout`, `hedge` and `stream_idle_timeout`
/// on routes: `/slow*` answers after 3 s; `/hedged*` makes its first
/// caller wait 5 s and answers the others at once; `/stream*` sends one
/// event, then one every 10 s.
async fn timing_upstream() -> HttpUpstream {
    let first_hedged = Arc::new(std::sync::atomic::AtomicBool::new(true));
    HttpUpstream::start(move |req: Request<Incoming>| {
        let first_hedged = first_hedged.clone();
        async move {
            let path = req.uri().path().to_owned();
            if path.starts_with("/slow") {
                tokio::time::sleep(Duration::from_secs(3)).await;
            } else if path.starts_with("/hedged") && first_hedged.swap(false, Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_secs(5)).await;
            } else if path.starts_with("/stream") {
                let events = futures_util::stream::unfold(0u32, |i| async move {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                    }
                    let event = bytes::Bytes::from(format!("data: {i}\n\n"));
                    Some((
                        Ok::<_, breakwater::body::BoxError>(hyper::body::Frame::data(event)),
                        i + 1,
                    ))
                });
                let body = breakwater::body::boxed(http_body_util::StreamBody::new(events));
                return http::Response::new(body);
            }
            answer(200, &[], "ok")
        }
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn a_route_s_per_try_timeout_hedge_and_stream_timeout_apply_to_its_requests_only() {
    let upstream = timing_upstream().await;
    let sidecar = sidecar(&format!(
        "upstreams:
  llm:
    address: '{}'
    timeout: 60s
    stream_idle_timeout: 60s
    circuit_breaker: {{enabled: false}}
    retry: {{backoff: {{base: 1ms, max: 1ms}}}}
    routes:
      - name: tries
        match: {{path: {{exact: /slow}}}}
        per_try_timeout: 1s
        retry: {{max_attempts: 2, on: [per-try-timeout]}}
      - name: hedged
        match: {{path: {{exact: /hedged}}}}
        hedge: {{delay: 100ms}}
      - name: stream
        match: {{path: {{exact: /stream}}}}
        stream_idle_timeout: 1s
",
        upstream.addr
    ))
    .await;
    // Two attempts of a second each, then the route's per-try timeout.
    let (parts, elapsed) = timed(&sidecar, Method::GET, "/slow").await;
    assert_eq!(parts.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(parts.headers["x-breakwater-error"], "per-try-timeout");
    assert!(
        elapsed >= Duration::from_secs(2) && elapsed < Duration::from_millis(2100),
        "{elapsed:?}"
    );
    assert_eq!(upstream.requests(), 2);
    let (parts, elapsed) = timed(&sidecar, Method::GET, "/slow-other").await;
    assert_eq!(parts.status, StatusCode::OK);
    assert!(elapsed >= Duration::from_secs(3), "{elapsed:?}");

    // The hedged route sends a second attempt after 100 ms, which wins.
    let (parts, elapsed) = timed(&sidecar, Method::GET, "/hedged").await;
    assert_eq!(parts.status, StatusCode::OK);
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    assert_eq!(upstream.last_seen().headers["x-breakwater-attempt"], "2");

    // The stream route's idle timeout cuts a stalled stream after 1 s;
    // elsewhere the upstream's 60 s lets it run.
    let started = Instant::now();
    let response = get(sidecar.proxy_addr, "llm", "/stream").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        http_body_util::BodyExt::collect(response.into_body())
            .await
            .is_err()
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
    let admin = sidecar.admin_addr;
    let route = |name: &str, kind: &str| {
        format!(
            "breakwater_route_timeouts_total{{upstream=\"llm\",route=\"{name}\",kind=\"{kind}\"}}"
        )
    };
    assert_eq!(
        metric_value(admin, &route("stream", "stream-idle")).await,
        1.0
    );
    assert_eq!(metric_value(admin, &route("tries", "per-try")).await, 2.0);
    assert_eq!(
        metric_value(admin, "breakwater_hedges_total{upstream=\"llm\"}").await,
        1.0
    );
}

#[tokio::test]
async fn calls_made_outside_the_proxy_port_are_read_as_json_rpc_too() {
    // Saga steps and dead-letter replays call `Upstream::call` directly:
    // their JSON-RPC calls are read for their method as a caller's are.
    let upstream =
        HttpUpstream::start(|_req: Request<Incoming>| async { answer(502, &[], "bad gateway") })
            .await;
    let config = policies(&format!(
        "upstreams:\n  tools:\n    address: '{}'\n    protocol: mcp\n    circuit_breaker: {{enabled: false}}\n    retry: {{backoff: {{base: 1ms}}}}\n",
        upstream.addr
    ));
    let metrics = breakwater::telemetry::metrics::Metrics::new();
    let tools =
        breakwater::upstream::Upstream::new(config.upstream("tools").unwrap().clone(), &metrics);
    let mut before = 0;
    for (method, attempts) in [("tools/list", 3), ("tools/call", 1)] {
        let request = Request::post(format!("http://{}/mcp", upstream.addr))
            .header("content-type", "application/json")
            .body(breakwater::body::full(format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"{method}"}}"#
            )))
            .unwrap();
        let response = tools
            .call(request, false, Default::default())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(upstream.requests() - before, attempts, "{method}");
        before = upstream.requests();
    }
}
