//! A lean HTTP/2 client for one upstream: one multiplexed connection,
//! shared by every request, re-established when it closes.
//!
//! Why not hyper-util's pooled client, as for HTTP/1.1? For HTTP/2 its pool
//! adds a checkout, a lock and a large future to every request, and the
//! benchmark showed the cost. An HTTP/2 upstream needs no pool: one
//! connection carries every concurrent stream, and a request only has to
//! clone the connection's sender.
//!
//! A request that could not be handed to a closing connection (it was
//! never sent) is resent once on a fresh connection, as the pooled client
//! does; a request that reached the connection is never resent here.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2::{Builder, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::tls::Tls;
use crate::body::{Body, BoxError};

/// Why a request got no response.
#[derive(Debug)]
pub enum H2Error {
    /// No connection could be made; nothing was sent.
    Connect(BoxError),
    /// The request or its connection failed after it was sent.
    Request(hyper::Error),
}

/// One upstream's HTTP/2 connection.
#[derive(Debug)]
pub struct H2Client {
    address: Authority,
    connect_timeout: Duration,
    builder: Builder<TokioExecutor>,
    /// The connection in use, with a number that tells connections apart:
    /// read with one atomic load per request, no lock.
    current: ArcSwapOption<(u64, SendRequest<Body>)>,
    generation: std::sync::atomic::AtomicU64,
    connecting: tokio::sync::Mutex<()>,
    tls: Option<Tls>,
}

impl H2Client {
    /// A client for `address`; it connects on the first request.
    pub fn new(
        address: Authority,
        connect_timeout: Duration,
        stream_window: u32,
        connection_window: u32,
        tls: Option<Tls>,
    ) -> Self {
        let mut builder = Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .initial_stream_window_size(stream_window)
            .initial_connection_window_size(connection_window)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(false);
        Self {
            address,
            connect_timeout,
            builder,
            current: ArcSwapOption::empty(),
            generation: std::sync::atomic::AtomicU64::new(0),
            connecting: tokio::sync::Mutex::new(()),
            tls,
        }
    }

    /// Sends a request on the shared connection.
    pub async fn send(&self, request: Request<Body>) -> Result<Response<Incoming>, H2Error> {
        let (generation, mut sender) = self.sender().await?;
        match sender.try_send_request(request).await {
            Ok(response) => Ok(response),
            Err(mut error) => match error.take_message() {
                // The connection closed before taking the request: it was
                // never sent, so one more try on a new connection is safe.
                Some(request) => {
                    self.forget(generation);
                    let (_, mut sender) = self.sender().await?;
                    sender.send_request(request).await.map_err(H2Error::Request)
                }
                None => Err(H2Error::Request(error.into_error())),
            },
        }
    }

    fn cached(&self) -> Option<(u64, SendRequest<Body>)> {
        self.current
            .load()
            .as_deref()
            .filter(|(_, s)| !s.is_closed())
            .cloned()
    }

    /// Drops the cached connection if it is still the one numbered
    /// `generation` (another task may have replaced it already).
    fn forget(&self, generation: u64) {
        self.current.rcu(|current| match current {
            Some(c) if c.0 == generation => None,
            other => other.clone(),
        });
    }

    async fn sender(&self) -> Result<(u64, SendRequest<Body>), H2Error> {
        if let Some(cached) = self.cached() {
            return Ok(cached);
        }
        // One task connects; the others wait for its connection.
        let _connecting = self.connecting.lock().await;
        if let Some(cached) = self.cached() {
            return Ok(cached);
        }
        // Boxed: connecting (TCP, TLS, the HTTP/2 handshake) is rare, and
        // its future, inline, would make every request's future kilobytes
        // larger (moving it costs memcpy on every call).
        let sender = Box::pin(self.connect()).await.map_err(H2Error::Connect)?;
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.current
            .store(Some(Arc::new((generation, sender.clone()))));
        Ok((generation, sender))
    }

    async fn connect(&self) -> Result<SendRequest<Body>, BoxError> {
        let address = self.address.as_str();
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(address))
            .await
            .map_err(|_| format!("timed out after {:?}", self.connect_timeout))??;
        stream.set_nodelay(true)?;
        match &self.tls {
            None => self.handshake(TokioIo::new(stream)).await,
            Some(tls) => {
                let stream = tokio::time::timeout(self.connect_timeout, tls.connect(stream))
                    .await
                    .map_err(|_| {
                        format!(
                            "the TLS handshake timed out after {:?}",
                            self.connect_timeout
                        )
                    })??;
                self.handshake(TokioIo::new(stream)).await
            }
        }
    }

    /// The HTTP/2 handshake on a connected stream; the connection is then
    /// driven by its own task.
    async fn handshake<T>(&self, io: T) -> Result<SendRequest<Body>, BoxError>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (sender, connection) = self.builder.handshake(io).await?;
        let address = self.address.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%address, %error, "upstream HTTP/2 connection closed");
            }
        });
        Ok(sender)
    }
}
