//! One upstream, as every caller of it sees it: the sidecar's request
//! path, the saga executor and dead-letter replays. Built once when the
//! config loads: its config, metric handles, resilience stack (with its
//! breaker and faults) and the transport client that puts each attempt on
//! the wire.

use std::sync::Arc;

use http::{Request, Response};

use crate::body::Body;
use crate::config::{RouteConfig, UpstreamConfig};
use crate::error::ProxyError;
use crate::resilience::breaker::Breaker;
use crate::resilience::connect::{ConnectError, ConnectPolicy};
use crate::resilience::faults::{FaultCell, Faults};
use crate::resilience::stack::{Observe, Stack};
use crate::telemetry::metrics::Outcome;
use crate::telemetry::metrics::{Metrics, UpstreamMetrics};
use crate::transport::client::{Endpoint, UpstreamClient};

/// An upstream, ready to take requests.
#[derive(Debug)]
pub struct Upstream {
    /// The resolved config it was built from.
    pub config: Arc<UpstreamConfig>,
    /// Its metric handles.
    pub metrics: UpstreamMetrics,
    client: Arc<UpstreamClient>,
    stack: Arc<Stack>,
    routes: Vec<Route>,
}

/// One of an upstream's routes, ready: its stack shares the upstream's
/// slots and client (and breaker and faults unless it has its own).
#[derive(Debug)]
pub struct Route {
    /// Its resolved config.
    pub config: Arc<RouteConfig>,
    /// Its handles: they count for the route and for the upstream.
    pub metrics: UpstreamMetrics,
    stack: Arc<Stack>,
}

/// How one request goes to an upstream: under the first of its routes
/// that matches, or under the upstream's own policy.
#[derive(Debug, Clone, Copy)]
pub struct Lane<'a> {
    /// The upstream.
    pub upstream: &'a Upstream,
    /// The route that matched, if any.
    pub route: Option<&'a Route>,
}

impl Upstream {
    /// Builds the upstream's client, stack and metrics.
    pub fn new(config: Arc<UpstreamConfig>, all: &Metrics) -> Self {
        let metrics = all.upstream(&config.name);
        let client = Arc::new(UpstreamClient::new(Endpoint {
            name: config.name.clone(),
            address: config.address.clone(),
            http2: config.protocol.is_http2(),
            tls: config.tls.as_ref().map(|t| t.client.clone()),
            headers: config
                .request_headers
                .iter()
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect(),
        }));

        let stack = Stack::new(
            config.name.clone(),
            &config.policy,
            resolve_faults(config.faults.as_ref()),
            client.clone(),
            config.jsonrpc,
            &metrics,
        );
        let routes = config
            .routes
            .iter()
            .map(|route| {
                let metrics = all.route(&metrics, &route.name);
                let stack = stack.route(
                    format!("{}/{}", config.name, route.name).into(),
                    &route.policy,
                    route.own_breaker,
                    route
                        .own_faults
                        .then(|| resolve_faults(route.faults.as_ref())),
                    &metrics,
                );
                Route {
                    config: route.clone(),
                    metrics,
                    stack: Arc::new(stack),
                }
            })
            .collect();
        Self {
            config,
            metrics,
            client,
            stack: Arc::new(stack),
            routes,
        }
    }

