//! A running sidecar's listeners and reloads: what binds and serves each
//! proxy listener, swaps in a new generation, resolves the upstreams'
//! addresses for the outbound port, and drains what a reload dropped.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, watch as signal};
use tokio::task::JoinHandle;

use super::dead_letter::DeadLetters;
use super::{BindError, Live, LiveCell, ProxyService, ReloadError, ReloadStatus, Target};
use crate::config::Config;
use crate::intercept::outbound::{Look, Outbound, RESOLVE_EVERY};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::traces::Tracing;
use crate::transport::server;

/// A listener being served.
#[derive(Debug)]
pub(super) struct Listener {
    /// The address asked for (port 0: any).
    pub(super) configured: SocketAddr,
    /// The address bound.
    pub(super) local: SocketAddr,
    pub(super) stop: signal::Sender<bool>,
    pub(super) graceful: Arc<GracefulShutdown>,
    /// Its accept loops: one, and a second on the IPv6 loopback for the
    /// shared port (see [`Control::listen`]).
    pub(super) accept: Vec<JoinHandle<()>>,
}

impl Listener {
    /// Stops accepting, then lets open connections finish within
    /// `grace_period`.
    pub(super) async fn close(self, grace_period: Duration) {
        let _ = self.stop.send(true);
        for accept in self.accept {
            let _ = accept.await;
        }
        drain(self.graceful, grace_period).await;
    }
}

/// What a running sidecar needs to reload and to stop.
#[derive(Debug)]
pub(super) struct Control {
    pub(super) live: LiveCell,
    pub(super) metrics: Arc<Metrics>,
    pub(super) listeners: Mutex<BTreeMap<Target, Listener>>,
    pub(super) builder: auto::Builder<server::StreamExecutor>,
    /// What every caller connection is held to, from `proxy` as started.
    pub(super) connections: Connections,
    pub(super) grace_period: Duration,
    pub(super) tracing: Option<Tracing>,
    pub(super) dead_letters: Option<Arc<DeadLetters>>,
    /// `control_plane` and `dead_letters` as started: the spool and the
    /// shipper are not rebuilt by a reload.
    pub(super) letters_config: (
        Option<crate::config::ControlPlaneConfig>,
        crate::config::DeadLettersConfig,
    ),
    pub(super) status: signal::Sender<ReloadStatus>,
    pub(super) stop: signal::Sender<bool>,
    /// Where redirected connections were going (interception).
    pub(super) outbound: Arc<Outbound>,
}

/// Each upstream's name and address, for the outbound port to resolve.
pub(super) fn addresses(live: &Live) -> Vec<(Arc<str>, String)> {
    live.upstreams()
        .iter()
        .map(|u| (u.config.name.clone(), u.config.address.to_string()))
        .collect()
}

