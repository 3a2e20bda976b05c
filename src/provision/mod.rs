//! JetStream provisioning: the stream, dead-letter stream, KV bucket and consumer
//! configurations derived from the routing file, and creating or checking them.
//!
//! [`plan`] reads what exists and compares only the fields natsbridge manages, so server
//! defaults and settings an operator added by hand never show up as differences. [`apply`]
//! carries a plan out. Changes JetStream cannot make in place (a storage type change,
//! retention to or from workqueue) or that would delete stored data (removing subjects,
//! lowering a limit, limits → interest) are refused unless `force` is given; with `force`
//! the impossible ones delete and recreate the resource, and the plan says so.
//!
//! [`check`] is what `run` does without `sidecar.provision`: it lists what the sidecar
//! needs and cannot create itself (streams, the dead-letter stream, the idempotency
//! bucket). Consumers are not checked: ingress creates them when it binds.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{self, pull, AckPolicy, DeliverPolicy},
    kv,
    stream::{self, RetentionPolicy, StorageType},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{
    Config, Consumer, DeadLetterStream, IdempotencyStore, Inbound, InboundMode, OutboundTarget, Retention, Storage, StreamSpec,
};
use crate::health::Readiness;

/// The bucket's max_age when no route sets an idempotency ttl (the documented default ttl).
pub const DEFAULT_IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

/// The readiness check held while the first check (or provisioning) has not finished.
pub const READINESS_CHECK: &str = "provision";

/// How often `run` re-checks while something is missing, and once all exists.
const RECHECK_MISSING: Duration = Duration::from_secs(5);
const RECHECK_OK: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// Desired configurations

