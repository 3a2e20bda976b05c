//! Dead letters: the `Bridge-Dlq-*` headers that say why a message was given up on, and
//! publishing them with JetStream, acked, to a route's `dead_letter` subject.
//!
//! A dead letter keeps the original payload and headers, so it can be inspected and
//! replayed; the header names below are the contract for that tooling.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use prometheus::IntCounter;

use crate::metrics::Metrics;
use crate::nats::publish::{publish_acked, PublishError, PublishErrorKind};
use crate::nats::replies::Replies;

/// `natsbridge dlq list|show|replay|purge`: inspecting, replaying and purging dead letters.
pub mod cli;
/// How full the dead-letter stream is, as gauges.
pub mod fill;

/// Why the message was given up on: [`Reason`].
pub const REASON: &str = "Bridge-Dlq-Reason";
/// The app's last HTTP status, when it answered.
pub const STATUS: &str = "Bridge-Dlq-Status";
/// The first [`ERROR_MAX`] bytes of the app's response body, or the transport error.
pub const ERROR: &str = "Bridge-Dlq-Error";
/// How many times JetStream delivered the message.
pub const DELIVERIES: &str = "Bridge-Dlq-Deliveries";
/// The subject the message was published to (where a replay sends it back).
pub const SUBJECT: &str = "Bridge-Dlq-Subject";
pub const STREAM: &str = "Bridge-Dlq-Stream";
pub const SEQ: &str = "Bridge-Dlq-Seq";
/// When the message was dead-lettered, RFC 3339.
pub const TIME: &str = "Bridge-Dlq-Time";
/// The inbound route that gave up.
pub const ROUTE: &str = "Bridge-Dlq-Route";
/// The durable consumer that delivered it.
pub const CONSUMER: &str = "Bridge-Dlq-Consumer";

/// The original message's `Nats-Msg-Id`, when it had one (the dead letter has its own).
pub const MSG_ID: &str = "Bridge-Dlq-Msg-Id";

/// Every header a dead letter adds; a replay strips these.
pub const HEADERS: &[&str] = &[REASON, STATUS, ERROR, DELIVERIES, SUBJECT, STREAM, SEQ, TIME, ROUTE, CONSUMER, MSG_ID];

/// The original's headers that are publish controls, not content: copied into the dead
/// letter they would make the dead-letter stream reject it (`Nats-Expected-*`), roll it up
/// (`Nats-Rollup`), expire it (`Nats-TTL`) or deduplicate it against another consumer's
/// dead letter of the same message (`Nats-Msg-Id`).
fn is_publish_control(name: &str) -> bool {
    let starts = |p: &str| name.len() >= p.len() && name[..p.len()].eq_ignore_ascii_case(p);
    starts("Nats-Expected-")
        || name.eq_ignore_ascii_case("Nats-Rollup")
        || name.eq_ignore_ascii_case("Nats-TTL")
        || name.eq_ignore_ascii_case(crate::codec::NATS_MSG_ID)
}

/// The dead letter's own `Nats-Msg-Id`, `<stream>.<durable>.<seq>.<stored>`: unique per
/// consumer and message (two services' dead letters of one message are two dead letters),
/// and stable across a retried publish and a redelivery (the DLQ stream keeps one).
///
/// `<stored>` is when the source stream stored the message (ns since the epoch): without
/// it, a stream deleted and recreated within the DLQ stream's duplicate window numbers its
/// messages from 1 again, and a new message's dead letter would be answered `duplicate`,
/// taken for "already stored", and the message termed with no dead letter at all.
pub fn msg_id(origin: &Origin<'_>) -> String {
    format!("{}.{}.{}.{}", origin.stream, origin.consumer, origin.seq, origin.stored)
}

/// Whether `id` is the `Nats-Msg-Id` [`msg_id`] gives (or gave, before `<stored>` was
/// added) a dead letter of `stream`/`consumer`/`seq`.
pub fn is_own_msg_id(id: &str, stream: &str, consumer: &str, seq: &str) -> bool {
    let Some(rest) = id.strip_prefix(stream).and_then(|r| r.strip_prefix('.')) else { return false };
    let Some(rest) = rest.strip_prefix(consumer).and_then(|r| r.strip_prefix('.')) else { return false };
    let Some(rest) = rest.strip_prefix(seq) else { return false };
    rest.is_empty() || rest.strip_prefix('.').is_some_and(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
}

/// How much of the response body `Bridge-Dlq-Error` keeps.
pub const ERROR_MAX: usize = 1024;
/// How much it keeps in a dead letter trimmed to fit ([`Trim::Short`]).
pub const ERROR_SHORT: usize = 128;

/// How much of its description a dead letter carries. The payload and the original
/// headers are never cut (a replay needs them), so a message near `max_payload` fits only
/// when the headers we add are cut short: without that, its dead letter is refused, the
/// message nak'ed, and redelivered for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trim {
    /// Everything: the error's first [`ERROR_MAX`] bytes.
    Full,
    /// The error's first [`ERROR_SHORT`] bytes.
    Short,
    /// No error and no time (the dead-letter stream stamps its own); what a replay and
    /// `natsbridge dlq` need stays.
    Bare,
}

