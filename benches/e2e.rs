//! End-to-end benchmark: every path measured in one run against its baselines.
//!
//! It starts everything itself: a JetStream nats-server (random port, file storage, its
//! own store), a minimal hyper app (port 0), the sidecars as child processes of the real
//! `natsbridge` binary (so /proc tells each one's CPU and RSS), and an in-process load
//! generator (tokio + a keep-alive hyper client).
//!
//! | path | what |
//! |---|---|
//! | a | client → app (direct HTTP) |
//! | b | async-nats request → async-nats responder (raw NATS, the floor) |
//! | c | client → sidecar A (egress request) → NATS → sidecar B (ingress request) → app |
//! | d | client → sidecar A (tunnel) → NATS → sidecar B (tunnel) → app |
//! | e | client → sidecar A (jetstream) → 202, vs raw async-nats JetStream publish + ack |
//! | f | JetStream → sidecar F (pull consumer) → app, vs a raw async-nats pull consumer |
//!
//! Fixed-rate load measures latency from each request's *intended* send time (so a stall
//! is charged to every request it delayed: no coordinated omission); fixed concurrency
//! measures saturation throughput.
//!
//! Run with `scripts/bench` (release, ~2 min, writes `bench-results/latest.{md,json}`) or
//! `scripts/bench --quick` (a few seconds per path; asserts nothing about speed but fails
//! when any path errors).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::{Future, IntoFuture};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;

const BODY_LEN: usize = 1024;
/// Fixed-rate load stops issuing (and counts as dropped) past this many requests in flight.
const MAX_OUTSTANDING: usize = 4096;
/// The HTTP client's connection pool per path: requests past it wait for a connection
/// (and that wait counts in their latency), as with any real client's bounded pool.
const MAX_CONNECTIONS: usize = 256;

type HttpClient = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;
type OpFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
/// One request of a path, from the client's side.
type Op = Arc<dyn Fn() -> OpFuture + Send + Sync>;

/// How long each part of the run takes.
struct Plan {
    quick: bool,
    /// `BENCH_ONLY=c,e`: run only these paths (for profiling one of them).
    only: Option<Vec<String>>,
    warmup: Duration,
    rate: Duration,
    sweep_step: Duration,
    sweep_rates: &'static [f64],
    saturation: Duration,
    concurrency: usize,
    js_concurrency: usize,
    f_messages: usize,
    f_concurrency: usize,
}

