//! JetStream provisioning: the stream, dead-letter stream, KV bucket and consumer
//! configurations derived from the routing file, and creating or checking them.
//!
//! [`plan()`] reads what exists and compares only the fields natsbridge manages, so server
//! defaults and settings an operator added by hand never show up as differences. [`apply()`]
//! carries a plan out. Changes JetStream cannot make in place (a storage type change,
//! retention to or from workqueue) or that would delete stored data (removing subjects,
//! lowering a limit, limits → interest) are refused unless `force` is given; with `force`
//! the impossible ones delete and recreate the resource, and the plan says so.
//!
//! [`check()`] is what `run` does without `sidecar.provision`: it lists what the sidecar
//! needs and cannot create itself (streams, the dead-letter stream, the idempotency
//! bucket, the operations bucket of `async = true` routes). Consumers are not checked:
//! ingress creates them when it binds.
//!
//! The floors bucket (each durable's ack floor, kept so a lost durable resumes) is planned
//! with any jetstream inbound route; it is never required (a sidecar creates it, or runs
//! without it and warns).
//!
//! The operations bucket (async request-reply) is planned whenever a request or tunnel
//! route exists, since each honours `Prefer: respond-async`; readiness only requires it
//! for `async = true` routes, which cannot answer without it (the others answer
//! synchronous calls as before, and a sidecar still creates it on first use).
//!
//! Owns: `spec` (desired configs, pure), `compare` (diffs, pure), `plan` (reading the
//! server into a [`Plan`]), `owner` (who owns a shared stream's settings: references,
//! the owner in the stream's metadata, conflicts across files), `apply` (changing it), `prune` (removing this service's
//! consumers whose routes are gone), `check` (what is missing), `watch` (the
//! sidecar's task gating readiness). May call `config`, `health` and `nats::connection`;
//! only `spec` is called from elsewhere in the library (ingress builds its consumer).

use std::fmt;
use std::time::Duration;

mod apply;
mod check;
mod compare;
mod owner;
mod plan;
mod prune;
mod spec;
mod watch;

pub use apply::{apply, ApplyError};
pub use check::{check, Missing};
pub use compare::FieldDiff;
pub use owner::{conflicts, Conflict};
pub use plan::{cluster_size, plan, plan_with, Item, Plan, Status};
pub use prune::prune;
pub use spec::{
    async_routes, consumer_config, dead_letter_stream_config, default_replicas, fit_to_stream, floors_kv_config, idempotency_ttl,
    kv_config, kv_stream_name, operations_kv_config, stream_config, uses_floors, uses_idempotency, uses_operations, FLOORS_BUCKET,
    OPERATIONS_BUCKET, OWNER_KEY, ROUTE_KEY,
};
pub use watch::spawn;

/// The bucket's max_age when no route sets an idempotency ttl (the documented default ttl).
pub const DEFAULT_IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

/// What kind of resource a plan item or a missing thing is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    KvBucket,
    Stream,
    DeadLetterStream,
    Consumer,
    /// A stream that captures an outbound jetstream route's subject (only in [`check()`]).
    SubjectCapture,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::KvBucket => "kv bucket",
            Kind::Stream => "stream",
            Kind::DeadLetterStream => "dead-letter stream",
            Kind::Consumer => "consumer",
            Kind::SubjectCapture => "subject",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Kind::KvBucket => "kv",
            Kind::Stream => "stream",
            Kind::DeadLetterStream => "dead-letter-stream",
            Kind::Consumer => "consumer",
            Kind::SubjectCapture => "subject",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A boxed error from the JetStream client: reading a resource can fail in several calls,
/// each with its own error type.
type SourceError = Box<dyn std::error::Error + Send + Sync>;

/// Why no plan could be made: the server could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("cannot query JetStream (is it enabled on the server?): {0}")]
    Account(#[source] async_nats::jetstream::context::AccountError),
    #[error("cannot read {kind} {name:?}: {source}")]
    Read {
        kind: Kind,
        name: String,
        #[source]
        source: SourceError,
    },
}
