//! One running sidecar: wires the NATS connection, egress, ingress, admin and hot reload
//! together from things passed in (config, listeners, environment lookup, shutdown).

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Admin};
use crate::config::{Config, Overrides};
use crate::egress::routes::Routing;
use crate::egress::{self, Egress, Table};
use crate::health::{Component, Readiness};
use crate::ingress;
use crate::metrics::Metrics;
use crate::nats::connection;
use crate::nats::replies::Replies;
use crate::provision;
use crate::reload::Reloader;

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error(transparent)]
    Connect(#[from] connection::ConnectError),
    #[error("listener failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot subscribe to the reply inbox: {0}")]
    Replies(#[from] async_nats::SubscribeError),
}

/// Looks up an environment variable (for secrets named in the routing file).
pub type Env = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Everything a sidecar needs from its host process.
pub struct Parts {
    pub config: Config,
    /// Re-applied on every reload.
    pub overrides: Overrides,
    pub egress: TcpListener,
    pub admin: TcpListener,
    pub env: Env,
    /// Each message forces a reload (SIGHUP).
    pub reload: mpsc::Receiver<()>,
    pub shutdown: CancellationToken,
}

/// Runs until `shutdown` is cancelled; then drains egress (up to `drain_timeout`),
/// ingress and the NATS connection, and returns.
pub async fn run(parts: Parts) -> Result<(), SidecarError> {
    let Parts { mut config, overrides, egress: egress_listener, admin: admin_listener, env, reload, shutdown } = parts;
    let overridden = config.apply(&overrides);
    if !overridden.is_empty() {
        // Values are not printed: a NATS URL may carry credentials.
        tracing::info!(settings = %overridden.join(", "), "command-line or NATSBRIDGE_* settings override the routing file");
    }
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let metrics = Metrics::new();
    let readiness = Readiness::new();
    readiness.starting(&Component::EGRESS, "not serving yet");
    let nats = connection::connect(&config.nats, &config.sidecar.service, &metrics, readiness.clone(), &*env).await?;
    // One reply subscription for the connection: egress requests, acks, dead letters.
    let replies = Replies::start(&nats, &metrics).await?;
    let config = Arc::new(config);
    let source: PathBuf = config.source.clone();
    let table = Arc::new(ArcSwap::from_pointee(Table::new(Routing::new(config.clone()), &metrics)));
    let (changes, config_rx) = watch::channel(config.clone());
    // Provisions (sidecar.provision) or checks streams and buckets once NATS is up; readiness
    // names whatever is missing. Never blocks startup.
    // The first attempt ends with an event; should that event be lost, readiness must not
    // wait for it forever.
    {
        let (readiness, wait) = (readiness.clone(), config.nats.connect_timeout + std::time::Duration::from_secs(1));
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            readiness.fail_if_starting(&Component::NATS, "the first connection attempt did not finish within connect_timeout");
        });
    }
    let provision_task = provision::spawn(nats.clone(), config_rx.clone(), readiness.clone(), shutdown.clone());

    let egress_addr = egress_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let admin = Admin { metrics: metrics.clone(), nats: nats.clone(), readiness: readiness.clone(), mode: config.sidecar.readiness };
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin, admin_stop.clone().cancelled_owned()));

    let reloader = Reloader::new(source, overrides, table.clone(), metrics.clone(), changes);
    let reload_task = tokio::spawn(reloader.run(reload, shutdown.clone()));

    let ingress_stop = CancellationToken::new();
    let ingress_task = tokio::spawn(ingress::run(
        ingress::Parts {
            config: config_rx,
            nats: nats.clone(),
            replies: replies.clone(),
            metrics: metrics.clone(),
            readiness: readiness.clone(),
        },
        ingress_stop.clone(),
    ));

    tracing::info!(
        service = %config.sidecar.service,
        egress = %egress_addr,
        admin = %admin_addr,
        outbound = config.outbound.len(),
        inbound = config.inbound.len(),
        "natsbridge running"
    );
    // Draining: tell the orchestrator to stop sending work before anything stops.
    {
        let (readiness, shutdown) = (readiness.clone(), shutdown.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            readiness.drain();
        });
    }
    let egress = Egress::new(table, nats.clone(), replies, metrics);
    // The listener is bound and the loop below accepts from it at once.
    readiness.pass(&Component::EGRESS);
    egress::serve(egress_listener, egress, shutdown.clone().cancelled_owned()).await?;

    // Egress has drained; now stop taking messages and finish the ones in flight.
    ingress_stop.cancel();
    let _ = ingress_task.await;
    let _ = reload_task.await;
    let _ = provision_task.await;
    // Flush what egress published and unsubscribe cleanly.
    let drain = tokio::time::timeout(config.sidecar.drain_timeout, nats.drain()).await;
    if !matches!(drain, Ok(Ok(()))) {
        tracing::warn!("NATS drain did not finish cleanly");
    }
    admin_stop.cancel();
    let _ = admin_task.await;
    tracing::info!("natsbridge stopped");
    Ok(())
}
