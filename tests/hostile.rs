//! Hostile and broken callers: what the caller breaks is answered to the
//! caller, and never counted against the upstream. Raw sockets send what
//! no well-behaved client library would.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use breakwater::body::{self, BoxError};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An upstream that reads each request's body whole (whatever becomes
/// of it) and answers 200 with the bytes it got.
async fn reader() -> HttpUpstream {
    HttpUpstream::start(|request: Request<Incoming>| async move {
        let got = match request.into_body().collect().await {
            Ok(body) => body.to_bytes(),
            Err(_) => Bytes::from_static(b"broken"),
        };
        Response::new(body::full(got))
    })
    .await
}

const POLICY: &str = "    listen: 127.0.0.1:0\n    circuit_breaker: {consecutive_failures: 2, failure_rate: {min_calls: 2, window: 4}}\n";

/// A chunked body whose second chunk size is not a number.
const MALFORMED: &[u8] =
    b"POST /upload HTTP/1.1\r\nHost: u\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n";
/// A body of 10 bytes that declares 100.
const SHORT: &[u8] = b"POST /upload HTTP/1.1\r\nHost: u\r\nContent-Length: 100\r\n\r\nonly ten b";

/// Writes `request` on a new connection to `addr` (then, if
/// `close_write`, ends the caller's side) and reads the answer until the
/// sidecar closes the connection, for 10 s at most.
async fn raw(addr: SocketAddr, request: &[u8], close_write: bool) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    if close_write {
        stream.shutdown().await.unwrap();
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

async fn circuit(sidecar: &breakwater::sidecar::Sidecar) -> serde_json::Value {
    admin_json(sidecar.admin_addr, "/circuits").await["u"].clone()
}

#[tokio::test]
async fn a_callers_broken_body_is_answered_400_and_never_counted_against_the_upstream() {
    let upstream = reader().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  u:\n    address: '{}'\n{POLICY}",
        upstream.addr
    ))
    .await;
    let addr = sidecar.upstream_addrs["u"];
    // A malformed chunk size, four times: twice the breaker's limit.
    for _ in 0..4 {
        let answer = raw(addr, MALFORMED, false).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(
            answer.contains("x-breakwater-error: request-body"),
            "{answer}"
        );
    }
    // An upload the caller gave up on: fewer bytes than it declared.
    for _ in 0..4 {
        raw(addr, SHORT, true).await;
    }
    let circuit = circuit(&sidecar).await;
    assert_eq!(circuit["state"], "closed", "{circuit}");
    assert_eq!(circuit["consecutive_failures"], 0, "{circuit}");
    assert_eq!(circuit["window_failures"], 0, "{circuit}");
    let rejected = "breakwater_requests_total{upstream=\"u\",outcome=\"rejected\"}";
    let failed = "breakwater_requests_total{upstream=\"u\",outcome=\"failure\"}";
    let rejected = metric_value(sidecar.admin_addr, rejected).await;
    assert!(
        (4.0..=8.0).contains(&rejected),
        "the malformed bodies, and the aborted ones still waited for: {rejected}"
    );
    assert_eq!(metric_value(sidecar.admin_addr, failed).await, 0.0);
    let (parts, body) = call(addr, "u", http::Method::POST, "/ok", "whole").await;
    assert_eq!((parts.status.as_u16(), &body[..]), (200, &b"whole"[..]));
}

#[tokio::test]
async fn a_request_body_that_stalls_is_cut_with_408_and_not_counted() {
    let upstream = reader().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  u:\n    address: '{}'\n    stream_idle_timeout: 200ms\n{POLICY}",
        upstream.addr
    ))
    .await;
    let addr = sidecar.upstream_addrs["u"];
    for _ in 0..3 {
        let started = tokio::time::Instant::now();
        let answer = raw(
            addr,
            b"POST /upload HTTP/1.1\r\nHost: u\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            false,
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(
            answer.contains("x-breakwater-error: request-idle-timeout"),
            "{answer}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "cut by the idle timeout, not by the call's"
        );
    }
    let circuit = circuit(&sidecar).await;
    assert_eq!(circuit["consecutive_failures"], 0, "{circuit}");
    assert_eq!(circuit["window_failures"], 0, "{circuit}");
    let rejected = "breakwater_requests_total{upstream=\"u\",outcome=\"rejected\"}";
    assert_eq!(metric_value(sidecar.admin_addr, rejected).await, 3.0);
}

