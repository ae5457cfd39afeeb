//! `CONNECT` (and upgrades) on the shared port, for clients set up with `HTTP_PROXY` or
//! `HTTPS_PROXY`: a tunnel to a host an upstream claims is served with the
//! upstream's policy (HTTP inside) or relayed to it (TLS inside); any
//! other host is refused 403. Driven by curl (`-p -x`), a client no one
//! here wrote.

mod support;

use support::tls::{Pki, TlsUpstream};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn curl(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new("curl")
        .args(["-sS", "-m", "10"])
        .args(args)
        .output()
        .await
        .unwrap()
}

fn intercepted(kind: &str) -> String {
    format!("breakwater_intercepted_connections_total{{kind=\"{kind}\"}}")
}

/// An echo upstream, `ok`, behind a sidecar.
async fn echo_sidecar() -> (HttpUpstream, breakwater::sidecar::Sidecar) {
    let echo = HttpUpstream::echo().await;
    let sidecar = sidecar(&format!("upstreams:\n  ok: {{address: '{}'}}\n", echo.addr)).await;
    (echo, sidecar)
}

/// Sends `bytes` to the shared port and reads the answer's head,
/// lowercased.
async fn answer_head(sidecar: &breakwater::sidecar::Sidecar, bytes: &[u8]) -> String {
    answer_head_at(sidecar.proxy_addr, bytes).await
}

/// Sends `bytes` to `addr` and reads the answer's head, lowercased.
async fn answer_head_at(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut head = vec![0u8; 4096];
    let n = stream.read(&mut head).await.unwrap();
    String::from_utf8_lossy(&head[..n]).to_ascii_lowercase()
}

#[tokio::test]
async fn a_tunnel_to_an_upstream_gets_its_policy_inside() {
    let (echo, sidecar) = echo_sidecar().await;
    let proxy = format!("http://{}", sidecar.proxy_addr);
    let out = curl(&[
        "-p",
        "-x",
        &proxy,
        "-d",
        "through the tunnel",
        "http://ok/echo",
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "through the tunnel");
    let admin = sidecar.admin_addr;
    assert_eq!(metric_value(admin, &intercepted("connect-http")).await, 1.0);
    assert_eq!(
        metric_value(
            admin,
            "breakwater_requests_total{upstream=\"ok\",outcome=\"success\"}"
        )
        .await,
        1.0,
        "the request inside went through the upstream's stack"
    );
    assert_eq!(echo.requests(), 1);
}

#[tokio::test]
async fn a_tunnel_to_an_unclaimed_host_is_refused_403() {
    let (echo, sidecar) = echo_sidecar().await;
    let head = answer_head(
        &sidecar,
        b"CONNECT elsewhere.example:443 HTTP/1.1\r\nHost: elsewhere.example:443\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("http/1.1 403"), "{head}");
    assert!(head.contains("x-breakwater-error: unknown-host"), "{head}");
    assert_eq!(
        metric_value(sidecar.admin_addr, &intercepted("connect-refused")).await,
        1.0
    );
    assert_eq!(echo.requests(), 0);

    let out = curl(&[
        "-p",
        "-x",
        &format!("http://{}", sidecar.proxy_addr),
        "http://elsewhere.example/",
    ])
    .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("403"),
        "{out:?}"
    );
}

#[tokio::test]
async fn tls_inside_a_tunnel_is_relayed_to_the_upstream_untouched() {
    let pki = Pki::new();
    let server = pki.sign("server", &["localhost"], false);
    let upstream = TlsUpstream::start(pki.server_config(&server, false)).await;
    let port = upstream.addr.port();
    let sidecar = sidecar(&format!(
        "upstreams:\n  secure: {{address: 'localhost:{port}'}}\n"
    ))
    .await;
    let out = curl(&[
        "-x",
        &format!("http://{}", sidecar.proxy_addr),
        "--cacert",
        pki.ca_file.to_str().unwrap(),
        &format!("https://localhost:{port}/"),
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("over tls"),
        "{out:?}"
    );
    let negotiated = upstream.negotiated();
    assert_eq!(negotiated.len(), 1);
    assert_eq!(
        negotiated[0].sni.as_deref(),
        Some("localhost"),
        "the caller's own handshake"
    );
    assert_eq!(
        metric_value(sidecar.admin_addr, &intercepted("connect-tls")).await,
        1.0
    );
}

/// grpcio honours `http_proxy` with a CONNECT tunnel; its h2c inside is
/// served with the upstream's policy. (Before, the sidecar answered 405 and
/// grpcio failed with `UNAVAILABLE ... HTTP proxy returned response code
/// 405`.)
#[tokio::test]
async fn grpcio_with_http_proxy_set_calls_through_a_tunnel() {
    let Some(python) = support::python::python("grpc") else {
        return;
    };
    let grpc = GrpcUpstream::start().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  echo: {{address: '{}', protocol: grpc}}\n",
        grpc.addr
    ))
    .await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/grpc_proxy.py");
    let out = tokio::process::Command::new(python)
        .args([script, "echo:50051", "hello"])
        .env("http_proxy", format!("http://{}", sidecar.proxy_addr))
        .env_remove("grpc_proxy")
        .env_remove("https_proxy")
        .env_remove("no_proxy")
        .output()
        .await
        .unwrap();
    let said: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{out:?}"));
    assert_eq!(said["code"], "OK", "{said}");
    assert_eq!(said["payload"], "hello");
    let admin = sidecar.admin_addr;
    assert_eq!(metric_value(admin, &intercepted("connect-http")).await, 1.0);
    assert_eq!(
        metric_value(
            admin,
            "breakwater_requests_total{upstream=\"echo\",outcome=\"success\"}"
        )
        .await,
        1.0
    );
}

