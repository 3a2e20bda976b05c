//! Issue 14's allocation count: heap allocations per request on path c (HTTP client →
//! sidecar A, egress `request` route → NATS → sidecar B, ingress `request` route → app →
//! back), against direct HTTP to the same app (client + app cost) in the same run.
//!
//! Everything but nats-server runs in this process, each part on its own OS thread with
//! its own current-thread runtime (the sidecar's default): the client, the app, sidecar A
//! and sidecar B. A counting global allocator tags each thread (blocking-pool threads take
//! their runtime's tag), so besides "path c − direct" it counts each sidecar's own
//! allocations directly. Logging is the binary's default (`info`, `async_nats=warn`) to a
//! sink, so disabled spans and events cost what they cost in production.
//!
//! With `ALLOCS_SITES=1` it also records a backtrace of one in `ALLOCS_SAMPLE` (97)
//! allocations of each sidecar during the measured window and prints the call sites that
//! allocate most (the innermost frame outside the allocator, and the innermost frame of
//! natsbridge). Sampling perturbs nothing it counts: its own allocations are not counted.
//! `ALLOCS_MIN_SIZE` samples only allocations of at least that many bytes: with
//! `ALLOCS_SAMPLE=1` and 1008 it lists every allocation glibc serves from its large bins,
//! each of which first consolidates the fast bins (`malloc_consolidate`).
//!
//! Run with `cargo bench --bench allocs` (`-- --quick` for fewer requests); requests per
//! phase `ALLOCS_REQUESTS` (10,000), warm-up `ALLOCS_WARMUP` (2,000), rounds `ALLOCS_ROUNDS` (2).

#[allow(dead_code)]
#[path = "e2e/procs.rs"]
mod procs;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_util::sync::CancellationToken;

const OTHER: usize = 0;
const CLIENT: usize = 1;
const APP: usize = 2;
const SIDECAR_A: usize = 3;
const SIDECAR_B: usize = 4;
const TAGS: usize = 5;
const TAG_NAMES: [&str; TAGS] = ["other", "client", "app", "sidecar A", "sidecar B"];

