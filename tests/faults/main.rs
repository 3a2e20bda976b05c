//! The fault suite (issue 4 §5): what natsbridge guarantees when things break, measured
//! against real nats-server processes (every one with `sync_interval: always`: the Jepsen
//! analysis of NATS 2.12.1 lost acked writes without it), real apps and real sidecars.
//!
//! Each case is bounded in time and ends by printing one line:
//! `fault <case>: sent=N acked=N delivered=N duplicate_effects=N lost=N`
//! (run with `--no-capture`, or nextest's `--success-output immediate`, to see them).
//!
//! - `sent`: messages (or HTTP requests) put in; `acked`: the ones the system said it took
//!   (a 202, a stream ack); `delivered`: distinct ones that reached their destination (the
//!   app's effect, or the stream); `duplicate_effects`: effects beyond the first for the same
//!   message or key; `lost`: acked but never delivered.
//! - The apps here commit an effect when they answer 2xx. An app handler whose caller
//!   vanishes mid-call (hyper notices the closed connection) is dropped without committing,
//!   as a transaction would roll back; the ledger counts those as `aborted`.
//!
//! The cases, a module each: 1. `nats_restart`, 2. `cluster_leader`, 3. `app_crash`,
//! 4. `sidecar_kill`, 5. `replicas`, 6. `outage`, 7. `fan_out`, 8. `result_lost`. The helpers they share
//! (the tally, the effect app, the traffic driver, the NATS fixtures) are here.

#[path = "../support/mod.rs"]
mod support;

mod app_crash;
mod cluster_leader;
mod fan_out;
mod nats_restart;
mod outage;
mod replicas;
mod result_lost;
mod sidecar_kill;
mod wiretap;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use support::fixtures::*;
use support::*;
use wiretap::{Wire, Wiretap};

/// Inside every fault server's `jetstream { }` block.
const SYNC_ALWAYS: &str = "sync_interval: always";
const BUCKET: &str = "natsbridge_idempotency";
const KEYED: &str = r#"idempotency = { key = "header:Idempotency-Key", ttl = "1h" }"#;

// ---------------------------------------------------------------------------------------
// Reporting and bounds

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    sent: usize,
    acked: usize,
    delivered: usize,
    duplicate_effects: usize,
    lost: usize,
}

impl Tally {
    fn print(&self, case: &str) {
        println!(
            "fault {case}: sent={} acked={} delivered={} duplicate_effects={} lost={}",
            self.sent, self.acked, self.delivered, self.duplicate_effects, self.lost
        );
    }
}

/// Every case's own bound, on top of the per-wait deadlines: a guard against a hang, set
/// generously (a loaded 2-core machine must not fail it), never a performance figure.
async fn bounded<F: Future<Output = ()>>(limit: Duration, f: F) {
    tokio::time::timeout(limit, f).await.unwrap_or_else(|_| panic!("fault case exceeded its bound of {limit:?}"));
}

/// `f`, or a panic naming the step that hung (a teardown that never ends would otherwise
/// show only as the whole case exceeding its bound).
async fn within<T>(what: &str, limit: Duration, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, f).await.unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
}

/// Polls `f` every 50 ms until it holds or `timeout` passes; says which.
async fn wait_until<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// An app that keeps a ledger of its effects, and can crash and come back on the same port.

#[derive(Clone, Debug)]
struct Call {
    /// The message's identity: its body.
    key: String,
    /// `Bridge-Idempotency-Key`, as the sidecar sent it.
    idem: Option<String>,
    /// `Bridge-Delivery`.
    delivery: u64,
    /// How many calls for this key the app had seen before this one.
    earlier: usize,
}

#[derive(Default, Debug)]
struct Ledger {
    calls: Vec<Call>,
    /// Committed effects per key.
    effects: HashMap<String, usize>,
    /// Calls whose handler was dropped before it answered (the caller went away).
    aborted: Vec<String>,
}

type Ledgered = Arc<Mutex<Ledger>>;
/// `(status, commit)`: a 2xx with `commit` commits one effect when the answer is made.
type AppFuture = Pin<Box<dyn Future<Output = (u16, bool)> + Send>>;
type AppFn = Arc<dyn Fn(Call, Ledgered) -> AppFuture + Send + Sync>;

struct EffectApp {
    addr: SocketAddr,
    ledger: Ledgered,
    handler: AppFn,
    /// Cancels the current incarnation: its listener and every connection.
    life: Mutex<CancellationToken>,
}

/// Counts the call as aborted unless it got to answer.
struct AbortGuard {
    ledger: Ledgered,
    key: String,
    answered: bool,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if !self.answered {
            self.ledger.lock().unwrap().aborted.push(self.key.clone());
        }
    }
}

