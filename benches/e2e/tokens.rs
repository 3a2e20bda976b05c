//! g. Streamed tokens (issue 11): `streams` SSE streams at `per_sec` tokens/s each. The
//! token app (in this process) writes each token stamped with its write time; a token
//! crosses sidecar G (inbound `request`, streamed reply) → NATS → sidecar A (outbound
//! `request`) → an HTTP client reading incrementally, which records write → read.
//! Baseline g-raw, in the same round: the same streams as raw core NATS publish →
//! subscribe. Both run in this one process, so the stamps share a clock.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::load::{Phase, Recorder};
use crate::procs::{Meter, SidecarProc, Watched};
use crate::report::{self, groups, paired};
use crate::Bench;

/// The responder sidecar of path g, in front of the token app (sidecar A's outbound
/// `tokens` route is the caller).
const SIDECAR_G: &str = r#"
[sidecar]
service = "bench-g"

[[inbound]]
name = "tokens"
subject = "benchtok.*.*"
mode = "request"
method = "GET"
path = "/tokens/{2}/{3}"
timeout = "60s"
concurrency = 256
"#;

/// The load of a token phase, as the report names it.
const LOAD: &str = "stream";

/// Microseconds since the first call, one clock for the app and the readers.
fn micros() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// The stamp of one SSE event `data: <µs>`.
fn stamp(event: &str) -> Option<u64> {
    event.lines().find_map(|l| l.strip_prefix("data: ")).and_then(|v| v.trim().parse().ok())
}

/// The token app: `GET /tokens/{n}/{gap_us}` streams `n` SSE events, one every `gap_us`,
/// each `data: <write time µs>`, with no content length (a streamed reply).
pub async fn start_token_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req| async move { Ok::<_, Infallible>(tokens(req)) });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    addr
}

/// `GET /tokens/{n}/{gap_us}`: the events are written by a task, one per gap, stamped when
/// written.
fn tokens(req: Request<hyper::body::Incoming>) -> Response<impl hyper::body::Body<Data = Bytes, Error = Infallible>> {
    let mut parts = req.uri().path().trim_start_matches("/tokens/").split('/').map(|p| p.parse::<u64>().unwrap_or(1));
    let (n, gap) = (parts.next().unwrap_or(1), Duration::from_micros(parts.next().unwrap_or(50_000)));
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        for i in 0..n {
            tokio::time::sleep_until(start + gap * i as u32).await;
            if tx.send(Bytes::from(format!("data: {}\n\n", micros()))).await.is_err() {
                return;
            }
        }
    });
    let frames = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx)) });
    let mut res = Response::new(StreamBody::new(frames));
    res.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/event-stream"));
    res
}

