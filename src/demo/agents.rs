//! The demo's four agents and the fault model they follow.
//!
//! Every outcome is drawn from a generator seeded with the run's seed, the
//! invoice and (for per-attempt faults) the attempt number, so a run is
//! reproducible: the same seed gives the same invoices and the same faults
//! on the same attempts.
//!
//! | agent | protocol | faults |
//! |---|---|---|
//! | OCR extraction | gRPC | 10% of invoices are poor scans: each attempt on one stalls (3 s) with probability 1/2. 5% of attempts answer `UNAVAILABLE`. |
//! | amount validation | HTTP | 1% of invoices have an invalid amount: 422, a business answer, not a fault. |
//! | purchase-order matching | HTTP | 8% of invoices have a reference that matches no order exactly: 500. |
//! | accounting entries | HTTP | Down (503) for 6% of the run (300 ms with the defaults), 40% into it: an outage that ends. 2% of invoices fall in a closed period: posting the entry answers 409. |
//!
//! Invoices arrive at a fixed rate in both runs, so that the outage, which
//! is a span of time, meets as many invoices in each.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::body::{self, Body};
use crate::ocr::ocr_server::{Ocr, OcrServer};
use crate::ocr::{ExtractReply, ExtractRequest};

/// The fault model of one run.
#[derive(Debug, Clone, Copy)]
pub struct Model {
    /// The run's seed.
    pub seed: u64,
    /// Invoices in the run.
    pub invoices: u64,
    /// Invoices arriving per second.
    pub rate: u64,
}

/// The share of the run accounting is down for.
pub const OUTAGE_SHARE: f64 = 0.06;

/// One invoice, as the model draws it.
#[derive(Debug, Clone, Copy)]
pub struct Invoice {
    /// A poor scan: OCR attempts may stall.
    pub poor_scan: bool,
    /// Its reference matches a purchase order exactly.
    pub exact_reference: bool,
    /// Its amount passes validation.
    pub valid_amount: bool,
    /// It falls in a closed accounting period.
    pub closed_period: bool,
    /// Its amount.
    pub amount_cents: i64,
}

impl Model {
    fn rng(&self, invoice: u64, salt: u64) -> fastrand::Rng {
        fastrand::Rng::with_seed(
            self.seed
                ^ invoice.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ salt.wrapping_mul(0xC2B2_AE3D_27D4_EB4F),
        )
    }

    /// The invoice numbered `i`.
    pub fn invoice(&self, i: u64) -> Invoice {
        let mut rng = self.rng(i, 0);
        Invoice {
            poor_scan: rng.f64() < 0.10,
            exact_reference: rng.f64() >= 0.08,
            valid_amount: rng.f64() >= 0.01,
            closed_period: rng.f64() < 0.02,
            amount_cents: rng.i64(1_000..2_000_000),
        }
    }

    /// Whether accounting is down `elapsed` into the run: for
    /// [`OUTAGE_SHARE`] of the time the invoices take to arrive (300 ms
    /// with the defaults), starting 40% into it.
    pub fn accounting_down(&self, elapsed: Duration) -> bool {
        let arrivals = Duration::from_secs_f64(self.invoices as f64 / self.rate.max(1) as f64);
        let from = arrivals.mul_f64(0.4);
        elapsed >= from && elapsed < from + arrivals.mul_f64(OUTAGE_SHARE)
    }
}

/// Counts attempts per invoice, for faults drawn per attempt.
#[derive(Debug, Default)]
struct Attempts(Mutex<HashMap<u64, u32>>);

impl Attempts {
    fn next(&self, invoice: u64) -> u32 {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(invoice).or_default();
        *n += 1;
        *n
    }
}

/// The OCR agent.
#[derive(Debug, Clone)]
struct OcrAgent {
    model: Model,
    attempts: Arc<Attempts>,
}

#[tonic::async_trait]
impl Ocr for OcrAgent {
    async fn extract(
        &self,
        request: tonic::Request<ExtractRequest>,
    ) -> Result<tonic::Response<ExtractReply>, tonic::Status> {
        let i = request.get_ref().invoice;
        let attempt = self.attempts.next(i);
        let invoice = self.model.invoice(i);
        let mut rng = self.model.rng(i, u64::from(attempt));
        if invoice.poor_scan && rng.f64() < 0.5 {
            tokio::time::sleep(Duration::from_secs(3)).await;
        } else if rng.f64() < 0.05 {
            return Err(tonic::Status::unavailable("OCR workers busy"));
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(5..25))).await;
        Ok(tonic::Response::new(ExtractReply {
            invoice: i,
            amount_cents: invoice.amount_cents,
            reference: format!("PO-{i:05}"),
            vendor: format!("vendor-{}", i % 37),
        }))
    }
}

fn json_answer(status: StatusCode, value: &Value) -> Response<Body> {
    body::typed(
        status,
        "application/json",
        serde_json::to_vec(value).expect("JSON"),
    )
}

