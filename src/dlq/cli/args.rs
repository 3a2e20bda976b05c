//! The `natsbridge dlq` command line: the clap types and their value parsers.

use std::path::PathBuf;
use std::time::Duration;

use super::scan::{parse_seq_range, Filter, SeqRange};
use crate::config;
use crate::dlq::Reason;

/// `natsbridge dlq …`
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Count the dead letters per route and reason, with the oldest and newest age.
    List(ListArgs),
    /// Print each dead letter: sequence, route, reason, status, error, original subject,
    /// deliveries, time and a payload preview.
    Show(ShowArgs),
    /// Republish dead letters to their original subject with JetStream; each is deleted
    /// only after its replay is acked. Exits 1 if any replay failed.
    ///
    /// The replay carries the original payload and headers without the Bridge-Dlq-*
    /// ones, plus Bridge-Replay-Of: <dead-letter stream>/<seq>. Nats-Msg-Id becomes
    /// <original>-replay-<seq> (natsbridge-replay-<stream>-<seq> when there was none), so
    /// the original stream's duplicate window cannot swallow the replay, while a rerun of
    /// the same replay is still deduplicated.
    Replay(ReplayArgs),
    /// Delete the matching dead letters. Without --yes, only says what would be deleted
    /// and exits 1.
    Purge(PurgeArgs),
}

/// The command-line arguments that say where to connect: the routing file's `[nats]`
/// section (and route names), and the NATS URLs that override it.
#[derive(Debug, Clone, clap::Args)]
pub struct NatsArgs {
    /// The routing file: NATS connection, dead-letter stream and route names.
    #[arg(long, short, env = "NATSBRIDGE_CONFIG", default_value = "routes.toml")]
    pub config: PathBuf,
    /// NATS server URL(s), comma-separated (overrides [nats] servers).
    #[arg(long, env = "NATSBRIDGE_NATS_URL", value_delimiter = ',')]
    pub nats_url: Option<Vec<String>>,
}

/// Which dead letters a command applies to. All given filters must match.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FilterArgs {
    /// Only this inbound route's dead letters (the Bridge-Dlq-Route header).
    #[arg(long)]
    pub route: Option<String>,
    /// Only this reason: status, poison, max_deliver, app_unreachable, schema, schema-version or malformed.
    #[arg(long, value_parser = parse_reason)]
    pub reason: Option<Reason>,
    /// Only these dead-letter stream sequences, inclusive: 5..9, 5.., ..9 or 7.
    #[arg(long, value_parser = parse_seq_range)]
    pub seq: Option<SeqRange>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub filter: FilterArgs,
}

/// The dead letters a command works on, one by one: where to connect, which ones, and
/// how many.
#[derive(Debug, Clone, clap::Args)]
pub struct Selection {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// At most this many dead letters, oldest first.
    #[arg(long)]
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub select: Selection,
    /// Payload preview length, in characters (text) or bytes (binary).
    #[arg(long, default_value_t = 120)]
    pub preview: usize,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub select: Selection,
    /// Say what would be replayed, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// How long to wait for each replay's JetStream ack.
    #[arg(long, default_value = "5s", value_parser = config::parse_duration)]
    pub timeout: Duration,
    /// Replay to this subject instead of each dead letter's Bridge-Dlq-Subject. Without
    /// it, a dead letter goes back only to a subject that an inbound route or a [[streams]]
    /// entry of the routing file covers, and never to a `$…` subject: the header is only
    /// as trustworthy as whoever could publish to the dead-letter stream.
    #[arg(long, value_parser = parse_subject)]
    pub to: Option<String>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub select: Selection,
    /// Really delete.
    #[arg(long)]
    pub yes: bool,
}

fn parse_subject(s: &str) -> Result<String, String> {
    match crate::subject::SubjectPattern::parse(s) {
        Ok(p) if !p.has_wildcards() => Ok(s.to_owned()),
        Ok(_) => Err("a replay subject cannot have wildcards".into()),
        Err(e) => Err(format!("not a valid NATS subject: {e}")),
    }
}

fn parse_reason(s: &str) -> Result<Reason, String> {
    Reason::parse(s).ok_or_else(|| format!("unknown reason {s:?}; one of: {}", Reason::ALL.map(|r| r.as_str()).join(", ")))
}

impl From<&FilterArgs> for Filter {
    fn from(a: &FilterArgs) -> Self {
        Self { route: a.route.clone(), reason: a.reason, seq: a.seq }
    }
}
