//! Issue 17's measurement: the CPU a request costs the requester with async-nats' own
//! request multiplexer (`Client::request`) and with ours (`natsbridge::nats::replies`),
//! in the same run, against the same nats-server and the same responder.
//!
//! The responder is a child process (this binary with `--responder URL`), so this
//! process's CPU time (utime + stime from /proc/self/stat) is the requester's alone: the
//! client's connection task, the multiplexer and the callers. Both multiplexers share one
//! connection, and the runs alternate (round by round, the order flips), so drift in the
//! machine's load hits both alike. Each round runs both at fixed concurrency (throughput
//! and CPU per request at saturation) and at a fixed rate (CPU per request when every
//! request wakes the process up).
//!
//! Run with `scripts/bench --replies` (or `cargo bench --bench replies [-- --quick]`).

#[allow(dead_code)]
#[path = "e2e/procs.rs"]
mod procs;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use natsbridge::metrics::Metrics;
use natsbridge::nats::replies::Replies;

/// Counts heap allocations (alloc and realloc calls) of this process, so the report can
/// give allocations per request for each multiplexer. One relaxed atomic add per call:
/// both variants pay it alike.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; only a counter is added.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        std::alloc::System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        std::alloc::System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        std::alloc::System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const BODY_LEN: usize = 1024;
const SUBJECT: &str = "bench.mux";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--responder") {
        let url = args.get(i + 1).expect("--responder URL").clone();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(responder(url));
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    if !quick && !args.iter().any(|a| a == "--bench") {
        eprintln!("replies: run it with `scripts/bench --replies` (or `cargo bench --bench replies [-- --quick]`)");
        return;
    }
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<f64>().ok());
    let runs = env("BENCH_RUNS").map(|n| n as usize).unwrap_or(3).max(1);
    let secs = env("BENCH_REPLIES_SECS").unwrap_or(if quick { 0.5 } else { 5.0 });
    // The sidecar's default runtime (one thread) unless told otherwise.
    let threads = env("BENCH_REPLIES_THREADS").map(|n| n as usize).unwrap_or(1);
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build().unwrap()
    };
    let code = rt.block_on(run(quick, runs, Duration::from_secs_f64(secs), threads));
    std::process::exit(code);
}

/// Echoes every request until its parent goes away (stdin closes) or kills it.
async fn responder(url: String) {
    let nc = async_nats::connect(&url).await.expect("responder connects");
    let mut sub = nc.subscribe(SUBJECT).await.expect("subscribe");
    nc.flush().await.expect("flush");
    println!("ready");
    while let Some(m) = sub.next().await {
        if let Some(reply) = m.reply {
            let _ = nc.publish(reply, m.payload).await;
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    AsyncNats,
    Ours,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::AsyncNats => "async-nats Client::request",
            Variant::Ours => "natsbridge Replies::request",
        }
    }
}

struct Requester {
    client: async_nats::Client,
    replies: Replies,
    body: Bytes,
}

impl Requester {
    async fn one(&self, v: Variant) -> bool {
        let r = match v {
            Variant::AsyncNats => self.client.request(SUBJECT, self.body.clone()).await.map(|m| m.payload.len()).ok(),
            Variant::Ours => self
                .replies
                .request(SUBJECT.into(), async_nats::HeaderMap::new(), self.body.clone(), Duration::from_secs(5))
                .await
                .map(|m| m.payload.len())
                .ok(),
        };
        r == Some(BODY_LEN)
    }
}

/// One measured run: requests done, errors, seconds, CPU seconds of this process and of
/// the server.
struct Sample {
    variant: Variant,
    load: &'static str,
    ok: u64,
    errors: u64,
    secs: f64,
    cpu: f64,
    server_cpu: f64,
    allocations: u64,
}

impl Sample {
    fn cpu_us(&self) -> f64 {
        self.cpu * 1e6 / self.ok.max(1) as f64
    }
    fn server_us(&self) -> f64 {
        self.server_cpu * 1e6 / self.ok.max(1) as f64
    }
    fn allocs(&self) -> f64 {
        self.allocations as f64 / self.ok.max(1) as f64
    }
    fn rps(&self) -> f64 {
        self.ok as f64 / self.secs
    }
}

