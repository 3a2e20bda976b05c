//! The test harness: real nats-server processes on random ports, a real HTTP app on port
//! 0, sidecars in-process or as child processes, and a small HTTP client. Every wait polls
//! a readiness condition with a deadline; nothing sleeps blindly.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub mod fixtures;
mod nats;
pub mod streaming;

#[allow(unused_imports)] // each test binary uses its own part of the harness
pub use nats::{nats_server_bin, subscribe_synced, Cluster, NatsServer};

/// Polls `f` every 20 ms until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGSTOP, returning once every thread of `pid` is stopped. `kill` returns when the
/// signal is queued, not when it took effect: the kernel wakes one thread to start the
/// group stop, and on a loaded machine the others run on for milliseconds meanwhile. A
/// nats-server "paused" that way was seen storing and acking a publish sent after the
/// pause (issue: flaky `jetstream_acks_are_awaited...`). Panics if `pid` is not stopped
/// within 10 s.
pub fn freeze(pid: u32) {
    let status = Command::new("kill").arg("-STOP").arg(pid.to_string()).status().unwrap();
    assert!(status.success(), "kill -STOP {pid}: {status}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !all_threads_stopped(pid) {
        assert!(Instant::now() < deadline, "process {pid} not stopped 10 s after SIGSTOP");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// SIGCONT to `pid`.
pub fn thaw(pid: u32) {
    let status = Command::new("kill").arg("-CONT").arg(pid.to_string()).status().unwrap();
    assert!(status.success(), "kill -CONT {pid}: {status}");
}

/// Is every thread of `pid` in the stopped state (`T` in `/proc/<pid>/task/*/stat`)? A
/// thread that exits meanwhile is skipped; a process with no threads left is not stopped.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    let mut seen = 0;
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        // `tid (comm) S ...`: the state follows the last `)`, as comm may hold one.
        let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
        if state != Some('T') {
            return false;
        }
        seen += 1;
    }
    seen > 0
}

/// A TCP server on a random local port that runs `conn` on each connection, on its own
/// task; returns the address.
pub async fn serve_tcp<F, Fut>(conn: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(conn(stream));
        }
    });
    addr
}

/// A free loopback port (bound and released; used only where a fixed port must be known
/// before the process starts, e.g. cluster routes and restarts). See `free_ports`.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

// The benches take their sidecars' ports the same way (benches/e2e/procs.rs).
mod ports;
pub use ports::free_ports;

// ---------------------------------------------------------------------------------------
// The legacy app: a real HTTP server on port 0.

#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// One request as the app saw it, and when it arrived.
#[derive(Clone, Debug)]
pub struct Hit {
    pub at: Instant,
    pub seen: Seen,
}

impl Hit {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.seen.headers.get(name).and_then(|v| v.to_str().ok())
    }
    /// The sidecar's `Bridge-Delivery` count, 0 when absent.
    pub fn delivery(&self) -> u64 {
        self.header("bridge-delivery").and_then(|v| v.parse().ok()).unwrap_or(0)
    }
}

type Script = Arc<dyn Fn(Seen, usize) -> futures::future::BoxFuture<'static, Response<Full<Bytes>>> + Send + Sync>;

/// The legacy app: records each request when it arrives (with the time), answers with the
/// test's handler (which may be slow), and counts calls in flight and effects (2xx answers).
pub struct App {
    pub addr: SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
    effects: Arc<Mutex<Vec<Seen>>>,
    max_in_flight: Arc<std::sync::atomic::AtomicUsize>,
    stop: CancellationToken,
}

impl App {
    /// Serves a plain handler on 127.0.0.1:0.
    pub async fn start(handler: impl Fn(&Seen) -> Response<Full<Bytes>> + Send + Sync + 'static) -> Self {
        Self::script(move |seen, _| std::future::ready(handler(&seen))).await
    }

