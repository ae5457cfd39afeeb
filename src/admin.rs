//! The admin endpoint: liveness, readiness, metrics and the live config.
//!
//! It listens on its own port (loopback by default) so that probes and
//! scrapes never queue behind proxied traffic.
//!
//! | path | answer |
//! |---|---|
//! | `/healthz` | 200 while the process runs |
//! | `/readyz` | 200 once every listener is bound, 503 while draining |
//! | `/metrics` | Prometheus / OpenMetrics text |
//! | `/config` | the resolved config as JSON |
//! | `/circuits` | each upstream's circuit: state, counters, time to the next probe |
//! | `POST /circuits/<upstream>/open\|close\|reset` | force a circuit's state |

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::body::{self, Body};
use crate::config::Config;
use crate::resilience::breaker::Breaker;
use crate::telemetry::metrics::Metrics;

/// What the admin endpoint reports on.
#[derive(Debug)]
pub struct AdminState {
    metrics: Arc<Metrics>,
    config_json: Bytes,
    ready: Arc<AtomicBool>,
    circuits: Vec<(Arc<str>, Arc<Breaker>)>,
}

impl AdminState {
    /// Captures the state to serve: the config is rendered once, here.
    pub fn new(
        metrics: Arc<Metrics>,
        config: &Config,
        ready: Arc<AtomicBool>,
        circuits: Vec<(Arc<str>, Arc<Breaker>)>,
    ) -> Self {
        let config_json = serde_json::to_vec_pretty(config).expect("the config serializes");
        Self {
            metrics,
            config_json: Bytes::from(config_json),
            ready,
            circuits,
        }
    }
}

/// Serves the admin endpoint until `stop` turns true.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, mut stop: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else { continue };
        let state = state.clone();
        let service = hyper::service::service_fn(move |request| {
            std::future::ready(Ok::<_, Infallible>(handle(&state, &request)))
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn handle(state: &AdminState, request: &Request<Incoming>) -> Response<Body> {
    let path = request.uri().path();
    if request.method() == Method::POST
        && let Some(rest) = path.strip_prefix("/circuits/")
    {
        return force_circuit(state, rest);
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
    }
    match path {
        "/circuits" => {
            let circuits: std::collections::BTreeMap<&str, _> = state
                .circuits
                .iter()
                .map(|(name, b)| (&**name, b.snapshot()))
                .collect();
            let json = serde_json::to_vec_pretty(&circuits).expect("snapshots serialize");
            with_type(StatusCode::OK, json, "application/json")
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if state.ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/metrics" => with_type(
            StatusCode::OK,
            state.metrics.encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        "/config" => with_type(
            StatusCode::OK,
            state.config_json.clone(),
            "application/json",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz, /metrics or /config\n",
        ),
    }
}

/// `POST /circuits/<upstream>/open|close|reset`.
fn force_circuit(state: &AdminState, rest: &str) -> Response<Body> {
    let Some((name, action)) = rest.split_once('/') else {
        return text(
            StatusCode::NOT_FOUND,
            "use /circuits/<upstream>/open|close|reset\n",
        );
    };
    let Some((_, breaker)) = state.circuits.iter().find(|(n, _)| &**n == name) else {
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
    let json = serde_json::to_vec_pretty(&breaker.snapshot()).expect("snapshots serialize");
    with_type(StatusCode::OK, json, "application/json")
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    with_type(status, body, "text/plain; charset=utf-8")
}

fn with_type(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Body> {
    let mut response = Response::new(body::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
