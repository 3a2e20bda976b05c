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

/// `(name, differs)` for each of `fields` between `old` and `new`, the name being
/// `<section>.<field>` as in the routing file.
macro_rules! changed {
    ($section:literal, $old:expr, $new:expr, [$($field:ident),*]) => {
        [$((concat!($section, ".", stringify!($field)), $old.$field != $new.$field)),*]
    };
}

/// The settings a running sidecar cannot change, as they are named in the file, when they
/// differ between `old` and `new`. Every other setting applies on reload: the routes,
/// `app_url`, `drain_timeout`, `provision` and `max_inflight_publishes` (read at each publish).
pub fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let (o, n) = (&old.sidecar, &new.sidecar);
    [
        // The listeners are bound once, by the process that owns them.
        &changed!("sidecar", o, n, [listen, admin_listen])[..],
        // The HTTP edge limits are the listener's, set up once with it.
        &changed!("sidecar", o.http, n.http, [header_read_timeout, max_headers, max_header_bytes, idle_timeout, max_connections]),
        // The passthrough client is built once, with its connect timeout.
        &[("sidecar.forward_connect_timeout", o.forward.connect_timeout != n.forward.connect_timeout)],
        // The service names the NATS connection, durable consumers and idempotency scope.
        &changed!("sidecar", o, n, [service]),
        // The runtime is built once, before anything runs on it.
        &changed!("sidecar", o, n, [worker_threads]),
        // One NATS connection for the process's lifetime.
        &changed!("nats", old.nats, new.nats, [servers, auth, tls, connect_timeout, inbox_prefix]),
        // The span exporter is started once, with the sidecar.
        &[("telemetry", old.telemetry != new.telemetry)],
    ]
    .concat()
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect()
}

/// Whether a watcher event can mean new content. Opening, reading and closing the file
/// cannot, and must not count: the reload's own read raises exactly those, so counting
/// them re-read the file every 100 ms for the sidecar's whole life (issue 14's "ten
/// openat/statx/close triples per second").
fn changes_content(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    match kind {
        notify::EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        notify::EventKind::Access(_) => false,
        _ => true,
    }
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        overrides: Overrides,
        table: Arc<ArcSwap<Table>>,
        metrics: Metrics,
        changes: watch::Sender<Arc<Config>>,
    ) -> Self {
        let last = config::read(&path).ok();
        Self { path, overrides, table, metrics, changes, last: std::sync::Mutex::new(last) }
    }

    /// Loads the file again; `Ok(false)` when its content did not change.
    pub fn reload(&self) -> Result<bool, ConfigError> {
        // Read once: the text compared with the last load is the text validated.
        let text = match config::read(&self.path) {
            Ok(t) => t,
            Err(e) => return Err(self.reject(None, e)),
        };
        if self.last.lock().unwrap_or_else(|e| e.into_inner()).as_deref() == Some(text.as_str()) {
            return Ok(false);
        }
        let mut c = match config::from_text(&self.path, &text) {
            Ok(c) => c,
            Err(e) => return Err(self.reject(Some(text), e)),
        };
        c.apply(&self.overrides);
        let restart = needs_restart(&self.table.load().routing.config, &c);
        if !restart.is_empty() {
            tracing::warn!(settings = %restart.join(", "), "these settings changed; they take effect at the next restart");
        }
        for w in &c.warnings {
            tracing::warn!("{w}");
        }
        let c = Arc::new(c);
        self.table.store(Arc::new(Table::new(Routing::new(c.clone()), &self.metrics)));
        self.changes.send_replace(c.clone());
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(text);
        self.metrics.config_reloads.inc();
        tracing::info!(outbound = c.outbound.len(), inbound = c.inbound.len(), "routing file reloaded");
        Ok(true)
    }

    fn reject(&self, text: Option<String>, e: ConfigError) -> ConfigError {
        self.metrics.config_reload_failures.inc();
        // Remember the bad text so a burst of events does not log it again.
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = text;
        tracing::error!("routing file rejected; keeping the previous table:\n{e}");
        e
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
            if ev.is_ok_and(|e| changes_content(&e.kind)) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(sidecar: &str, nats: &str) -> Config {
        config::parse(&format!("[sidecar]\nservice = \"svc\"\n{sidecar}\n[nats]\n{nats}\n"), "t.toml").unwrap()
    }

    #[test]
    fn reading_the_file_is_not_a_change() {
        use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind};
        use notify::EventKind as K;
        for quiet in
            [K::Access(AccessKind::Open(AccessMode::Any)), K::Access(AccessKind::Read), K::Access(AccessKind::Close(AccessMode::Read))]
        {
            assert!(!changes_content(&quiet), "{quiet:?}");
        }
        for change in [K::Access(AccessKind::Close(AccessMode::Write)), K::Create(CreateKind::File), K::Modify(ModifyKind::Any), K::Any] {
            assert!(changes_content(&change), "{change:?}");
        }
    }

    #[test]
    fn settings_a_reload_cannot_change_are_named() {
        let base = parse("", "");
        assert!(needs_restart(&base, &parse("", "")).is_empty());
        let cases = [
            ("listen = \"127.0.0.1:5999\"", "", "sidecar.listen"),
            ("admin_listen = \"127.0.0.1:5998\"", "", "sidecar.admin_listen"),
            ("", "servers = [\"nats://127.0.0.1:5222\"]", "nats.servers"),
            ("", "connect_timeout = \"9s\"", "nats.connect_timeout"),
            ("", "inbox_prefix = \"_INBOX_svc\"", "nats.inbox_prefix"),
            ("", "token_env = \"NATS_TOKEN\"", "nats.auth"),
            ("idle_timeout = \"5s\"", "", "sidecar.idle_timeout"),
            ("max_connections = 9", "", "sidecar.max_connections"),
            ("forward_connect_timeout = \"9s\"", "", "sidecar.forward_connect_timeout"),
        ];
        for (sidecar, nats, name) in cases {
            assert_eq!(needs_restart(&base, &parse(sidecar, nats)), vec![name], "{sidecar}{nats}");
        }
        let renamed = config::parse("[sidecar]\nservice = \"other\"\n", "t.toml").unwrap();
        assert_eq!(needs_restart(&base, &renamed), vec!["sidecar.service"]);
        let traced = config::parse("[sidecar]\nservice = \"svc\"\n[telemetry]\notlp_endpoint = \"http://c:4318\"\n", "t.toml").unwrap();
        assert_eq!(needs_restart(&base, &traced), vec!["telemetry"]);
    }

    #[test]
    fn settings_that_apply_on_reload_are_not_named() {
        let base = parse("", "");
        let changed =
            parse("app_url = \"http://127.0.0.1:3999\"\ndrain_timeout = \"3s\"\nprovision = true\nmax_inflight_publishes = 7", "");
        assert_ne!(base.sidecar.app_url, changed.sidecar.app_url);
        assert_eq!(changed.sidecar.max_inflight_publishes, 7);
        assert!(needs_restart(&base, &changed).is_empty());
    }
}
