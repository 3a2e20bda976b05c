//! NATS micro discovery (ADR-32): the sidecar's inbound `request` routes announced as one
//! service, named by `[sidecar] service`, versioned by `[sidecar] version`, one endpoint
//! per route (its subject and queue group). It answers `$SRV.PING|INFO|STATS` for all
//! services, by name, and by name and id.
//!
//! async-nats' `service` module owns its endpoints' subscriptions and counts only the
//! replies sent through it; the routes here keep their own subscription (bounded buffer,
//! pause while the app is down, drain on stop), so this module answers the discovery
//! verbs itself and takes the per-endpoint numbers from [`EndpointStats`], which the
//! request handler updates. The JSON shapes are built by pure functions, tested below.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use http::StatusCode;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Inbound, InboundMode};

/// One endpoint's numbers since the sidecar started (they survive a route's restart on
/// reload: the endpoint is the same).
#[derive(Default)]
pub(crate) struct EndpointStats {
    requests: AtomicU64,
    errors: AtomicU64,
    processing_nanos: AtomicU64,
    last_error: Mutex<String>,
}

impl EndpointStats {
    /// One handled request. A status of 400 or more is an error: its reply carries the
    /// `Nats-Service-Error` headers, which is what micro clients count as one.
    pub(crate) fn record(&self, status: StatusCode, took: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.processing_nanos.fetch_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
        if status.as_u16() >= 400 {
            self.errors.fetch_add(1, Ordering::Relaxed);
            // async-nats and nats.go print a service error as "<code>:<description>".
            let text = format!("{}:{}", status.as_u16(), status.canonical_reason().unwrap_or("error"));
            *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = text;
        }
    }

    fn json(&self, endpoint: &Value) -> Value {
        let requests = self.requests.load(Ordering::Relaxed);
        let nanos = self.processing_nanos.load(Ordering::Relaxed);
        let mut v = endpoint.clone();
        let o = v.as_object_mut().expect("an endpoint is an object");
        o.remove("metadata");
        o.insert("num_requests".into(), json!(requests));
        o.insert("num_errors".into(), json!(self.errors.load(Ordering::Relaxed)));
        o.insert("last_error".into(), json!(self.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone()));
        o.insert("processing_time".into(), json!(nanos));
        o.insert("average_processing_time".into(), json!(nanos.checked_div(requests).unwrap_or(0)));
        // Optional in ADR-32, but nats-py's parser requires the key.
        o.insert("data".into(), json!({}));
        v
    }
}

/// Every endpoint's stats, by route name.
#[derive(Default)]
pub(crate) struct Endpoints(Mutex<HashMap<String, Arc<EndpointStats>>>);

impl Endpoints {
    pub(crate) fn get(&self, route: &str) -> Arc<EndpointStats> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).entry(route.to_owned()).or_default().clone()
    }
}

/// The routes announced: inbound `request` routes.
pub(crate) fn announced(inbound: &Inbound) -> bool {
    matches!(inbound.mode, InboundMode::Request { .. })
}

/// A micro service name: `A-Z a-z 0-9 - _` (ADR-32).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Which verb a `$SRV.<VERB>[.<name>[.<id>]]` subject asks this instance, if it is ours.
pub fn verb<'a>(subject: &'a str, name: &str, id: &str) -> Option<&'a str> {
    let mut t = subject.split('.');
    if t.next() != Some("$SRV") {
        return None;
    }
    let verb = t.next().filter(|v| matches!(*v, "PING" | "INFO" | "STATS"))?;
    match (t.next(), t.next(), t.next()) {
        (None, _, _) => Some(verb),
        (Some(n), None, _) if n == name => Some(verb),
        (Some(n), Some(i), None) if n == name && i == id => Some(verb),
        _ => None,
    }
}

/// Who this instance is: the fields every response starts with.
pub struct Identity {
    pub name: String,
    pub id: String,
    pub started: SystemTime,
}

