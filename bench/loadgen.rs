//! The benchmark's load generator and upstream, in one binary.
//!
//! `loadgen upstream` serves a minimal HTTP/1.1 + h2c answer and a minimal
//! gRPC unary echo, so that the upstream costs as little as possible; with
//! `--tls-http` / `--tls-grpc` it serves the same answers over TLS too, with
//! a CA it makes at start (`<tls-dir>/ca.pem`, certificate for `localhost`),
//! so that proxies originating TLS can be measured against one server.
//! `loadgen run` drives a target in one of two modes:
//!
//! - `closed`: `--concurrency` requests always in flight; reports
//!   throughput.
//! - `rate`: requests sent at a fixed `--rate`, each latency measured from
//!   the request's *intended* send time, so a stall in the proxy shows up
//!   in the percentiles instead of silently slowing the sender
//!   (coordinated omission). The schedule is kept by a dedicated thread
//!   with a precise sleep, not by the runtime's millisecond timer.
//!
//! `loadgen checkpoints` drives the control plane: `--concurrency` writers
//! putting checkpoints (`--state-bytes` of state, spread over `--workflows`
//! workflows) as fast as acknowledgements come back; reports throughput
//! and latency percentiles.
//!
//! `loadgen sagas` starts `--count` sagas of `--steps` HTTP steps (each
//! with a compensation) against an upstream of the control plane's policy
//! file, from `--concurrency` clients, then polls the control plane's
//! `/metrics` until every one has completed; reports sagas per second from
//! the first start to the last completion. `--no-wait` only starts them;
//! `--wait-only` only waits (after a restart).
//!
//! Output: one JSON object on stdout.

#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use breakwater::body::{self, Body};
use bytes::{BufMut, Bytes, BytesMut};
use clap::{Parser, Subcommand, ValueEnum};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the benchmark upstream.
    Upstream {
        #[arg(long)]
        http: SocketAddr,
        #[arg(long)]
        grpc: SocketAddr,
        /// Fail this percentage of requests (503 / UNAVAILABLE), evenly
        /// spread. `GET /__count` on the HTTP port answers the number of
        /// requests served so far.
        #[arg(long, default_value_t = 0)]
        fail_percent: u64,
        /// Serve the HTTP answers over TLS on this address too.
        #[arg(long)]
        tls_http: Option<SocketAddr>,
        /// Serve the gRPC answers over TLS on this address too.
        #[arg(long)]
        tls_grpc: Option<SocketAddr>,
        /// Where the TLS upstream's CA certificate is written (`ca.pem`).
        #[arg(long, default_value = "bench/out/tls")]
        tls_dir: PathBuf,
    },
    /// Drive load at a target.
    Run {
        #[arg(long)]
        target: SocketAddr,
        /// `Host` / `:authority` to send.
        #[arg(long, default_value = "upstream")]
        host: String,
        #[arg(long, value_enum)]
        protocol: Proto,
        #[arg(long, value_enum)]
        mode: Mode,
        /// Requests in flight (closed mode) or connections (rate mode).
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// HTTP/2 connections for gRPC (streams are spread over them).
        #[arg(long, default_value_t = 4)]
        h2_connections: usize,
        /// Requests per second (rate mode).
        #[arg(long, default_value_t = 2000)]
        rate: u64,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        warmup: Duration,
    },
    /// Put checkpoints into a control plane.
    Checkpoints(CheckpointArgs),
    /// Run sagas on a control plane.
    Sagas(SagaArgs),
}

#[derive(clap::Args)]
struct SagaArgs {
    /// The control plane's gRPC URL.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    target: String,
    /// The control plane's admin address (for /metrics).
    #[arg(long)]
    admin: SocketAddr,
    /// The upstream (in the control plane's policy file) steps call.
    #[arg(long, default_value = "fast")]
    upstream: String,
    /// Sagas to run.
    #[arg(long, default_value_t = 10_000)]
    count: u64,
    /// Steps per saga.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Clients starting sagas, each with one start in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Saga ids are `<prefix>-<n>`.
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// Start them and leave.
    #[arg(long)]
    no_wait: bool,
    /// Only wait until `--count` sagas have completed.
    #[arg(long)]
    wait_only: bool,
}

