//! `[[inbound]]` routes: NATS messages (core subscriptions, tunnels, JetStream consumers)
//! delivered to the app as HTTP calls.

use std::time::Duration;

use super::sidecar::reply_prefixes;
use super::{check_route_name, duration, is_valid_stream_name, refuse_key, size};
use crate::config::diagnostics::{Diagnostics, Table, TableStart};
use crate::config::raw::{RawIdempotency, RawInbound};
use crate::config::{
    Consumer, Defaults, Deliver, Forwarded, Idempotency, IdempotencyKey, Inbound, InboundMode, InboundModeName, TUNNEL_PREFIX,
};
use crate::subject::{self, PathTemplate, SubjectPattern};

/// One validated route, or `None` when it had errors (all of them reported).
pub(super) fn inbound(
    raw: RawInbound,
    start: TableStart,
    defaults: &Defaults,
    service: &str,
    reply_prefixes: &[String],
    diags: &mut Diagnostics<'_>,
) -> Option<Inbound> {
    let name = raw.name.clone();
    let at = start.named(Some(&name));
    let errors_before = diags.error_count();
    check_route_name(at, &name, diags);
    let mode_name = mode_name(&raw, at, diags)?;
    let (subject_text, subject) = subscription_subject(&raw, mode_name, service, at, diags)?;
    let method = method(&raw, mode_name, at, diags);
    let path = app_path(&raw, mode_name, subject.as_ref(), &subject_text, at, diags);
    let concurrency = raw.concurrency.unwrap_or(64);
    if concurrency == 0 {
        diags.error(at, Some("concurrency"), "`concurrency` must be at least 1");
    }
    let max_body = size(at, "max_body", &raw.max_body, defaults.max_body, diags);
    let queue = raw.queue.clone().unwrap_or_else(|| service.to_owned());
    if raw.queue.as_deref().is_some_and(|q| !subject::is_valid_token(q)) {
        diags.error(at, Some("queue"), "`queue` must be one subject token");
    }
    let (mode, timeout) = match mode_name {
        InboundModeName::Request | InboundModeName::Tunnel => {
            for (key, present) in jetstream_keys(&raw) {
                refuse_key(at, mode_name.as_str(), key, present, diags);
            }
            let timeout = duration(at, "timeout", &raw.timeout, defaults.timeout, diags);
            let mode = if mode_name == InboundModeName::Request { InboundMode::Request { queue } } else { InboundMode::Tunnel { queue } };
            (mode, timeout)
        }
        InboundModeName::JetStream => {
            refuse_key(at, mode_name.as_str(), "queue", raw.queue.is_some(), diags);
            let (consumer, timeout) = jetstream_consumer(&raw, service, concurrency, at, diags);
            (InboundMode::JetStream(consumer), timeout)
        }
    };
    let idempotency = raw.idempotency.as_ref().and_then(|i| idempotency(i, at, diags));
    let forwarded = forwarded(&raw, at, diags);
    let extra_methods = extra_methods(&raw, mode_name, at, diags);
    let codec = super::codec::inbound(raw.codec.as_deref(), mode_name, at, diags);
    let reply_prefixes = reply_prefixes_of(&raw, mode_name, reply_prefixes, at, diags);
    // Core NATS has no flow control: without a byte bound, a slow app and large messages
    // fill the client's 65,536-message buffer (64 GiB at 1 MiB each).
    let max_buffer = size(at, "max_buffer", &raw.max_buffer, 16 << 20, diags);
    if mode_name == InboundModeName::JetStream {
        refuse_key(at, mode_name.as_str(), "max_buffer", raw.max_buffer.is_some(), diags);
    }
    let (stream_coalesce, stream_stall) = super::stream::inbound_stream(&raw, at, diags);
    let tunnel = mode_name == InboundModeName::Tunnel;
    refuse_key(at, mode_name.as_str(), "schema", tunnel && raw.schema.is_some(), diags);
    refuse_key(at, mode_name.as_str(), "schemas", tunnel && raw.schemas.is_some(), diags);
    let schema = super::contracts::route(&raw.schema, &raw.schemas, at, diags);
    if diags.error_count() > errors_before {
        return None;
    }
    Some(Inbound {
        name,
        line: diags.line_of(start),
        subject: subject?,
        mode,
        method,
        path: path?,
        concurrency,
        timeout,
        max_body,
        idempotency,
        reply_prefixes,
        forwarded,
        extra_methods,
        max_buffer,
        codec,
        stream_coalesce,
        stream_stall,
        schema,
    })
}

