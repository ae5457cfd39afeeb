//! Retries against real upstreams with scripted failures: attempt counts,
//! idempotency rules, the budget, gRPC statuses in trailers, pushback.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use breakwater::body::{self, BoxError};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use support::*;
use tokio::time::Instant;

fn config(addr: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "upstreams:\n  agent:\n    address: '{addr}'\n    retry: {{backoff: {{base: 1ms, max: 5ms}}{extra}}}\n"
    )
}

#[tokio::test]
async fn failed_attempts_are_retried_up_to_max_attempts() {
    let upstream =
        HttpUpstream::start(|_req: Request<Incoming>| async { answer(503, &[], "busy") }).await;
    let sidecar = sidecar(&config(upstream.addr, ", max_attempts: 4")).await;
    let (parts, body) = call(sidecar.proxy_addr, "agent", Method::GET, "/", "").await;
    assert_eq!(
        parts.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the last answer, as it was"
    );
    assert_eq!(body, "busy");
    assert_eq!(upstream.requests(), 4);
    let attempts: Vec<Option<String>> = upstream
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| {
            s.headers
                .get("x-breakwater-attempt")
                .map(|v| v.to_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(
        attempts,
        [None, Some("2".into()), Some("3".into()), Some("4".into())]
    );
    let retries = metric_value(
        sidecar.admin_addr,
        "breakwater_retries_total{upstream=\"agent\",reason=\"http-503\"}",
    )
    .await;
    assert_eq!(retries, 3.0);
}

#[tokio::test]
async fn a_success_ends_the_retries_and_unlisted_failures_are_not_retried() {
    let upstream = HttpUpstream::numbered(|n, _req: Request<Incoming>| async move {
        match n {
            0 => answer(502, &[], "bad gateway"),
            1 => answer(200, &[], "ok"),
            _ => answer(500, &[], "not in the list"),
        }
    })
    .await;
    let sidecar = sidecar(&config(upstream.addr, "")).await;
    let (parts, body) = call(sidecar.proxy_addr, "agent", Method::GET, "/", "").await;
    assert_eq!((parts.status, body), (StatusCode::OK, Bytes::from("ok")));
    assert_eq!(upstream.requests(), 2);
    let (parts, _) = call(sidecar.proxy_addr, "agent", Method::GET, "/", "").await;
    assert_eq!(
        parts.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "500 is not in the default list"
    );
    assert_eq!(upstream.requests(), 3);
}

#[tokio::test]
async fn non_idempotent_requests_need_a_key_or_the_policy() {
    // A 502 may come after the upstream acted on the request.
    let upstream =
        HttpUpstream::start(|_req: Request<Incoming>| async { answer(502, &[], "") }).await;
    let sidecar = sidecar(&config(upstream.addr, "")).await;
    call(sidecar.proxy_addr, "agent", Method::POST, "/orders", "{}").await;
    assert_eq!(upstream.requests(), 1, "POST is not retried");
    let mut request = request_to(sidecar.proxy_addr, "agent", Method::POST, "/orders", "{}");
    request
        .headers_mut()
        .insert("idempotency-key", "order-17".parse().unwrap());
    http1_client().request(request).await.unwrap();
    assert_eq!(upstream.requests(), 4, "with an Idempotency-Key it is");

    let upstream2 =
        HttpUpstream::start(|_req: Request<Incoming>| async { answer(502, &[], "") }).await;
    let sidecar2 = support::sidecar(&config(upstream2.addr, ", retry_non_idempotent: true")).await;
    call(
        sidecar2.proxy_addr,
        "agent",
        Method::PATCH,
        "/orders/1",
        "{}",
    )
    .await;
    assert_eq!(upstream2.requests(), 3, "retry_non_idempotent allows it");
}

#[tokio::test]
async fn a_post_refused_with_429_or_503_is_retried_without_a_key() {
    // As an LLM provider answers an SDK's POST: refused twice, then served.
    let upstream = HttpUpstream::numbered(|n, req: Request<Incoming>| async move {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        match n {
            0 => answer(429, &[("retry-after-ms", "5")], "slow down"),
            1 => answer(503, &[], "busy"),
            _ => Response::new(breakwater::body::full(body)),
        }
    })
    .await;
    let sidecar = sidecar(&config(upstream.addr, ", on: [429, 503]")).await;
    let (parts, body) = call(
        sidecar.proxy_addr,
        "agent",
        Method::POST,
        "/v1/chat/completions",
        "{\"model\": \"m\"}",
    )
    .await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(body, "{\"model\": \"m\"}", "the body was replayed");
    assert_eq!(upstream.requests(), 3);
    for reason in ["http-429", "http-503"] {
        let series = format!("breakwater_retries_total{{upstream=\"agent\",reason=\"{reason}\"}}");
        assert_eq!(
            metric_value(sidecar.admin_addr, &series).await,
            1.0,
            "{series}"
        );
    }
}

#[tokio::test]
async fn connect_failures_are_retried_whatever_the_method() {
    let closed = closed_port().await;
    let sidecar = sidecar(&config(closed, "")).await;
    let (parts, _) = call(sidecar.proxy_addr, "agent", Method::POST, "/", "x").await;
    assert_eq!(parts.status, StatusCode::BAD_GATEWAY);
    assert_eq!(parts.headers["x-breakwater-error"], "connect-failure");
    let retries = metric_value(
        sidecar.admin_addr,
        "breakwater_retries_total{upstream=\"agent\",reason=\"connect-failure\"}",
    )
    .await;
    assert_eq!(retries, 2.0);
}

#[tokio::test]
async fn request_bodies_are_replayed_on_retry() {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    let upstream = HttpUpstream::numbered(move |n, request: Request<Incoming>| {
        let seen = seen.clone();
        async move {
            let body = request.into_body().collect().await.unwrap().to_bytes();
            seen.lock().unwrap().push(body);
            if n < 2 {
                answer(503, &[], "")
            } else {
                answer(200, &[], "stored")
            }
        }
    })
    .await;
    let sidecar = sidecar(&config(upstream.addr, "")).await;
    // A chunked body, streamed in three pieces.
    let frames: Vec<Result<Frame<Bytes>, BoxError>> = ["alpha ", "beta ", "gamma"]
        .into_iter()
        .map(|c| Ok(Frame::data(Bytes::from(c))))
        .collect();
    let request = Request::put(format!("http://{}/doc", sidecar.proxy_addr))
        .header("host", "agent")
        .body(body::boxed(StreamBody::new(tokio_stream::iter(frames))))
        .unwrap();
    let response = http1_client().request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        *bodies.lock().unwrap(),
        vec![Bytes::from("alpha beta gamma"); 3]
    );
}

#[tokio::test]
async fn bodies_over_the_buffer_limit_are_not_retried() {
    let upstream = HttpUpstream::start(|request: Request<Incoming>| async move {
        let _ = request.into_body().collect().await;
        answer(503, &[], "")
    })
    .await;
    let sidecar = sidecar(&config(upstream.addr, ", buffer_limit: 1KiB")).await;
    let (parts, _) = call(
        sidecar.proxy_addr,
        "agent",
        Method::PUT,
        "/",
        vec![1u8; 4096],
    )
    .await;
    assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(upstream.requests(), 1);
}

/// A failing upstream under 1000 requests gets no more retries than the
/// budget allows: 20% of requests plus 1 per second over the 10 s window.
#[tokio::test]
async fn the_budget_caps_retries_under_total_failure() {
    let upstream =
        HttpUpstream::start(|_req: Request<Incoming>| async { answer(503, &[], "") }).await;
    let sidecar = sidecar(&format!(
        "{}    circuit_breaker: {{enabled: false}}\n",
        config(
            upstream.addr,
            ", max_attempts: 3, budget: {ratio: 0.2, min_per_second: 1}"
        )
    ))
    .await;
    let proxy = sidecar.proxy_addr;
    let mut workers = Vec::new();
    for _ in 0..10 {
        workers.push(tokio::spawn(async move {
            let client = http1_client();
            for _ in 0..100 {
                let response = client
                    .request(request_to(proxy, "agent", Method::GET, "/", ""))
                    .await
                    .unwrap();
                assert_eq!(
                    read_body(response).await.0.status,
                    StatusCode::SERVICE_UNAVAILABLE
                );
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let retries = upstream.requests() - 1000;
    assert!(
        retries <= 210,
        "{retries} retries: more than the budget's 210"
    );
    assert!(
        retries >= 150,
        "{retries} retries: the budget should allow about 210"
    );
    let exhausted = metric_value(
        sidecar.admin_addr,
        "breakwater_retry_budget_exhausted_total{upstream=\"agent\"}",
    )
    .await;
    assert!(exhausted > 0.0);
}

fn grpc_message_then(code: &'static str) -> Response<body::Body> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", code.parse().unwrap());
    let frames = vec![
        Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"\0\0\0\0\x02\x0a\x00"))),
        Ok(Frame::trailers(trailers)),
    ];
    let mut response = Response::new(body::boxed(StreamBody::new(tokio_stream::iter(frames))));
    response
        .headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    response
}

/// A sidecar in front of a gRPC upstream named `ocr`, retrying quickly.
async fn grpc_sidecar(addr: std::net::SocketAddr) -> breakwater::sidecar::Sidecar {
    sidecar(&format!(
        "upstreams:\n  ocr:\n    address: '{addr}'\n    protocol: grpc\n    retry: {{backoff: {{base: 1ms}}}}\n"
    ))
    .await
}

/// One unary call to `ocr` through the sidecar's shared port, read whole.
async fn unary(sidecar: &breakwater::sidecar::Sidecar) -> http_body_util::Collected<Bytes> {
    let mut conn = h2_connect(sidecar.proxy_addr).await;
    let response = conn.send_request(grpc_request("ocr")).await.unwrap();
    response.into_body().collect().await.unwrap()
}

fn grpc_request(authority: &str) -> Request<body::Body> {
    Request::post(format!("http://{authority}/breakwater.echo.v1.Echo/Unary"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body::full(Bytes::from_static(b"\0\0\0\0\x02\x0a\x00")))
        .unwrap()
}

#[tokio::test]
async fn grpc_unavailable_in_trailers_is_retried() {
    let upstream = HttpUpstream::numbered(|n, request: Request<Incoming>| async move {
        // A unary server reads the whole request before answering.
        let _ = request.into_body().collect().await;
        if n < 2 {
            grpc_failure("14")
        } else {
            grpc_message_then("0")
        }
    })
    .await;
    let sidecar = grpc_sidecar(upstream.addr).await;
    let collected = unary(&sidecar).await;
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
    assert_eq!(upstream.requests(), 3);
}

#[tokio::test]
async fn a_grpc_answer_that_sent_a_message_is_never_retried() {
    let upstream =
        HttpUpstream::start(|_req: Request<Incoming>| async { grpc_message_then("14") }).await;
    let sidecar = grpc_sidecar(upstream.addr).await;
    let collected = unary(&sidecar).await;
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "14");
    assert_eq!(
        collected.to_bytes().len(),
        7,
        "the message reached the caller"
    );
    assert_eq!(upstream.requests(), 1);
}

/// A server stream that fails after its first message: the message went
/// to the caller, so the stream is not retried.
#[tokio::test]
async fn a_server_stream_failing_after_its_first_message_is_not_retried() {
    let upstream = GrpcUpstream::start().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  ocr: {{address: '{}', protocol: grpc, listen: '127.0.0.1:0'}}\n",
        upstream.addr
    ))
    .await;
    let mut client = breakwater::echo::echo_client::EchoClient::connect(format!(
        "http://{}",
        sidecar.upstream_addrs["ocr"]
    ))
    .await
    .unwrap();
    let mut request = tonic::Request::new(breakwater::echo::EchoRequest {
        payload: Bytes::from_static(b"page"),
        repeat: 1,
        interval_ms: 0,
    });
    request
        .metadata_mut()
        .insert("x-echo-status", "14".parse().unwrap());
    let mut stream = client.server_stream(request).await.unwrap().into_inner();
    assert!(stream.message().await.unwrap().is_some());
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn pushback_is_honoured_and_capped() {
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let log = arrivals.clone();
    let upstream = HttpUpstream::numbered(move |n, _req: Request<Incoming>| {
        log.lock().unwrap().push(Instant::now());
        async move {
            match n {
                0 => answer(429, &[("retry-after-ms", "1500")], ""),
                1 => answer(503, &[("retry-after", "3600")], ""),
                _ => answer(200, &[], "ok"),
            }
        }
    })
    .await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent:\n    address: '{}'\n    retry: {{on: [429, 503], backoff: {{base: 1ms, max: 5ms, max_pushback: 2s}}}}\n",
        upstream.addr
    ))
    .await;
    let (parts, _) = call(sidecar.proxy_addr, "agent", Method::GET, "/", "").await;
    assert_eq!(parts.status, StatusCode::OK);
    let at = arrivals.lock().unwrap().clone();
    let first = at[1] - at[0];
    let second = at[2] - at[1];
    assert!(
        first >= Duration::from_millis(1500) && first < Duration::from_millis(1600),
        "{first:?}"
    );
    assert!(
        second >= Duration::from_secs(2) && second < Duration::from_millis(2100),
        "capped: {second:?}"
    );
}