thread_local! {
    /// Which part of the pipeline this thread runs (const-initialised, no destructor:
    /// safe to read from inside the allocator).
    static TAG: Cell<usize> = const { Cell::new(OTHER) };
    /// Set while this thread records a sample: the sampler's own allocations are neither
    /// counted nor sampled.
    static SAMPLING: Cell<bool> = const { Cell::new(false) };
    static UNTIL_SAMPLE: Cell<u64> = const { Cell::new(0) };
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
static ALLOCS: [AtomicU64; TAGS] = [ZERO; TAGS];
static REALLOCS: [AtomicU64; TAGS] = [ZERO; TAGS];
/// Sampling is on (measured window of path c, with ALLOCS_SITES=1).
static SAMPLE_ON: AtomicBool = AtomicBool::new(false);
static SAMPLE_EVERY: AtomicU64 = AtomicU64::new(97);
/// Only allocations of at least this many bytes are sampled (`ALLOCS_MIN_SIZE`, default 0).
static SAMPLE_MIN_SIZE: AtomicU64 = AtomicU64::new(0);
static SAMPLES: Mutex<Vec<(usize, usize, std::backtrace::Backtrace)>> = Mutex::new(Vec::new());

struct Counting;

impl Counting {
    fn count(counters: &[AtomicU64; TAGS], size: usize) {
        if SAMPLING.with(|s| s.get()) {
            return;
        }
        let tag = TAG.with(|t| t.get());
        counters[tag].fetch_add(1, Ordering::Relaxed);
        if (tag == SIDECAR_A || tag == SIDECAR_B)
            && SAMPLE_ON.load(Ordering::Relaxed)
            && size as u64 >= SAMPLE_MIN_SIZE.load(Ordering::Relaxed)
        {
            let due = UNTIL_SAMPLE.with(|n| {
                let left = n.get();
                n.set(if left == 0 { SAMPLE_EVERY.load(Ordering::Relaxed) - 1 } else { left - 1 });
                left == 0
            });
            if due {
                SAMPLING.with(|s| s.set(true));
                let bt = std::backtrace::Backtrace::force_capture();
                SAMPLES.lock().unwrap_or_else(|e| e.into_inner()).push((tag, size, bt));
                SAMPLING.with(|s| s.set(false));
            }
        }
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; only counters (and,
// when sampling, a backtrace taken with the re-entrancy flag set) are added.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        Self::count(&ALLOCS, layout.size());
        std::alloc::System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        Self::count(&ALLOCS, layout.size());
        std::alloc::System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        std::alloc::System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        Self::count(&REALLOCS, new_size);
        std::alloc::System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const BODY_LEN: usize = 1024;

const SIDECAR_A_TOML: &str = r#"
[sidecar]
service = "allocs-a"

[defaults]
timeout = "10s"
max_body = "1MiB"

[[outbound]]
name = "echo"
method = "POST"
path = "/echo"
subject = "allocs.echo"
mode = "request"
"#;

const SIDECAR_B_TOML: &str = r#"
[sidecar]
service = "allocs-b"

[defaults]
timeout = "10s"
max_body = "1MiB"

[[inbound]]
name = "echo"
subject = "allocs.echo"
mode = "request"
method = "POST"
path = "/echo"
concurrency = 256
"#;

type Client = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// A thread with its own current-thread runtime; its blocking pool shares its tag.
fn runtime(tag: usize) -> tokio::runtime::Runtime {
    TAG.with(|t| t.set(tag));
    tokio::runtime::Builder::new_current_thread().enable_all().on_thread_start(move || TAG.with(|t| t.set(tag))).build().unwrap()
}

/// The echo app (as the e2e bench's), on its own thread.
fn start_app() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        runtime(APP).block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let mut res = Response::new(Full::new(body));
                        res.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/octet-stream"));
                        Ok::<_, Infallible>(res)
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        })
    });
    addr
}

