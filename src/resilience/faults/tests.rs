//! Fault specs, the dice and the made-up answers.

use super::*;
use http_body_util::BodyExt;

fn spec(yaml_like_json: &str) -> FaultSpec {
    serde_json::from_str(yaml_like_json).unwrap()
}

#[test]
fn rolls_are_fixed_by_the_seed_and_near_the_rate() {
    let hits = |seed| {
        (0..10_000)
            .filter(|n| roll(seed, FaultKind::Abort, *n) < 0.3)
            .count()
    };
    assert_eq!(hits(7), hits(7));
    assert_ne!(hits(7), hits(8));
    assert!((2800..3200).contains(&hits(7)), "{}", hits(7));
    let other: Vec<f64> = (0..4).map(|n| roll(7, FaultKind::Delay, n)).collect();
    let abort: Vec<f64> = (0..4).map(|n| roll(7, FaultKind::Abort, n)).collect();
    assert_ne!(other, abort, "each kind has its own dice");
}

#[test]
fn abort_needs_a_status_and_maps_between_http_and_grpc() {
    let errors = spec(r#"{"abort": {"percent": 5}}"#).resolve().unwrap_err();
    assert_eq!(errors[0].0, "abort");
    let faults = spec(r#"{"abort": {"percent": 100, "status": 503}}"#)
        .resolve()
        .unwrap();
    let answer = faults.draw(Overrides::default(), true).abort.unwrap();
    assert_eq!(answer.headers()[grpc::STATUS], "14");
    let faults = spec(r#"{"abort": {"percent": 100, "grpc_status": "resource-exhausted"}}"#)
        .resolve()
        .unwrap();
    let answer = faults.draw(Overrides::default(), false).abort.unwrap();
    assert_eq!(answer.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(answer.headers()[FAULT_HEADER], "abort");
    let error =
        serde_json::from_str::<FaultSpec>(r#"{"abort": {"percent": 1, "grpc_status": "nope"}}"#)
            .unwrap_err();
    assert!(
        error.to_string().contains("not a gRPC error code"),
        "{error}"
    );
}

#[test]
fn header_overrides_apply_and_are_removed() {
    let mut headers = HeaderMap::new();
    headers.insert(DELAY_HEADER, HeaderValue::from_static("250"));
    headers.insert(ABORT_HEADER, HeaderValue::from_static("unavailable"));
    let o = overrides(&mut headers, true);
    assert!(headers.is_empty());
    let faults = FaultSpec::default().resolve().unwrap();
    let injection = faults.draw(o, true);
    assert_eq!(injection.delay, Some(Duration::from_millis(250)));
    assert_eq!(injection.abort.unwrap().headers()[grpc::STATUS], "14");
    let mut headers = HeaderMap::new();
    headers.insert(ABORT_HEADER, HeaderValue::from_static("teapot"));
    assert!(
        faults
            .draw(overrides(&mut headers, false), false)
            .abort
            .is_none()
    );
}

#[tokio::test]
async fn truncation_passes_the_first_bytes_then_fails() {
    let metrics = crate::telemetry::metrics::Metrics::new();
    let cut = truncate(body::full("0123456789"), 4, metrics.upstream("u"));
    let mut cut = std::pin::pin!(cut);
    let first = cut.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "0123");
    assert!(cut.frame().await.unwrap().is_err());
    let empty = truncate(body::full("0123"), 0, metrics.upstream("u"));
    assert!(empty.collect().await.is_err());
    let whole = truncate(body::full("012"), 4, metrics.upstream("u"));
    assert_eq!(whole.collect().await.unwrap().to_bytes(), "012");
    assert!(
        metrics
            .encode()
            .contains("breakwater_faults_injected_total{upstream=\"u\",kind=\"truncate\"} 2")
    );
}
