//! The command line: every subcommand and flag, as clap types. What each does lives in
//! `main.rs`; this file only says what the user may type.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use natsbridge::config;

#[derive(Parser)]
#[command(name = "natsbridge", version, about = "A sidecar that moves HTTP services onto NATS and JetStream one route at a time")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run the sidecar: egress listener, inbound routes, admin endpoints.
    ///
    /// SIGTERM or SIGINT stops it within one `drain_timeout`: inbound routes stop taking
    /// messages first, in-flight handlers finish while egress still serves their calls,
    /// then egress drains and NATS is flushed. A second signal exits at once. SIGHUP
    /// reloads the routing file.
    ///
    /// The egress listener is also a forward proxy for an app run with
    /// HTTP_PROXY/HTTPS_PROXY pointing at it: calls no route takes go to their origin
    /// (`[sidecar] unmatched = "forward"`, or "reject" for 404), CONNECT becomes a TCP
    /// tunnel (`connect_allow`), and WebSocket upgrades pass through.
    Run(RunArgs),
    /// Validate routing files, print their route tables, and exit (1 on any error).
    ///
    /// Given several files (the services sharing one NATS account), also reports streams
    /// that two of them own with different settings: one file owns a stream's settings,
    /// the others declare it with `reference = true`.
    Check {
        /// The routing files.
        #[arg(required = true)]
        config: Vec<PathBuf>,
    },
    /// Draw the event flows of several services' routing files: who requests, publishes
    /// or consumes each subject, through which stream, with dead-letter edges and each
    /// edge's mode, codec and contract versions.
    ///
    /// Loose ends go to stderr: subjects sent on but consumed by nobody, consumed but
    /// produced by nobody, streams without a consumer (warnings), and producer and
    /// consumer routes whose contract versions disagree (errors: exit 1).
    Graph {
        /// The routing files, one per service.
        #[arg(required = true)]
        config: Vec<PathBuf>,
        /// mermaid (for READMEs), dot (Graphviz), svg (drawn in-process) or json.
        #[arg(long, default_value = "mermaid", value_parser = ["mermaid", "dot", "svg", "json"])]
        format: String,
        /// Write here instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Print every metric family the binary exports, one per line.
    Metrics,
    /// Create or update the streams, consumers and KV bucket the routing file needs.
    ///
    /// Prints the plan: each stream, dead-letter stream, consumer and KV bucket as created,
    /// updated (field by field), unchanged, refused or failed. Exits 1 when a change was
    /// refused (destructive or impossible without --force) or failed.
    Provision(ProvisionArgs),
    /// Serve the Kubernetes mutating admission webhook that injects the sidecar.
    Inject {
        #[command(flatten)]
        args: natsbridge::inject::InjectArgs,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Print the NATS permissions each service's sidecar needs (least privilege).
    ///
    /// For each routing file: publish and subscribe allow-lists covering its route
    /// subjects, reply inboxes, the JetStream API of its streams and consumers, the
    /// idempotency bucket and the dead-letter stream (and provisioning's only when it
    /// provisions). Printed as a nats-server `authorization { users = [...] }` block, one
    /// user per service named after it, with `--format helm-values` as the chart's
    /// `nats.auth.users` values, or with `--format nsc` as `nsc add user` / `nsc edit user
    /// --allow-pub/--allow-sub` commands for operator mode.
    Permissions(PermissionsArgs),
    /// The local loop, like `dapr run`: `natsbridge dev --config routes.toml -- <app command>`.
    ///
    /// Starts a nats-server (from NATS_SERVER_BIN or PATH; scripts/install-nats-server
    /// installs one) when none answers at the configured URL, provisions, runs the sidecar
    /// and the app command with HTTP_PROXY and NATSBRIDGE_URL at the sidecar and PORT from
    /// `app_url`. The three logs are prefixed `[nats] `, `[sidecar] `, `[app] `. Exits
    /// with the app; Ctrl-C stops what it started (a nats-server that was already running
    /// is left alone).
    Dev(DevArgs),
    /// Inspect, replay and purge dead letters, while sidecars run.
    Dlq {
        #[command(subcommand)]
        command: natsbridge::dlq::cli::Command,
    },
}

#[derive(clap::Args)]
pub(crate) struct ProvisionArgs {
    /// The routing file.
    #[arg(long, short, env = "NATSBRIDGE_CONFIG", default_value = "routes.toml")]
    pub(crate) config: PathBuf,
    /// Print the plan without changing anything.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Make destructive changes too: delete and recreate what cannot change in place
    /// (losing its messages), remove subjects, lower limits.
    #[arg(long)]
    pub(crate) force: bool,
    /// Also delete the durable consumers this service owns (by the `natsbridge.service`
    /// metadata provisioning sets, never by name) whose routes are gone. One still holding
    /// messages is refused unless --force; --dry-run shows what would go.
    #[arg(long)]
    pub(crate) prune: bool,
    /// NATS server URL(s), comma-separated (overrides [nats] servers).
    #[arg(long, env = "NATSBRIDGE_NATS_URL", value_delimiter = ',', value_parser = config::parse_server_url)]
    pub(crate) nats_url: Option<Vec<String>>,
}

#[derive(clap::Args)]
pub(crate) struct PermissionsArgs {
    /// The services' routing files (one user each; service names must differ).
    #[arg(required = true)]
    pub(crate) files: Vec<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = PermissionsFormat::Conf)]
    pub(crate) format: PermissionsFormat,
    /// Read each user's password from this environment variable of the nats-server
    /// (written unquoted as `$NAME`); `{SERVICE}` becomes the service name in upper snake
    /// case, e.g. `NATS_PASSWORD_{SERVICE}`. Without it a placeholder is written.
    #[arg(long, value_name = "NAME")]
    pub(crate) password_env: Option<String>,
    /// `--format nsc`: the account the users belong to (else nsc's current account).
    #[arg(long)]
    pub(crate) account: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum PermissionsFormat {
    /// A nats-server `authorization` block.
    Conf,
    /// `nsc` commands (operator mode).
    Nsc,
    /// The Helm chart's `nats.auth.users` values (passwords stay in the chart's Secrets).
    HelmValues,
}

