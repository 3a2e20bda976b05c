//! One delivery: in-progress acks, the idempotency claim, the app call; [`settle`](super::settle)
//! ends it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::message::AckKind;
use http::{HeaderMap, HeaderValue};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::delivery::{Delivery, Progress};
use super::settle::{confirm, dead_letter_then_term, settle};
use super::{ConsumerRoute, CLAIM_STALE_MARGIN};
use crate::codec;
use crate::dlq::{self, Reason};
use crate::ingress::border;
use crate::ingress::idempotency::guard::{self, Begin, Claimed};
use crate::ingress::policy;
use crate::ingress::{retry_delay, sleep_or_stop, AppError, AppResponse, InFlight, Route, Shared};

pub(super) async fn handle(
    shared: Arc<Shared>,
    js: Arc<ConsumerRoute>,
    msg: async_nats::jetstream::Message,
    _permit: OwnedSemaphorePermit,
    abort: CancellationToken,
) {
    let route = &js.route;
    let m = &route.metrics;
    m.deliveries.inc();
    let _in_flight = InFlight::new(&m.in_flight);
    let (stream, seq, delivered, stored) = match msg.info() {
        Ok(i) => {
            let stored = u64::try_from(i.published.unix_timestamp_nanos()).unwrap_or(0);
            (i.stream.to_owned(), i.stream_sequence, i.delivered.max(1) as u64, stored)
        }
        Err(e) => {
            tracing::warn!(route = %route.inbound.name, error = %e, "not a JetStream delivery; ignored");
            return;
        }
    };
    let at = Delivery { stream: &stream, seq, delivered, stored };
    let mut progress = Progress::start(&shared, js.progress_every, &msg);
    // The contract first: a message that breaks it never reaches the app, whatever the
    // app's health, and retrying cannot fix it, so it is dead-lettered on this delivery.
    let fallback_id = Some(format!("{stream}.{seq}"));
    let (decoded, verdict) = border::admit(route, &shared.metrics, msg.headers.as_ref(), &msg.payload, &msg.subject, fallback_id);
    let checked = match verdict {
        Ok(checked) => checked,
        Err(refused) => {
            let detail = refused.detail();
            let failure = dlq::Failure { reason: refused.reason(), status: None, error: Some(detail.as_bytes()) };
            dead_letter_then_term(&shared, &js, &msg, at, &failure, &mut progress).await;
            return;
        }
    };
    // The app is down (`app_health_path`): hold the message under in-progress acks until it
    // is back, rather than spend one of its deliveries on an app that cannot take it.
    if !shared.gate.wait_open(&abort).await {
        nak(&msg, None, &mut progress, route).await;
        return;
    }

    // Idempotency: claim the key before calling the app.
    let idem = route.idem.as_deref();
    let key = idem.and_then(|g| g.key(msg.headers.as_ref(), &msg.payload));
    let claimed = match gate(&shared, &js, &msg, at, key.as_deref(), &abort, &mut progress).await {
        Gate::Run(c) => c,
        Gate::Settled => return,
    };

    // The last delivery already came and went without an outcome (crashed, stopped, or
    // its dead letter failed): dead-letter it without calling the app again.
    if js.consumer.max_deliver > 0 && delivered > js.consumer.max_deliver as u64 {
        if let (Some(g), Some(c)) = (idem, claimed) {
            // This delivery never called the app: the key is free for a replay.
            let _ = g.finish(c, None).await;
        }
        let failure = dlq::Failure {
            reason: Reason::MaxDeliver,
            status: None,
            error: Some(b"deliveries exhausted without an outcome (handler crashed, stopped, or its dead letter failed)"),
        };
        dead_letter_then_term(&shared, &js, &msg, at, &failure, &mut progress).await;
        return;
    }

    let started = Instant::now();
    let mut headers = delivery_headers(route, &msg, at, key.as_deref());
    border::tell_app(&mut headers, checked.as_deref());
    let span = shared.telemetry.message(&route.inbound, &msg.subject, msg.headers.as_ref(), Some(delivered));
    let result = span.scope(call_app(&shared, route, &msg, headers, &decoded, &abort)).await;
    m.duration.observe(started.elapsed().as_secs_f64());
    span.end(match &result {
        Some(r) => r.as_ref().map(|r| r.status).map_err(|e| e.to_string()),
        None => Err("abandoned at the drain deadline".to_owned()),
    });
    let Some(result) = result else {
        // Shutting down past the drain deadline: let another replica have it now. The
        // claim is not released but left to go stale: the app may still be running the
        // dropped request, and the immediate redelivery must not run the key beside it.
        drop(claimed);
        nak(&msg, None, &mut progress, route).await;
        return;
    };
    settle(&shared, &js, &msg, at, claimed, result, &mut progress).await;
}

/// What the idempotency gate decided for a delivery.
enum Gate {
    /// Call the app (holding the claim, when the route has idempotency and a key).
    Run(Option<Claimed>),
    /// Already settled here (replayed, in flight elsewhere, or unavailable at shutdown).
    Settled,
}

