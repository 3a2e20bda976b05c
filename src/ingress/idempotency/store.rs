//! Consumer-side idempotency: a JetStream KV bucket shared by every replica that keeps a
//! handler from running twice for the same key.
//!
//! Per message: claim the key atomically (create-if-absent); a completed key returns the
//! stored response instead of calling the app; a key claimed by a live handler is
//! "in flight"; a failed handler releases its claim so the retry can run; only a success
//! marks the key done (never mark-before-handle, which loses messages). Every transition
//! is a compare-and-set on the entry's revision, so two replicas can never both win.
//! Expiry is kept in the value (claims go stale after `claim_ttl`, results after the
//! route's `ttl`), so it works on any JetStream server; the bucket's `max_age` collects
//! old entries.
//!
//! Each claim carries a nonce of its own, so its holder recognises it: a write whose reply
//! was lost (timed out) may still have been applied, which leaves the ticket's revision
//! behind the entry's. Then the next compare-and-set fails with `WrongLastRevision`; the
//! holder re-reads the entry and, finding its own nonce there (in its claim, or in the
//! result it was storing), carries on instead of losing a claim that is still its own.
//!
//! A holder's writes are bounded by a fraction of `claim_ttl`, and storing a result is
//! retried (for up to [`complete_budget`]): a result write lost in a server crash must be
//! written again as soon as the server is back, or a copy of the message finds a stale
//! claim, takes the key over and runs the effect a second time.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation};
use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use super::keys::{extract_key, kv_key, payload_digest};

#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError {
    #[error("idempotency bucket {bucket:?} is not available: {reason}")]
    Bucket { bucket: String, reason: String },
    #[error("idempotency store: {0}")]
    Store(String),
    /// Our claim on the key is gone: it went stale and another handler took it over (or
    /// it was released). Not a store failure.
    #[error("idempotency claim on {key:?} lost: another handler holds the key now")]
    ClaimLost { key: String },
}

impl IdempotencyError {
    /// The store could not be used (as opposed to a claim lost to another handler).
    pub fn is_store_failure(&self) -> bool {
        !matches!(self, Self::ClaimLost { .. })
    }
}

/// Why ending a claimed delivery failed, by the step that failed. The claim goes stale
/// after `claim_ttl` either way; the source says whether the store failed or the claim
/// was lost ([`IdempotencyError::is_store_failure`]).
#[derive(Debug, thiserror::Error)]
pub enum FinishError {
    /// The app succeeded but its result was not stored: a copy of the message arriving
    /// after the claim goes stale runs again.
    #[error("storing the result for idempotency key {key:?} failed")]
    Complete {
        key: String,
        #[source]
        source: IdempotencyError,
    },
    /// The app failed and the claim was not released: the retry waits for it to go stale.
    #[error("releasing the claim on idempotency key {key:?} failed")]
    Release {
        key: String,
        #[source]
        source: IdempotencyError,
    },
}

impl FinishError {
    pub fn source_error(&self) -> &IdempotencyError {
        match self {
            Self::Complete { source, .. } | Self::Release { source, .. } => source,
        }
    }
}

/// The app's response, as stored for replays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Base64 in the stored JSON; empty when the body was over `max_response_bytes`.
    #[serde(with = "b64")]
    pub body: Bytes,
    /// The body was not stored because it was too large.
    #[serde(default)]
    pub truncated: bool,
}

mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &bytes::Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<bytes::Bytes, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(s).map(Into::into).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum Record {
    Claimed {
        owner: String,
        at_ms: u64,
        /// This claim's own id: its holder recognises it after a write whose reply was lost.
        #[serde(default)]
        nonce: String,
    },
    Done {
        at_ms: u64,
        expires_ms: u64,
        response: StoredResponse,
        /// The sha256 (hex) of the payload that produced it: replayed only to the same
        /// payload. Absent in results stored before it was kept (replayed to any).
        #[serde(default)]
        payload: Option<String>,
        /// The nonce of the claim that stored it: its writer recognises a write of its
        /// own whose reply was lost.
        #[serde(default)]
        nonce: String,
    },
}

/// What a key's entry says of the claim with a given nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ours {
    /// The claim is still ours, at this revision.
    Claimed(u64),
    /// Our result is stored (by a write whose reply was lost).
    Done,
    /// Neither: another handler's claim or result, released, or gone.
    Not,
}

