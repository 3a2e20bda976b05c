//! End-to-end benchmark: every path measured in one run against its baselines.
//!
//! It starts everything itself: JetStream nats-servers (random ports, file storage, their
//! own stores; one lazy as by default, one with `sync_interval: always`), a minimal hyper
//! app (port 0), the sidecars as child processes of the real `natsbridge` binary (so /proc
//! tells each one's CPU and RSS), and an in-process load generator (tokio + keep-alive
//! hyper clients).
//!
//! | path | what |
//! |---|---|
//! | a | client → app (direct HTTP) |
//! | b | async-nats request → async-nats responder (raw NATS, the floor) |
//! | c | client → sidecar A (egress request) → NATS → sidecar B (ingress request) → app |
//! | c-min | as c through minimal forwarders of the same libraries (`minimal.rs`): the floor |
//! | d | client → sidecar A (tunnel) → NATS → sidecar B (tunnel) → app |
//! | e | client → sidecar A (jetstream) → 202, vs raw async-nats JetStream publish + ack |
//! | e-min | as e through the minimal egress forwarder |
//! | e-sync | as e, against a nats-server with `sync_interval: always` |
//! | f | JetStream → sidecar F (pull consumer) → app, vs a raw async-nats pull consumer |
//!
//! Fixed-rate load measures latency from each request's *intended* send time (so a stall
//! is charged to every request it delayed: no coordinated omission); fixed concurrency
//! measures saturation throughput. Every phase runs `runs` times, in rounds that visit
//! every path in turn, so a difference between two paths is taken within one round.
//!
//! Run with `scripts/bench` (see BENCHMARKS.md for the durations and the knobs).

mod jsf;
mod load;
mod minimal;
mod plan;
mod procs;
mod report;
mod sidecars;
mod tokens;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http::StatusCode;
use serde_json::json;

use load::{http_client, http_op, js_op, nats_op, run_concurrency, run_rate, start_app, App, Op, Phase};
use minimal::MinProc;
use plan::Plan;
use procs::{clock_ticks, rss_kb, HttpClient, Meter, NatsServer, SidecarProc, Watched};
use sidecars::{ingress_available, sidecar_f, with_threads, SIDECAR_A, SIDECAR_B};

pub const BODY_LEN: usize = 1024;
/// Fixed-rate load stops issuing (and counts as dropped) past this many requests in flight.
pub const MAX_OUTSTANDING: usize = 4096;
/// The HTTP client's connection pool per path: requests past it wait for a connection
/// (and that wait counts in their latency), as with any real client's bounded pool.
pub const MAX_CONNECTIONS: usize = 256;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Started by this bench as one of the minimal forwarders of paths c-min and e-min.
    minimal::run_role(&args);
    // `cargo nextest --all-targets` / `cargo test --benches` list and run bench targets as
    // tests: this one has none, and must not start a long run there.
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    if !quick && !args.iter().any(|a| a == "--bench") {
        eprintln!("e2e: run it with `scripts/bench [--quick]` (or `cargo bench --bench e2e [-- --quick]`)");
        return;
    }
    // Explicit, so TOKIO_WORKER_THREADS given to try out the sidecars does not change the load generator.
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build().unwrap();
    let code = rt.block_on(run(Plan::new(quick)));
    rt.shutdown_timeout(Duration::from_secs(2));
    std::process::exit(code);
}

/// One path as the rounds run it.
struct Spec<'a> {
    path: &'static str,
    label: &'static str,
    op: Op,
    procs: Vec<Watched>,
    /// The sidecars whose own time each phase reads.
    sidecars: Vec<&'a SidecarProc>,
    sweep: bool,
    conc: usize,
}

struct Bench {
    plan: Plan,
    tck: f64,
    client: HttpClient,
    phases: Vec<Phase>,
    failures: Vec<String>,
}

