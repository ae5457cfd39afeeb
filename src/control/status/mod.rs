//! The control plane's status page: `/` on its JSON port, for people;
//! `/v1/status`, the same overview for scripts.
//!
//! - sagas: how many are in each state, and the unfinished and unhappy
//!   ones listed, failed first: for each, its steps done, what is left to
//!   undo (the steps whose compensation has not run, in the order they
//!   would be undone), why, and a link to the dead letter of the
//!   compensation that failed;
//! - dead letters: how many, grouped by upstream and reason, and the
//!   oldest listed, each with buttons to replay or purge it (and an
//!   upstream's all at once);
//! - checkpoints: each workflow's latest step, version, age and expiry.
//!
//! The page is served on the JSON port because what it shows (saga
//! errors, letters' requests) is the API's to guard: it is a shell, with
//! no data in it, whose few lines of plain JavaScript fetch the rendered
//! overview (`/v1/status/page`, HTML made here) every 5 seconds with the
//! bearer token, when the control plane has one. The token is asked for
//! on the page, or given in the address's fragment (`/#token=...`, which
//! no browser sends to a server), and kept for the tab only. Its buttons
//! ask for a confirmation and call the API, which checks the token (a
//! read-only one may look, not replay) and refuses a page of another
//! origin.
//!
//! Listing is bounded: at most 50 sagas of each state, letters grouped
//! over the oldest 500 and the oldest 50 listed, the first 50 workflows
//! by id. The counts are the store's, as `/metrics` reports them.

use std::time::SystemTime;

use serde::Serialize;

use super::error::ApiError;
use super::plane::ControlPlane;
use super::saga::record::{SagaRecord, SagaState, StepState, Time};
use crate::api::json::rfc3339;

/// Sagas listed of each state.
mod page;
pub use page::page;

const SAGAS_PER_STATE: usize = 50;
/// Letters grouped (the oldest).
const LETTERS_GROUPED: usize = 500;
/// Letters listed (the oldest).
const LETTERS_LISTED: usize = 50;
/// Workflows listed (by id).
const WORKFLOWS_LISTED: usize = 50;

/// The states listed, in the order shown: the ones a person must look at
/// first. Completed sagas are only counted.
const LISTED: [SagaState; 5] = [
    SagaState::Failed,
    SagaState::Compensating,
    SagaState::Running,
    SagaState::Aborted,
    SagaState::Compensated,
];

/// Everything the page shows.
#[derive(Debug, Serialize)]
pub struct Overview {
    /// Sagas in each state, every state named (in JSON, an object by
    /// state).
    #[serde(serialize_with = "by_state")]
    pub saga_counts: Vec<(SagaState, u64)>,
    /// The sagas listed, failed first.
    pub sagas: Vec<SagaRow>,
    /// Dead letters stored.
    pub dead_letters: u64,
    /// Letters by upstream and reason, over the oldest `grouped`.
    pub letter_groups: Vec<LetterGroup>,
    /// How many letters the groups cover.
    pub grouped: usize,
    /// The oldest letters.
    pub letters: Vec<LetterRow>,
    /// The first workflows by id, each with its latest checkpoint.
    pub workflows: Vec<WorkflowRow>,
    /// Whether there are more workflows than listed.
    pub more_workflows: bool,
}

