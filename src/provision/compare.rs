//! Comparing a wanted configuration with what exists: only the fields natsbridge manages,
//! so server defaults and hand-added settings never show up as differences. Pure.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{self, pull, AckPolicy},
    kv,
    stream::{self, DiscardPolicy, RetentionPolicy, StorageType},
};

use super::spec::OWNER_KEY;

/// One managed field that differs: what the server has, and what the file wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDiff {
    pub field: &'static str,
    pub old: String,
    pub new: String,
}

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

fn fmt_discard(d: DiscardPolicy) -> &'static str {
    match d {
        DiscardPolicy::Old => "old",
        DiscardPolicy::New => "new",
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
pub(super) enum Verdict {
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
pub(super) fn compare_stream(want: &stream::Config, have: &stream::Info, manage_duplicates: bool) -> Verdict {
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
    // Which service's routes file owns the settings (see `owner`); a stream made before
    // ownership, or by hand, is claimed by the first service that provisions it.
    if let Some(new) = want.metadata.get(OWNER_KEY) {
        push_diff(&mut diff, "owner", old.metadata.get(OWNER_KEY).cloned().unwrap_or_else(|| "none".into()), new.clone());
    }
    // Turned on for per-message TTLs; never turned off (the server refuses that).
    if want.allow_message_ttl {
        push_diff(&mut diff, "allow_msg_ttl", old.allow_message_ttl.to_string(), "true".into());
    }
    // Only discard=new is insisted on (it keeps acked messages); old is left to the operator.
    if want.discard == DiscardPolicy::New {
        push_diff(&mut diff, "discard", fmt_discard(old.discard).into(), fmt_discard(want.discard).into());
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
pub(super) fn merge_stream(have: &stream::Config, want: &stream::Config, manage_duplicates: bool) -> stream::Config {
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
    if want.discard == DiscardPolicy::New {
        c.discard = DiscardPolicy::New;
    }
    // Only our key: the server's own (`_nats.*`) and hand-added entries stay.
    c.metadata.extend(want.metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
    c.allow_message_ttl |= want.allow_message_ttl;
    c
}

fn consumer_filter(c: &consumer::Config) -> String {
    if !c.filter_subject.is_empty() {
        c.filter_subject.clone()
    } else {
        c.filter_subjects.join(", ")
    }
}

pub(super) fn compare_consumer(want: &pull::Config, have: &consumer::Info, stream_messages: u64) -> Verdict {
    let old = &have.config;
    let mut diff = Vec::new();
    push_diff(&mut diff, "ack_wait", fmt_age(old.ack_wait), fmt_age(want.ack_wait));
    push_diff(&mut diff, "max_deliver", fmt_limit(old.max_deliver), fmt_limit(want.max_deliver));
    push_diff(&mut diff, "backoff", fmt_durations(&old.backoff), fmt_durations(&want.backoff));
    push_diff(&mut diff, "max_ack_pending", fmt_limit(old.max_ack_pending), fmt_limit(want.max_ack_pending));
    let old_filter = consumer_filter(old);
    push_diff(&mut diff, "filter_subject", old_filter.clone(), want.filter_subject.clone());
    let owner = |m: &std::collections::HashMap<String, String>| m.get(OWNER_KEY).cloned().unwrap_or_else(|| "none".into());
    push_diff(&mut diff, "owner", owner(&old.metadata), owner(&want.metadata));
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
    if old_filter != want.filter_subject {
        // The consumer keeps its position: what the old filter had not delivered yet is
        // never delivered, and what the new one matches below the position is skipped.
        return Verdict::Destructive {
            reason: format!(
                "changing filter_subject affects data: messages matching {old_filter:?} not yet delivered ({} pending) are no longer delivered, and messages matching {:?} below the consumer's position are never delivered",
                have.num_pending, want.filter_subject
            ),
            cost: "applied in place".into(),
            diff,
            recreate: false,
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
pub(super) fn merge_consumer(have: &consumer::Config, want: &pull::Config) -> Option<pull::Config> {
    use jetstream::consumer::FromConsumer;
    let mut c = pull::Config::try_from_consumer_config(have.clone()).ok()?;
    c.ack_policy = AckPolicy::Explicit;
    c.ack_wait = want.ack_wait;
    c.max_deliver = want.max_deliver;
    c.backoff = want.backoff.clone();
    c.filter_subject = want.filter_subject.clone();
    c.filter_subjects = Vec::new();
    c.max_ack_pending = want.max_ack_pending;
    c.metadata.extend(want.metadata.clone());
    if c.description.is_none() {
        c.description = want.description.clone();
    }
    Some(c)
}

/// The stream config to send for a bucket update: what exists, with only the bucket's
/// managed fields replaced, so settings added by hand (placement, max_bytes...) survive
/// (the client's `update_key_value` would rebuild the whole stream config).
pub(super) fn merge_kv(have: &stream::Config, want: &kv::Config) -> stream::Config {
    let mut c = have.clone();
    c.max_messages_per_subject = want.history.max(1);
    c.num_replicas = want.num_replicas;
    c.max_age = want.max_age;
    c.allow_message_ttl = want.limit_markers.is_some();
    c.subject_delete_marker_ttl = want.limit_markers;
    c
}

pub(super) fn compare_kv(want: &kv::Config, have: &stream::Info) -> Verdict {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tighter_limits() {
        assert!(tighter(-1, 10));
        assert!(tighter(0, 10));
        assert!(tighter(20, 10));
        assert!(!tighter(10, 20));
        assert!(!tighter(10, -1));
        assert!(!tighter(10, 10));
    }
}
