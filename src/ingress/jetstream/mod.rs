//! `mode = "jetstream"`: a durable pull consumer whose messages become HTTP calls, each
//! ending in an ack, a delayed nak or a dead letter as [`outcome_for`](crate::ingress::policy::outcome_for) says.
//!
//! The parts: [`pull`] (the pull loop), [`handle`] (one delivery: claim, app call),
//! [`delivery`] (where a delivery stands, its in-progress acks),
//! [`settle`] (ack, nak, dead letter). Two tasks per route:
//! - the pull loop asks for exactly as many messages as it has free handler permits, so
//!   nothing sits in a client buffer while its ack_wait runs out; it pauses while the
//!   route's idempotency store cannot be used;
//! - the watchdog reads the consumer's info (lag gauge, readiness) and recreates the
//!   consumer when it vanished (deleted, stream recreated, server restarted without it);
//!   it keeps the ack floor it reads in [`floors`], where a bind that finds the durable
//!   missing resumes from.
//!
//! The last delivery is the sidecar's to enforce, not the server's: the consumer's
//! `max_deliver` is unlimited, and a message delivered more often than the route's
//! `max_deliver` (its last delivery crashed, was stopped, or its dead letter failed) is
//! dead-lettered before the app is called. The server's MAX_DELIVERIES advisory path this
//! replaces is retired: with no server-side limit it never fires, and an advisory is a
//! plain NATS message anyone allowed to publish on `$JS.EVENT.>` could forge.

mod delivery;
mod floors;
mod handle;
mod pull;
mod settle;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull as js_pull, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::stream::Stream as JsStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{retry_delay, sleep_or_stop, Route, Shared};
use crate::config::Consumer;
use crate::dlq;
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
    /// `natsbridge_dlq_too_large_total` of this route.
    dlq_too_large: prometheus::IntCounter,
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
    let floors = floors::Floors::new(shared.js.clone(), &consumer.stream, &consumer.durable, &name);
    floors.create_in_background();
    let Some(bound) = bind(&shared, &route, &consumer, &stream, &floors, &stop).await else { return };
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
        dlq_too_large: shared.metrics.dlq_too_large.with_label_values(&[&name]),
        check_now: Notify::new(),
        consumer,
        route,
    });
    let watchdog = tokio::spawn(watchdog(shared.clone(), js.clone(), stream, floors, stop.clone()));
    pull::pull(&shared, &js, bound, &stop).await;
    // It only reads the consumer, or recreates a vanished one (the next start does that
    // too): a stop need not wait for its JetStream calls, each up to their timeout.
    watchdog.abort();
    let _ = watchdog.await;
}

