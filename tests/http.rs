//! HTTP/1.1 and h2c pass-through against real in-process upstreams.

mod support;

use std::time::Duration;

use breakwater::body;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use support::*;
use tokio::sync::{mpsc, oneshot};

#[tokio::test]
async fn routes_by_host_and_passes_requests_through() {
    let upstream = HttpUpstream::echo().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent:\n    address: {}\n    hosts: [agent.internal]\n",
        upstream.addr
    ))
    .await;
    for host in ["agent", "agent.internal:15001", "AGENT"] {
        let (parts, body) = call(
            sidecar.proxy_addr,
            host,
            Method::POST,
            "/v1/run?x=1",
            "hello",
        )
        .await;
        assert_eq!(parts.status, StatusCode::OK, "host {host}");
        assert_eq!(body, "hello");
    }
    let seen = upstream.last_seen();
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.uri, "/v1/run?x=1");
    assert_eq!(
        seen.headers["host"],
        upstream.addr.to_string(),
        "Host is set for the upstream"
    );
    assert_eq!(upstream.requests(), 3);
    assert_eq!(
        upstream
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "keep-alive pool reuses one connection"
    );
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded_either_way() {
    let upstream = HttpUpstream::start(|_req: Request<Incoming>| async {
        Response::builder()
            .header("connection", "x-upstream-hop")
            .header("x-upstream-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("x-upstream-end", "kept")
            .body(body::empty())
            .unwrap()
    })
    .await;
    let sidecar = sidecar_for(upstream.addr).await;
    let mut request = request_to(sidecar.proxy_addr, "agent", Method::GET, "/", "");
    let headers = request.headers_mut();
    headers.insert("connection", "x-session".parse().unwrap());
    headers.insert("x-session", "secret".parse().unwrap());
    headers.insert("keep-alive", "timeout=5".parse().unwrap());
    headers.insert("proxy-authorization", "Basic eA==".parse().unwrap());
    headers.insert("upgrade", "websocket".parse().unwrap());
    headers.insert("x-end-to-end", "kept".parse().unwrap());
    let response = http1_client().request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().get("x-upstream-hop").is_none());
    assert!(response.headers().get("keep-alive").is_none());
    assert_eq!(response.headers()["x-upstream-end"], "kept");
    let seen = upstream.last_seen();
    for hop in ["x-session", "keep-alive", "proxy-authorization", "upgrade"] {
        assert!(seen.headers.get(hop).is_none(), "{hop} was forwarded");
    }
    assert_eq!(seen.headers["x-end-to-end"], "kept");
}

#[tokio::test]
async fn absolute_form_targets_route_like_http_proxy() {
    let upstream = HttpUpstream::echo().await;
    let sidecar = sidecar_for(upstream.addr).await;
    let mut conn = h1_connect(sidecar.proxy_addr).await;
    let request = Request::get("http://agent/status")
        .body(body::empty())
        .unwrap();
    let response = conn.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        upstream.last_seen().uri,
        "/status",
        "origin-form towards the upstream"
    );
    // The upstream's own address routes too.
    let request = Request::get(format!("http://{}/direct", upstream.addr))
        .body(body::empty())
        .unwrap();
    let response = conn.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(upstream.last_seen().uri, "/direct");
}

#[tokio::test]
async fn unknown_hosts_get_404_and_are_never_proxied() {
    let upstream = HttpUpstream::echo().await;
    let sidecar = sidecar_for(upstream.addr).await;
    let (parts, body) = call(sidecar.proxy_addr, "example.com", Method::GET, "/", "").await;
    assert_eq!(parts.status, StatusCode::NOT_FOUND);
    assert_eq!(parts.headers["x-breakwater-error"], "unknown-host");
    assert_eq!(body, "no upstream is configured for host \"example.com\"\n");
    let mut conn = h1_connect(sidecar.proxy_addr).await;
    let response = conn
        .send_request(
            Request::get("http://example.com/")
                .body(body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(upstream.requests(), 0);
}

#[tokio::test]
async fn unreachable_upstream_answers_502_with_a_reason() {
    let closed = closed_port().await;
    let sidecar = sidecar(&format!("upstreams:\n  gone: {{address: '{closed}'}}\n")).await;
    let (parts, body) = call(sidecar.proxy_addr, "gone", Method::GET, "/", "").await;
    assert_eq!(parts.status, StatusCode::BAD_GATEWAY);
    assert_eq!(parts.headers["x-breakwater-error"], "connect-failure");
    let body = String::from_utf8(body.to_vec()).unwrap();
    assert!(
        body.starts_with("cannot connect to upstream gone:"),
        "{body}"
    );
}

#[tokio::test]
async fn dedicated_port_sends_everything_to_its_upstream() {
    let upstream = HttpUpstream::echo().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent: {{address: '{}', listen: '127.0.0.1:0'}}\n",
        upstream.addr
    ))
    .await;
    let port = sidecar.upstream_addrs["agent"];
    let (parts, body) = call(port, "anything.example", Method::PUT, "/x", "body").await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(body, "body");
    assert_eq!(upstream.last_seen().method, Method::PUT);
}

