//! Dead letters end to end: a request that finally fails reaches the
//! control plane with its content and without credentials; while the
//! control plane is down it waits in the sidecar's spool, across a sidecar
//! restart; a replay delivers it once the upstream is healthy.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use breakwater::api::dead_letters_client::DeadLettersClient;
use breakwater::api::{
    DeadLetter, EnqueueDeadLetterRequest, Header, ListDeadLettersRequest, ReplayDeadLetterRequest,
};
use breakwater::control::Running;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use support::*;
use tonic::transport::Channel;

async fn control_plane(dir: &Path, listen: SocketAddr, yaml: Option<&str>) -> Running {
    let mut options = control_options(dir);
    options.listen = listen;
    options.policies = yaml.map(policies);
    start_control_plane(options).await
}

async fn letters(addr: SocketAddr) -> Vec<DeadLetter> {
    letters_as(addr, None).await
}

/// Every letter the control plane at `addr` holds, asked with `token`.
async fn letters_as(addr: SocketAddr, token: Option<&str>) -> Vec<DeadLetter> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let token: Option<tonic::metadata::MetadataValue<_>> =
        token.map(|t| format!("Bearer {t}").parse().unwrap());
    let mut client =
        DeadLettersClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
            if let Some(token) = &token {
                r.metadata_mut().insert("authorization", token.clone());
            }
            Ok(r)
        });
    client
        .list(ListDeadLettersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .letters
}

/// Waits (up to 10 s) until a sidecar has delivered its whole spool and
/// the control plane holds `n` letters, then checks that it holds exactly
/// `n`: a letter delivered twice arrives before the spool is empty, so it
/// is seen.
async fn delivered(addr: SocketAddr, sidecar_admin: SocketAddr, n: usize) -> Vec<DeadLetter> {
    delivered_from("orders", addr, sidecar_admin, n).await
}

/// As [`delivered`], for letters of `upstream`.
async fn delivered_from(
    upstream: &str,
    addr: SocketAddr,
    sidecar_admin: SocketAddr,
    n: usize,
) -> Vec<DeadLetter> {
    let spooled = format!("breakwater_dead_letter_spool{{upstream=\"{upstream}\"}}");
    let letters = eventually(Duration::from_secs(10), "letters delivered", || async {
        let drained = metric(sidecar_admin, &spooled).await == Some(0.0);
        let letters = letters(addr).await;
        (drained && letters.len() >= n).then_some(letters)
    })
    .await;
    assert_eq!(letters.len(), n, "each letter delivered once");
    letters
}

/// Waits (up to 10 s) until a sidecar metric has `value`.
async fn wait_for_metric(admin: SocketAddr, series: &str, value: f64) {
    let what = format!("{series} = {value}");
    eventually(Duration::from_secs(10), &what, || async {
        (metric(admin, series).await == Some(value)).then_some(())
    })
    .await;
}

fn sidecar_yaml(control_plane: SocketAddr, spool: &Path, upstream: SocketAddr) -> String {
    format!(
        "control_plane: {{url: 'http://{control_plane}'}}\ndead_letters: {{spool_dir: '{}', redact_headers: [x-internal-token]}}\nupstreams:\n  orders:\n    address: '{upstream}'\n    dead_letter: true\n    retry: {{max_attempts: 2, backoff: {{base: 1ms}}, retry_non_idempotent: true}}\n",
        spool.display()
    )
}