impl Control {
    /// Binds and serves a listener for `target`. The shared port on the
    /// IPv4 loopback also listens on the IPv6 loopback, on the same port,
    /// where it can: `ip6tables` redirects a pod's IPv6 connections to
    /// `[::1]`, as `iptables` redirects its IPv4 ones to `127.0.0.1`.
    pub(super) async fn listen(
        &self,
        target: &Target,
        addr: SocketAddr,
    ) -> Result<Listener, BindError> {
        let listener = bind(target.to_string(), addr).await?;
        let local = local_addr(&listener);
        let (stop, stop_rx) = signal::channel(false);
        let graceful = Arc::new(GracefulShutdown::new());
        let service = ProxyService::new(
            target.clone(),
            self.live.clone(),
            self.metrics.clone(),
            self.tracing.clone(),
            self.dead_letters.clone(),
        );
        let mut limits = self.connections.limits();
        if *target == Target::Shared {
            limits.divert = Some(server::Diverter(Arc::new(Look(self.outbound.clone()))));
        }
        let mut accept = Vec::new();
        if *target == Target::Shared && local.ip() == std::net::Ipv4Addr::LOCALHOST {
            let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, local.port()));
            match TcpListener::bind(v6).await {
                Ok(also) => accept.push(tokio::spawn(server::serve(
                    also,
                    service.clone(),
                    self.builder.clone(),
                    graceful.clone(),
                    stop_rx.clone(),
                    None,
                    limits.clone(),
                ))),
                // No IPv6 here: nothing to redirect there either.
                Err(error) if error.kind() == std::io::ErrorKind::AddrNotAvailable => {
                    tracing::debug!(%v6, %error, "no IPv6 loopback");
                }
                Err(error) => {
                    tracing::warn!(%v6, %error, "the shared port cannot listen on the IPv6 loopback: redirected IPv6 connections will be refused")
                }
            }
        }
        accept.push(tokio::spawn(server::serve(
            listener,
            service,
            self.builder.clone(),
            graceful.clone(),
            stop_rx,
            None,
            limits,
        )));
        Ok(Listener {
            configured: addr,
            local,
            stop,
            graceful,
            accept,
        })
    }

    /// Swaps in `config` (see [`Sidecar::reload`]).
    pub(super) async fn reload(&self, config: Config) -> Result<u64, ReloadError> {
        let mut listeners = self.listeners.lock().await;
        let current = self.live.load_full();
        self.warn_of_restart_only(&config, &current.config);
        let wanted = listen_addrs(&config);
        let bound = self.bind_new(&listeners, &wanted).await?;
        let generation = current.generation + 1;
        let removed: Vec<String> = current
            .upstreams()
            .iter()
            .filter(|u| config.upstream(&u.config.name).is_none())
            .map(|u| u.config.name.to_string())
            .collect();
        let live = Live::build(config, generation, &self.metrics, Some(&current));
        // Routes' own circuits that are gone, so that none lingers open.
        let circuits = |live: &Live| -> Vec<(Arc<str>, Arc<str>)> {
            live.upstreams()
                .iter()
                .flat_map(|u| {
                    u.routes()
                        .iter()
                        .filter(|r| r.own_breaker().is_some())
                        .map(|r| (u.config.name.clone(), r.config.name.clone()))
                })
                .collect()
        };
        let kept = circuits(&live);
        for (upstream, route) in circuits(&current) {
            if !kept.contains(&(upstream.clone(), route.clone())) {
                self.metrics.forget_route(&upstream, &route);
            }
        }
        let source = live.config.source.clone();
        let upstreams = addresses(&live);
        self.outbound.configure(&live.config);
        self.live.store(Arc::new(live));
        // In the background: a name whose DNS does not answer must not
        // hold the reload's answer back.
        let outbound = self.outbound.clone();
        tokio::spawn(async move { outbound.resolve(&upstreams).await });
        for name in &removed {
            self.metrics.forget(name);
        }
        let mut retired = Vec::new();
        for (target, listener) in bound {
            retired.extend(listeners.insert(target, listener));
        }
        let gone: Vec<Target> = listeners
            .keys()
            .filter(|t| !wanted.contains_key(*t))
            .cloned()
            .collect();
        for target in gone {
            retired.extend(listeners.remove(&target));
        }
        drop(listeners);
        for listener in retired {
            tracing::info!(addr = %listener.local, "closing a listener the new config dropped");
            tokio::spawn(listener.close(self.grace_period));
        }
        self.metrics.config_loaded(generation);
        self.status.send_modify(|s| s.generation = generation);
        tracing::info!(generation, config = %source, "config reloaded");
        log_warnings(&self.live.load().config);
        Ok(generation)
    }

    /// Logs the changes that only a restart applies.
    fn warn_of_restart_only(&self, config: &Config, current: &Config) {
        let bounds = |p: &crate::config::ProxyConfig| (p.header_read_timeout, p.max_connections);
        if bounds(&config.proxy) != bounds(&self.connections.proxy) {
            tracing::warn!(
                "proxy.header_read_timeout and proxy.max_connections changes take effect at the next restart"
            );
        }
        if config.admin.listen != current.admin.listen
            || config.admin.probes_listen != current.admin.probes_listen
        {
            tracing::warn!(
                configured = %config.admin.listen,
                serving = %current.admin.listen,
                "admin.listen and admin.probes_listen changes take effect at the next restart"
            );
        }
        if (&config.control_plane, &config.dead_letters)
            != (&self.letters_config.0, &self.letters_config.1)
        {
            tracing::warn!(
                "control_plane and dead_letters changes take effect at the next restart"
            );
        }
    }

    /// Binds the listeners `wanted` has and `listeners` does not (or has
    /// on another address); on a failure, closes those already bound.
    async fn bind_new(
        &self,
        listeners: &BTreeMap<Target, Listener>,
        wanted: &BTreeMap<Target, SocketAddr>,
    ) -> Result<BTreeMap<Target, Listener>, ReloadError> {
        let mut bound = BTreeMap::new();
        for (target, addr) in wanted {
            if listeners.get(target).is_some_and(|l| l.configured == *addr) {
                continue;
            }
            match self.listen(target, *addr).await {
                Ok(listener) => {
                    bound.insert(target.clone(), listener);
                }
                Err(error) => {
                    for (_, listener) in bound {
                        listener.close(Duration::ZERO).await;
                    }
                    return Err(error.into());
                }
            }
        }
        Ok(bound)
    }

    pub(super) fn reload_failed(&self, error: &ReloadError) {
        self.metrics.config_reload_failed();
        tracing::error!("config reload refused, the config in force stays:\n{error}");
        self.status.send_modify(|s| {
            s.failures += 1;
            s.last_error = Some(error.to_string());
        });
    }
}

