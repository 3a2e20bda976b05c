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
//! holder re-reads the entry and, finding its own nonce there, carries on from the
//! entry's revision instead of losing a claim that is still its own.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation};
use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::IdempotencyKey;

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
    },
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

/// Where a message's key comes from (pure, for tests and fuzzing).
pub fn extract_key(spec: &IdempotencyKey, headers: Option<&async_nats::HeaderMap>, payload: &[u8]) -> Option<String> {
    let value = match spec {
        IdempotencyKey::Header(name) => header(headers?, name),
        IdempotencyKey::MsgId => headers?.get(crate::codec::NATS_MSG_ID).map(|v| v.as_str().to_owned()),
        IdempotencyKey::Json(pointer) => {
            let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
            match v.pointer(pointer)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Null => None,
                other => Some(other.to_string()),
            }
        }
    }?;
    (!value.trim().is_empty()).then_some(value)
}

/// A header's first value, its name matched without regard to case: NATS header names
/// are case-sensitive, but `header:idempotency-key` must find the `Idempotency-Key` the
/// egress side sends (it canonicalizes names), and any other spelling a peer uses.
fn header(headers: &async_nats::HeaderMap, name: &str) -> Option<String> {
    if let Some(v) = headers.get(name) {
        return Some(v.as_str().to_owned());
    }
    headers
        .iter()
        .find(|(n, _)| AsRef::<str>::as_ref(*n).eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v.first())
        .map(|v| v.as_str().to_owned())
}

/// The KV key for an idempotency key of `service`'s route `route`:
/// `<service>.<route>.<sha256 of key>`. Keys are hashed because KV keys allow only a few
/// characters. They are scoped by service because every service that consumes an event
/// runs its own handler for it: a key shared across services would let one service ack,
/// without running, what another had processed (replicas of one service share the
/// service name, and so their claims). They are scoped by route because each route is
/// its own handler.
pub fn kv_key(service: &str, route: &str, key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(service.len() + route.len() + 2 + 64);
    push_scope(&mut out, service);
    out.push('.');
    push_scope(&mut out, route);
    out.push('.');
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// A scope segment: the name itself when it is only letters, digits, '-' and '_' (route
/// names always are), else `=` and its hex bytes. The two forms never meet (a plain name
/// has no `=`) and neither has a `.`, so two different (service, route) pairs never share
/// a prefix.
fn push_scope(out: &mut String, name: &str) {
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        out.push_str(name);
    } else {
        out.push('=');
        for b in name.bytes() {
            out.push_str(&format!("{b:02x}"));
        }
    }
}

