//! `breakwater saga ...`: start sagas from YAML files, show, list, watch
//! and abort them.

use super::say;
use std::path::Path;

use tonic::transport::Channel;

use super::{Authorized, CliError, Remote, print_json, print_table};
use crate::api::sagas_client::SagasClient;
use crate::api::{AbortSagaRequest, GetSagaRequest, ListSagasRequest, StartSagaRequest};
use crate::api::{Saga, WatchSagasRequest};
use crate::control::saga::proto as saga_proto;
use crate::control::saga::spec::SagaSpec;
use crate::control::saga::{SagaEvent, SagaRecord, SagaState, StepRecord, Time};

type Client = SagasClient<Authorized>;

impl Remote {
    async fn sagas(&self) -> Result<Client, CliError> {
        let (channel, auth): (Channel, _) = self.channel().await?;
        Ok(SagasClient::with_interceptor(channel, auth)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX))
    }
}

/// Reads and checks a saga file (YAML or JSON), naming the file in every
/// problem.
pub fn read_spec(path: &Path) -> Result<SagaSpec, CliError> {
    let name = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("cannot read {name}: {e}")))?;
    let spec: SagaSpec =
        serde_saphyr::from_str(&text).map_err(|e| CliError::Usage(format!("{name}: {e}")))?;
    if let Err(problems) = spec.clone().check() {
        let lines: Vec<String> = problems.iter().map(|p| format!("  {name}: {p}")).collect();
        return Err(CliError::Usage(format!(
            "{name} is not a valid saga:\n{}",
            lines.join("\n")
        )));
    }
    Ok(spec)
}

/// `saga start FILE [--wait]`.
pub async fn start(remote: &Remote, file: &Path, wait: bool) -> Result<(), CliError> {
    let spec = read_spec(file)?;
    let id = spec.id.clone();
    let mut client = remote.sagas().await?;
    let saga = client
        .start(StartSagaRequest {
            definition: Some(saga_proto::spec_to_proto(&spec)),
        })
        .await?
        .into_inner();
    let record = saga_proto::record_from_proto(saga);
    if !wait {
        return print(remote, &record);
    }
    if !remote.json {
        say!("saga {id} is {}; watching", record.state.as_str());
    }
    follow(remote, &mut client, id.clone()).await?;
    let record = fetch(&mut client, &id).await?;
    print(remote, &record)?;
    ended(&record)
}

/// Exit statuses of a saga waited for: 0 completed, 3 compensated (its
/// steps undone), 4 aborted (undone on request), 5 failed (a compensation
/// failed: it needs a person). 1 is a command that could not run.
pub const EXIT_COMPENSATED: u8 = 3;
/// See [`EXIT_COMPENSATED`].
pub const EXIT_ABORTED: u8 = 4;
/// See [`EXIT_COMPENSATED`].
pub const EXIT_FAILED: u8 = 5;

/// Whether a saga that ended `completed`: else the exit status that says
/// how it ended.
fn ended(record: &SagaRecord) -> Result<(), CliError> {
    let state = record.state;
    let status = match state {
        SagaState::Compensated => EXIT_COMPENSATED,
        SagaState::Aborted => EXIT_ABORTED,
        SagaState::Failed => EXIT_FAILED,
        _ => return Ok(()),
    };
    Err(CliError::Ended {
        state: state.as_str(),
        status,
    })
}

/// `saga show ID`.
pub async fn show(remote: &Remote, id: &str) -> Result<(), CliError> {
    let mut client = remote.sagas().await?;
    show_with(remote, &mut client, id).await
}

async fn show_with(remote: &Remote, client: &mut Client, id: &str) -> Result<(), CliError> {
    print(remote, &fetch(client, id).await?)
}

async fn fetch(client: &mut Client, id: &str) -> Result<SagaRecord, CliError> {
    let saga = client
        .get(GetSagaRequest { id: id.to_owned() })
        .await?
        .into_inner();
    Ok(saga_proto::record_from_proto(saga))
}

fn print(remote: &Remote, record: &SagaRecord) -> Result<(), CliError> {
    if remote.json {
        print_json(record);
        return Ok(());
    }
    say!("saga      {}", record.id);
    say!("state     {}", record.state.as_str());
    say!("started   {}", when(Some(record.created_at)));
    say!("updated   {}", when(Some(record.updated_at)));
    if let Some(deadline) = record.deadline_at {
        say!("deadline  {}", when(Some(deadline)));
    }
    if record.abort_requested {
        say!("abort     requested");
    }
    if let Some(error) = &record.error {
        say!("error     {error}");
    }
    if record.state == SagaState::Failed {
        say!();
        say!("NEEDS A PERSON: {}", attention(record));
    }
    say!();
    let rows: Vec<[String; 6]> = record.steps.iter().map(step_row).collect();
    print_table(
        ["STEP", "STATE", "SENDS/ATTEMPTS", "ANSWER", "TOOK", "ERROR"],
        &rows,
    );
    Ok(())
}