/// The durable pull consumer an inbound JetStream route binds to.
///
/// The route's `backoff` is deliberately *not* given to the server: nats-server replaces
/// `ack_wait` with `backoff[0]` whenever a backoff list is set (so a 30 s `ack_wait` with
/// `backoff = ["1s", ...]` would redeliver after 1 s), and it adds `backoff[n] - backoff[0]`
/// to every delayed nak. Ingress applies the backoff list itself through nak delays.
pub fn consumer_config(route: &Inbound, c: &Consumer) -> pull::Config {
    pull::Config {
        durable_name: Some(c.durable.clone()),
        description: Some(format!("natsbridge inbound route {}", route.name)),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: c.ack_wait,
        max_deliver: c.max_deliver,
        backoff: Vec::new(),
        filter_subject: route.subject.as_str().to_owned(),
        max_ack_pending: c.max_ack_pending,
        ..Default::default()
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
pub fn stream_config(s: &StreamSpec) -> stream::Config {
    let max_age = s.max_age.unwrap_or_default();
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
        ..Default::default()
    }
}

/// The stream that captures every route's dead letters. Limits retention: dead letters
/// stay until an operator replays or purges them, or a limit ages them out.
pub fn dead_letter_stream_config(d: &DeadLetterStream) -> stream::Config {
    stream::Config {
        name: d.stream.clone(),
        description: Some("natsbridge dead letters".into()),
        subjects: d.subjects.iter().map(|p| p.as_str().to_owned()).collect(),
        storage: storage_type(d.storage),
        num_replicas: d.replicas,
        retention: RetentionPolicy::Limits,
        max_age: d.max_age.unwrap_or_default(),
        max_bytes: d.max_bytes.unwrap_or(-1),
        max_messages: -1,
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
/// - `max_age` is `ttl`, the longest idempotency ttl of the routes: a completed key
///   written without a per-message TTL lives that long.
/// - `limit_markers` turns on per-message TTL (nats-server 2.11+, `allow_msg_ttl`), so a
///   claim can expire on its own after `claim_ttl` (`create_with_ttl`). The markers the
///   server leaves when a key expires live for `claim_ttl` (at least 1 s, the server's
///   minimum). [`plan`] drops it, and says so, on servers that do not support it.
pub fn kv_config(store: &IdempotencyStore, ttl: Duration) -> kv::Config {
    kv::Config {
        bucket: store.bucket.clone(),
        description: "natsbridge idempotency keys".into(),
        history: 1,
        max_age: ttl,
        storage: storage_type(store.storage),
        num_replicas: store.replicas,
        limit_markers: Some(store.claim_ttl.max(Duration::from_secs(1))),
        ..Default::default()
    }
}

/// The stream behind a KV bucket.
pub fn kv_stream_name(bucket: &str) -> String {
    format!("KV_{bucket}")
}

// ---------------------------------------------------------------------------------------
// The plan

/// What kind of resource a plan item or a missing thing is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    KvBucket,
    Stream,
    DeadLetterStream,
    Consumer,
    /// A stream that captures an outbound jetstream route's subject (only in [`check`]).
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

/// One managed field that differs: what the server has, and what the file wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDiff {
    pub field: &'static str,
    pub old: String,
    pub new: String,
}

/// What happened (or, in a dry run, would happen) to one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Created,
    Updated {
        diff: Vec<FieldDiff>,
    },
    Unchanged,
    /// Deleted and created again (`--force`): the change could not be made in place.
    Recreated {
        reason: String,
        diff: Vec<FieldDiff>,
    },
    /// Destructive or impossible; nothing was changed.
    Refused {
        reason: String,
        diff: Vec<FieldDiff>,
    },
    /// The server rejected the change, or the resource could not be read.
    Failed {
        error: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub kind: Kind,
    /// The stream or bucket name; `STREAM/durable` for consumers.
    pub name: String,
    pub status: Status,
    /// A warning that goes with the status (a forced destructive update, a server
    /// feature that is missing).
    pub note: Option<String>,
}

/// Every resource the routing file implies, and what was (or would be) done to it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub items: Vec<Item>,
    /// False for a dry run: nothing was changed.
    pub applied: bool,
}

impl Plan {
    pub fn item(&self, kind: Kind, name: &str) -> Option<&Item> {
        self.items.iter().find(|i| i.kind == kind && i.name == name)
    }

    pub fn refused(&self) -> impl Iterator<Item = &Item> {
        self.items.iter().filter(|i| matches!(i.status, Status::Refused { .. }))
    }

    pub fn failed(&self) -> impl Iterator<Item = &Item> {
        self.items.iter().filter(|i| matches!(i.status, Status::Failed { .. }))
    }

    /// Nothing refused and nothing failed.
    pub fn is_ok(&self) -> bool {
        self.refused().next().is_none() && self.failed().next().is_none()
    }

    /// Everything already matched the file.
    pub fn is_unchanged(&self) -> bool {
        self.items.iter().all(|i| i.status == Status::Unchanged)
    }

    fn count(&self, f: impl Fn(&Status) -> bool) -> usize {
        self.items.iter().filter(|i| f(&i.status)).count()
    }
}

fn fmt_diff(f: &mut fmt::Formatter<'_>, diff: &[FieldDiff]) -> fmt::Result {
    let width = diff.iter().map(|d| d.field.len()).max().unwrap_or(0);
    for d in diff {
        writeln!(f, "      {:<width$}  {} -> {}", d.field, d.old, d.new)?;
    }
    Ok(())
}

impl Item {
    fn fmt_with(&self, f: &mut fmt::Formatter<'_>, applied: bool) -> fmt::Result {
        let (mark, verb) = match (&self.status, applied) {
            (Status::Created, true) => ('+', "created".to_owned()),
            (Status::Created, false) => ('+', "create".to_owned()),
            (Status::Updated { .. }, true) => ('~', "updated".to_owned()),
            (Status::Updated { .. }, false) => ('~', "update".to_owned()),
            (Status::Unchanged, _) => ('=', "unchanged".to_owned()),
            (Status::Recreated { reason, .. }, true) => ('!', format!("deleted and recreated: {reason}")),
            (Status::Recreated { reason, .. }, false) => ('!', format!("delete and recreate: {reason}")),
            (Status::Refused { reason, .. }, _) => ('x', format!("REFUSED: {reason}")),
            (Status::Failed { error }, _) => ('x', format!("FAILED: {error}")),
        };
        writeln!(f, "  {mark} {:<18} {:<32} {verb}", self.kind.as_str(), self.name)?;
        if let Some(note) = &self.note {
            writeln!(f, "      note: {note}")?;
        }
        match &self.status {
            Status::Updated { diff } | Status::Recreated { diff, .. } | Status::Refused { diff, .. } => fmt_diff(f, diff),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_with(f, true)
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.applied {
            writeln!(f, "provisioning:")?;
        } else {
            writeln!(f, "provisioning plan (dry run, nothing changed):")?;
        }
        if self.items.is_empty() {
            writeln!(f, "  nothing to provision: no [[streams]], jetstream routes or idempotency")?;
        }
        for item in &self.items {
            item.fmt_with(f, self.applied)?;
        }
        let created = self.count(|s| matches!(s, Status::Created));
        let updated = self.count(|s| matches!(s, Status::Updated { .. }));
        let recreated = self.count(|s| matches!(s, Status::Recreated { .. }));
        let unchanged = self.count(|s| matches!(s, Status::Unchanged));
        let refused = self.count(|s| matches!(s, Status::Refused { .. }));
        let failed = self.count(|s| matches!(s, Status::Failed { .. }));
        write!(
            f,
            "{created} created, {updated} updated, {recreated} recreated, {unchanged} unchanged, {refused} refused, {failed} failed"
        )?;
        if refused > 0 {
            write!(f, "\nrefused changes were not made; `--force` makes the destructive ones (see each reason)")?;
        }
        writeln!(f)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("cannot query JetStream (is it enabled on the server?): {0}")]
    Account(String),
    #[error("cannot read {kind} {name:?}: {error}")]
    Read { kind: Kind, name: String, error: String },
}

// ---------------------------------------------------------------------------------------
// Comparing

fn fmt_age(d: Duration) -> String {
    if d.is_zero() {
        "unlimited".into()
    } else {
        humantime::format_duration(d).to_string()
    }
}

fn fmt_limit(n: i64) -> String {
    if n < 0 {
        "unlimited".into()
    } else {
        n.to_string()
    }
}

fn fmt_storage(s: StorageType) -> &'static str {
    match s {
        StorageType::File => "file",
        StorageType::Memory => "memory",
    }
}

fn fmt_retention(r: RetentionPolicy) -> &'static str {
    match r {
        RetentionPolicy::Limits => "limits",
        RetentionPolicy::Interest => "interest",
        RetentionPolicy::WorkQueue => "workqueue",
    }
}

