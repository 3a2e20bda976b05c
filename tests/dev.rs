//! `natsbridge dev` (issue 13 §4), the real binary as a child process: it starts a
//! nats-server when none answers (and stops it after), leaves a running one alone,
//! provisions, runs the sidecar and the app command with HTTP_PROXY/NATSBRIDGE_URL/PORT,
//! prefixes the three logs, and stops what it started on the app's exit or on SIGINT.

mod support;

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;

fn routes(nats_url: &str) -> String {
    r#"
[sidecar]
service = "devloop"
app_url = "http://127.0.0.1:7321"

[nats]
servers = ["NATS_URL"]

[[streams]]
name = "DEVORDERS"
subjects = ["devorders.>"]

[[outbound]]
name = "order-created"
method = "POST"
host = "orders-service"
path = "/orders"
subject = "devorders.created"
mode = "jetstream"
"#
    .replace("NATS_URL", nats_url)
}

/// The app: one call through HTTP_PROXY, its environment, then (`linger`) waits to be
/// stopped.
fn app_script(linger: bool) -> String {
    format!(
        r#"
import os, sys, time, urllib.request
print("env", os.environ["HTTP_PROXY"] == os.environ["NATSBRIDGE_URL"], os.environ["PORT"], os.getpid(), flush=True)
req = urllib.request.Request("http://orders-service/orders", data=b'{{"id":1}}', method="POST", headers={{"content-type": "application/json"}})
with urllib.request.urlopen(req, timeout=10) as r:
    print("status", r.status, r.read().decode(), flush=True)
print("to stderr", file=sys.stderr, flush=True)
if {linger}:
    time.sleep(120)
"#,
        linger = if linger { "True" } else { "False" }
    )
}

struct Dev {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

fn dev(toml: &str, app: &str, nats_bin: &str) -> Dev {
    dev_with(toml, &["python3", "-c", app], nats_bin, |_| {})
}

fn dev_with(toml: &str, command: &[&str], nats_bin: &str, configure: impl FnOnce(&mut Command)) -> Dev {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.toml");
    std::fs::write(&path, toml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_natsbridge"));
    cmd.args(["dev", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .arg("--")
        .args(command)
        .env("NATS_SERVER_BIN", nats_bin)
        // Only NATS_SERVER_BIN may name the server (PATH keeps python3).
        .env_remove("HTTP_PROXY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    configure(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    for out in [Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>, Box::new(child.stderr.take().unwrap())] {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(l);
            }
        });
    }
    Dev { child, lines, _dir: dir }
}

impl Dev {
    fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    async fn wait_line(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let lines = self.lines.clone();
        eventually(what, Duration::from_secs(30), || {
            let found = lines.lock().unwrap().iter().find(|l| f(l)).cloned();
            async move { found }
        })
        .await
    }

    async fn exit_code(&mut self) -> i32 {
        let child = &mut self.child;
        let code = eventually("natsbridge dev to exit", Duration::from_secs(30), || {
            let r = child.try_wait().unwrap();
            async move { r }
        })
        .await;
        code.code().unwrap_or(-1)
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn alive(pid: u32) -> bool {
    // A reaped or never-started process has no /proc entry; a zombie is not running.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

fn pid_in(line: &str, marker: &str) -> u32 {
    let rest = &line[line.find(marker).unwrap_or_else(|| panic!("{marker:?} in {line:?}")) + marker.len()..];
    rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn dev_starts_nats_runs_the_app_and_stops_what_it_started() {
    let port = free_port();
    let mut d = dev(&routes(&format!("nats://127.0.0.1:{port}")), &app_script(false), &nats_server_bin());
    let code = d.exit_code().await;
    let out = d.output();
    assert_eq!(code, 0, "{out}");
    let started = d.wait_line("nats-server started", |l| l.starts_with("[nats] started")).await;
    let nats_pid = pid_in(&started, "(pid ");
    // The app saw the sidecar as its proxy and PORT from app_url, and its call went over
    // NATS into the stream dev provisioned.
    assert!(out.lines().any(|l| l.starts_with("[app] env True 7321 ")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("[app] status 20") && l.contains("DEVORDERS")), "{out}");
    assert!(out.lines().any(|l| l == "[app] to stderr"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("[sidecar] ") && l.contains("DEVORDERS")), "provisioning plan: {out}");
    assert!(out.lines().any(|l| l.starts_with("[sidecar] ") && l.contains("INFO")), "sidecar logs: {out}");
    assert!(out.lines().any(|l| l.starts_with("[nats] ") && l.contains("Server is ready")), "nats-server logs: {out}");
    assert!(out.lines().all(|l| ["[nats] ", "[sidecar] ", "[app] "].iter().any(|p| l.starts_with(p))), "an unprefixed line: {out}");
    // What dev started is gone: the process and its port.
    assert!(!alive(nats_pid), "nats-server {nats_pid} still running: {out}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "something still answers on {port}");
    assert!(out.contains("[nats] stopped nats-server"), "{out}");
}

#[tokio::test]
async fn dev_leaves_a_running_nats_server_alone() {
    let nats = NatsServer::start();
    let mut d = dev(&routes(&nats.url()), &app_script(false), "/nonexistent/nats-server");
    let code = d.exit_code().await;
    let out = d.output();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("[nats] using the nats-server already answering"), "{out}");
    assert!(!out.contains("[nats] started"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("[app] status 20")), "{out}");
    // Still there, still serving, with the message the app sent.
    assert!(alive(nats.pid().unwrap()));
    let js = async_nats::jetstream::new(nats.client().await);
    let mut stream = js.get_stream("DEVORDERS").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
}

#[tokio::test]
async fn sigint_stops_the_app_the_sidecar_and_the_started_nats_server() {
    let port = free_port();
    // A shell script whose python child does the work: stopping the app stops both.
    let script = app_script(true);
    let command = ["sh", "-c", "python3 -c \"$DEV_APP\" & wait"];
    let mut d = dev_with(&routes(&format!("nats://127.0.0.1:{port}")), &command, &nats_server_bin(), |c| {
        c.env("DEV_APP", &script);
    });
    let env_line = d.wait_line("the app's env line", |l| l.starts_with("[app] env ")).await;
    d.wait_line("the app's call answered", |l| l.starts_with("[app] status")).await;
    let app_pid: u32 = env_line.rsplit(' ').next().unwrap().parse().unwrap();
    let nats_pid = pid_in(&d.wait_line("nats-server started", |l| l.starts_with("[nats] started")).await, "(pid ");
    assert!(alive(app_pid) && alive(nats_pid));
    Command::new("kill").args(["-INT", &d.child.id().to_string()]).status().unwrap();
    let code = d.exit_code().await;
    let out = d.output();
    assert_eq!(code, 130, "{out}");
    assert!(!alive(app_pid), "app {app_pid} still running: {out}");
    assert!(!alive(nats_pid), "nats-server {nats_pid} still running: {out}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[tokio::test]
async fn without_a_nats_server_dev_names_the_install_script() {
    let port = free_port();
    // Neither NATS_SERVER_BIN nor PATH has one.
    let mut d = dev_with(&routes(&format!("nats://127.0.0.1:{port}")), &["true"], "/nonexistent/nats-server", |c| {
        c.env("PATH", "/nonexistent");
    });
    let code = d.exit_code().await;
    let out = d.output();
    assert_ne!(code, 0);
    assert!(out.contains("scripts/install-nats-server"), "{out}");
    assert!(!out.contains("[app] exited"), "the app must not start: {out}");
}
