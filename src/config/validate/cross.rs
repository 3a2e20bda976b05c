//! Checks across tables, which no single route or stream can see: unique names, routes
//! that overlap or shadow each other, and whether streams capture what routes use.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use toml::Spanned;

use crate::config::diagnostics::{Diagnostics, TableStart};
use crate::config::{DeadLetterStream, Inbound, InboundMode, Outbound, OutboundTarget, StreamSpec};
use crate::subject::{self, SubjectPattern};

/// Every check on the validated routes and streams, in the order they report.
pub(super) fn check(
    outbound: &[(Outbound, TableStart)],
    inbound: &[(Inbound, TableStart)],
    streams: &[StreamSpec],
    dead_letter: Option<&DeadLetterStream>,
    diags: &mut Diagnostics<'_>,
) {
    check_stream_and_durable_names(inbound, streams, diags);
    check_outbound_overlaps(outbound, diags);
    check_matchit_conflicts(outbound, diags);
    check_inbound_overlaps(inbound, diags);
    if let Some(dl) = dead_letter {
        check_outbound_coverage(outbound, streams, diags);
        check_inbound_coverage(inbound, streams, dl, diags);
    }
    if let Some(stream) = streams.iter().find(|s| dead_letter.is_some_and(|d| d.stream == s.name)) {
        diags.error_on_line(
            stream.line,
            &stream.name,
            "this stream has the dead-letter stream's name; set [dead_letter] stream to another",
        );
    }
}

/// Route names are unique across outbound and inbound, checked on the raw tables so a
/// duplicate is reported even when the route has errors of its own.
pub(super) fn check_raw_route_names<'v>(routes: impl Iterator<Item = &'v Spanned<toml::Value>>, diags: &mut Diagnostics<'_>) {
    let mut first_lines: HashMap<String, usize> = HashMap::new();
    for v in routes {
        let Some(name) = v.get_ref().get("name").and_then(|n| n.as_str()) else { continue };
        let start = TableStart(v.span().start);
        match first_lines.get(name) {
            Some(&first) => {
                diags.error(start.named(Some(name)), Some("name"), format!("duplicate route name; first defined at line {first}"))
            }
            None => {
                first_lines.insert(name.to_owned(), diags.line_of(start));
            }
        }
    }
}

fn check_stream_and_durable_names(inbound: &[(Inbound, TableStart)], streams: &[StreamSpec], diags: &mut Diagnostics<'_>) {
    let mut stream_lines: HashMap<&str, usize> = HashMap::new();
    for s in streams {
        // The previous one of that name: with three, the third names the second.
        if let Some(previous) = stream_lines.insert(&s.name, s.line) {
            diags.error_on_line(s.line, &s.name, format!("duplicate stream name; first defined at line {previous}"));
        }
    }
    let mut durables: HashMap<(&str, &str), &str> = HashMap::new();
    for (i, start) in inbound {
        if let InboundMode::JetStream(c) = &i.mode {
            if let Some(other) = durables.insert((&c.stream, &c.durable), &i.name) {
                diags.error(
                    start.named(Some(&i.name)),
                    Some("durable"),
                    format!("durable {:?} on stream {:?} is already used by route \"{other}\"", c.durable, c.stream),
                );
            }
        }
    }
}

/// Two routes overlap when one request could match both and nothing decides between
/// them: same host (or both none), the same path shape, and methods that intersect.
fn check_outbound_overlaps(outbound: &[(Outbound, TableStart)], diags: &mut Diagnostics<'_>) {
    let mut by_shape: BTreeMap<(Option<&str>, String), Vec<usize>> = BTreeMap::new();
    for (idx, (o, _)) in outbound.iter().enumerate() {
        by_shape.entry((o.host.as_deref(), subject::path_shape(&o.path))).or_default().push(idx);
    }
    for idxs in by_shape.values() {
        for (n, &later) in idxs.iter().enumerate() {
            for &earlier in &idxs[..n] {
                let (first, _) = &outbound[earlier];
                let (second, second_start) = &outbound[later];
                let shadowed = match (&first.method, &second.method) {
                    (None, _) => true,
                    (Some(x), Some(y)) => x == y,
                    (Some(_), None) => false,
                };
                let at = second_start.named(Some(&second.name));
                if shadowed {
                    let message = format!("can never match: route \"{}\" (line {}) takes every request it would", first.name, first.line);
                    diags.error(at, Some("path"), message);
                } else if second.method.is_none() {
                    let message = format!("overlaps route \"{}\" (line {}): same host and path, methods intersect", first.name, first.line);
                    diags.error(at, Some("path"), message);
                }
            }
        }
    }
}

/// matchit refuses some shapes that are not literally the same (e.g. two different
/// catch-alls or conflicting parameter names at one position): report those too.
fn check_matchit_conflicts(outbound: &[(Outbound, TableStart)], diags: &mut Diagnostics<'_>) {
    let mut routers: HashMap<Option<&str>, matchit::Router<usize>> = HashMap::new();
    let mut inserted: BTreeSet<(Option<&str>, String)> = BTreeSet::new();
    for (o, start) in outbound {
        if !inserted.insert((o.host.as_deref(), subject::path_shape(&o.path))) {
            continue;
        }
        let router = routers.entry(o.host.as_deref()).or_default();
        if let Err(e) = router.insert(o.path.as_str(), 0) {
            diags.error(start.named(Some(&o.name)), Some("path"), format!("`path` {:?} conflicts with another route: {e}", o.path));
        }
    }
}

