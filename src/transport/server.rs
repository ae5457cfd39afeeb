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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulConnection, GracefulShutdown};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use std::convert::Infallible;

use http::{Request, Response};
use hyper::body::Incoming;

use super::pace;
use super::tls::server::{Accepted, ServerTls};
use crate::body::Body;

/// Largest request head (request line and headers) accepted over HTTP/1.1,
/// and largest header list over HTTP/2.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// How long a client may take to send a request head, by default.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection may stay open with no call in flight, by
/// default: Envoy's.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// HTTP/2 keep-alive: a ping after this long without a frame, and the
/// connection closed when its answer takes longer than the timeout.
const H2_PING_INTERVAL: Duration = Duration::from_secs(60);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// The upstream a redirected connection was going to: put in each of its
/// requests' extensions, for routing when a request names no upstream.
#[derive(Debug, Clone)]
pub struct Destination(pub Arc<str>);

/// What [`Divert::divert`] answers: `None` when it took the connection,
/// else the connection to serve, with its destination if known.
pub type Diverted = std::pin::Pin<
    Box<dyn std::future::Future<Output = Option<(TcpStream, Option<Destination>)>> + Send>,
>;

/// A look at each accepted connection before it is served as HTTP: it may
/// take the connection (relay or close it), or hand it back with the
/// upstream it was going to.
pub trait Divert: Send + Sync + 'static {
    /// Takes `stream`, or gives it back to be served.
    fn divert(&self, stream: TcpStream) -> Diverted;
}

/// A [`Divert`], shared by a listener's connections.
#[derive(Clone)]
pub struct Diverter(pub Arc<dyn Divert>);

impl std::fmt::Debug for Diverter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Diverter")
    }
}

/// A service that puts the connection's [`Destination`] in each request.
#[derive(Clone)]
struct Hinted<S> {
    inner: S,
    destination: Option<Destination>,
}

impl<S> hyper::service::Service<Request<Incoming>> for Hinted<S>
where
    S: hyper::service::Service<Request<Incoming>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        if let Some(destination) = &self.destination {
            request.extensions_mut().insert(destination.clone());
        }
        self.inner.call(request)
    }
}

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
    /// How long a connection may stay open with no call in flight; none:
    /// as long as it likes.
    pub idle_timeout: Option<Duration>,
    /// A look at each connection before it is served (interception).
    pub divert: Option<Diverter>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            slots: None,
            open: Arc::default(),
            header_read_timeout: HEADER_READ_TIMEOUT,
            idle_timeout: Some(IDLE_TIMEOUT),
            divert: None,
        }
    }
}
/// Concurrent HTTP/2 streams per client connection.
const MAX_CONCURRENT_STREAMS: u32 = 1024;
const H2_STREAM_WINDOW: u32 = 2 << 20;
const H2_CONNECTION_WINDOW: u32 = 8 << 20;

/// The HTTP server settings shared by every listener, with the default
/// header-read timeout.
pub fn builder() -> auto::Builder<StreamExecutor> {
    builder_with(HEADER_READ_TIMEOUT)
}

/// The HTTP server settings, with `header_read_timeout`. Every HTTP/2
/// stream runs paced (`pace`): a caller that stops reading an answer has
/// it cut.
pub fn builder_with(header_read_timeout: Duration) -> auto::Builder<StreamExecutor> {
    let mut builder = auto::Builder::new(StreamExecutor);
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
/// runs in its own task before it is served. Each connection is held to
/// `limits`.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    builder: auto::Builder<StreamExecutor>,
    graceful: Arc<GracefulShutdown>,
    mut stop: watch::Receiver<bool>,
    tls: Option<ServerTls>,
    limits: Limits,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
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
            service.clone(),
            graceful.watcher(),
        );
        let (first_byte, idle) = (limits.header_read_timeout, limits.idle_timeout);
        let divert = limits.divert.clone();
        let mut stopping = stop.clone();
        let open = Open::new(&limits.open);
        tokio::spawn(async move {
            let _held = (slot, open, watcher);
            let (stream, destination) = match divert {
                None => (stream, None),
                Some(divert) => match divert.0.divert(stream).await {
                    Some(kept) => kept,
                    None => return,
                },
            };
            let service = Hinted {
                inner: service,
                destination,
            };
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
                let connection =
                    builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                return drive(connection, stopping, idle).await;
            };
            let stream = match tls.accept(stream).await {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::debug!(%error, "TLS handshake failed");
                    return;
                }
            };
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            drive(connection, stopping, idle).await;
        });
    }
}

/// Serves HTTP on the inside of a tunnel (a `CONNECT`'s), each request
/// marked with the upstream the tunnel was opened to, until the caller
/// closes it.
pub async fn serve_inside<I, S>(io: I, service: S, destination: Destination)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let service = Hinted {
        inner: service,
        destination: Some(destination),
    };
    if let Err(error) = builder().serve_connection(TokioIo::new(io), service).await {
        tracing::debug!(%error, "a tunnel's connection ended with an error");
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

/// Serves one connection until it ends: paced (`pace`), so that an
/// HTTP/1.1 caller that stops reading an answer has its connection closed
/// (an HTTP/2 connection's answers are sent by its streams' tasks, each
/// paced on its own); shut down gracefully when the drain starts
/// (`stopping`: idle HTTP/1.1 connections close, HTTP/2 ones get a GOAWAY
/// and finish their open streams) or when it has had no call open for
/// `idle` (checked every `idle`, so after one to two of them).
async fn drive<C>(connection: C, mut stopping: watch::Receiver<bool>, idle: Option<Duration>)
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let streams = Arc::new(Streams::default());
    let served = pace::paced(async move {
        tokio::pin!(connection);
        let period = idle.unwrap_or(Duration::MAX);
        let timer = tokio::time::sleep(period.min(FAR));
        tokio::pin!(timer);
        let (mut closing, mut seen) = (false, 0);
        loop {
            tokio::select! {
                biased;
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                    return;
                }
                _ = stopping.wait_for(|stop| *stop), if !closing => {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                () = timer.as_mut(), if !closing && idle.is_some() => {
                    let (open, started) = STREAMS.with(|s| s.now());
                    if open == 0 && started == seen {
                        tracing::debug!(after = ?period, "a connection with no call open: closed");
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                    } else {
                        seen = started;
                        timer.as_mut().reset(tokio::time::Instant::now() + period);
                    }
                }
            }
        }
    });
    STREAMS.scope(streams, served).await;
}

