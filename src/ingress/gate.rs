//! The app's health, as ingress needs it: a gate that is open while the app answers
//! `[sidecar] app_health_path` with a 2xx, and shut while it answers otherwise, does not
//! answer, or refuses connections (an app starting, shutting down or restarting).
//!
//! While the gate is shut, JetStream routes pull nothing and hold what they hold (under
//! in-progress acks) instead of calling the app, so no delivery is spent on an app that
//! cannot take it; request and tunnel routes unsubscribe, so callers get "no responders"
//! (503 through egress) at once instead of a timeout. Without a health path the gate is
//! always open.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::app::{self, AppClient};
use crate::config::Config;
use crate::health::{Component, Readiness};

/// How often a healthy app is probed.
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// How often an unhealthy app is probed: work resumes soon after it recovers.
const PROBE_DOWN_EVERY: Duration = Duration::from_millis(500);
/// One probe's deadline.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// A health answer is small; a larger one is read no further.
const PROBE_MAX_BODY: usize = 64 * 1024;

/// The gate as the routes see it. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Gate(watch::Receiver<bool>);

impl Gate {
    /// Waits until the gate is open; false when `stop` came first.
    pub async fn wait_open(&self, stop: &CancellationToken) -> bool {
        let mut rx = self.0.clone();
        tokio::select! {
            r = rx.wait_for(|open| *open) => r.is_ok(),
            _ = stop.cancelled() => false,
        }
    }

    /// Resolves when the gate shuts (never, once its prober is gone).
    pub async fn shut(&self) {
        let mut rx = self.0.clone();
        if rx.wait_for(|open| !*open).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Starts probing the app as the config in force says (a reload may add, change or remove
/// the health path) until `stop`.
pub(crate) fn spawn(
    config: watch::Receiver<Arc<Config>>,
    app: AppClient,
    readiness: Arc<Readiness>,
    stop: CancellationToken,
) -> (Gate, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(true);
    let task = tokio::spawn(probe_loop(config, app, readiness, tx, stop));
    (Gate(rx), task)
}

async fn probe_loop(
    mut config: watch::Receiver<Arc<Config>>,
    app: AppClient,
    readiness: Arc<Readiness>,
    tx: watch::Sender<bool>,
    stop: CancellationToken,
) {
    loop {
        let current = config.borrow_and_update().clone();
        let healthy = match &current.sidecar.app_health_path {
            None => {
                readiness.remove(&Component::APP);
                true
            }
            Some(path) => {
                let url = format!("{}{path}", app::base_url(&current.sidecar.app_url));
                let verdict = probe(&app, &url).await;
                match &verdict {
                    Ok(()) => readiness.pass(&Component::APP),
                    Err(why) => readiness.fail(&Component::APP, format!("{why}; inbound routes paused")),
                }
                verdict.is_ok()
            }
        };
        let was = tx.send_replace(healthy);
        if was != healthy {
            tracing::info!(healthy, "the app's health changed: inbound routes {}", if healthy { "resume" } else { "pause" });
        }
        let every = if healthy { PROBE_EVERY } else { PROBE_DOWN_EVERY };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
            changed = config.changed() => if changed.is_err() { stop.cancelled().await; return },
        }
    }
}

/// One probe: `Ok` on a 2xx, else what was wrong.
async fn probe(app: &AppClient, url: &str) -> Result<(), String> {
    match app.call(Method::GET, url, HeaderMap::new(), Bytes::new(), PROBE_TIMEOUT, PROBE_MAX_BODY).await {
        Ok(r) if r.status.is_success() => Ok(()),
        Ok(r) => Err(format!("the app's health check answered {}", r.status.as_u16())),
        Err(e) => Err(e.to_string()),
    }
}
