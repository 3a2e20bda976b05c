//! Reporting: every phase was run several times (rounds); a row gives each figure's
//! median and range over the runs. Differences between paths are taken per run, between
//! the phases of the same round, and only then summarised: percentiles of different runs
//! are never subtracted. A figure from a phase with errors, or one that is missing, is
//! "not measured", never met.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::json;

use crate::load::Phase;
use crate::procs::{nats_server_bin, ProcUsage};

/// Minimum, median and maximum of one figure over the runs.
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    pub min: f64,
    pub med: f64,
    pub max: f64,
}

pub fn spread(mut v: Vec<f64>) -> Option<Spread> {
    if v.is_empty() || v.iter().any(|x| !x.is_finite()) {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let med = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    Some(Spread { min: v[0], med, max: v[n - 1] })
}

pub const NOT_MEASURED: &str = "not measured";

fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// "median (min–max)", or "not measured".
pub fn cell(s: Option<Spread>) -> String {
    match s {
        Some(s) if s.min == s.max => num(s.med),
        Some(s) => format!("{} ({}–{})", num(s.med), num(s.min), num(s.max)),
        None => NOT_MEASURED.into(),
    }
}

pub fn load_name(p: &Phase) -> String {
    match (p.load.as_str(), p.target_rps, p.concurrency) {
        ("rate", Some(r), _) => format!("{r:.0} rps"),
        ("concurrency", _, Some(c)) => format!("concurrency {c}"),
        ("drain", _, Some(c)) => format!("drain, {c} in flight"),
        ("stream", Some(r), Some(c)) => format!("{c} streams, {r:.0} tokens/s"),
        (l, _, _) => l.to_owned(),
    }
}

/// Every run of one path at one load.
pub struct Group<'a> {
    pub path: &'a str,
    pub label: &'a str,
    pub load: String,
    pub runs: Vec<&'a Phase>,
}

pub fn groups(phases: &[Phase]) -> Vec<Group<'_>> {
    let mut out: Vec<Group<'_>> = Vec::new();
    for p in phases {
        let load = load_name(p);
        match out.iter_mut().find(|g| g.path == p.path && g.load == load) {
            Some(g) => g.runs.push(p),
            None => out.push(Group { path: &p.path, label: &p.label, load, runs: vec![p] }),
        }
    }
    out
}

pub fn group<'a>(gs: &'a [Group<'a>], path: &str, load: &str) -> Option<&'a Group<'a>> {
    gs.iter().find(|g| g.path == path && g.load == load)
}

impl Group<'_> {
    /// No run errored (a sweep step past saturation may drop; it says so).
    pub fn clean(&self) -> bool {
        self.runs.iter().all(|p| p.errors == 0 && (p.saturated || p.dropped == 0) && p.requests > 0)
    }

    pub fn saturated(&self) -> bool {
        self.runs.iter().any(|p| p.saturated)
    }

    /// A figure over the runs; "not measured" when any run errored or lacks it.
    pub fn figure(&self, f: impl Fn(&Phase) -> Option<f64>) -> Option<Spread> {
        if !self.clean() {
            return None;
        }
        spread(self.runs.iter().map(|p| f(p)).collect::<Option<Vec<f64>>>()?)
    }

    pub fn proc(&self, name: &str, f: impl Fn(&ProcUsage) -> f64) -> Option<Spread> {
        self.figure(|p| p.procs.iter().find(|u| u.name == name).map(&f))
    }

    pub fn errors(&self) -> u64 {
        self.runs.iter().map(|p| p.errors + if p.saturated { 0 } else { p.dropped }).sum()
    }

    /// A stage of a sidecar's own time (µs) over the runs.
    pub fn own(&self, sidecar: &str, stage: &str, key: &str) -> Option<Spread> {
        self.figure(|p| p.own_time.get(sidecar)?.get(stage)?.get(key)?.as_f64())
    }
}