#[tokio::test]
async fn a_broken_body_is_not_degraded_nor_failed_over() {
    let upstream = reader().await;
    let other = reader().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  u:\n    address: '{}'\n    failover: [v]\n    criticality: optional\n    fallback: {{body: 'fallback'}}\n    stream_idle_timeout: 200ms\n{POLICY}  v:\n    address: '{}'\n",
        upstream.addr, other.addr
    ))
    .await;
    let addr = sidecar.upstream_addrs["u"];
    let broken = raw(addr, MALFORMED, false).await;
    assert!(broken.starts_with("HTTP/1.1 400"), "{broken}");
    let stalled = raw(addr, SHORT, false).await;
    assert!(stalled.starts_with("HTTP/1.1 408"), "{stalled}");
    assert_eq!(
        upstream.requests() + other.requests(),
        0,
        "the body is read whole before any upstream"
    );
    let admin = sidecar.admin_addr;
    let rejected = "breakwater_requests_total{upstream=\"u\",outcome=\"rejected\"}";
    assert_eq!(metric_value(admin, rejected).await, 2.0);
    let degraded = "breakwater_requests_total{upstream=\"u\",outcome=\"degraded\"}";
    assert_eq!(metric_value(admin, degraded).await, 0.0);
    assert_eq!(
        metric(admin, "breakwater_failovers_total{upstream=\"u\",to=\"v\"}").await,
        None,
        "no failover was tried"
    );
}

/// An upstream that accepts connections and never answers.
async fn hung() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    (addr, task)
}

#[tokio::test]
async fn an_upstream_that_never_answers_opens_the_circuit_on_the_calls_timeout() {
    let (addr, _hung) = hung().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  u:\n    address: '{addr}'\n    timeout: 100ms\n    retry: {{max_attempts: 1}}\n    circuit_breaker: {{consecutive_failures: 3}}\n    listen: 127.0.0.1:0\n"
    ))
    .await;
    let port = sidecar.upstream_addrs["u"];
    // The caller's own deadline, shorter than the policy's, is the
    // caller's business: it never counts against the upstream.
    for _ in 0..3 {
        let request = Request::get(format!("http://{port}/"))
            .header("x-breakwater-deadline-ms", "20")
            .body(body::empty())
            .unwrap();
        let (parts, _) = read_body(http1_client().request(request).await.unwrap()).await;
        assert_eq!(parts.status, 504);
        assert_eq!(parts.headers["x-breakwater-error"], "deadline-exceeded");
    }
    assert_eq!(circuit(&sidecar).await["consecutive_failures"], 0);
    for i in 1..=3 {
        let (parts, _) = call(port, "u", http::Method::GET, "/", "").await;
        assert_eq!(parts.status, 504);
        if i < 3 {
            assert_eq!(circuit(&sidecar).await["consecutive_failures"], i);
        }
    }
    let circuit = circuit(&sidecar).await;
    assert_eq!(circuit["state"], "open", "{circuit}");
    let (parts, _) = call(port, "u", http::Method::GET, "/", "").await;
    assert_eq!(parts.headers["x-breakwater-error"], "circuit-open");
}

