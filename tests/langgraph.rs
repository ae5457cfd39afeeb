//! LangGraph on the control plane: `breakwater.langgraph.BreakwaterSaver`
//! (clients/python) against a real control plane, judged by LangGraph's
//! own conformance suite (`langgraph-checkpoint-conformance`, every base
//! and extended capability), and by a real graph whose process is killed
//! in its third node and resumed by another.
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
    let url = format!("http://{}", running.http_addr.unwrap());
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
