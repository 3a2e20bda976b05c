//! Prometheus metrics: every family the sidecar exports (all prefixed `natsbridge_`, with
//! units in the name), and pre-resolved per-route handles so the hot path takes no locks.

use std::cell::RefCell;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Latency buckets from 100µs to 60s: sidecar overhead is sub-millisecond, app calls are not.
const BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Every family name registered, in registration order (for `natsbridge metrics` and the
    /// dashboard check): the registry itself only lists families that have a series.
    names: Vec<String>,
    pub egress_requests: IntCounterVec,
    pub egress_duration: HistogramVec,
    pub egress_in_flight: IntGauge,
    pub nats_connected: IntGauge,
    pub nats_reconnects: IntCounter,
    pub config_reloads: IntCounter,
    pub config_reload_failures: IntCounter,
    pub jetstream_in_flight: IntGauge,
    pub pending_replies: IntGauge,
    pub late_replies: IntCounter,
    pub ingress_deliveries: IntCounterVec,
    pub ingress_outcomes: IntCounterVec,
    pub ingress_duration: HistogramVec,
    pub ingress_in_flight: IntGaugeVec,
    pub ingress_pending: IntGaugeVec,
    pub ingress_refused: IntCounterVec,
    pub slow_consumers: IntCounter,
    pub idempotency: IntCounterVec,
    pub dlq_published: IntCounterVec,
    pub dlq_stored: IntGaugeVec,
    pub dlq_fill_ratio: GaugeVec,
    pub component_up: IntGaugeVec,
    pub egress_forwarded: IntCounterVec,
    pub egress_tunnels: IntCounterVec,
    pub egress_tunnels_open: IntGauge,
    pub contract_violations: IntCounterVec,
    /// The `host` label values of the two families above, capped.
    pub forward_hosts: HostLabels,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Registers `c` and records its family names.
fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, names: &RefCell<Vec<String>>, c: C) -> C {
    names.borrow_mut().extend(c.desc().iter().map(|d| d.fq_name.clone()));
    r.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let names = RefCell::new(Vec::new());
        let counter = |name: &str, help: &str| reg(&r, &names, IntCounter::new(name, help).expect("valid metric"));
        let gauge = |name: &str, help: &str| reg(&r, &names, IntGauge::new(name, help).expect("valid metric"));
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(&r, &names, IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(&r, &names, IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
        };
        let histogram_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(&r, &names, HistogramVec::new(HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()), labels).expect("valid metric"))
        };
        Self {
            egress_requests: counter_vec(
                "natsbridge_egress_requests_total",
                "Egress requests by route, mode and status class.",
                &["route", "mode", "status_class"],
            ),
            egress_duration: histogram_vec(
                "natsbridge_egress_request_duration_seconds",
                "Egress request latency in seconds, by route.",
                &["route"],
            ),
            egress_in_flight: gauge("natsbridge_egress_requests_in_flight", "Egress requests being handled."),
            nats_connected: gauge("natsbridge_nats_connected", "1 while connected to NATS, else 0."),
            nats_reconnects: counter("natsbridge_nats_reconnects_total", "NATS reconnections since start."),
            config_reloads: counter("natsbridge_config_reloads_total", "Routing files loaded by hot reload."),
            config_reload_failures: counter("natsbridge_config_reload_failures_total", "Routing files rejected by hot reload."),
            jetstream_in_flight: gauge("natsbridge_jetstream_publishes_in_flight", "JetStream publishes waiting for their ack."),
            pending_replies: gauge("natsbridge_pending_replies", "NATS requests and JetStream publishes waiting for their reply or ack."),
            late_replies: counter(
                "natsbridge_late_replies_total",
                "Replies and acks dropped because nobody waits for them any more (timed out, cancelled).",
            ),
            ingress_deliveries: counter_vec("natsbridge_ingress_deliveries_total", "Messages received by inbound routes.", &["route"]),
            ingress_outcomes: counter_vec(
                "natsbridge_ingress_outcomes_total",
                "Inbound message outcomes: ack, nak, term, dlq, reply.",
                &["route", "outcome"],
            ),
            ingress_duration: histogram_vec(
                "natsbridge_ingress_handler_duration_seconds",
                "App handler latency in seconds, by inbound route.",
                &["route"],
            ),
            ingress_in_flight: gauge_vec("natsbridge_ingress_in_flight", "Inbound messages being handled.", &["route"]),
            ingress_pending: gauge_vec(
                "natsbridge_ingress_consumer_pending",
                "Messages pending on the route's consumer (lag).",
                &["route"],
            ),
            ingress_refused: counter_vec(
                "natsbridge_ingress_refused_total",
                "Inbound messages refused before reaching the app, by reason: reply_subject (a reply subject outside reply_prefixes), request (a method or path the route does not replay), buffer_full (over the route's buffer).",
                &["route", "reason"],
            ),
            slow_consumers: counter("natsbridge_nats_slow_consumers_total", "Slow-consumer events reported by the NATS client."),
            idempotency: counter_vec(
                "natsbridge_idempotency_total",
                "Idempotency store results: hit, claim, conflict, release, missing_key, stored, error.",
                &["route", "result"],
            ),
            dlq_published: counter_vec(
                "natsbridge_dlq_published_total",
                "Dead letters published, by route and reason.",
                &["route", "reason"],
            ),
            dlq_stored: gauge_vec(
                "natsbridge_dlq_stored",
                "What the dead-letter stream holds now, by unit: messages, bytes.",
                &["unit"],
            ),
            dlq_fill_ratio: reg(
                &r,
                &names,
                GaugeVec::new(
                    Opts::new(
                        "natsbridge_dlq_fill_ratio",
                        "The dead-letter stream's stored messages or bytes over its max_msgs or max_bytes (limit label), for each limit that is set; at 1 new dead letters are refused and their messages redelivered instead.",
                    ),
                    &["limit"],
                )
                .expect("valid metric"),
            ),
            component_up: gauge_vec(
                "natsbridge_component_up",
                "1 while the component (nats, egress, provision, inbound:<route>, idempotency, …) is up, else 0 (see /statusz).",
                &["component"],
            ),
            egress_forwarded: counter_vec(
                "natsbridge_egress_forwarded_total",
                "Calls no route takes, forwarded to their origin as plain HTTP (also counted in natsbridge_egress_requests_total with route=\"(unmatched)\"), by host (the first 50 hosts seen, then \"other\") and status class: what still has to move to NATS.",
                &["host", "status_class"],
            ),
            egress_tunnels: counter_vec(
                "natsbridge_egress_tunnels_total",
                "Byte tunnels: CONNECT (kind=connect) and protocol upgrades such as WebSocket (kind=upgrade), by host (capped like natsbridge_egress_forwarded_total) and outcome: opened, routed (a CONNECT to a host with routes, answered by the sidecar itself), refused, failed.",
                &["kind", "host", "outcome"],
            ),
            egress_tunnels_open: gauge("natsbridge_egress_tunnels_open", "Byte tunnels (CONNECT, upgrades) open now."),
            contract_violations: counter_vec(
                "natsbridge_contract_violations_total",
                "Messages refused at the border by their route's contract, by route, direction (egress: an app's body, never sent; ingress: a NATS message, never given to the app) and reason: schema (the body breaks the contract), schema-version (it names a version the route does not accept).",
                &["route", "direction", "reason"],
            ),
            forward_hosts: HostLabels::new(MAX_HOST_LABELS),
            registry: r,
            names: names.into_inner(),
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(8 << 10);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }

    /// The family names registered, whether or not any series exists yet.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Handles for one egress route, resolved once per config load.
    pub fn egress_route(&self, route: &str, mode: &str) -> EgressRouteMetrics {
        let class = |c: &str| self.egress_requests.with_label_values(&[route, mode, c]);
        EgressRouteMetrics {
            by_class: [class("1xx"), class("2xx"), class("3xx"), class("4xx"), class("5xx")],
            duration: self.egress_duration.with_label_values(&[route]),
        }
    }

    /// Handles for one inbound route, resolved once at subscription time.
    pub fn ingress_route(&self, route: &str) -> IngressRouteMetrics {
        let outcome = |o: &str| self.ingress_outcomes.with_label_values(&[route, o]);
        IngressRouteMetrics {
            deliveries: self.ingress_deliveries.with_label_values(&[route]),
            ack: outcome("ack"),
            nak: outcome("nak"),
            term: outcome("term"),
            dlq: outcome("dlq"),
            reply: outcome("reply"),
            duration: self.ingress_duration.with_label_values(&[route]),
            in_flight: self.ingress_in_flight.with_label_values(&[route]),
            pending: self.ingress_pending.with_label_values(&[route]),
            refused_reply: self.ingress_refused.with_label_values(&[route, "reply_subject"]),
            refused_request: self.ingress_refused.with_label_values(&[route, "request"]),
            buffer_full: self.ingress_refused.with_label_values(&[route, "buffer_full"]),
        }
    }
}

