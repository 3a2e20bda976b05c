//! natsbridge: a sidecar that carries a legacy HTTP service's traffic over NATS and
//! JetStream, one route at a time.
//!
//! The modules, by what they own:
//! - [`config`]: `routes.toml`, parsed then validated, with `file:line` diagnostics.
//! - [`subject`]: NATS subjects, subject templates and app path templates.
//! - [`routes`]: the egress route table (radix tree per host).
//! - [`inject`]: the Kubernetes MutatingAdmissionWebhook that injects the sidecar into pods.

pub mod config;
pub mod inject;
pub mod routes;
pub mod subject;