/// An HTTP/1.1 upstream that reads each request's head only, writes
/// `answer` and closes the connection.
async fn answers_at_once(answer: &'static [u8]) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).await.unwrap_or(0) == 1
                {
                    head.push(byte[0]);
                }
                let _ = stream.write_all(answer).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_answer_shorter_than_declared_is_a_broken_stream_for_the_breaker() {
    let sidecar = sidecar(&format!(
        "upstreams:\n  u:\n    address: '{}'\n{POLICY}",
        answers_at_once(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b").await
    ))
    .await;
    let port = sidecar.upstream_addrs["u"];
    for i in 1..=2 {
        let response = get(port, "u", "/").await;
        assert_eq!(response.status(), 200, "the headers went before the cut");
        assert!(
            response.into_body().collect().await.is_err(),
            "the caller sees the body cut short, never a complete one"
        );
        let series = "breakwater_broken_streams_total{upstream=\"u\",kind=\"truncated\"}";
        assert_eq!(metric_value(sidecar.admin_addr, series).await, f64::from(i));
    }
    let circuit = circuit(&sidecar).await;
    assert_eq!(circuit["state"], "open", "{circuit}");
}

/// A gRPC answer of `messages` frames and no status.
fn grpc_answer(messages: usize) -> Response<body::Body> {
    let frames: Vec<Result<Frame<Bytes>, BoxError>> = (0..messages)
        .map(|_| Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))))
        .collect();
    let mut response = Response::new(body::boxed(http_body_util::StreamBody::new(
        tokio_stream::iter(frames),
    )));
    response
        .headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    response
}

/// The frames of a gRPC call through the sidecar's port for `u`: data
/// frames counted, then the trailers.
async fn grpc_call(port: SocketAddr) -> (usize, http::HeaderMap) {
    let mut sender = h2_connect(port).await;
    let request = Request::post("http://u/echo.v1.Echo/Stream")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body::full(Bytes::from_static(b"\0\0\0\0\x02hi")))
        .unwrap();
    let mut body = sender.send_request(request).await.unwrap().into_body();
    let mut messages = 0;
    loop {
        let frame = body
            .frame()
            .await
            .expect("trailers before the end")
            .unwrap();
        match frame.into_trailers() {
            Ok(trailers) => return (messages, trailers),
            Err(_) => messages += 1,
        }
    }
}

#[tokio::test]
async fn a_grpc_stream_the_upstream_broke_or_left_without_status_ends_unavailable() {
    // The reset waits until the caller has read the messages before it:
    // a reset stream's unread data is dropped.
    let fail = Arc::new(tokio::sync::Notify::new());
    let notified = fail.clone();
    let upstream = HttpUpstream::start(move |request: Request<Incoming>| {
        let fail = notified.clone();
        async move {
            if request.uri().query() != Some("reset") {
                return grpc_answer(2);
            }
            let messages = futures_util::stream::unfold(0, move |i| {
                let fail = fail.clone();
                async move {
                    if i == 3 {
                        fail.notified().await;
                        return Some((
                            Err::<Frame<Bytes>, BoxError>("the server fell over".into()),
                            4,
                        ));
                    }
                    (i < 3).then(|| {
                        (
                            Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))),
                            i + 1,
                        )
                    })
                }
            });
            let mut response = grpc_answer(0);
            *response.body_mut() = body::boxed(http_body_util::StreamBody::new(messages));
            response
        }
    })
    .await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  u:\n    address: '{}'\n    protocol: grpc\n    retry: {{max_attempts: 1}}\n    listen: 127.0.0.1:0\n",
        upstream.addr
    ))
    .await;
    let port = sidecar.upstream_addrs["u"];
    let mut sender = h2_connect(port).await;
    let request = Request::post("http://u/echo.v1.Echo/Stream?reset")
        .header("content-type", "application/grpc")
        .body(body::full(Bytes::from_static(b"\0\0\0\0\x02hi")))
        .unwrap();
    let mut answer = sender.send_request(request).await.unwrap().into_body();
    let mut messages = 0;
    let trailers = loop {
        if messages == 3 {
            fail.notify_one();
        }
        match answer
            .frame()
            .await
            .expect("trailers")
            .unwrap()
            .into_trailers()
        {
            Ok(trailers) => break trailers,
            Err(_) => messages += 1,
        }
    };
    assert_eq!(messages, 3, "what came before the break is passed on");
    assert_eq!(trailers["grpc-status"], "14", "{trailers:?}");
    assert_eq!(trailers["x-breakwater-error"], "truncated");
    let (messages, trailers) = grpc_call(port).await;
    assert_eq!(messages, 2);
    assert_eq!(trailers["grpc-status"], "14", "{trailers:?}");
    let admin = sidecar.admin_addr;
    for kind in ["truncated", "no-status"] {
        let series = format!("breakwater_broken_streams_total{{upstream=\"u\",kind=\"{kind}\"}}");
        assert_eq!(metric_value(admin, &series).await, 1.0, "{kind}");
    }
    assert_eq!(circuit(&sidecar).await["consecutive_failures"], 2);
}

