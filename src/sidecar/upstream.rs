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

use super::headers::strip_hop_by_hop;
use crate::body::{self, Body};
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
    client: Client<HttpConnector, Body>,
}

impl Upstream {
    /// Builds the upstream's client and resolves its metrics.
    pub fn new(config: Arc<UpstreamConfig>, metrics: &Metrics) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new());
        if config.protocol.is_http2() {
            builder
                .http2_only(true)
                .http2_initial_stream_window_size(H2_STREAM_WINDOW)
                .http2_initial_connection_window_size(H2_CONNECTION_WINDOW)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .http2_keep_alive_while_idle(false);
        }
        let host = HeaderValue::from_str(config.address.as_str())
            .expect("a validated authority is a valid header value");
        Self {
            metrics: metrics.upstream(&config.name),
            host,
            client: builder.build(connector),
            config,
        }
    }

    /// Sends one request to the upstream and returns its answer, with
    /// hop-by-hop headers removed both ways.
    pub async fn send(&self, request: Request<Incoming>) -> Result<Response<Body>, ProxyError> {
        let request = self.prepare(request);
        match self.client.request(request).await {
            Ok(response) => {
                let (mut parts, incoming) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Ok(Response::from_parts(parts, body::boxed(incoming)))
            }
            Err(e) if e.is_connect() => Err(ProxyError::Connect {
                upstream: self.config.name.clone(),
                source: source_of(e),
            }),
            Err(e) => Err(ProxyError::Upstream {
                upstream: self.config.name.clone(),
                source: source_of(e),
            }),
        }
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

/// The transport error under the client's wrapper, for a readable message.
fn source_of(error: hyper_util::client::legacy::Error) -> crate::body::BoxError {
    use std::error::Error;
    match error.source() {
        Some(source) => source.to_string().into(),
        None => error.to_string().into(),
    }
}