#[tokio::test]
async fn negative_grpc_pushback_means_do_not_retry() {
    let upstream = HttpUpstream::start(|_req: Request<Incoming>| async {
        let mut response = grpc_failure("14");
        response
            .headers_mut()
            .insert("grpc-retry-pushback-ms", "-1".parse().unwrap());
        response
    })
    .await;
    let sidecar = grpc_sidecar(upstream.addr).await;
    let collected = unary(&sidecar).await;
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "14");
    assert_eq!(upstream.requests(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_wait_past_the_deadline_fails_now_with_the_upstreams_answer() {
    let upstream = HttpUpstream::start(|_req: Request<Incoming>| async {
        answer(503, &[("retry-after", "5")], "come back later")
    })
    .await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent:\n    address: '{}'\n    timeout: 2s\n    retry: {{backoff: {{max_pushback: 10s}}}}\n",
        upstream.addr
    ))
    .await;
    let started = Instant::now();
    let (parts, body) = call(sidecar.proxy_addr, "agent", Method::GET, "/", "").await;
    assert_eq!(
        (parts.status, body),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Bytes::from("come back later")
        )
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "answered at once"
    );
    assert_eq!(upstream.requests(), 1);
}

#[tokio::test(start_paused = true)]
async fn hedging_sends_a_second_attempt_only_after_the_delay() {
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let log = arrivals.clone();
    let upstream = HttpUpstream::numbered(move |n, _req: Request<Incoming>| {
        log.lock().unwrap().push(Instant::now());
        async move {
            if n == 0 {
                tokio::time::sleep(Duration::from_secs(30)).await;
                answer(200, &[], "slow")
            } else {
                answer(200, &[], "fast")
            }
        }
    })
    .await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent:\n    address: '{}'\n    hedge: {{delay: 200ms}}\n",
        upstream.addr
    ))
    .await;
    let started = Instant::now();
    let (parts, body) = call(sidecar.proxy_addr, "agent", Method::GET, "/", "").await;
    assert_eq!((parts.status, body), (StatusCode::OK, Bytes::from("fast")));
    let at = arrivals.lock().unwrap().clone();
    assert_eq!(at.len(), 2);
    assert!(
        at[1] - at[0] >= Duration::from_millis(200),
        "hedged before the delay"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(
        metric_value(
            sidecar.admin_addr,
            "breakwater_hedges_total{upstream=\"agent\"}"
        )
        .await,
        1.0
    );

    // An answer within the delay: no hedge.
    let quick = HttpUpstream::start(|_req: Request<Incoming>| async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        answer(200, &[], "in time")
    })
    .await;
    let sidecar = support::sidecar(&format!(
        "upstreams:\n  agent:\n    address: '{}'\n    hedge: {{delay: 200ms}}\n",
        quick.addr
    ))
    .await;
    call(sidecar.proxy_addr, "agent", Method::GET, "/", "").await;
    assert_eq!(quick.requests(), 1);
}