/// An entry (its operation, revision and value) as seen by the holder of `nonce`.
fn ours(operation: Operation, revision: u64, value: &[u8], nonce: &str) -> Ours {
    if operation != Operation::Put || nonce.is_empty() {
        return Ours::Not;
    }
    match serde_json::from_slice::<Record>(value) {
        Ok(Record::Claimed { nonce: n, .. }) if n == nonce => Ours::Claimed(revision),
        Ok(Record::Done { nonce: n, .. }) if n == nonce => Ours::Done,
        _ => Ours::Not,
    }
}

/// What [`Store::resync`] found: try the write again, or it is done already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resynced {
    Retry,
    Done,
}

/// Proof of a claim: the entry revision we wrote, and the claim's nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub key: String,
    revision: u64,
    nonce: String,
    /// The claimed message's payload digest, stored with its result.
    digest: String,
}

/// The answer to "may I run this handler?"
#[derive(Debug)]
pub enum Claim {
    /// Yes: run it, then `complete` or `release`.
    Acquired(Ticket),
    /// Already handled: here is what the app answered.
    Done(StoredResponse),
    /// Already handled, for a message with another payload: the key was reused.
    Reused,
    /// Another handler holds a live claim, which goes stale in `stale_in` unless that
    /// handler refreshes it (zero: unknown, look again soon).
    InFlight { stale_in: Duration },
}

