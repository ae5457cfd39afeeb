//! The control plane: durable workflow checkpoints, the dead-letter queue
//! and sagas ([`saga`]) on sled ([`store`]), one set of operations
//! ([`plane`]) served over gRPC ([`grpc`]) and JSON/HTTP ([`http`]), with
//! metrics and health on an admin port.
//!
//! [`start`] opens the store, binds every listener and serves; tests, the
//! demo and `breakwater control-plane` all use it.

pub mod auth;
pub mod error;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod plane;
pub mod saga;
pub mod status;
pub mod store;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ::http::{Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::body::{self, Body};
use auth::Auth;
use metrics::ControlMetrics;
use plane::ControlPlane;
use store::{SledStore, Store};

/// Default gRPC address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

/// How the control plane runs.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    /// Where the store lives.
    pub data_dir: PathBuf,
    /// The gRPC address.
    pub listen: SocketAddr,
    /// The JSON/HTTP address, if any.
    pub http_listen: Option<SocketAddr>,
    /// The admin address (health, metrics), if any.
    pub admin_listen: Option<SocketAddr>,
    /// Calls must carry these bearer tokens.
    pub auth: Auth,
    /// Serve without a token on an address other than loopback.
    pub insecure_no_auth: bool,
    /// The key sidecars seal dead letters with: replays of letters without
    /// its seal are refused unless forced.
    pub letter_key: Option<crate::api::seal::LetterKey>,
    /// Largest checkpoint state.
    pub max_state_bytes: usize,
    /// How often expired workflows are swept away.
    pub sweep_interval: Duration,
    /// The upstreams' policies, for sagas and dead-letter replays.
    pub policies: Option<crate::config::Config>,
    /// How many sagas run at once.
    pub saga_workers: usize,
    /// The certificate the gRPC and JSON listeners serve TLS with, if any
    /// (the admin port stays plaintext, for probes and scrapes).
    pub tls: Option<crate::transport::tls::server::ServerTls>,
}

impl ControlOptions {
    /// Refuses to serve without a token on an address that is not
    /// loopback, unless `insecure_no_auth` says so. The admin port (health
    /// and metrics, never a token) does not count.
    pub fn check_exposure(&self) -> Result<(), StartError> {
        if !self.auth.is_open() || self.insecure_no_auth {
            return Ok(());
        }
        match std::iter::once(self.listen)
            .chain(self.http_listen)
            .find(|addr| !addr.ip().is_loopback())
        {
            Some(addr) => Err(StartError::Open { addr }),
            None => Ok(()),
        }
    }

