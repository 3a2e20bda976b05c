//! The desired state: the JetStream stream, dead-letter stream, KV bucket and consumer
//! configurations the routing file implies. Pure; nothing here talks to the server.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{
    consumer::{pull, AckPolicy, DeliverPolicy},
    kv,
    stream::{self, DiscardPolicy, RetentionPolicy, StorageType},
};

use super::DEFAULT_IDEMPOTENCY_TTL;
use crate::config::{
    Config, Consumer, DeadLetterStream, Deliver, IdempotencyStore, Inbound, InboundMode, Outbound, OutboundTarget, Retention, Storage,
    StreamSpec,
};

/// The consumer metadata key naming the service whose routes own the consumer: what
/// `provision --prune` goes by (never the durable's name, which anyone can choose).
pub const OWNER_KEY: &str = "natsbridge.service";
/// The consumer metadata key naming the route a consumer was created for.
pub const ROUTE_KEY: &str = "natsbridge.route";

/// The replica count of a resource that does not set one: min(3, the cluster's size).
/// Three survive one server's restart or lost volume; more only slow every write down.
pub fn default_replicas(cluster_size: usize) -> usize {
    cluster_size.clamp(1, 3)
}

fn deliver_policy(d: Deliver) -> DeliverPolicy {
    match d {
        Deliver::New => DeliverPolicy::New,
        Deliver::All => DeliverPolicy::All,
        Deliver::StartTime(t) => DeliverPolicy::ByStartTime { start_time: t.into() },
    }
}

/// The durable pull consumer an inbound JetStream route binds to.
///
/// The route's `backoff` is deliberately *not* given to the server: nats-server replaces
/// `ack_wait` with `backoff[0]` whenever a backoff list is set (so a 30 s `ack_wait` with
/// `backoff = ["1s", ...]` would redeliver after 1 s), and it adds `backoff[n] - backoff[0]`
/// to every delayed nak. Ingress applies the backoff list itself through nak delays.
///
/// Nor is the route's `max_deliver`: the server's is unlimited and the sidecar enforces
/// the route's from the delivery count, dead-lettering a message delivered past it before
/// calling the app. A server-side limit would strand a message whose last delivery was
/// lost (a crash, a nak at shutdown): the server stops delivering it and only an advisory,
/// which nobody may be listening to, says so.
///
/// It starts where the route's `deliver` says (new messages only, by default: a renamed
/// route or service gets a new durable, which must not replay the whole stream), and its
/// metadata names the owning service and route.
pub fn consumer_config(route: &Inbound, c: &Consumer) -> pull::Config {
    let metadata = HashMap::from([(OWNER_KEY.to_owned(), c.service.clone()), (ROUTE_KEY.to_owned(), route.name.clone())]);
    pull::Config {
        durable_name: Some(c.durable.clone()),
        description: Some(format!("natsbridge inbound route {}", route.name)),
        deliver_policy: deliver_policy(c.deliver),
        metadata,
        ack_policy: AckPolicy::Explicit,
        ack_wait: c.ack_wait,
        max_deliver: -1,
        backoff: Vec::new(),
        filter_subject: route.subject.as_str().to_owned(),
        max_ack_pending: c.max_ack_pending,
        ..Default::default()
    }
}

/// A workqueue stream only holds what no consumer has taken yet, and the server accepts
/// nothing but deliver-all consumers on it: there, a new consumer starts at the beginning.
pub fn fit_to_stream(config: &mut pull::Config, retention: RetentionPolicy) {
    if retention == RetentionPolicy::WorkQueue {
        config.deliver_policy = DeliverPolicy::All;
    }
}

fn storage_type(s: Storage) -> StorageType {
    match s {
        Storage::File => StorageType::File,
        Storage::Memory => StorageType::Memory,
    }
}

fn retention_policy(r: Retention) -> RetentionPolicy {
    match r {
        Retention::Limits => RetentionPolicy::Limits,
        Retention::Interest => RetentionPolicy::Interest,
        Retention::WorkQueue => RetentionPolicy::WorkQueue,
    }
}

/// A `[[streams]]` entry as a JetStream stream configuration. The duplicate window is
/// capped at `max_age`, as the server requires.
///
/// A workqueue or interest stream with `max_msgs` or `max_bytes` discards *new*
/// messages when full: the publisher gets an error (503) instead of the server dropping
/// the oldest messages, which were acked to their publishers and not yet consumed.
pub fn stream_config(s: &StreamSpec) -> stream::Config {
    let max_age = s.max_age.unwrap_or_default();
    let limited = s.max_msgs.is_some_and(|n| n > 0) || s.max_bytes.is_some_and(|n| n > 0);
    let discard = if limited && s.retention != Retention::Limits { DiscardPolicy::New } else { DiscardPolicy::Old };
    let duplicate_window = if !max_age.is_zero() && s.duplicate_window > max_age { max_age } else { s.duplicate_window };
    stream::Config {
        name: s.name.clone(),
        description: Some("provisioned by natsbridge".into()),
        subjects: s.subjects.iter().map(|p| p.as_str().to_owned()).collect(),
        storage: storage_type(s.storage),
        num_replicas: s.replicas,
        retention: retention_policy(s.retention),
        max_age,
        max_bytes: s.max_bytes.unwrap_or(-1),
        max_messages: s.max_msgs.unwrap_or(-1),
        duplicate_window,
        discard,
        allow_message_ttl: s.allow_msg_ttl,
        ..Default::default()
    }
}

