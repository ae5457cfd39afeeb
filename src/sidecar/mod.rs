//! The sidecar: the data plane that runs beside each agent.
//!
//! [`start`] binds every listener (the shared proxy port, each upstream's
//! dedicated port, the admin port) and serves them; [`run`] does the same
//! until a shutdown future resolves, then drains. Tests, the demo and the
//! `breakwater sidecar` command all use these two functions.
//!
//! A running sidecar reloads its configuration ([`Sidecar::reload`], and
//! from its file on change or SIGHUP, see [`watch`]): the new generation
//! is swapped in atomically ([`live`]), new listeners are bound before the
//! swap and removed ones drained after it, and listeners that did not
//! change keep their connections.

pub mod admin;
pub mod dead_letter;
mod failover;
mod live;
mod proxy;
mod route;
pub mod status;
pub mod watch;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, watch as signal};
use tokio::task::JoinHandle;

use crate::config::{Config, ConfigError};
use crate::intercept::outbound::{Look, Outbound, RESOLVE_EVERY};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::traces::Tracing;
use crate::transport::server;
use admin::AdminState;
use dead_letter::DeadLetters;
pub use live::{Live, LiveCell};
pub use proxy::{ProxyService, Target};

/// How the sidecar process behaves, beyond the policy file.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long in-flight requests may take to finish after a shutdown
    /// signal before their connections are closed (also the drain time of
    /// a listener removed by a reload).
    pub grace_period: Duration,
    /// Reload from this file when it changes or on SIGHUP.
    pub watch: Option<watch::WatchOptions>,
    /// Export spans of every request and attempt.
    pub tracing: Option<Tracing>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            grace_period: Duration::from_secs(20),
            watch: None,
            tracing: None,
        }
    }
}

/// A listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for {what}: {source}")]
pub struct BindError {
    /// What the listener is for (`proxy`, `admin`, `upstream ocr`).
    pub what: String,
    /// The address from the config.
    pub addr: SocketAddr,
    /// The operating system's error.
    pub source: std::io::Error,
}

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("{0}")]
    Bind(#[from] BindError),
    /// The dead-letter spool could not be opened.
    #[error("{0}")]
    Spool(#[from] dead_letter::SpoolError),
}

/// Why a reload was refused. The configuration in force stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new file is invalid.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// A new listener could not be bound.
    #[error("{0}")]
    Bind(#[from] BindError),
}

/// What the reloads did so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadStatus {
    /// The generation in force (1: the configuration started with).
    pub generation: u64,
    /// Reloads refused so far.
    pub failures: u64,
    /// Why the last refused reload was refused.
    pub last_error: Option<String>,
}

/// A running sidecar.
#[derive(Debug)]
pub struct Sidecar {
    /// Where the admin endpoint listens.
    pub admin_addr: SocketAddr,
    /// Where the probes port (`admin.probes_listen`) listens, if any.
    pub probes_addr: Option<SocketAddr>,
    /// Where the shared proxy port listened at start.
    pub proxy_addr: SocketAddr,
    /// Where each upstream's dedicated port listened at start, by upstream
    /// name ([`Sidecar::listener_addrs`] has the current ones).
    pub upstream_addrs: BTreeMap<String, SocketAddr>,
    control: Arc<Control>,
    task: JoinHandle<()>,
}

/// A listener being served.
#[derive(Debug)]
struct Listener {
    /// The address asked for (port 0: any).
    configured: SocketAddr,
    /// The address bound.
    local: SocketAddr,
    stop: signal::Sender<bool>,
    graceful: Arc<GracefulShutdown>,
    accept: JoinHandle<()>,
}

impl Listener {
    /// Stops accepting, then lets open connections finish within
    /// `grace_period`.
    async fn close(self, grace_period: Duration) {
        let _ = self.stop.send(true);
        let _ = self.accept.await;
        drain(self.graceful, grace_period).await;
    }
}

