//! `mode = "jetstream"`: a durable pull consumer whose messages become HTTP calls, each
//! ending in an ack, a delayed nak or a dead letter as [`outcome_for`](super::outcome_for) says.
//!
//! Two tasks per route:
//! - the pull loop asks for exactly as many messages as it has free handler permits, so
//!   nothing sits in a client buffer while its ack_wait runs out; it pauses while the
//!   route's idempotency store cannot be used;
//! - the watchdog reads the consumer's info (lag gauge, readiness) and recreates the
//!   consumer when it vanished (deleted, stream recreated, server restarted without it).
//!
//! The last delivery is the sidecar's to enforce, not the server's: the consumer's
//! `max_deliver` is unlimited, and a message delivered more often than the route's
//! `max_deliver` (its last delivery crashed, was stopped, or its dead letter failed) is
//! dead-lettered before the app is called. The server's MAX_DELIVERIES advisory path this
//! replaces is retired: with no server-side limit it never fires, and an advisory is a
//! plain NATS message anyone allowed to publish on `$JS.EVENT.>` could forge.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::consumer::{pull, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::stream::Stream as JsStream;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use http::HeaderValue;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::idempotency::guard::{self, Begin};
use super::policy::{self, Attempt, Outcome, Policy};
use super::request::wait_in_flight;
use super::{retry_delay, sleep_or_stop, AppError, InFlight, Route, Shared};
use crate::codec;
use crate::config::Consumer;
use crate::dlq::{self, Reason};
use crate::ingress::idempotency::guard::Claimed;
use crate::provision;

/// How long one pull request waits on the server for messages.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// How often the watchdog reads the consumer's info.
const WATCHDOG_EVERY: Duration = Duration::from_secs(2);
/// Deadline for the server to confirm an ack or term, and for a dead letter's PubAck.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// A copy whose key another handler holds is redelivered this long after that claim
/// would go stale, so the redelivery finds it stale if its holder died.
const CLAIM_STALE_MARGIN: Duration = Duration::from_millis(250);

/// The route's state shared by its tasks and handlers.
struct ConsumerRoute {
    route: Arc<Route>,
    /// Its `max_deliver` is the route's, enforced here (the server's is unlimited).
    consumer: Consumer,
    /// In-progress acks go out this often until a message is settled.
    progress_every: Duration,
    dlq: dlq::Publisher,
    dlq_counters: dlq::Counters,
    /// The pull loop saw an error: the watchdog should look now.
    check_now: Notify,
}

pub(crate) async fn run(shared: Arc<Shared>, route: Arc<Route>, consumer: Consumer, stop: CancellationToken) {
    let name = route.inbound.name.clone();
    let stream = match shared.js.get_stream_no_info(&consumer.stream).await {
        Ok(s) => s,
        Err(e) => {
            // Only an invalid name fails here, which config validation rules out.
            shared.readiness.fail(&route.check, format!("stream {:?}: {e}", consumer.stream));
            return;
        }
    };
    let Some(bound) = bind(&shared, &route, &consumer, &stream, &stop).await else { return };
    let info = bound.cached_info().config.clone();
    if info.filter_subject != route.inbound.subject.as_str() {
        tracing::warn!(
            route = %name,
            durable = %consumer.durable,
            filter = %info.filter_subject,
            "the existing consumer differs from the route; run `natsbridge provision` to update it"
        );
    }
    let shortest_wait = [consumer.ack_wait, info.ack_wait]
        .into_iter()
        .chain(consumer.backoff.iter().copied())
        .chain(info.backoff.iter().copied())
        .min()
        .unwrap_or(consumer.ack_wait);
    let js = Arc::new(ConsumerRoute {
        // With a backoff list the server's ack wait per delivery follows it; pace progress
        // acks by the shortest wait there is, twice per wait.
        progress_every: (shortest_wait / 2).max(Duration::from_millis(50)),
        dlq: dlq::Publisher::new(shared.replies.clone(), CONFIRM_TIMEOUT),
        dlq_counters: dlq::Counters::new(&shared.metrics, &name),
        check_now: Notify::new(),
        consumer,
        route,
    });
    let watchdog = tokio::spawn(watchdog(shared.clone(), js.clone(), stream, stop.clone()));
    pull(&shared, &js, bound, &stop).await;
    // It only reads the consumer, or recreates a vanished one (the next start does that
    // too): a stop need not wait for its JetStream calls, each up to their timeout.
    watchdog.abort();
    let _ = watchdog.await;
}

