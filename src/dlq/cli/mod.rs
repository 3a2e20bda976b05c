//! `natsbridge dlq`: operator tooling over the dead-letter stream, safe to run while
//! sidecars are publishing to it.
//!
//! - `list` counts dead letters per route and reason, with their age;
//! - `show` prints each one: why it died, where it came from, a payload preview;
//! - `replay` republishes each one to its original subject with JetStream and deletes the
//!   dead letter only once the replay is acked;
//! - `purge` deletes them (only with `--yes`).
//!
//! Reads stream through the dead-letter stream with an ephemeral ordered consumer, from the
//! first sequence of `--seq` up to the stream's last sequence when the command started (dead
//! letters that arrive meanwhile are left for the next run), headers only where the payload
//! is not needed. Nothing is held in memory but the current message, plus the selected
//! sequence numbers for `replay` and `purge`.
//!
//! The selection and formatting logic is pure and unit-tested here; the commands are tested
//! end to end in `tests/dlq_cli.rs`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer::DeliverPolicy, stream::Stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;

use super::{Reason, CONSUMER, DELIVERIES, ERROR, HEADERS, REASON, ROUTE, SEQ, STATUS, STREAM, SUBJECT, TIME};
use crate::config::{self, Config, Overrides};
use crate::nats::connection::EnvLookup;

/// Added to a replayed message: the dead letter it came from, `<DLQ stream>/<seq>`.
pub const REPLAY_OF: &str = "Bridge-Replay-Of";
const NATS_MSG_ID: &str = crate::codec::NATS_MSG_ID;
/// Set by the server on headers-only deliveries: the size of the payload left out.
const NATS_MSG_SIZE: &str = "Nats-Msg-Size";

// ---------------------------------------------------------------------------------------
// Command line

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

/// Where to connect: the routing file's `[nats]` section and route names.
#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
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
    /// Only this reason: status, poison, max_deliver or app_unreachable.
    #[arg(long, value_parser = parse_reason)]
    pub reason: Option<Reason>,
    /// Only these dead-letter stream sequences, inclusive: 5..9, 5.., ..9 or 7.
    #[arg(long, value_parser = parse_seq_range)]
    pub seq: Option<SeqRange>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub connection: Connection,
    #[command(flatten)]
    pub filter: FilterArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub connection: Connection,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// At most this many dead letters, oldest first.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Payload preview length, in characters (text) or bytes (binary).
    #[arg(long, default_value_t = 120)]
    pub preview: usize,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub connection: Connection,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// At most this many dead letters, oldest first.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Say what would be replayed, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// How long to wait for each replay's JetStream ack.
    #[arg(long, default_value = "5s", value_parser = config::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, clap::Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub connection: Connection,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// At most this many dead letters, oldest first.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Really delete.
    #[arg(long)]
    pub yes: bool,
}

fn parse_reason(s: &str) -> Result<Reason, String> {
    Reason::parse(s).ok_or_else(|| format!("unknown reason {s:?}; one of: {}", Reason::ALL.map(|r| r.as_str()).join(", ")))
}

// ---------------------------------------------------------------------------------------
// Selection (pure)

/// An inclusive range of dead-letter stream sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqRange {
    pub first: u64,
    pub last: u64,
}

impl SeqRange {
    pub const ALL: SeqRange = SeqRange { first: 1, last: u64::MAX };

    pub fn contains(&self, seq: u64) -> bool {
        (self.first..=self.last).contains(&seq)
    }
}

/// `5..9` (both included), `5..`, `..9`, `7`; `5..=9` is accepted too.
pub fn parse_seq_range(s: &str) -> Result<SeqRange, String> {
    let num = |t: &str, what: &str| -> Result<u64, String> {
        let t = t.trim();
        t.parse::<u64>().map_err(|_| format!("{what} {t:?} in {s:?} is not a sequence number"))
    };
    let range = match s.split_once("..") {
        None => {
            let n = num(s, "sequence")?;
            SeqRange { first: n, last: n }
        }
        Some((a, b)) => {
            let b = b.strip_prefix('=').unwrap_or(b);
            let first = if a.trim().is_empty() { 1 } else { num(a, "start")? };
            let last = if b.trim().is_empty() { u64::MAX } else { num(b, "end")? };
            SeqRange { first, last }
        }
    };
    if range.first == 0 {
        return Err(format!("{s:?}: stream sequences start at 1"));
    }
    if range.first > range.last {
        return Err(format!("{s:?}: the start is after the end"));
    }
    Ok(range)
}

/// One dead letter as read from the stream.
#[derive(Debug, Clone)]
pub struct Letter {
    /// Its sequence in the dead-letter stream.
    pub seq: u64,
    /// When the dead-letter stream stored it.
    pub stored: SystemTime,
    pub headers: HeaderMap,
    /// Empty when read headers-only.
    pub payload: Bytes,
    /// The payload's size (known on headers-only reads too).
    pub size: usize,
}

impl Letter {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.as_str())
    }
    pub fn route(&self) -> &str {
        self.header(ROUTE).unwrap_or("-")
    }
    pub fn reason(&self) -> &str {
        self.header(REASON).unwrap_or("-")
    }
    /// The subject a replay goes to.
    pub fn subject(&self) -> Option<&str> {
        self.header(SUBJECT).filter(|s| !s.is_empty())
    }
    /// When it was dead-lettered: `Bridge-Dlq-Time`, else when the stream stored it.
    pub fn time(&self) -> SystemTime {
        self.header(TIME).and_then(|t| humantime::parse_rfc3339_weak(t).ok()).unwrap_or(self.stored)
    }
}

/// The filters, resolved.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub route: Option<String>,
    pub reason: Option<Reason>,
    pub seq: Option<SeqRange>,
}