/// The digest a result is bound to: sha256 of the message payload, in hex.
pub fn payload_digest(payload: &[u8]) -> String {
    Sha256::digest(payload).iter().map(|b| format!("{b:02x}")).collect()
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
    max_response_bytes: usize,
    owner: String,
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
        Ok(Self { kv, claim_ttl: cfg.claim_ttl, max_response_bytes: cfg.max_response_bytes, owner })
    }

    fn claim_record(&self, nonce: &str) -> Bytes {
        let record = Record::Claimed { owner: self.owner.clone(), at_ms: now_ms(), nonce: nonce.to_owned() };
        Bytes::from(serde_json::to_vec(&record).unwrap_or_default())
    }

    /// The revision of `key`'s entry when it holds the claim with `nonce`: a write of ours
    /// whose reply was lost was applied all the same.
    async fn own_revision(&self, key: &str, nonce: &str) -> Result<Option<u64>, IdempotencyError> {
        let entry = self.kv.entry(key).await.map_err(|e| IdempotencyError::Store(e.to_string()))?;
        Ok(entry.filter(|e| e.operation == Operation::Put).and_then(|e| match serde_json::from_slice::<Record>(&e.value) {
            Ok(Record::Claimed { nonce: n, .. }) if !n.is_empty() && n == nonce => Some(e.revision),
            _ => None,
        }))
    }

    /// After a compare-and-set on `ticket` failed: when the entry still holds our claim
    /// (an earlier write of ours was applied though its reply was lost), moves the ticket to
    /// the entry's revision so the caller can try once more; else the error to return.
    async fn resync(&self, ticket: &mut Ticket, error: kv::UpdateError) -> Result<(), IdempotencyError> {
        if !matches!(error.kind(), kv::UpdateErrorKind::WrongLastRevision | kv::UpdateErrorKind::TimedOut) {
            return Err(IdempotencyError::Store(error.to_string()));
        }
        match self.own_revision(&ticket.key, &ticket.nonce).await? {
            Some(revision) => {
                ticket.revision = revision;
                Ok(())
            }
            None if error.kind() == kv::UpdateErrorKind::WrongLastRevision => Err(IdempotencyError::ClaimLost { key: ticket.key.clone() }),
            None => Err(IdempotencyError::Store(error.to_string())),
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
                Err(e) => match self.own_revision(key, &nonce).await {
                    Ok(Some(revision)) => return ticket(revision),
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
                Err(e) => match self.own_revision(key, &nonce).await {
                    Ok(Some(revision)) => return ticket(revision),
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
            match self.kv.update(&ticket.key, value.clone(), ticket.revision).await {
                Ok(revision) => {
                    ticket.revision = revision;
                    return Ok(());
                }
                Err(e) if !resynced => {
                    self.resync(ticket, e).await?;
                    resynced = true;
                }
                Err(e) => return Err(IdempotencyError::Store(e.to_string())),
            }
        }
    }

    /// Records the app's success; later deliveries of the key get `Claim::Done`.
    pub async fn complete(&self, mut ticket: Ticket, mut response: StoredResponse, ttl: Duration) -> Result<(), IdempotencyError> {
        if response.body.len() > self.max_response_bytes {
            response.body = Bytes::new();
            response.truncated = true;
        }
        let now = now_ms();
        let payload = Some(ticket.digest.clone());
        let record = Record::Done { at_ms: now, expires_ms: now + ttl.as_millis() as u64, response, payload };
        let value = Bytes::from(serde_json::to_vec(&record).map_err(|e| IdempotencyError::Store(e.to_string()))?);
        let mut resynced = false;
        loop {
            match self.kv.update(&ticket.key, value.clone(), ticket.revision).await {
                Ok(_) => return Ok(()),
                Err(e) if !resynced => {
                    self.resync(&mut ticket, e).await?;
                    resynced = true;
                }
                Err(e) => return Err(IdempotencyError::Store(e.to_string())),
            }
        }
    }

    /// Gives the key back after a failure, so the retry can run.
    pub async fn release(&self, mut ticket: Ticket) -> Result<(), IdempotencyError> {
        let mut resynced = false;
        loop {
            match self.kv.delete_expect_revision(&ticket.key, Some(ticket.revision)).await {
                Ok(()) => return Ok(()),
                Err(e) if !resynced => {
                    self.resync(&mut ticket, e).await?;
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
    fn keys_come_from_headers_msg_id_or_json() {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Idempotency-Key", "k1");
        h.insert("Nats-Msg-Id", "m1");
        assert_eq!(extract_key(&IdempotencyKey::Header("Idempotency-Key".into()), Some(&h), b""), Some("k1".into()));
        assert_eq!(extract_key(&IdempotencyKey::MsgId, Some(&h), b""), Some("m1".into()));
        assert_eq!(extract_key(&IdempotencyKey::MsgId, None, b""), None);
        // Header names match without regard to case (egress sends `Idempotency-Key`).
        assert_eq!(extract_key(&IdempotencyKey::Header("idempotency-key".into()), Some(&h), b""), Some("k1".into()));
        assert_eq!(extract_key(&IdempotencyKey::Header("X-Other".into()), Some(&h), b""), None);
        let body = br#"{"order":{"id":"o-9","n":7},"blank":" "}"#;
        assert_eq!(extract_key(&IdempotencyKey::Json("/order/id".into()), None, body), Some("o-9".into()));
        assert_eq!(extract_key(&IdempotencyKey::Json("/order/n".into()), None, body), Some("7".into()));
        assert_eq!(extract_key(&IdempotencyKey::Json("/blank".into()), None, body), None);
        assert_eq!(extract_key(&IdempotencyKey::Json("/missing".into()), None, body), None);
        assert_eq!(extract_key(&IdempotencyKey::Json("/order/id".into()), None, b"not json"), None);
    }

    #[test]
    fn kv_keys_are_valid_and_scoped_by_service_and_route() {
        let a = kv_key("tools", "tool-exec", "a key with spaces/and.dots*>");
        assert!(a.starts_with("tools.tool-exec."));
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || "-_.=".contains(c)), "{a}");
        assert_ne!(a, kv_key("tools", "other", "a key with spaces/and.dots*>"));
        assert_ne!(a, kv_key("orchestration", "tool-exec", "a key with spaces/and.dots*>"));
        assert_eq!(a, kv_key("tools", "tool-exec", "a key with spaces/and.dots*>"));
        // A service name KV keys cannot hold is encoded, and never meets a plain one.
        let odd = kv_key("svc:1", "r", "k");
        assert!(odd.starts_with("=7376633a31.r."), "{odd}");
        assert!(odd.chars().all(|c| c.is_ascii_alphanumeric() || "-_.=".contains(c)), "{odd}");
        assert_ne!(kv_key("=7376633a31", "r", "k"), odd);
    }

    #[test]
    fn records_round_trip() {
        let r = Record::Done {
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
}
