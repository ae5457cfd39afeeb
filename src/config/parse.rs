//! From YAML text to the raw model, with every problem serde can find.
//!
//! serde stops at the first error. To report the others, the text is read
//! again with the offending value's lines blanked (emptied, so that every
//! other line keeps its number), until it reads, up to [`MAX_PASSES`]
//! times. A blanked value can make its parent fail in turn (a required
//! field now missing, a block now empty): an error at, above or below a
//! blanked field is not reported, and the blank widens to the block that
//! holds it. A YAML syntax error ends the search, since nothing after it
//! can be read. Once the text reads, the checks of `resolve` run on it,
//! and report what they find outside the blanked upstreams (or sections).

use super::check::unit;
use super::raw::{RawConfig, RawKeyPositions};
use super::{Config, ConfigError, Diagnostic};

/// How many times the text is read, at most: the first error and up to
/// this many more.
const MAX_PASSES: usize = 20;

/// One problem, and whether it is one of YAML's syntax.
struct Found {
    diagnostic: Diagnostic,
    syntax: bool,
}

/// Lines blanked, in place of the field that failed.
struct Blank {
    field: String,
    /// 0-based, end exclusive.
    lines: std::ops::Range<usize>,
}

/// Reads, checks and resolves `text`: the config, or every problem found.
pub(super) fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
    let first = match deserialize(text) {
        Ok(raw) => return super::resolve::resolve(file, raw),
        Err(found) => found,
    };
    let mut found = vec![first];
    if found[0].syntax {
        return Err(every(file, found, Vec::new()));
    }
    // Blanking lines is safe in YAML that reads, and only there: a
    // syntax error further down is reported beside the first, and ends
    // the search.
    if let Err(syntax) = deserialize_with_path::<serde::de::IgnoredAny>(text) {
        found.push(syntax);
        return Err(every(file, found, Vec::new()));
    }
    let lines: Vec<&str> = text.lines().collect();
    let mut blanks: Vec<Blank> = Vec::new();
    let mut resolved = None;
    for _ in 0..MAX_PASSES {
        let last = found.last().expect("at least one");
        let Some(at) = row(&lines, last.diagnostic.line) else {
            break;
        };
        blanks.push(Blank {
            field: last.diagnostic.field.clone(),
            lines: block(&lines, at),
        });
        loop {
            match deserialize(&masked(&lines, &blanks)) {
                Ok(raw) => {
                    resolved = Some(raw);
                    break;
                }
                // The blanks broke the YAML: nothing more can be found.
                Err(next) if next.syntax => return Err(every(file, found, Vec::new())),
                Err(next) if !related(&blanks, &next.diagnostic.field) => {
                    found.push(next);
                    break;
                }
                Err(next) => {
                    // Caused by a blank: widen it to its parent's block.
                    if !widen(&lines, &mut blanks, &next.diagnostic.field) {
                        return Err(every(file, found, Vec::new()));
                    }
                }
            }
        }
        if resolved.is_some() {
            break;
        }
    }
    let mut checked = Vec::new();
    if let Some(raw) = resolved
        && let Err(e) = super::resolve::resolve(file, raw)
    {
        let scopes: Vec<Scope> = blanks.iter().map(|b| scope(&lines, b)).collect();
        checked = e
            .diagnostics
            .into_iter()
            .filter(|d| stands(&lines, &scopes, d))
            .collect();
    }
    Err(every(file, found, checked))
}

fn every(file: &str, found: Vec<Found>, checked: Vec<Diagnostic>) -> ConfigError {
    let mut diagnostics: Vec<Diagnostic> = found
        .into_iter()
        .map(|f| f.diagnostic)
        .chain(checked)
        .collect();
    diagnostics.sort_by_key(|d| (d.line, d.column));
    diagnostics.dedup();
    ConfigError {
        file: file.to_owned(),
        diagnostics,
    }
}