impl From<&FilterArgs> for Filter {
    fn from(a: &FilterArgs) -> Self {
        Self { route: a.route.clone(), reason: a.reason, seq: a.seq }
    }
}

impl Filter {
    pub fn range(&self) -> SeqRange {
        self.seq.unwrap_or(SeqRange::ALL)
    }

    pub fn matches(&self, l: &Letter) -> bool {
        self.range().contains(l.seq)
            && self.route.as_deref().is_none_or(|r| l.header(ROUTE) == Some(r))
            && self.reason.is_none_or(|r| l.header(REASON) == Some(r.as_str()))
    }

    /// "route tool-exec, reason poison, seq 5..9", or "all".
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(r) = &self.route {
            parts.push(format!("route {r}"));
        }
        if let Some(r) = self.reason {
            parts.push(format!("reason {r}"));
        }
        if let Some(s) = self.seq {
            parts.push(match (s.first, s.last) {
                (a, b) if a == b => format!("seq {a}"),
                (a, u64::MAX) => format!("seq {a}.."),
                (a, b) => format!("seq {a}..{b}"),
            });
        }
        if parts.is_empty() {
            "all".into()
        } else {
            parts.join(", ")
        }
    }
}

/// The warning for a `--route` that names no inbound route of the routing file.
pub fn unknown_route_warning(route: &str, known: &[&str]) -> Option<String> {
    if known.contains(&route) {
        return None;
    }
    let names = if known.is_empty() { "none".to_owned() } else { known.join(", ") };
    Some(format!("route {route:?} is not an inbound route in the routing file (inbound routes: {names}); matching Bridge-Dlq-Route anyway"))
}

// ---------------------------------------------------------------------------------------
// Formatting (pure)

/// A compact age: `0s`, `45s`, `5m`, `5m12s`, `2h`, `2h3m`, `3d`, `3d4h`.
pub fn format_age(d: Duration) -> String {
    let s = d.as_secs();
    let (big, big_unit, small, small_unit) = match s {
        0..60 => return format!("{s}s"),
        60..3600 => (s / 60, "m", s % 60, "s"),
        3600..86400 => (s / 3600, "h", s % 3600 / 60, "m"),
        _ => (s / 86400, "d", s % 86400 / 3600, "h"),
    };
    if small == 0 {
        format!("{big}{big_unit}")
    } else {
        format!("{big}{big_unit}{small}{small_unit}")
    }
}

/// How long ago `t` was (zero if it is in the future: clock skew).
pub fn age(now: SystemTime, t: SystemTime) -> Duration {
    now.duration_since(t).unwrap_or_default()
}

/// A one-line payload preview. Text (valid UTF-8 without control characters other than
/// tab, CR and LF) is shown with those escaped, cut to `max` characters; anything else as
/// hex of its first `max / 3` bytes (at least 8). Both say the size.
pub fn preview(payload: &[u8], max: usize) -> String {
    if payload.is_empty() {
        return "(empty)".into();
    }
    let size = format_size(payload.len());
    match std::str::from_utf8(payload) {
        Ok(text) if !text.chars().any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t')) => {
            let mut out = String::new();
            for c in text.chars().take(max) {
                match c {
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c => out.push(c),
                }
            }
            let cut = text.chars().nth(max).is_some();
            format!("{out}{} ({size})", if cut { "…" } else { "" })
        }
        _ => {
            let n = (max / 3).max(8).min(payload.len());
            let hex: Vec<String> = payload[..n].iter().map(|b| format!("{b:02x}")).collect();
            format!("binary, {size}: {}{}", hex.join(" "), if n < payload.len() { " …" } else { "" })
        }
    }
}

/// `1 byte`, `512 bytes`, `2.0 KiB`, `3.5 MiB`.
pub fn format_size(n: usize) -> String {
    match n {
        1 => "1 byte".into(),
        0..1024 => format!("{n} bytes"),
        1024..1048576 => format!("{:.1} KiB", n as f64 / 1024.0),
        _ => format!("{:.1} MiB", n as f64 / 1048576.0),
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Counts and ages of a group of dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub count: u64,
    pub oldest: SystemTime,
    pub newest: SystemTime,
    pub first_seq: u64,
    pub last_seq: u64,
}

impl Stat {
    fn new(seq: u64, t: SystemTime) -> Self {
        Self { count: 1, oldest: t, newest: t, first_seq: seq, last_seq: seq }
    }
    fn add(&mut self, seq: u64, t: SystemTime) {
        self.count += 1;
        self.oldest = self.oldest.min(t);
        self.newest = self.newest.max(t);
        self.first_seq = self.first_seq.min(seq);
        self.last_seq = self.last_seq.max(seq);
    }
    fn merge(&mut self, o: &Stat) {
        self.count += o.count;
        self.oldest = self.oldest.min(o.oldest);
        self.newest = self.newest.max(o.newest);
        self.first_seq = self.first_seq.min(o.first_seq);
        self.last_seq = self.last_seq.max(o.last_seq);
    }
    /// "3 messages, oldest 2h, newest 5m"
    pub fn describe(&self, now: SystemTime) -> String {
        format!(
            "{}, oldest {}, newest {}",
            plural(self.count, "message", "messages"),
            format_age(age(now, self.oldest)),
            format_age(age(now, self.newest))
        )
    }
}

/// Dead letters counted per route, then per reason.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub routes: BTreeMap<String, BTreeMap<String, Stat>>,
}

impl Summary {
    pub fn add(&mut self, l: &Letter) {
        let (seq, t) = (l.seq, l.time());
        self.routes
            .entry(l.route().to_owned())
            .or_default()
            .entry(l.reason().to_owned())
            .and_modify(|s| s.add(seq, t))
            .or_insert_with(|| Stat::new(seq, t));
    }

