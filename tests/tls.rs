//! TLS to upstreams, against real rustls servers with a CA made in the
//! test: HTTP/1.1 and HTTP/2 (gRPC) with ALPN, a private CA, SNI and the
//! verification name, client certificates, and each handshake failure
//! answered `tls-handshake` with its cause.

mod support;

use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use support::tls::{Negotiated, Pki, TlsUpstream};
use support::*;

fn upstream_yaml(addr: std::net::SocketAddr, protocol: &str, tls: &str) -> String {
    format!(
        "upstreams:\n  llm:\n    address: 'localhost:{}'\n    protocol: {protocol}\n    retry: {{max_attempts: 1}}\n    tls: {tls}\n",
        addr.port()
    )
}

fn ca(pki: &Pki) -> String {
    format!("{{ca_file: '{}'}}", pki.ca_file.display())
}

#[tokio::test]
async fn http1_over_tls_with_a_private_ca_offers_http1_and_sends_the_name() {
    let pki = Pki::new();
    let server = pki.sign("server", &["localhost"], false);
    let upstream = TlsUpstream::start(pki.server_config(&server, false)).await;
    let sidecar = sidecar(&upstream_yaml(upstream.addr, "http1", &ca(&pki))).await;
    let (parts, body) = call(sidecar.proxy_addr, "llm", Method::POST, "/v1/chat", "{}").await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(body, "over tls, HTTP/1.1");
    assert_eq!(
        upstream.negotiated(),
        [Negotiated {
            alpn: Some("http/1.1".into()),
            sni: Some("localhost".into()),
            client_certificate: false,
        }]
    );
    // The pooled connection is reused: one handshake for two calls.
    let (parts, _) = call(sidecar.proxy_addr, "llm", Method::GET, "/", "").await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(upstream.negotiated().len(), 1);
}

#[tokio::test]
async fn grpc_over_tls_negotiates_h2() {
    let pki = Pki::new();
    let server = pki.sign("server", &["localhost"], false);
    let upstream = TlsUpstream::start(pki.server_config(&server, false)).await;
    let sidecar = sidecar(&upstream_yaml(upstream.addr, "grpc", &ca(&pki))).await;
    let request = Request::post("http://llm/echo.Echo/Unary")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(breakwater::body::full(breakwater::grpc::frame(b"")))
        .unwrap();
    let mut h2 = h2_connect(sidecar.proxy_addr).await;
    let response = h2.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        !response.headers().contains_key("x-breakwater-error"),
        "{:?}",
        response.headers()
    );
    let collected = response.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
    assert_eq!(&collected.to_bytes()[..], b"\0\0\0\0\x04\x0a\x02ok");
    assert_eq!(upstream.negotiated()[0].alpn.as_deref(), Some("h2"));
}