impl EffectApp {
    async fn start<F, Fut>(f: F) -> Self
    where
        F: Fn(Call, Ledgered) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = (u16, bool)> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = Self {
            addr: listener.local_addr().unwrap(),
            ledger: Default::default(),
            handler: Arc::new(move |c, l| Box::pin(f(c, l))),
            life: Mutex::new(CancellationToken::new()),
        };
        app.serve(listener);
        app
    }

    fn serve(&self, listener: TcpListener) {
        let life = CancellationToken::new();
        *self.life.lock().unwrap() = life.clone();
        let (ledger, handler) = (self.ledger.clone(), self.handler.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = life.cancelled() => return,
                    r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
                };
                let (ledger, handler, life) = (ledger.clone(), handler.clone(), life.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (ledger, handler) = (ledger.clone(), handler.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let h = |n: &str| parts.headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
                            let key = String::from_utf8_lossy(&body).into_owned();
                            let call = {
                                let mut l = ledger.lock().unwrap();
                                let earlier = l.calls.iter().filter(|c| c.key == key).count();
                                let call = Call {
                                    key: key.clone(),
                                    idem: h("bridge-idempotency-key"),
                                    delivery: h("bridge-delivery").and_then(|d| d.parse().ok()).unwrap_or(0),
                                    earlier,
                                };
                                l.calls.push(call.clone());
                                call
                            };
                            let mut guard = AbortGuard { ledger: ledger.clone(), key: key.clone(), answered: false };
                            let (status, commit) = handler(call, ledger.clone()).await;
                            guard.answered = true;
                            if commit && (200..300).contains(&status) {
                                *ledger.lock().unwrap().effects.entry(key).or_default() += 1;
                            }
                            Ok::<_, Infallible>(respond(status, ""))
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = life.cancelled() => {}
                    }
                });
            }
        });
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process dies: the port refuses, every open connection is cut, handlers in
    /// flight never answer.
    fn crash(&self) {
        self.life.lock().unwrap().cancel();
    }

    /// Back on the same port.
    async fn come_back(&self) {
        let listener =
            eventually("the app's port to be free again", Duration::from_secs(10), || async { TcpListener::bind(self.addr).await.ok() })
                .await;
        self.serve(listener);
    }

    fn effects(&self, key: &str) -> usize {
        self.ledger.lock().unwrap().effects.get(key).copied().unwrap_or(0)
    }

    fn calls(&self) -> Vec<Call> {
        self.ledger.lock().unwrap().calls.clone()
    }

    fn aborted(&self) -> Vec<String> {
        self.ledger.lock().unwrap().aborted.clone()
    }

    /// (delivered, duplicate effects, lost) over `keys`.
    fn tally(&self, keys: &[String]) -> (usize, usize, usize) {
        let l = self.ledger.lock().unwrap();
        let mut t = (0, 0, 0);
        for k in keys {
            match l.effects.get(k).copied().unwrap_or(0) {
                0 => t.2 += 1,
                n => {
                    t.0 += 1;
                    t.1 += n - 1;
                }
            }
        }
        t
    }
}

impl Drop for EffectApp {
    fn drop(&mut self) {
        self.crash();
    }
}

fn commit(status: u16) -> (u16, bool) {
    (status, true)
}

// ---------------------------------------------------------------------------------------
// Egress traffic: workers with pooled keep-alive clients (as a legacy app has), each
// request carrying a unique id as its body and Idempotency-Key.

#[derive(Clone, Debug)]
struct Sent {
    id: String,
    /// None: no HTTP answer at all within the client's own 15 s guard.
    status: Option<u16>,
    seq: Option<u64>,
    /// The body of an answer other than 2xx (the sidecar's problem detail), cut short.
    note: Option<String>,
    started: Instant,
    latency: Duration,
}

type Log = Arc<Mutex<Vec<Sent>>>;