/// What a running sidecar needs to reload and to stop.
#[derive(Debug)]
struct Control {
    live: LiveCell,
    metrics: Arc<Metrics>,
    listeners: Mutex<BTreeMap<Target, Listener>>,
    builder: auto::Builder<server::StreamExecutor>,
    /// What every caller connection is held to, from `proxy` as started.
    connections: Connections,
    grace_period: Duration,
    tracing: Option<Tracing>,
    dead_letters: Option<Arc<DeadLetters>>,
    /// `control_plane` and `dead_letters` as started: the spool and the
    /// shipper are not rebuilt by a reload.
    letters_config: (
        Option<crate::config::ControlPlaneConfig>,
        crate::config::DeadLettersConfig,
    ),
    status: signal::Sender<ReloadStatus>,
    stop: signal::Sender<bool>,
    /// Where redirected connections were going (interception).
    outbound: Arc<Outbound>,
}

/// Each upstream's name and address, for the outbound port to resolve.
fn addresses(live: &Live) -> Vec<(Arc<str>, String)> {
    live.upstreams()
        .iter()
        .map(|u| (u.config.name.clone(), u.config.address.to_string()))
        .collect()
}

impl Control {
    /// Binds and serves a listener for `target`.
    async fn listen(&self, target: &Target, addr: SocketAddr) -> Result<Listener, BindError> {
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
        let accept = tokio::spawn(server::serve(
            listener,
            service,
            self.builder.clone(),
            graceful.clone(),
            stop_rx,
            None,
            limits,
        ));
        Ok(Listener {
            configured: addr,
            local,
            stop,
            graceful,
            accept,
        })
    }