fn standard(kind: &str, me: &Identity, config: &Config) -> serde_json::Map<String, Value> {
    let v = json!({
        "type": format!("io.nats.micro.v1.{kind}_response"),
        "name": me.name,
        "id": me.id,
        "version": config.sidecar.version,
        "metadata": { "natsbridge.version": env!("CARGO_PKG_VERSION") },
    });
    match v {
        Value::Object(o) => o,
        _ => unreachable!("an object"),
    }
}

/// One endpoint as `INFO` lists it.
fn endpoint(i: &Inbound) -> Value {
    let queue = match &i.mode {
        InboundMode::Request { queue } | InboundMode::Tunnel { queue } => queue.as_str(),
        InboundMode::JetStream(_) => "",
    };
    json!({
        "name": i.name,
        "subject": i.subject.as_str(),
        "queue_group": queue,
        "metadata": { "method": i.method.as_str(), "path": i.path.as_str() },
    })
}

/// The response to `verb` (`PING`, `INFO` or `STATS`).
pub(crate) fn respond(verb: &str, me: &Identity, config: &Config, stats: &Endpoints) -> Value {
    let routes = config.inbound.iter().filter(|i| announced(i));
    let o = match verb {
        "PING" => standard("ping", me, config),
        "INFO" => {
            let mut o = standard("info", me, config);
            o.insert("description".into(), json!(format!("natsbridge sidecar of {}: its inbound request routes", me.name)));
            o.insert("endpoints".into(), routes.map(endpoint).collect());
            o
        }
        _ => {
            let mut o = standard("stats", me, config);
            o.insert("started".into(), json!(humantime::format_rfc3339_millis(me.started).to_string()));
            o.insert("endpoints".into(), routes.map(|i| stats.get(&i.name).json(&endpoint(i))).collect());
            o
        }
    };
    Value::Object(o)
}

/// Discovery follows the routing file: announced while it has request routes, started
/// by the reload that adds the first and stopped by the one that removes the last.
pub(crate) struct Discovery {
    nats: async_nats::Client,
    config: watch::Receiver<Arc<Config>>,
    stats: Arc<Endpoints>,
    shutdown: CancellationToken,
    running: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

impl Discovery {
    pub(crate) fn new(
        nats: async_nats::Client,
        config: watch::Receiver<Arc<Config>>,
        stats: Arc<Endpoints>,
        shutdown: CancellationToken,
    ) -> Self {
        Self { nats, config, stats, shutdown, running: None }
    }

    /// Starts or stops answering `$SRV` as `config` has request routes or not.
    pub(crate) async fn follow(&mut self, config: &Config) {
        let wanted = config.inbound.iter().any(announced);
        match (&self.running, wanted) {
            (None, true) => {
                let stop = self.shutdown.child_token();
                let task = tokio::spawn(serve(self.nats.clone(), self.config.clone(), self.stats.clone(), stop.clone()));
                self.running = Some((stop, task));
            }
            (Some(_), false) => {
                self.stop().await;
                tracing::info!("no request routes left: no longer announced over NATS micro");
            }
            _ => {}
        }
    }

    /// Stops answering and waits until the subscriptions are gone.
    pub(crate) async fn stop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            stop.cancel();
            let _ = task.await;
        }
    }
}