    /// The lane a request takes: the first route that matches it, else
    /// the upstream's own policy.
    pub fn lane<B>(&self, request: &Request<B>) -> Lane<'_> {
        Lane {
            upstream: self,
            route: self
                .routes
                .iter()
                .find(|r| r.config.matches.matches(request)),
        }
    }

    /// Its routes, in order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The same upstream under a reloaded `config`, keeping its client and
    /// stack (breaker state, retry budget, slots, runtime faults), if its
    /// address, protocol and policy did not change. Routing, criticality
    /// and fallback come from the new config; faults too, when the new
    /// config changed them.
    pub fn reuse(&self, config: &Arc<UpstreamConfig>) -> Option<Self> {
        let old = &self.config;
        if old.address != config.address
            || old.protocol != config.protocol
            || old.jsonrpc != config.jsonrpc
            || old.tls != config.tls
            || old.request_headers != config.request_headers
            || old.policy != config.policy
            || old.routes.len() != config.routes.len()
            || old
                .routes
                .iter()
                .zip(&config.routes)
                .any(|(a, b)| !a.same_stack(b))
        {
            return None;
        }
        if old.faults != config.faults {
            self.stack
                .faults()
                .set(resolve_faults(config.faults.as_ref()));
        }
        let routes = self
            .routes
            .iter()
            .zip(&config.routes)
            .map(|(route, config)| Route {
                config: config.clone(),
                metrics: route.metrics.clone(),
                stack: route.stack.clone(),
            })
            .collect();
        Some(Self {
            config: config.clone(),
            metrics: self.metrics.clone(),
            client: self.client.clone(),
            stack: self.stack.clone(),
            routes,
        })
    }

    /// Its circuit breaker, unless disabled.
    pub fn breaker(&self) -> Option<&Arc<Breaker>> {
        self.stack.breaker()
    }

    /// What a connect to it for a stream the sidecar does not read (TLS
    /// relayed) is held to: its retries' attempts and backoff, its breaker.
    pub fn connect_policy(&self) -> ConnectPolicy<'_> {
        ConnectPolicy {
            upstream: &self.config.name,
            retry: &self.config.policy.retry,
            breaker: self.breaker(),
            metrics: &self.metrics,
        }
    }

    /// Retries its budget allows now, if it retries or hedges.
    pub fn budget_left(&self) -> Option<u64> {
        self.stack.budget_left()
    }

    /// The faults in force, which the admin API may replace.
    pub fn faults(&self) -> &FaultCell {
        self.stack.faults()
    }

    /// Sends a caller's request through the upstream's policy (`grpc`:
    /// the request is a gRPC call).
    /// `observe`: the trace span and attempt counter, if wanted.
    pub async fn call(
        &self,
        request: Request<Body>,
        grpc: bool,
        observe: Observe<'_>,
    ) -> Result<Response<Body>, ProxyError> {
        // A saga step's or a replayed letter's JSON-RPC call is read as a
        // caller's is, for its route and what may be retried.
        let request = match self.config.jsonrpc {
            Some(dialect)
                if request.method() == http::Method::POST
                    && request.extensions().get::<crate::jsonrpc::Call>().is_none() =>
            {
                let idle = self.config.policy.stream_idle_timeout;
                Box::pin(crate::jsonrpc::read_call(request, dialect, idle)).await?
            }
            _ => request,
        };
        self.lane(&request).call(request, grpc, observe).await
    }
}

impl Route {
    /// Its circuit breaker, if it has one of its own.
    pub fn own_breaker(&self) -> Option<&Arc<Breaker>> {
        self.stack.breaker().filter(|_| self.config.own_breaker)
    }
}

impl<'a> Lane<'a> {
    /// Sends the request under the lane's policy.
    pub async fn call(
        self,
        request: Request<Body>,
        grpc: bool,
        observe: Observe<'_>,
    ) -> Result<Response<Body>, ProxyError> {
        let request = match self.upstream.config.jsonrpc {
            None => self.upstream.client.prepare(request),
            // The call read at the edge says what may be retried.
            Some(_) => {
                let mut request = request;
                let call = request.extensions_mut().remove::<crate::jsonrpc::Call>();
                let mut request = self.upstream.client.prepare(request);
                if let Some(call) = call {
                    request.extensions_mut().insert(call);
                }
                request
            }
        };
        let stack = self.route.map_or(&self.upstream.stack, |r| &r.stack);
        stack.call(request, grpc, observe).await
    }

