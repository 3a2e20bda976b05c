//! A changed request or tunnel route keeps its subscription across a reload: the old task
//! hands it to the new one instead of unsubscribing.
//!
//! Unsubscribing is not safe against requests in flight: async-nats 0.51's
//! `Subscriber::drain` forgets the subscription once it has written the UNSUB, not when the
//! server confirms it, so a request the server routed to it just before is dropped by the
//! client and its caller waits out its timeout. And between the old UNSUB and the new SUB,
//! callers would get "no responders". When the subject and queue group are unchanged there
//! is nothing to unsubscribe: the new task reads on from the same subscription, and what
//! the old one had already read it still answers, under its own settings.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

/// How long a new task waits for the old one to hand over its subscription before it
/// subscribes itself (the old one hands over as soon as it sees its stop).
const WAIT: Duration = Duration::from_secs(5);

/// The subscription passing from a route's old task to its new one.
#[derive(Default)]
pub(crate) struct Handoff {
    sub: Mutex<Option<async_nats::Subscriber>>,
    /// Set once the old task has given what it has (possibly nothing).
    given: watch::Sender<bool>,
}

impl Handoff {
    /// The old task's side: its subscription, or `None` when it had none (it was paused).
    pub fn give(&self, sub: Option<async_nats::Subscriber>) {
        *self.sub.lock().unwrap_or_else(PoisonError::into_inner) = sub;
        self.given.send_replace(true);
    }

    /// The new task's side: the old subscription once given; `None` when there was none, or
    /// none came in time (then it subscribes itself).
    pub async fn take(&self) -> Option<async_nats::Subscriber> {
        let mut given = self.given.subscribe();
        if tokio::time::timeout(WAIT, given.wait_for(|g| *g)).await.is_err() {
            tracing::warn!("the route's old task did not hand over its subscription; subscribing anew");
        }
        self.sub.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}
