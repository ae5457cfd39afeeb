//! `breakwater demo`: the quick start, with nothing external to install.
//!
//! It starts the built-in example upstreams (an HTTP echo server and a
//! gRPC echo service), a sidecar in front of them with an embedded policy
//! file, and pushes requests through both paths (direct and through the
//! sidecar), then prints what it saw. With `keep_running`, everything stays
//! up so the admin endpoint and the proxy can be explored by hand.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::body;
use crate::config;
use crate::echo::EchoRequest;
use crate::echo::echo_client::EchoClient;
use crate::example::{self, EchoService};
use crate::sidecar;

/// The policy file the demo runs with; `{http}` and `{grpc}` are replaced
/// by the example upstreams' addresses.
pub const DEMO_CONFIG: &str = "\
# The demo's embedded policy file.
admin: {listen: 127.0.0.1:0}
proxy: {listen: 127.0.0.1:0}
upstreams:
  echo-http:
    address: {http}
    protocol: http1
  echo-grpc:
    address: {grpc}
    protocol: grpc
    listen: 127.0.0.1:0
";

/// What the demo does.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Requests per path and protocol.
    pub requests: usize,
    /// Leave everything running until Ctrl-C after the report.
    pub keep_running: bool,
}

/// Latencies of one batch of requests.
#[derive(Debug)]
pub struct Batch {
    /// Requests that got the expected answer.
    pub ok: usize,
    /// Requests sent.
    pub sent: usize,
    /// Sorted latencies of every request.
    pub latencies: Vec<Duration>,
}

impl Batch {
    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.latencies.len() as f64).ceil() as usize;
        self.latencies[rank.clamp(1, self.latencies.len()) - 1]
    }
}

/// Runs the demo and prints its report on stdout.
pub async fn run(options: DemoOptions) -> Result<(), Box<dyn std::error::Error>> {
    let http_listener = TcpListener::bind("127.0.0.1:0").await?;
    let grpc_listener = TcpListener::bind("127.0.0.1:0").await?;
    let http_addr = http_listener.local_addr()?;
    let grpc_addr = grpc_listener.local_addr()?;
    tokio::spawn(example::serve_http(http_listener));
    tokio::spawn(example::serve_grpc(grpc_listener, EchoService::default()));

    let text = DEMO_CONFIG
        .replace("{http}", &http_addr.to_string())
        .replace("{grpc}", &grpc_addr.to_string());
    let config = config::parse("<demo>", &text)?;
    let sidecar = sidecar::start(config, sidecar::Options::default()).await?;
    let grpc_port = sidecar.upstream_addrs["echo-grpc"];

    println!("Breakwater demo: {} requests per path\n", options.requests);
    let rows = [
        (
            "HTTP/1.1 direct",
            http_batch(http_addr, None, options.requests).await,
        ),
        (
            "HTTP/1.1 through Breakwater",
            http_batch(sidecar.proxy_addr, Some("echo-http"), options.requests).await,
        ),
        (
            "gRPC direct",
            grpc_batch(grpc_addr, options.requests).await?,
        ),
        (
            "gRPC through Breakwater",
            grpc_batch(grpc_port, options.requests).await?,
        ),
    ];
    println!("{:<30} {:>9} {:>10} {:>10}", "path", "ok", "p50", "p99");
    for (name, batch) in &rows {
        println!(
            "{:<30} {:>4}/{:<4} {:>10.2?} {:>10.2?}",
            name,
            batch.ok,
            batch.sent,
            batch.percentile(50.0),
            batch.percentile(99.0)
        );
    }
    println!("\nadmin:  http://{}/metrics", sidecar.admin_addr);
    println!(
        "proxy:  curl -H 'Host: echo-http' -d hello http://{}/",
        sidecar.proxy_addr
    );
    println!("gRPC:   {grpc_port} (dedicated port of upstream echo-grpc)");

    if options.keep_running {
        println!("\nrunning; Ctrl-C to stop");
        tokio::signal::ctrl_c().await?;
    }
    sidecar.shutdown().await;
    let failed = rows.iter().any(|(_, b)| b.ok != b.sent);
    if failed {
        return Err("some demo requests failed".into());
    }
    Ok(())
}

async fn http_batch(addr: SocketAddr, host: Option<&str>, requests: usize) -> Batch {
    let client: Client<_, body::Body> = Client::builder(TokioExecutor::new()).build_http();
    let payload = Bytes::from_static(b"{\"invoice\": 42}");
    let mut latencies = Vec::with_capacity(requests);
    let mut ok = 0;
    for _ in 0..requests {
        let mut request = Request::post(format!("http://{addr}/invoices"))
            .body(body::full(payload.clone()))
            .expect("a valid request");
        if let Some(host) = host {
            request
                .headers_mut()
                .insert(http::header::HOST, host.parse().expect("a valid host"));
        }
        let started = Instant::now();
        let answered = match client.request(request).await {
            Ok(response) if response.status().is_success() => response
                .into_body()
                .collect()
                .await
                .is_ok_and(|b| b.to_bytes() == payload),
            _ => false,
        };
        latencies.push(started.elapsed());
        ok += usize::from(answered);
    }
    latencies.sort();
    Batch {
        ok,
        sent: requests,
        latencies,
    }
}

async fn grpc_batch(addr: SocketAddr, requests: usize) -> Result<Batch, tonic::transport::Error> {
    let mut client = EchoClient::connect(format!("http://{addr}")).await?;
    let mut latencies = Vec::with_capacity(requests);
    let mut ok = 0;
    for i in 0..requests {
        let payload = Bytes::from(format!("page {i}"));
        let started = Instant::now();
        let answered = client
            .unary(EchoRequest {
                payload: payload.clone(),
                ..Default::default()
            })
            .await
            .is_ok_and(|r| r.into_inner().payload == payload);
        latencies.push(started.elapsed());
        ok += usize::from(answered);
    }
    latencies.sort();
    Ok(Batch {
        ok,
        sent: requests,
        latencies,
    })
}
