//! How full the dead-letter stream is: its stored messages and bytes against the limits
//! the server holds for it (`max_msgs`, `max_bytes`), as gauges. A full dead-letter stream
//! refuses new dead letters (`discard = "new"`), which are then retried and redelivered
//! instead of set aside, so it is worth an alert well before 1.
//!
//! The limits are read from the server, not the routing file: a stream provisioned by
//! another service, or changed by hand, is measured as it is.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, InboundMode};
use crate::metrics::Metrics;

/// How often the stream's state is read (one JetStream API call).
pub const INTERVAL: Duration = Duration::from_secs(15);

/// One reading of the dead-letter stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fill {
    pub messages: u64,
    pub bytes: u64,
    /// The stream's limits; zero or below: unlimited.
    pub max_messages: i64,
    pub max_bytes: i64,
}

impl Fill {
    /// Stored over limit, for each limit that is set: (messages, bytes).
    pub fn ratios(&self) -> (Option<f64>, Option<f64>) {
        let ratio = |stored: u64, max: i64| (max > 0).then(|| stored as f64 / max as f64);
        (ratio(self.messages, self.max_messages), ratio(self.bytes, self.max_bytes))
    }

    fn record(&self, metrics: &Metrics) {
        metrics.dlq_stored.with_label_values(&["messages"]).set(i64::try_from(self.messages).unwrap_or(i64::MAX));
        metrics.dlq_stored.with_label_values(&["bytes"]).set(i64::try_from(self.bytes).unwrap_or(i64::MAX));
        let (messages, bytes) = self.ratios();
        for (limit, ratio) in [("messages", messages), ("bytes", bytes)] {
            match ratio {
                Some(r) => metrics.dlq_fill_ratio.with_label_values(&[limit]).set(r),
                // No limit: no ratio series, rather than a misleading 0.
                None => drop(metrics.dlq_fill_ratio.remove_label_values(&[limit])),
            }
        }
    }
}

/// Reads the dead-letter stream every [`INTERVAL`] (and at once after a reload) while
/// connected, when some route dead-letters, until `shutdown`.
pub fn spawn(
    nats: async_nats::Client,
    mut config: watch::Receiver<Arc<Config>>,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let js = crate::nats::connection::jetstream(nats.clone());
        loop {
            let current = config.borrow_and_update().clone();
            // Every jetstream route dead-letters; without one, no gauge.
            let used = current.inbound.iter().any(|r| matches!(r.mode, InboundMode::JetStream(_)));
            let mut wait = INTERVAL;
            if used {
                // Not read yet (disconnected, or the read failed): try again soon.
                wait = Duration::from_secs(1);
                if crate::nats::connection::is_connected(&nats) {
                    match read(&js, &current.dead_letter.stream).await {
                        Ok(Some(fill)) => {
                            fill.record(&metrics);
                            wait = INTERVAL;
                        }
                        // Readiness names a missing stream; provisioning may create it.
                        Ok(None) => wait = INTERVAL,
                        Err(e) => tracing::debug!(error = %e, "cannot read the dead-letter stream's state"),
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                r = config.changed() => if r.is_err() { return },
            }
        }
    })
}

/// The stream's state and limits; `None` when it does not exist (readiness says so).
async fn read(js: &async_nats::jetstream::Context, stream: &str) -> Result<Option<Fill>, async_nats::Error> {
    use async_nats::jetstream::{context::GetStreamErrorKind as K, ErrorCode};
    let mut s = match js.get_stream(stream).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), K::JetStream(err) if err.error_code() == ErrorCode::STREAM_NOT_FOUND) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let info = s.info().await?;
    Ok(Some(Fill {
        messages: info.state.messages,
        bytes: info.state.bytes,
        max_messages: info.config.max_messages,
        max_bytes: info.config.max_bytes,
    }))
}

#[cfg(test)]
mod tests {
    use super::Fill;

    #[test]
    fn ratios_only_for_the_limits_that_are_set() {
        let f = Fill { messages: 5, bytes: 250, max_messages: 10, max_bytes: 1000 };
        assert_eq!(f.ratios(), (Some(0.5), Some(0.25)));
        let f = Fill { messages: 5, bytes: 250, max_messages: -1, max_bytes: 0 };
        assert_eq!(f.ratios(), (None, None));
    }
}