    /// Swaps in `config` (see [`Sidecar::reload`]).
    async fn reload(&self, config: Config) -> Result<u64, ReloadError> {
        let mut listeners = self.listeners.lock().await;
        let current = self.live.load_full();
        let bounds = |p: &crate::config::ProxyConfig| (p.header_read_timeout, p.max_connections);
        if bounds(&config.proxy) != bounds(&self.connections.proxy) {
            tracing::warn!(
                "proxy.header_read_timeout and proxy.max_connections changes take effect at the next restart"
            );
        }
        if config.admin.listen != current.config.admin.listen
            || config.admin.probes_listen != current.config.admin.probes_listen
        {
            tracing::warn!(
                configured = %config.admin.listen,
                serving = %current.config.admin.listen,
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
        let wanted = listen_addrs(&config);
        let mut bound = BTreeMap::new();
        for (target, addr) in &wanted {
            let unchanged = listeners.get(target).is_some_and(|l| l.configured == *addr);
            if unchanged {
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
        let generation = current.generation + 1;
        let removed: Vec<String> = current
            .upstreams()
            .iter()
            .filter(|u| config.upstream(&u.config.name).is_none())
            .map(|u| u.config.name.to_string())
            .collect();
        let live = Live::build(config, generation, &self.metrics, Some(&current));
        let source = live.config.source.clone();
        let upstreams = addresses(&live);
        self.outbound.set_unmatched(live.config.intercept.unmatched);
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
            if let Some(old) = listeners.insert(target, listener) {
                retired.push(old);
            }
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
        let grace_period = self.grace_period;
        for listener in retired {
            tracing::info!(addr = %listener.local, "closing a listener the new config dropped");
            tokio::spawn(listener.close(grace_period));
        }
        self.metrics.config_loaded(generation);
        self.status.send_modify(|s| s.generation = generation);
        tracing::info!(generation, config = %source, "config reloaded");
        log_warnings(&self.live.load().config);
        Ok(generation)
    }

    fn reload_failed(&self, error: &ReloadError) {
        self.metrics.config_reload_failed();
        tracing::error!("config reload refused, the config in force stays:\n{error}");
        self.status.send_modify(|s| {
            s.failures += 1;
            s.last_error = Some(error.to_string());
        });
    }
}

/// Every proxy listener a configuration asks for.
fn listen_addrs(config: &Config) -> BTreeMap<Target, SocketAddr> {
    let mut addrs = BTreeMap::new();
    addrs.insert(Target::Shared, config.proxy.listen);
    for upstream in &config.upstreams {
        if let Some(addr) = upstream.listen {
            addrs.insert(Target::Upstream(upstream.name.clone()), addr);
        }
    }
    addrs
}

impl Sidecar {
    /// Swaps in a new configuration: new listeners are bound first (a
    /// failure refuses the reload and changes nothing), then the new
    /// generation takes every request that starts from now on, and
    /// listeners the new configuration dropped are drained. Upstreams whose
    /// address, protocol and policy did not change keep their state.
    /// Returns the new generation.
    pub async fn reload(&self, config: Config) -> Result<u64, ReloadError> {
        let result = self.control.reload(config).await;
        if let Err(error) = &result {
            self.control.reload_failed(error);
        }
        result
    }

    /// Reloads from a policy file; an invalid file is refused and counted.
    pub async fn reload_file(&self, path: &std::path::Path) -> Result<u64, ReloadError> {
        reload_file(&self.control, path).await
    }

    /// Follows reloads: the generation in force and the failures so far.
    pub fn reloads(&self) -> signal::Receiver<ReloadStatus> {
        self.control.status.subscribe()
    }

    /// The generation of the configuration in force.
    pub fn live(&self) -> Arc<Live> {
        self.control.live.load_full()
    }

    /// Where each proxy listener listens now: `proxy`, and `upstream <name>`
    /// for dedicated ports.
    pub async fn listener_addrs(&self) -> BTreeMap<String, SocketAddr> {
        let listeners = self.control.listeners.lock().await;
        listeners
            .iter()
            .map(|(target, l)| (target.to_string(), l.local))
            .collect()
    }

    /// Stops accepting, waits for in-flight requests (up to the grace
    /// period), and returns once everything is closed.
    pub async fn shutdown(self) {
        let _ = self.control.stop.send(true);
        let _ = self.task.await;
    }
}

async fn reload_file(control: &Control, path: &std::path::Path) -> Result<u64, ReloadError> {
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
    fn new(proxy: &crate::config::ProxyConfig) -> Self {
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
    fn limits(&self) -> server::Limits {
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
const FIRST_RESOLUTION: Duration = Duration::from_secs(2);

/// Resolves the upstreams' addresses now (then `resolved` is notified),
/// and again every [`RESOLVE_EVERY`], until the sidecar stops.
async fn resolve_again(
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
fn log_warnings(config: &Config) {
    for warning in config.warning_lines() {
        tracing::warn!("{warning}");
    }
}

async fn bind(what: impl Into<String>, addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError {
        what: what.into(),
        addr,
        source,
    })
}

/// Binds every listener and starts serving. Returns once all listeners are
/// bound, so the returned addresses accept connections at once.
pub async fn start(config: Config, options: Options) -> Result<Sidecar, StartError> {
    log_warnings(&config);
    let metrics = Arc::new(Metrics::new());
    let (stop_letters, stop_letters_rx) = signal::channel(false);
    let dead_letters = DeadLetters::start(&config, metrics.clone(), stop_letters_rx)?;
    let admin_listener = bind("admin", config.admin.listen).await?;
    let admin_addr = local_addr(&admin_listener);
    let probes_listener = match config.admin.probes_listen {
        Some(addr) => Some(bind("admin probes", addr).await?),
        None => None,
    };
    let probes_addr = probes_listener.as_ref().map(local_addr);
    let wanted = listen_addrs(&config);
    let letters_config = (config.control_plane.clone(), config.dead_letters.clone());
    let connections = Connections::new(&config.proxy);
    let live: LiveCell = Arc::new(ArcSwap::from_pointee(Live::build(
        config, 1, &metrics, None,
    )));
    let (stop, stop_rx) = signal::channel(false);
    let (status, _) = signal::channel(ReloadStatus {
        generation: 1,
        ..ReloadStatus::default()
    });
    let outbound = Arc::new(Outbound::new(metrics.clone()));
    outbound.set_unmatched(live.load().config.intercept.unmatched);
    let resolved = Arc::new(tokio::sync::Notify::new());
    let first = resolved.clone().notified_owned();
    tokio::spawn(resolve_again(
        outbound.clone(),
        live.clone(),
        resolved,
        stop_rx.clone(),
    ));
    let _ = tokio::time::timeout(FIRST_RESOLUTION, first).await;
    let control = Arc::new(Control {
        live: live.clone(),
        metrics: metrics.clone(),
        listeners: Mutex::new(BTreeMap::new()),
        builder: server::builder_with(connections.proxy.header_read_timeout),
        connections: connections.clone(),
        grace_period: options.grace_period,
        tracing: options.tracing,
        dead_letters: dead_letters.as_ref().map(|(sink, _)| sink.clone()),
        letters_config,
        status,
        stop,
        outbound,
    });
    let mut listeners = BTreeMap::new();
    for (target, addr) in wanted {
        let listener = control.listen(&target, addr).await?;
        listeners.insert(target, listener);
    }
    let proxy_addr = listeners[&Target::Shared].local;
    let upstream_addrs = listeners
        .iter()
        .filter_map(|(target, l)| match target {
            Target::Upstream(name) => Some((name.to_string(), l.local)),
            Target::Shared => None,
        })
        .collect();
    *control.listeners.lock().await = listeners;
    metrics.config_loaded(1);

    let ready = Arc::new(AtomicBool::new(false));
    let admin_state = Arc::new(AdminState::new(
        metrics.clone(),
        live.clone(),
        ready.clone(),
        connections,
        dead_letters.as_ref().map(|(sink, _)| sink.clone()),
        control.clone(),
        (admin_addr, probes_addr),
    ));
    if let Some(listener) = probes_listener {
        tokio::spawn(admin::serve_probes(
            listener,
            admin_state.clone(),
            stop_rx.clone(),
        ));
    }
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state, stop_rx.clone()));
    let watcher = options.watch.map(|watch| {
        let (control, live) = (control.clone(), live.clone());
        let named = move || live.load().config.named_files();
        tokio::spawn(watch::run(watch, stop_rx.clone(), named, move |path| {
            let control = control.clone();
            async move {
                let _ = reload_file(&control, &path).await;
            }
        }))
    });
    ready.store(true, Ordering::Release);
    tracing::info!(
        admin = %admin_addr,
        probes = probes_addr.map(|a| a.to_string()),
        proxy = %proxy_addr,
        upstreams = live.load().upstreams().len(),
        config = %live.load().config.source,
        "sidecar ready"
    );

    let task = tokio::spawn(shut_down(
        control.clone(),
        stop_rx,
        ready,
        watcher,
        dead_letters.map(|started| (started, stop_letters)),
        admin_task,
    ));
    Ok(Sidecar {
        admin_addr,
        probes_addr,
        proxy_addr,
        upstream_addrs,
        control,
        task,
    })
}

/// Waits for the stop signal, then stops in order: not ready, no more
/// reloads, listeners drained, the last letters spooled, the admin port.
async fn shut_down(
    control: Arc<Control>,
    mut stopped: signal::Receiver<bool>,
    ready: Arc<AtomicBool>,
    watcher: Option<JoinHandle<()>>,
    dead_letters: Option<(dead_letter::Started, signal::Sender<bool>)>,
    admin_task: JoinHandle<()>,
) {
    let _ = stopped.wait_for(|stop| *stop).await;
    ready.store(false, Ordering::Release);
    if let Some(watcher) = watcher {
        let _ = watcher.await;
    }
    let listeners = std::mem::take(&mut *control.listeners.lock().await);
    tracing::info!(grace_period = ?control.grace_period, "draining");
    let closing = listeners
        .into_values()
        .map(|l| l.close(control.grace_period));
    futures_util::future::join_all(closing).await;
    tracing::info!("drained");
    if let Some(((sink, shipper), stop_letters)) = dead_letters {
        // Letters of the last requests are spooled before the end.
        sink.settle(Duration::from_secs(2)).await;
        let _ = stop_letters.send(true);
        let _ = shipper.await;
    }
    let _ = admin_task.await;
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

fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .expect("a bound TCP listener has a local address")
}

/// Runs a sidecar until `shutdown` resolves, then drains and returns.
pub async fn run(
    config: Config,
    options: Options,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let sidecar = start(config, options).await?;
    shutdown.await;
    tracing::info!("shutdown signal received");
    sidecar.shutdown().await;
    Ok(())
}
