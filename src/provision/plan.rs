//! The plan: every resource the routing file implies, what exists, and what was (or
//! would be) done to each one, with its Display for `natsbridge provision`. Reading the
//! server happens here; changing it happens in `apply`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use async_nats::jetstream::{
    self,
    consumer::{self, pull, DeliverPolicy},
    kv, stream,
};

use super::compare::{compare_consumer, compare_kv, compare_stream, merge_consumer, merge_kv, merge_stream, FieldDiff, Verdict};
use super::spec::{
    consumer_config, dead_letter_stream_config, fit_to_stream, floors_kv_config, idempotency_ttl, jetstream_routes, kv_config,
    kv_stream_name, operations_kv_config, stream_config, uses_floors, uses_idempotency, uses_operations, OWNER_KEY,
};
use super::{Kind, ProvisionError};
use crate::config::{Config, Consumer, Inbound};

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
    /// A consumer whose route is gone (`--prune`): deleted, or to be deleted in a dry run.
    Deleted,
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
            (Status::Deleted, true) => ('-', "deleted (its route is gone)".to_owned()),
            (Status::Deleted, false) => ('-', "delete (its route is gone)".to_owned()),
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
            writeln!(f, "  nothing to provision: no [[streams]], jetstream routes, idempotency or request/tunnel routes")?;
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
        let deleted = self.count(|s| matches!(s, Status::Deleted));
        write!(
            f,
            "{created} created, {updated} updated, {recreated} recreated, {unchanged} unchanged, {refused} refused, {failed} failed"
        )?;
        if deleted > 0 {
            write!(f, ", {deleted} deleted")?;
        }
        if refused > 0 {
            write!(f, "\nrefused changes were not made; `--force` makes the destructive ones (see each reason)")?;
        }
        writeln!(f)
    }
}

/// What `apply` does for one item.
#[derive(Debug, Clone)]
pub(super) enum Op {
    None,
    CreateStream(stream::Config),
    UpdateStream(stream::Config),
    RecreateStream(stream::Config),
    CreateConsumer { stream: String, config: pull::Config },
    UpdateConsumer { stream: String, config: pull::Config },
    RecreateConsumer { stream: String, config: pull::Config },
    CreateKv(kv::Config),
    RecreateKv(kv::Config),
}

pub(super) struct Planned {
    pub(super) item: Item,
    pub(super) op: Op,
}

pub(super) fn item(kind: Kind, name: impl Into<String>, status: Status) -> Item {
    Item { kind, name: name.into(), status, note: None }
}