    pub fn total(&self) -> u64 {
        self.routes.values().flat_map(|r| r.values()).map(|s| s.count).sum()
    }

    fn route_stat(reasons: &BTreeMap<String, Stat>) -> Option<Stat> {
        let mut it = reasons.values();
        let mut acc = *it.next()?;
        for s in it {
            acc.merge(s);
        }
        Some(acc)
    }

    /// One line per route ("tool-exec: 3 messages, oldest 2h, newest 5m"), then one per
    /// reason, indented, with the sequence span. Routes the routing file does not name are
    /// marked.
    pub fn render(&self, now: SystemTime, known_routes: &[&str]) -> String {
        let mut out = String::new();
        let width = self.routes.keys().map(|r| r.len()).chain(Reason::ALL.iter().map(|r| r.as_str().len() + 2)).max().unwrap_or(0) + 2;
        for (route, reasons) in &self.routes {
            let Some(total) = Self::route_stat(reasons) else { continue };
            let mark = if known_routes.contains(&route.as_str()) { "" } else { "  (not in the routing file)" };
            let _ = writeln!(out, "{:<width$}{}{mark}", format!("{route}:"), total.describe(now));
            for (reason, s) in reasons {
                let span =
                    if s.first_seq == s.last_seq { format!("seq {}", s.first_seq) } else { format!("seq {}..{}", s.first_seq, s.last_seq) };
                let _ = writeln!(out, "  {:<w$}{}  ({span})", format!("{reason}:"), s.describe(now), w = width - 2);
            }
        }
        out
    }
}

/// The `show` block for one dead letter.
pub fn render_letter(l: &Letter, now: SystemTime, preview_len: usize) -> String {
    let mut out = String::new();
    let h = |n| l.header(n).unwrap_or("-");
    let _ = writeln!(out, "seq {}  route {}  reason {}  status {}  deliveries {}", l.seq, l.route(), l.reason(), h(STATUS), h(DELIVERIES));
    let origin = match (l.header(STREAM), l.header(SEQ)) {
        (Some(st), Some(sq)) => {
            format!("  (stream {st} seq {sq}{})", l.header(CONSUMER).map(|c| format!(", consumer {c}")).unwrap_or_default())
        }
        _ => String::new(),
    };
    let _ = writeln!(out, "  subject:  {}{origin}", l.subject().unwrap_or("-"));
    let t = l.time();
    let _ = writeln!(out, "  time:     {} ({} ago)", humantime::format_rfc3339_millis(t), format_age(age(now, t)));
    if let Some(e) = l.header(ERROR) {
        let _ = writeln!(out, "  error:    {e}");
    }
    let _ = writeln!(out, "  payload:  {}", preview(&l.payload, preview_len));
    out
}

// ---------------------------------------------------------------------------------------
// Replay headers (pure)

/// The replay's `Nats-Msg-Id`: never the original's, which the original stream's duplicate
/// window (2 minutes by default) would silently drop as a duplicate when the message died
/// quickly; but stable per dead letter, so a rerun after a crash between the replay's ack
/// and the dead letter's deletion is deduplicated. A replay of a replay replaces the
/// earlier `-replay-N` suffix instead of stacking them.
pub fn replay_msg_id(original: Option<&str>, dlq_stream: &str, dlq_seq: u64) -> String {
    match original.map(str::trim).filter(|s| !s.is_empty()) {
        Some(id) => {
            let base = match id.rsplit_once("-replay-") {
                Some((base, n)) if !base.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => base,
                _ => id,
            };
            format!("{base}-replay-{dlq_seq}")
        }
        None => format!("natsbridge-replay-{dlq_stream}-{dlq_seq}"),
    }
}

/// The replay's headers: the dead letter's, minus every `Bridge-Dlq-*` one and the
/// original publish's preconditions (`Nats-Expected-*`, which no longer hold), with
/// `Nats-Msg-Id` from [`replay_msg_id`] and [`REPLAY_OF`] set.
pub fn replay_headers(dead: &HeaderMap, dlq_stream: &str, dlq_seq: u64) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut original_id = None;
    for (name, values) in dead.iter() {
        let n: &str = name.as_ref();
        if n.eq_ignore_ascii_case(NATS_MSG_ID) {
            original_id = values.first().map(|v| v.as_str().to_owned());
            continue;
        }
        let drop = HEADERS.iter().any(|d| d.eq_ignore_ascii_case(n))
            || n.len() >= 11 && n[..11].eq_ignore_ascii_case("Bridge-Dlq-")
            || n.len() >= 13 && n[..13].eq_ignore_ascii_case("Nats-Expected")
            || n.eq_ignore_ascii_case(REPLAY_OF)
            || n.eq_ignore_ascii_case(NATS_MSG_SIZE);
        if drop {
            continue;
        }
        for v in values {
            h.append(name.clone(), v.clone());
        }
    }
    h.insert(NATS_MSG_ID, replay_msg_id(original_id.as_deref(), dlq_stream, dlq_seq).as_str());
    h.insert(REPLAY_OF, format!("{dlq_stream}/{dlq_seq}").as_str());
    h
}

/// replayed / failed / skipped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub replayed: u64,
    pub failed: u64,
    pub skipped: u64,
}

impl Tally {
    pub fn done(&self) -> u64 {
        self.replayed + self.failed + self.skipped
    }
}

/// `[#########...........]  9/20  replayed 8  failed 1  skipped 0`
pub fn progress_line(t: &Tally, total: u64, width: usize) -> String {
    let done = t.done().min(total);
    let filled = if total == 0 { width } else { (done as u128 * width as u128 / total as u128) as usize };
    format!(
        "[{}{}] {done}/{total}  replayed {}  failed {}  skipped {}",
        "#".repeat(filled),
        ".".repeat(width - filled),
        t.replayed,
        t.failed,
        t.skipped
    )
}