/// Binds the durable, creating it from the route when missing; retries (not ready) until
/// it exists or `stop`.
async fn bind(shared: &Shared, route: &Route, c: &Consumer, stream: &JsStream<()>, stop: &CancellationToken) -> Option<PullConsumer> {
    let mut attempt = 0;
    let mut last_why = String::new();
    loop {
        // Each JetStream API call may wait its whole timeout while NATS is away: a stop
        // must not wait for it.
        let ensured = tokio::select! {
            _ = stop.cancelled() => return None,
            r = ensure_consumer(stream, route, c, None) => r,
        };
        match ensured {
            Ok(consumer) => {
                shared.readiness.pass(&route.check);
                tracing::info!(route = %route.inbound.name, stream = %c.stream, durable = %c.durable, "inbound consumer bound");
                return Some(consumer);
            }
            Err(why) => {
                if why != last_why {
                    tracing::warn!(route = %route.inbound.name, "{why}; retrying");
                }
                shared.readiness.fail(&route.check, why.clone());
                last_why = why;
            }
        }
        if sleep_or_stop(stop, retry_delay(attempt)).await {
            return None;
        }
        attempt += 1;
    }
}

/// The consumer, created when missing (from `start`, when given, else from the start of
/// the stream). The error says exactly what is missing.
async fn ensure_consumer(stream: &JsStream<()>, route: &Route, c: &Consumer, start: Option<u64>) -> Result<PullConsumer, String> {
    match stream.consumer_info(&c.durable).await {
        Ok(info) => {
            if info.config.max_deliver > 0 {
                unlimit_deliveries(stream, c, info.config.clone()).await;
            }
            stream.get_consumer(&c.durable).await.map_err(|e| format!("consumer {:?} on stream {:?}: {e}", c.durable, c.stream))
        }
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
            let mut config: pull::Config = provision::consumer_config(&route.inbound, c);
            if let Some(seq) = start {
                config.deliver_policy = DeliverPolicy::ByStartSequence { start_sequence: seq };
            }
            stream
                .create_consumer(config)
                .await
                .map_err(|e| format!("cannot create consumer {:?} on stream {:?}: {e}", c.durable, c.stream))
        }
        Err(e) if e.kind() == ConsumerInfoErrorKind::StreamNotFound => Err(format!("stream {:?} not found", c.stream)),
        Err(e) => Err(format!("consumer {:?} on stream {:?}: {e}", c.durable, c.stream)),
    }
}

/// Lifts a server-side `max_deliver` left by an older provisioning: with it, a message
/// whose last delivery was lost (a crash, a nak at shutdown) would stop being delivered
/// with nobody left to dead-letter it.
async fn unlimit_deliveries(stream: &JsStream<()>, c: &Consumer, mut config: async_nats::jetstream::consumer::Config) {
    config.max_deliver = -1;
    match stream.update_consumer(config).await {
        Ok(_) => tracing::info!(durable = %c.durable, "consumer max_deliver set to unlimited; the sidecar enforces the route's"),
        Err(e) => tracing::warn!(
            durable = %c.durable,
            error = %e,
            "cannot make the consumer's max_deliver unlimited; run `natsbridge provision`: until then a message whose last delivery is lost stays undelivered"
        ),
    }
}

