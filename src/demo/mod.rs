//! `breakwater demo`: Breakwater's job on an embedded default, with nothing
//! external to install.
//!
//! An invoice pipeline of four agents ([`agents`]): OCR extraction (gRPC),
//! amount validation, purchase-order matching and accounting entries
//! (HTTP), with seeded faults. Invoices go through it twice: once calling
//! the agents directly (a one-second client timeout, no retries), once
//! through a sidecar with the embedded policies ([`POLICIES`]) and a control
//! plane: OCR critical with per-try timeouts, retries and a breaker;
//! matching optional, degrading to suggested matches; accounting entries as
//! a saga whose compensation deletes an entry that could not be posted;
//! dead letters on; a checkpoint per invoice, so a rerun on the same
//! `--data-dir` resumes. Then it prints both runs side by side.

pub mod agents;
mod breakwater;

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::api::checkpoints_client::CheckpointsClient;
use crate::api::sagas_client::SagasClient;
use crate::api::{GetCheckpointRequest, PutCheckpointRequest, StartSagaRequest, WatchSagasRequest};
use crate::body::{self, Body};
use crate::control::saga::proto as saga_proto;
use crate::control::{self, ControlOptions};
use crate::ocr::ExtractRequest;
use crate::ocr::ocr_client::OcrClient;
use crate::{config, sidecar};
use agents::{Agents, Model};
use breakwater::breakwater_run;

/// The policies of the run through Breakwater; `{...}` are filled in.
pub const POLICIES: &str = "\
# The demo's embedded policy file.
admin: {listen: 127.0.0.1:0}
proxy: {listen: 127.0.0.1:0}
control_plane: {url: 'http://{control_plane}'}
dead_letters: {spool_dir: '{spool}'}
upstreams:
  ocr:                        # critical: no invoice without it
    address: '{ocr}'
    protocol: grpc
    listen: 127.0.0.1:0
    timeout: 2s
    per_try_timeout: 300ms    # a stalled scan is retried, not waited for
    retry: {max_attempts: 4, on: [unavailable, per-try-timeout], backoff: {base: 20ms, max: 200ms}}
    circuit_breaker: {consecutive_failures: 0, failure_rate: {threshold: 0.5, window: 20, min_calls: 10}, open_for: 500ms}
    dead_letter: true
  validation:
    address: '{validation}'
    timeout: 1s
  matching:                   # optional: suggested matches stand in
    address: '{matching}'
    timeout: 500ms
    retry: {max_attempts: 1}
    criticality: optional
    fallback:
      status: 200
      headers: {content-type: application/json}
      body: '{\"matches\": [], \"suggested\": true}'
  accounting:
    address: '{accounting}'
    timeout: 3s
    retry: {max_attempts: 3, on: [503, connect-failure], backoff: {base: 50ms, max: 300ms}}
    circuit_breaker: {consecutive_failures: 10, open_for: 250ms}
";

/// What the demo does.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Invoices per run.
    pub invoices: u64,
    /// The fault model's seed.
    pub seed: u64,
    /// Invoices arriving per second.
    pub rate: u64,
    /// Where the control plane keeps its data (a temporary directory when
    /// `None`); a rerun on the same directory resumes from checkpoints.
    pub data_dir: Option<PathBuf>,
    /// Leave everything running after the report, until Ctrl-C.
    pub keep_running: bool,
    /// Draw the progress bar (on stderr).
    pub progress: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            invoices: 500,
            seed: 42,
            rate: 100,
            data_dir: None,
            keep_running: false,
            progress: true,
        }
    }
}

