//! Real in-process peers for the behaviour tests: HTTP and gRPC upstreams
//! on loopback sockets with request counters and scripted answers, clients,
//! a sidecar from a YAML literal, an in-process control plane, and
//! [`eventually`] for state that no event announces.
//!
//! The helpers cannot lie: a series missing from `/metrics` is `None`,
//! not 0 ([`metric`]), and a handler that panicked fails the test when its
//! upstream is dropped or joined ([`HttpUpstream::join`]).

#![allow(dead_code)]

pub mod chromium;
pub mod netns;
pub mod python;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use breakwater::body::{self, Body};
use breakwater::example::{self, EchoService, EchoStats};
use breakwater::sidecar::{self, Sidecar};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// What an upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
}

type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync,
>;

/// A scriptable HTTP/1.1 + h2c upstream.
pub struct HttpUpstream {
    pub addr: SocketAddr,
    /// Requests received.
    pub requests: Arc<AtomicUsize>,
    /// TCP connections accepted.
    pub connections: Arc<AtomicUsize>,
    /// The head of every request, in arrival order.
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// The first handler panic, re-raised by `join` (and on drop).
    panicked: Arc<Mutex<Option<String>>>,
    task: JoinHandle<()>,
}

impl HttpUpstream {
    /// Starts an upstream answering every request with `handler`.
    pub async fn start<F, Fut>(handler: F) -> Self
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |r| Box::pin(handler(r)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let panicked = Arc::new(Mutex::new(None));
        let (r, c, s, p) = (
            requests.clone(),
            connections.clone(),
            seen.clone(),
            panicked.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                c.fetch_add(1, Ordering::SeqCst);
                let (handler, r, s, p) = (handler.clone(), r.clone(), s.clone(), p.clone());
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    r.fetch_add(1, Ordering::SeqCst);
                    s.lock().unwrap().push(Seen {
                        method: request.method().clone(),
                        uri: request.uri().clone(),
                        version: request.version(),
                        headers: request.headers().clone(),
                    });
                    let answer = std::panic::AssertUnwindSafe(handler(request));
                    let p = p.clone();
                    async move {
                        match futures_util::FutureExt::catch_unwind(answer).await {
                            Ok(answer) => Ok::<_, Infallible>(answer),
                            Err(panic) => {
                                let message = panic_text(&*panic);
                                p.lock().unwrap().get_or_insert(message.clone());
                                std::panic::resume_unwind(Box::new(message))
                            }
                        }
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            requests,
            connections,
            seen,
            panicked,
            task,
        }
    }

    /// Stops the upstream; re-raises the first panic of a handler, which
    /// hyper would otherwise turn into a closed connection.
    pub fn join(self) {
        drop(self);
    }

    /// An upstream whose handler also gets the request's number (0 for the
    /// first), to script a sequence of answers.
    pub async fn numbered<F, Fut>(handler: F) -> Self
    where
        F: Fn(usize, Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let count = Arc::new(AtomicUsize::new(0));
        Self::start(move |request| handler(count.fetch_add(1, Ordering::SeqCst), request)).await
    }

    /// An upstream that answers 200 with the request's body.
    pub async fn echo() -> Self {
        Self::start(|request: Request<Incoming>| async move {
            let body = request.into_body().collect().await.unwrap().to_bytes();
            Response::new(body::full(body))
        })
        .await
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// The `Idempotency-Key` of every request, in arrival order.
    pub fn keys_seen(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.headers["idempotency-key"].to_str().unwrap().to_owned())
            .collect()
    }

    pub fn last_seen(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request")
    }
}

impl Drop for HttpUpstream {
    fn drop(&mut self) {
        self.task.abort();
        let panicked = self.panicked.lock().unwrap().take();
        if let Some(message) = panicked
            && !std::thread::panicking()
        {
            panic!(
                "a handler of the upstream on {} panicked: {message}",
                self.addr
            );
        }
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(not text)".into())
}

/// Polls `probe` every 10 ms until it gives `Some`, for at most `within`;
/// panics naming `what` otherwise. For state that no event announces (a
/// metric, another process's listing); where an event exists, wait for
/// the event.
pub async fn eventually<T, F, Fut>(within: std::time::Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Options for an in-process control plane over `dir`: gRPC, JSON/HTTP
/// and admin on free loopback ports, no token, no policies.
pub fn control_options(dir: &std::path::Path) -> breakwater::control::ControlOptions {
    let mut options = breakwater::control::ControlOptions::new(dir.to_owned());
    options.listen = "127.0.0.1:0".parse().unwrap();
    options.http_listen = Some("127.0.0.1:0".parse().unwrap());
    options.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    options
}

/// Starts an in-process control plane.
pub async fn start_control_plane(
    options: breakwater::control::ControlOptions,
) -> breakwater::control::Running {
    breakwater::control::start(options).await.unwrap()
}

/// A policy file from a YAML literal.
pub fn policies(yaml: &str) -> breakwater::config::Config {
    breakwater::config::parse("policies.yaml", yaml).unwrap()
}

/// The example gRPC echo service on a loopback port.
pub struct GrpcUpstream {
    pub addr: SocketAddr,
    pub stats: Arc<EchoStats>,
    task: JoinHandle<()>,
}

impl GrpcUpstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = EchoService::default();
        let stats = service.stats.clone();
        let task = tokio::spawn(async move {
            example::serve_grpc(listener, service).await.unwrap();
        });
        Self { addr, stats, task }
    }

