//! The run through Breakwater: the same agents behind a sidecar with the
//! embedded policies, accounting as a saga on a control plane, a
//! checkpoint per step.

use super::*;

/// What stays up after the Breakwater run.
pub(super) struct Running {
    pub(super) sidecar: sidecar::Sidecar,
    pub(super) control: control::Running,
    /// Removed after both have stopped.
    pub(super) temporary: Option<TempDir>,
}

/// The agents called through the sidecar; accounting as a saga on the
/// control plane; a checkpoint per step.
struct ThroughBreakwater {
    proxy: std::net::SocketAddr,
    ocr: OcrClient<tonic::transport::Channel>,
    http: HttpClient,
    sagas: SagasClient<tonic::transport::Channel>,
    checkpoints: CheckpointsClient<tonic::transport::Channel>,
    degraded: AtomicUsize,
}

impl ThroughBreakwater {
    async fn checkpoint(&self, i: u64, step: &str, done: &[&str]) {
        let _ = self
            .checkpoints
            .clone()
            .put(PutCheckpointRequest {
                workflow_id: format!("invoice-{i}"),
                step: step.to_owned(),
                completed_steps: done.iter().map(|s| (*s).to_owned()).collect(),
                ..Default::default()
            })
            .await;
    }

    async fn post(
        &self,
        host: &str,
        path: &str,
        body: Value,
    ) -> Option<(u16, Value, http::HeaderMap)> {
        // The sidecar's policy bounds the call; this outer bound only
        // guards the demo itself.
        call(
            &self.http,
            http::Method::POST,
            format!("http://{}{path}", self.proxy),
            Some(host),
            body,
            Duration::from_secs(10),
        )
        .await
    }

    /// The accounting entry as a saga: create it, then post it; a posting
    /// that fails deletes the entry.
    async fn account(&self, i: u64, amount_cents: i64) -> bool {
        let id = format!("invoice-{i}-accounting");
        // While accounting is down the saga waits (durably) and sends
        // again, instead of compensating at once.
        let retry =
            json!({"max_sends": 30, "interval": "50ms", "backoff": 1.5, "max_interval": "500ms"});
        let spec = json!({
            "id": id,
            "input": {"invoice": i, "amount_cents": amount_cents},
            "steps": [
                {"name": "entry", "retry": retry,
                 "action": {"upstream": "accounting", "method": "POST", "path": "/entries",
                            "body": {"invoice": "{{input.invoice}}", "amount_cents": "{{input.amount_cents}}"}},
                 "compensation": {"upstream": "accounting", "method": "DELETE",
                                  "path": "/entries/{{steps.entry.body.id}}"}},
                {"name": "post", "retry": retry,
                 "action": {"upstream": "accounting", "method": "POST",
                            "path": "/entries/{{steps.entry.body.id}}/post"}}
            ]
        });
        let Ok(spec) = serde_json::from_value(spec) else {
            return false;
        };
        let mut sagas = self.sagas.clone();
        let started = sagas
            .start(StartSagaRequest {
                definition: Some(saga_proto::spec_to_proto(&spec)),
            })
            .await;
        if started.is_err() {
            return false;
        }
        let Ok(events) = sagas.watch(WatchSagasRequest { id }).await else {
            return false;
        };
        let mut events = events.into_inner();
        let mut last = None;
        while let Ok(Some(event)) = events.message().await {
            last = Some(event.state());
        }
        last == Some(crate::api::SagaState::Completed)
    }
}

impl Pipeline for ThroughBreakwater {
    async fn process(&self, i: u64) -> Result<(), &'static str> {
        let mut ocr = self.ocr.clone();
        let fields = ocr
            .extract(ExtractRequest { invoice: i })
            .await
            .map_err(|_| "ocr")?
            .into_inner();
        self.checkpoint(i, "ocr", &["ocr"]).await;
        let invoice = json!({"invoice": i, "amount_cents": fields.amount_cents, "reference": fields.reference});
        ok(
            &self.post("validation", "/validate", invoice.clone()).await,
            "validation",
        )?;
        let matched = self.post("matching", "/match", invoice).await;
        ok(&matched, "matching")?;
        if matched
            .as_ref()
            .is_some_and(|(_, _, h)| h.contains_key(crate::resilience::fallback::DEGRADED_HEADER))
        {
            self.degraded.fetch_add(1, Ordering::Relaxed);
        }
        self.checkpoint(i, "matching", &["ocr", "validation", "matching"])
            .await;
        if !self.account(i, fields.amount_cents).await {
            return Err("accounting");
        }
        self.checkpoint(i, "done", &["ocr", "validation", "matching", "accounting"])
            .await;
        Ok(())
    }
}

