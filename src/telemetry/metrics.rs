//! The sidecar's Prometheus metrics.
//!
//! Every metric is registered here, with its help text, and handed out to
//! the request path as pre-resolved per-upstream handles
//! ([`UpstreamMetrics`]): recording a request is a few atomic operations, no
//! label lookup, no allocation. Labels stay bounded: the upstream's name
//! (from the config) and a fixed set of outcomes.
//!
//! The file is long because it is the table of every metric: one place to
//! read what the sidecar exports.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Latency buckets, in seconds: from sub-millisecond local calls to
/// minute-long model calls.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// How a request ended, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered, without a server error.
    Success,
    /// The upstream answered with a server error (HTTP 5xx, or a gRPC
    /// status other than OK in the response headers).
    Error,
    /// The upstream gave no answer; the sidecar answered for it.
    Failure,
    /// The upstream failed and its fallback answered, marked as degraded.
    Degraded,
    /// The caller's request could not be used (its body broke off or
    /// stalled): the sidecar answered a client error, and the upstream
    /// was not at fault.
    Rejected,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Error => "error",
            Outcome::Failure => "failure",
            Outcome::Degraded => "degraded",
            Outcome::Rejected => "rejected",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    upstream: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    upstream: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailoverLabels {
    upstream: String,
    to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    upstream: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JsonRpcLabels {
    upstream: String,
    method: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InterceptLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    upstream: String,
    to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    upstream: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteOutcomeLabels {
    upstream: String,
    route: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteReasonLabels {
    upstream: String,
    route: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteKindLabels {
    upstream: String,
    route: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStateLabels {
    upstream: String,
    route: String,
    to: &'static str,
}

fn labels(upstream: &str) -> UpstreamLabels {
    UpstreamLabels {
        upstream: upstream.to_owned(),
    }
}

/// The registry and metric families of one sidecar.
pub struct Metrics {
    registry: Registry,
    requests: Family<OutcomeLabels, Counter>,
    duration: Family<UpstreamLabels, Histogram, fn() -> Histogram>,
    in_flight: Family<UpstreamLabels, Gauge>,
    unrouted: Counter,
    intercepted: Family<InterceptLabels, Counter>,
    retries: Family<ReasonLabels, Counter>,
    budget_exhausted: Family<UpstreamLabels, Counter>,
    circuit_state: Family<UpstreamLabels, Gauge>,
    circuit_transitions: Family<StateLabels, Counter>,
    shed: Family<UpstreamLabels, Counter>,
    timeouts: Family<KindLabels, Counter>,
    broken_streams: Family<KindLabels, Counter>,
    hedges: Family<UpstreamLabels, Counter>,
    fallbacks: Family<ReasonLabels, Counter>,
    failovers: Family<FailoverLabels, Counter>,
    faults: Family<KindLabels, Counter>,
    dead_letters: Family<UpstreamLabels, Counter>,
    dead_letters_dropped: Family<UpstreamLabels, Counter>,
    dead_letters_delivered: Family<UpstreamLabels, Counter>,
    dead_letter_spool: Family<UpstreamLabels, Gauge>,
    jsonrpc: Family<JsonRpcLabels, Counter>,
    control_plane_unreachable: Gauge,
    config_generation: Gauge,
    config_reloads: Counter,
    config_reload_failures: Counter,
    routes: RouteFamilies,
}

/// The families with a `route` label: a routed request counts in them
/// and in its upstream's.
struct RouteFamilies {
    requests: Family<RouteOutcomeLabels, Counter>,
    duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    retries: Family<RouteReasonLabels, Counter>,
    timeouts: Family<RouteKindLabels, Counter>,
    circuit_state: Family<RouteLabels, Gauge>,
    circuit_transitions: Family<RouteStateLabels, Counter>,
}

impl RouteFamilies {
    fn register(registry: &mut Registry) -> Self {
        let requests = Family::<RouteOutcomeLabels, Counter>::default();
        registry.register(
            "route_requests",
            "Requests that matched one of an upstream's routes, by upstream, route and outcome (also counted in breakwater_requests_total)",
            requests.clone(),
        );
        let duration: Family<RouteLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS));
        registry.register(
            "route_request_duration_seconds",
            "Time from receiving a routed request to sending its response headers, by upstream and route",
            duration.clone(),
        );
        let retries = Family::<RouteReasonLabels, Counter>::default();
        registry.register(
            "route_retries",
            "Retried attempts of routed requests, by upstream, route and the failure that caused them",
            retries.clone(),
        );
        let timeouts = Family::<RouteKindLabels, Counter>::default();
        registry.register(
            "route_timeouts",
            "Timeouts of routed requests, by upstream, route and kind (as breakwater_timeouts_total)",
            timeouts.clone(),
        );
        let circuit_state = Family::<RouteLabels, Gauge>::default();
        registry.register(
            "route_circuit_state",
            "The state of a route's own circuit breaker (a route that sets circuit_breaker): 0 closed, 1 open, 2 half-open",
            circuit_state.clone(),
        );
        let circuit_transitions = Family::<RouteStateLabels, Counter>::default();
        registry.register(
            "route_circuit_transitions",
            "Transitions of a route's own circuit breaker, by the state entered",
            circuit_transitions.clone(),
        );
        Self {
            requests,
            duration,
            retries,
            timeouts,
            circuit_state,
            circuit_transitions,
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every sidecar metric: one registration each, long as a
    /// table is, and read as one.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("breakwater");
        let requests = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests proxied, by upstream and outcome (success, error, failure, degraded)",
            requests.clone(),
        );
        let duration: Family<UpstreamLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS));
        registry.register(
            "request_duration_seconds",
            "Time from receiving a request to sending its response headers",
            duration.clone(),
        );
        let in_flight = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "requests_in_flight",
            "Requests received and not yet answered, by upstream",
            in_flight.clone(),
        );
        let unrouted = Counter::default();
        registry.register(
            "unrouted_requests",
            "Requests for a host no upstream claims, answered 404 / UNIMPLEMENTED",
            unrouted.clone(),
        );
        let intercepted = Family::<InterceptLabels, Counter>::default();
        registry.register(
            "intercepted_connections",
            "Redirected connections on the outbound port, by what became of them: upstream (served \
             with an upstream's policy), passthrough (relayed to where they were going), \
             tls-passthrough (TLS to an upstream, by its server name or address, relayed), loop \
             (refused: they were going to the sidecar itself), connect-failure (the relay could \
             not connect), circuit-open (TLS to an upstream whose circuit is open), denied \
             (going to no upstream, closed by intercept.unmatched: deny); and \
             CONNECT tunnels: connect-http (served with the upstream's policy), connect-tls \
             (relayed to the upstream), connect-refused (a host no upstream claims)",
            intercepted.clone(),
        );
        for kind in [
            "upstream",
            "passthrough",
            "tls-passthrough",
            "loop",
            "connect-failure",
            "circuit-open",
        ] {
            drop(intercepted.get_or_create(&InterceptLabels { kind }));
        }
        let retries = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "retries",
            "Retried attempts, by upstream and the failure that caused them",
            retries.clone(),
        );
        let budget_exhausted = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "retry_budget_exhausted",
            "Retries not made because the retry budget was spent",
            budget_exhausted.clone(),
        );
        let circuit_state = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "circuit_state",
            "Circuit breaker state: 0 closed, 1 open, 2 half-open",
            circuit_state.clone(),
        );
        let circuit_transitions = Family::<StateLabels, Counter>::default();
        registry.register(
            "circuit_transitions",
            "Circuit breaker transitions, by the state entered",
            circuit_transitions.clone(),
        );
        let shed = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "shed",
            "Requests shed at the concurrency limit (503 / RESOURCE_EXHAUSTED)",
            shed.clone(),
        );
        let timeouts = Family::<KindLabels, Counter>::default();
        registry.register(
            "timeouts",
            "Timeouts, by kind: deadline (the call's), per-try (one attempt's), stream-idle or first-byte (an answer's stream cut), caller-idle (an answer its caller stopped reading)",
            timeouts.clone(),
        );
        let broken_streams = Family::<KindLabels, Counter>::default();
        registry.register(
            "broken_streams",
            "Answers the upstream broke off after their headers, by kind: truncated (reset, closed, shorter than declared) or no-status (a gRPC answer ended without one)",
            broken_streams.clone(),
        );
        let hedges = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "hedges",
            "Hedged attempts sent while an earlier attempt was still waiting",
            hedges.clone(),
        );
        let fallbacks = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "fallbacks",
            "Failures of optional upstreams answered with their fallback, by reason",
            fallbacks.clone(),
        );
        let failovers = Family::<FailoverLabels, Counter>::default();
        registry.register(
            "failovers",
            "Calls that failed on an upstream and went to the next of its failover list, by upstream and the one tried next",
            failovers.clone(),
        );
        let faults = Family::<KindLabels, Counter>::default();
        registry.register(
            "faults_injected",
            "Faults injected by fault injection, by kind: delay, abort, truncate",
            faults.clone(),
        );
        let dead_letters = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "dead_letters",
            "Requests that finally failed and were captured as dead letters",
            dead_letters.clone(),
        );
        let dead_letters_dropped = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "dead_letters_dropped",
            "Dead letters dropped because the spool (or the queue to it) was full",
            dead_letters_dropped.clone(),
        );
        let dead_letters_delivered = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "dead_letters_delivered",
            "Dead letters delivered to the control plane",
            dead_letters_delivered.clone(),
        );
        let dead_letter_spool = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "dead_letter_spool",
            "Dead letters waiting in the local spool for the control plane",
            dead_letter_spool.clone(),
        );
        let jsonrpc = Family::<JsonRpcLabels, Counter>::default();
        registry.register(
            "jsonrpc_answers",
            "Answers to JSON-RPC calls (MCP, A2A), by method and what they said: result, tool-error (an MCP tool's isError), error (about the request), failure (the upstream's), session-expired (an MCP session's 404), none (no JSON-RPC answer read)",
            jsonrpc.clone(),
        );
        let control_plane_unreachable = Gauge::default();
        registry.register(
            "control_plane_unreachable",
            "1 while dead letters cannot be delivered to the control plane (unreachable, or refusing the token), 0 once one is",
            control_plane_unreachable.clone(),
        );
        let config_generation = Gauge::default();
        registry.register(
            "config_generation",
            "The generation of the config in force: 1 at start, one more per successful reload",
            config_generation.clone(),
        );
        let config_reloads = Counter::default();
        registry.register(
            "config_reloads",
            "Successful config reloads",
            config_reloads.clone(),
        );
        let config_reload_failures = Counter::default();
        registry.register(
            "config_reload_failures",
            "Config reloads refused (invalid file, or a port that cannot be bound); the config in force stays",
            config_reload_failures.clone(),
        );
        let routes = RouteFamilies::register(&mut registry);
        Self {
            routes,
            registry,
            requests,
            duration,
            in_flight,
            unrouted,
            intercepted,
            retries,
            budget_exhausted,
            circuit_state,
            circuit_transitions,
            shed,
            timeouts,
            broken_streams,
            hedges,
            fallbacks,
            failovers,
            faults,
            dead_letters,
            dead_letters_dropped,
            dead_letters_delivered,
            dead_letter_spool,
            jsonrpc,
            control_plane_unreachable,
            config_generation,
            config_reloads,
            config_reload_failures,
        }
    }

    /// Resolves the handles one upstream records into.
    pub fn upstream(&self, name: &str) -> UpstreamMetrics {
        let labels = UpstreamLabels {
            upstream: name.to_owned(),
        };
        let outcome = |o: Outcome| {
            self.requests.get_or_create_owned(&OutcomeLabels {
                upstream: name.to_owned(),
                outcome: o.label(),
            })
        };
        let transition = |to: &'static str| {
            self.circuit_transitions.get_or_create_owned(&StateLabels {
                upstream: name.to_owned(),
                to,
            })
        };
        let timeout = |kind: &'static str| {
            self.timeouts.get_or_create_owned(&KindLabels {
                upstream: name.to_owned(),
                kind,
            })
        };
        let broken = |kind: &'static str| {
            self.broken_streams.get_or_create_owned(&KindLabels {
                upstream: name.to_owned(),
                kind,
            })
        };
        UpstreamMetrics(Arc::new(Handles {
            name: name.to_owned(),
            success: outcome(Outcome::Success),
            error: outcome(Outcome::Error),
            failure: outcome(Outcome::Failure),
            degraded: outcome(Outcome::Degraded),
            rejected: outcome(Outcome::Rejected),
            duration: self.duration.get_or_create_owned(&labels),
            in_flight: self.in_flight.get_or_create_owned(&labels),
            retries: self.retries.clone(),
            budget_exhausted: self.budget_exhausted.get_or_create_owned(&labels),
            circuit_state: self.circuit_state.get_or_create_owned(&labels),
            transitions: [
                transition("closed"),
                transition("open"),
                transition("half-open"),
            ],
            shed: self.shed.get_or_create_owned(&labels),
            deadline_timeouts: timeout("deadline"),
            per_try_timeouts: timeout("per-try"),
            stream_idle_timeouts: timeout("stream-idle"),
            first_byte_timeouts: timeout("first-byte"),
            caller_idle_timeouts: timeout("caller-idle"),
            truncated: broken("truncated"),
            no_status: broken("no-status"),
            hedges: self.hedges.get_or_create_owned(&labels),
            fallbacks: self.fallbacks.clone(),
            failovers: self.failovers.clone(),
            faults: self.faults.clone(),
            jsonrpc: self.jsonrpc.clone(),
            route: None,
        }))
    }

    /// The handles a request that matched `route` of an upstream records
    /// into: the upstream's (`upstream`), and the route's.
    pub fn route(&self, upstream: &UpstreamMetrics, route: &str) -> UpstreamMetrics {
        let name = &upstream.0.name;
        let families = &self.routes;
        let labels = RouteLabels {
            upstream: name.clone(),
            route: route.to_owned(),
        };
        let outcome = |o: Outcome| {
            families.requests.get_or_create_owned(&RouteOutcomeLabels {
                upstream: name.clone(),
                route: route.to_owned(),
                outcome: o.label(),
            })
        };
        let timeout = |kind: &'static str| {
            families.timeouts.get_or_create_owned(&RouteKindLabels {
                upstream: name.clone(),
                route: route.to_owned(),
                kind,
            })
        };
        let transition = |to: &'static str| {
            families
                .circuit_transitions
                .get_or_create_owned(&RouteStateLabels {
                    upstream: name.clone(),
                    route: route.to_owned(),
                    to,
                })
        };
        let handles = RouteHandles {
            name: route.to_owned(),
            outcomes: [
                outcome(Outcome::Success),
                outcome(Outcome::Error),
                outcome(Outcome::Failure),
                outcome(Outcome::Degraded),
                outcome(Outcome::Rejected),
            ],
            duration: families.duration.get_or_create_owned(&labels),
            retries: families.retries.clone(),
            timeouts: [
                timeout("deadline"),
                timeout("per-try"),
                timeout("stream-idle"),
                timeout("first-byte"),
                timeout("caller-idle"),
            ],
            circuit_state: families.circuit_state.clone(),
            transitions: [
                transition("closed"),
                transition("open"),
                transition("half-open"),
            ],
        };
        let mut both = Handles::clone(&upstream.0);
        both.route = Some(handles);
        UpstreamMetrics(Arc::new(both))
    }

    /// Records the generation of the config now in force.
    pub fn config_loaded(&self, generation: u64) {
        self.config_generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
        if generation > 1 {
            self.config_reloads.inc();
        }
    }

    /// Counts a captured dead letter.
    pub fn dead_letter_captured(&self, upstream: &str) {
        self.dead_letters.get_or_create(&labels(upstream)).inc();
    }

    /// Counts a dropped dead letter.
    pub fn dead_letter_dropped(&self, upstream: &str) {
        self.dead_letters_dropped
            .get_or_create(&labels(upstream))
            .inc();
    }

    /// Whether the last delivery of a dead letter to the control plane
    /// succeeded.
    pub fn control_plane_reachable(&self, reachable: bool) {
        self.control_plane_unreachable.set(i64::from(!reachable));
    }

    /// Counts a delivered dead letter.
    pub fn dead_letter_delivered(&self, upstream: &str) {
        self.dead_letters_delivered
            .get_or_create(&labels(upstream))
            .inc();
    }

    /// Moves the spool gauge of `upstream` by `delta` letters.
    pub fn dead_letter_spooled(&self, upstream: &str, delta: i64) {
        self.dead_letter_spool
            .get_or_create(&labels(upstream))
            .inc_by(delta);
    }

    /// Counts a refused reload.
    pub fn config_reload_failed(&self) {
        self.config_reload_failures.inc();
    }

    /// Drops the gauges of an upstream a reload removed, so that it does
    /// not linger as, say, an open circuit. Its counters stay: they only
    /// ever grow, and rates over them stay right.
    pub fn forget(&self, name: &str) {
        let labels = UpstreamLabels {
            upstream: name.to_owned(),
        };
        self.circuit_state.remove(&labels);
        self.in_flight.remove(&labels);
    }

    /// Drops the circuit gauge of a route a reload removed or whose
    /// breaker it replaced.
    pub fn forget_route(&self, upstream: &str, route: &str) {
        self.routes.circuit_state.remove(&RouteLabels {
            upstream: upstream.to_owned(),
            route: route.to_owned(),
        });
    }

    /// Counts a redirected connection by what became of it (the kinds
    /// registered above).
    pub fn intercepted(&self, kind: &'static str) {
        self.intercepted
            .get_or_create(&InterceptLabels { kind })
            .inc();
    }

    /// Counts a request no upstream claimed.
    pub fn unrouted(&self) {
        self.unrouted.inc();
    }

    /// Renders every metric in the Prometheus / OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[derive(Clone)]
