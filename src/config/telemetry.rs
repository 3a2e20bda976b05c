//! The validated `[telemetry]` section: where the sidecar's OpenTelemetry spans go.

use std::time::Duration;

/// `[telemetry]`: spans exported over OTLP/HTTP (protobuf). Read at start: a reload does
/// not start, stop or move the exporter.
#[derive(Debug, Clone, PartialEq)]
pub struct Telemetry {
    /// The collector's traces URL: `otlp_endpoint` with `/v1/traces` appended unless it
    /// already ends so (as `OTEL_EXPORTER_OTLP_ENDPOINT` is read).
    pub traces_url: http::Uri,
    /// The spans' `service.name` (default: `[sidecar] service`).
    pub service_name: String,
    /// The share (0–1) of new traces recorded; a call that arrives with a `traceparent`
    /// follows its caller's sampling decision.
    pub sample_ratio: f64,
    /// The bound on one export request to the collector.
    pub export_timeout: Duration,
}

/// The path of the OTLP/HTTP traces endpoint.
pub const TRACES_PATH: &str = "/v1/traces";
/// `export_timeout` unless set.
pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
