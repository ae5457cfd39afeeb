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

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::error::ApiError;
use super::plane::ControlPlane;
use super::saga::record::{SagaRecord, SagaState, StepState, Time};
use crate::api::json::rfc3339;
use crate::web::escape;

/// Sagas listed of each state.
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
    let mut letter_groups: Vec<LetterGroup> = Vec::new();
    for letter in &oldest {
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
    let letter_groups: Vec<LetterGroup> = keyed.into_iter().map(|(_, g)| g).collect();
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

/// A reason without what is particular to one letter: a saga's letters
/// say which saga (`saga signup-ann: the compensation of ...`), and are
/// grouped by the rest.
fn kind_of(reason: &str) -> &str {
    reason
        .strip_prefix("saga ")
        .and_then(|rest| rest.split_once(": "))
        .map_or(reason, |(_, rest)| rest)
}

/// A span of time in a few characters: `42 s`, `7 min`, `3 h`, `12 d`.
fn span(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..120 => format!("{s} s"),
        120..7_200 => format!("{} min", s / 60),
        7_200..172_800 => format!("{} h", s / 3_600),
        _ => format!("{} d", s / 86_400),
    }
}

/// An RFC 3339 time as "5 min ago" or "in 2 h", with the time itself in
/// its title; a dash for none.
fn when(time: Option<&str>, now: SystemTime) -> String {
    let Some(text) = time else {
        return "–".to_owned();
    };
    let Ok(at) = humantime::parse_rfc3339_weak(text) else {
        return escape(text);
    };
    let relative = match now.duration_since(at) {
        Ok(ago) => format!("{} ago", span(ago)),
        Err(ahead) => format!("in {}", span(ahead.duration())),
    };
    format!("<span title=\"{}\">{relative}</span>", escape(text))
}

/// A button that calls the API after asking `question`, and says `done`
/// when it has.
fn button(method: &str, path: &str, label: &str, question: &str, done: &str) -> String {
    format!(
        "<button data-method=\"{method}\" data-path=\"{}\" data-confirm=\"{}\" \
         data-done=\"{}\">{label}</button>",
        escape(path),
        escape(question),
        escape(done)
    )
}

/// `%`-escapes an id for a path segment (ids may hold `/`, `?`, spaces).
fn segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn empty_row(columns: usize, text: &str) -> String {
    format!("<tr class=\"none\"><td colspan=\"{columns}\">{text}</td></tr>\n")
}

fn sagas_section(overview: &Overview, now: SystemTime, out: &mut String) {
    out.push_str("<section id=\"sagas\">\n<h2>Sagas</h2>\n<p class=\"counts\">");
    for (state, count) in &overview.saga_counts {
        let state = state.as_str();
        let _ = write!(
            out,
            "<span class=\"state {state}\" data-count=\"{state}\">{state} <b>{count}</b></span> "
        );
    }
    out.push_str(
        "</p>\n<table>\n<thead><tr><th>saga</th><th>state</th><th>steps</th>\
         <th>left to undo</th><th>why</th><th>updated</th><th>dead letter</th>\
         <th>actions</th></tr></thead>\n<tbody>\n",
    );
    for saga in &overview.sagas {
        let id = escape(&saga.id);
        let state = saga.state.as_str();
        let undo = if saga.left_to_undo.is_empty() {
            "–".to_owned()
        } else {
            escape(&saga.left_to_undo.join(", "))
        };
        let letter = saga.dead_letter_id.as_deref().map_or_else(
            || "–".to_owned(),
            |l| format!("<a href=\"#letter-{0}\">{0}</a>", escape(l)),
        );
        let actions = if saga.state.finished() {
            String::new()
        } else {
            button(
                "POST",
                &format!("/v1/sagas/{}/abort", segment(&saga.id)),
                "abort",
                &format!("abort saga {} and undo what it did?", saga.id),
                &format!("Saga {} is being aborted.", saga.id),
            )
        };
        let _ = writeln!(
            out,
            "<tr data-saga=\"{id}\" class=\"{state}\"><th>{id}</th>\
             <td class=\"state {state}\">{state}</td><td>{}/{}</td><td>{undo}</td>\
             <td class=\"why\">{}</td><td>{}</td><td>{letter}</td><td>{actions}</td></tr>",
            saga.steps_done,
            saga.steps,
            escape(saga.error.as_deref().unwrap_or("–")),
            when(
                Some(&humantime::format_rfc3339_millis(saga.updated_at.system()).to_string()),
                now
            ),
        );
    }
    if overview.sagas.is_empty() {
        out.push_str(&empty_row(8, "none failed, undoing, running or undone"));
    }
    out.push_str("</tbody>\n</table>\n</section>\n");
}

