//! The admin endpoint: liveness, readiness, metrics and the live config.
//!
//! It listens on its own port (loopback by default) so that probes and
//! scrapes never queue behind proxied traffic. `admin.probes_listen` adds
//! a port with only `/healthz`, `/readyz` and `/metrics` (GET), for the
//! kubelet and Prometheus, which reach a pod at its IP: the API that
//! changes circuits and faults can then stay on loopback.
//!
//! | path | answer |
//! |---|---|
//! | `/` | the status page (`status`) |
//! | `/status.json` | its figures, as JSON |
//! | `/healthz` | 200 while the process runs |
//! | `/readyz` | 200 once every listener is bound, 503 while draining |
//! | `/metrics` | Prometheus / OpenMetrics text |
//! | `/config` | the resolved config as JSON |
//! | `/circuits` | each upstream's circuit: state, counters, time to the next probe |
//! | `POST /circuits/<upstream>[/<route>]/open\|close\|reset` | force a circuit's state (a route's own breaker's with its name) |
//! | `/faults` | each upstream's faults in force |
//! | `PUT /faults/<upstream>` | replace an upstream's faults (JSON, as in the policy file) |
//! | `DELETE /faults/<upstream>` | stop injecting faults into an upstream |
//!
//! A request that changes state (`POST`, `PUT`, `DELETE`) from a browser
//! page of another origin is refused (its `Origin` is not this port's):
//! a page on the web must not open circuits through an operator's
//! browser, while curl, which sends no `Origin`, is served as before.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::LiveCell;
use crate::body::{self, Body};
use crate::resilience::breaker::Breaker;
use crate::resilience::faults::FaultSpec;
use crate::telemetry::metrics::Metrics;
use crate::upstream::Upstream;

/// What the probes port serves.
const PROBES: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// The largest request body the admin endpoint reads.
const MAX_ADMIN_BODY: usize = 64 << 10;

/// What the admin endpoint reports on.
#[derive(Debug)]
pub struct AdminState {
    metrics: Arc<Metrics>,
    live: LiveCell,
    ready: Arc<AtomicBool>,
    connections: super::Connections,
    dead_letters: Option<Arc<super::dead_letter::DeadLetters>>,
    /// The listeners, for the ports they are bound to.
    control: Arc<super::Control>,
    /// Where the admin and probes ports are bound.
    bound: (std::net::SocketAddr, Option<std::net::SocketAddr>),
    samples: super::status::Samples,
    /// Status pages served.
    renders: std::sync::atomic::AtomicU64,
}

impl AdminState {
    /// The state to serve: metrics, the live configuration (which reloads
    /// replace), readiness, the caller connections, and the dead letters'
    /// delivery.
    pub(super) fn new(
        metrics: Arc<Metrics>,
        live: LiveCell,
        ready: Arc<AtomicBool>,
        connections: super::Connections,
        dead_letters: Option<Arc<super::dead_letter::DeadLetters>>,
        control: Arc<super::Control>,
        bound: (std::net::SocketAddr, Option<std::net::SocketAddr>),
    ) -> Self {
        Self {
            metrics,
            live,
            ready,
            connections,
            dead_letters,
            control,
            bound,
            samples: Default::default(),
            renders: Default::default(),
        }
    }

    /// `/readyz`'s detail: one `name: value` line each.
    fn detail(&self) -> String {
        let c = &self.connections;
        let open_files = c
            .open_files
            .map_or_else(|| "unknown".to_owned(), |n| n.to_string());
        let delivery = self
            .dead_letters
            .as_ref()
            .map(|d| d.delivery_detail())
            .unwrap_or_default();
        format!(
            "open files limit: {open_files}\ncaller connections: {} of {}\n{delivery}",
            c.open_now(),
            c.max
        )
    }

    /// The status page's figures now.
    fn status(&self) -> super::status::Status {
        self.samples
            .status(&self.metrics, self.live.load().upstreams())
    }

    fn upstream(&self, name: &str) -> Option<Arc<Upstream>> {
        self.live.load().upstream(name).cloned()
    }

