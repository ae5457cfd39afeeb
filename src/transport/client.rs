//! The client that puts one attempt on the wire: the request made
//! absolute for the upstream (authority, `Host`, HTTP version, hop-by-hop
//! headers removed), sent on a pooled HTTP/1.1 connection or the
//! upstream's one HTTP/2 connection, and a gRPC answer's first frame read
//! when its status may be in it.

use std::sync::Arc;
use std::time::Duration;

use http::header::{HOST, HeaderValue};
use http::uri::{self, PathAndQuery, Scheme, Uri};
use http::{Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::h2::{H2Client, H2Error};
use super::headers::strip_hop_by_hop;
use super::linger::LingeringConnector;
use super::tls::{HttpsConnector, Tls, handshake_failure};
use crate::body::{self, Body, BoxError, Completion, SourceFailure};
use crate::error::ProxyError;
use crate::grpc::{self, TrailerStatus};

/// How long to wait for a TCP connection to an upstream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The most header fields sent to an HTTP/1.1 upstream, those the sidecar
/// adds included: the limit hyper, Envoy and Node hold requests to, and
/// the one the sidecar holds its own callers to. A request at the limit
/// would otherwise be refused by the upstream, with a 431 the caller
/// cannot explain.
pub const MAX_HEADER_FIELDS: usize = 100;
/// How long an idle pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// HTTP/2 flow-control windows: large enough that an 8 MiB gRPC message is
/// not throttled by round trips, small enough to bound buffering per stream.
const H2_STREAM_WINDOW: u32 = 2 << 20;
const H2_CONNECTION_WINDOW: u32 = 8 << 20;

/// The connection handling for the upstream's protocol.
#[derive(Debug)]
enum Connections {
    /// Pooled keep-alive connections.
    Http1(Client<LingeringConnector<HttpConnector>, Body>),
    /// Pooled keep-alive connections over TLS.
    Https1(Client<LingeringConnector<HttpsConnector>, Body>),
    /// One multiplexed connection.
    Http2(H2Client),
}

/// Where an upstream is and how to speak to it: all the transport needs
/// to know of its config.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The upstream's name, for errors.
    pub name: Arc<str>,
    /// Its address (`host:port`).
    pub address: http::uri::Authority,
    /// HTTP/2 (and gRPC) rather than HTTP/1.1.
    pub http2: bool,
    /// TLS, when the upstream speaks it.
    pub tls: Option<Tls>,
    /// Headers set on every request, replacing the caller's (credentials
    /// the agent does not hold).
    pub headers: Vec<(http::HeaderName, HeaderValue)>,
}

/// Puts attempts on the wire.
#[derive(Debug)]
pub struct UpstreamClient {
    name: Arc<str>,
    address: http::uri::Authority,
    http2: bool,
    host: HeaderValue,
    headers: Vec<(http::HeaderName, HeaderValue)>,
    connections: Connections,
}