/// What a verdict comes to, given `force`: the item's status (refused, updated, recreated)
/// and the operation `apply` carries out for it.
fn action_for_verdict(
    kind: Kind,
    name: &str,
    verdict: Verdict,
    force: bool,
    update: impl FnOnce() -> Op,
    recreate: impl FnOnce() -> Op,
) -> Planned {
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
pub(super) async fn read_stream(js: &jetstream::Context, kind: Kind, name: &str) -> Result<Option<stream::Info>, ProvisionError> {
    match js.get_stream(name).await {
        Ok(mut s) => {
            let info = s.info().await.map_err(|e| ProvisionError::Read { kind, name: name.into(), source: Box::new(e) })?;
            Ok(Some(info.clone()))
        }
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(ProvisionError::Read { kind, name: name.into(), source: Box::new(e) }),
    }
}

async fn read_consumer(js: &jetstream::Context, stream: &str, durable: &str) -> Result<Option<consumer::Info>, ProvisionError> {
    use jetstream::context::ConsumerInfoErrorKind as K;
    let s = js.get_stream_no_info(stream).await.map_err(|e| ProvisionError::Read {
        kind: Kind::Stream,
        name: stream.into(),
        source: Box::new(e),
    })?;
    match s.consumer_info(durable).await {
        Ok(info) => Ok(Some(info)),
        Err(e) if matches!(e.kind(), K::NotFound) => Ok(None),
        Err(e) if matches!(&e.kind(), K::JetStream(err) if err.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND) => Ok(None),
        Err(e) => Err(ProvisionError::Read { kind: Kind::Consumer, name: format!("{stream}/{durable}"), source: Box::new(e) }),
    }
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

/// What the plan has learnt about streams so far: which ones it (re)creates, so their
/// consumers are simply created, and how many messages each existing one holds, which
/// a consumer's recreation would redeliver.
#[derive(Default)]
struct KnownStreams {
    fresh: BTreeSet<String>,
    messages: BTreeMap<String, u64>,
    retention: BTreeMap<String, stream::RetentionPolicy>,
}

/// How many servers the cluster has, from the INFO of the server we are connected to: it
/// lists the client URLs of every server of its cluster (itself included). 1 when it is
/// not clustered. (A cluster with `no_advertise` lists none: set `replicas` there.)
pub fn cluster_size(client: &async_nats::Client) -> usize {
    let info = client.server_info();
    if info.cluster.is_none() {
        return 1;
    }
    info.connect_urls.iter().collect::<BTreeSet<_>>().len().max(1)
}

/// The warning for a one-replica copy of the dead letters or the idempotency keys on a
/// clustered server.
fn single_replica_note(cluster: usize, replicas: usize, what: &str) -> Option<String> {
    (cluster > 1 && replicas <= 1).then(|| {
        format!(
            "one replica on a cluster of {cluster} servers: one server restarting makes {what} unavailable, and losing its volume loses them; set replicas = 3 (or leave it unset)"
        )
    })
}

/// Every planned action, in order: the buckets (idempotency, operations, floors), the streams, the consumers.
pub(super) async fn compute(js: &jetstream::Context, config: &Config, force: bool) -> Result<Vec<Planned>, ProvisionError> {
    let mut out = Vec::new();
    let cluster = cluster_size(&js.client());
    let has_jetstream_routes = jetstream_routes(config).next().is_some();
    if config.streams.is_empty() && !has_jetstream_routes && !uses_idempotency(config) && !uses_operations(config) {
        return Ok(out);
    }
    if uses_idempotency(config) {
        out.push(plan_idempotency_bucket(js, config, force, cluster).await?);
    }
    if uses_operations(config) {
        out.push(plan_own_bucket(js, operations_kv_config(cluster), force, cluster, "async operations' results").await?);
    }
    if uses_floors(config) {
        out.push(plan_own_bucket(js, floors_kv_config(cluster), force, cluster, "the consumers' floors").await?);
    }
    let mut known = KnownStreams::default();
    let mut streams: Vec<(Kind, stream::Config, bool, bool)> =
        config.streams.iter().map(|s| (Kind::Stream, stream_config(s), true, s.reference)).collect();
    if has_jetstream_routes {
        let dl = &config.dead_letter;
        streams.push((Kind::DeadLetterStream, dead_letter_stream_config(dl, cluster), false, dl.reference));
    }
    let service = config.sidecar.service.as_str();
    for (kind, mut want, manage_duplicates, reference) in streams {
        if reference {
            let (p, have) = plan_reference(js, kind, &want.name).await?;
            if let Some(have) = have {
                known.retention.insert(want.name.clone(), have.config.retention);
                known.messages.insert(want.name.clone(), have.state.messages);
            }
            out.push(p);
            continue;
        }
        want.metadata.insert(OWNER_KEY.to_owned(), service.to_owned());
        let replicas = want.num_replicas;
        let mut p = plan_stream(js, kind, want, manage_duplicates, force, &mut known).await?;
        if kind == Kind::DeadLetterStream && p.item.note.is_none() {
            p.item.note = single_replica_note(cluster, replicas, "the dead letters");
        }
        out.push(p);
    }
    for (route, c) in jetstream_routes(config) {
        out.push(plan_consumer(js, route, c, force, &mut known).await?);
    }
    Ok(out)
}

async fn plan_idempotency_bucket(js: &jetstream::Context, config: &Config, force: bool, cluster: usize) -> Result<Planned, ProvisionError> {
    let mut want = kv_config(&config.idempotency, idempotency_ttl(config), cluster);
    let account = js.query_account().await.map_err(ProvisionError::Account)?;
    let mut note = None;
    if account.requests.level < 1 {
        want.limit_markers = None;
        note = Some(
            "this server has no per-message TTL (nats-server 2.11+); idempotency claims expire only with the bucket's max_age".to_owned(),
        );
    }
    let name = want.bucket.clone();
    let replicas = want.num_replicas;
    let mut p = match read_stream(js, Kind::KvBucket, &kv_stream_name(&name)).await? {
        None => Planned { item: item(Kind::KvBucket, &name, Status::Created), op: Op::CreateKv(want) },
        Some(have) => {
            // Services sharing the bucket may need longer: the longest max_age wins, so
            // one service lowering its ttl never deletes another's keys.
            let keep = have.config.max_age.is_zero() || have.config.max_age > want.max_age;
            if keep {
                note = Some(format!(
                    "keeps max_age {} (longer than this file's {}: another service sharing the bucket may need it)",
                    humantime::format_duration(have.config.max_age),
                    humantime::format_duration(want.max_age)
                ));
                want.max_age = have.config.max_age;
            }
            let verdict = compare_kv(&want, &have);
            let merged = merge_kv(&have.config, &want);
            action_for_verdict(Kind::KvBucket, &name, verdict, force, move || Op::UpdateStream(merged), move || Op::RecreateKv(want))
        }
    };
    if p.item.note.is_none() {
        p.item.note = note.or_else(|| single_replica_note(cluster, replicas, "the idempotency keys"));
    }
    Ok(p)
}

/// A bucket whose settings are natsbridge's alone (the async operations' results, the
/// consumers' floors): created when missing, kept to `want`.
async fn plan_own_bucket(
    js: &jetstream::Context,
    want: kv::Config,
    force: bool,
    cluster: usize,
    what: &str,
) -> Result<Planned, ProvisionError> {
    let name = want.bucket.clone();
    let mut p = match read_stream(js, Kind::KvBucket, &kv_stream_name(&name)).await? {
        None => Planned { item: item(Kind::KvBucket, &name, Status::Created), op: Op::CreateKv(want.clone()) },
        Some(have) => {
            let verdict = compare_kv(&want, &have);
            let merged = merge_kv(&have.config, &want);
            let w = want.clone();
            action_for_verdict(Kind::KvBucket, &name, verdict, force, move || Op::UpdateStream(merged), move || Op::RecreateKv(w))
        }
    };
    p.item.note = single_replica_note(cluster, want.num_replicas, what);
    Ok(p)
}

async fn plan_stream(
    js: &jetstream::Context,
    kind: Kind,
    want: stream::Config,
    manage_duplicates: bool,
    force: bool,
    known: &mut KnownStreams,
) -> Result<Planned, ProvisionError> {
    let name = want.name.clone();
    known.retention.insert(name.clone(), want.retention);
    let p = match read_stream(js, kind, &name).await? {
        None => {
            known.fresh.insert(name.clone());
            Planned { item: item(kind, &name, Status::Created), op: Op::CreateStream(want) }
        }
        Some(have) => {
            known.messages.insert(name.clone(), have.state.messages);
            let service = want.metadata.get(OWNER_KEY).cloned().unwrap_or_default();
            if let Some(owner) = other_owner(&have.config, &service).filter(|_| !force) {
                known.retention.insert(name.clone(), have.config.retention);
                return Ok(leave_to_owner(kind, &want, &have, owner, manage_duplicates));
            }
            let verdict = compare_stream(&want, &have, manage_duplicates);
            let merged = merge_stream(&have.config, &want, manage_duplicates);
            let p = action_for_verdict(kind, &name, verdict, force, move || Op::UpdateStream(merged), move || Op::RecreateStream(want));
            if matches!(p.op, Op::RecreateStream(_)) {
                known.fresh.insert(name.clone());
            }
            p
        }
    };
    Ok(p)
}

async fn plan_consumer(
    js: &jetstream::Context,
    route: &Inbound,
    c: &Consumer,
    force: bool,
    known: &mut KnownStreams,
) -> Result<Planned, ProvisionError> {
    let mut want = consumer_config(route, c);
    let name = format!("{}/{}", c.stream, c.durable);
    let create = |want: &pull::Config| Planned {
        item: item(Kind::Consumer, &name, Status::Created),
        op: Op::CreateConsumer { stream: c.stream.clone(), config: want.clone() },
    };
    if known.fresh.contains(&c.stream) {
        if let Some(r) = known.retention.get(&c.stream) {
            fit_to_stream(&mut want, *r);
        }
        return Ok(create(&want));
    }
    let messages = match known.messages.get(&c.stream) {
        Some(n) => *n,
        None => match read_stream(js, Kind::Stream, &c.stream).await? {
            Some(info) => {
                known.messages.insert(c.stream.clone(), info.state.messages);
                known.retention.insert(c.stream.clone(), info.config.retention);
                info.state.messages
            }
            None => {
                let reason = format!("stream {:?} (route {:?}) does not exist and no [[streams]] entry declares it", c.stream, route.name);
                return Ok(Planned { item: item(Kind::Consumer, &name, Status::Refused { reason, diff: Vec::new() }), op: Op::None });
            }
        },
    };
    if let Some(r) = known.retention.get(&c.stream) {
        fit_to_stream(&mut want, *r);
    }
    let p = match read_consumer(js, &c.stream, &c.durable).await? {
        None => create(&want),
        Some(have) => {
            let verdict = compare_consumer(&want, &have, messages);
            let merged = merge_consumer(&have.config, &want).unwrap_or_else(|| want.clone());
            let (s1, s2) = (c.stream.clone(), c.stream.clone());
            let mut want = want.clone();
            // Recreated (--force), it goes on from its ack floor, never from the start.
            let floor = have.ack_floor.stream_sequence;
            if floor > 0 {
                want.deliver_policy = DeliverPolicy::ByStartSequence { start_sequence: floor + 1 };
            }
            action_for_verdict(
                Kind::Consumer,
                &name,
                verdict,
                force,
                move || Op::UpdateConsumer { stream: s1, config: merged },
                move || Op::RecreateConsumer { stream: s2, config: want },
            )
        }
    };
    Ok(p)
}

// ---------------------------------------------------------------------------------------
// Streams owned by another routes file (see `owner`): planned, never changed from here.

/// The service whose routes file owns `have`, if another than `service`.
pub(super) fn other_owner<'a>(have: &'a stream::Config, service: &str) -> Option<&'a str> {
    have.metadata.get(OWNER_KEY).map(String::as_str).filter(|o| *o != service)
}