#[derive(clap::Args)]
struct CheckpointArgs {
    /// The control plane's gRPC URL.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    target: String,
    /// Writers, each with one put in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections (writers are spread over them).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Workflows written to.
    #[arg(long, default_value_t = 10_000)]
    workflows: u64,
    /// Bytes of state per checkpoint.
    #[arg(long, default_value_t = 1024)]
    state_bytes: usize,
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    warmup: Duration,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Proto {
    Http1,
    Grpc,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Mode {
    Closed,
    Rate,
}

const GRPC_PATH: &str = "/breakwater.echo.v1.Echo/Unary";

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    match cli.command {
        Command::Upstream {
            http,
            grpc,
            fail_percent,
            tls_http,
            tls_grpc,
            tls_dir,
        } => {
            let served = Arc::new(Served {
                count: AtomicU64::new(0),
                fail_percent,
            });
            let tls = [tls_http, tls_grpc]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>();
            runtime.block_on(async {
                if !tls.is_empty() {
                    let acceptor = tls_acceptor(&tls_dir);
                    for addr in tls {
                        let listener = TcpListener::bind(addr).await.unwrap();
                        tokio::spawn(serve(listener, Some(acceptor.clone()), served.clone()));
                    }
                }
                upstream(http, grpc, served).await
            })
        }
        Command::Run {
            target,
            host,
            protocol,
            mode,
            concurrency,
            h2_connections,
            rate,
            duration,
            warmup,
        } => {
            let client = runtime.block_on(Client::connect(
                target,
                &host,
                protocol,
                concurrency,
                h2_connections,
            ));
            let report = runtime.block_on(async {
                let client = Arc::new(client);
                // Warm up connections, pools and caches; results discarded.
                if !warmup.is_zero() {
                    match mode {
                        Mode::Closed => closed(client.clone(), concurrency, warmup).await,
                        Mode::Rate => rate_mode(client.clone(), rate, warmup).await,
                    };
                }
                match mode {
                    Mode::Closed => closed(client, concurrency, duration).await,
                    Mode::Rate => rate_mode(client, rate, duration).await,
                }
            });
            println!("{}", report.json(duration));
        }
        Command::Checkpoints(args) => {
            let report = runtime.block_on(checkpoints(&args));
            println!("{}", report.json(args.duration));
        }
        Command::Sagas(args) => println!("{}", runtime.block_on(sagas(&args))),
    }
}

// ------------------------------------------------------------------ sagas

/// The number of completed sagas, from the control plane's metrics.
async fn completed(admin: SocketAddr) -> u64 {
    let stream = TcpStream::connect(admin)
        .await
        .expect("the admin port answers");
    let (mut send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::builder()
        .uri("/metrics")
        .header("host", "admin")
        .body(body::empty())
        .unwrap();
    let text = send
        .send_request(request)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&text.to_bytes()).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("breakwater_sagas{state=\"completed\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn sagas(args: &SagaArgs) -> String {
    use breakwater::api::StartSagaRequest;
    use breakwater::api::sagas_client::SagasClient;
    let steps: Vec<serde_json::Value> = (0..args.steps)
        .map(|i| {
            let path = format!("/sagas/{{{{saga.id}}}}/step-{i}");
            serde_json::json!({
                "name": format!("step-{i}"),
                "action": {"upstream": args.upstream, "method": "POST", "path": path, "body": {"n": i}},
                "compensation": {"upstream": args.upstream, "method": "DELETE", "path": path},
            })
        })
        .collect();
    let template: breakwater::control::saga::spec::SagaSpec =
        serde_json::from_value(serde_json::json!({"id": "x", "steps": steps})).unwrap();
    let mut definition = breakwater::control::saga::proto::spec_to_proto(&template);
    let before = if args.wait_only {
        0
    } else {
        completed(args.admin).await
    };
    let started = Instant::now();
    let mut report = Report::default();
    if !args.wait_only {
        let channel = tonic::transport::Endpoint::from_shared(args.target.clone())
            .unwrap()
            .connect()
            .await
            .expect("the control plane is reachable");
        let client = SagasClient::new(channel);
        let next = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..args.concurrency)
            .map(|_| {
                let (mut client, next) = (client.clone(), next.clone());
                let (count, prefix) = (args.count, args.prefix.clone());
                definition.id.clear();
                let definition = definition.clone();
                tokio::spawn(async move {
                    let mut report = Report::default();
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= count {
                            return report;
                        }
                        let mut definition = definition.clone();
                        definition.id = format!("{prefix}-{n}");
                        let sent = Instant::now();
                        match client
                            .start(StartSagaRequest {
                                definition: Some(definition),
                            })
                            .await
                        {
                            Ok(_) => {
                                report.ok += 1;
                                report.latencies_us.push(sent.elapsed().as_micros() as u32);
                            }
                            Err(_) => report.errors += 1,
                        }
                    }
                })
            })
            .collect();
        for worker in workers {
            report.merge(worker.await.unwrap());
        }
    }
    let all_started = started.elapsed();
    if args.no_wait {
        return report.json(all_started);
    }
    let target = before + args.count;
    let mut done = completed(args.admin).await;
    while done < target {
        tokio::time::sleep(Duration::from_millis(20)).await;
        done = completed(args.admin).await;
    }
    let elapsed = started.elapsed();
    let starts = report.json(all_started);
    format!(
        "{{\"sagas\":{},\"seconds\":{:.3},\"sagas_per_s\":{:.0},\"starts\":{starts}}}",
        args.count,
        elapsed.as_secs_f64(),
        args.count as f64 / elapsed.as_secs_f64()
    )
}

