//! The stop: one `drain_timeout` from the signal, shared by every step in order (ingress,
//! then egress, then the NATS flush alongside the last span export), with the last part
//! kept for the flushes. Its own module
//! so that the wiring (`sidecar`) and the routes that size their handlers' share (`ingress`)
//! both read it, neither from the other.

use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::nats::connection;

/// The stop's budget: `drain_timeout` from the signal, of which the last part is kept for
/// the NATS flush, so a slow handler cannot take it.
pub(crate) struct Drain {
    pub(crate) started: Instant,
    /// Ingress, reload, provisioning and egress are done by then, or abandoned.
    pub(crate) work: Instant,
    /// The NATS flush and the span export are done by then, or abandoned.
    pub(crate) end: Instant,
}

impl Drain {
    pub(crate) fn new(drain_timeout: Duration) -> Self {
        let started = Instant::now();
        let end = started + drain_timeout;
        Self { started, work: end - flush_reserve(drain_timeout), end }
    }

    /// Waits for `task` until `by`; past it, aborts the task (what it held is redelivered
    /// or retried by its sender) and says so. `None` when it did not finish.
    pub(crate) async fn finish<T>(&self, what: &str, mut task: JoinHandle<T>, by: Instant) -> Option<Result<T, tokio::task::JoinError>> {
        match tokio::time::timeout_at(by.into(), &mut task).await {
            Ok(r) => {
                tracing::info!(took = ?self.started.elapsed(), "{what} stopped");
                Some(r)
            }
            Err(_) => {
                tracing::warn!(budget = ?by - self.started, "{what} did not stop within the drain budget; abandoning it");
                task.abort();
                None
            }
        }
    }
}

/// How long a stopping inbound route lets its handlers run before it naks or abandons
/// them: short of the whole budget, so their naks and the NATS flush still fit in it.
pub fn handler_budget(drain_timeout: Duration) -> Duration {
    drain_timeout.saturating_sub(2 * flush_reserve(drain_timeout))
}

/// The part of `drain_timeout` kept for the last NATS flush.
pub fn flush_reserve(drain_timeout: Duration) -> Duration {
    (drain_timeout / 10).min(Duration::from_secs(1))
}

/// Flushes and drains the connection by `end`. A connection that is down has nothing to
/// flush to, and its drain would wait for a PONG that never comes: it is left as it is.
pub(crate) async fn drain_nats(nats: &async_nats::Client, end: Instant) {
    if !connection::is_connected(nats) {
        tracing::warn!("NATS is not connected: nothing to flush");
        return;
    }
    let flushed = tokio::time::timeout_at(end.into(), async {
        nats.flush().await.ok()?;
        nats.drain().await.ok()
    })
    .await;
    if !matches!(flushed, Ok(Some(()))) {
        tracing::warn!("NATS drain did not finish cleanly");
    }
}
