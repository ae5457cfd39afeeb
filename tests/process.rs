//! The `breakwater` binary as a process: config checking, the admin
//! endpoint, SIGTERM draining, and clients not built on hyper (curl).

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use breakwater::body;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use support::*;
use tokio::sync::{Notify, oneshot};

const BIN: &str = env!("CARGO_BIN_EXE_breakwater");

fn write_config(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
    file
}

#[test]
fn config_check_prints_a_summary_or_positioned_errors() {
    let good = write_config("upstreams:\n  ocr: {address: 'ocr-agent:8080', protocol: grpc}\n");
    let out = Command::new(BIN)
        .args(["config", "check"])
        .arg(good.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains(": ok"), "{stdout}");
    assert!(
        stdout.contains("upstream ocr -> ocr-agent:8080 (grpc)"),
        "{stdout}"
    );
    assert!(out.stderr.is_empty(), "no warnings");

    let doubtful =
        write_config("upstreams:\n  llm:\n    address: llm:443\n    retry: {on: [400]}\n");
    let out = Command::new(BIN)
        .args(["config", "check"])
        .arg(doubtful.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "a warning is not an error");
    assert_eq!(
        String::from_utf8(out.stderr).unwrap().trim(),
        format!(
            "{}:2:3: upstreams.llm.retry.on: warning: 400 never applies: an answer below 500 other than 429 is not a failure (it is the caller's)",
            doubtful.path().display()
        )
    );

    let bad = write_config("upstreams:\n  ocr:\n    address: ocr-agent:8080\n    protocol: grcp\n");
    let out = Command::new(BIN)
        .args(["config", "check"])
        .arg(bad.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        stderr.trim(),
        format!(
            "{}:4:15: upstreams.ocr.protocol: unknown variant \"grcp\", expected one of http1, http2, grpc, mcp, a2a",
            bad.path().display()
        )
    );

    // Three errors, three lines.
    let three = write_config(
        "upstreams:\n  ocr: {address: 'ocr:1', protocol: grcp}\n  llm: {address: 'llm:1', retyr: {}}\n  pay: {address: 'pay'}\n",
    );
    let out = Command::new(BIN)
        .args(["config", "check"])
        .arg(three.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    let at: Vec<&str> = stderr
        .lines()
        .map(|l| l.split(": ").nth(1).unwrap_or(l))
        .collect();
    assert_eq!(
        at,
        [
            "upstreams.ocr.protocol",
            "upstreams.llm.retyr",
            "upstreams.pay.address"
        ],
        "{stderr}"
    );
}

#[test]
fn sidecar_with_an_invalid_config_exits_2_and_binds_nothing() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bad = write_config(&format!(
        "proxy: {{listen: '127.0.0.1:{port}'}}\nupstreams:\n  a: {{address: 'nohost'}}\n"
    ));
    let out = Command::new(BIN)
        .args(["sidecar", "--config"])
        .arg(bad.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains(":3:16: upstreams.a.address: address \"nohost\" has no port"),
        "{stderr}"
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

/// A sidecar process and the addresses it logged.
struct Process {
    child: Child,
    admin: SocketAddr,
    proxy: SocketAddr,
    config: tempfile::NamedTempFile,
    logs: std_mpsc::Receiver<String>,
}

impl Process {
    fn start(yaml: &str) -> Self {
        Self::start_with(yaml, &[])
    }

    fn start_with(yaml: &str, args: &[&str]) -> Self {
        let config = write_config(&format!(
            "admin: {{listen: 127.0.0.1:0}}\nproxy: {{listen: 127.0.0.1:0}}\n{yaml}"
        ));
        let mut child = Command::new(BIN)
            .args([
                "--log-format",
                "json",
                "sidecar",
                "--threads",
                "1",
                "--grace-period",
                "10s",
            ])
            .args(args)
            .arg("--config")
            .arg(config.path())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let ready = ready_addresses(&rx);
        let Some((admin, proxy)) = ready else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the sidecar did not log that it is ready");
        };
        Self {
            admin,
            proxy,
            child,
            config,
            logs: rx,
        }
    }

    /// Waits for a log event whose message is `message`.
    fn wait_for_log(&self, message: &str) -> serde_json::Value {
        loop {
            let line = self
                .logs
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no {message:?} in the log"));
            if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line)
                && event["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
            {
                return event;
            }
        }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// Reads log lines until the `sidecar ready` event and returns its admin
/// and proxy addresses.
fn ready_addresses(lines: &std_mpsc::Receiver<String>) -> Option<(SocketAddr, SocketAddr)> {
    loop {
        let line = lines.recv_timeout(Duration::from_secs(30)).ok()?;
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if event["message"] == "sidecar ready" {
            let addr = |key: &str| event[key].as_str()?.parse().ok();
            return Some((addr("admin")?, addr("proxy")?));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn get(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    let response = http1_client()
        .request(
            Request::get(format!("http://{addr}{path}"))
                .body(body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let (parts, body) = read_body(response).await;
    (parts.status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn admin_serves_health_readiness_metrics_and_config() {
    let upstream = HttpUpstream::echo().await;
    let process = Process::start(&format!(
        "upstreams:\n  agent: {{address: '{}'}}\n",
        upstream.addr
    ));
    assert_eq!(get(process.admin, "/healthz").await.0, StatusCode::OK);
    assert_eq!(get(process.admin, "/readyz").await.0, StatusCode::OK);
    let response = http1_client()
        .request(request_to(process.proxy, "agent", Method::POST, "/", "x"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    read_body(response).await;
    let (status, metrics) = get(process.admin, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        metrics.contains("breakwater_requests_total{upstream=\"agent\",outcome=\"success\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("breakwater_request_duration_seconds_count{upstream=\"agent\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("breakwater_requests_in_flight{upstream=\"agent\"} 0"),
        "{metrics}"
    );
    let (status, config) = get(process.admin, "/config").await;
    assert_eq!(status, StatusCode::OK);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["upstreams"][0]["name"], "agent");
    assert_eq!(config["upstreams"][0]["address"], upstream.addr.to_string());
}

/// SIGTERM: the listener closes at once, the request in flight completes,
/// and the process exits 0.
#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_refuses_new_connections() {
    let arrived = std::sync::Arc::new(Notify::new());
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let release = std::sync::Mutex::new(Some(release_rx));
    let notify = arrived.clone();
    let upstream = HttpUpstream::start(move |_req: Request<Incoming>| {
        let release = release.lock().unwrap().take();
        let notify = notify.clone();
        async move {
            notify.notify_one();
            if let Some(release) = release {
                let _ = release.await;
            }
            Response::new(body::full("finished"))
        }
    })
    .await;
    let mut process = Process::start(&format!(
        "upstreams:\n  slow: {{address: '{}'}}\n",
        upstream.addr
    ));
    let proxy = process.proxy;
    let in_flight = tokio::spawn(async move {
        let response = http1_client()
            .request(request_to(proxy, "slow", Method::GET, "/", ""))
            .await
            .unwrap();
        read_body(response).await
    });
    arrived.notified().await;

    process.signal("TERM");
    // The listener closes: new connections are refused.
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tokio::net::TcpStream::connect(proxy).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await;
    assert!(
        refused.is_ok(),
        "the proxy port still accepts connections after SIGTERM"
    );
    assert!(
        process.child.try_wait().unwrap().is_none(),
        "the process waits for the request in flight"
    );

    release_tx.send(()).unwrap();
    let (parts, body) = in_flight.await.unwrap();
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(body, "finished");
    let status = tokio::task::spawn_blocking(move || process.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--max-time",
            "10",
            "--dump-header",
            "/dev/stderr",
        ])
        .args(args)
        .output()
        .expect("curl is installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test]
async fn curl_through_http_proxy_and_h2c() {
    let upstream = HttpUpstream::echo().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  agent: {{address: '{}'}}\n  agent2: {{address: '{}', protocol: http2}}\n",
        upstream.addr, upstream.addr
    ))
    .await;
    let proxy = format!("http://{}", sidecar.proxy_addr);
    let (body, headers) = tokio::task::spawn_blocking(move || {
        curl(&[
            "--proxy",
            &proxy,
            "--data",
            "via HTTP_PROXY",
            "http://agent/submit",
        ])
    })
    .await
    .unwrap();
    assert_eq!(body, "via HTTP_PROXY");
    assert!(headers.starts_with("HTTP/1.1 200"), "{headers}");

    let url = format!("http://{}/h2", sidecar.proxy_addr);
    let (body, headers) = tokio::task::spawn_blocking(move || {
        curl(&[
            "--http2-prior-knowledge",
            "--header",
            "Host: agent2",
            "--data",
            "over h2c",
            &url,
        ])
    })
    .await
    .unwrap();
    assert_eq!(body, "over h2c");
    assert!(headers.starts_with("HTTP/2 200"), "{headers}");
    assert_eq!(upstream.requests(), 2);
}

#[tokio::test]
async fn sighup_reloads_and_an_invalid_file_keeps_the_old_config() {
    let upstream = HttpUpstream::echo().await;
    let head = "admin: {listen: 127.0.0.1:0}\nproxy: {listen: 127.0.0.1:0}\n";
    let process = Process::start_with(
        &format!("upstreams:\n  a: {{address: '{}'}}\n", upstream.addr),
        &["--reload-interval", "0"],
    );
    let status = |host: &'static str| {
        let proxy = process.proxy;
        async move { call(proxy, host, Method::GET, "/", "").await.0.status }
    };
    assert_eq!(status("b").await, StatusCode::NOT_FOUND);

    std::fs::write(
        process.config.path(),
        format!("{head}upstreams:\n  b: {{address: '{}'}}\n", upstream.addr),
    )
    .unwrap();
    process.signal("HUP");
    let event = process.wait_for_log("config reloaded");
    assert_eq!(event["generation"], 2);
    assert_eq!(status("b").await, StatusCode::OK);

    std::fs::write(
        process.config.path(),
        format!("{head}upstreams:\n  c: {{adress: x}}\n"),
    )
    .unwrap();
    process.signal("HUP");
    let event = process.wait_for_log("config reload refused");
    let message = event["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "{}:4:7: upstreams.c.adress: unknown field",
            process.config.path().display()
        )),
        "{message}"
    );
    assert_eq!(status("b").await, StatusCode::OK);
    let (_, metrics) = get(process.admin, "/metrics").await;
    assert!(
        metrics.contains("breakwater_config_generation 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("breakwater_config_reload_failures_total 1"),
        "{metrics}"
    );
}

#[test]
fn text_logs_to_a_pipe_have_no_colours() {
    let config = write_config("admin: {listen: '127.0.0.1:0'}\nproxy: {listen: '127.0.0.1:0'}\n");
    let mut child = Command::new(BIN)
        .args(["sidecar", "--config"])
        .arg(config.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("sidecar ready") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen.contains("sidecar ready"), "{seen}");
    assert!(
        !seen.contains('\u{1b}'),
        "no ANSI escapes in a pipe: {seen:?}"
    );
}
