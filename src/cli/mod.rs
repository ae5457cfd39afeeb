//! Operator commands that talk to the control plane over gRPC:
//! `breakwater checkpoint ...`, `breakwater dlq ...` and
//! `breakwater saga ...` ([`saga`]). Readable output by default, JSON with
//! `--json`.

pub mod saga;

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::Bytes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::api::checkpoints_client::CheckpointsClient;
use crate::api::dead_letters_client::DeadLettersClient;
use crate::api::json::{CheckpointJson, LetterJson};
use crate::api::purge_dead_letters_request::Target as PurgeTarget;
use crate::api::token::Authorization;
use crate::api::{
    Checkpoint, DeleteCheckpointsRequest, GetCheckpointRequest, ListCheckpointsRequest,
    PruneCheckpointsRequest, PutCheckpointRequest,
};
use crate::api::{
    DeadLetter, GetDeadLetterRequest, ListDeadLettersRequest, PurgeDeadLettersRequest,
    ReplayDeadLetterRequest,
};

/// Where the control plane is, and how to talk to it.
#[derive(Debug, Clone)]
pub struct Remote {
    /// Its gRPC URL, such as `http://127.0.0.1:7070`.
    pub url: String,
    /// A file holding the bearer token.
    pub token_file: Option<PathBuf>,
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
        let connect_error = |message: String| CliError::Connect {
            url: self.url.clone(),
            message,
        };
        let channel = Endpoint::from_shared(self.url.clone())
            .map_err(|e| connect_error(e.to_string()))?
            .connect()
            .await
            .map_err(|e| connect_error(crate::error::error_text(&e)))?;
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

/// `breakwater checkpoint put`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PutArgs {
    /// The workflow's id.
    pub workflow: String,
    /// The step the workflow is at.
    #[arg(long, default_value = "")]
    pub step: String,
    /// Steps already done (repeat, or separate with commas).
    #[arg(long, value_delimiter = ',')]
    pub completed: Vec<String>,
    /// The state, inline (JSON is typical).
    #[arg(long)]
    pub state: Option<String>,
    /// The state, from a file (- for stdin).
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// Metadata, key=value (repeat).
    #[arg(long)]
    pub metadata: Vec<String>,
    /// Expire the workflow this long after this put.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<std::time::Duration>,
    /// Save only if the latest version is this one (0: none yet).
    #[arg(long)]
    pub expected_version: Option<u64>,
}

/// Saves a checkpoint.
pub async fn put(remote: &Remote, args: PutArgs) -> Result<(), CliError> {
    let state = match (args.state, args.state_file) {
        (Some(_), Some(_)) => {
            return Err(CliError::Usage(
                "give --state or --state-file, not both".into(),
            ));
        }
        (Some(text), None) => Bytes::from(text),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
                .map_err(|e| CliError::Usage(format!("cannot read stdin: {e}")))?;
            Bytes::from(bytes)
        }
        (None, Some(path)) => Bytes::from(
            std::fs::read(&path)
                .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?,
        ),
        (None, None) => Bytes::new(),
    };
    let mut metadata = std::collections::HashMap::new();
    for pair in &args.metadata {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| CliError::Usage(format!("--metadata {pair:?}: expected key=value")))?;
        metadata.insert(key.to_owned(), value.to_owned());
    }
    let response = remote
        .checkpoints()
        .await?
        .put(PutCheckpointRequest {
            workflow_id: args.workflow.clone(),
            step: args.step,
            completed_steps: args.completed,
            state,
            metadata,
            ttl: args
                .ttl
                .map(|t| prost_types::Duration::try_from(t).unwrap_or_default()),
            expected_version: args.expected_version,
        })
        .await?
        .into_inner();
    if remote.json {
        print_json(&serde_json::json!({"workflow_id": args.workflow, "version": response.version}));
    } else {
        println!(
            "workflow {}: version {} saved",
            args.workflow, response.version
        );
    }
    Ok(())
}

/// Shows the latest checkpoint or a version.
pub async fn get(remote: &Remote, workflow: String, version: u64) -> Result<(), CliError> {
    let checkpoint = remote
        .checkpoints()
        .await?
        .get(GetCheckpointRequest {
            workflow_id: workflow,
            version,
        })
        .await?
        .into_inner();
    if remote.json {
        print_json(&CheckpointJson::from(checkpoint));
    } else {
        print_checkpoint(checkpoint);
    }
    Ok(())
}