/// Uploads 4 MiB three times to `u`, each answered 413 "too large",
/// none counted by the circuit.
async fn three_uploads_answered_413(sidecar: &breakwater::sidecar::Sidecar) {
    let port = sidecar.upstream_addrs["u"];
    for _ in 0..3 {
        let (parts, body) = call(
            port,
            "u",
            http::Method::POST,
            "/upload",
            vec![b'x'; 4 << 20],
        )
        .await;
        assert_eq!((parts.status.as_u16(), &body[..]), (413, &b"too large"[..]));
    }
    let circuit = circuit(sidecar).await;
    assert_eq!(circuit["consecutive_failures"], 0, "{circuit}");
    assert_eq!(circuit["window_failures"], 0, "{circuit}");
}

#[tokio::test]
async fn an_early_answer_before_the_body_was_read_reaches_the_caller() {
    let sidecar = sidecar(&format!(
        "upstreams:\n  u:\n    address: '{}'\n{POLICY}",
        answers_at_once(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large").await
    ))
    .await;
    three_uploads_answered_413(&sidecar).await;
}

/// The same over HTTP/2: the upstream answers 413 at once and resets the
/// request's stream with `NO_ERROR` (RFC 9113 §8.1), which ends the upload
/// but not the answer.
#[tokio::test]
async fn an_http2_upstreams_early_answer_and_no_error_reset_reach_the_caller() {
    let upstream = HttpUpstream::start(|_| async {
        answer(413, &[("content-type", "text/plain")], "too large")
    })
    .await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  u:\n    address: '{}'\n    protocol: http2\n{POLICY}",
        upstream.addr
    ))
    .await;
    three_uploads_answered_413(&sidecar).await;
    assert_eq!(upstream.requests(), 3, "one attempt each, none retried");
}

/// A flood of connections that never send a byte, against a sidecar
/// process whose open-file limit is 256 (hard and soft, set in its own
/// shell): each is closed after the header-read timeout, accepting waits
/// for a free slot instead of failing, and a good client is answered
/// every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_connections_leaves_a_good_client_answered() {
    let upstream = reader().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policies.yaml");
    std::fs::write(
        &file,
        format!(
            "admin: {{listen: 127.0.0.1:0}}\nproxy: {{listen: 127.0.0.1:0, header_read_timeout: 1s}}\nupstreams:\n  u: {{address: '{}'}}\n",
            upstream.addr
        ),
    )
    .unwrap();
    let mut command = std::process::Command::new("sh");
    command
        .args([
            "-c",
            "ulimit -n 256 && exec \"$0\" --log-format json sidecar --config \"$1\"",
        ])
        .arg(env!("CARGO_BIN_EXE_breakwater"))
        .arg(&file);
    let (_process, ready) = support::Logged::start(command, "sidecar ready");
    let proxy: SocketAddr = ready["proxy"].as_str().unwrap().parse().unwrap();
    let admin: SocketAddr = ready["admin"].as_str().unwrap().parse().unwrap();
    let readyz = |admin| async move {
        let response = get(admin, "admin", "/readyz").await;
        read_body(response).await.1
    };
    let detail = readyz(admin).await;
    assert_eq!(
        String::from_utf8_lossy(&detail),
        "ready\nopen files limit: 256\ncaller connections: 0 of 128\n"
    );

    // More than the descriptors allow, and more than the 128 slots and the
    // kernel's queue behind them hold at once: the later ones connect as
    // the earlier ones are closed.
    let connecting: Vec<_> = (0..300)
        .map(|_| {
            tokio::spawn(tokio::time::timeout(
                Duration::from_secs(20),
                TcpStream::connect(proxy),
            ))
        })
        .collect();
    let mut silent = Vec::new();
    for connect in connecting {
        silent.push(connect.await.unwrap().expect("connected in time").unwrap());
    }
    let client = http1_client();
    for i in 0..20 {
        let request = request_to(proxy, "u", http::Method::POST, "/", format!("call {i}"));
        let response = tokio::time::timeout(Duration::from_secs(20), client.request(request))
            .await
            .unwrap_or_else(|_| panic!("call {i} was not answered"))
            .unwrap();
        let (parts, body) = read_body(response).await;
        assert_eq!(parts.status, 200);
        assert_eq!(body, format!("call {i}"));
    }
    // Every silent connection was closed by the sidecar.
    for mut stream in silent {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "closed: {read:?}");
    }
}