/// The stream that captures every route's dead letters. Limits retention: dead letters
/// stay until an operator replays or purges them, or `max_age` ages them out.
///
/// When `max_bytes` is reached it discards *new* dead letters: dead-lettering then fails,
/// so the message stays unacked in its own stream and is retried, instead of the server
/// silently dropping the oldest dead letters. `natsbridge_dlq_fill_ratio` shows how full it is.
pub fn dead_letter_stream_config(d: &DeadLetterStream, cluster_size: usize) -> stream::Config {
    stream::Config {
        name: d.stream.clone(),
        description: Some("natsbridge dead letters".into()),
        subjects: d.subjects.iter().map(|p| p.as_str().to_owned()).collect(),
        storage: storage_type(d.storage),
        num_replicas: d.replicas.unwrap_or_else(|| default_replicas(cluster_size)),
        retention: RetentionPolicy::Limits,
        max_age: d.max_age,
        max_bytes: if d.max_bytes > 0 { d.max_bytes } else { -1 },
        max_messages: -1,
        discard: DiscardPolicy::New,
        ..Default::default()
    }
}

/// The longest idempotency ttl among the inbound routes, or [`DEFAULT_IDEMPOTENCY_TTL`].
pub fn idempotency_ttl(config: &Config) -> Duration {
    config.inbound.iter().filter_map(|i| i.idempotency.as_ref().map(|x| x.ttl)).max().unwrap_or(DEFAULT_IDEMPOTENCY_TTL)
}

/// Does any inbound route use the idempotency store?
pub fn uses_idempotency(config: &Config) -> bool {
    config.inbound.iter().any(|i| i.idempotency.is_some())
}

/// The idempotency bucket.
///
/// - One value per key (`history = 1`).
/// - `max_age` is `ttl` (the longest idempotency ttl of the routes) plus `claim_ttl`: a
///   key claimed just before its claim expired and completed then still lives `ttl`.
///   [`plan()`](super::plan()) never lowers it (see there).
/// - `limit_markers` turns on per-message TTL (nats-server 2.11+, `allow_msg_ttl`), so a
///   claim can expire on its own after `claim_ttl` (`create_with_ttl`). The markers the
///   server leaves when a key expires live for `claim_ttl` (at least 1 s, the server's
///   minimum). [`plan()`](super::plan()) drops it, and says so, on servers that do not support it.
pub fn kv_config(store: &IdempotencyStore, ttl: Duration, cluster_size: usize) -> kv::Config {
    kv::Config {
        bucket: store.bucket.clone(),
        description: "natsbridge idempotency keys".into(),
        history: 1,
        max_age: ttl + store.claim_ttl,
        storage: storage_type(store.storage),
        num_replicas: store.replicas.unwrap_or_else(|| default_replicas(cluster_size)),
        limit_markers: Some(store.claim_ttl.max(Duration::from_secs(1))),
        ..Default::default()
    }
}

/// The bucket async request-reply keeps its operations in (`Prefer: respond-async`, or a
/// route with `async = true`); shared by every service, like the idempotency bucket.
pub const OPERATIONS_BUCKET: &str = "natsbridge_operations";

/// The outbound routes that may run async, with whether they always do (`async = true`).
/// Every request and tunnel route honours `Prefer: respond-async` (RFC 7240), so each one
/// may write the operations bucket.
pub fn async_routes(config: &Config) -> impl Iterator<Item = (&Outbound, bool)> {
    config
        .outbound
        .iter()
        .filter(|o| matches!(o.target, OutboundTarget::Request(_) | OutboundTarget::Tunnel { .. }))
        .map(|o| (o, o.always_async))
}

/// Does any route use the operations bucket (`async = true` or `Prefer: respond-async`)?
pub fn uses_operations(config: &Config) -> bool {
    async_routes(config).next().is_some()
}

/// The operations bucket, the same whether `provision` or a sidecar's first async call
/// creates it.
///
/// - One value per key (`history = 1`); no `max_age`: each value carries its own expiry
///   (`Nats-TTL`, the route's `async_ttl`), so services with different ttls share it.
/// - `limit_markers` turns on per-message TTL (nats-server 2.11+), which it needs.
pub fn operations_kv_config(cluster_size: usize) -> kv::Config {
    kv::Config {
        bucket: OPERATIONS_BUCKET.into(),
        description: "natsbridge async operations".into(),
        history: 1,
        num_replicas: default_replicas(cluster_size),
        limit_markers: Some(Duration::from_secs(1)),
        ..Default::default()
    }
}

/// The bucket where each durable's ack floor is kept (`ingress::jetstream::floors`), so
/// a durable lost while its route was not running is recreated where it left off. Shared
/// by every service; keys are `<stream>.<durable>`.
pub const FLOORS_BUCKET: &str = "natsbridge_consumer_floors";

/// Does any route keep a floor (an inbound jetstream route)?
pub fn uses_floors(config: &Config) -> bool {
    jetstream_routes(config).next().is_some()
}

/// The floors bucket, the same whether `provision` or a sidecar creates it: one value
/// per key, no expiry (an idle route's floor must outlive its idleness; a record is a
/// few dozen bytes).
pub fn floors_kv_config(cluster_size: usize) -> kv::Config {
    kv::Config {
        bucket: FLOORS_BUCKET.into(),
        description: "natsbridge: where each durable consumer's acks had got to".into(),
        history: 1,
        num_replicas: default_replicas(cluster_size),
        ..Default::default()
    }
}

/// The stream behind a KV bucket.
pub fn kv_stream_name(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// The jetstream inbound routes, with their consumers.
pub(super) fn jetstream_routes(config: &Config) -> impl Iterator<Item = (&Inbound, &Consumer)> {
    config.inbound.iter().filter_map(|i| match &i.mode {
        InboundMode::JetStream(c) => Some((i, c)),
        _ => None,
    })
}