/// Lists a workflow's history, newest first.
pub async fn list(
    remote: &Remote,
    workflow: String,
    page_size: u32,
    page_token: String,
) -> Result<(), CliError> {
    let page = remote
        .checkpoints()
        .await?
        .list(ListCheckpointsRequest {
            workflow_id: workflow,
            page_size,
            page_token,
        })
        .await?
        .into_inner();
    if remote.json {
        let checkpoints: Vec<CheckpointJson> = page
            .checkpoints
            .into_iter()
            .map(CheckpointJson::from)
            .collect();
        print_json(&serde_json::json!({
            "checkpoints": checkpoints,
            "next_page_token": page.next_page_token,
        }));
        return Ok(());
    }
    let rows: Vec<[String; 4]> = page
        .checkpoints
        .iter()
        .map(|c| {
            [
                c.version.to_string(),
                c.step.clone(),
                time(c.created_at.as_ref()),
                format!("{} B", c.state.len()),
            ]
        })
        .collect();
    print_table(["VERSION", "STEP", "CREATED", "STATE"], &rows);
    if !page.next_page_token.is_empty() {
        println!("more: --page-token {}", page.next_page_token);
    }
    Ok(())
}

/// Deletes a workflow.
pub async fn delete(remote: &Remote, workflow: String) -> Result<(), CliError> {
    let deleted = remote
        .checkpoints()
        .await?
        .delete(DeleteCheckpointsRequest {
            workflow_id: workflow.clone(),
        })
        .await?
        .into_inner()
        .deleted;
    if remote.json {
        print_json(&serde_json::json!({"deleted": deleted}));
    } else {
        println!("workflow {workflow}: {deleted} checkpoints deleted");
    }
    Ok(())
}

/// Keeps a workflow's newest checkpoints.
pub async fn prune(remote: &Remote, workflow: String, keep: u32) -> Result<(), CliError> {
    let deleted = remote
        .checkpoints()
        .await?
        .prune(PruneCheckpointsRequest {
            workflow_id: workflow.clone(),
            keep,
        })
        .await?
        .into_inner()
        .deleted;
    if remote.json {
        print_json(&serde_json::json!({"deleted": deleted}));
    } else {
        println!("workflow {workflow}: {deleted} older checkpoints deleted, newest {keep} kept");
    }
    Ok(())
}

/// Lists dead letters, oldest first.
pub async fn dlq_list(
    remote: &Remote,
    upstream: String,
    page_size: u32,
    page_token: String,
) -> Result<(), CliError> {
    let page = remote
        .dead_letters()
        .await?
        .list(ListDeadLettersRequest {
            upstream,
            page_size,
            page_token,
            without_bodies: !remote.json,
        })
        .await?
        .into_inner();
    if remote.json {
        let letters: Vec<LetterJson> = page.letters.into_iter().map(LetterJson::from).collect();
        print_json(
            &serde_json::json!({"letters": letters, "next_page_token": page.next_page_token}),
        );
        return Ok(());
    }
    let rows: Vec<[String; 7]> = page
        .letters
        .iter()
        .map(|l| {
            [
                l.id.clone(),
                l.upstream.clone(),
                format!("{} {}", l.method, l.uri),
                l.reason.clone(),
                l.attempts.to_string(),
                l.replays.to_string(),
                time(l.failed_at.as_ref()),
            ]
        })
        .collect();
    print_table(
        [
            "ID", "UPSTREAM", "REQUEST", "REASON", "ATTEMPTS", "REPLAYS", "FAILED",
        ],
        &rows,
    );
    if !page.next_page_token.is_empty() {
        println!("more: --page-token {}", page.next_page_token);
    }
    Ok(())
}

/// Shows one letter, with its headers and body.
pub async fn dlq_show(remote: &Remote, id: String) -> Result<(), CliError> {
    let letter = remote
        .dead_letters()
        .await?
        .get(GetDeadLetterRequest { id })
        .await?
        .into_inner();
    if remote.json {
        print_json(&LetterJson::from(letter));
    } else {
        print_letter(&letter);
    }
    Ok(())
}

