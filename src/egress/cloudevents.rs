//! Egress with `codec = "cloudevents"`: the app's HTTP CloudEvent (binary `ce-*` headers or
//! structured) keeps its attributes; a plain request becomes one, with `id` from
//! `Idempotency-Key` or generated, `source` = `/<service>/<route>`, `type` = the route's
//! `ce_type` or the subject, `time` = now. The event leaves in binary mode, and its `id`
//! is the message's `Nats-Msg-Id` (a jetstream stream deduplicates copies of one event).

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::codec::cloudevents::{self, Event};
use crate::codec::IDEMPOTENCY_KEY;
use crate::config::Outbound;
use crate::problem::BridgeError;

/// The event an egress request stands for, valid, or why it cannot be one (400).
pub(super) fn event(route: &Outbound, subject: &str, headers: &HeaderMap, body: Bytes) -> Result<Event, BridgeError> {
    let bad = |e: cloudevents::CeError| BridgeError::BadRequest(e.to_string());
    let event = match Event::from_http(headers, body.clone()).map_err(bad)? {
        Some(e) => e,
        None => {
            let ce = route.cloudevents.as_ref().expect("a cloudevents route has its attributes");
            let id = match headers.get(IDEMPOTENCY_KEY).and_then(|v| v.to_str().ok()) {
                Some(key) => key.to_owned(),
                None => uuid::Uuid::new_v4().to_string(),
            };
            let mut e = Event::new(&id, &ce.source, ce.kind.as_deref().unwrap_or(subject), body);
            e.set("time", &humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string());
            if let Some(ct) = headers.get(http::header::CONTENT_TYPE).and_then(|v| std::str::from_utf8(v.as_bytes()).ok()) {
                e.set("datacontenttype", ct);
            }
            e
        }
    };
    event.validate().map_err(bad)?;
    Ok(event)
}

/// The request's headers rewritten as the event in binary mode, ready for the raw NATS
/// header mapping: the app's own `ce-*` and `Content-Type` replaced by the event's
/// (`ce-datacontenttype` included, as the NATS binding carries it), and `Idempotency-Key`
/// set to its `id` (which becomes `Nats-Msg-Id`).
pub(super) fn write(event: &Event, headers: &mut HeaderMap) {
    let own: Vec<HeaderName> = headers.keys().filter(|n| cloudevents::is_ce_header(n.as_str())).cloned().collect();
    for n in own {
        headers.remove(n);
    }
    headers.remove(http::header::CONTENT_TYPE);
    for (name, value) in event.nats_headers() {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(&value)) {
            headers.insert(n, v);
        }
    }
    if let Some(v) = event.get("datacontenttype").and_then(|ct| HeaderValue::from_str(ct).ok()) {
        headers.insert(http::header::CONTENT_TYPE, v);
    }
    if let Some(v) = event.get("id").and_then(|id| HeaderValue::from_str(id).ok()) {
        headers.insert(IDEMPOTENCY_KEY, v);
    }
}
