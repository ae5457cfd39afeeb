//! Breaker transitions under a paused clock.

use super::*;
use crate::resilience::policy::Policy;
use crate::telemetry::metrics::Metrics;

fn params() -> BreakerParams {
    let mut p = Policy::default().circuit_breaker.unwrap();
    p.consecutive_failures = 3;
    p.window = 10;
    p.min_calls = 10;
    p.failure_rate_threshold = 0.5;
    p.open_for = Duration::from_secs(10);
    p.max_open_for = Duration::from_secs(30);
    p
}

fn breaker(params: BreakerParams) -> (Arc<Breaker>, Metrics) {
    let metrics = Metrics::new();
    let b = Breaker::new(Arc::from("ocr"), params, metrics.upstream("ocr"));
    (b, metrics)
}

const FAIL: Option<Failure> = Some(Failure::Http(503));
const MS: Duration = Duration::from_millis(1);

fn call(b: &Arc<Breaker>, failure: Option<Failure>) {
    let admission = b.admit().expect("admitted");
    b.record(admission, failure, MS);
}

#[tokio::test(start_paused = true)]
async fn opens_after_consecutive_failures_and_refuses_at_once() {
    let (b, metrics) = breaker(params());
    call(&b, FAIL);
    call(&b, FAIL);
    call(&b, None);
    call(&b, FAIL);
    call(&b, FAIL);
    assert_eq!(b.state(), State::Closed, "a success resets the count");
    call(&b, FAIL);
    assert_eq!(b.state(), State::Open);
    assert!(b.admit().is_err());
    let text = metrics.encode();
    assert!(
        text.contains("breakwater_circuit_state{upstream=\"ocr\"} 1"),
        "{text}"
    );
    assert!(text.contains("breakwater_circuit_transitions_total{upstream=\"ocr\",to=\"open\"} 1"));
}