/// The route's reply prefixes, else the sidecar's; a jetstream route sends no replies.
fn reply_prefixes_of(
    raw: &RawInbound,
    mode: InboundModeName,
    sidecar: &[String],
    at: Table<'_>,
    diags: &mut Diagnostics<'_>,
) -> Vec<String> {
    if mode == InboundModeName::JetStream {
        refuse_key(at, mode.as_str(), "reply_prefixes", raw.reply_prefixes.is_some(), diags);
    }
    reply_prefixes(at, &raw.reply_prefixes, diags).unwrap_or_else(|| sidecar.to_vec())
}

fn forwarded(raw: &RawInbound, at: Table<'_>, diags: &mut Diagnostics<'_>) -> Forwarded {
    match raw.forwarded.as_deref() {
        None | Some("drop") => Forwarded::Drop,
        Some("trust") => Forwarded::Trust,
        Some(other) => {
            diags.error(at, Some("forwarded"), format!("`forwarded` {other:?} must be \"drop\" or \"trust\""));
            Forwarded::Drop
        }
    }
}

/// Methods a tunnel replays besides the standard ones: upper-case tokens, never `TRACE`
/// (it echoes the request, credentials included) or `CONNECT` (it opens a raw tunnel).
fn extra_methods(raw: &RawInbound, mode: InboundModeName, at: Table<'_>, diags: &mut Diagnostics<'_>) -> Vec<http::Method> {
    if mode != InboundModeName::Tunnel {
        refuse_key(at, mode.as_str(), "extra_methods", raw.extra_methods.is_some(), diags);
        return Vec::new();
    }
    let mut out = Vec::new();
    for m in raw.extra_methods.iter().flatten() {
        let upper = !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_');
        match http::Method::from_bytes(m.as_bytes()) {
            Ok(method) if upper && !matches!(m.as_str(), "TRACE" | "CONNECT") => out.push(method),
            _ => diags.error(
                at,
                Some("extra_methods"),
                format!("`extra_methods` {m:?} must be an upper-case method name other than TRACE and CONNECT"),
            ),
        }
    }
    out
}

fn mode_name(raw: &RawInbound, at: Table<'_>, diags: &mut Diagnostics<'_>) -> Option<InboundModeName> {
    match raw.mode.as_str() {
        "request" => Some(InboundModeName::Request),
        "tunnel" => Some(InboundModeName::Tunnel),
        "jetstream" => Some(InboundModeName::JetStream),
        other => {
            diags.error(at, Some("mode"), format!("unknown mode {other:?}; expected request, tunnel or jetstream"));
            None
        }
    }
}

/// The subject as written (a tunnel defaults to its service's) and, when valid, parsed.
/// `None` when a needed subject is missing: nothing else about the route can be checked.
fn subscription_subject(
    raw: &RawInbound,
    mode: InboundModeName,
    service: &str,
    at: Table<'_>,
    diags: &mut Diagnostics<'_>,
) -> Option<(String, Option<SubjectPattern>)> {
    if let Some(p) = &raw.pattern {
        return super::codec::inbound_pattern(p, raw, at, diags);
    }
    let text = match (mode, raw.subject.as_deref()) {
        (InboundModeName::Tunnel, None) => format!("{TUNNEL_PREFIX}.{service}"),
        (_, Some(s)) => s.to_owned(),
        (_, None) => {
            diags.error(at, None, format!("mode \"{}\" needs `subject`", mode.as_str()));
            return None;
        }
    };
    let parsed = SubjectPattern::parse(&text)
        .map_err(|e| diags.error(at, Some("subject"), format!("`subject` {text:?} is not a valid NATS subject: {e}")))
        .ok();
    Some((text, parsed))
}

