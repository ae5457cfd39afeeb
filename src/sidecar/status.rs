//! The status page: `/` on the admin port, for people; `/status.json`,
//! the same figures for scripts.
//!
//! Every upstream with its protocol, its circuit (and the time to its next
//! probe), faults in force, the retries its budget allows now, and over
//! the last minute: requests a second, the share that failed, p50 and
//! p99, retries, retries the budget refused, shed and degraded answers,
//! failovers; each with its total since start.
//!
//! The figures are read from the metrics as `/metrics` serves them, not
//! kept a second time: a sample of the encoded metrics is taken every 5
//! seconds and the last minute is the difference between the newest and
//! the oldest of the last minute's samples (the quantiles interpolated in
//! the histogram's buckets, as Prometheus' `histogram_quantile` does). So
//! the page agrees with what a scrape sees, and costs nothing on the
//! request path.
//!
//! The page is rendered here, whole, and refreshes itself every 2 seconds
//! with a few lines of plain JavaScript that fetch it again; its buttons
//! (open, close, reset a circuit; clear faults) ask for a confirmation and
//! call the admin API.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::resilience::breaker::State;
use crate::resilience::faults::FaultSpec;
use crate::telemetry::metrics::Metrics;
use crate::upstream::Upstream;
use crate::web::escape;

/// How often the metrics are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// The window of the "last minute" figures.
const WINDOW: Duration = Duration::from_secs(60);