fn fmt_list(v: &[String]) -> String {
    format!("[{}]", v.join(", "))
}

fn fmt_durations(v: &[Duration]) -> String {
    format!("[{}]", v.iter().map(|d| humantime::format_duration(*d).to_string()).collect::<Vec<_>>().join(", "))
}

/// Is `new` a tighter limit than `old` (so stored messages may be deleted)? 0 or a
/// negative value means unlimited.
fn tighter(old: i64, new: i64) -> bool {
    new > 0 && (old <= 0 || new < old)
}

/// How a wanted configuration relates to what exists.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    Unchanged,
    Update(Vec<FieldDiff>),
    /// Loses data or cannot be made in place: refused unless forced. `reason` says why,
    /// `cost` what forcing loses. `recreate`: forcing deletes and recreates instead of
    /// updating in place.
    Destructive {
        diff: Vec<FieldDiff>,
        reason: String,
        cost: String,
        recreate: bool,
    },
}

fn push_diff(diff: &mut Vec<FieldDiff>, field: &'static str, old: String, new: String) {
    if old != new {
        diff.push(FieldDiff { field, old, new });
    }
}

/// Compares the managed fields of a stream. `manage_duplicates`: whether the duplicate
/// window is ours (not for the dead-letter stream).
fn compare_stream(want: &stream::Config, have: &stream::Info, manage_duplicates: bool) -> Verdict {
    let old = &have.config;
    let mut diff = Vec::new();
    let mut want_subjects = want.subjects.clone();
    let mut have_subjects = old.subjects.clone();
    want_subjects.sort();
    have_subjects.sort();
    push_diff(&mut diff, "subjects", fmt_list(&have_subjects), fmt_list(&want_subjects));
    push_diff(&mut diff, "storage", fmt_storage(old.storage).into(), fmt_storage(want.storage).into());
    push_diff(&mut diff, "replicas", old.num_replicas.max(1).to_string(), want.num_replicas.max(1).to_string());
    push_diff(&mut diff, "retention", fmt_retention(old.retention).into(), fmt_retention(want.retention).into());
    push_diff(&mut diff, "max_age", fmt_age(old.max_age), fmt_age(want.max_age));
    push_diff(&mut diff, "max_bytes", fmt_limit(old.max_bytes), fmt_limit(want.max_bytes));
    push_diff(&mut diff, "max_msgs", fmt_limit(old.max_messages), fmt_limit(want.max_messages));
    if manage_duplicates {
        push_diff(&mut diff, "duplicate_window", fmt_age(old.duplicate_window), fmt_age(want.duplicate_window));
    }
    if diff.is_empty() {
        return Verdict::Unchanged;
    }
    let messages = have.state.messages;
    let cost = format!("the stream and its {messages} message{} are deleted", if messages == 1 { "" } else { "s" });
    if old.storage != want.storage {
        return Verdict::Destructive {
            reason: format!("storage cannot change in place ({} -> {})", fmt_storage(old.storage), fmt_storage(want.storage)),
            cost,
            diff,
            recreate: true,
        };
    }
    if old.retention != want.retention && (old.retention == RetentionPolicy::WorkQueue || want.retention == RetentionPolicy::WorkQueue) {
        return Verdict::Destructive {
            reason: format!(
                "retention cannot change to or from workqueue in place ({} -> {})",
                fmt_retention(old.retention),
                fmt_retention(want.retention)
            ),
            cost,
            diff,
            recreate: true,
        };
    }
    let mut losses = Vec::new();
    let removed: Vec<String> = have_subjects.iter().filter(|s| !want_subjects.contains(s)).cloned().collect();
    if !removed.is_empty() {
        losses.push(format!(
            "removes subjects {} (publishes to them would fail and their stored messages stop being captured)",
            fmt_list(&removed)
        ));
    }
    if old.retention == RetentionPolicy::Limits && want.retention == RetentionPolicy::Interest {
        losses.push("limits -> interest retention deletes messages no consumer is interested in".into());
    }
    let age = |d: Duration| d.as_nanos().min(i64::MAX as u128) as i64;
    if tighter(age(old.max_age), age(want.max_age)) {
        losses.push(format!("lowers max_age to {} (older messages are deleted now)", fmt_age(want.max_age)));
    }
    if tighter(old.max_bytes, want.max_bytes) {
        losses.push(format!("lowers max_bytes to {} (messages over it are deleted now)", want.max_bytes));
    }
    if tighter(old.max_messages, want.max_messages) {
        losses.push(format!("lowers max_msgs to {} (messages over it are deleted now)", want.max_messages));
    }
    if losses.is_empty() {
        Verdict::Update(diff)
    } else {
        Verdict::Destructive { reason: losses.join("; "), cost: "applied in place".into(), diff, recreate: false }
    }
}

