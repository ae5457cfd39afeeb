//! The proxy service: one request in, routed to its upstream, one answer
//! out. It is the `hyper` service every sidecar listener serves.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::{Method, Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use std::sync::atomic::{AtomicU32, Ordering};

use super::dead_letter::{Capture, DeadLetters, Failed};
use super::failover;
use super::live::LiveCell;
use crate::body::Body;
use crate::classify;
use crate::config::Rewrite;
use crate::edge;
use crate::error::ProxyError;
use crate::jsonrpc;
use crate::resilience::fallback;
use crate::resilience::stack::Observe;
use crate::telemetry::metrics::{Metrics, Outcome};
use crate::telemetry::traces::Tracing;
use crate::upstream::Upstream;

/// Where a listener sends its requests.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// The shared port: route by authority.
    Shared,
    /// A dedicated port: every request goes to the upstream of this name.
    Upstream(Arc<str>),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Shared => f.write_str("proxy"),
            Target::Upstream(name) => write!(f, "upstream {name}"),
        }
    }
}

/// The service a listener serves.
#[derive(Debug, Clone)]
pub struct ProxyService {
    target: Target,
    live: LiveCell,
    metrics: Arc<Metrics>,
    tracing: Option<Tracing>,
    dead_letters: Option<Arc<DeadLetters>>,
}

impl ProxyService {
    /// A service sending requests to `target`, as the live configuration
    /// routes it, with spans when `tracing` is on and letters for failed
    /// requests when `dead_letters` is.
    pub fn new(
        target: Target,
        live: LiveCell,
        metrics: Arc<Metrics>,
        tracing: Option<Tracing>,
        dead_letters: Option<Arc<DeadLetters>>,
    ) -> Self {
        Self {
            target,
            live,
            metrics,
            tracing,
            dead_letters,
        }
    }

    /// The upstream for a request in the current configuration, or the
    /// reason there is none.
    fn route<B>(&self, request: &Request<B>) -> Result<Arc<Upstream>, ProxyError> {
        let live = self.live.load();
        match &self.target {
            Target::Upstream(name) => live.upstream(name).cloned().ok_or_else(|| {
                // The upstream was removed by a reload while this
                // connection stayed open.
                ProxyError::UnknownHost {
                    host: name.to_string(),
                }
            }),
            Target::Shared => match live.routes().find(request) {
                Ok(upstream) => Ok(upstream.clone()),
                // A redirected connection to an upstream's address whose
                // request names no upstream (`Host: 10.96.0.5:8080`).
                Err(missing) => match request
                    .extensions()
                    .get::<crate::transport::server::Destination>()
                    .and_then(|d| live.upstream(&d.0))
                {
                    Some(upstream) => Ok(upstream.clone()),
                    None => Err(match missing {
                        Some(host) => ProxyError::UnknownHost { host },
                        None => ProxyError::NoHost,
                    }),
                },
            },
        }
    }
}

