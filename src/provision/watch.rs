//! The sidecar's provisioning task: provision (with `sidecar.provision`, again after each
//! reload), then check what the routes need and keep readiness failing per missing thing
//! until it exists. Calls `apply` and `check`; owns nothing but the loop's state.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::apply::apply;
use super::check::{check, Missing};
use super::plan::Status;
use super::Kind;
use crate::config::Config;
use crate::health::{Component, Readiness};

/// How often `run` re-checks while something is missing, and once all exists.
const RECHECK_MISSING: Duration = Duration::from_secs(5);
const RECHECK_OK: Duration = Duration::from_secs(30);

/// Starts the task `run` uses: with `sidecar.provision` it applies the plan (again after
/// each reload); in any case it checks what the routes need, fails readiness with
/// `provision:<kind>:<name>` for each missing thing, and re-checks until it exists. It
/// waits for NATS, so a NATS outage never blocks startup. [`Component::PROVISION`] is
/// starting from now until the first check has finished.
pub fn spawn(
    nats: async_nats::Client,
    config: watch::Receiver<Arc<Config>>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    readiness.starting(&Component::PROVISION, "waiting for NATS to check JetStream streams and buckets");
    tokio::spawn(supervise(nats, config, readiness, shutdown))
}

async fn supervise(
    nats: async_nats::Client,
    mut config_rx: watch::Receiver<Arc<Config>>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) {
    let mut watcher = Watcher::new(crate::nats::connection::jetstream(nats.clone()), readiness);
    loop {
        while !crate::nats::connection::is_connected(&nats) {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        let config = config_rx.borrow_and_update().clone();
        let wait = if watcher.provision(&config).await { watcher.check(&config).await } else { RECHECK_MISSING };
        // A failed create (no meta leader yet, too few servers up) is retried sooner, with backoff.
        let wait = watcher.retry_in().map_or(wait, |r| r.min(wait));
        if wait_or_stop(&shutdown, &mut config_rx, wait).await {
            return;
        }
    }
}

/// What the loop remembers from one round to the next.
struct Watcher {
    js: jetstream::Context,
    readiness: Arc<Readiness>,
    /// The components down for a missing resource, to pass them once it exists.
    failing: BTreeSet<Component>,
    /// The config last provisioned: a round without a reload does not provision again.
    provisioned: Option<Arc<Config>>,
    /// The last check error: a persisting error is logged once, not every round.
    last_error: Option<String>,
    /// Why each item of the last apply failed, by component: readiness says so while the
    /// resource is missing, and the apply is retried.
    failed: BTreeMap<Component, String>,
    /// Consecutive applies with a failed item: the retry backoff's exponent.
    attempts: u32,
}

impl Watcher {
    fn new(js: jetstream::Context, readiness: Arc<Readiness>) -> Self {
        Self { js, readiness, failing: BTreeSet::new(), provisioned: None, last_error: None, failed: BTreeMap::new(), attempts: 0 }
    }

    /// When to apply again after a failed item: 1 s doubling to 30 s.
    fn retry_in(&self) -> Option<Duration> {
        (!self.failed.is_empty()).then(|| Duration::from_secs(1 << self.attempts.min(5)).min(RECHECK_OK))
    }

    /// Applies the plan if `sidecar.provision` asks for it and this config has not been
    /// applied yet; false when that failed (readiness then says why).
    async fn provision(&mut self, config: &Arc<Config>) -> bool {
        if !config.sidecar.provision || self.provisioned.as_ref().is_some_and(|p| Arc::ptr_eq(p, config)) {
            return true;
        }
        match apply(&self.js, config, false).await {
            Ok(plan) => {
                self.failed.clear();
                for item in &plan.items {
                    if let Status::Failed { error } = &item.status {
                        let kind = if item.kind == Kind::Consumer { Kind::Stream } else { item.kind };
                        let name = item.name.split('/').next().unwrap_or_default();
                        // The first failure is the cause: a stream's consumers fail after it
                        // only because it is missing.
                        self.failed
                            .entry(Component::resource(kind.key(), name))
                            .or_insert_with(|| format!("cannot create {} {:?} yet: {error}; retrying", item.kind, item.name));
                    }
                }
                for item in &plan.items {
                    let text = item.to_string();
                    match item.status {
                        Status::Refused { .. } | Status::Failed { .. } => tracing::warn!("provision: {}", text.trim_end()),
                        _ => tracing::info!("provision: {}", text.trim_end()),
                    }
                }
                if self.failed.is_empty() {
                    self.attempts = 0;
                    self.provisioned = Some(config.clone());
                } else {
                    // Not remembered as provisioned: the next round applies again.
                    self.attempts += 1;
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "provisioning failed; retrying");
                self.readiness.fail(&Component::PROVISION, format!("provisioning failed: {e}"));
                false
            }
        }
    }

    /// Checks what the routes need and updates readiness; how long to wait before the
    /// next round.
    async fn check(&mut self, config: &Config) -> Duration {
        match check(&self.js, config).await {
            Ok(missing) => {
                self.last_error = None;
                let now: BTreeSet<Component> = missing.iter().map(Missing::component).collect();
                for m in &missing {
                    if !self.failing.contains(&m.component()) {
                        tracing::warn!("{m}");
                    }
                    // Provisioning is on and failed: say why, not how to turn it on.
                    let why = self.failed.get(&m.component()).map_or_else(|| m.to_string(), |f| format!("{}; {f}", m.what()));
                    self.readiness.fail(&m.component(), why);
                }
                for gone in self.failing.difference(&now) {
                    tracing::info!(check = %gone, "now exists");
                    self.readiness.pass(gone);
                }
                self.failing = now;
                self.readiness.pass(&Component::PROVISION);
                if self.failing.is_empty() {
                    RECHECK_OK
                } else {
                    RECHECK_MISSING
                }
            }
            Err(e) => {
                let text = e.to_string();
                if self.last_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(error = %text, "cannot check JetStream resources; retrying");
                }
                self.last_error = Some(text);
                if self.failing.is_empty() {
                    self.readiness.fail(&Component::PROVISION, format!("cannot check JetStream resources: {e}"));
                }
                RECHECK_MISSING
            }
        }
    }
}

/// Waits `wait`, or less when the config changes; true when it is time to stop.
async fn wait_or_stop(shutdown: &CancellationToken, config: &mut watch::Receiver<Arc<Config>>, wait: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(wait) => false,
        r = config.changed() => r.is_err(),
    }
}