    /// The metrics its requests count in.
    pub fn metrics(self) -> &'a UpstreamMetrics {
        self.route.map_or(&self.upstream.metrics, |r| &r.metrics)
    }

    /// The answer its failures degrade to, if it is optional.
    pub fn fallback(self) -> Option<&'a Arc<crate::resilience::fallback::Fallback>> {
        match self.route {
            Some(route) => route.config.fallback.as_ref(),
            None => self.upstream.config.fallback.as_ref(),
        }
    }

    /// Whether its requests that finally fail are dead-lettered, and how.
    pub fn dead_letter(self) -> Option<crate::config::DeadLetterPolicy> {
        match self.route {
            Some(route) => route.config.dead_letter,
            None => self.upstream.config.dead_letter,
        }
    }

    /// The route's name, if a route matched.
    pub fn route_name(self) -> Option<&'a str> {
        self.route.map(|r| &*r.config.name)
    }
}

impl Upstream {
    /// Relays a caller's HTTP/1.1 upgrade (a WebSocket) asking for
    /// `protocol`: connected under the upstream's connect policy, over its
    /// TLS if it has one, the upstream's answer awaited within the call's
    /// `timeout`. A `101` joins the two connections; any other answer is
    /// passed back as it is.
    pub async fn upgrade(
        &self,
        mut request: Request<hyper::body::Incoming>,
        protocol: http::HeaderValue,
    ) -> Result<Response<Body>, ProxyError> {
        let name = &self.config.name;
        let started = tokio::time::Instant::now();
        let caller = hyper::upgrade::on(&mut request);
        let (parts, _) = request.into_parts();
        let result = self.switch(parts, protocol).await;
        let outcome = match &result {
            Ok((response, _)) if response.status().is_server_error() => Outcome::Error,
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        };
        self.metrics
            .record(outcome, started.elapsed().as_secs_f64());
        let (response, upstream) = result?;
        if let Some(upstream) = upstream {
            crate::transport::upgrade::join(caller, upstream);
        }
        tracing::debug!(upstream = %name, status = %response.status(), "upgrade answered");
        Ok(response)
    }

    async fn switch(
        &self,
        parts: http::request::Parts,
        protocol: http::HeaderValue,
    ) -> Result<(Response<Body>, Option<hyper::upgrade::OnUpgrade>), ProxyError> {
        let name = &self.config.name;
        let address = self.config.address.as_str();
        let to = tokio::net::lookup_host(address)
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| ProxyError::Connect {
                upstream: name.clone(),
                source: format!("{address} does not resolve").into(),
            })?;
        let tcp = crate::resilience::connect::connect(to, self.connect_policy())
            .await
            .map_err(|error| match error {
                ConnectError::CircuitOpen(upstream) => ProxyError::CircuitOpen { upstream },
                failed @ ConnectError::Failed { .. } => ProxyError::Connect {
                    upstream: name.clone(),
                    source: failed.into(),
                },
            })?;
        let io: Box<dyn crate::transport::upgrade::Io> =
            match &self.config.tls {
                None => Box::new(tcp),
                Some(tls) => Box::new(tls.client.connect(tcp).await.map_err(|e| {
                    ProxyError::TlsHandshake {
                        upstream: name.clone(),
                        reason: e.to_string(),
                    }
                })?),
            };
        let mut outgoing = self
            .client
            .prepare(Request::from_parts(parts, crate::body::empty()));
        crate::transport::upgrade::restore(&mut outgoing, protocol);
        let timeout = self.config.policy.timeout;
        let sent = tokio::time::timeout(timeout, crate::transport::upgrade::send(io, outgoing));
        let mut response = match sent.await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                return Err(ProxyError::Upstream {
                    upstream: name.clone(),
                    source: error.into(),
                });
            }
            Err(_) => {
                return Err(ProxyError::DeadlineExceeded {
                    upstream: name.clone(),
                    after: timeout,
                    by: "policy",
                });
            }
        };
        let upgraded = (response.status() == http::StatusCode::SWITCHING_PROTOCOLS)
            .then(|| hyper::upgrade::on(&mut response));
        Ok((response.map(Body::incoming), upgraded))
    }
}

fn resolve_faults(faults: Option<&crate::resilience::faults::FaultSpec>) -> Option<Faults> {
    faults.map(|spec| {
        spec.resolve()
            .expect("fault specs are checked when the config loads")
    })
}
