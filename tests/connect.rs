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
    let mut stream = tokio::net::TcpStream::connect(sidecar.proxy_addr)
        .await
        .unwrap();
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

/// A WebSocket upgrade is refused with a reason, not forwarded as a plain
/// GET with its `Upgrade` dropped.
#[tokio::test]
async fn a_websocket_upgrade_is_refused_not_silently_downgraded() {
    let (echo, sidecar) = echo_sidecar().await;
    let head = answer_head(
        &sidecar,
        b"GET /chat HTTP/1.1\r\nHost: ok\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("http/1.1 501"), "{head}");
    assert!(
        head.contains("x-breakwater-error: unsupported-upgrade"),
        "{head}"
    );
    assert_eq!(echo.requests(), 0, "nothing reached the upstream");
}