/// Binds the durable, creating it from the route when missing; retries (not ready) until
/// it exists or `stop`.
async fn bind(
    shared: &Shared,
    route: &Route,
    c: &Consumer,
    stream: &JsStream<()>,
    floors: &floors::Floors,
    stop: &CancellationToken,
) -> Option<PullConsumer> {
    let mut attempt = 0;
    let mut last_why = String::new();
    loop {
        // Each JetStream API call may wait its whole timeout while NATS is away: a stop
        // must not wait for it.
        let ensured = tokio::select! {
            _ = stop.cancelled() => return None,
            r = ensure_consumer(stream, route, c, Start::Kept(floors)) => r,
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

/// Where a consumer that is created starts.
enum Start<'a> {
    /// After the floor a running watchdog last read (`ByStartSequence`).
    At(u64),
    /// After the floor kept for the durable, if any; else the route's `deliver`.
    Kept(&'a floors::Floors),
}

/// The consumer, created when missing (from `start`). The error says exactly what is
/// missing.
async fn ensure_consumer(stream: &JsStream<()>, route: &Route, c: &Consumer, start: Start<'_>) -> Result<PullConsumer, String> {
    match stream.consumer_info(&c.durable).await {
        Ok(info) => {
            if info.config.max_deliver > 0 {
                unlimit_deliveries(stream, c, info.config.clone()).await;
            }
            stream.get_consumer(&c.durable).await.map_err(|e| format!("consumer {:?} on stream {:?}: {e}", c.durable, c.stream))
        }
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
            let mut config: js_pull::Config = provision::consumer_config(&route.inbound, c);
            let info = stream.get_info().await;
            if let Ok(info) = &info {
                provision::fit_to_stream(&mut config, info.config.retention);
            }
            let start = match start {
                Start::At(seq) => Some(seq),
                Start::Kept(floors) => match floors.read().await.map_err(|e| format!("consumer {:?} is missing; {e}", c.durable))? {
                    None => None,
                    Some(record) => {
                        // A durable that existed: never guess where it was.
                        let info = info.map_err(|e| {
                            format!("consumer {:?} is missing and stream {:?} cannot say where it had got to: {e}", c.durable, c.stream)
                        })?;
                        let start = floors::start_after(Some(record), info.created.unix_timestamp_nanos(), info.state.last_sequence);
                        tracing::warn!(route = %route.inbound.name, durable = %c.durable, floor = record.seq, start = ?start, "the durable is missing; recreating it from the floor kept for it");
                        start
                    }
                },
            };
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

/// Reads the consumer's info every [`WATCHDOG_EVERY`] (or when the pull loop asks):
/// updates the lag gauge and readiness, and recreates a vanished consumer from where
/// its acks had got to, so the app does not see the whole stream again.
async fn watchdog(shared: Arc<Shared>, js: Arc<ConsumerRoute>, stream: JsStream<()>, floors: floors::Floors, stop: CancellationToken) {
    let route = &js.route;
    let c = &js.consumer;
    // Where the last healthy look left the consumer: its ack floor, and which stream (by
    // creation time) that floor counts in.
    let mut at: Option<Floor> = None;
    // The stream's creation time, read before a consumer info whose floor is taken: a
    // consumer that exists after it was read belongs to that stream or a later one, so a
    // recreation in between can only make the next comparison replay, never skip.
    let mut created: Option<i128> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(WATCHDOG_EVERY) => {}
            _ = js.check_now.notified() => {}
        }
        if created.is_none() {
            // One stream info per binding, not per tick. If it fails, this tick's floor is
            // not kept (a vanished consumer then starts from the stream's first message).
            created = stream.get_info().await.ok().map(|i| i.created.unix_timestamp_nanos());
        }
        match stream.consumer_info(&c.durable).await {
            Ok(info) => {
                route.metrics.pending.set(i64::try_from(info.num_pending).unwrap_or(i64::MAX));
                route.metrics.ack_floor.set(i64::try_from(info.ack_floor.stream_sequence).unwrap_or(i64::MAX));
                at = created.map(|created| Floor { seq: info.ack_floor.stream_sequence, created });
                shared.readiness.pass(&route.check);
                if let Some(at) = at {
                    let stream_created_ns = i64::try_from(at.created).unwrap_or(i64::MAX);
                    floors.write(floors::Record { seq: at.seq, stream_created_ns }).await;
                }
            }
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
                shared.readiness.fail(&route.check, format!("consumer {:?} on stream {:?} vanished; recreating it", c.durable, c.stream));
                // Unknown floor, or a stream other than the floor's: from its first
                // message, not the route's `deliver` (new only), which would skip what the
                // new stream holds. A stream that cannot say which it is is asked again at
                // the next tick: guessing "new stream" would replay all of it to the app.
                let last = match at {
                    Some(at) => Some(at),
                    // No look yet since the bind: the floor kept for the durable, if any.
                    None => floors.read().await.ok().flatten().map(Floor::from),
                };
                let (start, now) = match resume_point(&stream, last).await {
                    Ok(found) => found,
                    Err(e) => {
                        tracing::warn!(route = %route.inbound.name, error = %e, "consumer vanished; its stream's info failed, so it is recreated at the next check");
                        continue;
                    }
                };
                let start = start.unwrap_or(1);
                match ensure_consumer(&stream, route, c, Start::At(start)).await {
                    Ok(_) => {
                        tracing::warn!(route = %route.inbound.name, durable = %c.durable, start = ?start, "consumer vanished; recreated it");
                        shared.readiness.pass(&route.check);
                        // The new consumer counts in the stream just read.
                        created = Some(now);
                        at = None;
                    }
                    Err(why) => {
                        tracing::warn!(route = %route.inbound.name, "{why}");
                        shared.readiness.fail(&route.check, why);
                    }
                }
            }
            Err(e) if e.kind() == ConsumerInfoErrorKind::StreamNotFound => {
                // A stream created again numbers its messages anew: forget where we were.
                at = None;
                created = None;
                shared.readiness.fail(&route.check, format!("stream {:?} not found", c.stream));
            }
            // NATS down or JetStream busy: the connection check already says so.
            Err(e) => tracing::debug!(route = %route.inbound.name, error = %e, "consumer info failed"),
        }
    }
}

/// A consumer's ack floor, and the creation time of the stream it counts in (Unix ns).
#[derive(Clone, Copy, Debug)]
struct Floor {
    seq: u64,
    created: i128,
}

/// Where a recreated consumer starts: after its old ack floor when the stream is the one
/// that floor counts in (same creation time) and still holds that sequence, else from
/// the beginning (`None`). A stream deleted and created again between two looks may
/// already hold more messages than the old floor: its creation time, not its length,
/// tells it apart. Also returns the stream's creation time as read now. An error when the
/// stream's info could not be read: then nobody knows which it is.
async fn resume_point(
    stream: &JsStream<()>,
    at: Option<Floor>,
) -> Result<(Option<u64>, i128), async_nats::jetstream::context::RequestError> {
    let info = stream.get_info().await?;
    let created = info.created.unix_timestamp_nanos();
    Ok((resume_after(at, created, info.state.last_sequence), created))
}

/// The pure part of [`resume_point`].
fn resume_after(at: Option<Floor>, created: i128, last_sequence: u64) -> Option<u64> {
    let at = at.filter(|a| a.seq > 0 && a.created == created)?;
    (last_sequence >= at.seq).then_some(at.seq + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i128 = 1_700_000_000_000_000_000;

    #[test]
    fn the_same_stream_resumes_after_its_floor() {
        assert_eq!(resume_after(Some(Floor { seq: 5, created: T }), T, 9), Some(6));
        assert_eq!(resume_after(Some(Floor { seq: 5, created: T }), T, 5), Some(6));
    }

    #[test]
    fn a_stream_created_again_starts_from_its_first_message_however_long_it_is() {
        // Longer than the old floor already: its length alone would look like the same
        // stream and skip its first five messages.
        assert_eq!(resume_after(Some(Floor { seq: 5, created: T }), T + 1, 20), None);
        assert_eq!(resume_after(Some(Floor { seq: 5, created: T }), T + 1, 2), None);
    }

    #[test]
    fn a_stream_shorter_than_the_floor_or_no_floor_starts_from_the_beginning() {
        assert_eq!(resume_after(Some(Floor { seq: 5, created: T }), T, 4), None);
        assert_eq!(resume_after(Some(Floor { seq: 0, created: T }), T, 4), None);
        assert_eq!(resume_after(None, T, 4), None);
    }
}
