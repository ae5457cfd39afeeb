//! Accept loops: serve a listener until told to stop, with every connection
//! watched for a graceful drain.
//!
//! One server builder serves HTTP/1.1 and HTTP/2 with prior knowledge (h2c)
//! on the same port, telling them apart by the connection preface.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use std::convert::Infallible;

use http::{Request, Response};
use hyper::body::Incoming;

use super::tls::server::{Accepted, ServerTls};
use crate::body::Body;

/// Largest request head (request line and headers) accepted over HTTP/1.1,
/// and largest header list over HTTP/2.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// How long a client may take to send a request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent HTTP/2 streams per client connection.
const MAX_CONCURRENT_STREAMS: u32 = 1024;
const H2_STREAM_WINDOW: u32 = 2 << 20;
const H2_CONNECTION_WINDOW: u32 = 8 << 20;

/// The HTTP server settings shared by every proxy listener.
pub fn builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW);
    builder
}

/// Serves `listener` until `stop` turns true, then closes the listener so
/// new connections are refused. Connections already accepted keep going
/// until `graceful` drains them. With `tls`, each connection's handshake
/// runs in its own task before it is served.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    builder: auto::Builder<TokioExecutor>,
    graceful: Arc<GracefulShutdown>,
    mut stop: watch::Receiver<bool>,
    tls: Option<ServerTls>,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    loop {
        let stream = tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => break,
            stream = accept(&listener) => stream,
        };
        let Some(tls) = &tls else {
            let connection = builder
                .serve_connection(TokioIo::new(stream), service.clone())
                .into_owned();
            tokio::spawn(drive(graceful.watch(connection)));
            continue;
        };
        let (tls, builder, service, graceful) = (
            tls.clone(),
            builder.clone(),
            service.clone(),
            graceful.clone(),
        );
        tokio::spawn(async move {
            let stream = match tls.accept(stream).await {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::debug!(%error, "TLS handshake failed");
                    return;
                }
            };
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            drive(graceful.watch(connection)).await;
        });
    }
}

/// The connections of `listener`, each handshaken in its own task, as a
/// stream for tonic's server. The accept loop ends when the stream is
/// dropped.
pub fn tls_incoming(
    listener: TcpListener,
    tls: ServerTls,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<Accepted>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                () = tx.closed() => break,
                stream = accept(&listener) => stream,
            };
            let (tls, tx) = (tls.clone(), tx.clone());
            tokio::spawn(async move {
                match tls.accept(stream).await {
                    Ok(accepted) => {
                        let _ = tx.send(Ok(accepted)).await;
                    }
                    Err(error) => tracing::debug!(%error, "TLS handshake failed"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The next connection of `listener`, with `TCP_NODELAY`. A failed accept
/// (out of file descriptors, a connection reset before it was accepted)
/// is logged and retried after a short pause instead of spinning.
async fn accept(listener: &TcpListener) -> TcpStream {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                return stream;
            }
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn drive<C, E>(connection: C)
where
    C: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    if let Err(error) = connection.await {
        tracing::debug!(%error, "connection ended with an error");
    }
}
