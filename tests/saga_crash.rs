//! Sagas survive SIGKILL: the control plane runs as a separate process,
//! is killed during a step, during a compensation, and at arbitrary points
//! under load, and restarted on the same data. Every saga then finishes,
//! and participants that honour `Idempotency-Key` apply each call once.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use breakwater::api::sagas_client::SagasClient;
use breakwater::api::{
    GetSagaRequest, Saga, SagaState, StartSagaRequest, StepState, WatchSagasRequest,
};
use breakwater::control::saga::proto as saga_proto;
use http::Method;
use serde_json::{Value, json};
use support::{Logged, Participant, Script};
use tokio::sync::Notify;
use tonic::transport::Channel;

type Log = Arc<Mutex<Vec<String>>>;

/// Starts the control plane; answers it, its URL and how many unfinished
/// sagas it resumed.
fn control_plane(dir: &std::path::Path, policies: &std::path::Path) -> (Logged, String, u64) {
    let (process, url, ready) =
        support::control_plane_process(dir, &["--config".as_ref(), policies.as_os_str()]);
    (process, url, ready["resumed_sagas"].as_u64().unwrap())
}

async fn connect(url: &str) -> SagasClient<Channel> {
    SagasClient::connect(url.to_owned()).await.unwrap()
}

async fn finished(client: &mut SagasClient<Channel>, id: &str) -> Saga {
    let mut events = client
        .watch(WatchSagasRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner();
    while events.message().await.unwrap().is_some() {}
    client
        .get(GetSagaRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// Users and subscriptions that create ids from what they are sent, and
/// a mailer that fails for `fail@...`. `hang` decides, per call, whether
/// to apply it and then never answer.
struct World {
    log: Log,
    users: Participant,
    subscriptions: Participant,
    email: Participant,
    policies: tempfile::NamedTempFile,
}

type Hang = Arc<dyn Fn(&str, &Method) -> bool + Send + Sync>;

async fn world(hang: Hang) -> World {
    let log: Log = Arc::default();
    let participant = |name: &'static str, answer: fn(&Method, &Value) -> (u16, Value)| {
        let hang = hang.clone();
        let script: Script = Arc::new(move |method, _path, body| {
            let (status, value) = answer(method, body);
            (status, value, hang(name, method))
        });
        Participant::start(name, log.clone(), script)
    };
    let users = participant("users", |method, body| match *method {
        Method::POST => (
            201,
            json!({"id": format!("u-{}", body["name"].as_str().unwrap())}),
        ),
        _ => (204, Value::Null),
    })
    .await;
    let subscriptions = participant("subscriptions", |method, body| match *method {
        Method::POST => (
            201,
            json!({"id": format!("s-{}", body["user"].as_str().unwrap())}),
        ),
        _ => (204, Value::Null),
    })
    .await;
    let email = participant("email", |_, body| {
        if body["to"].as_str().unwrap().starts_with("fail") {
            (503, json!({"error": "mailbox unavailable"}))
        } else {
            (202, json!({"queued": true}))
        }
    })
    .await;
    let policies = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        policies.path(),
        format!(
            // The mailer fails every third saga on purpose, in whatever order
            // the sagas reach it: its breaker would open on five failures in
            // a row (one run in six) and fail sagas meant to complete. The
            // breaker is not what these tests are about.
            "upstreams:\n  users: {{address: '{}'}}\n  subscriptions: {{address: '{}'}}\n  email: {{address: '{}', retry: {{max_attempts: 1}}, circuit_breaker: {{enabled: false}}}}\n",
            users.upstream.addr, subscriptions.upstream.addr, email.upstream.addr
        ),
    )
    .unwrap();
    World {
        log,
        users,
        subscriptions,
        email,
        policies,
    }
}

impl World {
    fn applied_twice(&self) -> Vec<String> {
        [&self.users, &self.subscriptions, &self.email]
            .iter()
            .flat_map(|p| p.applied_twice())
            .collect()
    }

    fn applied(&self, key: &str) -> usize {
        [&self.users, &self.subscriptions, &self.email]
            .iter()
            .map(|p| {
                p.applied_keys
                    .lock()
                    .unwrap()
                    .get(key)
                    .copied()
                    .unwrap_or(0)
            })
            .sum()
    }
}

fn signup(id: &str, email: &str) -> breakwater::api::SagaDefinition {
    let spec = json!({
        "id": id,
        "input": {"name": id, "email": email},
        "steps": [
            {"name": "create-user",
             "action": {"upstream": "users", "method": "POST", "path": "/users",
                        "body": {"name": "{{input.name}}"}},
             "compensation": {"upstream": "users", "method": "DELETE",
                              "path": "/users/{{steps.create-user.body.id}}"}},
            {"name": "subscribe",
             "action": {"upstream": "subscriptions", "method": "POST", "path": "/subscriptions",
                        "body": {"user": "{{steps.create-user.body.id}}"}},
             "compensation": {"upstream": "subscriptions", "method": "DELETE",
                              "path": "/subscriptions/{{steps.subscribe.body.id}}"}},
            {"name": "welcome",
             "action": {"upstream": "email", "method": "POST", "path": "/emails",
                        "body": {"to": "{{input.email}}"}}}
        ]
    });
    saga_proto::spec_to_proto(&serde_json::from_value(spec).unwrap())
}

/// Hangs the first call `name` gets with `method`, and tells `reached`.
fn hang_once(name: &'static str, method: Method, reached: Arc<Notify>) -> Hang {
    let done = AtomicBool::new(false);
    Arc::new(move |n, m| {
        let hang = n == name && *m == method && !done.swap(true, Ordering::SeqCst);
        if hang {
            reached.notify_one();
        }
        hang
    })
}

/// Starts one signup saga, SIGKILLs the control plane once `method` to
/// subscriptions was applied (its answer never sent), restarts it and
/// answers the saga as it ends.
async fn killed_during(method: Method, id: &str, email: &str) -> (World, Saga) {
    let reached = Arc::new(Notify::new());
    let world = world(hang_once("subscriptions", method, reached.clone())).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut process, url, _) = control_plane(dir.path(), world.policies.path());
    let mut client = connect(&url).await;
    client
        .start(StartSagaRequest {
            definition: Some(signup(id, email)),
        })
        .await
        .unwrap();
    reached.notified().await;
    process.child.kill().unwrap();
    process.child.wait().unwrap();

    let (_process, url, resumed) = control_plane(dir.path(), world.policies.path());
    assert_eq!(resumed, 1);
    let mut client = connect(&url).await;
    let saga = finished(&mut client, id).await;
    (world, saga)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_in_flight_at_sigkill_is_sent_again_with_its_key_and_applied_once() {
    let (world, saga) = killed_during(Method::POST, "ann", "ann@example.com").await;
    assert_eq!(saga.state(), SagaState::Completed, "{saga:?}");
    let subscribe = saga.steps[1].action.as_ref().unwrap();
    assert_eq!(subscribe.sends, 2, "sent again after the restart");
    assert_eq!(world.subscriptions.upstream.requests(), 2);
    assert_eq!(
        world.subscriptions.upstream.keys_seen(),
        ["ann/subscribe/action"; 2]
    );
    assert_eq!(
        *world.log.lock().unwrap(),
        [
            r#"users POST /users {"name":"ann"}"#,
            r#"subscriptions POST /subscriptions {"user":"u-ann"}"#,
            r#"email POST /emails {"to":"ann@example.com"}"#,
        ]
    );
    assert!(world.applied_twice().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_in_flight_at_sigkill_is_sent_again_and_the_saga_compensates() {
    let (world, saga) = killed_during(Method::DELETE, "bob", "fail@example.com").await;
    assert_eq!(saga.state(), SagaState::Compensated, "{saga:?}");
    assert_eq!(saga.steps[1].state(), StepState::Compensated);
    assert_eq!(saga.steps[1].compensation.as_ref().unwrap().sends, 2);
    assert_eq!(
        *world.log.lock().unwrap(),
        [
            r#"users POST /users {"name":"bob"}"#,
            r#"subscriptions POST /subscriptions {"user":"u-bob"}"#,
            "subscriptions DELETE /subscriptions/s-u-bob null",
            "users DELETE /users/u-bob null",
        ]
    );
    assert!(world.applied_twice().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_arbitrary_points_under_load_loses_nothing_and_repeats_nothing() {
    const SAGAS: usize = 60;
    // Kill once about a third of the calls have come in: sagas are then
    // between transitions, in flight, and compensating.
    let calls = AtomicUsize::new(0);
    let third = Arc::new(Notify::new());
    let reached = third.clone();
    let world = world(Arc::new(move |_, _| {
        if calls.fetch_add(1, Ordering::SeqCst) + 1 == SAGAS {
            reached.notify_one();
        }
        false
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (mut process, url, _) = control_plane(dir.path(), world.policies.path());
    let client = connect(&url).await;
    let mut starts = tokio::task::JoinSet::new();
    for i in 0..SAGAS {
        let mut client = client.clone();
        // Every third saga's welcome email fails: it compensates.
        let email = if i % 3 == 0 { "fail@x" } else { "ok@x" };
        starts.spawn(async move {
            client
                .start(StartSagaRequest {
                    definition: Some(signup(&format!("load-{i:02}"), email)),
                })
                .await
        });
    }
    third.notified().await;
    process.child.kill().unwrap();
    process.child.wait().unwrap();
    let mut acked = std::collections::HashSet::new();
    while let Some(started) = starts.join_next().await {
        if let Ok(saga) = started.unwrap() {
            acked.insert(saga.into_inner().id);
        }
    }

    let (_process, url, resumed) = control_plane(dir.path(), world.policies.path());
    assert!(resumed > 0, "the kill came after every saga had finished");
    let mut client = connect(&url).await;
    for i in 0..SAGAS {
        let id = format!("load-{i:02}");
        let stored = client.get(GetSagaRequest { id: id.clone() }).await;
        if stored.is_err() {
            // Never acknowledged, never stored: nothing of it ran.
            assert!(!acked.contains(&id));
            assert_eq!(world.applied(&format!("{id}/create-user/action")), 0);
            continue;
        }
        let saga = finished(&mut client, &id).await;
        let once = |step: &str, call: &str| world.applied(&format!("{id}/{step}/{call}"));
        if i % 3 == 0 {
            assert_eq!(saga.state(), SagaState::Compensated, "{saga:?}");
            for step in ["create-user", "subscribe"] {
                assert_eq!(once(step, "action"), 1, "{id} {step}");
                assert_eq!(once(step, "compensation"), 1, "{id} {step}");
            }
            assert_eq!(once("welcome", "action"), 0);
        } else {
            assert_eq!(saga.state(), SagaState::Completed, "{saga:?}");
            for step in ["create-user", "subscribe", "welcome"] {
                assert_eq!(once(step, "action"), 1, "{id} {step}");
            }
        }
    }
    assert!(world.applied_twice().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_s_timer_is_kept_across_a_sigkill() {
    let world = world(Arc::new(|_, _| false)).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut process, url, _) = control_plane(dir.path(), world.policies.path());
    let mut client = connect(&url).await;
    // subscribe is not sent before 3 s from now.
    // (In whole milliseconds: the saga's record keeps times so.)
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let due =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(now.as_millis() as u64 + 3000);
    let mut definition: breakwater::api::SagaDefinition = signup("tim", "tim@example.com");
    definition.steps[1].not_before = Some(prost_types::Timestamp::from(due));
    // Every saga's events, from before it starts.
    let mut events = client
        .watch(WatchSagasRequest { id: String::new() })
        .await
        .unwrap()
        .into_inner();
    client
        .start(StartSagaRequest {
            definition: Some(definition),
        })
        .await
        .unwrap();
    // Killed once the wait is stored, and started again: it waits out
    // what is left, then sends the step once.
    loop {
        let event = events.message().await.unwrap().unwrap();
        if event.saga_id == "tim" && event.message.starts_with("step subscribe waits until") {
            break;
        }
    }
    assert_eq!(world.subscriptions.upstream.requests(), 0);
    process.child.kill().unwrap();
    process.child.wait().unwrap();
    let (_process, url, resumed) = control_plane(dir.path(), world.policies.path());
    assert_eq!(resumed, 1);
    let mut client = connect(&url).await;
    let saga = finished(&mut client, "tim").await;
    assert_eq!(saga.state(), SagaState::Completed, "{saga:?}");
    let subscribe = saga.steps[1].action.as_ref().unwrap();
    let started = std::time::SystemTime::try_from(subscribe.started_at.unwrap()).unwrap();
    assert!(started >= due, "sent {started:?}, before {due:?}");
    assert_eq!(subscribe.sends, 1);
    assert_eq!(world.users.upstream.requests(), 1);
    assert_eq!(world.subscriptions.upstream.requests(), 1);
    assert!(world.applied_twice().is_empty());
}