/// One series of the encoded metrics.
#[derive(Debug, Clone, PartialEq)]
struct Point {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Point {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads OpenMetrics text: every `name{labels} value` line.
fn parse(text: &str) -> Vec<Point> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Point> {
    let (name, rest) = match line.find('{') {
        Some(brace) => (&line[..brace], &line[brace + 1..]),
        None => {
            let (name, value) = line.split_once(' ')?;
            return Some(Point {
                name: name.to_owned(),
                labels: Vec::new(),
                value: value.split(' ').next()?.parse().ok()?,
            });
        }
    };
    let mut labels = Vec::new();
    let mut chars = rest.char_indices();
    let mut key = String::new();
    let end = loop {
        let (i, c) = chars.next()?;
        match c {
            '}' => break i,
            ',' | ' ' => {}
            '=' => {
                if chars.next()?.1 != '"' {
                    return None;
                }
                let mut value = String::new();
                loop {
                    match chars.next()?.1 {
                        '"' => break,
                        '\\' => match chars.next()?.1 {
                            'n' => value.push('\n'),
                            other => value.push(other),
                        },
                        other => value.push(other),
                    }
                }
                labels.push((std::mem::take(&mut key), value));
            }
            other => key.push(other),
        }
    };
    let value = rest[end + 1..].trim().split(' ').next()?.parse().ok()?;
    Some(Point {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// The samples of the last minute, newest last.
#[derive(Debug, Default)]
pub struct Samples {
    ring: Mutex<VecDeque<(Instant, Vec<Point>)>>,
}

impl Samples {
    /// Takes a sample of `metrics` now, and forgets those the window no
    /// longer needs (it keeps one just older than the window).
    pub fn sample(&self, metrics: &Metrics) {
        let points = parse(&metrics.encode());
        let now = Instant::now();
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.push_back((now, points));
        while ring.len() > 2 && now.duration_since(ring[1].0) >= WINDOW {
            ring.pop_front();
        }
    }

    /// Every upstream's status, its totals from `metrics` now.
    pub fn status(&self, metrics: &Metrics, upstreams: &[std::sync::Arc<Upstream>]) -> Status {
        let now = parse(&metrics.encode());
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let (window, then) = match ring.front() {
            Some((at, points)) => (at.elapsed(), points.as_slice()),
            None => (Duration::ZERO, &[][..]),
        };
        let upstreams = upstreams
            .iter()
            .map(|u| upstream_status(u, &now, then, window))
            .collect();
        Status {
            window_seconds: window.as_secs_f64(),
            upstreams,
        }
    }
}

/// What `/status.json` answers.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The span of the "last minute" figures (shorter just after start).
    pub window_seconds: f64,
    /// Each upstream, by name.
    pub upstreams: Vec<UpstreamStatus>,
}

/// One upstream on the status page.
#[derive(Debug, Serialize)]
pub struct UpstreamStatus {
    /// Its name.
    pub name: String,
    /// `http1`, `http2` or `grpc`.
    pub protocol: String,
    /// Its circuit, unless the breaker is off.
    pub circuit: Option<Circuit>,
    /// Faults in force.
    pub faults: Option<FaultSpec>,
    /// Retries its budget allows now, if it retries or hedges.
    pub budget_left: Option<u64>,
    /// Over the window.
    pub last_minute: Figures,
    /// Since start: the counters of `/metrics`.
    pub totals: Totals,
}

/// A circuit's state.
#[derive(Debug, Serialize)]
pub struct Circuit {
    /// `closed`, `open` or `half-open`.
    pub state: &'static str,
    /// Until the next probe, while open.
    pub next_probe_in_ms: Option<u64>,
    /// Failures in a row.
    pub consecutive_failures: u32,
}

/// The window's figures.
#[derive(Debug, Serialize)]
pub struct Figures {
    /// Requests answered a second.
    pub requests_per_second: f64,
    /// The share of them that failed (`error` and `failure` outcomes).
    pub error_ratio: Option<f64>,
    /// Median time to the answer's headers.
    pub p50_ms: Option<f64>,
    /// 99th percentile of it.
    pub p99_ms: Option<f64>,
    /// Retried attempts.
    pub retries: f64,
    /// Retries the budget refused.
    pub budget_exhausted: f64,
    /// Requests shed.
    pub shed: f64,
    /// Answers degraded to a fallback.
    pub degraded: f64,
    /// Calls failed over to the next upstream.
    pub failovers: f64,
}

/// Since start.
#[derive(Debug, Serialize, PartialEq)]
pub struct Totals {
    /// `breakwater_requests_total`, every outcome.
    pub requests: f64,
    /// Its `error` and `failure` outcomes.
    pub failed: f64,
    /// `breakwater_retries_total`.
    pub retries: f64,
    /// `breakwater_retry_budget_exhausted_total`.
    pub budget_exhausted: f64,
    /// `breakwater_shed_total`.
    pub shed: f64,
    /// `breakwater_requests_total{outcome="degraded"}`.
    pub degraded: f64,
    /// `breakwater_failovers_total`, to every next upstream.
    pub failovers: f64,
}

/// The sum of the series `name` of `upstream` whose labels include
/// `with`.
fn sum(points: &[Point], name: &str, upstream: &str, with: Option<(&str, &str)>) -> f64 {
    points
        .iter()
        .filter(|p| p.name == name && p.label("upstream") == Some(upstream))
        .filter(|p| with.is_none_or(|(k, v)| p.label(k) == Some(v)))
        .map(|p| p.value)
        .sum::<f64>()
        // An empty sum is -0.
        + 0.0
}

fn totals(points: &[Point], upstream: &str) -> Totals {
    let requests = "breakwater_requests_total";
    let outcome = |o| sum(points, requests, upstream, Some(("outcome", o)));
    Totals {
        requests: sum(points, requests, upstream, None),
        failed: outcome("error") + outcome("failure"),
        retries: sum(points, "breakwater_retries_total", upstream, None),
        budget_exhausted: sum(
            points,
            "breakwater_retry_budget_exhausted_total",
            upstream,
            None,
        ),
        shed: sum(points, "breakwater_shed_total", upstream, None),
        degraded: outcome("degraded"),
        failovers: sum(points, "breakwater_failovers_total", upstream, None),
    }
}

/// The cumulative buckets of `upstream`'s request durations, by bound.
fn buckets(points: &[Point], upstream: &str) -> Vec<(f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = points
        .iter()
        .filter(|p| {
            p.name == "breakwater_request_duration_seconds_bucket"
                && p.label("upstream") == Some(upstream)
        })
        .filter_map(|p| {
            let le = match p.label("le")? {
                "+Inf" => f64::INFINITY,
                le => le.parse().ok()?,
            };
            Some((le, p.value))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The `q` quantile of cumulative `buckets`, interpolated linearly within
/// its bucket; the highest finite bound when it falls in `+Inf`.
fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let count = buckets.last()?.1;
    if count <= 0.0 {
        return None;
    }
    let rank = q * count;
    let mut below = (0.0, 0.0);
    for &(le, cumulative) in buckets {
        if cumulative >= rank {
            if le.is_infinite() {
                return Some(below.0);
            }
            let inside = cumulative - below.1;
            let share = if inside > 0.0 {
                (rank - below.1) / inside
            } else {
                1.0
            };
            return Some(below.0 + (le - below.0) * share);
        }
        below = (le, cumulative);
    }
    None
}

fn upstream_status(
    upstream: &Upstream,
    now: &[Point],
    then: &[Point],
    window: Duration,
) -> UpstreamStatus {
    let name = &*upstream.config.name;
    let (totals, before) = (totals(now, name), totals(then, name));
    let seconds = window.as_secs_f64();
    let requests = totals.requests - before.requests;
    let (recent, earlier) = (buckets(now, name), buckets(then, name));
    let delta: Vec<(f64, f64)> = recent
        .iter()
        .map(|&(le, n)| {
            let old = earlier.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1);
            (le, n - old)
        })
        .collect();
    let ms = |s: Option<f64>| s.map(|s| s * 1000.0);
    let last_minute = Figures {
        requests_per_second: if seconds > 0.0 {
            requests / seconds
        } else {
            0.0
        },
        error_ratio: (requests > 0.0).then(|| (totals.failed - before.failed) / requests),
        p50_ms: ms(quantile(0.5, &delta)),
        p99_ms: ms(quantile(0.99, &delta)),
        retries: totals.retries - before.retries,
        budget_exhausted: totals.budget_exhausted - before.budget_exhausted,
        shed: totals.shed - before.shed,
        degraded: totals.degraded - before.degraded,
        failovers: totals.failovers - before.failovers,
    };
    let circuit = upstream.breaker().map(|b| {
        let snapshot = b.snapshot();
        Circuit {
            state: match snapshot.state {
                State::Closed => "closed",
                State::Open => "open",
                State::HalfOpen => "half-open",
            },
            next_probe_in_ms: snapshot.next_probe_in_ms,
            consecutive_failures: snapshot.consecutive_failures,
        }
    });
    UpstreamStatus {
        name: name.to_owned(),
        protocol: upstream.config.protocol.to_string(),
        circuit,
        faults: upstream.faults().current().map(|f| f.spec().clone()),
        budget_left: upstream.budget_left(),
        last_minute,
        totals,
    }
}

/// A figure, or a dash when there is none.
fn figure(value: Option<f64>, unit: &str) -> String {
    match value {
        Some(v) if v >= 100.0 => format!("{v:.0}{unit}"),
        Some(v) => format!("{v:.1}{unit}"),
        None => "–".to_owned(),
    }
}

/// A count over the window, with its total since start.
fn count(recent: f64, total: f64) -> String {
    format!("{recent:.0}<small> / {total:.0}</small>")
}

/// The page, the `render`th served (which tells a refreshed page from the
/// first).
pub fn page(status: &Status, render: u64) -> String {
    let mut rows = String::new();
    for u in &status.upstreams {
        let name = escape(&u.name);
        let m = &u.last_minute;
        let (state, probe) = match &u.circuit {
            None => ("off".to_owned(), String::new()),
            Some(c) => (
                c.state.to_owned(),
                c.next_probe_in_ms
                    .map(|ms| format!(" <small>probe in {:.0}s</small>", ms as f64 / 1000.0))
                    .unwrap_or_default(),
            ),
        };
        let faults = match &u.faults {
            None => "none".to_owned(),
            Some(spec) => escape(&faults_in_words(spec)),
        };
        let button = |method: &str, path: String, label: &str, question: String| {
            format!(
                "<button data-method=\"{method}\" data-path=\"{}\" data-confirm=\"{}\">{label}</button>",
                escape(&path),
                escape(&question)
            )
        };
        // An upstream's name is a path segment as it is: names are
        // `a-z`, `0-9`, `-`, `_` and `.` (the config checks it).
        let path = &u.name;
        let mut actions = String::new();
        if u.circuit.is_some() {
            for (action, label) in [("open", "open"), ("close", "close"), ("reset", "reset")] {
                actions.push_str(&button(
                    "POST",
                    format!("/circuits/{path}/{action}"),
                    label,
                    format!("{label} the circuit of {}?", u.name),
                ));
            }
        }
        if u.faults.is_some() {
            actions.push_str(&button(
                "DELETE",
                format!("/faults/{path}"),
                "clear faults",
                format!("stop injecting faults into {}?", u.name),
            ));
        }
        let _ = writeln!(
            rows,
            "<tr data-upstream=\"{name}\"><th>{name}</th><td>{}</td>\
             <td class=\"circuit {state}\">{state}{probe}</td>\
             <td>{:.1}<small> / {:.0}</small></td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td class=\"budget\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td class=\"faults\">{faults}</td><td>{actions}</td></tr>",
            escape(&u.protocol),
            m.requests_per_second,
            u.totals.requests,
            figure(m.error_ratio.map(|r| r * 100.0), "%"),
            figure(m.p50_ms, " ms"),
            figure(m.p99_ms, " ms"),
            count(m.retries, u.totals.retries),
            u.budget_left
                .map_or_else(|| "–".to_owned(), |n| n.to_string()),
            count(m.budget_exhausted, u.totals.budget_exhausted),
            count(m.shed, u.totals.shed),
            count(m.degraded, u.totals.degraded),
            count(m.failovers, u.totals.failovers),
        );
    }
    PAGE.replace("{render}", &render.to_string())
        .replace("{window}", &format!("{:.0}", status.window_seconds))
        .replace("{rows}", &rows)
}

/// Faults in force, in a few words: `delay 20% 30ms; abort 5% 503`.
fn faults_in_words(spec: &FaultSpec) -> String {
    let Ok(serde_json::Value::Object(kinds)) = serde_json::to_value(spec) else {
        return String::new();
    };
    let words: Vec<String> = kinds
        .iter()
        .filter_map(|(kind, fields)| {
            let fields = fields.as_object()?;
            let mut words = vec![kind.clone()];
            for (name, value) in fields {
                words.push(match (name.as_str(), value) {
                    ("percent", v) => format!("{v}%"),
                    (_, serde_json::Value::String(s)) => s.clone(),
                    (name, v) => format!("{name} {v}"),
                });
            }
            Some(words.join(" "))
        })
        .collect();
    words.join("; ")
}

const PAGE: &str = include_str!("status.html");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_openmetrics_lines_with_escaped_labels() {
        let text = "# TYPE x counter\nx_total{upstream=\"a\\\"b\",outcome=\"error\"} 3\nup 1\nx_bucket{le=\"+Inf\"} 7 # {} 1\n";
        let points = parse(text);
        assert_eq!(points.len(), 3);
        assert_eq!(points[0].label("upstream"), Some("a\"b"));
        assert_eq!(points[0].value, 3.0);
        assert_eq!((points[1].name.as_str(), points[1].value), ("up", 1.0));
        assert_eq!(points[2].label("le"), Some("+Inf"));
    }

    #[test]
    fn quantiles_are_interpolated_in_their_bucket() {
        // 10 calls under 10 ms, 90 between 10 and 20 ms.
        let buckets = [(0.01, 10.0), (0.02, 100.0), (f64::INFINITY, 100.0)];
        let p50 = quantile(0.5, &buckets).unwrap();
        assert!((p50 - (0.01 + 0.01 * 40.0 / 90.0)).abs() < 1e-9, "{p50}");
        assert_eq!(quantile(0.1, &buckets), Some(0.01));
        assert_eq!(quantile(0.5, &[(0.01, 0.0), (f64::INFINITY, 0.0)]), None);
        assert_eq!(
            quantile(0.99, &[(0.01, 0.0), (f64::INFINITY, 5.0)]),
            Some(0.01),
            "beyond the last bound: the last bound"
        );
    }
}
