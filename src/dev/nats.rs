//! The local nats-server of `natsbridge dev`: is one answering at the configured URL, and
//! if not, one started on that port with JetStream in a temporary store, stopped on exit.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use super::logs::{self, Sink};
use super::DevError;

/// The host and port of a `nats://host:port` URL (4222 by default).
pub fn host_port(url: &str) -> Result<(String, u16), DevError> {
    let uri: http::Uri = url.parse().map_err(|_| DevError::NatsUrl(url.to_owned()))?;
    let host = uri.host().ok_or_else(|| DevError::NatsUrl(url.to_owned()))?;
    Ok((host.trim_start_matches('[').trim_end_matches(']').to_owned(), uri.port_u16().unwrap_or(4222)))
}

/// Does something accept TCP connections at `host:port`?
pub async fn answers(host: &str, port: u16) -> bool {
    matches!(tokio::time::timeout(Duration::from_secs(1), TcpStream::connect((host, port))).await, Ok(Ok(_)))
}

fn is_local(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified())
}

/// A nats-server this process started; stopped (SIGTERM, then killed) by [`Started::stop`].
pub struct Started {
    child: Child,
    pub pid: u32,
    _store: tempfile::TempDir,
}

/// Starts `bin` on `host:port` with JetStream, its logs behind `[nats] `, and waits until
/// it answers.
pub async fn start(bin: &Path, host: &str, port: u16, sink: &Sink) -> Result<Started, DevError> {
    if !is_local(host) {
        return Err(DevError::NatsNotLocal(format!("{host}:{port}")));
    }
    let store = tempfile::tempdir().map_err(DevError::Io)?;
    let addr = if host.eq_ignore_ascii_case("localhost") { "127.0.0.1" } else { host };
    let mut child = Command::new(bin)
        .args(["-a", addr, "-p", &port.to_string(), "-js", "-sd"])
        .arg(store.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: Ctrl-C reaches `dev`, which stops it in order.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| DevError::Spawn { what: bin.display().to_string(), source: e })?;
    let pid = child.id().unwrap_or_default();
    if let Some(out) = child.stdout.take() {
        logs::pump(sink.clone(), logs::NATS, out);
    }
    if let Some(err) = child.stderr.take() {
        logs::pump(sink.clone(), logs::NATS, err);
    }
    logs::write_lines(sink, logs::NATS, &format!("started {} (pid {pid}) on {addr}:{port}", bin.display()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !answers(addr, port).await {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(DevError::NatsExited(status.to_string()));
        }
        if Instant::now() >= deadline {
            return Err(DevError::NatsExited("not answering after 10s".into()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Started { child, pid, _store: store })
}

impl Started {
    pub async fn stop(mut self, sink: &Sink) {
        stop_child(&mut self.child, Duration::from_secs(5)).await;
        logs::write_lines(sink, logs::NATS, &format!("stopped nats-server (pid {})", self.pid));
    }
}

/// SIGTERM, then SIGKILL after `grace`, to the child's process group (each child this
/// module starts leads its own): what a shell script started goes too. Waits for the exit.
pub async fn stop_child(child: &mut Child, grace: Duration) {
    let Some(pid) = child.id() else { return };
    // No libc here (`forbid(unsafe_code)`): kill(1) signals the group.
    let group = format!("-{pid}");
    let _ = Command::new("kill").args(["-TERM", "--", &group]).status().await;
    if tokio::time::timeout(grace, child.wait()).await.is_ok() {
        return;
    }
    let _ = Command::new("kill").args(["-KILL", "--", &group]).status().await;
    let _ = child.kill().await;
}

/// `nats-server` found in `path` (a `PATH`-style list), for the CLI edge.
pub fn find_on_path(path: &std::ffi::OsStr) -> Option<PathBuf> {
    std::env::split_paths(path).map(|d| d.join("nats-server")).find(|p| p.is_file())
}

/// The address the app reaches a listener at: its own, or loopback for an unspecified one.
pub fn reachable(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    }
}