    /// Serves `f(request, n)`, which answers the n-th request (1-based), on 127.0.0.1:0.
    pub async fn script<F, Fut>(f: F) -> Self
    where
        F: Fn(Seen, usize) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, Arc::new(move |seen, n| Box::pin(f(seen, n))))
    }

    pub fn serve(listener: TcpListener, script: Script) -> Self {
        use std::sync::atomic::Ordering;
        let addr = listener.local_addr().unwrap();
        let app = Self {
            addr,
            hits: Default::default(),
            effects: Default::default(),
            max_in_flight: Default::default(),
            stop: CancellationToken::new(),
        };
        let (hits, effects, max, stop) = (app.hits.clone(), app.effects.clone(), app.max_in_flight.clone(), app.stop.clone());
        let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
                };
                let (hits, effects, max, stop, inf, script) =
                    (hits.clone(), effects.clone(), max.clone(), stop.clone(), in_flight.clone(), script.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (hits, effects, max, inf, script) = (hits.clone(), effects.clone(), max.clone(), inf.clone(), script.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let seen = Seen { method: parts.method, uri: parts.uri.to_string(), headers: parts.headers, body };
                            let n = {
                                let mut hits = hits.lock().unwrap();
                                hits.push(Hit { at: Instant::now(), seen: seen.clone() });
                                hits.len()
                            };
                            let now = inf.fetch_add(1, Ordering::SeqCst) + 1;
                            max.fetch_max(now, Ordering::SeqCst);
                            let res = script(seen.clone(), n).await;
                            inf.fetch_sub(1, Ordering::SeqCst);
                            if res.status().is_success() {
                                effects.lock().unwrap().push(seen);
                            }
                            Ok::<_, Infallible>(res)
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        app
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Seen> {
        self.hits.lock().unwrap().iter().map(|h| h.seen.clone()).collect()
    }

    /// How many requests were answered with a 2xx (the app's effects).
    pub fn effects(&self) -> usize {
        self.effects.lock().unwrap().len()
    }

    /// The most requests the app was handling at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub async fn wait_hits(&self, n: usize) -> Vec<Hit> {
        eventually(&format!("{n} requests at the app"), Duration::from_secs(20), || async {
            let h = self.hits();
            (h.len() >= n).then_some(h)
        })
        .await
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A response with extra headers.
pub fn with_headers(status: u16, headers: &[(&str, &str)], body: &str) -> Response<Full<Bytes>> {
    let mut r = respond(status, body);
    for (k, v) in headers {
        r.headers_mut().insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    r
}

pub fn respond(status: u16, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r
}

// ---------------------------------------------------------------------------------------
// Sidecars

/// A sidecar running in this process on random ports.
pub struct Sidecar {
    pub egress: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    pub shutdown: CancellationToken,
    pub reload: tokio::sync::mpsc::Sender<()>,
    pub task: Option<tokio::task::JoinHandle<Result<(), natsbridge::sidecar::SidecarError>>>,
    _dir: tempfile::TempDir,
}

/// An app answering with `handler` and a sidecar whose routing file `toml` makes from the
/// app's URL, on `nats`; returns once the sidecar's NATS connection is up.
pub async fn app_and_sidecar(
    nats: &NatsServer,
    handler: impl Fn(&Seen) -> Response<Full<Bytes>> + Send + Sync + 'static,
    toml: impl FnOnce(&str) -> String,
) -> (App, Sidecar) {
    let app = App::start(handler).await;
    let sc = Sidecar::start(&toml(&app.url()), &nats.url(), None).await;
    sc.wait_nats().await;
    (app, sc)
}

impl Sidecar {
    /// Writes `toml` to a temp file and runs a sidecar from it, NATS servers and app URL
    /// overridden as given.
    pub async fn start(toml: &str, nats_url: &str, app_url: Option<&str>) -> Self {
        Self::start_with_env(toml, nats_url, app_url, &[]).await
    }

    /// As `start`, with `env` as the sidecar's whole environment (for secrets named in
    /// the routing file).
    pub async fn start_with_env(toml: &str, nats_url: &str, app_url: Option<&str>, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.toml");
        std::fs::write(&path, toml).unwrap();
        let config = natsbridge::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let egress = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (egress_addr, admin_addr) = (egress.local_addr().unwrap(), admin.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
        let vars: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let overrides = natsbridge::config::Overrides {
            nats_servers: Some(vec![nats_url.to_owned()]),
            app_url: app_url.map(|u| u.parse().unwrap()),
            ..Default::default()
        };
        let task = tokio::spawn(natsbridge::sidecar::run(natsbridge::sidecar::Parts {
            config,
            overrides,
            egress,
            admin,
            env: Arc::new(move |k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())),
            reload: reload_rx,
            shutdown: shutdown.clone(),
        }));
        Self { egress: egress_addr, admin: admin_addr, config_path: path, shutdown, reload: reload_tx, task: Some(task), _dir: dir }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.egress, path)
    }

    /// Does `/readyz` answer 200 (in the default mode: can serve, NATS or not)?
    pub async fn ready(&self) -> bool {
        get(&format!("http://{}/readyz", self.admin)).await.map(|r| r.status == 200).unwrap_or(false)
    }

    /// The `/statusz` document.
    pub async fn statusz(&self) -> serde_json::Value {
        statusz(self.admin).await.unwrap_or_default()
    }

    /// Waits until every component is up (`/statusz`): NATS connected, every inbound route
    /// bound, nothing missing. Stronger than `/readyz` in the default mode.
    pub async fn wait_ready(&self) {
        wait_all_up(self.admin, "every sidecar component up", Duration::from_secs(15)).await
    }

    /// Waits until the sidecar's NATS connection is up (whatever else `/statusz` reports,
    /// e.g. a stream a route needs that a test leaves out on purpose).
    pub async fn wait_nats(&self) {
        let admin = self.admin;
        eventually("sidecar connected to NATS", Duration::from_secs(15), || async move { nats_ready(admin).await.then_some(()) }).await
    }

    pub async fn metrics(&self) -> String {
        get(&format!("http://{}/metrics", self.admin)).await.map(|r| String::from_utf8_lossy(&r.body).into_owned()).unwrap_or_default()
    }

    /// The start error, when `run` returns one quickly.
    pub async fn start_error(mut self) -> String {
        let task = self.task.take().unwrap();
        match tokio::time::timeout(Duration::from_secs(10), task).await {
            Ok(Ok(Err(e))) => e.to_string(),
            Ok(Ok(Ok(()))) => panic!("sidecar returned Ok; expected a start error"),
            Ok(Err(e)) => panic!("sidecar task panicked: {e}"),
            Err(_) => panic!("sidecar kept running; expected a start error"),
        }
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The `/statusz` document of the sidecar at `admin`, once its admin listener answers.
pub async fn statusz(admin: SocketAddr) -> Option<serde_json::Value> {
    let r = get(&format!("http://{admin}/statusz")).await.ok()?;
    serde_json::from_slice(&r.body).ok()
}

/// Waits until every component of the sidecar at `admin` is up; on timeout, panics with
/// what `/statusz` still names as failing.
pub async fn wait_all_up(admin: SocketAddr, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !all_up(admin).await {
        if Instant::now() > deadline {
            let failing = statusz(admin).await.map(|v| v["failing"].clone());
            panic!("timed out after {timeout:?} waiting for {what}; failing: {failing:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Is every component of the sidecar at `admin` up?
pub async fn all_up(admin: SocketAddr) -> bool {
    statusz(admin).await.is_some_and(|v| v["failing"].as_object().is_some_and(|f| f.is_empty()))
}

/// Is the sidecar at `admin` connected to NATS, as its `/statusz` says? Other components
/// that are down (a stream a test leaves out on purpose) do not matter here.
pub async fn nats_ready(admin: SocketAddr) -> bool {
    statusz(admin).await.is_some_and(|v| v["components"]["nats"]["state"] == "up")
}

/// A sidecar as a child process of the real binary.
pub struct SidecarProcess {
    pub child: Child,
    pub egress: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl SidecarProcess {
    pub fn start(toml: &str, nats_url: &str, app_url: Option<&str>) -> Self {
        Self::start_with(toml, nats_url, |cmd| {
            if let Some(a) = app_url {
                cmd.arg("--app-url").arg(a);
            }
        })
    }

    /// Like [`start`](Self::start), with `configure` adding to the command line and
    /// environment.
    pub fn start_with(toml: &str, nats_url: &str, configure: impl FnOnce(&mut Command)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.toml");
        std::fs::write(&path, toml).unwrap();
        let egress: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_natsbridge"));
        cmd.arg("run").arg("--config").arg(&path).arg("--listen").arg(egress.to_string()).arg("--admin-listen").arg(admin.to_string());
        cmd.arg("--nats-url").arg(nats_url);
        configure(&mut cmd);
        let log = std::fs::File::create(dir.path().join("sidecar.log")).unwrap();
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        Self { child, egress, admin, dir }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.egress, path)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sidecar.log")).unwrap_or_default()
    }

    pub async fn wait_ready(&self) {
        wait_all_up(self.admin, "every sidecar process component up", Duration::from_secs(20)).await
    }

    pub async fn wait_nats(&self) {
        let admin = self.admin;
        eventually("sidecar process connected to NATS", Duration::from_secs(20), || async move { nats_ready(admin).await.then_some(()) })
            .await
    }

    pub fn signal(&self, sig: &str) {
        Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap();
    }

    /// SIGSTOP, returning once the process is stopped ([`freeze`]).
    pub fn freeze(&self) {
        freeze(self.child.id());
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// HTTP client

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub type Client = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

pub async fn send(req: Request<Full<Bytes>>) -> Result<Reply, hyper_util::client::legacy::Error> {
    let res = client().request(req).await?;
    let (parts, body) = res.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    Ok(Reply { status: parts.status.as_u16(), headers: parts.headers, body })
}

pub async fn get(url: &str) -> Result<Reply, hyper_util::client::legacy::Error> {
    send(Request::get(url).body(Full::new(Bytes::new())).unwrap()).await
}

pub async fn post(url: &str, body: &str) -> Reply {
    send(Request::post(url).body(Full::new(Bytes::copy_from_slice(body.as_bytes()))).unwrap()).await.unwrap()
}

pub async fn call(method: &str, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(b.body(Full::new(body.into())).unwrap()).await.unwrap()
}

/// An HTTP/1 `CONNECT` tunnel through the egress listener at `egress` to `target`
/// (`host:port`), its `200` read.
pub async fn connect_tunnel(egress: SocketAddr, target: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(egress).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "CONNECT answer cut short: {:?}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}
