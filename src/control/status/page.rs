//! The control plane's overview as HTML: the `<main>` the status page's
//! shell fetches, every value escaped, every button a confirmed call of
//! the API.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use super::{Overview, WORKFLOWS_LISTED};
use crate::web::escape;

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
    out.push_str("</tbody>\n</table>\n");
    letters_table(overview, now, out);
    out.push_str("</section>\n");
}

/// The oldest letters, one a row, with their replay and purge buttons.
fn letters_table(overview: &Overview, now: SystemTime, out: &mut String) {
    out.push_str(
        "<table class=\"letters\">\n<thead><tr><th>letter</th><th>upstream</th>\
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
    out.push_str("</tbody>\n</table>\n");
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
    fn ids_are_escaped_for_paths() {
        assert_eq!(segment("inv/17 a?b"), "inv%2F17%20a%3Fb");
        assert_eq!(segment("ok-1_2.3~"), "ok-1_2.3~");
    }
}