fn check_inbound_overlaps(inbound: &[(Inbound, TableStart)], diags: &mut Diagnostics<'_>) {
    let mut seen: HashMap<(String, String), &str> = HashMap::new();
    for (i, start) in inbound {
        let group = match &i.mode {
            InboundMode::Request { queue } | InboundMode::Tunnel { queue } => queue.clone(),
            InboundMode::JetStream(_) => continue,
        };
        if let Some(other) = seen.insert((i.subject.as_str().to_owned(), group), &i.name) {
            diags.error(
                start.named(Some(&i.name)),
                Some("subject"),
                format!("subscribes to the same subject and queue as route \"{other}\"; each message would reach only one of them"),
            );
        }
    }
}

fn check_outbound_coverage(outbound: &[(Outbound, TableStart)], streams: &[StreamSpec], diags: &mut Diagnostics<'_>) {
    for (o, start) in outbound {
        if let OutboundTarget::JetStream(t) = &o.target {
            let probe = t.probe();
            // A referenced stream's subjects are its owner's business: it may capture this.
            let maybe = streams.iter().any(|s| s.reference);
            if !maybe && !streams.iter().any(|s| s.subjects.iter().any(|p| p.matches(&probe))) {
                diags.warn(
                    start.named(Some(&o.name)),
                    Some("subject"),
                    format!("no [[streams]] entry captures {:?}; publishes will answer 503 unless the stream exists", t.as_str()),
                );
            }
        }
    }
}

/// For each JetStream consumer: its stream is declared and captures its subject, its dead
/// letters land in the dead-letter stream and only there, and the stream's duplicate window
/// is not shorter than the idempotency ttl.
fn check_inbound_coverage(inbound: &[(Inbound, TableStart)], streams: &[StreamSpec], dl: &DeadLetterStream, diags: &mut Diagnostics<'_>) {
    let stream_names: BTreeSet<&str> = streams.iter().map(|s| s.name.as_str()).collect();
    for (i, start) in inbound {
        let InboundMode::JetStream(c) = &i.mode else { continue };
        let at = start.named(Some(&i.name));
        // A referenced stream's settings are unknown here: only its existence is checked.
        let own_stream = streams.iter().find(|s| s.name == c.stream && !s.reference);
        if !stream_names.contains(c.stream.as_str()) {
            diags.warn(at, Some("stream"), format!("stream {:?} is not declared in [[streams]]; it must exist already", c.stream));
        } else if let Some(s) = own_stream {
            if !s.subjects.iter().any(|p| p.covers(&i.subject)) {
                diags.warn(at, Some("subject"), format!("stream {:?} does not capture {:?}", c.stream, i.subject.as_str()));
            }
        }
        let captures_dead_letter = |p: &SubjectPattern| SubjectPattern::parse(&c.dead_letter).is_ok_and(|d| p.covers(&d));
        if !dl.subjects.iter().any(captures_dead_letter) {
            let subjects = dl.subjects.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
            diags.error(
                at,
                Some("dead_letter"),
                format!(
                    "dead letters to {:?} would not be captured by the dead-letter stream {:?} (subjects {subjects})",
                    c.dead_letter, dl.stream
                ),
            );
        }
        if streams.iter().any(|s| s.subjects.iter().any(captures_dead_letter)) {
            diags.error(
                at,
                Some("dead_letter"),
                format!(
                    "dead-letter subject {:?} is also captured by a [[streams]] entry; two streams cannot share a subject",
                    c.dead_letter
                ),
            );
        }
        if let (Some(idem), Some(s)) = (&i.idempotency, own_stream) {
            if s.duplicate_window < idem.ttl {
                diags.warn(at, Some("idempotency"), format!(
                    "stream {:?} duplicate_window {} is shorter than the idempotency ttl {}; publisher retries after the window are caught only by the KV store",
                    s.name, humantime::format_duration(s.duplicate_window), humantime::format_duration(idem.ttl)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{errors, MINIMAL};

    #[test]
    fn duplicate_and_overlapping_routes() {
        let src = format!(
            "{MINIMAL}[[outbound]]\nname = \"x\"\npath = \"/a/{{id}}\"\nsubject = \"a\"\nmode = \"publish\"\n\
             [[outbound]]\nname = \"x\"\nmethod = \"POST\"\npath = \"/b\"\nsubject = \"b\"\nmode = \"publish\"\n\
             [[outbound]]\nname = \"y\"\nmethod = \"POST\"\npath = \"/a/{{other}}\"\nsubject = \"a\"\nmode = \"publish\"\n\
             [[outbound]]\nname = \"z\"\npath = \"/b\"\nsubject = \"b\"\nmode = \"publish\"\n\
             [[outbound]]\nname = \"h\"\nhost = \"svc:8080\"\npath = \"/b\"\nsubject = \"b\"\nmode = \"publish\"\n"
        );
        let e = errors(&src);
        assert!(e.iter().any(|m| m.contains("route \"x\": duplicate route name")), "{e:#?}");
        assert!(e.iter().any(|m| m.contains("route \"y\": can never match")), "{e:#?}");
        assert!(e.iter().any(|m| m.contains("route \"z\": overlaps route \"x\"")), "{e:#?}");
        // A host-specific route is not an overlap.
        assert!(!e.iter().any(|m| m.contains("route \"h\"")), "{e:#?}");
    }
}