impl Bench {
    fn push(&mut self, p: Phase) {
        let line = format!(
            "  {:<10} {:<34} {:<12} run {} {:>9.0}/s  p50 {:>7} p99 {:>7} max {:>8}  err {} drop {}",
            p.path,
            p.label,
            report::load_name(&p),
            p.run,
            p.throughput,
            fmt_ms(p.p50_ms),
            fmt_ms(p.p99_ms),
            fmt_ms(p.max_ms),
            p.errors,
            p.dropped
        );
        println!("{line}");
        let _ = std::io::stdout().flush();
        // Errors are failures, in a sweep too; only a step short of its rate (or dropping
        // at the outstanding limit) is "saturated".
        if p.errors > 0 || (!p.saturated && p.dropped > 0) || p.requests == 0 {
            self.failures.push(format!(
                "path {} ({}, {}, run {}): {} ok, {} errors, {} dropped; first error: {}",
                p.path,
                p.label,
                report::load_name(&p),
                p.run,
                p.requests,
                p.errors,
                p.dropped,
                p.first_error.as_deref().unwrap_or("-")
            ));
        }
        self.phases.push(p);
    }

    /// One fixed-rate run of `spec`, with CPU, RSS and the sidecars' own time.
    async fn rate(&mut self, spec: &Spec<'_>, rate: f64, dur: Duration, run: usize) -> Phase {
        for s in &spec.sidecars {
            let _ = s.own_time(&self.client).await;
        }
        let m = Meter::start(&spec.procs);
        let (rec, secs, dropped) = run_rate(&spec.op, rate, dur).await;
        let mut p = Phase::from(spec.path, spec.label, "rate", &rec, secs, dropped);
        p.target_rps = Some(rate);
        p.run = run;
        p.set_usage(m.finish(p.requests, self.tck));
        for s in &spec.sidecars {
            if let Some(v) = s.own_time(&self.client).await {
                p.own_time.insert(s.name.to_owned(), v);
            }
        }
        p
    }