fn order() -> Request<breakwater::body::Body> {
    Request::post("/orders?batch=7")
        .header("host", "orders")
        .header("content-type", "application/json")
        .header("authorization", "Bearer agent-secret")
        .header("cookie", "session=1")
        .header("x-api-key", "k-123")
        .header("api-key", "azure-k")
        .header("x-goog-api-key", "g-k")
        .header("x-internal-token", "t-1")
        .header("x-invoice", "INV-17")
        .body(breakwater::body::full(r#"{"po": "PO-9", "amount": 1200}"#))
        .unwrap()
}

async fn send(addr: SocketAddr, request: Request<breakwater::body::Body>) -> StatusCode {
    let mut conn = h1_connect(addr).await;
    let response = conn.send_request(request).await.unwrap();
    let status = response.status();
    let _ = response.into_body().collect().await;
    status
}

#[tokio::test]
async fn a_finally_failed_request_reaches_the_control_plane_without_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let running = control_plane(&dir.path().join("cp"), "127.0.0.1:0".parse().unwrap(), None).await;
    let upstream = HttpUpstream::start(|request: Request<Incoming>| async move {
        // Reads the body, as a real service would, then fails.
        let _ = request.into_body().collect().await;
        answer(503, &[], "down")
    })
    .await;
    let sidecar = sidecar(&sidecar_yaml(
        running.grpc_addr,
        &dir.path().join("spool"),
        upstream.addr,
    ))
    .await;

    assert_eq!(
        send(sidecar.proxy_addr, order()).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let letters = delivered(running.grpc_addr, sidecar.admin_addr, 1).await;
    let letter = &letters[0];
    assert_eq!(letter.upstream, "orders");
    assert_eq!(
        (letter.method.as_str(), letter.uri.as_str()),
        ("POST", "/orders?batch=7")
    );
    assert_eq!(letter.body, r#"{"po": "PO-9", "amount": 1200}"#);
    assert!(!letter.body_truncated);
    assert_eq!((letter.reason.as_str(), letter.attempts), ("http-503", 2));
    let names: Vec<&str> = letter.headers.iter().map(|h| h.name.as_str()).collect();
    for secret in [
        "authorization",
        "cookie",
        "x-api-key",
        "api-key",
        "x-goog-api-key",
        "x-internal-token",
    ] {
        assert!(!names.contains(&secret), "{secret} leaked: {names:?}");
    }
    assert!(
        names.contains(&"x-invoice") && names.contains(&"content-type"),
        "{names:?}"
    );
    assert!(letter.failed_at.is_some() && letter.enqueued_at.is_some());
    assert_eq!(upstream.requests(), 2);
    wait_for_metric(
        sidecar.admin_addr,
        "breakwater_dead_letters_delivered_total{upstream=\"orders\"}",
        1.0,
    )
    .await;
    running.shutdown().await;
}

#[tokio::test]
async fn letters_wait_in_the_spool_across_a_restart_until_the_control_plane_is_back() {
    let dir = tempfile::tempdir().unwrap();
    // A port for the control plane, which is not running yet.
    let cp_addr = free_port().await;
    let spool = dir.path().join("spool");
    let yaml = sidecar_yaml(cp_addr, &spool, closed_port().await);
    let spooled = "breakwater_dead_letter_spool{upstream=\"orders\"}";

    let first = sidecar(&yaml).await;
    // The upstream is unreachable too: it never read the body, which is
    // still captured whole.
    assert_eq!(
        send(first.proxy_addr, order()).await,
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(
        send(first.proxy_addr, order()).await,
        StatusCode::BAD_GATEWAY
    );
    wait_for_metric(first.admin_addr, spooled, 2.0).await;
    first.shutdown().await;

    let second = sidecar(&yaml).await;
    assert_eq!(
        metric_value(second.admin_addr, spooled).await,
        2.0,
        "the spool survived"
    );
    let running = control_plane(&dir.path().join("cp"), cp_addr, None).await;
    let letters = delivered(running.grpc_addr, second.admin_addr, 2).await;
    for letter in &letters {
        assert_eq!(letter.reason, "connect-failure");
        assert_eq!(letter.body, r#"{"po": "PO-9", "amount": 1200}"#);
    }
    wait_for_metric(second.admin_addr, spooled, 0.0).await;
    running.shutdown().await;
}

/// An upstream that reads each body and answers 503 until its flag is set,
/// then 201.
async fn recovering_upstream() -> (HttpUpstream, Arc<AtomicBool>) {
    let healthy = Arc::new(AtomicBool::new(false));
    let flag = healthy.clone();
    let upstream = HttpUpstream::start(move |request: Request<Incoming>| {
        let healthy = flag.load(Ordering::SeqCst);
        async move {
            let _ = request.into_body().collect().await;
            match healthy {
                true => answer(201, &[], "created"),
                false => answer(503, &[], "down"),
            }
        }
    })
    .await;
    (upstream, healthy)
}

#[tokio::test]
async fn a_replay_delivers_once_the_upstream_is_healthy() {
    let (upstream, healthy) = recovering_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let policies = format!(
        "upstreams:\n  orders: {{address: '{}', retry: {{max_attempts: 1}}}}\n",
        upstream.addr
    );
    let running = control_plane(dir.path(), "127.0.0.1:0".parse().unwrap(), Some(&policies)).await;
    let channel = Channel::from_shared(format!("http://{}", running.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = DeadLettersClient::new(channel);
    let letter = DeadLetter {
        upstream: "orders".into(),
        method: "POST".into(),
        uri: "/orders".into(),
        headers: vec![Header {
            name: "idempotency-key".into(),
            value: Bytes::from_static(b"order-9"),
        }],
        body: Bytes::from_static(b"{\"po\": \"PO-9\"}"),
        reason: "http-503".into(),
        ..Default::default()
    };
    let id = client
        .enqueue(EnqueueDeadLetterRequest {
            letter: Some(letter),
        })
        .await
        .unwrap()
        .into_inner()
        .id;

    let failed = client
        .replay(ReplayDeadLetterRequest {
            id: id.clone(),
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!failed.delivered);
    assert_eq!(failed.status, 503);
    let kept = letters(running.grpc_addr).await;
    assert_eq!(kept.len(), 1, "a failed replay keeps the letter");
    assert_eq!(kept[0].replays, 1);
    assert_eq!(kept[0].last_replay_error, "the upstream answered HTTP 503");

    healthy.store(true, Ordering::SeqCst);
    let delivered = client
        .replay(ReplayDeadLetterRequest {
            id: id.clone(),
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(delivered.delivered, "{delivered:?}");
    assert_eq!(delivered.status, 201);
    assert!(
        letters(running.grpc_addr).await.is_empty(),
        "a delivered letter is removed"
    );
    let seen = upstream.last_seen();
    assert_eq!(seen.uri.path(), "/orders");
    assert_eq!(seen.headers["idempotency-key"], "order-9");
    assert_eq!(seen.headers["x-breakwater-replay"], id.as_str());

    let status = client
        .replay(ReplayDeadLetterRequest { id, force: false })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    running.shutdown().await;
}

#[tokio::test]
async fn the_cli_and_the_json_api_list_show_replay_and_purge() {
    const BIN: &str = env!("CARGO_BIN_EXE_breakwater");
    let dir = tempfile::tempdir().unwrap();
    let policies = format!(
        "upstreams:\n  orders: {{address: '{}'}}\n",
        closed_port().await
    );
    let running = control_plane(dir.path(), "127.0.0.1:0".parse().unwrap(), Some(&policies)).await;
    let http = running.http_addr.unwrap();
    for uri in ["/a", "/b"] {
        let body = format!(
            r#"{{"upstream": "orders", "method": "POST", "uri": "{uri}", "body": "x", "reason": "connect-failure", "attempts": 3}}"#
        );
        let (parts, answer) = admin(http, Method::POST, "/v1/dead-letters", body).await;
        assert_eq!(parts.status, StatusCode::OK, "{answer:?}");
    }
    let (parts, _) = admin(
        http,
        Method::POST,
        "/v1/dead-letters",
        r#"{"upstream": "orders", "method": "BAD METHOD", "uri": "/"}"#,
    )
    .await;
    assert_eq!(parts.status, StatusCode::BAD_REQUEST);

    let url = format!("http://{}", running.grpc_addr);
    let cli = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let url = url.clone();
        async move {
            tokio::process::Command::new(BIN)
                .arg("dlq")
                .args(&args)
                .args(["--control-plane", &url])
                .output()
                .await
                .unwrap()
        }
    };
    let out = cli(&["list"]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("ID"), "{table}");
    assert!(
        table.contains("POST /a") && table.contains("connect-failure"),
        "{table}"
    );
    // A reader that has gone (`| head`): the command ends quietly.
    for format in [None, Some("--json")] {
        let mut command = tokio::process::Command::new(BIN);
        command
            .arg("dlq")
            .arg("list")
            .args(format)
            .args(["--control-plane", &url])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = command.spawn().unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{format:?}: {:?} {stderr}",
            out.status
        );
        assert!(stderr.is_empty(), "{format:?}: {stderr}");
    }
    let listed = admin_json(http, "/v1/dead-letters?upstream=orders").await;
    let first = listed["letters"][0]["id"].as_str().unwrap().to_owned();
    let out = cli(&["show", &first, "--json"]).await;
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["uri"], "/a");
    assert_eq!(shown["attempts"], 3);

    // The upstream is down: the replay fails, the letters stay.
    let out = cli(&["replay", "--upstream", "orders"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("0 of 2 delivered; 2 stay in the queue"),
        "{out:?}"
    );
    assert_eq!(
        admin_json(http, &format!("/v1/dead-letters/{first}")).await["replays"],
        1
    );
    // One letter: its line says what happened, once.
    let out = cli(&["replay", &first]).await;
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with(&format!("{first}: failed again: ")),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: 1 letter was not delivered and stays in the queue"
    );

    let out = cli(&["purge", &first]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1 letter purged\n");

    // A gRPC letter: its message by field numbers, or by names with the
    // service's descriptors.
    let message = prost::Message::encode_to_vec(&breakwater::echo::EchoRequest {
        payload: bytes::Bytes::from_static(b"hi"),
        repeat: 3,
        ..Default::default()
    });
    let mut framed = vec![0, 0, 0, 0, message.len() as u8];
    framed.extend_from_slice(&message);
    let body = serde_json::json!({
        "upstream": "orders", "method": "POST", "uri": "/breakwater.echo.v1.Echo/Unary",
        "grpc": true, "reason": "timeout", "attempts": 1,
        "body_base64": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &framed),
    });
    let (parts, answer) = admin(http, Method::POST, "/v1/dead-letters", body.to_string()).await;
    assert_eq!(parts.status, StatusCode::OK, "{answer:?}");
    let grpc_id = serde_json::from_slice::<serde_json::Value>(&answer).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = cli(&["show", &grpc_id]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("    1: \"hi\"\n    2: 3"), "{text}");
    let descriptors = dir.path().join("echo.binpb");
    std::fs::write(&descriptors, breakwater::EXAMPLE_DESCRIPTOR_SET).unwrap();
    let out = cli(&[
        "show",
        &grpc_id,
        "--descriptors",
        descriptors.to_str().unwrap(),
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "message 0 ({} bytes, breakwater.echo.v1.EchoRequest)\n    payload: \"hi\"\n    repeat: 3",
            message.len()
        )),
        "{text}"
    );
    let out = cli(&[
        "show",
        &grpc_id,
        "--descriptors",
        dir.path().to_str().unwrap(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read the descriptors"),
        "{out:?}"
    );

    let (parts, answer) = admin(http, Method::DELETE, "/v1/dead-letters?all=true", "").await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&answer).unwrap()["purged"],
        2
    );
    assert!(letters(running.grpc_addr).await.is_empty());
    running.shutdown().await;
}

/// A replay request for `id`.
fn replay(id: &str, force: bool) -> ReplayDeadLetterRequest {
    ReplayDeadLetterRequest {
        id: id.to_owned(),
        force,
    }
}

/// Letters sealed by the sidecar replay; a letter enqueued by hand, one
/// altered after its capture, and one whose body was cut are refused
/// (counted, and kept) unless forced.
#[tokio::test]
async fn only_letters_sealed_by_a_sidecar_replay_unless_forced() {
    let (upstream, healthy) = recovering_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("letter.key");
    std::fs::write(&key_file, "k3y-shared-by-sidecars-and-control-plane\n").unwrap();
    let policies_yaml = format!(
        "upstreams:\n  orders: {{address: '{}', retry: {{max_attempts: 1}}}}\n",
        upstream.addr
    );
    let mut options = control_options(&dir.path().join("cp"));
    options.policies = Some(policies(&policies_yaml));
    options.letter_key = Some(breakwater::api::seal::LetterKey::read(&key_file).unwrap());
    let running = start_control_plane(options).await;
    let yaml = sidecar_yaml(running.grpc_addr, &dir.path().join("spool"), upstream.addr).replace(
        "control_plane: {",
        &format!(
            "control_plane: {{letter_key_file: '{}', ",
            key_file.display()
        ),
    );
    let sidecar = sidecar(&yaml).await;
    assert_eq!(
        send(sidecar.proxy_addr, order()).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let captured = delivered(running.grpc_addr, sidecar.admin_addr, 1)
        .await
        .remove(0);
    assert_eq!(captured.seal.len(), 32, "HMAC-SHA256 seal");

    let channel = Channel::from_shared(format!("http://{}", running.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = DeadLettersClient::new(channel);
    let enqueue = |letter: DeadLetter| EnqueueDeadLetterRequest {
        letter: Some(letter),
    };
    // By hand: no seal. Altered: the captured letter sent elsewhere, its
    // seal kept. Cut: sealed, but its body is not whole.
    let by_hand = DeadLetter {
        capture_id: String::new(),
        seal: Bytes::new(),
        ..captured.clone()
    };
    let altered = DeadLetter {
        uri: "/refunds".into(),
        capture_id: "altered".into(),
        ..captured.clone()
    };
    let mut cut = DeadLetter {
        body_truncated: true,
        capture_id: "cut".into(),
        ..captured.clone()
    };
    let key = breakwater::api::seal::LetterKey::read(&key_file).unwrap();
    cut.seal = key.seal(&cut);
    let mut ids = Vec::new();
    for letter in [by_hand, altered, cut] {
        ids.push(
            client
                .enqueue(enqueue(letter))
                .await
                .unwrap()
                .into_inner()
                .id,
        );
    }

    healthy.store(true, Ordering::SeqCst);
    let why = ["has no seal", "seal does not match", "body was cut"];
    for (id, why) in ids.iter().zip(why) {
        let status = client.replay(replay(id, false)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(status.message().contains(why), "{}", status.message());
        assert!(status.message().contains("--force"), "{}", status.message());
    }
    assert_eq!(upstream.requests(), 2, "nothing refused was sent");
    let admin = running.admin_addr.unwrap();
    let refused = "breakwater_dead_letter_replays_total{result=\"refused\"}";
    assert_eq!(metric(admin, refused).await, Some(3.0));
    assert_eq!(
        letters(running.grpc_addr).await.len(),
        4,
        "refused letters stay"
    );

    let sealed = client
        .replay(replay(&captured.id, false))
        .await
        .unwrap()
        .into_inner();
    assert!(sealed.delivered, "{sealed:?}");
    let forced = client
        .replay(replay(&ids[0], true))
        .await
        .unwrap()
        .into_inner();
    assert!(forced.delivered, "{forced:?}");
    assert_eq!(upstream.requests(), 4);
    assert_eq!(letters(running.grpc_addr).await.len(), 2);

    // The CLI says which were refused and goes on with the others.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["dlq", "replay", "--all", "--control-plane"])
        .arg(format!("http://{}", running.grpc_addr))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        stdout.contains(&format!("{}: refused: ", ids[1])),
        "{stdout}"
    );
    assert!(
        stdout.contains("0 of 2 delivered; 2 stay in the queue"),
        "{stdout}"
    );
    running.shutdown().await;
}

/// A sidecar whose token file is missing starts anyway (`config check`
/// warns of it), keeps its letters in the spool while the control plane
/// refuses it, says so in `/readyz` and a metric, and delivers them once
/// the token is mounted.
#[tokio::test]
async fn a_missing_token_file_keeps_letters_spooled_until_the_token_is_mounted() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = control_options(&dir.path().join("cp"));
    options.auth = breakwater::control::auth::Auth::with_token("s3cret").unwrap();
    let running = start_control_plane(options).await;
    let token = dir.path().join("token");
    let yaml = format!(
        "control_plane: {{url: 'http://{}', token_file: '{}'}}\ndead_letters: {{spool_dir: '{}'}}\nupstreams:\n  orders:\n    address: '{}'\n    dead_letter: true\n",
        running.grpc_addr,
        token.display(),
        dir.path().join("spool").display(),
        closed_port().await
    );
    let file = dir.path().join("policies.yaml");
    std::fs::write(&file, &yaml).unwrap();
    let check = tokio::process::Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["config", "check"])
        .arg(&file)
        .output()
        .await
        .unwrap();
    assert!(check.status.success(), "a warning, not an error");
    let warning = String::from_utf8(check.stderr).unwrap();
    assert!(
        warning.contains("control_plane.token_file: warning: cannot read the token file"),
        "{warning}"
    );

    let sidecar = sidecar(&yaml).await;
    assert_eq!(
        send(sidecar.proxy_addr, order()).await,
        StatusCode::BAD_GATEWAY
    );
    let unreachable = "breakwater_control_plane_unreachable";
    wait_for_metric(sidecar.admin_addr, unreachable, 1.0).await;
    let spooled = "breakwater_dead_letter_spool{upstream=\"orders\"}";
    assert_eq!(metric_value(sidecar.admin_addr, spooled).await, 1.0);
    let readyz = read_body(get(sidecar.admin_addr, "admin", "/readyz").await).await;
    assert_eq!(readyz.0.status, 200, "ready: the agent's calls go on");
    let detail = String::from_utf8_lossy(&readyz.1).into_owned();
    assert!(
        detail.contains(&format!(
            "control plane: http://{} cannot take dead letters for",
            running.grpc_addr
        )) && detail.contains("cannot read the token file"),
        "{detail}"
    );
    assert!(
        letters_as(running.grpc_addr, Some("s3cret"))
            .await
            .is_empty()
    );

    // The Secret is mounted: the next delivery carries it.
    std::fs::write(&token, "s3cret\n").unwrap();
    wait_for_metric(sidecar.admin_addr, spooled, 0.0).await;
    assert_eq!(metric_value(sidecar.admin_addr, unreachable).await, 0.0);
    assert_eq!(letters_as(running.grpc_addr, Some("s3cret")).await.len(), 1);
    let readyz = read_body(get(sidecar.admin_addr, "admin", "/readyz").await).await;
    let detail = String::from_utf8_lossy(&readyz.1).into_owned();
    assert!(
        detail.contains(&format!("control plane: http://{} ok", running.grpc_addr)),
        "{detail}"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn a_route_s_dead_letters_keep_json_rpc_calls_it_takes_and_no_others() {
    let dir = tempfile::tempdir().unwrap();
    let running = control_plane(&dir.path().join("cp"), "127.0.0.1:0".parse().unwrap(), None).await;
    // An MCP server that fails every call inside a 200.
    let upstream = HttpUpstream::start(|request: Request<Incoming>| async move {
        let body = request.into_body().collect().await.unwrap().to_bytes();
        let call: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let answer = serde_json::json!({
            "jsonrpc": "2.0", "id": call["id"],
            "error": {"code": -32603, "message": "internal error"}
        });
        let mut response = http::Response::new(breakwater::body::full(answer.to_string()));
        response
            .headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        response
    })
    .await;
    let sidecar = sidecar(&format!(
        "control_plane: {{url: 'http://{}'}}\ndead_letters: {{spool_dir: '{}'}}\nupstreams:\n  tools:\n    address: '{}'\n    protocol: mcp\n    routes:\n      - name: calls\n        match: {{jsonrpc: {{method: tools/call}}}}\n        dead_letter: true\n",
        running.grpc_addr,
        dir.path().join("spool").display(),
        upstream.addr
    ))
    .await;
    let call = |id: u32, method: &str| {
        Request::post("/mcp")
            .header("host", "tools")
            .header("content-type", "application/json")
            .body(breakwater::body::full(format!(
                r#"{{"jsonrpc":"2.0","id":{id},"method":"{method}","params":{{"name":"charge"}}}}"#
            )))
            .unwrap()
    };
    // The server's own JSON-RPC error reaches the caller in its 200.
    assert_eq!(
        send(sidecar.proxy_addr, call(1, "tools/list")).await,
        StatusCode::OK
    );
    assert_eq!(
        send(sidecar.proxy_addr, call(2, "tools/call")).await,
        StatusCode::OK
    );
    let letters = delivered_from("tools", running.grpc_addr, sidecar.admin_addr, 1).await;
    let letter = &letters[0];
    assert_eq!(letter.upstream, "tools");
    assert_eq!(letter.reason, "jsonrpc-32603");
    assert_eq!(
        letter.body,
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"charge"}}"#
    );
    assert!(!letter.body_truncated);
    running.shutdown().await;
}

#[tokio::test]
async fn letters_page_from_the_first_id_on() {
    // Letter ids start at 0: a page that ends on letter 0 continues.
    let dir = tempfile::tempdir().unwrap();
    let running = control_plane(&dir.path().join("cp"), "127.0.0.1:0".parse().unwrap(), None).await;
    let channel = Channel::from_shared(format!("http://{}", running.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = DeadLettersClient::new(channel);
    for uri in ["/a", "/b", "/c"] {
        let letter = DeadLetter {
            upstream: "orders".into(),
            method: "POST".into(),
            uri: uri.into(),
            reason: "http-503".into(),
            ..Default::default()
        };
        client
            .enqueue(EnqueueDeadLetterRequest {
                letter: Some(letter),
            })
            .await
            .unwrap();
    }
    let mut uris = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list(ListDeadLettersRequest {
                page_size: 1,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        uris.extend(page.letters.into_iter().map(|l| l.uri));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(uris, ["/a", "/b", "/c"]);
    running.shutdown().await;
}