// ------------------------------------------------------------ checkpoints

async fn checkpoints(args: &CheckpointArgs) -> Report {
    use breakwater::api::PutCheckpointRequest;
    use breakwater::api::checkpoints_client::CheckpointsClient;
    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        let channel = tonic::transport::Endpoint::from_shared(args.target.clone())
            .unwrap()
            .connect()
            .await
            .expect("the control plane is reachable");
        clients.push(CheckpointsClient::new(channel));
    }
    let state = Bytes::from(vec![b'x'; args.state_bytes]);
    let next = Arc::new(AtomicU64::new(0));
    let run = |duration: Duration| {
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..args.concurrency)
            .map(|i| {
                let mut client = clients[i % clients.len()].clone();
                let (stop, next, state) = (stop.clone(), next.clone(), state.clone());
                let workflows = args.workflows;
                tokio::spawn(async move {
                    let mut report = Report::default();
                    while !stop.load(Ordering::Relaxed) {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        let put = PutCheckpointRequest {
                            workflow_id: format!("wf-{}", n % workflows),
                            step: "step".into(),
                            state: state.clone(),
                            ..Default::default()
                        };
                        let started = Instant::now();
                        match client.put(put).await {
                            Ok(_) => {
                                report.ok += 1;
                                report
                                    .latencies_us
                                    .push(started.elapsed().as_micros() as u32);
                            }
                            Err(_) => report.errors += 1,
                        }
                    }
                    report
                })
            })
            .collect();
        async move {
            tokio::time::sleep(duration).await;
            stop.store(true, Ordering::Relaxed);
            let mut report = Report::default();
            for worker in workers {
                report.merge(worker.await.unwrap());
            }
            report
        }
    };
    if !args.warmup.is_zero() {
        run(args.warmup).await;
    }
    run(args.duration).await
}

// ---------------------------------------------------------------- upstream

/// Requests served, and how many to fail.
struct Served {
    count: AtomicU64,
    fail_percent: u64,
}

async fn upstream(http: SocketAddr, grpc: SocketAddr, served: Arc<Served>) {
    let http = TcpListener::bind(http).await.unwrap();
    let grpc = TcpListener::bind(grpc).await.unwrap();
    tokio::spawn(serve(http, None, served.clone()));
    serve(grpc, None, served).await;
}

