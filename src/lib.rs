//! natsbridge: a sidecar that carries a legacy HTTP service's traffic over NATS and
//! JetStream, one route at a time.
//!
//! The modules, by what they own:
//! - [`config`]: `routes.toml`, parsed then validated, with `file:line` diagnostics.
//! - [`subject`]: NATS subjects, subject templates and app path templates.
//! - [`streamed`]: the streamed-reply wire contract (sequence, end, cancel) and its framing.
//! - [`codec`]: the pure HTTP ↔ NATS translation (headers, status, tunnel envelope).
//! - [`problem`]: failures as HTTP statuses and `application/problem+json` bodies.
//! - [`nats`]: the NATS connection, its auth, TLS, reconnects and events.
//! - [`egress`]: the HTTP listener that carries the app's calls over NATS, and its route table.
//! - [`ingress`]: subscriptions and consumers that call the local app, with idempotency.
//! - [`dlq`]: dead letters: their `Bridge-Dlq-*` headers and acked publishing.
//! - [`inject`]: the Kubernetes MutatingAdmissionWebhook that injects the sidecar into pods.
//! - [`health`]: the component registry (state, reason, since) and what readiness means.
//! - [`admin`]: the health, readiness, status and metrics endpoints.
//! - [`metrics`]: the Prometheus families and per-route handles.
//! - [`own_time`]: the sidecar's own time per request (HdrHistograms, `/debug/own-time`).
//! - [`reload`]: hot reload of the routing file.
//! - [`graph`]: `natsbridge graph`, the event flows of many routing files as a picture.
//! - [`provision`]: streams, consumers and buckets derived from the routing file.
//! - [`permissions`]: the NATS allow-lists a routing file needs (least privilege).
//! - [`shutdown`]: the stop's one `drain_timeout` budget, split between its steps.
//! - [`telemetry`]: OpenTelemetry spans of each hop, exported over OTLP (`[telemetry]`).
//! - [`sidecar`]: one running sidecar, wired from the parts above.
//! - [`dev`]: `natsbridge dev`, the local loop: nats-server, sidecar and app together.

#![forbid(unsafe_code)]

pub mod admin;
pub mod codec;
pub mod config;
pub mod contract;
pub mod dev;
pub mod dlq;
pub mod egress;
pub mod graph;
pub mod health;
pub mod ingress;
pub mod inject;
pub mod metrics;
pub mod nats;
pub mod own_time;
pub mod permissions;
pub mod problem;
pub mod provision;
pub mod reload;
pub mod shutdown;
pub mod sidecar;
pub mod streamed;
pub mod subject;
pub mod telemetry;