fn by_state<S: serde::Serializer>(counts: &[(SagaState, u64)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(counts.iter().map(|(state, n)| (state.as_str(), n)))
}

/// One saga, as listed.
#[derive(Debug, Serialize)]
pub struct SagaRow {
    /// Its id.
    pub id: String,
    /// Its state.
    pub state: SagaState,
    /// Steps whose action has run (or is running).
    pub steps_done: usize,
    /// Its steps.
    pub steps: usize,
    /// The steps whose compensation has not run, last first.
    pub left_to_undo: Vec<String>,
    /// Why it compensated, failed or was aborted.
    pub error: Option<String>,
    /// Its latest transition.
    pub updated_at: Time,
    /// The dead letter of the compensation that failed.
    pub dead_letter_id: Option<String>,
}

/// Letters of one upstream and reason.
#[derive(Debug, Serialize)]
pub struct LetterGroup {
    /// The upstream.
    pub upstream: String,
    /// Why they failed.
    pub reason: String,
    /// How many.
    pub count: u64,
    /// When the oldest failed.
    pub oldest: Option<String>,
}

/// One letter, as listed.
#[derive(Debug, Serialize)]
pub struct LetterRow {
    /// Its id.
    pub id: String,
    /// The upstream.
    pub upstream: String,
    /// Why it failed.
    pub reason: String,
    /// The request's method.
    pub method: String,
    /// The request's URI.
    pub uri: String,
    /// Attempts made before it was dead-lettered.
    pub attempts: u32,
    /// When it failed.
    pub failed_at: Option<String>,
    /// Replays tried.
    pub replays: u32,
    /// Why the last replay failed.
    pub last_replay_error: String,
}

/// A workflow's latest checkpoint.
#[derive(Debug, Serialize)]
pub struct WorkflowRow {
    /// The workflow.
    pub workflow: String,
    /// Its latest version.
    pub version: u64,
    /// The step it is at.
    pub step: String,
    /// Steps done.
    pub completed_steps: usize,
    /// When the latest version was written.
    pub written_at: Option<String>,
    /// When the workflow expires.
    pub expires_at: Option<String>,
}

fn saga_row(record: &SagaRecord) -> SagaRow {
    let undoable = |i: usize| {
        record
            .definition
            .steps
            .get(i)
            .is_some_and(|s| s.compensation.is_some())
    };
    let left_to_undo = record
        .steps
        .iter()
        .enumerate()
        .rev()
        .filter(|(i, s)| {
            matches!(
                s.state,
                StepState::Succeeded | StepState::Compensating | StepState::CompensationFailed
            ) && undoable(*i)
        })
        .map(|(_, s)| s.name.clone())
        .collect();
    SagaRow {
        id: record.id.clone(),
        state: record.state,
        steps_done: record
            .steps
            .iter()
            .filter(|s| s.state != StepState::Pending)
            .count(),
        steps: record.steps.len(),
        left_to_undo,
        error: record.error.clone(),
        updated_at: record.updated_at,
        dead_letter_id: record.dead_letter_id.clone(),
    }
}

/// The overview now.
pub fn overview(control: &ControlPlane) -> Result<Overview, ApiError> {
    let counts = control.sagas.counts()?;
    let saga_counts = SagaState::ALL
        .into_iter()
        .map(|state| {
            let n = counts
                .iter()
                .find(|(s, _)| *s == state)
                .map_or(0, |(_, n)| *n);
            (state, n)
        })
        .collect();
    let mut sagas = Vec::new();
    for state in LISTED {
        let (records, _) = control.sagas.list(Some(state), None, SAGAS_PER_STATE)?;
        sagas.extend(records.iter().map(saga_row));
    }

    let store = &control.store;
    let (oldest, _) = store.list_letters(None, None, LETTERS_GROUPED, false)?;
    let letter_groups = group_letters(&oldest);
    let letters = oldest
        .iter()
        .take(LETTERS_LISTED)
        .map(|l| LetterRow {
            id: l.id.clone(),
            upstream: l.upstream.clone(),
            reason: l.reason.clone(),
            method: l.method.clone(),
            uri: l.uri.clone(),
            attempts: l.attempts,
            failed_at: rfc3339(l.failed_at.as_ref()),
            replays: l.replays,
            last_replay_error: l.last_replay_error.clone(),
        })
        .collect();

    let (latest, next) = store.list_workflows(None, WORKFLOWS_LISTED, SystemTime::now())?;
    let workflows = latest
        .into_iter()
        .map(|c| WorkflowRow {
            version: c.version,
            step: c.step,
            completed_steps: c.completed_steps.len(),
            written_at: rfc3339(c.created_at.as_ref()),
            expires_at: rfc3339(c.expires_at.as_ref()),
            workflow: c.workflow_id,
        })
        .collect();
    Ok(Overview {
        saga_counts,
        sagas,
        dead_letters: store.letter_count(),
        grouped: oldest.len(),
        letter_groups,
        letters,
        workflows,
        more_workflows: next.is_some(),
    })
}

/// The letters by upstream and reason: an upstream's groups together,
/// the upstream with most letters first.
fn group_letters(oldest: &[crate::api::DeadLetter]) -> Vec<LetterGroup> {
    let mut letter_groups: Vec<LetterGroup> = Vec::new();
    for letter in oldest {
        let reason = kind_of(&letter.reason);
        match letter_groups
            .iter_mut()
            .find(|g| g.upstream == letter.upstream && g.reason == reason)
        {
            Some(group) => group.count += 1,
            None => letter_groups.push(LetterGroup {
                upstream: letter.upstream.clone(),
                reason: reason.to_owned(),
                count: 1,
                oldest: rfc3339(letter.failed_at.as_ref()),
            }),
        }
    }
    // An upstream's groups together, the upstream with most letters
    // first; within it, the largest group first.
    let totals: Vec<u64> = letter_groups
        .iter()
        .map(|g| {
            letter_groups
                .iter()
                .filter(|o| o.upstream == g.upstream)
                .map(|o| o.count)
                .sum()
        })
        .collect();
    let mut keyed: Vec<(u64, LetterGroup)> = totals.into_iter().zip(letter_groups).collect();
    keyed.sort_by(|(ta, a), (tb, b)| {
        tb.cmp(ta)
            .then(a.upstream.cmp(&b.upstream))
            .then(b.count.cmp(&a.count))
    });
    keyed.into_iter().map(|(_, g)| g).collect()
}

/// A reason without what is particular to one letter: a saga's letters
/// say which saga (`saga signup-ann: the compensation of ...`), and are
/// grouped by the rest.
fn kind_of(reason: &str) -> &str {
    reason
        .strip_prefix("saga ")
        .and_then(|rest| rest.split_once(": "))
        .map_or(reason, |(_, rest)| rest)
}

/// The page's shell: no data, only the script that fetches it.
pub const SHELL: &str = include_str!("status.html");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saga_letter_is_grouped_by_what_failed_not_by_its_saga() {
        assert_eq!(
            kind_of("saga signup-ann: the compensation of step a failed"),
            "the compensation of step a failed"
        );
        assert_eq!(kind_of("timeout"), "timeout");
        assert_eq!(kind_of("saga without a colon"), "saga without a colon");
    }
}