/// The pull loop: one pull request at a time for as many messages as there are free
/// permits, each message handed to its own handler task.
async fn pull(shared: &Arc<Shared>, js: &Arc<ConsumerRoute>, consumer: PullConsumer, stop: &CancellationToken) {
    let route = &js.route;
    // Never pull without protection: each delivery naked for an unbound store would spend
    // one of the message's deliveries. (Readiness names the store meanwhile.)
    if let Some(g) = &route.idem {
        if !g.wait_open(stop).await {
            return;
        }
    }
    let n = route.inbound.concurrency;
    let permits = Arc::new(Semaphore::new(n));
    let abort = CancellationToken::new();
    let mut errors = 0u32;
    'pull: loop {
        // Nor while the app is down: what it pulled would wait for it anyway.
        if !shared.gate.wait_open(stop).await {
            break;
        }
        // A store that cannot be used would fail every claim: pull nothing until it can.
        if let Some(g) = &route.idem {
            if !g.wait_usable(stop).await {
                break;
            }
        }
        let mut held = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            p = permits.clone().acquire_owned() => p.expect("never closed"),
        };
        let free = permits.available_permits();
        if free > 0 {
            if let Ok(more) = permits.clone().try_acquire_many_owned(free as u32) {
                held.merge(more);
            }
        }
        let batch = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            b = consumer.batch().max_messages(held.num_permits()).expires(PULL_EXPIRES).messages() => b,
        };
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                pull_failed(js, &e.to_string(), errors);
                errors += 1;
                drop(held);
                if sleep_or_stop(stop, retry_delay(errors)).await {
                    break;
                }
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    // Already here but not started: hand them back at once.
                    while let Some(Some(Ok(msg))) = batch.next().now_or_never() {
                        let _ = msg.ack_with(AckKind::Nak(None)).await;
                        route.metrics.nak.inc();
                    }
                    break 'pull;
                }
                m = batch.next() => m,
            };
            match next {
                None => break,
                Some(Ok(msg)) => {
                    errors = 0;
                    let Some(permit) = held.split(1) else {
                        // More than asked for: cannot happen, but never run past the bound.
                        let _ = msg.ack_with(AckKind::Nak(None)).await;
                        continue;
                    };
                    tokio::spawn(handle(shared.clone(), js.clone(), msg, permit, abort.clone()));
                }
                Some(Err(e)) => {
                    // 409 consumer deleted, 503 no responders (consumer gone), …
                    pull_failed(js, &e.to_string(), errors);
                    errors += 1;
                    if sleep_or_stop(stop, retry_delay(errors)).await {
                        break 'pull;
                    }
                    break;
                }
            }
        }
    }
    let deadline = tokio::time::Instant::now() + route.drain_timeout;
    wait_in_flight(&permits, n, deadline, &abort).await;
}

fn pull_failed(js: &ConsumerRoute, error: &str, errors: u32) {
    // The first failure of a run is news; the retries of the same outage are not.
    if errors == 0 {
        tracing::warn!(route = %js.route.inbound.name, durable = %js.consumer.durable, error, "pull failed; checking the consumer");
    } else {
        tracing::debug!(route = %js.route.inbound.name, error, "pull failed again");
    }
    js.check_now.notify_one();
}

/// Reads the consumer's info every [`WATCHDOG_EVERY`] (or when the pull loop asks):
/// updates the lag gauge and readiness, and recreates a vanished consumer from where
/// its acks had got to, so the app does not see the whole stream again.
async fn watchdog(shared: Arc<Shared>, js: Arc<ConsumerRoute>, stream: JsStream<()>, stop: CancellationToken) {
    let route = &js.route;
    let c = &js.consumer;
    // (stream first seq seen, ack floor) of the last healthy look.
    let mut floor: Option<u64> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(WATCHDOG_EVERY) => {}
            _ = js.check_now.notified() => {}
        }
        match stream.consumer_info(&c.durable).await {
            Ok(info) => {
                route.metrics.pending.set(i64::try_from(info.num_pending).unwrap_or(i64::MAX));
                floor = Some(info.ack_floor.stream_sequence);
                shared.readiness.pass(&route.check);
            }
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
                shared.readiness.fail(&route.check, format!("consumer {:?} on stream {:?} vanished; recreating it", c.durable, c.stream));
                let start = resume_point(&stream, floor).await;
                match ensure_consumer(&stream, route, c, start).await {
                    Ok(_) => {
                        tracing::warn!(route = %route.inbound.name, durable = %c.durable, start = ?start, "consumer vanished; recreated it");
                        shared.readiness.pass(&route.check);
                    }
                    Err(why) => {
                        tracing::warn!(route = %route.inbound.name, "{why}");
                        shared.readiness.fail(&route.check, why);
                    }
                }
            }
            Err(e) if e.kind() == ConsumerInfoErrorKind::StreamNotFound => {
                // A stream created again numbers its messages anew: forget where we were.
                floor = None;
                shared.readiness.fail(&route.check, format!("stream {:?} not found", c.stream));
            }
            // NATS down or JetStream busy: the connection check already says so.
            Err(e) => tracing::debug!(route = %route.inbound.name, error = %e, "consumer info failed"),
        }
    }
}