/// The 0-based row of a 1-based line, if the text has it.
fn row(lines: &[&str], line: u64) -> Option<usize> {
    let row = usize::try_from(line).ok()?.checked_sub(1)?;
    (row < lines.len()).then_some(row)
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

fn empty(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#')
}

/// Row `at` and the rows below it indented further: the value at `at`.
fn block(lines: &[&str], at: usize) -> std::ops::Range<usize> {
    let depth = indent(lines[at]);
    let mut end = at + 1;
    while end < lines.len() && (empty(lines[end]) || indent(lines[end]) > depth) {
        end += 1;
    }
    at..end
}

/// The row above `at` that holds it (less indented), if any.
fn parent(lines: &[&str], at: usize) -> Option<usize> {
    let depth = indent(lines[at]);
    (0..at)
        .rev()
        .find(|&r| !empty(lines[r]) && indent(lines[r]) < depth)
}

/// Whether `field` is a blanked field, holds one or is held by one (on
/// segment boundaries: `a.b` holds `a.b.c` and `a.b[0]`, not `a.bc`).
fn related(blanks: &[Blank], field: &str) -> bool {
    let within = |inner: &str, outer: &str| {
        outer.is_empty()
            || inner == outer
            || inner
                .strip_prefix(outer)
                .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
    };
    blanks
        .iter()
        .any(|b| within(&b.field, field) || within(field, &b.field))
}

/// Widens the blank related to `field` to the block that holds it;
/// `false` when it is already a whole top-level section.
fn widen(lines: &[&str], blanks: &mut [Blank], field: &str) -> bool {
    let Some(blank) = blanks
        .iter_mut()
        .rev()
        .find(|b| related(std::slice::from_ref(*b), field))
    else {
        return false;
    };
    let Some(up) = parent(lines, blank.lines.start) else {
        return false;
    };
    blank.lines = block(lines, up);
    blank.field = field.to_owned();
    true
}

/// The text with the blanked rows emptied.
fn masked(lines: &[&str], blanks: &[Blank]) -> String {
    let mut out = String::new();
    for (r, line) in lines.iter().enumerate() {
        if !blanks.iter().any(|b| b.lines.contains(&r)) {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// What a blank makes the checks unreliable for: its rows and an
/// upstream's name (others may name a blanked upstream in `failover`).
enum Scope {
    /// Every check: a whole section, or `defaults`, which every upstream
    /// merges.
    All,
    /// The checks of these rows, and those naming this upstream.
    Rows(std::ops::Range<usize>, Option<String>),
}

/// The scope of a blank: the upstream it is in (the block under
/// `upstreams:`), or the top-level section.
fn scope(lines: &[&str], blank: &Blank) -> Scope {
    let mut at = blank.lines.start;
    let mut chain = vec![at];
    while let Some(up) = parent(lines, at) {
        chain.push(up);
        at = up;
    }
    let top = *chain.last().expect("the row itself");
    let key = |row: usize| lines[row].trim().split(':').next().unwrap_or("").trim();
    match (key(top), chain.len()) {
        (_, 1) | ("defaults", _) => Scope::All,
        // The whole upstream is gone: also what names it.
        ("upstreams", 2) => Scope::Rows(block(lines, chain[0]), Some(key(chain[0]).to_owned())),
        ("upstreams", n) => Scope::Rows(block(lines, chain[n - 2]), None),
        _ => Scope::Rows(block(lines, top), None),
    }
}

/// Whether a check's diagnostic stands, given the blanks' scopes.
fn stands(lines: &[&str], scopes: &[Scope], d: &Diagnostic) -> bool {
    let Some(row) = row(lines, d.line) else {
        return false;
    };
    scopes.iter().all(|scope| match scope {
        Scope::All => false,
        Scope::Rows(rows, name) => {
            !rows.contains(&row)
                && name
                    .as_ref()
                    .is_none_or(|name| !d.message.contains(&format!("{name:?}")))
        }
    })
}

/// Deserializes the raw model: its first problem, as a diagnostic with
/// the field path.
fn deserialize(text: &str) -> Result<RawConfig, Found> {
    let blank = text
        .lines()
        .all(|line| line.trim().is_empty() || line.trim_start().starts_with('#'));
    if blank {
        return Err(Found {
            diagnostic: Diagnostic {
                line: 1,
                column: 1,
                field: String::new(),
                message: "the file is empty: a policy file names the upstreams the sidecar calls, such as `upstreams: {ocr: {address: 'ocr-agent:8080'}}`".to_owned(),
            },
            syntax: true,
        });
    }
    let mut raw: RawConfig = deserialize_with_path(text)?;
    let positions: RawKeyPositions = deserialize_with_path(text)?;
    for ((name, _), (key, _)) in raw.upstreams.0.iter_mut().zip(positions.upstreams.0) {
        debug_assert_eq!(*name, key.value);
        raw.upstream_names.push(unit(&key));
    }
    Ok(raw)
}

fn deserialize_with_path<'de, T: serde::Deserialize<'de>>(text: &'de str) -> Result<T, Found> {
    let mut path = String::new();
    let parsed = serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = clean_path(&e.path().to_string());
            e.into_inner()
        })
    });
    parsed.map_err(|e| {
        let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
        let bare = e.without_snippet();
        // The YAML parser's own errors: the text cannot be read on.
        let syntax = matches!(
            bare,
            serde_saphyr::Error::ExternalMessage { .. }
                | serde_saphyr::Error::Eof { .. }
                | serde_saphyr::Error::MultipleDocuments { .. }
        );
        let message = bare.to_string();
        let message = match message.rfind(" at line ") {
            Some(cut) => message[..cut].to_owned(),
            None => message,
        };
        Found {
            diagnostic: Diagnostic {
                line,
                column,
                field: path,
                message: in_words(&message.replace('`', "\"")),
            },
            syntax,
        }
    })
}