/// A real WebSocket echo (the `websockets` library) behind a sidecar.
struct WebSocketEcho {
    python: std::path::PathBuf,
    server: tokio::process::Child,
    port: u16,
}

/// A WebSocket handshake, raw, for the sidecar to answer itself (`Host`
/// names the only upstream of each test).
const WS_HANDSHAKE: &[u8] = b"GET /chat HTTP/1.1\r\nHost: ok\r\nConnection: Upgrade\r\n\
    Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

const WS_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/python/websocket_echo.py"
);

impl WebSocketEcho {
    async fn start() -> Option<Self> {
        let python = support::python::python("websockets")?;
        let mut server = tokio::process::Command::new(&python)
            .args([WS_SCRIPT, "server"])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = server.stdout.take().unwrap();
        let mut line = String::new();
        tokio::io::AsyncBufReadExt::read_line(&mut tokio::io::BufReader::new(stdout), &mut line)
            .await
            .unwrap();
        let port = line.trim().parse().unwrap();
        Some(Self {
            python,
            server,
            port,
        })
    }

    async fn client(&self, url: &str) -> serde_json::Value {
        let out = tokio::process::Command::new(&self.python)
            .args([WS_SCRIPT, "client", url])
            .output()
            .await
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{out:?}"))
    }
}

/// A WebSocket goes through the sidecar to its upstream, both real
/// `websockets` peers: the handshake with the caller's headers (and the
/// sidecar's `Host`), then messages both ways, byte for byte. A refusal is
/// passed back as the upstream gave it.
#[tokio::test]
async fn a_websocket_is_relayed_to_its_upstream() {
    let Some(mut echo) = WebSocketEcho::start().await else {
        return;
    };
    let sidecar = sidecar(&format!(
        "upstreams:\n  chat: {{address: '127.0.0.1:{}', listen: '127.0.0.1:0'}}\n",
        echo.port
    ))
    .await;
    let port = sidecar.upstream_addrs["chat"].port();
    let said = echo
        .client(&format!("ws://127.0.0.1:{port}/chat?room=7"))
        .await;
    assert_eq!(said["first"]["path"], "/chat?room=7", "{said}");
    assert_eq!(said["first"]["agent"], "invoice-7");
    assert_eq!(said["first"]["host"], format!("127.0.0.1:{}", echo.port));
    assert_eq!(said["text"], "hello");
    assert_eq!(said["binary_equal"], true);
    let refused = echo
        .client(&format!("ws://127.0.0.1:{port}/forbidden"))
        .await;
    assert_eq!(refused["status"], 403, "{refused}");
    let admin = sidecar.admin_addr;
    assert_eq!(
        metric_value(
            admin,
            "breakwater_requests_total{upstream=\"chat\",outcome=\"success\"}"
        )
        .await,
        2.0
    );
    // The upstream gone: the handshake fails as any call does, no silent
    // downgrade to a plain request.
    echo.server.kill().await.unwrap();
    echo.server.wait().await.unwrap();
    let head = answer_head_at(sidecar.upstream_addrs["chat"], WS_HANDSHAKE).await;
    assert!(head.starts_with("http/1.1 502"), "{head}");
    assert!(
        head.contains("x-breakwater-error: connect-failure"),
        "{head}"
    );
}

/// An upgrade to an HTTP/2 upstream is refused with a reason, not
/// forwarded as a plain request with its `Upgrade` dropped.
#[tokio::test]
async fn a_websocket_to_an_http2_upstream_is_refused_not_silently_downgraded() {
    let grpc = GrpcUpstream::start().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  ok: {{address: '{}', protocol: grpc}}\n",
        grpc.addr
    ))
    .await;
    let head = answer_head(&sidecar, WS_HANDSHAKE).await;
    assert!(head.starts_with("http/1.1 501"), "{head}");
    assert!(
        head.contains("x-breakwater-error: unsupported-upgrade"),
        "{head}"
    );
}

/// `requests` with `HTTPS_PROXY` set opens a CONNECT tunnel; the TLS
/// inside is the caller's own, relayed to the upstream.
#[tokio::test]
async fn requests_with_https_proxy_set_reaches_a_tls_upstream_through_a_tunnel() {
    let Some(python) = support::python::python("requests") else {
        return;
    };
    let pki = Pki::new();
    let server = pki.sign("server", &["localhost"], false);
    let upstream = TlsUpstream::start(pki.server_config(&server, false)).await;
    let port = upstream.addr.port();
    let sidecar = sidecar(&format!(
        "upstreams:\n  secure: {{address: 'localhost:{port}'}}\n"
    ))
    .await;
    let script = "import requests, sys\nr = requests.get(sys.argv[1], verify=sys.argv[2], timeout=10)\nprint(r.status_code, r.text)";
    let out = tokio::process::Command::new(python)
        .args([
            "-c",
            script,
            &format!("https://localhost:{port}/"),
            pki.ca_file.to_str().unwrap(),
        ])
        .env("HTTPS_PROXY", format!("http://{}", sidecar.proxy_addr))
        .env_remove("https_proxy")
        .env_remove("no_proxy")
        .env_remove("NO_PROXY")
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with("200 ") && said.contains("over tls"),
        "{out:?}"
    );
    assert_eq!(upstream.negotiated()[0].sni.as_deref(), Some("localhost"));
    assert_eq!(
        metric_value(sidecar.admin_addr, &intercepted("connect-tls")).await,
        1.0
    );
}
