//! Fault injection, for chaos tests: delays, aborted answers and
//! truncated answers, per upstream, at configured rates.
//!
//! Faults are injected per attempt, below retries and the circuit
//! breaker (see `stack.rs`): an injected 503 is retried, counted by the
//! breaker and degraded to a fallback exactly as a real one would be, which
//! is what a chaos test wants to exercise. A delay runs inside the per-try
//! timeout, so it can trip it.
//!
//! The dice are deterministic: the n-th draw for a kind of fault is a pure
//! function of the seed, the kind and n ([`roll`]). With a fixed `seed`, a
//! run injects exactly the same number of faults every time, whatever the
//! interleaving of concurrent calls.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

mod truncate;

use arc_swap::ArcSwapOption;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use crate::body::{self, Body};
use crate::grpc;
use crate::values::{ByteSize, HumanDuration, Percent};
pub use truncate::truncate;

/// Marks an answer the sidecar made up as an injected fault.
pub const FAULT_HEADER: &str = "x-breakwater-fault";
/// A caller-requested delay, in milliseconds (with `allow_header_control`).
pub const DELAY_HEADER: HeaderName = HeaderName::from_static("x-breakwater-fault-delay-ms");
/// A caller-requested abort: an HTTP status, or for gRPC calls a gRPC code
/// (with `allow_header_control`).
pub const ABORT_HEADER: HeaderName = HeaderName::from_static("x-breakwater-fault-abort");

/// An upstream's `faults` block, as written in the policy file (YAML) and
/// sent to `PUT /faults/<upstream>` (JSON).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// Delay some attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<DelaySpec>,
    /// Answer some attempts with an error instead of calling the upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<AbortSpec>,
    /// Cut some answers after a number of body bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate: Option<TruncateSpec>,
    /// Honour `x-breakwater-fault-delay-ms` and `x-breakwater-fault-abort`
    /// request headers.
    #[serde(default)]
    pub allow_header_control: bool,
    /// Seed for the dice (random when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// `faults.delay`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DelaySpec {
    /// Share of attempts delayed, 0 to 100.
    pub percent: Percent,
    /// How long.
    pub duration: HumanDuration,
}

/// `faults.abort`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AbortSpec {
    /// Share of attempts aborted, 0 to 100.
    pub percent: Percent,
    /// The HTTP status answered to HTTP callers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The gRPC status answered to gRPC callers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<GrpcStatus>,
    /// Headers (gRPC metadata) on the answer, such as `retry-after`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// `faults.truncate`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TruncateSpec {
    /// Share of answers cut, 0 to 100.
    pub percent: Percent,
    /// Body bytes passed on before the cut.
    pub after_bytes: ByteSize,
}

/// A gRPC status code, written by name (`unavailable`) or number (`14`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcStatus(pub u8);

impl<'de> Deserialize<'de> for GrpcStatus {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Number(u64),
            Name(String),
        }
        let text = match Written::deserialize(deserializer)? {
            Written::Number(n) => n.to_string(),
            Written::Name(name) => name,
        };
        match grpc::code(&text) {
            Some(code) if code != 0 => Ok(GrpcStatus(code)),
            _ => Err(de::Error::custom(format!(
                "{text:?} is not a gRPC error code: expected a name such as unavailable or a number from 1 to 16"
            ))),
        }
    }
}

impl Serialize for GrpcStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(grpc::name(self.0))
    }
}

/// The kinds of fault, as the metric's `kind` label names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// A delay before the attempt.
    Delay = 0,
    /// An answer made up instead of the attempt.
    Abort = 1,
    /// An answer cut short.
    Truncate = 2,
}

impl FaultKind {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            FaultKind::Delay => "delay",
            FaultKind::Abort => "abort",
            FaultKind::Truncate => "truncate",
        }
    }
}

