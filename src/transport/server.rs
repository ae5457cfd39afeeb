//! Accept loops: serve a listener until told to stop, with every connection
//! watched for a graceful drain.
//!
//! One server builder serves HTTP/1.1 and HTTP/2 with prior knowledge (h2c)
//! on the same port, telling them apart by the connection preface.
//!
//! Every connection is bounded ([`Limits`]): it must send its first byte
//! within the header-read timeout (telling the protocol apart waits for
//! bytes, and a connection that sends none would otherwise hold its file
//! descriptor for ever), HTTP/1.1 must then send each request head within
//! it (hyper's header-read timeout, which also ends a kept-alive
//! connection left idle that long), HTTP/2 peers are pinged and dropped
//! when they stop answering, and the proxy listeners share a number of
//! connection slots: when they are all taken, the accept loop waits for
//! one instead of failing on a full descriptor table, and new connections
//! wait in the kernel's queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use std::convert::Infallible;

use http::{Request, Response};
use hyper::body::Incoming;

use super::pace::{self, PacedExecutor};
use super::tls::server::{Accepted, ServerTls};
use crate::body::Body;

/// Largest request head (request line and headers) accepted over HTTP/1.1,
/// and largest header list over HTTP/2.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// How long a client may take to send a request head, by default.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2 keep-alive: a ping after this long without a frame, and the
/// connection closed when its answer takes longer than the timeout.
const H2_PING_INTERVAL: Duration = Duration::from_secs(60);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// What every accepted connection is held to.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connection slots, shared with other listeners; none: unbounded.
    pub slots: Option<Arc<Semaphore>>,
    /// Connections open now, counted with the other listeners'.
    pub open: Arc<AtomicUsize>,
    /// How long a connection may take to send its first byte, and then
    /// each HTTP/1.1 request head.
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            slots: None,
            open: Arc::default(),
            header_read_timeout: HEADER_READ_TIMEOUT,
        }
    }
}
/// Concurrent HTTP/2 streams per client connection.
const MAX_CONCURRENT_STREAMS: u32 = 1024;
const H2_STREAM_WINDOW: u32 = 2 << 20;
const H2_CONNECTION_WINDOW: u32 = 8 << 20;

/// The HTTP server settings shared by every listener, with the default
/// header-read timeout.
pub fn builder() -> auto::Builder<PacedExecutor> {
    builder_with(HEADER_READ_TIMEOUT)
}

/// The HTTP server settings, with `header_read_timeout`. Every HTTP/2
/// stream runs paced (`pace`): a caller that stops reading an answer has
/// it cut.
pub fn builder_with(header_read_timeout: Duration) -> auto::Builder<PacedExecutor> {
    let mut builder = auto::Builder::new(PacedExecutor);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .keep_alive_interval(Some(H2_PING_INTERVAL))
        .keep_alive_timeout(H2_PING_TIMEOUT)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW);
    builder
}

/// Serves `listener` until `stop` turns true, then closes the listener so
/// new connections are refused. Connections already accepted keep going
/// until `graceful` drains them. With `tls`, each connection's handshake
/// runs in its own task before it is served. Each connection is served by
/// a service `connected` makes for it, and held to `limits`.
pub async fn serve<S, M>(
    listener: TcpListener,
    connected: M,
    builder: auto::Builder<PacedExecutor>,
    graceful: Arc<GracefulShutdown>,
    mut stop: watch::Receiver<bool>,
    tls: Option<ServerTls>,
    limits: Limits,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    M: Fn() -> S,
{
    loop {
        let (stream, slot) = tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => break,
            accepted = accept_within(&listener, limits.slots.as_ref()) => accepted,
        };
        // Watched from its accept: a drain waits for it, and it stops
        // when the drain starts.
        let (tls, builder, service, watcher) = (
            tls.clone(),
            builder.clone(),
            connected(),
            graceful.watcher(),
        );
        let first_byte = limits.header_read_timeout;
        let mut stopping = stop.clone();
        let open = Open::new(&limits.open);
        tokio::spawn(async move {
            let _slot = (slot, open);
            // The protocol is told from the first bytes: a connection
            // that sends none is closed.
            // A drain does not wait for a connection that sent nothing.
            let mut first = [0u8; 1];
            tokio::select! {
                peeked = tokio::time::timeout(first_byte, stream.peek(&mut first)) => {
                    if peeked.is_err() {
                        tracing::debug!("a connection sent nothing within the header-read timeout");
                        return;
                    }
                }
                _ = stopping.wait_for(|stop| *stop) => return,
            }
            let Some(tls) = tls else {
                let connection = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                return drive(watcher.watch(connection)).await;
            };
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
            drive(watcher.watch(connection)).await;
        });
    }
}

/// One open connection, counted while it lives.
struct Open(Arc<AtomicUsize>);

impl Open {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The next connection of `listener` and its slot: waits for a free slot
/// first, so that a full table is a wait, not a failed accept.
async fn accept_within(
    listener: &TcpListener,
    slots: Option<&Arc<Semaphore>>,
) -> (TcpStream, Option<OwnedSemaphorePermit>) {
    let slot = match slots {
        Some(slots) => slots.clone().acquire_owned().await.ok(),
        None => None,
    };
    (accept(listener).await, slot)
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

/// Serves one connection, paced (`pace`): an HTTP/1.1 caller that stops
/// reading an answer has its connection closed. An HTTP/2 connection's
/// answers are sent by its streams' tasks, each paced on its own.
async fn drive<C, E>(connection: C)
where
    C: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    pace::paced(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "connection ended with an error");
        }
    })
    .await;
}
