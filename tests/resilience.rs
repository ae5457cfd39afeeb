//! Deadlines, per-try timeouts, the circuit breaker, shedding, and the
//! order of the layers, against real upstreams.

mod support;

use std::sync::Arc;
use std::time::Duration;

use breakwater::body;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use support::*;
use tokio::sync::Notify;
use tokio::time::Instant;

/// An upstream that takes 30 s to answer.
async fn stuck() -> HttpUpstream {
    HttpUpstream::start(|_req: Request<Incoming>| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        answer(200, &[], "too late")
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn the_deadline_answers_504_with_its_reason() {
    let upstream = stuck().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent: {{address: '{}', timeout: 2s}}\n",
        upstream.addr
    ))
    .await;
    let started = Instant::now();
    let (parts, body) = call(sidecar.proxy_addr, "agent", Method::GET, "/", "").await;
    assert_eq!(parts.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(parts.headers["x-breakwater-error"], "deadline-exceeded");
    assert!(
        String::from_utf8_lossy(&body).contains("set by policy"),
        "{body:?}"
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(2) && elapsed < Duration::from_millis(2100),
        "{elapsed:?}"
    );
    let timeouts = metric_value(
        sidecar.admin_addr,
        "breakwater_timeouts_total{upstream=\"agent\",kind=\"deadline\"}",
    )
    .await;
    assert_eq!(timeouts, 1.0);
}

#[tokio::test(start_paused = true)]
async fn the_callers_sooner_deadline_wins_for_http_and_grpc() {
    let upstream = stuck().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent: {{address: '{}', timeout: 10s}}\n  ocr: {{address: '{}', protocol: grpc, timeout: 10s}}\n",
        upstream.addr, upstream.addr
    ))
    .await;
    let started = Instant::now();
    let mut request = request_to(sidecar.proxy_addr, "agent", Method::GET, "/", "");
    request
        .headers_mut()
        .insert("x-breakwater-deadline-ms", "300".parse().unwrap());
    let response = http1_client().request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_millis(400));

    let started = Instant::now();
    let mut conn = h2_connect(sidecar.proxy_addr).await;
    let request = Request::post("http://ocr/breakwater.echo.v1.Echo/Unary")
        .header("content-type", "application/grpc")
        .header("grpc-timeout", "500m")
        .body(body::full(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let response = conn.send_request(request).await.unwrap();
    assert_eq!(response.headers()["grpc-status"], "4", "DEADLINE_EXCEEDED");
    assert_eq!(
        response.headers()["x-breakwater-error"],
        "deadline-exceeded"
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(500) && elapsed < Duration::from_millis(600),
        "{elapsed:?}"
    );
}

/// Each attempt tells the upstream the time left, never more.
#[tokio::test(start_paused = true)]
async fn upstreams_see_no_more_time_than_is_left() {
    let upstream = HttpUpstream::numbered(|n, _req: Request<Incoming>| async move {
        if n == 0 {
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        answer(200, &[], "ok")
    })
    .await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent:\n    address: '{}'\n    timeout: 5s\n    per_try_timeout: 300ms\n    retry: {{on: [per-try-timeout], backoff: {{base: 1ms}}}}\n",
        upstream.addr
    ))
    .await;
    let mut request = request_to(sidecar.proxy_addr, "agent", Method::GET, "/", "");
    request
        .headers_mut()
        .insert("x-breakwater-deadline-ms", "1000".parse().unwrap());
    let response = http1_client().request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let seen: Vec<u64> = upstream
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| {
            s.headers["x-breakwater-deadline-ms"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(seen.len(), 2);
    assert!(seen[0] <= 300, "the per-try timeout is sooner: {seen:?}");
    assert!(seen[1] <= 300 && seen[1] > 0, "{seen:?}");

    // gRPC: the caller's grpc-timeout, less the time spent, in grpc-timeout.
    let grpc = HttpUpstream::start(|_req: Request<Incoming>| async {
        answer(
            200,
            &[("content-type", "application/grpc"), ("grpc-status", "0")],
            "",
        )
    })
    .await;
    let sidecar = support::sidecar(&format!(
        "upstreams:\n  ocr: {{address: '{}', protocol: grpc}}\n",
        grpc.addr
    ))
    .await;
    let mut conn = h2_connect(sidecar.proxy_addr).await;
    let request = Request::post("http://ocr/breakwater.echo.v1.Echo/Unary")
        .header("content-type", "application/grpc")
        .header("grpc-timeout", "2S")
        .body(body::full(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let response = conn.send_request(request).await.unwrap();
    assert_eq!(response.headers()["grpc-status"], "0");
    let sent = grpc.last_seen().headers["grpc-timeout"]
        .to_str()
        .unwrap()
        .to_owned();
    let sent = breakwater::resilience::deadline::parse_grpc_timeout(&sent).unwrap();
    assert!(
        sent <= Duration::from_secs(2) && sent > Duration::from_millis(1900),
        "{sent:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn per_try_timeouts_are_retried_and_counted() {
    let upstream = HttpUpstream::numbered(|n, _req: Request<Incoming>| async move {
        if n == 0 {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        answer(200, &[], "second try")
    })
    .await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent:\n    address: '{}'\n    per_try_timeout: 100ms\n    retry: {{on: [deadline-exceeded], backoff: {{base: 1ms}}}}\n",
        upstream.addr
    ))
    .await;
    let (parts, body) = call(sidecar.proxy_addr, "agent", Method::GET, "/", "").await;
    assert_eq!(
        (parts.status, body),
        (StatusCode::OK, Bytes::from("second try"))
    );
    assert_eq!(upstream.requests(), 2);
    let per_try = metric_value(
        sidecar.admin_addr,
        "breakwater_timeouts_total{upstream=\"agent\",kind=\"per-try\"}",
    )
    .await;
    assert_eq!(per_try, 1.0);
}

#[tokio::test(start_paused = true)]
async fn the_breaker_opens_rejects_probes_and_closes() {
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = healthy.clone();
    let upstream = HttpUpstream::start(move |_req: Request<Incoming>| {
        let ok = flag.load(std::sync::atomic::Ordering::SeqCst);
        async move {
            if ok {
                answer(200, &[], "back")
            } else {
                answer(503, &[], "down")
            }
        }
    })
    .await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent:\n    address: '{}'\n    retry: {{max_attempts: 1}}\n    circuit_breaker: {{consecutive_failures: 3, open_for: 10s}}\n",
        upstream.addr
    ))
    .await;
    let proxy = sidecar.proxy_addr;
    for _ in 0..3 {
        assert_eq!(
            call(proxy, "agent", Method::GET, "/", "").await.0.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    assert_eq!(upstream.requests(), 3);
    let started = Instant::now();
    let (parts, _) = call(proxy, "agent", Method::GET, "/", "").await;
    assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(parts.headers["x-breakwater-error"], "circuit-open");
    assert!(
        started.elapsed() < Duration::from_millis(10),
        "rejected at once"
    );
    assert_eq!(upstream.requests(), 3, "the upstream was not contacted");
    assert_eq!(
        metric_value(
            sidecar.admin_addr,
            "breakwater_circuit_state{upstream=\"agent\"}"
        )
        .await,
        1.0
    );
    let circuits = admin_json(sidecar.admin_addr, "/circuits").await;
    assert_eq!(circuits["agent"]["state"], "open");

    // A failed probe re-opens the circuit.
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(
        call(proxy, "agent", Method::GET, "/", "").await.0.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(upstream.requests(), 4, "one probe went through");
    assert_eq!(
        call(proxy, "agent", Method::GET, "/", "").await.0.headers["x-breakwater-error"],
        "circuit-open"
    );

    // The next probe, after twice open_for, succeeds and closes it.
    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(20)).await;
    let (parts, body) = call(proxy, "agent", Method::GET, "/", "").await;
    assert_eq!((parts.status, body), (StatusCode::OK, Bytes::from("back")));
    assert_eq!(
        admin_json(sidecar.admin_addr, "/circuits").await["agent"]["state"],
        "closed"
    );
    assert_eq!(
        metric_value(
            sidecar.admin_addr,
            "breakwater_circuit_transitions_total{upstream=\"agent\",to=\"open\"}"
        )
        .await,
        2.0
    );
}

#[tokio::test]
async fn operators_can_force_a_circuit_open() {
    let upstream = HttpUpstream::echo().await;
    let sidecar = sidecar_for(upstream.addr).await;
    let response = http1_client()
        .request(
            Request::post(format!("http://{}/circuits/agent/open", sidecar.admin_addr))
                .body(body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (parts, _) = call(sidecar.proxy_addr, "agent", Method::GET, "/", "").await;
    assert_eq!(parts.headers["x-breakwater-error"], "circuit-open");
    assert_eq!(upstream.requests(), 0);
    let response = http1_client()
        .request(
            Request::post(format!(
                "http://{}/circuits/agent/reset",
                sidecar.admin_addr
            ))
            .body(body::empty())
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        call(sidecar.proxy_addr, "agent", Method::GET, "/", "")
            .await
            .0
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn requests_beyond_the_limit_and_queue_are_shed() {
    let (upstream, arrived, release) = gated().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent: {{address: '{}', max_concurrent_requests: 1, max_pending: 0}}\n",
        upstream.addr
    ))
    .await;
    let proxy = sidecar.proxy_addr;
    let first = tokio::spawn(async move { call(proxy, "agent", Method::GET, "/", "").await });
    arrived.notified().await;
    let (parts, _) = call(proxy, "agent", Method::GET, "/", "").await;
    assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(parts.headers["x-breakwater-error"], "overloaded");
    assert_eq!(
        metric_value(
            sidecar.admin_addr,
            "breakwater_shed_total{upstream=\"agent\"}"
        )
        .await,
        1.0
    );

    // gRPC callers get RESOURCE_EXHAUSTED.
    let mut conn = h2_connect(proxy).await;
    let request = Request::post("http://agent/pkg.Svc/Method")
        .header("content-type", "application/grpc")
        .body(body::empty())
        .unwrap();
    let response = conn.send_request(request).await.unwrap();
    assert_eq!(response.headers()["grpc-status"], "8");

    release.notify_one();
    assert_eq!(first.await.unwrap().0.status, StatusCode::OK);
    release.notify_one();
    assert_eq!(
        call(proxy, "agent", Method::GET, "/", "").await.0.status,
        StatusCode::OK
    );
    assert_eq!(upstream.requests(), 2);
}

/// The slot is held until the answer has been streamed to the caller.
#[tokio::test]
async fn a_streaming_answer_holds_its_slot_until_it_ends() {
    let release = Arc::new(Notify::new());
    let gate = release.clone();
    let upstream = HttpUpstream::numbered(move |n, _req: Request<Incoming>| {
        let gate = gate.clone();
        async move {
            if n > 0 {
                return answer(200, &[], "later");
            }
            let (tx, rx) =
                tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, body::BoxError>>(1);
            tokio::spawn(async move {
                tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(b"first "))))
                    .await
                    .unwrap();
                gate.notified().await;
                tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(b"last"))))
                    .await
                    .unwrap();
            });
            http::Response::new(body::boxed(http_body_util::StreamBody::new(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            )))
        }
    })
    .await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent: {{address: '{}', max_concurrent_requests: 1, max_pending: 0}}\n",
        upstream.addr
    ))
    .await;
    let response = get(sidecar.proxy_addr, "agent", "/stream").await;
    let mut stream = response.into_body();
    let first = stream.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "first ");
    let (parts, _) = call(sidecar.proxy_addr, "agent", Method::GET, "/", "").await;
    assert_eq!(
        parts.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the first answer is still streaming"
    );
    release.notify_one();
    assert_eq!(stream.collect().await.unwrap().to_bytes(), "last");
    let (parts, body) = call(sidecar.proxy_addr, "agent", Method::GET, "/", "").await;
    assert_eq!((parts.status, body), (StatusCode::OK, Bytes::from("later")));
}

