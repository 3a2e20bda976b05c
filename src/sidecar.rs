//! One running sidecar: wires the NATS connection, egress, ingress, admin and hot reload
//! together from things passed in (config, listeners, environment lookup, shutdown).

use std::sync::Arc;
use std::time::Duration;

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
use crate::shutdown::{drain_nats, Drain};
use crate::telemetry::Telemetry;

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error(transparent)]
    Connect(#[from] connection::ConnectError),
    #[error("listener failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot subscribe to the reply inbox: {0}")]
    Replies(#[from] async_nats::SubscribeError),
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
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

/// Runs until `shutdown` is cancelled, then stops within one `drain_timeout`: ingress
/// first (in-flight handlers finish while egress still serves their calls), then egress,
/// then the NATS flush and the export of the last spans. A step that overruns the budget
/// is abandoned.
pub async fn run(parts: Parts) -> Result<(), SidecarError> {
    let Parts { mut config, overrides, egress: egress_listener, admin: admin_listener, env, reload, shutdown } = parts;
    apply_overrides(&mut config, &overrides);
    let metrics = Metrics::new();
    let readiness = Readiness::new();
    readiness.starting(&Component::EGRESS, "not serving yet");
    let (connects, connects_rx) = watch::channel(0);
    let nats = connection::connect(&config.nats, &config.sidecar.service, &metrics, readiness.clone(), connects, &*env).await?;
    // One reply subscription for the connection: egress requests, acks, dead letters.
    let replies = Replies::start(&nats, &metrics).await?;
    // After the steps that can fail: a started exporter is always flushed by the stop.
    let telemetry = Telemetry::start(config.telemetry.as_ref())?;
    let config = Arc::new(config);
    let table = Arc::new(ArcSwap::from_pointee(Table::new(Routing::new(config.clone()), &metrics)));
    let (changes, config_rx) = watch::channel(config.clone());
    // Provisions (sidecar.provision) or checks streams and buckets once NATS is up; readiness
    // names whatever is missing. Never blocks startup.
    bound_first_attempt(readiness.clone(), config.nats.connect_timeout);
    let provision_task = provision::spawn(nats.clone(), config_rx.clone(), readiness.clone(), shutdown.clone());
    let dlq_fill_task = crate::dlq::fill::spawn(nats.clone(), config_rx.clone(), metrics.clone(), shutdown.clone());

    let (egress_addr, admin_addr) = (egress_listener.local_addr()?, admin_listener.local_addr()?);
    // `POST /drain` stops ingress ahead of the signal (an app's preStop hook).
    let ingress_stop = CancellationToken::new();
    let (ingress_done, ingress_done_rx) = watch::channel(false);
    // Cut-over shadows' last mismatches: kept by egress, shown by `/statusz`.
    let shadows = Arc::new(egress::cutover::Shadows::default());
    let admin = Admin {
        shadows: shadows.clone(),
        metrics: metrics.clone(),
        nats: nats.clone(),
        readiness: readiness.clone(),
        mode: config.sidecar.readiness,
        drain: admin::DrainControl {
            stop: ingress_stop.clone(),
            done: ingress_done_rx,
            timeout: {
                let table = table.clone();
                Arc::new(move || table.load().config().sidecar.drain_timeout)
            },
        },
    };
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin, admin_stop.clone().cancelled_owned()));

    let reloader = Reloader::new(config.source.clone(), overrides, table.clone(), metrics.clone(), changes);
    let reload_task = tokio::spawn(reloader.run(reload, shutdown.clone()));

    let ingress_parts = ingress::Parts {
        config: config_rx,
        nats: nats.clone(),
        connects: connects_rx,
        replies: replies.clone(),
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        telemetry: telemetry.clone(),
    };
    let ingress_task = spawn_ingress(ingress_parts, ingress_stop.clone(), ingress_done);

    log_running(&config, egress_addr, admin_addr);
    mark_draining(readiness.clone(), shutdown.clone());
    // The signal, not `egress_stop`: subscribe streams end when the stop starts, so their
    // clients resume on another pod while this one drains.
    // The stop's budget is the `drain_timeout` in force when it starts, not at start-up.
    let in_force = table.clone();
    let egress = Egress::new(table, nats.clone(), replies, metrics, shadows, telemetry.clone(), shutdown.clone());
    // The listener is bound and the loop below accepts from it at once.
    readiness.pass(&Component::EGRESS);
    let egress_stop = CancellationToken::new();
    let mut egress_task = tokio::spawn(egress::serve(egress_listener, egress, egress_stop.clone().cancelled_owned()));
    let failed = tokio::select! {
        _ = shutdown.cancelled() => None,
        served = &mut egress_task => Some(served),
    };
    // One budget for the whole stop, not one per step.
    let drain = Drain::new(in_force.load().config().sidecar.drain_timeout);
    // Ingress first (no new messages), while egress still accepts: the handlers still
    // running may call out through it. Reload and provisioning stop alongside.
    ingress_stop.cancel();
    tokio::join!(
        drain.finish("ingress", ingress_task, drain.work),
        drain.finish("reload", reload_task, drain.work),
        drain.finish("provisioning", provision_task, drain.work),
        drain.finish("dead-letter gauges", dlq_fill_task, drain.work),
    );
    // Then egress: no new calls, the ones in flight finish.
    egress_stop.cancel();
    let served = match failed {
        Some(served) => served,
        None => drain.finish("egress", egress_task, drain.work).await.unwrap_or(Ok(Ok(()))),
    };
    // Last, flush what egress and ingress published (replies, acks) and unsubscribe, and
    // export the spans they ended.
    tokio::join!(drain_nats(&nats, drain.end), telemetry.shutdown(drain.end));
    admin_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), admin_task).await;
    // A panicked egress task counts as a failed listener.
    let result = served.unwrap_or_else(|e| Err(std::io::Error::other(e))).map_err(SidecarError::from);
    tracing::info!(took = ?drain.started.elapsed(), "natsbridge stopped");
    result
}

