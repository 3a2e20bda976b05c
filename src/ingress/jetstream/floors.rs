//! Where each durable's acks had got to, kept in the KV bucket
//! [`FLOORS_BUCKET`](crate::provision::FLOORS_BUCKET), so that a durable lost while its
//! route was not running (deleted by hand, lost with a server's store, a stream restored
//! without it) is recreated where it left off, not at the route's `deliver` ("new" by
//! default, which would skip everything published meanwhile).
//!
//! The watchdog writes the floor it reads, when it moved; a bind that finds the durable
//! missing reads it. A record names the stream's creation time too: a floor counts in one
//! stream, and a stream deleted and created again starts from its first message.
//!
//! Best effort, by design: without the bucket (not provisioned, and no permission to
//! create it) a route runs as before, with one warning. What it cannot cover: acks after
//! the last write (at most one watchdog look, 2 s) come again, once.

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

use crate::provision::{cluster_size, floors_kv_config, kv_stream_name, FLOORS_BUCKET};

/// One durable's floor: every message up to `seq` is acked, in the stream created at
/// `stream_created_ns` (Unix ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Record {
    pub seq: u64,
    pub stream_created_ns: i64,
}

impl From<Record> for super::Floor {
    fn from(r: Record) -> Self {
        Self { seq: r.seq, created: r.stream_created_ns.into() }
    }
}

/// Where a durable recreated at bind starts, given its record and the stream as it is
/// now: as the watchdog resumes a vanished one ([`super::resume_after`]: after the floor
/// in the same stream, else from the first message); `None` (the route's `deliver`) only
/// without a record: a new durable.
pub(super) fn start_after(record: Option<Record>, created_ns: i128, last_sequence: u64) -> Option<u64> {
    let floor = super::Floor::from(record?);
    Some(super::resume_after(Some(floor), created_ns, last_sequence).unwrap_or(1))
}

/// The key of a durable's record: `<stream>.<durable>`, each a KV-safe segment.
pub(super) fn key(stream: &str, durable: &str) -> String {
    let mut out = String::new();
    crate::ingress::idempotency::keys::push_scope(&mut out, stream);
    out.push('.');
    crate::ingress::idempotency::keys::push_scope(&mut out, durable);
    out
}

/// One route's record in the bucket, opened (or created) when first used.
pub(super) struct Floors {
    js: jetstream::Context,
    key: String,
    route: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    store: Option<kv::Store>,
    /// The bucket did not exist: not asked again before this.
    absent_until: Option<Instant>,
    /// The last record written (or read): the same floor is not written again.
    written: Option<Record>,
}

/// How long a bucket found absent is taken to stay so (one cheap stream info per period
/// while it is).
const ABSENT_FOR: Duration = Duration::from_secs(5);

/// The bucket as a caller finds it.
enum Bucket {
    /// Boxed: a store is 1.5 KB.
    Open(Box<kv::Store>),
    /// It does not exist (and could not be created): there is no record.
    Absent,
    /// The server could not say (NATS away, an API timeout): nobody knows.
    Unknown(String),
}

/// Whether the bucket's stream exists: only "not found" means there is no bucket.
enum Probe {
    Exists,
    NotFound,
    Failed(String),
}

async fn probe(js: &jetstream::Context) -> Probe {
    use async_nats::jetstream::context::GetStreamErrorKind as K;
    match js.get_stream(kv_stream_name(FLOORS_BUCKET)).await {
        Ok(_) => Probe::Exists,
        Err(e) if matches!(e.kind(), K::JetStream(j) if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) => Probe::NotFound,
        Err(e) => Probe::Failed(e.to_string()),
    }
}

/// The bucket could not be read: a bind must not guess.
#[derive(Debug, thiserror::Error)]
#[error("the consumer floors bucket {FLOORS_BUCKET:?} could not be read: {0}")]
pub(super) struct ReadError(String);

impl Floors {
    pub(super) fn new(js: jetstream::Context, stream: &str, durable: &str, route: &str) -> Self {
        Self { js, key: key(stream, durable), route: route.to_owned(), state: Mutex::new(State::default()) }
    }

