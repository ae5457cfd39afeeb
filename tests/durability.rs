//! Durability: the control plane is killed with SIGKILL in the middle of a
//! write load, restarted on the same data, and every acknowledged
//! checkpoint and dead letter is there, whole.

mod support;

use std::sync::{Arc, Mutex};

use breakwater::api::checkpoints_client::CheckpointsClient;
use breakwater::api::dead_letters_client::DeadLettersClient;
use breakwater::api::{
    DeadLetter, EnqueueDeadLetterRequest, GetCheckpointRequest, GetDeadLetterRequest,
    ListCheckpointsRequest, PutCheckpointRequest,
};
use bytes::Bytes;
use support::Logged;

const WRITERS: usize = 16;
const LETTER_WRITERS: usize = 4;

fn control_plane(dir: &std::path::Path) -> (Logged, String) {
    let (process, url, _) = support::control_plane_process(dir, &[]);
    (process, url)
}

/// The state written as version `version` of `workflow`: 1 KiB that says
/// whose it is, so a mixed-up or partial record shows.
fn state(workflow: &str, version: u64) -> Bytes {
    let mut text = format!("{workflow}@{version}:");
    while text.len() < 1024 {
        text.push_str(&format!("{version:x}"));
    }
    text.truncate(1024);
    Bytes::from(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_checkpoint_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let (mut process, url) = control_plane(dir.path());
    let acked: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let enough = Arc::new(tokio::sync::Notify::new());
    let client = CheckpointsClient::connect(url.clone()).await.unwrap();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (mut client, acked, enough) = (client.clone(), acked.clone(), enough.clone());
        writers.push(tokio::spawn(async move {
            let workflow = format!("wf-{w}");
            for version in 1u64.. {
                let put = PutCheckpointRequest {
                    workflow_id: workflow.clone(),
                    step: format!("step-{version}"),
                    state: state(&workflow, version),
                    expected_version: Some(version - 1),
                    ..Default::default()
                };
                match client.put(put).await {
                    Ok(answer) => {
                        assert_eq!(answer.get_ref().version, version);
                        let mut acked = acked.lock().unwrap();
                        acked.push((workflow.clone(), version));
                        if acked.len() == 400 {
                            enough.notify_one();
                        }
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    let letters: Arc<Mutex<Vec<(String, Bytes)>>> = Arc::default();
    let letter_client = DeadLettersClient::connect(url.clone()).await.unwrap();
    for w in 0..LETTER_WRITERS {
        let (mut client, letters) = (letter_client.clone(), letters.clone());
        writers.push(tokio::spawn(async move {
            for n in 0u64.. {
                let body = state(&format!("letter-{w}"), n);
                let letter = DeadLetter {
                    upstream: format!("up-{w}"),
                    method: "POST".into(),
                    uri: format!("/orders/{n}"),
                    body: body.clone(),
                    reason: "http-503".into(),
                    ..Default::default()
                };
                match client
                    .enqueue(EnqueueDeadLetterRequest {
                        letter: Some(letter),
                    })
                    .await
                {
                    Ok(stored) => letters.lock().unwrap().push((stored.into_inner().id, body)),
                    Err(_) => return,
                }
            }
        }));
    }
    // Kill once a good number of writes are acknowledged, with more in
    // flight.
    enough.notified().await;
    process.child.kill().unwrap();
    process.child.wait().unwrap();
    for writer in writers {
        writer.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let letters = letters.lock().unwrap().clone();
    drop(process);

    let (_process, url) = control_plane(dir.path());
    let mut client = CheckpointsClient::connect(url.clone()).await.unwrap();
    let mut letter_client = DeadLettersClient::connect(url).await.unwrap();
    assert!(!letters.is_empty());
    for (id, body) in &letters {
        let letter = letter_client
            .get(GetDeadLetterRequest { id: id.clone() })
            .await
            .unwrap_or_else(|e| panic!("letter {id}: {e}"))
            .into_inner();
        assert_eq!(&letter.body, body, "letter {id}");
    }
    let mut highest = std::collections::BTreeMap::new();
    for (workflow, version) in &acked {
        let entry = highest.entry(workflow.clone()).or_insert(0);
        *entry = (*entry).max(*version);
    }
    for (workflow, acked_up_to) in highest {
        let latest = client
            .get(GetCheckpointRequest {
                workflow_id: workflow.clone(),
                version: 0,
            })
            .await
            .unwrap()
            .into_inner();
        // A write may have become durable without its answer getting out.
        assert!(
            latest.version >= acked_up_to,
            "{workflow}: {} < {acked_up_to}",
            latest.version
        );
        let history = client
            .list(ListCheckpointsRequest {
                workflow_id: workflow.clone(),
                page_size: 1000,
                page_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .checkpoints;
        let versions: Vec<u64> = history.iter().map(|c| c.version).collect();
        let expected: Vec<u64> = (1..=latest.version).rev().collect();
        assert_eq!(versions, expected, "{workflow}: no gaps");
        for checkpoint in history {
            assert_eq!(
                checkpoint.state,
                state(&workflow, checkpoint.version),
                "{workflow}"
            );
            assert_eq!(checkpoint.step, format!("step-{}", checkpoint.version));
        }
    }
    assert!(acked.len() >= 400);
}