#[tokio::test]
async fn post_requests_are_not_hedged() {
    let upstream = HttpUpstream::start(|_req: Request<Incoming>| async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        answer(200, &[], "done")
    })
    .await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent:\n    address: '{}'\n    hedge: {{delay: 10ms}}\n",
        upstream.addr
    ))
    .await;
    call(sidecar.proxy_addr, "agent", Method::POST, "/", "x").await;
    assert_eq!(upstream.requests(), 1);
}

/// An HTTP/2 upstream (the h2 crate, no hyper) that refuses its first
/// `refusals` streams with `REFUSED_STREAM` and answers 200 after.
async fn refusing(refusals: usize) -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        let mut streams = 0;
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            let mut connection = h2::server::handshake(socket).await.unwrap();
            while let Some(Ok((request, mut respond))) = connection.accept().await {
                streams += 1;
                if streams <= refusals {
                    log.lock().unwrap().push("refused".into());
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                    continue;
                }
                // Read the body, as a service that processes the call does.
                let mut body = request.into_body();
                let mut received = Vec::new();
                while let Some(Ok(chunk)) = body.data().await {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    received.extend_from_slice(&chunk);
                }
                log.lock()
                    .unwrap()
                    .push(format!("served {}", String::from_utf8_lossy(&received)));
                let response = http::Response::new(());
                let mut send = respond.send_response(response, false).unwrap();
                send.send_data(Bytes::from_static(b"ok"), true).unwrap();
            }
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn a_refused_stream_is_retried_even_for_post() {
    let (addr, seen) = refusing(1).await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent:\n    address: '{addr}'\n    protocol: http2\n    retry: {{backoff: {{base: 1ms}}, on: [refused-stream]}}\n"
    ))
    .await;
    // POST without an idempotency key: only a failure that proves the
    // upstream never processed the request may be retried, and a refused
    // stream is one.
    let (parts, body) = call(sidecar.proxy_addr, "agent", Method::POST, "/orders", "po-9").await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(body, "ok");
    assert_eq!(*seen.lock().unwrap(), ["refused", "served po-9"]);
    let retries = metric_value(
        sidecar.admin_addr,
        "breakwater_retries_total{upstream=\"agent\",reason=\"refused-stream\"}",
    )
    .await;
    assert_eq!(retries, 1.0);

    // Without retries the refusal reaches the caller as such.
    let (addr, _) = refusing(1).await;
    let single = support::sidecar(&format!(
        "upstreams:\n  agent: {{address: '{addr}', protocol: http2, retry: {{max_attempts: 1}}}}\n"
    ))
    .await;
    let (parts, _) = call(single.proxy_addr, "agent", Method::GET, "/", "").await;
    assert_eq!(parts.status, StatusCode::BAD_GATEWAY);
    assert_eq!(parts.headers["x-breakwater-error"], "refused-stream");
}