    /// Creates the bucket when it does not exist, on a task of its own: without the
    /// permission the server never answers the create, and a bind must not wait out that
    /// timeout. A bucket that did not exist holds no record, so nothing waits for it.
    pub(super) fn create_in_background(&self) {
        let (js, route) = (self.js.clone(), self.route.clone());
        tokio::spawn(async move {
            if !matches!(probe(&js).await, Probe::NotFound) {
                return;
            }
            if let Err(e) = js.create_key_value(floors_kv_config(cluster_size(&js.client()))).await {
                // Another sidecar may have created it meanwhile.
                if matches!(probe(&js).await, Probe::NotFound) {
                    tracing::warn!(
                        route = %route,
                        bucket = FLOORS_BUCKET,
                        error = %e,
                        "the consumer floors bucket does not exist and could not be created; run `natsbridge provision`: until then a durable lost while this route is not running is recreated at the route's `deliver`"
                    );
                }
            }
        });
    }

    /// The bucket as it is now.
    async fn bucket(&self, s: &mut State) -> Bucket {
        if let Some(store) = &s.store {
            return Bucket::Open(Box::new(store.clone()));
        }
        if s.absent_until.is_some_and(|at| Instant::now() < at) {
            return Bucket::Absent;
        }
        match probe(&self.js).await {
            Probe::Exists => {}
            Probe::NotFound => {
                s.absent_until = Some(Instant::now() + ABSENT_FOR);
                return Bucket::Absent;
            }
            Probe::Failed(e) => return Bucket::Unknown(e),
        }
        match self.js.get_key_value(FLOORS_BUCKET).await {
            Ok(store) => {
                s.store = Some(store.clone());
                Bucket::Open(Box::new(store))
            }
            Err(e) => Bucket::Unknown(e.to_string()),
        }
    }

    /// The durable's record: `Ok(None)` when there is none or no bucket, an error when the
    /// bucket is there but could not be read.
    pub(super) async fn read(&self) -> Result<Option<Record>, ReadError> {
        let mut s = self.state.lock().await;
        let store = match self.bucket(&mut s).await {
            Bucket::Open(store) => store,
            Bucket::Absent => return Ok(None),
            Bucket::Unknown(e) => return Err(ReadError(e)),
        };
        let value = store.get(&self.key).await.map_err(|e| ReadError(e.to_string()))?;
        let record = value.and_then(|v| match serde_json::from_slice::<Record>(&v) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(route = %self.route, key = %self.key, error = %e, "an unreadable consumer floor record is ignored");
                None
            }
        });
        s.written = record;
        Ok(record)
    }

    /// Keeps `record` unless it is the one last kept. Failures are logged: the next look
    /// tries again.
    pub(super) async fn write(&self, record: Record) {
        let mut s = self.state.lock().await;
        if s.written == Some(record) {
            return;
        }
        let Bucket::Open(store) = self.bucket(&mut s).await else { return };
        let value = Bytes::from(serde_json::to_vec(&record).expect("a record serializes"));
        match store.put(&self.key, value).await {
            Ok(_) => s.written = Some(record),
            Err(e) => tracing::debug!(route = %self.route, error = %e, "could not keep the consumer's floor; the next look tries again"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_700_000_000_000_000_000;

    #[test]
    fn a_record_resumes_its_own_stream_after_the_floor() {
        let r = Record { seq: 5, stream_created_ns: T };
        assert_eq!(start_after(Some(r), T.into(), 9), Some(6));
        assert_eq!(start_after(Some(Record { seq: 0, stream_created_ns: T }), T.into(), 9), Some(1));
    }

    #[test]
    fn another_stream_or_one_shorter_than_the_floor_starts_from_its_first_message() {
        let r = Record { seq: 5, stream_created_ns: T };
        assert_eq!(start_after(Some(r), i128::from(T) + 1, 20), Some(1));
        assert_eq!(start_after(Some(r), T.into(), 4), Some(1));
    }

    #[test]
    fn without_a_record_the_route_decides() {
        assert_eq!(start_after(None, T.into(), 9), None);
    }

    #[test]
    fn keys_are_kv_safe_and_tell_stream_and_durable_apart() {
        assert_eq!(key("TOOL", "tool"), "TOOL.tool");
        let odd = key("a:b", "c");
        assert!(odd.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_=.".contains(&b)), "{odd}");
        assert_ne!(key("a-b", "c"), key("a", "b-c"));
    }
}