    pub fn calls(&self) -> usize {
        self.stats.calls.load(Ordering::SeqCst)
    }

    pub fn cancelled(&self) -> usize {
        self.stats.cancelled.load(Ordering::SeqCst)
    }
}

impl Drop for GrpcUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A gRPC echo client connected to `addr`, taking messages of any size
/// the example service takes.
pub async fn grpc_client(
    addr: SocketAddr,
) -> breakwater::echo::echo_client::EchoClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    breakwater::echo::echo_client::EchoClient::new(channel)
        .max_decoding_message_size(example::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(example::MAX_MESSAGE_BYTES)
}

/// A loopback port free now, for a server a test starts later.
pub async fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A loopback address where nothing listens: a privileged port that
/// refuses connections. (A port bound and released would do only until
/// another test, in this same process, is given it.)
pub async fn closed_port() -> SocketAddr {
    for port in [9, 1, 3, 5, 11, 13, 17, 19] {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if let Err(e) = tokio::net::TcpStream::connect(addr).await
            && e.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return addr;
        }
    }
    panic!("no closed privileged port on 127.0.0.1");
}

/// Starts a sidecar from YAML. Admin and proxy listen on free ports unless
/// the YAML says otherwise.
pub async fn sidecar(yaml: &str) -> Sidecar {
    let mut text = String::new();
    if !yaml.contains("admin:") {
        text.push_str("admin: {listen: 127.0.0.1:0}\n");
    }
    if !yaml.contains("proxy:") {
        text.push_str("proxy: {listen: 127.0.0.1:0}\n");
    }
    text.push_str(yaml);
    let config = breakwater::config::parse("test.yaml", &text).unwrap();
    sidecar::start(config, sidecar::Options::default())
        .await
        .unwrap()
}

/// An HTTP/1.1 client.
pub fn http1_client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An h2c (HTTP/2 with prior knowledge) client.
pub fn h2_client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A request to `addr` with `Host: host`.
pub fn request_to(
    addr: SocketAddr,
    host: &str,
    method: Method,
    path: &str,
    body: impl Into<Bytes>,
) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header(http::header::HOST, host)
        .body(body::full(body))
        .unwrap()
}

/// Reads a whole response body.
pub async fn read_body(response: Response<Incoming>) -> (http::response::Parts, Bytes) {
    let (parts, incoming) = response.into_parts();
    (parts, incoming.collect().await.unwrap().to_bytes())
}

/// An HTTP/2 (prior knowledge) connection to `addr`, for requests whose
/// `:authority` differs from the address connected to.
pub async fn h2_connect(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Body> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    send
}

