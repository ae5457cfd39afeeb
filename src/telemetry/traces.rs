//! OpenTelemetry traces: a span for each request and each attempt,
//! W3C trace context carried to the upstream, exported over OTLP/gRPC.
//!
//! Tracing is on only when an OTLP endpoint is configured
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
//! see [`Tracing::from_env`]). Without one there is no tracer, no span
//! and no header rewriting: the request path checks one `Option` and
//! forwards `traceparent` untouched, as any other header.
//!
//! With one, each request gets a server span, the child of the caller's
//! `traceparent` (or the root of a new trace), and each attempt a client
//! span under it; the attempt's `traceparent` (and the caller's
//! `tracestate`) go to the upstream, so the upstream's spans hang under
//! the attempt that reached them. Spans are batched and exported off the
//! request path by the SDK's batch processor.

use std::borrow::Cow;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response};
use http_body::{Frame, SizeHint};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use crate::body::{self, Body, BoxError};
use crate::classify::Failure;

/// A tracer exporting to an OTLP collector.
#[derive(Debug, Clone)]
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the OTLP trace exporter: {0}")]
pub struct TracingError(String);

impl Tracing {
    /// Tracing as the OpenTelemetry environment variables ask for it, or
    /// `None` when they ask for none: no OTLP endpoint set,
    /// `OTEL_TRACES_EXPORTER=none` or `OTEL_SDK_DISABLED=true`. The
    /// exporter itself reads the endpoint, `OTEL_EXPORTER_OTLP_HEADERS`,
    /// `OTEL_EXPORTER_OTLP_TIMEOUT` and their `_TRACES_` forms; the SDK
    /// reads `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
    /// `OTEL_TRACES_SAMPLER(_ARG)` and `OTEL_BSP_*`. Must run inside a
    /// tokio runtime.
    pub fn from_env() -> Result<Option<Self>, TracingError> {
        let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
        let disabled = std::env::var("OTEL_SDK_DISABLED")
            .is_ok_and(|v| v.eq_ignore_ascii_case("true"))
            || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim() == "none");
        if disabled
            || !(set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        {
            return Ok(None);
        }
        for name in [
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        ] {
            if let Ok(protocol) = std::env::var(name)
                && protocol.trim() != "grpc"
            {
                tracing::warn!(
                    "{name}={protocol} is not supported: traces are exported over OTLP/gRPC"
                );
            }
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| TracingError(e.to_string()))?;
        tracing::info!("exporting traces over OTLP/gRPC");
        Ok(Some(Self::with_exporter(exporter)))
    }

    /// Tracing to the OTLP/gRPC collector at `endpoint`
    /// (`http://host:4317`). Must run inside a tokio runtime.
    pub fn otlp(endpoint: &str) -> Result<Self, TracingError> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| TracingError(e.to_string()))?;
        Ok(Self::with_exporter(exporter))
    }

    fn with_exporter(exporter: opentelemetry_otlp::SpanExporter) -> Self {
        let detected = Resource::builder().build();
        let unnamed = detected
            .get(&opentelemetry::Key::from_static_str("service.name"))
            .is_none_or(|name| name.as_str().starts_with("unknown_service"));
        let mut resource = Resource::builder();
        if unnamed {
            resource = resource.with_service_name("breakwater");
        }
        let provider = SdkTracerProvider::builder()
            .with_resource(resource.build())
            .with_batch_exporter(exporter)
            .build();
        let tracer = provider.tracer("breakwater");
        Self { provider, tracer }
    }

    /// Exports every finished span now. Blocks: call it off the runtime's
    /// threads (`spawn_blocking`).
    pub fn flush(&self) {
        if let Err(error) = self.provider.force_flush() {
            tracing::warn!(%error, "flushing spans failed");
        }
    }

    /// Exports what is left and stops the exporter (blocks up to 5 s).
    pub fn shutdown(&self) {
        if let Err(error) = self.provider.shutdown_with_timeout(Duration::from_secs(5)) {
            tracing::warn!(%error, "shutting down the span exporter failed");
        }
    }

    /// Starts the span of a request to `upstream`, the child of the
    /// caller's `traceparent` if it sent one.
    pub fn request(
        &self,
        headers: &HeaderMap,
        method: &http::Method,
        path: &str,
        upstream: &str,
    ) -> RequestSpan {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let span = self
            .tracer
            .span_builder(format!("{method} {upstream}"))
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("breakwater.upstream", upstream.to_owned()),
                KeyValue::new("http.request.method", method.to_string()),
                KeyValue::new("url.path", path.to_owned()),
            ])
            .start_with_context(&self.tracer, &parent);
        RequestSpan {
            tracer: self.tracer.clone(),
            cx: parent.with_span(span),
        }
    }
}

/// The span of one request, the parent of its attempts' spans.
#[derive(Debug)]
pub struct RequestSpan {
    tracer: SdkTracer,
    cx: Context,
}

