//! Real nats-server processes for tests: one JetStream server on a random port with its own
//! store directory, or a three-node cluster on loopback; killed and cleaned up on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_ports;

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
    /// server looks to its clients. Returns once every thread has stopped ([`super::freeze`]).
    /// `resume` (SIGCONT) or `kill` ends it.
    pub fn pause(&self) {
        if let Some(pid) = self.pid() {
            super::freeze(pid);
        }
    }

    pub fn resume(&self) {
        if let Some(pid) = self.pid() {
            super::thaw(pid);
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

    /// Rewrites the configuration with `extra` (on the port it runs on) and has the
    /// running server reload it (SIGHUP); returns once its log says it did. Connected
    /// clients keep their connections and get the new permissions.
    pub fn reload_with(&self, extra: &str) {
        const RELOADED: &str = "Reloaded server configuration";
        let before = self.log().matches(RELOADED).count();
        self.write_conf(self.port as i32, extra);
        let pid = self.pid().expect("a running server");
        let status = Command::new("kill").arg("-HUP").arg(pid.to_string()).status().unwrap();
        assert!(status.success(), "kill -HUP {pid}: {status}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.log().matches(RELOADED).count() == before {
            assert!(Instant::now() < deadline, "nats-server did not reload within 10 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
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
        let ports = free_ports(6);
        let (client_ports, route_ports) = (ports[..3].to_vec(), ports[3..].to_vec());
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
