//! The control plane's status page: it renders in a real headless
//! Chromium and shows a saga failed after the test fails it, with what is
//! left to undo and its dead letter; its counts are those of `/metrics`;
//! behind a token, the page asks for one and shows nothing without it;
//! its actions are refused to other origins and to the read-only token.

mod support;

use std::sync::{Arc, Mutex};

use breakwater::body;
use breakwater::control::Running;
use breakwater::control::auth::Auth;
use bytes::Bytes;
use http::{Method, Request};
use serde_json::{Value, json};
use support::chromium::{chromium, render, rendered};
use support::*;

/// Users who can be created and not deleted, and an email service that
/// is down: a signup saga fails, and its compensation too.
async fn participants() -> (Participant, Participant) {
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let users = Participant::start(
        "users",
        log.clone(),
        Arc::new(|method, _, _| match *method {
            Method::POST => (201, json!({"id": "u-1"}), false),
            _ => (500, json!({"error": "disk full"}), false),
        }),
    )
    .await;
    let email = Participant::start(
        "email",
        log,
        Arc::new(|_, _, _| (503, json!({"error": "relay down"}), false)),
    )
    .await;
    (users, email)
}

async fn control_plane(
    dir: &std::path::Path,
    users: &Participant,
    email: &Participant,
    auth: Auth,
) -> Running {
    let mut options = control_options(dir);
    options.auth = auth;
    options.policies = Some(policies(&format!(
        "upstreams:\n  users: {{address: '{}'}}\n  email: {{address: '{}'}}\n",
        users.upstream.addr, email.upstream.addr
    )));
    start_control_plane(options).await
}

/// A JSON API call with the given headers; the status and the body.
async fn api(
    running: &Running,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> (u16, Bytes) {
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", running.http_addr.unwrap()));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let body = if body.is_null() {
        body::empty()
    } else {
        body::full(serde_json::to_vec(&body).unwrap())
    };
    let (parts, bytes) = read_body(
        http1_client()
            .request(request.body(body).unwrap())
            .await
            .unwrap(),
    )
    .await;
    (parts.status.as_u16(), bytes)
}

/// Starts the signup saga and waits (on its watch, which ends when the
/// saga does) until it has ended.
async fn fail_a_saga(running: &Running, headers: &[(&str, &str)]) {
    let (status, _) = api(
        running,
        Method::POST,
        "/v1/sagas",
        headers,
        json!({
            "id": "signup/ann",
            "input": {"name": "Ann"},
            "steps": [
                {"name": "create-user",
                 "action": {"upstream": "users", "method": "POST", "path": "/users", "body": {"name": "{{input.name}}"}},
                 "compensation": {"upstream": "users", "method": "DELETE", "path": "/users/{{steps.create-user.body.id}}"}},
                {"name": "welcome", "action": {"upstream": "email", "method": "POST", "path": "/emails"}}
            ]
        }),
    )
    .await;
    assert_eq!(status, 201);
    let (status, events) = api(
        running,
        Method::GET,
        "/v1/sagas/signup%2Fann?watch=true",
        headers,
        Value::Null,
    )
    .await;
    assert_eq!(status, 200);
    let last: Value = serde_json::from_str(
        String::from_utf8_lossy(&events)
            .lines()
            .last()
            .expect("events"),
    )
    .unwrap();
    assert_eq!(last["state"], "failed", "{last}");
}