/// A stream another service owns, without `--force`: nothing is changed. Unchanged when
/// the file agrees with it, refused (with the differences) when not.
pub(super) fn leave_to_owner(kind: Kind, want: &stream::Config, have: &stream::Info, owner: &str, manage_duplicates: bool) -> Planned {
    let name = &want.name;
    let diff = match compare_stream(want, have, manage_duplicates) {
        Verdict::Unchanged => Vec::new(),
        Verdict::Update(diff) | Verdict::Destructive { diff, .. } => diff,
    };
    let diff: Vec<_> = diff.into_iter().filter(|d| d.field != "owner").collect();
    let mut p = if diff.is_empty() {
        Planned { item: item(kind, name, Status::Unchanged), op: Op::None }
    } else {
        let reason = format!(
            "owned by service {owner:?}, whose routes file sets its settings: change them there, or declare it here with reference = true (--force takes it over)"
        );
        Planned { item: item(kind, name, Status::Refused { reason, diff }), op: Op::None }
    };
    p.item.note.get_or_insert_with(|| format!("settings owned by service {owner:?}"));
    p
}

/// A referenced stream: only checked to exist. Missing is a failure (retried by a
/// running sidecar), since the owner's provisioning has not created it yet.
pub(super) async fn plan_reference(
    js: &jetstream::Context,
    kind: Kind,
    name: &str,
) -> Result<(Planned, Option<stream::Info>), ProvisionError> {
    let have = read_stream(js, kind, name).await?;
    let mut p = match &have {
        Some(_) => Planned { item: item(kind, name, Status::Unchanged), op: Op::None },
        None => {
            let error = "referenced (reference = true) but does not exist: the routes file that owns it creates it".to_owned();
            Planned { item: item(kind, name, Status::Failed { error }), op: Op::None }
        }
    };
    let owner = have.as_ref().and_then(|h| h.config.metadata.get(OWNER_KEY));
    p.item.note = Some(match owner {
        Some(o) => format!("referenced; settings owned by service {o:?}"),
        None => "referenced; settings owned by another routes file".to_owned(),
    });
    Ok((p, have))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diff(field: &'static str, old: &str, new: &str) -> FieldDiff {
        FieldDiff { field, old: old.into(), new: new.into() }
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
