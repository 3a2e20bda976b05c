//! Hot reload of the routing file: watches its directory (so a Kubernetes ConfigMap's
//! `..data` symlink swap is seen) and SIGHUP, validates the new file, and swaps the route
//! table atomically. An invalid file is logged and rejected; the old table stays.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::Watcher;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config, ConfigError, Overrides};
use crate::egress::routes::Routing;
use crate::egress::Table;
use crate::metrics::Metrics;

pub struct Reloader {
    pub path: PathBuf,
    pub overrides: Overrides,
    pub table: Arc<ArcSwap<Table>>,
    pub metrics: Metrics,
    /// Every accepted config, for components that react to changes (ingress).
    pub changes: watch::Sender<Arc<Config>>,
    last: std::sync::Mutex<Option<String>>,
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        overrides: Overrides,
        table: Arc<ArcSwap<Table>>,
        metrics: Metrics,
        changes: watch::Sender<Arc<Config>>,
    ) -> Self {
        let last = std::fs::read_to_string(&path).ok();
        Self { path, overrides, table, metrics, changes, last: std::sync::Mutex::new(last) }
    }

    /// Loads the file again; `Ok(false)` when its content did not change.
    pub fn reload(&self) -> Result<bool, ConfigError> {
        let text = std::fs::read_to_string(&self.path).ok();
        {
            let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if text.is_some() && *last == text {
                return Ok(false);
            }
        }
        let result = config::load(&self.path);
        match result {
            Ok(mut c) => {
                c.apply(&self.overrides);
                let old = self.table.load();
                let old_side = &old.routing.config.sidecar;
                if old_side.listen != c.sidecar.listen || old_side.admin_listen != c.sidecar.admin_listen {
                    tracing::warn!("listen addresses changed; they take effect at the next restart");
                }
                if old.routing.config.nats.servers != c.nats.servers || old.routing.config.nats.auth != c.nats.auth {
                    tracing::warn!("[nats] settings changed; they take effect at the next restart");
                }
                for w in &c.warnings {
                    tracing::warn!("{w}");
                }
                let c = Arc::new(c);
                self.table.store(Arc::new(Table::new(Routing::new(c.clone()), &self.metrics)));
                self.changes.send_replace(c.clone());
                *self.last.lock().unwrap_or_else(|e| e.into_inner()) = text;
                self.metrics.config_reloads.inc();
                tracing::info!(outbound = c.outbound.len(), inbound = c.inbound.len(), "routing file reloaded");
                Ok(true)
            }
            Err(e) => {
                self.metrics.config_reload_failures.inc();
                // Remember the bad text so a burst of events does not log it again.
                *self.last.lock().unwrap_or_else(|e| e.into_inner()) = text;
                tracing::error!("routing file rejected; keeping the previous table:\n{e}");
                Err(e)
            }
        }
    }

    /// Reloads on file changes and on `signals` (SIGHUP) until `shutdown`.
    pub async fn run(self, mut signals: mpsc::Receiver<()>, shutdown: CancellationToken) {
        let (tx, mut rx) = mpsc::channel::<()>(16);
        let dir = self
            .path
            .parent()
            .map(|p| if p.as_os_str().is_empty() { PathBuf::from(".") } else { p.to_path_buf() })
            .unwrap_or_else(|| PathBuf::from("."));
        let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if ev.is_ok() {
                let _ = tx.try_send(());
            }
        });
        let _watcher = match watcher {
            Ok(mut w) => match w.watch(&dir, notify::RecursiveMode::NonRecursive) {
                Ok(()) => Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the routing file; reload with SIGHUP");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "no file watcher; reload with SIGHUP");
                None
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(()) = rx.recv() => {
                    // Editors and ConfigMap swaps write in several steps: let them settle.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    while rx.try_recv().is_ok() {}
                    let _ = self.reload();
                }
                Some(()) = signals.recv() => {
                    // An explicit SIGHUP reloads even an unchanged file.
                    *self.last.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    let _ = self.reload();
                }
            }
        }
    }
}