impl ProxyService {
    /// `CONNECT host:port`, from a client with `HTTP_PROXY` or
    /// `HTTPS_PROXY` set: a tunnel to an upstream that claims the host,
    /// whose inside is served as that upstream's HTTP (with its policy) or,
    /// in TLS, relayed to its address. Any other host is refused (403): the
    /// sidecar is not an open proxy.
    fn tunnel(&self, request: Request<Incoming>) -> Response<Body> {
        let upstream = match self.route(&request) {
            Ok(upstream) => upstream,
            Err(_) => {
                self.metrics.unrouted();
                self.metrics.intercepted("connect-refused");
                let host = request
                    .uri()
                    .authority()
                    .map_or_else(String::new, |a| a.to_string());
                return edge::error_response(&ProxyError::UnknownTunnel { host }, false);
            }
        };
        let service = self.clone();
        tokio::spawn(async move {
            let upgraded = match hyper::upgrade::on(request).await {
                Ok(upgraded) => upgraded,
                Err(error) => {
                    tracing::debug!(%error, "a CONNECT tunnel did not open");
                    return;
                }
            };
            let mut inside = tokio::io::BufReader::new(hyper_util::rt::TokioIo::new(upgraded));
            let first = match tokio::io::AsyncBufReadExt::fill_buf(&mut inside).await {
                Ok([first, ..]) => *first,
                _ => return,
            };
            if first == 0x16 {
                // TLS to the upstream: the caller's own, relayed.
                service.metrics.intercepted("connect-tls");
                crate::intercept::outbound::relay_to(inside, &upstream).await;
                return;
            }
            service.metrics.intercepted("connect-http");
            let destination = crate::transport::server::Destination(upstream.config.name.clone());
            crate::transport::server::serve_inside(inside, service, destination).await;
        });
        Response::new(crate::body::empty())
    }
}

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let grpc = crate::grpc::is_grpc(request.headers());
        if request
            .headers()
            .get_all(http::header::HOST)
            .iter()
            .nth(1)
            .is_some()
        {
            self.metrics.unrouted();
            let error = ProxyError::DuplicateHost;
            return Box::pin(std::future::ready(Ok(edge::error_response(&error, grpc))));
        }
        if request.method() == Method::CONNECT {
            return Box::pin(std::future::ready(Ok(self.tunnel(request))));
        }
        let upstream = match self.route(&request) {
            Ok(upstream) => upstream,
            Err(error) => {
                self.metrics.unrouted();
                tracing::debug!(%error, "unrouted request");
                return Box::pin(std::future::ready(Ok(edge::error_response(&error, grpc))));
            }
        };
        // An HTTP/1.1 upgrade (a WebSocket) is relayed to an HTTP/1.1
        // upstream, refused for others; never forwarded as a plain request
        // with its `Upgrade` dropped.
        if let Some(protocol) = crate::transport::upgrade::requested(request.headers()).cloned() {
            if upstream.config.protocol.is_http2() {
                let error = ProxyError::UnsupportedUpgrade {
                    protocol: String::from_utf8_lossy(protocol.as_bytes()).into_owned(),
                };
                return Box::pin(std::future::ready(Ok(edge::error_response(&error, grpc))));
            }
            return Box::pin(async move {
                Ok(upstream
                    .upgrade(request, protocol)
                    .await
                    .unwrap_or_else(|error| edge::error_response(&error, false)))
            });
        }
        let failover = if upstream.config.failover.is_empty() {
            Vec::new()
        } else {
            let live = self.live.load();
            upstream
                .config
                .failover
                .iter()
                .filter_map(|t| Some((live.upstream(&t.upstream)?.clone(), t.rewrite.clone())))
                .collect()
        };
        let (tracing, dead_letters) = (self.tracing.clone(), self.dead_letters.clone());
        match upstream.config.jsonrpc {
            Some(dialect) if request.method() == Method::POST => Box::pin(async move {
                // A JSON-RPC call is read first, for its method and id; on
                // a path of its own, so that other calls' futures do not
                // carry its state.
                let idle = upstream.config.policy.stream_idle_timeout;
                let started = Instant::now();
                let request = request.map(Body::incoming);
                let request = match jsonrpc::read_call(request, dialect, idle).await {
                    Ok(request) => request,
                    Err(error) => {
                        upstream
                            .metrics
                            .record(Outcome::Rejected, started.elapsed().as_secs_f64());
                        return Ok(edge::error_response(&error, false));
                    }
                };
                let exchange = Some(Box::new(Exchange::new(dialect, &request)));
                let call = (request, exchange);
                forward(upstream, failover, call, grpc, tracing, dead_letters).await
            }),
            _ => {
                let call = (request.map(Body::incoming), None);
                Box::pin(forward(
                    upstream,
                    failover,
                    call,
                    grpc,
                    tracing,
                    dead_letters,
                ))
            }
        }
    }
}

/// What the edge keeps of a JSON-RPC call while it is under way.
struct Exchange {
    /// The method, as a metric label.
    method: &'static str,
    /// The request's id, for the answers the sidecar makes.
    id: Option<Box<serde_json::value::RawValue>>,
    /// It named an MCP session.
    session: bool,
}

impl Exchange {
    fn new(dialect: jsonrpc::Dialect, request: &Request<Body>) -> Self {
        let call = request.extensions().get::<jsonrpc::Call>();
        Self {
            method: dialect.label(call.and_then(|c| c.method.as_deref())),
            id: call.and_then(|c| c.id.clone()),
            session: dialect == jsonrpc::Dialect::Mcp
                && request.headers().contains_key(jsonrpc::MCP_SESSION_ID),
        }
    }

    /// What the answer said, as a metric label. A 404 to a call in an MCP
    /// session says the session is gone (the client initializes again):
    /// passed on as it is, and no failure of the server.
    fn outcome(&self, response: &Response<Body>, made: bool) -> &'static str {
        if made {
            return "none";
        }
        if self.session && response.status() == http::StatusCode::NOT_FOUND {
            return "session-expired";
        }
        response
            .extensions()
            .get::<jsonrpc::Verdict>()
            .map_or("none", |v| v.label())
    }
}

