//! The `breakwater` command: parses arguments and calls the library, one
//! function of `breakwater::commands` per subcommand.
//!
//! Most of its length is the argument types, with their help text: the
//! whole command line in one file, as `--help` shows it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use breakwater::telemetry::logging::{self, LogFormat};
use breakwater::{cli, commands, control, demo, inject};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "breakwater",
    version,
    about = "A resilience sidecar for AI-agent services"
)]
struct Cli {
    /// Log line format (RUST_LOG selects what is logged).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sidecar (the data plane) beside an agent.
    Sidecar {
        /// The policy file.
        #[arg(long, short, env = "BREAKWATER_CONFIG")]
        config: PathBuf,
        /// Worker threads. A sidecar shares its pod's CPU with the agent.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
        threads: u16,
        /// How long in-flight requests may take to finish after SIGTERM.
        #[arg(long, default_value = "20s", value_parser = parse_duration)]
        grace_period: Duration,
        /// How often the policy file is checked for changes; 0 turns the
        /// check off (SIGHUP still reloads).
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        reload_interval: Duration,
    },
    /// Redirect this network namespace's outbound TCP to the sidecar's
    /// outbound port (once per pod, as an init container with NET_ADMIN
    /// and NET_RAW). Prints the commands it ran.
    Init {
        /// The sidecar's outbound port (its proxy.listen).
        #[arg(long, default_value_t = 15001)]
        redirect_port: u16,
        /// The sidecar's UID: its own connections go where they were
        /// going. Repeat for more.
        #[arg(long, required_unless_present = "cleanup")]
        exclude_uid: Vec<u32>,
        /// Destination ports left alone, such as a database's: 5432,6379.
        #[arg(long, value_delimiter = ',')]
        exclude_ports: Vec<u16>,
        /// Destination networks left alone: 10.0.0.0/8,fd00::/8.
        #[arg(long, value_delimiter = ',')]
        exclude_cidrs: Vec<breakwater::intercept::rules::Cidr>,
        /// Print the commands, run none.
        #[arg(long)]
        dry_run: bool,
        /// Remove the rules (and leave the table as it was).
        #[arg(long)]
        cleanup: bool,
        /// IPv6 rules too: auto (when the namespace has IPv6), on or off.
        #[arg(long, value_enum, default_value_t = Ipv6Arg::Auto)]
        ipv6: Ipv6Arg,
    },
    /// Run the control plane: checkpoints, dead letters and sagas on sled,
    /// over gRPC and JSON/HTTP.
    ControlPlane {
        /// Where the store lives (created if missing).
        #[arg(long, env = "BREAKWATER_DATA_DIR")]
        data_dir: PathBuf,
        /// The gRPC address.
        #[arg(long, default_value = breakwater::control::DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// The JSON/HTTP address.
        #[arg(long)]
        http_listen: Option<SocketAddr>,
        /// The admin address: /healthz, /readyz, /metrics.
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
        /// A file holding the operator's bearer token: every call must carry
        /// it (or the read-only token, for reads).
        #[arg(long, env = "BREAKWATER_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// A file holding a read-only token: it may get, list and watch,
        /// and change nothing. Needs --token-file.
        #[arg(long, env = "BREAKWATER_READ_TOKEN_FILE", requires = "token_file")]
        read_token_file: Option<PathBuf>,
        /// Serve without a token on an address other than loopback (refused
        /// otherwise: anyone who reached it could replay dead letters).
        #[arg(long)]
        insecure_no_auth: bool,
        /// A file holding the key sidecars seal dead letters with (their
        /// control_plane.letter_key_file): a replay of a letter without a
        /// valid seal is refused unless forced.
        #[arg(long, env = "BREAKWATER_LETTER_KEY_FILE")]
        letter_key_file: Option<PathBuf>,
        /// Serve gRPC and JSON over TLS with this certificate chain (PEM),
        /// read again when it changes. The admin port stays plaintext.
        #[arg(long, env = "BREAKWATER_TLS_CERT", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The TLS private key (PEM).
        #[arg(long, env = "BREAKWATER_TLS_KEY", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Largest checkpoint state (and dead-letter body) accepted.
        #[arg(long, default_value = "4MiB", value_parser = parse_size)]
        max_state: u64,
        /// The upstreams' policies (the sidecars' policy file): the
        /// upstreams sagas call and dead letters are replayed to.
        #[arg(long)]
        config: Option<PathBuf>,
        /// How many sagas run at once; the others wait their turn.
        #[arg(long, default_value_t = breakwater::control::saga::DEFAULT_WORKERS)]
        saga_workers: usize,
        /// Worker threads. One is the fastest on small machines: the work
        /// is short and waits on one flush pipeline, and a second thread
        /// mostly adds wake-ups (docs/BENCHMARKS.md).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
        threads: u16,
    },
    /// The dead-letter queue on the control plane.
    Dlq {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Workflow checkpoints on the control plane.
    Checkpoint {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: CheckpointCommand,
    },
    /// Sagas on the control plane: start one from a YAML file, show,
    /// list, watch, abort.
    Saga {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: SagaCommand,
    },
    /// The Kubernetes sidecar injector: a mutating admission webhook
    /// (HTTPS) that adds the sidecar to pods annotated
    /// `breakwater.io/inject: "true"`.
    Injector {
        /// The HTTPS address.
        #[arg(long, default_value = "0.0.0.0:8443")]
        listen: SocketAddr,
        /// The TLS certificate chain (PEM); read again when it changes.
        #[arg(long, env = "BREAKWATER_TLS_CERT")]
        tls_cert: PathBuf,
        /// The TLS private key (PEM).
        #[arg(long, env = "BREAKWATER_TLS_KEY")]
        tls_key: PathBuf,
        /// The sidecar image.
        #[arg(long, env = "BREAKWATER_SIDECAR_IMAGE")]
        image: String,
        /// The sidecar's image pull policy.
        #[arg(long, default_value = "IfNotPresent")]
        pull_policy: String,
        /// The policies ConfigMap (in the pod's namespace), unless the pod
        /// names its own with `breakwater.io/config`.
        #[arg(long, default_value = "breakwater-policies")]
        config_map: String,
        /// The Secret with the control plane's token (key `token`), mounted
        /// into every sidecar if it exists.
        #[arg(long, default_value = "breakwater-token")]
        token_secret: String,
        /// The sidecar's default CPU request (empty: none).
        #[arg(long, default_value = "50m")]
        cpu_request: String,
        /// The sidecar's default memory request (empty: none).
        #[arg(long, default_value = "32Mi")]
        memory_request: String,
        /// The sidecar's default CPU limit (empty: none).
        #[arg(long, default_value = "")]
        cpu_limit: String,
        /// The sidecar's default memory limit (empty: none).
        #[arg(long, default_value = "128Mi")]
        memory_limit: String,
        #[command(flatten)]
        intercept: InterceptArgs,
    },
    /// Print a pod manifest (JSON or YAML file, `-` for stdin) as the
    /// injector would change it, as JSON.
    InjectPreview {
        /// The pod manifest.
        file: PathBuf,
        /// The sidecar image.
        #[arg(long, default_value = concat!("breakwater:", env!("CARGO_PKG_VERSION")))]
        image: String,
        #[command(flatten)]
        intercept: InterceptArgs,
    },
    /// Check a policy file.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Run the demo: an invoice pipeline of four agents with seeded
    /// faults, directly and through Breakwater, side by side.
    Demo {
        /// Invoices per run.
        #[arg(long, default_value_t = 500)]
        invoices: u64,
        /// The fault model's seed: the same seed, the same faults.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Invoices arriving per second.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        rate: u64,
        /// Keep the control plane's data here (a rerun resumes from the
        /// checkpoints); a temporary directory otherwise.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Leave everything running after the report, until Ctrl-C.
        #[arg(long)]
        keep_running: bool,
        /// No progress bar.
        #[arg(long)]
        no_progress: bool,
    },
}

/// Where the control plane is.
#[derive(Debug, clap::Args)]
struct RemoteArgs {
    /// The control plane's gRPC URL.
    #[arg(
        long,
        env = "BREAKWATER_CONTROL_PLANE",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    control_plane: String,
    /// A file holding the bearer token.
    #[arg(long, env = "BREAKWATER_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// The CA (PEM) to trust for an https:// control plane (default:
    /// Mozilla's roots).
    #[arg(long, env = "BREAKWATER_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// Print JSON, for scripts.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum CheckpointCommand {
    /// Save a checkpoint.
    Put(cli::PutArgs),
    /// Show the latest checkpoint, or a version.
    Get {
        /// The workflow's id.
        workflow: String,
        /// A version (default: the latest).
        #[arg(long, default_value_t = 0)]
        version: u64,
    },
    /// List a workflow's checkpoints, newest first.
    List {
        /// The workflow's id.
        workflow: String,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        page_size: u32,
        /// From a previous page.
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Delete a workflow and all its checkpoints.
    Delete {
        /// The workflow's id.
        workflow: String,
    },
    /// Keep only a workflow's newest checkpoints.
    Prune {
        /// The workflow's id.
        workflow: String,
        /// How many to keep.
        #[arg(long)]
        keep: u32,
    },
}

#[derive(Debug, Subcommand)]
enum SagaCommand {
    /// Start the saga a YAML (or JSON) file defines; starting an id that
    /// exists shows that saga.
    Start {
        /// The definition.
        file: PathBuf,
        /// Watch it until it ends, then show it.
        #[arg(long)]
        wait: bool,
    },
    /// Show a saga: its state and each step's.
    Show {
        /// The saga's id.
        id: String,
    },
    /// List sagas by id.
    List {
        /// Only sagas in this state: running, completed, compensating,
        /// compensated, failed (they need a person), aborted.
        #[arg(long)]
        state: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        page_size: u32,
        /// From a previous page.
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Print a saga's events until it ends, or every saga's.
    Watch {
        /// The saga's id (none: all sagas).
        id: Option<String>,
    },
    /// Abort a running saga: the step in flight finishes, then what was
    /// done is compensated.
    Abort {
        /// The saga's id.
        id: String,
        /// Why (recorded as the saga's error).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// List letters, oldest first.
    List {
        /// Only this upstream's letters.
        #[arg(long, default_value = "")]
        upstream: String,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        page_size: u32,
        /// From a previous page.
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Show a letter, with its headers and body.
    Show {
        /// The letter's id.
        id: String,
        /// A FileDescriptorSet (`buf build -o FILE`, `protoc
        /// --include_imports -o FILE`) with the upstream's service: a gRPC
        /// body is shown by its field names, not its field numbers.
        #[arg(long, env = "BREAKWATER_DESCRIPTORS")]
        descriptors: Option<std::path::PathBuf>,
    },
    /// Send letters again to their upstream; delivered ones are removed.
    Replay {
        #[command(flatten)]
        selection: SelectionArgs,
        /// Send even letters the control plane refuses: without a valid
        /// seal (not captured by a sidecar holding the letter key, or
        /// altered since), or with a body cut at capture.
        #[arg(long)]
        force: bool,
    },
    /// Remove letters.
    Purge {
        #[command(flatten)]
        selection: SelectionArgs,
    },
}

/// Which letters: ids, an upstream's, or all.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
struct SelectionArgs {
    /// Letter ids.
    ids: Vec<String>,
    /// Every letter of this upstream.
    #[arg(long)]
    upstream: Option<String>,
    /// Every letter.
    #[arg(long)]
    all: bool,
}

impl From<SelectionArgs> for cli::Selection {
    fn from(args: SelectionArgs) -> Self {
        match (args.upstream, args.all) {
            (Some(upstream), _) => cli::Selection::Upstream(upstream),
            (None, true) => cli::Selection::All,
            (None, false) => cli::Selection::Ids(args.ids),
        }
    }
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a policy file and print a summary of the resolved config.
    Check {
        /// The policy file.
        file: PathBuf,
    },
}

/// How injected pods reach their sidecar (the injector and its preview).
#[derive(Debug, clap::Args)]
struct InterceptArgs {
    /// iptables: an init container redirects the pod's outbound TCP to
    /// the sidecar; env: only BREAKWATER_PROXY. A pod's
    /// breakwater.io/intercept annotation overrides it.
    #[arg(long, default_value = "iptables", value_parser = parse_intercept)]
    intercept: inject::intercept::Intercept,
    /// The init container's image (it has the iptables binary).
    #[arg(long, env = "BREAKWATER_INIT_IMAGE", default_value = concat!("breakwater-init:", env!("CARGO_PKG_VERSION")))]
    init_image: String,
    /// Destination ports never redirected, unless a pod names its own
    /// (breakwater.io/exclude-outbound-ports): 5432,6379.
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_ports: Vec<u16>,
    /// Destination networks never redirected, unless a pod names its own
    /// (breakwater.io/exclude-outbound-cidrs): 10.0.0.0/8.
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_cidrs: Vec<breakwater::intercept::rules::Cidr>,
}

impl From<InterceptArgs> for inject::intercept::InterceptSettings {
    fn from(args: InterceptArgs) -> Self {
        Self {
            mode: args.intercept,
            image: args.init_image,
            exclude_ports: args.exclude_outbound_ports,
            exclude_cidrs: args.exclude_outbound_cidrs,
        }
    }
}

fn parse_intercept(text: &str) -> Result<inject::intercept::Intercept, String> {
    text.parse()
}

/// `--ipv6`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Ipv6Arg {
    Auto,
    On,
    Off,
}

fn parse_duration(text: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(text)
}

fn parse_size(text: &str) -> Result<u64, String> {
    breakwater::values::parse_size(text)
        .ok_or_else(|| format!("{text:?} is not a size such as 4MiB"))
}

/// One arm per subcommand, each one library call.
fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Demo { .. }) {
        logging::init_with_default(cli.log_format, "error");
    } else {
        logging::init(cli.log_format);
    }
    match cli.command {
        Command::Config {
            command: ConfigCommand::Check { file },
        } => commands::config_check(&file),
        Command::Sidecar {
            config,
            threads,
            grace_period,
            reload_interval,
        } => commands::sidecar(
            config,
            commands::SidecarRun {
                threads,
                grace_period,
                reload_interval,
            },
        ),
        Command::ControlPlane {
            data_dir,
            listen,
            http_listen,
            admin_listen,
            token_file,
            read_token_file,
            insecure_no_auth,
            letter_key_file,
            tls_cert,
            tls_key,
            max_state,
            config,
            saga_workers,
            threads,
        } => {
            let mut options = control::ControlOptions::new(data_dir);
            options.listen = listen;
            options.http_listen = http_listen;
            options.admin_listen = admin_listen;
            options.max_state_bytes = usize::try_from(max_state).unwrap_or(usize::MAX);
            options.saga_workers = saga_workers;
            options.insecure_no_auth = insecure_no_auth;
            commands::control_plane(commands::ControlPlaneRun {
                options,
                token_file,
                read_token_file,
                letter_key_file,
                tls: tls_cert
                    .zip(tls_key)
                    .map(|(cert, key)| inject::server::TlsFiles { cert, key }),
                policies: config,
                threads,
            })
        }
        Command::Init {
            redirect_port,
            exclude_uid,
            exclude_ports,
            exclude_cidrs,
            dry_run,
            cleanup,
            ipv6,
        } => commands::init(&breakwater::intercept::InitOptions {
            redirect: breakwater::intercept::rules::Redirect {
                port: redirect_port,
                exclude_uids: exclude_uid,
                exclude_ports,
                exclude_cidrs,
            },
            dry_run,
            cleanup,
            ipv6: match ipv6 {
                Ipv6Arg::Auto => breakwater::intercept::Ipv6::Auto,
                Ipv6Arg::On => breakwater::intercept::Ipv6::On,
                Ipv6Arg::Off => breakwater::intercept::Ipv6::Off,
            },
        }),
        Command::Dlq { remote, command } => commands::operator(dlq(remote.into(), command)),
        Command::Saga { remote, command } => commands::operator(saga(remote.into(), command)),
        Command::Checkpoint { remote, command } => {
            commands::operator(checkpoint(remote.into(), command))
        }
        Command::Injector {
            listen,
            tls_cert,
            tls_key,
            image,
            pull_policy,
            config_map,
            token_secret,
            cpu_request,
            memory_request,
            cpu_limit,
            memory_limit,
            intercept,
        } => commands::injector(
            listen,
            inject::server::TlsFiles {
                cert: tls_cert,
                key: tls_key,
            },
            inject::Settings {
                image,
                pull_policy,
                config_map,
                token_secret,
                resources: [cpu_request, memory_request, cpu_limit, memory_limit],
                intercept: intercept.into(),
                ..Default::default()
            },
        ),
        Command::InjectPreview {
            file,
            image,
            intercept,
        } => commands::inject_preview(
            &file,
            &inject::Settings {
                image,
                intercept: intercept.into(),
                ..Default::default()
            },
        ),
        Command::Demo {
            invoices,
            seed,
            rate,
            data_dir,
            keep_running,
            no_progress,
        } => commands::demo(demo::DemoOptions {
            invoices,
            seed,
            rate,
            data_dir,
            keep_running,
            progress: !no_progress,
        }),
    }
}

/// `breakwater dlq ...`.
async fn dlq(remote: cli::Remote, command: DlqCommand) -> Result<(), cli::CliError> {
    match command {
        DlqCommand::List {
            upstream,
            page_size,
            page_token,
        } => cli::dlq_list(&remote, upstream, page_size, page_token).await,
        DlqCommand::Show { id, descriptors } => {
            cli::dlq_show(&remote, id, descriptors.as_deref()).await
        }
        DlqCommand::Replay { selection, force } => {
            cli::dlq_replay(&remote, selection.into(), force).await
        }
        DlqCommand::Purge { selection } => cli::dlq_purge(&remote, selection.into()).await,
    }
}

/// `breakwater saga ...`.
async fn saga(remote: cli::Remote, command: SagaCommand) -> Result<(), cli::CliError> {
    match command {
        SagaCommand::Start { file, wait } => cli::saga::start(&remote, &file, wait).await,
        SagaCommand::Show { id } => cli::saga::show(&remote, &id).await,
        SagaCommand::List {
            state,
            page_size,
            page_token,
        } => cli::saga::list(&remote, state, page_size, page_token).await,
        SagaCommand::Watch { id } => cli::saga::watch(&remote, id).await,
        SagaCommand::Abort { id, reason } => cli::saga::abort(&remote, id, reason).await,
    }
}

/// `breakwater checkpoint ...`.
async fn checkpoint(remote: cli::Remote, command: CheckpointCommand) -> Result<(), cli::CliError> {
    match command {
        CheckpointCommand::Put(args) => cli::put(&remote, args).await,
        CheckpointCommand::Get { workflow, version } => cli::get(&remote, workflow, version).await,
        CheckpointCommand::List {
            workflow,
            page_size,
            page_token,
        } => cli::list(&remote, workflow, page_size, page_token).await,
        CheckpointCommand::Delete { workflow } => cli::delete(&remote, workflow).await,
        CheckpointCommand::Prune { workflow, keep } => cli::prune(&remote, workflow, keep).await,
    }
}

impl From<RemoteArgs> for cli::Remote {
    fn from(args: RemoteArgs) -> Self {
        Self {
            url: args.control_plane,
            token_file: args.token_file,
            ca_file: args.ca_file,
            json: args.json,
        }
    }
}
