//! Prometheus metrics: every family the sidecar exports (all prefixed `natsbridge_`, with
//! units in the name), and pre-resolved per-route handles so the hot path takes no locks.

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
    pub ingress_ack_floor: IntGaugeVec,
    pub ingress_refused: IntCounterVec,
    pub slow_consumers: IntCounter,
    pub idempotency: IntCounterVec,
    pub dlq_published: IntCounterVec,
    pub dlq_too_large: IntCounterVec,
    pub dlq_stored: IntGaugeVec,
    pub dlq_fill_ratio: GaugeVec,
    pub component_up: IntGaugeVec,
    pub egress_forwarded: IntCounterVec,
    pub egress_tunnels: IntCounterVec,
    pub egress_tunnels_open: IntGauge,
    pub shadow: IntCounterVec,
    pub fallback: IntCounterVec,
    /// Streamed replies by side (`reader`: egress, `responder`: ingress), route and how
    /// they ended.
    pub streams: IntCounterVec,
    pub contract_violations: IntCounterVec,
    /// The `host` label values of the two families above, capped.
    pub forward_hosts: HostLabels,
    /// The sidecar's own time per request, finer than the Prometheus buckets.
    pub own_time: std::sync::Arc<crate::own_time::OwnTime>,
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

/// One metric family as declared: its name, help text and label names.
struct Family {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
}

// The families, by name; `Metrics::new` registers each under its field.
const EGRESS_REQUESTS: Family = Family {
    name: "natsbridge_egress_requests_total",
    help: "Egress requests by route, mode, path (nats or http: a cut-over route takes both) and status class.",
    labels: &["route", "mode", "path", "status_class"],
};
const EGRESS_DURATION: Family = Family {
    name: "natsbridge_egress_request_duration_seconds",
    help: "Egress request latency in seconds, by route and path (nats or http).",
    labels: &["route", "path"],
};
const EGRESS_IN_FLIGHT: Family =
    Family { name: "natsbridge_egress_requests_in_flight", help: "Egress requests being handled.", labels: &[] };
const NATS_CONNECTED: Family = Family { name: "natsbridge_nats_connected", help: "1 while connected to NATS, else 0.", labels: &[] };
const NATS_RECONNECTS: Family = Family { name: "natsbridge_nats_reconnects_total", help: "NATS reconnections since start.", labels: &[] };
const CONFIG_RELOADS: Family = Family { name: "natsbridge_config_reloads_total", help: "Routing files loaded by hot reload.", labels: &[] };
const CONFIG_RELOAD_FAILURES: Family =
    Family { name: "natsbridge_config_reload_failures_total", help: "Routing files rejected by hot reload.", labels: &[] };
const JETSTREAM_IN_FLIGHT: Family =
    Family { name: "natsbridge_jetstream_publishes_in_flight", help: "JetStream publishes waiting for their ack.", labels: &[] };
const PENDING_REPLIES: Family = Family {
    name: "natsbridge_pending_replies",
    help: "NATS requests and JetStream publishes waiting for their reply or ack.",
    labels: &[],
};
const LATE_REPLIES: Family = Family {
    name: "natsbridge_late_replies_total",
    help: "Replies and acks dropped because nobody waits for them any more (timed out, cancelled).",
    labels: &[],
};
const INGRESS_DELIVERIES: Family =
    Family { name: "natsbridge_ingress_deliveries_total", help: "Messages received by inbound routes.", labels: &["route"] };
const INGRESS_OUTCOMES: Family = Family {
    name: "natsbridge_ingress_outcomes_total",
    help: "Inbound message outcomes: ack, nak, term, dlq, reply.",
    labels: &["route", "outcome"],
};
const INGRESS_DURATION: Family = Family {
    name: "natsbridge_ingress_handler_duration_seconds",
    help: "App handler latency in seconds, by inbound route.",
    labels: &["route"],
};
const INGRESS_IN_FLIGHT: Family =
    Family { name: "natsbridge_ingress_in_flight", help: "Inbound messages being handled.", labels: &["route"] };
