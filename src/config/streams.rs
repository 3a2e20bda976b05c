//! The validated JetStream resources a routing file declares: streams, the dead-letter
//! stream and the idempotency bucket, with their defaults.

use std::time::Duration;

use crate::subject::SubjectPattern;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    File,
    Memory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    Limits,
    Interest,
    WorkQueue,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StreamSpec {
    pub name: String,
    pub line: usize,
    /// `reference = true`: another routes file owns this stream's settings; this one only
    /// needs it to exist (provisioning checks, never creates or updates it). The settings
    /// below are then unknown and left at their defaults, `subjects` empty.
    pub reference: bool,
    pub subjects: Vec<SubjectPattern>,
    pub storage: Storage,
    pub replicas: usize,
    pub retention: Retention,
    pub max_age: Option<Duration>,
    pub max_bytes: Option<i64>,
    pub max_msgs: Option<i64>,
    pub duplicate_window: Duration,
    /// Per-message TTLs (`Nats-TTL`): set for streams that capture a jetstream route with
    /// `ttl`.
    pub allow_msg_ttl: bool,
}

/// The stream that captures every dead-letter subject.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterStream {
    pub stream: String,
    /// The `[dead_letter]` section's line; `None` when the file leaves it out (defaults).
    pub line: Option<usize>,
    /// `reference = true`: another routes file owns the stream's settings (see
    /// [`StreamSpec::reference`]); `subjects` still say what it captures, for the checks.
    pub reference: bool,
    pub subjects: Vec<SubjectPattern>,
    pub storage: Storage,
    /// `None`: min(3, the cluster's size), read from the server when provisioning.
    pub replicas: Option<usize>,
    /// Dead letters older than this are deleted; zero: kept until purged.
    pub max_age: Duration,
    /// Past this size new dead letters are refused (and retried), not old ones dropped;
    /// 0: unlimited.
    pub max_bytes: i64,
}

/// The dead-letter stream's `max_age` unless set: long enough to be noticed and replayed.
pub const DEFAULT_DLQ_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
/// The dead-letter stream's `max_bytes` unless set.
pub const DEFAULT_DLQ_MAX_BYTES: usize = 1 << 30;

/// The KV bucket that remembers handled idempotency keys.
#[derive(Debug, Clone, PartialEq)]
pub struct IdempotencyStore {
    pub bucket: String,
    /// `None`: min(3, the cluster's size), read from the server when provisioning.
    pub replicas: Option<usize>,
    /// How long a claim lasts before another handler may take the key over.
    pub claim_ttl: Duration,
    /// Stored responses larger than this keep only their status and headers.
    pub max_response_bytes: usize,
    pub storage: Storage,
}
