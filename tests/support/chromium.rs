//! Debian's headless Chromium, for the status pages: a page as the
//! browser has it after running its script.

/// Debian's Chromium, or a visible skip (a failure under
/// `BREAKWATER_REQUIRE_PEERS`, as in CI).
pub fn chromium() -> Option<&'static str> {
    let found = ["chromium", "chromium-browser"].into_iter().find(|name| {
        std::process::Command::new(name)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("BREAKWATER_REQUIRE_PEERS").is_none(),
            "no chromium on this machine"
        );
        eprintln!("SKIPPED: no chromium (apt-get install chromium, or run .ci/run)");
    }
    found
}

/// The DOM of `url` as Chromium has it after running its script for `ms`
/// of virtual time.
pub async fn rendered(chromium: &str, url: &str, ms: u32) -> String {
    let profile = tempfile::tempdir().unwrap();
    let output = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tokio::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("--virtual-time-budget={ms}"))
            .arg("--dump-dom")
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finished")
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The number of the render a page shows (`<main data-render="N">`).
pub fn render(page: &str) -> u64 {
    let at = page.find("<main data-render=\"").expect("a render number") + 19;
    page[at..].split('"').next().unwrap().parse().unwrap()
}
