//! The control plane's checkpoints over gRPC and JSON/HTTP: compare-and-
//! swap, history and paging, prune and delete, limits and bad input, the
//! token, health and reflection, and the CLI.

mod support;

use std::path::Path;

use breakwater::api::checkpoints_client::CheckpointsClient;
use breakwater::api::{
    DeleteCheckpointsRequest, GetCheckpointRequest, ListCheckpointsRequest,
    PruneCheckpointsRequest, PutCheckpointRequest,
};
use breakwater::control::{Running, auth::Auth};
use bytes::Bytes;
use http::{Method, StatusCode};
use support::*;
use tonic::Code;
use tonic::transport::Channel;

async fn control_plane(dir: &Path, auth: Auth) -> Running {
    let mut options = control_options(dir);
    options.auth = auth;
    options.max_state_bytes = 64 << 10;
    start_control_plane(options).await
}

async fn client(running: &Running) -> CheckpointsClient<Channel> {
    CheckpointsClient::connect(format!("http://{}", running.grpc_addr))
        .await
        .unwrap()
}

fn put(workflow: &str, step: &str, expected: Option<u64>) -> PutCheckpointRequest {
    PutCheckpointRequest {
        workflow_id: workflow.into(),
        step: step.into(),
        state: Bytes::from(format!("{{\"step\": \"{step}\"}}")),
        expected_version: expected,
        ..Default::default()
    }
}

