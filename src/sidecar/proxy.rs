//! The proxy service: one request in, routed to its upstream, one answer
//! out. It is the `hyper` service every sidecar listener serves.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::{Method, Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::route::Routes;
use super::upstream::Upstream;
use crate::body::Body;
use crate::edge::{self, ProxyError};
use crate::resilience::fallback;
use crate::telemetry::metrics::{Metrics, Outcome};

/// Where a listener sends its requests.
#[derive(Debug, Clone)]
pub enum Target {
    /// A dedicated port: every request goes to this upstream.
    Upstream(Arc<Upstream>),
    /// The shared port: route by authority.
    Shared(Arc<Routes>),
}

/// The service a listener serves.
#[derive(Debug, Clone)]
pub struct ProxyService {
    target: Target,
    metrics: Arc<Metrics>,
}

impl ProxyService {
    /// A service sending requests to `target`.
    pub fn new(target: Target, metrics: Arc<Metrics>) -> Self {
        Self { target, metrics }
    }
}

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let grpc = edge::is_grpc(request.headers());
        if request.method() == Method::CONNECT {
            let error = ProxyError::UnsupportedMethod {
                method: Method::CONNECT,
            };
            return Box::pin(std::future::ready(Ok(edge::error_response(&error, grpc))));
        }
        let upstream = match &self.target {
            Target::Upstream(upstream) => upstream.clone(),
            Target::Shared(routes) => match routes.find(&request) {
                Ok(upstream) => upstream.clone(),
                Err(host) => {
                    self.metrics.unrouted();
                    let error = match host {
                        Some(host) => ProxyError::UnknownHost { host },
                        None => ProxyError::NoHost,
                    };
                    tracing::debug!(%error, "unrouted request");
                    return Box::pin(std::future::ready(Ok(edge::error_response(&error, grpc))));
                }
            },
        };
        Box::pin(forward(upstream, request, grpc))
    }
}

/// Sends a request to its upstream and records the outcome.
async fn forward(
    upstream: Arc<Upstream>,
    request: Request<Incoming>,
    grpc: bool,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let _in_flight = upstream.metrics.start();
    let result = upstream.call(request, grpc).await;
    if let Some(fallback) = &upstream.config.fallback
        && let Some(reason) = fallback::reason(&result, grpc)
    {
        if let Err(error) = &result {
            tracing::debug!(upstream = %upstream.config.name, %error, %reason, "degraded");
        }
        upstream.metrics.fallback(&reason);
        let response = fallback.answer(&reason, grpc);
        upstream
            .metrics
            .record(Outcome::Degraded, started.elapsed().as_secs_f64());
        return Ok(response);
    }
    let (outcome, response) = match result {
        Ok(response) => (outcome_of(&response, grpc), response),
        Err(error) => {
            tracing::debug!(upstream = %upstream.config.name, %error, "upstream call failed");
            (Outcome::Failure, edge::error_response(&error, grpc))
        }
    };
    upstream
        .metrics
        .record(outcome, started.elapsed().as_secs_f64());
    Ok(response)
}

/// The outcome of an answered request, as classified.
fn outcome_of(response: &Response<Body>, grpc: bool) -> Outcome {
    match crate::resilience::classify::classify_response(response, grpc) {
        None => Outcome::Success,
        Some(_) => Outcome::Error,
    }
}
