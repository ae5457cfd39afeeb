//! The outbound port's look at each redirected connection, before any
//! HTTP is read: where it was going (`SO_ORIGINAL_DST`) decides.
//!
//! | it was going to | what happens | counted as |
//! |---|---|---|
//! | the sidecar's own port, or not redirected | served as HTTP, routed by `Host` / `:authority` as always | (not counted) |
//! | an upstream's address, in HTTP or h2c | served as HTTP; a request that names no upstream goes to that one | `upstream` |
//! | an upstream, in TLS: by its server name (`sni`), else its address | relayed byte for byte to where it was going, under the upstream's connect policy (attempts, breaker): no policy inside someone else's TLS | `tls-passthrough`; `connect-failure`, `circuit-open` |
//! | anywhere else | relayed byte for byte to where it was going; closed with `intercept.unmatched: deny` | `passthrough`, `denied` |
//! | the outbound port itself, redirected | closed: it would loop | `loop` |
//!
//! The relay is not an open proxy: it only ever connects where the
//! agent's own connection was already going. A TLS connection is read for
//! its server name only on the port of an upstream that declares `sni`
//! (or at an upstream's address): elsewhere the sidecar never waits for a
//! caller's first byte, since some servers speak first. Upstreams' addresses are
//! resolved at start (the start waits 2 seconds for it at most, so that a
//! DNS that does not answer does not hold the agent back), every 30
//! seconds and after each reload, in the background, since Service IPs and
//! DNS answers change; a name that fails to resolve keeps its last
//! addresses.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::{Config, Unmatched};
use crate::resilience::connect::{self, CONNECT_TIMEOUT, ConnectError};
use crate::telemetry::metrics::Metrics;
use crate::transport::original_dst::original_dst;
use crate::transport::server::{Destination, Divert, Diverted};
use crate::transport::sni;
use crate::upstream::Upstream;

/// How often the upstreams' addresses are resolved again.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(30);
/// How long a connection may take to send its first byte (which tells TLS
/// from HTTP), and its whole first TLS record.
const FIRST_BYTE: Duration = Duration::from_secs(30);

/// Finds a live upstream by name.
pub type Find = Arc<dyn Fn(&str) -> Option<Arc<Upstream>> + Send + Sync>;

/// What the live config says of redirected connections.
#[derive(Debug, Default)]
struct Routing {
    /// Connections going to no upstream's address are closed.
    deny_unmatched: bool,
    /// Each upstream's server names (`sni`).
    sni: HashMap<String, Arc<str>>,
    /// The ports of upstreams with server names: a TLS connection to one
    /// of them is read for its name, wherever it was going.
    sni_ports: HashSet<u16>,
}

/// The look, shared by the outbound port's connections.
pub struct Outbound {
    /// Each upstream address as it resolves, and the upstream's name.
    destinations: ArcSwap<HashMap<SocketAddr, Arc<str>>>,
    routing: ArcSwap<Routing>,
    find: Find,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("destinations", &self.destinations.load().len())
            .field("routing", &self.routing.load())
            .finish_non_exhaustive()
    }
}

impl Outbound {
    /// A look that knows no upstream address yet ([`Outbound::resolve`]);
    /// `find` gives the live upstreams, whose connect policy applies to
    /// the TLS connections routed to them.
    pub fn new(metrics: Arc<Metrics>, find: Find) -> Self {
        Self {
            destinations: ArcSwap::default(),
            routing: ArcSwap::default(),
            find,
            metrics,
        }
    }

    /// Takes what the live config says: `intercept.unmatched` and the
    /// upstreams' server names.
    pub fn configure(&self, config: &Config) {
        let mut routing = Routing {
            deny_unmatched: config.intercept.unmatched == Unmatched::Deny,
            ..Routing::default()
        };
        for upstream in config.upstreams.iter().filter(|u| !u.sni.is_empty()) {
            for name in &upstream.sni {
                routing.sni.insert(name.clone(), upstream.name.clone());
            }
            routing
                .sni_ports
                .insert(upstream.address.port_u16().unwrap_or(443));
        }
        self.routing.store(Arc::new(routing));
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
        let upstream = self.upstream_at(to);
        // Only where an upstream may be found does the sidecar wait for the
        // caller's first byte: elsewhere the server may speak first.
        if upstream.is_none() && !self.routing.load().sni_ports.contains(&to.port()) {
            self.elsewhere(stream, to, Vec::new()).await;
            return None;
        }
        let mut first = [0u8; 1];
        match tokio::time::timeout(FIRST_BYTE, stream.peek(&mut first)).await {
            Ok(Ok(1..)) => {}
            _ => return None,
        }
        // A TLS ClientHello: the agent speaks TLS to the upstream itself.
        if first[0] == 0x16 {
            self.tls(stream, to, upstream).await;
            return None;
        }
        let Some(upstream) = upstream else {
            self.elsewhere(stream, to, Vec::new()).await;
            return None;
        };
        self.metrics.intercepted("upstream");
        Some((stream, Some(Destination(upstream))))
    }