/// Says what runs where, once everything is started.
fn log_running(config: &Config, egress: std::net::SocketAddr, admin: std::net::SocketAddr) {
    tracing::info!(
        service = %config.sidecar.service,
        %egress,
        %admin,
        outbound = config.outbound.len(),
        inbound = config.inbound.len(),
        "natsbridge running"
    );
}

/// Runs ingress until `stop`, then says so on `done` (what `POST /drain` waits for).
fn spawn_ingress(parts: ingress::Parts, stop: CancellationToken, done: watch::Sender<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        ingress::run(parts, stop).await;
        done.send_replace(true);
    })
}

/// Draining: tells the orchestrator to stop sending work as soon as `shutdown` comes,
/// before anything stops.
fn mark_draining(readiness: Arc<Readiness>, shutdown: CancellationToken) {
    tokio::spawn(async move {
        shutdown.cancelled().await;
        readiness.drain();
    });
}

/// Applies the command line's and the environment's overrides, and says what they changed
/// and what the file warns about.
fn apply_overrides(config: &mut Config, overrides: &Overrides) {
    let overridden = config.apply(overrides);
    if !overridden.is_empty() {
        // Values are not printed: a NATS URL may carry credentials.
        tracing::info!(settings = %overridden.join(", "), "command-line or NATSBRIDGE_* settings override the routing file");
    }
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
}

/// The first connection attempt ends with an event; should that event be lost, readiness
/// must not wait for it forever.
fn bound_first_attempt(readiness: Arc<Readiness>, connect_timeout: Duration) {
    tokio::spawn(async move {
        tokio::time::sleep(connect_timeout + Duration::from_secs(1)).await;
        readiness.fail_if_starting(&Component::NATS, "the first connection attempt did not finish within connect_timeout");
    });
}
