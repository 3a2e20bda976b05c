//! OpenTelemetry traces (`[telemetry]`): the spans of each hop, exported over OTLP/HTTP
//! (protobuf) by the opentelemetry crates, so a trace runs HTTP → sidecar → NATS →
//! sidecar → app as one tree.
//!
//! Owns the tracer provider (its batch exporter, sampler and resource), the span shapes
//! and their attributes ([`spans`]), and `traceparent` in and out of HTTP and NATS headers
//! ([`propagation`]). Egress and ingress hold a [`Telemetry`] and call it at their hops;
//! without `[telemetry]` it is off: no exporter, no span, one branch per hop. Calls only
//! `config`.
//!
//! A provider per sidecar, passed in, never the global one: two sidecars in one process
//! (the tests) export under their own service names.

mod propagation;
pub mod spans;

use std::sync::Arc;
use std::time::Instant;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

pub use spans::{AppSpan, EgressSpans, MessageSpan};

/// The spans' instrumentation scope.
const SCOPE: &str = "natsbridge";

#[derive(Debug, thiserror::Error)]
#[error("cannot start the OTLP exporter: {0}")]
pub struct TelemetryError(#[from] opentelemetry_otlp::ExporterBuildError);

/// The sidecar's tracer, or nothing (`[telemetry]` absent). Cheap to clone.
#[derive(Clone, Default)]
pub struct Telemetry(Option<Arc<Inner>>);

struct Inner {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl Telemetry {
    /// Off: every hop is a no-op.
    pub fn off() -> Self {
        Self(None)
    }

    /// Starts the exporter of `config` (on the current Tokio runtime); `None` is off.
    pub fn start(config: Option<&crate::config::Telemetry>) -> Result<Self, TelemetryError> {
        let Some(config) = config else { return Ok(Self::off()) };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(config.traces_url.to_string())
            .with_timeout(config.export_timeout)
            .build()?;
        // Exports run as a task on the sidecar's runtime (its hyper client needs one); a
        // span's end only queues it, and a full queue drops spans rather than wait.
        let processor = BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
        // A caller's sampling decision (its traceparent's flag) is followed; new traces are
        // sampled at `sample_ratio`.
        let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio)));
        // `builder_empty`: the resource comes from the file, not from OTEL_* variables.
        let resource = Resource::builder_empty().with_service_name(config.service_name.clone()).build();
        let provider = SdkTracerProvider::builder().with_span_processor(processor).with_sampler(sampler).with_resource(resource).build();
        let tracer = provider.tracer(SCOPE);
        tracing::info!(endpoint = %config.traces_url, service_name = %config.service_name, sample_ratio = config.sample_ratio, "exporting spans over OTLP/HTTP");
        Ok(Self(Some(Arc::new(Inner { provider, tracer, propagator: TraceContextPropagator::new() }))))
    }

    /// Exports the spans still queued, by `by` (the stop's budget); past it they are lost
    /// and the stop goes on.
    pub async fn shutdown(&self, by: Instant) {
        let Some(inner) = &self.0 else { return };
        let provider = inner.provider.clone();
        let budget = by.saturating_duration_since(Instant::now());
        // The SDK's shutdown blocks until the export task answers: off the runtime's threads.
        let flush = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(budget));
        match tokio::time::timeout_at(by.into(), flush).await {
            Ok(Ok(Ok(()))) => tracing::debug!("spans exported"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "could not export the last spans"),
            Ok(Err(e)) => tracing::warn!(error = %e, "the span export task failed"),
            Err(_) => tracing::warn!("the last spans were not exported within the drain budget"),
        }
    }
}

impl Drop for Inner {
    /// A sidecar dropped without its stop (an aborted task) still shuts its provider down,
    /// on a thread of its own: the SDK's shutdown blocks, which on a runtime thread could
    /// wait for the export task that thread should be running.
    fn drop(&mut self) {
        let provider = self.provider.clone();
        let _ = std::thread::Builder::new().name("otel-shutdown".into()).spawn(move || {
            let _ = provider.shutdown();
        });
    }
}