/// The app's method; a tunnel replays the original request's, so it takes none.
fn method(raw: &RawInbound, mode: InboundModeName, at: Table<'_>, diags: &mut Diagnostics<'_>) -> http::Method {
    if mode == InboundModeName::Tunnel {
        refuse_key(at, mode.as_str(), "method", raw.method.is_some(), diags);
        refuse_key(at, mode.as_str(), "path", raw.path.is_some(), diags);
        return http::Method::GET;
    }
    let m = raw.method.as_deref().unwrap_or("POST");
    http::Method::from_bytes(m.to_ascii_uppercase().as_bytes()).unwrap_or_else(|_| {
        diags.error(at, Some("method"), format!("`method` {m:?} is not an HTTP method"));
        http::Method::POST
    })
}

/// The app's path; every `{N}` it uses must be a token the subject has.
fn app_path(
    raw: &RawInbound,
    mode: InboundModeName,
    subject: Option<&SubjectPattern>,
    subject_text: &str,
    at: Table<'_>,
    diags: &mut Diagnostics<'_>,
) -> Option<PathTemplate> {
    let p = match (mode, raw.path.as_deref()) {
        (InboundModeName::Tunnel, _) => return PathTemplate::parse("/").ok(),
        (_, None) => {
            diags.error(at, None, format!("mode \"{}\" needs `path` (the app's path)", mode.as_str()));
            return None;
        }
        (_, Some(p)) => p,
    };
    let template = PathTemplate::parse(p).map_err(|e| diags.error(at, Some("path"), format!("`path` {p:?}: {e}"))).ok()?;
    if let (Some(s), Some(max)) = (subject, template.max_token()) {
        if !s.has_token(max) {
            diags.error(at, Some("path"), format!("`path` uses {{{max}}} but `subject` {subject_text:?} has only {} tokens", s.len()));
        }
    }
    Some(template)
}