    /// A TLS connection: to the upstream its server name names, else to
    /// the upstream at its destination, under that upstream's connect
    /// policy; else as any connection going elsewhere.
    async fn tls(&self, mut stream: TcpStream, to: SocketAddr, at: Option<Arc<str>>) {
        let mut hello = Vec::with_capacity(2048);
        let read = sni::read_first_record(&mut stream, &mut hello);
        let name = match tokio::time::timeout(FIRST_BYTE, read).await {
            Ok(Ok(true)) => sni::server_name(&hello),
            Ok(Ok(false)) => None,
            Ok(Err(_)) | Err(_) => return,
        };
        let routing = self.routing.load();
        let named = name.as_deref().and_then(|n| routing.sni.get(n)).cloned();
        let Some(upstream) = named.or(at).and_then(|name| (self.find)(&name)) else {
            drop(routing);
            self.elsewhere(stream, to, hello).await;
            return;
        };
        drop(routing);
        match connect::connect(to, upstream.connect_policy()).await {
            Ok(outbound) => {
                self.metrics.intercepted("tls-passthrough");
                splice(stream, outbound, &hello).await;
            }
            Err(error) => self.refused(&error, to),
        }
    }

    /// A connection going to no upstream: relayed to where it was going,
    /// after `sent` (what was read of it), or closed under
    /// `intercept.unmatched: deny`.
    async fn elsewhere(&self, inbound: TcpStream, to: SocketAddr, sent: Vec<u8>) {
        if self.routing.load().deny_unmatched {
            self.metrics.intercepted("denied");
            tracing::debug!(%to, "a redirected connection to no upstream's address was closed (intercept.unmatched: deny)");
            return;
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to)).await {
            Ok(Ok(outbound)) => {
                self.metrics.intercepted("passthrough");
                let _ = outbound.set_nodelay(true);
                splice(inbound, outbound, &sent).await;
            }
            Ok(Err(error)) => {
                self.metrics.intercepted("connect-failure");
                tracing::debug!(%to, %error, "a redirected connection's destination refused it");
            }
            Err(_) => {
                self.metrics.intercepted("connect-failure");
                tracing::debug!(%to, "a redirected connection's destination did not answer in time");
            }
        }
    }

    fn refused(&self, error: &ConnectError, to: SocketAddr) {
        let kind = match error {
            ConnectError::CircuitOpen(_) => "circuit-open",
            ConnectError::Failed { .. } => "connect-failure",
        };
        self.metrics.intercepted(kind);
        tracing::debug!(%to, %error, "a redirected TLS connection was closed");
    }
}

/// Sends `sent` on, then relays both ways until either side ends.
async fn splice<I, O>(mut inbound: I, mut outbound: O, sent: &[u8])
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    O: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if !sent.is_empty() && outbound.write_all(sent).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
}

/// Relays `inbound` (a tunnel's inside, in TLS) to `upstream`'s address
/// under its connect policy, until either side ends.
pub async fn relay_to<I>(inbound: I, upstream: &Upstream)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let address = upstream.config.address.as_str();
    let to = match tokio::net::lookup_host(address).await.map(|mut a| a.next()) {
        Ok(Some(to)) => to,
        Ok(None) | Err(_) => {
            tracing::debug!(%address, "a tunnel's upstream does not resolve");
            return;
        }
    };
    match connect::connect(to, upstream.connect_policy()).await {
        Ok(outbound) => splice(inbound, outbound, &[]).await,
        Err(error) => tracing::debug!(%address, %error, "a tunnel's upstream cannot be reached"),
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
