//! Sagas against real participants: steps in order with values flowing
//! between them, compensations in reverse, degraded steps, aborts,
//! deadlines, failed compensations dead-lettered, and a thousand sagas at
//! once. Participants honour `Idempotency-Key` and log every effect.

mod support;

use std::path::Path;
use std::sync::{Arc, Mutex};

use breakwater::api::dead_letters_client::DeadLettersClient;
use breakwater::api::sagas_client::SagasClient;
use breakwater::api::{
    AbortSagaRequest, GetDeadLetterRequest, GetSagaRequest, ListSagasRequest, Saga, SagaDefinition,
    SagaState, StartSagaRequest, StepState, WatchSagasRequest,
};
use breakwater::control::Running;
use breakwater::control::saga::proto as saga_proto;
use http::Method;
use serde_json::{Value, json};
use support::{Participant, Script};
use tonic::transport::Channel;

type Log = Arc<Mutex<Vec<String>>>;

async fn control_plane(dir: &Path, yaml: &str) -> Running {
    let mut options = support::control_options(dir);
    options.policies = Some(support::policies(yaml));
    support::start_control_plane(options).await
}

async fn client(running: &Running) -> SagasClient<Channel> {
    SagasClient::connect(format!("http://{}", running.grpc_addr))
        .await
        .unwrap()
}

fn definition(spec: Value) -> SagaDefinition {
    saga_proto::spec_to_proto(&serde_json::from_value(spec).unwrap())
}