    /// Every circuit breaker: each upstream's, and each route's own as
    /// `upstream/route`.
    fn circuits(&self) -> Vec<(Arc<str>, Arc<Breaker>)> {
        let live = self.live.load();
        let mut circuits = Vec::new();
        for upstream in live.upstreams() {
            if let Some(breaker) = upstream.breaker() {
                circuits.push((upstream.config.name.clone(), breaker.clone()));
            }
            for route in upstream.routes() {
                if let Some(breaker) = route.own_breaker() {
                    let name = format!("{}/{}", upstream.config.name, route.config.name);
                    circuits.push((name.into(), breaker.clone()));
                }
            }
        }
        circuits
    }
}

/// Serves the admin endpoint until `stop` turns true (and samples the
/// metrics for the status page meanwhile).
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: watch::Receiver<bool>) {
    let (sampled, mut stopping) = (state.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            sampled.samples.sample(&sampled.metrics);
            tokio::select! {
                _ = stopping.wait_for(|stop| *stop) => break,
                () = tokio::time::sleep(super::status::SAMPLE_EVERY) => {}
            }
        }
    });
    accept(listener, state, stop, false).await;
}

/// Serves the probes port (`admin.probes_listen`) until `stop` turns true:
/// `/healthz`, `/readyz` and `/metrics` only, so that it may be reached
/// from beyond the pod while the admin API stays on loopback.
pub async fn serve_probes(
    listener: TcpListener,
    state: Arc<AdminState>,
    stop: watch::Receiver<bool>,
) {
    accept(listener, state, stop, true).await;
}

async fn accept(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut stop: watch::Receiver<bool>,
    probes_only: bool,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else { continue };
        let state = state.clone();
        let service = hyper::service::service_fn(move |request| {
            let state = state.clone();
            async move {
                if probes_only && !PROBES.contains(&request.uri().path()) {
                    return Ok::<_, Infallible>(text(
                        StatusCode::NOT_FOUND,
                        "this port serves only /healthz, /readyz and /metrics: the admin API is on admin.listen\n",
                    ));
                }
                Ok::<_, Infallible>(handle(&state, request).await)
            }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(state: &AdminState, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let changes = !matches!(*request.method(), Method::GET | Method::HEAD);
    if changes && crate::web::cross_origin(&request) {
        return text(
            StatusCode::FORBIDDEN,
            "refused: a page of another origin may not change this sidecar\n",
        );
    }
    if request.method() == Method::POST
        && let Some(rest) = path.strip_prefix("/circuits/")
    {
        return force_circuit(state, rest);
    }
    if let Some(name) = path.strip_prefix("/faults/") {
        return match *request.method() {
            Method::PUT => put_faults(state, name, request.into_body()).await,
            Method::DELETE => delete_faults(state, name),
            _ => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "use PUT or DELETE on /faults/<upstream>\n",
            ),
        };
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
    }
    match path.as_str() {
        "/" => with_type(
            StatusCode::OK,
            super::status::page(
                &state.status(),
                state.renders.fetch_add(1, Ordering::Relaxed) + 1,
            ),
            "text/html; charset=utf-8",
        ),
        "/status.json" => json(StatusCode::OK, &state.status()),
        "/circuits" => {
            let circuits = state.circuits();
            let snapshots: BTreeMap<&str, _> = circuits
                .iter()
                .map(|(name, b)| (&**name, b.snapshot()))
                .collect();
            json(StatusCode::OK, &snapshots)
        }
        "/faults" => {
            let live = state.live.load();
            let faults: BTreeMap<&str, Option<FaultSpec>> = live
                .upstreams()
                .iter()
                .map(|u| {
                    let spec = u.faults().current().map(|f| f.spec().clone());
                    (&*u.config.name, spec)
                })
                .collect();
            json(StatusCode::OK, &faults)
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if state.ready.load(Ordering::Acquire) => {
            owned_text(StatusCode::OK, format!("ready\n{}", state.detail()))
        }
        "/readyz" => owned_text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{}", state.detail()),
        ),
        "/metrics" => with_type(
            StatusCode::OK,
            state.metrics.encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        "/config" => json(StatusCode::OK, &bound_config(state).await),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /, /status.json, /healthz, /readyz, /metrics, /config, /circuits or /faults\n",
        ),
    }
}

/// The configuration in force, each `listen` the address it is bound to
/// (`127.0.0.1:0` in the file: the port it picked).
async fn bound_config(state: &AdminState) -> serde_json::Value {
    let mut config: serde_json::Value =
        serde_json::from_slice(&state.live.load().config_json()).unwrap_or_default();
    let (admin, probes) = state.bound;
    config["admin"]["listen"] = admin.to_string().into();
    if let Some(probes) = probes {
        config["admin"]["probes_listen"] = probes.to_string().into();
    }
    let listeners = state.control.listeners.lock().await;
    for (target, listener) in listeners.iter() {
        let bound = serde_json::Value::from(listener.local.to_string());
        match target {
            super::Target::Shared => config["proxy"]["listen"] = bound,
            super::Target::Upstream(name) => {
                let upstreams = config["upstreams"].as_array_mut();
                for upstream in upstreams.into_iter().flatten() {
                    if upstream["name"] == **name {
                        upstream["listen"] = bound.clone();
                    }
                }
            }
        }
    }
    config
}

/// `PUT /faults/<upstream>`: the body is a `faults` block as JSON.
async fn put_faults(state: &AdminState, name: &str, body: Incoming) -> Response<Body> {
    let Some(upstream) = state.upstream(name) else {
        return text(StatusCode::NOT_FOUND, "no such upstream\n");
    };
    let body = match Limited::new(body, MAX_ADMIN_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the body is over 64 KiB, or was cut short\n",
            );
        }
    };
    let mut de = serde_json::Deserializer::from_slice(&body);
    let spec: FaultSpec = match serde_path_to_error::deserialize(&mut de) {
        Ok(spec) => spec,
        Err(e) => {
            let path = e.path().to_string();
            let message = format!("{path}: {}\n", e.into_inner());
            return owned_text(StatusCode::BAD_REQUEST, message);
        }
    };
    let faults = match spec.resolve() {
        Ok(faults) => faults,
        Err(errors) => {
            let message: String = errors
                .iter()
                .map(|(field, message)| format!("{field}: {message}\n"))
                .collect();
            return owned_text(StatusCode::BAD_REQUEST, message);
        }
    };
    tracing::warn!(upstream = name, faults = ?spec, "faults set by an operator");
    upstream.faults().set(Some(faults));
    json(StatusCode::OK, &spec)
}

