//! The end of a delivery whose app call returned: an ack (after storing the result), a
//! delayed nak, or a dead letter then a term.

use std::time::SystemTime;

use async_nats::jetstream::message::AckKind;
use bytes::Bytes;

use super::delivery::{Delivery, Progress};
use super::{ConsumerRoute, CONFIRM_TIMEOUT};
use crate::dlq;
use crate::ingress::idempotency::guard::{self, Claimed};
use crate::ingress::policy::{self, Attempt, Outcome, Policy};
use crate::ingress::{AppError, AppResponse, Shared};
use crate::nats::publish::PublishErrorKind;

/// Ends a delivery whose app call returned, as [`outcome_for`](policy::outcome_for) says.
pub(super) async fn settle(
    shared: &Shared,
    js: &ConsumerRoute,
    msg: &async_nats::jetstream::Message,
    at: Delivery<'_>,
    claimed: Option<Claimed>,
    result: Result<AppResponse, AppError>,
    progress: &mut Progress,
) {
    let route = &js.route;
    let m = &route.metrics;
    let seq = at.seq;
    let error_text;
    let (attempt, retry_after, status, error): (Attempt, Option<&str>, Option<u16>, &[u8]) = match &result {
        Ok(r) => (
            Attempt::Status(r.status),
            r.headers.get(http::header::RETRY_AFTER).and_then(|v| v.to_str().ok()),
            Some(r.status.as_u16()),
            &r.body,
        ),
        Err(AppError::TooLarge { status, .. }) => (Attempt::Status(*status), None, Some(status.as_u16()), b""),
        Err(e) => {
            error_text = e.to_string();
            let a = if matches!(e, AppError::Timeout(_)) { Attempt::Timeout } else { Attempt::Unreachable };
            (a, None, None, error_text.as_bytes())
        }
    };
    let policy = Policy { max_deliver: js.consumer.max_deliver, backoff: &js.consumer.backoff };
    let outcome = policy::outcome_for(attempt, retry_after, at.delivered, &policy, SystemTime::now());
    if let (Some(g), Some(c)) = (route.idem.as_deref(), claimed) {
        // Done only after the app's success, and before the ack, so a copy of the message
        // never runs the effect again. Any other outcome gives the key back first, so the
        // retry (or a replay from the dead-letter stream) can claim it. A store error after a
        // success is logged and the message acked all the same: the effect happened, and a
        // redelivery would run it again; the claim goes stale after claim_ttl.
        let success = if outcome == Outcome::Ack { guard::success(&result) } else { None };
        if let Err(e) = g.finish(c, success).await {
            tracing::warn!(route = %route.inbound.name, seq, error = %crate::problem::error_chain(&e), ?outcome, "idempotency store not updated");
        }
    }
    match outcome {
        Outcome::Ack => {
            progress.stop().await;
            match confirm(shared, msg, b"+ACK").await {
                Ok(()) => m.ack.inc(),
                // The app has done its part; the server may redeliver, which idempotent
                // handlers absorb.
                Err(e) => tracing::warn!(route = %route.inbound.name, seq, error = %e, "ack not confirmed"),
            }
        }
        Outcome::Nak(delay) => {
            progress.stop().await;
            if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
                tracing::debug!(route = %route.inbound.name, seq, error = %e, "nak failed; ack_wait will redeliver");
            }
            m.nak.inc();
        }
        Outcome::DeadLetter(reason) => {
            let failure = dlq::Failure { reason, status, error: Some(error) };
            dead_letter_then_term(shared, js, msg, at, &failure, progress).await;
        }
    }
}

