//! The control plane over TLS, with a CA made in the test: the CLI and the
//! sidecar's dead-letter shipper reach it at `https://` URLs and verify it,
//! curl reads its JSON API over TLS, and every mismatch fails with words
//! that say what is wrong: an untrusted certificate, `https://` against a
//! plaintext port, a CA file for a plaintext URL. Never plaintext when the
//! URL says https.

mod support;

use breakwater::cli::{CliError, Remote};
use breakwater::transport::tls::server::{ServerTls, TlsFiles};
use http::{Method, StatusCode};
use support::tls::Pki;
use support::*;

async fn tls_control_plane(pki: &Pki) -> (tempfile::TempDir, breakwater::control::Running) {
    let dir = tempfile::tempdir().unwrap();
    let signed = pki.sign("control-plane", &["localhost"], false);
    let mut options = control_options(dir.path());
    options.tls = Some(
        ServerTls::load(TlsFiles {
            cert: signed.cert_file,
            key: signed.key_file,
        })
        .unwrap(),
    );
    let running = start_control_plane(options).await;
    (dir, running)
}

fn remote(url: String, ca_file: Option<&std::path::Path>) -> Remote {
    Remote {
        url,
        token_file: None,
        ca_file: ca_file.map(Into::into),
        json: true,
    }
}

async fn get(remote: &Remote) -> Result<(), CliError> {
    breakwater::cli::get(remote, "inv-1".into(), 0).await
}

#[tokio::test]
async fn the_cli_verifies_a_tls_control_plane_and_says_why_it_cannot() {
    let pki = Pki::new();
    let (_dir, running) = tls_control_plane(&pki).await;
    let url = format!("https://localhost:{}", running.grpc_addr.port());

    // Trusted: the call reaches the control plane, which has no such
    // workflow.
    match get(&remote(url.clone(), Some(&pki.ca_file))).await {
        Err(CliError::Status(status)) => assert_eq!(status.code(), tonic::Code::NotFound),
        other => panic!("expected NOT_FOUND from the control plane: {other:?}"),
    }
    // Mozilla's roots do not know the test's CA.
    let error = get(&remote(url, None)).await.unwrap_err().to_string();
    assert!(
        error.contains("not signed by a trusted CA") && error.contains("--ca-file"),
        "{error}"
    );
    // Plaintext against the TLS port never gets an answer.
    let plain = format!("http://127.0.0.1:{}", running.grpc_addr.port());
    match get(&remote(plain.clone(), None)).await {
        Err(CliError::Connect { .. }) => {}
        Err(CliError::Status(status)) => assert!(
            matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown
            ),
            "a transport failure, not an answer: {status:?}"
        ),
        other => panic!("plaintext to a TLS port: {other:?}"),
    }
    // A CA file with a plaintext URL is a mistake, said before connecting.
    let error = get(&remote(plain, Some(&pki.ca_file)))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("would be plaintext"), "{error}");
    running.shutdown().await;
}

#[tokio::test]
async fn https_against_a_plaintext_control_plane_is_refused_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_control_plane(control_options(dir.path())).await;
    let url = format!("https://localhost:{}", running.grpc_addr.port());
    let pki = Pki::new();
    let error = get(&remote(url, Some(&pki.ca_file)))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("plaintext (http://)"), "{error}");
    running.shutdown().await;
}

#[tokio::test]
async fn the_json_api_speaks_tls_and_the_admin_port_stays_plaintext() {
    let pki = Pki::new();
    let (_dir, running) = tls_control_plane(&pki).await;
    let http = running.http_addr.unwrap();
    let mut curl = std::process::Command::new("curl");
    curl.args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&pki.ca_file)
        .arg(format!(
            "https://localhost:{}/v1/checkpoints/inv-1",
            http.port()
        ))
        .args(["-o", "/dev/null", "-w", "%{http_code} %{http_version}"]);
    let output = tokio::task::spawn_blocking(move || curl.output().expect("curl runs"))
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "404 2",
        "over TLS, HTTP/2 by ALPN: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let admin = running.admin_addr.unwrap();
    let (parts, _) = call(admin, "localhost", Method::GET, "/healthz", "").await;
    assert_eq!(parts.status, StatusCode::OK);
    running.shutdown().await;
}

#[tokio::test]
async fn the_sidecar_ships_dead_letters_over_tls() {
    let pki = Pki::new();
    let (dir, running) = tls_control_plane(&pki).await;
    let down = HttpUpstream::start(|_req: http::Request<hyper::body::Incoming>| async {
        answer(503, &[], "down")
    })
    .await;
    let sidecar = sidecar(&format!(
        "control_plane: {{url: 'https://localhost:{}', ca_file: '{}'}}\ndead_letters: {{spool_dir: '{}'}}\nupstreams:\n  orders:\n    address: '{}'\n    dead_letter: true\n    retry: {{max_attempts: 1}}\n",
        running.grpc_addr.port(),
        pki.ca_file.display(),
        dir.path().join("spool").display(),
        down.addr
    ))
    .await;
    let (parts, _) = call(sidecar.proxy_addr, "orders", Method::POST, "/orders", "{}").await;
    assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE);
    let series = "breakwater_dead_letters_delivered_total{upstream=\"orders\"}";
    eventually(std::time::Duration::from_secs(10), series, || async {
        (metric(sidecar.admin_addr, series).await == Some(1.0)).then_some(())
    })
    .await;
    running.shutdown().await;
}

#[test]
fn a_control_plane_ca_file_is_checked_with_the_policy() {
    let error = breakwater::config::parse(
        "p.yaml",
        "control_plane: {url: 'https://cp:7070', ca_file: /nonexistent/ca.pem}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("p.yaml:1:") && error.contains("/nonexistent/ca.pem"),
        "{error}"
    );
}