impl Plan {
    fn runs(&self, path: &str) -> bool {
        self.only.as_ref().is_none_or(|o| o.iter().any(|p| p == path))
    }

    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                quick,
                only: None,
                warmup: Duration::from_millis(300),
                rate: Duration::from_millis(1500),
                sweep_step: Duration::from_millis(700),
                sweep_rates: &[2000.0],
                saturation: Duration::from_secs(1),
                concurrency: 16,
                js_concurrency: 16,
                f_messages: 1000,
                f_concurrency: 32,
            }
        } else {
            Plan {
                quick,
                only: None,
                warmup: Duration::from_secs(1),
                rate: Duration::from_secs(5),
                sweep_step: Duration::from_secs(2),
                sweep_rates: &[2000.0, 4000.0, 8000.0, 16000.0],
                saturation: Duration::from_secs(3),
                concurrency: 32,
                js_concurrency: 32,
                f_messages: 20_000,
                f_concurrency: 32,
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo nextest --all-targets` / `cargo test --benches` list and run bench targets as
    // tests: this one has none, and must not start a two-minute run there.
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
    let mut plan = Plan::new(quick);
    // Profiling aids: BENCH_ONLY=c (comma-separated paths), BENCH_RATE_SECS=30 and
    // BENCH_SATURATION_SECS=30 (phase lengths, long enough to attach `perf record -p <pid>`).
    plan.only = std::env::var("BENCH_ONLY").ok().map(|v| v.split(',').map(|p| p.trim().to_owned()).collect());
    if let Some(secs) = std::env::var("BENCH_RATE_SECS").ok().and_then(|v| v.parse::<f64>().ok()) {
        plan.rate = Duration::from_secs_f64(secs);
    }
    if let Some(secs) = std::env::var("BENCH_SATURATION_SECS").ok().and_then(|v| v.parse::<f64>().ok()) {
        plan.saturation = Duration::from_secs_f64(secs);
    }
    let code = rt.block_on(run(plan));
    rt.shutdown_timeout(Duration::from_secs(2));
    std::process::exit(code);
}

// ---------------------------------------------------------------------------------------
// Processes: nats-server and sidecars, with /proc accounting.

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn nats_server_bin() -> String {
    // scripts/test exports NATS_SERVER_BIN; a bare `cargo test` finds the pinned server
    // that scripts/install-nats-server put in the project's virtualenv.
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| {
        let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/target/venv/bin/nats-server");
        if std::path::Path::new(venv).exists() {
            venv.into()
        } else {
            "nats-server".into()
        }
    })
}

struct NatsServer {
    child: Child,
    port: u16,
    _store: tempfile::TempDir,
}

impl NatsServer {
    /// JetStream with file storage in its own store directory, on a random port.
    fn start() -> Self {
        let store = tempfile::Builder::new().prefix("natsbridge-bench-nats").tempdir().unwrap();
        let conf = store.path().join("nats.conf");
        let sd = store.path().join("js");
        std::fs::write(&conf, format!("listen: \"127.0.0.1:-1\"\njetstream {{ store_dir: {sd:?} }}\nmax_payload: 1MB\n")).unwrap();
        let ports = store.path().join("ports");
        std::fs::create_dir_all(&ports).unwrap();
        let log = std::fs::File::create(store.path().join("nats.log")).unwrap();
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&conf)
            .arg("--ports_file_dir")
            .arg(&ports)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server must be on PATH (scripts/install-nats-server)");
        let deadline = Instant::now() + Duration::from_secs(15);
        let port = loop {
            let found = std::fs::read_dir(&ports).ok().and_then(|mut d| d.next()).and_then(|e| e.ok()).and_then(|e| {
                let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(e.path()).ok()?).ok()?;
                v["nats"][0].as_str()?.rsplit(':').next()?.parse::<u16>().ok()
            });
            if let Some(p) = found {
                if std::net::TcpStream::connect(("127.0.0.1", p)).is_ok() {
                    break p;
                }
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not start: {}",
                std::fs::read_to_string(store.path().join("nats.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        Self { child, port, _store: store }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct SidecarProc {
    name: &'static str,
    child: Child,
    egress: SocketAddr,
    admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl SidecarProc {
    fn start(name: &'static str, toml: &str, nats_url: &str, app_url: &str) -> Self {
        let dir = tempfile::Builder::new().prefix("natsbridge-bench-sidecar").tempdir().unwrap();
        let path = dir.path().join("routes.toml");
        std::fs::write(&path, toml).unwrap();
        let egress: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.path().join("sidecar.log")).unwrap();
        // BENCH_WRAP_SIDECAR="valgrind --tool=callgrind" (say) runs each sidecar under it.
        let wrap: Vec<String> =
            std::env::var("BENCH_WRAP_SIDECAR").map(|w| w.split_whitespace().map(str::to_owned).collect()).unwrap_or_default();
        let mut cmd = match wrap.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(env!("CARGO_BIN_EXE_natsbridge"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_natsbridge")),
        };
        let child = cmd
            .arg("run")
            .arg("--config")
            .arg(&path)
            .arg("--listen")
            .arg(egress.to_string())
            .arg("--admin-listen")
            .arg(admin.to_string())
            .arg("--nats-url")
            .arg(nats_url)
            .arg("--app-url")
            .arg(app_url)
            .arg("--log-level")
            .arg("warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the natsbridge binary");
        Self { name, child, egress, admin, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sidecar.log")).unwrap_or_default()
    }

    async fn wait_ready(&mut self, client: &HttpClient) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let uri: Uri = format!("http://{}/readyz", self.admin).parse().unwrap();
        loop {
            let req = Request::get(uri.clone()).body(Full::new(Bytes::new())).unwrap();
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(1), client.request(req)).await {
                if r.status() == StatusCode::OK {
                    return Ok(());
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("sidecar {} exited ({status}):\n{}", self.name, self.log()));
            }
            if Instant::now() > deadline {
                return Err(format!("sidecar {} not ready after 30 s:\n{}", self.name, self.log()));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn watched(&self) -> Watched {
        Watched { name: self.name.to_owned(), pid: self.child.id() }
    }
}

impl Drop for SidecarProc {
    /// SIGTERM (a clean drain, and a profiler wrapper gets to write its output), then
    /// SIGKILL if it lingers.
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let patience = if std::env::var("BENCH_WRAP_SIDECAR").is_ok() { 120 } else { 5 };
        let deadline = Instant::now() + Duration::from_secs(patience);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process whose CPU time and RSS each phase reports.
#[derive(Clone)]
struct Watched {
    name: String,
    pid: u32,
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// utime + stime, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

#[derive(Serialize, Clone, Debug)]
struct ProcUsage {
    name: String,
    cpu_seconds: f64,
    /// CPU seconds per wall second of the phase.
    vcpu: f64,
    cpu_seconds_per_10k: f64,
    rss_mb_max: f64,
}

/// Samples RSS while a phase runs and reads CPU time around it.
struct Meter {
    procs: Vec<Watched>,
    start_ticks: Vec<u64>,
    started: Instant,
    max_rss: Arc<Vec<AtomicU64>>,
    stop: tokio_util::sync::CancellationToken,
}

impl Meter {
    fn start(procs: &[Watched]) -> Self {
        let procs = procs.to_vec();
        let start_ticks = procs.iter().map(|p| cpu_ticks(p.pid)).collect();
        let max_rss: Arc<Vec<AtomicU64>> = Arc::new(procs.iter().map(|p| AtomicU64::new(rss_kb(p.pid))).collect());
        let stop = tokio_util::sync::CancellationToken::new();
        let (pids, m, s) = (procs.iter().map(|p| p.pid).collect::<Vec<_>>(), max_rss.clone(), stop.clone());
        tokio::spawn(async move {
            while !s.is_cancelled() {
                for (i, pid) in pids.iter().enumerate() {
                    m[i].fetch_max(rss_kb(*pid), Ordering::Relaxed);
                }
                tokio::select! { _ = s.cancelled() => {}, _ = tokio::time::sleep(Duration::from_millis(100)) => {} }
            }
        });
        Self { procs, start_ticks, started: Instant::now(), max_rss, stop }
    }

    fn finish(self, requests: u64, tck: f64) -> Vec<ProcUsage> {
        self.stop.cancel();
        let wall = self.started.elapsed().as_secs_f64();
        self.procs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let cpu = cpu_ticks(p.pid).saturating_sub(self.start_ticks[i]) as f64 / tck;
                let rss = self.max_rss[i].load(Ordering::Relaxed).max(rss_kb(p.pid));
                ProcUsage {
                    name: p.name.clone(),
                    cpu_seconds: cpu,
                    vcpu: cpu / wall,
                    cpu_seconds_per_10k: if requests > 0 { cpu * 10_000.0 / requests as f64 } else { 0.0 },
                    rss_mb_max: rss as f64 / 1024.0,
                }
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// The app: echoes /echo, counts /ingest.

struct App {
    addr: SocketAddr,
    ingested: Arc<AtomicU64>,
    first_ingest: Arc<Mutex<Option<Instant>>>,
}

async fn start_app() -> App {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ingested = Arc::new(AtomicU64::new(0));
    let first_ingest: Arc<Mutex<Option<Instant>>> = Arc::default();
    let (ing, first) = (ingested.clone(), first_ingest.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            let (ing, first) = (ing.clone(), first.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (ing, first) = (ing.clone(), first.clone());
                    async move {
                        let ingest = req.uri().path() == "/ingest";
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        if ingest {
                            if ing.fetch_add(1, Ordering::Relaxed) == 0 {
                                first.lock().unwrap().get_or_insert_with(Instant::now);
                            }
                            return Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))));
                        }
                        let mut res = Response::new(Full::new(body));
                        res.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/octet-stream"));
                        Ok(res)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    App { addr, ingested, first_ingest }
}

impl App {
    fn reset_ingest(&self) {
        self.ingested.store(0, Ordering::Relaxed);
        *self.first_ingest.lock().unwrap() = None;
    }
}

// ---------------------------------------------------------------------------------------
// Load generation.

fn http_client() -> HttpClient {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(MAX_CONNECTIONS)
        .build(connector)
}

/// POSTs `body` to `uri` on a fresh keep-alive client of at most [`MAX_CONNECTIONS`].
fn http_op(uri: &str, host: Option<&'static str>, body: Bytes, want: StatusCode, want_len: Option<usize>) -> Op {
    let (client, uri): (HttpClient, Uri) = (http_client(), uri.parse().unwrap());
    let pool = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    Arc::new(move || {
        let pool = pool.clone();
        let mut b = Request::post(uri.clone()).header(http::header::CONTENT_TYPE, "application/octet-stream");
        if let Some(h) = host {
            b = b.header(http::header::HOST, h);
        }
        let req = b.body(Full::new(body.clone())).unwrap();
        let client = client.clone();
        Box::pin(async move {
            let _conn = pool.acquire_owned().await.expect("never closed");
            let res = client.request(req).await.map_err(|e| format!("{e:?}"))?;
            let status = res.status();
            let body = res.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
            if status != want {
                return Err(format!("status {status}: {}", String::from_utf8_lossy(&body[..body.len().min(300)])));
            }
            if want_len.is_some_and(|l| l != body.len()) {
                return Err(format!("body of {} bytes, expected {want_len:?}", body.len()));
            }
            Ok(())
        })
    })
}

fn nats_op(client: &async_nats::Client, subject: &'static str, body: Bytes) -> Op {
    let client = client.clone();
    Arc::new(move || {
        let (client, body) = (client.clone(), body.clone());
        Box::pin(async move {
            let r = client.request(subject, body).await.map_err(|e| e.to_string())?;
            if r.payload.len() != BODY_LEN {
                return Err(format!("reply of {} bytes", r.payload.len()));
            }
            Ok(())
        })
    })
}

fn js_op(js: &async_nats::jetstream::Context, subject: &'static str, body: Bytes) -> Op {
    let js = js.clone();
    Arc::new(move || {
        let (js, body) = (js.clone(), body.clone());
        Box::pin(async move {
            let ack = js.publish(subject, body).await.map_err(|e| e.to_string())?;
            ack.await.map_err(|e| e.to_string())?;
            Ok(())
        })
    })
}

struct Recorder {
    hist: Mutex<Histogram<u64>>,
    ok: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    last_done: Mutex<Option<Instant>>,
}

impl Recorder {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            hist: Mutex::new(Histogram::new_with_bounds(1, 120_000_000, 3).unwrap()),
            ok: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
            last_done: Mutex::new(None),
        })
    }

    fn record(&self, latency: Duration, r: Result<(), String>, done: Instant) {
        match r {
            Ok(()) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                let us = (latency.as_nanos() as u64 / 1000).max(1);
                self.hist.lock().unwrap().saturating_record(us);
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.first_error.lock().unwrap().get_or_insert(e);
            }
        }
        let mut last = self.last_done.lock().unwrap();
        if last.is_none_or(|l| l < done) {
            *last = Some(done);
        }
    }
}

#[derive(Serialize, Clone, Debug)]
struct Phase {
    path: String,
    label: String,
    /// "rate", "concurrency" or "drain".
    load: String,
    target_rps: Option<f64>,
    concurrency: Option<usize>,
    seconds: f64,
    requests: u64,
    errors: u64,
    dropped: u64,
    throughput: f64,
    p50_ms: Option<f64>,
    p90_ms: Option<f64>,
    p99_ms: Option<f64>,
    p999_ms: Option<f64>,
    max_ms: Option<f64>,
    procs: Vec<ProcUsage>,
    first_error: Option<String>,
    /// Not counted as a failure: a sweep step past saturation.
    saturated: bool,
}

impl Phase {
    fn from(path: &str, label: &str, load: &str, rec: &Recorder, seconds: f64, dropped: u64) -> Self {
        let h = rec.hist.lock().unwrap();
        let q = |p: f64| (!h.is_empty()).then(|| h.value_at_quantile(p) as f64 / 1000.0);
        let ok = rec.ok.load(Ordering::Relaxed);
        Phase {
            path: path.into(),
            label: label.into(),
            load: load.into(),
            target_rps: None,
            concurrency: None,
            seconds,
            requests: ok,
            errors: rec.errors.load(Ordering::Relaxed),
            dropped,
            throughput: if seconds > 0.0 { ok as f64 / seconds } else { 0.0 },
            p50_ms: q(0.5),
            p90_ms: q(0.9),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: (!h.is_empty()).then(|| h.max() as f64 / 1000.0),
            procs: Vec::new(),
            first_error: rec.first_error.lock().unwrap().clone(),
            saturated: false,
        }
    }
}

/// Best effort: a 1 µs timer slack for the pacing thread (the default is 50 µs).
fn tighten_timer_slack() {
    let _ = std::fs::write("/proc/thread-self/timerslack_ns", "1000");
}

/// Open-loop load at `rate` requests/s for `dur`. Latency runs from each request's
/// intended send time, so the generator's or the system's stalls are not hidden.
async fn run_rate(op: &Op, rate: f64, dur: Duration) -> (Arc<Recorder>, f64, u64) {
    let rec = Recorder::new();
    let outstanding = Arc::new(AtomicUsize::new(0));
    let n = (rate * dur.as_secs_f64()).round() as u64;
    let start = Instant::now() + Duration::from_millis(2);
    let handle = tokio::runtime::Handle::current();
    let (op2, rec2, out2) = (op.clone(), rec.clone(), outstanding.clone());
    let pacer = std::thread::spawn(move || {
        tighten_timer_slack();
        let mut dropped = 0u64;
        for i in 0..n {
            let intended = start + Duration::from_secs_f64(i as f64 / rate);
            let now = Instant::now();
            if intended > now {
                std::thread::sleep(intended - now);
            }
            if out2.load(Ordering::Relaxed) >= MAX_OUTSTANDING {
                dropped += 1;
                continue;
            }
            out2.fetch_add(1, Ordering::Relaxed);
            let (op, rec, out) = (op2.clone(), rec2.clone(), out2.clone());
            handle.spawn(async move {
                let r = op().await;
                let done = Instant::now();
                rec.record(done.saturating_duration_since(intended), r, done);
                out.fetch_sub(1, Ordering::Relaxed);
            });
        }
        dropped
    });
    let dropped = tokio::task::spawn_blocking(move || pacer.join().unwrap()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while outstanding.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let end = rec.last_done.lock().unwrap().unwrap_or_else(Instant::now);
    // Throughput over the scheduled window, or longer when the tail ran late.
    let secs = end.saturating_duration_since(start).as_secs_f64().max(dur.as_secs_f64());
    (rec, secs, dropped)
}

/// Closed-loop load: `conc` workers back to back for `dur`; latency from the actual send.
async fn run_concurrency(op: &Op, conc: usize, dur: Duration) -> (Arc<Recorder>, f64) {
    let rec = Recorder::new();
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (op, rec) = (op.clone(), rec.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let r = op().await;
                let done = Instant::now();
                rec.record(done - t0, r, done);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    (rec, start.elapsed().as_secs_f64())
}

struct Bench {
    plan: Plan,
    tck: f64,
    phases: Vec<Phase>,
    failures: Vec<String>,
}

impl Bench {
    fn push(&mut self, p: Phase) {
        let line = format!(
            "  {:<3} {:<34} {:<12} {:>9.0}/s  p50 {:>7} p99 {:>7} max {:>8}  err {} drop {}",
            p.path,
            p.label,
            match (p.load.as_str(), p.target_rps, p.concurrency) {
                ("rate", Some(r), _) => format!("@{r:.0}rps"),
                ("concurrency", _, Some(c)) => format!("c={c}"),
                (l, _, _) => l.to_owned(),
            },
            p.throughput,
            fmt_ms(p.p50_ms),
            fmt_ms(p.p99_ms),
            fmt_ms(p.max_ms),
            p.errors,
            p.dropped
        );
        println!("{line}");
        let _ = std::io::stdout().flush();
        if !p.saturated && (p.errors > 0 || p.dropped > 0 || p.requests == 0) {
            self.failures.push(format!(
                "path {} ({}, {}): {} ok, {} errors, {} dropped; first error: {}",
                p.path,
                p.label,
                p.load,
                p.requests,
                p.errors,
                p.dropped,
                p.first_error.as_deref().unwrap_or("-")
            ));
        }
        self.phases.push(p);
    }

    /// Warm-up, 1k rps, a rate sweep up to saturation, and fixed concurrency.
    async fn path(&mut self, path: &str, label: &str, op: &Op, procs: &[Watched], sweep: bool) {
        if !self.plan.runs(path.trim_end_matches("-raw")) {
            return;
        }
        let _ = run_rate(op, 1000.0, self.plan.warmup).await;
        let m = Meter::start(procs);
        let (rec, secs, dropped) = run_rate(op, 1000.0, self.plan.rate).await;
        let mut p = Phase::from(path, label, "rate", &rec, secs, dropped);
        p.target_rps = Some(1000.0);
        p.procs = m.finish(p.requests, self.tck);
        self.push(p);
        if sweep {
            for &rate in self.plan.sweep_rates {
                let m = Meter::start(procs);
                let (rec, secs, dropped) = run_rate(op, rate, self.plan.sweep_step).await;
                let mut p = Phase::from(path, label, "rate", &rec, secs, dropped);
                p.target_rps = Some(rate);
                p.procs = m.finish(p.requests, self.tck);
                let saturated = p.throughput < 0.95 * rate || p.dropped > 0 || p.errors > 0;
                p.saturated = saturated;
                self.push(p);
                if saturated {
                    break;
                }
                // Let queues from the previous step drain.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.saturation(path, label, op, procs, self.plan.concurrency).await;
    }

    async fn saturation(&mut self, path: &str, label: &str, op: &Op, procs: &[Watched], conc: usize) {
        if !self.plan.runs(path.trim_end_matches("-raw")) {
            return;
        }
        let m = Meter::start(procs);
        let (rec, secs) = run_concurrency(op, conc, self.plan.saturation).await;
        let mut p = Phase::from(path, label, "concurrency", &rec, secs, 0);
        p.concurrency = Some(conc);
        p.procs = m.finish(p.requests, self.tck);
        self.push(p);
        tokio::time::sleep(Duration::from_millis(200)).await;
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
// JetStream ingress (path f): drain a preloaded stream.

async fn create_streams(js: &async_nats::jetstream::Context) {
    use async_nats::jetstream::stream::{Config, StorageType};
    for (name, subject) in [("BENCH_E", "benche.>"), ("BENCH_F", "benchf.>")] {
        let _ = js.delete_stream(name).await;
        js.create_stream(Config {
            name: name.into(),
            subjects: vec![subject.into()],
            storage: StorageType::File,
            num_replicas: 1,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("create stream {name}: {e}"));
    }
}

async fn preload(js: &async_nats::jetstream::Context, n: usize, body: &Bytes) {
    let mut acks = futures::stream::FuturesUnordered::new();
    for i in 0..n {
        let ack = js.publish("benchf.job", body.clone()).await.expect("publish");
        acks.push(ack.into_future());
        if acks.len() >= 256 || i + 1 == n {
            while let Some(r) = acks.next().await {
                r.expect("preload ack");
            }
        }
    }
}

/// Waits until `durable` on BENCH_F has acked everything; returns when the last ack landed.
async fn wait_drained(js: &async_nats::jetstream::Context, durable: &str, n: usize, timeout: Duration) -> Result<Instant, String> {
    let deadline = Instant::now() + timeout;
    let stream = js.get_stream("BENCH_F").await.map_err(|e| e.to_string())?;
    loop {
        if let Ok(info) = stream.consumer_info(durable).await {
            if info.ack_floor.stream_sequence >= n as u64 && info.num_ack_pending == 0 {
                return Ok(Instant::now());
            }
        }
        if Instant::now() > deadline {
            let info = stream.consumer_info(durable).await.map(|i| format!("{:?}", (i.ack_floor, i.num_ack_pending, i.num_pending)));
            return Err(format!("consumer {durable} did not drain {n} messages in {timeout:?}: {info:?}"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The raw baseline: an async-nats pull consumer calling the same app, `conc` in flight,
/// double-acking each message as the sidecar does.
async fn raw_consumer(
    js: &async_nats::jetstream::Context,
    client: &HttpClient,
    app: &App,
    conc: usize,
    stop: tokio_util::sync::CancellationToken,
) {
    use async_nats::jetstream::consumer::{pull, AckPolicy};
    let stream = js.get_stream("BENCH_F").await.unwrap();
    let consumer = stream
        .get_or_create_consumer(
            "raw-f",
            pull::Config {
                durable_name: Some("raw-f".into()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: (conc * 2) as i64,
                filter_subject: "benchf.>".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let uri: Uri = format!("http://{}/ingest", app.addr).parse().unwrap();
    let messages = consumer.stream().max_messages_per_batch(conc * 2).messages().await.unwrap();
    let client = client.clone();
    let work = messages.take_until(stop.cancelled_owned()).for_each_concurrent(conc, move |m| {
        let (client, uri) = (client.clone(), uri.clone());
        async move {
            let Ok(m) = m else { return };
            let mut b = Request::post(uri).header(http::header::CONTENT_TYPE, "application/octet-stream");
            if let Some(h) = &m.headers {
                for (k, vs) in h.iter() {
                    for v in vs {
                        b = b.header(k.as_ref() as &str, v.as_str());
                    }
                }
            }
            let req = b.body(Full::new(m.payload.clone())).unwrap();
            match client.request(req).await {
                Ok(r) if r.status().is_success() => {
                    let _ = r.into_body().collect().await;
                    let _ = m.double_ack().await;
                }
                _ => {
                    let _ = m.ack_with(async_nats::jetstream::AckKind::Nak(Some(Duration::from_secs(1)))).await;
                }
            }
        }
    });
    work.await;
}

// ---------------------------------------------------------------------------------------
// Reporting.

fn machine() -> serde_json::Value {
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

fn now_utc() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Criterion's latest estimates (mean, ns) for the micro-benchmarks, when they were run.
fn micro_results() -> BTreeMap<String, f64> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/criterion");
    let mut out = BTreeMap::new();
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, f64>) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if !p.is_dir() || p.file_name().is_some_and(|n| n == "report" || n == "base" || n == "change") {
                continue;
            }
            if p.file_name().is_some_and(|n| n == "new") {
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
            walk(&p, root, out);
        }
    }
    walk(&root, &root, &mut out);
    out
}

fn find<'a>(phases: &'a [Phase], path: &str, load: &str, rps: Option<f64>) -> Option<&'a Phase> {
    phases.iter().find(|p| p.path == path && p.load == load && (rps.is_none() || p.target_rps == rps))
}

fn proc_of<'a>(p: &'a Phase, name: &str) -> Option<&'a ProcUsage> {
    p.procs.iter().find(|u| u.name == name)
}

struct Goal {
    goal: String,
    measured: String,
    met: Option<bool>,
}

fn goals(phases: &[Phase], micro: &BTreeMap<String, f64>, idle: &BTreeMap<String, f64>) -> Vec<Goal> {
    let mut g = Vec::new();
    let at1k = |path: &str| find(phases, path, "rate", Some(1000.0));
    if let (Some(a), Some(b), Some(c)) = (at1k("a"), at1k("b"), at1k("c")) {
        let d50 = c.p50_ms.unwrap_or(0.0) - a.p50_ms.unwrap_or(0.0) - b.p50_ms.unwrap_or(0.0);
        let d99 = c.p99_ms.unwrap_or(0.0) - a.p99_ms.unwrap_or(0.0) - b.p99_ms.unwrap_or(0.0);
        g.push(Goal {
            goal: "sidecars' own cost c − a − b at 1k rps: ≤ 0.2 ms p50".into(),
            measured: format!(
                "{d50:.3} ms (c {:.3} − a {:.3} − b {:.3})",
                c.p50_ms.unwrap_or(0.0),
                a.p50_ms.unwrap_or(0.0),
                b.p50_ms.unwrap_or(0.0)
            ),
            met: Some(d50 <= 0.2),
        });
        g.push(Goal {
            goal: "sidecars' own cost c − a − b at 1k rps: ≤ 0.5 ms p99".into(),
            measured: format!(
                "{d99:.3} ms (c {:.3} − a {:.3} − b {:.3})",
                c.p99_ms.unwrap_or(0.0),
                a.p99_ms.unwrap_or(0.0),
                b.p99_ms.unwrap_or(0.0)
            ),
            met: Some(d99 <= 0.5),
        });
        let add = c.p50_ms.unwrap_or(0.0) - a.p50_ms.unwrap_or(0.0);
        g.push(Goal {
            goal: "added latency c − a at 1k rps ≤ 0.53 ms p50 (half of Dapr's +1.06 ms)".into(),
            measured: format!("{add:.3} ms"),
            met: Some(add <= 0.53),
        });
    }
    if let (Some(c), Some(d)) = (at1k("c"), at1k("d")) {
        let r50 = d.p50_ms.unwrap_or(0.0) / c.p50_ms.unwrap_or(1.0);
        let r99 = d.p99_ms.unwrap_or(0.0) / c.p99_ms.unwrap_or(1.0);
        let (cs, ds) = (find(phases, "c", "concurrency", None), find(phases, "d", "concurrency", None));
        let rt = match (cs, ds) {
            (Some(cs), Some(ds)) => format!(
                ", saturation {:.0}/s vs {:.0}/s ({:+.1}%)",
                ds.throughput,
                cs.throughput,
                (ds.throughput / cs.throughput - 1.0) * 100.0
            ),
            _ => String::new(),
        };
        g.push(Goal {
            goal: "tunnel d within 10% of request c (p50 and p99 at 1k rps)".into(),
            measured: format!("p50 {:+.1}%, p99 {:+.1}%{rt}", (r50 - 1.0) * 100.0, (r99 - 1.0) * 100.0),
            met: Some(r50 <= 1.1 && r99 <= 1.1),
        });
    }
    if let Some(c) = at1k("c") {
        for name in ["sidecar-a", "sidecar-b"] {
            if let Some(u) = proc_of(c, name) {
                g.push(Goal {
                    goal: format!("{name} CPU at 1k rps (path c) ≤ 0.03 vCPU"),
                    measured: format!("{:.3} vCPU ({:.2} CPU s per 10k requests)", u.vcpu, u.cpu_seconds_per_10k),
                    met: Some(u.vcpu <= 0.03),
                });
                let idle_mb = idle.get(name).copied().unwrap_or(0.0);
                g.push(Goal {
                    goal: format!("{name} RSS at 1k rps ≤ 20 MB"),
                    measured: format!("{:.1} MB under load, {idle_mb:.1} MB idle", u.rss_mb_max),
                    met: Some(u.rss_mb_max <= 20.0),
                });
            }
        }
    }
    if let (Some(es), Some(er)) = (find(phases, "e", "concurrency", None), find(phases, "e-raw", "concurrency", None)) {
        let r = es.throughput / er.throughput;
        g.push(Goal {
            goal: "JetStream publish e ≥ 70% of raw (equal concurrency)".into(),
            measured: format!("{:.0}% ({:.0}/s vs {:.0}/s)", r * 100.0, es.throughput, er.throughput),
            met: Some(r >= 0.7),
        });
    }
    if let (Some(fs), Some(fr)) = (find(phases, "f", "drain", None), find(phases, "f-raw", "drain", None)) {
        let r = fs.throughput / fr.throughput;
        g.push(Goal {
            goal: "JetStream ingress f ≥ 70% of a raw pull consumer".into(),
            measured: format!("{:.0}% ({:.0} msg/s vs {:.0} msg/s)", r * 100.0, fs.throughput, fr.throughput),
            met: Some(r >= 0.7),
        });
    }
    for kind in ["param_path", "host_route"] {
        if let (Some(t10), Some(t10k)) = (micro.get(&format!("route_lookup/{kind}/10")), micro.get(&format!("route_lookup/{kind}/10000"))) {
            let r = t10k / t10;
            g.push(Goal {
                goal: format!("route lookup ({kind}) at 10,000 routes ≤ 1.5× of 10 routes"),
                measured: format!("{r:.2}× ({t10k:.0} ns vs {t10:.0} ns)"),
                met: Some(r <= 1.5),
            });
        }
    }
    g
}

fn markdown(
    machine: &serde_json::Value,
    date: &str,
    plan: &Plan,
    phases: &[Phase],
    goals: &[Goal],
    micro: &BTreeMap<String, f64>,
    idle: &BTreeMap<String, f64>,
) -> String {
    let mut s = String::new();
    let m = |k: &str| machine[k].as_str().map(str::to_owned).unwrap_or_else(|| machine[k].to_string());
    s += &format!(
        "## natsbridge end-to-end benchmark ({})\n\n",
        if plan.quick { "quick smoke run: numbers are not meaningful" } else { "full run" }
    );
    s += &format!(
        "{date} · {} × {} · {} GiB RAM · Linux {} · {} · {} · load average at start {}\n\n",
        m("nproc"),
        m("cpu"),
        m("memory_gib"),
        m("kernel"),
        m("nats_server"),
        m("rustc"),
        m("load_average_at_start")
    );
    s += "1 KiB request bodies (and 1 KiB echoed replies on a–d), keep-alive connections, warm-up before each path. \
          Latency in ms; fixed-rate rows are measured from each request's intended send time (coordinated-omission corrected), \
          concurrency rows from the actual send. CPU is utime+stime from /proc per process (the bench process holds the load generator, the app and the raw baselines' clients), RSS is the maximum VmRSS sampled every 100 ms.\n\n";
    s += "| path | load | achieved/s | p50 | p90 | p99 | p99.9 | max | errors | sidecar CPU s / 10k req | sidecar vCPU | sidecar RSS MB | CPU s / 10k: nats-server · bench |\n";
    s += "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|\n";
    for p in phases {
        let load = match (p.load.as_str(), p.target_rps, p.concurrency) {
            ("rate", Some(r), _) => format!("{r:.0} rps{}", if p.saturated { " (saturated)" } else { "" }),
            ("concurrency", _, Some(c)) => format!("concurrency {c}"),
            ("drain", _, Some(c)) => format!("drain, {c} in flight"),
            (l, _, _) => l.to_owned(),
        };
        let sidecars: Vec<&ProcUsage> = p.procs.iter().filter(|u| u.name.starts_with("sidecar")).collect();
        let join = |f: &dyn Fn(&ProcUsage) -> String| {
            if sidecars.is_empty() {
                "–".to_owned()
            } else {
                sidecars.iter().map(|u| f(u)).collect::<Vec<_>>().join(" / ")
            }
        };
        let other =
            |n: &str| p.procs.iter().find(|u| u.name.starts_with(n)).map(|u| format!("{:.2}", u.cpu_seconds_per_10k)).unwrap_or("–".into());
        s += &format!(
            "| {} {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} · {} |\n",
            p.path,
            p.label,
            load,
            p.throughput,
            fmt_ms(p.p50_ms),
            fmt_ms(p.p90_ms),
            fmt_ms(p.p99_ms),
            fmt_ms(p.p999_ms),
            fmt_ms(p.max_ms),
            p.errors + p.dropped,
            join(&|u| format!("{}: {:.2}", short(&u.name), u.cpu_seconds_per_10k)),
            join(&|u| format!("{}: {:.3}", short(&u.name), u.vcpu)),
            join(&|u| format!("{}: {:.1}", short(&u.name), u.rss_mb_max)),
            other("nats-server"),
            other("bench"),
        );
    }
    if !idle.is_empty() {
        s += "\nIdle RSS (ready, before any load): ";
        s += &idle.iter().map(|(k, v)| format!("{k} {v:.1} MB")).collect::<Vec<_>>().join(", ");
        s += "\n";
    }
    s += "\n### Goals\n\n| goal | measured | met |\n|---|---|---|\n";
    for g in goals {
        s += &format!(
            "| {} | {} | {} |\n",
            g.goal,
            g.measured,
            match g.met {
                Some(true) => "✅ met",
                Some(false) => "❌ not met",
                None => "–",
            }
        );
    }
    if !micro.is_empty() {
        s += "\n### Micro-benchmarks (criterion, mean)\n\n| benchmark | time |\n|---|---:|\n";
        for (k, v) in micro {
            s += &format!("| {k} | {} |\n", if *v >= 1000.0 { format!("{:.2} µs", v / 1000.0) } else { format!("{v:.1} ns") });
        }
    }
    s
}

fn short(name: &str) -> &str {
    name.strip_prefix("sidecar-").unwrap_or(name)
}

// ---------------------------------------------------------------------------------------
// The run.

const SIDECAR_A: &str = r#"
[sidecar]
service = "bench-a"

[defaults]
timeout = "10s"
max_body = "1MiB"

[[outbound]]
name = "echo"
method = "POST"
path = "/echo"
subject = "bench.echo"
mode = "request"

[[outbound]]
name = "app-b"
host = "app-b"
path = "/{*rest}"
mode = "tunnel"
service = "bench-b"

[[outbound]]
name = "events"
method = "POST"
path = "/events/{id}"
subject = "benche.{id}"
mode = "jetstream"
"#;

const SIDECAR_B: &str = r#"
[sidecar]
service = "bench-b"

[defaults]
timeout = "10s"
max_body = "1MiB"

[[inbound]]
name = "echo"
subject = "bench.echo"
mode = "request"
method = "POST"
path = "/echo"
concurrency = 256

[[inbound]]
name = "tunnel"
mode = "tunnel"
concurrency = 256
"#;

fn sidecar_f(conc: usize) -> String {
    format!(
        r#"
[sidecar]
service = "bench-f"
provision = true

[defaults]
timeout = "10s"
max_body = "1MiB"

[[inbound]]
name = "jobs"
subject = "benchf.>"
mode = "jetstream"
stream = "BENCH_F"
durable = "sidecar-f"
# The bench fills the stream before the sidecar binds: read it from the start.
deliver = "all"
method = "POST"
path = "/ingest"
ack_wait = "30s"
max_deliver = 5
concurrency = {conc}
"#
    )
}

/// `BENCH_SKIP_INGRESS=1` runs only the paths without ingress (a, b, e and the raw f).
fn ingress_available() -> bool {
    std::env::var("BENCH_SKIP_INGRESS").is_err()
}

async fn run(plan: Plan) -> i32 {
    let started = Instant::now();
    let date = now_utc();
    let machine = machine();
    println!("natsbridge e2e benchmark{} — {}", if plan.quick { " (--quick)" } else { "" }, date);
    println!("machine: {machine}");
    let tck = clock_ticks();
    let body = Bytes::from(vec![b'x'; BODY_LEN]);

    let nats = NatsServer::start();
    let nats_url = nats.url();
    let nats_proc = Watched { name: "nats-server".into(), pid: nats.child.id() };
    // This process: the load generator, the app and the raw baselines' clients.
    let me = Watched { name: "bench (client+app)".into(), pid: std::process::id() };
    let app = start_app().await;
    let app_url = format!("http://{}", app.addr);
    let client = http_client();

    let nc = async_nats::connect(&nats_url).await.expect("connect to nats");
    let js = async_nats::jetstream::new(nc.clone());
    create_streams(&js).await;

    let with_ingress = ingress_available();
    let mut a = SidecarProc::start("sidecar-a", SIDECAR_A, &nats_url, &app_url);
    let mut b = with_ingress.then(|| SidecarProc::start("sidecar-b", SIDECAR_B, &nats_url, &app_url));
    let mut bench = Bench { plan, tck, phases: Vec::new(), failures: Vec::new() };
    if let Err(e) = a.wait_ready(&client).await {
        eprintln!("{e}");
        return 1;
    }
    if let Some(b) = b.as_mut() {
        if let Err(e) = b.wait_ready(&client).await {
            eprintln!("{e}");
            return 1;
        }
    }
    // Idle RSS: ready, connected, before any load.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut idle: BTreeMap<String, f64> = BTreeMap::new();
    idle.insert(a.name.into(), rss_kb(a.child.id()) as f64 / 1024.0);
    if let Some(b) = &b {
        idle.insert(b.name.into(), rss_kb(b.child.id()) as f64 / 1024.0);
    }
    println!("pids: nats-server {}, sidecar-a {}, sidecar-b {:?}", nats.child.id(), a.child.id(), b.as_ref().map(|b| b.child.id()));
    let sidecars: Vec<Watched> =
        [Some(a.watched()), b.as_ref().map(|b| b.watched())].into_iter().flatten().chain([nats_proc.clone(), me.clone()]).collect();

    // a. direct HTTP.
    let op = http_op(&format!("{app_url}/echo"), None, body.clone(), StatusCode::OK, Some(BODY_LEN));
    bench.path("a", "direct HTTP", &op, &[nats_proc.clone(), me.clone()], true).await;

    // b. raw NATS request/reply: a responder on its own connection, echoing the payload.
    let responder_nc = async_nats::connect(&nats_url).await.unwrap();
    let mut sub = responder_nc.subscribe("bench.raw").await.unwrap();
    let responder = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(reply) = m.reply {
                let _ = responder_nc.publish(reply, m.payload).await;
            }
        }
    });
    let op = nats_op(&nc, "bench.raw", body.clone());
    bench.path("b", "raw NATS request/reply", &op, &[nats_proc.clone(), me.clone()], true).await;
    responder.abort();

    if with_ingress {
        // c. request path through two sidecars.
        let op = http_op(&format!("http://{}/echo", a.egress), None, body.clone(), StatusCode::OK, Some(BODY_LEN));
        bench.path("c", "sidecar request (A→NATS→B→app)", &op, &sidecars, true).await;
        // d. tunnel path.
        let op = http_op(&format!("http://{}/echo", a.egress), Some("app-b"), body.clone(), StatusCode::OK, Some(BODY_LEN));
        bench.path("d", "sidecar tunnel (A→NATS→B→app)", &op, &sidecars, true).await;
    }

    // e. JetStream publish: through sidecar A vs raw, at equal concurrency.
    let only_a = [a.watched(), nats_proc.clone(), me.clone()];
    let op = http_op(&format!("http://{}/events/1", a.egress), None, body.clone(), StatusCode::ACCEPTED, None);
    bench.path("e", "sidecar JetStream publish → 202", &op, &only_a, false).await;
    let op = js_op(&js, "benche.raw", body.clone());
    bench.path("e-raw", "raw JetStream publish + ack", &op, &[nats_proc.clone(), me.clone()], false).await;
    // Equal concurrency, again, back to back, for the ratio (the 1k-rps rows above only
    // show latency). Run order: sidecar, raw, sidecar, raw; keep the better of each.
    for _ in 0..(if bench.plan.quick { 0 } else { 1 }) {
        let op = http_op(&format!("http://{}/events/1", a.egress), None, body.clone(), StatusCode::ACCEPTED, None);
        bench.saturation("e", "sidecar JetStream publish → 202", &op, &only_a, bench.plan.js_concurrency).await;
        let op = js_op(&js, "benche.raw", body.clone());
        bench.saturation("e-raw", "raw JetStream publish + ack", &op, &[nats_proc.clone(), me.clone()], bench.plan.js_concurrency).await;
    }
    keep_best(&mut bench.phases, "e", "concurrency");
    keep_best(&mut bench.phases, "e-raw", "concurrency");

    // f. JetStream ingress: drain a preloaded stream through the sidecar, and with a raw
    // pull consumer at the same concurrency.
    if bench.plan.runs("f") {
        let n = bench.plan.f_messages;
        let conc = bench.plan.f_concurrency;
        let t0 = Instant::now();
        preload(&js, n, &body).await;
        println!("  (preloaded {n} messages into BENCH_F in {:.1} s)", t0.elapsed().as_secs_f64());

        // Raw first: it creates its own consumer and starts at once.
        app.reset_ingest();
        let m = Meter::start(&[nats_proc.clone(), me.clone()]);
        let stop = tokio_util::sync::CancellationToken::new();
        let raw = {
            let (js, client, stop) = (js.clone(), client.clone(), stop.clone());
            let app_ref = App { addr: app.addr, ingested: app.ingested.clone(), first_ingest: app.first_ingest.clone() };
            tokio::spawn(async move { raw_consumer(&js, &client, &app_ref, conc, stop).await })
        };
        let drained = wait_drained(&js, "raw-f", n, Duration::from_secs(120)).await;
        stop.cancel();
        let _ = raw.await;
        bench.push(drain_phase("f-raw", "raw pull consumer → app", &app, n, conc, drained, m.finish(n as u64, tck)));

        if with_ingress {
            app.reset_ingest();
            let mut f = SidecarProc::start("sidecar-f", &sidecar_f(conc), &nats_url, &app_url);
            let m = Meter::start(&[f.watched(), nats_proc.clone(), me.clone()]);
            match f.wait_ready(&client).await {
                Ok(()) => {
                    let drained = wait_drained(&js, "sidecar-f", n, Duration::from_secs(120)).await;
                    let phase = drain_phase("f", "sidecar JetStream ingress → app", &app, n, conc, drained, m.finish(n as u64, tck));
                    bench.push(phase);
                    idle.insert("sidecar-f (after drain)".into(), rss_kb(f.child.id()) as f64 / 1024.0);
                }
                Err(e) => bench.failures.push(e),
            }
            drop(f);
        }
    }

    drop(a);
    drop(b);
    drop(nats);

    let micro = if bench.plan.quick { BTreeMap::new() } else { micro_results() };
    let goals = goals(&bench.phases, &micro, &idle);
    let md = markdown(&machine, &date, &bench.plan, &bench.phases, &goals, &micro, &idle);
    let out_dir = if bench.plan.quick || bench.plan.only.is_some() {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results")
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("bench-results")
    };
    let stem = if bench.plan.quick {
        "quick"
    } else if bench.plan.only.is_some() {
        "partial"
    } else {
        "latest"
    };
    std::fs::create_dir_all(&out_dir).unwrap();
    let js_out = json!({
        "date": date,
        "quick": bench.plan.quick,
        "machine": machine,
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

fn drain_phase(
    path: &str,
    label: &str,
    app: &App,
    n: usize,
    conc: usize,
    drained: Result<Instant, String>,
    procs: Vec<ProcUsage>,
) -> Phase {
    let rec = Recorder::new();
    let first = *app.first_ingest.lock().unwrap();
    let mut p = Phase::from(path, label, "drain", &rec, 0.0, 0);
    p.concurrency = Some(conc);
    p.procs = procs;
    match (drained, first) {
        (Ok(end), Some(first)) => {
            p.seconds = end.saturating_duration_since(first).as_secs_f64();
            p.requests = n as u64;
            p.throughput = n as f64 / p.seconds.max(1e-9);
            // Redeliveries would show up as extra app calls.
            let calls = app.ingested.load(Ordering::Relaxed);
            if calls < n as u64 {
                p.errors = n as u64 - calls;
                p.first_error = Some(format!("the app saw {calls} calls for {n} messages"));
            }
        }
        (Err(e), _) => {
            p.errors = 1;
            p.first_error = Some(e);
        }
        (Ok(_), None) => {
            p.errors = 1;
            p.first_error = Some("the app saw no calls".into());
        }
    }
    p
}

/// Of repeated phases for one path and load, keeps the one with the highest throughput.
fn keep_best(phases: &mut Vec<Phase>, path: &str, load: &str) {
    let best = phases
        .iter()
        .enumerate()
        .filter(|(_, p)| p.path == path && p.load == load)
        .max_by(|x, y| x.1.throughput.total_cmp(&y.1.throughput))
        .map(|(i, _)| i);
    if let Some(best) = best {
        let mut i = 0;
        phases.retain(|p| {
            let keep = !(p.path == path && p.load == load) || i == best;
            i += 1;
            keep
        });
    }
}