/// A request body is streamed: the upstream sees the first chunk before the
/// caller has sent the second.
#[tokio::test]
async fn request_bodies_stream_without_buffering() {
    let (first_tx, first_rx) = mpsc::unbounded_channel::<Bytes>();
    let first_tx = std::sync::Mutex::new(Some(first_tx));
    let upstream = HttpUpstream::start(move |request: Request<Incoming>| {
        let tx = first_tx.lock().unwrap().take();
        async move {
            let mut body = request.into_body();
            let mut total = 0usize;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    if total == 0
                        && let Some(tx) = &tx
                    {
                        tx.send(data.clone()).unwrap();
                    }
                    total += data.len();
                }
            }
            Response::new(body::full(total.to_string()))
        }
    })
    .await;
    let sidecar = sidecar_for(upstream.addr).await;

    let (chunks_tx, chunks_rx) =
        mpsc::channel::<Result<Frame<Bytes>, breakwater::body::BoxError>>(1);
    let stream = tokio_stream::wrappers::ReceiverStream::new(chunks_rx);
    let request = Request::post(format!("http://{}/upload", sidecar.proxy_addr))
        .header("host", "agent")
        .body(body::boxed(StreamBody::new(stream)))
        .unwrap();
    let client = http1_client();
    let answer = tokio::spawn(async move { client.request(request).await.unwrap() });

    let chunk = Bytes::from(vec![7u8; 1 << 20]);
    chunks_tx
        .send(Ok(Frame::data(chunk.clone())))
        .await
        .unwrap();
    let mut first_rx = first_rx;
    let first = tokio::time::timeout(Duration::from_secs(10), first_rx.recv())
        .await
        .expect("the upstream saw the first chunk while the body was still open")
        .unwrap();
    assert!(!first.is_empty());
    for _ in 0..15 {
        chunks_tx
            .send(Ok(Frame::data(chunk.clone())))
            .await
            .unwrap();
    }
    drop(chunks_tx);
    let (parts, body) = read_body(answer.await.unwrap()).await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(body, (16usize << 20).to_string());
}

/// A response body is streamed: the caller reads the first chunk before the
/// upstream has produced the second.
#[tokio::test]
async fn response_bodies_stream_without_buffering() {
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let release = std::sync::Mutex::new(Some(release_rx));
    let upstream = HttpUpstream::start(move |_req: Request<Incoming>| {
        let release = release.lock().unwrap().take().unwrap();
        async move {
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, breakwater::body::BoxError>>(2);
            tokio::spawn(async move {
                tx.send(Ok(Frame::data(Bytes::from_static(b"first "))))
                    .await
                    .unwrap();
                release.await.unwrap();
                tx.send(Ok(Frame::data(Bytes::from_static(b"second"))))
                    .await
                    .unwrap();
            });
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            Response::new(body::boxed(StreamBody::new(stream)))
        }
    })
    .await;
    let sidecar = sidecar_for(upstream.addr).await;
    let response = get(sidecar.proxy_addr, "agent", "/").await;
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "first ");
    release_tx.send(()).unwrap();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "second");
}