/// The keys only a JetStream consumer takes, and whether each is set.
fn jetstream_keys(raw: &RawInbound) -> [(&'static str, bool); 8] {
    [
        ("stream", raw.stream.is_some()),
        ("durable", raw.durable.is_some()),
        ("max_deliver", raw.max_deliver.is_some()),
        ("backoff", raw.backoff.is_some()),
        ("ack_wait", raw.ack_wait.is_some()),
        ("max_ack_pending", raw.max_ack_pending.is_some()),
        ("dead_letter", raw.dead_letter.is_some()),
        ("deliver", raw.deliver.is_some()),
    ]
}

/// The consumer and the HTTP call's deadline, which follows from `ack_wait` unless set.
fn jetstream_consumer(
    raw: &RawInbound,
    service: &str,
    concurrency: usize,
    at: Table<'_>,
    diags: &mut Diagnostics<'_>,
) -> (Consumer, Duration) {
    let ack_wait = duration(at, "ack_wait", &raw.ack_wait, Duration::from_secs(30), diags);
    let backoff: Vec<Duration> =
        raw.backoff.iter().flatten().map(|b| duration(at, "backoff", &Some(b.clone()), Duration::from_secs(1), diags)).collect();
    let max_deliver = raw.max_deliver.unwrap_or(5);
    if max_deliver < 1 {
        diags.error(at, Some("max_deliver"), "`max_deliver` must be at least 1");
    }
    if !backoff.is_empty() && backoff.len() as i64 >= max_deliver {
        // Delay n is used before delivery n+1, so steps past max_deliver-1 never apply.
        diags.warn(
            at,
            Some("backoff"),
            format!(
                "`backoff` has {} steps but only {} redeliveries happen (max_deliver {max_deliver}); the extra steps are unused",
                backoff.len(),
                max_deliver - 1
            ),
        );
    }
    if ack_wait < Duration::from_secs(1) {
        diags.error(at, Some("ack_wait"), "`ack_wait` must be at least 1s");
    }
    // Knative's rule: the call must end before the server redelivers.
    let derived = ack_wait.saturating_sub(Duration::from_millis(200));
    let timeout = match &raw.timeout {
        // A handler may run past ack_wait: in-progress acks keep the message.
        Some(_) => duration(at, "timeout", &raw.timeout, derived, diags),
        None => derived,
    };
    let (stream, durable, dead_letter) = consumer_names(raw, service, at, diags);
    let max_ack_pending = raw.max_ack_pending.unwrap_or(concurrency as i64 * 2);
    let deliver = deliver(&raw.deliver, at, diags);
    (
        Consumer { stream, durable, max_deliver, backoff, ack_wait, max_ack_pending, dead_letter, deliver, service: service.to_owned() },
        timeout,
    )
}

/// `deliver = "new" | "all" | "<RFC 3339 time>"`; new by default.
fn deliver(value: &Option<String>, at: Table<'_>, diags: &mut Diagnostics<'_>) -> Deliver {
    match value.as_deref() {
        None | Some("new") => Deliver::New,
        Some("all") => Deliver::All,
        Some(t) => match humantime::parse_rfc3339_weak(t) {
            Ok(time) => Deliver::StartTime(time),
            Err(_) => {
                diags.error(at, Some("deliver"), format!("`deliver` must be \"new\", \"all\" or an RFC 3339 time, not {t:?}"));
                Deliver::New
            }
        },
    }
}

/// The stream, the durable name (default `<service>-<route>`) and the dead-letter subject
/// (default `dlq.<service>.<route>`).
fn consumer_names(raw: &RawInbound, service: &str, at: Table<'_>, diags: &mut Diagnostics<'_>) -> (String, String, String) {
    let name = &raw.name;
    let stream = raw.stream.clone().unwrap_or_default();
    if raw.stream.is_none() {
        diags.error(at, None, "mode \"jetstream\" needs `stream`");
    } else if !is_valid_stream_name(&stream) {
        diags.error(at, Some("stream"), format!("`stream` {stream:?} is not a valid stream name"));
    }
    let durable = raw.durable.clone().unwrap_or_else(|| format!("{service}-{name}"));
    if !is_valid_stream_name(&durable) {
        diags.error(at, Some("durable"), format!("`durable` {durable:?} is not a valid consumer name"));
    }
    let dead_letter = raw.dead_letter.clone().unwrap_or_else(|| format!("dlq.{service}.{name}"));
    match SubjectPattern::parse(&dead_letter) {
        Ok(p) if !p.has_wildcards() => {}
        _ => diags.error(at, Some("dead_letter"), format!("`dead_letter` {dead_letter:?} must be a subject without wildcards")),
    }
    (stream, durable, dead_letter)
}

// Tunnels carry headers, so every key kind works for every mode.
fn idempotency(raw: &RawIdempotency, at: Table<'_>, diags: &mut Diagnostics<'_>) -> Option<Idempotency> {
    let Some(key) = idempotency_key(&raw.key) else {
        diags.error(at, Some("idempotency"), format!("idempotency `key` {:?} must be header:<Name>, msg-id or json:<pointer>", raw.key));
        return None;
    };
    let ttl = duration(at, "idempotency", &raw.ttl, Duration::from_secs(24 * 3600), diags);
    Some(Idempotency { key, ttl })
}

/// `header:<Name>`, `msg-id` or `json:<pointer>`.
fn idempotency_key(key: &str) -> Option<IdempotencyKey> {
    if let Some(h) = key.strip_prefix("header:") {
        http::HeaderName::from_bytes(h.as_bytes()).ok().map(|_| IdempotencyKey::Header(h.to_owned()))
    } else if key == "msg-id" {
        Some(IdempotencyKey::MsgId)
    } else if let Some(p) = key.strip_prefix("json:") {
        (p.is_empty() || p.starts_with('/')).then(|| IdempotencyKey::Json(p.to_owned()))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::test_support::{errors, MINIMAL};
    use crate::config::{parse, InboundMode};

    #[test]
    fn inbound_routes_validate_tokens_and_jetstream_defaults() {
        let src = format!(
            "{MINIMAL}[[inbound]]\nname = \"agent\"\nsubject = \"agent.*.execution.requested\"\nmode = \"request\"\npath = \"/agents/{{2}}/execute\"\n\
             [[inbound]]\nname = \"bad\"\nsubject = \"a.b\"\nmode = \"request\"\npath = \"/x/{{3}}\"\n"
        );
        let e = errors(&src);
        assert_eq!(e.len(), 1, "{e:#?}");
        assert!(e[0].contains("route \"bad\": `path` uses {3}"), "{e:#?}");

        let src = format!(
            "{MINIMAL}[[inbound]]\nname = \"tool\"\nsubject = \"tool.execution.requested\"\nmode = \"jetstream\"\nstream = \"TOOL\"\npath = \"/tools\"\nack_wait = \"10s\"\n"
        );
        let c = parse(&src, "t.toml").unwrap();
        let InboundMode::JetStream(consumer) = &c.inbound[0].mode else { panic!() };
        assert_eq!(consumer.durable, "orchestration-tool");
        assert_eq!(consumer.dead_letter, "dlq.orchestration.tool");
        assert_eq!(c.inbound[0].timeout, Duration::from_millis(9800));
        assert!(c.warnings.iter().any(|w| w.message.contains("not declared in [[streams]]")));
    }

    #[test]
    fn reply_prefixes_forwarded_and_extra_methods() {
        let c = parse(&format!("{MINIMAL}[[inbound]]\nname = \"t\"\nmode = \"tunnel\"\n"), "t.toml").unwrap();
        assert_eq!(c.inbound[0].reply_prefixes, ["_INBOX."]);
        assert!(!c.inbound[0].trusts_forwarded());
        let src = "[sidecar]\nservice = \"s\"\nreply_prefixes = [\"app.\"]\n\
                   [[inbound]]\nname = \"t\"\nmode = \"tunnel\"\nforwarded = \"trust\"\nextra_methods = [\"PROPFIND\"]\n";
        let c = parse(src, "t.toml").unwrap();
        assert_eq!(c.inbound[0].reply_prefixes, ["app."]);
        assert!(c.inbound[0].trusts_forwarded());
        assert_eq!(c.inbound[0].extra_methods, [http::Method::from_bytes(b"PROPFIND").unwrap()]);

        let src = format!(
            "{MINIMAL}[[inbound]]\nname = \"t\"\nmode = \"tunnel\"\nreply_prefixes = [\"$JS.\"]\nforwarded = \"yes\"\nextra_methods = [\"TRACE\", \"get\"]\n\
             [[inbound]]\nname = \"j\"\nsubject = \"a.b\"\nmode = \"jetstream\"\nstream = \"S\"\npath = \"/\"\nreply_prefixes = [\"x.\"]\nextra_methods = []\n"
        );
        let e = errors(&src).join("\n");
        for want in [
            "t.toml:6: route \"t\": reply prefix \"$JS.\" must",
            "t.toml:7: route \"t\": `forwarded` \"yes\"",
            "`extra_methods` \"TRACE\"",
            "`extra_methods` \"get\"",
            "route \"j\": `reply_prefixes` does not apply to mode \"jetstream\"",
            "route \"j\": `extra_methods` does not apply to mode \"jetstream\"",
        ] {
            assert!(e.contains(want), "{want}\n{e}");
        }
    }
}
