//! The one acknowledged JetStream publish: egress's jetstream mode, dead letters and
//! `dlq replay` all go through [`publish_acked`], so they wait, retry and fail alike.

use std::fmt;
use std::time::Duration;

use async_nats::jetstream::publish::PublishAck;
use bytes::Bytes;
use serde::Deserialize;

use crate::nats::replies::{Replies, ReplyError, ReplyErrorKind};

/// During a stream leader election the server answers "no responders" for a moment.
/// Like the Go and .NET clients, we try three times in all, this far apart.
const ELECTION_RETRY_DELAY: Duration = Duration::from_millis(250);
const ATTEMPTS: u32 = 3;

/// JetStream's error code for a message larger than the stream's `max_msg_size`.
const MESSAGE_EXCEEDS_MAXIMUM: u64 = 10054;
/// JetStream's codes for a failed `Nats-Expected-*` precondition: the stream (10060), the
/// last message id (10070), the last sequence (10071; 10164 when the server cannot yet
/// tell the sequence, e.g. another publish to the subject is in flight).
const PRECONDITION_FAILED: [u64; 4] = [10060, 10070, 10071, 10164];
/// "Duplicate message id is in process" (409): the first copy may still be stored, so a
/// retry with the same id is safe and useful, not refused.
const DUPLICATE_IN_PROCESS: u64 = 10158;

/// What went wrong with an acknowledged publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishErrorKind {
    /// No stream captures the subject ("no responders", still so after the retries).
    NoStream,
    /// The message (payload plus headers) is larger than the server's `max_payload`.
    PayloadTooLarge,
    /// No ack before our deadline.
    TimedOut,
    /// Anything else the client or the stream reported (disconnected, wrong last
    /// sequence, …); the source says which, and [`PublishError::api_error`] the code.
    Failed,
}

/// The error a stream answered instead of an ack: `{"error":{"code","err_code","description"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, thiserror::Error)]
#[error("{description} (status {code}, error code {err_code})")]
pub struct ApiError {
    /// An HTTP-like status (400, 503, …).
    pub code: u16,
    /// JetStream's own error code (10071 is "wrong last sequence", …).
    #[serde(default)]
    pub err_code: u64,
    #[serde(default)]
    pub description: String,
}

impl ApiError {
    /// A `Nats-Expected-*` header's expectation failed (or the stream answered 412): the
    /// same publish fails the same way on every retry.
    pub fn is_precondition(&self) -> bool {
        self.code == 412 || PRECONDITION_FAILED.contains(&self.err_code)
    }

    /// Any other refusal of this message as sent (a 4xx), apart from those that clear on
    /// their own: a timeout (408), too many requests (429), a duplicate still in process.
    pub fn is_refusal(&self) -> bool {
        (400..500).contains(&self.code) && !matches!(self.code, 408 | 429) && self.err_code != DUPLICATE_IN_PROCESS
    }
}

/// Why a publish was not acknowledged, below the kind.
#[derive(Debug, thiserror::Error)]
pub enum PublishCause {
    /// The client refused the publish, or the reply multiplexer stopped.
    #[error(transparent)]
    Client(ReplyError),
    /// The stream answered with an error.
    #[error(transparent)]
    Api(ApiError),
    /// The reply was neither an ack nor an API error.
    #[error("unreadable ack: {0}")]
    BadAck(#[source] serde_json::Error),
}

/// A JetStream publish that was not acknowledged: a kind to match on, and what the
/// client or the stream said (when they said something) as the source.
#[derive(Debug)]
pub struct PublishError {
    kind: PublishErrorKind,
    subject: String,
    timeout: Duration,
    source: Option<PublishCause>,
}

impl PublishError {
    pub fn kind(&self) -> PublishErrorKind {
        self.kind
    }

    /// The subject the message was published to.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The stream's error, when it answered one.
    pub fn api_error(&self) -> Option<&ApiError> {
        match &self.source {
            Some(PublishCause::Api(e)) => Some(e),
            _ => None,
        }
    }
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The source's text is part of ours: callers show one line, not the chain.
        match (self.kind, &self.source) {
            (PublishErrorKind::NoStream, _) => f.write_str("no stream captures this subject"),
            (PublishErrorKind::TimedOut, _) => write!(f, "no ack within {:?}", self.timeout),
            (_, Some(source)) => source.fmt(f),
            (PublishErrorKind::PayloadTooLarge, None) => f.write_str("max payload size exceeded"),
            (PublishErrorKind::Failed, None) => f.write_str("publish failed"),
        }
    }
}

