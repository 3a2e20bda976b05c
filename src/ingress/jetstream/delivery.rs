//! One delivery's state while it is handled and settled: where it stands in its stream,
//! and the in-progress acks that keep it ours until the final ack, nak or term.

use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::ingress::{sleep_or_stop, Shared};

/// In-progress acks for one delivery, sent until it is settled: the claim, the app call,
/// the store write, the dead letter and the confirm all run under them, so none of those
/// can outlast `ack_wait` and have the server redeliver a message we are about to settle.
pub(super) struct Progress {
    done: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    pub(super) fn start(shared: &Shared, every: Duration, msg: &async_nats::jetstream::Message) -> Self {
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
    pub(super) async fn stop(&mut self) {
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

/// Where a delivery stands: its stream, sequence and delivery count, and when the stream
/// stored the message (ns since the epoch; it tells a recreated stream's message from an
/// earlier one with the same sequence).
#[derive(Clone, Copy)]
pub(super) struct Delivery<'a> {
    pub(super) stream: &'a str,
    pub(super) seq: u64,
    pub(super) delivered: u64,
    pub(super) stored: u64,
}
