//! The sidecar: the data plane that runs beside each agent.
//!
//! [`start`] binds every listener (the shared proxy port, each upstream's
//! dedicated port, the admin port) and serves them; [`run`] does the same
//! until a shutdown future resolves, then drains. Tests, the demo and the
//! `breakwater sidecar` command all use these two functions.

mod h2;
mod headers;
mod proxy;
mod route;
mod server;
mod upstream;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::telemetry::metrics::Metrics;
pub(crate) use headers::is_hop_by_hop;
pub use proxy::{ProxyService, Target};
pub use upstream::{Upstream, UpstreamClient};

/// How the sidecar process behaves, beyond the policy file.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long in-flight requests may take to finish after a shutdown
    /// signal before their connections are closed.
    pub grace_period: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            grace_period: Duration::from_secs(20),
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

/// A running sidecar.
#[derive(Debug)]
pub struct Sidecar {
    /// Where the admin endpoint listens.
    pub admin_addr: SocketAddr,
    /// Where the shared proxy port listens.
    pub proxy_addr: SocketAddr,
    /// Where each upstream's dedicated port listens, by upstream name.
    pub upstream_addrs: BTreeMap<String, SocketAddr>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Sidecar {
    /// Stops accepting, waits for in-flight requests (up to the grace
    /// period), and returns once everything is closed.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
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
pub async fn start(config: Config, options: Options) -> Result<Sidecar, BindError> {
    let metrics = Arc::new(Metrics::new());
    let upstreams: Vec<Arc<Upstream>> = config
        .upstreams
        .iter()
        .map(|u| Arc::new(Upstream::new(u.clone(), &metrics)))
        .collect();
    let routes = Arc::new(route::Routes::new(&upstreams));

    let admin_listener = bind("admin", config.admin.listen).await?;
    let proxy_listener = bind("proxy", config.proxy.listen).await?;
    let mut listeners = vec![(proxy_listener, Target::Shared(routes))];
    let mut upstream_addrs = BTreeMap::new();
    for upstream in &upstreams {
        if let Some(addr) = upstream.config.listen {
            let listener = bind(format!("upstream {}", upstream.config.name), addr).await?;
            upstream_addrs.insert(upstream.config.name.to_string(), local_addr(&listener));
            listeners.push((listener, Target::Upstream(upstream.clone())));
        }
    }
    let admin_addr = local_addr(&admin_listener);
    let proxy_addr = local_addr(&listeners[0].0);

    let ready = Arc::new(AtomicBool::new(false));
    let (stop, stop_rx) = watch::channel(false);
    let admin_state = Arc::new(AdminState::new(
        metrics.clone(),
        &config,
        ready.clone(),
        upstreams.clone(),
    ));
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state, stop_rx.clone()));

    let graceful = Arc::new(GracefulShutdown::new());
    let builder = server::builder();
    let mut accept_loops = JoinSet::new();
    for (listener, target) in listeners {
        let service = ProxyService::new(target, metrics.clone());
        accept_loops.spawn(server::serve(
            listener,
            service,
            builder.clone(),
            graceful.clone(),
            stop_rx.clone(),
        ));
    }
    ready.store(true, Ordering::Release);
    tracing::info!(
        admin = %admin_addr,
        proxy = %proxy_addr,
        upstreams = upstreams.len(),
        config = %config.source,
        "sidecar ready"
    );

    let grace_period = options.grace_period;
    let task = tokio::spawn(async move {
        let mut stopped = stop_rx;
        let _ = stopped.wait_for(|stop| *stop).await;
        ready.store(false, Ordering::Release);
        while accept_loops.join_next().await.is_some() {}
        drain(graceful, grace_period).await;
        let _ = admin_task.await;
    });
    Ok(Sidecar {
        admin_addr,
        proxy_addr,
        upstream_addrs,
        stop,
        task,
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
    tracing::info!(connections = open, grace_period = ?grace_period, "draining");
    match tokio::time::timeout(grace_period, graceful.shutdown()).await {
        Ok(()) => tracing::info!("drained"),
        Err(_) => tracing::warn!("grace period over; closing the remaining connections"),
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
) -> Result<(), BindError> {
    let sidecar = start(config, options).await?;
    shutdown.await;
    tracing::info!("shutdown signal received");
    sidecar.shutdown().await;
    Ok(())
}
