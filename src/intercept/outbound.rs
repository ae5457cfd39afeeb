//! The outbound port's look at each redirected connection, before any
//! HTTP is read: where it was going (`SO_ORIGINAL_DST`) decides.
//!
//! | it was going to | what happens | counted as |
//! |---|---|---|
//! | the sidecar's own port, or not redirected | served as HTTP, routed by `Host` / `:authority` as always | (not counted) |
//! | an upstream's address, in HTTP or h2c | served as HTTP; a request that names no upstream goes to that one | `upstream` |
//! | an upstream's address, in TLS | relayed byte for byte: no policy inside someone else's TLS | `tls-passthrough` |
//! | anywhere else | relayed byte for byte to where it was going; closed with `intercept.unmatched: deny` | `passthrough`, `denied` |
//! | the outbound port itself, redirected | closed: it would loop | `loop` |
//!
//! The relay is not an open proxy: it only ever connects where the
//! agent's own connection was already going. Upstreams' addresses are
//! resolved at start (the start waits 2 seconds for it at most, so that a
//! DNS that does not answer does not hold the agent back), every 30
//! seconds and after each reload, in the background, since Service IPs and
//! DNS answers change; a name that fails to resolve keeps its last
//! addresses.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpStream;

use crate::config::Unmatched;
use crate::telemetry::metrics::Metrics;
use crate::transport::original_dst::original_dst;
use crate::transport::server::{Destination, Divert, Diverted};

/// How often the upstreams' addresses are resolved again.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(30);
/// How long the relay may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection to an upstream's address may take to send its
/// first byte (which tells TLS from HTTP).
const FIRST_BYTE: Duration = Duration::from_secs(30);

/// The look, shared by the outbound port's connections.
pub struct Outbound {
    /// Each upstream address as it resolves, and the upstream's name.
    destinations: ArcSwap<HashMap<SocketAddr, Arc<str>>>,
    /// `intercept.unmatched: deny`: connections going elsewhere are closed.
    deny_unmatched: AtomicBool,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("destinations", &self.destinations.load().len())
            .finish_non_exhaustive()
    }
}

impl Outbound {
    /// A look that knows no upstream address yet ([`Outbound::resolve`]).
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            destinations: ArcSwap::default(),
            deny_unmatched: AtomicBool::new(false),
            metrics,
        }
    }

    /// What becomes of connections going to no upstream's address, as the
    /// live config says.
    pub fn set_unmatched(&self, unmatched: Unmatched) {
        self.deny_unmatched
            .store(unmatched == Unmatched::Deny, Ordering::Relaxed);
    }

    /// Resolves `upstreams` (name, `host:port`) and swaps in what they
    /// resolve to; a name that fails keeps the addresses it had.
    pub async fn resolve(&self, upstreams: &[(Arc<str>, String)]) {
        let before = self.destinations.load_full();
        let mut fresh = HashMap::new();
        for (name, address) in upstreams {
            match tokio::net::lookup_host(address.as_str()).await {
                Ok(addrs) => {
                    for addr in addrs {
                        fresh.entry(addr).or_insert_with(|| name.clone());
                    }
                }
                Err(error) => {
                    tracing::debug!(upstream = %name, %error, "cannot resolve an upstream's address; its last addresses stay");
                    for (addr, owner) in before.iter() {
                        if owner == name {
                            fresh.entry(*addr).or_insert_with(|| name.clone());
                        }
                    }
                }
            }
        }
        self.destinations.store(Arc::new(fresh));
    }

    /// The upstream whose address `addr` is.
    pub fn upstream_at(&self, addr: SocketAddr) -> Option<Arc<str>> {
        self.destinations.load().get(&addr).cloned()
    }

    async fn look(
        self: Arc<Self>,
        stream: TcpStream,
        to: SocketAddr,
    ) -> Option<(TcpStream, Option<Destination>)> {
        let local = stream.local_addr().ok()?;
        if to.port() == local.port() && (to.ip() == local.ip() || to.ip().is_loopback()) {
            self.metrics.intercepted("loop");
            tracing::warn!(%to, "a connection redirected to the outbound port itself was closed: is the sidecar's UID excluded (breakwater init --exclude-uid)?");
            return None;
        }
        let Some(upstream) = self.upstream_at(to) else {
            if self.deny_unmatched.load(Ordering::Relaxed) {
                self.metrics.intercepted("denied");
                tracing::debug!(%to, "a redirected connection to no upstream's address was closed (intercept.unmatched: deny)");
                return None;
            }
            self.relay(stream, to, "passthrough").await;
            return None;
        };
        let mut first = [0u8; 1];
        match tokio::time::timeout(FIRST_BYTE, stream.peek(&mut first)).await {
            Ok(Ok(1..)) => {}
            _ => return None,
        }
        // A TLS ClientHello: the agent speaks TLS to the upstream itself.
        if first[0] == 0x16 {
            self.relay(stream, to, "tls-passthrough").await;
            return None;
        }
        self.metrics.intercepted("upstream");
        Some((stream, Some(Destination(upstream))))
    }

    /// Relays `inbound` to `to`, byte for byte, until either side ends.
    async fn relay(&self, mut inbound: TcpStream, to: SocketAddr, kind: &'static str) {
        let outbound = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to)).await;
        let mut outbound = match outbound {
            Ok(Ok(outbound)) => outbound,
            Ok(Err(error)) => {
                self.metrics.intercepted("connect-failure");
                tracing::debug!(%to, %error, "a redirected connection's destination refused it");
                return;
            }
            Err(_) => {
                self.metrics.intercepted("connect-failure");
                tracing::debug!(%to, "a redirected connection's destination did not answer in time");
                return;
            }
        };
        self.metrics.intercepted(kind);
        let _ = outbound.set_nodelay(true);
        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
    }
}

/// Relays `inbound` (a tunnel's inside) to `address` (`host:port`),
/// until either side ends.
pub async fn relay_to<I>(inbound: &mut I, address: &str)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)).await {
        Ok(Ok(mut outbound)) => {
            let _ = outbound.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(inbound, &mut outbound).await;
        }
        Ok(Err(error)) => tracing::debug!(%address, %error, "a tunnel's upstream refused it"),
        Err(_) => tracing::debug!(%address, "a tunnel's upstream did not answer in time"),
    }
}

/// The look as the accept loop's [`Divert`].
#[derive(Debug, Clone)]
pub struct Look(pub Arc<Outbound>);

impl Divert for Look {
    fn divert(&self, stream: TcpStream) -> Diverted {
        match original_dst(&stream) {
            None => Box::pin(std::future::ready(Some((stream, None)))),
            Some(to) => Box::pin(self.0.clone().look(stream, to)),
        }
    }
}
