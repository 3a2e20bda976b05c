//! Ingress (NATS → HTTP): subscriptions and JetStream consumers that call the local app.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admin::Readiness;
use crate::config::Config;
use crate::metrics::Metrics;

/// What ingress needs from the sidecar.
pub struct Context {
    /// The config in force; a new value is sent on every accepted reload.
    pub config: watch::Receiver<Arc<Config>>,
    pub nats: async_nats::Client,
    pub metrics: Metrics,
    pub readiness: Arc<Readiness>,
}

/// Runs every inbound route until `shutdown`, then finishes or naks what is in flight.
pub async fn run(_cx: Context, shutdown: CancellationToken) {
    shutdown.cancelled().await;
}