/// Distinct `host` label values before later hosts are counted as `other`.
pub const MAX_HOST_LABELS: usize = 50;

/// The `host` label of forwarded calls: the first `max` distinct hosts keep their name,
/// later ones are `other`, so an app calling many hosts cannot grow the series without
/// bound. (Hosts seen first are usually the busiest: the ones called at start.)
#[derive(Clone)]
pub struct HostLabels {
    max: usize,
    seen: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl HostLabels {
    pub fn new(max: usize) -> Self {
        Self { max, seen: Default::default() }
    }

    /// The label for `host` (lower-cased, port kept: `api.example.com:8080`).
    pub fn label(&self, host: &str) -> String {
        let host = host.to_ascii_lowercase();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(&host) {
            return host;
        }
        if seen.len() < self.max {
            seen.insert(host.clone());
            return host;
        }
        "other".to_owned()
    }
}

/// The `status_class` label of a status: `1xx` … `5xx`.
pub fn status_class(status: http::StatusCode) -> &'static str {
    ["1xx", "2xx", "3xx", "4xx", "5xx"][(status.as_u16() / 100).clamp(1, 5) as usize - 1]
}

/// Counts one unit in flight on a gauge for as long as it lives, however the work ends.
pub struct InFlight<'a>(&'a prometheus::IntGauge);