/// The stream config to send for an in-place update: what exists, with only our fields
/// replaced, so settings added by hand (discard policy, placement...) survive.
fn merge_stream(have: &stream::Config, want: &stream::Config, manage_duplicates: bool) -> stream::Config {
    let mut c = have.clone();
    c.subjects = want.subjects.clone();
    c.num_replicas = want.num_replicas;
    c.retention = want.retention;
    c.max_age = want.max_age;
    c.max_bytes = want.max_bytes;
    c.max_messages = want.max_messages;
    if manage_duplicates {
        c.duplicate_window = want.duplicate_window;
    }
    c
}

fn consumer_filter(c: &consumer::Config) -> String {
    if !c.filter_subject.is_empty() {
        c.filter_subject.clone()
    } else {
        c.filter_subjects.join(", ")
    }
}

fn compare_consumer(want: &pull::Config, have: &consumer::Info, stream_messages: u64) -> Verdict {
    let old = &have.config;
    let mut diff = Vec::new();
    push_diff(&mut diff, "ack_wait", fmt_age(old.ack_wait), fmt_age(want.ack_wait));
    push_diff(&mut diff, "max_deliver", fmt_limit(old.max_deliver), fmt_limit(want.max_deliver));
    push_diff(&mut diff, "backoff", fmt_durations(&old.backoff), fmt_durations(&want.backoff));
    push_diff(&mut diff, "max_ack_pending", fmt_limit(old.max_ack_pending), fmt_limit(want.max_ack_pending));
    push_diff(&mut diff, "filter_subject", consumer_filter(old), want.filter_subject.clone());
    let push = old.deliver_subject.is_some();
    let ack = old.ack_policy != AckPolicy::Explicit;
    if push || ack {
        if push {
            push_diff(&mut diff, "type", "push".into(), "pull".into());
        }
        if ack {
            push_diff(&mut diff, "ack_policy", format!("{:?}", old.ack_policy).to_lowercase(), "explicit".into());
        }
        return Verdict::Destructive {
            reason: format!(
                "a {} consumer cannot become an explicit-ack pull consumer in place",
                if push { "push" } else { "non-explicit-ack" }
            ),
            cost: format!(
                "the consumer is deleted and created again, which redelivers every message still in the stream ({stream_messages})"
            ),
            diff,
            recreate: true,
        };
    }
    if diff.is_empty() {
        Verdict::Unchanged
    } else {
        Verdict::Update(diff)
    }
}

/// The consumer config to send for an in-place update: what exists, with only our fields
/// replaced. `None` for a push consumer (which cannot be updated into a pull one).
fn merge_consumer(have: &consumer::Config, want: &pull::Config) -> Option<pull::Config> {
    use jetstream::consumer::FromConsumer;
    let mut c = pull::Config::try_from_consumer_config(have.clone()).ok()?;
    c.ack_policy = AckPolicy::Explicit;
    c.ack_wait = want.ack_wait;
    c.max_deliver = want.max_deliver;
    c.backoff = want.backoff.clone();
    c.filter_subject = want.filter_subject.clone();
    c.filter_subjects = Vec::new();
    c.max_ack_pending = want.max_ack_pending;
    if c.description.is_none() {
        c.description = want.description.clone();
    }
    Some(c)
}

fn compare_kv(want: &kv::Config, have: &stream::Info) -> Verdict {
    let old = &have.config;
    let mut diff = Vec::new();
    push_diff(&mut diff, "history", old.max_messages_per_subject.to_string(), want.history.max(1).to_string());
    push_diff(&mut diff, "storage", fmt_storage(old.storage).into(), fmt_storage(want.storage).into());
    push_diff(&mut diff, "replicas", old.num_replicas.max(1).to_string(), want.num_replicas.max(1).to_string());
    push_diff(&mut diff, "max_age", fmt_age(old.max_age), fmt_age(want.max_age));
    let want_ttl = want.limit_markers.is_some();
    push_diff(&mut diff, "allow_msg_ttl", old.allow_message_ttl.to_string(), want_ttl.to_string());
    push_diff(
        &mut diff,
        "limit_markers",
        old.subject_delete_marker_ttl.map(fmt_age).unwrap_or_else(|| "off".into()),
        want.limit_markers.map(fmt_age).unwrap_or_else(|| "off".into()),
    );
    if diff.is_empty() {
        return Verdict::Unchanged;
    }
    let keys = have.state.messages;
    if old.storage != want.storage {
        return Verdict::Destructive {
            reason: format!("storage cannot change in place ({} -> {})", fmt_storage(old.storage), fmt_storage(want.storage)),
            cost: format!("the bucket and its {keys} keys are deleted, so messages already handled may be handled again"),
            diff,
            recreate: true,
        };
    }
    if old.allow_message_ttl && !want_ttl {
        return Verdict::Destructive {
            reason: "per-message TTL cannot be turned off in place".into(),
            cost: format!("the bucket and its {keys} keys are deleted, so messages already handled may be handled again"),
            diff,
            recreate: true,
        };
    }
    Verdict::Update(diff)
}