/// A live result as the answer to the message with payload `digest`.
fn done_for(response: StoredResponse, stored: Option<String>, digest: &str) -> Claim {
    match stored {
        Some(d) if d != digest => Claim::Reused,
        _ => Claim::Done(response),
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The shared store.
#[derive(Clone)]
pub struct Store {
    kv: kv::Store,
    claim_ttl: Duration,
    /// The bound on one write (or read) of a claim holder: see [`op_timeout`].
    op_timeout: Duration,
    max_response_bytes: usize,
    owner: String,
}

/// A claim holder's bound on one store operation: a quarter of `claim_ttl` (within 250 ms
/// and 5 s), so that a write lost in a server crash is noticed, and written again, while the
/// claim is still live, rather than after the client's own 5 s request timeout.
pub fn op_timeout(claim_ttl: Duration) -> Duration {
    (claim_ttl / 4).clamp(Duration::from_millis(250), Duration::from_secs(5))
}

/// How long a holder keeps trying to store its result: twice `claim_ttl`, and at least 10 s,
/// so that a server restart longer than the claim itself is outlasted. (A NATS outage
/// longer than this while a result is being stored can let a copy run the effect again.)
pub fn complete_budget(claim_ttl: Duration) -> Duration {
    (claim_ttl * 2).max(Duration::from_secs(10))
}

/// The pause before storing a result again after a failed try.
fn complete_retry_delay(attempt: u32) -> Duration {
    Duration::from_millis(50u64 << attempt.min(3))
}

impl Store {
    /// Binds to the bucket `provision` created.
    pub async fn open(
        js: &async_nats::jetstream::Context,
        cfg: &crate::config::IdempotencyStore,
        owner: String,
    ) -> Result<Self, IdempotencyError> {
        let kv = js
            .get_key_value(&cfg.bucket)
            .await
            .map_err(|e| IdempotencyError::Bucket { bucket: cfg.bucket.clone(), reason: e.to_string() })?;
        Ok(Self { kv, claim_ttl: cfg.claim_ttl, op_timeout: op_timeout(cfg.claim_ttl), max_response_bytes: cfg.max_response_bytes, owner })
    }

    fn claim_record(&self, nonce: &str) -> Bytes {
        let record = Record::Claimed { owner: self.owner.clone(), at_ms: now_ms(), nonce: nonce.to_owned() };
        Bytes::from(serde_json::to_vec(&record).unwrap_or_default())
    }

    /// One write of a claim holder, bounded by `op_timeout`: one that takes longer counts
    /// as timed out (it may still be applied; the nonce tells).
    async fn bounded<T>(&self, write: impl Future<Output = Result<T, kv::UpdateError>>) -> Result<T, kv::UpdateError> {
        tokio::time::timeout(self.op_timeout, write).await.unwrap_or_else(|_| Err(kv::UpdateError::new(kv::UpdateErrorKind::TimedOut)))
    }

    /// What `key`'s entry says of the claim with `nonce`: a write of ours whose reply was
    /// lost may have been applied all the same.
    async fn ours(&self, key: &str, nonce: &str) -> Result<Ours, IdempotencyError> {
        let entry = tokio::time::timeout(self.op_timeout, self.kv.entry(key))
            .await
            .map_err(|_| IdempotencyError::Store(format!("reading the entry timed out after {:?}", self.op_timeout)))?
            .map_err(|e| IdempotencyError::Store(e.to_string()))?;
        Ok(entry.map_or(Ours::Not, |e| ours(e.operation, e.revision, &e.value, nonce)))
    }

    /// After a compare-and-set on `ticket` failed: when the entry still holds our claim
    /// (an earlier write of ours was applied though its reply was lost), moves the ticket to
    /// the entry's revision so the caller can try again; `Done` when what was applied is
    /// our result; else the error to return.
    async fn resync(&self, ticket: &mut Ticket, error: kv::UpdateError) -> Result<Resynced, IdempotencyError> {
        if !matches!(error.kind(), kv::UpdateErrorKind::WrongLastRevision | kv::UpdateErrorKind::TimedOut) {
            return Err(IdempotencyError::Store(error.to_string()));
        }
        match self.ours(&ticket.key, &ticket.nonce).await? {
            Ours::Claimed(revision) => {
                ticket.revision = revision;
                Ok(Resynced::Retry)
            }
            Ours::Done => Ok(Resynced::Done),
            Ours::Not if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                Err(IdempotencyError::ClaimLost { key: ticket.key.clone() })
            }
            Ours::Not => Err(IdempotencyError::Store(error.to_string())),
        }
    }

    /// Claims `key` for the message whose payload has `digest` ([`payload_digest`]), or
    /// says why not.
    pub async fn claim(&self, key: &str, digest: &str) -> Result<Claim, IdempotencyError> {
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let ticket =
            |revision| Ok(Claim::Acquired(Ticket { key: key.to_owned(), revision, nonce: nonce.clone(), digest: digest.to_owned() }));
        // A few rounds: each lost compare-and-set means someone else moved first; look again.
        for _ in 0..5 {
            match self.kv.create(key, self.claim_record(&nonce)).await {
                Ok(revision) => return ticket(revision),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {}
                // Its reply may be what was lost: the entry says whether the create applied.
                Err(e) => match self.ours(key, &nonce).await {
                    Ok(Ours::Claimed(revision)) => return ticket(revision),
                    _ => return Err(IdempotencyError::Store(e.to_string())),
                },
            }
            let Some(entry) = self.kv.entry(key).await.map_err(|e| IdempotencyError::Store(e.to_string()))? else {
                continue;
            };
            if entry.operation != Operation::Put {
                continue;
            }
            let now = now_ms();
            // When the holder's claim goes stale (ms since the epoch); None: take it over now.
            let live_until = match serde_json::from_slice::<Record>(&entry.value) {
                Ok(Record::Done { expires_ms, response, payload, .. }) if expires_ms > now => {
                    return Ok(done_for(response, payload, digest))
                }
                Ok(Record::Done { .. }) => None,
                // An earlier round's write of ours, applied though its reply was lost.
                Ok(Record::Claimed { nonce: n, .. }) if n == nonce => return ticket(entry.revision),
                Ok(Record::Claimed { at_ms, .. }) => Some(at_ms + self.claim_ttl.as_millis() as u64).filter(|until| *until > now),
                // Garbage in the bucket must not block the handler forever.
                Err(_) => None,
            };
            if let Some(until) = live_until {
                return Ok(Claim::InFlight { stale_in: Duration::from_millis(until - now) });
            }
            // Take over an expired result or a crashed handler's claim, atomically.
            match self.kv.update(key, self.claim_record(&nonce), entry.revision).await {
                Ok(revision) => return ticket(revision),
                // Someone else moved first (or our own write was applied): look again.
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                // A store failure is not a lost race: the caller must not run unprotected.
                Err(e) => match self.ours(key, &nonce).await {
                    Ok(Ours::Claimed(revision)) => return ticket(revision),
                    _ => return Err(IdempotencyError::Store(e.to_string())),
                },
            }
        }
        Ok(Claim::InFlight { stale_in: Duration::ZERO })
    }

    /// Can the bucket be read right now? (Its stream's info: one API round trip.)
    pub async fn probe(&self) -> Result<(), IdempotencyError> {
        self.kv.status().await.map(|_| ()).map_err(|e| IdempotencyError::Store(e.to_string()))
    }

    /// The bucket's `max_age` (zero: unlimited). One API round trip.
    pub async fn max_age(&self) -> Result<Duration, IdempotencyError> {
        self.kv.status().await.map(|s| s.max_age()).map_err(|e| IdempotencyError::Store(e.to_string()))
    }

    /// How long a claim lasts without a [`refresh`](Self::refresh).
    pub fn claim_ttl(&self) -> Duration {
        self.claim_ttl
    }

    /// Keeps a long-running handler's claim alive. `ClaimLost` when another handler
    /// took it over.
    pub async fn refresh(&self, ticket: &mut Ticket) -> Result<(), IdempotencyError> {
        let value = self.claim_record(&ticket.nonce);
        let mut resynced = false;
        loop {
            match self.bounded(self.kv.update(&ticket.key, value.clone(), ticket.revision)).await {
                Ok(revision) => {
                    ticket.revision = revision;
                    return Ok(());
                }
                Err(e) if !resynced => {
                    if self.resync(ticket, e).await? == Resynced::Done {
                        // Only `complete` writes our result, and it runs after the refreshes.
                        return Err(IdempotencyError::Store("the claim already holds its result".into()));
                    }
                    resynced = true;
                }
                Err(e) => return Err(IdempotencyError::Store(e.to_string())),
            }
        }
    }

    /// Records the app's success; later deliveries of the key get `Claim::Done`. The
    /// effect has happened, so a failed write is tried again (for up to
    /// [`complete_budget`]) until the result is stored or the claim turns out to be lost.
    pub async fn complete(&self, mut ticket: Ticket, mut response: StoredResponse, ttl: Duration) -> Result<(), IdempotencyError> {
        if response.body.len() > self.max_response_bytes {
            response.body = Bytes::new();
            response.truncated = true;
        }
        let now = now_ms();
        let payload = Some(ticket.digest.clone());
        let nonce = ticket.nonce.clone();
        let record = Record::Done { at_ms: now, expires_ms: now + ttl.as_millis() as u64, response, payload, nonce };
        let value = Bytes::from(serde_json::to_vec(&record).map_err(|e| IdempotencyError::Store(e.to_string()))?);
        let give_up = tokio::time::Instant::now() + complete_budget(self.claim_ttl);
        let mut attempt = 0;
        loop {
            let error = match self.bounded(self.kv.update(&ticket.key, value.clone(), ticket.revision)).await {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            let last = match self.resync(&mut ticket, error).await {
                Ok(Resynced::Done) => return Ok(()),
                // The claim is still ours (at the revision the ticket now has): again.
                Ok(Resynced::Retry) => IdempotencyError::Store("storing the result was not confirmed".into()),
                Err(e) if !e.is_store_failure() => return Err(e),
                // The store is out of reach (a server restarting): again, shortly.
                Err(e) => e,
            };
            let pause = complete_retry_delay(attempt);
            if tokio::time::Instant::now() + pause >= give_up {
                return Err(last);
            }
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    /// Gives the key back after a failure, so the retry can run.
    pub async fn release(&self, mut ticket: Ticket) -> Result<(), IdempotencyError> {
        let mut resynced = false;
        loop {
            match self.bounded(self.kv.delete_expect_revision(&ticket.key, Some(ticket.revision))).await {
                Ok(()) => return Ok(()),
                Err(e) if !resynced => {
                    if self.resync(&mut ticket, e).await? == Resynced::Done {
                        // Never after a success; were it so, the result must stay.
                        return Ok(());
                    }
                    resynced = true;
                }
                Err(e) => return Err(IdempotencyError::Store(e.to_string())),
            }
        }
    }

    /// Waits for another handler's result (request mode), until `deadline`: `Done` or
    /// `Reused` (for payload `digest`), or `None` when there is none to wait for.
    pub async fn wait_done(&self, key: &str, digest: &str, deadline: tokio::time::Instant) -> Result<Option<Claim>, IdempotencyError> {
        let mut delay = Duration::from_millis(10);
        loop {
            if let Some(entry) = self.kv.entry(key).await.map_err(|e| IdempotencyError::Store(e.to_string()))? {
                if entry.operation == Operation::Put {
                    match serde_json::from_slice::<Record>(&entry.value) {
                        Ok(Record::Done { response, expires_ms, payload, .. }) if expires_ms > now_ms() => {
                            return Ok(Some(done_for(response, payload, digest)))
                        }
                        // An expired result is no answer: the caller claims (and runs) afresh.
                        Ok(Record::Done { .. }) => return Ok(None),
                        _ => {}
                    }
                } else {
                    // Released: the other handler failed; the caller may claim again.
                    return Ok(None);
                }
            } else {
                return Ok(None);
            }
            // Look once more at the deadline itself: a result that lands in the last
            // stretch still counts.
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(delay.min(deadline - now)).await;
            delay = (delay * 2).min(Duration::from_millis(200));
        }
    }
}

/// Encodes a stored body for display (the dlq tooling and logs).
pub fn preview(body: &[u8]) -> String {
    match std::str::from_utf8(body) {
        Ok(s) => s.chars().take(120).collect(),
        Err(_) => format!("base64:{}", base64::engine::general_purpose::STANDARD.encode(&body[..body.len().min(90)])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let r = Record::Done {
            nonce: "n1".into(),
            payload: Some(payload_digest(b"p")),
            at_ms: 1,
            expires_ms: 2,
            response: StoredResponse {
                status: 201,
                headers: vec![("a".into(), "b".into())],
                body: Bytes::from_static(&[0, 159, 146, 150]),
                truncated: false,
            },
        };
        let v = serde_json::to_vec(&r).unwrap();
        let back: Record = serde_json::from_slice(&v).unwrap();
        let Record::Done { response, .. } = back else { panic!() };
        assert_eq!(&response.body[..], &[0, 159, 146, 150]);
    }

    #[test]
    fn a_holder_knows_its_own_claim_and_its_own_result_by_the_nonce() {
        let claimed = |n: &str| serde_json::to_vec(&Record::Claimed { owner: "o".into(), at_ms: 1, nonce: n.into() }).unwrap();
        let done = |n: &str| {
            let response = StoredResponse { status: 200, headers: vec![], body: Bytes::new(), truncated: false };
            serde_json::to_vec(&Record::Done { at_ms: 1, expires_ms: 2, response, payload: None, nonce: n.into() }).unwrap()
        };
        assert_eq!(ours(Operation::Put, 7, &claimed("a"), "a"), Ours::Claimed(7));
        assert_eq!(ours(Operation::Put, 7, &done("a"), "a"), Ours::Done);
        assert_eq!(ours(Operation::Put, 7, &claimed("b"), "a"), Ours::Not);
        assert_eq!(ours(Operation::Put, 7, &done("b"), "a"), Ours::Not);
        assert_eq!(ours(Operation::Delete, 7, &claimed("a"), "a"), Ours::Not);
        assert_eq!(ours(Operation::Put, 7, b"garbage", "a"), Ours::Not);
        // Records written before nonces were kept have none, and are nobody's.
        assert_eq!(ours(Operation::Put, 7, br#"{"state":"claimed","owner":"o","at_ms":1}"#, ""), Ours::Not);
        let old_done = br#"{"state":"done","at_ms":1,"expires_ms":2,"response":{"status":200,"headers":[],"body":""}}"#;
        assert_eq!(ours(Operation::Put, 7, old_done, ""), Ours::Not);
        assert!(serde_json::from_slice::<Record>(old_done).is_ok(), "a result stored before nonces must still read");
    }

    #[test]
    fn a_holders_operations_are_bounded_well_inside_the_claim() {
        assert_eq!(op_timeout(Duration::from_secs(60)), Duration::from_secs(5));
        assert_eq!(op_timeout(Duration::from_secs(3)), Duration::from_millis(750));
        assert_eq!(op_timeout(Duration::from_millis(100)), Duration::from_millis(250));
        assert_eq!(complete_budget(Duration::from_secs(1)), Duration::from_secs(10));
        assert_eq!(complete_budget(Duration::from_secs(60)), Duration::from_secs(120));
    }
}