    async fn concurrency(&mut self, spec: &Spec<'_>, run: usize) {
        for s in &spec.sidecars {
            let _ = s.own_time(&self.client).await;
        }
        let m = Meter::start(&spec.procs);
        let (rec, secs) = run_concurrency(&spec.op, spec.conc, self.plan.saturation).await;
        let mut p = Phase::from(spec.path, spec.label, "concurrency", &rec, secs, 0);
        p.concurrency = Some(spec.conc);
        p.run = run;
        p.set_usage(m.finish(p.requests, self.tck));
        for s in &spec.sidecars {
            if let Some(v) = s.own_time(&self.client).await {
                p.own_time.insert(s.name.to_owned(), v);
            }
        }
        self.push(p);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    /// Warm-up, then rounds: each round runs every path once at 1k rps, so paths are
    /// compared within a round; then each sweep step (rounds again, stopping at the first
    /// step whose median run is saturated), then fixed concurrency in rounds.
    async fn rounds(&mut self, specs: &[Spec<'_>]) {
        for spec in specs {
            let _ = run_rate(&spec.op, 1000.0, self.plan.warmup).await;
        }
        for run in 0..self.plan.runs {
            for spec in specs {
                let p = self.rate(spec, 1000.0, self.plan.rate, run).await;
                self.push(p);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let sweepers: Vec<&Spec<'_>> = specs.iter().filter(|s| s.sweep).collect();
        let mut live: Vec<bool> = vec![true; sweepers.len()];
        for rate in self.plan.sweep_rates.clone() {
            let mut saturated = vec![0usize; sweepers.len()];
            for run in 0..self.plan.runs {
                for (i, spec) in sweepers.iter().enumerate().filter(|(i, _)| live[*i]) {
                    let mut p = self.rate(spec, rate, self.plan.sweep_step, run).await;
                    p.saturated = p.throughput < 0.95 * rate || p.dropped > 0;
                    saturated[i] += usize::from(p.saturated);
                    self.push(p);
                    // Let queues from the previous run drain.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            for (i, n) in saturated.iter().enumerate() {
                if 2 * n > self.plan.runs {
                    live[i] = false;
                }
            }
        }
        for run in 0..self.plan.runs {
            for spec in specs {
                self.concurrency(spec, run).await;
            }
        }
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) if v >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.3}"),
        None => "-".into(),
    }
}

// ---------------------------------------------------------------------------------------
// The run.

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

async fn ready(s: &mut SidecarProc, client: &HttpClient) -> Result<(), String> {
    s.wait_ready(client).await
}

async fn run(plan: Plan) -> i32 {
    let started = Instant::now();
    let date = report::now_utc();
    let machine = report::machine();
    println!("natsbridge e2e benchmark{} — {}", if plan.quick { " (--quick)" } else { "" }, date);
    println!("machine: {machine}");
    let tck = clock_ticks();
    let body = Bytes::from(vec![b'x'; BODY_LEN]);

    let nats = NatsServer::start();
    let nats_url = nats.url();
    // The chart's durability setting: every write synced before the ack.
    let nats_sync = plan.runs("e").then(|| NatsServer::start_with("sync_interval: always"));
    let nats_proc = Watched { name: "nats-server".into(), pid: nats.child.id() };
    // This process: the load generator, the app and the raw baselines' clients.
    let me = Watched { name: "bench (client+app)".into(), pid: std::process::id() };
    let app = start_app().await;
    let app_url = format!("http://{}", app.addr);
    let client = http_client();

    let nc = async_nats::connect(&nats_url).await.expect("connect to nats");
    let js = async_nats::jetstream::new(nc.clone());
    jsf::create_streams(&js).await;
    let js_sync = match &nats_sync {
        Some(n) => {
            let js = async_nats::jetstream::new(async_nats::connect(n.url()).await.expect("connect to nats (sync always)"));
            jsf::create_streams(&js).await;
            Some(js)
        }
        None => None,
    };

    let with_ingress = ingress_available();
    let toml = |t: &str| with_threads(t, plan.sidecar_threads);
    let mut a = SidecarProc::start("sidecar-a", &toml(SIDECAR_A), &nats_url, &app_url);
    let mut b = with_ingress.then(|| SidecarProc::start("sidecar-b", &toml(SIDECAR_B), &nats_url, &app_url));
    let mut a_sync = nats_sync.as_ref().map(|n| SidecarProc::start("sidecar-a-sync", &toml(SIDECAR_A), &n.url(), &app_url));
    for s in [Some(&mut a), b.as_mut(), a_sync.as_mut()].into_iter().flatten() {
        if let Err(e) = ready(s, &client).await {
            eprintln!("{e}");
            return 1;
        }
    }
    // Idle RSS: ready, connected, before any load.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut idle: BTreeMap<String, f64> = BTreeMap::new();
    for s in [Some(&a), b.as_ref(), a_sync.as_ref()].into_iter().flatten() {
        idle.insert(s.name.into(), rss_kb(s.child.id()) as f64 / 1024.0);
    }
    println!("pids: nats-server {}, sidecar-a {}, sidecar-b {:?}", nats.child.id(), a.child.id(), b.as_ref().map(|b| b.child.id()));

    // b's responder: its own connection, echoing the payload.
    let responder_nc = async_nats::connect(&nats_url).await.unwrap();
    let mut sub = responder_nc.subscribe("bench.raw").await.unwrap();
    responder_nc.flush().await.unwrap();
    let responder = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(reply) = m.reply {
                let _ = responder_nc.publish(reply, m.payload).await;
            }
        }
    });