/// What an attempt span records at its start.
#[derive(Debug)]
pub struct AttemptStart<'a> {
    /// The upstream's name.
    pub upstream: &'a str,
    /// 1 for the first attempt.
    pub number: u32,
    /// Why it was sent: the previous failure's label, or `hedge`.
    pub cause: Option<String>,
    /// The circuit as the attempt was admitted: `closed`, `half-open`.
    pub breaker: Option<&'static str>,
    /// The faults injected into it (`delay`, `abort`, `truncate`).
    pub faults: Vec<&'static str>,
}

impl RequestSpan {
    /// Starts an attempt's span and writes its `traceparent` into the
    /// attempt's headers (with the caller's `tracestate`).
    pub fn attempt(&self, start: AttemptStart<'_>, headers: &mut HeaderMap) -> AttemptSpan {
        let mut attributes = vec![
            KeyValue::new("breakwater.upstream", start.upstream.to_owned()),
            KeyValue::new("breakwater.attempt", i64::from(start.number)),
        ];
        if let Some(cause) = start.cause {
            attributes.push(KeyValue::new("breakwater.retry_reason", cause));
        }
        if let Some(state) = start.breaker {
            attributes.push(KeyValue::new("breakwater.breaker_state", state));
        }
        if !start.faults.is_empty() {
            attributes.push(KeyValue::new("breakwater.fault", start.faults.join(",")));
        }
        let span = self
            .tracer
            .span_builder(format!("attempt {}", start.upstream))
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &self.cx);
        let cx = self.cx.with_span(span);
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
        AttemptSpan { cx }
    }

    /// Records what the request matched: its route, and its JSON-RPC
    /// method (OpenTelemetry's `rpc.system: jsonrpc` and `rpc.method`).
    pub fn matched(&self, route: Option<&str>, jsonrpc_method: Option<&str>) {
        let span = self.cx.span();
        if let Some(route) = route {
            span.set_attribute(KeyValue::new("breakwater.route", route.to_owned()));
        }
        if let Some(method) = jsonrpc_method {
            span.set_attribute(KeyValue::new("rpc.system", "jsonrpc"));
            span.set_attribute(KeyValue::new("rpc.method", method.to_owned()));
        }
    }

    /// Records how the request ended: the answer's status, and the
    /// sidecar's reason when it answered itself or degraded, or the
    /// upstream's failure as classified.
    pub fn answered(
        &self,
        response: &Response<Body>,
        error: Option<&'static str>,
        degraded: Option<&str>,
        failure: Option<Failure>,
    ) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(response.status().as_u16()),
        ));
        if let Some(code) = grpc_status(response.headers()) {
            span.set_attribute(KeyValue::new("rpc.grpc.status_code", code));
        }
        if let Some(crate::jsonrpc::Verdict::Error(code) | crate::jsonrpc::Verdict::Failure(code)) =
            response.extensions().get()
        {
            span.set_attribute(KeyValue::new("rpc.jsonrpc.error_code", i64::from(*code)));
        }
        if let Some(reason) = degraded {
            span.set_attribute(KeyValue::new("breakwater.degraded", reason.to_owned()));
        }
        if let Some(reason) = error {
            span.set_attribute(KeyValue::new("breakwater.error", reason));
            span.set_status(Status::error(reason));
        } else if let Some(failure) = failure {
            span.set_status(Status::error(Cow::Owned(failure.label())));
        }
    }

    /// Ends the span when the answer's body ends (or is dropped).
    pub fn end_with(self, response: Response<Body>) -> Response<Body> {
        response.map(|inner| body::boxed(SpanBody { inner, span: self }))
    }
}

impl Drop for RequestSpan {
    fn drop(&mut self) {
        self.cx.span().end();
    }
}

/// The span of one attempt; ended by [`AttemptSpan::finish`] or on drop
/// (a cancelled hedge).
#[derive(Debug)]
pub struct AttemptSpan {
    cx: Context,
}

impl AttemptSpan {
    /// Records the attempt's result: the answer's status (an error status
    /// when classified as a `failure`), or the error.
    pub fn finish<B>(
        self,
        result: &Result<Response<B>, crate::error::ProxyError>,
        failure: Option<Failure>,
    ) {
        let span = self.cx.span();
        match result {
            Ok(response) => {
                span.set_attribute(KeyValue::new(
                    "http.response.status_code",
                    i64::from(response.status().as_u16()),
                ));
                if let Some(code) = grpc_status(response.headers()) {
                    span.set_attribute(KeyValue::new("rpc.grpc.status_code", code));
                }
                if let Some(failure) = failure {
                    span.set_status(Status::error(failure.label()));
                }
            }
            Err(error) => {
                span.set_attribute(KeyValue::new("breakwater.error", error.reason()));
                span.set_status(Status::error(error.to_string()));
            }
        }
    }
}

impl Drop for AttemptSpan {
    fn drop(&mut self) {
        self.cx.span().end();
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<i64> {
    crate::grpc::status(headers).map(i64::from)
}

/// An answer's body that ends its request's span when it ends.
struct SpanBody {
    inner: Body,
    span: RequestSpan,
}

impl http_body::Body for SpanBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(error))) = &polled {
            self.span
                .cx
                .span()
                .set_status(Status::error(format!("answer failed mid-stream: {error}")));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)?.to_str().ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}
