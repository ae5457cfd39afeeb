//! The circuit breaker: stop calling an upstream that is down, and find
//! out cheaply when it is back.
//!
//! ```text
//!            trip                      open_for passed
//! Closed ──────────────► Open ─────────────────────────► HalfOpen
//!   ▲                     ▲                                 │
//!   │                     └──── a probe fails (open_for ×2) ┤
//!   └────────────── every probe succeeds ───────────────────┘
//! ```
//!
//! It trips on `consecutive_failures` in a row, on a failure rate over the
//! last `window` calls (once `min_calls` were seen), or on a slow-call
//! rate. While open, every attempt fails at once with `CircuitOpen`
//! (503 / `UNAVAILABLE`, `x-breakwater-error: circuit-open`) without
//! touching the upstream. After `open_for` it lets `half_open_probes`
//! calls through; if all succeed it closes, if one fails it opens again
//! for twice as long (up to `max_open_for`).
//!
//! Rate limiting (429, `RESOURCE_EXHAUSTED`) counts toward the failure
//! rate but never toward consecutive failures: a provider asking for less
//! load is not an outage.
//!
//! While the circuit is closed the request path takes no lock for a call
//! that succeeds in a clean window (no failures or slow calls in it): it
//! reads the gate and counts the success in an atomic, which the next
//! holder of the lock folds into the window before anything else. A
//! failure, a slow call, a probe or any transition happens in [`Machine`],
//! under the lock, tested under a paused clock.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::policy::BreakerParams;
use crate::classify::Failure;
use crate::telemetry::metrics::UpstreamMetrics;

/// The state of a circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Calls flow.
    Closed = 0,
    /// Calls fail at once.
    Open = 1,
    /// A few probe calls flow.
    HalfOpen = 2,
}

/// What a call was admitted as.
#[derive(Debug)]
#[must_use]
pub enum Admission {
    /// A normal call (circuit closed).
    Normal,
    /// A probe (circuit half-open); dropping it unrecorded frees its slot.
    Probe(ProbeSlot),
}

/// The circuit refused a call: it is open, or half-open with every probe
/// slot taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused;

/// A half-open probe slot, given back if the call ends unrecorded.
#[derive(Debug)]
pub struct ProbeSlot {
    breaker: Arc<Breaker>,
    recorded: bool,
}

impl Drop for ProbeSlot {
    fn drop(&mut self) {
        if !self.recorded {
            let mut machine = self.breaker.lock();
            machine.probes_in_flight = machine.probes_in_flight.saturating_sub(1);
        }
    }
}

/// One upstream's circuit breaker.
#[derive(Debug)]
pub struct Breaker {
    upstream: Arc<str>,
    params: BreakerParams,
    gate: AtomicU8,
    /// The circuit is closed and its window holds only clean calls: a
    /// success changes nothing but the window's length.
    clean: AtomicBool,
    /// Successes counted without the lock, not yet in the window.
    clean_successes: AtomicU32,
    machine: Mutex<Machine>,
    metrics: UpstreamMetrics,
}

/// The state machine behind the gate.
#[derive(Debug)]
pub struct Machine {
    state: State,
    consecutive: u32,
    /// The last `window` calls: (failed, slow).
    window: VecDeque<(bool, bool)>,
    /// Failures and slow calls in `window`, kept as calls come and go.
    window_failed: usize,
    window_slow: usize,
    trips: u32,
    open_until: Option<Instant>,
    probes_in_flight: u32,
    probe_successes: u32,
}

/// A circuit's state for the admin endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// The state.
    pub state: State,
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// Calls in the sliding window.
    pub window_calls: usize,
    /// Failures in the sliding window.
    pub window_failures: usize,
    /// Slow calls in the sliding window.
    pub window_slow: usize,
    /// Trips since the circuit last closed.
    pub trips: u32,
    /// Milliseconds until the next probe, while open.
    pub next_probe_in_ms: Option<u64>,
}

impl Breaker {
    /// A closed circuit.
    pub fn new(upstream: Arc<str>, params: BreakerParams, metrics: UpstreamMetrics) -> Arc<Self> {
        metrics.circuit_created();
        Arc::new(Self {
            upstream,
            machine: Mutex::new(Machine {
                state: State::Closed,
                consecutive: 0,
                window: VecDeque::with_capacity(params.window as usize),
                window_failed: 0,
                window_slow: 0,
                trips: 0,
                open_until: None,
                probes_in_flight: 0,
                probe_successes: 0,
            }),
            params,
            gate: AtomicU8::new(State::Closed as u8),
            clean: AtomicBool::new(true),
            clean_successes: AtomicU32::new(0),
            metrics,
        })
    }