/// A CA made now (its certificate written to `dir/ca.pem`) and a server
/// certificate it signed for `localhost` and `127.0.0.1`, offering `h2`
/// and `http/1.1`.
fn tls_acceptor(dir: &std::path::Path) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    std::fs::create_dir_all(dir).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Breakwater benchmark CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let chain = vec![CertificateDer::from(cert.der().to_vec())];
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

async fn serve(listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>, served: Arc<Served>) {
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        let _ = stream.set_nodelay(true);
        let (served, tls) = (served.clone(), tls.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |r| answer(served.clone(), r));
            let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = match tls {
                None => server.serve_connection(TokioIo::new(stream), service).await,
                Some(tls) => match tls.accept(stream).await {
                    Ok(stream) => server.serve_connection(TokioIo::new(stream), service).await,
                    Err(_) => return,
                },
            };
        });
    }
}

async fn answer(
    served: Arc<Served>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    if request.uri().path() == "/__count" {
        let count = served.count.load(Ordering::Relaxed);
        return Ok(Response::new(body::full(count.to_string())));
    }
    let n = served.count.fetch_add(1, Ordering::Relaxed);
    // Fail `fail_percent` of requests, spread evenly: request n fails when
    // the running share of failures falls behind the target.
    let fail = (n + 1) * served.fail_percent / 100 > n * served.fail_percent / 100;
    if request.uri().path() != GRPC_PATH {
        let _ = request.into_body().collect().await;
        let mut response = Response::new(body::full(Bytes::from_static(b"ok")));
        if fail {
            *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        }
        return Ok(response);
    }
    if fail {
        let _ = request.into_body().collect().await;
        let mut response = Response::new(body::empty());
        let headers = response.headers_mut();
        headers.insert("content-type", HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from_static("14"));
        return Ok(response);
    }
    // gRPC unary echo: the request frame back, then `grpc-status: 0`.
    let frame = request
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let frames = [
        Ok::<_, Infallible>(Frame::data(frame)),
        Ok(Frame::trailers(trailers)),
    ];
    let mut response = Response::new(body::boxed(StreamBody::new(tokio_stream::iter(frames))));
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    Ok(response)
}

// ---------------------------------------------------------------- clients

enum Client {
    Http1 {
        free: mpsc::Sender<hyper::client::conn::http1::SendRequest<Body>>,
        taken: Mutex<mpsc::Receiver<hyper::client::conn::http1::SendRequest<Body>>>,
        uri: http::Uri,
        host: HeaderValue,
    },
    Grpc {
        conns: Vec<hyper::client::conn::http2::SendRequest<Body>>,
        next: AtomicU64,
        uri: http::Uri,
        frame: Bytes,
    },
}

impl Client {
    async fn connect(
        target: SocketAddr,
        host: &str,
        protocol: Proto,
        connections: usize,
        h2: usize,
    ) -> Self {
        match protocol {
            Proto::Http1 => {
                let (free, taken) = mpsc::channel(connections);
                for _ in 0..connections {
                    let stream = TcpStream::connect(target).await.unwrap();
                    stream.set_nodelay(true).unwrap();
                    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .unwrap();
                    tokio::spawn(conn);
                    free.send(send).await.unwrap();
                }
                Client::Http1 {
                    free,
                    taken: Mutex::new(taken),
                    uri: "/".parse().unwrap(),
                    host: HeaderValue::from_str(host).unwrap(),
                }
            }
            Proto::Grpc => {
                let mut conns = Vec::new();
                for _ in 0..h2 {
                    let stream = TcpStream::connect(target).await.unwrap();
                    stream.set_nodelay(true).unwrap();
                    let (send, conn) = hyper::client::conn::http2::handshake(
                        TokioExecutor::new(),
                        TokioIo::new(stream),
                    )
                    .await
                    .unwrap();
                    tokio::spawn(conn);
                    conns.push(send);
                }
                // EchoRequest { payload: "hello" } in a gRPC frame.
                let message = b"\x0a\x05hello";
                let mut frame = BytesMut::with_capacity(5 + message.len());
                frame.put_u8(0);
                frame.put_u32(message.len() as u32);
                frame.put_slice(message);
                Client::Grpc {
                    conns,
                    next: AtomicU64::new(0),
                    uri: format!("http://{host}{GRPC_PATH}").parse().unwrap(),
                    frame: frame.freeze(),
                }
            }
        }
    }