/// The layer order (src/resilience/stack.rs), pinned by behaviour that
/// would change if it changed.
#[tokio::test(start_paused = true)]
async fn layer_order() {
    // deadline above concurrency: time waiting for a slot counts.
    let (upstream, arrived, release) = gated().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent: {{address: '{}', timeout: 1s, max_concurrent_requests: 1, max_pending: 5}}\n",
        upstream.addr
    ))
    .await;
    let proxy = sidecar.proxy_addr;
    let holder = tokio::spawn(async move { call(proxy, "agent", Method::GET, "/", "").await });
    arrived.notified().await;
    let (parts, _) = call(proxy, "agent", Method::GET, "/", "").await;
    assert_eq!(parts.headers["x-breakwater-error"], "deadline-exceeded");
    release.notify_one();
    holder.await.unwrap();

    // concurrency above retry: a call keeps one slot for all its attempts,
    // and a shed call is not retried.
    let flaky = HttpUpstream::numbered(|n, _req: Request<Incoming>| async move {
        if n < 2 {
            answer(503, &[], "")
        } else {
            answer(200, &[], "third")
        }
    })
    .await;
    let sidecar = support::sidecar(&format!(
        "upstreams:\n  agent: {{address: '{}', max_concurrent_requests: 1, max_pending: 0, retry: {{backoff: {{base: 1ms}}}}}}\n",
        flaky.addr
    ))
    .await;
    assert_eq!(
        call(sidecar.proxy_addr, "agent", Method::GET, "/", "")
            .await
            .0
            .status,
        StatusCode::OK
    );
    assert_eq!(flaky.requests(), 3);

    // breaker below retry: every attempt counts, and once the circuit
    // opens the remaining attempts stop at once, unretried.
    let down = HttpUpstream::start(|_req: Request<Incoming>| async { answer(503, &[], "") }).await;
    let sidecar = support::sidecar(&format!(
        "upstreams:\n  agent: {{address: '{}', retry: {{max_attempts: 5, backoff: {{base: 1ms}}}}, circuit_breaker: {{consecutive_failures: 2}}}}\n",
        down.addr
    ))
    .await;
    let (parts, _) = call(sidecar.proxy_addr, "agent", Method::GET, "/", "").await;
    assert_eq!(parts.headers["x-breakwater-error"], "circuit-open");
    assert_eq!(
        down.requests(),
        2,
        "two attempts opened the circuit; the third was refused"
    );
    assert_eq!(
        metric_value(
            sidecar.admin_addr,
            "breakwater_retries_total{upstream=\"agent\",reason=\"http-503\"}"
        )
        .await,
        2.0
    );

    // per-try timeout below the breaker: timed-out attempts open it.
    let slow = stuck().await;
    let sidecar = support::sidecar(&format!(
        "upstreams:\n  agent: {{address: '{}', per_try_timeout: 50ms, retry: {{max_attempts: 1}}, circuit_breaker: {{consecutive_failures: 2}}}}\n",
        slow.addr
    ))
    .await;
    for _ in 0..2 {
        let (parts, _) = call(sidecar.proxy_addr, "agent", Method::GET, "/", "").await;
        assert_eq!(parts.headers["x-breakwater-error"], "per-try-timeout");
    }
    let (parts, _) = call(sidecar.proxy_addr, "agent", Method::GET, "/", "").await;
    assert_eq!(parts.headers["x-breakwater-error"], "circuit-open");
}