/// The `n`-th roll of the dice for `kind` under `seed`: a number in
/// `[0, 1)`. A fault of that kind is injected when the roll is below its
/// percentage.
pub fn roll(seed: u64, kind: FaultKind, n: u64) -> f64 {
    let stream = splitmix64(seed ^ (kind as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F));
    let x = splitmix64(stream.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    (x >> 11) as f64 / (1u64 << 53) as f64
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// An upstream's active faults, resolved from a [`FaultSpec`].
#[derive(Debug)]
pub struct Faults {
    spec: FaultSpec,
    delay: Option<(f64, Duration)>,
    abort: Option<Abort>,
    truncate: Option<(f64, u64)>,
    seed: u64,
    draws: [AtomicU64; 3],
}

#[derive(Debug)]
struct Abort {
    fraction: f64,
    status: StatusCode,
    grpc: u8,
    headers: HeaderMap,
}

impl FaultSpec {
    /// Checks what serde cannot and resolves the spec. Errors are
    /// `(field, message)` pairs, the field relative to the `faults` block.
    pub fn resolve(&self) -> Result<Faults, Vec<(String, String)>> {
        let mut errors = Vec::new();
        let abort = self
            .abort
            .as_ref()
            .and_then(|a| resolve_abort(a, &mut errors));
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Faults {
            delay: self
                .delay
                .as_ref()
                .map(|d| (d.percent.fraction(), d.duration.0)),
            abort,
            truncate: self
                .truncate
                .as_ref()
                .map(|t| (t.percent.fraction(), t.after_bytes.0)),
            seed: self.seed.unwrap_or_else(|| fastrand::u64(..)),
            draws: Default::default(),
            spec: self.clone(),
        })
    }
}

fn resolve_abort(spec: &AbortSpec, errors: &mut Vec<(String, String)>) -> Option<Abort> {
    let status = match spec.status {
        Some(code) => match StatusCode::from_u16(code) {
            Ok(status) if (200..600).contains(&code) => Some(status),
            _ => {
                errors.push((
                    "abort.status".into(),
                    format!("{code} is not an HTTP status between 200 and 599"),
                ));
                None
            }
        },
        None => None,
    };
    let grpc = spec.grpc_status.map(|g| g.0);
    if spec.status.is_none() && grpc.is_none() {
        errors.push((
            "abort".into(),
            "give status (for HTTP callers), grpc_status (for gRPC callers), or both".into(),
        ));
    }
    let mut headers = HeaderMap::new();
    for (name, value) in &spec.headers {
        let field = format!("abort.headers.{name}");
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            (Err(_), _) => errors.push((field, format!("{name:?} is not a valid header name"))),
            (_, Err(_)) => errors.push((field, "not a valid header value".into())),
        }
    }
    let status = status.or_else(|| grpc.map(grpc::http_for_code))?;
    Some(Abort {
        fraction: spec.percent.fraction(),
        grpc: grpc.unwrap_or_else(|| grpc::code_for_http(status)),
        status,
        headers,
    })
}

/// Faults a caller asked for in request headers: they apply to every
/// attempt of the call.
#[derive(Debug, Clone, Copy, Default)]
pub struct Overrides {
    delay: Option<Duration>,
    abort: Option<(StatusCode, u8)>,
}

/// Reads and removes the fault headers of a call (`grpc`: the abort value
/// is a gRPC code, else an HTTP status). Values that do not parse are
/// ignored.
pub fn overrides(headers: &mut HeaderMap, grpc: bool) -> Overrides {
    let delay = headers
        .remove(DELAY_HEADER)
        .and_then(|v| v.to_str().ok()?.trim().parse().ok())
        .map(Duration::from_millis);
    let abort = headers.remove(ABORT_HEADER).and_then(|v| {
        let text = v.to_str().ok()?;
        if grpc {
            let code = grpc::code(text).filter(|c| *c != 0)?;
            Some((grpc::http_for_code(code), code))
        } else {
            let status = text
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|s| (200..600).contains(s))?;
            let status = StatusCode::from_u16(status).ok()?;
            Some((status, grpc::code_for_http(status)))
        }
    });
    Overrides { delay, abort }
}