    let base = vec![nats_proc.clone(), me.clone()];
    let mut two = vec![a.watched()];
    two.extend(b.as_ref().map(|b| b.watched()));
    two.extend(base.clone());
    let (conc, js_conc) = (plan.concurrency, plan.js_concurrency);
    // One client per process the load goes into (see `http_op`).
    let (to_app, to_a, to_min_a) = (http_client(), http_client(), http_client());
    let echo = |host| http_op(&to_a, &format!("http://{}/echo", a.egress), host, body.clone(), StatusCode::OK, Some(BODY_LEN));
    let mut specs = vec![
        Spec {
            path: "a",
            label: "direct HTTP",
            op: http_op(&to_app, &format!("{app_url}/echo"), None, body.clone(), StatusCode::OK, Some(BODY_LEN)),
            procs: base.clone(),
            sidecars: vec![],
            sweep: true,
            conc,
        },
        Spec {
            path: "b",
            label: "raw NATS request/reply",
            op: nats_op(&nc, "bench.raw", body.clone()),
            procs: base.clone(),
            sidecars: vec![],
            sweep: true,
            conc,
        },
    ];
    if let Some(b) = &b {
        let sc = vec![&a, b];
        specs.push(Spec {
            path: "c",
            label: "sidecar request (A→NATS→B→app)",
            op: echo(None),
            procs: two.clone(),
            sidecars: sc.clone(),
            sweep: true,
            conc,
        });
        specs.push(Spec {
            path: "d",
            label: "sidecar tunnel (A→NATS→B→app)",
            op: echo(Some("app-b")),
            procs: two.clone(),
            sidecars: sc,
            sweep: true,
            conc,
        });
    }
    let min_a = (plan.runs("c-min") || plan.runs("e-min")).then(|| MinProc::start("sidecar-min-a", &[minimal::EGRESS_ARG, &nats_url]));
    let min_b = (with_ingress && plan.runs("c-min")).then(|| MinProc::start("sidecar-min-b", &[minimal::INGRESS_ARG, &nats_url, &app_url]));
    if let (Some(ma), Some(mb)) = (&min_a, &min_b) {
        let uri = format!("http://{}/echo", ma.addr.expect("min-egress listens"));
        specs.push(Spec {
            path: "c-min",
            label: "minimal forwarders (A→NATS→B→app)",
            op: http_op(&to_min_a, &uri, None, body.clone(), StatusCode::OK, Some(BODY_LEN)),
            procs: [vec![ma.watched(), mb.watched()], base.clone()].concat(),
            sidecars: vec![],
            sweep: true,
            conc,
        });
    }
    let events = |s: &SidecarProc, client: &HttpClient| {
        http_op(client, &format!("http://{}/events/1", s.egress), None, body.clone(), StatusCode::ACCEPTED, None)
    };
    specs.push(Spec {
        path: "e",
        label: "sidecar JetStream publish → 202",
        op: events(&a, &to_a),
        procs: [vec![a.watched()], base.clone()].concat(),
        sidecars: vec![],
        sweep: false,
        conc: js_conc,
    });
    if let Some(ma) = &min_a {
        let uri = format!("http://{}/events/1", ma.addr.expect("min-egress listens"));
        specs.push(Spec {
            path: "e-min",
            label: "minimal forwarder JetStream publish → 202",
            op: http_op(&to_min_a, &uri, None, body.clone(), StatusCode::ACCEPTED, None),
            procs: [vec![ma.watched()], base.clone()].concat(),
            sidecars: vec![],
            sweep: false,
            conc: js_conc,
        });
    }
    specs.push(Spec {
        path: "e-raw",
        label: "raw JetStream publish + ack",
        op: js_op(&js, "benche.raw", body.clone()),
        procs: base.clone(),
        sidecars: vec![],
        sweep: false,
        conc: js_conc,
    });
    if let (Some(s), Some(n), Some(jss)) = (&a_sync, &nats_sync, &js_sync) {
        let procs = vec![Watched { name: "nats-server (sync always)".into(), pid: n.child.id() }, me.clone()];
        specs.push(Spec {
            path: "e-sync",
            label: "e, server sync_interval: always",
            op: events(s, &http_client()),
            procs: [vec![s.watched()], procs.clone()].concat(),
            sidecars: vec![],
            sweep: false,
            conc: js_conc,
        });
        specs.push(Spec {
            path: "e-sync-raw",
            label: "e-raw, server sync_interval: always",
            op: js_op(jss, "benche.raw", body.clone()),
            procs,
            sidecars: vec![],
            sweep: false,
            conc: js_conc,
        });
    }
    specs.retain(|s| plan.runs(s.path));

    let mut bench = Bench { plan, tck, client: client.clone(), phases: Vec::new(), failures: Vec::new() };
    bench.rounds(&specs).await;
    drop(specs);
    responder.abort();

