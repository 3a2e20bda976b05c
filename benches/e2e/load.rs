//! The load: the app the paths end in, the operations (one request of a path), the
//! recorder and the open- and closed-loop generators.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::procs::{HttpClient, ProcUsage, Usage};
use crate::{BODY_LEN, MAX_CONNECTIONS, MAX_OUTSTANDING};

pub type OpFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
/// One request of a path, from the client's side.
pub type Op = Arc<dyn Fn() -> OpFuture + Send + Sync>;

// ---------------------------------------------------------------------------------------
// The app: echoes /echo, counts /ingest.

pub struct App {
    pub addr: SocketAddr,
    pub ingested: Arc<AtomicU64>,
    pub first_ingest: Arc<Mutex<Option<Instant>>>,
}

pub async fn start_app() -> App {
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
    pub fn reset_ingest(&self) {
        self.ingested.store(0, Ordering::Relaxed);
        *self.first_ingest.lock().unwrap() = None;
    }
}

// ---------------------------------------------------------------------------------------
// Load generation.

pub fn http_client() -> HttpClient {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(MAX_CONNECTIONS)
        .build(connector)
}

/// POSTs `body` to `uri` through `client`, at most [`MAX_CONNECTIONS`] requests at a time.
///
/// The paths into one process share one client, as one app shares one connection pool:
/// with a client per path, the pools of the paths already run stayed open (idle, kept
/// alive) and a sidecar's RSS counted up to 256 connections per path, not the load.
pub fn http_op(client: &HttpClient, uri: &str, host: Option<&'static str>, body: Bytes, want: StatusCode, want_len: Option<usize>) -> Op {
    let (client, uri): (HttpClient, Uri) = (client.clone(), uri.parse().unwrap());
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

pub fn nats_op(client: &async_nats::Client, subject: &'static str, body: Bytes) -> Op {
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

pub fn js_op(js: &async_nats::jetstream::Context, subject: &'static str, body: Bytes) -> Op {
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

pub struct Recorder {
    pub hist: Mutex<Histogram<u64>>,
    pub ok: AtomicU64,
    pub errors: AtomicU64,
    pub first_error: Mutex<Option<String>>,
    pub last_done: Mutex<Option<Instant>>,
}

impl Recorder {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            hist: Mutex::new(Histogram::new_with_bounds(1, 120_000_000, 3).unwrap()),
            ok: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
            last_done: Mutex::new(None),
        })
    }

    pub fn record(&self, latency: Duration, r: Result<(), String>, done: Instant) {
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
pub struct Phase {
    pub path: String,
    pub label: String,
    /// "rate", "concurrency" or "drain".
    pub load: String,
    pub target_rps: Option<f64>,
    pub concurrency: Option<usize>,
    pub seconds: f64,
    pub requests: u64,
    pub errors: u64,
    pub dropped: u64,
    pub throughput: f64,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub procs: Vec<ProcUsage>,
    pub first_error: Option<String>,
    /// Not counted as a failure: a sweep step past saturation (throughput short of the
    /// rate, or requests dropped at the outstanding limit; errors are errors).
    pub saturated: bool,
    /// Which of the repeated runs (rounds) this is, from 0.
    pub run: usize,
    /// Each sidecar's own time per request in this phase (`/debug/own-time`), by name.
    pub own_time: BTreeMap<String, serde_json::Value>,
    /// The share of the host's CPU time stolen by the hypervisor during the phase (%).
    pub host_steal_pct: Option<f64>,
}

impl Phase {
    pub fn from(path: &str, label: &str, load: &str, rec: &Recorder, seconds: f64, dropped: u64) -> Self {
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
            run: 0,
            own_time: BTreeMap::new(),
            host_steal_pct: None,
        }
    }
}

impl Phase {
    /// Takes in what the phase cost, as its meter measured it.
    pub fn set_usage(&mut self, u: Usage) {
        self.procs = u.procs;
        self.host_steal_pct = u.host_steal_pct;
    }
}

/// Best effort: a 1 µs timer slack for the pacing thread (the default is 50 µs).
pub fn tighten_timer_slack() {
    let _ = std::fs::write("/proc/thread-self/timerslack_ns", "1000");
}

/// Open-loop load at `rate` requests/s for `dur`. Latency runs from each request's
/// intended send time, so the generator's or the system's stalls are not hidden.
pub async fn run_rate(op: &Op, rate: f64, dur: Duration) -> (Arc<Recorder>, f64, u64) {
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
pub async fn run_concurrency(op: &Op, conc: usize, dur: Duration) -> (Arc<Recorder>, f64) {
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