impl Trim {
    /// Each step, the fullest first.
    pub const STEPS: [Trim; 3] = [Trim::Full, Trim::Short, Trim::Bare];
}

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A retryable status (408, 429, 5xx) on the last delivery.
    Status,
    /// A status that retrying cannot fix (other 4xx).
    Poison,
    /// Delivered past the route's `max_deliver` without a final outcome from us (its last
    /// delivery crashed, was stopped, or its dead letter failed); the app is not called again.
    MaxDeliver,
    /// The app could not be reached, or did not answer in time, on the last delivery.
    AppUnreachable,
    /// The message breaks its route's contract (JSON Schema); the app never saw it.
    Schema,
    /// The message names a contract version its route does not accept.
    SchemaVersion,
    /// The route's codec cannot read the message (an invalid CloudEvent); the app never
    /// saw it.
    Malformed,
}

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::Status,
        Reason::Poison,
        Reason::MaxDeliver,
        Reason::AppUnreachable,
        Reason::Schema,
        Reason::SchemaVersion,
        Reason::Malformed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Status => "status",
            Reason::Poison => "poison",
            Reason::MaxDeliver => "max_deliver",
            Reason::AppUnreachable => "app_unreachable",
            Reason::Schema => "schema",
            Reason::SchemaVersion => "schema-version",
            Reason::Malformed => "malformed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the message came from.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub route: &'a str,
    pub consumer: &'a str,
    pub stream: &'a str,
    pub subject: &'a str,
    pub seq: u64,
    pub deliveries: u64,
    /// When the source stream stored the message, ns since the epoch (the same on every
    /// delivery of it; see [`msg_id`]).
    pub stored: u64,
}

/// What went wrong the last time.
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    pub reason: Reason,
    pub status: Option<u16>,
    /// The response body, or a transport error's text; cut to [`ERROR_MAX`] bytes.
    pub error: Option<&'a [u8]>,
}

/// The dead letter's headers: the original ones minus publish controls (see
/// [`is_publish_control`]; the original id is kept as [`MSG_ID`]), plus ours (replacing
/// any left by an earlier trip through a dead-letter queue, so they always describe this
/// one), and its own `Nats-Msg-Id` ([`msg_id`]), with as much of the description as
/// `trim` keeps.
pub fn headers(
    original: Option<&async_nats::HeaderMap>,
    origin: &Origin<'_>,
    failure: &Failure<'_>,
    now: SystemTime,
    trim: Trim,
) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    if let Some(orig) = original {
        for (name, values) in orig.iter() {
            let n: &str = name.as_ref();
            if HEADERS.iter().any(|d| d.eq_ignore_ascii_case(n)) || is_publish_control(n) {
                continue;
            }
            for v in values {
                h.append(name.clone(), v.clone());
            }
        }
    }
    h.insert(REASON, failure.reason.as_str());
    if let Some(s) = failure.status {
        h.insert(STATUS, s.to_string().as_str());
    }
    let error_max = match trim {
        Trim::Full => ERROR_MAX,
        Trim::Short => ERROR_SHORT,
        Trim::Bare => 0,
    };
    if let Some(e) = failure.error.map(|e| excerpt(e, error_max)).filter(|e| !e.is_empty()) {
        h.insert(ERROR, e.as_str());
    }
    h.insert(DELIVERIES, origin.deliveries.to_string().as_str());
    h.insert(SUBJECT, origin.subject);
    h.insert(STREAM, origin.stream);
    h.insert(SEQ, origin.seq.to_string().as_str());
    if trim != Trim::Bare {
        h.insert(TIME, humantime::format_rfc3339_millis(now).to_string().as_str());
    }
    h.insert(ROUTE, origin.route);
    h.insert(CONSUMER, origin.consumer);
    if let Some(id) = original.and_then(|o| o.get(crate::codec::NATS_MSG_ID)) {
        h.insert(MSG_ID, id.as_str());
    }
    h.insert(crate::codec::NATS_MSG_ID, msg_id(origin).as_str());
    h
}