/// An upstream answering every request with `chunks` chunks of 16 KiB,
/// each ready at once: as fast as the caller reads.
async fn streams(chunks: usize) -> HttpUpstream {
    HttpUpstream::start(move |_| async move {
        let frames =
            (0..chunks).map(|_| Ok::<_, BoxError>(Frame::data(Bytes::from(vec![b'x'; 16 << 10]))));
        Response::new(body::boxed(http_body_util::StreamBody::new(
            tokio_stream::iter(frames),
        )))
    })
    .await
}

/// An HTTP/2 connection to `addr` whose streams start with a window of
/// `window` bytes.
async fn h2_windowed(addr: SocketAddr, window: u32) -> h2::client::SendRequest<Bytes> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake(stream)
        .await
        .unwrap();
    tokio::spawn(connection);
    send.ready().await.unwrap()
}

/// A sidecar with 4 slots for `u`, answering 8 chunks, `extra` policy.
async fn four_slots(upstream: &HttpUpstream, extra: &str) -> breakwater::sidecar::Sidecar {
    sidecar(&format!(
        "upstreams:\n  u:\n    address: '{}'\n    listen: 127.0.0.1:0\n    max_concurrent_requests: 4\n    stream_idle_timeout: 500ms\n{extra}",
        upstream.addr
    ))
    .await
}

/// Opens `n` streams on a connection with a window of 0: the answers'
/// heads, their bodies never read.
async fn unread(port: SocketAddr, n: usize) -> Vec<http::Response<h2::RecvStream>> {
    let mut stalled = h2_windowed(port, 0).await;
    let mut answers = Vec::new();
    for _ in 0..n {
        let request = Request::get("http://u/stream").body(()).unwrap();
        let (response, _) = stalled.send_request(request, true).unwrap();
        answers.push(response.await.unwrap());
    }
    answers
}

/// One connection opens every slot's worth of streams and reads none
/// (a window of 0): it gets its share of the slots (half, by default) and
/// the rest of its calls are shed at once, a good caller is answered
/// while it holds them, its streams are reset after
/// `stream_idle_timeout`, a caller that reads slowly but steadily is never
/// cut, and the upstream's circuit hears of none of it.
#[tokio::test]
async fn a_caller_that_reads_nothing_holds_only_its_share_and_is_cut() {
    let upstream = streams(8).await;
    let sidecar = four_slots(&upstream, "").await;
    let port = sidecar.upstream_addrs["u"];
    let admin = sidecar.admin_addr;
    let cuts = "breakwater_timeouts_total{upstream=\"u\",kind=\"caller-idle\"}";

    let mut held = Vec::new();
    let mut shed = 0;
    for response in unread(port, 4).await {
        match response.status().as_u16() {
            200 => held.push(response.into_body()),
            503 => {
                assert_eq!(response.headers()["x-breakwater-error"], "overloaded");
                shed += 1;
            }
            other => panic!("answered {other}"),
        }
    }
    assert_eq!((held.len(), shed), (2, 2), "half the slots, the rest shed");
    // Two slots are left for everyone else, while the two are held.
    for _ in 0..3 {
        let (parts, answer) = call(port, "u", http::Method::GET, "/", Bytes::new()).await;
        assert_eq!((parts.status.as_u16(), answer.len()), (200, 8 * (16 << 10)));
    }
    assert_eq!(
        metric_value(admin, cuts).await,
        0.0,
        "answered before any cut"
    );
    for mut body in held {
        let error = tokio::time::timeout(Duration::from_secs(10), body.data())
            .await
            .expect("cut in time")
            .expect("a reset, not an end")
            .unwrap_err();
        assert_eq!(error.reason(), Some(h2::Reason::CANCEL), "{error}");
    }
    assert_eq!(metric_value(admin, cuts).await, 2.0);
    let series = "breakwater_shed_total{upstream=\"u\"}";
    assert_eq!(metric_value(admin, series).await, 2.0);

    // 16 KiB at a time, one every 200 ms: slow, but never 500 ms late.
    let mut slow = h2_windowed(port, 16 << 10).await;
    let request = Request::get("http://u/stream").body(()).unwrap();
    let (response, _) = slow.send_request(request, true).unwrap();
    let mut body = response.await.unwrap().into_body();
    let mut got = 0;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("never cut");
        got += chunk.len();
        tokio::time::sleep(Duration::from_millis(200)).await;
        body.flow_control().release_capacity(chunk.len()).unwrap();
    }
    assert_eq!(got, 8 * (16 << 10));
    assert_eq!(metric_value(admin, cuts).await, 2.0);
    let circuit = circuit(&sidecar).await;
    assert_eq!(circuit["consecutive_failures"], 0, "{circuit}");
    assert_eq!(circuit["window_failures"], 0, "{circuit}");
}