/// Longer than any connection lives: the idle timer of a connection
/// without an idle timeout.
const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

tokio::task_local! {
    /// The streams of the connection whose task this is.
    static STREAMS: Arc<Streams>;
    /// The HTTP/2 stream whose task this is.
    static STREAM: Stream;
}

/// The HTTP/2 streams of one connection: open now, started so far, and
/// what they hold of each upstream's slots.
#[derive(Debug, Default)]
struct Streams {
    open: AtomicUsize,
    started: AtomicUsize,
    /// A semaphore of the connection's share per upstream (keyed by the
    /// upstream's slots), made at its first call there.
    shares: Mutex<Vec<(usize, Arc<Semaphore>)>>,
}

impl Streams {
    fn now(&self) -> (usize, usize) {
        (
            self.open.load(Ordering::Relaxed),
            self.started.load(Ordering::Relaxed),
        )
    }

    /// A place in the share `key` names, which holds `share` places.
    fn take(&self, key: usize, share: u32) -> Option<OwnedSemaphorePermit> {
        let mut shares = self.shares.lock().unwrap_or_else(|e| e.into_inner());
        let semaphore = match shares.iter().find(|(k, _)| *k == key) {
            Some((_, semaphore)) => semaphore.clone(),
            None => {
                // Shares nothing holds (of upstreams no longer called, or
                // that a reload replaced) are forgotten.
                shares.retain(|(_, s)| Arc::strong_count(s) > 1);
                let semaphore = Arc::new(Semaphore::new(share as usize));
                shares.push((key, semaphore.clone()));
                semaphore
            }
        };
        drop(shares);
        semaphore.try_acquire_owned().ok()
    }
}

/// One HTTP/2 stream of a connection, counted open while its task lives,
/// with the places it holds in its connection's shares.
struct Stream {
    connection: Arc<Streams>,
    /// The first place taken (most streams take one), then any more (a
    /// failover to another upstream).
    held: std::cell::RefCell<(Option<OwnedSemaphorePermit>, Vec<OwnedSemaphorePermit>)>,
}

impl Stream {
    /// A stream just started on `connection`.
    fn new(connection: &Arc<Streams>) -> Self {
        connection.open.fetch_add(1, Ordering::Relaxed);
        connection.started.fetch_add(1, Ordering::Relaxed);
        Self {
            connection: connection.clone(),
            held: Default::default(),
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.connection.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Takes a place in the share of the slots `key` names (`share` places at
/// most) that the HTTP/2 connection of the running task may hold, until
/// the stream's task ends (its answer sent, or cut). `None` outside an
/// HTTP/2 stream's task: an HTTP/1.1 connection carries one call at a
/// time, and has nothing to count. `Some(false)`: the connection holds its
/// whole share.
pub fn take_share(key: usize, share: u32) -> Option<bool> {
    STREAM
        .try_with(|stream| {
            let Some(place) = stream.connection.take(key, share) else {
                return false;
            };
            let mut held = stream.held.borrow_mut();
            match held.0 {
                None => held.0 = Some(place),
                Some(_) => held.1.push(place),
            }
            true
        })
        .ok()
}

/// The executor of the HTTP/2 server, whose tasks are its streams: each
/// runs paced (`pace`) and counted as open on its connection. hyper spawns
/// a stream while it polls its connection, so the connection's task-local
/// is there to count it in.
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamExecutor;

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        let Ok(stream) = STREAMS.try_with(Stream::new) else {
            tokio::spawn(pace::paced(future));
            return;
        };
        tokio::spawn(STREAM.scope(stream, pace::paced(future)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_holds_its_share_of_each_upstream_and_forgets_unused_ones() {
        let connection = Arc::new(Streams::default());
        let a = connection.take(1, 2).unwrap();
        let b = connection.take(1, 2).unwrap();
        assert!(connection.take(1, 2).is_none(), "a share of two");
        assert!(connection.take(2, 1).is_some(), "each upstream its own");
        drop(a);
        assert!(connection.take(1, 2).is_some(), "a place given back");
        drop(b);
        let _c = connection.take(3, 1).unwrap();
        let keys: Vec<usize> = connection
            .shares
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.0)
            .collect();
        assert_eq!(keys, [3], "shares nothing holds are forgotten");
    }

    #[test]
    fn a_stream_holds_its_places_until_it_ends() {
        assert_eq!(take_share(5, 1), None, "not in a stream's task");
        let connection = Arc::new(Streams::default());
        STREAM.sync_scope(Stream::new(&connection), || {
            assert_eq!(take_share(5, 1), Some(true));
            assert_eq!(take_share(5, 1), Some(false), "held by this stream");
            assert_eq!(take_share(6, 1), Some(true), "a failover's, beside it");
            assert_eq!(connection.now(), (1, 1));
        });
        assert_eq!(connection.now(), (0, 1), "the stream ended");
        assert!(connection.take(5, 1).is_some() && connection.take(6, 1).is_some());
    }
}
