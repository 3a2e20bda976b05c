//! The streamed-reply keys: `stream_stall`, `stream_max`, `stream_buffer` and `stream_end`
//! on outbound `request`/`tunnel` routes, `stream_coalesce` on inbound ones.

use std::time::Duration;

use super::{duration, is_valid_stream_name, refuse_key};
use crate::config::diagnostics::{Diagnostics, Table};
use crate::config::raw::{RawInbound, RawOutbound};
use crate::config::{OutboundTarget, StreamLimits, Subscribe};
use crate::subject::SubjectTemplate;

/// `ttl` of a jetstream route: whole seconds, at least one (the server's `Nats-TTL` unit).
pub(super) fn message_ttl(raw: &RawOutbound, at: Table<'_>, diags: &mut Diagnostics<'_>) -> Option<std::time::Duration> {
    let value = raw.ttl.as_ref()?;
    refuse_key(at, &raw.mode, "ttl", raw.mode != "jetstream", diags);
    let ttl = duration(at, "ttl", &Some(value.clone()), std::time::Duration::ZERO, diags);
    if ttl.as_secs() == 0 || ttl.subsec_nanos() != 0 {
        diags.error(at, Some("ttl"), "`ttl` must be a whole number of seconds, at least 1s");
    }
    Some(ttl)
}

/// `async` and `async_ttl`: request and tunnel routes only; results kept 1 s to 7 days.
pub(super) fn async_keys(raw: &RawOutbound, at: Table<'_>, diags: &mut Diagnostics<'_>) -> (bool, std::time::Duration) {
    let replies = matches!(raw.mode.as_str(), "request" | "tunnel");
    refuse_key(at, &raw.mode, "async", raw.always_async.is_some() && !replies, diags);
    refuse_key(at, &raw.mode, "async_ttl", raw.async_ttl.is_some() && !replies, diags);
    let ttl = duration(at, "async_ttl", &raw.async_ttl, std::time::Duration::from_secs(3600), diags);
    if ttl.as_secs() == 0 || ttl.subsec_nanos() != 0 || ttl > std::time::Duration::from_secs(7 * 24 * 3600) {
        diags.error(at, Some("async_ttl"), "`async_ttl` must be whole seconds, from 1s to 7 days");
    }
    (raw.always_async.unwrap_or(false), ttl)
}

/// Streams that capture a jetstream route with `ttl` allow per-message TTLs.
pub(super) fn mark_ttl_streams(outbound: &[crate::config::Outbound], streams: &mut [crate::config::StreamSpec]) {
    for o in outbound {
        let (OutboundTarget::JetStream(t), Some(_)) = (&o.target, o.ttl) else { continue };
        let probe = t.probe();
        for s in streams.iter_mut().filter(|s| s.subjects.iter().any(|p| p.matches(&probe))) {
            s.allow_msg_ttl = true;
        }
    }
}

/// A `subscribe` route: `GET` only, an optional JetStream `stream`, `deliver` and `heartbeat`.
pub(super) fn subscribe_target(
    raw: &RawOutbound,
    subject: Option<SubjectTemplate>,
    at: Table<'_>,
    diags: &mut Diagnostics<'_>,
) -> Option<OutboundTarget> {
    if raw.method.as_deref().is_some_and(|m| !m.eq_ignore_ascii_case("GET")) {
        diags.error(at, Some("method"), "mode \"subscribe\" answers `GET` only (an SSE stream)");
    }
    if let Some(s) = raw.stream.as_deref().filter(|s| !is_valid_stream_name(s)) {
        diags.error(at, Some("stream"), format!("`stream` {s:?} is not a valid stream name"));
    }
    let deliver_all = match raw.deliver.as_deref() {
        None | Some("all") => true,
        Some("new") => false,
        Some(other) => {
            diags.error(at, Some("deliver"), format!("`deliver` {other:?}: expected \"all\" or \"new\""));
            true
        }
    };
    let heartbeat = duration(at, "heartbeat", &raw.heartbeat, std::time::Duration::from_secs(15), diags);
    if heartbeat.is_zero() {
        diags.error(at, Some("heartbeat"), "`heartbeat` must be more than zero");
    }
    Some(OutboundTarget::Subscribe(Subscribe { subject: subject?, stream: raw.stream.clone(), deliver_all, heartbeat }))
}

/// The reading limits of an outbound route; refused on modes that get no replies.
pub(super) fn outbound_limits(raw: &RawOutbound, at: Table<'_>, diags: &mut Diagnostics<'_>) -> StreamLimits {
    let replies = matches!(raw.mode.as_str(), "request" | "tunnel");
    // A subscribe route's stream is bounded by `stream_max` too.
    let subscribe = raw.mode == "subscribe";
    let keys = [
        ("stream_stall", raw.stream_stall.is_some()),
        ("stream_max", raw.stream_max.is_some() && !subscribe),
        // A core subscription is buffered for a slow client, bounded by it too.
        ("stream_buffer", raw.stream_buffer.is_some() && !(subscribe && raw.stream.is_none())),
        ("stream_end", raw.stream_end.is_some()),
    ];
    for (key, present) in keys {
        if key == "stream_buffer" && present && subscribe {
            // The ordered consumer pulls only as the client reads: nothing to bound.
            diags.error(at, Some(key), "`stream_buffer` bounds a core subscription; one on a `stream` is pulled as the client reads");
        } else {
            refuse_key(at, &raw.mode, key, present && !replies, diags);
        }
    }
    let d = StreamLimits::default();
    let stall = duration(at, "stream_stall", &raw.stream_stall, d.stall, diags);
    let max = duration(at, "stream_max", &raw.stream_max, d.max, diags);
    for (key, v) in [("stream_stall", stall), ("stream_max", max)] {
        if v.is_zero() {
            diags.error(at, Some(key), format!("`{key}` must be more than zero"));
        }
    }
    let buffer = raw.stream_buffer.unwrap_or(d.buffer);
    if buffer == 0 {
        diags.error(at, Some("stream_buffer"), "`stream_buffer` must be at least 1");
    }
    let end_on_empty = match raw.stream_end.as_deref() {
        None | Some("sequence") => false,
        Some("empty") => true,
        Some(other) => {
            diags.error(at, Some("stream_end"), format!("`stream_end` {other:?}: expected \"sequence\" or \"empty\""));
            false
        }
    };
    StreamLimits { stall, max, buffer, end_on_empty }
}

