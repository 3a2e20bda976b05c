//! Ingress (NATS → HTTP): subscriptions and JetStream consumers that call the local app.
//!
//! - [`request`]: `mode = "request"` and `mode = "tunnel"`, core-NATS queue subscriptions
//!   whose replies carry the app's response.
//! - [`jetstream`]: `mode = "jetstream"`, durable pull consumers whose acks, delayed naks
//!   and dead letters follow [`outcome_for`]; the route's `max_deliver` is enforced there
//!   (the server's is unlimited), and a watchdog rebinds vanished consumers.
//! - `stream`: an app's open body (chunked, event stream) sent as a streamed reply.
//! - [`policy`]: the pure outcome policy.
//! - [`app`]: the pooled HTTP client to the app.
//! - `border`: the route's contract (`schema`/`schemas`), checked before the app is called.
//! - `gate`: the app's health (`app_health_path`); routes pause while it fails.
//! - `micro`: NATS micro discovery (ADR-32) of the request routes, with their stats.
//! - [`idempotency`]: the idempotency store and protocol of routes that set `idempotency`.
//!
//! [`run`] supervises one task per inbound route and restarts, stops or starts them as the
//! routing file is reloaded.

pub mod app;
mod border;
mod gate;
mod handoff;
pub mod idempotency;
pub mod jetstream;
mod micro;
mod nest;
pub mod policy;
pub mod request;
mod stream;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Inbound, InboundMode};
use crate::health::{Component, Readiness};
pub(crate) use crate::metrics::InFlight;
use crate::metrics::{IngressRouteMetrics, Metrics};
use crate::nats::replies::Replies;

pub use app::{AppClient, AppError, AppResponse};
pub use policy::{outcome_for, Attempt, Outcome, Policy};

/// What ingress needs from the sidecar.
pub struct Parts {
    /// The config in force; a new value is sent on every accepted reload.
    pub config: watch::Receiver<Arc<Config>>,
    pub nats: async_nats::Client,
    /// Changes at every (re)connect of `nats` ([`connect`](crate::nats::connection::connect)).
    pub connects: watch::Receiver<u64>,
    /// The connection's reply multiplexer (acked dead-letter publishes).
    pub replies: Replies,
    pub metrics: Metrics,
    pub readiness: Arc<Readiness>,
    /// The spans of each message and app call (off without `[telemetry]`).
    pub telemetry: crate::telemetry::Telemetry,
}

/// What every route task shares.
pub(crate) struct Shared {
    pub nats: async_nats::Client,
    /// Changes at every (re)connect of `nats`.
    pub connects: watch::Receiver<u64>,
    pub js: async_nats::jetstream::Context,
    pub replies: Replies,
    pub app: AppClient,
    pub metrics: Metrics,
    pub readiness: Arc<Readiness>,
    /// Open while the app is healthy (always, without `app_health_path`).
    pub gate: gate::Gate,
    /// NATS micro discovery's per-endpoint stats.
    pub micro: Arc<micro::Endpoints>,
    pub telemetry: crate::telemetry::Telemetry,
}

/// One inbound route, resolved for its task.
pub(crate) struct Route {
    pub inbound: Inbound,
    /// `app_url` without a trailing slash; request paths are appended.
    pub base: String,
    pub metrics: IngressRouteMetrics,
    /// Its component: `inbound:<name>`, starting until its subscription or consumer is bound.
    pub check: Component,
    /// How long a stopping route waits for its in-flight handlers before naking them: the
    /// part of `drain_timeout` the sidecar leaves to handlers.
    pub drain_timeout: Duration,
    /// The route's idempotency, when it sets `idempotency`.
    pub idem: Option<Arc<idempotency::guard::Guard>>,
    /// `app_url` has a path (`/v1`) that `..` segments must not climb above.
    pub base_has_path: bool,
    /// Refused messages are logged at most this often: a hostile publisher can send many.
    pub refusals: LogLimit,
    /// This route's NATS micro endpoint stats, when it is announced (request routes).
    pub micro: Option<Arc<micro::EndpointStats>>,
    /// Set by a reload that replaces this task with one reading the same subscription:
    /// at its stop the task hands its subscription over instead of unsubscribing.
    pub handoff: std::sync::OnceLock<Arc<handoff::Handoff>>,
}