/// The first `max` bytes of `body` as one header-safe line: cut on a character boundary,
/// invalid UTF-8 replaced, and control characters (CR/LF would break the NATS header
/// block) turned into spaces.
pub fn excerpt(body: &[u8], max: usize) -> String {
    let cut = &body[..body.len().min(max)];
    let text = String::from_utf8_lossy(cut);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    // A cut in the middle of a multi-byte sequence shows up as a trailing U+FFFD.
    if body.len() > max && out.ends_with('\u{FFFD}') {
        out.pop();
    }
    out.trim().to_owned()
}

/// Publishes dead letters and waits for the stream's ack: nothing may be termed before a
/// stream holds its dead letter.
#[derive(Clone)]
pub struct Publisher {
    replies: Replies,
    timeout: Duration,
}

impl Publisher {
    pub fn new(replies: Replies, timeout: Duration) -> Self {
        Self { replies, timeout }
    }

    pub async fn publish(
        &self,
        subject: &str,
        headers: async_nats::HeaderMap,
        payload: Bytes,
    ) -> Result<async_nats::jetstream::publish::PublishAck, PublishError> {
        publish_acked(&self.replies, subject, || headers.clone(), payload, self.timeout).await
    }

    /// Publishes the dead letter `headers` builds, trimmed one [`Trim`] step further each
    /// time it is too large (refused by the client against `max_payload`, or by the stream
    /// against its `max_msg_size`); the payload is never cut. Tells which step was stored.
    /// A retry keeps the same `Nats-Msg-Id`: an earlier step the stream did store is
    /// answered `duplicate`.
    pub async fn publish_trimmed(
        &self,
        subject: &str,
        headers: impl Fn(Trim) -> async_nats::HeaderMap,
        payload: Bytes,
    ) -> Result<(async_nats::jetstream::publish::PublishAck, Trim), PublishError> {
        let mut last = None;
        for trim in Trim::STEPS {
            match self.publish(subject, headers(trim), payload.clone()).await {
                Ok(ack) => return Ok((ack, trim)),
                Err(e) if e.kind() == PublishErrorKind::PayloadTooLarge => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("Trim::STEPS is not empty"))
    }
}

/// `natsbridge_dlq_published_total{route,reason}`, resolved once per route.
#[derive(Clone)]
pub struct Counters([IntCounter; Reason::ALL.len()]);

impl Counters {
    pub fn new(metrics: &Metrics, route: &str) -> Self {
        Self(Reason::ALL.map(|r| metrics.dlq_published.with_label_values(&[route, r.as_str()])))
    }

    pub fn inc(&self, reason: Reason) {
        self.0[reason.index()].inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Origin<'static> {
        Origin {
            route: "tool-exec",
            consumer: "tool-service",
            stream: "TOOL",
            subject: "tool.execution.requested",
            seq: 42,
            deliveries: 5,
            stored: 1_700_000_000_123_456_789,
        }
    }

    #[test]
    fn headers_keep_the_original_and_describe_the_failure() {
        let mut orig = async_nats::HeaderMap::new();
        orig.insert("Nats-Msg-Id", "abc");
        orig.insert("X-Trace", "t1");
        orig.insert(REASON, "stale");
        orig.insert(STATUS, "500");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let h = headers(
            Some(&orig),
            &origin(),
            &Failure { reason: Reason::Status, status: Some(503), error: Some(b"down\r\nfor maintenance") },
            now,
            Trim::Full,
        );
        assert_eq!(h.get("Nats-Msg-Id").unwrap().as_str(), "TOOL.tool-service.42.1700000000123456789");
        assert_eq!(h.get_all("Nats-Msg-Id").count(), 1);
        assert_eq!(h.get(MSG_ID).unwrap().as_str(), "abc");
        assert_eq!(h.get("X-Trace").unwrap().as_str(), "t1");
        assert_eq!(h.get(REASON).unwrap().as_str(), "status");
        assert_eq!(h.get_all(REASON).count(), 1);
        assert_eq!(h.get(STATUS).unwrap().as_str(), "503");
        assert_eq!(h.get(ERROR).unwrap().as_str(), "down  for maintenance");
        assert_eq!(h.get(DELIVERIES).unwrap().as_str(), "5");
        assert_eq!(h.get(SUBJECT).unwrap().as_str(), "tool.execution.requested");
        assert_eq!(h.get(STREAM).unwrap().as_str(), "TOOL");
        assert_eq!(h.get(SEQ).unwrap().as_str(), "42");
        assert_eq!(h.get(TIME).unwrap().as_str(), "2023-11-14T22:13:20.000Z");
        assert_eq!(h.get(ROUTE).unwrap().as_str(), "tool-exec");
        assert_eq!(h.get(CONSUMER).unwrap().as_str(), "tool-service");

        let h = headers(Some(&orig), &origin(), &Failure { reason: Reason::MaxDeliver, status: None, error: None }, now, Trim::Full);
        assert!(h.get(STATUS).is_none());
        assert!(h.get(ERROR).is_none());
        assert_eq!(h.get(REASON).unwrap().as_str(), "max_deliver");
    }

