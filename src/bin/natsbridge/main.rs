//! The `natsbridge` binary: parses the command line (`cli.rs`), sets up logging, binds
//! listeners, installs signal handlers, and hands everything to the library.
#![forbid(unsafe_code)]

mod cli;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use cli::{Cli, Command, DevArgs, LogArgs, LogFormat, PermissionsArgs, PermissionsFormat, ProvisionArgs, RunArgs};

/// mimalloc instead of the system allocator (the default `mimalloc` feature): glibc's
/// malloc and free took ~18% of a sidecar's instructions per request, most allocations
/// missing its per-thread cache (BENCHMARKS.md has the measurement).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use natsbridge::config::{self, Overrides};

fn init_logging(args: &LogArgs) {
    let mut filter = tracing_subscriber::EnvFilter::try_new(&args.log_level).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // async-nats' debug and info events print server URLs, credentials included
    // (`nats://user:pass@…`); the sidecar reports connection events itself. A filter that
    // names async_nats explicitly is the operator's choice.
    if !args.log_level.contains("async_nats") {
        filter = filter.add_directive("async_nats=warn".parse().expect("a valid directive"));
    }
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check_files(&config),
        Command::Graph { config, format, output } => graph(&config, &format, output.as_deref()),
        Command::Metrics => {
            for name in natsbridge::metrics::Metrics::new().names() {
                println!("{name}");
            }
            Ok(())
        }
        Command::Run(args) => {
            // Read before the runtime exists: `worker_threads` decides which runtime.
            let config = match config::load(&args.config) {
                Ok(c) => c,
                Err(e) => {
                    eprint!("{e}");
                    std::process::exit(1);
                }
            };
            let rt = sidecar_runtime(config.sidecar.worker_threads)?;
            rt.block_on(run(args, config))
        }
        Command::Inject { args, log } => {
            init_logging(&log);
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(args.listen)
                    .await
                    .with_context(|| format!("cannot bind the webhook listener on {}", args.listen))?;
                let shutdown = CancellationToken::new();
                let (reload_tx, _reload_rx) = tokio::sync::mpsc::channel(1);
                spawn_signal_handlers(shutdown.clone(), reload_tx)?;
                natsbridge::inject::run(args, listener, shutdown.cancelled_owned()).await?;
                Ok(())
            })
        }
        Command::Dlq { command } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let code = rt.block_on(natsbridge::dlq::cli::main(command, &|k| std::env::var(k).ok()));
            std::process::exit(code)
        }
        Command::Permissions(args) => permissions(args),
        Command::Dev(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let code = rt.block_on(dev(args))?;
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            std::process::exit(code)
        }
        Command::Provision(args) => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let ok = rt.block_on(provision(args))?;
            std::process::exit(if ok { 0 } else { 1 })
        }
    }
}

/// `natsbridge check FILE…`: each file on its own, then the streams they share.
/// `natsbridge graph`: every file must load; the picture, then the loose ends.
fn graph(paths: &[PathBuf], format: &str, output: Option<&std::path::Path>) -> anyhow::Result<()> {
    use natsbridge::graph::{render, Graph};
    let mut configs = Vec::new();
    for path in paths {
        match config::load(path) {
            Ok(c) => configs.push(c),
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(2);
            }
        }
    }
    let g = Graph::build(&configs);
    let format = render::Format::parse(format).expect("clap checked the format");
    let text = render::render(&g, format).map_err(anyhow::Error::msg)?;
    match output {
        Some(p) => std::fs::write(p, text)?,
        None => print!("{text}"),
    }
    for line in g.loose_end_lines() {
        eprintln!("{line}");
    }
    if !g.loose_ends.schema_mismatches.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

