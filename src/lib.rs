//! natsbridge: a sidecar that carries a legacy HTTP service's traffic over NATS and
//! JetStream, one route at a time.
//!
//! The modules, by what they own:
//! - [`config`]: `routes.toml`, parsed then validated, with `file:line` diagnostics.
//! - [`subject`]: NATS subjects, subject templates and app path templates.
//! - [`routes`]: the egress route table (a radix tree per host).
//! - [`codec`]: the pure HTTP ↔ NATS translation (headers, status, tunnel envelope).
//! - [`problem`]: failures as HTTP statuses and `application/problem+json` bodies.
//! - [`connection`]: the NATS connection, its auth, TLS, reconnects and events.
//! - [`egress`]: the HTTP listener that carries the app's calls over NATS.
//! - [`idempotency`]: the shared KV store that keeps a handler from running twice.
//! - [`ingress`]: subscriptions and consumers that call the local app.
//! - [`dlq`]: dead letters: their `Bridge-Dlq-*` headers and acked publishing.
//! - [`inject`]: the Kubernetes MutatingAdmissionWebhook that injects the sidecar into pods.
//! - [`admin`]: health, readiness and metrics endpoints.
//! - [`metrics`]: the Prometheus families and per-route handles.
//! - [`reload`]: hot reload of the routing file.
//! - [`provision`]: streams, consumers and buckets derived from the routing file.
//! - [`sidecar`]: one running sidecar, wired from the parts above.

pub mod admin;
pub mod codec;
pub mod config;
pub mod connection;
pub mod dlq;
pub mod egress;
pub mod idempotency;
pub mod ingress;
pub mod inject;
pub mod metrics;
pub mod problem;
pub mod provision;
pub mod reload;
pub mod routes;
pub mod sidecar;
pub mod subject;