    if bench.plan.runs("g") && with_ingress {
        let dur = bench.plan.rate;
        tokens::path_g(&mut bench, &a, &nc, &base, &nats_url, dur).await;
    }
    if bench.plan.runs("f") {
        path_f(&mut bench, &js, &app, &app_url, &nats_url, &nats_proc, &me, &body, &mut idle, with_ingress).await;
    }
    let load_end = loadavg();
    drop(a);
    drop(b);
    drop(a_sync);
    drop(min_a);
    drop(min_b);
    drop(nats);
    drop(nats_sync);
    write_results(&bench, &machine, &date, &idle, &load_end, started)
}

/// f. JetStream ingress: drain a preloaded stream through the sidecar, and with a raw
/// pull consumer at the same concurrency.
#[allow(clippy::too_many_arguments)]
async fn path_f(
    bench: &mut Bench,
    js: &async_nats::jetstream::Context,
    app: &App,
    app_url: &str,
    nats_url: &str,
    nats_proc: &Watched,
    me: &Watched,
    body: &Bytes,
    idle: &mut BTreeMap<String, f64>,
    with_ingress: bool,
) {
    let n = bench.plan.f_messages;
    let conc = bench.plan.f_concurrency;
    let t0 = Instant::now();
    jsf::preload(js, n, body).await;
    println!("  (preloaded {n} messages into BENCH_F in {:.1} s)", t0.elapsed().as_secs_f64());
    // Raw first: it creates its own consumer and starts at once.
    app.reset_ingest();
    let m = Meter::start(&[nats_proc.clone(), me.clone()]);
    let stop = tokio_util::sync::CancellationToken::new();
    let raw = {
        let (js, client, stop) = (js.clone(), bench.client.clone(), stop.clone());
        let app_ref = App { addr: app.addr, ingested: app.ingested.clone(), first_ingest: app.first_ingest.clone() };
        tokio::spawn(async move { jsf::raw_consumer(&js, &client, &app_ref, conc, stop).await })
    };
    let drained = jsf::wait_drained(js, "raw-f", n, Duration::from_secs(120)).await;
    stop.cancel();
    let _ = raw.await;
    let p = jsf::drain_phase("f-raw", "raw pull consumer → app", app, n, conc, drained, m.finish(n as u64, bench.tck));
    bench.push(p);
    if !with_ingress {
        return;
    }
    app.reset_ingest();
    let mut f = SidecarProc::start("sidecar-f", &with_threads(&sidecar_f(conc), bench.plan.sidecar_threads), nats_url, app_url);
    let m = Meter::start(&[f.watched(), nats_proc.clone(), me.clone()]);
    match f.wait_ready(&bench.client).await {
        Ok(()) => {
            let drained = jsf::wait_drained(js, "sidecar-f", n, Duration::from_secs(120)).await;
            let phase = jsf::drain_phase("f", "sidecar JetStream ingress → app", app, n, conc, drained, m.finish(n as u64, bench.tck));
            bench.push(phase);
            idle.insert("sidecar-f (after drain)".into(), rss_kb(f.child.id()) as f64 / 1024.0);
        }
        Err(e) => bench.failures.push(e),
    }
}