async fn closed_loop(req: &Arc<Requester>, v: Variant, conc: usize, dur: Duration) -> (u64, u64, f64) {
    let (ok, err) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let start = Instant::now();
    let deadline = start + dur;
    let tasks: Vec<_> = (0..conc)
        .map(|_| {
            let (req, ok, err) = (req.clone(), ok.clone(), err.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let c = if req.one(v).await { &ok } else { &err };
                    c.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    (ok.load(Ordering::Relaxed), err.load(Ordering::Relaxed), start.elapsed().as_secs_f64())
}

async fn fixed_rate(req: &Arc<Requester>, v: Variant, rate: f64, dur: Duration) -> (u64, u64, f64) {
    let (ok, err) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let start = Instant::now();
    let n = (rate * dur.as_secs_f64()) as u64;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(n as usize);
    for _ in 0..n {
        tick.tick().await;
        let (req, ok, err) = (req.clone(), ok.clone(), err.clone());
        tasks.push(tokio::spawn(async move {
            let c = if req.one(v).await { &ok } else { &err };
            c.fetch_add(1, Ordering::Relaxed);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    (ok.load(Ordering::Relaxed), err.load(Ordering::Relaxed), start.elapsed().as_secs_f64())
}

async fn run(quick: bool, runs: usize, dur: Duration, threads: usize) -> i32 {
    let tck = procs::clock_ticks();
    let load_start = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let nats = procs::NatsServer::start();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg("--responder")
        .arg(nats.url())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the responder");
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "the responder did not start");
    }
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let replies = Replies::start(&client, &Metrics::new()).await.expect("the multiplexer subscribes");
    let req = Arc::new(Requester { client, replies, body: Bytes::from(vec![b'x'; BODY_LEN]) });
    // Warm-up: both multiplexers subscribed and the connection's buffers grown.
    for v in [Variant::AsyncNats, Variant::Ours] {
        closed_loop(&req, v, 8, Duration::from_millis(300)).await;
    }
    let me = std::process::id();
    let server = nats.child.id();
    let (conc, rate) = (32, 2000.0);
    let mut samples = Vec::new();
    for r in 0..runs {
        let order = if r % 2 == 0 { [Variant::AsyncNats, Variant::Ours] } else { [Variant::Ours, Variant::AsyncNats] };
        for load in ["concurrency 32", "2000 rps"] {
            for v in order {
                let (t0, s0) = (procs::cpu_ticks(me), procs::cpu_ticks(server));
                let a0 = ALLOCATIONS.load(Ordering::Relaxed);
                let (ok, errors, secs) =
                    if load == "2000 rps" { fixed_rate(&req, v, rate, dur).await } else { closed_loop(&req, v, conc, dur).await };
                let cpu = procs::cpu_ticks(me).saturating_sub(t0) as f64 / tck;
                let server_cpu = procs::cpu_ticks(server).saturating_sub(s0) as f64 / tck;
                let allocations = ALLOCATIONS.load(Ordering::Relaxed) - a0;
                let s = Sample { variant: v, load, ok, errors, secs, cpu, server_cpu, allocations };
                println!(
                    "  run {r} {:<28} {:<15} {:>8.0}/s  {:>6.1} µs CPU/request (server {:>5.1})  {:>5.1} allocations/request  errors {}",
                    v.name(),
                    load,
                    s.rps(),
                    s.cpu_us(),
                    s.server_us(),
                    s.allocs(),
                    errors
                );
                samples.push(s);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let load_end = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let md = report(&samples, runs, dur, threads, quick, &load_start, &load_end);
    println!("\n{md}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(if quick { "replies-quick.md" } else { "replies.md" }), &md).unwrap();
    if samples.iter().any(|s| s.errors > 0 || s.ok == 0) {
        eprintln!("FAILED: a run had errors");
        return 1;
    }
    0
}

fn spread(mut v: Vec<f64>, digits: usize) -> String {
    if v.is_empty() {
        return "not measured".into();
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let med = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    format!("{med:.digits$} ({:.digits$}–{:.digits$})", v[0], v[n - 1])
}

fn report(samples: &[Sample], runs: usize, dur: Duration, threads: usize, quick: bool, load_start: &str, load_end: &str) -> String {
    let la = |s: &str| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    let mut s = format!(
        "## Reply multiplexer: async-nats vs natsbridge ({})\n\n{runs} rounds of {:.1} s per variant and load, alternating order; \
         requester runtime: {}; load average at start {}, at end {}. CPU is this process's utime+stime per request (the \
         responder is another process); allocations are this process's alloc + realloc calls per request (the load \
         generator's included, alike for both). Median (min–max) over the rounds; a load with errors is \"not measured\".\n\n\
         | variant | load | requests/s | CPU µs / request | allocations / request | nats-server CPU µs / request |\n|---|---|---:|---:|---:|---:|\n",
        if quick { "quick smoke run: numbers are not meaningful" } else { "same run, same server" },
        dur.as_secs_f64(),
        if threads <= 1 { "current-thread".to_owned() } else { format!("{threads} workers") },
        la(load_start),
        la(load_end),
    );
    for load in ["concurrency 32", "2000 rps"] {
        for v in [Variant::AsyncNats, Variant::Ours] {
            let of: Vec<&Sample> = samples.iter().filter(|x| x.variant == v && x.load == load).collect();
            let clean = of.iter().all(|x| x.errors == 0 && x.ok > 0);
            let col =
                |f: &dyn Fn(&Sample) -> f64, d| if clean { spread(of.iter().map(|x| f(x)).collect(), d) } else { "not measured".into() };
            s += &format!(
                "| {} | {load} | {} | {} | {} | {} |\n",
                v.name(),
                col(&|x| x.rps(), 0),
                col(&|x| x.cpu_us(), 1),
                col(&|x| x.allocs(), 1),
                col(&|x| x.server_us(), 1)
            );
        }
    }
    s += "\nOurs ÷ async-nats, paired by round (below 1: ours is cheaper or faster):\n\n| load | CPU per request | requests/s |\n|---|---:|---:|\n";
    for load in ["concurrency 32", "2000 rps"] {
        let pick = |v: Variant| samples.iter().filter(move |x| x.variant == v && x.load == load).collect::<Vec<_>>();
        let (a, o) = (pick(Variant::AsyncNats), pick(Variant::Ours));
        let clean = a.iter().chain(&o).all(|x| x.errors == 0 && x.ok > 0);
        let ratio = |f: &dyn Fn(&Sample) -> f64| {
            if clean {
                spread(a.iter().zip(&o).map(|(a, o)| f(o) / f(a)).collect(), 2)
            } else {
                "not measured".into()
            }
        };
        s += &format!("| {load} | {} | {} |\n", ratio(&|x| x.cpu_us()), ratio(&|x| x.rps()));
    }
    s
}
