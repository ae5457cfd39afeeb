//! Operator commands that talk to the control plane over gRPC:
//! `breakwater checkpoint ...`, `breakwater dlq ...` and
//! `breakwater saga ...` ([`saga`]). Readable output by default, JSON with
//! `--json`.

mod checkpoint;
mod dlq;
pub mod saga;
mod wire;

/// `println!` for the CLI's output: a closed standard output (`| head`)
/// ends the command quietly, as Unix tools do, instead of a panic.
macro_rules! say {
    () => {
        $crate::cli::say_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::cli::say_line(format_args!($($arg)*))
    };
}
pub(crate) use say;

use std::path::PathBuf;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::api::checkpoints_client::CheckpointsClient;
use crate::api::dead_letters_client::DeadLettersClient;
use crate::api::token::Authorization;
use crate::transport::channel::ControlChannel;

/// How long the CLI waits for a connection to the control plane.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub use checkpoint::{PutArgs, delete, get, list, prune, put};
pub use dlq::{Selection, dlq_list, dlq_purge, dlq_replay, dlq_show};

/// Where the control plane is, and how to talk to it.
#[derive(Debug, Clone)]
pub struct Remote {
    /// Its gRPC URL, such as `http://127.0.0.1:7070`.
    pub url: String,
    /// A file holding the bearer token.
    pub token_file: Option<PathBuf>,
    /// The CA to trust for an `https://` URL (default: Mozilla's roots).
    pub ca_file: Option<PathBuf>,
    /// Print JSON instead of text.
    pub json: bool,
}

/// What a command failed with, printed as `error: ...`.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The arguments or files are wrong.
    #[error("{0}")]
    Usage(String),
    /// The control plane could not be reached.
    #[error("cannot reach the control plane at {url}: {message}")]
    Connect {
        /// Its URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The control plane refused the call.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(#[from] tonic::Status),
    /// A saga waited for ended otherwise than completed: the command
    /// exits with this status, the saga already shown.
    #[error("the saga ended {state}")]
    Ended {
        /// Its state.
        state: &'static str,
        /// The exit status that says so.
        status: u8,
    },
}

impl CliError {
    /// The process's exit status for this error.
    pub fn exit_status(&self) -> u8 {
        match self {
            CliError::Ended { status, .. } => *status,
            _ => 1,
        }
    }
}

fn code_name(code: tonic::Code) -> String {
    format!("{code:?}")
        .chars()
        .enumerate()
        .flat_map(|(i, c)| {
            let gap = (i > 0 && c.is_ascii_uppercase()).then_some('_');
            gap.into_iter()
                .chain(std::iter::once(c.to_ascii_uppercase()))
        })
        .collect()
}

type Authorized = InterceptedService<Channel, Authorization>;

impl Remote {
    async fn channel(&self) -> Result<(Channel, Authorization), CliError> {
        let token =
            Authorization::from_token_file(self.token_file.as_deref()).map_err(CliError::Usage)?;
        let channel =
            ControlChannel::new(&self.url, self.ca_file.as_deref(), CONNECT_TIMEOUT, None)
                .map_err(CliError::Usage)?
                .connect()
                .await
                .map_err(|message| CliError::Connect {
                    url: self.url.clone(),
                    message,
                })?;
        Ok((channel, token))
    }

    async fn dead_letters(&self) -> Result<DeadLettersClient<Authorized>, CliError> {
        let (channel, auth) = self.channel().await?;
        Ok(DeadLettersClient::with_interceptor(channel, auth)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX))
    }

    async fn checkpoints(&self) -> Result<CheckpointsClient<Authorized>, CliError> {
        let (channel, auth) = self.channel().await?;
        Ok(CheckpointsClient::with_interceptor(channel, auth)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX))
    }
}

/// Bytes as text when they are UTF-8, else as base64, marked.
fn readable(bytes: &[u8]) -> String {
    use base64::Engine as _;
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => format!(
            "(base64) {}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        ),
    }
}

/// Writes a line to standard output; when the reader has gone (a closed
/// pipe), exits 0 at once, with nothing on standard error.
pub fn say_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(error) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("cannot write to standard output: {error}");
        std::process::exit(1);
    }
}

fn print_json(value: &impl serde::Serialize) {
    say!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON serializes")
    );
}

fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| std::time::SystemTime::try_from(*t).ok())
        .map_or_else(
            || "-".into(),
            |t| humantime::format_rfc3339_seconds(t).to_string(),
        )
}

/// Prints rows under a header, columns padded to their widest cell.
pub fn print_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        say!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
