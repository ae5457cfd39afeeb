//! The `breakwater` subcommands, one function each: the binary parses
//! arguments and calls one of these, which runs the command on its own
//! runtime and returns the process's exit status. Errors a person must
//! fix (a bad policy file, an unreadable token) exit with
//! [`EXIT_CONFIG`]; failures to run exit 1.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::cli::CliError;
use crate::control::auth::Auth;
use crate::telemetry::traces::Tracing;
use crate::{config, control, demo, inject, intercept, sidecar};

/// Exit status for invalid configuration or arguments.
pub const EXIT_CONFIG: u8 = 2;

/// How `breakwater sidecar` runs, beyond its policy file.
#[derive(Debug, Clone)]
pub struct SidecarRun {
    /// Worker threads.
    pub threads: u16,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub grace_period: Duration,
    /// How often the policy file is checked for changes (zero: never).
    pub reload_interval: Duration,
}

/// `breakwater sidecar`: until SIGTERM or SIGINT, then drains.
pub fn sidecar(path: PathBuf, run: SidecarRun) -> ExitCode {
    let config = match config::load(&path) {
        Ok(config) => config,
        Err(error) => return config_error(error),
    };
    let watch = sidecar::watch::WatchOptions {
        path,
        interval: run.reload_interval,
    };
    let result = runtime(run.threads).block_on(async move {
        // The OTLP exporter must be built inside the runtime.
        let tracing = Tracing::from_env().map_err(|e| e.to_string())?;
        let options = sidecar::Options {
            grace_period: run.grace_period,
            watch: Some(watch),
            tracing: tracing.clone(),
        };
        let result = sidecar::run(config, options, shutdown_signal()).await;
        if let Some(tracing) = tracing {
            let _ = tokio::task::spawn_blocking(move || tracing.shutdown()).await;
        }
        result.map_err(|e| e.to_string())
    });
    exit(result, "sidecar failed to start")
}

/// How `breakwater control-plane` runs: its options, with the files
/// they name not yet read.
#[derive(Debug, Clone)]
pub struct ControlPlaneRun {
    /// The options; `auth` and `policies` are filled in from the files.
    pub options: control::ControlOptions,
    /// The operator token's file.
    pub token_file: Option<PathBuf>,
    /// The read-only token's file.
    pub read_token_file: Option<PathBuf>,
    /// The file of the key sidecars seal dead letters with.
    pub letter_key_file: Option<PathBuf>,
    /// The certificate and key to serve TLS with.
    pub tls: Option<inject::server::TlsFiles>,
    /// The upstreams' policy file.
    pub policies: Option<PathBuf>,
    /// Worker threads.
    pub threads: u16,
}

/// `breakwater control-plane`: until SIGTERM or SIGINT.
pub fn control_plane(run: ControlPlaneRun) -> ExitCode {
    let mut options = run.options;
    options.policies = match run.policies.as_deref().map(config::load).transpose() {
        Ok(policies) => policies,
        Err(error) => return config_error(error),
    };
    let token = |path: &Path| {
        crate::api::token::read(path).map(|t| (t, format!("token file {}", path.display())))
    };
    if let Some(path) = &run.token_file {
        let auth = token(path)
            .and_then(|(t, file)| Auth::with_token(&t).map_err(|e| format!("{file}: {e}")));
        match auth {
            Ok(auth) => options.auth = auth,
            Err(error) => return config_error(error),
        }
    }
    if let Some(path) = &run.read_token_file {
        let auth = token(path).and_then(|(t, file)| {
            (options.auth.clone().with_read_token(&t)).map_err(|e| format!("{file}: {e}"))
        });
        match auth {
            Ok(auth) => options.auth = auth,
            Err(error) => return config_error(error),
        }
    }
    if let Some(path) = &run.letter_key_file {
        match crate::api::seal::LetterKey::read(path) {
            Ok(key) => options.letter_key = Some(key),
            Err(error) => return config_error(error),
        }
    }
    if let Err(error) = options.check_exposure() {
        return config_error(error);
    }
    if let Some(files) = run.tls {
        match crate::transport::tls::server::ServerTls::load(files) {
            Ok(tls) => options.tls = Some(tls),
            Err(error) => return config_error(error),
        }
    }
    let result = runtime(run.threads).block_on(async move {
        let running = control::start(options).await?;
        shutdown_signal().await;
        tracing::info!("shutdown signal received");
        running.shutdown().await;
        Ok::<_, control::StartError>(())
    });
    exit(result, "the control plane failed to start")
}