impl std::error::Error for PublishError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// Publishes with a reply subject of ours and waits for the stream's ack within
/// `timeout`, our own deadline (the client's ack future would follow its request timeout,
/// nats.rs #1558, and leak a map entry per lost ack, #1617). "No responders" is retried
/// with the same headers, so a `Nats-Msg-Id` keeps the retries deduplicated.
///
/// `headers` builds the headers for each attempt: the client takes them by value, and
/// cloning a map of owned names and values for a retry that almost never happens cost
/// every publish its allocations (issue 14).
pub async fn publish_acked(
    replies: &Replies,
    subject: &str,
    headers: impl Fn() -> async_nats::HeaderMap,
    payload: Bytes,
    timeout: Duration,
) -> Result<PublishAck, PublishError> {
    let fail = |kind, source| PublishError { kind, subject: subject.to_owned(), timeout, source };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let error = match replies.request(subject.into(), headers(), payload.clone(), left).await {
            Ok(reply) => return parse_ack(&reply.payload).map_err(|(kind, cause)| fail(kind, Some(cause))),
            Err(e) => e,
        };
        let kind = match error.kind() {
            ReplyErrorKind::NoResponders => {
                if attempt < ATTEMPTS && tokio::time::Instant::now() + ELECTION_RETRY_DELAY < deadline {
                    tokio::time::sleep(ELECTION_RETRY_DELAY).await;
                    continue;
                }
                PublishErrorKind::NoStream
            }
            ReplyErrorKind::TimedOut => return Err(fail(PublishErrorKind::TimedOut, None)),
            ReplyErrorKind::MaxPayloadExceeded => PublishErrorKind::PayloadTooLarge,
            _ => PublishErrorKind::Failed,
        };
        return Err(fail(kind, Some(PublishCause::Client(error))));
    }
}

/// The stream's reply: a `PubAck`, or the API error it answered instead. An error reply
/// may carry `stream` and `seq` too (`"seq":0`), so `error` is looked at first.
fn parse_ack(payload: &[u8]) -> Result<PublishAck, (PublishErrorKind, PublishCause)> {
    #[derive(Deserialize)]
    struct Reply {
        error: Option<ApiError>,
        stream: String,
        seq: u64,
        #[serde(default)]
        duplicate: bool,
        #[serde(default)]
        domain: String,
    }
    #[derive(Deserialize)]
    struct Failure {
        error: ApiError,
    }
    let reply = match serde_json::from_slice::<Reply>(payload) {
        Ok(r) => r,
        // Without `stream` or `seq` it can still be a bare API error.
        Err(e) => match serde_json::from_slice::<Failure>(payload) {
            Ok(Failure { error }) => Reply { error: Some(error), stream: String::new(), seq: 0, duplicate: false, domain: String::new() },
            Err(_) => return Err((PublishErrorKind::Failed, PublishCause::BadAck(e))),
        },
    };
    match reply.error {
        Some(error) if error.err_code == MESSAGE_EXCEEDS_MAXIMUM => Err((PublishErrorKind::PayloadTooLarge, PublishCause::Api(error))),
        Some(error) => Err((PublishErrorKind::Failed, PublishCause::Api(error))),
        None => Ok(PublishAck {
            stream: reply.stream,
            sequence: reply.seq,
            duplicate: reply.duplicate,
            domain: reply.domain,
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_failure_without_the_subject() {
        let e = |kind| PublishError { kind, subject: "a.b".into(), timeout: Duration::from_millis(1500), source: None };
        assert_eq!(e(PublishErrorKind::NoStream).to_string(), "no stream captures this subject");
        assert_eq!(e(PublishErrorKind::TimedOut).to_string(), "no ack within 1.5s");
        assert_eq!(e(PublishErrorKind::TimedOut).subject(), "a.b");
    }

    #[test]
    fn acks_and_api_errors_are_told_apart() {
        let ack = parse_ack(br#"{"stream":"S","seq":7,"duplicate":true}"#).unwrap();
        assert_eq!((ack.stream.as_str(), ack.sequence, ack.duplicate), ("S", 7, true));
        let (kind, cause) = parse_ack(br#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 1"}}"#).unwrap_err();
        assert_eq!(kind, PublishErrorKind::Failed);
        assert_eq!(cause.to_string(), "wrong last sequence: 1 (status 400, error code 10071)");
        assert!(matches!(cause, PublishCause::Api(ApiError { code: 400, err_code: 10071, .. })));
        let (kind, _) =
            parse_ack(br#"{"error":{"code":400,"err_code":10054,"description":"message size exceeds maximum allowed"}}"#).unwrap_err();
        assert_eq!(kind, PublishErrorKind::PayloadTooLarge);
        let api = |code, err_code| ApiError { code, err_code, description: String::new() };
        for (code, err_code) in [(400, 10060), (400, 10070), (400, 10071), (400, 10164), (412, 10180)] {
            assert!(api(code, err_code).is_precondition(), "{err_code}");
        }
        assert!(!api(400, 10077).is_precondition() && api(400, 10077).is_refusal());
        for (code, err_code) in [(503, 10008), (500, 10047), (429, 10167), (409, 10158)] {
            assert!(!api(code, err_code).is_precondition() && !api(code, err_code).is_refusal(), "{err_code}");
        }
        let (kind, cause) = parse_ack(b"not json").unwrap_err();
        assert!(kind == PublishErrorKind::Failed && matches!(cause, PublishCause::BadAck(_)), "{cause}");
    }
}
