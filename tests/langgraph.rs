//! Python on the control plane: `breakwater.langgraph.BreakwaterSaver`
//! (clients/python) against a real control plane, judged by LangGraph's
//! own conformance suite (`langgraph-checkpoint-conformance`, every base
//! and extended capability), by a real graph whose process is killed in
//! its third node and resumed by another, and over TLS; the threads' gRPC
//! service beside the JSON port; and `breakwater.Client`'s three APIs,
//! across a restart of the control plane.
//!
//! The packages live in the virtualenv `.ci/run` makes (see
//! `tests/support/python.rs`); the client package is taken from
//! `clients/python` as it is in the tree.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a script of `tests/python` with the client package importable.
async fn script(python: &Path, name: &str, args: Vec<String>) -> Output {
    let (python, path) = (python.to_path_buf(), root().join("tests/python").join(name));
    tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(path)
            .args(args)
            .env("PYTHONPATH", root().join("clients/python"))
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn langgraphs_conformance_suite_passes_every_capability() {
    let Some(python) = support::python::python("langgraph.checkpoint.conformance") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let running = start_control_plane(control_options(dir.path())).await;
    // The gRPC URL, as the CLI takes it: the port serves JSON too.
    let url = format!("http://{}", running.grpc_addr);
    let output = script(&python, "langgraph_conformance.py", vec![url]).await;
    let stdout = text(&output.stdout);
    // The suite's whole report, in the test's output.
    println!("{stdout}");
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        text(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let capabilities = report["results"].as_object().unwrap();
    for capability in [
        "put",
        "put_writes",
        "get_tuple",
        "list",
        "delete_thread",
        "delete_for_runs",
        "copy_thread",
        "prune",
    ] {
        let result = &capabilities[capability];
        assert_eq!(result["detected"], true, "{capability}: {result}");
        assert_eq!(result["passed"], true, "{capability}: {result}");
        assert_eq!(result["tests_failed"], 0, "{capability}: {result}");
        assert!(
            result["tests_passed"].as_u64().unwrap() > 0,
            "{capability}: {result}"
        );
    }
    running.shutdown().await;
}

/// The lines of the side-effects file: which nodes finished, in order.
fn side_effects(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graph_killed_in_its_third_node_resumes_without_running_the_first_two_again() {
    let Some(python) = support::python::python("langgraph") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let running = start_control_plane(control_options(&dir.path().join("cp"))).await;
    let url = format!("http://{}", running.http_addr.unwrap());
    let effects = dir.path().join("effects");
    let args = |mode: &str, extra: &[&str]| {
        let mut args = vec![
            mode.to_owned(),
            url.clone(),
            "invoice-42".to_owned(),
            effects.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };

    let crashed = script(
        &python,
        "langgraph_crash.py",
        args("run", &["--crash-in", "enrich"]),
    )
    .await;
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        crashed.status.signal(),
        Some(9),
        "{}",
        text(&crashed.stderr)
    );
    assert_eq!(
        side_effects(&effects),
        ["extract", "validate", "enrich-started"]
    );

    let resumed = script(&python, "langgraph_crash.py", args("resume", &[])).await;
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    // Each node's side effect happened once; enrich ran again, whole.
    assert_eq!(
        side_effects(&effects),
        ["extract", "validate", "enrich-started", "enrich", "report"]
    );
    let state: serde_json::Value =
        serde_json::from_str(text(&resumed.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(
        state["state"]["done"],
        serde_json::json!(["extract", "validate", "enrich", "report"]),
        "{state}"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graph_waiting_for_a_person_is_resumed_by_another_process() {
    let Some(python) = support::python::python("langgraph") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let running = start_control_plane(control_options(&dir.path().join("cp"))).await;
    let url = format!("http://{}", running.http_addr.unwrap());
    let effects = dir.path().join("effects");
    let args = |mode: &str| {
        vec![
            mode.to_owned(),
            url.clone(),
            "invoice-43".to_owned(),
            effects.display().to_string(),
        ]
    };
    let asked = script(&python, "langgraph_crash.py", args("review")).await;
    assert!(asked.status.success(), "{}", text(&asked.stderr));
    let asked: serde_json::Value =
        serde_json::from_str(text(&asked.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(asked["next"], serde_json::json!(["validate"]), "{asked}");
    assert_eq!(side_effects(&effects), ["extract"]);

    let answered = script(&python, "langgraph_crash.py", args("approve")).await;
    assert!(answered.status.success(), "{}", text(&answered.stderr));
    assert_eq!(
        side_effects(&effects),
        ["extract", "validate", "enrich", "report"]
    );
    let state: serde_json::Value =
        serde_json::from_str(text(&answered.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(
        state["state"]["validation"]["review"]["reviewer"], "ops",
        "{state}"
    );
    assert!(
        state["interrupts"].as_array().unwrap().is_empty(),
        "{state}"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn the_threads_grpc_service_and_the_json_port_share_one_store() {
    use breakwater::api::threads_client::ThreadsClient;
    use breakwater::api::{
        ChannelBlob, GetThreadCheckpointRequest, ListThreadCheckpointsRequest, PendingWrite,
        PutThreadCheckpointRequest, PutThreadWritesRequest, TypedValue,
    };
    use breakwater::control::auth::Auth;

    let dir = tempfile::tempdir().unwrap();
    let mut options = control_options(dir.path());
    options.auth = Auth::with_token("op-t0k")
        .unwrap()
        .with_read_token("viewer-t0k")
        .unwrap();
    let running = start_control_plane(options).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", running.grpc_addr))
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
    let mut operator = ThreadsClient::with_interceptor(channel.clone(), bearer("op-t0k"));
    let mut viewer = ThreadsClient::with_interceptor(channel, bearer("viewer-t0k"));
    let typed = |text: &str| {
        Some(TypedValue {
            r#type: "json".into(),
            data: bytes::Bytes::copy_from_slice(text.as_bytes()),
        })
    };
    let put = PutThreadCheckpointRequest {
        thread_id: "order-7".into(),
        checkpoint_ns: String::new(),
        checkpoint_id: "1ef".into(),
        parent_checkpoint_id: String::new(),
        checkpoint: typed("{}"),
        metadata_json: r#"{"step": 1, "run_id": "run-1"}"#.into(),
        channel_versions: [("items".to_owned(), "00001".to_owned())].into(),
        blobs: vec![ChannelBlob {
            channel: "items".into(),
            version: "00001".into(),
            value: typed("[1,2]"),
        }],
    };
    // The read-only token reads and changes nothing.
    let refused = viewer.put(put.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    operator.put(put).await.unwrap();
    let writes = PutThreadWritesRequest {
        thread_id: "order-7".into(),
        checkpoint_ns: String::new(),
        checkpoint_id: "1ef".into(),
        writes: vec![PendingWrite {
            task_id: "t1".into(),
            idx: 0,
            channel: "items".into(),
            value: typed("3"),
            task_path: "~".into(),
        }],
    };
    assert_eq!(
        operator
            .put_writes(writes.clone())
            .await
            .unwrap()
            .into_inner()
            .stored,
        1
    );
    assert_eq!(
        operator
            .put_writes(writes)
            .await
            .unwrap()
            .into_inner()
            .stored,
        0
    );

    let read = viewer
        .get(GetThreadCheckpointRequest {
            thread_id: "order-7".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.checkpoint_id, "1ef");
    assert_eq!(read.run_id, "run-1");
    assert_eq!(read.channel_values[0].value, typed("[1,2]"));
    assert_eq!(read.pending_writes.len(), 1);
    let filtered = viewer
        .list(ListThreadCheckpointsRequest {
            thread_id: "order-7".into(),
            filter_json: r#"{"step": 1.0}"#.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(filtered.checkpoints.len(), 1);
    let missing = viewer
        .get(GetThreadCheckpointRequest {
            thread_id: "order-8".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // The JSON API sees the same checkpoint, on its port and on the gRPC
    // port (over HTTP/1.1 there, as any JSON client speaks it).
    for addr in [running.http_addr.unwrap(), running.grpc_addr] {
        let response = http1_client()
            .request(
                http::Request::get(format!("http://{addr}/v1/threads/order-7?checkpoint_ns="))
                    .header("authorization", "Bearer viewer-t0k")
                    .body(breakwater::body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let (parts, body) = read_body(response).await;
        assert_eq!(parts.status, http::StatusCode::OK, "{addr}");
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["metadata"]["run_id"], "run-1");
        assert_eq!(json["pending_writes"][0]["task_id"], "t1");
    }
    // The token is checked there as well.
    let response = http1_client()
        .request(
            http::Request::delete(format!("http://{}/v1/threads/order-7", running.grpc_addr))
                .header("authorization", "Bearer viewer-t0k")
                .body(breakwater::body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), http::StatusCode::FORBIDDEN);
    // A gRPC call no service takes is still answered as gRPC.
    let mut h2 = h2_connect(running.grpc_addr).await;
    let unknown = h2
        .send_request(
            http::Request::post(format!(
                "http://{}/breakwater.v1.Nope/Get",
                running.grpc_addr
            ))
            .header("content-type", "application/grpc")
            .header("authorization", "Bearer viewer-t0k")
            .body(breakwater::body::empty())
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(unknown.headers()["grpc-status"], "12", "UNIMPLEMENTED");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_saver_verifies_a_tls_control_plane_with_the_ca_it_is_given() {
    use breakwater::transport::tls::server::{ServerTls, TlsFiles};
    let Some(python) = support::python::python("langgraph") else {
        return;
    };
    let pki = support::tls::Pki::new();
    let signed = pki.sign("control-plane", &["localhost"], false);
    let dir = tempfile::tempdir().unwrap();
    let mut options = control_options(dir.path());
    options.tls = Some(
        ServerTls::load(TlsFiles {
            cert: signed.cert_file,
            key: signed.key_file,
        })
        .unwrap(),
    );
    let running = start_control_plane(options).await;
    let url = format!("https://localhost:{}", running.http_addr.unwrap().port());
    // One checkpoint put and read back over TLS; then the same without
    // the CA, which must fail (never plaintext, never unverified).
    let program = r#"
import sys
from breakwater.errors import Unavailable
from breakwater.langgraph import BreakwaterSaver
from langgraph.checkpoint.base import empty_checkpoint
url, ca = sys.argv[1], sys.argv[2]
config = {"configurable": {"thread_id": "tls-1", "checkpoint_ns": ""}}
checkpoint = empty_checkpoint()
with BreakwaterSaver(url, ca_file=ca, retries=0) as saver:
    saver.put(config, checkpoint, {"source": "input", "step": -1}, {})
    assert saver.get_tuple(config).checkpoint["id"] == checkpoint["id"]
print("verified")
try:
    with BreakwaterSaver(url, retries=0) as saver:
        saver.get_tuple(config)
    print("unverified: read")
except Unavailable as error:
    print("refused:", error)
"#;
    let (python, ca) = (python.clone(), pki.ca_file.display().to_string());
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .args(["-c", program, &url, &ca])
            .env("PYTHONPATH", root().join("clients/python"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "verified", "{stdout}");
    assert!(
        lines[1].starts_with("refused:") && lines[1].contains("certificate"),
        "{stdout}"
    );
    running.shutdown().await;
}

/// A control plane with a token and two saga participants: one that
/// accepts every call, one with nothing listening.
async fn control_plane_for_clients(
    dir: &Path,
    participant: std::net::SocketAddr,
) -> breakwater::control::Running {
    let mut options = control_options(dir);
    options.auth = breakwater::control::auth::Auth::with_token("op-t0k").unwrap();
    options.policies = Some(policies(&format!(
        "upstreams:\n  participant: {{address: '{participant}'}}\n  down: {{address: '{}'}}\n",
        closed_port().await
    )));
    start_control_plane(options).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_s_three_apis_work_against_a_real_control_plane() {
    let Some(python) = support::python::python("httpx") else {
        return;
    };
    let participant = HttpUpstream::start(|_req: http::Request<hyper::body::Incoming>| async {
        answer(
            201,
            &[("content-type", "application/json")],
            r#"{"id": "p-1"}"#,
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let running = control_plane_for_clients(dir.path(), participant.addr).await;
    let url = format!("http://{}", running.http_addr.unwrap());
    let args = vec![
        url,
        "op-t0k".to_owned(),
        "--participant".to_owned(),
        "participant".to_owned(),
        "--failing".to_owned(),
        "down".to_owned(),
    ];
    let output = script(&python, "client_test.py", args).await;
    let stdout = text(&output.stdout);
    println!("{stdout}");
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    // Every check printed a line; none failed.
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert!(
        stdout.lines().filter(|l| l.starts_with("ok")).count() >= 60,
        "{stdout}"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_carries_its_calls_over_a_control_plane_restart() {
    let Some(python) = support::python::python("httpx") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut options = control_options(dir.path());
    options.auth = breakwater::control::auth::Auth::with_token("op-t0k").unwrap();
    let running = start_control_plane(options).await;
    let (grpc, http) = (running.grpc_addr, running.http_addr.unwrap());
    let mut child = Command::new(&python)
        .arg(root().join("tests/python/client_test.py"))
        .args(["retry", &format!("http://{http}"), "op-t0k"])
        .env("PYTHONPATH", root().join("clients/python"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, mut seen) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut printed = Vec::new();
    while let Some(line) = seen.recv().await {
        let started = line.starts_with("put 5:");
        printed.push(line);
        if started {
            break;
        }
    }
    // The control plane goes away for a second, mid-run, and comes back
    // on the same ports with the same data.
    running.shutdown().await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let mut options = control_options(dir.path());
    options.auth = breakwater::control::auth::Auth::with_token("op-t0k").unwrap();
    options.listen = grpc;
    options.http_listen = Some(http);
    let running = start_control_plane(options).await;
    while let Some(line) = seen.recv().await {
        printed.push(line);
    }
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let printed = printed.join("\n");
    assert!(status.success(), "{printed}");
    let summary: serde_json::Value = serde_json::from_str(printed.lines().last().unwrap()).unwrap();
    assert_eq!(summary["versions"], 40, "{printed}");
    // One put waited out the restart.
    assert!(
        summary["longest_put_s"].as_f64().unwrap() >= 0.9,
        "{printed}"
    );
    running.shutdown().await;
}