/// A warning logged at most once per period, with the count of those suppressed since:
/// refusals that any publisher can trigger at will must not flood the log.
pub(crate) struct LogLimit {
    period: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimit {
    pub fn new(period: Duration) -> Self {
        Self { period, state: Mutex::new((None, 0)) }
    }

    /// `Some(suppressed)` when a line should be logged now; else counts one suppressed.
    pub fn check(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (last, suppressed) = &mut *state;
        if last.is_some_and(|t| t.elapsed() < self.period) {
            *suppressed += 1;
            return None;
        }
        *last = Some(Instant::now());
        Some(std::mem::take(suppressed))
    }
}

struct Running {
    fingerprint: String,
    route: Arc<Route>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// A route task outlives neither its supervisor nor a sidecar stop that abandoned it.
impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs every inbound route until `shutdown`, then finishes or naks what is in flight.
pub async fn run(mut cx: Parts, shutdown: CancellationToken) {
    let app = AppClient::new().with_telemetry(cx.telemetry.clone());
    let probing = CancellationToken::new();
    let (gate, prober) = gate::spawn(cx.config.clone(), app.clone(), cx.readiness.clone(), probing.clone());
    let shared = Arc::new(Shared {
        js: crate::nats::connection::jetstream(cx.nats.clone()),
        nats: cx.nats.clone(),
        connects: cx.connects.clone(),
        replies: cx.replies.clone(),
        app,
        metrics: cx.metrics.clone(),
        readiness: cx.readiness.clone(),
        gate,
        micro: Arc::default(),
        telemetry: cx.telemetry.clone(),
    });
    let mut running: HashMap<String, Running> = HashMap::new();
    let config = cx.config.borrow_and_update().clone();
    // Announced while request routes exist; INFO and STATS follow reloads.
    let mut discovery = micro::Discovery::new(cx.nats.clone(), cx.config.clone(), shared.micro.clone(), shutdown.clone());
    discovery.follow(&config).await;
    apply(&shared, &config, &mut running).await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = cx.config.changed() => {
                if changed.is_err() {
                    // The reloader is gone (shutting down): keep serving the last config.
                    shutdown.cancelled().await;
                    break;
                }
                let config = cx.config.borrow_and_update().clone();
                discovery.follow(&config).await;
                apply(&shared, &config, &mut running).await;
            }
        }
    }
    // Every route drains at once: the slowest bounds the whole shutdown.
    for r in running.values() {
        r.stop.cancel();
    }
    for (_, mut r) in running.drain() {
        let _ = (&mut r.task).await;
    }
    probing.cancel();
    let _ = prober.await;
    discovery.stop().await;
}

/// What makes a route's task different: the route itself (not where it sits in the file)
/// and the app it calls.
fn fingerprint(inbound: &Inbound, config: &Config) -> String {
    let mut i = inbound.clone();
    i.line = 0;
    let store = if i.idempotency.is_some() { format!("{:?}", config.idempotency) } else { String::new() };
    // The service scopes the route's idempotency keys.
    format!("{i:?}|{}|{:?}|{}|{store}", config.sidecar.app_url, config.sidecar.drain_timeout, config.sidecar.service)
}

/// Can a task for `new` read on from the subscription of the task for `old`? Only when
/// both subscribe the same way: same mode, subject and queue group.
fn same_subscription(old: &Inbound, new: &Inbound) -> bool {
    let queue = |i: &Inbound| match &i.mode {
        InboundMode::Request { queue } => Some((false, queue.clone())),
        InboundMode::Tunnel { queue } => Some((true, queue.clone())),
        InboundMode::JetStream(_) => None,
    };
    old.subject == new.subject && queue(old).is_some() && queue(old) == queue(new)
}