/// With the whole share (`max_connection_share: 1`), one connection
/// that reads nothing may hold every slot; a good caller waits in the
/// queue and is answered once the stalled streams are cut.
#[tokio::test]
async fn a_good_caller_queued_behind_stalled_streams_is_answered_once_they_are_cut() {
    let upstream = streams(8).await;
    let sidecar = four_slots(&upstream, "    max_connection_share: 1\n").await;
    let port = sidecar.upstream_addrs["u"];
    let held = unread(port, 4).await;
    assert!(held.iter().all(|r| r.status() == 200), "every slot taken");
    let good = tokio::spawn(call(port, "u", http::Method::GET, "/", Bytes::new()));
    let (parts, answer) = tokio::time::timeout(Duration::from_secs(10), good)
        .await
        .expect("answered once a slot came free")
        .unwrap();
    assert_eq!((parts.status.as_u16(), answer.len()), (200, 8 * (16 << 10)));
    let series = "breakwater_timeouts_total{upstream=\"u\",kind=\"caller-idle\"}";
    assert!(metric_value(sidecar.admin_addr, series).await >= 1.0);
    drop(held);
}

/// An HTTP/1.1 caller that stops reading a large answer has its
/// connection closed after `stream_idle_timeout`, and the slot it held
/// goes to the next caller.
#[tokio::test]
async fn an_http1_caller_that_stops_reading_is_closed_and_frees_its_slot() {
    // 32 MiB: more than the sockets between can hold.
    let upstream = streams(2048).await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  u:\n    address: '{}'\n    listen: 127.0.0.1:0\n    max_concurrent_requests: 1\n    stream_idle_timeout: 500ms\n",
        upstream.addr
    ))
    .await;
    let port = sidecar.upstream_addrs["u"];
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(port).await.unwrap();
    stalled
        .write_all(b"GET /big HTTP/1.1\r\nHost: u\r\n\r\n")
        .await
        .unwrap();
    let series = "breakwater_timeouts_total{upstream=\"u\",kind=\"caller-idle\"}";
    let admin = sidecar.admin_addr;
    eventually(
        Duration::from_secs(10),
        "the stalled caller cut",
        || async move { (metric(admin, series).await == Some(1.0)).then_some(()) },
    )
    .await;
    // What the sockets held, then the end: never the whole answer.
    let mut read = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut read)).await;
    assert!(
        read.len() < 2048 * (16 << 10),
        "cut after {} bytes",
        read.len()
    );
    let response = tokio::time::timeout(Duration::from_secs(10), get(port, "u", "/"))
        .await
        .expect("the slot came free");
    assert_eq!(response.status(), 200);
    let circuit = circuit(&sidecar).await;
    assert_eq!(circuit["consecutive_failures"], 0, "{circuit}");
}

