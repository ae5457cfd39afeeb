//! The sled store and the group commit, on real sled files.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::layout::timestamp;
use super::*;
use crate::api::{Checkpoint, DeadLetter};

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn put(
    store: &SledStore,
    workflow: &str,
    step: &str,
    expected: Option<u64>,
    ttl_ms: Option<u64>,
    now: u64,
) -> Result<Checkpoint, StoreError> {
    store.put_checkpoint(
        NewCheckpoint {
            checkpoint: Checkpoint {
                workflow_id: workflow.into(),
                step: step.into(),
                ..Default::default()
            },
            ttl: ttl_ms.map(Duration::from_millis),
            expected_version: expected,
        },
        at(now),
    )
}

fn store() -> (tempfile::TempDir, SledStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    (dir, store)
}

#[test]
fn versions_count_up_and_compare_and_swap_holds() {
    let (_dir, store) = store();
    assert_eq!(
        put(&store, "inv-1", "ocr", Some(0), None, 1)
            .unwrap()
            .version,
        1
    );
    assert_eq!(
        put(&store, "inv-1", "validate", None, None, 2)
            .unwrap()
            .version,
        2
    );
    match put(&store, "inv-1", "match", Some(1), None, 3) {
        Err(StoreError::Conflict {
            expected: 1,
            current: 2,
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(
        put(&store, "inv-1", "match", Some(2), None, 3)
            .unwrap()
            .version,
        3
    );
    assert!(matches!(
        put(&store, "inv-1", "x", Some(0), None, 4),
        Err(StoreError::Conflict { current: 3, .. })
    ));
    let latest = store.get_checkpoint("inv-1", 0, at(5)).unwrap();
    assert_eq!((latest.version, latest.step.as_str()), (3, "match"));
    assert_eq!(store.get_checkpoint("inv-1", 1, at(5)).unwrap().step, "ocr");
    assert!(matches!(
        store.get_checkpoint("inv-1", 9, at(5)),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.get_checkpoint("inv-10", 0, at(5)),
        Err(StoreError::NotFound(_))
    ));
}

#[test]
fn history_pages_newest_first_and_prune_keeps_the_newest() {
    let (_dir, store) = store();
    for i in 0..7 {
        put(&store, "w", &format!("s{i}"), None, None, i).unwrap();
    }
    put(&store, "w2", "other", None, None, 1).unwrap();
    let first = store.list_checkpoints("w", None, 3, at(10)).unwrap();
    let versions: Vec<u64> = first.checkpoints.iter().map(|c| c.version).collect();
    assert_eq!(versions, [7, 6, 5]);
    let second = store.list_checkpoints("w", first.next, 3, at(10)).unwrap();
    let versions: Vec<u64> = second.checkpoints.iter().map(|c| c.version).collect();
    assert_eq!(versions, [4, 3, 2]);
    let last = store.list_checkpoints("w", second.next, 3, at(10)).unwrap();
    assert_eq!(last.checkpoints.len(), 1);
    assert_eq!(last.next, None);

    assert_eq!(store.prune_workflow("w", 2, at(10)).unwrap(), 5);
    let left: Vec<u64> = store
        .list_checkpoints("w", None, 10, at(10))
        .unwrap()
        .checkpoints
        .iter()
        .map(|c| c.version)
        .collect();
    assert_eq!(left, [7, 6]);
    assert_eq!(
        put(&store, "w", "s7", Some(7), None, 11).unwrap().version,
        8
    );
    assert_eq!(store.delete_workflow("w", at(12)).unwrap(), 3);
    assert!(matches!(
        store.get_checkpoint("w", 0, at(12)),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.get_checkpoint("w2", 0, at(12)).unwrap().step, "other");
}

#[test]
fn expired_workflows_vanish_at_once_and_are_swept() {
    let (_dir, store) = store();
    let put1 = put(&store, "short", "a", None, Some(100), 1_000).unwrap();
    assert_eq!(put1.expires_at, Some(timestamp(1_100)));
    put(&store, "short", "b", None, None, 1_050).unwrap();
    put(&store, "kept", "a", None, None, 1_000).unwrap();
    // Refreshed: a put with a TTL moves the expiry.
    put(&store, "refreshed", "a", None, Some(100), 1_000).unwrap();
    put(&store, "refreshed", "b", None, Some(1_000), 1_050).unwrap();
    assert_eq!(
        store.get_checkpoint("short", 0, at(1_099)).unwrap().step,
        "b"
    );
    assert!(matches!(
        store.get_checkpoint("short", 0, at(1_100)),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.list_checkpoints("short", None, 5, at(1_100)),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.sweep_expired(at(1_200)).unwrap(), 1);
    assert_eq!(store.checkpoints.scan_prefix(b"short").count(), 0);
    assert_eq!(
        store
            .get_checkpoint("refreshed", 0, at(1_200))
            .unwrap()
            .step,
        "b"
    );
    assert_eq!(store.sweep_expired(at(3_000)).unwrap(), 1);
    assert_eq!(
        store.get_checkpoint("kept", 0, at(9_000)).unwrap().step,
        "a"
    );
    assert!(store.expiry.is_empty());
}

fn letter(upstream: &str, reason: &str) -> DeadLetter {
    DeadLetter {
        upstream: upstream.into(),
        method: "POST".into(),
        uri: "/post".into(),
        body: bytes::Bytes::from_static(b"{}"),
        reason: reason.into(),
        ..Default::default()
    }
}

#[test]
fn letters_are_listed_oldest_first_by_upstream_and_removed() {
    let (_dir, store) = store();
    let a1 = store.enqueue_letter(letter("a", "r1"), at(1)).unwrap();
    let b1 = store.enqueue_letter(letter("b", "r2"), at(2)).unwrap();
    let a2 = store.enqueue_letter(letter("a", "r3"), at(3)).unwrap();
    assert_eq!(store.letter_count(), 3);
    let ids = |letters: &[DeadLetter]| letters.iter().map(|l| l.id.clone()).collect::<Vec<_>>();
    let (all, next) = store.list_letters(None, None, 2, true).unwrap();
    assert_eq!(ids(&all), [a1.id.clone(), b1.id.clone()]);
    let (rest, end) = store.list_letters(None, next, 2, true).unwrap();
    assert_eq!(ids(&rest), std::slice::from_ref(&a2.id));
    assert_eq!(end, None);
    let (of_a, _) = store.list_letters(Some("a"), None, 10, true).unwrap();
    assert_eq!(ids(&of_a), [a1.id.clone(), a2.id.clone()]);
    assert_eq!(
        store.get_letter(b1.id.parse().unwrap()).unwrap().reason,
        "r2"
    );

    let mut replayed = a1.clone();
    replayed.replays = 1;
    store.update_letter(&replayed).unwrap();
    assert_eq!(store.get_letter(a1.id.parse().unwrap()).unwrap().replays, 1);

    let of_a = store.letter_ids(Some("a")).unwrap();
    assert_eq!(store.remove_letters(&of_a).unwrap(), 2);
    assert_eq!(store.letter_count(), 1);
    assert!(
        store
            .list_letters(Some("a"), None, 10, true)
            .unwrap()
            .0
            .is_empty()
    );
    assert!(matches!(
        store.update_letter(&replayed),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        store
            .remove_letters(&store.letter_ids(None).unwrap())
            .unwrap(),
        1
    );
    assert_eq!(store.letter_count(), 0);
}

#[test]
fn a_letter_enqueued_twice_under_its_capture_id_is_stored_once() {
    let (_dir, store) = store();
    let captured = DeadLetter {
        capture_id: "c-1".into(),
        ..letter("a", "r1")
    };
    let first = store.enqueue_letter(captured.clone(), at(1)).unwrap();
    let again = store.enqueue_letter(captured.clone(), at(2)).unwrap();
    assert_eq!(again.id, first.id, "the first is answered");
    assert_eq!(again.enqueued_at, first.enqueued_at);
    let other = DeadLetter {
        capture_id: "c-2".into(),
        ..letter("a", "r1")
    };
    let other = store.enqueue_letter(other, at(3)).unwrap();
    assert_ne!(other.id, first.id);
    // Letters without a capture id (enqueued by hand) are never merged.
    store.enqueue_letter(letter("a", "r1"), at(4)).unwrap();
    store.enqueue_letter(letter("a", "r1"), at(5)).unwrap();
    assert_eq!(store.letter_count(), 4);
    assert_eq!(
        store
            .list_letters(Some("a"), None, 10, true)
            .unwrap()
            .0
            .len(),
        4
    );
    // Once removed (replayed, purged), the capture id is free again.
    store.remove_letters(&[first.id.parse().unwrap()]).unwrap();
    let later = store.enqueue_letter(captured, at(6)).unwrap();
    assert_ne!(later.id, first.id);
    assert_eq!(store.letter_count(), 4);
}

#[test]
fn an_expired_workflow_starts_over() {
    let (_dir, store) = store();
    put(&store, "w", "a", None, Some(10), 0).unwrap();
    put(&store, "w", "b", None, None, 5).unwrap();
    let fresh = put(&store, "w", "new", Some(0), None, 100).unwrap();
    assert_eq!(fresh.version, 1);
    let history = store.list_checkpoints("w", None, 10, at(100)).unwrap();
    assert_eq!(history.checkpoints.len(), 1);
    assert_eq!(history.checkpoints[0].step, "new");
}

#[test]
fn workflows_list_by_id_with_their_latest_version_and_pages() {
    let (_dir, store) = store();
    for (workflow, steps) in [("inv-2", 1), ("inv-1", 3), ("inv-10", 2)] {
        for step in 0..steps {
            put(&store, workflow, &format!("s{step}"), None, None, 1).unwrap();
        }
    }
    put(&store, "gone", "s0", None, Some(5), 1).unwrap();
    let (all, next) = store.list_workflows(None, 10, at(10)).unwrap();
    let seen: Vec<(&str, u64, &str)> = all
        .iter()
        .map(|c| (c.workflow_id.as_str(), c.version, c.step.as_str()))
        .collect();
    assert_eq!(
        seen,
        [("inv-1", 3, "s2"), ("inv-10", 2, "s1"), ("inv-2", 1, "s0")],
        "by id, the latest of each, the expired one left out"
    );
    assert_eq!(next, None);
    let (first, next) = store.list_workflows(None, 2, at(10)).unwrap();
    assert_eq!(first.len(), 2);
    assert_eq!(next.as_deref(), Some("inv-10"));
    let (rest, next) = store.list_workflows(Some("inv-10"), 2, at(10)).unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].workflow_id, "inv-2");
    assert_eq!(next, None);
    let (exact, next) = store.list_workflows(None, 3, at(10)).unwrap();
    assert_eq!(
        (exact.len(), next),
        (3, None),
        "a full last page has no next"
    );
}

#[test]
fn a_letter_is_listed_without_its_body_and_seal_and_nothing_else_lost() {
    let (_dir, store) = store();
    let ts = |s| {
        Some(prost_types::Timestamp {
            seconds: s,
            nanos: 7,
        })
    };
    let full = DeadLetter {
        upstream: "a".into(),
        source: "10.0.0.1".into(),
        method: "POST".into(),
        uri: "/x".into(),
        headers: vec![crate::api::Header {
            name: "k".into(),
            value: bytes::Bytes::from_static(b"v"),
        }],
        body: bytes::Bytes::from_static(b"the body"),
        body_truncated: true,
        reason: "timeout".into(),
        attempts: 3,
        failed_at: ts(1),
        replays: 2,
        last_replay_error: "503".into(),
        last_replay_at: ts(3),
        grpc: true,
        capture_id: "c-1".into(),
        seal: bytes::Bytes::from_static(b"seal"),
        ..Default::default()
    };
    let stored = store.enqueue_letter(full, at(5)).unwrap();
    let (with, _) = store.list_letters(None, None, 10, true).unwrap();
    assert_eq!(with[0], stored);
    let (without, _) = store.list_letters(None, None, 10, false).unwrap();
    let mut expected = stored.clone();
    expected.body = bytes::Bytes::new();
    expected.seal = bytes::Bytes::new();
    assert_eq!(without[0], expected, "every other field, as stored");
    // The head names every field of the message but the body (7) and the
    // seal (18): a field added to the proto must be added to it too.
    let pool = prost_reflect::DescriptorPool::decode(crate::api::FILE_DESCRIPTOR_SET).unwrap();
    let message = pool
        .get_message_by_name("breakwater.v1.DeadLetter")
        .unwrap();
    let tags: Vec<u32> = message.fields().map(|f| f.number()).collect();
    assert_eq!(
        tags,
        (1..=18).collect::<Vec<_>>(),
        "update LetterHead in layout.rs"
    );
}
