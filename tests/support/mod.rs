//! The test harness: real nats-server processes on random ports, a real HTTP app on port
//! 0, sidecars in-process or as child processes, and a small HTTP client. Every wait polls
//! a readiness condition with a deadline; nothing sleeps blindly.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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
pub mod streaming;

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

/// A free loopback port (bound and released; used only where a fixed port must be known
/// before the process starts, e.g. cluster routes and restarts).
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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------------------
// nats-server

pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    pub store: tempfile::TempDir,
    conf: PathBuf,
    log: PathBuf,
    /// Extra settings inside the `jetstream { }` block (e.g. `sync_interval: always`).
    js_extra: String,
}

impl NatsServer {
    /// A JetStream server on a random port with its own store directory.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// As `start`, with extra nats.conf text (auth, TLS, `sync_interval`...).
    pub fn start_with(extra: &str) -> Self {
        Self::launch(tempfile::tempdir().unwrap(), None, "", extra)
    }

    /// As `start_with`, with `js` inside the `jetstream { }` block (a second block would
    /// replace the first, store_dir included), e.g. `sync_interval: always`.
    pub fn start_with_js(js: &str, extra: &str) -> Self {
        Self::launch(tempfile::tempdir().unwrap(), None, js, extra)
    }

    /// `port: None` lets the server pick (`-1`); the ports file tells which it took, and
    /// restarts reuse it.
    fn launch(store: tempfile::TempDir, port: Option<u16>, js: &str, extra: &str) -> Self {
        let conf = store.path().join("nats.conf");
        let log = store.path().join("nats.log");
        let mut s = Self { child: None, port: port.unwrap_or(0), store, conf, log, js_extra: js.to_owned() };
        s.write_conf(port.map(|p| p as i32).unwrap_or(-1), extra);
        s.spawn();
        if port.is_none() {
            s.write_conf(s.port as i32, extra);
        }
        s
    }

    fn write_conf(&self, port: i32, extra: &str) {
        let sd = self.store.path().join("js");
        let js = &self.js_extra;
        let text = format!("listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: {sd:?}\n{js}\n}}\nmax_payload: 1MB\n{extra}\n");
        std::fs::write(&self.conf, text).unwrap();
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let ports_dir = self.store.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).unwrap();
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&self.conf)
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server must be installed (scripts/install-nats-server)");
        let pid = child.id();
        self.child = Some(child);
        let ports_file = ports_dir.join(format!("{}_{pid}.ports", Path::new(&nats_server_bin()).file_name().unwrap().to_string_lossy()));
        let deadline = Instant::now() + Duration::from_secs(15);
        let port = loop {
            let found = std::fs::read_to_string(&ports_file).ok().and_then(|t| {
                let v: serde_json::Value = serde_json::from_str(&t).ok()?;
                let url = v["nats"][0].as_str()?.to_owned();
                url.rsplit(':').next()?.parse::<u16>().ok()
            });
            if let Some(p) = found {
                break p;
            }
            if Instant::now() > deadline {
                panic!("nats-server did not start:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.port = port;
        wait_port(self.port, Duration::from_secs(15), &self.log);
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGSTOP: the process keeps its sockets open but answers nothing, as a partitioned
    /// server looks to its clients. `resume` (SIGCONT) or `kill` ends it.
    pub fn pause(&self) {
        if let Some(pid) = self.pid() {
            Command::new("kill").arg("-STOP").arg(pid.to_string()).status().unwrap();
        }
    }

    pub fn resume(&self) {
        if let Some(pid) = self.pid() {
            Command::new("kill").arg("-CONT").arg(pid.to_string()).status().unwrap();
        }
    }

    /// Starts again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url()).await.unwrap()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Subscribes and waits until the server has processed the subscription: a flush only
/// writes it to the socket, so a publish from another connection could still miss it.
pub async fn subscribe_synced(c: &async_nats::Client, subject: &str) -> async_nats::Subscriber {
    let sub = c.subscribe(subject.to_owned()).await.unwrap();
    // A request the server answers "no responders" to is a round trip behind the SUB.
    let _ = c.request(format!("_natsbridge_test.sync.{}", c.new_inbox().replace('.', "_")), bytes::Bytes::new()).await;
    sub
}

pub fn nats_server_bin() -> String {
    static CHECKED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CHECKED
        .get_or_init(|| {
            // scripts/test exports NATS_SERVER_BIN; a bare `cargo test` finds the pinned server
            // that scripts/install-nats-server put in the project's virtualenv.
            let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| {
                let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/target/venv/bin/nats-server");
                if std::path::Path::new(venv).exists() {
                    venv.into()
                } else {
                    "nats-server".into()
                }
            });
            refuse_older_server(&bin);
            bin
        })
        .clone()
}

/// An older server than the pin (Debian's 2.9, say) passes some tests and fails others for
/// reasons that are not ours: refused, unless NATSBRIDGE_ALLOW_OLD_NATS_SERVER=1.
fn refuse_older_server(bin: &str) {
    let reqs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/requirements.txt")).unwrap_or_default();
    let Some(pin) =
        reqs.lines().find_map(|l| l.strip_prefix("nats-server-bin==")).map(|v| v.split_whitespace().next().unwrap_or("").to_owned())
    else {
        return;
    };
    let out = Command::new(bin).arg("--version").output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let have = out.trim().rsplit('v').next().unwrap_or("").to_owned();
    let parse = |v: &str| v.split('.').map(|p| p.parse::<u32>().unwrap_or(0)).collect::<Vec<_>>();
    if parse(&have) < parse(&pin) && std::env::var("NATSBRIDGE_ALLOW_OLD_NATS_SERVER").as_deref() != Ok("1") {
        panic!(
            "{bin} is nats-server {have:?}, older than the pinned {pin} (scripts/requirements.txt): run \
             scripts/install-nats-server, or set NATSBRIDGE_ALLOW_OLD_NATS_SERVER=1 to test against it anyway"
        );
    }
}

fn wait_port(port: u16, timeout: Duration, log: &Path) {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            panic!("nats-server did not listen on {port}:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Three clustered JetStream servers on loopback.
pub struct Cluster {
    pub nodes: Vec<NatsServer>,
}

impl Cluster {
    pub fn start(extra: &str) -> Self {
        Self::start_with_js("", extra)
    }

    /// As `start`, with `js` inside each node's `jetstream { }` block.
    pub fn start_with_js(js: &str, extra: &str) -> Self {
        let client_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes: Vec<String> = route_ports.iter().map(|p| format!("\"nats-route://127.0.0.1:{p}\"")).collect();
        let nodes = (0..3)
            .map(|i| {
                let cfg = format!(
                    "server_name: n{i}\ncluster {{ name: c1\n listen: \"127.0.0.1:{}\"\n routes: [{}] }}\n{extra}",
                    route_ports[i],
                    routes.join(", ")
                );
                NatsServer::launch(tempfile::tempdir().unwrap(), Some(client_ports[i]), js, &cfg)
            })
            .collect();
        Self { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }
}

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