fn print_letter(l: &DeadLetter) {
    println!("id         {}", l.id);
    println!("upstream   {}", l.upstream);
    println!("source     {}", l.source);
    println!(
        "request    {} {}{}",
        l.method,
        l.uri,
        if l.grpc { " (gRPC)" } else { "" }
    );
    println!("reason     {} after {} attempts", l.reason, l.attempts);
    println!("failed     {}", time(l.failed_at.as_ref()));
    println!("replays    {}", l.replays);
    if !l.last_replay_error.is_empty() {
        println!(
            "last error {} ({})",
            l.last_replay_error,
            time(l.last_replay_at.as_ref())
        );
    }
    for header in &l.headers {
        println!(
            "header     {}: {}",
            header.name,
            String::from_utf8_lossy(&header.value)
        );
    }
    let cut = if l.body_truncated { " (truncated)" } else { "" };
    println!("body{cut}       {}", readable(&l.body));
}

/// What to replay or purge.
#[derive(Debug, Clone)]
pub enum Selection {
    /// These letters.
    Ids(Vec<String>),
    /// Every letter of an upstream.
    Upstream(String),
    /// Every letter.
    All,
}

/// Replays letters; fails if any stays undelivered.
pub async fn dlq_replay(remote: &Remote, selection: Selection) -> Result<(), CliError> {
    let mut client = remote.dead_letters().await?;
    let ids = match selection {
        Selection::Ids(ids) => ids,
        Selection::Upstream(upstream) => all_ids(&mut client, upstream).await?,
        Selection::All => all_ids(&mut client, String::new()).await?,
    };
    let mut results = Vec::new();
    let mut failed = 0;
    for id in ids {
        let outcome = client
            .replay(ReplayDeadLetterRequest { id: id.clone() })
            .await?
            .into_inner();
        if !outcome.delivered {
            failed += 1;
        }
        results.push((id, outcome));
    }
    if remote.json {
        let json: Vec<serde_json::Value> = results
            .iter()
            .map(|(id, o)| {
                serde_json::json!({"id": id, "delivered": o.delivered, "status": o.status, "error": o.error})
            })
            .collect();
        print_json(&json);
    } else {
        for (id, o) in &results {
            if o.delivered {
                println!("{id}: delivered ({}), removed", o.status);
            } else {
                println!("{id}: failed again: {}", o.error);
            }
        }
        println!("{} replayed, {failed} failed", results.len());
    }
    if failed > 0 {
        return Err(CliError::Usage(format!(
            "{failed} letters were not delivered and stay in the queue"
        )));
    }
    Ok(())
}

async fn all_ids(
    client: &mut DeadLettersClient<Authorized>,
    upstream: String,
) -> Result<Vec<String>, CliError> {
    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list(ListDeadLettersRequest {
                upstream: upstream.clone(),
                page_size: 1000,
                page_token,
                without_bodies: true,
            })
            .await?
            .into_inner();
        ids.extend(page.letters.into_iter().map(|l| l.id));
        if page.next_page_token.is_empty() {
            return Ok(ids);
        }
        page_token = page.next_page_token;
    }
}

/// Purges letters.
pub async fn dlq_purge(remote: &Remote, selection: Selection) -> Result<(), CliError> {
    let mut client = remote.dead_letters().await?;
    let targets = match selection {
        Selection::Ids(ids) => ids.into_iter().map(PurgeTarget::Id).collect(),
        Selection::Upstream(upstream) => vec![PurgeTarget::Upstream(upstream)],
        Selection::All => vec![PurgeTarget::All(true)],
    };
    let mut purged = 0;
    for target in targets {
        purged += client
            .purge(PurgeDeadLettersRequest {
                target: Some(target),
            })
            .await?
            .into_inner()
            .purged;
    }
    if remote.json {
        print_json(&serde_json::json!({"purged": purged}));
    } else {
        println!("{purged} letters purged");
    }
    Ok(())
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

fn print_json(value: &impl serde::Serialize) {
    println!(
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

fn print_checkpoint(c: Checkpoint) {
    println!("workflow   {}", c.workflow_id);
    println!("version    {}", c.version);
    println!("step       {}", c.step);
    println!("completed  {}", c.completed_steps.join(", "));
    println!("created    {}", time(c.created_at.as_ref()));
    println!("expires    {}", time(c.expires_at.as_ref()));
    let metadata: BTreeMap<_, _> = c.metadata.into_iter().collect();
    for (key, value) in metadata {
        println!("metadata   {key}={value}");
    }
    println!("state      {}", readable(&c.state));
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
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