/// How one run went.
#[derive(Debug, Default, Clone)]
pub struct RunReport {
    /// Invoices processed end to end.
    pub succeeded: u64,
    /// Invoices that need a person.
    pub need_a_person: u64,
    /// Invoices skipped because a checkpoint says they were done.
    pub resumed: u64,
    /// Processing time of each invoice processed, sorted.
    pub times: Vec<Duration>,
    /// Retried attempts.
    pub retries: u64,
    /// Circuits opened.
    pub circuits_opened: u64,
    /// Answers degraded to a fallback.
    pub degraded: u64,
    /// Compensations run.
    pub compensations: u64,
    /// Requests in the dead-letter queue at the end.
    pub dead_letters: u64,
    /// Invoices that needed a person, by the step where they stopped.
    pub stopped_at: std::collections::BTreeMap<&'static str, u64>,
}

impl RunReport {
    /// Invoices processed end to end, out of all.
    pub fn success_rate(&self) -> f64 {
        let all = self.succeeded + self.need_a_person;
        if all == 0 {
            return 0.0;
        }
        self.succeeded as f64 / all as f64
    }

    /// A percentile of processing time.
    pub fn percentile(&self, p: f64) -> Duration {
        if self.times.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.times.len() as f64).ceil() as usize;
        self.times[rank.clamp(1, self.times.len()) - 1]
    }
}

/// Both runs.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// Calling the agents directly.
    pub direct: RunReport,
    /// Through Breakwater.
    pub breakwater: RunReport,
}

/// Why the demo could not run.
pub type DemoError = Box<dyn std::error::Error + Send + Sync>;

/// Runs the demo, prints the report, and returns it.
pub async fn run(options: DemoOptions) -> Result<DemoReport, DemoError> {
    let model = Model {
        seed: options.seed,
        invoices: options.invoices,
        rate: options.rate,
    };
    println!(
        "Breakwater demo: {} invoices at {}/s through OCR (gRPC), validation, matching and accounting, seed {}\n",
        options.invoices, options.rate, options.seed
    );
    let direct = direct_run(model, &options).await?;
    let (breakwater, running) = breakwater_run(model, &options).await?;
    let report = DemoReport { direct, breakwater };
    print_report(&report);
    if options.keep_running {
        println!("\nEverything is still running:");
        println!(
            "  sidecar admin   http://{}/metrics  /circuits  /faults",
            running.sidecar.admin_addr
        );
        println!(
            "  sidecar proxy   http://{}  (Host: validation | matching | accounting)",
            running.sidecar.proxy_addr
        );
        println!(
            "  control plane   http://{}  (gRPC)",
            running.control.grpc_addr
        );
        if let Some(http) = running.control.http_addr {
            println!("                  http://{http}/v1/sagas  (JSON)");
        }
        if let Some(admin) = running.control.admin_addr {
            println!("                  http://{admin}/metrics");
        }
        println!(
            "  try             breakwater saga list --state compensated --control-plane http://{}",
            running.control.grpc_addr
        );
        println!(
            "                  breakwater dlq list --control-plane http://{}",
            running.control.grpc_addr
        );
        println!("Ctrl-C to stop.");
        tokio::signal::ctrl_c().await?;
    }
    running.sidecar.shutdown().await;
    running.control.shutdown().await;
    drop(running.temporary);
    Ok(report)
}