struct Handles {
    name: String,
    success: Counter,
    error: Counter,
    failure: Counter,
    degraded: Counter,
    rejected: Counter,
    duration: Histogram,
    in_flight: Gauge,
    retries: Family<ReasonLabels, Counter>,
    budget_exhausted: Counter,
    circuit_state: Gauge,
    transitions: [Counter; 3],
    shed: Counter,
    deadline_timeouts: Counter,
    per_try_timeouts: Counter,
    stream_idle_timeouts: Counter,
    caller_idle_timeouts: Counter,
    first_byte_timeouts: Counter,
    truncated: Counter,
    no_status: Counter,
    hedges: Counter,
    fallbacks: Family<ReasonLabels, Counter>,
    failovers: Family<FailoverLabels, Counter>,
    faults: Family<KindLabels, Counter>,
    jsonrpc: Family<JsonRpcLabels, Counter>,
    /// Set for a route's requests: they count for it too.
    route: Option<RouteHandles>,
}

/// A route's handles, beside its upstream's.
#[derive(Clone)]
struct RouteHandles {
    name: String,
    /// By outcome, in `Outcome`'s order.
    outcomes: [Counter; 5],
    duration: Histogram,
    retries: Family<RouteReasonLabels, Counter>,
    /// deadline, per-try, stream-idle, first-byte, caller-idle.
    timeouts: [Counter; 5],
    circuit_state: Family<RouteLabels, Gauge>,
    transitions: [Counter; 3],
}