/// Every proxy listener a configuration asks for.
pub(super) fn listen_addrs(config: &Config) -> BTreeMap<Target, SocketAddr> {
    let mut addrs = BTreeMap::new();
    addrs.insert(Target::Shared, config.proxy.listen);
    for upstream in &config.upstreams {
        if let Some(addr) = upstream.listen {
            addrs.insert(Target::Upstream(upstream.name.clone()), addr);
        }
    }
    addrs
}

pub(super) async fn reload_file(
    control: &Control,
    path: &std::path::Path,
) -> Result<u64, ReloadError> {
    let result = match crate::config::load(path) {
        Ok(config) => control.reload(config).await,
        Err(error) => Err(error.into()),
    };
    if let Err(error) = &result {
        control.reload_failed(error);
    }
    result
}

/// The caller connections of every proxy listener: the open-file limit
/// (raised to the hard limit at start), and the slots shared by the
/// listeners.
#[derive(Debug, Clone)]
pub struct Connections {
    /// `proxy` as the sidecar started with it.
    pub proxy: crate::config::ProxyConfig,
    /// The process's open-file limit, if known.
    pub open_files: Option<u64>,
    /// Connections open at once at most.
    pub max: u32,
    /// The slots.
    pub slots: Arc<tokio::sync::Semaphore>,
    /// Connections open now.
    pub open: Arc<std::sync::atomic::AtomicUsize>,
}

impl Connections {
    pub(super) fn new(proxy: &crate::config::ProxyConfig) -> Self {
        // Every caller connection may need an upstream connection too:
        // half the descriptors are left for those, the spool and logs.
        let open_files = match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(limit) => Some(limit),
            Err(error) => {
                tracing::warn!(%error, "cannot read or raise the open-file limit");
                None
            }
        };
        let max = proxy.max_connections.unwrap_or_else(|| {
            open_files.map_or(u32::MAX >> 3, |n| {
                u32::try_from(n / 2).unwrap_or(u32::MAX >> 3).max(1)
            })
        });
        let max = max.min(tokio::sync::Semaphore::MAX_PERMITS as u32);
        Self {
            proxy: *proxy,
            open_files,
            max,
            slots: Arc::new(tokio::sync::Semaphore::new(max as usize)),
            open: Arc::default(),
        }
    }

    /// What each connection of a proxy listener is held to.
    pub(super) fn limits(&self) -> server::Limits {
        server::Limits {
            slots: Some(self.slots.clone()),
            open: self.open.clone(),
            header_read_timeout: self.proxy.header_read_timeout,
            idle_timeout: self.proxy.idle_timeout,
            divert: None,
        }
    }

    /// Caller connections open now.
    pub fn open_now(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// How long the start waits for the upstreams' first resolution: a name
/// whose DNS does not answer must not hold the sidecar (and its agent)
/// back; it is resolved in the background meanwhile.
pub(super) const FIRST_RESOLUTION: Duration = Duration::from_secs(2);

/// Resolves the upstreams' addresses now (then `resolved` is notified),
/// and again every [`RESOLVE_EVERY`], until the sidecar stops.
pub(super) async fn resolve_again(
    outbound: Arc<Outbound>,
    live: LiveCell,
    resolved: Arc<tokio::sync::Notify>,
    mut stop: signal::Receiver<bool>,
) {
    loop {
        let upstreams = addresses(&live.load());
        outbound.resolve(&upstreams).await;
        resolved.notify_waiters();
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            () = tokio::time::sleep(RESOLVE_EVERY) => {}
        }
    }
}

/// Logs what `config check` would warn of, at every load.
pub(super) fn log_warnings(config: &Config) {
    for warning in config.warning_lines() {
        tracing::warn!("{warning}");
    }
}

pub(super) async fn bind(
    what: impl Into<String>,
    addr: SocketAddr,
) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError {
        what: what.into(),
        addr,
        source,
    })
}

/// Waits for open connections to finish their requests, up to the grace
/// period. Idle HTTP/1.1 connections close at once; HTTP/2 connections get
/// a GOAWAY and finish their open streams.
async fn drain(graceful: Arc<GracefulShutdown>, grace_period: Duration) {
    let Ok(graceful) = Arc::try_unwrap(graceful) else {
        tracing::error!("connections still being accepted during drain");
        return;
    };
    let open = graceful.count();
    tracing::debug!(connections = open, grace_period = ?grace_period, "draining a listener");
    if tokio::time::timeout(grace_period, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; closing the remaining connections");
    }
}

pub(super) fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .expect("a bound TCP listener has a local address")
}
