//! Turns the raw sections of a routing file into a [`Config`], pushing every problem into
//! one [`Diagnostics`] collector so the user sees all of them at once.
//!
//! One free function per section (`sidecar`, `outbound`, `inbound`, `streams`,
//! `telemetry`); `cross`
//! checks what no single table can see (names, overlaps, coverage). Calls only the raw
//! types, the diagnostics collector, the value parsers and `crate::subject`.

mod codec;
mod contracts;
mod cross;
mod cutover;
mod inbound;
mod outbound;
mod sidecar;
mod stream;
mod streams;
mod telemetry;

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::diagnostics::{Diagnostics, Table, TableStart};
use super::raw::{
    RawDeadLetter, RawDefaults, RawDocument, RawIdempotencyStore, RawInbound, RawNats, RawOutbound, RawSidecar, RawStream, RawTelemetry,
};
use super::values::{parse_duration, parse_size};
use super::{Config, Defaults, Storage};

/// The defaults when the file has no `[defaults]` (or an invalid one).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_MAX_BODY: usize = 1 << 20;

/// Every section deserialized into its raw type; `None` where that failed (already reported).
struct RawSections {
    sidecar: Option<(RawSidecar, TableStart)>,
    nats: Option<(RawNats, TableStart)>,
    defaults: Option<(RawDefaults, TableStart)>,
    dead_letter: Option<(RawDeadLetter, TableStart)>,
    idempotency_store: Option<(RawIdempotencyStore, TableStart)>,
    outbound: Vec<(RawOutbound, TableStart)>,
    inbound: Vec<(RawInbound, TableStart)>,
    streams: Vec<(RawStream, TableStart)>,
    /// `None` also when the file has no `[telemetry]`: then nothing is exported.
    telemetry: Option<(RawTelemetry, TableStart)>,
}

/// Validates the whole document; `None` only when errors were pushed.
pub(super) fn validate(doc: RawDocument, diags: &mut Diagnostics<'_>) -> Option<Config> {
    let raw = deserialize_sections(doc, diags);

    let sidecar = raw.sidecar.map(|(raw, at)| sidecar::sidecar(raw, at, diags));
    let nats = raw.nats.map(|(raw, at)| sidecar::nats(raw, at, diags));
    let defaults = raw.defaults.map(|(raw, at)| defaults_section(raw, at, diags));
    let mut streams: Vec<_> = raw.streams.into_iter().filter_map(|(raw, at)| streams::stream(raw, at, diags)).collect();
    let service = sidecar.as_ref().map(|s| s.service.clone()).unwrap_or_default();
    let reply_prefixes = sidecar.as_ref().map(|s| s.reply_prefixes.clone()).unwrap_or_default();
    let dead_letter = raw.dead_letter.map(|(raw, at)| streams::dead_letter(raw, at, diags));
    let idempotency = raw.idempotency_store.map(|(raw, at)| streams::idempotency_store(raw, at, diags));
    let telemetry = raw.telemetry.and_then(|(raw, at)| telemetry::telemetry(raw, at, &service, diags));

    let route_defaults = defaults.clone().unwrap_or(Defaults { timeout: DEFAULT_TIMEOUT, max_body: DEFAULT_MAX_BODY });
    let outbound: Vec<_> = raw
        .outbound
        .into_iter()
        .filter_map(|(raw, at)| outbound::outbound(raw, at, &route_defaults, &service, diags).map(|o| (o, at)))
        .collect();
    let inbound: Vec<_> = raw
        .inbound
        .into_iter()
        .filter_map(|(raw, at)| inbound::inbound(raw, at, &route_defaults, &service, &reply_prefixes, diags).map(|i| (i, at)))
        .collect();

    cross::check(&outbound, &inbound, &streams, dead_letter.as_ref(), diags);
    if let Some(s) = &sidecar {
        outbound::check_timeouts_against_idle(&outbound, s.http.idle_timeout, diags);
    }
    let routes: Vec<_> = outbound.iter().map(|(o, _)| o.clone()).collect();
    stream::mark_ttl_streams(&routes, &mut streams);

    Some(Config {
        sidecar: sidecar?,
        nats: nats?,
        defaults: defaults?,
        outbound: outbound.into_iter().map(|(o, _)| o).collect(),
        inbound: inbound.into_iter().map(|(i, _)| i).collect(),
        streams,
        dead_letter: dead_letter?,
        idempotency: idempotency?,
        telemetry,
        warnings: Vec::new(),
        source: PathBuf::from(diags.locator().file()),
    })
}

/// Deserializes each table on its own, so that one bad table does not hide the others.
fn deserialize_sections(doc: RawDocument, diags: &mut Diagnostics<'_>) -> RawSections {
    let top = TableStart::TOP;
    let sidecar = match doc.sidecar {
        Some(v) => section::<RawSidecar>(v, "[sidecar]", diags),
        None => {
            diags.error(top.unnamed(), None, "missing [sidecar] section (it needs at least `service`)");
            None
        }
    };
    let nats = optional_section(doc.nats, "[nats]", diags);
    let defaults = optional_section(doc.defaults, "[defaults]", diags);
    let dead_letter = optional_section(doc.dead_letter, "[dead_letter]", diags);
    let idempotency_store = optional_section(doc.idempotency, "[idempotency]", diags);
    let telemetry = doc.telemetry.and_then(|v| section::<RawTelemetry>(v, "[telemetry]", diags));
    // Before the routes' own errors, and on the raw tables: a duplicate is reported even
    // when the route has errors of its own.
    cross::check_raw_route_names(doc.outbound.iter().chain(doc.inbound.iter()), diags);
    let outbound = doc.outbound.into_iter().filter_map(|v| section::<RawOutbound>(v, "[[outbound]]", diags)).collect();
    let inbound = doc.inbound.into_iter().filter_map(|v| section::<RawInbound>(v, "[[inbound]]", diags)).collect();
    let streams = doc.streams.into_iter().filter_map(|v| section::<RawStream>(v, "[[streams]]", diags)).collect();
    RawSections { sidecar, nats, defaults, dead_letter, idempotency_store, outbound, inbound, streams, telemetry }
}

