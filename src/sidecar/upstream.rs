//! One upstream as the request path sees it: its config, a pooled client,
//! and its metric handles, built once when the config loads.

use std::sync::Arc;
use std::time::Duration;

use http::header::{HOST, HeaderValue};
use http::uri::{self, PathAndQuery, Scheme, Uri};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::h2::{H2Client, H2Error};
use super::headers::strip_hop_by_hop;
use crate::body::{self, Body, BoxError};
use crate::config::UpstreamConfig;
use crate::edge::ProxyError;
use crate::telemetry::metrics::{Metrics, UpstreamMetrics};

/// How long to wait for a TCP connection to an upstream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an idle pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// HTTP/2 flow-control windows: large enough that an 8 MiB gRPC message is
/// not throttled by round trips, small enough to bound buffering per stream.
const H2_STREAM_WINDOW: u32 = 2 << 20;
const H2_CONNECTION_WINDOW: u32 = 8 << 20;

/// An upstream, ready to take requests.
#[derive(Debug)]
pub struct Upstream {
    /// The resolved config it was built from.
    pub config: Arc<UpstreamConfig>,
    /// Its metric handles.
    pub metrics: UpstreamMetrics,
    host: HeaderValue,
    client: UpstreamClient,
}

/// The connection handling for the upstream's protocol.
#[derive(Debug)]
enum UpstreamClient {
    /// Pooled keep-alive connections.
    Http1(Client<HttpConnector, Body>),
    /// One multiplexed connection.
    Http2(H2Client),
}

impl Upstream {
    /// Builds the upstream's client and resolves its metrics.
    pub fn new(config: Arc<UpstreamConfig>, metrics: &Metrics) -> Self {
        let client = if config.protocol.is_http2() {
            UpstreamClient::Http2(H2Client::new(
                config.address.clone(),
                CONNECT_TIMEOUT,
                H2_STREAM_WINDOW,
                H2_CONNECTION_WINDOW,
            ))
        } else {
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
            let client = Client::builder(TokioExecutor::new())
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .build(connector);
            UpstreamClient::Http1(client)
        };
        let host = HeaderValue::from_str(config.address.as_str())
            .expect("a validated authority is a valid header value");
        Self {
            metrics: metrics.upstream(&config.name),
            host,
            client,
            config,
        }
    }

    /// Sends one request to the upstream and returns its answer, with
    /// hop-by-hop headers removed both ways.
    pub async fn send(&self, request: Request<Incoming>) -> Result<Response<Body>, ProxyError> {
        let request = self.prepare(request);
        let upstream = || self.config.name.clone();
        let response = match &self.client {
            UpstreamClient::Http1(client) => client.request(request).await.map_err(|e| {
                let connect = e.is_connect();
                let source = error_chain(&e);
                if connect {
                    ProxyError::Connect {
                        upstream: upstream(),
                        source,
                    }
                } else {
                    ProxyError::Upstream {
                        upstream: upstream(),
                        source,
                    }
                }
            })?,
            UpstreamClient::Http2(client) => client.send(request).await.map_err(|e| match e {
                H2Error::Connect(source) => ProxyError::Connect {
                    upstream: upstream(),
                    source,
                },
                H2Error::Request(e) => ProxyError::Upstream {
                    upstream: upstream(),
                    source: error_chain(&e),
                },
            })?,
        };
        let (mut parts, incoming) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, body::boxed(incoming)))
    }

    /// Rewrites a caller's request for the upstream: absolute URI for the
    /// pooled client, `Host` / `:authority` set to the upstream's address,
    /// the upstream's protocol version, no hop-by-hop headers.
    fn prepare(&self, request: Request<Incoming>) -> Request<Body> {
        let (mut parts, incoming) = request.into_parts();
        let mut target = uri::Parts::default();
        target.scheme = Some(Scheme::HTTP);
        target.authority = Some(self.config.address.clone());
        target.path_and_query = Some(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        parts.uri = Uri::from_parts(target).expect("scheme, authority and path make a URI");
        strip_hop_by_hop(&mut parts.headers);
        if self.config.protocol.is_http2() {
            parts.headers.remove(HOST);
            parts.version = Version::HTTP_2;
        } else {
            parts.headers.insert(HOST, self.host.clone());
            parts.version = Version::HTTP_11;
        }
        parts.extensions.clear();
        Request::from_parts(parts, body::boxed(incoming))
    }
}

/// An error and its causes in one line (`client error (Connect): tcp
/// connect error: Connection refused`), for logs and answers.
fn error_chain(error: &dyn std::error::Error) -> BoxError {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.into()
}