/// The three HTTP agents, told apart by path.
#[derive(Debug, Clone)]
struct HttpAgents {
    model: Model,
    started: tokio::time::Instant,
}

impl HttpAgents {
    async fn answer(&self, request: Request<Incoming>) -> Response<Body> {
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let bytes = request
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let i = body["invoice"].as_u64().unwrap_or_else(|| {
            // `/entries/E-<i>[/post]`
            path.split('/')
                .find_map(|s| s.strip_prefix("E-"))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        });
        let invoice = self.model.invoice(i);
        let mut rng = self.model.rng(i, 1_000);
        tokio::time::sleep(Duration::from_millis(rng.u64(2..8))).await;
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method, segments.as_slice()) {
            (Method::POST, ["validate"]) if invoice.valid_amount => {
                json_answer(StatusCode::OK, &json!({"valid": true}))
            }
            (Method::POST, ["validate"]) => json_answer(
                StatusCode::UNPROCESSABLE_ENTITY,
                &json!({"valid": false, "error": "the amount does not match the lines"}),
            ),
            (Method::POST, ["match"]) if invoice.exact_reference => json_answer(
                StatusCode::OK,
                &json!({"matches": [format!("PO-{i:05}")], "suggested": false}),
            ),
            (Method::POST, ["match"]) => json_answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({"error": "no purchase order matches the reference exactly"}),
            ),
            (Method::POST, ["entries"]) => {
                if self.model.accounting_down(self.started.elapsed()) {
                    json_answer(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &json!({"error": "the ledger database is down"}),
                    )
                } else {
                    json_answer(StatusCode::CREATED, &json!({"id": format!("E-{i}")}))
                }
            }
            (Method::POST, ["entries", _, "post"])
                if self.model.accounting_down(self.started.elapsed()) =>
            {
                json_answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"error": "the ledger database is down"}),
                )
            }
            (Method::POST, ["entries", _, "post"]) if invoice.closed_period => json_answer(
                StatusCode::CONFLICT,
                &json!({"error": "the accounting period is closed"}),
            ),
            (Method::POST, ["entries", _, "post"]) => {
                json_answer(StatusCode::OK, &json!({"posted": true}))
            }
            (Method::DELETE, ["entries", _]) => json_answer(StatusCode::OK, &json!({})),
            _ => json_answer(StatusCode::NOT_FOUND, &json!({"error": "no such route"})),
        }
    }
}

/// Where the agents listen.
#[derive(Debug, Clone, Copy)]
pub struct Agents {
    /// The OCR agent (gRPC).
    pub ocr: SocketAddr,
    /// Validation, matching and accounting (HTTP), on one port each.
    pub validation: SocketAddr,
    /// Matching.
    pub matching: SocketAddr,
    /// Accounting.
    pub accounting: SocketAddr,
}

async fn serve_http(listener: TcpListener, agents: HttpAgents) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let agents = agents.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let agents = agents.clone();
                async move { Ok::<_, Infallible>(agents.answer(request).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Starts the four agents of a run on loopback ports; the run's clock
/// starts now. Each run gets fresh agents, so attempt counts start over.
pub async fn start(model: Model) -> std::io::Result<Agents> {
    let started = tokio::time::Instant::now();
    let ocr = TcpListener::bind("127.0.0.1:0").await?;
    let ocr_addr = ocr.local_addr()?;
    let agent = OcrAgent {
        model,
        attempts: Arc::default(),
    };
    tokio::spawn(async move {
        let incoming = tonic::transport::server::TcpIncoming::from(ocr).with_nodelay(Some(true));
        let _ = tonic::transport::Server::builder()
            .add_service(OcrServer::new(agent))
            .serve_with_incoming(incoming)
            .await;
    });
    let mut addrs = Vec::new();
    let http = HttpAgents { model, started };
    for _ in 0..3 {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(listener.local_addr()?);
        tokio::spawn(serve_http(listener, http.clone()));
    }
    Ok(Agents {
        ocr: ocr_addr,
        validation: addrs[0],
        matching: addrs[1],
        accounting: addrs[2],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_is_reproducible_and_near_its_rates() {
        let model = Model {
            seed: 7,
            invoices: 10_000,
            rate: 100,
        };
        let again = model;
        let poor = (0..10_000).filter(|i| model.invoice(*i).poor_scan).count();
        assert!((850..1150).contains(&poor), "{poor}");
        for i in 0..100 {
            assert_eq!(model.invoice(i).amount_cents, again.invoice(i).amount_cents);
        }
        // 100 s of arrivals: down from 40 s to 46 s.
        assert!(model.accounting_down(Duration::from_millis(40_100)));
        assert!(model.accounting_down(Duration::from_millis(45_900)));
        assert!(!model.accounting_down(Duration::from_millis(39_900)));
        assert!(!model.accounting_down(Duration::from_millis(46_000)));
    }
}