fn check_files(paths: &[PathBuf]) -> anyhow::Result<()> {
    let mut loaded = Vec::new();
    let mut invalid = false;
    for path in paths {
        match check(path) {
            Some(c) => loaded.push((path.display().to_string(), c)),
            None => invalid = true,
        }
    }
    let files: Vec<(String, &config::Config)> = loaded.iter().map(|(p, c)| (p.clone(), c)).collect();
    let conflicts = natsbridge::provision::conflicts(&files);
    for c in &conflicts {
        eprintln!("error: {c}");
    }
    if invalid || !conflicts.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

/// Validates one file and prints its table; `None` (diagnostics printed) when invalid.
fn check(path: &std::path::Path) -> Option<config::Config> {
    match config::load(path) {
        Ok(c) => {
            println!("{}: ok (service {:?})", path.display(), c.sidecar.service);
            if !c.outbound.is_empty() {
                println!("\noutbound routes:");
                for r in &c.outbound {
                    let target = match &r.target {
                        config::OutboundTarget::Request(t) | config::OutboundTarget::Publish(t) | config::OutboundTarget::JetStream(t) => {
                            t.as_str().to_owned()
                        }
                        config::OutboundTarget::Tunnel { subject, .. } => subject.clone(),
                        config::OutboundTarget::Http { upstream } => upstream.to_string(),
                        config::OutboundTarget::Subscribe(s) => s.subject.as_str().to_owned(),
                    };
                    println!(
                        "  {:<24} {:<7} {:<20} {:<36} {:<9} -> {}",
                        r.name,
                        r.method.as_ref().map(|m| m.as_str()).unwrap_or("*"),
                        r.host.as_deref().unwrap_or("*"),
                        r.path,
                        r.mode().as_str(),
                        target
                    );
                }
            }
            if !c.inbound.is_empty() {
                println!("\ninbound routes:");
                for r in &c.inbound {
                    println!(
                        "  {:<24} {:<9} {:<36} -> {} {}",
                        r.name,
                        r.mode_name().as_str(),
                        r.subject.as_str(),
                        r.method,
                        r.path.as_str()
                    );
                }
            }
            if !c.streams.is_empty() {
                println!("\nstreams:");
                for s in &c.streams {
                    let subjects = s.subjects.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", ");
                    println!(
                        "  {:<24} {}",
                        s.name,
                        if s.reference { "(reference: settings owned by another routes file)" } else { &subjects }
                    );
                }
            }
            for w in &c.warnings {
                println!("warning: {w}");
            }
            Some(c)
        }
        Err(e) => {
            eprint!("{e}");
            None
        }
    }
}

/// `natsbridge permissions`: every file must be valid, and service names distinct (one
/// user each).
fn permissions(args: PermissionsArgs) -> anyhow::Result<()> {
    use natsbridge::permissions::{self, render};
    let mut perms = Vec::new();
    let mut invalid = false;
    for file in &args.files {
        match config::load(file) {
            Ok(c) => perms.push((file.display().to_string(), permissions::for_config(&c))),
            Err(e) => {
                eprint!("{e}");
                invalid = true;
            }
        }
    }
    if invalid {
        std::process::exit(1);
    }
    let mut seen = std::collections::BTreeMap::new();
    for (file, p) in &perms {
        if let Some(first) = seen.insert(p.service.clone(), file.clone()) {
            anyhow::bail!("service {:?} is in both {first} and {file}: each service is one NATS user", p.service);
        }
    }
    let password = match args.password_env {
        Some(t) if perms.len() > 1 && !t.contains("{SERVICE}") => {
            anyhow::bail!("--password-env {t:?} must contain {{SERVICE}} when there are several services (one password each)")
        }
        Some(t) => render::Password::Env(t),
        None => render::Password::Placeholder,
    };
    match args.format {
        PermissionsFormat::Conf => print!("{}", render::nats_conf(&perms, &password)),
        PermissionsFormat::Nsc => print!("{}", render::nsc(&perms, args.account.as_deref())),
        PermissionsFormat::HelmValues => print!("{}", render::helm_values(&perms)),
    }
    Ok(())
}

/// `natsbridge provision`: true when nothing was refused and nothing failed.
async fn provision(args: ProvisionArgs) -> anyhow::Result<bool> {
    use natsbridge::provision;
    let mut config = match config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprint!("{e}");
            return Ok(false);
        }
    };
    config.apply(&Overrides { nats_servers: args.nats_url, ..Default::default() });
    for w in &config.warnings {
        eprintln!("warning: {w}");
    }
    let env = |k: &str| std::env::var(k).ok();
    let wait = config.nats.connect_timeout.max(std::time::Duration::from_secs(1));
    let client = match natsbridge::nats::connection::connect_now(&config.nats, &config.sidecar.service, &env, wait).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(false);
        }
    };
    let js = natsbridge::nats::connection::jetstream(client.clone());
    let result =
        if args.dry_run { provision::plan_with(&js, &config, args.force).await } else { provision::apply(&js, &config, args.force).await };
    let mut plan = match result {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(false);
        }
    };
    if args.prune {
        match provision::prune(&js, &config, args.force, args.dry_run).await {
            Ok(pruned) => plan.items.extend(pruned.items),
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(false);
            }
        }
    }
    print!("{plan}");
    let _ = client.drain().await;
    let refused = plan.refused().count();
    let failed = plan.failed().count();
    if refused > 0 {
        eprintln!(
            "error: {refused} change{} refused; review the reasons above and rerun with --force to make them",
            if refused == 1 { "" } else { "s" }
        );
    }
    if failed > 0 {
        eprintln!("error: {failed} change{} failed", if failed == 1 { "" } else { "s" });
    }
    Ok(plan.is_ok())
}