/// Dead-letters the message, then terms it; never terms without a dead letter: when the
/// publish fails it is naked, and its next delivery (over the route's `max_deliver`)
/// comes back here before the app is called.
pub(super) async fn dead_letter_then_term(
    shared: &Shared,
    js: &ConsumerRoute,
    msg: &async_nats::jetstream::Message,
    at: Delivery<'_>,
    failure: &dlq::Failure<'_>,
    progress: &mut Progress,
) {
    let route = &js.route;
    let origin = dlq::Origin {
        route: &route.inbound.name,
        consumer: &js.consumer.durable,
        stream: at.stream,
        subject: msg.subject.as_str(),
        seq: at.seq,
        deliveries: at.delivered,
        stored: at.stored,
    };
    let stored = dead_letter(js, msg.headers.as_ref(), &origin, failure, msg.payload.clone()).await;
    progress.stop().await;
    if stored {
        if let Err(e) = confirm(shared, msg, b"+TERM").await {
            // Dead-lettered already; a redelivery ends in the same place, deduplicated by
            // the dead letter's own Nats-Msg-Id.
            tracing::warn!(route = %route.inbound.name, seq = at.seq, error = %e, "term not confirmed");
        }
        route.metrics.term.inc();
    } else {
        let _ = msg.ack_with(AckKind::Nak(Some(policy::backoff(&js.consumer.backoff, at.delivered)))).await;
        route.metrics.nak.inc();
    }
}

/// Publishes a dead letter, waiting for the stream's ack; true once it is stored.
async fn dead_letter(
    js: &ConsumerRoute,
    original: Option<&async_nats::HeaderMap>,
    origin: &dlq::Origin<'_>,
    failure: &dlq::Failure<'_>,
    payload: Bytes,
) -> bool {
    let now = SystemTime::now();
    let headers = |trim| dlq::headers(original, origin, failure, now, trim);
    let published = js.dlq.publish_trimmed(&js.consumer.dead_letter, headers, payload).await;
    if let Ok((_, trim @ (dlq::Trim::Short | dlq::Trim::Bare))) = &published {
        tracing::warn!(
            route = origin.route,
            stream = origin.stream,
            seq = origin.seq,
            ?trim,
            "dead letter too large whole; stored with its description cut short"
        );
    }
    match published.map(|(ack, _)| ack) {
        Ok(ack) if ack.duplicate => {
            // Its Nats-Msg-Id is ours alone, and this message's alone (`dlq::msg_id`): a
            // duplicate means an earlier attempt of ours stored it (its term was lost). Not
            // counted twice.
            tracing::info!(route = origin.route, stream = origin.stream, seq = origin.seq, "already dead-lettered");
            true
        }
        Ok(_) => {
            js.dlq_counters.inc(failure.reason);
            js.route.metrics.dlq.inc();
            tracing::info!(route = origin.route, stream = origin.stream, seq = origin.seq, reason = %failure.reason, status = ?failure.status, deliveries = origin.deliveries, "dead-lettered");
            true
        }
        Err(e) if e.kind() == PublishErrorKind::PayloadTooLarge => {
            // Retrying cannot help: the payload alone (with the original headers) is too
            // large, and it is never cut. The message is nak'ed and comes back until an
            // operator acts (raises max_payload or the stream's max_msg_size, or removes it).
            js.dlq_too_large.inc();
            tracing::error!(route = origin.route, stream = origin.stream, seq = origin.seq, error = %e, "message too large to dead-letter even trimmed; nak'ed, it will be redelivered");
            false
        }
        Err(e) => {
            tracing::error!(route = origin.route, stream = origin.stream, seq = origin.seq, error = %e, "dead-letter publish failed");
            false
        }
    }
}

/// Ack or term and wait for the server to confirm it (a double ack), over the client's
/// shared reply subscription rather than a new subscription per message.
pub(super) async fn confirm(shared: &Shared, msg: &async_nats::jetstream::Message, kind: &'static [u8]) -> Result<(), String> {
    let reply = msg.reply.clone().ok_or("no reply subject")?;
    let req = async_nats::client::Request::new().payload(Bytes::from_static(kind)).timeout(Some(CONFIRM_TIMEOUT));
    shared.nats.send_request(reply, req).await.map(|_| ()).map_err(|e| e.to_string())
}