#[tokio::test(start_paused = true)]
async fn probes_after_open_for_and_closes_on_success() {
    let (b, _m) = breaker(params());
    for _ in 0..3 {
        call(&b, FAIL);
    }
    tokio::time::advance(Duration::from_secs(10) - MS).await;
    assert!(b.admit().is_err(), "still open just before open_for");
    tokio::time::advance(MS).await;
    let probe = b.admit().expect("a probe is let through");
    assert!(matches!(probe, Admission::Probe(_)));
    assert_eq!(b.state(), State::HalfOpen);
    assert!(b.admit().is_err(), "one probe at a time");
    b.record(probe, None, MS);
    assert_eq!(b.state(), State::Closed);
    assert!(matches!(b.admit().unwrap(), Admission::Normal));
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_reopens_for_twice_as_long_up_to_the_max() {
    let (b, _m) = breaker(params());
    for _ in 0..3 {
        call(&b, FAIL);
    }
    for expected in [20, 30, 30] {
        tokio::time::advance(Duration::from_secs(30)).await;
        let probe = b.admit().unwrap();
        b.record(probe, FAIL, MS);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.snapshot().next_probe_in_ms, Some(expected * 1000));
    }
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_probe_frees_its_slot() {
    let (b, _m) = breaker(params());
    for _ in 0..3 {
        call(&b, FAIL);
    }
    tokio::time::advance(Duration::from_secs(10)).await;
    drop(b.admit().unwrap());
    assert!(
        b.admit().is_ok(),
        "the cancelled probe's slot is free again"
    );
}

#[tokio::test(start_paused = true)]
async fn rate_limits_count_nowhere_by_default() {
    let mut p = params();
    p.min_calls = 4;
    p.window = 4;
    let (b, _m) = breaker(p);
    for _ in 0..20 {
        call(&b, Some(Failure::Http(429)));
        call(&b, Some(Failure::Grpc(crate::grpc::RESOURCE_EXHAUSTED)));
    }
    assert_eq!(b.state(), State::Closed, "rate limiting is not an outage");
    assert_eq!(b.snapshot().window_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn listed_rate_limits_count_toward_the_rate_not_the_streak() {
    let mut p = params();
    p.min_calls = 4;
    p.window = 4;
    p.failure_on = crate::classify::Conditions::parse(["429", "503"]).unwrap();
    let (b, _m) = breaker(p);
    for _ in 0..3 {
        call(&b, Some(Failure::Http(429)));
    }
    assert_eq!(
        b.state(),
        State::Closed,
        "three 429s in a row are not an outage"
    );
    call(&b, None);
    assert_eq!(
        b.state(),
        State::Open,
        "but 3 of the last 4 calls failed: over 50%"
    );
}

#[tokio::test(start_paused = true)]
async fn failure_rate_needs_min_calls() {
    let mut p = params();
    p.consecutive_failures = 0;
    let (b, _m) = breaker(p);
    for i in 0..9 {
        call(&b, if i % 2 == 0 { FAIL } else { None });
    }
    assert_eq!(b.state(), State::Closed, "9 calls < min_calls");
    call(&b, None);
    assert_eq!(b.state(), State::Open, "5 of 10 failed");
}

#[tokio::test(start_paused = true)]
async fn slow_calls_trip_the_breaker() {
    let mut p = params();
    p.consecutive_failures = 0;
    p.min_calls = 2;
    p.slow_call_duration = Some(Duration::from_secs(1));
    p.slow_call_rate_threshold = 1.0;
    let (b, _m) = breaker(p);
    let a = b.admit().unwrap();
    b.record(a, None, Duration::from_secs(2));
    let a = b.admit().unwrap();
    b.record(a, None, Duration::from_secs(3));
    assert_eq!(b.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn failures_outside_failure_on_do_not_count() {
    let (b, _m) = breaker(params());
    for _ in 0..5 {
        call(&b, Some(Failure::Http(501)));
        call(&b, Some(Failure::Grpc(5)));
    }
    assert_eq!(
        b.state(),
        State::Closed,
        "501 and NOT_FOUND are not outages"
    );
}

#[tokio::test(start_paused = true)]
async fn operators_can_force_states() {
    let (b, _m) = breaker(params());
    assert!(b.force("open"));
    assert!(b.admit().is_err());
    assert!(b.force("close"));
    assert!(b.admit().is_ok());
    assert!(!b.force("explode"));
}

#[tokio::test(start_paused = true)]
async fn successes_counted_without_the_lock_still_fill_the_window() {
    let mut p = params();
    p.consecutive_failures = 0;
    let (b, _m) = breaker(p);
    for _ in 0..6 {
        call(&b, None);
    }
    assert!(b.clean.load(Ordering::Acquire), "a clean window");
    assert_eq!(
        b.clean_successes.load(Ordering::Acquire),
        6,
        "no lock taken"
    );
    assert_eq!(b.snapshot().window_calls, 6, "folded in when read");
    for _ in 0..4 {
        call(&b, FAIL);
    }
    assert!(!b.clean.load(Ordering::Acquire), "failures in the window");
    let snapshot = b.snapshot();
    assert_eq!((snapshot.window_calls, snapshot.window_failures), (10, 4));
    assert_eq!(b.state(), State::Closed, "4 of 10 is under the rate");
    call(&b, FAIL);
    assert_eq!(b.state(), State::Open, "the oldest success left: 5 of 10");
    b.force("close");
    assert!(b.clean.load(Ordering::Acquire), "closed afresh is clean");
    for _ in 0..25 {
        call(&b, None);
    }
    assert_eq!(
        b.snapshot().window_calls,
        10,
        "the window holds its last calls"
    );
}

#[test]
fn concurrent_records_keep_the_window_consistent() {
    // Successes on the lock-free path race failures on the locked one; the
    // window's counts must stay within the window (a miscount would
    // underflow and panic) and a failure burst must still trip.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut p = params();
    p.consecutive_failures = 0;
    p.open_for = Duration::from_secs(3600);
    let (b, _m) = breaker(p);
    std::thread::scope(|scope| {
        for t in 0..4 {
            let b = b.clone();
            let handle = rt.handle().clone();
            scope.spawn(move || {
                let _guard = handle.enter();
                for i in 0..5_000 {
                    let failure = (t == 0 && i % 7 == 0).then_some(Failure::Http(503));
                    if let Ok(admission) = b.admit() {
                        b.record(admission, failure, MS);
                    }
                }
            });
        }
    });
    let snapshot = b.snapshot();
    assert!(snapshot.window_calls <= 10, "{snapshot:?}");
    assert!(
        snapshot.window_failures <= snapshot.window_calls,
        "{snapshot:?}"
    );
    assert_eq!(b.state(), State::Closed, "1 in 28 failing is far under 50%");
    for _ in 0..10 {
        if let Ok(admission) = b.admit() {
            b.record(admission, FAIL, MS);
        }
    }
    assert_eq!(b.state(), State::Open, "a burst still trips it");
}
