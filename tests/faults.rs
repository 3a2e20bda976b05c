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

mod support;

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

// ---------------------------------------------------------------------------------------
// 1. nats-server SIGKILLed and restarted under jetstream-mode egress traffic.

/// Every 202 reaches the app (end to end through a second sidecar's inbound jetstream
/// route); every request, failed or not, is answered within the route timeout (503 while
/// NATS is gone); the egress sidecar recovers without a restart. Delivery is at least once
/// (the consumer's acks in flight at the crash can be lost), so duplicates are counted,
/// not forbidden: this case is about loss and bounded answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_killed_and_restarted_under_jetstream_egress() {
    // The in-process sidecars' own log, kept for a shutdown that hangs (soak runs 3 and 6).
    let trace =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("faults").join(format!("nats-killed-trace-{}.log", std::process::id()));
    std::fs::create_dir_all(trace.parent().unwrap()).unwrap();
    let file = std::fs::File::create(&trace).unwrap();
    let _ = tracing_subscriber::fmt()
        .with_env_filter("natsbridge=debug,async_nats=info")
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
    println!("  the sidecars' log: {}", trace.display());
    bounded(Duration::from_secs(120), async {
        const TIMEOUT: Duration = Duration::from_secs(2);
        let mut nats = NatsServer::start_with_js(SYNC_ALWAYS, "");
        let js = jetstream::new(nats.client().await);
        stream(&js, "EVENTS", "events.>", 1).await;
        stream(&js, "DLQ", "dlq.>", 1).await;
        let app = EffectApp::start(|_, _| async { commit(200) }).await;
        let consumer_cfg = sidecar_toml(
            "consumer",
            &events_route(
                "/effects",
                r#"ack_wait = "2s"
max_deliver = 100
backoff = ["200ms"]
dead_letter = "dlq.events"
concurrency = 16"#,
            ),
        );
        let consumer = Sidecar::start(&consumer_cfg, &nats.url(), Some(&app.url())).await;
        let producer = Sidecar::start(&sidecar_toml("producer", &event_outbound("2s")), &nats.url(), None).await;
        consumer.wait_ready().await;
        producer.wait_ready().await;

        let stop = CancellationToken::new();
        let (log, traffic) = drive(8, producer.url("/events"), Duration::from_millis(20), stop.clone());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let killed = Instant::now();
        nats.kill();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let restarted = Instant::now();
        tokio::task::block_in_place(|| nats.restart());
        let recovery = recovered(&log, restarted, 202, Duration::from_secs(15)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.cancel();
        traffic.await.unwrap();

        let sent = snapshot(&log);
        let acked: Vec<String> = sent.iter().filter(|s| s.status == Some(202)).map(|s| s.id.clone()).collect();
        let all: Vec<String> = sent.iter().map(|s| s.id.clone()).collect();
        // Everything acked must arrive; give the consumer time to catch up after the restart.
        wait_until(Duration::from_secs(20), || async { app.tally(&acked).2 == 0 }).await;
        let (_, duplicate_effects, lost) = app.tally(&acked);
        let (delivered, _, _) = app.tally(&all);
        let t = Tally { sent: sent.len(), acked: acked.len(), delivered, duplicate_effects, lost };
        t.print("nats-killed-jetstream-egress");
        // How the duplicates came about: a redelivery (Bridge-Delivery > 1: an ack lost in
        // the crash), or a first delivery again (the consumer's ack state rolled back).
        let calls = app.calls();
        let twice: Vec<&Call> = calls.iter().filter(|c| app.effects(&c.key) > 1).collect();
        println!(
            "  duplicate calls: {} redeliveries, {} first deliveries again",
            twice.iter().filter(|c| c.earlier > 0 && c.delivery > 1).count(),
            twice.iter().filter(|c| c.earlier > 0 && c.delivery <= 1).count()
        );
        let failed: Vec<&Sent> = sent.iter().filter(|s| s.status != Some(202)).collect();
        let during = sent.iter().filter(|s| s.started >= killed && s.started < restarted).count();
        println!(
            "  statuses {:?}; {during} sent during the outage; max latency failed {:?}, all {:?}; first 202 {:?} after the restart",
            statuses(&sent),
            max_latency(failed.iter().copied()),
            max_latency(&sent),
            recovery
        );

        assert_eq!(lost, 0, "acked requests that never reached the app");
        // 503: no stream answered (nothing stored). 504: no ack in time, "outcome unknown"
        // (the message may be stored, which is why delivered may exceed acked).
        assert!(failed.iter().all(|s| matches!(s.status, Some(503 | 504))), "failures must be 503 or 504: {:?}", statuses(&sent));
        assert!(!failed.is_empty(), "the outage was not observed");
        // A bound against a hung request, not a latency figure (that belongs to the
        // benchmark): the timeout plus a generous margin for a loaded machine.
        let margin = Duration::from_secs(2);
        assert!(max_latency(failed.iter().copied()) <= TIMEOUT + margin, "a failed request took {:?}", max_latency(failed.iter().copied()));
        assert!(max_latency(&sent) <= TIMEOUT + margin, "a request took {:?}", max_latency(&sent));
        assert!(recovery.is_some(), "no 202 after the server came back: the sidecar did not recover");
        assert!(sent.iter().any(|s| s.started < killed && s.status == Some(202)));
        assert_eq!(within("reading the DLQ stream", Duration::from_secs(15), stream_messages(&js, "DLQ")).await, 0);
        // A stop is bounded by the drain_timeout (2 s), whatever the outage left behind;
        // the margin is for a loaded machine.
        within("the producer sidecar's shutdown", Duration::from_secs(5), producer.stop()).await;
        within("the consumer sidecar's shutdown", Duration::from_secs(5), consumer.stop()).await;
    })
    .await
}

// ---------------------------------------------------------------------------------------
// 2. A 3-node cluster, R3 stream, the stream leader SIGKILLed under load.

/// What reading one sequence back found.
#[derive(Clone, Debug, PartialEq)]
enum Read {
    /// The message's body (the request's id).
    Found(String),
    /// The server answered "no message found" for this sequence.
    Missing,
    /// The read itself failed (timeout, no responders during an election, …): no evidence
    /// either way.
    Failed(String),
}