/// Claims the delivery's key, when it has one; settles the copies that must not run.
async fn gate(
    shared: &Shared,
    js: &ConsumerRoute,
    msg: &async_nats::jetstream::Message,
    at: Delivery<'_>,
    key: Option<&str>,
    abort: &CancellationToken,
    progress: &mut Progress,
) -> Gate {
    let route = &js.route;
    let m = &route.metrics;
    let (Some(g), Some(k)) = (route.idem.as_deref(), key) else { return Gate::Run(None) };
    match claim(js, g, k, &msg.payload, abort).await {
        Begin::Run(c) => return Gate::Run(Some(c)),
        reused @ (Begin::Replay(_) | Begin::Reused) => {
            // Handled before: the effect happened; just settle this copy. Another payload
            // under a done key (`Reused`) is settled the same way: on a jetstream route the
            // key decides what is a copy, as JetStream's own Nats-Msg-Id deduplication does,
            // and nothing stored is handed to anyone. (A `json:` key legitimately sees
            // copies whose other fields differ.) It is counted and logged.
            if matches!(reused, Begin::Reused) {
                tracing::warn!(route = %route.inbound.name, seq = at.seq, "idempotency key already done for a different payload; acked as a copy without calling the app");
            }
            progress.stop().await;
            match confirm(shared, msg, b"+ACK").await {
                Ok(()) => m.ack.inc(),
                Err(e) => {
                    tracing::warn!(route = %route.inbound.name, seq = at.seq, error = %e, "ack of an already handled message not confirmed")
                }
            }
        }
        Begin::InFlight { stale_in } => {
            // Another handler holds the key: its outcome decides whether this copy
            // runs. Come back no sooner than its claim would go stale: if that
            // handler is dead (a sidecar killed mid-call), the next delivery takes
            // the key over, instead of spending every remaining delivery on a claim
            // nobody will release and being dead-lettered without ever running.
            let delay = policy::backoff(&js.consumer.backoff, at.delivered).max(stale_in + CLAIM_STALE_MARGIN);
            nak(msg, Some(delay), progress, route).await;
        }
        Begin::Unavailable(_) => {
            // Only when shutting down past the drain deadline while the store was out.
            nak(msg, None, progress, route).await;
        }
    }
    Gate::Settled
}

/// Hands the message back to the server, for redelivery after `delay` (at once without
/// one), once its in-progress acks have stopped.
async fn nak(msg: &async_nats::jetstream::Message, delay: Option<Duration>, progress: &mut Progress, route: &Route) {
    progress.stop().await;
    let _ = msg.ack_with(AckKind::Nak(delay)).await;
    route.metrics.nak.inc();
}

/// Claims `key`; while the store cannot be used, keeps trying (the message stays ours
/// under in-progress acks) instead of naking, which would spend one of its deliveries per
/// try and dead-letter it unrun after a long store outage. `Unavailable` only on `abort`.
async fn claim(js: &ConsumerRoute, g: &guard::Guard, key: &str, payload: &[u8], abort: &CancellationToken) -> Begin {
    let mut attempt = 0;
    loop {
        match g.claim(key, payload).await {
            Begin::Unavailable(why) => {
                if attempt == 0 {
                    tracing::warn!(route = %js.route.inbound.name, error = %why, "idempotency store unavailable; holding the message until it is back");
                }
                if sleep_or_stop(abort, retry_delay(attempt)).await {
                    return Begin::Unavailable(why);
                }
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// The headers the app gets for a delivery: the message's (less what a publisher could
/// spoof), where it stands in its stream, and the idempotency `key`.
fn delivery_headers(route: &Route, msg: &async_nats::jetstream::Message, at: Delivery<'_>, key: Option<&str>) -> HeaderMap {
    let mut headers = msg.headers.as_ref().map(|h| codec::nats_to_http_headers(h, codec::SPOOFABLE)).unwrap_or_default();
    codec::strip_spoofable(&mut headers, route.inbound.trusts_forwarded());
    headers.insert(codec::http_names::BRIDGE_DELIVERY, HeaderValue::from(at.delivered));
    if let Ok(v) = HeaderValue::from_str(at.stream) {
        headers.insert(codec::http_names::BRIDGE_STREAM, v);
    }
    headers.insert(codec::http_names::BRIDGE_SEQ, HeaderValue::from(at.seq));
    if let Some(k) = key {
        guard::set_key_header(&mut headers, k);
    }
    headers
}

/// Calls the app with the delivery's `headers`; `None` when aborted.
async fn call_app(
    shared: &Shared,
    route: &Route,
    msg: &async_nats::jetstream::Message,
    mut headers: HeaderMap,
    decoded: &border::Decoded,
    abort: &CancellationToken,
) -> Option<Result<AppResponse, AppError>> {
    let path = route.inbound.path.render(msg.subject.as_str());
    let mut uri = String::with_capacity(route.base.len() + path.len());
    uri.push_str(&route.base);
    uri.push_str(&path);
    let body = decoded.app_request(&msg.payload, &mut headers);
    let call = shared.app.call(route.inbound.method.clone(), &uri, headers, body, route.inbound.timeout, route.inbound.max_body);
    tokio::select! {
        r = call => Some(r),
        _ = abort.cancelled() => None,
    }
}