/// Sums a metric's samples in Prometheus text (`name{labels} value`),
/// keeping the lines that contain `filter`.
fn metric_sum(text: &str, name: &str, filter: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn metrics_text(client: &HttpClient, addr: std::net::SocketAddr, path: &str) -> String {
    let request = Request::get(format!("http://{addr}{path}"))
        .body(body::empty())
        .expect("a valid request");
    match client.request(request).await {
        Ok(response) => match response.into_body().collect().await {
            Ok(bytes) => String::from_utf8_lossy(&bytes.to_bytes()).into_owned(),
            Err(_) => String::new(),
        },
        Err(_) => String::new(),
    }
}

/// Runs the pipeline through a sidecar and a control plane, over the
/// invoices not already done in `--data-dir`'s checkpoints.
/// Starts the control plane, then the sidecar, on the demo's policies.
async fn start_breakwater(
    agents: &agents::Agents,
    data_dir: &std::path::Path,
) -> Result<(control::Running, sidecar::Sidecar), DemoError> {
    // The control plane first: the policies name it for dead letters.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let control_addr = listener.local_addr()?;
    drop(listener);
    let text = POLICIES
        .replace("{control_plane}", &control_addr.to_string())
        .replace("{spool}", &data_dir.join("spool").display().to_string())
        .replace("{ocr}", &agents.ocr.to_string())
        .replace("{validation}", &agents.validation.to_string())
        .replace("{matching}", &agents.matching.to_string())
        .replace("{accounting}", &agents.accounting.to_string());
    let config = config::parse("<demo policies>", &text)?;
    let mut control_options = ControlOptions::new(data_dir.join("control-plane"));
    control_options.listen = control_addr;
    control_options.http_listen = Some("127.0.0.1:0".parse()?);
    control_options.admin_listen = Some("127.0.0.1:0".parse()?);
    control_options.policies = Some(config.clone());
    let control = control::start(control_options).await?;
    let sidecar = sidecar::start(config, sidecar::Options::default()).await?;
    Ok((control, sidecar))
}

/// The invoices whose checkpoint is not at `done`, and how many are.
async fn not_done(
    checkpoints: &CheckpointsClient<tonic::transport::Channel>,
    invoices: u64,
) -> (Vec<u64>, u64) {
    let mut todo = Vec::new();
    let mut resumed = 0;
    for i in 0..invoices {
        let done = checkpoints
            .clone()
            .get(GetCheckpointRequest {
                workflow_id: format!("invoice-{i}"),
                version: 0,
            })
            .await
            .is_ok_and(|c| c.get_ref().step == "done");
        if done {
            resumed += 1;
        } else {
            todo.push(i);
        }
    }
    (todo, resumed)
}

/// Retries, circuits opened, compensations and dead letters, read from
/// the sidecar's and the control plane's metrics once the spool is empty.
async fn count_from_metrics(
    report: &mut RunReport,
    http: &HttpClient,
    sidecar: &sidecar::Sidecar,
    control: &control::Running,
) {
    // Letters reach the control plane from the sidecar's spool: wait
    // (a little) for it to empty.
    let mut sidecar_metrics = metrics_text(http, sidecar.admin_addr, "/metrics").await;
    for _ in 0..100 {
        if metric_sum(&sidecar_metrics, "breakwater_dead_letter_spool", "") == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        sidecar_metrics = metrics_text(http, sidecar.admin_addr, "/metrics").await;
    }
    // The sidecar's calls, and the control plane's (the sagas').
    let mut texts = vec![sidecar_metrics];
    if let Some(admin) = control.admin_addr {
        let text = metrics_text(http, admin, "/metrics").await;
        report.compensations = metric_sum(&text, "breakwater_saga_compensations_total", "");
        report.dead_letters = metric_sum(&text, "breakwater_dead_letters", "");
        texts.push(metrics_text(http, admin, "/metrics/upstreams").await);
    }
    for text in &texts {
        report.retries += metric_sum(text, "breakwater_retries_total", "");
        report.circuits_opened +=
            metric_sum(text, "breakwater_circuit_transitions_total", "to=\"open\"");
    }
}

pub(super) async fn breakwater_run(
    model: Model,
    options: &DemoOptions,
) -> Result<(RunReport, Running), DemoError> {
    let agents = agents::start(model).await?;
    let (data_dir, temporary) = match &options.data_dir {
        Some(dir) => (dir.clone(), None),
        None => {
            let dir = std::env::temp_dir().join(format!(
                "breakwater-demo-{}-{}",
                std::process::id(),
                fastrand::u32(..)
            ));
            (dir.clone(), Some(TempDir(dir)))
        }
    };
    std::fs::create_dir_all(&data_dir)?;
    let (control, sidecar) = start_breakwater(&agents, &data_dir).await?;
    let url = format!("http://{}", control.grpc_addr);
    let checkpoints = CheckpointsClient::connect(url.clone()).await?;
    let (todo, resumed) = not_done(&checkpoints, options.invoices).await;
    let pipeline = Arc::new(ThroughBreakwater {
        proxy: sidecar.proxy_addr,
        ocr: OcrClient::connect(format!("http://{}", sidecar.upstream_addrs["ocr"])).await?,
        http: Client::builder(TokioExecutor::new()).build_http(),
        sagas: SagasClient::connect(url).await?,
        checkpoints,
        degraded: AtomicUsize::new(0),
    });
    let mut report = run_all(pipeline.clone(), options, "through Breakwater", todo).await;
    report.resumed = resumed;
    report.degraded = pipeline.degraded.load(Ordering::Relaxed) as u64;
    count_from_metrics(&mut report, &pipeline.http, &sidecar, &control).await;
    Ok((
        report,
        Running {
            sidecar,
            control,
            temporary,
        },
    ))
}