impl UpstreamClient {
    /// A client for the upstream at `endpoint`.
    pub fn new(endpoint: Endpoint) -> Self {
        let connections = if endpoint.http2 {
            Connections::Http2(H2Client::new(
                endpoint.address.clone(),
                CONNECT_TIMEOUT,
                H2_STREAM_WINDOW,
                H2_CONNECTION_WINDOW,
                endpoint.tls.clone(),
            ))
        } else {
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
            let mut builder = Client::builder(TokioExecutor::new());
            builder
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new());
            match endpoint.tls.clone() {
                None => Connections::Http1(builder.build(LingeringConnector(connector))),
                Some(tls) => Connections::Https1(
                    builder.build(LingeringConnector(HttpsConnector::new(connector, tls))),
                ),
            }
        };
        Self {
            host: HeaderValue::from_str(endpoint.address.as_str())
                .expect("a validated authority is a valid header value"),
            headers: endpoint.headers,
            name: endpoint.name,
            address: endpoint.address,
            http2: endpoint.http2,
            connections,
        }
    }

    /// Rewrites a caller's request for the upstream: absolute URI for the
    /// client, `Host` / `:authority` set to the upstream's address, the
    /// upstream's protocol version, no hop-by-hop headers.
    pub fn prepare(&self, request: Request<Body>) -> Request<Body> {
        let (mut parts, body) = request.into_parts();
        let mut target = uri::Parts::default();
        target.scheme = Some(Scheme::HTTP);
        target.authority = Some(self.address.clone());
        target.path_and_query = Some(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        parts.uri = Uri::from_parts(target).expect("scheme, authority and path make a URI");
        strip_hop_by_hop(&mut parts.headers);
        if self.http2 {
            parts.headers.remove(HOST);
            parts.version = Version::HTTP_2;
        } else {
            parts.headers.insert(HOST, self.host.clone());
            parts.version = Version::HTTP_11;
        }
        for (name, value) in &self.headers {
            parts.headers.insert(name.clone(), value.clone());
        }
        parts.extensions.clear();
        Request::from_parts(parts, body)
    }

    /// Sends one attempt and returns the upstream's answer, hop-by-hop
    /// headers removed.
    /// `completion`, when the request body is kept for replay, tells
    /// whether the body had been read whole when the answer started.
    pub async fn send(
        &self,
        request: Request<Body>,
        completion: Option<Completion>,
    ) -> Result<Response<Body>, ProxyError> {
        let count = request.headers().len();
        if count > MAX_HEADER_FIELDS && !matches!(self.connections, Connections::Http2(_)) {
            return Err(ProxyError::TooManyHeaders {
                count,
                limit: MAX_HEADER_FIELDS,
            });
        }
        let response = match &self.connections {
            Connections::Http1(client) => client
                .request(request)
                .await
                .map_err(|e| self.http1_error(&e)),
            Connections::Https1(client) => client
                .request(request)
                .await
                .map_err(|e| self.http1_error(&e)),
            Connections::Http2(client) => client.send(request).await.map_err(|e| self.h2_error(e)),
        };
        let response = match response {
            Ok(response) => response,
            Err(error) => return Err(callers_fault(completion.as_ref()).unwrap_or(error)),
        };
        let (mut parts, incoming) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let unary_like = completion.is_some_and(|c| c.is_complete());
        let body = if unary_like && needs_peek(&parts) {
            self.peek(&mut parts, incoming).await?
        } else {
            Body::incoming(incoming)
        };
        Ok(Response::from_parts(parts, body))
    }

    /// Reads the first frame of a gRPC answer that has no status in its
    /// headers: if it is the trailers, their `grpc-status` is recorded for
    /// classification. A message frame is put back untouched.
    async fn peek(
        &self,
        parts: &mut http::response::Parts,
        mut incoming: Incoming,
    ) -> Result<Body, ProxyError> {
        match incoming.frame().await {
            None => Ok(body::empty()),
            Some(Err(e)) => Err(ProxyError::Upstream {
                upstream: self.name.clone(),
                source: error_chain(&e),
            }),
            Some(Ok(frame)) => {
                let status = frame.trailers_ref().and_then(grpc::status);
                if let Some(status) = status {
                    parts.extensions.insert(TrailerStatus(status));
                }
                Ok(Body::prefixed(frame, incoming))
            }
        }
    }

    fn http1_error(&self, e: &hyper_util::client::legacy::Error) -> ProxyError {
        let upstream = self.name.clone();
        if let Some(reason) = handshake_failure(e) {
            return ProxyError::TlsHandshake { upstream, reason };
        }
        let source = error_chain(e);
        if e.is_connect() {
            ProxyError::Connect { upstream, source }
        } else {
            ProxyError::Upstream { upstream, source }
        }
    }

    fn h2_error(&self, e: H2Error) -> ProxyError {
        let upstream = self.name.clone();
        match e {
            H2Error::Connect(source) => match handshake_failure(&*source) {
                Some(reason) => ProxyError::TlsHandshake { upstream, reason },
                None => ProxyError::Connect { upstream, source },
            },
            H2Error::Request(e) if refused_stream(&e) => ProxyError::RefusedStream { upstream },
            H2Error::Request(e) => ProxyError::Upstream {
                upstream,
                source: error_chain(&e),
            },
        }
    }
}

/// The caller's fault, when its request body failed while the attempt
/// was sending it: the attempt failed because of the caller, not the
/// upstream.
fn callers_fault(completion: Option<&Completion>) -> Option<ProxyError> {
    Some(match completion?.source_failure()? {
        SourceFailure::Broke(reason) => ProxyError::RequestBody { reason },
        SourceFailure::Stalled(after) => ProxyError::RequestIdle { after },
    })
}

/// A gRPC answer whose status is not in its headers.
fn needs_peek(parts: &http::response::Parts) -> bool {
    grpc::is_grpc(&parts.headers) && !parts.headers.contains_key(grpc::STATUS)
}

/// Whether the HTTP/2 peer refused the stream (`REFUSED_STREAM`): it did
/// not process the request, so it is safe to send again.
fn refused_stream(error: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = e.source();
    }
    false
}

/// An error and its causes in one line, as a body error.
fn error_chain(error: &dyn std::error::Error) -> BoxError {
    crate::error::error_text(error).into()
}