/// The side-by-side table: a row per figure, direct then through
/// Breakwater.
fn report_rows(d: &RunReport, b: &RunReport) -> [(&'static str, String, String); 9] {
    let ms = |t: Duration| format!("{:.0} ms", t.as_secs_f64() * 1000.0);
    [
        (
            "end-to-end success",
            format!("{:.1}%", d.success_rate() * 100.0),
            format!("{:.1}%", b.success_rate() * 100.0),
        ),
        (
            "invoices needing a person",
            d.need_a_person.to_string(),
            b.need_a_person.to_string(),
        ),
        (
            "p50 processing time",
            ms(d.percentile(50.0)),
            ms(b.percentile(50.0)),
        ),
        (
            "p99 processing time",
            ms(d.percentile(99.0)),
            ms(b.percentile(99.0)),
        ),
        ("retries", d.retries.to_string(), b.retries.to_string()),
        (
            "circuits opened",
            d.circuits_opened.to_string(),
            b.circuits_opened.to_string(),
        ),
        (
            "degraded answers",
            d.degraded.to_string(),
            b.degraded.to_string(),
        ),
        (
            "compensations run",
            d.compensations.to_string(),
            b.compensations.to_string(),
        ),
        (
            "dead letters (manual queue)",
            "-".to_owned(),
            b.dead_letters.to_string(),
        ),
    ]
}

fn print_report(report: &DemoReport) {
    let (d, b) = (&report.direct, &report.breakwater);
    println!("\n{:<28} {:>12} {:>20}", "", "direct", "through Breakwater");
    for (name, direct, breakwater) in report_rows(d, b) {
        println!("{name:<28} {direct:>12} {breakwater:>20}");
    }
    let stops = |r: &RunReport| {
        r.stopped_at
            .iter()
            .map(|(step, n)| format!("{step} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "\nwhere invoices stopped, direct:              {}",
        stops(d)
    );
    println!("where invoices stopped, through Breakwater:  {}", stops(b));
    if b.resumed > 0 {
        println!(
            "({} invoices were done in an earlier run and skipped)",
            b.resumed
        );
    }
    let mean = |r: &RunReport| {
        r.times.iter().sum::<Duration>().as_secs_f64() / r.times.len().max(1) as f64
    };
    let extra = if mean(d) > 0.0 {
        (mean(b) / mean(d) - 1.0) * 100.0
    } else {
        0.0
    };
    println!(
        "\nThe pattern guide reports 78% -> 96% success for such a pipeline, at 15% more processing time.\nHere: {:.1}% -> {:.1}%, at {:+.0}% mean processing time (docs/demo.md explains the model).",
        d.success_rate() * 100.0,
        b.success_rate() * 100.0,
        extra
    );
}

/// Draws `done/total` on stderr.
struct Progress {
    label: &'static str,
    total: u64,
    done: AtomicUsize,
    draw: bool,
}

impl Progress {
    fn tick(&self) {
        let done = self.done.fetch_add(1, Ordering::Relaxed) as u64 + 1;
        if !self.draw || (!done.is_multiple_of((self.total / 50).max(1)) && done != self.total) {
            return;
        }
        let filled = (done * 30 / self.total.max(1)) as usize;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{:<20} [{}{}] {done}/{}",
            self.label,
            "#".repeat(filled),
            ".".repeat(30 - filled),
            self.total
        );
        if done == self.total {
            let _ = writeln!(err);
        }
    }
}

/// The calls of one invoice, and how to make them.
trait Pipeline: Send + Sync + 'static {
    /// Processes invoice `i`: `Ok` when it went through end to end, else
    /// the step where it stopped.
    fn process(&self, i: u64)
    -> impl std::future::Future<Output = Result<(), &'static str>> + Send;
}

async fn run_all<P: Pipeline>(
    pipeline: Arc<P>,
    options: &DemoOptions,
    label: &'static str,
    todo: Vec<u64>,
) -> RunReport {
    let progress = Arc::new(Progress {
        label,
        total: todo.len() as u64,
        done: AtomicUsize::new(0),
        draw: options.progress && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    });
    // Invoices arrive at the rate, whatever happens to the earlier ones;
    // each one's time runs from its arrival.
    let started = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / options.rate.max(1) as f64);
    let mut workers = tokio::task::JoinSet::new();
    for (n, i) in todo.into_iter().enumerate() {
        let arrival = started + interval.mul_f64(n as f64);
        tokio::time::sleep_until(arrival).await;
        let (pipeline, progress) = (pipeline.clone(), progress.clone());
        workers.spawn(async move {
            let mut report = RunReport::default();
            match pipeline.process(i).await {
                Ok(()) => report.succeeded += 1,
                Err(step) => {
                    report.need_a_person += 1;
                    *report.stopped_at.entry(step).or_default() += 1;
                }
            }
            report.times.push(arrival.elapsed());
            progress.tick();
            report
        });
    }
    let mut report = RunReport::default();
    while let Some(worker) = workers.join_next().await {
        let part = worker.expect("a demo worker panicked");
        report.succeeded += part.succeeded;
        report.need_a_person += part.need_a_person;
        report.times.extend(part.times);
        for (step, n) in part.stopped_at {
            *report.stopped_at.entry(step).or_default() += n;
        }
    }
    report.times.sort();
    report
}