#[tokio::test]
async fn a_burst_of_429s_leaves_the_circuit_closed() {
    let upstream =
        HttpUpstream::start(|_req: Request<Incoming>| async { answer(429, &[], "slow down") })
            .await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent:\n    address: '{}'\n    retry: {{max_attempts: 1}}\n    circuit_breaker: {{consecutive_failures: 3, failure_rate: {{threshold: 0.5, window: 10, min_calls: 5}}}}\n",
        upstream.addr
    ))
    .await;
    for _ in 0..30 {
        let (parts, _) = call(sidecar.proxy_addr, "agent", Method::GET, "/", "").await;
        assert_eq!(
            parts.status,
            StatusCode::TOO_MANY_REQUESTS,
            "the provider's own answer"
        );
    }
    assert_eq!(upstream.requests(), 30, "every call reached the provider");
    assert_eq!(
        metric_value(
            sidecar.admin_addr,
            "breakwater_circuit_state{upstream=\"agent\"}"
        )
        .await,
        0.0,
        "closed"
    );
}

#[tokio::test]
async fn a_provider_that_says_wait_is_not_called_until_then() {
    let upstream = HttpUpstream::numbered(|n, _req: Request<Incoming>| async move {
        match n {
            0 => answer(429, &[("retry-after", "30")], "slow down"),
            _ => answer(200, &[], "ok"),
        }
    })
    .await;
    let yaml = |hold: &str| {
        format!(
            "upstreams:\n  llm:\n    address: '{}'\n    retry: {{max_attempts: 1{hold}}}\n",
            upstream.addr
        )
    };
    let sidecar = sidecar(&yaml("")).await;
    let (parts, body) = call(sidecar.proxy_addr, "llm", Method::POST, "/v1/chat", "{}").await;
    assert_eq!(parts.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body, "slow down", "the provider's own answer");
    for _ in 0..5 {
        let (parts, _) = call(sidecar.proxy_addr, "llm", Method::POST, "/v1/chat", "{}").await;
        assert_eq!(parts.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(parts.headers["x-breakwater-error"], "pushback");
        let left: u64 = parts.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((29..=30).contains(&left), "{left}");
        let ms: u64 = parts.headers["retry-after-ms"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((28_000..=30_000).contains(&ms), "{ms}");
    }
    assert_eq!(
        upstream.requests(),
        1,
        "held calls never reach the provider"
    );
    assert_eq!(
        metric_value(
            sidecar.admin_addr,
            "breakwater_circuit_state{upstream=\"llm\"}"
        )
        .await,
        0.0,
        "and the circuit stays closed"
    );

    // Turned off, the next call goes through.
    let open = support::sidecar(&yaml(", hold_on_pushback: false")).await;
    let (parts, body) = call(open.proxy_addr, "llm", Method::POST, "/v1/chat", "{}").await;
    assert_eq!((parts.status, body), (StatusCode::OK, Bytes::from("ok")));
}

/// An upstream that answers a server-sent-event stream: one event, then
/// nothing for ten seconds.
async fn stalling_stream() -> HttpUpstream {
    HttpUpstream::start(|_req: Request<Incoming>| async {
        let events = futures_util::stream::unfold(0u32, |i| async move {
            if i > 0 {
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
            let event = Bytes::from(format!("data: {i}\n\n"));
            Some((
                Ok::<_, breakwater::body::BoxError>(hyper::body::Frame::data(event)),
                i + 1,
            ))
        });
        let mut response =
            http::Response::new(body::boxed(http_body_util::StreamBody::new(events)));
        response
            .headers_mut()
            .insert("content-type", "text/event-stream".parse().unwrap());
        response
    })
    .await
}

#[tokio::test]
async fn a_stream_that_stalls_is_cut_after_its_idle_timeout() {
    let upstream = stalling_stream().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  llm:\n    address: '{}'\n    stream_idle_timeout: 200ms\n",
        upstream.addr
    ))
    .await;
    let started = Instant::now();
    let request = request_to(sidecar.proxy_addr, "llm", Method::POST, "/v1/chat", "{}");
    let response = http1_client().request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(
        first, "data: 0\n\n",
        "the first event arrives as it is sent"
    );
    let cut = body.frame().await;
    assert!(
        matches!(cut, Some(Err(_))),
        "the chunked body is cut short, not ended cleanly: {cut:?}"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let series = "breakwater_timeouts_total{upstream=\"llm\",kind=\"stream-idle\"}";
    assert_eq!(metric_value(sidecar.admin_addr, series).await, 1.0);
    let circuits = admin_json(sidecar.admin_addr, "/circuits").await;
    assert_eq!(
        circuits["llm"]["consecutive_failures"], 1,
        "the breaker counted it: {circuits}"
    );

    // Over HTTP/2 the caller's stream is reset.
    let mut h2 = h2_connect(sidecar.proxy_addr).await;
    let request = Request::post("http://llm/v1/chat")
        .body(body::full("{}"))
        .unwrap();
    let response = h2.send_request(request).await.unwrap();
    let mut body = response.into_body();
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        "data: 0\n\n"
    );
    assert!(matches!(body.frame().await, Some(Err(_))), "reset");
    assert_eq!(metric_value(sidecar.admin_addr, series).await, 2.0);
}

#[tokio::test]
async fn a_grpc_stream_that_stalls_ends_with_deadline_exceeded() {
    let upstream = GrpcUpstream::start().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  echo:\n    address: '{}'\n    protocol: grpc\n    listen: 127.0.0.1:0\n    stream_idle_timeout: 200ms\n",
        upstream.addr
    ))
    .await;
    let mut client = grpc_client(sidecar.upstream_addrs["echo"]).await;
    let started = Instant::now();
    let request = breakwater::echo::EchoRequest {
        payload: Bytes::from_static(b"token"),
        repeat: 3,
        interval_ms: 10_000,
    };
    let mut stream = client.server_stream(request).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.count, 1, "the first message passes at once");
    let status = stream.message().await.unwrap_err();
    assert_eq!(
        status.code(),
        tonic::Code::DeadlineExceeded,
        "a status in the trailers, not a reset: {status:?}"
    );
    assert!(status.message().contains("stalled"), "{status:?}");
    assert_eq!(
        status.metadata().get("x-breakwater-error").unwrap(),
        "stream-idle-timeout"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let series = "breakwater_timeouts_total{upstream=\"echo\",kind=\"stream-idle\"}";
    assert_eq!(metric_value(sidecar.admin_addr, series).await, 1.0);
}

