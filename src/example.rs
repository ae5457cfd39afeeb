//! Built-in example upstreams: an HTTP echo server and a gRPC echo service.
//!
//! The quick-start demo runs them so that Breakwater has something real to
//! proxy without any external service, and the test suite uses the gRPC one
//! as a peer for every streaming kind.
//!
//! The gRPC service honours two request metadata keys, so that callers can
//! script failures: `x-echo-status: <code>` answers that gRPC status (with
//! `x-echo-message` as its message; a server stream sends its messages
//! first and the status in its trailers), and every `x-echo-*` key is
//! echoed back as response metadata.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::{Code, Status, Streaming};

use crate::body::{self, Body};
use crate::echo::echo_server::{Echo, EchoServer};
use crate::echo::{EchoReply, EchoRequest};

/// Largest gRPC message the example service accepts and sends.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Counters shared by an [`EchoService`] and whoever started it.
#[derive(Debug, Default)]
pub struct EchoStats {
    /// Calls received, of every kind.
    pub calls: AtomicUsize,
    /// Server streams that were dropped before they finished: the caller
    /// cancelled or went away.
    pub cancelled: AtomicUsize,
}

/// The gRPC echo service.
#[derive(Debug, Clone, Default)]
pub struct EchoService {
    /// Counters, shared with the caller.
    pub stats: Arc<EchoStats>,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

impl EchoService {
    /// Counts the call and answers the scripted status, if any.
    fn begin(&self, metadata: &MetadataMap) -> Result<(), Status> {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        scripted_status(metadata).map_or(Ok(()), Err)
    }

    fn reply<T>(metadata: &MetadataMap, message: T) -> tonic::Response<T> {
        let mut response = tonic::Response::new(message);
        echo_metadata(metadata, response.metadata_mut());
        response
    }
}

/// The status asked for by `x-echo-status` / `x-echo-message`.
fn scripted_status(metadata: &MetadataMap) -> Option<Status> {
    let code = metadata.get("x-echo-status")?;
    let code = code
        .to_str()
        .ok()
        .and_then(|c| c.parse::<i32>().ok())
        .unwrap_or(2);
    let message = metadata
        .get("x-echo-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or("scripted failure");
    Some(Status::new(Code::from_i32(code), message))
}

/// Copies `x-echo-*` request metadata into the response metadata.
fn echo_metadata(from: &MetadataMap, to: &mut MetadataMap) {
    for key in from.keys() {
        if let tonic::metadata::KeyRef::Ascii(key) = key
            && key.as_str().starts_with("x-echo-")
            && let Some(value) = from.get(key.as_str())
        {
            to.insert(key.clone(), value.clone());
        }
    }
}

/// Marks a server stream as cancelled if it is dropped before its end.
struct CancelGuard {
    stats: Arc<EchoStats>,
    finished: bool,
}

impl CancelGuard {
    fn finish(&mut self, done: bool) {
        self.finished = done;
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, Status> {
        self.begin(request.metadata())?;
        let metadata = request.metadata().clone();
        let message = request.into_inner();
        let total_bytes = message.payload.len() as u64;
        Ok(Self::reply(
            &metadata,
            EchoReply {
                payload: message.payload,
                count: 1,
                total_bytes,
            },
        ))
    }

    async fn client_stream(
        &self,
        request: tonic::Request<Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<EchoReply>, Status> {
        self.begin(request.metadata())?;
        let metadata = request.metadata().clone();
        let mut stream = request.into_inner();
        let (mut count, mut total_bytes) = (0, 0);
        while let Some(message) = stream.message().await? {
            count += 1;
            total_bytes += message.payload.len() as u64;
        }
        Ok(Self::reply(
            &metadata,
            EchoReply {
                payload: Bytes::new(),
                count,
                total_bytes,
            },
        ))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<ReplyStream>, Status> {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let metadata = request.metadata().clone();
        let message = request.into_inner();
        let mut guard = CancelGuard {
            stats: self.stats.clone(),
            finished: false,
        };
        let interval = Duration::from_millis(message.interval_ms.into());
        let stream = async_stream(message, interval, move |done| guard.finish(done));
        // A scripted status comes after the messages, in the trailers.
        let end = scripted_status(&metadata).filter(|s| s.code() != Code::Ok);
        let stream = stream.chain(tokio_stream::iter(end.map(Err)));
        Ok(Self::reply(&metadata, Box::pin(stream) as ReplyStream))
    }

    type BidiStreamStream = ReplyStream;

    async fn bidi_stream(
        &self,
        request: tonic::Request<Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<ReplyStream>, Status> {
        self.begin(request.metadata())?;
        let metadata = request.metadata().clone();
        let mut count = 0u32;
        let mut total_bytes = 0u64;
        let stream = request.into_inner().map(move |message| {
            let message = message?;
            count += 1;
            total_bytes += message.payload.len() as u64;
            Ok(EchoReply {
                payload: message.payload,
                count,
                total_bytes,
            })
        });
        Ok(Self::reply(&metadata, Box::pin(stream) as ReplyStream))
    }
}

/// `repeat` replies, `interval` apart; `on_end(true)` once the last is out.
fn async_stream(
    message: EchoRequest,
    interval: Duration,
    mut on_end: impl FnMut(bool) + Send + 'static,
) -> ReplyStream {
    let repeat = message.repeat.max(1);
    let payload = message.payload;
    let stream = tokio_stream::iter(1..=repeat).then(move |i| {
        let payload = payload.clone();
        async move {
            if i > 1 && !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            (i, payload)
        }
    });
    let stream = stream.map(move |(i, payload)| {
        if i == repeat {
            on_end(true);
        }
        Ok(EchoReply {
            total_bytes: payload.len() as u64,
            payload,
            count: i,
        })
    });
    Box::pin(stream)
}

/// Serves the gRPC echo service on `listener` until the task is dropped.
pub async fn serve_grpc(
    listener: TcpListener,
    service: EchoService,
) -> Result<(), tonic::transport::Error> {
    let service = EchoServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming(
            tokio_stream::wrappers::TcpListenerStream::new(listener).map(|stream| {
                // Small answers go out at once, not after a delayed ACK.
                let stream = stream?;
                stream.set_nodelay(true)?;
                Ok::<_, std::io::Error>(stream)
            }),
        )
        .await
}

/// Serves the HTTP echo server on `listener` until the task is dropped:
/// every request is answered 200 with its body, and `x-echo-method` /
/// `x-echo-path` headers naming what was asked.
pub async fn serve_http(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(echo_http))
                .await;
        });
    }
}

async fn echo_http(request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let method = request.method().to_string();
    let path = request.uri().path().to_owned();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let mut response = Response::new(body::full(body));
    let headers = response.headers_mut();
    if let Ok(method) = method.parse() {
        headers.insert("x-echo-method", method);
    }
    if let Ok(path) = path.parse() {
        headers.insert("x-echo-path", path);
    }
    Ok(response)
}
