//! `[[streams]]`, the `[dead_letter]` stream and the `[idempotency]` KV bucket: the
//! JetStream assets the sidecar provisions or checks.

use std::time::Duration;

use super::{duration, is_valid_name, is_valid_stream_name, size, storage};
use crate::config::diagnostics::{Diagnostics, Table, TableStart};
use crate::config::raw::{RawDeadLetter, RawIdempotencyStore, RawStream};
use crate::config::{DeadLetterStream, IdempotencyStore, Retention, StreamSpec, DEFAULT_DLQ_MAX_AGE, DEFAULT_DLQ_MAX_BYTES};
use crate::subject::SubjectPattern;

/// One validated stream, or `None` when it had errors (all of them reported).
pub(super) fn stream(raw: RawStream, start: TableStart, diags: &mut Diagnostics<'_>) -> Option<StreamSpec> {
    let name = raw.name.clone();
    let at = start.named(Some(&name));
    let errors_before = diags.error_count();
    if !is_valid_stream_name(&name) {
        diags.error(at, Some("name"), format!("stream name {name:?} must not contain '.', '*', '>', '/', '\\' or spaces"));
    }
    if raw.reference {
        // One routes file owns a stream's settings: two owners make it flap on every start.
        for (key, set) in [
            ("subjects", !raw.subjects.is_empty()),
            ("storage", raw.storage.is_some()),
            ("replicas", raw.replicas.is_some()),
            ("retention", raw.retention.is_some()),
            ("max_age", raw.max_age.is_some()),
            ("max_bytes", raw.max_bytes.is_some()),
            ("max_msgs", raw.max_msgs.is_some()),
            ("duplicate_window", raw.duplicate_window.is_some()),
        ] {
            if set {
                diags.error(
                    at,
                    Some(key),
                    format!("`{key}` on a stream with reference = true: its settings belong to the routes file that owns it"),
                );
            }
        }
    } else if raw.subjects.is_empty() {
        diags.error(at, Some("subjects"), "`subjects` must list at least one subject");
    }
    let subjects = subject_patterns(&raw.subjects, at, diags, |s, e| format!("{s:?} is not a valid NATS subject: {e}"));
    let storage = storage(at, &raw.storage, diags);
    let retention = retention(&raw.retention, at, diags);
    let replicas = raw.replicas.unwrap_or(1);
    if !(1..=5).contains(&replicas) {
        diags.error(at, Some("replicas"), "`replicas` must be 1 to 5");
    }
    let max_age = raw.max_age.as_ref().map(|_| duration(at, "max_age", &raw.max_age, Duration::ZERO, diags));
    let max_bytes = raw.max_bytes.as_ref().map(|_| size(at, "max_bytes", &raw.max_bytes, 0, diags) as i64);
    let duplicate_window = duration(at, "duplicate_window", &raw.duplicate_window, Duration::from_secs(120), diags);
    if diags.error_count() > errors_before {
        return None;
    }
    Some(StreamSpec {
        name,
        line: diags.line_of(start),
        reference: raw.reference,
        subjects,
        storage,
        replicas,
        retention,
        max_age,
        max_bytes,
        max_msgs: raw.max_msgs,
        duplicate_window,
        allow_msg_ttl: false,
    })
}

/// The valid subjects; each invalid one is reported with `message(subject, error)`.
fn subject_patterns(
    subjects: &[String],
    at: Table<'_>,
    diags: &mut Diagnostics<'_>,
    message: impl Fn(&str, &dyn std::fmt::Display) -> String,
) -> Vec<SubjectPattern> {
    subjects.iter().filter_map(|s| SubjectPattern::parse(s).map_err(|e| diags.error(at, Some("subjects"), message(s, &e))).ok()).collect()
}

fn retention(value: &Option<String>, at: Table<'_>, diags: &mut Diagnostics<'_>) -> Retention {
    match value.as_deref() {
        None | Some("limits") => Retention::Limits,
        Some("interest") => Retention::Interest,
        Some("workqueue") => Retention::WorkQueue,
        Some(o) => {
            diags.error(at, Some("retention"), format!("`retention` must be limits, interest or workqueue, not {o:?}"));
            Retention::Limits
        }
    }
}

pub(super) fn dead_letter(raw: RawDeadLetter, start: TableStart, diags: &mut Diagnostics<'_>) -> DeadLetterStream {
    let at = start.unnamed();
    let stream = raw.stream.unwrap_or_else(|| "DLQ".to_owned());
    if !is_valid_stream_name(&stream) {
        diags.error(at, Some("stream"), format!("[dead_letter] `stream` {stream:?} is not a valid stream name"));
    }
    if raw.reference {
        for (key, set) in [
            ("storage", raw.storage.is_some()),
            ("replicas", raw.replicas.is_some()),
            ("max_age", raw.max_age.is_some()),
            ("max_bytes", raw.max_bytes.is_some()),
        ] {
            if set {
                diags.error(
                    at,
                    Some(key),
                    format!("[dead_letter] `{key}` with reference = true: the stream's settings belong to the routes file that owns it"),
                );
            }
        }
    }
    let subjects = raw.subjects.unwrap_or_else(|| vec!["dlq.>".to_owned()]);
    let subjects = subject_patterns(&subjects, at, diags, |s, e| format!("[dead_letter] {s:?}: {e}"));
    DeadLetterStream {
        stream,
        line: (start.0 > 0).then(|| diags.line_of(start)),
        reference: raw.reference,
        subjects,
        storage: storage(at, &raw.storage, diags),
        replicas: replicas(at, raw.replicas, diags),
        max_age: duration(at, "max_age", &raw.max_age, DEFAULT_DLQ_MAX_AGE, diags),
        max_bytes: size(at, "max_bytes", &raw.max_bytes, DEFAULT_DLQ_MAX_BYTES, diags) as i64,
    }
}

pub(super) fn idempotency_store(raw: RawIdempotencyStore, start: TableStart, diags: &mut Diagnostics<'_>) -> IdempotencyStore {
    let at = start.unnamed();
    let bucket = raw.bucket.unwrap_or_else(|| "natsbridge_idempotency".to_owned());
    if !is_valid_name(&bucket) {
        diags.error(at, Some("bucket"), format!("[idempotency] `bucket` {bucket:?} must be letters, digits, '-' or '_'"));
    }
    let claim_ttl = duration(at, "claim_ttl", &raw.claim_ttl, Duration::from_secs(60), diags);
    if claim_ttl.is_zero() {
        // A claim that is stale the moment it is written protects nothing: every
        // redelivery would take it over and run the handler beside the first.
        diags.error(at, Some("claim_ttl"), "[idempotency] `claim_ttl` must be more than 0");
    }
    IdempotencyStore {
        bucket,
        replicas: replicas(at, raw.replicas, diags),
        claim_ttl,
        max_response_bytes: size(at, "max_response_bytes", &raw.max_response_bytes, 64 << 10, diags),
        storage: storage(at, &raw.storage, diags),
    }
}

/// An explicit replica count (1 to 5), or `None` to follow the cluster's size.
fn replicas(at: Table<'_>, value: Option<usize>, diags: &mut Diagnostics<'_>) -> Option<usize> {
    if value.is_some_and(|r| !(1..=5).contains(&r)) {
        diags.error(at, Some("replicas"), "`replicas` must be 1 to 5");
    }
    value
}
