//! The commands: `list`, `show`, `replay` and `purge`, each from its arguments to an exit
//! code. This is the command-line edge: errors are `anyhow` and end up on stderr.

use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, stream::Stream};
use async_nats::HeaderMap;

use super::args::{FilterArgs, ListArgs, NatsArgs, PurgeArgs, ReplayArgs, ShowArgs};
use super::render::{format_size, plural, render_letter, Progress, Summary, Tally};
use super::scan::{unknown_route_warning, Filter, Scanner, NATS_MSG_SIZE};
use crate::config::{self, Config, Overrides};
use crate::dlq::{Publisher, HEADERS, SUBJECT};
use crate::metrics::Metrics;
use crate::nats::connection::EnvLookup;
use crate::nats::replies::Replies;
use crate::subject::SubjectPattern;

/// Added to a replayed message: the dead letter it came from, `<DLQ stream>/<seq>`.
pub const REPLAY_OF: &str = "Bridge-Replay-Of";
const NATS_MSG_ID: &str = crate::codec::NATS_MSG_ID;

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
    // The original's id is kept in Bridge-Dlq-Msg-Id; the dead letter's own Nats-Msg-Id
    // ([`crate::dlq::msg_id`]) is only the original's in dead letters from before it.
    let get = |n: &str| dead.get(n).map(|v| v.as_str());
    let own = |id: &str| match (get(crate::dlq::STREAM), get(crate::dlq::CONSUMER), get(crate::dlq::SEQ)) {
        (Some(stream), Some(consumer), Some(seq)) => crate::dlq::is_own_msg_id(id, stream, consumer, seq),
        _ => false,
    };
    let original_id = get(crate::dlq::MSG_ID).or_else(|| get(NATS_MSG_ID).filter(|id| !own(id))).map(str::to_owned);
    for (name, values) in dead.iter() {
        let n: &str = name.as_ref();
        if n.eq_ignore_ascii_case(NATS_MSG_ID) {
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

/// What every command works with once connected: the routing file, the NATS client and
/// the dead-letter stream.
struct DlqSession {
    config: Config,
    client: async_nats::Client,
    stream: Stream,
}

impl DlqSession {
    fn known_routes(&self) -> Vec<&str> {
        self.config.inbound.iter().map(|i| i.name.as_str()).collect()
    }

    /// Why a dead letter must not be replayed to `subject` without `--to`, if it must not:
    /// its `Bridge-Dlq-Subject` is whatever the dead letter's publisher wrote, and the
    /// replay goes out with the operator's credentials.
    fn refusal(&self, subject: &str) -> Option<String> {
        if subject.starts_with('$') {
            return Some("a `$` subject (NATS system or JetStream API) is never a replay target".into());
        }
        match SubjectPattern::parse(subject) {
            Ok(p) if !p.has_wildcards() => {}
            _ => return Some("not a subject without wildcards".into()),
        }
        let c = &self.config;
        let streams = c.streams.iter().flat_map(|s| &s.subjects);
        if c.inbound.iter().map(|i| &i.subject).chain(streams).any(|p| p.matches(subject)) {
            return None;
        }
        Some(format!("no inbound route or [[streams]] entry of {} covers it", c.source.display()))
    }
}

/// Loads the routing file, connects, finds the dead-letter stream.
async fn open_session(nats: &NatsArgs, filter: &FilterArgs, env: EnvLookup<'_>) -> anyhow::Result<DlqSession> {
    let mut config = config::load(&nats.config).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))?;
    config.apply(&Overrides { nats_servers: nats.nats_url.clone(), ..Default::default() });
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
    Ok(DlqSession { config, client, stream })
}

