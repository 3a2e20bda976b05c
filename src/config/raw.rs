//! Exactly what serde reads from the routing file. Each top-level section is kept as a
//! spanned `toml::Value` so that one bad route does not hide the errors of the others;
//! the validators deserialize each table into the matching `Raw*` type on their own.

use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDocument {
    pub(super) sidecar: Option<Spanned<toml::Value>>,
    pub(super) nats: Option<Spanned<toml::Value>>,
    pub(super) defaults: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub(super) outbound: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    pub(super) inbound: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    pub(super) streams: Vec<Spanned<toml::Value>>,
    pub(super) dead_letter: Option<Spanned<toml::Value>>,
    pub(super) idempotency: Option<Spanned<toml::Value>>,
    pub(super) telemetry: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSidecar {
    pub(super) service: String,
    pub(super) listen: Option<String>,
    pub(super) admin_listen: Option<String>,
    pub(super) app_url: Option<String>,
    pub(super) drain_timeout: Option<String>,
    #[serde(default)]
    pub(super) provision: bool,
    pub(super) max_inflight_publishes: Option<usize>,
    pub(super) worker_threads: Option<usize>,
    pub(super) header_read_timeout: Option<String>,
    pub(super) max_headers: Option<usize>,
    pub(super) max_header_bytes: Option<String>,
    pub(super) idle_timeout: Option<String>,
    pub(super) max_connections: Option<usize>,
    pub(super) readiness: Option<String>,
    pub(super) reply_prefixes: Option<Vec<String>>,
    pub(super) app_health_path: Option<String>,
    pub(super) unmatched: Option<String>,
    pub(super) connect_allow: Option<Vec<String>>,
    pub(super) forward_connect_timeout: Option<String>,
    pub(super) version: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNats {
    pub(super) servers: Option<Vec<String>>,
    pub(super) connect_timeout: Option<String>,
    pub(super) inbox_prefix: Option<String>,
    pub(super) token_file: Option<String>,
    pub(super) token_env: Option<String>,
    pub(super) user: Option<String>,
    pub(super) password_file: Option<String>,
    pub(super) password_env: Option<String>,
    pub(super) nkey_seed_file: Option<String>,
    pub(super) nkey_seed_env: Option<String>,
    pub(super) creds_file: Option<String>,
    pub(super) tls: Option<RawTls>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) ca_file: Option<String>,
    pub(super) cert_file: Option<String>,
    pub(super) key_file: Option<String>,
    #[serde(default)]
    pub(super) require: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDefaults {
    pub(super) timeout: Option<String>,
    pub(super) max_body: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutbound {
    pub(super) name: String,
    pub(super) method: Option<String>,
    pub(super) host: Option<String>,
    pub(super) path: String,
    pub(super) subject: Option<String>,
    pub(super) mode: String,
    pub(super) timeout: Option<String>,
    pub(super) max_body: Option<String>,
    pub(super) service: Option<String>,
    pub(super) upstream: Option<String>,
    pub(super) allow_nats_headers: Option<RawAllowNatsHeaders>,
    pub(super) stream_stall: Option<String>,
    pub(super) stream_max: Option<String>,
    pub(super) stream_buffer: Option<usize>,
    pub(super) stream_end: Option<String>,
    pub(super) stream: Option<String>,
    pub(super) deliver: Option<String>,
    pub(super) heartbeat: Option<String>,
    pub(super) ttl: Option<String>,
    #[serde(rename = "async")]
    pub(super) always_async: Option<bool>,
    pub(super) async_ttl: Option<String>,
    pub(super) codec: Option<String>,
    /// NestJS: a string or a table (`{ cmd = "sum" }`).
    pub(super) pattern: Option<toml::Value>,
    /// The JSON Schema the body must satisfy, `…/<name>/v<N>.json`.
    pub(super) schema: Option<String>,
    /// Several versions of one contract; the message names one (`Bridge-Schema`).
    pub(super) schemas: Option<Vec<String>>,
    /// CloudEvents: the `type` of events made from plain requests (default: the subject).
    pub(super) ce_type: Option<String>,
    pub(super) cutover: Option<RawCutover>,
}

/// `cutover = { nats_percent = 10, sticky = "header:X-Workflow-Id", … }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCutover {
    pub(super) nats_percent: Option<i64>,
    pub(super) sticky: Option<String>,
    #[serde(default)]
    pub(super) shadow: bool,
    #[serde(default)]
    pub(super) shadow_unsafe: bool,
    #[serde(default)]
    pub(super) fallback: bool,
}

/// `allow_nats_headers = true` or a list of header names.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawAllowNatsHeaders {
    All(bool),
    Names(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInbound {
    pub(super) name: String,
    pub(super) subject: Option<String>,
    pub(super) mode: String,
    pub(super) method: Option<String>,
    pub(super) path: Option<String>,
    pub(super) queue: Option<String>,
    pub(super) stream: Option<String>,
    pub(super) durable: Option<String>,
    pub(super) max_deliver: Option<i64>,
    pub(super) backoff: Option<Vec<String>>,
    pub(super) ack_wait: Option<String>,
    pub(super) max_ack_pending: Option<i64>,
    pub(super) dead_letter: Option<String>,
    pub(super) deliver: Option<String>,
    pub(super) concurrency: Option<usize>,
    pub(super) timeout: Option<String>,
    pub(super) max_body: Option<String>,
    pub(super) idempotency: Option<RawIdempotency>,
    pub(super) reply_prefixes: Option<Vec<String>>,
    pub(super) forwarded: Option<String>,
    pub(super) extra_methods: Option<Vec<String>>,
    pub(super) max_buffer: Option<String>,
    pub(super) codec: Option<String>,
    /// NestJS: a string or a table (`{ cmd = "sum" }`), the subject it subscribes to.
    pub(super) pattern: Option<toml::Value>,
    pub(super) stream_coalesce: Option<String>,
    pub(super) stream_stall: Option<String>,
    /// The JSON Schema every message must satisfy before the app sees it.
    pub(super) schema: Option<String>,
    /// Several versions of one contract; the message names one (`Bridge-Schema`).
    pub(super) schemas: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdempotency {
    pub(super) key: String,
    pub(super) ttl: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStream {
    pub(super) name: String,
    /// Another routes file owns the stream's settings; this one only needs it to exist.
    #[serde(default)]
    pub(super) reference: bool,
    #[serde(default)]
    pub(super) subjects: Vec<String>,
    pub(super) storage: Option<String>,
    pub(super) replicas: Option<usize>,
    pub(super) retention: Option<String>,
    pub(super) max_age: Option<String>,
    pub(super) max_bytes: Option<String>,
    pub(super) max_msgs: Option<i64>,
    pub(super) duplicate_window: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDeadLetter {
    /// Another routes file owns the dead-letter stream's settings.
    #[serde(default)]
    pub(super) reference: bool,
    pub(super) stream: Option<String>,
    pub(super) subjects: Option<Vec<String>>,
    pub(super) storage: Option<String>,
    pub(super) replicas: Option<usize>,
    pub(super) max_age: Option<String>,
    pub(super) max_bytes: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdempotencyStore {
    pub(super) bucket: Option<String>,
    pub(super) replicas: Option<usize>,
    pub(super) claim_ttl: Option<String>,
    pub(super) max_response_bytes: Option<String>,
    pub(super) storage: Option<String>,
}

/// `[telemetry]`: where spans go. Leaving the section out exports nothing.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTelemetry {
    pub(super) otlp_endpoint: String,
    pub(super) service_name: Option<String>,
    pub(super) sample_ratio: Option<f64>,
    pub(super) export_timeout: Option<String>,
}