// ---------------------------------------------------------------------------------------
// Planning

/// What `apply` does for one item.
#[derive(Debug, Clone)]
enum Op {
    None,
    CreateStream(stream::Config),
    UpdateStream(stream::Config),
    RecreateStream(stream::Config),
    CreateConsumer { stream: String, config: pull::Config },
    UpdateConsumer { stream: String, config: pull::Config },
    RecreateConsumer { stream: String, config: pull::Config },
    CreateKv(kv::Config),
    UpdateKv(kv::Config),
    RecreateKv(kv::Config),
}

struct Planned {
    item: Item,
    op: Op,
}

fn item(kind: Kind, name: impl Into<String>, status: Status) -> Item {
    Item { kind, name: name.into(), status, note: None }
}

/// Turns a verdict into an item and its operation, honouring `force`.
fn decide(kind: Kind, name: &str, verdict: Verdict, force: bool, update: impl FnOnce() -> Op, recreate: impl FnOnce() -> Op) -> Planned {
    match verdict {
        Verdict::Unchanged => Planned { item: item(kind, name, Status::Unchanged), op: Op::None },
        Verdict::Update(diff) => Planned { item: item(kind, name, Status::Updated { diff }), op: update() },
        Verdict::Destructive { diff, reason, cost, recreate } if !force => {
            let what = if recreate { format!("with --force {cost}") } else { "--force applies it in place".into() };
            Planned { item: item(kind, name, Status::Refused { reason: format!("{reason}; {what}"), diff }), op: Op::None }
        }
        Verdict::Destructive { diff, reason, cost, recreate: true } => {
            Planned { item: item(kind, name, Status::Recreated { reason: format!("{reason}; {cost}"), diff }), op: recreate() }
        }
        Verdict::Destructive { diff, reason, recreate: false, .. } => Planned {
            item: Item { kind, name: name.to_owned(), status: Status::Updated { diff }, note: Some(format!("forced: {reason}")) },
            op: update(),
        },
    }
}

fn is_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(err) if err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// A stream's info, or `None` when it does not exist.
async fn read_stream(js: &jetstream::Context, kind: Kind, name: &str) -> Result<Option<stream::Info>, ProvisionError> {
    match js.get_stream(name).await {
        Ok(mut s) => {
            let info = s.info().await.map_err(|e| ProvisionError::Read { kind, name: name.into(), error: e.to_string() })?;
            Ok(Some(info.clone()))
        }
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(ProvisionError::Read { kind, name: name.into(), error: e.to_string() }),
    }
}

async fn read_consumer(js: &jetstream::Context, stream: &str, durable: &str) -> Result<Option<consumer::Info>, ProvisionError> {
    use jetstream::context::ConsumerInfoErrorKind as K;
    let s = js.get_stream_no_info(stream).await.map_err(|e| ProvisionError::Read {
        kind: Kind::Stream,
        name: stream.into(),
        error: e.to_string(),
    })?;
    match s.consumer_info(durable).await {
        Ok(info) => Ok(Some(info)),
        Err(e) if matches!(e.kind(), K::NotFound) => Ok(None),
        Err(e) if matches!(&e.kind(), K::JetStream(err) if err.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND) => Ok(None),
        Err(e) => Err(ProvisionError::Read { kind: Kind::Consumer, name: format!("{stream}/{durable}"), error: e.to_string() }),
    }
}

/// The jetstream inbound routes, with their consumers.
fn jetstream_routes(config: &Config) -> impl Iterator<Item = (&Inbound, &Consumer)> {
    config.inbound.iter().filter_map(|i| match &i.mode {
        InboundMode::JetStream(c) => Some((i, c)),
        _ => None,
    })
}

/// Reads what exists and compares it with the file, without changing anything, as if
/// `--force` were not given.
pub async fn plan(js: &jetstream::Context, config: &Config) -> Result<Plan, ProvisionError> {
    plan_with(js, config, false).await
}

/// As [`plan`]; with `force`, destructive changes show as what `apply(.., true)` does.
pub async fn plan_with(js: &jetstream::Context, config: &Config, force: bool) -> Result<Plan, ProvisionError> {
    let planned = compute(js, config, force).await?;
    Ok(Plan { items: planned.into_iter().map(|p| p.item).collect(), applied: false })
}