impl<'a> InFlight<'a> {
    pub fn new(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[derive(Clone)]
pub struct EgressRouteMetrics {
    by_class: [IntCounter; 5],
    pub duration: Histogram,
}

impl EgressRouteMetrics {
    pub fn observe(&self, status: http::StatusCode, seconds: f64) {
        let idx = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.by_class[idx].inc();
        self.duration.observe(seconds);
    }
}

#[derive(Clone)]
pub struct IngressRouteMetrics {
    pub deliveries: IntCounter,
    pub ack: IntCounter,
    pub nak: IntCounter,
    pub term: IntCounter,
    pub dlq: IntCounter,
    pub reply: IntCounter,
    pub duration: Histogram,
    pub in_flight: IntGauge,
    pub pending: IntGauge,
    pub refused_reply: IntCounter,
    pub refused_request: IntCounter,
    pub buffer_full: IntCounter,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_registered_and_prefixed() {
        let m = Metrics::new();
        let names = m.names();
        assert!(names.len() >= 16, "{names:?}");
        assert!(names.iter().all(|n| n.starts_with("natsbridge_")), "{names:?}");
        let text = String::from_utf8(m.encode()).unwrap();
        // Families without labels are exported from the start, under the names listed.
        for n in ["natsbridge_nats_connected", "natsbridge_egress_requests_in_flight", "natsbridge_nats_reconnects_total"] {
            assert!(names.iter().any(|x| x == n) && text.contains(&format!("# TYPE {n} ")), "{n}");
        }
    }

    #[test]
    fn host_labels_are_capped() {
        let h = HostLabels::new(2);
        assert_eq!(h.label("A.example:80"), "a.example:80");
        assert_eq!(h.label("b"), "b");
        assert_eq!(h.label("c"), "other");
        assert_eq!(h.label("a.example:80"), "a.example:80");
        assert_eq!(status_class(http::StatusCode::SWITCHING_PROTOCOLS), "1xx");
        assert_eq!(status_class(http::StatusCode::BAD_GATEWAY), "5xx");
    }

    #[test]
    fn route_handles_show_up_in_the_exposition() {
        let m = Metrics::new();
        m.egress_route("exec", "request").observe(http::StatusCode::ACCEPTED, 0.001);
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(text.contains(r#"natsbridge_egress_requests_total{mode="request",route="exec",status_class="2xx"} 1"#), "{text}");
        assert!(text.contains("natsbridge_egress_request_duration_seconds_bucket"));
    }
}