/// `DELETE /faults/<upstream>`.
fn delete_faults(state: &AdminState, name: &str) -> Response<Body> {
    let Some(upstream) = state.upstream(name) else {
        return text(StatusCode::NOT_FOUND, "no such upstream\n");
    };
    upstream.faults().set(None);
    tracing::warn!(upstream = name, "faults cleared by an operator");
    text(StatusCode::OK, "faults cleared\n")
}

/// `POST /circuits/<upstream>[/<route>]/open|close|reset`.
fn force_circuit(state: &AdminState, rest: &str) -> Response<Body> {
    let Some((name, action)) = rest.rsplit_once('/') else {
        return text(
            StatusCode::NOT_FOUND,
            "use /circuits/<upstream>/open|close|reset, or /circuits/<upstream>/<route>/...\n",
        );
    };
    let circuits = state.circuits();
    let Some((_, breaker)) = circuits.iter().find(|(n, _)| &**n == name) else {
        return text(
            StatusCode::NOT_FOUND,
            "no circuit breaker for that upstream (unknown, or its breaker is disabled)\n",
        );
    };
    if !breaker.force(action) {
        return text(
            StatusCode::BAD_REQUEST,
            "the action is one of open, close, reset\n",
        );
    }
    tracing::warn!(upstream = name, action, "circuit forced by an operator");
    json(StatusCode::OK, &breaker.snapshot())
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let mut body = serde_json::to_vec_pretty(value).expect("admin answers serialize");
    body.push(b'\n');
    with_type(status, body, "application/json")
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    with_type(status, body, "text/plain; charset=utf-8")
}

fn owned_text(status: StatusCode, body: String) -> Response<Body> {
    with_type(status, body, "text/plain; charset=utf-8")
}

fn with_type(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Body> {
    body::typed(status, content_type, body)
}