/// Answers the discovery verbs until `stop`, resubscribing after the subscription ends.
pub(crate) async fn serve(nats: async_nats::Client, config: watch::Receiver<Arc<Config>>, stats: Arc<Endpoints>, stop: CancellationToken) {
    let name = config.borrow().sidecar.service.clone();
    if !valid_name(&name) {
        tracing::warn!(service = %name, "not announced over NATS micro: a micro service name is letters, digits, '-' and '_'");
        return;
    }
    let me = Identity { name, id: uuid::Uuid::new_v4().simple().to_string(), started: SystemTime::now() };
    let subjects = ["$SRV.*".to_owned(), format!("$SRV.*.{}", me.name), format!("$SRV.*.{}.{}", me.name, me.id)];
    while !stop.is_cancelled() {
        let mut subs = Vec::new();
        for s in &subjects {
            match nats.subscribe(s.clone()).await {
                Ok(sub) => subs.push(sub),
                Err(e) => tracing::warn!(subject = %s, error = %e, "micro discovery: cannot subscribe"),
            }
        }
        if subs.is_empty() {
            if crate::ingress::sleep_or_stop(&stop, Duration::from_secs(2)).await {
                return;
            }
            continue;
        }
        tracing::info!(service = %me.name, id = %me.id, "announced over NATS micro ($SRV.PING|INFO|STATS)");
        let mut all = futures::stream::select_all(subs);
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return,
                m = all.next() => m,
            };
            let Some(msg) = msg else { break };
            let (Some(reply), Some(verb)) = (msg.reply.clone(), verb(msg.subject.as_str(), &me.name, &me.id)) else { continue };
            let body = serde_json::to_vec(&respond(verb, &me, &config.borrow(), &stats)).unwrap_or_default();
            if let Err(e) = nats.publish(reply, body.into()).await {
                tracing::debug!(error = %e, "micro discovery: reply not sent");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = r#"[sidecar]
service = "agent-service"
version = "1.4.0"

[[inbound]]
name = "execute"
subject = "agent.*.execute"
mode = "request"
method = "POST"
path = "/agents/{2}/execute"

[[inbound]]
name = "tool"
subject = "tool.run"
mode = "tunnel"
"#;

    fn me() -> Identity {
        Identity { name: "agent-service".into(), id: "abc".into(), started: SystemTime::UNIX_EPOCH }
    }

    #[test]
    fn only_our_subjects_are_answered() {
        assert_eq!(verb("$SRV.PING", "agent-service", "abc"), Some("PING"));
        assert_eq!(verb("$SRV.INFO.agent-service", "agent-service", "abc"), Some("INFO"));
        assert_eq!(verb("$SRV.STATS.agent-service.abc", "agent-service", "abc"), Some("STATS"));
        assert_eq!(verb("$SRV.STATS.other", "agent-service", "abc"), None);
        assert_eq!(verb("$SRV.PING.agent-service.xyz", "agent-service", "abc"), None);
        assert_eq!(verb("$SRV.FOO", "agent-service", "abc"), None);
        assert!(valid_name("agent_service-2") && !valid_name("a:b"));
    }

    #[test]
    fn responses_have_the_adr_32_shapes() {
        let config = crate::config::parse(ROUTES, "t").unwrap();
        let stats = Endpoints::default();
        let ping = respond("PING", &me(), &config, &stats);
        assert_eq!(ping["type"], "io.nats.micro.v1.ping_response");
        assert_eq!(
            (ping["name"].as_str(), ping["id"].as_str(), ping["version"].as_str()),
            (Some("agent-service"), Some("abc"), Some("1.4.0"))
        );
        assert!(ping["metadata"].is_object());

        let info = respond("INFO", &me(), &config, &stats);
        assert_eq!(info["type"], "io.nats.micro.v1.info_response");
        assert!(info["description"].is_string());
        let eps = info["endpoints"].as_array().unwrap();
        assert_eq!(eps.len(), 1, "tunnel routes are not endpoints: {info:#}");
        assert_eq!(eps[0]["name"], "execute");
        assert_eq!(eps[0]["subject"], "agent.*.execute");
        assert_eq!(eps[0]["queue_group"], "agent-service");

        stats.get("execute").record(StatusCode::OK, Duration::from_millis(3));
        stats.get("execute").record(StatusCode::SERVICE_UNAVAILABLE, Duration::from_millis(1));
        let st = respond("STATS", &me(), &config, &stats);
        assert_eq!(st["type"], "io.nats.micro.v1.stats_response");
        assert_eq!(st["started"], "1970-01-01T00:00:00.000Z");
        let e = &st["endpoints"][0];
        assert_eq!((e["num_requests"].as_u64(), e["num_errors"].as_u64()), (Some(2), Some(1)));
        assert_eq!(e["last_error"], "503:Service Unavailable");
        assert_eq!(e["processing_time"], 4_000_000);
        assert_eq!(e["average_processing_time"], 2_000_000);
        assert_eq!(e["queue_group"], "agent-service");
    }
}