async fn compute(js: &jetstream::Context, config: &Config, force: bool) -> Result<Vec<Planned>, ProvisionError> {
    let mut out = Vec::new();
    let has_jetstream_routes = jetstream_routes(config).next().is_some();
    if config.streams.is_empty() && !has_jetstream_routes && !uses_idempotency(config) {
        return Ok(out);
    }

    // The idempotency bucket.
    if uses_idempotency(config) {
        let mut want = kv_config(&config.idempotency, idempotency_ttl(config));
        let account = js.query_account().await.map_err(|e| ProvisionError::Account(e.to_string()))?;
        let mut note = None;
        if account.requests.level < 1 {
            want.limit_markers = None;
            note = Some(
                "this server has no per-message TTL (nats-server 2.11+); idempotency claims expire only with the bucket's max_age"
                    .to_owned(),
            );
        }
        let name = want.bucket.clone();
        let mut p = match read_stream(js, Kind::KvBucket, &kv_stream_name(&name)).await? {
            None => Planned { item: item(Kind::KvBucket, &name, Status::Created), op: Op::CreateKv(want) },
            Some(have) => {
                let verdict = compare_kv(&want, &have);
                let (w1, w2) = (want.clone(), want);
                decide(Kind::KvBucket, &name, verdict, force, move || Op::UpdateKv(w1), move || Op::RecreateKv(w2))
            }
        };
        if p.item.note.is_none() {
            p.item.note = note;
        }
        out.push(p);
    }

    // Streams; remember which ones this plan (re)creates, for their consumers.
    let mut fresh: BTreeSet<String> = BTreeSet::new();
    let mut existing: BTreeMap<String, u64> = BTreeMap::new();
    let mut streams: Vec<(Kind, stream::Config, bool)> = config.streams.iter().map(|s| (Kind::Stream, stream_config(s), true)).collect();
    if has_jetstream_routes {
        streams.push((Kind::DeadLetterStream, dead_letter_stream_config(&config.dead_letter), false));
    }
    for (kind, want, manage_duplicates) in streams {
        let name = want.name.clone();
        let p = match read_stream(js, kind, &name).await? {
            None => {
                fresh.insert(name.clone());
                Planned { item: item(kind, &name, Status::Created), op: Op::CreateStream(want) }
            }
            Some(have) => {
                existing.insert(name.clone(), have.state.messages);
                let verdict = compare_stream(&want, &have, manage_duplicates);
                let merged = merge_stream(&have.config, &want, manage_duplicates);
                let p = decide(kind, &name, verdict, force, move || Op::UpdateStream(merged), move || Op::RecreateStream(want));
                if matches!(p.op, Op::RecreateStream(_)) {
                    fresh.insert(name.clone());
                }
                p
            }
        };
        out.push(p);
    }

    // Consumers.
    for (route, c) in jetstream_routes(config) {
        let want = consumer_config(route, c);
        let name = format!("{}/{}", c.stream, c.durable);
        let create = || Planned {
            item: item(Kind::Consumer, &name, Status::Created),
            op: Op::CreateConsumer { stream: c.stream.clone(), config: want.clone() },
        };
        if fresh.contains(&c.stream) {
            out.push(create());
            continue;
        }
        let messages = match existing.get(&c.stream) {
            Some(n) => *n,
            None => match read_stream(js, Kind::Stream, &c.stream).await? {
                Some(info) => {
                    existing.insert(c.stream.clone(), info.state.messages);
                    info.state.messages
                }
                None => {
                    out.push(Planned {
                        item: item(
                            Kind::Consumer,
                            &name,
                            Status::Refused {
                                reason: format!(
                                    "stream {:?} (route {:?}) does not exist and no [[streams]] entry declares it",
                                    c.stream, route.name
                                ),
                                diff: Vec::new(),
                            },
                        ),
                        op: Op::None,
                    });
                    continue;
                }
            },
        };
        let p = match read_consumer(js, &c.stream, &c.durable).await? {
            None => create(),
            Some(have) => {
                let verdict = compare_consumer(&want, &have, messages);
                let merged = merge_consumer(&have.config, &want).unwrap_or_else(|| want.clone());
                let (s1, s2) = (c.stream.clone(), c.stream.clone());
                decide(
                    Kind::Consumer,
                    &name,
                    verdict,
                    force,
                    move || Op::UpdateConsumer { stream: s1, config: merged },
                    move || Op::RecreateConsumer { stream: s2, config: want },
                )
            }
        };
        out.push(p);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Applying

async fn execute(js: &jetstream::Context, op: Op) -> Result<(), String> {
    let e = |e: &dyn fmt::Display| e.to_string();
    match op {
        Op::None => Ok(()),
        Op::CreateStream(c) => js.create_stream(c).await.map(drop).map_err(|x| e(&x)),
        Op::UpdateStream(c) => js.update_stream(c).await.map(drop).map_err(|x| e(&x)),
        Op::RecreateStream(c) => {
            js.delete_stream(&c.name).await.map_err(|x| format!("cannot delete: {x}"))?;
            js.create_stream(c).await.map(drop).map_err(|x| e(&x))
        }
        Op::CreateConsumer { stream, config } | Op::UpdateConsumer { stream, config } => {
            js.create_consumer_on_stream(config, stream).await.map(drop).map_err(|x| e(&x))
        }
        Op::RecreateConsumer { stream, config } => {
            let durable = config.durable_name.clone().unwrap_or_default();
            let s = js.get_stream_no_info(&stream).await.map_err(|x| e(&x))?;
            s.delete_consumer(&durable).await.map_err(|x| format!("cannot delete: {x}"))?;
            js.create_consumer_on_stream(config, stream).await.map(drop).map_err(|x| e(&x))
        }
        Op::CreateKv(c) => js.create_key_value(c).await.map(drop).map_err(|x| e(&x)),
        Op::UpdateKv(c) => js.update_key_value(c).await.map(drop).map_err(|x| e(&x)),
        Op::RecreateKv(c) => {
            js.delete_key_value(&c.bucket).await.map_err(|x| format!("cannot delete: {x}"))?;
            js.create_key_value(c).await.map(drop).map_err(|x| e(&x))
        }
    }
}

/// Makes JetStream match the file and returns what was done. Idempotent: a second run is
/// all [`Status::Unchanged`]. Destructive changes are refused unless `force`. A failure on
/// one item is recorded in the plan and the others still run.
pub async fn apply(js: &jetstream::Context, config: &Config, force: bool) -> Result<Plan, ProvisionError> {
    let planned = compute(js, config, force).await?;
    let mut items = Vec::with_capacity(planned.len());
    for Planned { mut item, op } in planned {
        if let Err(error) = execute(js, op).await {
            item.status = Status::Failed { error };
        }
        items.push(item);
    }
    Ok(Plan { items, applied: true })
}

// ---------------------------------------------------------------------------------------
// Checking

/// Something `run` needs that does not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub kind: Kind,
    /// The stream or bucket name; the subject for [`Kind::SubjectCapture`].
    pub name: String,
    /// The routes that need it.
    pub needed_by: Vec<String>,
}

impl Missing {
    /// The readiness check it fails: `provision:<kind>:<name>`.
    pub fn check_name(&self) -> String {
        format!("provision:{}:{}", self.kind.key(), self.name)
    }
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let routes = self.needed_by.iter().map(|r| format!("{r:?}")).collect::<Vec<_>>().join(", ");
        let by = if self.needed_by.len() == 1 { "route" } else { "routes" };
        match self.kind {
            Kind::SubjectCapture => write!(f, "no stream captures subject {:?} (needed by {by} {routes})", self.name)?,
            Kind::KvBucket => write!(f, "kv bucket {:?} does not exist (needed by {by} {routes} for idempotency)", self.name)?,
            kind => write!(f, "{kind} {:?} does not exist (needed by {by} {routes})", self.name)?,
        }
        f.write_str("; run `natsbridge provision` or set [sidecar] provision = true")
    }
}