/// `stream_coalesce` and `stream_stall` of an inbound route: request and tunnel routes only.
pub(super) fn inbound_stream(raw: &RawInbound, at: Table<'_>, diags: &mut Diagnostics<'_>) -> (Duration, Duration) {
    let jetstream = raw.mode == "jetstream";
    refuse_key(at, &raw.mode, "stream_coalesce", raw.stream_coalesce.is_some() && jetstream, diags);
    refuse_key(at, &raw.mode, "stream_stall", raw.stream_stall.is_some() && jetstream, diags);
    let coalesce = duration(at, "stream_coalesce", &raw.stream_coalesce, Duration::from_millis(2), diags);
    if coalesce > Duration::from_millis(100) {
        diags.error(at, Some("stream_coalesce"), "`stream_coalesce` is at most 100ms: tokens must not wait long");
    }
    let stall = duration(at, "stream_stall", &raw.stream_stall, StreamLimits::default().stall, diags);
    if stall.is_zero() {
        diags.error(at, Some("stream_stall"), "`stream_stall` must be more than zero");
    }
    (coalesce, stall)
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{errors, MINIMAL};

    #[test]
    fn stream_keys_are_checked_and_refused_where_no_reply_comes() {
        let e = errors(&format!(
            "{MINIMAL}\n[[outbound]]\nname = \"a\"\npath = \"/a\"\nsubject = \"a\"\nmode = \"publish\"\nstream_stall = \"1s\"\n\n\
             [[outbound]]\nname = \"b\"\npath = \"/b\"\nsubject = \"b\"\nmode = \"request\"\nstream_end = \"never\"\nstream_buffer = 0\n"
        ))
        .join("\n");
        assert!(e.contains("`stream_stall` does not apply to mode \"publish\""), "{e}");
        assert!(e.contains("`stream_end` \"never\""), "{e}");
        assert!(e.contains("`stream_buffer` must be at least 1"), "{e}");
    }

    #[test]
    fn subscribe_routes_and_ttl_are_checked() {
        let route = |extra: &str| {
            format!("{MINIMAL}\n[[streams]]\nname = \"T\"\nsubjects = [\"t.>\"]\n\n[[outbound]]\nname = \"r\"\npath = \"/t/{{id}}\"\nsubject = \"t.{{id}}\"\n{extra}\n")
        };
        let e = errors(&route("mode = \"subscribe\"\nmethod = \"POST\"\nstream = \"a.b\"\ndeliver = \"last\"")).join("\n");
        assert!(e.contains("answers `GET` only") && e.contains("not a valid stream name") && e.contains("`deliver` \"last\""), "{e}");
        let e = errors(&route("mode = \"request\"\nttl = \"5s\"\nheartbeat = \"1s\"")).join("\n");
        assert!(e.contains("`ttl` does not apply") && e.contains("`heartbeat` does not apply"), "{e}");
        let e = errors(&route("mode = \"jetstream\"\nttl = \"1500ms\"")).join("\n");
        assert!(e.contains("whole number of seconds"), "{e}");
        let c = crate::config::parse(&route("mode = \"jetstream\"\nttl = \"30s\""), "t.toml").unwrap();
        assert_eq!(c.outbound[0].ttl, Some(std::time::Duration::from_secs(30)));
        assert!(c.streams[0].allow_msg_ttl, "the stream capturing a ttl route allows message TTLs");
        let c = crate::config::parse(&route("mode = \"subscribe\"\nstream = \"T\""), "t.toml").unwrap();
        match &c.outbound[0].target {
            crate::config::OutboundTarget::Subscribe(s) => {
                assert_eq!((s.stream.as_deref(), s.deliver_all, s.heartbeat), (Some("T"), true, std::time::Duration::from_secs(15)))
            }
            other => panic!("{other:?}"),
        }
        assert!(!c.streams[0].allow_msg_ttl);
        // `stream_buffer` bounds a core subscription only.
        let c = crate::config::parse(&route("mode = \"subscribe\"\nstream_buffer = 8"), "t.toml").unwrap();
        assert_eq!(c.outbound[0].stream.buffer, 8);
        let e = errors(&route("mode = \"subscribe\"\nstream = \"T\"\nstream_buffer = 8")).join("\n");
        assert!(e.contains("`stream_buffer` bounds a core subscription"), "{e}");
        let e = errors(&route("mode = \"publish\"\nstream_buffer = 8")).join("\n");
        assert!(e.contains("`stream_buffer` does not apply to mode \"publish\""), "{e}");
    }

    #[test]
    fn stream_limits_default_and_parse() {
        let src = format!(
            "{MINIMAL}\n[[outbound]]\nname = \"b\"\npath = \"/b\"\nsubject = \"b\"\nmode = \"request\"\nstream_end = \"empty\"\nstream_stall = \"2s\"\n"
        );
        let c = crate::config::parse(&src, "t.toml").unwrap();
        let s = &c.outbound[0].stream;
        assert!(s.end_on_empty);
        assert_eq!((s.stall, s.max, s.buffer), (std::time::Duration::from_secs(2), std::time::Duration::from_secs(600), 256));
    }
}
