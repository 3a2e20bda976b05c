//! The pull loop: asks for exactly as many messages as there are free handler permits,
//! and hands each to its own handler task. A reconnect ends the batch in hand: a restarted
//! server (or another node of the cluster) knows nothing of its pull request, and
//! async-nats would otherwise wait `expires` + 5 s before the loop pulls again.

use std::sync::Arc;

use async_nats::jetstream::consumer::pull::Batch;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::message::AckKind;
use futures::{FutureExt, StreamExt};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{handle, ConsumerRoute, PULL_EXPIRES};
use crate::ingress::request::wait_in_flight;
use crate::ingress::{retry_delay, sleep_or_stop, Shared};

/// A pull request's messages, and the connects seen when it was sent.
struct Pulled {
    batch: Batch,
    /// Changes when the connection is made again: the request may be gone with the old one.
    connects: watch::Receiver<u64>,
}

/// How a batch ended.
enum BatchEnd {
    /// Drained, expired, or its connection gone: pull again.
    Done,
    /// The pull failed mid-batch: pull again (after the retry delay).
    Failed,
    /// `stop`: leave the loop.
    Stop,
}

/// The pull loop: one pull request at a time for as many messages as there are free
/// permits, each message handed to its own handler task.
pub(super) async fn pull(shared: &Arc<Shared>, js: &Arc<ConsumerRoute>, consumer: PullConsumer, stop: &CancellationToken) {
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
    loop {
        // Nor while the app is down (`app_health_path`): what it pulled would wait for it.
        if !shared.gate.wait_open(stop).await {
            break;
        }
        // A store that cannot be used would fail every claim: pull nothing until it can.
        if let Some(g) = &route.idem {
            if !g.wait_usable(stop).await {
                break;
            }
        }
        let Some(mut held) = free_permits(&permits, stop).await else { break };
        // Seen before the request is sent: a reconnect after it ends the batch.
        let mut connects = shared.connects.clone();
        connects.mark_unchanged();
        let batch = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            b = consumer.batch().max_messages(held.num_permits()).expires(PULL_EXPIRES).messages() => b,
        };
        let end = match batch {
            Ok(batch) => run_batch(shared, js, Pulled { batch, connects }, &mut held, &abort, stop, &mut errors).await,
            Err(e) => {
                pull_failed(js, &e.to_string(), errors);
                BatchEnd::Failed
            }
        };
        drop(held);
        match end {
            BatchEnd::Done => {}
            BatchEnd::Stop => break,
            BatchEnd::Failed => {
                errors += 1;
                if sleep_or_stop(stop, retry_delay(errors)).await {
                    break;
                }
            }
        }
    }
    let deadline = tokio::time::Instant::now() + route.drain_timeout;
    wait_in_flight(&permits, n, deadline, &abort).await;
}

/// Waits for one free permit, then takes every other free one too; `None` on `stop`.
async fn free_permits(permits: &Arc<Semaphore>, stop: &CancellationToken) -> Option<OwnedSemaphorePermit> {
    let mut held = tokio::select! {
        biased;
        _ = stop.cancelled() => return None,
        p = permits.clone().acquire_owned() => p.expect("never closed"),
    };
    let free = permits.available_permits();
    if free > 0 {
        if let Ok(more) = permits.clone().try_acquire_many_owned(free as u32) {
            held.merge(more);
        }
    }
    Some(held)
}

/// Hands each message of the pulled batch to a handler with one of the `held` permits.
async fn run_batch(
    shared: &Arc<Shared>,
    js: &Arc<ConsumerRoute>,
    pulled: Pulled,
    held: &mut OwnedSemaphorePermit,
    abort: &CancellationToken,
    stop: &CancellationToken,
    errors: &mut u32,
) -> BatchEnd {
    let route = &js.route;
    let Pulled { mut batch, mut connects } = pulled;
    // Reconnected: what has already arrived is handled, then the batch ends.
    let mut reconnected = false;
    loop {
        let next = if reconnected {
            match batch.next().now_or_never() {
                Some(m) => m,
                None => return BatchEnd::Done,
            }
        } else {
            tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    // Already here but not started: hand them back at once.
                    while let Some(Some(Ok(msg))) = batch.next().now_or_never() {
                        let _ = msg.ack_with(AckKind::Nak(None)).await;
                        route.metrics.nak.inc();
                    }
                    return BatchEnd::Stop;
                }
                m = batch.next() => m,
                Ok(()) = connects.changed() => {
                    tracing::debug!(route = %route.inbound.name, "reconnected to NATS; pulling again");
                    reconnected = true;
                    continue;
                }
            }
        };
        match next {
            None => return BatchEnd::Done,
            Some(Ok(msg)) => {
                *errors = 0;
                let Some(permit) = held.split(1) else {
                    // More than asked for: cannot happen, but never run past the bound.
                    let _ = msg.ack_with(AckKind::Nak(None)).await;
                    continue;
                };
                // Boxed, as ingress::request does, so tokio moves a pointer, not the future (5 KB in a debug build).
                tokio::spawn(Box::pin(handle::handle(shared.clone(), js.clone(), msg, permit, abort.clone())));
            }
            Some(Err(e)) => {
                // 409 consumer deleted, 503 no responders (consumer gone), …
                pull_failed(js, &e.to_string(), *errors);
                return BatchEnd::Failed;
            }
        }
    }
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