pub(super) async fn list(a: ListArgs, env: EnvLookup<'_>) -> anyhow::Result<i32> {
    let cx = open_session(&a.nats, &a.filter, env).await?;
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

pub(super) async fn show(a: ShowArgs, env: EnvLookup<'_>) -> anyhow::Result<i32> {
    let cx = open_session(&a.select.nats, &a.select.filter, env).await?;
    let filter = Filter::from(&a.select.filter);
    let mut scan = Scanner::open(&cx.stream, filter.range(), false).await?;
    let now = SystemTime::now();
    let mut shown = 0usize;
    while let Some(l) = scan.next().await? {
        if a.select.limit.is_some_and(|n| shown >= n) {
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
async fn select(cx: &DlqSession, filter: &Filter, limit: Option<usize>) -> anyhow::Result<(Vec<u64>, Summary)> {
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

pub(super) async fn replay(a: ReplayArgs, env: EnvLookup<'_>) -> anyhow::Result<i32> {
    let cx = open_session(&a.select.nats, &a.select.filter, env).await?;
    let filter = Filter::from(&a.select.filter);
    let dlq = cx.config.dead_letter.stream.clone();
    let replies = Replies::start(&cx.client, &Metrics::new()).await?;
    let publisher = Publisher::new(replies, a.timeout);
    if a.dry_run {
        replay_dry_run(&cx, &filter, a.select.limit, a.to.as_deref()).await?;
        let _ = cx.client.drain().await;
        return Ok(0);
    }

    let (seqs, _) = select(&cx, &filter, a.select.limit).await?;
    if seqs.is_empty() {
        println!("no dead letters match ({})", filter.describe());
    }
    let progress = Progress::new(seqs.len() as u64);
    let mut tally = Tally::default();
    progress.draw(&tally);
    for seq in seqs {
        let outcome = replay_one(&cx, &publisher, &dlq, seq, a.to.as_deref()).await;
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

/// `replay --dry-run`: what would be replayed or skipped, without changing anything.
async fn replay_dry_run(cx: &DlqSession, filter: &Filter, limit: Option<usize>, to: Option<&str>) -> anyhow::Result<()> {
    let mut scan = Scanner::open(&cx.stream, filter.range(), true).await?;
    let (mut n, mut skipped) = (0u64, 0u64);
    while let Some(l) = scan.next().await? {
        if limit.is_some_and(|lim| n + skipped >= lim as u64) {
            break;
        }
        if !filter.matches(&l) {
            continue;
        }
        match to.or(l.subject()) {
            Some(subject) if to.is_none() && cx.refusal(subject).is_some() => {
                let why = cx.refusal(subject).unwrap_or_default();
                println!("seq {}: would refuse to replay to {subject:?}: {why}", l.seq);
            }
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
    Ok(())
}

async fn replay_one(cx: &DlqSession, publisher: &Publisher, dlq: &str, seq: u64, to: Option<&str>) -> Outcome {
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
    let subject = match (to, cx.refusal(&subject)) {
        (Some(to), _) => to.to_owned(),
        (None, None) => subject,
        (None, Some(why)) => {
            return Outcome::Failed(format!(
                "refused to replay to {subject:?}: {why}; the dead letter stays (--to SUBJECT replays it elsewhere)"
            ))
        }
    };
    let headers = replay_headers(&m.headers, dlq, seq);
    let ack = match publisher.publish(&subject, headers, m.payload.clone()).await {
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

/// Why a replay's publish failed, in the replay's words: the subject is already on the
/// line, and "dead letter" would name the wrong message.
/// A delete of a sequence that is no longer there ("sequence N not found", 10043).
fn is_gone(e: &jetstream::stream::DeleteMessageError) -> bool {
    use jetstream::{stream::DeleteMessageErrorKind as K, ErrorCode};
    matches!(e.kind(), K::JetStream(j) if j.error_code() == ErrorCode::SEQUENCE_NOT_FOUND || j.error_code() == ErrorCode::NO_MESSAGE_FOUND)
}

pub(super) async fn purge(a: PurgeArgs, env: EnvLookup<'_>) -> anyhow::Result<i32> {
    let cx = open_session(&a.select.nats, &a.select.filter, env).await?;
    let filter = Filter::from(&a.select.filter);
    let (seqs, summary) = select(&cx, &filter, a.select.limit).await?;
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
        // A dead letter from before Bridge-Dlq-Msg-Id: its Nats-Msg-Id is the original's.
        for name in HEADERS.iter().filter(|n| **n != crate::dlq::MSG_ID) {
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
    fn replays_use_the_original_id_not_the_dead_letters_own() {
        let origin =
            crate::dlq::Origin { route: "r", consumer: "svc-r", stream: "AGENT", subject: "a.b", seq: 5, deliveries: 1, stored: 7 };
        let failure = crate::dlq::Failure { reason: crate::dlq::Reason::Poison, status: Some(400), error: None };
        let mut orig = HeaderMap::new();
        orig.insert("Nats-Msg-Id", "evt-1");
        let dead = crate::dlq::headers(Some(&orig), &origin, &failure, std::time::SystemTime::now(), crate::dlq::Trim::Full);
        assert_eq!(replay_headers(&dead, "DLQ", 9).get("Nats-Msg-Id").unwrap().as_str(), "evt-1-replay-9");
        // No original id: the dead letter's own is not mistaken for one.
        let dead = crate::dlq::headers(None, &origin, &failure, std::time::SystemTime::now(), crate::dlq::Trim::Full);
        assert_eq!(replay_headers(&dead, "DLQ", 9).get("Nats-Msg-Id").unwrap().as_str(), "natsbridge-replay-DLQ-9");
    }
}