/// One run of g: `streams` clients through sidecar A, each reading `n` tokens.
async fn through_sidecars(egress: SocketAddr, streams: usize, n: u64, gap: Duration) -> Arc<Recorder> {
    let rec = Recorder::new();
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut tasks = Vec::new();
    for s in 0..streams {
        let (rec, client) = (rec.clone(), client.clone());
        let uri = format!("http://{egress}/tokens/{n}/{}", gap.as_micros());
        tasks.push(tokio::spawn(async move {
            // Spread the streams' first tokens across one gap.
            tokio::time::sleep(gap * s as u32 / streams as u32).await;
            let req = Request::get(uri).body(Empty::new()).unwrap();
            let mut body = match client.request(req).await {
                Ok(r) if r.status().is_success() => r.into_body(),
                Ok(r) => return rec.record(Duration::ZERO, Err(format!("status {}", r.status())), Instant::now()),
                Err(e) => return rec.record(Duration::ZERO, Err(format!("{e:?}")), Instant::now()),
            };
            let (mut buf, mut seen) = (String::new(), 0u64);
            while seen < n {
                let Some(Ok(frame)) = body.frame().await else {
                    return rec.record(Duration::ZERO, Err(format!("the stream ended after {seen} of {n} tokens")), Instant::now());
                };
                let now = micros();
                let Ok(data) = frame.into_data() else { continue };
                buf.push_str(&String::from_utf8_lossy(&data));
                while let Some(i) = buf.find("\n\n") {
                    let event: String = buf.drain(..i + 2).collect();
                    let lat = stamp(&event).map(|t| Duration::from_micros(now.saturating_sub(t)));
                    rec.record(lat.unwrap_or_default(), lat.map(|_| ()).ok_or_else(|| format!("no stamp in {event:?}")), Instant::now());
                    seen += 1;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    rec
}

/// One run of g-raw: the same streams as core NATS subjects, one subscriber each.
async fn raw(nc: &async_nats::Client, streams: usize, n: u64, gap: Duration) -> Arc<Recorder> {
    let rec = Recorder::new();
    let mut readers = Vec::new();
    for s in 0..streams {
        let mut sub = nc.subscribe(format!("benchtok.raw.{s}")).await.unwrap();
        let rec = rec.clone();
        readers.push(tokio::spawn(async move {
            for _ in 0..n {
                match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
                    Ok(Some(m)) => {
                        let now = micros();
                        let sent = std::str::from_utf8(&m.payload).ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(now);
                        rec.record(Duration::from_micros(now.saturating_sub(sent)), Ok(()), Instant::now());
                    }
                    _ => return rec.record(Duration::ZERO, Err("a raw token never came".into()), Instant::now()),
                }
            }
        }));
    }
    nc.flush().await.unwrap();
    let mut writers = Vec::new();
    for s in 0..streams {
        let nc = nc.clone();
        writers.push(tokio::spawn(async move {
            tokio::time::sleep(gap * s as u32 / streams as u32).await;
            let start = tokio::time::Instant::now();
            for i in 0..n {
                tokio::time::sleep_until(start + gap * i as u32).await;
                let _ = nc.publish(format!("benchtok.raw.{s}"), micros().to_string().into()).await;
            }
        }));
    }
    for t in writers.into_iter().chain(readers) {
        let _ = t.await;
    }
    rec
}

/// Path g and its baseline g-raw, in rounds: `runs` × (g-raw, g), each `dur` long.
pub async fn path_g(bench: &mut Bench, a: &SidecarProc, nc: &async_nats::Client, base: &[Watched], nats_url: &str, dur: Duration) {
    let app = start_token_app().await;
    let toml = crate::with_threads(SIDECAR_G, bench.plan.sidecar_threads);
    let mut b = SidecarProc::start("sidecar-g", &toml, nats_url, &format!("http://{app}"));
    if let Err(e) = b.wait_ready(&bench.client).await {
        bench.failures.push(e);
        return;
    }
    let streams = if bench.plan.quick { 10 } else { 100 };
    let per_sec = 20u32;
    let gap = Duration::from_secs(1) / per_sec;
    let n = (dur.as_secs_f64() * per_sec as f64).round().max(1.0) as u64;
    let label = format!("{streams} streams × {per_sec} tokens/s");
    let sidecars = [vec![a.watched(), b.watched()], base.to_vec()].concat();
    for run in 0..bench.plan.runs {
        for raw_path in [true, false] {
            let m = Meter::start(if raw_path { base } else { &sidecars });
            let t = Instant::now();
            let rec = if raw_path { raw(nc, streams, n, gap).await } else { through_sidecars(a.egress, streams, n, gap).await };
            let secs = t.elapsed().as_secs_f64();
            let (path, what) =
                if raw_path { ("g-raw", "raw NATS publish → subscribe") } else { ("g", "streamed tokens (G→NATS→A→client)") };
            let mut p = Phase::from(path, &format!("{what}, {label}"), LOAD, &rec, secs, 0);
            p.target_rps = Some(streams as f64 * per_sec as f64);
            p.concurrency = Some(streams);
            p.run = run;
            p.set_usage(m.finish(p.requests, bench.tck));
            bench.push(p);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The report's section for g: added token latency per percentile (paired by round) and
/// each sidecar's CPU per 1,000 tokens/s. No goal is marked met here; the goal row is in
/// the goals table.
pub fn section(phases: &[Phase]) -> String {
    let gs = groups(phases);
    let Some(g) = gs.iter().find(|g| g.path == "g") else { return String::new() };
    let load = g.load.clone();
    let mut s = String::from("\n### Streamed tokens (path g, issue 11)\n\n| figure | median (min–max) |\n|---|---|\n");
    let fig = |v: Option<report::Spread>, unit: &str| match v {
        Some(v) => format!("{:.3} ({:.3}–{:.3}) {unit}", v.med, v.min, v.max),
        None => report::NOT_MEASURED.into(),
    };
    for (name, f) in [("p50", (|p: &Phase| p.p50_ms) as fn(&Phase) -> Option<f64>), ("p99", |p: &Phase| p.p99_ms)] {
        s += &format!("| added token latency g − g-raw, {name} | {} |\n", fig(paired(&gs, "g", "g-raw", &load, f), "ms"));
    }
    let rate = g.runs.first().and_then(|p| p.target_rps).unwrap_or(0.0);
    for name in ["sidecar-a", "sidecar-g"] {
        let per_1k = if g.clean() && rate > 0.0 { g.proc(name, |u| u.vcpu * 1000.0 / rate) } else { None };
        s += &format!("| {name} CPU per 1,000 tokens/s | {} |\n", fig(per_1k, "vCPU"));
    }
    s
}

/// Goal row: g − g-raw at p50 ≤ 0.5 ms (issue 11).
pub fn goal(phases: &[Phase]) -> report::Goal {
    let gs = groups(phases);
    let load = gs.iter().find(|g| g.path == "g").map(|g| g.load.clone()).unwrap_or_default();
    let d = paired(&gs, "g", "g-raw", &load, |p| p.p50_ms);
    let goal = format!("added token latency g − g-raw ≤ 0.5 ms p50 ({load}; issue 11: 100 streams × 20 tokens/s)");
    match d {
        Some(d) => report::Goal { goal, measured: format!("{:.3} ({:.3}–{:.3}) ms", d.med, d.min, d.max), met: Some(d.med <= 0.5) },
        None => report::Goal { goal, measured: report::NOT_MEASURED.into(), met: None },
    }
}
