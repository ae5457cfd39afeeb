//! The sidecar's status page: its figures agree with `/metrics`, its
//! actions are refused to other origins, and it renders in a real
//! headless Chromium (Debian's `chromium`, which `.ci/run` installs;
//! without it the test says so and skips, unless
//! `BREAKWATER_REQUIRE_PEERS=1`, where it fails).

mod support;

use bytes::Bytes;
use http::{Method, Request};
use support::chromium::{chromium, render, rendered};
use support::*;

/// A sidecar with `ok` (an echo), `down` (a closed port, retried) and
/// `tiny` (one slot), and some traffic through each.
async fn busy_sidecar() -> (breakwater::sidecar::Sidecar, HttpUpstream) {
    let echo = HttpUpstream::echo().await;
    let closed = closed_port().await;
    let sidecar = sidecar(&format!(
        "upstreams:\n  ok:\n    address: '{}'\n    listen: 127.0.0.1:0\n  down:\n    address: '{closed}'\n    listen: 127.0.0.1:0\n    retry: {{backoff: {{base: 1ms, max: 2ms}}}}\n    circuit_breaker: {{consecutive_failures: 100}}\n",
        echo.addr
    ))
    .await;
    for i in 0..7 {
        let (parts, _) = call(
            sidecar.upstream_addrs["ok"],
            "ok",
            Method::POST,
            "/",
            format!("{i}"),
        )
        .await;
        assert_eq!(parts.status, 200);
    }
    for _ in 0..3 {
        let (parts, _) = call(sidecar.upstream_addrs["down"], "down", Method::GET, "/", "").await;
        assert_eq!(parts.status, 502);
    }
    (sidecar, echo)
}

fn series(name: &str, upstream: &str, extra: &str) -> String {
    format!("{name}{{upstream=\"{upstream}\"{extra}}}")
}