#[tokio::test]
async fn a_slow_first_byte_has_its_own_timeout() {
    // The first event comes after 300 ms, then one every 100 ms: allowed by
    // `first_byte_timeout: 1s` though `stream_idle_timeout` is 200 ms.
    let upstream = HttpUpstream::start(|_req: Request<Incoming>| async {
        let stream = futures_util::stream::unfold(0u32, |i| async move {
            if i == 3 {
                return None;
            }
            let gap = if i == 0 { 300 } else { 100 };
            tokio::time::sleep(Duration::from_millis(gap)).await;
            let frame = hyper::body::Frame::data(Bytes::from(format!("data: {i}\n\n")));
            Some((Ok::<_, breakwater::body::BoxError>(frame), i + 1))
        });
        http::Response::new(body::boxed(http_body_util::StreamBody::new(stream)))
    })
    .await;
    let yaml = |first_byte: &str| {
        format!(
            "upstreams:\n  llm:\n    address: '{}'\n    stream_idle_timeout: 200ms\n    first_byte_timeout: {first_byte}\n",
            upstream.addr
        )
    };
    let sidecar = sidecar(&yaml("1s")).await;
    let request = request_to(sidecar.proxy_addr, "llm", Method::POST, "/v1/chat", "{}");
    let response = http1_client().request(request).await.unwrap();
    let (_, body) = read_body(response).await;
    assert_eq!(body, "data: 0\n\ndata: 1\n\ndata: 2\n\n");

    let strict = support::sidecar(&yaml("100ms")).await;
    let request = request_to(strict.proxy_addr, "llm", Method::POST, "/v1/chat", "{}");
    let response = http1_client().request(request).await.unwrap();
    let cut = response.into_body().collect().await;
    assert!(cut.is_err(), "no first byte within 100 ms: cut");
    let series = "breakwater_timeouts_total{upstream=\"llm\",kind=\"first-byte\"}";
    assert_eq!(metric_value(strict.admin_addr, series).await, 1.0);
    let idle = "breakwater_timeouts_total{upstream=\"llm\",kind=\"stream-idle\"}";
    assert_eq!(metric_value(strict.admin_addr, idle).await, 0.0);
}
