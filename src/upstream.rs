//! One upstream, as every caller of it sees it: the sidecar's request
//! path, the saga executor and dead-letter replays. Built once when the
//! config loads: its config, metric handles, resilience stack (with its
//! breaker and faults) and the transport client that puts each attempt on
//! the wire.

use std::sync::Arc;

use http::{Request, Response};

use crate::body::Body;
use crate::config::UpstreamConfig;
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
}

impl Upstream {
    /// Builds the upstream's client, stack and metrics.
    pub fn new(config: Arc<UpstreamConfig>, metrics: &Metrics) -> Self {
        let metrics = metrics.upstream(&config.name);
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
            resolve_faults(&config),
            client.clone(),
            &metrics,
        );
        Self {
            config,
            metrics,
            client,
            stack: Arc::new(stack),
        }
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
            || old.tls != config.tls
            || old.request_headers != config.request_headers
            || old.policy != config.policy
        {
            return None;
        }
        if old.faults != config.faults {
            self.stack.faults().set(resolve_faults(config));
        }
        Some(Self {
            config: config.clone(),
            metrics: self.metrics.clone(),
            client: self.client.clone(),
            stack: self.stack.clone(),
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
        let request = self.client.prepare(request);
        self.stack.call(request, grpc, observe).await
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

fn resolve_faults(config: &UpstreamConfig) -> Option<Faults> {
    config.faults.as_ref().map(|spec| {
        spec.resolve()
            .expect("fault specs are checked when the config loads")
    })
}