/// Where a recreated consumer starts: after its old ack floor when the stream still
/// holds that sequence (same stream), else from the beginning (a new stream).
async fn resume_point(stream: &JsStream<()>, floor: Option<u64>) -> Option<u64> {
    let floor = floor.filter(|f| *f > 0)?;
    let info = stream.get_info().await.ok()?;
    (info.state.last_sequence >= floor).then_some(floor + 1)
}

/// In-progress acks for one delivery, sent until it is settled: the claim, the app call,
/// the store write, the dead letter and the confirm all run under them, so none of those
/// can outlast `ack_wait` and have the server redeliver a message we are about to settle.
struct Progress {
    done: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    fn start(shared: &Shared, every: Duration, msg: &async_nats::jetstream::Message) -> Self {
        let done = CancellationToken::new();
        let task = msg.reply.clone().map(|reply| {
            let (nats, done) = (shared.nats.clone(), done.clone());
            tokio::spawn(async move {
                while !sleep_or_stop(&done, every).await {
                    if let Err(e) = nats.publish(reply.clone(), Bytes::from_static(b"+WPI")).await {
                        tracing::debug!(error = %e, "in-progress ack failed");
                    }
                }
            })
        });
        Self { done, task }
    }

    /// Stops before the final ack, nak or term, so no progress ack follows it (one after a
    /// delayed nak would push the redelivery out to a whole ack_wait).
    async fn stop(&mut self) {
        self.done.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.done.cancel();
    }
}

/// Where a delivery stands: its stream, sequence and delivery count.
#[derive(Clone, Copy)]
struct Delivery<'a> {
    stream: &'a str,
    seq: u64,
    delivered: u64,
}

async fn handle(
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
    let (stream, seq, delivered) = match msg.info() {
        Ok(i) => (i.stream.to_owned(), i.stream_sequence, i.delivered.max(1) as u64),
        Err(e) => {
            tracing::warn!(route = %route.inbound.name, error = %e, "not a JetStream delivery; ignored");
            return;
        }
    };
    let at = Delivery { stream: &stream, seq, delivered };
    let mut progress = Progress::start(&shared, js.progress_every, &msg);
    // The app is down (`app_health_path`): hold the message under in-progress acks until it
    // is back, rather than spend one of its deliveries on an app that cannot take it.
    if !shared.gate.wait_open(&abort).await {
        progress.stop().await;
        let _ = msg.ack_with(AckKind::Nak(None)).await;
        m.nak.inc();
        return;
    }

    // Idempotency: claim the key before calling the app.
    let idem = route.idem.as_deref();
    let key = idem.and_then(|g| g.key(msg.headers.as_ref(), &msg.payload));
    let mut claimed = None;
    if let (Some(g), Some(k)) = (idem, key.as_deref()) {
        match claim(&js, g, k, &abort).await {
            Begin::Run(c) => claimed = Some(c),
            Begin::Replay(_) => {
                // Handled before: the effect happened; just settle this copy.
                progress.stop().await;
                match confirm(&shared, &msg, b"+ACK").await {
                    Ok(()) => m.ack.inc(),
                    Err(e) => {
                        tracing::warn!(route = %route.inbound.name, seq, error = %e, "ack of an already handled message not confirmed")
                    }
                }
                return;
            }
            Begin::InFlight { stale_in } => {
                // Another handler holds the key: its outcome decides whether this copy
                // runs. Come back no sooner than its claim would go stale: if that
                // handler is dead (a sidecar killed mid-call), the next delivery takes
                // the key over, instead of spending every remaining delivery on a claim
                // nobody will release and being dead-lettered without ever running.
                let delay = policy::backoff(&js.consumer.backoff, delivered).max(stale_in + CLAIM_STALE_MARGIN);
                progress.stop().await;
                let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
                m.nak.inc();
                return;
            }
            Begin::Unavailable(_) => {
                // Only when shutting down past the drain deadline while the store was out.
                progress.stop().await;
                let _ = msg.ack_with(AckKind::Nak(None)).await;
                m.nak.inc();
                return;
            }
        }
    }

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
    let result = call_app(&shared, route, &msg, at, key.as_deref(), &abort).await;
    m.duration.observe(started.elapsed().as_secs_f64());
    let Some(result) = result else {
        // Shutting down past the drain deadline: let another replica have it now. The
        // claim is not released but left to go stale: the app may still be running the
        // dropped request, and the immediate redelivery must not run the key beside it.
        drop(claimed);
        progress.stop().await;
        let _ = msg.ack_with(AckKind::Nak(None)).await;
        m.nak.inc();
        return;
    };
    settle(&shared, &js, &msg, at, claimed, result, &mut progress).await;
}

