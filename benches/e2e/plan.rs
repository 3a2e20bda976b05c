//! How long each part of the run takes, from `--quick` and the `BENCH_*` knobs.

use std::time::Duration;

/// How long each part of the run takes. Every duration and count has an environment
/// knob, so a profile can stretch a phase and CI can shrink the whole run.
pub struct Plan {
    pub quick: bool,
    /// `BENCH_ONLY=c,e`: run only these paths (a path's `-raw`/`-sync` variants with it).
    pub only: Option<Vec<String>>,
    /// `BENCH_RUNS`: how many times each phase runs (rounds).
    pub runs: usize,
    pub warmup: Duration,
    /// `BENCH_RATE_SECS`: each 1k-rps run.
    pub rate: Duration,
    /// `BENCH_SWEEP_SECS`: each run of a sweep step.
    pub sweep_step: Duration,
    /// `BENCH_SWEEP_RATES=2000,4000` (empty: no sweep).
    pub sweep_rates: Vec<f64>,
    /// `BENCH_SATURATION_SECS`: each fixed-concurrency run.
    pub saturation: Duration,
    pub concurrency: usize,
    pub js_concurrency: usize,
    pub f_messages: usize,
    pub f_concurrency: usize,
    /// `BENCH_SIDECAR_THREADS`: `[sidecar] worker_threads` of every sidecar (unset: the default).
    pub sidecar_threads: Option<usize>,
}

fn env_f64(k: &str) -> Option<f64> {
    std::env::var(k).ok().and_then(|v| v.parse::<f64>().ok())
}

impl Plan {
    pub fn runs(&self, path: &str) -> bool {
        let base = path.split('-').next().unwrap_or(path);
        self.only.as_ref().is_none_or(|o| o.iter().any(|p| p == path || p == base))
    }

    pub fn new(quick: bool) -> Self {
        let mut plan = if quick {
            // A smoke run in the debug profile: every code path, three runs each, well
            // under a minute; the numbers mean nothing.
            Plan {
                quick,
                only: None,
                runs: 3,
                warmup: Duration::from_millis(200),
                rate: Duration::from_millis(400),
                sweep_step: Duration::from_millis(400),
                sweep_rates: vec![2000.0],
                saturation: Duration::from_millis(400),
                concurrency: 16,
                js_concurrency: 16,
                f_messages: 1000,
                f_concurrency: 32,
                sidecar_threads: None,
            }
        } else {
            // Issue 10: at least 3 runs of at least 20 s for every fixed-rate phase.
            Plan {
                quick,
                only: None,
                runs: 3,
                warmup: Duration::from_secs(2),
                rate: Duration::from_secs(20),
                sweep_step: Duration::from_secs(20),
                sweep_rates: vec![2000.0, 4000.0, 8000.0, 16000.0],
                saturation: Duration::from_secs(5),
                concurrency: 32,
                js_concurrency: 32,
                f_messages: 20_000,
                f_concurrency: 32,
                sidecar_threads: None,
            }
        };
        plan.only = std::env::var("BENCH_ONLY").ok().map(|v| v.split(',').map(|p| p.trim().to_owned()).collect());
        if let Some(n) = env_f64("BENCH_RUNS") {
            plan.runs = (n as usize).max(1);
        }
        if let Some(s) = env_f64("BENCH_RATE_SECS") {
            plan.rate = Duration::from_secs_f64(s);
        }
        if let Some(s) = env_f64("BENCH_SWEEP_SECS") {
            plan.sweep_step = Duration::from_secs_f64(s);
        }
        if let Some(s) = env_f64("BENCH_SATURATION_SECS") {
            plan.saturation = Duration::from_secs_f64(s);
        }
        if let Ok(v) = std::env::var("BENCH_SWEEP_RATES") {
            plan.sweep_rates = v.split(',').filter_map(|r| r.trim().parse().ok()).collect();
        }
        plan.sidecar_threads = env_f64("BENCH_SIDECAR_THREADS").map(|n| n as usize);
        plan
    }

    /// Meets issue 10's floor for a full run: 3 runs of at least 20 s.
    pub fn full_length(&self) -> bool {
        self.runs >= 3
            && self.rate >= Duration::from_secs(20)
            && (self.sweep_rates.is_empty() || self.sweep_step >= Duration::from_secs(20))
    }
}
