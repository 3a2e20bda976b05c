//! Who owns a stream's settings. Several services may use one stream (a shared event
//! stream, the dead-letter stream); if each provisioned its own idea of it, the stream
//! would flap on every start (3 → 1 → 3 replicas means raft peers removed and re-added).
//! So one routes file owns a stream's settings and the others reference it by name:
//!
//! - in the file, `reference = true` on a `[[streams]]` entry or `[dead_letter]`: the
//!   stream is only checked to exist, never created or updated from that file;
//! - on the server, the owner's `[sidecar] service` in the stream's metadata
//!   (`spec::OWNER_KEY`), written when it creates or updates the stream. Another service's
//!   provisioning leaves such a stream alone (a differing file is refused, not applied)
//!   unless `--force` takes it over;
//! - across files, [`conflicts`] (`natsbridge check FILE…`) reports two files owning one
//!   stream with different settings.
//!
//! JetStream has no compare-and-set for a stream's configuration (an update replaces the
//! whole config; nats.java#571), so the metadata is read then written. What keeps that
//! from racing: creating is atomic (a second create with another config fails and is
//! retried, then finds the owner), and only the owner's pods update, all from one file,
//! once per config they load.

use std::collections::BTreeMap;
use std::fmt;

use async_nats::jetstream::stream;

use super::spec::{dead_letter_stream_config, stream_config};
use crate::config::Config;

/// Two routes files owning one stream with different settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub stream: String,
    /// `file:line` of each owning declaration (`file` alone for an implicit `[dead_letter]`).
    pub first: String,
    pub second: String,
    /// The settings that differ: `field: first vs second`.
    pub fields: Vec<String>,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: stream {:?} is also owned by {} with other settings ({}); one routes file owns a stream's settings, the others declare it with reference = true",
            self.second,
            self.stream,
            self.first,
            self.fields.join(", ")
        )
    }
}

/// The settings a file owns, by stream name, with where each is declared. Replicas left
/// to the cluster's size compare as 0 ("follow the cluster").
fn owned(file: &str, config: &Config) -> Vec<(String, String, stream::Config)> {
    let mut out: Vec<_> =
        config.streams.iter().filter(|s| !s.reference).map(|s| (s.name.clone(), format!("{file}:{}", s.line), stream_config(s))).collect();
    let uses_dlq = config.inbound.iter().any(|i| matches!(i.mode, crate::config::InboundMode::JetStream(_)));
    let dl = &config.dead_letter;
    if uses_dlq && !dl.reference {
        let mut c = dead_letter_stream_config(dl, 0);
        c.num_replicas = dl.replicas.unwrap_or(0);
        let at = dl.line.map_or_else(|| format!("{file} (default [dead_letter])"), |l| format!("{file}:{l}"));
        out.push((dl.stream.clone(), at, c));
    }
    out
}

/// The fields two owning declarations disagree on.
fn differences(a: &stream::Config, b: &stream::Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut field = |name: &str, x: String, y: String| {
        if x != y {
            out.push(format!("{name}: {x} vs {y}"));
        }
    };
    let sorted = |v: &[String]| {
        let mut v = v.to_vec();
        v.sort();
        v.join(" ")
    };
    field("subjects", sorted(&a.subjects), sorted(&b.subjects));
    field("storage", format!("{:?}", a.storage), format!("{:?}", b.storage));
    let replicas = |n: usize| if n == 0 { "cluster default".to_owned() } else { n.to_string() };
    field("replicas", replicas(a.num_replicas), replicas(b.num_replicas));
    field("retention", format!("{:?}", a.retention), format!("{:?}", b.retention));
    field("max_age", format!("{:?}", a.max_age), format!("{:?}", b.max_age));
    field("max_bytes", a.max_bytes.to_string(), b.max_bytes.to_string());
    field("max_msgs", a.max_messages.to_string(), b.max_messages.to_string());
    field("duplicate_window", format!("{:?}", a.duplicate_window), format!("{:?}", b.duplicate_window));
    field("discard", format!("{:?}", a.discard), format!("{:?}", b.discard));
    out
}

/// Streams that two of `files` (path, config) own with different settings. Identical
/// owning declarations are not a conflict (they cannot flap).
pub fn conflicts(files: &[(String, &Config)]) -> Vec<Conflict> {
    let mut first: BTreeMap<String, (String, stream::Config)> = BTreeMap::new();
    let mut out = Vec::new();
    for (file, config) in files {
        for (name, at, c) in owned(file, config) {
            match first.get(&name) {
                None => {
                    first.insert(name, (at, c));
                }
                Some((first_at, first_c)) => {
                    let fields = differences(first_c, &c);
                    if !fields.is_empty() {
                        out.push(Conflict { stream: name, first: first_at.clone(), second: at, fields });
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> Config {
        crate::config::parse(src, "x.toml").unwrap_or_else(|e| panic!("{e}"))
    }

    const ROUTE: &str =
        "[[inbound]]\nname = \"r\"\nsubject = \"ev.a\"\nmode = \"jetstream\"\nstream = \"EV\"\ndurable = \"d\"\npath = \"/a\"\n";

    fn file(service: &str, stream: &str, dead_letter: &str) -> Config {
        parse(&format!("[sidecar]\nservice = \"{service}\"\n\n{ROUTE}\n{stream}\n{dead_letter}\n"))
    }

    #[test]
    fn two_owners_with_other_settings_conflict_with_file_and_line() {
        let a = file("a", "[[streams]]\nname = \"EV\"\nsubjects = [\"ev.>\"]\nreplicas = 3\n", "");
        let b = file("b", "[[streams]]\nname = \"EV\"\nsubjects = [\"ev.>\"]\nreplicas = 1\n", "[dead_letter]\nmax_age = \"1d\"\n");
        let c = conflicts(&[("a.toml".into(), &a), ("b.toml".into(), &b)]);
        assert_eq!(c.len(), 2, "{c:#?}");
        assert_eq!((c[0].stream.as_str(), c[0].first.as_str(), c[0].second.as_str()), ("EV", "a.toml:12", "b.toml:12"));
        assert_eq!(c[0].fields, ["replicas: 3 vs 1"]);
        assert_eq!(c[1].stream, "DLQ");
        assert_eq!(c[1].first, "a.toml (default [dead_letter])");
        assert_eq!(c[1].second, "b.toml:17");
        assert!(c[1].fields[0].starts_with("max_age"), "{:?}", c[1].fields);
        assert!(c[0].to_string().starts_with("b.toml:12: stream \"EV\" is also owned by a.toml:12"), "{}", c[0]);
    }

    #[test]
    fn references_and_identical_owners_do_not_conflict() {
        let a = file("a", "[[streams]]\nname = \"EV\"\nsubjects = [\"ev.>\"]\nreplicas = 3\n", "");
        let same = file("b", "[[streams]]\nname = \"EV\"\nsubjects = [\"ev.>\"]\nreplicas = 3\n", "");
        let reference = file("c", "[[streams]]\nname = \"EV\"\nreference = true\n", "[dead_letter]\nreference = true\n");
        assert_eq!(conflicts(&[("a".into(), &a), ("b".into(), &same), ("c".into(), &reference)]), []);
    }
}
