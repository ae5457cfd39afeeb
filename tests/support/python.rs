//! Python peers: the official SDKs, in the virtualenv `.ci/run` makes
//! (`target/pyenv`, or `BREAKWATER_PYTHON`), driven by
//! `tests/python/sdk_calls.py`, which prints one JSON object. Without them a
//! test says so and skips, unless `BREAKWATER_REQUIRE_PEERS=1` (set by
//! `.ci/run`), where it fails.

use std::path::PathBuf;

use serde_json::Value;

/// The virtualenv's Python, if it has `module`.
pub fn python(module: &str) -> Option<PathBuf> {
    let python = std::env::var_os("BREAKWATER_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/pyenv/bin/python")
        });
    let has = python.exists()
        && std::process::Command::new(&python)
            .args(["-c", &format!("import {module}")])
            .status()
            .is_ok_and(|s| s.success());
    if has {
        return Some(python);
    }
    assert!(
        std::env::var_os("BREAKWATER_REQUIRE_PEERS").is_none(),
        "no Python with {module} at {}",
        python.display()
    );
    eprintln!(
        "SKIPPED: no Python with {module} at {} (run .ci/run, or set BREAKWATER_PYTHON)",
        python.display()
    );
    None
}

/// Runs one scenario of `tests/python/sdk_calls.py` with `sdk` (`openai`
/// or `anthropic`) against `base_url`, and parses what it printed.
pub async fn sdk(python: PathBuf, sdk: &'static str, base_url: String, scenario: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/sdk_calls.py");
    let args = [sdk.to_owned(), base_url, scenario.to_owned()];
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(path)
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{sdk} {scenario}: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

/// Checks a streamed answer as the SDK saw it: the text whole, and its
/// chunks spread over at least `spread` seconds (passed on as they came,
/// not buffered: a buffered stream arrives within a millisecond). Keep
/// `spread` well below the upstream's gaps: a loaded machine delays the
/// SDK's first chunk more than its last.
pub fn assert_streamed(streamed: &Value, text: &str, spread: f64) {
    let chunks = streamed["chunks"].as_array().expect("chunks");
    let whole: String = chunks.iter().map(|c| c[0].as_str().unwrap()).collect();
    assert_eq!(whole, text, "{streamed}");
    let first = chunks[0][1].as_f64().unwrap();
    let last = chunks[chunks.len() - 1][1].as_f64().unwrap();
    assert!(
        last - first >= spread,
        "chunks arrive as they are sent, not buffered: {streamed}"
    );
}

/// Checks a stream that stalled after its first chunk, `first`, as the
/// SDK saw it: an error, after `idle` seconds and well before the stall
/// would have ended.
pub fn assert_cut(stalled: &Value, first: &str, idle: f64) {
    assert!(
        stalled["error"].is_string(),
        "the SDK sees the stream fail: {stalled}"
    );
    assert_eq!(stalled["chunks_before_error"][0][0], first, "{stalled}");
    let seconds = stalled["seconds"].as_f64().unwrap();
    assert!(
        (idle..5.0).contains(&seconds),
        "cut after {idle} s, not at the end of the stall: {stalled}"
    );
}
