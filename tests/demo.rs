//! The demo: both runs go through, Breakwater's does better on the fault
//! model, and a rerun on the same data resumes from the checkpoints.

use breakwater::demo::{self, DemoOptions, agents::Model};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_both_pipelines_and_a_rerun_resumes() {
    const INVOICES: u64 = 120;
    let dir = tempfile::tempdir().unwrap();
    let options = DemoOptions {
        invoices: INVOICES,
        seed: 3,
        rate: 400,
        data_dir: Some(dir.path().to_owned()),
        keep_running: false,
        progress: false,
    };
    let report = demo::run(options.clone()).await.unwrap();
    let (direct, through) = (&report.direct, &report.breakwater);
    assert_eq!(direct.succeeded + direct.need_a_person, INVOICES);
    assert_eq!(through.succeeded + through.need_a_person, INVOICES);
    assert!(
        through.success_rate() > direct.success_rate(),
        "{direct:?}\n{through:?}"
    );
    // Every invoice whose reference matches no order exactly, and that got
    // as far as matching, was answered with suggested matches.
    let model = Model {
        seed: 3,
        invoices: INVOICES,
        rate: 400,
    };
    let inexact = (0..INVOICES)
        .filter(|i| {
            let invoice = model.invoice(*i);
            !invoice.exact_reference && invoice.valid_amount
        })
        .count() as u64;
    assert!(
        through.degraded > 0 && through.degraded <= inexact,
        "{through:?}"
    );
    assert_eq!(direct.degraded, 0);
    // Closed periods are compensated: the entry made is deleted.
    let closed = (0..INVOICES)
        .filter(|i| model.invoice(*i).closed_period)
        .count() as u64;
    assert!(through.compensations <= closed + 1, "{through:?}");
    assert!(!through.stopped_at.contains_key("matching"), "{through:?}");

    // Same data: the invoices done are not processed again.
    let again = demo::run(options).await.unwrap();
    assert_eq!(again.breakwater.resumed, through.succeeded);
    assert_eq!(
        again.breakwater.succeeded + again.breakwater.need_a_person,
        INVOICES - through.succeeded
    );
}