    /// Sends one request and reads the whole answer. `true` on success.
    async fn call(&self) -> bool {
        match self {
            Client::Http1 {
                free,
                taken,
                uri,
                host,
                ..
            } => {
                let mut send = {
                    let mut taken = taken.lock().await;
                    taken.recv().await.unwrap()
                };
                let request = Request::get(uri.clone())
                    .header("host", host.clone())
                    .body(body::empty())
                    .unwrap();
                let ok = match send.send_request(request).await {
                    Ok(response) => {
                        let good = response.status().is_success();
                        good && response.into_body().collect().await.is_ok()
                    }
                    Err(_) => false,
                };
                free.send(send).await.unwrap();
                ok
            }
            Client::Grpc {
                conns,
                next,
                uri,
                frame,
            } => {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize % conns.len();
                let mut send = conns[i].clone();
                let request = Request::post(uri.clone())
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(body::full(frame.clone()))
                    .unwrap();
                match send.send_request(request).await {
                    Ok(response) => match response.into_body().collect().await {
                        Ok(collected) => collected
                            .trailers()
                            .and_then(|t| t.get("grpc-status"))
                            .is_some_and(|s| s == "0"),
                        Err(_) => false,
                    },
                    Err(_) => false,
                }
            }
        }
    }
}

// ---------------------------------------------------------------- modes

#[derive(Default)]
struct Report {
    ok: u64,
    errors: u64,
    latencies_us: Vec<u32>,
}

impl Report {
    fn merge(&mut self, other: Report) {
        self.ok += other.ok;
        self.errors += other.errors;
        self.latencies_us.extend(other.latencies_us);
    }

    fn json(mut self, duration: Duration) -> String {
        self.latencies_us.sort_unstable();
        let pct = |p: f64| -> u32 {
            if self.latencies_us.is_empty() {
                return 0;
            }
            let rank = ((p / 100.0) * self.latencies_us.len() as f64).ceil() as usize;
            self.latencies_us[rank.clamp(1, self.latencies_us.len()) - 1]
        };
        format!(
            "{{\"ok\":{},\"errors\":{},\"rps\":{:.0},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{}}}",
            self.ok,
            self.errors,
            self.ok as f64 / duration.as_secs_f64(),
            pct(50.0),
            pct(99.0),
            pct(99.9)
        )
    }
}

async fn closed(client: Arc<Client>, concurrency: usize, duration: Duration) -> Report {
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, stop) = (client.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut report = Report::default();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                if client.call().await {
                    report.ok += 1;
                    report
                        .latencies_us
                        .push(started.elapsed().as_micros() as u32);
                } else {
                    report.errors += 1;
                }
            }
            report
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut report = Report::default();
    for worker in workers {
        report.merge(worker.await.unwrap());
    }
    report
}

async fn rate_mode(client: Arc<Client>, rate: u64, duration: Duration) -> Report {
    let total = rate * duration.as_secs();
    let period = Duration::from_nanos(1_000_000_000 / rate);
    let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
    // The schedule: a thread that sleeps precisely to each intended time.
    std::thread::spawn(move || {
        let start = Instant::now() + Duration::from_millis(5);
        for i in 0..total {
            let intended = start + period * i as u32;
            let now = Instant::now();
            if intended > now {
                std::thread::sleep(intended - now);
            }
            if tx.send(intended).is_err() {
                break;
            }
        }
    });
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Option<u32>>();
    while let Some(intended) = rx.recv().await {
        let (client, done) = (client.clone(), done_tx.clone());
        tokio::spawn(async move {
            let ok = client.call().await;
            let latency = intended.elapsed().as_micros() as u32;
            let _ = done.send(ok.then_some(latency));
        });
    }
    drop(done_tx);
    let mut report = Report::default();
    while let Some(result) = done_rx.recv().await {
        match result {
            Some(latency) => {
                report.ok += 1;
                report.latencies_us.push(latency);
            }
            None => report.errors += 1,
        }
    }
    report
}
