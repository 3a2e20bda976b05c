//! The one acknowledged JetStream publish: egress's jetstream mode, dead letters and
//! `dlq replay` all go through [`publish_acked`], so they wait, retry and fail alike.

use std::fmt;
use std::time::Duration;

use async_nats::jetstream::{self, publish::PublishAck};
use bytes::Bytes;

/// During a stream leader election the server answers "no responders" for a moment.
/// Like the Go and .NET clients, we try three times in all, this far apart.
const ELECTION_RETRY_DELAY: Duration = Duration::from_millis(250);
const ATTEMPTS: u32 = 3;

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
    /// sequence, …); the source says which.
    Failed,
}

/// A JetStream publish that was not acknowledged, in the style of async-nats' errors: a
/// kind to match on, and the client's error (when there is one) as the source.
#[derive(Debug)]
pub struct PublishError {
    kind: PublishErrorKind,
    subject: String,
    timeout: Duration,
    source: Option<jetstream::context::PublishError>,
}

impl PublishError {
    pub fn kind(&self) -> PublishErrorKind {
        self.kind
    }

    /// The subject the message was published to.
    pub fn subject(&self) -> &str {
        &self.subject
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

/// Publishes and waits for the stream's ack within `timeout`, our own deadline: the ack
/// future otherwise follows the client's request timeout, not the caller's (nats.rs
/// #1558). "No responders" is retried with the same headers, so a `Nats-Msg-Id` keeps
/// the retries deduplicated.
pub async fn publish_acked(
    js: &jetstream::Context,
    subject: &str,
    headers: async_nats::HeaderMap,
    payload: Bytes,
    timeout: Duration,
) -> Result<PublishAck, PublishError> {
    use jetstream::context::PublishErrorKind as ClientKind;
    let fail = |kind, source| PublishError { kind, subject: subject.to_owned(), timeout, source };
    let deadline = tokio::time::Instant::now() + timeout;
    // The context's own ack wait (5 s by default) would cut a longer route timeout short
    // and report it as a failure: give it ours, so the deadline below decides.
    let mut js = js.clone();
    js.set_timeout(timeout);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let publish = async { js.publish_with_headers(subject.to_owned(), headers.clone(), payload.clone()).await?.await };
        let error = match tokio::time::timeout_at(deadline, publish).await {
            Ok(Ok(ack)) => return Ok(ack),
            Ok(Err(e)) => e,
            Err(_) => return Err(fail(PublishErrorKind::TimedOut, None)),
        };
        let kind = match error.kind() {
            ClientKind::StreamNotFound => {
                if attempt < ATTEMPTS && tokio::time::Instant::now() + ELECTION_RETRY_DELAY < deadline {
                    tokio::time::sleep(ELECTION_RETRY_DELAY).await;
                    continue;
                }
                PublishErrorKind::NoStream
            }
            ClientKind::MaxPayloadExceeded => PublishErrorKind::PayloadTooLarge,
            // The client's own wait ran out (at our deadline): the message may be stored.
            ClientKind::TimedOut => PublishErrorKind::TimedOut,
            _ => PublishErrorKind::Failed,
        };
        return Err(fail(kind, Some(error)));
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
}