async fn refused(yaml: &str) -> (http::response::Parts, String) {
    let sidecar = sidecar(yaml).await;
    let (parts, body) = call(sidecar.proxy_addr, "llm", Method::GET, "/", "").await;
    (parts, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_tls_handshake_failure_naming_the_ca() {
    let pki = Pki::new();
    let server = pki.sign("server", &["localhost"], false);
    let upstream = TlsUpstream::start(pki.server_config(&server, false)).await;
    // Mozilla's roots (the default) do not hold the test's CA, nor does
    // another CA.
    let other = Pki::new();
    for tls in ["{}".to_owned(), ca(&other)] {
        let (parts, body) = refused(&upstream_yaml(upstream.addr, "http1", &tls)).await;
        assert_eq!(parts.status, StatusCode::BAD_GATEWAY, "{tls}");
        assert_eq!(parts.headers["x-breakwater-error"], "tls-handshake");
        assert!(body.contains("not signed by a trusted CA"), "{body}");
    }
    assert!(upstream.negotiated().is_empty());
}

#[tokio::test]
async fn a_certificate_for_another_name_or_expired_is_refused_with_the_cause() {
    let pki = Pki::new();
    let server = pki.sign("server", &["localhost"], false);
    let upstream = TlsUpstream::start(pki.server_config(&server, false)).await;
    let tls = format!(
        "{{ca_file: '{}', server_name: api.example.com}}",
        pki.ca_file.display()
    );
    let (parts, body) = refused(&upstream_yaml(upstream.addr, "http1", &tls)).await;
    assert_eq!(parts.headers["x-breakwater-error"], "tls-handshake");
    assert!(body.contains("not valid for its name"), "{body}");

    let expired = pki.sign("expired", &["localhost"], true);
    let old = TlsUpstream::start(pki.server_config(&expired, false)).await;
    let (parts, body) = refused(&upstream_yaml(old.addr, "grpc", &ca(&pki))).await;
    assert_eq!(parts.status, StatusCode::BAD_GATEWAY);
    assert_eq!(parts.headers["x-breakwater-error"], "tls-handshake");
    assert!(body.contains("has expired"), "{body}");
}

#[tokio::test]
async fn mutual_tls_sends_the_client_certificate_and_is_refused_without_it() {
    let pki = Pki::new();
    let server = pki.sign("server", &["localhost"], false);
    let upstream = TlsUpstream::start(pki.server_config(&server, true)).await;
    let (parts, body) = refused(&upstream_yaml(upstream.addr, "http1", &ca(&pki))).await;
    assert_eq!(parts.headers["x-breakwater-error"], "tls-handshake");
    assert!(body.contains("client certificate"), "{body}");

    let client = pki.sign("client", &["agent"], false);
    let tls = format!(
        "{{ca_file: '{}', client_cert_file: '{}', client_key_file: '{}'}}",
        pki.ca_file.display(),
        client.cert_file.display(),
        client.key_file.display()
    );
    let sidecar = sidecar(&upstream_yaml(upstream.addr, "http1", &tls)).await;
    let (parts, body) = call(sidecar.proxy_addr, "llm", Method::GET, "/", "").await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(body, "over tls, HTTP/1.1");
    assert!(upstream.negotiated().iter().any(|n| n.client_certificate));
}

#[tokio::test]
async fn insecure_skip_verify_accepts_any_certificate() {
    let pki = Pki::new();
    let server = pki.sign("server", &["somewhere-else"], true);
    let upstream = TlsUpstream::start(pki.server_config(&server, false)).await;
    let sidecar = sidecar(&upstream_yaml(
        upstream.addr,
        "http1",
        "{insecure_skip_verify: true}",
    ))
    .await;
    let (parts, _) = call(sidecar.proxy_addr, "llm", Method::GET, "/", "").await;
    assert_eq!(parts.status, StatusCode::OK);
}

#[test]
fn tls_blocks_are_checked_with_their_position() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let yaml = format!(
        "upstreams:\n  a:\n    address: 'a:443'\n    tls: {{ca_file: missing.pem}}\n  b:\n    address: 'b:443'\n    tls: {{ca_file: '{}'}}\n  c:\n    address: 'c:443'\n    tls: {{client_cert_file: x.pem}}\n  d:\n    address: 'd:443'\n    tls: {{ca_file: x.pem, insecure_skip_verify: true}}\n",
        not_pem.display()
    );
    let error = breakwater::config::parse("p.yaml", &yaml)
        .unwrap_err()
        .to_string();
    assert!(error.contains("p.yaml:4:"), "{error}");
    assert!(error.contains("upstreams.a.tls"), "{error}");
    assert!(error.contains("missing.pem"), "{error}");
    assert!(error.contains("no PEM certificate"), "{error}");
    assert!(
        error.contains("give client_cert_file and client_key_file together"),
        "{error}"
    );
    assert!(
        error.contains("upstreams.d.tls.insecure_skip_verify"),
        "{error}"
    );
    let unknown = breakwater::config::parse(
        "p.yaml",
        "upstreams:\n  e:\n    address: 'e:443'\n    tls: {verify: false}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(unknown.contains("upstreams.e.tls"), "{unknown}");
    assert!(unknown.contains("verify"), "{unknown}");
}