#[tokio::test]
async fn the_status_figures_are_the_metrics_counters() {
    let (sidecar, _echo) = busy_sidecar().await;
    let admin_addr = sidecar.admin_addr;
    let status = admin_json(admin_addr, "/status.json").await;
    let upstreams = status["upstreams"].as_array().unwrap();
    let names: Vec<&str> = upstreams
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["down", "ok"], "by name");
    for u in upstreams {
        let name = u["name"].as_str().unwrap();
        let totals = &u["totals"];
        let outcome = |o: &str| {
            let s = series(
                "breakwater_requests_total",
                name,
                &format!(",outcome=\"{o}\""),
            );
            async move { metric_value(admin_addr, &s).await }
        };
        let requests = outcome("success").await
            + outcome("error").await
            + outcome("failure").await
            + outcome("degraded").await
            + outcome("rejected").await;
        assert_eq!(totals["requests"], requests, "{name}");
        assert_eq!(
            totals["failed"],
            outcome("error").await + outcome("failure").await,
            "{name}"
        );
        assert_eq!(totals["degraded"], outcome("degraded").await, "{name}");
        let shed = metric_value(admin_addr, &series("breakwater_shed_total", name, "")).await;
        assert_eq!(totals["shed"], shed, "{name}");
        let exhausted = series("breakwater_retry_budget_exhausted_total", name, "");
        assert_eq!(
            totals["budget_exhausted"],
            metric_value(admin_addr, &exhausted).await
        );
        assert_eq!(u["circuit"]["state"], "closed");
    }
    let (down, ok) = (&upstreams[0], &upstreams[1]);
    assert_eq!(ok["totals"]["requests"], 7.0);
    assert!(ok["last_minute"]["requests_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(ok["last_minute"]["error_ratio"], 0.0);
    assert!(
        ok["last_minute"]["p99_ms"].as_f64().unwrap()
            >= ok["last_minute"]["p50_ms"].as_f64().unwrap()
    );
    assert_eq!(down["totals"]["failed"], 3.0);
    assert_eq!(down["last_minute"]["error_ratio"], 1.0);
    let retried = metric_value(
        admin_addr,
        &series(
            "breakwater_retries_total",
            "down",
            ",reason=\"connect-failure\"",
        ),
    )
    .await;
    assert_eq!(down["totals"]["retries"], retried);
    assert_eq!(retried, 6.0, "two retries for each of three calls");
    // The default budget: 10 retries a second over 10 s (100), and one per
    // five calls; each retry spends one.
    assert_eq!(ok["budget_left"], 100 + 7 / 5, "{ok}");
    assert_eq!(down["budget_left"], (500 + 3 - 5 * 6) / 5, "{down}");

    let (parts, page) = admin(admin_addr, Method::GET, "/", "").await;
    assert_eq!(parts.headers["content-type"], "text/html; charset=utf-8");
    let page = String::from_utf8_lossy(&page);
    assert!(
        page.contains("<tr data-upstream=\"ok\"><th>ok</th><td>http1</td>"),
        "{page}"
    );
    assert!(page.contains("data-path=\"/circuits/down/open\""), "{page}");
    assert!(page.contains("<td class=\"budget\">94</td>"), "{page}");
}

#[tokio::test]
async fn a_page_of_another_origin_may_not_change_the_sidecar() {
    let (sidecar, _echo) = busy_sidecar().await;
    let addr = sidecar.admin_addr;
    let post = |origin: Option<String>| async move {
        let mut request = Request::post(format!("http://{addr}/circuits/ok/open"));
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        let request = request.body(breakwater::body::full(Bytes::new())).unwrap();
        read_body(http1_client().request(request).await.unwrap())
            .await
            .0
            .status
    };
    assert_eq!(post(Some("http://attacker.example".into())).await, 403);
    assert_eq!(admin_json(addr, "/circuits").await["ok"]["state"], "closed");
    assert_eq!(
        post(Some(format!("http://{addr}"))).await,
        200,
        "the page's own"
    );
    assert_eq!(post(None).await, 200, "curl sends no origin");
    assert_eq!(admin_json(addr, "/circuits").await["ok"]["state"], "open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_renders_in_chromium_and_shows_a_circuit_the_test_opened() {
    let Some(chromium) = chromium() else { return };
    let (sidecar, _echo) = busy_sidecar().await;
    let addr = sidecar.admin_addr;
    let dom = rendered(chromium, &format!("http://{addr}/"), 500).await;
    assert!(
        dom.contains("<td class=\"circuit closed\">closed</td>"),
        "{dom}"
    );
    assert!(!dom.contains("circuit open"), "{dom}");
    let (parts, _) = admin(addr, Method::POST, "/circuits/down/open", "").await;
    assert_eq!(parts.status, 200);
    // Three seconds of its time: the page has refreshed itself (its
    // script ran: it shows a later render than the one it loaded), and
    // still shows every upstream.
    let (_, page) = admin(addr, Method::GET, "/", "").await;
    let served = render(&String::from_utf8_lossy(&page));
    let dom = rendered(chromium, &format!("http://{addr}/"), 3_000).await;
    assert!(render(&dom) >= served + 2, "refreshed: {dom}");
    let row = dom
        .split("<tr data-upstream=\"down\">")
        .nth(1)
        .expect("the row of down")
        .split("</tr>")
        .next()
        .unwrap();
    assert!(
        row.contains("<td class=\"circuit open\">open <small>probe in"),
        "{row}"
    );
    assert!(dom.contains("<tr data-upstream=\"ok\">"), "{dom}");
    assert!(
        dom.contains("<p id=\"message\"></p>"),
        "the refresh worked: {dom}"
    );
}

/// `admin.probes_listen`: a port with only `/healthz`, `/readyz` and
/// `/metrics`, which may face the pod network; everything else, and every
/// change, is refused there and served on the admin port only.
#[tokio::test]
async fn the_probes_port_serves_probes_and_metrics_and_refuses_changes() {
    let echo = HttpUpstream::echo().await;
    let sidecar = sidecar(&format!(
        "admin: {{listen: 127.0.0.1:0, probes_listen: 127.0.0.1:0}}\nupstreams:\n  ok: {{address: '{}'}}\n",
        echo.addr
    ))
    .await;
    let probes = sidecar.probes_addr.expect("a probes port");
    assert_ne!(probes, sidecar.admin_addr);
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (parts, _) = admin(probes, Method::GET, path, "").await;
        assert_eq!(parts.status, 200, "{path}");
    }
    for (method, path) in [
        (Method::POST, "/circuits/ok/open"),
        (Method::PUT, "/faults/ok"),
        (Method::DELETE, "/faults/ok"),
        (Method::GET, "/"),
        (Method::GET, "/config"),
    ] {
        let (parts, body) = admin(probes, method.clone(), path, "{}").await;
        assert_eq!(parts.status, 404, "{method} {path}");
        assert!(String::from_utf8_lossy(&body).contains("admin.listen"));
    }
    assert_eq!(
        admin_json(sidecar.admin_addr, "/circuits").await["ok"]["state"],
        "closed"
    );
    let (parts, _) = admin(sidecar.admin_addr, Method::POST, "/circuits/ok/open", "").await;
    assert_eq!(parts.status, 200);
    assert_eq!(
        admin_json(sidecar.admin_addr, "/circuits").await["ok"]["state"],
        "open"
    );
}