/// A section that may be left out: then all its defaults apply.
fn optional_section<T: for<'de> Deserialize<'de> + Default>(
    value: Option<Spanned<toml::Value>>,
    what: &str,
    diags: &mut Diagnostics<'_>,
) -> Option<(T, TableStart)> {
    match value {
        Some(v) => section::<T>(v, what, diags),
        None => Some((T::default(), TableStart::TOP)),
    }
}

/// Deserializes one table; on failure records the error at the offending key.
fn section<T: for<'de> Deserialize<'de>>(value: Spanned<toml::Value>, what: &str, diags: &mut Diagnostics<'_>) -> Option<(T, TableStart)> {
    let start = TableStart(value.span().start);
    let value = value.into_inner();
    let route = value.get("name").and_then(|n| n.as_str()).map(str::to_owned);
    match value.try_into::<T>() {
        Ok(t) => Some((t, start)),
        Err(e) => {
            let message = e.message().trim().to_owned();
            // serde names the offending key in backticks; point at its line.
            let key = message.split('`').nth(1).map(str::to_owned);
            diags.error(start.named(route.as_deref()), key.as_deref(), format!("{what}: {message}"));
            None
        }
    }
}

fn defaults_section(raw: RawDefaults, start: TableStart, diags: &mut Diagnostics<'_>) -> Defaults {
    let at = start.unnamed();
    Defaults {
        timeout: duration(at, "timeout", &raw.timeout, DEFAULT_TIMEOUT, diags),
        max_body: size(at, "max_body", &raw.max_body, DEFAULT_MAX_BODY, diags),
    }
}

/// The duration at `key`, or `default` when absent or invalid (invalid is reported).
fn duration(at: Table<'_>, key: &str, value: &Option<String>, default: Duration, diags: &mut Diagnostics<'_>) -> Duration {
    parsed(at, key, value, default, parse_duration, diags)
}

/// The size at `key`, or `default` when absent or invalid (invalid is reported).
fn size(at: Table<'_>, key: &str, value: &Option<String>, default: usize, diags: &mut Diagnostics<'_>) -> usize {
    parsed(at, key, value, default, parse_size, diags)
}

/// `value` (at `key`) through `parse`, or `default` when absent or invalid (invalid is
/// reported).
fn parsed<T, E: std::fmt::Display>(
    at: Table<'_>,
    key: &str,
    value: &Option<String>,
    default: T,
    parse: fn(&str) -> Result<T, E>,
    diags: &mut Diagnostics<'_>,
) -> T {
    match value {
        None => default,
        Some(s) => parse(s).unwrap_or_else(|e| {
            diags.error(at, Some(key), format!("`{key}`: {e}"));
            default
        }),
    }
}

fn storage(at: Table<'_>, value: &Option<String>, diags: &mut Diagnostics<'_>) -> Storage {
    match value.as_deref() {
        None | Some("file") => Storage::File,
        Some("memory") => Storage::Memory,
        Some(other) => {
            diags.error(at, Some("storage"), format!("`storage` must be \"file\" or \"memory\", not {other:?}"));
            Storage::File
        }
    }
}

/// Route and bucket names end up in metric labels, durable consumer names and KV bucket
/// names, so they keep to an alphabet all of those accept.
fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn check_route_name(at: Table<'_>, name: &str, diags: &mut Diagnostics<'_>) {
    if !is_valid_name(name) {
        diags.error(at, Some("name"), "`name` must be letters, digits, '-' or '_'");
    }
}

/// Reports `key` when it is set but the route's mode does not use it.
fn refuse_key(at: Table<'_>, mode: &str, key: &str, present: bool, diags: &mut Diagnostics<'_>) {
    if present {
        diags.error(at, Some(key), format!("`{key}` does not apply to mode \"{mode}\""));
    }
}

fn is_valid_stream_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && !s.chars().any(|c| matches!(c, '.' | '*' | '>' | '/' | '\\') || c.is_whitespace())
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{errors, MINIMAL};

    #[test]
    fn all_errors_are_reported_at_once_with_lines_and_names() {
        let src = format!(
            "{MINIMAL}\n[[outbound]]\nname = \"a\"\npath = \"/a\"\nmode = \"request\"\nsubject = \"a..b\"\n\n[[outbound]]\nname = \"b\"\npath = \"/b\"\nmode = \"teleport\"\n\n[[outbound]]\nname = \"c\"\npath = \"/c\"\nmode = \"publish\"\nsubject = \"c\"\nbogus = 1\n"
        );
        let e = errors(&src);
        assert_eq!(e.len(), 3, "{e:#?}");
        assert!(e[0].starts_with("t.toml:8: route \"a\": `subject`"), "{}", e[0]);
        assert!(e[1].starts_with("t.toml:13: route \"b\": unknown mode"), "{}", e[1]);
        assert!(e[2].starts_with("t.toml:20: route \"c\": [[outbound]]: unknown field `bogus`"), "{}", e[2]);
    }

    #[test]
    fn a_zero_claim_ttl_is_refused() {
        let e = errors(&format!("{MINIMAL}\n[idempotency]\nclaim_ttl = \"0s\"\n"));
        assert!(e.iter().any(|m| m.contains("`claim_ttl` must be more than 0")), "{e:#?}");
        assert!(e.iter().any(|m| m.starts_with("t.toml:")), "{e:#?}");
    }
}