#[tokio::test]
async fn h2c_callers_and_upstreams_with_trailers() {
    let upstream = HttpUpstream::start(|request: Request<Incoming>| async move {
        assert_eq!(request.version(), Version::HTTP_2);
        let body = request.into_body().collect().await.unwrap().to_bytes();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", body.len().to_string().parse().unwrap());
        let frames = vec![
            Ok::<_, breakwater::body::BoxError>(Frame::data(body)),
            Ok(Frame::trailers(trailers)),
        ];
        Response::new(body::boxed(StreamBody::new(tokio_stream::iter(frames))))
    })
    .await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  h2agent: {{address: '{}', protocol: http2}}\n",
        upstream.addr
    ))
    .await;
    let mut conn = h2_connect(sidecar.proxy_addr).await;
    let request = Request::post("http://h2agent/work")
        .header("te", "trailers")
        .body(body::full("twelve bytes"))
        .unwrap();
    let response = conn.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), Version::HTTP_2);
    let collected = response.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["x-checksum"], "12");
    assert_eq!(collected.to_bytes(), "twelve bytes");
    let seen = upstream.last_seen();
    assert_eq!(
        seen.uri.authority().unwrap().as_str(),
        upstream.addr.to_string(),
        ":authority is set for the upstream"
    );
    assert_eq!(seen.uri.path(), "/work");

    // An HTTP/1.1 caller reaches the same HTTP/2 upstream.
    let (parts, body) = call(sidecar.proxy_addr, "h2agent", Method::POST, "/", "abc").await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(body, "abc");
}

/// An HTTP/2 upstream that closes each connection (GOAWAY) after one
/// request: the sidecar opens a new connection for the next request.
#[tokio::test]
async fn http2_upstream_connections_are_reestablished_after_close() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = connections.clone();
    let (closed_tx, mut closed_rx) = mpsc::unbounded_channel::<()>();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let (served_tx, served_rx) = oneshot::channel::<()>();
                let served_tx = std::sync::Mutex::new(Some(served_tx));
                let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    if let Some(tx) = served_tx.lock().unwrap().take() {
                        let _ = tx.send(());
                    }
                    async { Ok::<_, std::convert::Infallible>(Response::new(body::full("one"))) }
                });
                let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service);
                tokio::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => return,
                    _ = served_rx => {}
                }
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
                let _ = closed_tx.send(());
            });
        }
    });
    let sidecar = sidecar(&format!(
        "upstreams:\n  h2agent: {{address: '{addr}', protocol: http2}}\n"
    ))
    .await;
    for _ in 0..3 {
        let (parts, body) = call(sidecar.proxy_addr, "h2agent", Method::GET, "/", "").await;
        assert_eq!(
            parts.status,
            StatusCode::OK,
            "{:?}",
            parts.headers.get("x-breakwater-error")
        );
        assert_eq!(body, "one");
        // The upstream has closed this connection before the next request.
        closed_rx.recv().await.unwrap();
    }
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 3);
}

/// Callers on many connections share one multiplexed upstream connection.
#[tokio::test]
async fn http2_upstreams_are_multiplexed_on_one_connection() {
    let upstream = HttpUpstream::echo().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  h2agent: {{address: '{}', protocol: http2}}\n",
        upstream.addr
    ))
    .await;
    let mut calls = Vec::new();
    for i in 0..8 {
        let addr = sidecar.proxy_addr;
        calls.push(tokio::spawn(async move {
            // A fresh client, so a fresh connection to the sidecar.
            let response = http1_client()
                .request(request_to(
                    addr,
                    "h2agent",
                    Method::POST,
                    "/",
                    format!("call {i}"),
                ))
                .await
                .unwrap();
            read_body(response).await.1
        }));
    }
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap(), format!("call {i}"));
    }
    assert_eq!(upstream.requests(), 8);
    assert_eq!(
        upstream
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

/// A malformed request gets a 400 on its own connection; other callers
/// are not disturbed.
#[tokio::test]
async fn malformed_requests_get_400_and_leave_other_clients_alone() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = HttpUpstream::echo().await;
    let sidecar = sidecar_for(upstream.addr).await;
    assert_eq!(
        call(sidecar.proxy_addr, "agent", Method::POST, "/", "before")
            .await
            .1,
        "before"
    );

    let mut raw = tokio::net::TcpStream::connect(sidecar.proxy_addr)
        .await
        .unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: agent\r\nBad Header\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    raw.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    assert_eq!(
        call(sidecar.proxy_addr, "agent", Method::POST, "/", "after")
            .await
            .1,
        "after"
    );
    assert_eq!(upstream.requests(), 2);
}