/// A progress bar on stderr, drawn only when stderr is a terminal; result lines go to
/// stdout either way, so logs and tests see every outcome.
struct Progress {
    total: u64,
    tty: bool,
}

impl Progress {
    fn new(total: u64) -> Self {
        Self { total, tty: std::io::stderr().is_terminal() }
    }
    fn clear(&self) {
        if self.tty {
            eprint!("\r\x1b[2K");
        }
    }
    fn draw(&self, t: &Tally) {
        if self.tty {
            eprint!("\r\x1b[2K{}", progress_line(t, self.total, 30));
            let _ = std::io::stderr().flush();
        }
    }
    fn say(&self, t: &Tally, line: &str) {
        self.clear();
        println!("{line}");
        let _ = std::io::stdout().flush();
        self.draw(t);
    }
    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Reading the stream

/// How long a read may wait for the next message before checking whether any is left.
const IDLE_CHECK: Duration = Duration::from_secs(2);
/// ...and how long it waits at most when some is.
const IDLE_GIVE_UP: Duration = Duration::from_secs(30);

/// Streams the dead letters of `range` in sequence order, stopping at the stream's last
/// sequence when it was opened.
pub struct Scanner {
    stream: Stream,
    messages: Option<jetstream::consumer::pull::Ordered>,
    /// The ephemeral consumer's name, deleted when done rather than left to expire.
    consumer: Option<String>,
    /// The last sequence to read: min(range end, the stream's last sequence at open).
    end: u64,
    last_seen: u64,
    done: bool,
}

impl Scanner {
    pub async fn open(stream: &Stream, range: SeqRange, headers_only: bool) -> anyhow::Result<Self> {
        let info = stream
            .get_info()
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the dead-letter stream {:?}: {e}", stream.cached_info().config.name))?;
        let state = &info.state;
        let end = range.last.min(state.last_sequence);
        let start = range.first.max(state.first_sequence);
        let mut s = Self {
            stream: stream.clone(),
            messages: None,
            consumer: None,
            end,
            last_seen: start.saturating_sub(1),
            done: state.messages == 0 || start > end,
        };
        if !s.done {
            let consumer = stream
                .create_consumer(jetstream::consumer::pull::OrderedConfig {
                    description: Some("natsbridge dlq".into()),
                    deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: start },
                    headers_only,
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow::anyhow!("cannot read the dead-letter stream: {e}"))?;
            s.consumer = Some(consumer.cached_info().name.clone());
            s.messages = Some(consumer.messages().await.map_err(|e| anyhow::anyhow!("cannot read the dead-letter stream: {e}"))?);
        }
        Ok(s)
    }

    /// Is any message left in (last_seen, end]? Deletions while reading (another operator,
    /// a max_age) can leave the consumer waiting for messages that will never come.
    async fn any_left(&self) -> anyhow::Result<bool> {
        match self.stream.get_first_raw_message_by_subject(">", self.last_seen + 1).await {
            Ok(m) => Ok(m.sequence <= self.end),
            Err(e) if matches!(e.kind(), jetstream::stream::RawMessageErrorKind::NoMessageFound) => Ok(false),
            Err(e) => Err(anyhow::anyhow!("cannot read the dead-letter stream: {e}")),
        }
    }

    /// Stops pulling and deletes the ephemeral consumer (best effort: it also expires on
    /// its own after 30 s of inactivity).
    async fn finish(&mut self) {
        self.done = true;
        self.messages = None;
        if let Some(name) = self.consumer.take() {
            let _ = self.stream.delete_consumer(&name).await;
        }
    }

    pub async fn next(&mut self) -> anyhow::Result<Option<Letter>> {
        let started = tokio::time::Instant::now();
        loop {
            if self.done {
                self.finish().await;
                return Ok(None);
            }
            let Some(messages) = self.messages.as_mut() else { return Ok(None) };
            let m = match tokio::time::timeout(IDLE_CHECK, messages.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => return Err(anyhow::anyhow!("reading the dead-letter stream failed: {e}")),
                Ok(None) => {
                    self.finish().await;
                    return Ok(None);
                }
                Err(_) => {
                    if !self.any_left().await? {
                        self.finish().await;
                        return Ok(None);
                    }
                    if started.elapsed() > IDLE_GIVE_UP {
                        return Err(anyhow::anyhow!("the dead-letter stream stopped yielding after seq {}", self.last_seen));
                    }
                    continue;
                }
            };
            let info = m.info().map_err(|e| anyhow::anyhow!("a dead-letter delivery without metadata: {e}"))?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            let stored = SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(0));
            if seq > self.end {
                self.finish().await;
                return Ok(None);
            }
            self.last_seen = seq;
            if seq >= self.end || pending == 0 {
                self.done = true;
            }
            let headers = m.headers.clone().unwrap_or_default();
            let size = headers.get(NATS_MSG_SIZE).and_then(|v| v.as_str().parse().ok()).unwrap_or(m.payload.len());
            return Ok(Some(Letter { seq, stored, headers, payload: m.payload.clone(), size }));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Commands

/// The connected pieces every command needs.
struct Ctx {
    config: Config,
    client: async_nats::Client,
    js: jetstream::Context,
    stream: Stream,
}

impl Ctx {
    fn known_routes(&self) -> Vec<&str> {
        self.config.inbound.iter().map(|i| i.name.as_str()).collect()
    }
}

/// Loads the routing file, connects, finds the dead-letter stream.
async fn connect(conn: &Connection, filter: &FilterArgs, env: EnvLookup<'_>) -> anyhow::Result<Ctx> {
    let mut config = config::load(&conn.config).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))?;
    config.apply(&Overrides { nats_servers: conn.nats_url.clone(), ..Default::default() });
    if let Some(route) = &filter.route {
        let known: Vec<&str> = config.inbound.iter().map(|i| i.name.as_str()).collect();
        if let Some(w) = unknown_route_warning(route, &known) {
            eprintln!("warning: {w}");
        }
    }
    let wait = config.nats.connect_timeout.max(Duration::from_secs(1));
    let client = crate::nats::connection::connect_now(&config.nats, &config.sidecar.service, env, wait).await?;
    // The connection has no request timeout of its own: bound every JetStream call.
    let js = jetstream::ContextBuilder::new().timeout(Duration::from_secs(10)).build(client.clone());
    let name = config.dead_letter.stream.clone();
    let stream = match js.get_stream(&name).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j) if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            anyhow::bail!("the dead-letter stream {name:?} does not exist (natsbridge provision creates it)")
        }
        Err(e) => anyhow::bail!("cannot open the dead-letter stream {name:?}: {e}"),
    };
    Ok(Ctx { config, client, js, stream })
}