/// Runs `workers` request loops against `url` until `stop`, pausing `pace` between requests.
fn drive(workers: usize, url: String, pace: Duration, stop: CancellationToken) -> (Log, tokio::task::JoinHandle<()>) {
    let log: Log = Default::default();
    let counter = Arc::new(AtomicU64::new(0));
    let task = {
        let log = log.clone();
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            for _ in 0..workers {
                let (log, counter, url, stop) = (log.clone(), counter.clone(), url.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    let client = client();
                    while !stop.is_cancelled() {
                        let id = format!("m-{:06}", counter.fetch_add(1, Ordering::Relaxed));
                        let req = Request::post(&url).header("Idempotency-Key", &id).body(Full::new(Bytes::from(id.clone()))).unwrap();
                        let started = Instant::now();
                        let res = tokio::time::timeout(Duration::from_secs(15), async {
                            let res = client.request(req).await.ok()?;
                            let status = res.status().as_u16();
                            let seq = res.headers().get("bridge-seq").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
                            let body = res.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let note =
                                (!(200..300).contains(&status)).then(|| String::from_utf8_lossy(&body[..body.len().min(160)]).into_owned());
                            Some((status, seq, note))
                        })
                        .await
                        .ok()
                        .flatten();
                        let latency = started.elapsed();
                        let (status, seq, note) = match res {
                            Some((st, seq, note)) => (Some(st), seq, note),
                            None => (None, None, None),
                        };
                        log.lock().unwrap().push(Sent { id, status, seq, note, started, latency });
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = tokio::time::sleep(pace) => {}
                        }
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        })
    };
    (log, task)
}

fn snapshot(log: &Log) -> Vec<Sent> {
    log.lock().unwrap().clone()
}

/// Waits until a request started after `since` was answered `status`; how long that took.
async fn recovered(log: &Log, since: Instant, status: u16, timeout: Duration) -> Option<Duration> {
    let ok = wait_until(timeout, || async { log.lock().unwrap().iter().any(|s| s.started >= since && s.status == Some(status)) }).await;
    ok.then(|| {
        let l = log.lock().unwrap();
        let first = l.iter().filter(|s| s.started >= since && s.status == Some(status)).map(|s| s.started + s.latency).min().unwrap();
        first - since
    })
}

fn statuses(sent: &[Sent]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in sent {
        *m.entry(s.status.map(|s| s.to_string()).unwrap_or_else(|| "none".into())).or_insert(0) += 1;
    }
    m
}

fn max_latency<'a>(sent: impl IntoIterator<Item = &'a Sent>) -> Duration {
    sent.into_iter().map(|s| s.latency).max().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// NATS fixtures

fn sidecar_toml(service: &str, body: &str) -> String {
    sidecar_toml_claim(service, "3s", body)
}

fn sidecar_toml_claim(service: &str, claim_ttl: &str, body: &str) -> String {
    routes_toml(service, "2s", &format!("{}\n{body}", idempotency_section(BUCKET, claim_ttl)))
}

/// Stream `name` on `subjects`, file storage, `replicas`.
async fn stream(js: &jetstream::Context, name: &str, subject: &str, replicas: usize) {
    js.create_stream(jetstream::stream::Config {
        name: name.into(),
        subjects: vec![subject.into()],
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("stream {name}: {e}"));
}

/// TOOL (`tool.>`), DLQ (`dlq.>`) and the idempotency bucket.
async fn ingress_fixtures(nats: &NatsServer) -> jetstream::Context {
    let js = jetstream::new(nats.client().await);
    stream(&js, "TOOL", "tool.>", 1).await;
    stream(&js, "DLQ", "dlq.>", 1).await;
    js.create_key_value(kv::Config { bucket: BUCKET.into(), history: 1, ..Default::default() }).await.unwrap();
    js
}

/// AGENT (`agent.>`), DLQ (`dlq.>`) and the idempotency bucket.
async fn agent_fixtures(nats: &NatsServer) -> jetstream::Context {
    let js = jetstream::new(nats.client().await);
    stream(&js, "AGENT", "agent.>", 1).await;
    stream(&js, "DLQ", "dlq.>", 1).await;
    js.create_key_value(kv::Config { bucket: BUCKET.into(), history: 1, ..Default::default() }).await.unwrap();
    js
}

/// The in-process sidecars' warnings (store, ack and reconnect failures around a crash) on
/// stderr, so a failure in CI says what happened; RUST_LOG overrides `natsbridge=warn`.
fn log_warnings() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "natsbridge=warn".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// The idempotent jetstream route `tool.exec.*` → POST /tools/{3}, durable `tool`.
fn tool_route(extra: &str) -> String {
    tool_exec_route(&format!("{KEYED}\n{extra}"))
}

/// Publishes `key` as the body, keyed by `key` and deduplicated by `msg_id`.
async fn publish(js: &jetstream::Context, subject: &str, key: &str, msg_id: &str) -> jetstream::publish::PublishAck {
    js_publish(js, subject, &[("Idempotency-Key", key), ("Nats-Msg-Id", msg_id)], key).await
}

fn metric_sum(text: &str, family: &str, label: &str) -> f64 {
    text.lines().filter(|l| l.starts_with(family) && l.contains(label)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}