#[tokio::test]
async fn compare_and_swap_history_prune_and_delete_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let running = control_plane(dir.path(), Auth::open()).await;
    let mut client = client(&running).await;

    let first = client.put(put("inv-1", "ocr", Some(0))).await.unwrap();
    assert_eq!(first.get_ref().version, 1);
    client.put(put("inv-1", "validate", Some(1))).await.unwrap();
    // A writer that read version 1 loses, and learns the latest.
    let status = client
        .put(put("inv-1", "stale", Some(1)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(
        status
            .metadata()
            .get("x-breakwater-current-version")
            .unwrap(),
        "2"
    );
    assert!(
        status.message().contains("the latest is 2"),
        "{}",
        status.message()
    );

    for step in ["match", "post", "notify"] {
        client.put(put("inv-1", step, None)).await.unwrap();
    }
    let latest = client
        .get(GetCheckpointRequest {
            workflow_id: "inv-1".into(),
            version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((latest.version, latest.step.as_str()), (5, "notify"));
    assert_eq!(latest.state, "{\"step\": \"notify\"}");
    assert!(latest.created_at.is_some());

    let mut versions = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list(ListCheckpointsRequest {
                workflow_id: "inv-1".into(),
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        versions.extend(page.checkpoints.iter().map(|c| c.version));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(versions, [5, 4, 3, 2, 1]);

    let pruned = client
        .prune(PruneCheckpointsRequest {
            workflow_id: "inv-1".into(),
            keep: 2,
        })
        .await
        .unwrap();
    assert_eq!(pruned.get_ref().deleted, 3);
    let gone = client
        .get(GetCheckpointRequest {
            workflow_id: "inv-1".into(),
            version: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);

    let deleted = client
        .delete(DeleteCheckpointsRequest {
            workflow_id: "inv-1".into(),
        })
        .await
        .unwrap();
    assert_eq!(deleted.get_ref().deleted, 2);
    let status = client
        .get(GetCheckpointRequest {
            workflow_id: "inv-1".into(),
            version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), "no workflow \"inv-1\"");
    running.shutdown().await;
}

#[tokio::test]
async fn bad_input_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let running = control_plane(dir.path(), Auth::open()).await;
    let mut client = client(&running).await;
    let cases = [
        (put("", "a", None), "workflow_id is empty"),
        (put(&"w".repeat(300), "a", None), "workflow_id is 300 bytes"),
        (put("a\u{1}b", "a", None), "control characters"),
        (
            PutCheckpointRequest {
                state: Bytes::from(vec![b'x'; (64 << 10) + 1]),
                ..put("big", "a", None)
            },
            "state is 65537 bytes, over the limit of 65536 bytes",
        ),
        (
            PutCheckpointRequest {
                ttl: Some(prost_types::Duration {
                    seconds: -5,
                    nanos: 0,
                }),
                ..put("ttl", "a", None)
            },
            "ttl must be positive",
        ),
    ];
    for (request, expected) in cases {
        let status = client.put(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains(expected), "{}", status.message());
    }
    let status = client
        .prune(PruneCheckpointsRequest {
            workflow_id: "w".into(),
            keep: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = client
        .list(ListCheckpointsRequest {
            workflow_id: "w".into(),
            page_size: 0,
            page_token: "not-a-token".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // Malformed protobuf: a raw call whose body is not a message.
    let mut conn = h2_connect(running.grpc_addr).await;
    let request = http::Request::post("http://cp/breakwater.v1.Checkpoints/Put")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(breakwater::body::full(Bytes::from_static(
            b"\0\0\0\0\x03\xff\xff\xff",
        )))
        .unwrap();
    let response = conn.send_request(request).await.unwrap();
    let (parts, incoming) = response.into_parts();
    let trailers = http_body_util::BodyExt::collect(incoming)
        .await
        .unwrap()
        .trailers()
        .cloned();
    let status = parts
        .headers
        .get("grpc-status")
        .or(trailers.as_ref().and_then(|t| t.get("grpc-status")))
        .cloned();
    assert_eq!(status.unwrap(), "3", "INVALID_ARGUMENT");
    // The server is still up for everyone else.
    client.put(put("after", "a", None)).await.unwrap();
    running.shutdown().await;
}

#[tokio::test]
async fn json_floats_in_a_state_keep_every_digit() {
    let dir = tempfile::tempdir().unwrap();
    let running = control_plane(dir.path(), Auth::open()).await;
    let http = running.http_addr.unwrap();
    let exact = "0.47631759262665707";
    let body = format!(r#"{{"state": {{"p": {exact}}}}}"#);
    let (parts, _) = admin(http, Method::PUT, "/v1/checkpoints/floats", body).await;
    assert_eq!(parts.status, StatusCode::OK);
    let (_, answer) = admin(http, Method::GET, "/v1/checkpoints/floats", "").await;
    let text = String::from_utf8_lossy(&answer);
    let p = text
        .split("\"p\":")
        .nth(1)
        .unwrap()
        .split(['}', ','])
        .next()
        .unwrap();
    assert_eq!(
        p.trim().parse::<f64>().unwrap(),
        exact.parse::<f64>().unwrap(),
        "the number read back is the one written: {text}"
    );
}

#[tokio::test]
async fn the_json_api_matches_the_grpc_one() {
    let dir = tempfile::tempdir().unwrap();
    let running = control_plane(dir.path(), Auth::open()).await;
    let http = running.http_addr.unwrap();
    let body = r#"{"step": "ocr", "state": {"amount": 12.5}, "metadata": {"source": "scan"}, "ttl": "1h", "expected_version": 0}"#;
    let (parts, answer) = admin(http, Method::PUT, "/v1/checkpoints/inv%2F7", body).await;
    assert_eq!(parts.status, StatusCode::OK, "{answer:?}");
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["version"], 1);
    assert!(answer["expires_at"].is_string());

    let got = admin_json(http, "/v1/checkpoints/inv%2F7").await;
    assert_eq!(got["workflow_id"], "inv/7");
    assert_eq!(got["state"]["amount"], 12.5);

    assert_eq!(got["metadata"]["source"], "scan");

    // The gRPC face sees the same record.
    let grpc = client(&running)
        .await
        .get(GetCheckpointRequest {
            workflow_id: "inv/7".into(),
            version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grpc.state, "{\"amount\":12.5}");

    let (parts, answer) = admin(
        http,
        Method::PUT,
        "/v1/checkpoints/inv%2F7",
        r#"{"expected_version": 0}"#,
    )
    .await;
    assert_eq!(parts.status, StatusCode::CONFLICT);
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["error"]["code"], "ABORTED");
    assert_eq!(answer["error"]["current_version"], 1);

    let (parts, answer) = admin(http, Method::PUT, "/v1/checkpoints/x", "{not json").await;
    assert_eq!(parts.status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&answer).contains("invalid JSON body"));
    let (parts, answer) = admin(
        http,
        Method::PUT,
        "/v1/checkpoints/x",
        r#"{"state_base64": "%%%"}"#,
    )
    .await;
    assert_eq!(parts.status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&answer).contains("state_base64 is not base64"));
    let (parts, _) = admin(http, Method::GET, "/v1/checkpoints/missing", "").await;
    assert_eq!(parts.status, StatusCode::NOT_FOUND);
    let (parts, _) = admin(http, Method::GET, "/v2/nothing", "").await;
    assert_eq!(parts.status, StatusCode::NOT_FOUND);

    admin(
        http,
        Method::PUT,
        "/v1/checkpoints/inv%2F7",
        r#"{"step": "validate"}"#,
    )
    .await;
    let history = admin_json(http, "/v1/checkpoints/inv%2F7/history?page_size=1").await;
    assert_eq!(history["checkpoints"][0]["version"], 2);
    assert_eq!(history["next_page_token"], "2");
    let (parts, answer) = admin(
        http,
        Method::POST,
        "/v1/checkpoints/inv%2F7/prune",
        r#"{"keep": 1}"#,
    )
    .await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&answer).unwrap()["deleted"],
        1
    );
    let (parts, _) = admin(http, Method::DELETE, "/v1/checkpoints/inv%2F7", "").await;
    assert_eq!(parts.status, StatusCode::OK);

    let metrics = String::from_utf8(
        admin(running.admin_addr.unwrap(), Method::GET, "/metrics", "")
            .await
            .1
            .to_vec(),
    )
    .unwrap();
    assert!(
        metrics.contains("breakwater_checkpoints_written_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "breakwater_control_request_duration_seconds_count{method=\"checkpoints.Put\"} 3"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("breakwater_store_flush_duration_seconds_count"),
        "{metrics}"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn a_token_is_required_except_for_health() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let dir = tempfile::tempdir().unwrap();
    let running = control_plane(dir.path(), Auth::with_token("s3cret\n").unwrap()).await;
    let status = client(&running)
        .await
        .put(put("w", "a", None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let channel = Channel::from_shared(format!("http://{}", running.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut authorized =
        CheckpointsClient::with_interceptor(channel.clone(), |mut r: tonic::Request<()>| {
            r.metadata_mut()
                .insert("authorization", "Bearer s3cret".parse().unwrap());
            Ok(r)
        });
    authorized.put(put("w", "a", None)).await.unwrap();

    let health = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "breakwater.v1.Checkpoints".into(),
        })
        .await
        .unwrap();
    assert_eq!(health.get_ref().status, ServingStatus::Serving as i32);

    let http = running.http_addr.unwrap();
    let (parts, _) = admin(http, Method::GET, "/v1/checkpoints/w", "").await;
    assert_eq!(parts.status, StatusCode::UNAUTHORIZED);
    running.shutdown().await;
}

/// A JSON API call with a bearer token.
async fn json_call(
    addr: std::net::SocketAddr,
    method: Method,
    path: &str,
    token: &str,
    body: &'static str,
) -> (StatusCode, String) {
    let request = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(breakwater::body::full(body))
        .unwrap();
    let (parts, body) = read_body(http1_client().request(request).await.unwrap()).await;
    (parts.status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn a_read_only_token_reads_and_changes_nothing() {
    use breakwater::api::PurgeDeadLettersRequest;
    use breakwater::api::dead_letters_client::DeadLettersClient;
    use breakwater::api::purge_dead_letters_request::Target;

    let dir = tempfile::tempdir().unwrap();
    let auth = Auth::with_token("op-t0k")
        .unwrap()
        .with_read_token("viewer-t0k")
        .unwrap();
    let running = control_plane(dir.path(), auth).await;
    let channel = Channel::from_shared(format!("http://{}", running.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer = |token: &'static str| {
        move |mut r: tonic::Request<()>| {
            let value = format!("Bearer {token}").parse().unwrap();
            r.metadata_mut().insert("authorization", value);
            Ok(r)
        }
    };
    let mut operator = CheckpointsClient::with_interceptor(channel.clone(), bearer("op-t0k"));
    let mut viewer = CheckpointsClient::with_interceptor(channel.clone(), bearer("viewer-t0k"));
    operator.put(put("w", "ocr", None)).await.unwrap();

    let latest = GetCheckpointRequest {
        workflow_id: "w".into(),
        version: 0,
    };
    let read = viewer.get(latest.clone()).await.unwrap().into_inner();
    assert_eq!((read.step.as_str(), read.version), ("ocr", 1));
    let history = ListCheckpointsRequest {
        workflow_id: "w".into(),
        ..Default::default()
    };
    assert_eq!(
        viewer
            .list(history)
            .await
            .unwrap()
            .get_ref()
            .checkpoints
            .len(),
        1
    );
    let denied = [
        viewer.put(put("w", "stolen", None)).await.unwrap_err(),
        viewer
            .delete(DeleteCheckpointsRequest {
                workflow_id: "w".into(),
            })
            .await
            .unwrap_err(),
    ];
    let mut letters = DeadLettersClient::with_interceptor(channel, bearer("viewer-t0k"));
    let purge = PurgeDeadLettersRequest {
        target: Some(Target::All(true)),
    };
    let denied = denied
        .into_iter()
        .chain([letters.purge(purge).await.unwrap_err()]);
    for status in denied {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains("read-only"),
            "{}",
            status.message()
        );
    }
    let all = breakwater::api::ListDeadLettersRequest::default();
    assert!(letters.list(all).await.is_ok());
    let after = operator.get(latest).await.unwrap().into_inner();
    assert_eq!(
        (after.step.as_str(), after.version),
        ("ocr", 1),
        "nothing changed"
    );

    let http = running.http_addr.unwrap();
    let path = "/v1/checkpoints/w";
    let (status, _) = json_call(http, Method::GET, path, "viewer-t0k", "").await;
    assert_eq!(status, StatusCode::OK);
    let body = r#"{"step": "stolen", "state": {}}"#;
    let (status, answer) = json_call(http, Method::PUT, path, "viewer-t0k", body).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(answer.contains("PERMISSION_DENIED"), "{answer}");
    let (status, _) = json_call(http, Method::PUT, path, "op-t0k", body).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = json_call(http, Method::GET, path, "wrong", "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    running.shutdown().await;
}

/// Without a token the control plane serves only on loopback, unless told
/// to serve open; the refusal says what to do.
#[test]
fn an_open_control_plane_is_refused_beyond_loopback() {
    const BIN: &str = env!("CARGO_BIN_EXE_breakwater");
    let dir = tempfile::tempdir().unwrap();
    // The refusal comes before anything is bound.
    let out = std::process::Command::new(BIN)
        .args(["control-plane", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("OPEN on 0.0.0.0:0"), "{stderr}");
    assert!(stderr.contains("--insecure-no-auth"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no store was opened"
    );

    let mut options = control_options(dir.path());
    options.http_listen = Some("0.0.0.0:0".parse().unwrap());
    assert!(options.check_exposure().is_err(), "the JSON port counts");
    options.insecure_no_auth = true;
    assert!(options.check_exposure().is_ok());
    options.insecure_no_auth = false;
    options.auth = Auth::with_token("t").unwrap();
    assert!(options.check_exposure().is_ok());
    // The admin port (probes and scrapes, never a token) does not count.
    let mut options = control_options(dir.path());
    options.admin_listen = Some("0.0.0.0:0".parse().unwrap());
    assert!(options.check_exposure().is_ok());
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use tokio_stream::StreamExt;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = tempfile::tempdir().unwrap();
    let running = control_plane(dir.path(), Auth::open()).await;
    let channel = Channel::from_shared(format!("http://{}", running.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("{answer:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"breakwater.v1.Checkpoints".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn the_cli_puts_and_reads_checkpoints() {
    const BIN: &str = env!("CARGO_BIN_EXE_breakwater");
    let dir = tempfile::tempdir().unwrap();
    let running = control_plane(dir.path(), Auth::with_token("t0k").unwrap()).await;
    let token = dir.path().join("token");
    std::fs::write(&token, "t0k\n").unwrap();
    let url = format!("http://{}", running.grpc_addr);
    let run = |args: &[&str]| {
        let url = url.clone();
        let token = token.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        async move {
            tokio::process::Command::new(BIN)
                .arg("checkpoint")
                .args(&args)
                .arg("--control-plane")
                .arg(url)
                .arg("--token-file")
                .arg(token)
                .output()
                .await
                .unwrap()
        }
    };
    let out = run(&[
        "put",
        "inv-9",
        "--step",
        "ocr",
        "--state",
        "{\"a\": 1}",
        "--metadata",
        "k=v",
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "workflow inv-9: version 1 saved\n"
    );
    let out = run(&["get", "inv-9", "--json"]).await;
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["state"]["a"], 1);
    assert_eq!(got["metadata"]["k"], "v");
    let out = run(&["list", "inv-9"]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("VERSION  STEP  CREATED"), "{table}");
    let out = run(&["put", "inv-9", "--expected-version", "0"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("error: ABORTED: version conflict"),
        "{out:?}"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn an_expired_workflow_vanishes() {
    let dir = tempfile::tempdir().unwrap();
    let running = control_plane(dir.path(), Auth::open()).await;
    let mut client = client(&running).await;
    let put = PutCheckpointRequest {
        ttl: Some(prost_types::Duration {
            seconds: 0,
            nanos: 200_000_000,
        }),
        ..put("short-lived", "a", None)
    };
    let started = tokio::time::Instant::now();
    let answer = client.put(put).await.unwrap().into_inner();
    assert!(answer.expires_at.is_some());
    let get = GetCheckpointRequest {
        workflow_id: "short-lived".into(),
        version: 0,
    };
    // The TTL runs on the wall clock: poll until the workflow is gone.
    let status = eventually(std::time::Duration::from_secs(5), "expiry", || {
        let mut client = client.clone();
        let get = get.clone();
        async move { client.get(get).await.err() }
    })
    .await;
    assert_eq!(status.code(), Code::NotFound);
    assert!(started.elapsed() >= std::time::Duration::from_millis(200));
    running.shutdown().await;
}

#[tokio::test]
async fn a_grpc_client_at_the_json_port_is_told_where_the_grpc_port_is() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_control_plane(control_options(dir.path())).await;
    let json = running.http_addr.unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["dlq", "list", "--control-plane"])
        .arg(format!("http://{json}"))
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!(
            "error: UNIMPLEMENTED: this is the control plane's JSON port; its gRPC port is {}",
            running.grpc_addr.port()
        )
    );
    running.shutdown().await;
}
