//! The control plane's Prometheus metrics, served on its admin port.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Buckets for API calls and flushes, in seconds.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SagaCallLabels {
    upstream: String,
    call: &'static str,
    result: &'static str,
}

/// Buckets for saga calls, in seconds.
const CALL_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

/// The control plane's registry and metrics.
pub struct ControlMetrics {
    registry: Registry,
    checkpoints_written: Counter,
    dead_letters: Gauge,
    replays: Family<ResultLabels, Counter>,
    requests: Family<MethodLabels, Histogram, fn() -> Histogram>,
    flushes: Histogram,
    sagas: Family<StateLabels, Gauge>,
    saga_calls: Family<SagaCallLabels, Histogram, fn() -> Histogram>,
    compensations: Family<ResultLabels, Counter>,
}

impl std::fmt::Debug for ControlMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlMetrics").finish_non_exhaustive()
    }
}

impl Default for ControlMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ControlMetrics {
    /// Registers every control-plane metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("breakwater");
        let checkpoints_written = Counter::default();
        registry.register(
            "checkpoints_written",
            "Checkpoint versions written (acknowledged, durable)",
            checkpoints_written.clone(),
        );
        let dead_letters = Gauge::default();
        registry.register(
            "dead_letters",
            "Letters in the dead-letter queue",
            dead_letters.clone(),
        );
        let replays = Family::<ResultLabels, Counter>::default();
        registry.register(
            "dead_letter_replays",
            "Dead-letter replays, by result: delivered, failed, or refused (no valid seal, or a body cut at capture)",
            replays.clone(),
        );
        let requests: Family<MethodLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(BUCKETS));
        registry.register(
            "control_request_duration_seconds",
            "Control-plane API calls, by method, from request to answer",
            requests.clone(),
        );
        let flushes = Histogram::new(BUCKETS);
        registry.register(
            "store_flush_duration_seconds",
            "Store flushes (one per group of concurrent writes)",
            flushes.clone(),
        );
        let sagas = Family::<StateLabels, Gauge>::default();
        registry.register(
            "sagas",
            "Sagas by state: running, completed, compensating, compensated, failed, aborted",
            sagas.clone(),
        );
        for state in super::saga::SagaState::ALL {
            let _ = sagas.get_or_create(&StateLabels {
                state: state.as_str(),
            });
        }
        let saga_calls: Family<SagaCallLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(CALL_BUCKETS));
        registry.register(
            "saga_step_duration_seconds",
            "Saga calls by upstream, call (action or compensation) and result, \
             from send to answer, retries included",
            saga_calls.clone(),
        );
        let compensations = Family::<ResultLabels, Counter>::default();
        registry.register(
            "saga_compensations",
            "Compensations run, by result: ok or failed",
            compensations.clone(),
        );
        Self {
            registry,
            sagas,
            saga_calls,
            compensations,
            checkpoints_written,
            dead_letters,
            replays,
            requests,
            flushes,
        }
    }

    /// Counts a durable checkpoint write.
    pub fn checkpoint_written(&self) {
        self.checkpoints_written.inc();
    }

    /// Sets the dead-letter queue's depth.
    pub fn set_dead_letters(&self, depth: u64) {
        self.dead_letters
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    /// Counts a replay.
    pub fn replayed(&self, delivered: bool) {
        let result = if delivered { "delivered" } else { "failed" };
        self.replays.get_or_create(&ResultLabels { result }).inc();
    }

    /// Counts a replay refused before anything was sent.
    pub fn replay_refused(&self) {
        self.replays
            .get_or_create(&ResultLabels { result: "refused" })
            .inc();
    }

    /// Records an API call's latency.
    pub fn observe_request(&self, method: &'static str, took: Duration) {
        self.requests
            .get_or_create(&MethodLabels { method })
            .observe(took.as_secs_f64());
    }

    /// Records a store flush's latency.
    pub fn observe_flush(&self, took: Duration) {
        self.flushes.observe(took.as_secs_f64());
    }

    /// Sets how many sagas are in `state` (at start).
    pub fn set_sagas(&self, state: &'static str, count: u64) {
        self.sagas
            .get_or_create(&StateLabels { state })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// A saga entered `state`.
    pub fn saga_entered(&self, state: &'static str) {
        self.sagas.get_or_create(&StateLabels { state }).inc();
    }

    /// A saga left `state`.
    pub fn saga_left(&self, state: &'static str) {
        self.sagas.get_or_create(&StateLabels { state }).dec();
    }

    /// Records a saga call's latency.
    pub fn observe_saga_call(&self, upstream: &str, call: &'static str, ok: bool, took: Duration) {
        let result = if ok { "ok" } else { "failed" };
        self.saga_calls
            .get_or_create(&SagaCallLabels {
                upstream: upstream.to_owned(),
                call,
                result,
            })
            .observe(took.as_secs_f64());
    }

    /// Counts a compensation's end.
    pub fn compensated(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.compensations
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Renders every metric in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(2048);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