impl RouteHandles {
    fn timeout(&self, kind: usize) {
        self.timeouts[kind].inc();
    }

    fn labels(&self, upstream: &str) -> RouteLabels {
        RouteLabels {
            upstream: upstream.to_owned(),
            route: self.name.clone(),
        }
    }
}

/// One upstream's metric handles, cheap to clone.
#[derive(Clone)]
pub struct UpstreamMetrics(Arc<Handles>);

impl std::fmt::Debug for UpstreamMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamMetrics").finish_non_exhaustive()
    }
}

impl UpstreamMetrics {
    /// Marks a request as in flight until the guard is dropped, so a
    /// cancelled request is not counted forever.
    pub fn start(&self) -> InFlight {
        self.0.in_flight.inc();
        InFlight(self.0.clone())
    }

    /// Records a finished request.
    pub fn record(&self, outcome: Outcome, seconds: f64) {
        match outcome {
            Outcome::Success => self.0.success.inc(),
            Outcome::Error => self.0.error.inc(),
            Outcome::Failure => self.0.failure.inc(),
            Outcome::Degraded => self.0.degraded.inc(),
            Outcome::Rejected => self.0.rejected.inc(),
        };
        self.0.duration.observe(seconds);
        if let Some(route) = &self.0.route {
            route.outcomes[outcome as usize].inc();
            route.duration.observe(seconds);
        }
    }
}