/// What YAML's parser says, in plain words: what it expected here.
const SYNTAX: [(&str, &str); 14] = [
    (
        "illegal placement of ':'",
        "a `:` where none can be: quote a value that holds one",
    ),
    (
        "mapping values are not allowed",
        "a `key: value` where none can be: check that this line is indented as far as the keys \
         it belongs with, and quote a value that holds \": \"",
    ),
    ("tabs disallowed", "YAML indents with spaces, not tabs"),
    (
        "tab cannot be used as indentation",
        "YAML indents with spaces, not tabs",
    ),
    (
        "unclosed bracket '{'",
        "this `{` is never closed: a `}` is missing",
    ),
    (
        "unclosed bracket '['",
        "this `[` is never closed: a `]` is missing",
    ),
    (
        "mismatched bracket",
        "a bracket closes one of another kind: `{` ends with `}`, `[` with `]`",
    ),
    (
        "unclosed quote",
        "this quote is never closed: the value needs its closing quote",
    ),
    (
        "did not find expected key",
        "expected another `key: value` here, indented as far as the keys above it",
    ),
    (
        "did not find expected ','",
        "expected a `,` between the items of this `{...}` or `[...]`",
    ),
    (
        "block sequence entries are not allowed",
        "a `- item` where a `key: value` was expected: a list starts on the line below its key",
    ),
    (
        "':' must be followed by",
        "a `:` after a key needs a space after it (`key: value`)",
    ),
    (
        "invalid trailing content after",
        "something follows a quoted value on its line: a `,` may be missing between items",
    ),
    (
        "did not find expected node content",
        "a value is missing here (after a `:`, a `-` or a `,`)",
    ),
];

/// A serde or YAML message in the user's words: what was expected, with
/// an example; the closest known key for an unknown one.
fn in_words(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("unknown field \"")
        && let Some((field, known)) = rest.split_once("\", expected one of ")
    {
        let known: Vec<&str> = known.split(", ").map(|k| k.trim_matches('"')).collect();
        return match closest(field, &known) {
            Some(near) => format!(
                "unknown field \"{field}\": did you mean \"{near}\"? (known here: {})",
                known.join(", ")
            ),
            None => format!(
                "unknown field \"{field}\" (known here: {})",
                known.join(", ")
            ),
        };
    }
    if let Some(rest) = message.strip_prefix("unknown variant \"")
        && let Some((value, known)) = rest.split_once("\", expected one of ")
        && !known.contains(", ")
    {
        return format!("unknown value \"{value}\": expected {known}");
    }
    if let Some(rest) = message.strip_prefix("duplicate mapping key: ") {
        let key = rest.split(", set ").next().unwrap_or(rest);
        return format!("\"{key}\" is given twice in this block: keep one");
    }
    if let Some((_, plain)) = SYNTAX.iter().find(|(yaml, _)| message.contains(yaml)) {
        return format!("{plain} (YAML said: {message})");
    }
    let plain = match message {
        "invalid u32" | "invalid u64" | "invalid u16" | "invalid i64" | "invalid usize" => {
            "expected a whole number, such as 3"
        }
        "invalid floating point" => "expected a number, such as 0.5",
        "expected mapping start" => {
            "expected a block of keys here (`key: value` lines below it, or `{key: value}`)"
        }
        "expected sequence start" => "expected a list here (`- item` lines below it, or `[a, b]`)",
        "invalid boolean" | "invalid bool" => "expected true or false",
        "expected string scalar" => {
            "expected a single value here (a name, an address), not a list or a block"
        }
        _ => "",
    };
    if !plain.is_empty() {
        return plain.to_owned();
    }
    if message.contains("expected a nonzero u32") {
        let got = message
            .split('"')
            .nth(1)
            .map(|v| format!(", not {v}"))
            .unwrap_or_default();
        return format!("expected a whole number above 0, such as 3{got}");
    }
    message.to_owned()
}

/// The known key closest to `typed`, if one is near enough to be what was
/// meant (at most a third of its letters off, and at least one).
fn closest<'a>(typed: &str, known: &[&'a str]) -> Option<&'a str> {
    // Edits, a swap of two letters side by side counted as one (`retyr`).
    let distance = |a: &str, b: &str| {
        let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
        let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
        for (i, row) in d.iter_mut().enumerate() {
            row[0] = i;
        }
        for (j, cell) in d[0].iter_mut().enumerate() {
            *cell = j;
        }
        for i in 1..=a.len() {
            for j in 1..=b.len() {
                let cost = usize::from(a[i - 1] != b[j - 1]);
                d[i][j] = (d[i - 1][j] + 1)
                    .min(d[i][j - 1] + 1)
                    .min(d[i - 1][j - 1] + cost);
                if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                    d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
                }
            }
        }
        d[a.len()][b.len()]
    };
    known
        .iter()
        .map(|k| (distance(typed, k), *k))
        .filter(|(d, _)| *d <= (typed.chars().count() / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Drops the parts of a serde path that are implementation details: the
/// `value` field of a [`Spanned`] wrapper (anywhere but as a key of a
/// `headers` map) and unknown (`?`) segments.
fn clean_path(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('.') {
        if segment == "value" && segments.last() != Some(&"headers") {
            continue;
        }
        segments.push(segment);
    }
    while matches!(segments.last(), Some(&"?" | &"")) {
        segments.pop();
    }
    segments.join(".")
}