/// A sidecar from `toml` on its own thread; returns its egress address.
fn start_sidecar(tag: usize, toml: &str, nats_url: &str, app: SocketAddr, shutdown: CancellationToken) -> SocketAddr {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.toml");
    std::fs::write(&path, toml).unwrap();
    let config = natsbridge::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let (egress, admin) = (std::net::TcpListener::bind("127.0.0.1:0").unwrap(), std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let addr = egress.local_addr().unwrap();
    let overrides = natsbridge::config::Overrides {
        nats_servers: Some(vec![nats_url.to_owned()]),
        app_url: Some(format!("http://{app}").parse().unwrap()),
        ..Default::default()
    };
    std::thread::spawn(move || {
        let _dir = dir;
        runtime(tag).block_on(async move {
            egress.set_nonblocking(true).unwrap();
            admin.set_nonblocking(true).unwrap();
            let (_reload_tx, reload) = tokio::sync::mpsc::channel(1);
            let r = natsbridge::sidecar::run(natsbridge::sidecar::Parts {
                config,
                overrides,
                egress: tokio::net::TcpListener::from_std(egress).unwrap(),
                admin: tokio::net::TcpListener::from_std(admin).unwrap(),
                env: Arc::new(|_| None),
                reload,
                shutdown,
            })
            .await;
            if let Err(e) = r {
                eprintln!("sidecar {}: {e}", TAG_NAMES[tag]);
                std::process::exit(1);
            }
        })
    });
    addr
}

/// One sequential POST of the 1 KiB body; true when it echoed it.
async fn post(client: &Client, uri: &Uri, body: &Bytes) -> bool {
    let req = Request::post(uri.clone())
        .header(http::header::CONTENT_TYPE, "application/octet-stream")
        .body(Full::new(body.clone()))
        .expect("a valid request");
    let Ok(res) = client.request(req).await else { return false };
    let ok = res.status() == StatusCode::OK;
    let got = res.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
    ok && got == BODY_LEN
}

#[derive(Clone, Copy, Default)]
struct Counts {
    allocs: [u64; TAGS],
    reallocs: [u64; TAGS],
}

fn snapshot() -> Counts {
    let mut c = Counts::default();
    for i in 0..TAGS {
        c.allocs[i] = ALLOCS[i].load(Ordering::Relaxed);
        c.reallocs[i] = REALLOCS[i].load(Ordering::Relaxed);
    }
    c
}

/// Per request over one measured window: allocations and reallocs per tag.
struct PerRequest {
    allocs: [f64; TAGS],
    reallocs: [f64; TAGS],
}

impl PerRequest {
    fn total(&self) -> (f64, f64) {
        (self.allocs.iter().sum(), self.reallocs.iter().sum())
    }
}

async fn measure(client: &Client, uri: &Uri, body: &Bytes, warmup: u64, n: u64, sample: bool) -> PerRequest {
    for _ in 0..warmup {
        assert!(post(client, uri, body).await, "warm-up request to {uri} failed");
    }
    let before = snapshot();
    SAMPLE_ON.store(sample, Ordering::Relaxed);
    for _ in 0..n {
        assert!(post(client, uri, body).await, "request to {uri} failed");
    }
    SAMPLE_ON.store(false, Ordering::Relaxed);
    let after = snapshot();
    let per = |a: u64, b: u64| (a - b) as f64 / n as f64;
    PerRequest {
        allocs: std::array::from_fn(|i| per(after.allocs[i], before.allocs[i])),
        reallocs: std::array::from_fn(|i| per(after.reallocs[i], before.reallocs[i])),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(d);
    let n = env("ALLOCS_REQUESTS", if quick { 1_000 } else { 10_000 });
    let warmup = env("ALLOCS_WARMUP", if quick { 200 } else { 2_000 });
    let rounds = env("ALLOCS_ROUNDS", if quick { 1 } else { 2 }).max(1);
    let sites = std::env::var("ALLOCS_SITES").is_ok_and(|v| v == "1");
    SAMPLE_EVERY.store(env("ALLOCS_SAMPLE", 97).max(1), Ordering::Relaxed);
    SAMPLE_MIN_SIZE.store(env("ALLOCS_MIN_SIZE", 0), Ordering::Relaxed);

    // The binary's default logging, written nowhere.
    let filter = tracing_subscriber::EnvFilter::new(std::env::var("ALLOCS_LOG").unwrap_or_else(|_| "info,async_nats=warn".into()));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::sink).init();

    let nats = procs::NatsServer::start();
    let app = start_app();
    let shutdown = CancellationToken::new();
    let b = start_sidecar(SIDECAR_B, SIDECAR_B_TOML, &nats.url(), app, shutdown.clone());
    let a = start_sidecar(SIDECAR_A, SIDECAR_A_TOML, &nats.url(), app, shutdown.clone());
    let _ = b; // B takes its requests from NATS only.

    let rt = runtime(CLIENT);
    rt.block_on(async move {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(connector);
        let body = Bytes::from(vec![b'x'; BODY_LEN]);
        let direct: Uri = format!("http://{app}/echo").parse().unwrap();
        let path_c: Uri = format!("http://{a}/echo").parse().unwrap();
        // Both sidecars up: NATS connected, B subscribed.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !post(&client, &path_c, &body).await {
            assert!(Instant::now() < deadline, "path c did not answer within 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!("allocations per request, {n} sequential {BODY_LEN}-byte POSTs after {warmup} warm-up, keep-alive client");
        println!("| round | path | total allocs | reallocs | client | app | sidecar A | sidecar B | other |");
        println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
        for round in 1..=rounds {
            let d = measure(&client, &direct, &body, warmup, n, false).await;
            let c = measure(&client, &path_c, &body, warmup, n, sites && round == rounds).await;
            for (name, p) in [("direct", &d), ("c", &c)] {
                let (t, r) = p.total();
                let cell = |i: usize| format!("{:.2} + {:.2}", p.allocs[i], p.reallocs[i]);
                println!(
                    "| {round} | {name} | {t:.2} | {r:.2} | {} | {} | {} | {} | {} |",
                    cell(CLIENT),
                    cell(APP),
                    cell(SIDECAR_A),
                    cell(SIDECAR_B),
                    cell(OTHER)
                );
            }
            let ((dt, dr), (ct, cr)) = (d.total(), c.total());
            println!(
                "| {round} | **c − direct** (both sidecars) | **{:.2}** | **{:.2}** | | | A alone {:.2} + {:.2} | B alone {:.2} + {:.2} | |",
                ct - dt,
                cr - dr,
                c.allocs[SIDECAR_A],
                c.reallocs[SIDECAR_A],
                c.allocs[SIDECAR_B],
                c.reallocs[SIDECAR_B]
            );
        }
        if sites {
            report_sites(n);
        }
    });
    shutdown.cancel();
    drop(nats);
}

/// The allocating call sites of the samples, per sidecar: the two innermost frames outside
/// the allocator, `core` and std, and the innermost natsbridge frame.
fn report_sites(n: u64) {
    let samples = std::mem::take(&mut *SAMPLES.lock().unwrap());
    let every = SAMPLE_EVERY.load(Ordering::Relaxed);
    for tag in [SIDECAR_A, SIDECAR_B] {
        let mut sites: BTreeMap<(String, String), u64> = BTreeMap::new();
        let mut total = 0u64;
        let large = SAMPLE_MIN_SIZE.load(Ordering::Relaxed) > 0;
        for (t, size, bt) in &samples {
            if *t != tag {
                continue;
            }
            total += 1;
            let frames = frames(&bt.to_string());
            let site: Vec<&str> = frames.iter().filter(|f| !is_plumbing(f)).take(2).map(|f| short(f)).collect();
            let mut site = site.join(" ← ");
            // Only a few large allocations: their sizes say which buffer or future each is.
            if large {
                site = format!("{site} ({size} bytes)");
            }
            let ours = frames
                .iter()
                .find(|f| f.starts_with("natsbridge::") || f.starts_with("<natsbridge::"))
                .map_or("-", |f| short(f))
                .to_owned();
            *sites.entry((site, ours)).or_default() += 1;
        }
        let mut sites: Vec<_> = sites.into_iter().collect();
        sites.sort_by_key(|s| std::cmp::Reverse(s.1));
        println!("\n{}: {total} samples (1 in {every}), ≈ allocations per request by call site", TAG_NAMES[tag]);
        println!("| per request | two innermost frames outside alloc/core/std | innermost natsbridge frame |");
        println!("|---:|---|---|");
        for ((site, ours), count) in sites.iter().take(40) {
            println!("| {:.2} | `{site}` | `{ours}` |", (*count * every) as f64 / n as f64);
        }
    }
}

/// A frame without its closure suffixes.
fn short(f: &str) -> &str {
    f.split("::{{closure}}").next().unwrap_or(f)
}

/// The function names of a formatted backtrace, innermost first, hashes stripped.
fn frames(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let (num, rest) = l.split_once(": ")?;
            num.parse::<u32>().ok()?;
            let name = rest.trim();
            // `::h0123456789abcdef` suffixes.
            Some(match name.rfind("::h") {
                Some(i) if name.len() - i == 19 => name[..i].to_owned(),
                _ => name.to_owned(),
            })
        })
        .collect()
}

/// Frames of the allocator, std's backtrace, `core` and the standard containers' growth:
/// not the place that decided to allocate.
fn is_plumbing(f: &str) -> bool {
    const PREFIXES: [&str; 10] =
        ["alloc::", "<alloc::", "core::", "<core::", "std::", "<std::", "allocs::", "<allocs::", "__rust", "__rdl"];
    f == "alloc" || f == "realloc" || f.contains("rust_alloc") || f.contains("rust_realloc") || PREFIXES.iter().any(|p| f.starts_with(p))
}
