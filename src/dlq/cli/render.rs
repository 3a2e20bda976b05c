//! What the commands print: summaries per route and reason, one dead letter's block,
//! compact ages and sizes, payload previews, and the replay's progress line. Pure, but for
//! [`Progress`], which draws on a terminal.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::time::{Duration, SystemTime};

use super::scan::Letter;
use crate::dlq::{Reason, CONSUMER, DELIVERIES, ERROR, SEQ, STATUS, STREAM};

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

pub(super) fn plural(n: u64, one: &str, many: &str) -> String {
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
pub(super) struct Progress {
    total: u64,
    tty: bool,
}

impl Progress {
    pub(super) fn new(total: u64) -> Self {
        Self { total, tty: std::io::stderr().is_terminal() }
    }
    fn clear(&self) {
        if self.tty {
            eprint!("\r\x1b[2K");
        }
    }
    pub(super) fn draw(&self, t: &Tally) {
        if self.tty {
            eprint!("\r\x1b[2K{}", progress_line(t, self.total, 30));
            let _ = std::io::stderr().flush();
        }
    }
    pub(super) fn say(&self, t: &Tally, line: &str) {
        self.clear();
        println!("{line}");
        let _ = std::io::stdout().flush();
        self.draw(t);
    }
    pub(super) fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::dlq::cli::scan::test_letter as letter;
    use crate::dlq::{SUBJECT, TIME};
    use bytes::Bytes;

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
    fn progress_bar_fills_with_the_tally() {
        let t = Tally { replayed: 2, failed: 1, skipped: 1 };
        assert_eq!(progress_line(&t, 8, 8), "[####....] 4/8  replayed 2  failed 1  skipped 1");
        assert_eq!(progress_line(&Tally::default(), 0, 4), "[####] 0/0  replayed 0  failed 0  skipped 0");
        assert_eq!(progress_line(&Tally { replayed: 3, ..Default::default() }, 3, 4), "[####] 3/3  replayed 3  failed 0  skipped 0");
    }
}
