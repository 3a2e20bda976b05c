//! `[[outbound]]` routes: HTTP requests from the app that go out over NATS (or HTTP).

use super::{check_route_name, duration, refuse_key, size};
use crate::config::diagnostics::{Diagnostics, Table, TableStart};
use crate::config::raw::{RawAllowNatsHeaders, RawOutbound};
use crate::config::values::{parse_http_url, strip_port};
use crate::config::{AllowNatsHeaders, Defaults, Outbound, OutboundTarget, TUNNEL_PREFIX};
use crate::subject::{self, SubjectTemplate};
use std::time::Duration;

/// One validated route, or `None` when it had errors (all of them reported).
pub(super) fn outbound(
    raw: RawOutbound,
    start: TableStart,
    defaults: &Defaults,
    service: &str,
    diags: &mut Diagnostics<'_>,
) -> Option<Outbound> {
    let name = raw.name.clone();
    let at = start.named(Some(&name));
    let errors_before = diags.error_count();
    check_route_name(at, &name, diags);
    let method = raw.method.as_deref().and_then(|m| {
        http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
            .map_err(|_| diags.error(at, Some("method"), format!("`method` {m:?} is not an HTTP method")))
            .ok()
    });
    let host = raw.host.as_deref().map(|h| host_without_port(h, at, diags));
    let captures = subject::path_captures(&raw.path).unwrap_or_else(|e| {
        diags.error(at, Some("path"), format!("`path` {:?} can never match: {e}", raw.path));
        Vec::new()
    });
    let timeout = duration(at, "timeout", &raw.timeout, defaults.timeout, diags);
    // `http` routes stream the body: only a limit set on the route itself applies.
    let default_body = if raw.mode == "http" { usize::MAX } else { defaults.max_body };
    let max_body = size(at, "max_body", &raw.max_body, default_body, diags);
    if timeout.is_zero() {
        diags.error(at, Some("timeout"), "`timeout` must be more than zero");
    }
    let (codec, pattern) = super::codec::outbound(&raw, at, diags);
    let cloudevents = super::codec::cloudevents(&raw, codec, service, at, diags);
    let target = target(&raw, at, &captures, diags);
    let allow_nats_headers = allow_nats_headers(&raw, at, diags);
    let raw_mode_refuses = matches!(raw.mode.as_str(), "tunnel" | "http");
    refuse_key(at, &raw.mode, "schema", raw_mode_refuses && raw.schema.is_some(), diags);
    refuse_key(at, &raw.mode, "schemas", raw_mode_refuses && raw.schemas.is_some(), diags);
    let schema = super::contracts::route(&raw.schema, &raw.schemas, at, diags);
    let cutover = super::cutover::cutover(&raw, at, diags);
    let stream = super::stream::outbound_limits(&raw, at, diags);
    let ttl = super::stream::message_ttl(&raw, at, diags);
    let (always_async, async_ttl) = super::stream::async_keys(&raw, at, diags);
    if diags.error_count() > errors_before {
        return None;
    }
    Some(Outbound {
        name,
        line: diags.line_of(start),
        method,
        host,
        path: raw.path,
        target: target?,
        timeout,
        max_body,
        allow_nats_headers,
        codec,
        pattern,
        schema,
        cutover,
        stream,
        ttl,
        always_async,
        async_ttl,
        cloudevents,
    })
}

/// `allow_nats_headers`: `true`, `false`, or a list of `Nats-*` names; NATS modes only.
fn allow_nats_headers(raw: &RawOutbound, at: Table<'_>, diags: &mut Diagnostics<'_>) -> AllowNatsHeaders {
    let Some(allow) = &raw.allow_nats_headers else { return AllowNatsHeaders::None };
    refuse_key(at, &raw.mode, "allow_nats_headers", raw.mode == "http", diags);
    match allow {
        RawAllowNatsHeaders::All(true) => AllowNatsHeaders::All,
        RawAllowNatsHeaders::All(false) => AllowNatsHeaders::None,
        RawAllowNatsHeaders::Names(names) => {
            for n in names {
                if !n.to_ascii_lowercase().starts_with("nats-") || http::HeaderName::from_bytes(n.as_bytes()).is_err() {
                    diags.error(at, Some("allow_nats_headers"), format!("`allow_nats_headers`: {n:?} is not a Nats-* header name"));
                }
            }
            AllowNatsHeaders::Names(names.iter().map(|n| crate::codec::canonical_name(n)).collect())
        }
    }
}