/// A request at the limit of 100 header fields is accepted by the sidecar,
/// which then adds its deadline header: rather than send 101 for the
/// upstream to refuse, the sidecar answers 431 itself and says why. One
/// field fewer leaves room, and is sent.
#[tokio::test]
async fn a_request_the_sidecars_own_headers_would_push_over_the_limit_is_answered_431() {
    let upstream = reader().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  u:\n    address: '{}'\n{POLICY}",
        upstream.addr
    ))
    .await;
    let port = sidecar.upstream_addrs["u"];
    // `fields` header fields in all, `Host` the first.
    let send = |fields: usize| async move {
        let mut request = request_to(port, "u", http::Method::GET, "/", Bytes::new());
        for i in 1..fields {
            let name = http::HeaderName::try_from(format!("x-field-{i}")).unwrap();
            request.headers_mut().insert(name, "v".parse().unwrap());
        }
        read_body(http1_client().request(request).await.unwrap()).await
    };
    let (parts, body) = send(100).await;
    assert_eq!(parts.status, 431);
    assert_eq!(parts.headers["x-breakwater-error"], "request-headers");
    let message = String::from_utf8_lossy(&body);
    assert!(message.contains("101 header fields"), "{message}");
    assert_eq!(upstream.requests(), 0, "never sent");
    let (parts, _) = send(99).await;
    assert_eq!(parts.status, 200);
    assert_eq!(upstream.requests(), 1);
    let circuit = circuit(&sidecar).await;
    assert_eq!(circuit["consecutive_failures"], 0, "{circuit}");
}

/// An HTTP/2 caller connection with no call open for `proxy.idle_timeout`
/// is sent a GOAWAY and closed, though it answers every ping; one with a
/// call open is not, however long the call takes.
#[tokio::test]
async fn an_idle_http2_connection_is_closed_and_a_busy_one_is_not() {
    // `/slow` streams 10 chunks 100 ms apart: a call of a second.
    let upstream = HttpUpstream::start(|request: Request<Incoming>| async move {
        if request.uri().path() != "/slow" {
            return Response::new(body::full("quick"));
        }
        let chunks = futures_util::stream::unfold(0, |i| async move {
            (i < 10).then_some(())?;
            tokio::time::sleep(Duration::from_millis(100)).await;
            Some((
                Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"chunk"))),
                i + 1,
            ))
        });
        Response::new(body::boxed(http_body_util::StreamBody::new(chunks)))
    })
    .await;
    let sidecar = sidecar(&format!(
        "proxy: {{listen: 127.0.0.1:0, idle_timeout: 300ms}}\nupstreams:\n  u:\n    address: '{}'\n    listen: 127.0.0.1:0\n",
        upstream.addr
    ))
    .await;
    let port = sidecar.upstream_addrs["u"];
    let connect = || async move {
        let stream = TcpStream::connect(port).await.unwrap();
        let (send, connection) = h2::client::handshake(stream).await.unwrap();
        (send.ready().await.unwrap(), tokio::spawn(connection))
    };
    let get = |send: &mut h2::client::SendRequest<Bytes>, path: &str| {
        let request = Request::get(format!("http://u{path}")).body(()).unwrap();
        send.send_request(request, true).unwrap().0
    };
    let read = |mut body: h2::RecvStream| async move {
        let mut got = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            body.flow_control().release_capacity(chunk.len()).unwrap();
            got.extend_from_slice(&chunk);
        }
        got
    };

    let (mut send, connection) = connect().await;
    let answer = get(&mut send, "/").await.unwrap();
    assert_eq!(read(answer.into_body()).await, b"quick");
    let idle = tokio::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the idle connection was closed");
    assert!(ended.unwrap().is_ok(), "a GOAWAY, not a reset");
    assert!(idle.elapsed() >= Duration::from_millis(300));

    let (mut send, connection) = connect().await;
    let answer = get(&mut send, "/slow").await.unwrap();
    assert_eq!(read(answer.into_body()).await, b"chunk".repeat(10));
    assert!(!connection.is_finished(), "open while its call was");
    tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("closed once idle")
        .unwrap()
        .unwrap();
}
