//! Reading the dead-letter stream: which dead letters a command selects ([`Filter`],
//! [`SeqRange`]), and the [`Scanner`] that streams them in sequence order.

use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer::DeliverPolicy, stream::Stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;

use crate::dlq::{Reason, REASON, ROUTE, SUBJECT, TIME};

/// Set by the server on headers-only deliveries: the size of the payload left out.
pub(super) const NATS_MSG_SIZE: &str = "Nats-Msg-Size";

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

/// A dead letter with a route and reason header, stored at a fixed time.
#[cfg(test)]
pub(super) fn test_letter(seq: u64, route: &str, reason: &str) -> Letter {
    let mut h = HeaderMap::new();
    h.insert(ROUTE, route);
    h.insert(REASON, reason);
    Letter { seq, stored: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000), headers: h, payload: Bytes::new(), size: 0 }
}

#[cfg(test)]
mod tests {
    use super::test_letter as letter;
    use super::*;

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
    fn letter_time_falls_back_to_the_stream_timestamp() {
        let mut l = letter(1, "r", "poison");
        assert_eq!(l.time(), l.stored);
        l.headers.insert(TIME, "2023-11-14T22:13:20.500Z");
        assert_eq!(l.time(), SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_500));
        l.headers.insert(TIME, "yesterday");
        assert_eq!(l.time(), l.stored);
    }
}