impl UpstreamMetrics {
    /// Counts a retry caused by `reason` (a bounded failure label).
    pub fn retry(&self, reason: &str) {
        self.by_reason(&self.0.retries, reason);
        if let Some(route) = &self.0.route {
            route
                .retries
                .get_or_create(&RouteReasonLabels {
                    upstream: self.0.name.clone(),
                    route: route.name.clone(),
                    reason: reason.to_owned(),
                })
                .inc();
        }
    }

    /// Counts a fallback answered for `reason` (a bounded label).
    pub fn fallback(&self, reason: &str) {
        self.by_reason(&self.0.fallbacks, reason);
    }

    /// Counts a call that failed here and went on to `to`.
    pub fn failover(&self, to: &str) {
        self.0
            .failovers
            .get_or_create(&FailoverLabels {
                upstream: self.0.name.clone(),
                to: to.to_owned(),
            })
            .inc();
    }

    /// Counts the answer to a JSON-RPC call of `method` (a bounded label)
    /// by what it said (`outcome`).
    pub fn jsonrpc(&self, method: &'static str, outcome: &'static str) {
        self.0
            .jsonrpc
            .get_or_create(&JsonRpcLabels {
                upstream: self.0.name.clone(),
                method,
                outcome,
            })
            .inc();
    }