/// Claims `key`; while the store cannot be used, keeps trying (the message stays ours
/// under in-progress acks) instead of naking, which would spend one of its deliveries per
/// try and dead-letter it unrun after a long store outage. `Unavailable` only on `abort`.
async fn claim(js: &ConsumerRoute, g: &guard::Guard, key: &str, abort: &CancellationToken) -> Begin {
    let mut attempt = 0;
    loop {
        match g.claim(key).await {
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

/// Calls the app with the delivery's headers; `None` when aborted.
async fn call_app(
    shared: &Shared,
    route: &Route,
    msg: &async_nats::jetstream::Message,
    at: Delivery<'_>,
    key: Option<&str>,
    abort: &CancellationToken,
) -> Option<Result<super::AppResponse, AppError>> {
    let mut headers = msg.headers.as_ref().map(|h| codec::nats_to_http_headers(h, codec::SPOOFABLE)).unwrap_or_default();
    codec::strip_spoofable(&mut headers, route.inbound.trusts_forwarded());
    headers.insert(codec::BRIDGE_DELIVERY, HeaderValue::from(at.delivered));
    if let Ok(v) = HeaderValue::from_str(at.stream) {
        headers.insert(codec::BRIDGE_STREAM, v);
    }
    headers.insert(codec::BRIDGE_SEQ, HeaderValue::from(at.seq));
    if let Some(k) = key {
        guard::set_key_header(&mut headers, k);
    }
    let path = route.inbound.path.render(msg.subject.as_str());
    let mut uri = String::with_capacity(route.base.len() + path.len());
    uri.push_str(&route.base);
    uri.push_str(&path);
    let call =
        shared.app.call(route.inbound.method.clone(), &uri, headers, msg.payload.clone(), route.inbound.timeout, route.inbound.max_body);
    tokio::select! {
        r = call => Some(r),
        _ = abort.cancelled() => None,
    }
}

/// Ends a delivery whose app call returned, as [`outcome_for`](policy::outcome_for) says.
async fn settle(
    shared: &Shared,
    js: &ConsumerRoute,
    msg: &async_nats::jetstream::Message,
    at: Delivery<'_>,
    claimed: Option<Claimed>,
    result: Result<super::AppResponse, AppError>,
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
            tracing::warn!(route = %route.inbound.name, seq, error = %e, ?outcome, "idempotency store not updated");
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
async fn dead_letter_then_term(
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
    let headers = dlq::headers(original, origin, failure, SystemTime::now());
    match js.dlq.publish(&js.consumer.dead_letter, headers, payload).await {
        Ok(ack) if ack.duplicate => {
            // Its Nats-Msg-Id is ours alone (`<stream>.<durable>.<seq>`): a duplicate means
            // an earlier attempt of ours stored it (its term was lost). Not counted twice.
            tracing::info!(route = origin.route, stream = origin.stream, seq = origin.seq, "already dead-lettered");
            true
        }
        Ok(_) => {
            js.dlq_counters.inc(failure.reason);
            js.route.metrics.dlq.inc();
            tracing::info!(route = origin.route, stream = origin.stream, seq = origin.seq, reason = %failure.reason, status = ?failure.status, deliveries = origin.deliveries, "dead-lettered");
            true
        }
        Err(e) => {
            tracing::error!(route = origin.route, stream = origin.stream, seq = origin.seq, error = %e, "dead-letter publish failed");
            false
        }
    }
}

/// Ack or term and wait for the server to confirm it (a double ack), over the client's
/// shared reply subscription rather than a new subscription per message.
async fn confirm(shared: &Shared, msg: &async_nats::jetstream::Message, kind: &'static [u8]) -> Result<(), String> {
    let reply = msg.reply.clone().ok_or("no reply subject")?;
    let req = async_nats::client::Request::new().payload(Bytes::from_static(kind)).timeout(Some(CONFIRM_TIMEOUT));
    shared.nats.send_request(reply, req).await.map(|_| ()).map_err(|e| e.to_string())
}
