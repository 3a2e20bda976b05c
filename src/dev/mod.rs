//! `natsbridge dev`: the local loop, like `dapr run`. Starts a nats-server when none
//! answers at the configured URL, provisions, runs the sidecar in this process and the
//! app command beside it (`HTTP_PROXY`/`NATSBRIDGE_URL` at the sidecar, `PORT` from
//! `app_url`), with the three logs prefixed and interleaved; on shutdown (or when the app
//! exits) stops everything it started and nothing else.
//!
//! Everything comes in from the CLI edge: the config, the listeners, the nats-server
//! binary, the environment lookup, the shutdown signal and the log sink.
//!
//! - [`logs`]: the prefixed sink, the child output pumps and the sidecar's log writer;
//! - [`nats`]: probing the NATS URL and the nats-server this command starts.

pub mod logs;
pub mod nats;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Overrides};
use crate::sidecar::Env;
use logs::Sink;

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("invalid NATS URL {0:?}")]
    NatsUrl(String),
    #[error(
        "no nats-server answers at {url} and none was found: install one with scripts/install-nats-server, \
         put it on PATH, or set NATS_SERVER_BIN"
    )]
    NoNatsServer { url: String },
    #[error("no nats-server answers at {0}, and it is not local: start one there, or point [nats] servers at localhost")]
    NatsNotLocal(String),
    #[error("the nats-server started for dev exited: {0}")]
    NatsExited(String),
    #[error("cannot start {what}: {source}")]
    Spawn { what: String, source: std::io::Error },
    #[error("the app command is empty")]
    NoCommand,
    #[error(transparent)]
    Io(std::io::Error),
    #[error(transparent)]
    Sidecar(#[from] crate::sidecar::SidecarError),
}

/// Everything `dev` needs from its host process.
pub struct Dev {
    /// The routing file, overrides already applied.
    pub config: Config,
    pub overrides: Overrides,
    pub egress: TcpListener,
    pub admin: TcpListener,
    /// The nats-server to start when none answers (`NATS_SERVER_BIN` or `PATH`).
    pub nats_server_bin: Option<PathBuf>,
    /// The app command and its arguments.
    pub command: Vec<String>,
    pub env: Env,
    pub sink: Sink,
    pub shutdown: CancellationToken,
}

/// Runs until the app exits or `shutdown` is cancelled; returns the app's exit code
/// (130 when stopped by a signal before it exited).
pub async fn run(dev: Dev) -> Result<i32, DevError> {
    let Dev { config, overrides, egress, admin, nats_server_bin, command, env, sink, shutdown } = dev;
    if command.is_empty() {
        return Err(DevError::NoCommand);
    }
    let url = config.nats.servers.first().cloned().unwrap_or_default();
    let (host, port) = nats::host_port(&url)?;
    let started = if nats::answers(&host, port).await {
        logs::write_lines(&sink, logs::NATS, &format!("using the nats-server already answering at {host}:{port} (left running)"));
        None
    } else {
        let bin = nats_server_bin.ok_or_else(|| DevError::NoNatsServer { url: format!("{host}:{port}") })?;
        Some(nats::start(&bin, &host, port, &sink).await?)
    };
    let result =
        with_nats(Dev { config, overrides, egress, admin, nats_server_bin: None, command, env, sink: sink.clone(), shutdown }).await;
    if let Some(s) = started {
        s.stop(&sink).await;
    }
    result
}

