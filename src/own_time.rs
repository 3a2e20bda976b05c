//! The sidecar's own time per request, in HdrHistograms, served as JSON on the admin
//! listener's `GET /debug/own-time` (`?reset=1` empties them after reading).
//!
//! Why: end-to-end latency minus a baseline's latency is not the sidecar's cost at a
//! percentile (percentiles do not subtract). These are measured per request, inside the
//! process, so the benchmark can report the sidecar's share without arithmetic on
//! percentiles of different runs. The Prometheus histograms have fixed buckets from
//! 100 µs up, too coarse for stages that take tens of microseconds.
//!
//! The stages (each one request's own time, nanoseconds):
//! - `egress_to_nats`: the HTTP request's head parsed → its NATS request handed to the
//!   client (body read, route lookup, header mapping, publish).
//! - `egress_reply_to_response`: the reply read off the inbox subscription → the HTTP
//!   response handed back to hyper (hand-off to the waiter, decoding).
//! - `ingress_own`: a request message read off the subscription → its reply handed to
//!   the client, less the app call (buffering, permits, header mapping, reply encoding).
//!
//! "Handed to the client" is as far as the sidecar can see: async-nats and hyper write
//! the socket on their own tasks.
//!
//! Recording starts with the first read of `/debug/own-time` (that read answers with
//! `count: 0` everywhere). Until then a request pays one relaxed atomic load instead of a
//! lock and a histogram update per stage, and egress carries no timestamps in the
//! request's and response's extensions (each one allocates their map). Nobody reads these
//! in production; the benchmark reads (and resets) them before each phase.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;

/// One stage of a request's path through the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    EgressToNats,
    EgressReplyToResponse,
    IngressOwn,
}

const STAGES: [Stage; 3] = [Stage::EgressToNats, Stage::EgressReplyToResponse, Stage::IngressOwn];

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::EgressToNats => "egress_to_nats",
            Stage::EgressReplyToResponse => "egress_reply_to_response",
            Stage::IngressOwn => "ingress_own",
        }
    }
}

/// The histograms, one per stage: 1 ns to 60 s at two significant digits (about 30 KiB
/// each). A lock each: taken once per request and stage, never contended for long.
pub struct OwnTime {
    stages: [Mutex<Histogram<u64>>; 3],
    /// Set by the first [`OwnTime::snapshot`]; nothing is recorded before.
    enabled: AtomicBool,
}

impl Default for OwnTime {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for OwnTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OwnTime")
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 2).expect("valid bounds")
}

impl OwnTime {
    pub fn new() -> Self {
        Self { stages: [Mutex::new(histogram()), Mutex::new(histogram()), Mutex::new(histogram())], enabled: AtomicBool::new(false) }
    }

    /// Whether anyone has read the histograms yet: callers skip taking timestamps when not.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Adds one sample to `stage`, once recording has started (see the module doc).
    pub fn record(&self, stage: Stage, d: Duration) {
        if !self.enabled() {
            return;
        }
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.stages[stage as usize].lock().unwrap_or_else(|e| e.into_inner()).saturating_record(ns);
    }

    /// Count and percentiles (µs) of each stage; `reset` empties them afterwards. A stage
    /// with no sample has only `count: 0`: a missing figure, never a zero. The first call
    /// starts the recording.
    pub fn snapshot(&self, reset: bool) -> serde_json::Value {
        self.enabled.store(true, Ordering::Relaxed);
        let mut out = serde_json::Map::new();
        for stage in STAGES {
            let mut h = self.stages[stage as usize].lock().unwrap_or_else(|e| e.into_inner());
            let mut v = serde_json::json!({ "count": h.len() });
            if !h.is_empty() {
                let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
                v["p50_us"] = us(0.5).into();
                v["p90_us"] = us(0.9).into();
                v["p99_us"] = us(0.99).into();
                v["p999_us"] = us(0.999).into();
                v["max_us"] = (h.max() as f64 / 1000.0).into();
                v["mean_us"] = (h.mean() / 1000.0).into();
            }
            if reset {
                h.reset();
            }
            out.insert(stage.name().to_owned(), v);
        }
        serde_json::Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_recorded_before_the_first_read() {
        let t = OwnTime::new();
        t.record(Stage::IngressOwn, Duration::from_micros(5));
        assert!(!t.enabled());
        assert_eq!(t.snapshot(false)["ingress_own"], serde_json::json!({ "count": 0 }));
        t.record(Stage::IngressOwn, Duration::from_micros(5));
        assert_eq!(t.snapshot(false)["ingress_own"]["count"], 1, "recording since the first read");
    }

    #[test]
    fn a_stage_reports_its_samples_and_resets() {
        let t = OwnTime::new();
        t.snapshot(true);
        for us in 1..=100 {
            t.record(Stage::EgressToNats, Duration::from_micros(us));
        }
        let s = t.snapshot(true);
        assert_eq!(s["egress_to_nats"]["count"], 100);
        let p50 = s["egress_to_nats"]["p50_us"].as_f64().unwrap();
        assert!((49.0..=51.0).contains(&p50), "{p50}");
        assert_eq!(s["ingress_own"], serde_json::json!({ "count": 0 }), "no sample, no percentile");
        assert_eq!(t.snapshot(false)["egress_to_nats"]["count"], 0, "reset");
    }
}