const INGRESS_PENDING: Family =
    Family { name: "natsbridge_ingress_consumer_pending", help: "Messages pending on the route's consumer (lag).", labels: &["route"] };
const INGRESS_ACK_FLOOR: Family = Family {
    name: "natsbridge_ingress_consumer_ack_floor",
    help: "The stream sequence up to which the route's consumer has every message acked, as the sidecar last read it (every 2 s).",
    labels: &["route"],
};
const INGRESS_REFUSED: Family = Family {
    name: "natsbridge_ingress_refused_total",
    help: "Inbound messages refused before reaching the app, by reason: reply_subject (a reply subject outside reply_prefixes), request (a method or path the route does not replay), buffer_full (over the route's buffer).",
    labels: &["route", "reason"],
};
const SLOW_CONSUMERS: Family =
    Family { name: "natsbridge_nats_slow_consumers_total", help: "Slow-consumer events reported by the NATS client.", labels: &[] };
const IDEMPOTENCY: Family = Family {
    name: "natsbridge_idempotency_total",
    help: "Idempotency store results: hit, claim, conflict, release, missing_key, stored, error.",
    labels: &["route", "result"],
};
const DLQ_PUBLISHED: Family =
    Family { name: "natsbridge_dlq_published_total", help: "Dead letters published, by route and reason.", labels: &["route", "reason"] };
const DLQ_TOO_LARGE: Family = Family {
    name: "natsbridge_dlq_too_large_total",
    help: "Dead letters too large to publish even with their description trimmed (the payload alone is near max_payload, or over the dead-letter stream's max_msg_size); each message is nak'ed and comes back.",
    labels: &["route"],
};
const DLQ_STORED: Family =
    Family { name: "natsbridge_dlq_stored", help: "What the dead-letter stream holds now, by unit: messages, bytes.", labels: &["unit"] };
const DLQ_FILL_RATIO: Family = Family {
    name: "natsbridge_dlq_fill_ratio",
    help: "The dead-letter stream's stored messages or bytes over its max_msgs or max_bytes (limit label), for each limit that is set; at 1 new dead letters are refused and their messages redelivered instead.",
    labels: &["limit"],
};
const COMPONENT_UP: Family = Family {
    name: "natsbridge_component_up",
    help: "1 while the component (nats, egress, provision, inbound:<route>, idempotency, …) is up, else 0 (see /statusz).",
    labels: &["component"],
};
const EGRESS_FORWARDED: Family = Family {
    name: "natsbridge_egress_forwarded_total",
    help: "Calls no route takes, forwarded to their origin as plain HTTP (also counted in natsbridge_egress_requests_total with route=\"(unmatched)\"), by host (the first 50 hosts seen, then \"other\") and status class: what still has to move to NATS.",
    labels: &["host", "status_class"],
};
const EGRESS_TUNNELS: Family = Family {
    name: "natsbridge_egress_tunnels_total",
    help: "Byte tunnels: CONNECT (kind=connect) and protocol upgrades such as WebSocket (kind=upgrade), by host (capped like natsbridge_egress_forwarded_total) and outcome: opened, routed (a CONNECT to a host with routes, answered by the sidecar itself), refused, failed.",
    labels: &["kind", "host", "outcome"],
};
const EGRESS_TUNNELS_OPEN: Family =
    Family { name: "natsbridge_egress_tunnels_open", help: "Byte tunnels (CONNECT, upgrades) open now.", labels: &[] };
const SHADOW: Family = Family {
    name: "natsbridge_shadow_total",
    help: "Cut-over shadow copies (answered over HTTP, sent over NATS too) by route and result: match, status_mismatch, body_mismatch, error, timeout, skipped (shadow concurrency full).",
    labels: &["route", "result"],
};
const FALLBACK: Family = Family {
    name: "natsbridge_fallback_total",
    help: "Cut-over calls sent to the route's HTTP upstream after NATS failed before any responder got them, by reason: disconnected, no_responders, no_stream.",
    labels: &["route", "reason"],
};
const STREAMS: Family = Family {
    name: "natsbridge_streams_total",
    help: "Streamed replies by side (reader: the egress route reading one, responder: the inbound route sending one), route and end: complete, error (the responder failed), cancel (the reader left), gap, stall, limit (stream_max), overflow (a reader slower than stream_buffer), gone (no reader any more).",
    labels: &["side", "route", "end"],
};
const CONTRACT_VIOLATIONS: Family = Family {
    name: "natsbridge_contract_violations_total",
    help: "Messages refused at the border by their route's contract, by route, direction (egress: an app's body, never sent; ingress: a NATS message, never given to the app) and reason: schema (the body breaks the contract), schema-version (it names a version the route does not accept).",
    labels: &["route", "direction", "reason"],
};