    /// Defaults for a data directory: gRPC on 127.0.0.1:7070, no HTTP or
    /// admin port, no token.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            listen: DEFAULT_LISTEN.parse().expect("a valid address"),
            http_listen: None,
            admin_listen: None,
            auth: Auth::open(),
            insecure_no_auth: false,
            letter_key: None,
            max_state_bytes: plane::DEFAULT_MAX_STATE_BYTES,
            sweep_interval: Duration::from_secs(10),
            policies: None,
            saga_workers: saga::DEFAULT_WORKERS,
            tls: None,
        }
    }
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store could not be opened.
    #[error("cannot open the store in {dir}: {source}")]
    Store {
        /// The data directory.
        dir: PathBuf,
        /// Why.
        source: store::StoreError,
    },
    /// No token, on an address others can reach.
    #[error(
        "the control plane would be OPEN on {addr}: without --token-file anyone who can \
         reach it can read and change checkpoints, start sagas and replay dead letters. \
         Give --token-file, listen on 127.0.0.1, or pass --insecure-no-auth to serve it \
         open anyway"
    )]
    Open {
        /// The address that is not loopback.
        addr: SocketAddr,
    },
    /// A listener could not be bound.
    #[error("cannot listen on {addr} for {what}: {source}")]
    Bind {
        /// What it was for.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A running control plane.
#[derive(Debug)]
pub struct Running {
    /// The gRPC address.
    pub grpc_addr: SocketAddr,
    /// The JSON/HTTP address.
    pub http_addr: Option<SocketAddr>,
    /// The admin address.
    pub admin_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    store: Arc<dyn Store>,
    control: Arc<ControlPlane>,
}

impl std::fmt::Debug for dyn Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Running {
    /// Stops serving, lets calls in flight finish, flushes the store.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        // Watches never end by themselves; the servers wait for them.
        self.control.sagas.end_watches();
        while self.tasks.join_next().await.is_some() {}
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.flush()).await;
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

fn local(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .expect("a bound listener has an address")
}

/// The listeners of a control plane: gRPC always, HTTP and admin if asked.
struct Listeners {
    grpc: TcpListener,
    http: Option<TcpListener>,
    admin: Option<TcpListener>,
}

impl Listeners {
    async fn bind(options: &ControlOptions) -> Result<Self, StartError> {
        Ok(Self {
            grpc: bind("gRPC", options.listen).await?,
            http: match options.http_listen {
                Some(addr) => Some(bind("HTTP", addr).await?),
                None => None,
            },
            admin: match options.admin_listen {
                Some(addr) => Some(bind("admin", addr).await?),
                None => None,
            },
        })
    }
}

/// Opens the store, binds every listener and serves until shut down.
pub async fn start(options: ControlOptions) -> Result<Running, StartError> {
    options.check_exposure()?;
    let store_error = |source| StartError::Store {
        dir: options.data_dir.clone(),
        source,
    };
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&options.data_dir).map_err(store_error)?);
    let metrics = Arc::new(ControlMetrics::new());
    let upstreams = options
        .policies
        .as_ref()
        .map(|config| Arc::new(saga::Upstreams::new(config)));
    let control = Arc::new(ControlPlane::new(
        store.clone(),
        metrics.clone(),
        options.max_state_bytes,
        upstreams,
        options.saga_workers,
        options.letter_key.clone(),
    ));
    let listeners = Listeners::bind(&options).await?;
    let grpc_addr = local(&listeners.grpc);
    let http_addr = listeners.http.as_ref().map(local);
    let admin_addr = listeners.admin.as_ref().map(local);
    warn_of_openness(&options);
    if let Some(tls) = &options.tls {
        tls.keep_fresh();
    }
    let (stop, stop_rx) = watch::channel(false);
    let tasks = serve_all(listeners, &control, &metrics, &options, stop_rx);
    // Unfinished sagas go on where they stopped; a call that was in
    // flight is sent again with the same Idempotency-Key.
    let resumed = control.sagas.resume().await.map_err(store_error)?;
    let or_off = |a: Option<SocketAddr>| a.map_or_else(|| "off".to_owned(), |a| a.to_string());
    tracing::info!(
        grpc = %grpc_addr,
        http = %or_off(http_addr),
        admin = %or_off(admin_addr),
        data_dir = %options.data_dir.display(),
        resumed_sagas = resumed,
        tls = options.tls.is_some(),
        "control plane ready"
    );
    Ok(Running {
        grpc_addr,
        http_addr,
        admin_addr,
        stop,
        tasks,
        store,
        control,
    })
}

/// Says at start what an operator may not have meant: no token, no key.
fn warn_of_openness(options: &ControlOptions) {
    if options.auth.is_open() {
        tracing::warn!(
            "the control plane is OPEN: no --token-file was given, so anyone who can reach \
             its ports can read and change checkpoints and dead letters"
        );
    }
    if options.letter_key.is_none() && options.policies.is_some() {
        tracing::warn!(
            "no --letter-key-file: dead letters are replayed without checking that a \
             sidecar captured them"
        );
    }
}