async fn start(client: &mut SagasClient<Channel>, spec: Value) -> Saga {
    client
        .start(StartSagaRequest {
            definition: Some(definition(spec)),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Watches a saga until it ends, and answers it as it ended.
async fn finished(client: &mut SagasClient<Channel>, id: &str) -> Saga {
    let mut events = client
        .watch(WatchSagasRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner();
    while let Some(event) = events.message().await.unwrap() {
        let _ = event;
    }
    let saga = client
        .get(GetSagaRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !matches!(saga.state(), SagaState::Running | SagaState::Compensating),
        "the watch ended before the saga: {saga:?}"
    );
    saga
}

fn script(f: fn(&Method, &str, &Value) -> (u16, Value)) -> Script {
    Arc::new(move |m, p, b| {
        let (status, value) = f(m, p, b);
        (status, value, false)
    })
}

/// Users, subscriptions and email, as in the classic example: each
/// creation answers an id, each deletion 204, email fails.
async fn signup_participants(log: &Log) -> (Participant, Participant, Participant) {
    let users = Participant::start(
        "users",
        log.clone(),
        script(|method, _path, _body| match *method {
            Method::POST => (201, json!({"id": "u-1"})),
            _ => (204, Value::Null),
        }),
    )
    .await;
    let subscriptions = Participant::start(
        "subscriptions",
        log.clone(),
        script(|method, _path, body| match *method {
            Method::POST if body["user"] == "u-1" => (201, json!({"id": "s-7"})),
            Method::POST => (400, json!({"error": "no such user"})),
            _ => (204, Value::Null),
        }),
    )
    .await;
    let email = Participant::start(
        "email",
        log.clone(),
        script(|_, _, _| (503, json!({"error": "mail relay down"}))),
    )
    .await;
    (users, subscriptions, email)
}

/// Users are created, but cannot be deleted.
async fn undeletable_users(log: &Log) -> Participant {
    Participant::start(
        "users",
        log.clone(),
        script(|method, _, _| match *method {
            Method::POST => (201, json!({"id": "u-1"})),
            _ => (500, json!({"error": "disk full"})),
        }),
    )
    .await
}

fn signup_policies(users: &Participant, subs: &Participant, email: &Participant) -> String {
    format!(
        "upstreams:\n  users: {{address: '{}'}}\n  subscriptions: {{address: '{}'}}\n  email:\n    address: '{}'\n    retry: {{max_attempts: 3, backoff: {{base: 1ms}}}}\n",
        users.upstream.addr, subs.upstream.addr, email.upstream.addr
    )
}

fn signup(id: &str) -> Value {
    json!({
        "id": id,
        "input": {"name": "Ann", "email": "ann@example.com", "plan": "pro"},
        "steps": [
            {"name": "create-user",
             "action": {"upstream": "users", "method": "POST", "path": "/users",
                        "body": {"name": "{{input.name}}"}},
             "compensation": {"upstream": "users", "method": "DELETE",
                              "path": "/users/{{steps.create-user.body.id}}"}},
            {"name": "subscribe",
             "action": {"upstream": "subscriptions", "method": "POST", "path": "/subscriptions",
                        "body": {"user": "{{steps.create-user.body.id}}", "plan": "{{input.plan}}"}},
             "compensation": {"upstream": "subscriptions", "method": "DELETE",
                              "path": "/subscriptions/{{steps.subscribe.body.id}}"}},
            {"name": "welcome",
             "action": {"upstream": "email", "method": "POST", "path": "/emails",
                        "body": {"to": "{{input.email}}", "user": "{{steps.create-user.body.id}}"}}}
        ]
    })
}

#[tokio::test]
async fn a_failed_step_compensates_the_earlier_ones_in_reverse_with_ids_from_answers() {
    let log: Log = Arc::default();
    let (users, subs, email) = signup_participants(&log).await;
    let dir = tempfile::tempdir().unwrap();
    let running = control_plane(dir.path(), &signup_policies(&users, &subs, &email)).await;
    let mut client = client(&running).await;

    let started = start(&mut client, signup("signup-ann")).await;
    assert_eq!(started.state(), SagaState::Running);
    let saga = finished(&mut client, "signup-ann").await;

    assert_eq!(saga.state(), SagaState::Compensated, "{saga:?}");
    assert!(saga.error.contains("step welcome failed"), "{}", saga.error);
    assert_eq!(
        *log.lock().unwrap(),
        [
            r#"users POST /users {"name":"Ann"}"#,
            r#"subscriptions POST /subscriptions {"plan":"pro","user":"u-1"}"#,
            "subscriptions DELETE /subscriptions/s-7 null",
            "users DELETE /users/u-1 null",
        ]
    );
    let states: Vec<StepState> = saga.steps.iter().map(|s| s.state()).collect();
    assert_eq!(
        states,
        [
            StepState::Compensated,
            StepState::Compensated,
            StepState::Failed
        ]
    );
    // The email step was tried three times under its retry policy, each
    // time with the same key.
    let welcome = saga.steps[2].action.as_ref().unwrap();
    assert_eq!(
        (welcome.sends, welcome.attempts, welcome.status),
        (1, 3, 503)
    );
    assert!(welcome.answer_summary.contains("mail relay down"));
    assert_eq!(email.upstream.requests(), 3);
    let keys = email.upstream.keys_seen();
    assert_eq!(keys, ["signup-ann/welcome/action"; 3]);
    assert_eq!(
        users.upstream.last_seen().headers["idempotency-key"],
        "signup-ann/create-user/compensation"
    );
    let create = saga.steps[0].action.as_ref().unwrap();
    assert!(create.started_at.is_some() && create.finished_at.is_some());
    assert_eq!(create.status, 201);
    assert!(saga.steps[0].compensation.is_some());
    // The saga's calls, with the sidecar's metric names: two retries of
    // the email.
    let (_, body) = support::admin(
        running.admin_addr.unwrap(),
        Method::GET,
        "/metrics/upstreams",
        "",
    )
    .await;
    let text = String::from_utf8_lossy(&body);
    let retries: f64 = text
        .lines()
        .filter(|l| l.starts_with("breakwater_retries_total{upstream=\"email\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(retries, 2.0, "{text}");
    running.shutdown().await;
}

async fn http_call(
    addr: std::net::SocketAddr,
    method: Method,
    path: &str,
    body: &str,
) -> (http::StatusCode, Value) {
    let request = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(breakwater::body::full(body.to_owned()))
        .unwrap();
    let response = support::http1_client().request(request).await.unwrap();
    let (parts, body) = support::read_body(response).await;
    (
        parts.status,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn the_json_api_starts_idempotently_lists_by_state_and_counts_in_metrics() {
    let log: Log = Arc::default();
    let (users, subs, email) = signup_participants(&log).await;
    let dir = tempfile::tempdir().unwrap();
    let running = control_plane(dir.path(), &signup_policies(&users, &subs, &email)).await;
    let http = running.http_addr.unwrap();
    let mut client = client(&running).await;

    // Two steps, no email: it completes.
    let mut spec = signup("signup-bob");
    spec["steps"].as_array_mut().unwrap().pop();
    let body = spec.to_string();
    let (status, first) = http_call(http, Method::POST, "/v1/sagas", &body).await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["state"], "running");
    finished(&mut client, "signup-bob").await;
    let (status, again) = http_call(http, Method::POST, "/v1/sagas", &body).await;
    assert_eq!(status, 200);
    assert_eq!(again["state"], "completed");
    assert_eq!(log.lock().unwrap().len(), 2, "a second start runs nothing");

    let (status, saga) = http_call(http, Method::GET, "/v1/sagas/signup-bob", "").await;
    assert_eq!(status, 200);
    assert_eq!(saga["steps"][1]["state"], "succeeded");
    assert_eq!(saga["steps"][1]["answer"]["body"]["id"], "s-7");
    assert_eq!(saga["steps"][0]["action"]["status"], 201);

    let (_, listed) = http_call(http, Method::GET, "/v1/sagas?state=completed", "").await;
    assert_eq!(listed["sagas"].as_array().unwrap().len(), 1);
    let (_, none) = http_call(http, Method::GET, "/v1/sagas?state=failed", "").await;
    assert!(none["sagas"].as_array().unwrap().is_empty());
    let (status, bad) = http_call(http, Method::GET, "/v1/sagas?state=lost", "").await;
    assert_eq!(status, 400, "{bad}");

    // A definition with problems: every one is named, nothing starts.
    let (status, bad) = http_call(
        http,
        Method::POST,
        "/v1/sagas",
        r#"{"id": "x", "steps": [{"name": "a", "action": {"upstream": "nowhere", "method": "GET", "path": "/{{steps.b.status}}"}}]}"#,
    )
    .await;
    assert_eq!(status, 400);
    let message = bad["error"]["message"].as_str().unwrap();
    assert!(message.contains("steps[0].action.path"), "{message}");
    let (status, bad) = http_call(
        http,
        Method::POST,
        "/v1/sagas",
        r#"{"id": "x", "steps": [{"name": "a", "action": {"upstream": "nowhere", "method": "GET"}}]}"#,
    )
    .await;
    assert_eq!(status, 400);
    let message = bad["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(r#"steps[0].action.upstream: there is no upstream "nowhere""#),
        "{message}"
    );
    let (status, _) = http_call(http, Method::POST, "/v1/sagas", "{not json").await;
    assert_eq!(status, 400);

    let (status, body) =
        support::admin(running.admin_addr.unwrap(), Method::GET, "/metrics", "").await;
    assert!(status.status.is_success());
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("breakwater_sagas{state=\"completed\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("breakwater_sagas{state=\"running\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("breakwater_saga_step_duration_seconds_count{upstream=\"users\",call=\"action\",result=\"ok\"} 1"),
        "{text}"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn a_step_that_may_fail_degrades_to_its_default_and_the_saga_goes_on() {
    let log: Log = Arc::default();
    let (users, subs, email) = signup_participants(&log).await;
    let dir = tempfile::tempdir().unwrap();
    let running = control_plane(dir.path(), &signup_policies(&users, &subs, &email)).await;
    let mut client = client(&running).await;
    let spec = json!({
        "id": "degrade",
        "steps": [
            {"name": "welcome", "on_failure": "continue", "default": {"queued": false, "id": "none"},
             "action": {"upstream": "email", "method": "POST", "path": "/emails"}},
            {"name": "create-user",
             "action": {"upstream": "users", "method": "POST", "path": "/users",
                        "body": {"welcome": "{{steps.welcome.body.queued}}",
                                 "note": "mail {{steps.welcome.body.id}}"}}}
        ]
    });
    start(&mut client, spec).await;
    let saga = finished(&mut client, "degrade").await;
    assert_eq!(saga.state(), SagaState::Completed, "{saga:?}");
    assert_eq!(saga.steps[0].state(), StepState::Degraded);
    assert_eq!(
        *log.lock().unwrap(),
        [r#"users POST /users {"note":"mail none","welcome":false}"#]
    );
    running.shutdown().await;
}

#[tokio::test]
async fn an_unresolvable_reference_fails_its_step_naming_it() {
    let log: Log = Arc::default();
    let (users, subs, email) = signup_participants(&log).await;
    let dir = tempfile::tempdir().unwrap();
    let running = control_plane(dir.path(), &signup_policies(&users, &subs, &email)).await;
    let mut client = client(&running).await;
    let mut spec = signup("missing-field");
    spec["steps"][1]["action"]["body"]["user"] = json!("{{steps.create-user.body.account.id}}");
    start(&mut client, spec).await;
    let saga = finished(&mut client, "missing-field").await;
    assert_eq!(saga.state(), SagaState::Compensated);
    let step = &saga.steps[1];
    assert_eq!(step.state(), StepState::Failed);
    let error = &step.action.as_ref().unwrap().error;
    assert!(
        error.contains("{{steps.create-user.body.account.id}}"),
        "{error}"
    );
    assert_eq!(step.action.as_ref().unwrap().sends, 0, "nothing was sent");
    assert_eq!(
        *log.lock().unwrap(),
        [
            r#"users POST /users {"name":"Ann"}"#,
            "users DELETE /users/u-1 null"
        ]
    );
    running.shutdown().await;
}

#[tokio::test]
async fn a_compensation_that_keeps_failing_leaves_the_saga_failed_and_dead_lettered() {
    let log: Log = Arc::default();
    let (_, subs, email) = signup_participants(&log).await;
    let users = undeletable_users(&log).await;
    let dir = tempfile::tempdir().unwrap();
    let policies = format!(
        "upstreams:\n  users:\n    address: '{}'\n    retry: {{max_attempts: 2, backoff: {{base: 1ms}}, on: [5xx]}}\n  subscriptions: {{address: '{}'}}\n  email: {{address: '{}', retry: {{max_attempts: 1}}}}\n",
        users.upstream.addr, subs.upstream.addr, email.upstream.addr
    );
    // With a letter key, the control plane seals its own letters as a
    // sidecar does, so that they replay.
    let key = breakwater::api::seal::LetterKey::new(&[9; 32]).unwrap();
    let mut options = support::control_options(dir.path());
    options.policies = Some(support::policies(&policies));
    options.letter_key = Some(key.clone());
    let running = support::start_control_plane(options).await;
    let mut client = client(&running).await;
    start(&mut client, signup("stuck")).await;
    let saga = finished(&mut client, "stuck").await;

    assert_eq!(saga.state(), SagaState::Failed, "{saga:?}");
    assert_eq!(saga.steps[0].state(), StepState::CompensationFailed);
    assert_eq!(saga.steps[1].state(), StepState::Compensated);
    let undo = saga.steps[0].compensation.as_ref().unwrap();
    assert_eq!((undo.attempts, undo.status), (2, 500));
    assert!(!saga.dead_letter_id.is_empty());
    assert!(
        saga.error.contains("needs") || saga.error.contains("dead letter"),
        "{}",
        saga.error
    );

    let mut letters = DeadLettersClient::connect(format!("http://{}", running.grpc_addr))
        .await
        .unwrap();
    let letter = letters
        .get(GetDeadLetterRequest {
            id: saga.dead_letter_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(letter.upstream, "users");
    assert_eq!(key.check(&letter), breakwater::api::seal::Seal::Valid);
    assert_eq!(letter.method, "DELETE");
    assert_eq!(letter.uri, "/users/u-1");
    assert_eq!(letter.attempts, 2);
    assert!(
        letter.reason.contains("compensation of step create-user"),
        "{}",
        letter.reason
    );
    assert!(
        letter
            .headers
            .iter()
            .any(|h| h.name == "idempotency-key"
                && &h.value[..] == b"stuck/create-user/compensation")
    );
    let (_, body) = support::admin(running.admin_addr.unwrap(), Method::GET, "/metrics", "").await;
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("breakwater_saga_compensations_total{result=\"failed\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("breakwater_saga_compensations_total{result=\"ok\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("breakwater_sagas{state=\"failed\"} 1"),
        "{text}"
    );
    assert!(text.contains("breakwater_dead_letters 1"), "{text}");
    running.shutdown().await;
}

/// The signup participants and a `gate` upstream that holds every request
/// until released, behind a control plane.
struct Gated {
    log: Log,
    arrived: Arc<tokio::sync::Notify>,
    release: Arc<tokio::sync::Notify>,
    running: Running,
    _parts: (Participant, Participant, Participant, support::HttpUpstream),
    _dir: tempfile::TempDir,
}

impl Gated {
    async fn start(gate_timeout: &str) -> Self {
        let log: Log = Arc::default();
        let (users, subs, email) = signup_participants(&log).await;
        let (gate, arrived, release) = support::gated().await;
        let dir = tempfile::tempdir().unwrap();
        let policies = format!(
            "{}  gate: {{address: '{}', timeout: {gate_timeout}}}\n",
            signup_policies(&users, &subs, &email),
            gate.addr
        );
        let running = control_plane(dir.path(), &policies).await;
        Self {
            log,
            arrived,
            release,
            running,
            _parts: (users, subs, email, gate),
            _dir: dir,
        }
    }
}

/// A step that creates a user, with the compensation that deletes it.
fn create_user_step() -> Value {
    json!({"name": "create-user",
           "action": {"upstream": "users", "method": "POST", "path": "/users"},
           "compensation": {"upstream": "users", "method": "DELETE",
                            "path": "/users/{{steps.create-user.body.id}}"}})
}

#[tokio::test]
async fn an_aborted_saga_finishes_its_step_in_flight_then_compensates() {
    let gated = Gated::start("1m").await;
    let (log, arrived, release) = (
        gated.log.clone(),
        gated.arrived.clone(),
        gated.release.clone(),
    );
    let mut client = client(&gated.running).await;
    let spec = json!({
        "id": "to-abort",
        "steps": [
            create_user_step(),
            {"name": "slow", "action": {"upstream": "gate", "method": "POST", "path": "/slow"}},
            {"name": "never", "action": {"upstream": "subscriptions", "method": "POST", "path": "/s"}}
        ]
    });
    start(&mut client, spec).await;
    arrived.notified().await;
    let aborted = client
        .abort(AbortSagaRequest {
            id: "to-abort".into(),
            reason: "wrong customer".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(aborted.abort_requested);
    release.notify_one();
    let saga = finished(&mut client, "to-abort").await;
    assert_eq!(saga.state(), SagaState::Aborted, "{saga:?}");
    assert!(saga.error.contains("wrong customer"), "{}", saga.error);
    assert_eq!(saga.steps[2].state(), StepState::Pending);
    assert_eq!(
        *log.lock().unwrap(),
        ["users POST /users null", "users DELETE /users/u-1 null"]
    );
    let again = client
        .abort(AbortSagaRequest {
            id: "to-abort".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    let missing = client
        .abort(AbortSagaRequest {
            id: "nope".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    gated.running.shutdown().await;
}

#[tokio::test]
async fn a_saga_past_its_deadline_compensates() {
    // The gate never answers.
    let gated = Gated::start("1h").await;
    let log = gated.log.clone();
    let mut client = client(&gated.running).await;
    let spec = json!({
        "id": "late",
        "deadline": "300ms",
        "steps": [
            create_user_step(),
            {"name": "slow", "action": {"upstream": "gate", "method": "POST", "path": "/slow"}}
        ]
    });
    let started = start(&mut client, spec).await;
    assert!(started.deadline_at.is_some());
    let saga = finished(&mut client, "late").await;
    assert_eq!(saga.state(), SagaState::Compensated, "{saga:?}");
    assert_eq!(saga.steps[1].state(), StepState::Failed);
    assert!(
        saga.steps[1]
            .action
            .as_ref()
            .unwrap()
            .error
            .contains("deadline"),
        "{saga:?}"
    );
    assert_eq!(
        *log.lock().unwrap(),
        ["users POST /users null", "users DELETE /users/u-1 null"]
    );
    gated.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sagas_at_once_all_complete() {
    const SAGAS: usize = 1000;
    let log: Log = Arc::default();
    let (users, subs, email) = signup_participants(&log).await;
    let dir = tempfile::tempdir().unwrap();
    let running = control_plane(dir.path(), &signup_policies(&users, &subs, &email)).await;
    let client = client(&running).await;
    let mut all = client
        .clone()
        .watch(WatchSagasRequest::default())
        .await
        .unwrap()
        .into_inner();
    // Counted as they come, so that the watch never falls behind.
    let counted = tokio::spawn(async move {
        let mut completed = 0;
        while completed < SAGAS {
            let event = all.message().await.unwrap().unwrap();
            assert_ne!(event.state(), SagaState::Compensating, "{event:?}");
            if event.state() == SagaState::Completed {
                completed += 1;
            }
        }
    });
    let mut starts = tokio::task::JoinSet::new();
    for i in 0..SAGAS {
        let mut client = client.clone();
        let mut spec = signup(&format!("bulk-{i:04}"));
        spec["steps"].as_array_mut().unwrap().pop();
        starts.spawn(async move { start(&mut client, spec).await });
    }
    while let Some(started) = starts.join_next().await {
        started.unwrap();
    }
    counted.await.unwrap();
    assert_eq!(log.lock().unwrap().len(), 2 * SAGAS);
    assert!(users.applied_twice().is_empty() && subs.applied_twice().is_empty());
    let mut client = client;
    let mut listed = 0;
    let mut token = String::new();
    loop {
        let page = client
            .list(ListSagasRequest {
                state: SagaState::Completed as i32,
                page_size: 300,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        listed += page.sagas.len();
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(listed, SAGAS);
    running.shutdown().await;
}

#[tokio::test]
async fn sagas_need_the_policies_file() {
    let dir = tempfile::tempdir().unwrap();
    let running = support::start_control_plane(support::control_options(dir.path())).await;
    let mut client = client(&running).await;
    let refused = client
        .start(StartSagaRequest {
            definition: Some(definition(signup("x"))),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("--config"));
    let missing = client
        .start(StartSagaRequest { definition: None })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::InvalidArgument);
    running.shutdown().await;
}

#[tokio::test]
async fn the_cli_starts_from_yaml_shows_lists_and_names_what_needs_a_person() {
    const BIN: &str = env!("CARGO_BIN_EXE_breakwater");
    let log: Log = Arc::default();
    let (kind_users, subs, email) = signup_participants(&log).await;
    let users = undeletable_users(&log).await;
    let dir = tempfile::tempdir().unwrap();
    let policies = format!(
        "{}  kind-users: {{address: '{}'}}\n",
        signup_policies(&users, &subs, &email),
        kind_users.upstream.addr
    );
    let running = control_plane(dir.path(), &policies).await;
    let url = format!("http://{}", running.grpc_addr);
    let run = |args: &[&str]| {
        let url = url.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        async move {
            tokio::process::Command::new(BIN)
                .arg("saga")
                .args(&args)
                .arg("--control-plane")
                .arg(url)
                .output()
                .await
                .unwrap()
        }
    };
    let file = dir.path().join("signup.yaml");
    std::fs::write(
        &file,
        r#"
id: cli-ann
input: {name: Ann, email: ann@example.com}
steps:
  - name: create-user
    action: {upstream: users, method: POST, path: /users, body: {name: "{{input.name}}"}}
    compensation: {upstream: users, method: DELETE, path: "/users/{{steps.create-user.body.id}}"}
  - name: welcome
    action: {upstream: email, method: POST, path: /emails}
"#,
    )
    .unwrap();
    let out = run(&["start", file.to_str().unwrap(), "--wait"]).await;
    assert_eq!(out.status.code(), Some(5), "failed: {out:?}");
    assert!(
        out.stderr.is_empty(),
        "the saga is shown, not an error: {out:?}"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("state     failed"), "{text}");
    assert!(
        text.contains("NEEDS A PERSON: the compensation of create-user failed"),
        "{text}"
    );
    assert!(text.contains("dlq replay"), "{text}");

    let out = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        run(&["watch", "cli-ann"]),
    )
    .await
    .expect("a watch of an ended saga ends");
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    // The same steps on users that can be deleted: undone, compensated.
    let kind = dir.path().join("kind.yaml");
    std::fs::write(
        &kind,
        std::fs::read_to_string(&file)
            .unwrap()
            .replace("cli-ann", "cli-bob")
            .replace("upstream: users", "upstream: kind-users"),
    )
    .unwrap();
    let out = run(&["start", kind.to_str().unwrap(), "--wait"]).await;
    assert_eq!(out.status.code(), Some(3), "compensated: {out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("state     compensated"));

    let out = run(&["list", "--state", "failed"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("SAGA     STATE   STEPS"), "{text}");
    assert!(
        text.contains("cli-ann  failed  2/2") && text.contains("NEEDS A PERSON"),
        "{text}"
    );

    let out = run(&["show", "cli-ann", "--json"]).await;
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["state"], "failed");
    assert_eq!(shown["steps"][0]["state"], "compensation_failed");
    assert_eq!(shown["definition"]["steps"][0]["name"], "create-user");

    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "id: x\nsteps:\n  - name: a\n    action: {upstream: users, method: GET, path: \"/{{steps.b.body}}\"}\n",
    )
    .unwrap();
    let out = run(&["start", bad.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1));
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(error.contains("bad.yaml: steps[0].action.path"), "{error}");
    let out = run(&["abort", "cli-ann"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("FAILED_PRECONDITION"),
        "{out:?}"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn grpc_steps_pass_metadata_on_and_a_grpc_error_fails_the_step() {
    use prost::Message as _;
    let log: Log = Arc::default();
    let (users, subs, email) = signup_participants(&log).await;
    let echo = support::GrpcUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let policies = format!(
        "{}  echo: {{address: '{}', protocol: grpc}}\n",
        signup_policies(&users, &subs, &email),
        echo.addr
    );
    let running = control_plane(dir.path(), &policies).await;
    let mut client = client(&running).await;
    let message = breakwater::echo::EchoRequest {
        payload: bytes::Bytes::from_static(b"hello"),
        ..Default::default()
    };
    let message = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        message.encode_to_vec(),
    );
    let spec = json!({
        "id": "grpc",
        "input": {"user": "ann"},
        "steps": [
            {"name": "echo",
             "action": {"upstream": "echo", "method": "/breakwater.echo.v1.Echo/Unary",
                        "message_base64": message, "metadata": {"x-echo-user": "{{input.user}}"}},
             "compensation": {"upstream": "echo", "method": "/breakwater.echo.v1.Echo/Unary",
                              "metadata": {"x-echo-undo": "{{steps.echo.headers.x-echo-user}}"}}},
            {"name": "create-user",
             "action": {"upstream": "users", "method": "POST", "path": "/users",
                        "body": {"name": "{{steps.echo.headers.x-echo-user}}",
                                 "echo_status": "{{steps.echo.status}}"}}},
            {"name": "refused",
             "action": {"upstream": "echo", "method": "/breakwater.echo.v1.Echo/Unary",
                        "metadata": {"x-echo-status": "9", "x-echo-message": "not today"}}}
        ]
    });
    start(&mut client, spec).await;
    let saga = finished(&mut client, "grpc").await;
    assert_eq!(saga.state(), SagaState::Compensated, "{saga:?}");
    let echoed = saga.steps[0].action.as_ref().unwrap();
    assert_eq!((echoed.status, echoed.grpc_status), (200, 0));
    let refused = saga.steps[2].action.as_ref().unwrap();
    assert_eq!(refused.grpc_status, 9);
    assert!(refused.error.contains("gRPC status 9"), "{}", refused.error);
    assert_eq!(refused.answer_summary, "not today");
    assert_eq!(saga.steps[0].state(), StepState::Compensated);
    assert_eq!(
        *log.lock().unwrap(),
        [r#"users POST /users {"echo_status":0,"name":"ann"}"#]
    );
    // The action, the refused call, and the compensation.
    assert_eq!(echo.calls(), 3);
    running.shutdown().await;
}

#[tokio::test]
async fn the_json_api_watches_and_aborts() {
    let log: Log = Arc::default();
    let (users, subs, email) = signup_participants(&log).await;
    let (gate, arrived, release) = support::gated().await;
    let dir = tempfile::tempdir().unwrap();
    let policies = format!(
        "{}  gate: {{address: '{}'}}\n",
        signup_policies(&users, &subs, &email),
        gate.addr
    );
    let running = control_plane(dir.path(), &policies).await;
    let http = running.http_addr.unwrap();
    let spec = json!({
        "id": "held",
        "steps": [
            create_user_step(),
            {"name": "slow", "action": {"upstream": "gate", "method": "POST", "path": "/slow"}}
        ]
    });
    let (status, _) = http_call(http, Method::POST, "/v1/sagas", &spec.to_string()).await;
    assert_eq!(status, 201);
    arrived.notified().await;
    let request = http::Request::builder()
        .uri(format!("http://{http}/v1/sagas/held?watch=true"))
        .body(breakwater::body::empty())
        .unwrap();
    let watch = support::http1_client().request(request).await.unwrap();
    assert_eq!(watch.headers()["content-type"], "application/x-ndjson");
    let (status, aborted) = http_call(
        http,
        Method::POST,
        "/v1/sagas/held/abort",
        r#"{"reason": "test"}"#,
    )
    .await;
    assert_eq!(status, 200, "{aborted}");
    assert_eq!(aborted["abort_requested"], true);
    release.notify_one();
    // The stream ends with the saga.
    let (_, body) = support::read_body(watch).await;
    let events: Vec<Value> = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(events[0]["state"], "running");
    assert_eq!(events.last().unwrap()["state"], "aborted");
    assert!(
        events
            .iter()
            .any(|e| e["step"] == "slow" && e["step_state"] == "succeeded")
    );
    let (status, again) = http_call(http, Method::POST, "/v1/sagas/held/abort", "").await;
    assert_eq!(status, 400, "{again}");
    assert_eq!(again["error"]["code"], "FAILED_PRECONDITION");
    running.shutdown().await;
}

/// A participant that answers 503 to its first `outage` calls.
async fn recovering(
    name: &'static str,
    log: &Log,
    outage: usize,
    after: (u16, Value),
) -> Participant {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let script: Script = Arc::new(move |_, _, _| {
        if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < outage {
            (503, json!({"error": "down"}), false)
        } else {
            (after.0, after.1.clone(), false)
        }
    });
    Participant::start(name, log.clone(), script).await
}

#[tokio::test]
async fn a_step_with_retry_waits_out_an_outage_and_a_refusal_is_not_resent() {
    let log: Log = Arc::default();
    let (users, _, _) = signup_participants(&log).await;
    let ledger = recovering("ledger", &log, 3, (201, json!({"id": "E-1"}))).await;
    let closed = recovering("closed", &log, 0, (409, json!({"error": "period closed"}))).await;
    let dir = tempfile::tempdir().unwrap();
    let policies = format!(
        "upstreams:\n  users: {{address: '{}'}}\n  ledger: {{address: '{}', retry: {{max_attempts: 1}}}}\n  closed: {{address: '{}'}}\n",
        users.upstream.addr, ledger.upstream.addr, closed.upstream.addr
    );
    let running = control_plane(dir.path(), &policies).await;
    let mut client = client(&running).await;
    let retry = json!({"max_sends": 5, "interval": "10ms", "backoff": 1.5});
    start(
        &mut client,
        json!({"id": "waits", "steps": [
            {"name": "entry", "retry": retry,
             "action": {"upstream": "ledger", "method": "POST", "path": "/entries"}}
        ]}),
    )
    .await;
    let saga = finished(&mut client, "waits").await;
    assert_eq!(saga.state(), SagaState::Completed, "{saga:?}");
    let entry = saga.steps[0].action.as_ref().unwrap();
    assert_eq!((entry.sends, entry.attempts, entry.status), (4, 4, 201));
    assert!(entry.next_send_at.is_none());
    assert_eq!(ledger.upstream.requests(), 4);
    let keys = ledger.upstream.keys_seen();
    assert_eq!(keys, ["waits/entry/action"; 4]);

    start(
        &mut client,
        json!({"id": "refused", "steps": [
            create_user_step(),
            {"name": "post", "retry": retry,
             "action": {"upstream": "closed", "method": "POST", "path": "/post"}}
        ]}),
    )
    .await;
    let saga = finished(&mut client, "refused").await;
    assert_eq!(saga.state(), SagaState::Compensated, "{saga:?}");
    assert_eq!(
        saga.steps[1].action.as_ref().unwrap().sends,
        1,
        "a 409 is an answer"
    );
    assert_eq!(closed.upstream.requests(), 1);
    running.shutdown().await;
}

#[tokio::test]
async fn a_compensation_with_retry_waits_out_an_outage() {
    let log: Log = Arc::default();
    let (_, _, email) = signup_participants(&log).await;
    let users = recovering("users", &log, 0, (201, json!({"id": "u-1"}))).await;
    // Deletions fail twice, then work.
    let deletions = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let script: Script = Arc::new(move |method, _, _| {
        if *method == Method::DELETE
            && deletions.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2
        {
            (503, json!({"error": "down"}), false)
        } else if *method == Method::DELETE {
            (204, Value::Null, false)
        } else {
            (201, json!({"id": "u-1"}), false)
        }
    });
    let flaky = Participant::start("flaky", log.clone(), script).await;
    drop(users);
    let dir = tempfile::tempdir().unwrap();
    let policies = format!(
        "upstreams:\n  users: {{address: '{}', retry: {{max_attempts: 1}}}}\n  email: {{address: '{}', retry: {{max_attempts: 1}}}}\n",
        flaky.upstream.addr, email.upstream.addr
    );
    let running = control_plane(dir.path(), &policies).await;
    let mut client = client(&running).await;
    let mut step = create_user_step();
    step["retry"] = json!({"max_sends": 3, "interval": "10ms"});
    start(
        &mut client,
        json!({"id": "undo-waits", "steps": [
            step,
            {"name": "welcome", "action": {"upstream": "email", "method": "POST", "path": "/emails"}}
        ]}),
    )
    .await;
    let saga = finished(&mut client, "undo-waits").await;
    assert_eq!(saga.state(), SagaState::Compensated, "{saga:?}");
    let undo = saga.steps[0].compensation.as_ref().unwrap();
    assert_eq!((undo.sends, undo.status), (3, 204));
    running.shutdown().await;
}

#[tokio::test]
async fn an_abort_ends_a_steps_wait_to_be_sent_again() {
    let log: Log = Arc::default();
    let (users, _, _) = signup_participants(&log).await;
    let down = recovering("down", &log, usize::MAX, (200, Value::Null)).await;
    let dir = tempfile::tempdir().unwrap();
    let policies = format!(
        "upstreams:\n  users: {{address: '{}'}}\n  down: {{address: '{}', retry: {{max_attempts: 1}}}}\n",
        users.upstream.addr, down.upstream.addr
    );
    let running = control_plane(dir.path(), &policies).await;
    let mut client = client(&running).await;
    let mut events = client
        .watch(WatchSagasRequest::default())
        .await
        .unwrap()
        .into_inner();
    start(
        &mut client,
        json!({"id": "patient", "steps": [
            create_user_step(),
            {"name": "wait", "retry": {"max_sends": 10, "interval": "1h"},
             "action": {"upstream": "down", "method": "POST", "path": "/x"}}
        ]}),
    )
    .await;
    // The step failed once and waits an hour to be sent again.
    while !events
        .message()
        .await
        .unwrap()
        .unwrap()
        .message
        .contains("sent again at")
    {}
    client
        .abort(AbortSagaRequest {
            id: "patient".into(),
            reason: "no more waiting".into(),
        })
        .await
        .unwrap();
    let saga = finished(&mut client, "patient").await;
    assert_eq!(saga.state(), SagaState::Aborted, "{saga:?}");
    assert_eq!(saga.steps[1].state(), StepState::Failed);
    assert_eq!(saga.steps[0].state(), StepState::Compensated);
    assert_eq!(down.upstream.requests(), 1);
    running.shutdown().await;
}