/// Sends a request to its upstream and records the outcome (and, with
/// tracing on, the request's span; with dead letters on, a letter for a
/// request that finally failed).
///
/// Kept whole for the reason `Stack::attempt` is: it is on every call, and
/// a nested future is one more move per call; split it only with
/// `bench/instructions.sh` before and after.
async fn forward(
    upstream: Arc<Upstream>,
    failover: Vec<(Arc<Upstream>, Option<Arc<Rewrite>>)>,
    (request, jsonrpc): (Request<Body>, Option<Box<Exchange>>),
    grpc: bool,
    tracing: Option<Tracing>,
    dead_letters: Option<Arc<DeadLetters>>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let lane = upstream.lane(&request);
    let _in_flight = lane.metrics().start();
    let span = tracing.map(|t| {
        let span = t.request(
            request.headers(),
            request.method(),
            request.uri().path(),
            &upstream.config.name,
        );
        let method = jsonrpc.as_ref().and_then(|_| {
            let call = request.extensions().get::<jsonrpc::Call>();
            call.and_then(|c| c.method.as_deref())
        });
        if lane.route.is_some() || method.is_some() {
            span.matched(lane.route_name(), method);
        }
        span
    });
    let capture = match (dead_letters, lane.dead_letter()) {
        (Some(sink), Some(policy)) => {
            let head = sink.head(request.method(), request.uri(), request.headers());
            Some((sink, Capture::new(policy.max_body), head))
        }
        _ => None,
    };
    let request = match &capture {
        Some((_, capture, _)) => request.map(|b| capture.wrap(b)),
        None => request,
    };
    let attempts = AtomicU32::new(0);
    let observe = Observe {
        span: span.as_ref(),
        attempts: capture.is_some().then_some(&attempts),
    };
    let result = if failover.is_empty() {
        lane.call(request, grpc, observe).await
    } else {
        // Boxed: its future holds several calls, and inline it would make
        // every request's future that large (moving it costs memcpy).
        Box::pin(failover::call(&upstream, &failover, request, grpc, observe)).await
    };
    let fallback = lane.fallback();
    let failure = if fallback.is_some() || capture.is_some() {
        fallback::reason(&result, grpc)
    } else {
        None
    };
    if let (Some((sink, capture, head)), Some(reason)) = (capture, &failure) {
        let failed = Failed {
            reason: reason.to_string(),
            attempts: attempts.load(Ordering::Relaxed),
            grpc,
        };
        let durable = lane.dead_letter().is_some_and(|d| d.durable);
        if let Some(flushed) = sink.submit(&upstream.config.name, head, capture, failed, durable) {
            // The answer waits for the letter to be safe on disk.
            let _ = flushed.await;
        }
    }
    let mut answered = None;
    let (outcome, response, error, degraded) = match (fallback, failure, result) {
        (Some(fallback), Some(reason), result) => {
            if let Err(error) = &result {
                tracing::debug!(upstream = %upstream.config.name, %error, %reason, "degraded");
            }
            lane.metrics().fallback(&reason);
            let response = match jsonrpc.as_ref().and_then(|j| j.id.as_deref()) {
                Some(id) => jsonrpc::degraded_answer(id, &fallback.body, &reason),
                None => fallback.answer(&reason, grpc),
            };
            (Outcome::Degraded, response, None, Some(reason))
        }
        (_, _, Ok(response)) => {
            answered = classify::classify_response(&response, grpc);
            let response = match jsonrpc.as_ref().and_then(|j| j.id.clone()) {
                Some(id) => jsonrpc::close_with_error(response, id),
                None => response,
            };
            let outcome = match answered {
                None => Outcome::Success,
                Some(_) => Outcome::Error,
            };
            (outcome, response, None, None)
        }
        (_, _, Err(error)) => {
            tracing::debug!(upstream = %upstream.config.name, %error, "upstream call failed");
            let response = match jsonrpc.as_ref().and_then(|j| j.id.as_deref()) {
                Some(id) => jsonrpc::answer_error(id, &error),
                None => edge::error_response(&error, grpc),
            };
            let outcome = match error.is_callers() {
                true => Outcome::Rejected,
                false => Outcome::Failure,
            };
            (outcome, response, Some(error.reason()), None)
        }
    };
    lane.metrics()
        .record(outcome, started.elapsed().as_secs_f64());
    if let Some(exchange) = &jsonrpc {
        lane.metrics().jsonrpc(
            exchange.method,
            exchange.outcome(&response, error.is_some()),
        );
    }
    Ok(match span {
        None => response,
        Some(span) => {
            span.answered(&response, error, degraded.as_deref(), answered);
            span.end_with(response)
        }
    })
}