/// Serves every listener, and sweeps expired records, until `stop`.
fn serve_all(
    listeners: Listeners,
    control: &Arc<ControlPlane>,
    metrics: &Arc<ControlMetrics>,
    options: &ControlOptions,
    stop: watch::Receiver<bool>,
) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    let grpc_addr = local(&listeners.grpc);
    let json = http::HttpApi::new(control.clone(), options.auth.clone(), grpc_addr);
    let routes = grpc::router(control.clone(), options.auth.clone(), json.on_grpc_port());
    tasks.spawn(serve_grpc(
        listeners.grpc,
        routes,
        options.tls.clone(),
        stop.clone(),
    ));
    if let Some(listener) = listeners.http {
        let api = http::HttpApi::new(control.clone(), options.auth.clone(), grpc_addr);
        let tls = options.tls.clone();
        tasks.spawn(serve_http(listener, stop.clone(), tls, move |request| {
            let api = api.clone();
            async move { api.handle(request.map(Body::incoming)).await }
        }));
    }
    if let Some(listener) = listeners.admin {
        let (metrics, admin_control) = (metrics.clone(), control.clone());
        tasks.spawn(serve_http(listener, stop.clone(), None, move |request| {
            let (metrics, control) = (metrics.clone(), admin_control.clone());
            async move { Ok::<_, Infallible>(admin(&metrics, &control, request.uri().path())) }
        }));
    }
    tasks.spawn(sweep(control.clone(), options.sweep_interval, stop));
    tasks
}

/// Serves the gRPC services until `stop`, over TLS with `tls`.
async fn serve_grpc(
    listener: TcpListener,
    routes: tonic::service::Routes,
    tls: Option<crate::transport::tls::server::ServerTls>,
    stop: watch::Receiver<bool>,
) {
    let result = match tls {
        Some(tls) => {
            let incoming = crate::transport::server::tls_incoming(listener, tls);
            serve_grpc_on(incoming, routes, stop).await
        }
        None => {
            // Without TCP_NODELAY a small answer can wait out the peer's
            // delayed ACK: 40 ms on Linux.
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            serve_grpc_on(incoming, routes, stop).await
        }
    };
    if let Err(error) = result {
        tracing::error!(%error, "the gRPC server failed");
    }
}

async fn serve_grpc_on<I, IO, IE>(
    incoming: I,
    routes: tonic::service::Routes,
    mut stop: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error>
where
    I: tokio_stream::Stream<Item = Result<IO, IE>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tonic::transport::Server::builder()
        // JSON over HTTP/1.1 too, for the requests no gRPC service takes.
        .accept_http1(true)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}

/// Deletes expired workflows every `interval`, until `stop`.
async fn sweep(control: Arc<ControlPlane>, interval: Duration, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            () = async { let _ = stop.wait_for(|s| *s).await; } => break,
            _ = ticker.tick() => match control.sweep().await {
                Ok(0) => {}
                Ok(swept) => tracing::info!(swept, "expired workflows deleted"),
                Err(error) => tracing::error!(%error, "sweeping expired workflows failed"),
            },
        }
    }
}

/// The control plane's admin answers.
fn admin(metrics: &ControlMetrics, control: &ControlPlane, path: &str) -> Response<Body> {
    let (status, text, content_type) = match path {
        "/healthz" | "/readyz" => (StatusCode::OK, "ok\n".to_owned(), "text/plain"),
        "/metrics" => (
            StatusCode::OK,
            metrics.encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        // The calls of sagas and replays, by upstream: the sidecar's
        // metrics, on a path of their own (their names are the sidecar's).
        "/metrics/upstreams" => (
            StatusCode::OK,
            control
                .upstream_metrics()
                .unwrap_or_else(|| "# EOF\n".to_owned()),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz, /metrics or /metrics/upstreams\n".to_owned(),
            "text/plain",
        ),
    };
    body::typed(status, content_type, text)
}

/// Serves HTTP/1.1 and h2c on `listener` with `handle` until `stop`, then
/// lets open connections finish (up to 10 s).
async fn serve_http<F, Fut>(
    listener: TcpListener,
    stop: watch::Receiver<bool>,
    tls: Option<crate::transport::tls::server::ServerTls>,
    handle: F,
) where
    F: Fn(::http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let graceful = Arc::new(hyper_util::server::graceful::GracefulShutdown::new());
    let builder =
        hyper_util::server::conn::auto::Builder::new(crate::transport::server::StreamExecutor);
    let service = hyper::service::service_fn(handle);
    crate::transport::server::serve(
        listener,
        service,
        builder,
        graceful.clone(),
        stop,
        tls,
        Default::default(),
    )
    .await;
    if let Ok(graceful) = Arc::try_unwrap(graceful) {
        let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
    }
}