    /// Counts an injected fault of `kind` (`delay`, `abort`, `truncate`).
    pub fn fault(&self, kind: &'static str) {
        self.0
            .faults
            .get_or_create(&KindLabels {
                upstream: self.0.name.clone(),
                kind,
            })
            .inc();
    }

    fn by_reason(&self, family: &Family<ReasonLabels, Counter>, reason: &str) {
        family
            .get_or_create(&ReasonLabels {
                upstream: self.0.name.clone(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts a retry the budget did not allow.
    pub fn budget_exhausted(&self) {
        self.0.budget_exhausted.inc();
    }

    /// Shows a new breaker's state (closed) without counting a transition:
    /// the route's own breaker's, for a route's handles.
    pub fn circuit_created(&self) {
        match &self.0.route {
            None => {
                self.0.circuit_state.set(0);
            }
            Some(route) => {
                route
                    .circuit_state
                    .get_or_create(&route.labels(&self.0.name))
                    .set(0);
            }
        }
    }

    /// Records a circuit state (0 closed, 1 open, 2 half-open) entered.
    pub fn circuit(&self, state: u8) {
        let entered = usize::from(state.min(2));
        match &self.0.route {
            None => {
                self.0.circuit_state.set(i64::from(state));
                self.0.transitions[entered].inc();
            }
            Some(route) => {
                route
                    .circuit_state
                    .get_or_create(&route.labels(&self.0.name))
                    .set(i64::from(state));
                route.transitions[entered].inc();
            }
        }
    }

    /// Counts a shed request.
    pub fn shed(&self) {
        self.0.shed.inc();
    }

    /// Counts a timeout: the call's deadline, or one attempt's.
    pub fn timeout(&self, per_try: bool) {
        if per_try {
            self.0.per_try_timeouts.inc();
        } else {
            self.0.deadline_timeouts.inc();
        }
        if let Some(route) = &self.0.route {
            route.timeout(usize::from(per_try));
        }
    }

    /// Counts a stream cut for stalling after its first frame
    /// (`stream_idle_timeout`), or before it (`first_byte_timeout`).
    pub fn stream_cut(&self, before_first_frame: bool) {
        if before_first_frame {
            self.0.first_byte_timeouts.inc();
        } else {
            self.0.stream_idle_timeouts.inc();
        }
        if let Some(route) = &self.0.route {
            route.timeout(if before_first_frame { 3 } else { 2 });
        }
    }

    /// Counts an answer cut because its caller stopped reading it.
    pub fn caller_idle(&self) {
        self.0.caller_idle_timeouts.inc();
        if let Some(route) = &self.0.route {
            route.timeout(4);
        }
    }

    /// Counts an answer the upstream broke off after its headers
    /// (`truncated`) or ended without a gRPC status (`no-status`).
    pub fn broken_stream(&self, kind: &str) {
        match kind {
            "no-status" => self.0.no_status.inc(),
            _ => self.0.truncated.inc(),
        };
    }

    /// Counts a hedged attempt.
    pub fn hedge(&self) {
        self.0.hedges.inc();
    }
}

/// Holds one request in the in-flight gauge.
pub struct InFlight(Arc<Handles>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_outcomes_latency_and_in_flight() {
        let metrics = Metrics::new();
        let ocr = metrics.upstream("ocr");
        let guard = ocr.start();
        ocr.record(Outcome::Success, 0.003);
        ocr.record(Outcome::Failure, 0.001);
        let text = metrics.encode();
        assert!(text.contains("breakwater_requests_in_flight{upstream=\"ocr\"} 1"));
        drop(guard);
        let text = metrics.encode();
        assert!(text.contains("breakwater_requests_total{upstream=\"ocr\",outcome=\"success\"} 1"));
        assert!(text.contains("breakwater_requests_total{upstream=\"ocr\",outcome=\"failure\"} 1"));
        assert!(text.contains("breakwater_request_duration_seconds_count{upstream=\"ocr\"} 2"));
        assert!(text.contains("breakwater_requests_in_flight{upstream=\"ocr\"} 0"));
    }
}