/// What one attempt gets.
#[derive(Debug, Default)]
pub struct Injection {
    /// Wait this long before the attempt.
    pub delay: Option<Duration>,
    /// Answer this instead of calling the upstream.
    pub abort: Option<Response<Body>>,
    /// Cut the answer after this many body bytes.
    pub truncate: Option<u64>,
}

impl Injection {
    /// The kinds of fault in it, for spans.
    pub fn kinds(&self) -> Vec<&'static str> {
        let mut kinds = Vec::new();
        if self.delay.is_some() {
            kinds.push(FaultKind::Delay.label());
        }
        if self.abort.is_some() {
            kinds.push(FaultKind::Abort.label());
        }
        if self.truncate.is_some() {
            kinds.push(FaultKind::Truncate.label());
        }
        kinds
    }
}

impl Faults {
    /// The spec these faults were resolved from.
    pub fn spec(&self) -> &FaultSpec {
        &self.spec
    }

    /// Whether callers may ask for faults in request headers.
    pub fn allow_header_control(&self) -> bool {
        self.spec.allow_header_control
    }

    fn hit(&self, kind: FaultKind, fraction: f64) -> bool {
        let n = self.draws[kind as usize].fetch_add(1, Ordering::Relaxed);
        roll(self.seed, kind, n) < fraction
    }

    /// Rolls the dice for one attempt (`grpc`: a made-up answer is a gRPC
    /// status). Every configured kind rolls on every attempt, so the
    /// number of faults injected over n attempts is fixed by the seed.
    pub fn draw(&self, overrides: Overrides, grpc: bool) -> Injection {
        let delay = self
            .delay
            .and_then(|(fraction, d)| self.hit(FaultKind::Delay, fraction).then_some(d));
        let abort = self.abort.as_ref().and_then(|a| {
            self.hit(FaultKind::Abort, a.fraction)
                .then(|| abort_answer(a.status, a.grpc, &a.headers, grpc))
        });
        let truncate = self
            .truncate
            .and_then(|(fraction, n)| self.hit(FaultKind::Truncate, fraction).then_some(n));
        Injection {
            delay: overrides.delay.or(delay),
            abort: match overrides.abort {
                Some((status, code)) => Some(abort_answer(status, code, &HeaderMap::new(), grpc)),
                None => abort,
            },
            truncate,
        }
    }
}

/// The made-up answer of an abort: the HTTP status, or for gRPC callers a
/// trailers-only answer with the code; `x-breakwater-fault: abort` on both.
fn abort_answer(status: StatusCode, code: u8, headers: &HeaderMap, grpc: bool) -> Response<Body> {
    let mut response = if grpc {
        grpc::trailers_only(code, "injected fault")
    } else {
        let mut response = Response::new(body::full("injected fault\n"));
        *response.status_mut() = status;
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    };
    for (name, value) in headers {
        response.headers_mut().insert(name, value.clone());
    }
    response
        .headers_mut()
        .insert(FAULT_HEADER, HeaderValue::from_static("abort"));
    response
}

/// An upstream's current faults, replaced at runtime by the admin API.
#[derive(Debug, Default)]
pub struct FaultCell(ArcSwapOption<Faults>);

impl FaultCell {
    /// A cell holding `faults`.
    pub fn new(faults: Option<Faults>) -> Self {
        Self(ArcSwapOption::new(faults.map(Arc::new)))
    }

    /// The faults in force, if any (one atomic load when there are none).
    pub fn current(&self) -> Option<Arc<Faults>> {
        self.0.load().as_ref().map(Arc::clone)
    }

    /// Puts `faults` in force for the calls that start from now on.
    pub fn set(&self, faults: Option<Faults>) {
        self.0.store(faults.map(Arc::new));
    }
}

#[cfg(test)]
mod tests;