/// Routes match the Host header without its port, case-insensitively.
fn host_without_port(host: &str, at: Table<'_>, diags: &mut Diagnostics<'_>) -> String {
    let h = host.trim().to_ascii_lowercase();
    // A bare IPv6 literal (`::1`) is bracketed, as a Host header or URI carries it; it
    // has no port to strip (`strip_port` would take `:1` for one).
    let h = if !h.starts_with('[') && h.matches(':').count() > 1 { format!("[{h}]") } else { strip_port(&h).to_owned() };
    if h.is_empty() || h.contains('/') || h.contains(' ') {
        diags.error(at, Some("host"), format!("`host` {h:?} is not a host name"));
    }
    h
}

/// What the mode does with a matched request; each mode takes its own keys and refuses
/// the others'.
fn target(raw: &RawOutbound, at: Table<'_>, captures: &[String], diags: &mut Diagnostics<'_>) -> Option<OutboundTarget> {
    let mode = raw.mode.as_str();
    let refuse = |key: &str, present: bool, diags: &mut Diagnostics<'_>| refuse_key(at, mode, key, present, diags);
    if mode != "subscribe" {
        refuse("stream", raw.stream.is_some(), diags);
        refuse("deliver", raw.deliver.is_some(), diags);
        refuse("heartbeat", raw.heartbeat.is_some(), diags);
    }
    match mode {
        "subscribe" => {
            refuse("service", raw.service.is_some(), diags);
            refuse("upstream", raw.upstream.is_some(), diags);
            let subject = subject_template(raw, at, captures, diags);
            super::stream::subscribe_target(raw, subject, at, diags)
        }
        "request" | "publish" | "jetstream" => {
            // `upstream` is a cut-over's HTTP side: see `cutover`.
            refuse("service", raw.service.is_some(), diags);
            subject_template(raw, at, captures, diags).map(|t| match mode {
                "request" => OutboundTarget::Request(t),
                "publish" => OutboundTarget::Publish(t),
                _ => OutboundTarget::JetStream(t),
            })
        }
        "tunnel" => {
            refuse("subject", raw.subject.is_some(), diags);
            tunnel_target(raw, at, diags)
        }
        "http" => {
            refuse("subject", raw.subject.is_some(), diags);
            refuse("service", raw.service.is_some(), diags);
            http_target(raw, at, diags)
        }
        other => {
            diags.error(
                at,
                Some("mode"),
                format!("unknown mode {other:?}; expected request, publish, jetstream, tunnel, http or subscribe"),
            );
            None
        }
    }
}

/// The subject of the NATS modes; its captures must all come from `path`.
fn subject_template(raw: &RawOutbound, at: Table<'_>, captures: &[String], diags: &mut Diagnostics<'_>) -> Option<SubjectTemplate> {
    if let Some(p) = &raw.pattern {
        return super::codec::pattern_subject(p, raw.subject.is_some(), at, diags);
    }
    let Some(s) = raw.subject.as_deref() else {
        diags.error(at, None, format!("mode \"{}\" needs `subject`", raw.mode));
        return None;
    };
    match SubjectTemplate::parse(s) {
        Ok(t) => {
            for cap in t.captures() {
                if !captures.iter().any(|c| c == cap) {
                    diags.error(at, Some("subject"), format!("`subject` uses {{{cap}}}, which `path` does not define"));
                }
            }
            Some(t)
        }
        Err(e) => {
            diags.error(at, Some("subject"), format!("`subject` {s:?} is not a valid NATS subject: {e}"));
            None
        }
    }
}

fn tunnel_target(raw: &RawOutbound, at: Table<'_>, diags: &mut Diagnostics<'_>) -> Option<OutboundTarget> {
    match &raw.service {
        Some(s) if subject::is_valid_token(s) => {
            Some(OutboundTarget::Tunnel { subject: format!("{TUNNEL_PREFIX}.{s}"), service: s.clone() })
        }
        Some(s) => {
            diags.error(at, Some("service"), format!("`service` {s:?} must be one subject token"));
            None
        }
        None => {
            diags.error(at, None, "mode \"tunnel\" needs `service` (the target's sidecar service)");
            None
        }
    }
}

fn http_target(raw: &RawOutbound, at: Table<'_>, diags: &mut Diagnostics<'_>) -> Option<OutboundTarget> {
    match raw.upstream.as_deref().map(parse_http_url) {
        Some(Ok(upstream)) => Some(OutboundTarget::Http { upstream }),
        Some(Err(e)) => {
            diags.error(at, Some("upstream"), format!("`upstream`: {e}"));
            None
        }
        None => {
            diags.error(at, None, "mode \"http\" needs `upstream`");
            None
        }
    }
}

