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
mod control;
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
use tokio::net::TcpListener;
use tokio::sync::{Mutex, watch as signal};
use tokio::task::JoinHandle;

use crate::config::{Config, ConfigError};
use crate::intercept::outbound::Outbound;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::traces::Tracing;
use crate::transport::server;
use admin::AdminState;
pub use control::Connections;
use control::{
    Control, FIRST_RESOLUTION, bind, listen_addrs, local_addr, log_warnings, reload_file,
    resolve_again,
};
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

/// Binds every listener and starts serving. Returns once all listeners are
/// bound, so the returned addresses accept connections at once.
pub async fn start(config: Config, options: Options) -> Result<Sidecar, StartError> {
    log_warnings(&config);
    let metrics = Arc::new(Metrics::new());
    let (stop_letters, stop_letters_rx) = signal::channel(false);
    let dead_letters = DeadLetters::start(&config, metrics.clone(), stop_letters_rx)?;
    let admin_listener = bind("admin", config.admin.listen).await?;
    let probes_listener = match config.admin.probes_listen {
        Some(addr) => Some(bind("admin probes", addr).await?),
        None => None,
    };
    let admin_addrs = (
        local_addr(&admin_listener),
        probes_listener.as_ref().map(local_addr),
    );
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
        outbound: start_outbound(&metrics, &live, stop_rx.clone()).await,
    });
    let (proxy_addr, upstream_addrs) = bind_all(&control, wanted).await?;
    metrics.config_loaded(1);

    let ready = Arc::new(AtomicBool::new(false));
    let admin_state = Arc::new(AdminState::new(
        metrics,
        live.clone(),
        ready.clone(),
        connections,
        dead_letters.as_ref().map(|(sink, _)| sink.clone()),
        control.clone(),
        admin_addrs,
    ));
    let admin_task = start_admin(admin_listener, probes_listener, admin_state, &stop_rx);
    let watcher = options
        .watch
        .map(|watch| start_watch(watch, &control, stop_rx.clone()));
    ready.store(true, Ordering::Release);
    tracing::info!(
        admin = %admin_addrs.0,
        probes = admin_addrs.1.map(|a| a.to_string()),
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
        admin_addr: admin_addrs.0,
        probes_addr: admin_addrs.1,
        proxy_addr,
        upstream_addrs,
        control,
        task,
    })
}

/// Binds and serves every proxy listener `wanted` has; returns where the
/// shared port and each dedicated port listen.
async fn bind_all(
    control: &Control,
    wanted: BTreeMap<Target, SocketAddr>,
) -> Result<(SocketAddr, BTreeMap<String, SocketAddr>), BindError> {
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
    Ok((proxy_addr, upstream_addrs))
}

/// Reloads from the policy file when it, or a file it names, changes.
fn start_watch(
    watch: watch::WatchOptions,
    control: &Arc<Control>,
    stop: signal::Receiver<bool>,
) -> JoinHandle<()> {
    let live = control.live.clone();
    let named = move || live.load().config.named_files();
    let control = control.clone();
    tokio::spawn(watch::run(watch, stop, named, move |path| {
        let control = control.clone();
        async move {
            let _ = reload_file(&control, &path).await;
        }
    }))
}

/// The outbound port's view of the upstreams' addresses, resolved in the
/// background from now on; waits at most [`FIRST_RESOLUTION`] for the
/// first answers.
async fn start_outbound(
    metrics: &Arc<Metrics>,
    live: &LiveCell,
    stop: signal::Receiver<bool>,
) -> Arc<Outbound> {
    let find = {
        let live = live.clone();
        Arc::new(move |name: &str| live.load().upstream(name).cloned())
    };
    let outbound = Arc::new(Outbound::new(metrics.clone(), find));
    outbound.configure(&live.load().config);
    let resolved = Arc::new(tokio::sync::Notify::new());
    let first = resolved.clone().notified_owned();
    tokio::spawn(resolve_again(
        outbound.clone(),
        live.clone(),
        resolved,
        stop,
    ));
    let _ = tokio::time::timeout(FIRST_RESOLUTION, first).await;
    outbound
}

/// Serves the admin port, and the probes port if there is one; the task
/// returned ends with the admin port.
fn start_admin(
    admin: TcpListener,
    probes: Option<TcpListener>,
    state: Arc<AdminState>,
    stop: &signal::Receiver<bool>,
) -> JoinHandle<()> {
    if let Some(listener) = probes {
        tokio::spawn(admin::serve_probes(listener, state.clone(), stop.clone()));
    }
    tokio::spawn(admin::serve(admin, state, stop.clone()))
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