/// An operator command against the control plane (`dlq`, `saga`,
/// `checkpoint`); its errors go to stderr.
pub fn operator(command: impl Future<Output = Result<(), CliError>>) -> ExitCode {
    match runtime(1).block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        // The saga was shown; its state is the answer.
        Err(error @ CliError::Ended { .. }) => ExitCode::from(error.exit_status()),
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(error.exit_status())
        }
    }
}

/// `breakwater injector`: the admission webhook over HTTPS, until SIGTERM
/// or SIGINT.
pub fn injector(
    listen: SocketAddr,
    files: inject::server::TlsFiles,
    settings: inject::Settings,
) -> ExitCode {
    let settings = Arc::new(settings);
    let result = runtime(1).block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop.send(true);
        });
        tracing::info!(%listen, image = %settings.image, "injector ready");
        inject::server::serve(listener, files, settings, stopped)
            .await
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("injector: {error}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// `breakwater init`: sets (or removes, or plans) the redirection rules,
/// printing each command.
pub fn init(options: &intercept::InitOptions) -> ExitCode {
    match intercept::init(options, &mut intercept::rules::System) {
        Ok(lines) => {
            for line in &lines {
                println!("{line}");
            }
            if lines.is_empty() {
                println!("no rules of breakwater's were set: nothing to remove");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `breakwater inject-preview`: the pod in `file` (`-`: stdin) as the
/// injector would change it, printed as JSON.
pub fn inject_preview(file: &Path, settings: &inject::Settings) -> ExitCode {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).map_err(|e| e.to_string())
    } else {
        std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))
    };
    let pod = text.and_then(|t| {
        serde_saphyr::from_str::<serde_json::Value>(&t)
            .map_err(|e| format!("{}: {e}", file.display()))
    });
    match pod.and_then(|p| inject::preview(&p, settings).map_err(|e| e.0)) {
        Ok(pod) => {
            println!("{}", serde_json::to_string_pretty(&pod).expect("JSON"));
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `breakwater config check`: a summary, or every problem with its
/// position.
pub fn config_check(file: &Path) -> ExitCode {
    let config = match config::load(file) {
        Ok(config) => config,
        Err(error) => return config_error(error),
    };
    for warning in config.warning_lines() {
        eprintln!("{warning}");
    }
    println!("{}: ok", config.source);
    println!("  admin  {}", config.admin.listen);
    println!("  proxy  {}", config.proxy.listen);
    for upstream in &config.upstreams {
        let listen = upstream
            .listen
            .map(|l| format!(" listen {l}"))
            .unwrap_or_default();
        println!(
            "  upstream {} -> {} ({}){} hosts [{}]",
            upstream.name,
            upstream.address,
            match upstream.jsonrpc {
                Some(dialect) => format!("{}, {dialect}", upstream.protocol),
                None => upstream.protocol.to_string(),
            },
            listen,
            upstream.hosts.join(", ")
        );
        for route in &upstream.routes {
            println!("    route {}: {}", route.name, route.matches.describe());
        }
    }
    ExitCode::SUCCESS
}

/// `breakwater demo`.
pub fn demo(options: demo::DemoOptions) -> ExitCode {
    match runtime(2).block_on(demo::run(options)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("demo failed: {error}");
            ExitCode::FAILURE
        }
    }
}

fn config_error(error: impl std::fmt::Display) -> ExitCode {
    eprintln!("{error}");
    ExitCode::from(EXIT_CONFIG)
}

fn exit<E: std::fmt::Display>(result: Result<(), E>, what: &str) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "{what}");
            ExitCode::FAILURE
        }
    }
}

/// A runtime with `threads` workers; one thread runs everything on the
/// current thread, which avoids cross-thread wake-ups.
fn runtime(threads: u16) -> tokio::runtime::Runtime {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads.into());
        b
    };
    builder
        .enable_all()
        .thread_name("breakwater")
        .build()
        .expect("the tokio runtime starts")
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