fn write_results(
    bench: &Bench,
    machine: &serde_json::Value,
    date: &str,
    idle: &BTreeMap<String, f64>,
    load_end: &str,
    started: Instant,
) -> i32 {
    let plan = &bench.plan;
    // Only micro-benchmarks that `scripts/bench` ran in this same invocation.
    let micro = std::env::var("BENCH_MICRO_SINCE").ok().and_then(|s| s.parse().ok()).map(report::micro_results).unwrap_or_default();
    let conc = format!("concurrency {}", plan.concurrency);
    let js_conc = format!("concurrency {}", plan.js_concurrency);
    let mut goals = report::goals(&bench.phases, &micro, &conc, &js_conc);
    if bench.phases.iter().any(|p| p.path == "g") {
        goals.push(tokens::goal(&bench.phases));
    }
    let m = |k: &str| machine[k].as_str().map(str::to_owned).unwrap_or_else(|| machine[k].to_string());
    let kind = if plan.quick {
        "quick smoke run: numbers are not meaningful"
    } else if plan.only.is_some() || !plan.full_length() {
        "partial run"
    } else {
        "full run"
    };
    // RSS depends on the release build's code layout (build.rs): scripts/bench checks
    // whether this build still finds the text-order list and says so here.
    let text_order = match std::env::var("BENCH_TEXT_ORDER") {
        Ok(line) if !line.trim().is_empty() => format!("Code layout: {}.", line.trim().trim_end_matches('.')),
        _ => "Code layout: not checked (run through `scripts/bench`, which runs `scripts/text-order --check`).".into(),
    };
    let header = format!(
        "## natsbridge end-to-end benchmark ({kind})\n\n{date} · {} × {} · {} GiB RAM · Linux {} · {} · {} · load average at start {}, at end {load_end}\n\n\
         Every phase ran {} times, in rounds that visit every path in turn: {:.1} s per 1k-rps run, {:.1} s per sweep-step run \
         (rates {:?}), {:.1} s per fixed-concurrency run. Sidecar `worker_threads`: {}. Each figure is the median over the runs, \
         with min–max in brackets; a figure from a phase with errors is \"not measured\".\n\n\
         1 KiB request bodies (and 1 KiB echoed replies on a–d), keep-alive connections (one pool of at most {MAX_CONNECTIONS} per process \
         the load goes into, shared by its paths, as one app's), warm-up before the rounds. Latency in ms; \
         fixed-rate rows are measured from each request's intended send time (coordinated-omission corrected), concurrency rows from \
         the actual send. CPU is utime+stime from /proc per process (the bench process holds the load generator, the app and the raw \
         baselines' clients), RSS is the maximum VmRSS sampled every 100 ms, with the most file descriptors open at once (mostly \
         connections) beside it. Host CPU stolen is the hypervisor's share of this VM's CPU time during the phase (/proc/stat). \
         {text_order}\n\n",
        m("nproc"),
        m("cpu"),
        m("memory_gib"),
        m("kernel"),
        m("nats_server"),
        m("rustc"),
        m("load_average_at_start"),
        plan.runs,
        plan.rate.as_secs_f64(),
        plan.sweep_step.as_secs_f64(),
        plan.sweep_rates,
        plan.saturation.as_secs_f64(),
        plan.sidecar_threads.map(|n| n.to_string()).unwrap_or_else(|| "default".into()),
    );
    let md = report::markdown(&header, &bench.phases, &goals, &micro, idle) + &tokens::section(&bench.phases);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (out_dir, stem) = match kind {
        "full run" => (root.join("bench-results"), "latest"),
        _ if plan.quick => (root.join("target/bench-results"), "quick"),
        _ => (root.join("target/bench-results"), "partial"),
    };
    std::fs::create_dir_all(&out_dir).unwrap();
    let js_out = json!({
        "date": date,
        "kind": kind,
        "machine": machine,
        "load_average_at_end": load_end,
        "runs": plan.runs,
        "sidecar_worker_threads": plan.sidecar_threads,
        "body_bytes": BODY_LEN,
        "idle_rss_mb": idle,
        "phases": bench.phases,
        "goals": goals.iter().map(|g| json!({"goal": g.goal, "measured": g.measured, "met": g.met})).collect::<Vec<_>>(),
        "micro_ns": micro,
        "failures": bench.failures,
        "wall_seconds": started.elapsed().as_secs_f64(),
    });
    let md_path: PathBuf = out_dir.join(format!("{stem}.md"));
    std::fs::write(&md_path, &md).unwrap();
    std::fs::write(out_dir.join(format!("{stem}.json")), serde_json::to_string_pretty(&js_out).unwrap() + "\n").unwrap();
    println!("\n{md}");
    println!("wrote {} and .json ({:.0} s)", md_path.display(), started.elapsed().as_secs_f64());
    if bench.failures.is_empty() {
        0
    } else {
        eprintln!("\nFAILED paths:");
        for f in &bench.failures {
            eprintln!("  {f}");
        }
        1
    }
}