#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// The routing file.
    #[arg(long, short, env = "NATSBRIDGE_CONFIG", default_value = "routes.toml")]
    pub(crate) config: PathBuf,
    /// Egress listener address (overrides [sidecar] listen).
    #[arg(long, env = "NATSBRIDGE_LISTEN")]
    pub(crate) listen: Option<SocketAddr>,
    /// Admin listener address (overrides [sidecar] admin_listen).
    #[arg(long, env = "NATSBRIDGE_ADMIN_LISTEN")]
    pub(crate) admin_listen: Option<SocketAddr>,
    /// NATS server URL(s), comma-separated (overrides [nats] servers).
    #[arg(long, env = "NATSBRIDGE_NATS_URL", value_delimiter = ',', value_parser = config::parse_server_url)]
    pub(crate) nats_url: Option<Vec<String>>,
    /// The local app's base URL (overrides [sidecar] app_url).
    #[arg(long, env = "NATSBRIDGE_APP_URL", value_parser = config::parse_http_url)]
    pub(crate) app_url: Option<http::Uri>,
    /// PEM CA that verifies the NATS servers (overrides [nats.tls] ca_file); the injector
    /// sets it when the chart's NATS TLS is on.
    #[arg(long, env = "NATSBRIDGE_NATS_CA_FILE")]
    pub(crate) nats_ca_file: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) log: LogArgs,
}

#[derive(clap::Args)]
pub(crate) struct DevArgs {
    #[command(flatten)]
    pub(crate) run: RunArgs,
    /// The app command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    pub(crate) command: Vec<String>,
}

#[derive(clap::Args)]
pub(crate) struct LogArgs {
    /// Log format.
    #[arg(long, env = "NATSBRIDGE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
    /// Log filter, e.g. `info` or `natsbridge=debug`. async_nats is held at warn (its
    /// events print server URLs, credentials included) unless the filter names it.
    #[arg(long, env = "NATSBRIDGE_LOG_LEVEL", default_value = "info")]
    pub(crate) log_level: String,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

impl RunArgs {
    /// What the flags (and their environment variables) set over the routing file.
    pub(crate) fn overrides(&self) -> config::Overrides {
        config::Overrides {
            listen: self.listen,
            admin_listen: self.admin_listen,
            nats_servers: self.nats_url.clone(),
            app_url: self.app_url.clone(),
            nats_ca_file: self.nats_ca_file.clone(),
        }
    }
}