/// One thread (the default): a current-thread runtime, so a request, its NATS
/// connection's I/O and its reply never hop between threads. More: that many workers.
fn sidecar_runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    }
}

/// The egress and admin listeners, on the addresses the routing file and flags settled on.
async fn bind_listeners(sidecar: &config::Sidecar) -> anyhow::Result<(tokio::net::TcpListener, tokio::net::TcpListener)> {
    let egress = tokio::net::TcpListener::bind(sidecar.listen)
        .await
        .with_context(|| format!("cannot bind the egress listener on {}", sidecar.listen))?;
    let admin = tokio::net::TcpListener::bind(sidecar.admin_listen)
        .await
        .with_context(|| format!("cannot bind the admin listener on {}", sidecar.admin_listen))?;
    Ok((egress, admin))
}

async fn run(args: RunArgs, config: config::Config) -> anyhow::Result<()> {
    init_logging(&args.log);
    let overrides = args.overrides();
    let mut effective = config.clone();
    effective.apply(&overrides);
    let (egress, admin) = bind_listeners(&effective.sidecar).await?;

    let shutdown = CancellationToken::new();
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
    spawn_signal_handlers(shutdown.clone(), reload_tx)?;

    natsbridge::sidecar::run(natsbridge::sidecar::Parts {
        config,
        overrides,
        egress,
        admin,
        env: Arc::new(|k| std::env::var(k).ok()),
        reload: reload_rx,
        shutdown,
    })
    .await?;
    Ok(())
}

/// `natsbridge dev`: the edge reads the environment, binds the listeners and installs the
/// signal handlers; `natsbridge::dev` does the rest.
async fn dev(args: DevArgs) -> anyhow::Result<i32> {
    let DevArgs { run: args, command } = args;
    let sink: natsbridge::dev::logs::Sink = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let mut filter =
        tracing_subscriber::EnvFilter::try_new(&args.log.log_level).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if !args.log.log_level.contains("async_nats") {
        filter = filter.add_directive("async_nats=warn".parse().expect("a valid directive"));
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(natsbridge::dev::logs::SidecarWriter(sink.clone()))
        .init();
    let mut config = match config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprint!("{e}");
            return Ok(1);
        }
    };
    let overrides = args.overrides();
    config.apply(&overrides);
    let (egress, admin) = bind_listeners(&config.sidecar).await?;
    let nats_server_bin = std::env::var_os("NATS_SERVER_BIN")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .or_else(|| std::env::var_os("PATH").and_then(|p| natsbridge::dev::nats::find_on_path(&p)));
    let shutdown = CancellationToken::new();
    let (reload_tx, _reload_rx) = tokio::sync::mpsc::channel(1);
    spawn_signal_handlers(shutdown.clone(), reload_tx)?;
    let dev = natsbridge::dev::Dev {
        config,
        overrides,
        egress,
        admin,
        nats_server_bin,
        command,
        env: Arc::new(|k| std::env::var(k).ok()),
        sink,
        shutdown,
    };
    Ok(natsbridge::dev::run(dev).await?)
}

fn spawn_signal_handlers(shutdown: CancellationToken, reload: tokio::sync::mpsc::Sender<()>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining (a second signal exits at once)"),
            _ = int.recv() => tracing::info!("SIGINT: draining (a second signal exits at once)"),
        }
        shutdown.cancel();
        // The operator (or a second Ctrl-C) does not want to wait for the drain: unacked
        // messages are redelivered, callers in flight see their connection close.
        let code = tokio::select! {
            _ = term.recv() => 128 + 15,
            _ = int.recv() => 128 + 2,
        };
        tracing::warn!("second signal: exiting without finishing the drain");
        std::process::exit(code);
    });
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the routing file");
            let _ = reload.send(()).await;
        }
    });
    Ok(())
}
