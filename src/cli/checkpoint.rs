//! `breakwater checkpoint put|get|list|delete|prune`.

use super::say;
use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::Bytes;

use super::{CliError, Remote, print_json, print_table, readable, time};
use crate::api::json::CheckpointJson;
use crate::api::{
    Checkpoint, DeleteCheckpointsRequest, GetCheckpointRequest, ListCheckpointsRequest,
    PruneCheckpointsRequest, PutCheckpointRequest,
};

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
        say!(
            "workflow {}: version {} saved",
            args.workflow,
            response.version
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
        say!("more: --page-token {}", page.next_page_token);
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
        say!("workflow {workflow}: {deleted} checkpoints deleted");
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
        say!("workflow {workflow}: {deleted} older checkpoints deleted, newest {keep} kept");
    }
    Ok(())
}

fn print_checkpoint(c: Checkpoint) {
    say!("workflow   {}", c.workflow_id);
    say!("version    {}", c.version);
    say!("step       {}", c.step);
    say!("completed  {}", c.completed_steps.join(", "));
    say!("created    {}", time(c.created_at.as_ref()));
    say!("expires    {}", time(c.expires_at.as_ref()));
    let metadata: BTreeMap<_, _> = c.metadata.into_iter().collect();
    for (key, value) in metadata {
        say!("metadata   {key}={value}");
    }
    say!("state      {}", readable(&c.state));
}
