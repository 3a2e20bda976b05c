//! The streamed-reply keys: `stream_stall`, `stream_max`, `stream_buffer` and `stream_end`
//! on outbound `request`/`tunnel` routes, `stream_coalesce` on inbound ones.

use std::time::Duration;

use super::{duration, is_valid_stream_name, refuse_key};
use crate::config::diagnostics::{Diagnostics, Table};
use crate::config::raw::{RawInbound, RawOutbound};
use crate::config::{OutboundTarget, StreamLimits, Subscribe};
use crate::subject::SubjectTemplate;

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
        ("stream_buffer", raw.stream_buffer.is_some()),
        ("stream_end", raw.stream_end.is_some()),
    ];
    for (key, present) in keys {
        refuse_key(at, &raw.mode, key, present && !replies, diags);
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