/// An HTTP/1.1 connection to `addr` that sends request targets as given,
/// so absolute-form (proxy-style) requests can be tested.
pub async fn h1_connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Body> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    send
}

/// A sidecar with one HTTP/1.1 upstream, named `agent`, at `addr`.
pub async fn sidecar_for(addr: SocketAddr) -> Sidecar {
    sidecar(&format!("upstreams:\n  agent: {{address: '{addr}'}}\n")).await
}

/// Sends a GET to `addr` with `Host: host` over HTTP/1.1 and returns the
/// answer with its body unread.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Response<Incoming> {
    http1_client()
        .request(request_to(addr, host, Method::GET, path, Bytes::new()))
        .await
        .unwrap()
}

/// Sends one HTTP/1.1 request to `addr` with `Host: host` and reads the
/// whole answer.
pub async fn call(
    addr: SocketAddr,
    host: &str,
    method: Method,
    path: &str,
    body: impl Into<Bytes>,
) -> (http::response::Parts, Bytes) {
    let response = http1_client()
        .request(request_to(addr, host, method, path, body))
        .await
        .unwrap();
    read_body(response).await
}

/// An answer with a status and headers.
pub fn answer(status: u16, headers: &[(&'static str, &str)], text: &'static str) -> Response<Body> {
    let mut response = Response::new(body::full(text));
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
    for (k, v) in headers {
        response.headers_mut().insert(*k, v.parse().unwrap());
    }
    response
}

/// A gRPC answer, trailers-only in its body (status after headers, no
/// message), as proxies and some servers send failures.
pub fn grpc_failure(code: &'static str) -> Response<Body> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", code.parse().unwrap());
    let frames = vec![Ok::<_, body::BoxError>(hyper::body::Frame::trailers(
        trailers,
    ))];
    let stream = http_body_util::StreamBody::new(tokio_stream::iter(frames));
    let mut response = Response::new(body::boxed(stream));
    response
        .headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    response
}

/// Reads a metric's value from the Prometheus text of a sidecar; `None`
/// when the series is not there (a renamed series must fail a test, not
/// read as 0).
pub async fn metric(admin: SocketAddr, series: &str) -> Option<f64> {
    let response = http1_client()
        .request(
            Request::get(format!("http://{admin}/metrics"))
                .body(body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let (_, text) = read_body(response).await;
    let text = String::from_utf8(text.to_vec()).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A metric's value; the series must be there.
pub async fn metric_value(admin: SocketAddr, series: &str) -> f64 {
    metric(admin, series)
        .await
        .unwrap_or_else(|| panic!("no series {series} in /metrics"))
}

/// Sends a request to the admin endpoint and reads the whole answer.
pub async fn admin(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: impl Into<Bytes>,
) -> (http::response::Parts, Bytes) {
    let request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(body::full(body))
        .unwrap();
    read_body(http1_client().request(request).await.unwrap()).await
}

/// GETs an admin path and parses its JSON.
pub async fn admin_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let (parts, body) = admin(addr, Method::GET, path, "").await;
    assert!(parts.status.is_success(), "{path}: {}", parts.status);
    serde_json::from_slice(&body).unwrap()
}

/// An upstream that holds every request until released: `arrived` is
/// notified as each request comes in, `release` lets one answer 200.
pub async fn gated() -> (HttpUpstream, Arc<Notify>, Arc<Notify>) {
    let arrived = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let (a, r) = (arrived.clone(), release.clone());
    let upstream = HttpUpstream::start(move |_req: Request<Incoming>| {
        let (a, r) = (a.clone(), r.clone());
        async move {
            a.notify_one();
            r.notified().await;
            answer(200, &[], "done")
        }
    })
    .await;
    (upstream, arrived, release)
}

/// A child process and its log lines (JSON, from stderr).
pub struct Logged {
    pub child: std::process::Child,
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl Logged {
    /// Starts `command` with its stderr piped and waits for the log event
    /// whose message starts with `message`, which it returns.
    pub fn start(mut command: std::process::Command, message: &str) -> (Self, serde_json::Value) {
        use std::io::BufRead;
        let mut child = command
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let mut logged = Self { child, lines };
        let event = logged.wait_for(message);
        (logged, event)
    }

    /// Waits (up to 30 s) for the log event whose message starts with
    /// `message`.
    pub fn wait_for(&mut self, message: &str) -> serde_json::Value {
        loop {
            let Ok(line) = self.lines.recv_timeout(std::time::Duration::from_secs(30)) else {
                let _ = self.child.kill();
                panic!("no {message:?} in the log");
            };
            if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line)
                && event["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
            {
                return event;
            }
        }
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a participant does with one request it has not seen the key of:
/// `(method, path, JSON body)` to `(status, JSON answer, hang)`. With
/// `hang`, the effect is applied and the answer is never sent (a crash
/// test kills the caller meanwhile).
pub type Script =
    Arc<dyn Fn(&Method, &str, &serde_json::Value) -> (u16, serde_json::Value, bool) + Send + Sync>;

/// A saga participant that honours `Idempotency-Key`: a key it answered
/// with success before gets the same answer again, and nothing is applied
/// twice. Every effect applied goes to a log shared between participants,
/// as `"<name> <METHOD> <path> <body>"`.
pub struct Participant {
    pub upstream: HttpUpstream,
    /// Keys seen, with how many times each was applied.
    pub applied_keys: Arc<Mutex<std::collections::HashMap<String, usize>>>,
}

impl Participant {
    pub async fn start(name: &'static str, log: Arc<Mutex<Vec<String>>>, script: Script) -> Self {
        type Answers = std::collections::HashMap<String, (u16, serde_json::Value)>;
        let answers: Arc<Mutex<Answers>> = Arc::default();
        let applied_keys: Arc<Mutex<std::collections::HashMap<String, usize>>> = Arc::default();
        let keys = applied_keys.clone();
        let upstream = HttpUpstream::start(move |request: Request<Incoming>| {
            let (log, script, answers, keys) =
                (log.clone(), script.clone(), answers.clone(), keys.clone());
            async move {
                let method = request.method().clone();
                let path = request.uri().path().to_owned();
                let key = request
                    .headers()
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let bytes = request.into_body().collect().await.unwrap().to_bytes();
                let body: serde_json::Value =
                    serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                let stored = key
                    .as_ref()
                    .and_then(|k| answers.lock().unwrap().get(k).cloned());
                let (status, value) = match stored {
                    Some(stored) => stored,
                    None => {
                        let (status, value, hang) = script(&method, &path, &body);
                        if (200..300).contains(&status) {
                            log.lock()
                                .unwrap()
                                .push(format!("{name} {method} {path} {body}"));
                            if let Some(key) = &key {
                                *keys.lock().unwrap().entry(key.clone()).or_default() += 1;
                                answers
                                    .lock()
                                    .unwrap()
                                    .insert(key.clone(), (status, value.clone()));
                            }
                        }
                        if hang {
                            std::future::pending::<()>().await;
                        }
                        (status, value)
                    }
                };
                let mut response = Response::new(body::full(serde_json::to_vec(&value).unwrap()));
                *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                response
                    .headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                response
            }
        })
        .await;
        Self {
            upstream,
            applied_keys,
        }
    }

    /// How many times each key was applied: 1 everywhere, or a step ran twice.
    pub fn applied_twice(&self) -> Vec<String> {
        self.applied_keys
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// Starts `breakwater control-plane` as a separate process on `dir`, with
/// `extra` arguments; answers it, its gRPC URL and its ready log event.
pub fn control_plane_process(
    dir: &std::path::Path,
    extra: &[&std::ffi::OsStr],
) -> (Logged, String, serde_json::Value) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_breakwater"));
    command
        .args([
            "--log-format",
            "json",
            "control-plane",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir)
        .args(extra);
    let (process, ready) = Logged::start(command, "control plane ready");
    let url = format!("http://{}", ready["grpc"].as_str().unwrap());
    (process, url, ready)
}