    /// The machine, with the successes counted without the lock folded
    /// into its window.
    fn lock(&self) -> std::sync::MutexGuard<'_, Machine> {
        let mut m = self.machine.lock().unwrap_or_else(|e| e.into_inner());
        let pending = self.clean_successes.swap(0, Ordering::AcqRel);
        if pending > 0 && m.state == State::Closed {
            m.consecutive = 0;
            for _ in 0..pending.min(self.params.window) {
                self.push(&mut m, false, false);
            }
        }
        m
    }

    /// Adds a call to the sliding window, dropping the oldest when full.
    fn push(&self, m: &mut Machine, failed: bool, slow: bool) {
        if self.params.window == 0 {
            return;
        }
        if m.window.len() == self.params.window as usize
            && let Some((old_failed, old_slow)) = m.window.pop_front()
        {
            m.window_failed -= usize::from(old_failed);
            m.window_slow -= usize::from(old_slow);
        }
        m.window.push_back((failed, slow));
        m.window_failed += usize::from(failed);
        m.window_slow += usize::from(slow);
    }

    /// Whether a success may skip the lock from now on.
    fn settle(&self, m: &Machine) {
        let clean = m.state == State::Closed
            && m.consecutive == 0
            && m.window_failed == 0
            && m.window_slow == 0;
        self.clean.store(clean, Ordering::Release);
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.lock().state
    }

    /// Admits a call, or refuses it while the circuit is open.
    pub fn admit(self: &Arc<Self>) -> Result<Admission, Refused> {
        if self.gate.load(Ordering::Acquire) == State::Closed as u8 {
            return Ok(Admission::Normal);
        }
        let mut m = self.lock();
        if m.state == State::Open && m.open_until.is_some_and(|t| Instant::now() >= t) {
            self.enter(&mut m, State::HalfOpen);
        }
        match m.state {
            State::Closed => Ok(Admission::Normal),
            State::Open => Err(Refused),
            State::HalfOpen if m.probes_in_flight < self.params.half_open_probes => {
                m.probes_in_flight += 1;
                Ok(Admission::Probe(ProbeSlot {
                    breaker: self.clone(),
                    recorded: false,
                }))
            }
            State::HalfOpen => Err(Refused),
        }
    }

    /// Records how an admitted call ended. `failure` is its classified
    /// failure, if any; `elapsed` its duration.
    pub fn record(&self, admission: Admission, failure: Option<Failure>, elapsed: Duration) {
        let counted = failure.filter(|f| self.params.failure_on.matches(*f));
        let slow = self.params.slow_call_duration.is_some_and(|d| elapsed >= d);
        if matches!(admission, Admission::Normal)
            && counted.is_none()
            && !slow
            && self.clean.load(Ordering::Acquire)
        {
            self.clean_successes.fetch_add(1, Ordering::AcqRel);
            return;
        }
        let mut m = self.lock();
        self.record_locked(&mut m, admission, counted, slow);
        self.settle(&m);
    }

    fn record_locked(
        &self,
        m: &mut Machine,
        admission: Admission,
        counted: Option<Failure>,
        slow: bool,
    ) {
        if let Admission::Probe(mut slot) = admission {
            slot.recorded = true;
            m.probes_in_flight = m.probes_in_flight.saturating_sub(1);
            drop(slot);
            if m.state != State::HalfOpen {
                return;
            }
            if counted.is_some() || slow {
                self.trip(m);
            } else {
                m.probe_successes += 1;
                if m.probe_successes >= self.params.half_open_probes {
                    self.enter(m, State::Closed);
                }
            }
            return;
        }
        if m.state != State::Closed {
            return;
        }
        match counted {
            Some(f) if !f.is_rate_limit() => m.consecutive += 1,
            Some(_) => {}
            None => m.consecutive = 0,
        }
        self.push(m, counted.is_some(), slow);
        if self.should_trip(m) {
            self.trip(m);
        }
    }

    fn should_trip(&self, m: &Machine) -> bool {
        let p = &self.params;
        if p.consecutive_failures > 0 && m.consecutive >= p.consecutive_failures {
            return true;
        }
        let calls = m.window.len();
        if calls == 0 || calls < p.min_calls as usize {
            return false;
        }
        let (failed, slow) = (m.window_failed, m.window_slow);
        failed as f64 / calls as f64 >= p.failure_rate_threshold && failed > 0
            || p.slow_call_duration.is_some()
                && slow as f64 / calls as f64 >= p.slow_call_rate_threshold
                && slow > 0
    }

    /// Opens the circuit, for twice as long as last time.
    fn trip(&self, m: &mut Machine) {
        let factor = 2u32.saturating_pow(m.trips.min(16));
        let open_for = self
            .params
            .open_for
            .saturating_mul(factor)
            .min(self.params.max_open_for);
        m.trips += 1;
        m.open_until = Some(Instant::now() + open_for);
        tracing::warn!(upstream = %self.upstream, ?open_for, trips = m.trips, "circuit opened");
        self.enter(m, State::Open);
    }

    fn enter(&self, m: &mut Machine, state: State) {
        m.state = state;
        m.probe_successes = 0;
        if state == State::Closed {
            m.consecutive = 0;
            m.window.clear();
            m.window_failed = 0;
            m.window_slow = 0;
            m.trips = 0;
            m.open_until = None;
        }
        if state != State::HalfOpen {
            m.probes_in_flight = 0;
        }
        self.gate.store(state as u8, Ordering::Release);
        self.settle(m);
        self.metrics.circuit(state as u8);
    }

    /// Forces a state, for operators: `open` (for `open_for`), `close`, or
    /// `reset` (closed with every counter cleared).
    pub fn force(&self, action: &str) -> bool {
        let mut m = self.lock();
        match action {
            "open" => {
                m.open_until = Some(Instant::now() + self.params.open_for);
                m.trips = m.trips.max(1);
                self.enter(&mut m, State::Open);
            }
            "close" | "reset" => self.enter(&mut m, State::Closed),
            _ => return false,
        }
        true
    }

    /// The circuit's state and counters.
    pub fn snapshot(&self) -> Snapshot {
        let m = self.lock();
        Snapshot {
            state: m.state,
            consecutive_failures: m.consecutive,
            window_calls: m.window.len(),
            window_failures: m.window_failed,
            window_slow: m.window_slow,
            trips: m.trips,
            next_probe_in_ms: (m.state == State::Open)
                .then(|| m.open_until)
                .flatten()
                .map(|t| t.saturating_duration_since(Instant::now()).as_millis() as u64),
        }
    }
}

#[cfg(test)]
mod tests;