/// Reads each of `seqs` from the stream leader (`STREAM.MSG.GET`).
async fn read_back(stream: &jetstream::stream::Stream, seqs: impl IntoIterator<Item = u64>) -> BTreeMap<u64, Read> {
    use async_nats::jetstream::stream::RawMessageErrorKind;
    let mut out = BTreeMap::new();
    for seq in seqs {
        let r = match stream.get_raw_message(seq).await {
            Ok(m) => Read::Found(String::from_utf8_lossy(&m.payload).into_owned()),
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Read::Missing,
            Err(e) => Read::Failed(format!("{e}: {:?}", std::error::Error::source(&e))),
        };
        out.insert(seq, r);
    }
    out
}

/// The server's own `STREAM.INFO` answer (deleted sequences included), as JSON.
async fn stream_info_raw(client: &async_nats::Client, name: &str) -> serde_json::Value {
    let req = client.request(format!("$JS.API.STREAM.INFO.{name}"), Bytes::from_static(br#"{"deleted_details":true}"#));
    match tokio::time::timeout(Duration::from_secs(5), req).await {
        Ok(Ok(m)) => serde_json::from_slice(&m.payload).unwrap_or_else(|e| serde_json::json!({ "unparsable": e.to_string() })),
        Ok(Err(e)) => serde_json::json!({ "request_error": e.to_string() }),
        Err(_) => serde_json::json!({ "request_error": "no answer in 5s" }),
    }
}

/// One line: the leader, the state, and each replica's `current`/lag.
fn describe_info(v: &serde_json::Value) -> String {
    if v.get("state").is_none() {
        return format!("no stream info: {v}");
    }
    let s = &v["state"];
    let c = &v["cluster"];
    let replicas: Vec<String> = c["replicas"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| {
                    format!("{} current={} lag={} offline={} active={}ns", r["name"], r["current"], r["lag"], r["offline"], r["active"])
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "leader {}; messages={} num_deleted={} first_seq={} last_seq={} deleted={}; replicas [{}]",
        c["leader"],
        s["messages"],
        s["num_deleted"],
        s["first_seq"],
        s["last_seq"],
        s["deleted"],
        replicas.join("; ")
    )
}

/// The stream has a leader, and every replica but the node `down` (none: all of them) is
/// current and not lagging.
fn all_current(v: &serde_json::Value, down: Option<&str>) -> bool {
    let c = &v["cluster"];
    let Some(rs) = c["replicas"].as_array() else { return false };
    let rs: Vec<&serde_json::Value> = rs.iter().filter(|r| Some(r["name"].as_str().unwrap_or("")) != down).collect();
    c["leader"].is_string()
        && rs.len() >= if down.is_some() { 1 } else { 2 }
        && rs.iter().all(|r| r["current"] == true && r["lag"].as_u64().unwrap_or(0) == 0)
}

/// Polls the stream's info until `all_current(…, down)` or `timeout`; says which, with the
/// last answer.
async fn wait_for_current(client: &async_nats::Client, name: &str, down: Option<&str>, timeout: Duration) -> (bool, serde_json::Value) {
    let deadline = Instant::now() + timeout;
    loop {
        let info = stream_info_raw(client, name).await;
        if all_current(&info, down) {
            return (true, info);
        }
        if Instant::now() > deadline {
            return (false, info);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Copies each node's log (and `extra` files) under the target's tmp dir; says where.
fn keep_evidence(case: &str, cluster: &Cluster, extra: &[(&str, String)]) -> std::path::PathBuf {
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("faults").join(format!("{case}-{stamp}"));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, n) in cluster.nodes.iter().enumerate() {
        std::fs::write(dir.join(format!("n{i}.log")), n.log()).unwrap();
    }
    for (name, text) in extra {
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir
}

/// Zero acked messages lost: every 202's sequence holds its message in the stream after
/// the leader is killed, and again after the killed node is back. The sidecar (the real
/// binary) knows all three servers.
///
/// A read that fails is no evidence of loss: the sequence is read again once every
/// surviving replica is current, and again once the killed node has rejoined. Only the
/// server's own answer counts as lost: "no message found", or another message at that
/// sequence. A read still failing at the end fails the test as unverified, with the
/// errors, the stream state at each step and the three servers' logs kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_node_killed_under_load_loses_no_acked_message() {
    bounded(Duration::from_secs(120), async {
        const TIMEOUT: Duration = Duration::from_secs(3);
        let mut cluster = Cluster::start_with_js(SYNC_ALWAYS, "");
        let urls = cluster.urls();
        let client = async_nats::connect(urls.clone()).await.unwrap();
        let js = jetstream::new(client.clone());
        // The meta leader is elected a moment after the nodes start.
        eventually("an R3 stream on the new cluster", Duration::from_secs(20), || async {
            js.create_stream(jetstream::stream::Config {
                name: "EVENTS".into(),
                subjects: vec!["events.>".into()],
                storage: jetstream::stream::StorageType::File,
                num_replicas: 3,
                ..Default::default()
            })
            .await
            .ok()
            .map(|_| ())
        })
        .await;
        let sidecar = SidecarProcess::start(&sidecar_toml("producer", &event_outbound("3s")), &urls.join(","), None);
        sidecar.wait_ready().await;

        let stop = CancellationToken::new();
        let (log, traffic) = drive(6, sidecar.url("/events"), Duration::from_millis(20), stop.clone());
        // Kill once a good number of messages are acked (not after a fixed time).
        eventually("200 acked requests before the kill", Duration::from_secs(30), || async {
            (log.lock().unwrap().iter().filter(|s| s.status == Some(202)).count() >= 200).then_some(())
        })
        .await;
        let info = js.get_stream("EVENTS").await.unwrap().get_info().await.unwrap();
        let leader = info.cluster.and_then(|c| c.leader).expect("the stream has a leader");
        let idx: usize = leader.trim_start_matches('n').parse().unwrap();
        let acked_at_kill = log.lock().unwrap().iter().filter(|s| s.status == Some(202)).count();
        let killed = Instant::now();
        cluster.nodes[idx].kill();
        // Generous: the survivors' stream leader election took over 20 s in a soak run under
        // two busy loops (every answer meanwhile a prompt 503). This bounds a hang, it does not
        // measure the failover.
        let recovery = recovered(&log, killed + Duration::from_millis(100), 202, Duration::from_secs(45)).await;
        // Keep the traffic on until 200 more are acked after the kill.
        let kept_on = wait_until(Duration::from_secs(30), || async {
            log.lock().unwrap().iter().filter(|s| s.status == Some(202) && s.started > killed).count() >= 200
        })
        .await;
        stop.cancel();
        traffic.await.unwrap();
        let sent = snapshot(&log);
        let acked: Vec<&Sent> = sent.iter().filter(|s| s.status == Some(202)).collect();

        // 1. Read every sequence back from the survivors, at once.
        let stream = eventually("the stream from the survivors", Duration::from_secs(15), || async { js.get_stream("EVENTS").await.ok() }).await;
        let info1 = stream_info_raw(&client, "EVENTS").await;
        let last = stream.get_info().await.unwrap().state.last_sequence;
        let mut reads = read_back(&stream, 1..=last).await;
        let bad = |reads: &BTreeMap<u64, Read>| -> Vec<u64> {
            acked.iter().filter_map(|s| s.seq).filter(|q| !matches!(reads.get(q), Some(Read::Found(_)))).collect()
        };
        let mut history = vec![format!("after the kill: {}", describe_info(&info1))];
        let first_bad: Vec<(u64, Read)> = bad(&reads).into_iter().map(|q| (q, reads.get(&q).cloned().unwrap_or(Read::Missing))).collect();
        if !first_bad.is_empty() {
            history.push(format!("first read-back: {} acked sequences unread: {:?}", first_bad.len(), first_bad));
        }

        // 2. Again once every surviving replica is current.
        let (survivors_current, info2) = wait_for_current(&client, "EVENTS", Some(&leader), Duration::from_secs(20)).await;
        history.push(format!("survivors current={survivors_current}: {}", describe_info(&info2)));
        let again = bad(&reads);
        if !again.is_empty() {
            let r2 = read_back(&stream, again.iter().copied()).await;
            history.push(format!("second read-back of {} sequences: {:?}", again.len(), r2));
            reads.extend(r2);
        }

        // 3. The killed node back: every acked sequence again, once all three are current.
        tokio::task::block_in_place(|| cluster.nodes[idx].restart());
        let (rejoined, info3) = wait_for_current(&client, "EVENTS", None, Duration::from_secs(30)).await;
        history.push(format!("{leader} back, all current={rejoined}: {}", describe_info(&info3)));
        let last3 = info3["state"]["last_seq"].as_u64().unwrap_or(last).max(last);
        // Reads go through the meta layer: after a kill of the meta leader they fail (10008)
        // until a new one is elected, however current the stream's replicas are. Wait until
        // the first sequence reads (a read still failing after that is unverified).
        let readable = wait_until(Duration::from_secs(30), || async { stream.get_raw_message(1).await.is_ok() }).await;
        history.push(format!("reads available again after the rejoin: {readable}"));
        let finals = read_back(&stream, 1..=last3).await;
        let still = bad(&finals);
        if !still.is_empty() {
            history.push(format!("read-back after the rejoin, {} sequences unread: {:?}", still.len(), still.iter().map(|q| (q, &finals[q])).collect::<Vec<_>>()));
        }

        // The verdict, from the last read: the server's word or nothing.
        let mut ids: HashMap<String, Vec<u64>> = HashMap::new();
        for (seq, r) in &finals {
            if let Read::Found(id) = r {
                ids.entry(id.clone()).or_default().push(*seq);
            }
        }
        let (mut lost, mut unverified) = (Vec::new(), Vec::new());
        for s in &acked {
            let seq = s.seq.unwrap_or(0);
            match finals.get(&seq) {
                Some(Read::Found(id)) if *id == s.id => {}
                Some(Read::Failed(e)) => unverified.push(format!("{} (seq {seq}): {e}", s.id)),
                other => lost.push(format!("{} (seq {seq}): {other:?}, stored at {:?}", s.id, ids.get(&s.id))),
            }
        }
        let delivered = sent.iter().filter(|s| ids.contains_key(&s.id)).count();
        let duplicate_effects: usize = ids.values().map(|v| v.len() - 1).sum();
        let t = Tally { sent: sent.len(), acked: acked.len(), delivered, duplicate_effects, lost: lost.len() };
        t.print("cluster-node-killed");
        let failed: Vec<&Sent> = sent.iter().filter(|s| s.status != Some(202)).collect();
        println!(
            "  killed {leader} (the stream leader) after {acked_at_kill} acks; statuses {:?}; max latency failed {:?}, all {:?}; first 202 {:?} after the kill; stream last seq {last}; unread at first {}, unverified at the end {}",
            statuses(&sent),
            max_latency(failed.iter().copied()),
            max_latency(&sent),
            recovery,
            first_bad.len(),
            unverified.len()
        );
        for h in &history {
            println!("  {h}");
        }
        // The failures after the kill, second by second: what the sidecar said.
        let mut after_kill: BTreeMap<(u64, String), usize> = BTreeMap::new();
        for s in sent.iter().filter(|s| s.started >= killed) {
            let what = match (s.status, &s.note) {
                (Some(202), _) => "202".to_string(),
                (st, note) => format!("{st:?} {}", note.as_deref().unwrap_or("").chars().filter(|c| !c.is_ascii_digit()).collect::<String>()),
            };
            *after_kill.entry(((s.started - killed).as_secs(), what)).or_default() += 1;
        }
        println!("  after the kill (second, answer: count): {after_kill:?}");
        let margin = Duration::from_secs(2);
        let checks_hold = lost.is_empty()
            && unverified.is_empty()
            && duplicate_effects == 0
            && rejoined
            && failed.iter().all(|s| matches!(s.status, Some(503 | 504)))
            && max_latency(&sent) <= TIMEOUT + margin
            && recovery.is_some()
            && kept_on;
        if !checks_hold || !first_bad.is_empty() {
            let dir = keep_evidence(
                "cluster-node-killed",
                &cluster,
                &[
                    ("history.txt", history.join("\n")),
                    ("info.json", format!("{info1:#}\n{info2:#}\n{info3:#}")),
                    (
                        "sent.txt",
                        sent.iter()
                            .map(|s| {
                                let at = s.started.checked_duration_since(killed).map(|d| format!("+{d:?}")).unwrap_or_else(|| format!("-{:?}", killed - s.started));
                                format!("{} {at} {:?} {:?} {:?} {:?}\n", s.id, s.status, s.seq, s.latency, s.note)
                            })
                            .collect(),
                    ),
                    ("sidecar.log", sidecar.log()),
                ],
            );
            println!("  evidence kept in {}", dir.display());
            // Who led the meta group when: a stream read (STREAM.MSG.GET) fails with 10008
            // "JetStream system temporarily unavailable" while there is no meta leader.
            for (i, n) in cluster.nodes.iter().enumerate() {
                for l in n.log().lines().filter(|l| l.contains("metadata leader") || l.contains("new stream leader")) {
                    println!("  n{i}: {l}");
                }
            }
        }

        assert!(lost.is_empty(), "acked but not in the stream (the server's answer): {:#?}", lost.iter().take(20).collect::<Vec<_>>());
        assert!(unverified.is_empty(), "acked messages that could not be read back: {:#?}", unverified.iter().take(20).collect::<Vec<_>>());
        assert_eq!(duplicate_effects, 0, "one request stored twice");
        assert!(rejoined, "the killed node did not catch up: {}", describe_info(&info3));
        // 503: no stream answered (nothing stored). 504: no ack in time, "outcome unknown"
        // (the message may be stored, which is why delivered may exceed acked).
        assert!(failed.iter().all(|s| matches!(s.status, Some(503 | 504))), "failures must be 503 or 504: {:?}", statuses(&sent));
        // A bound against a hung request, not a latency figure: the route timeout plus a
        // generous margin for a loaded machine (latency figures belong to the benchmark).
        assert!(max_latency(&sent) <= TIMEOUT + margin, "a request took {:?}", max_latency(&sent));
        assert!(recovery.is_some(), "no 202 within 45 s of the kill");
        assert!(kept_on, "fewer than 200 acks after the kill");
    })
    .await
}

// ---------------------------------------------------------------------------------------
// 3. The app answers 500, then crashes, then comes back, during jetstream ingress.

/// Zero lost and zero duplicate effects with an idempotency key: every key's effect
/// happens exactly once, though every message is retried through both failure modes and a
/// third of the keys are published twice (same key, different Nats-Msg-Id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_failing_then_crashing_then_back_during_jetstream_ingress() {
    bounded(Duration::from_secs(120), async {
        const KEYS: usize = 150;
        let nats = NatsServer::start_with_js(SYNC_ALWAYS, "");
        let js = ingress_fixtures(&nats).await;
        // 0: answers 500; 1: healthy.
        let mode = Arc::new(AtomicU8::new(0));
        let app = {
            let mode = mode.clone();
            EffectApp::start(move |_, _| {
                let healthy = mode.load(Ordering::SeqCst) == 1;
                async move {
                    if !healthy {
                        // Slow failures, so the crash cuts some calls mid-flight.
                        tokio::time::sleep(Duration::from_millis(40)).await;
                        return (500, false);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    commit(200)
                }
            })
            .await
        };
        let cfg = sidecar_toml("svc", &tool_route("ack_wait = \"2s\"\nmax_deliver = 100\nbackoff = [\"200ms\"]\nconcurrency = 16"));
        let sidecar = Sidecar::start(&cfg, &nats.url(), Some(&app.url())).await;
        sidecar.wait_ready().await;

        let keys: Vec<String> = (0..KEYS).map(|i| format!("k-{i:04}")).collect();
        let publisher = {
            let (js, keys) = (js.clone(), keys.clone());
            tokio::spawn(async move {
                let (mut sent, mut last) = (0, 0);
                for (i, k) in keys.iter().enumerate() {
                    last = publish(&js, "tool.exec.grep", k, &format!("{k}-a")).await.sequence;
                    sent += 1;
                    if i % 3 == 0 {
                        // A forced duplicate: same key, a new Nats-Msg-Id, so the stream keeps both.
                        last = publish(&js, "tool.exec.grep", k, &format!("{k}-b")).await.sequence;
                        sent += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                (sent, last)
            })
        };
        // Crash once the app has answered a good number of 500s (evidence, not a timer)...
        eventually("20 calls answered 500 before the crash", Duration::from_secs(30), || async { (app.calls().len() >= 20).then_some(()) })
            .await;
        let naks = |m: &str| metric_sum(m, "natsbridge_ingress_outcomes_total", "outcome=\"nak\"");
        let naks_at_crash = naks(&sidecar.metrics().await);
        let aborted_at_crash = app.aborted().len();
        let calls_500 = app.calls().len();
        app.crash();
        // ...and come back once the sidecar has naked deliveries it could not hand to the
        // app at all: more naks since the crash than calls the crash cut.
        let refused = wait_until(Duration::from_secs(30), || async {
            let cut = app.aborted().len() - aborted_at_crash;
            naks(&sidecar.metrics().await) >= naks_at_crash + cut as f64 + 5.0
        })
        .await;
        assert!(refused, "the sidecar never tried the crashed app");
        mode.store(1, Ordering::SeqCst);
        app.come_back().await;
        let (published, last_seq) = publisher.await.unwrap();

        wait_until(Duration::from_secs(30), || async { app.tally(&keys).2 == 0 && consumer_settled(&js, "TOOL", "tool", last_seq).await }).await;
        let (delivered, duplicate_effects, lost) = app.tally(&keys);
        let t = Tally { sent: published, acked: published, delivered, duplicate_effects, lost };
        t.print("app-500-crash-back");
        let calls = app.calls();
        let m = sidecar.metrics().await;
        let dlq = stream_messages(&js, "DLQ").await;
        println!(
            "  app calls {} ({calls_500} answered 500 before the crash, {} cut by the crash), redelivered calls {}, naks {}, claims released {}, hits {}, dead letters {dlq}",
            calls.len(),
            app.aborted().len(),
            calls.iter().filter(|c| c.delivery > 1).count(),
            metric_sum(&m, "natsbridge_ingress_outcomes_total", "outcome=\"nak\""),
            metric_sum(&m, "natsbridge_idempotency_total", "result=\"release\""),
            metric_sum(&m, "natsbridge_idempotency_total", "result=\"hit\""),
        );

        assert_eq!(lost, 0, "keys whose effect never happened");
        assert_eq!(duplicate_effects, 0, "keys whose effect happened more than once");
        assert_eq!(dlq, 0, "nothing may be dead-lettered: every failure here is retryable");
        assert!(consumer_settled(&js, "TOOL", "tool", last_seq).await, "the consumer did not settle");
        assert!(calls_500 > 0, "the app never answered 500");
        assert!(calls.iter().all(|c| c.idem.as_deref() == Some(c.key.as_str())), "Bridge-Idempotency-Key is the message's key");
        within("the sidecar's shutdown", Duration::from_secs(30), sidecar.stop()).await;
    })
    .await
}

// ---------------------------------------------------------------------------------------
// 4. The sidecar SIGKILLed mid-handler, then restarted.
//
// What can be guaranteed, precisely: the bridge never marks a key done before the app's
// 2xx reached it, and never calls the app for a key another live handler holds. A
// sidecar killed mid-call leaves only a claim; after `claim_ttl` (no refreshes from the
// dead process) the redelivery takes it over and calls the app again, with the same
// Bridge-Idempotency-Key. So:
// - 4a: the app had not committed when its caller died (its handler is dropped with the
//   connection, as a transaction rolls back): the effect happens exactly once.
// - 4b: the app had already committed (it commits, then is slow to answer): the bridge
//   cannot know, and calls the app again. Exactly once then needs the app to check
//   Bridge-Idempotency-Key; this case shows it does get the same key, and that a naive app
//   would have applied the effect twice.

/// The production defaults scaled by 1/10: ack_wait 30s → 3s, claim_ttl 60s → 6s, the
/// default backoff 1s, 2s, 4s, 8s → 100ms … 800ms, max_deliver 5 (unscaled).
fn killable_route() -> String {
    sidecar_toml_claim(
        "svc",
        "6s",
        &tool_route("ack_wait = \"3s\"\nmax_deliver = 5\nbackoff = [\"100ms\", \"200ms\", \"400ms\", \"800ms\"]"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_killed_mid_handler_before_the_app_commits() {
    bounded(Duration::from_secs(120), async {
        let nats = NatsServer::start_with_js(SYNC_ALWAYS, "");
        let js = ingress_fixtures(&nats).await;
        // The first call holds (never answers) until its caller goes away.
        let app = EffectApp::start(|c, _| async move {
            if c.earlier == 0 {
                std::future::pending::<()>().await;
            }
            commit(200)
        })
        .await;
        let route = killable_route();
        let mut first = SidecarProcess::start(&route, &nats.url(), Some(&app.url()));
        first.wait_ready().await;
        let a = publish(&js, "tool.exec.grep", "order-1", "m-1").await;
        eventually("the first call at the app", Duration::from_secs(10), || async { (!app.calls().is_empty()).then_some(()) }).await;

        first.child.kill().unwrap();
        first.child.wait().unwrap();
        let killed = Instant::now();
        // The app's handler is dropped with its connection: no effect.
        eventually("the held call to be abandoned", Duration::from_secs(5), || async { (app.aborted().len() == 1).then_some(()) }).await;
        let second = SidecarProcess::start(&route, &nats.url(), Some(&app.url()));
        second.wait_ready().await;
        let effected = wait_until(Duration::from_secs(20), || async { app.effects("order-1") >= 1 }).await;
        let took = killed.elapsed();
        // A late duplicate of the same key is acked as handled.
        let b = publish(&js, "tool.exec.grep", "order-1", "m-2").await;
        wait_until(Duration::from_secs(15), || async { consumer_settled(&js, "TOOL", "tool", b.sequence).await }).await;
        let keys = vec!["order-1".to_string()];
        let (delivered, duplicate_effects, lost) = app.tally(&keys);
        let t = Tally { sent: 2, acked: 2, delivered, duplicate_effects, lost };
        t.print("sidecar-killed-mid-handler");
        let calls = app.calls();
        println!(
            "  app calls {} (deliveries {:?}), abandoned {}, effect {took:?} after the kill",
            calls.len(),
            calls.iter().map(|c| c.delivery).collect::<Vec<_>>(),
            app.aborted().len()
        );

        assert!(effected, "the message was not redelivered to the restarted sidecar:\n{}", second.log());
        assert_eq!(lost, 0);
        assert_eq!(duplicate_effects, 0);
        assert_eq!(calls.len(), 2, "the killed call and its redelivery; the duplicate never reaches the app");
        assert!(calls[1].delivery >= 2, "the second call is a redelivery of seq {}", a.sequence);
        assert!(calls.iter().all(|c| c.idem.as_deref() == Some("order-1")));
        assert!(consumer_settled(&js, "TOOL", "tool", b.sequence).await);
        assert_eq!(stream_messages(&js, "DLQ").await, 0);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_killed_after_the_app_committed_needs_the_app_to_check_the_key() {
    bounded(Duration::from_secs(120), async {
        let nats = NatsServer::start_with_js(SYNC_ALWAYS, "");
        let js = ingress_fixtures(&nats).await;
        // The app applies the effect at once — keyed by Bridge-Idempotency-Key, which it
        // checks first — then is slow to answer the first call (it never does).
        let app = EffectApp::start(|c, ledger| async move {
            let key = c.idem.clone().unwrap_or_default();
            {
                let mut l = ledger.lock().unwrap();
                let e = l.effects.entry(key).or_default();
                if *e == 0 {
                    *e = 1;
                }
            }
            if c.earlier == 0 {
                std::future::pending::<()>().await;
            }
            (200, false)
        })
        .await;
        let route = killable_route();
        let mut first = SidecarProcess::start(&route, &nats.url(), Some(&app.url()));
        first.wait_ready().await;
        publish(&js, "tool.exec.grep", "order-2", "m-1").await;
        eventually("the first call at the app", Duration::from_secs(10), || async { (!app.calls().is_empty()).then_some(()) }).await;
        first.child.kill().unwrap();
        first.child.wait().unwrap();
        let second = SidecarProcess::start(&route, &nats.url(), Some(&app.url()));
        second.wait_ready().await;
        let b = publish(&js, "tool.exec.grep", "order-2", "m-2").await;
        let settled = wait_until(Duration::from_secs(20), || async { consumer_settled(&js, "TOOL", "tool", b.sequence).await }).await;
        let calls = app.calls();
        let keys = vec!["order-2".to_string()];
        let (delivered, duplicate_effects, lost) = app.tally(&keys);
        let t = Tally { sent: 2, acked: 2, delivered, duplicate_effects, lost };
        t.print("sidecar-killed-after-app-commit");
        println!(
            "  the bridge called the app {} times for the key (deliveries {:?}); a naive app would have applied {} effects, this one checked Bridge-Idempotency-Key",
            calls.len(),
            calls.iter().map(|c| c.delivery).collect::<Vec<_>>(),
            calls.len()
        );

        assert!(settled, "the consumer did not settle:\n{}", second.log());
        assert_eq!(lost, 0);
        assert_eq!(duplicate_effects, 0);
        // The documented gap: the redelivery re-runs the handler once — never more, and
        // the late duplicate (published after the key was done) never reaches the app.
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert!(calls.iter().all(|c| c.idem.as_deref() == Some("order-2")), "both calls carry the same key: {calls:?}");
    })
    .await
}

// ---------------------------------------------------------------------------------------
// 5. Two replicas on the same durable, redeliveries forced.

/// Each effect exactly once: a quarter of the keys fail (500) on their first call, a tenth
/// are slower than the route's app timeout on their first call (the sidecar gives up and
/// the message is naked), and half of the keys are published twice, so both replicas hold
/// copies of the same key at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_with_forced_redeliveries_apply_each_effect_once() {
    bounded(Duration::from_secs(120), async {
        const KEYS: usize = 200;
        let nats = NatsServer::start_with_js(SYNC_ALWAYS, "");
        let js = ingress_fixtures(&nats).await;
        let app = EffectApp::start(|c, _| async move {
            let i: usize = c.key.trim_start_matches("k-").parse().unwrap_or(0);
            if c.earlier == 0 && i % 4 == 1 {
                return (500, false);
            }
            if c.earlier == 0 && i % 10 == 3 {
                // Far past the app timeout (ack_wait - 200ms): the sidecar drops the call,
                // and the handler is dropped with its connection before it commits. Far
                // past, not just past: on a loaded machine the app may notice the closed
                // connection late, and a commit after the retry's would count twice.
                tokio::time::sleep(Duration::from_secs(20)).await;
                return commit(200);
            }
            tokio::time::sleep(Duration::from_millis(5 + (i as u64 * 7) % 30)).await;
            commit(200)
        })
        .await;
        let cfg = sidecar_toml("svc", &tool_route("ack_wait = \"1s\"\nmax_deliver = 50\nbackoff = [\"100ms\"]\nconcurrency = 8"));
        let r1 = Sidecar::start(&cfg, &nats.url(), Some(&app.url())).await;
        let r2 = Sidecar::start(&cfg, &nats.url(), Some(&app.url())).await;
        r1.wait_ready().await;
        r2.wait_ready().await;

        let keys: Vec<String> = (0..KEYS).map(|i| format!("k-{i:04}")).collect();
        let (mut published, mut last) = (0, 0);
        for (i, k) in keys.iter().enumerate() {
            last = publish(&js, "tool.exec.grep", k, &format!("{k}-a")).await.sequence;
            published += 1;
            if i % 2 == 0 {
                last = publish(&js, "tool.exec.grep", k, &format!("{k}-b")).await.sequence;
                published += 1;
            }
        }
        wait_until(Duration::from_secs(40), || async { app.tally(&keys).2 == 0 && consumer_settled(&js, "TOOL", "tool", last).await }).await;
        let (delivered, duplicate_effects, lost) = app.tally(&keys);
        let t = Tally { sent: published, acked: published, delivered, duplicate_effects, lost };
        t.print("two-replicas-redeliveries");
        let calls = app.calls();
        let (m1, m2) = (r1.metrics().await, r2.metrics().await);
        let deliveries = |m: &str| metric_sum(m, "natsbridge_ingress_deliveries_total", "tool-exec");
        let conflicts = metric_sum(&m1, "natsbridge_idempotency_total", "result=\"conflict\"") + metric_sum(&m2, "natsbridge_idempotency_total", "result=\"conflict\"");
        let dlq = stream_messages(&js, "DLQ").await;
        println!(
            "  app calls {}, redelivered calls {}, abandoned by the sidecar {}, deliveries per replica {} / {}, in-flight conflicts {conflicts}, dead letters {dlq}",
            calls.len(),
            calls.iter().filter(|c| c.delivery > 1).count(),
            app.aborted().len(),
            deliveries(&m1),
            deliveries(&m2)
        );

        assert_eq!(lost, 0, "keys whose effect never happened");
        assert_eq!(duplicate_effects, 0, "keys whose effect happened more than once");
        assert_eq!(dlq, 0);
        assert!(consumer_settled(&js, "TOOL", "tool", last).await, "the consumer did not settle");
        assert!(calls.iter().any(|c| c.delivery > 1), "no redelivery was forced");
        // Every slow first call was abandoned by the sidecar (its handler dropped before
        // it could commit a second effect).
        let slow = (0..KEYS).filter(|i| i % 10 == 3 && i % 4 != 1).count();
        let abandoned = wait_until(Duration::from_secs(15), || async { app.aborted().len() == slow }).await;
        assert!(abandoned, "slow calls abandoned: {} of {slow}", app.aborted().len());
        assert!(deliveries(&m1) > 0.0 && deliveries(&m2) > 0.0, "both replicas must take part");
        within("replica r1's shutdown", Duration::from_secs(30), r1.stop()).await;
        within("replica r2's shutdown", Duration::from_secs(30), r2.stop()).await;
    })
    .await
}

// ---------------------------------------------------------------------------------------
// 6. NATS unreachable for 30 s under request-mode egress traffic.

#[derive(Debug, Clone, Copy)]
struct ProcStats {
    rss_kib: u64,
    fds: usize,
    threads: usize,
}

fn proc_stats(pid: u32) -> ProcStats {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    ProcStats { rss_kib: field("VmRSS:"), fds, threads: field("Threads:") as usize }
}

/// Every request is answered (503/504) within its timeout for the whole outage — 15 s of
/// a frozen server (SIGSTOP: connected but silent, as in a partition; requests time out,
/// 504) then 15 s of a dead one (SIGKILL: refused; 503) — and the sidecar process is left
/// with no more memory, file descriptors or threads than before, within tolerances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_unreachable_for_30s_under_request_traffic_leaves_nothing_behind() {
    bounded(Duration::from_secs(120), async {
        const TIMEOUT: Duration = Duration::from_secs(1);
        let mut nats = NatsServer::start_with_js(SYNC_ALWAYS, "");
        // The service behind the subject: another client, which reconnects as well.
        let responder = nats.client().await;
        let mut sub = responder.queue_subscribe("svc.echo", "svc".into()).await.unwrap();
        let echo = {
            let c = responder.clone();
            tokio::spawn(async move {
                use futures::StreamExt;
                while let Some(m) = sub.next().await {
                    if let Some(reply) = m.reply {
                        let _ = c.publish(reply, m.payload).await;
                    }
                }
            })
        };
        responder.flush().await.unwrap();
        let route = sidecar_toml(
            "caller",
            r#"[[outbound]]
name = "echo"
method = "POST"
path = "/echo"
subject = "svc.echo"
mode = "request"
timeout = "1s"
"#,
        );
        let sidecar = SidecarProcess::start(&route, &nats.url(), None);
        sidecar.wait_ready().await;
        let pid = sidecar.child.id();
        let (workers, pace) = (8, Duration::from_millis(50));

        // Warm up with the same traffic, then take the baseline at rest.
        let stop = CancellationToken::new();
        let (warm, t) = drive(workers, sidecar.url("/echo"), pace, stop.clone());
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.cancel();
        t.await.unwrap();
        assert!(snapshot(&warm).iter().all(|s| s.status == Some(200)), "warm-up: {:?}", statuses(&snapshot(&warm)));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = proc_stats(pid);

        let stop = CancellationToken::new();
        let (log, traffic) = drive(workers, sidecar.url("/echo"), pace, stop.clone());
        tokio::time::sleep(Duration::from_millis(300)).await;
        nats.pause();
        // The outage starts once SIGSTOP is sent: `pause` waits for `kill -STOP`, and a
        // request started before that (spawning `kill` is slow on a loaded machine) can
        // still get its 200.
        let down = Instant::now();
        tokio::time::sleep(Duration::from_secs(15)).await;
        let killed = Instant::now();
        nats.kill();
        tokio::time::sleep(Duration::from_secs(15)).await;
        let up = Instant::now();
        tokio::task::block_in_place(|| nats.restart());
        let recovery = recovered(&log, up, 200, Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.cancel();
        traffic.await.unwrap();

        let sent = snapshot(&log);
        let outage: Vec<&Sent> = sent.iter().filter(|s| s.started >= down && s.started + s.latency <= up).collect();
        let frozen = outage.iter().filter(|s| s.started < killed).count();
        let ok = sent.iter().filter(|s| s.status == Some(200)).count();
        // Connections closed by the clients are gone once the sidecar has read their EOF.
        let mut after = proc_stats(pid);
        wait_until(Duration::from_secs(5), || {
            after = proc_stats(pid);
            let settled = after.fds <= before.fds;
            async move { settled }
        })
        .await;
        let metrics = get(&format!("http://{}/metrics", sidecar.admin)).await.map(|r| String::from_utf8_lossy(&r.body).into_owned()).unwrap_or_default();
        let in_flight = metric_sum(&metrics, "natsbridge_egress_requests_in_flight", "");
        let unanswered = sent.iter().filter(|s| s.status.is_none()).count();
        let t = Tally { sent: sent.len(), acked: ok, delivered: ok, duplicate_effects: 0, lost: unanswered };
        t.print("nats-unreachable-30s");
        println!(
            "  statuses {:?}; outage {} requests ({frozen} while frozen), max latency {:?} (timeout {TIMEOUT:?}); first 200 {:?} after the restart",
            statuses(&sent),
            outage.len(),
            max_latency(&sent),
            recovery
        );
        println!(
            "  sidecar process before/after: VmRSS {} / {} KiB, fds {} / {}, threads {} / {}; requests in flight after {in_flight}",
            before.rss_kib, after.rss_kib, before.fds, after.fds, before.threads, after.threads
        );

        assert_eq!(unanswered, 0, "requests without an answer");
        let odd: Vec<String> = outage
            .iter()
            .filter(|s| !matches!(s.status, Some(503 | 504)))
            .map(|s| format!("{} {:?} started {:?} after the pause, answered after {:?}", s.id, s.status, s.started - down, s.latency))
            .collect();
        assert!(odd.is_empty(), "outage answers: {:?}; not 503/504 (the frozen phase lasted {:?}): {odd:#?}", statuses(&sent), killed - down);
        assert!(outage.iter().filter(|s| s.started < killed).any(|s| s.status == Some(504)), "a frozen server times requests out (504)");
        assert!(outage.iter().filter(|s| s.started >= killed).any(|s| s.status == Some(503)), "a dead server fails requests fast (503)");
        assert!(sent.iter().all(|s| matches!(s.status, Some(200 | 503 | 504))), "{:?}", statuses(&sent));
        // A bound against a hung request, not a latency figure (that belongs to the
        // benchmark): the timeout plus a generous margin for a loaded machine.
        let margin = Duration::from_secs(2);
        assert!(max_latency(&sent) <= TIMEOUT + margin, "a request took {:?}", max_latency(&sent));
        assert!(recovery.is_some(), "no 200 after NATS came back");
        assert_eq!(in_flight, 0.0, "requests still in flight:\n{metrics}");
        assert!(after.fds <= before.fds + 2, "file descriptors grew: {before:?} → {after:?}");
        assert!(after.threads <= before.threads + 2, "threads grew: {before:?} → {after:?}");
        assert!(after.rss_kib <= before.rss_kib + 8 * 1024, "memory grew: {before:?} → {after:?}");
        echo.abort();
    })
    .await
}

// ---------------------------------------------------------------------------------------
// 7. Fan-out to three services with idempotency, poison events carrying publish
//    expectations, and the server SIGKILLed and restarted under load (issue 19).

/// The issue's route for `service`: `agent.execution.completed` on stream AGENT, keyed by
/// `Nats-Msg-Id`, durable `<service>-execution-events`.
fn fan_out_route(service: &str) -> String {
    sidecar_toml(
        service,
        &execution_events_route(
            r#"ack_wait = "2s"
backoff = ["100ms", "200ms", "400ms"]
max_deliver = 50
concurrency = 8
idempotency = { key = "msg-id", ttl = "1h" }"#,
        ),
    )
}

/// Publishes until the stream acks it, reusing its `Nats-Msg-Id` (the server may be down).
async fn publish_until_acked(js: &jetstream::Context, id: &str, poison: bool) -> u64 {
    let mut headers = vec![("Nats-Msg-Id", id)];
    if poison {
        headers.push(("Nats-Expected-Stream", "AGENT"));
    }
    loop {
        let ack = async {
            js.publish_with_headers("agent.execution.completed", nats_headers(&headers), Bytes::copy_from_slice(id.as_bytes()))
                .await
                .ok()?
                .await
                .ok()
        };
        if let Ok(Some(a)) = tokio::time::timeout(Duration::from_secs(3), ack).await {
            return a.sequence;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_to_three_services_with_poison_events_and_a_server_restart() {
    bounded(Duration::from_secs(85), async {
        const EVENTS: usize = 120;
        const SERVICES: [&str; 3] = ["orchestration", "execution", "audit"];
        let mut nats = NatsServer::start_with_js(SYNC_ALWAYS, "");
        let js = jetstream::new(nats.client().await);
        stream(&js, "AGENT", "agent.>", 1).await;
        stream(&js, "DLQ", "dlq.>", 1).await;
        js.create_key_value(kv::Config { bucket: BUCKET.into(), history: 1, ..Default::default() }).await.unwrap();
        let mut apps = Vec::new();
        let mut sidecars = Vec::new();
        for s in SERVICES {
            let app = EffectApp::start(|c, _| async move {
                if c.key.starts_with("poison") {
                    return (400, false);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                commit(200)
            })
            .await;
            let sidecar = Sidecar::start(&fan_out_route(s), &nats.url(), Some(&app.url())).await;
            sidecar.wait_ready().await;
            apps.push(app);
            sidecars.push(sidecar);
        }

        // Every tenth event is poison and carries Nats-Expected-Stream; halfway through,
        // the server is SIGKILLed and restarted while the sidecars are working.
        let ids: Vec<String> = (0..EVENTS).map(|i| if i % 10 == 7 { format!("poison-{i:03}") } else { format!("evt-{i:03}") }).collect();
        let normal: Vec<String> = ids.iter().filter(|i| i.starts_with("evt")).cloned().collect();
        let poison = ids.len() - normal.len();
        let mut last = 0;
        for (n, id) in ids.iter().enumerate() {
            if n == EVENTS / 2 {
                nats.restart();
            }
            last = last.max(publish_until_acked(&js, id, id.starts_with("poison")).await);
        }
        let js = jetstream::new(nats.client().await);
        let settled = wait_until(Duration::from_secs(50), || async {
            for s in SERVICES {
                if !consumer_settled(&js, "AGENT", &format!("{s}-execution-events"), last).await {
                    return false;
                }
            }
            apps.iter().all(|a| a.tally(&normal).2 == 0)
        })
        .await;

        let mut t = Tally { sent: EVENTS * SERVICES.len(), acked: EVENTS * SERVICES.len(), ..Default::default() };
        for app in &apps {
            let (delivered, duplicates, lost) = app.tally(&normal);
            t.delivered += delivered;
            t.duplicate_effects += duplicates;
            t.lost += lost;
        }
        // Each poison event once per consumer in the dead-letter stream.
        let dlq = js.get_stream("DLQ").await.unwrap();
        let mut dead: BTreeMap<(String, String), usize> = BTreeMap::new();
        for seq in 1..=dlq.get_info().await.unwrap().state.last_sequence {
            let Ok(m) = dlq.get_raw_message(seq).await else { continue };
            let h = |n: &str| m.headers.get(n).map(|v| v.as_str().to_owned()).unwrap_or_default();
            *dead.entry((h("Bridge-Dlq-Consumer"), h("Bridge-Dlq-Msg-Id"))).or_default() += 1;
        }
        let dead_per_consumer_once = dead.len() == poison * SERVICES.len() && dead.values().all(|n| *n == 1);
        t.delivered += dead.len();
        t.lost += (poison * SERVICES.len()).saturating_sub(dead.len());
        t.print("fan-out-three-services-restart");
        println!(
            "  dead letters {} for {} poison events × {} consumers, settled {settled}",
            dead.values().sum::<usize>(),
            poison,
            SERVICES.len()
        );

        assert_eq!(t.lost, 0, "events a service never handled, or poison events never dead-lettered");
        assert_eq!(t.duplicate_effects, 0, "events a service handled more than once");
        assert!(dead_per_consumer_once, "each poison event once per consumer: {dead:?}");
        assert!(settled, "the consumers did not settle");
        for s in sidecars {
            s.stop().await;
        }
    })
    .await
}