/// `x − y` of one figure, run by run (the phases of the same round), then summarised.
/// "Not measured" when either side has errors or a run has no partner.
pub fn paired(gs: &[Group<'_>], x: &str, y: &str, load: &str, f: impl Fn(&Phase) -> Option<f64>) -> Option<Spread> {
    let (gx, gy) = (group(gs, x, load)?, group(gs, y, load)?);
    if !gx.clean() || !gy.clean() {
        return None;
    }
    let d: Option<Vec<f64>> = gx.runs.iter().map(|px| Some(f(px)? - f(gy.runs.iter().find(|py| py.run == px.run)?)?)).collect();
    spread(d?)
}

/// One figure of a phase.
type Figure<'f> = &'f dyn Fn(&Phase) -> Option<f64>;

/// `fx(x) / fy(y)` run by run (the phases of the same round), then summarised.
pub fn paired_ratio(gs: &[Group<'_>], (x, fx): (&str, Figure<'_>), (y, fy): (&str, Figure<'_>), load: &str) -> Option<Spread> {
    let (gx, gy) = (group(gs, x, load)?, group(gs, y, load)?);
    if !gx.clean() || !gy.clean() {
        return None;
    }
    let r: Option<Vec<f64>> = gx.runs.iter().map(|px| Some(fx(px)? / fy(gy.runs.iter().find(|py| py.run == px.run)?)?)).collect();
    spread(r?)
}

/// `x / composed` run by run, where `composed` is the same work done by the baselines
/// with no sidecar cost: 1 / Σ (hops / baseline throughput), each from the same round.
pub fn composed_ratio(gs: &[Group<'_>], x: &str, load: &str, hops: &[(&str, f64)]) -> Option<(Spread, Spread)> {
    let gx = group(gs, x, load)?;
    let bases: Option<Vec<(&Group<'_>, f64)>> = hops.iter().map(|(p, n)| group(gs, p, load).map(|g| (g, *n))).collect();
    let bases = bases?;
    if !gx.clean() || bases.iter().any(|(g, _)| !g.clean()) {
        return None;
    }
    let mut limits = Vec::new();
    let mut ratios = Vec::new();
    for px in &gx.runs {
        let mut inv = 0.0;
        for (g, n) in &bases {
            let pb = g.runs.iter().find(|p| p.run == px.run)?;
            inv += n / pb.throughput;
        }
        limits.push(1.0 / inv);
        ratios.push(px.throughput * inv);
    }
    Some((spread(limits)?, spread(ratios)?))
}

pub struct Goal {
    pub goal: String,
    pub measured: String,
    /// None: not measured (errors, or a figure missing).
    pub met: Option<bool>,
}

impl Goal {
    fn of(goal: impl Into<String>, s: Option<Spread>, show: impl Fn(Spread) -> String, ok: impl Fn(f64) -> bool) -> Self {
        match s {
            Some(s) => Goal { goal: goal.into(), measured: show(s), met: Some(ok(s.med)) },
            None => Goal { goal: goal.into(), measured: NOT_MEASURED.into(), met: None },
        }
    }
}

const AT_1K: &str = "1000 rps";

fn p50(p: &Phase) -> Option<f64> {
    p.p50_ms
}
fn p99(p: &Phase) -> Option<f64> {
    p.p99_ms
}
fn ms(s: Spread) -> String {
    format!("{} ms", cell(Some(s)))
}
fn pct(s: Spread) -> String {
    format!("{}%", cell(Some(Spread { min: s.min * 100.0, med: s.med * 100.0, max: s.max * 100.0 })))
}

pub fn goals(phases: &[Phase], micro: &BTreeMap<String, f64>, conc: &str, js_conc: &str) -> Vec<Goal> {
    let gs = groups(phases);
    let mut g = vec![
        Goal::of("added latency c − a at 1k rps ≤ 0.35 ms p50 (issue 14)", paired(&gs, "c", "a", AT_1K, p50), ms, |v| v <= 0.35),
        Goal::of("added latency c − a at 1k rps ≤ 0.8 ms p99 (issue 14)", paired(&gs, "c", "a", AT_1K, p99), ms, |v| v <= 0.8),
    ];
    let c50 = group(&gs, "c", AT_1K).and_then(|c| c.figure(p50)).map(|s| s.med);
    g.push(Goal::of("tunnel d − c at 1k rps p50 within 10% of c's p50", paired(&gs, "d", "c", AT_1K, p50), ms, |v| {
        c50.is_some_and(|c| v <= 0.1 * c)
    }));
    if let Some(c) = group(&gs, "c", AT_1K) {
        for name in ["sidecar-a", "sidecar-b"] {
            g.push(Goal::of(
                format!("{name} CPU at 1k rps (path c) ≤ 0.05 vCPU (issue 14; aim 0.03)"),
                c.proc(name, |u| u.vcpu),
                |s| format!("{} vCPU", cell(Some(s))),
                |v| v <= 0.05,
            ));
        }
    }
    for name in ["sidecar-a", "sidecar-b"] {
        let us = || phases.iter().filter(|p| p.path == "c").filter_map(|p| p.procs.iter().find(|u| u.name == name));
        let goal = format!("{name} RSS ≤ 20 MB on path c, every load");
        let fds = us().map(|u| u.open_fds_max).max().unwrap_or(0);
        g.push(match spread(us().map(|u| u.rss_mb_max).collect()) {
            Some(s) => Goal { goal, measured: format!("max {:.1} MB (at most {fds} fds open)", s.max), met: Some(s.max <= 20.0) },
            None => Goal { goal, measured: NOT_MEASURED.into(), met: None },
        });
    }
    let composed = [
        ("c", conc, vec![("a", 2.0), ("b", 1.0)], "request c through two sidecars", 0.75),
        ("d", conc, vec![("a", 2.0), ("b", 1.0)], "tunnel d through two sidecars", 0.75),
        ("e", js_conc, vec![("a", 1.0), ("e-raw", 1.0)], "JetStream publish e through one sidecar", 0.75),
        ("e", js_conc, vec![("e-raw", 1.0)], "JetStream publish e vs raw publish (issue 5)", 0.70),
        ("f", "drain, 32 in flight", vec![("f-raw", 1.0)], "JetStream ingress f vs a raw pull consumer (issue 5)", 0.70),
    ];
    for (path, load, hops, what, goal) in composed {
        let r = composed_ratio(&gs, path, load, &hops);
        let measured = r.map(|(limit, ratio)| {
            let x = group(&gs, path, load).and_then(|g| g.figure(|p| Some(p.throughput)));
            format!("{} of {}/s (measured {}/s)", pct(ratio), cell(Some(limit)), cell(x))
        });
        g.push(Goal {
            goal: if hops.len() == 1 {
                format!("{what}: ≥ {:.0}% of {} ({load})", goal * 100.0, hops[0].0)
            } else {
                format!("{what}: ≥ {:.0}% of its composed limit 1/Σ(hops/baseline) ({load})", goal * 100.0)
            },
            met: r.map(|(_, ratio)| ratio.med >= goal),
            measured: measured.unwrap_or_else(|| NOT_MEASURED.into()),
        });
    }
    for kind in ["param_path", "host_route"] {
        let (t10, t10k) = (micro.get(&format!("route_lookup/{kind}/10")), micro.get(&format!("route_lookup/{kind}/10000")));
        let r = t10.zip(t10k).map(|(a, b)| b / a);
        g.push(Goal {
            goal: format!("route lookup ({kind}) at 10,000 routes ≤ 1.5× of 10 routes"),
            measured: r
                .map(|r| format!("{r:.2}×"))
                .unwrap_or_else(|| format!("{NOT_MEASURED} (micro-benchmarks not run in this invocation)")),
            met: r.map(|r| r <= 1.5),
        });
    }
    g
}

pub fn markdown(header: &str, phases: &[Phase], goals: &[Goal], micro: &BTreeMap<String, f64>, idle: &BTreeMap<String, f64>) -> String {
    let gs = groups(phases);
    let mut s = String::from(header);
    s += "| path | load | runs | achieved/s | p50 | p90 | p99 | p99.9 | max | errors | sidecar CPU s / 10k req | sidecar vCPU | sidecar RSS MB (max; most fds open) | CPU s / 10k: nats-server · bench | host CPU stolen % |\n";
    s += "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|---:|\n";
    for g in &gs {
        let sidecars: Vec<&str> = g.runs[0].procs.iter().map(|u| u.name.as_str()).filter(|n| n.starts_with("sidecar")).collect();
        let per = |f: &dyn Fn(&str) -> String| {
            if sidecars.is_empty() {
                "–".to_owned()
            } else {
                sidecars.iter().map(|n| format!("{}: {}", n.trim_start_matches("sidecar-"), f(n))).collect::<Vec<_>>().join(" / ")
            }
        };
        let other = |n: &str| {
            g.runs[0]
                .procs
                .iter()
                .find(|u| u.name.starts_with(n))
                .map(|u| cell(g.proc(&u.name, |u| u.cpu_seconds_per_10k)))
                .unwrap_or("–".into())
        };
        let rss = |n: &str| {
            let us = || g.runs.iter().filter_map(|p| p.procs.iter().find(|u| u.name == n));
            let (v, fds) = (us().map(|u| u.rss_mb_max).fold(0.0, f64::max), us().map(|u| u.open_fds_max).max().unwrap_or(0));
            format!("{v:.1} ({fds})")
        };
        s += &format!(
            "| {} {} | {}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} · {} | {} |\n",
            g.path,
            g.label,
            g.load,
            if g.saturated() { " (saturated)" } else { "" },
            g.runs.len(),
            cell(spread(g.runs.iter().map(|p| p.throughput).collect())),
            cell(g.figure(|p| p.p50_ms)),
            cell(g.figure(|p| p.p90_ms)),
            cell(g.figure(|p| p.p99_ms)),
            cell(g.figure(|p| p.p999_ms)),
            cell(g.figure(|p| p.max_ms)),
            g.errors(),
            per(&|n| cell(g.proc(n, |u| u.cpu_seconds_per_10k))),
            per(&|n| cell(g.proc(n, |u| u.vcpu))),
            per(&rss),
            other("nats-server"),
            other("bench"),
            cell(g.figure(|p| p.host_steal_pct)),
        );
    }
    s += &stolen(phases);
    if !idle.is_empty() {
        s += "\nIdle RSS (ready, before any load): ";
        s += &idle.iter().map(|(k, v)| format!("{k} {v:.1} MB")).collect::<Vec<_>>().join(", ");
        s += "\n";
    }
    s += &differences(&gs);
    s += &against_minimal(&gs);
    s += &own_time(&gs);
    s += "\n### Goals\n\nEach against the median over the runs; the range is min–max.\n\n| goal | measured | met |\n|---|---|---|\n";
    for g in goals {
        let met = match g.met {
            Some(true) => "✅ met",
            Some(false) => "❌ not met",
            None => NOT_MEASURED,
        };
        s += &format!("| {} | {} | {met} |\n", g.goal, g.measured);
    }
    if !micro.is_empty() {
        s += "\n### Micro-benchmarks (criterion, mean; run in this invocation)\n\n| benchmark | time |\n|---|---:|\n";
        for (k, v) in micro {
            s += &format!("| {k} | {} |\n", if *v >= 1000.0 { format!("{:.2} µs", v / 1000.0) } else { format!("{v:.1} ns") });
        }
    }
    s
}

/// Phases during which the hypervisor took more than [`STOLEN_MUCH`] of the host's CPU time.
/// Every process slows alike then, baselines too, and wake-ups wait for a CPU: latency
/// and throughput measure the host as much as the code, so the report says which.
fn stolen(phases: &[Phase]) -> String {
    let much: Vec<String> = phases
        .iter()
        .filter(|p| p.host_steal_pct.is_some_and(|v| v > STOLEN_MUCH))
        .map(|p| format!("{} {} run {} ({:.0}%)", p.path, load_name(p), p.run, p.host_steal_pct.unwrap_or_default()))
        .collect();
    if much.is_empty() {
        return String::new();
    }
    format!(
        "\n**Host CPU stolen.** In {} of {} phases the hypervisor took more than {STOLEN_MUCH:.0}% of this VM's CPU time \
         (`/proc/stat`, steal): {}. Figures of those phases, and differences paired with them, measure the host as much \
         as the code.\n",
        much.len(),
        phases.len(),
        much.join(", ")
    )
}

/// More stolen CPU time than this (%) is called out.
const STOLEN_MUCH: f64 = 5.0;

/// Added latency, paired by run.
fn differences(gs: &[Group<'_>]) -> String {
    let mut s = String::from(
        "\n### Added latency, paired by run\n\nx − y at each percentile, taken between the phases of the same round (never between \
         percentiles of different runs), then median (min–max) over the rounds. Milliseconds.\n\n\
         | difference | load | p50 | p90 | p99 | p99.9 |\n|---|---|---:|---:|---:|---:|\n",
    );
    let pairs = [("c", "a"), ("c-min", "a"), ("c", "c-min"), ("d", "a"), ("e", "e-raw"), ("e", "e-min"), ("e-sync", "e-sync-raw")];
    for (x, y) in pairs {
        for g in gs.iter().filter(|g| g.path == x && g.runs[0].load == "rate") {
            if group(gs, y, &g.load).is_none() {
                continue;
            }
            s += &format!(
                "| {x} − {y} | {} | {} | {} | {} | {} |\n",
                g.load,
                cell(paired(gs, x, y, &g.load, |p| p.p50_ms)),
                cell(paired(gs, x, y, &g.load, |p| p.p90_ms)),
                cell(paired(gs, x, y, &g.load, |p| p.p99_ms)),
                cell(paired(gs, x, y, &g.load, |p| p.p999_ms)),
            );
        }
    }
    s
}

/// natsbridge against the minimal forwarders of the same round (`minimal.rs`): what its own
/// features cost over the same libraries doing the same I/O.
fn against_minimal(gs: &[Group<'_>]) -> String {
    let rows: [(&str, &'static str, &str, &'static str); 3] = [
        ("c", "sidecar-a", "c-min", "sidecar-min-a"),
        ("c", "sidecar-b", "c-min", "sidecar-min-b"),
        ("e", "sidecar-a", "e-min", "sidecar-min-a"),
    ];
    let mut s = String::new();
    for (x, xp, y, yp) in rows {
        for g in gs.iter().filter(|g| g.path == x) {
            let Some(gy) = group(gs, y, &g.load) else { continue };
            let cpu = |name: &'static str| move |p: &Phase| p.procs.iter().find(|u| u.name == name).map(|u| u.cpu_seconds_per_10k);
            let (fx, fy) = (cpu(xp), cpu(yp));
            let ratio = paired_ratio(gs, (x, &fx), (y, &fy), &g.load);
            let tput = |p: &Phase| Some(p.throughput);
            let t = if g.runs[0].load == "concurrency" { cell(paired_ratio(gs, (x, &tput), (y, &tput), &g.load)) } else { "–".into() };
            s += &format!(
                "| {x} {} vs {y} {} | {} | {} | {} | {} | {t} |\n",
                xp.trim_start_matches("sidecar-"),
                yp.trim_start_matches("sidecar-"),
                g.load,
                cell(g.proc(xp, |u| u.cpu_seconds_per_10k)),
                cell(gy.proc(yp, |u| u.cpu_seconds_per_10k)),
                cell(ratio),
            );
        }
    }
    if s.is_empty() {
        return s;
    }
    let mut composed = String::new();
    for (path, hops) in [("c-min", vec![("a", 2.0), ("b", 1.0)]), ("e-min", vec![("a", 1.0), ("e-raw", 1.0)])] {
        for g in gs.iter().filter(|g| g.path == path && g.runs[0].load == "concurrency") {
            if let Some((limit, ratio)) = composed_ratio(gs, path, &g.load, &hops) {
                composed += &format!(
                    "- {path} at {}: {}/s = {} of its composed limit {}/s (same rounds).\n",
                    g.load,
                    cell(g.figure(|p| Some(p.throughput))),
                    pct(ratio),
                    cell(Some(limit))
                );
            }
        }
    }
    let headers = if crate::minimal::carry_headers() {
        "**This run's minimal forwarders carried the headers across NATS** (`BENCH_MIN_HEADERS=1`: \
         the request's, and the app's response headers with a `Bridge-Status`), as the sidecars do. "
    } else {
        ""
    };
    format!(
        "\n### natsbridge against minimal forwarders (same libraries, no features)\n\n\
         c-min and e-min are c and e through two (one) hand-glued forwarders built from natsbridge's \
         libraries (current-thread tokio, hyper 1, async-nats; `benches/e2e/minimal.rs`): no routing, \
         header mapping, timeouts, limits, metrics or drain. {headers}CPU s per 10k requests, median (min–max); \
         ratios are taken per round, then summarised.\n\n\
         | process vs its minimal counterpart | load | natsbridge | minimal | CPU ratio | throughput ratio |\n\
         |---|---|---:|---:|---:|---:|\n{s}\n{composed}"
    )
}

/// The sidecars' own time per request, measured inside them (`/debug/own-time`).
fn own_time(gs: &[Group<'_>]) -> String {
    let mut s = String::from(
        "\n### The sidecars' own time per request (in-process HdrHistograms)\n\n\
         `egress_to_nats`: request head parsed → NATS request handed to the client; `egress_reply_to_response`: reply read → \
         response handed to hyper; `ingress_own`: request message read → reply handed to the client, less the app call. \
         Microseconds, median (min–max) over the runs.\n\n\
         | path | load | sidecar · stage | samples (median) | p50 µs | p90 µs | p99 µs | p99.9 µs |\n|---|---|---|---:|---:|---:|---:|---:|\n",
    );
    let stages = [("sidecar-a", "egress_to_nats"), ("sidecar-a", "egress_reply_to_response"), ("sidecar-b", "ingress_own")];
    for g in gs.iter().filter(|g| g.path == "c" || g.path == "d") {
        for (sc, stage) in stages {
            s += &format!(
                "| {} | {} | {} · {stage} | {} | {} | {} | {} | {} |\n",
                g.path,
                g.load,
                sc.trim_start_matches("sidecar-"),
                cell(g.own(sc, stage, "count")),
                cell(g.own(sc, stage, "p50_us")),
                cell(g.own(sc, stage, "p90_us")),
                cell(g.own(sc, stage, "p99_us")),
                cell(g.own(sc, stage, "p999_us")),
            );
        }
    }
    s
}
pub fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(str::trim).unwrap_or("unknown");
    let mem_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    let nats = Command::new(nats_server_bin())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let rustc =
        Command::new("rustc").arg("--version").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default();
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": model,
        "memory_gib": (mem_kb as f64 / 1048576.0 * 10.0).round() / 10.0,
        "kernel": kernel,
        "nats_server": nats,
        "rustc": rustc,
        "load_average_at_start": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    })
}

pub fn now_utc() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Criterion's estimates (mean, ns) for the micro-benchmarks, only those written at or
/// after `since` (Unix seconds): `scripts/bench` sets it when it ran them in the same
/// invocation, so `--e2e` never shows results of an earlier run.
pub fn micro_results(since: u64) -> BTreeMap<String, f64> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/criterion");
    let mut out = BTreeMap::new();
    fn walk(dir: &Path, root: &Path, since: u64, out: &mut BTreeMap<String, f64>) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if !p.is_dir() || p.file_name().is_some_and(|n| n == "report" || n == "base" || n == "change") {
                continue;
            }
            if p.file_name().is_some_and(|n| n == "new") {
                let fresh = std::fs::metadata(p.join("estimates.json"))
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .is_some_and(|t| t.as_secs() >= since);
                if !fresh {
                    continue;
                }
                if let Some(v) = std::fs::read_to_string(p.join("estimates.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .and_then(|v| v["mean"]["point_estimate"].as_f64())
                {
                    let id = dir.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                    out.insert(id, v);
                }
                continue;
            }
            walk(&p, root, since, out);
        }
    }
    walk(&root, &root, since, &mut out);
    out
}