/// Runs a `natsbridge dlq` command; the process exit code.
pub async fn main(cmd: Command, env: EnvLookup<'_>) -> i32 {
    let result = match cmd {
        Command::List(a) => list(a, env).await,
        Command::Show(a) => show(a, env).await,
        Command::Replay(a) => replay(a, env).await,
        Command::Purge(a) => purge(a, env).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

async fn list(a: ListArgs, env: EnvLookup<'_>) -> anyhow::Result<i32> {
    let cx = connect(&a.connection, &a.filter, env).await?;
    let filter = Filter::from(&a.filter);
    let mut scan = Scanner::open(&cx.stream, filter.range(), true).await?;
    let mut summary = Summary::default();
    let mut bytes = 0usize;
    while let Some(l) = scan.next().await? {
        if filter.matches(&l) {
            bytes += l.size;
            summary.add(&l);
        }
    }
    let total = summary.total();
    let scope = if filter.describe() == "all" { String::new() } else { format!(" matching {}", filter.describe()) };
    if total == 0 {
        println!("{}: no dead letters{scope}", cx.config.dead_letter.stream);
    } else {
        println!(
            "{}: {}{scope}, {} of payload",
            cx.config.dead_letter.stream,
            plural(total, "dead letter", "dead letters"),
            format_size(bytes)
        );
        print!("{}", summary.render(SystemTime::now(), &cx.known_routes()));
    }
    let _ = cx.client.drain().await;
    Ok(0)
}

async fn show(a: ShowArgs, env: EnvLookup<'_>) -> anyhow::Result<i32> {
    let cx = connect(&a.connection, &a.filter, env).await?;
    let filter = Filter::from(&a.filter);
    let mut scan = Scanner::open(&cx.stream, filter.range(), false).await?;
    let now = SystemTime::now();
    let mut shown = 0usize;
    while let Some(l) = scan.next().await? {
        if a.limit.is_some_and(|n| shown >= n) {
            break;
        }
        if filter.matches(&l) {
            if shown > 0 {
                println!();
            }
            print!("{}", render_letter(&l, now, a.preview));
            shown += 1;
        }
    }
    if shown == 0 {
        println!("no dead letters match ({})", filter.describe());
    }
    let _ = cx.client.drain().await;
    Ok(0)
}

/// The sequences of the matching dead letters, oldest first, with their summary.
async fn select(cx: &Ctx, filter: &Filter, limit: Option<usize>) -> anyhow::Result<(Vec<u64>, Summary)> {
    let mut scan = Scanner::open(&cx.stream, filter.range(), true).await?;
    let (mut seqs, mut summary) = (Vec::new(), Summary::default());
    while let Some(l) = scan.next().await? {
        if limit.is_some_and(|n| seqs.len() >= n) {
            break;
        }
        if filter.matches(&l) {
            seqs.push(l.seq);
            summary.add(&l);
        }
    }
    Ok((seqs, summary))
}

/// What replaying one dead letter came to.
enum Outcome {
    Replayed(String),
    Failed(String),
    Skipped(String),
}

async fn replay(a: ReplayArgs, env: EnvLookup<'_>) -> anyhow::Result<i32> {
    let cx = connect(&a.connection, &a.filter, env).await?;
    let filter = Filter::from(&a.filter);
    let dlq = cx.config.dead_letter.stream.clone();
    if a.dry_run {
        let mut scan = Scanner::open(&cx.stream, filter.range(), true).await?;
        let (mut n, mut skipped) = (0u64, 0u64);
        while let Some(l) = scan.next().await? {
            if a.limit.is_some_and(|lim| n + skipped >= lim as u64) {
                break;
            }
            if !filter.matches(&l) {
                continue;
            }
            match l.subject() {
                Some(subject) => {
                    n += 1;
                    println!("seq {}: would replay to {subject} (route {}, reason {})", l.seq, l.route(), l.reason());
                }
                None => {
                    skipped += 1;
                    println!("seq {}: would skip: no {SUBJECT} header", l.seq);
                }
            }
        }
        println!("dry run: {} would be replayed, {skipped} skipped; nothing changed", n);
        let _ = cx.client.drain().await;
        return Ok(0);
    }

    let (seqs, _) = select(&cx, &filter, a.limit).await?;
    if seqs.is_empty() {
        println!("no dead letters match ({})", filter.describe());
    }
    let progress = Progress::new(seqs.len() as u64);
    let mut tally = Tally::default();
    progress.draw(&tally);
    for seq in seqs {
        let outcome = replay_one(&cx, &dlq, seq, a.timeout).await;
        let line = match outcome {
            Outcome::Replayed(s) => {
                tally.replayed += 1;
                format!("seq {seq}: replayed {s}")
            }
            Outcome::Failed(s) => {
                tally.failed += 1;
                format!("seq {seq}: FAILED {s}")
            }
            Outcome::Skipped(s) => {
                tally.skipped += 1;
                format!("seq {seq}: skipped: {s}")
            }
        };
        progress.say(&tally, &line);
    }
    progress.finish();
    println!("replayed {}, failed {}, skipped {}", tally.replayed, tally.failed, tally.skipped);
    let _ = cx.client.drain().await;
    Ok(if tally.failed > 0 { 1 } else { 0 })
}

async fn replay_one(cx: &Ctx, dlq: &str, seq: u64, timeout: Duration) -> Outcome {
    let m = match cx.stream.get_raw_message(seq).await {
        Ok(m) => m,
        Err(e) if matches!(e.kind(), jetstream::stream::RawMessageErrorKind::NoMessageFound) => {
            return Outcome::Skipped("gone (deleted since it was selected)".into())
        }
        Err(e) => return Outcome::Failed(format!("cannot read the dead letter: {e}")),
    };
    let Some(subject) = m.headers.get(SUBJECT).map(|v| v.as_str().to_owned()).filter(|s| !s.is_empty()) else {
        return Outcome::Skipped(format!("no {SUBJECT} header: not a natsbridge dead letter"));
    };
    let headers = replay_headers(&m.headers, dlq, seq);
    let ack = match publish(&cx.js, &subject, headers, m.payload.clone(), timeout).await {
        Ok(a) => a,
        Err(e) => return Outcome::Failed(format!("replay to {subject}: {e}; the dead letter stays")),
    };
    if ack.stream == dlq {
        // The original subject is the dead-letter stream's own: the "replay" is a copy.
        let _ = cx.stream.delete_message(ack.sequence).await;
        return Outcome::Failed(format!("{subject} is captured by the dead-letter stream itself; the dead letter stays"));
    }
    let dup = if ack.duplicate { ", a duplicate of an earlier replay" } else { "" };
    match cx.stream.delete_message(seq).await {
        Ok(_) => Outcome::Replayed(format!("to {subject} (stream {} seq {}{dup}); dead letter deleted", ack.stream, ack.sequence)),
        // Another replay of the same dead letter got there first (its Nats-Msg-Id is the
        // same, so the stream kept one copy).
        Err(e) if is_gone(&e) => Outcome::Replayed(format!("to {subject} (stream {} seq {}{dup}); dead letter already deleted", ack.stream, ack.sequence)),
        Err(e) => Outcome::Failed(format!(
            "replayed to {subject} (stream {} seq {}{dup}) but the dead letter could not be deleted: {e}; a rerun within the stream's duplicate window is deduplicated",
            ack.stream, ack.sequence
        )),
    }
}

/// A JetStream publish that waits for the ack within `timeout` (nats.rs #1558), retrying
/// "no responders" twice at 250 ms (a stream leader election) with the same headers.
async fn publish(
    js: &jetstream::Context,
    subject: &str,
    headers: HeaderMap,
    payload: Bytes,
    timeout: Duration,
) -> Result<jetstream::publish::PublishAck, String> {
    use jetstream::context::PublishErrorKind as K;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let publish = async { js.publish_with_headers(subject.to_owned(), headers.clone(), payload.clone()).await?.await };
        match tokio::time::timeout_at(deadline, publish).await {
            Ok(Ok(ack)) => return Ok(ack),
            Ok(Err(e)) if e.kind() == K::StreamNotFound => {
                if attempt < 3 && tokio::time::Instant::now() + Duration::from_millis(250) < deadline {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
                return Err("no stream captures this subject".into());
            }
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("no ack within {}", humantime::format_duration(timeout))),
        }
    }
}

/// A delete of a sequence that is no longer there ("sequence N not found", 10043).
fn is_gone(e: &jetstream::stream::DeleteMessageError) -> bool {
    use jetstream::{stream::DeleteMessageErrorKind as K, ErrorCode};
    matches!(e.kind(), K::JetStream(j) if j.error_code() == ErrorCode::SEQUENCE_NOT_FOUND || j.error_code() == ErrorCode::NO_MESSAGE_FOUND)
}

async fn purge(a: PurgeArgs, env: EnvLookup<'_>) -> anyhow::Result<i32> {
    let cx = connect(&a.connection, &a.filter, env).await?;
    let filter = Filter::from(&a.filter);
    let (seqs, summary) = select(&cx, &filter, a.limit).await?;
    let dlq = &cx.config.dead_letter.stream;
    let now = SystemTime::now();
    if seqs.is_empty() {
        println!("{dlq}: no dead letters match ({}); nothing to delete", filter.describe());
        let _ = cx.client.drain().await;
        return Ok(0);
    }
    let what = plural(seqs.len() as u64, "dead letter", "dead letters");
    if !a.yes {
        println!("would delete {what} from {dlq} ({}):", filter.describe());
        print!("{}", summary.render(now, &cx.known_routes()));
        eprintln!("refusing to delete without --yes");
        let _ = cx.client.drain().await;
        return Ok(1);
    }
    let (mut deleted, mut failed) = (0u64, 0u64);
    for seq in &seqs {
        match cx.stream.delete_message(*seq).await {
            Ok(_) => deleted += 1,
            // Deleted meanwhile (another purge or replay): nothing left to do.
            Err(e) if is_gone(&e) => {}
            Err(e) => {
                failed += 1;
                eprintln!("seq {seq}: cannot delete: {e}");
            }
        }
    }
    print!("{}", summary.render(now, &cx.known_routes()));
    println!("deleted {deleted} of {what} from {dlq}{}", if failed > 0 { format!(", {failed} failed") } else { String::new() });
    let _ = cx.client.drain().await;
    Ok(if failed > 0 { 1 } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(seq: u64, route: &str, reason: &str) -> Letter {
        let mut h = HeaderMap::new();
        h.insert(ROUTE, route);
        h.insert(REASON, reason);
        Letter { seq, stored: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000), headers: h, payload: Bytes::new(), size: 0 }
    }

    #[test]
    fn seq_ranges_parse() {
        assert_eq!(parse_seq_range("5..9"), Ok(SeqRange { first: 5, last: 9 }));
        assert_eq!(parse_seq_range("5..=9"), Ok(SeqRange { first: 5, last: 9 }));
        assert_eq!(parse_seq_range("5.."), Ok(SeqRange { first: 5, last: u64::MAX }));
        assert_eq!(parse_seq_range("..9"), Ok(SeqRange { first: 1, last: 9 }));
        assert_eq!(parse_seq_range("7"), Ok(SeqRange { first: 7, last: 7 }));
        assert_eq!(parse_seq_range(" 3 .. 4 "), Ok(SeqRange { first: 3, last: 4 }));
        assert!(parse_seq_range("9..5").unwrap_err().contains("start is after the end"));
        assert!(parse_seq_range("0..5").unwrap_err().contains("start at 1"));
        assert!(parse_seq_range("a..5").unwrap_err().contains("not a sequence number"));
        assert!(parse_seq_range("").is_err());
        assert!(parse_seq_range("-1").is_err());
        let r = parse_seq_range("5..9").unwrap();
        assert!(!r.contains(4) && r.contains(5) && r.contains(9) && !r.contains(10));
    }

    #[test]
    fn filters_match_route_reason_and_range() {
        let l = letter(7, "tool-exec", "poison");
        assert!(Filter::default().matches(&l));
        let f = |route: Option<&str>, reason: Option<Reason>, seq: Option<&str>| Filter {
            route: route.map(Into::into),
            reason,
            seq: seq.map(|s| parse_seq_range(s).unwrap()),
        };
        assert!(f(Some("tool-exec"), None, None).matches(&l));
        assert!(!f(Some("tool"), None, None).matches(&l));
        assert!(f(None, Some(Reason::Poison), None).matches(&l));
        assert!(!f(None, Some(Reason::Status), None).matches(&l));
        assert!(f(None, None, Some("5..9")).matches(&l));
        assert!(!f(None, None, Some("8..")).matches(&l));
        assert!(f(Some("tool-exec"), Some(Reason::Poison), Some("7")).matches(&l));
        assert!(!f(Some("tool-exec"), Some(Reason::Poison), Some("1..6")).matches(&l));
        // A message without the headers matches no route or reason filter.
        let bare = Letter { headers: HeaderMap::new(), ..l };
        assert!(!f(Some("-"), None, None).matches(&bare));
        assert!(!f(None, Some(Reason::Poison), None).matches(&bare));
        assert_eq!(f(Some("a"), Some(Reason::MaxDeliver), Some("3..")).describe(), "route a, reason max_deliver, seq 3..");
        assert_eq!(f(None, None, Some("4")).describe(), "seq 4");
        assert_eq!(Filter::default().describe(), "all");
    }

    #[test]
    fn unknown_routes_are_warned_about() {
        assert_eq!(unknown_route_warning("a", &["a", "b"]), None);
        let w = unknown_route_warning("c", &["a", "b"]).unwrap();
        assert!(w.contains("\"c\"") && w.contains("a, b"), "{w}");
        assert!(unknown_route_warning("c", &[]).unwrap().contains("none"));
    }

    #[test]
    fn ages_are_compact() {
        let s = Duration::from_secs;
        assert_eq!(format_age(Duration::from_millis(300)), "0s");
        assert_eq!(format_age(s(45)), "45s");
        assert_eq!(format_age(s(300)), "5m");
        assert_eq!(format_age(s(312)), "5m12s");
        assert_eq!(format_age(s(7200)), "2h");
        assert_eq!(format_age(s(7380)), "2h3m");
        assert_eq!(format_age(s(7201)), "2h");
        assert_eq!(format_age(s(3 * 86400)), "3d");
        assert_eq!(format_age(s(3 * 86400 + 4 * 3600 + 59)), "3d4h");
        let now = SystemTime::UNIX_EPOCH + s(100);
        assert_eq!(age(now, now + s(5)), Duration::ZERO, "a future time is no age");
        assert_eq!(age(now, now - s(5)), s(5));
    }

    #[test]
    fn previews_text_and_binary() {
        assert_eq!(preview(b"", 10), "(empty)");
        assert_eq!(preview(b"{\"a\":1}", 80), "{\"a\":1} (7 bytes)");
        assert_eq!(preview(b"line1\nline2\t!", 80), "line1\\nline2\\t! (13 bytes)");
        assert_eq!(preview("héllo wörld".as_bytes(), 5), "héllo… (13 bytes)");
        assert_eq!(preview(b"x", 5), "x (1 byte)");
        assert_eq!(preview(&[0u8, 1, 2, 0xff], 30), "binary, 4 bytes: 00 01 02 ff");
        let big: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        assert_eq!(preview(&big, 30), "binary, 2.9 KiB: 00 01 02 03 04 05 06 07 08 09 …");
        // Invalid UTF-8 and control characters are binary.
        assert!(preview(&[0xc3, 0x28], 30).starts_with("binary, 2 bytes: c3 28"));
        assert!(preview(b"a\x1bb", 30).starts_with("binary"));
        assert_eq!(format_size(2 * 1024 * 1024 + 512 * 1024), "2.5 MiB");
    }

    #[test]
    fn summary_counts_per_route_and_reason_with_ages() {
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let now = base + Duration::from_secs(7200);
        let mut s = Summary::default();
        let mut at = |seq, route: &str, reason: &str, t: SystemTime| {
            let mut l = letter(seq, route, reason);
            l.headers.insert(TIME, humantime::format_rfc3339_millis(t).to_string().as_str());
            s.add(&l);
        };
        at(1, "tool-exec", "poison", base);
        at(2, "tool-exec", "poison", base + Duration::from_secs(3600));
        at(4, "tool-exec", "status", now - Duration::from_secs(300));
        at(3, "gone", "max_deliver", now - Duration::from_secs(40));
        assert_eq!(s.total(), 4);
        let out = s.render(now, &["tool-exec"]);
        let lines: Vec<&str> = out.lines().map(str::trim_end).collect();
        assert_eq!(lines.len(), 5, "{out}");
        assert!(
            lines[0].starts_with("gone:") && lines[0].ends_with("1 message, oldest 40s, newest 40s  (not in the routing file)"),
            "{out}"
        );
        assert!(lines[1].trim_start().starts_with("max_deliver:") && lines[1].ends_with("(seq 3)"), "{out}");
        assert!(lines[2].starts_with("tool-exec:") && lines[2].ends_with("3 messages, oldest 2h, newest 5m"), "{out}");
        assert!(
            lines[3].contains("poison:") && lines[3].contains("2 messages, oldest 2h, newest 1h") && lines[3].ends_with("(seq 1..2)"),
            "{out}"
        );
        assert!(lines[4].contains("status:") && lines[4].contains("1 message, oldest 5m, newest 5m"), "{out}");
    }

    #[test]
    fn letter_time_falls_back_to_the_stream_timestamp() {
        let mut l = letter(1, "r", "poison");
        assert_eq!(l.time(), l.stored);
        l.headers.insert(TIME, "2023-11-14T22:13:20.500Z");
        assert_eq!(l.time(), SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_500));
        l.headers.insert(TIME, "yesterday");
        assert_eq!(l.time(), l.stored);
    }

    #[test]
    fn show_block_names_every_field() {
        let mut l = letter(9, "tool-exec", "status");
        for (k, v) in [
            (STATUS, "503"),
            (DELIVERIES, "2"),
            (SUBJECT, "tool.exec.sed"),
            (STREAM, "TOOL"),
            (SEQ, "4"),
            (CONSUMER, "tool"),
            (ERROR, "down"),
        ] {
            l.headers.insert(k, v);
        }
        l.payload = Bytes::from_static(b"hello");
        let now = l.stored + Duration::from_secs(90);
        let out = render_letter(&l, now, 80);
        assert_eq!(
            out,
            "seq 9  route tool-exec  reason status  status 503  deliveries 2\n  subject:  tool.exec.sed  (stream TOOL seq 4, consumer tool)\n  time:     2023-11-14T22:13:20.000Z (1m30s ago)\n  error:    down\n  payload:  hello (5 bytes)\n"
        );
    }

    #[test]
    fn replay_ids_never_reuse_the_original() {
        assert_eq!(replay_msg_id(Some("m-1"), "DLQ", 7), "m-1-replay-7");
        assert_eq!(replay_msg_id(Some("m-1-replay-7"), "DLQ", 12), "m-1-replay-12");
        assert_eq!(replay_msg_id(Some("a-replay-x"), "DLQ", 3), "a-replay-x-replay-3");
        assert_eq!(replay_msg_id(Some("-replay-4"), "DLQ", 3), "-replay-4-replay-3");
        assert_eq!(replay_msg_id(None, "DLQ", 7), "natsbridge-replay-DLQ-7");
        assert_eq!(replay_msg_id(Some("  "), "DLQ", 7), "natsbridge-replay-DLQ-7");
    }

    #[test]
    fn replay_headers_strip_the_dead_letter_and_keep_the_original() {
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", "m-1");
        h.insert("X-Trace", "t1");
        h.append("X-Multi", "a");
        h.append("X-Multi", "b");
        h.insert("Idempotency-Key", "k1");
        h.insert("Nats-Expected-Last-Sequence", "41");
        h.insert(REPLAY_OF, "DLQ/1");
        for name in HEADERS {
            h.insert(*name, "x");
        }
        h.insert("bridge-dlq-future", "x");
        let r = replay_headers(&h, "DLQ", 9);
        assert_eq!(r.get("Nats-Msg-Id").unwrap().as_str(), "m-1-replay-9");
        assert_eq!(r.get("X-Trace").unwrap().as_str(), "t1");
        assert_eq!(r.get_all("X-Multi").map(|v| v.as_str().to_owned()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(r.get("Idempotency-Key").unwrap().as_str(), "k1");
        assert_eq!(r.get(REPLAY_OF).unwrap().as_str(), "DLQ/9");
        assert_eq!(r.get_all(REPLAY_OF).count(), 1);
        assert!(r.get("Nats-Expected-Last-Sequence").is_none());
        for (name, _) in r.iter() {
            let n: &str = name.as_ref();
            assert!(!n.to_ascii_lowercase().starts_with("bridge-dlq-"), "{n} survived");
        }
        assert_eq!(r.iter().count(), 5, "{r:?}");
        assert_eq!(replay_headers(&HeaderMap::new(), "DLQ", 2).get("Nats-Msg-Id").unwrap().as_str(), "natsbridge-replay-DLQ-2");
    }

    #[test]
    fn progress_bar_fills_with_the_tally() {
        let t = Tally { replayed: 2, failed: 1, skipped: 1 };
        assert_eq!(progress_line(&t, 8, 8), "[####....] 4/8  replayed 2  failed 1  skipped 1");
        assert_eq!(progress_line(&Tally::default(), 0, 4), "[####] 0/0  replayed 0  failed 0  skipped 0");
        assert_eq!(progress_line(&Tally { replayed: 3, ..Default::default() }, 3, 4), "[####] 3/3  replayed 3  failed 0  skipped 0");
    }
}