/// A call that waits on NATS longer than `[sidecar] idle_timeout` never gets its 504: the
/// listener's watchdog closes a connection with a request in flight once nothing was read
/// or written on it for `idle_timeout`, and the caller sees a dropped connection instead.
/// `subscribe` streams write heartbeats, and async calls answer at once, so neither waits.
pub(super) fn check_timeouts_against_idle(outbound: &[(Outbound, TableStart)], idle_timeout: Duration, diags: &mut Diagnostics<'_>) {
    for (o, start) in outbound {
        if matches!(o.target, OutboundTarget::Subscribe(_)) || o.always_async || o.timeout < idle_timeout {
            continue;
        }
        diags.warn(
            start.named(Some(&o.name)),
            Some("timeout"),
            format!(
                "timeout {} is not below [sidecar] idle_timeout {}: a call still waiting then is cut with no answer, not a 504; \
                 raise idle_timeout or lower timeout",
                humantime::format_duration(o.timeout),
                humantime::format_duration(idle_timeout)
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{errors, MINIMAL};

    #[test]
    fn capture_missing_from_path_is_rejected() {
        let src = format!("{MINIMAL}[[outbound]]\nname = \"x\"\npath = \"/a/{{id}}\"\nsubject = \"a.{{other}}\"\nmode = \"request\"\n");
        let e = errors(&src);
        assert_eq!(e.len(), 1);
        assert!(e[0].contains("uses {other}, which `path` does not define"), "{}", e[0]);
        assert!(e[0].starts_with("t.toml:6:"), "{}", e[0]);
    }

    #[test]
    fn mode_specific_keys() {
        let src = format!(
            "{MINIMAL}[[outbound]]\nname = \"t\"\npath = \"/t\"\nmode = \"tunnel\"\n\
             [[outbound]]\nname = \"h\"\npath = \"/h\"\nmode = \"http\"\nsubject = \"x\"\nupstream = \"http://127.0.0.1:1\"\n"
        );
        let e = errors(&src);
        assert!(e.iter().any(|m| m.contains("\"t\": mode \"tunnel\" needs `service`")), "{e:#?}");
        assert!(e.iter().any(|m| m.contains("\"h\": `subject` does not apply")), "{e:#?}");
    }

    #[test]
    fn ipv6_hosts_are_matched_bracketed() {
        for host in ["::1", "[::1]", "[::1]:4280"] {
            let src =
                format!("{MINIMAL}[[outbound]]\nname = \"x\"\nhost = \"{host}\"\npath = \"/a\"\nsubject = \"a\"\nmode = \"publish\"\n");
            let c = crate::config::parse(&src, "t").unwrap_or_else(|e| panic!("{host}: {e}"));
            assert_eq!(c.outbound[0].host.as_deref(), Some("[::1]"), "{host}");
            let t = crate::egress::routes::RouteTable::new(&c);
            assert!(t.lookup(&http::Method::POST, Some("[::1]:4280"), "/a").is_ok(), "{host}");
        }
    }

    #[test]
    fn zero_http_timeouts_are_refused() {
        for key in ["header_read_timeout", "idle_timeout"] {
            let e = errors(&format!("{MINIMAL}{key} = \"0s\"\n"));
            assert!(e.iter().any(|m| m.contains(&format!("`{key}` must be more than zero")) && m.starts_with("t.toml:")), "{e:#?}");
        }
    }

    #[test]
    fn a_timeout_past_idle_timeout_is_warned_of() {
        let route = |name: &str, extra: &str| {
            format!("[[outbound]]\nname = \"{name}\"\npath = \"/{name}\"\nsubject = \"{name}\"\nmode = \"request\"\n{extra}")
        };
        let src = format!(
            "{MINIMAL}idle_timeout = \"30s\"\n{}{}{}",
            route("slow", "timeout = \"45s\"\n"),
            route("quick", "timeout = \"10s\"\n"),
            route("later", "timeout = \"45s\"\nasync = true\n")
        );
        let c = crate::config::parse(&src, "t.toml").unwrap_or_else(|e| panic!("{e}"));
        let w: Vec<String> = c.warnings.iter().map(|d| d.to_string()).collect();
        assert_eq!(w.len(), 1, "{w:#?}");
        assert!(w[0].contains("\"slow\"") && w[0].contains("timeout 45s is not below [sidecar] idle_timeout 30s"), "{w:#?}");
        assert_eq!(c.warnings[0].line, 9, "the route's timeout line: {w:#?}");
    }
}