/// What `run` needs and cannot create itself: the streams of the inbound jetstream routes,
/// a stream capturing each outbound jetstream subject, the dead-letter stream, and the
/// idempotency bucket when a route uses it. Consumers are left out: ingress creates them.
pub async fn check(js: &jetstream::Context, config: &Config) -> Result<Vec<Missing>, ProvisionError> {
    let mut needs: BTreeMap<(Kind, String), Vec<String>> = BTreeMap::new();
    for (route, c) in jetstream_routes(config) {
        needs.entry((Kind::Stream, c.stream.clone())).or_default().push(route.name.clone());
        needs.entry((Kind::DeadLetterStream, config.dead_letter.stream.clone())).or_default().push(route.name.clone());
    }
    for route in config.inbound.iter().filter(|i| i.idempotency.is_some()) {
        needs.entry((Kind::KvBucket, config.idempotency.bucket.clone())).or_default().push(route.name.clone());
    }
    for o in &config.outbound {
        if let OutboundTarget::JetStream(t) = &o.target {
            needs.entry((Kind::SubjectCapture, t.probe())).or_default().push(o.name.clone());
        }
    }
    let mut missing = Vec::new();
    for ((kind, name), needed_by) in needs {
        let exists = match kind {
            Kind::SubjectCapture => {
                use jetstream::context::GetStreamByNameErrorKind as K;
                match js.stream_by_subject(name.clone()).await {
                    Ok(_) => true,
                    Err(e) if e.kind() == K::NotFound => false,
                    Err(e) => return Err(ProvisionError::Read { kind, name, error: e.to_string() }),
                }
            }
            Kind::KvBucket => read_stream(js, kind, &kv_stream_name(&name)).await?.is_some(),
            _ => read_stream(js, kind, &name).await?.is_some(),
        };
        if !exists {
            missing.push(Missing { kind, name, needed_by });
        }
    }
    Ok(missing)
}