/// Registers families and records their names, in registration order.
struct Registrar {
    registry: Registry,
    names: Vec<String>,
}

impl Registrar {
    fn reg<C: prometheus::core::Collector + Clone + 'static>(&mut self, c: C) -> C {
        self.names.extend(c.desc().iter().map(|d| d.fq_name.clone()));
        self.registry.register(Box::new(c.clone())).expect("metric names are unique");
        c
    }
    fn counter(&mut self, f: &Family) -> IntCounter {
        self.reg(IntCounter::new(f.name, f.help).expect("valid metric"))
    }
    fn gauge(&mut self, f: &Family) -> IntGauge {
        self.reg(IntGauge::new(f.name, f.help).expect("valid metric"))
    }
    fn counter_vec(&mut self, f: &Family) -> IntCounterVec {
        self.reg(IntCounterVec::new(Opts::new(f.name, f.help), f.labels).expect("valid metric"))
    }
    fn gauge_vec(&mut self, f: &Family) -> IntGaugeVec {
        self.reg(IntGaugeVec::new(Opts::new(f.name, f.help), f.labels).expect("valid metric"))
    }
    fn float_gauge_vec(&mut self, f: &Family) -> GaugeVec {
        self.reg(GaugeVec::new(Opts::new(f.name, f.help), f.labels).expect("valid metric"))
    }
    fn histogram_vec(&mut self, f: &Family) -> HistogramVec {
        let opts = HistogramOpts::new(f.name, f.help).buckets(BUCKETS.to_vec());
        self.reg(HistogramVec::new(opts, f.labels).expect("valid metric"))
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registrar { registry: Registry::new(), names: Vec::new() };
        Self {
            egress_requests: r.counter_vec(&EGRESS_REQUESTS),
            egress_duration: r.histogram_vec(&EGRESS_DURATION),
            egress_in_flight: r.gauge(&EGRESS_IN_FLIGHT),
            nats_connected: r.gauge(&NATS_CONNECTED),
            nats_reconnects: r.counter(&NATS_RECONNECTS),
            config_reloads: r.counter(&CONFIG_RELOADS),
            config_reload_failures: r.counter(&CONFIG_RELOAD_FAILURES),
            jetstream_in_flight: r.gauge(&JETSTREAM_IN_FLIGHT),
            pending_replies: r.gauge(&PENDING_REPLIES),
            late_replies: r.counter(&LATE_REPLIES),
            ingress_deliveries: r.counter_vec(&INGRESS_DELIVERIES),
            ingress_outcomes: r.counter_vec(&INGRESS_OUTCOMES),
            ingress_duration: r.histogram_vec(&INGRESS_DURATION),
            ingress_in_flight: r.gauge_vec(&INGRESS_IN_FLIGHT),
            ingress_pending: r.gauge_vec(&INGRESS_PENDING),
            ingress_ack_floor: r.gauge_vec(&INGRESS_ACK_FLOOR),
            ingress_refused: r.counter_vec(&INGRESS_REFUSED),
            slow_consumers: r.counter(&SLOW_CONSUMERS),
            idempotency: r.counter_vec(&IDEMPOTENCY),
            dlq_published: r.counter_vec(&DLQ_PUBLISHED),
            dlq_too_large: r.counter_vec(&DLQ_TOO_LARGE),
            dlq_stored: r.gauge_vec(&DLQ_STORED),
            dlq_fill_ratio: r.float_gauge_vec(&DLQ_FILL_RATIO),
            component_up: r.gauge_vec(&COMPONENT_UP),
            egress_forwarded: r.counter_vec(&EGRESS_FORWARDED),
            egress_tunnels: r.counter_vec(&EGRESS_TUNNELS),
            egress_tunnels_open: r.gauge(&EGRESS_TUNNELS_OPEN),
            shadow: r.counter_vec(&SHADOW),
            fallback: r.counter_vec(&FALLBACK),
            streams: r.counter_vec(&STREAMS),
            contract_violations: r.counter_vec(&CONTRACT_VIOLATIONS),
            forward_hosts: HostLabels::new(MAX_HOST_LABELS),
            own_time: std::sync::Arc::new(crate::own_time::OwnTime::new()),
            registry: r.registry,
            names: r.names,
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

    /// Handles for one egress route, resolved once per config load: for the path its
    /// calls take (`path`), and for HTTP as well when it is a cut-over route (`cutover`).
    pub fn egress_route(&self, route: &str, mode: &str, path: EgressPath, cutover: bool) -> EgressRouteMetrics {
        let handles = |p: EgressPath| {
            let class = |c: &str| self.egress_requests.with_label_values(&[route, mode, p.as_str(), c]);
            PathMetrics {
                by_class: [class("1xx"), class("2xx"), class("3xx"), class("4xx"), class("5xx")],
                duration: self.egress_duration.with_label_values(&[route, p.as_str()]),
            }
        };
        let both = cutover || path == EgressPath::Http;
        EgressRouteMetrics {
            nats: (path == EgressPath::Nats).then(|| handles(EgressPath::Nats)),
            http: both.then(|| handles(EgressPath::Http)),
            default: path,
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
            ack_floor: self.ingress_ack_floor.with_label_values(&[route]),
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

/// Which way an egress call went: over NATS, or as plain HTTP (`http` routes, forwarded
/// calls, and a cut-over route's upstream share, shadows' answers and fallbacks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EgressPath {
    Nats,
    Http,
}

impl EgressPath {
    pub fn as_str(self) -> &'static str {
        match self {
            EgressPath::Nats => "nats",
            EgressPath::Http => "http",
        }
    }
}

#[derive(Clone)]
struct PathMetrics {
    by_class: [IntCounter; 5],
    duration: Histogram,
}

#[derive(Clone)]
pub struct EgressRouteMetrics {
    default: EgressPath,
    nats: Option<PathMetrics>,
    http: Option<PathMetrics>,
}

impl EgressRouteMetrics {
    /// One answered call on the route's own path.
    pub fn observe(&self, status: http::StatusCode, seconds: f64) {
        self.observe_on(self.default, status, seconds);
    }

    /// One answered call on `path` (the route's own path when it has no handles for it).
    pub fn observe_on(&self, path: EgressPath, status: http::StatusCode, seconds: f64) {
        let m = match path {
            EgressPath::Nats => self.nats.as_ref(),
            EgressPath::Http => self.http.as_ref(),
        };
        let Some(m) = m.or(self.nats.as_ref()).or(self.http.as_ref()) else { return };
        let idx = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        m.by_class[idx].inc();
        m.duration.observe(seconds);
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
    pub ack_floor: IntGauge,
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
        m.egress_route("exec", "request", EgressPath::Nats, false).observe(http::StatusCode::ACCEPTED, 0.001);
        let cut = m.egress_route("cut", "request", EgressPath::Nats, true);
        cut.observe_on(EgressPath::Http, http::StatusCode::OK, 0.001);
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(
            text.contains(r#"natsbridge_egress_requests_total{mode="request",path="nats",route="exec",status_class="2xx"} 1"#),
            "{text}"
        );
        assert!(!text.contains(r#"path="http",route="exec""#), "{text}");
        assert!(
            text.contains(r#"natsbridge_egress_requests_total{mode="request",path="http",route="cut",status_class="2xx"} 1"#),
            "{text}"
        );
        assert!(text.contains("natsbridge_egress_request_duration_seconds_bucket"));
    }
}