/// Brings the running tasks in line with `config`: stops removed and changed routes
/// (waiting for their in-flight messages), then starts changed and new ones. A changed
/// request or tunnel route that keeps its subject and queue group hands its subscription
/// to its new task ([`handoff`]), which starts at once, while the old task answers what it
/// had already read.
async fn apply(shared: &Arc<Shared>, config: &Config, running: &mut HashMap<String, Running>) {
    let wanted: HashMap<&str, (&Inbound, String)> = config.inbound.iter().map(|i| (i.name.as_str(), (i, fingerprint(i, config)))).collect();
    let stale: Vec<String> = running
        .iter()
        .filter(|(name, r)| wanted.get(name.as_str()).is_none_or(|(_, fp)| *fp != r.fingerprint))
        .map(|(name, _)| name.clone())
        .collect();
    let mut handoffs: HashMap<String, Arc<handoff::Handoff>> = HashMap::new();
    for name in &stale {
        let (Some(r), Some((new, _))) = (running.get(name), wanted.get(name.as_str())) else { continue };
        if same_subscription(&r.route.inbound, new) {
            let h = Arc::new(handoff::Handoff::default());
            let _ = r.route.handoff.set(h.clone());
            handoffs.insert(name.clone(), h);
        }
    }
    for r in stale.iter().filter_map(|n| running.get(n)) {
        r.stop.cancel();
    }
    let mut handing_over = Vec::new();
    for name in stale {
        let Some(mut r) = running.remove(&name) else { continue };
        if handoffs.contains_key(&name) {
            // Waited for once its replacement runs.
            handing_over.push((name, r));
            continue;
        }
        let _ = (&mut r.task).await;
        if !wanted.contains_key(name.as_str()) {
            tracing::info!(route = %name, "inbound route removed");
            shared.readiness.remove(&Component::inbound(&name));
        } else {
            tracing::info!(route = %name, "inbound route changed; restarting it");
        }
    }
    for inbound in &config.inbound {
        if running.contains_key(&inbound.name) {
            continue;
        }
        let (_, fp) = &wanted[inbound.name.as_str()];
        let route = Arc::new(Route {
            inbound: inbound.clone(),
            base: app::base_url(&config.sidecar.app_url),
            metrics: shared.metrics.ingress_route(&inbound.name),
            check: Component::inbound(&inbound.name),
            drain_timeout: crate::shutdown::handler_budget(config.sidecar.drain_timeout),
            idem: inbound.idempotency.clone().map(|spec| {
                idempotency::guard::Guard::new(&config.sidecar.service, &inbound.name, spec, &shared.metrics, shared.readiness.clone())
            }),
            base_has_path: !config.sidecar.app_url.path().trim_matches('/').is_empty(),
            refusals: LogLimit::new(Duration::from_secs(10)),
            micro: micro::announced(inbound).then(|| shared.micro.get(&inbound.name)),
            handoff: std::sync::OnceLock::new(),
        });
        // Starting until bound: set before the task runs so /statusz never races it.
        shared.readiness.starting(&route.check, "not bound yet");
        let stop = CancellationToken::new();
        // The idempotency store binds alongside the route, retrying until its bucket exists.
        let store = route.idem.clone().map(|g| {
            let (js, cfg, stop) = (shared.js.clone(), config.idempotency.clone(), stop.clone());
            async move { g.keep_open(js, cfg, stop).await }
        });
        // The replaced task's subscription, when it hands it over.
        let inherit = handoffs.remove(&inbound.name);
        let task = match &inbound.mode {
            InboundMode::Request { queue } => {
                spawn_route(request::run(shared.clone(), route.clone(), queue.clone(), false, inherit, stop.clone()), store)
            }
            InboundMode::Tunnel { queue } => {
                spawn_route(request::run(shared.clone(), route.clone(), queue.clone(), true, inherit, stop.clone()), store)
            }
            InboundMode::JetStream(c) => spawn_route(jetstream::run(shared.clone(), route.clone(), c.clone(), stop.clone()), store),
        };
        running.insert(inbound.name.clone(), Running { fingerprint: fp.clone(), route: route.clone(), stop, task });
    }
    for (name, mut r) in handing_over {
        let _ = (&mut r.task).await;
        tracing::info!(route = %name, "inbound route changed; its subscription handed over");
    }
    if !config.inbound.iter().any(|i| i.idempotency.is_some()) {
        // No store in use: nothing to report.
        shared.readiness.remove(&Component::IDEMPOTENCY);
    }
}

/// Runs a route's task and, when it has one, its idempotency store binder, as one task.
fn spawn_route(
    run: impl std::future::Future<Output = ()> + Send + 'static,
    store: Option<impl std::future::Future<Output = ()> + Send + 'static>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        match store {
            Some(store) => {
                tokio::join!(run, store);
            }
            None => run.await,
        }
    })
}

/// Sleeps `d` unless `stop` comes first; true when stopped.
pub(crate) async fn sleep_or_stop(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// Retry delays for (re)binding: 100 ms doubling to 5 s.
pub(crate) fn retry_delay(attempt: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << attempt.min(6))).min(Duration::from_secs(5))
}