    #[test]
    fn publish_controls_are_not_copied() {
        let mut orig = async_nats::HeaderMap::new();
        for n in ["Nats-Expected-Stream", "nats-expected-last-sequence", "Nats-Rollup", "Nats-TTL", "X-Keep"] {
            orig.insert(n, "v");
        }
        let h = headers(
            Some(&orig),
            &origin(),
            &Failure { reason: Reason::Poison, status: Some(400), error: None },
            SystemTime::now(),
            Trim::Full,
        );
        let names: Vec<String> = h.iter().map(|(n, _)| AsRef::<str>::as_ref(n).to_ascii_lowercase()).collect();
        assert!(!names.iter().any(|n| n.starts_with("nats-expected") || n == "nats-rollup" || n == "nats-ttl"), "{names:?}");
        assert_eq!(h.get("X-Keep").unwrap().as_str(), "v");
        // Without an original id there is none to keep, but the dead letter has its own.
        assert!(h.get(MSG_ID).is_none());
        assert_eq!(h.get("Nats-Msg-Id").unwrap().as_str(), "TOOL.tool-service.42.1700000000123456789");
    }

    #[test]
    fn the_id_tells_a_recreated_streams_message_from_an_earlier_one_and_not_a_redelivery() {
        let first = origin();
        // Redelivered (more deliveries, same message): the same id, so a retry dedupes.
        assert_eq!(msg_id(&Origin { deliveries: 9, ..first }), msg_id(&first));
        // The stream recreated: sequence 42 again, another message, stored later.
        let again = Origin { stored: first.stored + 5_000_000_000, ..first };
        assert_ne!(msg_id(&again), msg_id(&first));
        for id in [msg_id(&first), "TOOL.tool-service.42".into()] {
            assert!(is_own_msg_id(&id, "TOOL", "tool-service", "42"), "{id}");
        }
        for id in ["TOOL.tool-service.421", "TOOL.tool-service.42.", "TOOL.tool-service.42.x", "evt-1", "TOOL.other.42.1"] {
            assert!(!is_own_msg_id(id, "TOOL", "tool-service", "42"), "{id}");
        }
    }

    #[test]
    fn a_trimmed_dead_letter_keeps_what_a_replay_needs() {
        let mut orig = async_nats::HeaderMap::new();
        orig.insert("Nats-Msg-Id", "abc");
        let body = "x".repeat(3000);
        let failure = Failure { reason: Reason::Status, status: Some(503), error: Some(body.as_bytes()) };
        let at = |trim| headers(Some(&orig), &origin(), &failure, SystemTime::now(), trim);
        let len = |h: &async_nats::HeaderMap| {
            h.iter().map(|(n, vs)| vs.iter().map(|v| AsRef::<str>::as_ref(n).len() + v.as_str().len() + 4).sum::<usize>()).sum::<usize>()
        };
        let (full, short, bare) = (at(Trim::Full), at(Trim::Short), at(Trim::Bare));
        assert_eq!(full.get(ERROR).unwrap().as_str().len(), ERROR_MAX);
        assert_eq!(short.get(ERROR).unwrap().as_str().len(), ERROR_SHORT);
        assert!(bare.get(ERROR).is_none() && bare.get(TIME).is_none());
        assert!(len(&full) > len(&short) && len(&short) > len(&bare));
        for h in [&short, &bare] {
            for name in [REASON, STATUS, DELIVERIES, SUBJECT, STREAM, SEQ, ROUTE, CONSUMER, MSG_ID, "Nats-Msg-Id"] {
                assert_eq!(h.get(name), full.get(name), "{name}");
            }
        }
    }

    #[test]
    fn error_excerpt_is_bounded_and_header_safe() {
        let long = "é".repeat(2000);
        let e = excerpt(long.as_bytes(), ERROR_MAX);
        assert!(e.len() <= ERROR_MAX);
        assert!(e.chars().all(|c| c == 'é'));
        assert_eq!(excerpt(b"a\nb\x00c", ERROR_MAX), "a b c");
        assert_eq!(excerpt(b"", ERROR_MAX), "");
    }

    #[test]
    fn reasons_round_trip() {
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
        }
        assert_eq!(Reason::parse("nope"), None);
    }
}