#[tokio::test]
async fn credentials_are_set_on_every_request_and_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("openai-key");
    std::fs::write(&key_file, "Bearer sk-from-a-secret\n").unwrap();
    // SAFETY of the test: the variable name is unique to this test.
    unsafe { std::env::set_var("BREAKWATER_TEST_ORG", "org-17") };
    let upstream = HttpUpstream::echo().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  llm:\n    address: '{}'\n    request_headers:\n      authorization: {{from_file: '{}'}}\n      openai-organization: {{from_env: BREAKWATER_TEST_ORG}}\n      x-client: breakwater\n",
        upstream.addr,
        key_file.display()
    ))
    .await;
    let mut request = request_to(sidecar.proxy_addr, "llm", Method::POST, "/v1/chat", "{}");
    request
        .headers_mut()
        .insert("authorization", "Bearer the-agents-own".parse().unwrap());
    let (parts, _) = read_body(http1_client().request(request).await.unwrap()).await;
    assert_eq!(parts.status, StatusCode::OK);
    let seen = upstream.last_seen().headers;
    assert_eq!(seen["authorization"], "Bearer sk-from-a-secret", "replaced");
    assert_eq!(seen["openai-organization"], "org-17");
    assert_eq!(seen["x-client"], "breakwater");
    let config = admin_json(sidecar.admin_addr, "/config").await.to_string();
    assert!(!config.contains("sk-from-a-secret"), "{config}");
    assert!(config.contains("from_file"), "{config}");
}

#[test]
fn credentials_that_cannot_be_read_are_errors_naming_the_header() {
    let error = breakwater::config::parse(
        "p.yaml",
        "upstreams:\n  llm:\n    address: 'a:443'\n    request_headers:\n      authorization: {from_file: missing-key}\n      x-org: {from_env: BREAKWATER_TEST_UNSET_VARIABLE}\n      connection: close\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("p.yaml:5:")
            && error.contains("upstreams.llm.request_headers.authorization"),
        "{error}"
    );
    assert!(error.contains("missing-key"), "{error}");
    assert!(
        error.contains("BREAKWATER_TEST_UNSET_VARIABLE is not set"),
        "{error}"
    );
    assert!(
        error.contains("request_headers.connection: this header is set by the sidecar itself"),
        "{error}"
    );
}

#[tokio::test]
async fn two_host_headers_are_refused_with_400() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = HttpUpstream::echo().await;
    let sidecar = sidecar_for(upstream.addr).await;
    let mut stream = tokio::net::TcpStream::connect(sidecar.proxy_addr)
        .await
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: agent\r\nhost: elsewhere\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("x-breakwater-error: duplicate-host"),
        "{answer}"
    );
    assert_eq!(upstream.requests(), 0);
}

/// `127.0.0.1:5555` is not the upstream at `127.0.0.1:<its port>`: a
/// `host:port` of another port matches a bare host only where it was
/// claimed by name, never the host of an upstream's address alone.
#[tokio::test]
async fn an_authority_with_another_port_is_not_the_upstream_on_that_host() {
    let upstream = HttpUpstream::echo().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent: {{address: '{}', hosts: [svc]}}\n",
        upstream.addr
    ))
    .await;
    let proxy = sidecar.proxy_addr;
    let (parts, body) = call(proxy, "127.0.0.1:5555", Method::GET, "/", "").await;
    assert_eq!(parts.status, StatusCode::NOT_FOUND, "{body:?}");
    assert_eq!(parts.headers["x-breakwater-error"], "unknown-host");
    for routed in [
        "127.0.0.1".to_owned(),
        upstream.addr.to_string(),
        "svc:9999".to_owned(),
        "agent:80".to_owned(),
    ] {
        let (parts, _) = call(proxy, &routed, Method::GET, "/", "").await;
        assert_eq!(parts.status, StatusCode::OK, "{routed}");
    }
    assert_eq!(upstream.requests(), 4);
}

/// `/config` shows the ports the listeners are bound to, not the `0` of
/// the file.
#[tokio::test]
async fn the_config_shows_the_bound_ports() {
    let upstream = HttpUpstream::echo().await;
    let sidecar = sidecar(&format!(
        "admin: {{listen: 127.0.0.1:0, probes_listen: 127.0.0.1:0}}\nupstreams:\n  agent: {{address: '{}', listen: 127.0.0.1:0}}\n",
        upstream.addr
    ))
    .await;
    let config = admin_json(sidecar.admin_addr, "/config").await;
    let addr = |v: &serde_json::Value| v.as_str().unwrap().parse::<std::net::SocketAddr>().unwrap();
    assert_eq!(addr(&config["proxy"]["listen"]), sidecar.proxy_addr);
    assert_eq!(addr(&config["admin"]["listen"]), sidecar.admin_addr);
    assert_eq!(
        addr(&config["admin"]["probes_listen"]),
        sidecar.probes_addr.unwrap()
    );
    assert_eq!(
        addr(&config["upstreams"][0]["listen"]),
        sidecar.upstream_addrs["agent"]
    );
}
