//! The agent protocols through the sidecar, with the official SDKs on both
//! sides: an MCP server and client from `mcp` (both streamable-HTTP
//! versions: 2025-11-25 with sessions, 2026-07-28 without) and an A2A
//! server and client from `a2a-sdk`, in `tests/peers/`. The servers can be
//! told to fail their next calls (an HTTP status, or a JSON-RPC error in a
//! `200`) and count what reached them, by JSON-RPC method.
//!
//! The SDKs live in the virtualenv `.ci/run` makes (see
//! `tests/support/python.rs`).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;
use support::*;

const LEGACY: &str = "2025-11-25";
const MODERN: &str = "2026-07-28";

fn peers() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

/// A peer server process, killed when dropped.
struct Peer {
    child: Child,
    port: u16,
}

impl Peer {
    /// Starts `script` as a server on a free port and waits for its
    /// `ready PORT`.
    async fn start(python: &Path, script: &str) -> Self {
        let mut child = Command::new(python)
            .arg(peers().join(script))
            .args(["server", "--port", "0"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
            line
        })
        .await
        .unwrap();
        let port = line
            .trim()
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("{script} did not start: {line:?}"))
            .parse()
            .unwrap();
        Self { child, port }
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A control endpoint's answer (`/_stats`, `/_fail_next?...`).
    async fn control(&self, path_and_query: &str) -> Value {
        let response = http1_client()
            .request(
                http::Request::get(format!("http://{}{path_and_query}", self.address()))
                    .body(breakwater::body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let (_, body) = read_body(response).await;
        serde_json::from_slice(&body).unwrap()
    }

    /// How many POSTs of `method` reached the server.
    async fn received(&self, method: &str) -> u64 {
        self.control("/_stats").await["requests"][method]
            .as_u64()
            .unwrap_or(0)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a client run printed, and whether it succeeded.
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Its last printed line, as JSON.
    fn last(&self) -> Value {
        let line = self
            .stdout
            .lines()
            .last()
            .unwrap_or_else(|| panic!("the client printed nothing; stderr: {}", self.stderr));
        serde_json::from_str(line).unwrap()
    }
}

/// Runs `script`'s client with `args`.
async fn client(python: &Path, script: &str, args: Vec<String>) -> Run {
    let (python, path) = (python.to_path_buf(), peers().join(script));
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(path)
            .arg("client")
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    Run {
        ok: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The MCP client, speaking `version`, through the sidecar's port.
async fn mcp(python: &Path, port: std::net::SocketAddr, version: &str, steps: &[&str]) -> Run {
    let mut args = vec![
        "--url".to_owned(),
        format!("http://{port}/mcp"),
        "--protocol-version".to_owned(),
        version.to_owned(),
    ];
    args.extend(steps.iter().map(|s| s.to_string()));
    client(python, "mcp_peer.py", args).await
}

/// A sidecar in front of the peer: one upstream `name` on a port of its
/// own, with the YAML lines `extra` (indented under it).
async fn sidecar_in_front(
    peer: &Peer,
    name: &str,
    protocol: &str,
    extra: &str,
) -> (breakwater::sidecar::Sidecar, std::net::SocketAddr) {
    let sidecar = sidecar(&format!(
        "upstreams:\n  {name}:\n    address: '{}'\n    protocol: {protocol}\n    listen: 127.0.0.1:0\n    retry: {{backoff: {{base: 10ms, max: 20ms}}}}\n{extra}",
        peer.address()
    ))
    .await;
    let port = sidecar.upstream_addrs[name];
    (sidecar, port)
}

/// `breakwater_jsonrpc_answers_total` of one upstream, method and outcome.
async fn answers(admin: std::net::SocketAddr, upstream: &str, method: &str, outcome: &str) -> f64 {
    metric_value(
        admin,
        &format!("breakwater_jsonrpc_answers_total{{upstream=\"{upstream}\",method=\"{method}\",outcome=\"{outcome}\"}}"),
    )
    .await
}

/// The YAML of one route, `calls`, taking `tools/call` with `block`.
fn calls_route(block: &str) -> String {
    format!(
        "    routes:\n      - name: calls\n        match: {{jsonrpc: {{method: tools/call}}}}\n        {block}\n"
    )
}

fn mcp_python() -> Option<PathBuf> {
    support::python::python("mcp")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_reads_are_retried_and_tool_calls_are_not() {
    let Some(python) = mcp_python() else { return };
    let peer = Peer::start(&python, "mcp_peer.py").await;
    let (sidecar, port) = sidecar_in_front(&peer, "tools", "mcp", "").await;
    let mut lists = 0;
    let mut calls = 0;
    for version in [LEGACY, MODERN] {
        // A 502 leaves a call half done: only a read may be sent again.
        peer.control("/_fail_next?status=502&count=1&method=tools/list")
            .await;
        let run = mcp(&python, port, version, &["list"]).await;
        assert!(run.ok, "{version}: {}", run.stderr);
        assert_eq!(
            run.last(),
            serde_json::json!(["echo", "fail", "count", "slow"])
        );
        lists += 2;
        assert_eq!(peer.received("tools/list").await, lists, "{version}");

        peer.control("/_fail_next?status=502&count=1&method=tools/call")
            .await;
        let run = mcp(&python, port, version, &["call", "count"]).await;
        assert!(
            !run.ok,
            "{version}: a failed tool call must reach the client"
        );
        calls += 1;
        assert_eq!(
            peer.received("tools/call").await,
            calls,
            "{version}: not retried"
        );
    }
    let admin = sidecar.admin_addr;
    assert_eq!(
        metric_value(
            admin,
            "breakwater_retries_total{upstream=\"tools\",reason=\"http-502\"}"
        )
        .await,
        2.0
    );
    assert_eq!(answers(admin, "tools", "tools/list", "result").await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_idempotency_key_lets_tool_calls_be_retried_under_one_key() {
    let Some(python) = mcp_python() else { return };
    let peer = Peer::start(&python, "mcp_peer.py").await;
    let routes = calls_route("retry: {idempotency_key: generate}");
    let (sidecar, port) = sidecar_in_front(&peer, "tools", "mcp", &routes).await;
    for (version, expected) in [(LEGACY, 1), (MODERN, 2)] {
        peer.control("/_fail_next?status=502&count=2&method=tools/call")
            .await;
        let run = mcp(&python, port, version, &["call", "count"]).await;
        assert!(run.ok, "{version}: {}", run.stderr);
        assert_eq!(
            run.last()["structuredContent"]["result"],
            expected,
            "{version}"
        );
        // Three attempts, one key: the two refused and the one that ran.
        let stats = peer.control("/_stats").await;
        let keys = stats["keys"]["tools/call"].as_array().unwrap();
        let attempts = &keys[keys.len() - 3..];
        assert!(attempts[0].is_string(), "{keys:?}");
        assert!(attempts.iter().all(|k| *k == attempts[0]), "{keys:?}");
        assert_eq!(
            stats["idempotency_keys"].as_array().unwrap().last(),
            Some(&attempts[0])
        );
    }
    let keys = peer.control("/_stats").await["keys"]["tools/call"].clone();
    assert_ne!(keys[0], keys[3], "each call has its own key");
    assert_eq!(
        metric_value(
            sidecar.admin_addr,
            "breakwater_route_retries_total{upstream=\"tools\",route=\"calls\",reason=\"http-502\"}"
        )
        .await,
        4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_errors_are_answers_and_json_rpc_errors_open_the_circuit() {
    let Some(python) = mcp_python() else { return };
    let peer = Peer::start(&python, "mcp_peer.py").await;
    let routes = calls_route("circuit_breaker: {consecutive_failures: 2, open_for: 60s}");
    let (sidecar, port) = sidecar_in_front(&peer, "tools", "mcp", &routes).await;
    let admin = sidecar.admin_addr;

    // A tool that reports an error is a tool that answered.
    let run = mcp(
        &python,
        port,
        MODERN,
        &["call", "fail", "call", "fail", "call", "fail"],
    )
    .await;
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(run.last()["isError"], true);
    assert_eq!(
        answers(admin, "tools", "tools/call", "tool-error").await,
        3.0
    );
    let circuits = admin_json(admin, "/circuits").await;
    assert_eq!(circuits["tools/calls"]["state"], "closed", "{circuits}");

    // An internal error in a 200 is the server's failure: two in a row
    // open the route's circuit, and the next call is answered by the
    // sidecar, as a JSON-RPC error the SDK raises for that call alone.
    peer.control("/_jsonrpc_error_next?code=-32603&count=2&method=tools/call")
        .await;
    for version in [MODERN, LEGACY] {
        let run = mcp(&python, port, version, &["call", "echo", r#"{"text":"a"}"#]).await;
        assert!(!run.ok);
        assert!(
            run.stderr.contains("MCPError -32603"),
            "{version}: {}",
            run.stderr
        );
    }
    let circuits = admin_json(admin, "/circuits").await;
    assert_eq!(circuits["tools/calls"]["state"], "open", "{circuits}");
    let received = peer.received("tools/call").await;
    for version in [MODERN, LEGACY] {
        let run = mcp(
            &python,
            port,
            version,
            &["list", "call", "echo", r#"{"text":"a"}"#],
        )
        .await;
        assert!(!run.ok);
        assert!(
            run.stderr.contains("MCPError -31002"),
            "{version}: {}",
            run.stderr
        );
        // Only the route's circuit is open: listing still works.
        assert_eq!(run.stdout.lines().count(), 1, "{version}: {}", run.stdout);
    }
    assert_eq!(
        peer.received("tools/call").await,
        received,
        "nothing reached the server"
    );
    assert_eq!(answers(admin, "tools", "tools/call", "failure").await, 2.0);
    assert_eq!(
        metric_value(
            admin,
            "breakwater_route_circuit_state{upstream=\"tools\",route=\"calls\"}"
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_s_404_passes_through_and_is_no_failure() {
    let Some(python) = mcp_python() else { return };
    let peer = Peer::start(&python, "mcp_peer.py").await;
    let (sidecar, port) = sidecar_in_front(
        &peer,
        "tools",
        "mcp",
        "    circuit_breaker: {consecutive_failures: 1}\n",
    )
    .await;
    let session = {
        let python = python.clone();
        tokio::spawn(async move {
            mcp(
                &python,
                port,
                LEGACY,
                &[
                    "list",
                    "call",
                    "echo",
                    r#"{"text":"a"}"#,
                    "sleep",
                    "3",
                    "call",
                    "echo",
                    r#"{"text":"b"}"#,
                ],
            )
            .await
        })
    };
    // The session is expired once its first call has been answered (its
    // tools listed first, or the SDK lists them after the call).
    eventually(
        std::time::Duration::from_secs(20),
        "the first call",
        || async { (peer.received("tools/call").await >= 1).then_some(()) },
    )
    .await;
    peer.control("/_expire_sessions").await;
    let run = session.await.unwrap();
    assert!(!run.ok);
    // The server's own answer, untouched: the SDK raises its error.
    assert!(run.stderr.contains("Session not found"), "{}", run.stderr);
    let admin = sidecar.admin_addr;
    assert_eq!(
        answers(admin, "tools", "tools/call", "session-expired").await,
        1.0
    );
    let circuits = admin_json(admin, "/circuits").await;
    assert_eq!(circuits["tools"]["state"], "closed", "{circuits}");
    assert_eq!(
        metric(
            admin,
            "breakwater_retries_total{upstream=\"tools\",reason=\"http-404\"}"
        )
        .await,
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_event_stream_is_resumed_or_failed_as_each_version_says() {
    let Some(python) = mcp_python() else { return };
    let peer = Peer::start(&python, "mcp_peer.py").await;
    let (sidecar, port) = sidecar_in_front(
        &peer,
        "tools",
        "mcp",
        "    stream_idle_timeout: 400ms\n    circuit_breaker: {consecutive_failures: 5}\n",
    )
    .await;

    // 2025-11-25: the server closes the call's stream; the client resumes
    // it with GET and Last-Event-ID, through the sidecar.
    let gets = peer.control("/_stats").await["http"]["GET"]
        .as_u64()
        .unwrap_or(0);
    let run = mcp(
        &python,
        port,
        LEGACY,
        &["call", "slow", r#"{"seconds":0.2,"drop_stream":true}"#],
    )
    .await;
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(run.last()["structuredContent"]["result"], "slept 0.2");
    let stats = peer.control("/_stats").await;
    assert!(
        stats["http"]["GET"].as_u64().unwrap() >= gets + 2,
        "{stats}"
    );

    // A stream that stalls before its answer's event (after the priming
    // event, which carries no data) has sent the client nothing yet: the
    // sidecar answers the call itself, with a JSON-RPC error.
    let run = mcp(&python, port, LEGACY, &["call", "slow", r#"{"seconds":3}"#]).await;
    assert!(!run.ok);
    assert!(run.stderr.contains("MCPError -31001"), "{}", run.stderr);
    assert!(run.stderr.contains("stalled"), "{}", run.stderr);

    // 2026-07-28: a call's stream that stalls past stream_idle_timeout
    // after its first event (a progress notification, passed on at once)
    // is cut between two events: it ends with a JSON-RPC error event for
    // the call, which the client raises; closing the stream cancels the
    // call on the server. Not retried.
    let run = mcp(&python, port, MODERN, &["call", "slow", r#"{"seconds":3}"#]).await;
    assert!(!run.ok);
    assert!(run.stderr.contains("progress 1.0/3.0"), "{}", run.stderr);
    assert!(run.stderr.contains("MCPError -31001"), "{}", run.stderr);
    assert_eq!(
        peer.received("tools/call").await,
        3,
        "a tool call is not retried"
    );
    let admin = sidecar.admin_addr;
    assert_eq!(
        metric_value(
            admin,
            "breakwater_timeouts_total{upstream=\"tools\",kind=\"stream-idle\"}"
        )
        .await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a2a_reads_are_retried_sends_are_not_and_task_errors_are_answers() {
    let Some(python) = support::python::python("a2a") else {
        return;
    };
    let peer = Peer::start(&python, "a2a_peer.py").await;
    let (sidecar, port) = sidecar_in_front(&peer, "agent", "a2a", "").await;
    let a2a = |args: &[&str]| {
        let mut all = vec!["--url".to_owned(), format!("http://{port}/")];
        all.extend(args.iter().map(|s| s.to_string()));
        client(&python, "a2a_peer.py", all)
    };

    peer.control("/_fail_next?status=502&count=1&method=SendMessage")
        .await;
    let run = a2a(&["send", "hello"]).await;
    assert!(!run.ok, "a failed send must reach the client");
    assert_eq!(
        peer.received("SendMessage").await,
        1,
        "SendMessage is not retried"
    );

    let run = a2a(&["send", "hello"]).await;
    assert!(run.ok, "{}", run.stderr);
    let task = run.last();
    assert_eq!(task["state"], "TASK_STATE_COMPLETED");
    let id = task["id"].as_str().unwrap().to_owned();

    peer.control("/_fail_next?status=502&count=1&method=GetTask")
        .await;
    let run = a2a(&["get", &id]).await;
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(run.last()["text"], "hello");
    assert_eq!(peer.received("GetTask").await, 2, "GetTask is retried");

    // TaskNotFound (-32001) is an answer about the request: not retried,
    // and no failure of the agent (its breaker trips on one).
    let run = a2a(&["get", "no-such-task"]).await;
    assert!(!run.ok);
    assert_eq!(peer.received("GetTask").await, 3);
    let admin = sidecar.admin_addr;
    assert_eq!(answers(admin, "agent", "GetTask", "error").await, 1.0);
    // The window holds the two 502s, and no failure since.
    let circuits = admin_json(admin, "/circuits").await;
    assert_eq!(circuits["agent"]["window_failures"], 2, "{circuits}");
    assert_eq!(circuits["agent"]["consecutive_failures"], 0, "{circuits}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a2a_a_stream_broken_after_its_first_event_is_not_sent_again() {
    let Some(python) = support::python::python("a2a") else {
        return;
    };
    let peer = Peer::start(&python, "a2a_peer.py").await;
    // Its first event (the task) is about 420 bytes; the break comes in
    // the second.
    let routes = "    routes:\n      - name: streams\n        match: {jsonrpc: {method: SendStreamingMessage}}\n        faults: {truncate: {percent: 100, after_bytes: 600}}\n";
    let (sidecar, port) = sidecar_in_front(&peer, "agent", "a2a", routes).await;
    let args = vec![
        "--url".to_owned(),
        format!("http://{port}/"),
        "stream".to_owned(),
        "hello".to_owned(),
    ];
    let run = client(&python, "a2a_peer.py", args).await;
    assert!(!run.ok, "{}", run.stdout);
    assert!(run.stderr.contains("event task"), "{}", run.stderr);
    assert_eq!(peer.received("SendStreamingMessage").await, 1);
    let admin = sidecar.admin_addr;
    assert_eq!(
        answers(admin, "agent", "SendStreamingMessage", "result").await,
        1.0
    );
    assert_eq!(
        metric_value(
            admin,
            "breakwater_broken_streams_total{upstream=\"agent\",kind=\"truncated\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            admin,
            "breakwater_retries_total{upstream=\"agent\",reason=\"reset\"}"
        )
        .await,
        None
    );
}