fn letters_section(overview: &Overview, now: SystemTime, out: &mut String) {
    let _ = write!(
        out,
        "<section id=\"dead-letters\">\n<h2>Dead letters <small data-count=\"dead-letters\">{}</small></h2>\n",
        overview.dead_letters
    );
    if overview.dead_letters > overview.grouped as u64 {
        let _ = writeln!(
            out,
            "<p class=\"note\">Grouped over the oldest {}.</p>",
            overview.grouped
        );
    }
    out.push_str(
        "<table class=\"groups\">\n<thead><tr><th>upstream</th><th>reason</th><th>letters</th>\
         <th>oldest</th><th>actions</th></tr></thead>\n<tbody>\n",
    );
    for (i, group) in overview.letter_groups.iter().enumerate() {
        let upstream = escape(&group.upstream);
        // The button purges every letter of the upstream: once, on its
        // first group.
        let first = i == 0 || overview.letter_groups[i - 1].upstream != group.upstream;
        let action = if first {
            button(
                "DELETE",
                &format!("/v1/dead-letters?upstream={}", segment(&group.upstream)),
                &format!("purge all of {upstream}"),
                &format!(
                    "purge every dead letter of {}? They cannot be replayed afterwards.",
                    group.upstream
                ),
                &format!("The dead letters of {} are purged.", group.upstream),
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "<tr data-group=\"{upstream}\"><th>{upstream}</th><td class=\"reason\">{}</td><td>{}</td>\
             <td>{}</td><td>{action}</td></tr>",
            escape(&group.reason),
            group.count,
            when(group.oldest.as_deref(), now),
        );
    }
    if overview.letter_groups.is_empty() {
        out.push_str(&empty_row(5, "none: nothing waits to be replayed"));
    }
    out.push_str(
        "</tbody>\n</table>\n<table class=\"letters\">\n<thead><tr><th>letter</th><th>upstream</th>\
         <th>reason</th><th>request</th><th>attempts</th><th>failed</th><th>replays</th>\
         <th>actions</th></tr></thead>\n<tbody>\n",
    );
    for letter in &overview.letters {
        let id = escape(&letter.id);
        let replays = if letter.last_replay_error.is_empty() {
            letter.replays.to_string()
        } else {
            format!(
                "{} <small>{}</small>",
                letter.replays,
                escape(&letter.last_replay_error)
            )
        };
        let path = format!("/v1/dead-letters/{}", segment(&letter.id));
        let _ = writeln!(
            out,
            "<tr id=\"letter-{id}\" data-letter=\"{id}\"><th>{id}</th><td>{}</td><td class=\"reason\">{}</td>\
             <td class=\"request\">{} {}</td><td>{}</td><td>{}</td><td>{replays}</td><td>{}{}</td></tr>",
            escape(&letter.upstream),
            escape(&letter.reason),
            escape(&letter.method),
            escape(&letter.uri),
            letter.attempts,
            when(letter.failed_at.as_deref(), now),
            button(
                "POST",
                &format!("{path}/replay"),
                "replay",
                &format!("send letter {} to {} again?", letter.id, letter.upstream),
                &format!("Letter {} was delivered, and left the queue.", letter.id),
            ),
            button(
                "DELETE",
                &path,
                "purge",
                &format!(
                    "purge letter {}? It cannot be replayed afterwards.",
                    letter.id
                ),
                &format!("Letter {} is purged.", letter.id),
            ),
        );
    }
    out.push_str("</tbody>\n</table>\n</section>\n");
}

fn checkpoints_section(overview: &Overview, now: SystemTime, out: &mut String) {
    out.push_str(
        "<section id=\"checkpoints\">\n<h2>Checkpoints</h2>\n<table>\n<thead><tr><th>workflow</th>\
         <th>step</th><th>version</th><th>steps done</th><th>written</th><th>expires</th></tr></thead>\n<tbody>\n",
    );
    for w in &overview.workflows {
        let workflow = escape(&w.workflow);
        let _ = writeln!(
            out,
            "<tr data-workflow=\"{workflow}\"><th>{workflow}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&w.step),
            w.version,
            w.completed_steps,
            when(w.written_at.as_deref(), now),
            when(w.expires_at.as_deref(), now),
        );
    }
    if overview.workflows.is_empty() {
        out.push_str(&empty_row(6, "none"));
    }
    out.push_str("</tbody>\n</table>\n");
    if overview.more_workflows {
        let _ = writeln!(
            out,
            "<p class=\"note\">The first {WORKFLOWS_LISTED} by id; every workflow's latest is at \
             <code>GET /v1/checkpoints</code>.</p>"
        );
    }
    out.push_str("</section>\n");
}

/// The overview as the page's `<main>`, the `render`th served.
pub fn page(overview: &Overview, render: u64, now: SystemTime) -> String {
    let mut out = format!("<main data-render=\"{render}\">\n");
    sagas_section(overview, now, &mut out);
    letters_section(overview, now, &mut out);
    checkpoints_section(overview, now, &mut out);
    out.push_str("</main>\n");
    out
}

/// The page's shell: no data, only the script that fetches it.
pub const SHELL: &str = include_str!("status.html");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_in_a_few_characters() {
        assert_eq!(span(Duration::from_secs(42)), "42 s");
        assert_eq!(span(Duration::from_secs(7 * 60)), "7 min");
        assert_eq!(span(Duration::from_secs(3 * 3600)), "3 h");
        assert_eq!(span(Duration::from_secs(12 * 86_400)), "12 d");
        let now = humantime::parse_rfc3339("2026-12-01T12:00:00Z").unwrap();
        assert!(when(Some("2026-12-01T11:55:00Z"), now).contains(">5 min ago<"));
        assert!(when(Some("2026-12-01T14:00:00Z"), now).contains(">in 2 h<"));
        assert_eq!(when(None, now), "–");
    }

    #[test]
    fn a_saga_letter_is_grouped_by_what_failed_not_by_its_saga() {
        assert_eq!(
            kind_of("saga signup-ann: the compensation of step a failed"),
            "the compensation of step a failed"
        );
        assert_eq!(kind_of("timeout"), "timeout");
        assert_eq!(kind_of("saga without a colon"), "saga without a colon");
    }

    #[test]
    fn ids_are_escaped_for_paths() {
        assert_eq!(segment("inv/17 a?b"), "inv%2F17%20a%3Fb");
        assert_eq!(segment("ok-1_2.3~"), "ok-1_2.3~");
    }
}