// ---------------------------------------------------------------------------------------
// The sidecar's provisioning task

/// Starts the task `run` uses: with `sidecar.provision` it applies the plan (again after
/// each reload); in any case it checks what the routes need, fails readiness with
/// `provision:<kind>:<name>` for each missing thing, and re-checks until it exists. It
/// waits for NATS, so a NATS outage never blocks startup. Readiness holds
/// [`READINESS_CHECK`] from now until the first check has finished.
pub fn spawn(
    nats: async_nats::Client,
    config: watch::Receiver<Arc<Config>>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    readiness.fail(READINESS_CHECK, "checking JetStream streams and buckets");
    tokio::spawn(supervise(nats, config, readiness, shutdown))
}

async fn supervise(
    nats: async_nats::Client,
    mut config_rx: watch::Receiver<Arc<Config>>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) {
    let js = jetstream::new(nats.clone());
    let mut failing: BTreeSet<String> = BTreeSet::new();
    let mut provisioned: Option<Arc<Config>> = None;
    let mut last_error: Option<String> = None;
    loop {
        while !crate::nats::connection::is_connected(&nats) {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        let config = config_rx.borrow_and_update().clone();
        let mut wait = RECHECK_MISSING;
        if config.sidecar.provision && !provisioned.as_ref().is_some_and(|p| Arc::ptr_eq(p, &config)) {
            match apply(&js, &config, false).await {
                Ok(plan) => {
                    for item in &plan.items {
                        let text = item.to_string();
                        match item.status {
                            Status::Refused { .. } | Status::Failed { .. } => tracing::warn!("provision: {}", text.trim_end()),
                            _ => tracing::info!("provision: {}", text.trim_end()),
                        }
                    }
                    provisioned = Some(config.clone());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "provisioning failed; retrying");
                    readiness.fail(READINESS_CHECK, format!("provisioning failed: {e}"));
                    if wait_or_stop(&shutdown, &mut config_rx, wait).await {
                        return;
                    }
                    continue;
                }
            }
        }
        match check(&js, &config).await {
            Ok(missing) => {
                last_error = None;
                let now: BTreeSet<String> = missing.iter().map(Missing::check_name).collect();
                for m in &missing {
                    if !failing.contains(&m.check_name()) {
                        tracing::warn!("{m}");
                    }
                    readiness.fail(m.check_name(), m.to_string());
                }
                for gone in failing.difference(&now) {
                    tracing::info!(check = %gone, "now exists");
                    readiness.pass(gone);
                }
                failing = now;
                readiness.pass(READINESS_CHECK);
                if failing.is_empty() {
                    wait = RECHECK_OK;
                }
            }
            Err(e) => {
                let text = e.to_string();
                if last_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(error = %text, "cannot check JetStream resources; retrying");
                }
                last_error = Some(text);
                if failing.is_empty() {
                    readiness.fail(READINESS_CHECK, format!("cannot check JetStream resources: {e}"));
                }
            }
        }
        if wait_or_stop(&shutdown, &mut config_rx, wait).await {
            return;
        }
    }
}

/// Waits `wait`, or less when the config changes; true when it is time to stop.
async fn wait_or_stop(shutdown: &CancellationToken, config: &mut watch::Receiver<Arc<Config>>, wait: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(wait) => false,
        r = config.changed() => r.is_err(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diff(field: &'static str, old: &str, new: &str) -> FieldDiff {
        FieldDiff { field, old: old.into(), new: new.into() }
    }

    #[test]
    fn tighter_limits() {
        assert!(tighter(-1, 10));
        assert!(tighter(0, 10));
        assert!(tighter(20, 10));
        assert!(!tighter(10, 20));
        assert!(!tighter(10, -1));
        assert!(!tighter(10, 10));
    }

    #[test]
    fn plan_display_shows_field_diffs() {
        let plan = Plan {
            applied: false,
            items: vec![
                item(Kind::Stream, "A", Status::Created),
                item(Kind::Stream, "B", Status::Updated { diff: vec![diff("max_age", "1h", "2h")] }),
                item(
                    Kind::Stream,
                    "C",
                    Status::Refused { reason: "storage cannot change".into(), diff: vec![diff("storage", "file", "memory")] },
                ),
            ],
        };
        let text = plan.to_string();
        assert!(text.contains("dry run"), "{text}");
        assert!(text.contains("+ stream             A"), "{text}");
        assert!(text.contains("max_age  1h -> 2h"), "{text}");
        assert!(text.contains("REFUSED: storage cannot change"), "{text}");
        assert!(text.contains("1 created, 1 updated, 0 recreated, 0 unchanged, 1 refused, 0 failed"), "{text}");
        assert!(!plan.is_ok());
    }
}