/// What a person must do about a failed saga.
fn attention(record: &SagaRecord) -> String {
    let failed = record
        .steps
        .iter()
        .find(|s| s.state == crate::control::saga::StepState::CompensationFailed)
        .map_or("a step", |s| s.name.as_str());
    let left: Vec<&str> = record
        .steps
        .iter()
        .filter(|s| s.state == crate::control::saga::StepState::Succeeded)
        .map(|s| s.name.as_str())
        .collect();
    let mut text = format!("the compensation of {failed} failed");
    if let Some(letter) = &record.dead_letter_id {
        text.push_str(&format!(
            "; it is dead letter {letter} (breakwater dlq show {letter}, then dlq replay {letter} once its upstream is fixed)"
        ));
    }
    if !left.is_empty() {
        text.push_str(&format!(
            "; not compensated yet, in this order: {}",
            left.iter().rev().copied().collect::<Vec<_>>().join(", ")
        ));
    }
    text
}

fn step_row(step: &StepRecord) -> [String; 6] {
    let state = serde_json::to_value(step.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let call = step.compensation.as_ref().unwrap_or(&step.action);
    let took = match (call.started_at, call.finished_at) {
        (Some(a), Some(b)) if b >= a => format!("{} ms", b.0 - a.0),
        _ => "-".to_owned(),
    };
    let answer = match (call.status, call.grpc_status) {
        (0, _) => "-".to_owned(),
        (status, Some(grpc)) => format!("{status} grpc {grpc}"),
        (status, None) => status.to_string(),
    };
    let mut sends = format!("{}/{}", step.action.sends, step.action.attempts);
    if let Some(undo) = &step.compensation {
        sends.push_str(&format!(" undo {}/{}", undo.sends, undo.attempts));
    }
    [
        step.name.clone(),
        state,
        sends,
        answer,
        took,
        call.error.clone().unwrap_or_default(),
    ]
}

fn when(t: Option<Time>) -> String {
    t.map_or_else(
        || "-".into(),
        |t| humantime::format_rfc3339_seconds(t.system()).to_string(),
    )
}

/// `saga list [--state S]`.
pub async fn list(
    remote: &Remote,
    state: Option<String>,
    page_size: u32,
    page_token: String,
) -> Result<(), CliError> {
    let state = match state.as_deref() {
        None => None,
        Some(text) => Some(SagaState::parse(text).ok_or_else(|| {
            CliError::Usage(format!(
                "--state {text:?}: expected running, completed, compensating, compensated, failed or aborted"
            ))
        })?),
    };
    let page = remote
        .sagas()
        .await?
        .list(ListSagasRequest {
            state: state.map_or(0, |s| saga_proto::state_to_proto(s) as i32),
            page_size,
            page_token,
        })
        .await?
        .into_inner();
    let records: Vec<SagaRecord> = page
        .sagas
        .into_iter()
        .map(saga_proto::record_from_proto)
        .collect();
    if remote.json {
        print_json(&serde_json::json!({"sagas": records, "next_page_token": page.next_page_token}));
        return Ok(());
    }
    let rows: Vec<[String; 5]> = records
        .iter()
        .map(|r| {
            let done = r
                .steps
                .iter()
                .filter(|s| s.state != crate::control::saga::StepState::Pending)
                .count();
            let note = if r.state == SagaState::Failed {
                "NEEDS A PERSON".to_owned()
            } else {
                r.error.clone().unwrap_or_default()
            };
            [
                r.id.clone(),
                r.state.as_str().to_owned(),
                format!("{done}/{}", r.steps.len()),
                when(Some(r.updated_at)),
                note,
            ]
        })
        .collect();
    print_table(["SAGA", "STATE", "STEPS", "UPDATED", "NOTE"], &rows);
    if !page.next_page_token.is_empty() {
        say!("more: --page-token {}", page.next_page_token);
    }
    Ok(())
}

/// `saga watch [ID]`: events until the saga ends (or forever for all);
/// one saga's watch exits as `start --wait` does.
pub async fn watch(remote: &Remote, id: Option<String>) -> Result<(), CliError> {
    let mut client = remote.sagas().await?;
    follow(remote, &mut client, id.clone().unwrap_or_default()).await?;
    match id {
        Some(id) => ended(&fetch(&mut client, &id).await?),
        None => Ok(()),
    }
}

async fn follow(remote: &Remote, client: &mut Client, id: String) -> Result<(), CliError> {
    let mut events = client.watch(WatchSagasRequest { id }).await?.into_inner();
    while let Some(event) = events.message().await? {
        let event: SagaEvent = saga_proto::event_from_proto(event);
        if remote.json {
            say!(
                "{}",
                serde_json::to_string(&event).expect("events serialize")
            );
        } else {
            say!(
                "{}  {}  {:<12}  {}",
                when(Some(event.at)),
                event.saga_id,
                event.state.as_str(),
                event.message
            );
        }
    }
    Ok(())
}

/// `saga abort ID [--reason R]`.
pub async fn abort(remote: &Remote, id: String, reason: String) -> Result<(), CliError> {
    let saga: Saga = remote
        .sagas()
        .await?
        .abort(AbortSagaRequest { id, reason })
        .await?
        .into_inner();
    let record = saga_proto::record_from_proto(saga);
    if remote.json {
        print_json(&record);
    } else {
        say!(
            "saga {} will stop after its step in flight and compensate (watch it: breakwater saga watch {})",
            record.id,
            record.id
        );
    }
    Ok(())
}