/// Provisions, then runs the sidecar and the app until the app exits or `shutdown`.
async fn with_nats(dev: Dev) -> Result<i32, DevError> {
    let Dev { config, overrides, egress, admin, command, env, sink, shutdown, .. } = dev;
    provision(&config, &env, &sink).await;
    let proxy = format!("http://{}", nats::reachable(egress.local_addr().map_err(DevError::Io)?));
    let app_port = config.sidecar.app_url.port_u16().unwrap_or(80);
    let admin_addr = nats::reachable(admin.local_addr().map_err(DevError::Io)?);
    let within = config.nats.connect_timeout + Duration::from_secs(2);
    let stop_sidecar = CancellationToken::new();
    let (_reload_tx, reload) = tokio::sync::mpsc::channel(1);
    let parts = crate::sidecar::Parts { config, overrides, egress, admin, env, reload, shutdown: stop_sidecar.clone() };
    let mut sidecar = tokio::spawn(crate::sidecar::run(parts));
    // Like a native sidecar's startup probe: the app starts once the sidecar is ready
    // (egress serving, the first NATS connection attempt over), so its first call does
    // not race the connection and get a 503.
    tokio::select! {
        ready = wait_ready(admin_addr, within) => if !ready {
            logs::write_lines(&sink, logs::SIDECAR, &format!("not ready within {within:?}; starting the app anyway (see /statusz)"));
        },
        ended = &mut sidecar => {
            return match ended {
                Ok(Err(e)) => Err(e.into()),
                Ok(Ok(())) => Ok(0),
                Err(e) => Err(DevError::Io(std::io::Error::other(e))),
            };
        }
    }
    let code = match spawn_app(&command, &proxy, app_port) {
        Ok(app) => Ok(supervise_app(app, &sink, &shutdown).await),
        Err(e) => Err(e),
    };
    stop_sidecar.cancel();
    if let (Ok(_), Ok(Err(e))) = (&code, sidecar.await) {
        return Err(e.into());
    }
    code
}

/// Polls the sidecar's `/readyz` until it answers 200 or `within` passes.
async fn wait_ready(admin: std::net::SocketAddr, within: Duration) -> bool {
    use http_body_util::Empty;
    use hyper_util::client::legacy::{connect::HttpConnector, Client};
    let client: Client<HttpConnector, Empty<bytes::Bytes>> = Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let uri: http::Uri = match format!("http://{admin}/readyz").parse() {
        Ok(u) => u,
        Err(_) => return false,
    };
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(1), client.get(uri.clone())).await {
            if r.status().is_success() {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// The app command, pointed at the sidecar: `HTTP_PROXY` (and `http_proxy`, which some
/// clients read instead), `NATSBRIDGE_URL`, and `PORT` from `app_url`.
fn spawn_app(command: &[String], proxy: &str, port: u16) -> Result<tokio::process::Child, DevError> {
    let (program, args) = command.split_first().ok_or(DevError::NoCommand)?;
    tokio::process::Command::new(program)
        .args(args)
        .env("HTTP_PROXY", proxy)
        .env("http_proxy", proxy)
        .env("NATSBRIDGE_URL", proxy)
        .env("PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: Ctrl-C reaches `dev`, which stops the app first.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| DevError::Spawn { what: program.clone(), source: e })
}

/// Waits for the app's exit (its code) or for `shutdown` (the app is stopped: 130).
async fn supervise_app(mut app: tokio::process::Child, sink: &Sink, shutdown: &CancellationToken) -> i32 {
    let pumps = [
        app.stdout.take().map(|o| logs::pump(sink.clone(), logs::APP, o)),
        app.stderr.take().map(|e| logs::pump(sink.clone(), logs::APP, e)),
    ];
    let code = tokio::select! {
        status = app.wait() => status.ok().and_then(|s| s.code()).unwrap_or(1),
        _ = shutdown.cancelled() => {
            nats::stop_child(&mut app, Duration::from_secs(5)).await;
            130
        }
    };
    // What the app started may hold its output open: its lines are not waited for long.
    for p in pumps.into_iter().flatten() {
        let _ = tokio::time::timeout(Duration::from_secs(1), p).await;
    }
    logs::write_lines(sink, logs::APP, &format!("exited ({code})"));
    code
}

/// Creates what the routing file needs, printing the plan; a failure is reported and the
/// sidecar starts anyway (its readiness names what is missing).
async fn provision(config: &Config, env: &Env, sink: &Sink) {
    let wait = config.nats.connect_timeout.max(Duration::from_secs(1));
    let client = match crate::nats::connection::connect_now(&config.nats, &config.sidecar.service, &**env, wait).await {
        Ok(c) => c,
        Err(e) => return logs::write_lines(sink, logs::SIDECAR, &format!("provisioning skipped: {e}")),
    };
    let js = crate::nats::connection::jetstream(client.clone());
    match crate::provision::apply(&js, config, false).await {
        Ok(plan) => logs::write_lines(sink, logs::SIDECAR, &plan.to_string()),
        Err(e) => logs::write_lines(sink, logs::SIDECAR, &format!("provisioning failed: {e}")),
    }
    let _ = client.drain().await;
}