type HttpClient = Client<HttpConnector, Body>;

/// Sends a JSON POST (or DELETE); the answer's status, body and headers.
async fn call(
    client: &HttpClient,
    method: http::Method,
    url: String,
    host: Option<&str>,
    body: Value,
    timeout: Duration,
) -> Option<(u16, Value, http::HeaderMap)> {
    let mut request = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(body::full(serde_json::to_vec(&body).expect("JSON")))
        .expect("a valid request");
    if let Some(host) = host {
        request
            .headers_mut()
            .insert(http::header::HOST, host.parse().expect("a valid host"));
    }
    let exchange = async {
        let response = client.request(request).await.ok()?;
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.ok()?.to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Some((parts.status.as_u16(), value, parts.headers))
    };
    tokio::time::timeout(timeout, exchange).await.ok().flatten()
}

/// `Ok` for a 2xx answer, else the step's name.
fn ok(
    answer: &Option<(u16, Value, http::HeaderMap)>,
    step: &'static str,
) -> Result<(), &'static str> {
    if answer
        .as_ref()
        .is_some_and(|(s, _, _)| (200..300).contains(s))
    {
        Ok(())
    } else {
        Err(step)
    }
}

// ---------------------------------------------------------------- direct

/// The agents called directly: one try each, a one-second timeout.
struct Direct {
    agents: Agents,
    ocr: OcrClient<tonic::transport::Channel>,
    http: HttpClient,
}

const DIRECT_TIMEOUT: Duration = Duration::from_secs(1);

impl Pipeline for Direct {
    async fn process(&self, i: u64) -> Result<(), &'static str> {
        let mut ocr = self.ocr.clone();
        let mut request = tonic::Request::new(ExtractRequest { invoice: i });
        request.set_timeout(DIRECT_TIMEOUT);
        let fields = ocr.extract(request).await.map_err(|_| "ocr")?.into_inner();
        let post = |addr: std::net::SocketAddr, path: &str, body: Value| {
            call(
                &self.http,
                http::Method::POST,
                format!("http://{addr}{path}"),
                None,
                body,
                DIRECT_TIMEOUT,
            )
        };
        let invoice = json!({"invoice": i, "amount_cents": fields.amount_cents, "reference": fields.reference});
        ok(
            &post(self.agents.validation, "/validate", invoice.clone()).await,
            "validation",
        )?;
        ok(
            &post(self.agents.matching, "/match", invoice.clone()).await,
            "matching",
        )?;
        let Some((201, entry, _)) = post(self.agents.accounting, "/entries", invoice).await else {
            return Err("accounting");
        };
        let id = entry["id"].as_str().unwrap_or_default().to_owned();
        // A failed posting leaves its entry behind: nobody compensates.
        let posted = post(
            self.agents.accounting,
            &format!("/entries/{id}/post"),
            json!({}),
        )
        .await;
        ok(&posted, "accounting")
    }
}

async fn direct_run(model: Model, options: &DemoOptions) -> Result<RunReport, DemoError> {
    let agents = agents::start(model).await?;
    let ocr = OcrClient::connect(format!("http://{}", agents.ocr)).await?;
    let pipeline = Arc::new(Direct {
        agents,
        ocr,
        http: Client::builder(TokioExecutor::new()).build_http(),
    });
    let todo = (0..options.invoices).collect();
    Ok(run_all(pipeline, options, "direct", todo).await)
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