fn row<'a>(dom: &'a str, start: &str) -> &'a str {
    dom.split(start)
        .nth(1)
        .unwrap_or_else(|| panic!("no {start} in {dom}"))
        .split("</tr>")
        .next()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_renders_in_chromium_and_shows_a_saga_the_test_failed() {
    let Some(chromium) = chromium() else { return };
    let (users, email) = participants().await;
    let dir = tempfile::tempdir().unwrap();
    let running = control_plane(dir.path(), &users, &email, Auth::open()).await;
    let page = format!("http://{}/", running.http_addr.unwrap());

    let dom = rendered(chromium, &page, 1_000).await;
    assert!(render(&dom) >= 1, "the script fetched the overview: {dom}");
    assert!(
        dom.contains("data-count=\"failed\">failed <b>0</b>"),
        "{dom}"
    );
    assert!(
        dom.contains("none failed, undoing, running or undone"),
        "{dom}"
    );

    fail_a_saga(&running, &[]).await;
    let (status, _) = api(
        &running,
        Method::PUT,
        "/v1/checkpoints/inv-17",
        &[],
        json!({"step": "validate", "completed_steps": ["ocr"], "ttl": "1h"}),
    )
    .await;
    assert_eq!(status, 200);

    let (status, listed) = api(&running, Method::GET, "/v1/checkpoints", &[], Value::Null).await;
    assert_eq!(status, 200);
    let listed: Value = serde_json::from_slice(&listed).unwrap();
    assert_eq!(
        listed["checkpoints"][0]["workflow_id"], "inv-17",
        "{listed}"
    );
    assert_eq!(listed["checkpoints"][0]["step"], "validate");
    assert_eq!(listed["next_page_token"], "");

    let dom = rendered(chromium, &page, 1_000).await;
    assert!(
        dom.contains("data-count=\"failed\">failed <b>1</b>"),
        "{dom}"
    );
    let saga = row(&dom, "<tr data-saga=\"signup/ann\" class=\"failed\">");
    assert!(
        saga.contains("<td class=\"state failed\">failed</td>"),
        "{saga}"
    );
    assert!(
        saga.contains("<td>2/2</td><td>create-user</td>"),
        "left to undo: {saga}"
    );
    assert!(
        saga.contains("the compensation of step create-user failed"),
        "why: {saga}"
    );
    let overview: Value = serde_json::from_slice(
        &api(&running, Method::GET, "/v1/status", &[], Value::Null)
            .await
            .1,
    )
    .unwrap();
    let letter = overview["sagas"][0]["dead_letter_id"]
        .as_str()
        .expect("the failed compensation's letter")
        .to_owned();
    assert!(
        saga.contains(&format!("<a href=\"#letter-{letter}\">{letter}</a>")),
        "{saga}"
    );
    let letter_row = row(&dom, &format!("<tr id=\"letter-{letter}\""));
    assert!(letter_row.contains("<td>users</td>"), "{letter_row}");
    assert!(letter_row.contains("DELETE /users/u-1"), "{letter_row}");
    assert!(
        letter_row.contains(&format!("data-path=\"/v1/dead-letters/{letter}/replay\"")),
        "{letter_row}"
    );
    let group = row(&dom, "<tr data-group=\"users\">");
    assert!(
        group.contains(
            "<td class=\"reason\">the compensation of step create-user failed: \
             the upstream answered HTTP 500</td><td>1</td>"
        ),
        "grouped by what failed, not by saga: {group}"
    );
    assert!(group.contains("purge all of users"), "{group}");
    let workflow = row(&dom, "<tr data-workflow=\"inv-17\">");
    assert!(
        workflow.starts_with("<th>inv-17</th><td>validate</td><td>1</td><td>1</td>"),
        "{workflow}"
    );
    assert!(
        workflow.contains(">in 59 min<") || workflow.contains(">in 60 min<"),
        "{workflow}"
    );

    // The page's counts are the metrics'.
    let admin = running.admin_addr.unwrap();
    let counts = overview["saga_counts"].as_object().unwrap();
    assert_eq!(counts.len(), 6, "every state: {counts:?}");
    for (state, count) in counts {
        assert_eq!(
            metric_value(admin, &format!("breakwater_sagas{{state=\"{state}\"}}")).await,
            count.as_f64().unwrap(),
            "{state}"
        );
    }
    assert_eq!(counts["failed"], 1);
    assert_eq!(
        metric_value(admin, "breakwater_dead_letters").await,
        overview["dead_letters"].as_f64().unwrap()
    );
    assert_eq!(overview["dead_letters"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_token_the_page_shows_nothing_without_it_and_changes_need_this_origin() {
    let (users, email) = participants().await;
    let dir = tempfile::tempdir().unwrap();
    let auth = Auth::with_token("op-t0k")
        .unwrap()
        .with_read_token("look-t0k")
        .unwrap();
    let running = control_plane(dir.path(), &users, &email, auth).await;
    let operator = [("authorization", "Bearer op-t0k")];
    fail_a_saga(&running, &operator).await;

    // The shell is served to anyone, and holds nothing; the overview
    // needs a token.
    let (status, shell) = api(&running, Method::GET, "/", &[], Value::Null).await;
    assert_eq!(status, 200);
    assert!(!String::from_utf8_lossy(&shell).contains("signup"));
    let (status, _) = api(&running, Method::GET, "/v1/status/page", &[], Value::Null).await;
    assert_eq!(status, 401);
    let reader = [("authorization", "Bearer look-t0k")];
    let (status, page) = api(
        &running,
        Method::GET,
        "/v1/status/page",
        &reader,
        Value::Null,
    )
    .await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&page).contains("data-saga=\"signup/ann\""));

    let overview: Value = serde_json::from_slice(
        &api(&running, Method::GET, "/v1/status", &reader, Value::Null)
            .await
            .1,
    )
    .unwrap();
    let letter = overview["letters"][0]["id"].as_str().unwrap().to_owned();
    let purge = format!("/v1/dead-letters/{letter}");
    let http = format!("http://{}", running.http_addr.unwrap());
    for (headers, refused) in [
        (
            vec![
                ("authorization", "Bearer look-t0k"),
                ("origin", http.as_str()),
            ],
            "read-only",
        ),
        (
            vec![
                ("authorization", "Bearer op-t0k"),
                ("origin", "http://evil.example"),
            ],
            "another origin",
        ),
        (
            vec![("authorization", "Bearer op-t0k"), ("origin", "null")],
            "another origin",
        ),
    ] {
        let (status, body) = api(&running, Method::DELETE, &purge, &headers, Value::Null).await;
        assert_eq!(status, 403, "{refused}");
        assert!(
            String::from_utf8_lossy(&body).contains(refused),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
    assert_eq!(overview["dead_letters"], 1, "nothing was purged");
    let (status, _) = api(
        &running,
        Method::DELETE,
        &purge,
        &[("authorization", "Bearer op-t0k"), ("origin", &http)],
        Value::Null,
    )
    .await;
    assert_eq!(
        status, 200,
        "the page's own origin, with the operator's token"
    );

    let Some(chromium) = chromium() else { return };
    let dom = rendered(chromium, &format!("{http}/"), 1_000).await;
    assert!(
        dom.contains("<form id=\"login\">"),
        "the form is shown: {dom}"
    );
    assert!(!dom.contains("signup/ann"), "{dom}");
    let dom = rendered(chromium, &format!("{http}/#token=look-t0k"), 1_000).await;
    assert!(dom.contains("<form id=\"login\" hidden=\"\">"), "{dom}");
    assert!(dom.contains("data-saga=\"signup/ann\""), "{dom}");
    assert!(
        dom.contains("data-count=\"dead-letters\">0<"),
        "purged: {dom}"
    );
}
