//! Egress with `codec = "nestjs"`: the body becomes a Nest packet's `data`; a request
//! reads the handler's replies (by its `id`) until the disposed one.
//!
//! The first `response` is held until the next message says what the answer is: the
//! disposed one makes it a whole response (one value: `200` JSON; none: `204`), an `err`
//! an error status, and a second `response` (an Observable handler) starts a streamed
//! response through [`super::stream::body`]: an event stream with one `data:` event per
//! value when the client accepts `text/event-stream`, else `application/x-ndjson`, one
//! JSON value a line. Once streaming, an `err`, a stall past `stream_stall` or
//! `stream_max` end the body as an error (`event: error`, or an aborted chunked body).
//! Nest's protocol has no cancel: a client going away just drops the waiter.

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::{HeaderValue, Response, StatusCode};
use serde_json::Value;
use tokio::time::Instant;

use crate::codec::nestjs::{self, Frame};
use crate::config::{Codec, Outbound, StreamLimits};
use crate::egress::stream::{body as stream_body, Guard, Piece};
use crate::egress::{full, Body, Egress};
use crate::nats::replies::{ReplyErrorKind, ReplyStream};
use crate::problem::BridgeError;

/// The route's pattern: its `pattern`, else the subject it sends to.
fn pattern(route: &Outbound, subject: &str) -> Value {
    route.pattern.clone().unwrap_or_else(|| Value::String(subject.to_owned()))
}

fn data(body: &[u8]) -> Result<Option<Value>, BridgeError> {
    nestjs::body_data(body).map_err(|e| BridgeError::BadRequest(e.to_string()))
}

/// The payload a `publish` or `jetstream` route sends: the body itself, or for NestJS the
/// event packet `{"pattern","data"}`.
pub(super) fn event_payload(route: &Outbound, subject: &str, body: Bytes) -> Result<Bytes, BridgeError> {
    match route.codec {
        Codec::Raw | Codec::CloudEvents => Ok(body),
        Codec::NestJs => Ok(nestjs::encode_event(&pattern(route, subject), data(&body)?.as_ref())),
    }
}

/// Whether the client's `Accept` names `text/event-stream`.
pub(super) fn wants_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|m| m.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream")))
}

/// One streamed value: an SSE `data:` event, or an NDJSON line. serde_json writes no raw
/// newline, so either framing holds.
fn frame_value(v: &Value, sse: bool) -> Bytes {
    let json = serde_json::to_vec(v).unwrap_or_default();
    let mut out = Vec::with_capacity(json.len() + 8);
    if sse {
        out.extend_from_slice(b"data: ");
    }
    out.extend_from_slice(&json);
    out.extend_from_slice(if sse { b"\n\n" } else { b"\n" });
    Bytes::from(out)
}

impl Egress {
    /// A NestJS `send`: the request packet with a reply subject of ours, then its replies
    /// until the disposed one or an `err`, answered whole or streamed (`sse`: as events).
    pub(super) async fn nest_request(
        &self,
        route: &Outbound,
        subject: String,
        headers: async_nats::HeaderMap,
        body: Bytes,
        sse: bool,
    ) -> Result<Response<Body>, BridgeError> {
        let id = nestjs::new_id();
        let payload = nestjs::encode_request(&pattern(route, &subject), data(&body)?.as_ref(), &id);
        let rid = headers.get(crate::codec::REQUEST_ID).map(|v| v.as_str().to_owned());
        self.ensure_connected()?;
        let started = Instant::now();
        let waiter = self.replies.stream(route.stream.buffer);
        let reply = waiter.reply_subject().clone();
        // The hand-off is under the route's deadline too: a stalled connection stops taking
        // commands, and the publish would wait for room forever.
        let handed = self.replies.client().publish_with_reply_and_headers(subject.clone(), reply, headers, payload);
        match tokio::time::timeout_at(started + route.timeout, handed).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.kind() == async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
                return Err(BridgeError::PayloadTooLarge { max_payload: self.nats.server_info().max_payload })
            }
            Ok(Err(e)) => return Err(BridgeError::Nats(e.into())),
            // Never queued (the send is cancel-safe): nothing reached NATS.
            Err(_) => return Err(BridgeError::HandOffTimeout { subject, timeout: route.timeout }),
        }
        let mut reader = Reader {
            waiter,
            id,
            subject,
            limits: route.stream.clone(),
            deadline: started + route.stream.max,
            sse,
            guard: None,
            done: false,
        };
        // `frame` skips other requests' replies: `Foreign` never comes back from it.
        let first = match reader.frame(started + route.timeout).await? {
            Some(Frame::Next(v)) => v,
            Some(Frame::Last(v)) => return Ok(whole(v)),
            Some(Frame::Err(err)) => return Err(BridgeError::NestErr(err)),
            Some(Frame::Foreign) | None => return Err(BridgeError::Timeout { subject: reader.subject, timeout: route.timeout }),
        };
        // Held: the next message says whether this is one value or the start of a stream.
        let until = reader.next_until();
        let (second, last) = match reader.frame(until).await? {
            Some(Frame::Last(None)) => return Ok(whole(Some(first))),
            Some(Frame::Last(Some(v))) => (v, true),
            Some(Frame::Next(v)) => (v, false),
            Some(Frame::Err(err)) => return Err(BridgeError::NestErr(err)),
            Some(Frame::Foreign) | None => return Err(reader.elapsed()),
        };
        reader.guard = Some(Guard::new(self.nats.clone(), None, self.metrics.clone(), route.name.clone()));
        if last {
            reader.end("complete");
        }
        let head = futures::stream::iter([Piece::Data(frame_value(&first, sse)), Piece::Data(frame_value(&second, sse))]);
        let pieces = head.chain(reader.into_stream());
        let mut res = Response::new(stream_body(pieces, sse, route.name.clone(), rid));
        let h = res.headers_mut();
        if sse {
            h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            h.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            // Proxies in front of the client must not buffer the events.
            h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        } else {
            h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
        }
        Ok(res)
    }
}

/// The handler's only value as a response: none is 204, one is itself as JSON.
fn whole(value: Option<Value>) -> Response<Body> {
    let Some(value) = value else {
        let mut res = Response::new(full(Bytes::new()));
        *res.status_mut() = StatusCode::NO_CONTENT;
        return res;
    };
    let mut res = Response::new(full(serde_json::to_vec(&value).unwrap_or_default()));
    res.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

/// Reads one Nest request's replies under the route's stream limits.
struct Reader {
    waiter: ReplyStream,
    id: String,
    subject: String,
    limits: StreamLimits,
    /// When `stream_max` runs out, counted from the request.
    deadline: Instant,
    sse: bool,
    /// Counts how the stream ended; only a streamed answer has one to count.
    guard: Option<Guard>,
    done: bool,
}

impl Reader {
    /// The next frame of this request (other requests' replies skipped), `None` when
    /// `until` passes first.
    async fn frame(&mut self, until: Instant) -> Result<Option<Frame>, BridgeError> {
        loop {
            let msg = match tokio::time::timeout_at(until, self.waiter.next()).await {
                Err(_) => return Ok(None),
                Ok(Ok(msg)) => msg,
                Ok(Err(e)) => {
                    return Err(match e.kind() {
                        ReplyErrorKind::NoResponders => BridgeError::NoResponders { subject: self.subject.clone() },
                        ReplyErrorKind::Overflow => BridgeError::StreamOverflow { buffer: self.limits.buffer },
                        _ => BridgeError::Nats(e.into()),
                    })
                }
            };
            match nestjs::decode_reply(&msg.payload, &self.id).map_err(BridgeError::NestReply)? {
                Frame::Foreign => {}
                frame => return Ok(Some(frame)),
            }
        }
    }

    /// How long the next message may take: `stream_stall`, within `stream_max`.
    fn next_until(&self) -> Instant {
        (Instant::now() + self.limits.stall).min(self.deadline)
    }

    /// The error for a wait that ran out: `stream_max` or `stream_stall`.
    fn elapsed(&self) -> BridgeError {
        if Instant::now() >= self.deadline {
            BridgeError::StreamTooLong { max: self.limits.max }
        } else {
            BridgeError::StreamStalled { stall: self.limits.stall }
        }
    }

    fn end(&mut self, end: &'static str) {
        self.done = true;
        if let Some(g) = &mut self.guard {
            g.ended(end);
        }
    }

    fn into_stream(self) -> impl Stream<Item = Piece> + Send + 'static {
        futures::stream::unfold(self, |mut r| async move {
            let piece = r.next().await?;
            Some((piece, r))
        })
    }

    async fn next(&mut self) -> Option<Piece> {
        if self.done {
            return None;
        }
        let until = self.next_until();
        let (end, piece) = match self.frame(until).await {
            Ok(Some(Frame::Next(v))) => return Some(Piece::Data(frame_value(&v, self.sse))),
            Ok(Some(Frame::Last(v))) => ("complete", v.map(|v| Piece::Data(frame_value(&v, self.sse)))),
            Ok(Some(Frame::Err(err))) => ("error", Some(Piece::Fail(BridgeError::NestErr(err)))),
            Ok(Some(Frame::Foreign)) => return None,
            Ok(None) => {
                let e = self.elapsed();
                (if matches!(e, BridgeError::StreamTooLong { .. }) { "limit" } else { "stall" }, Some(Piece::Fail(e)))
            }
            Err(e @ BridgeError::StreamOverflow { .. }) => ("overflow", Some(Piece::Fail(e))),
            Err(e) => ("gone", Some(Piece::Fail(e))),
        };
        if matches!(piece, Some(Piece::Fail(_))) {
            tracing::debug!(route = %self.guard.as_ref().map_or("", |g| g.route.as_str()), "a NestJS stream ended as an error");
        }
        self.end(end);
        piece
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_framed_as_events_or_lines() {
        let v = serde_json::json!({"a": "x\ny", "n": [1, 2]});
        assert_eq!(&frame_value(&v, true)[..], b"data: {\"a\":\"x\\ny\",\"n\":[1,2]}\n\n");
        assert_eq!(&frame_value(&v, false)[..], b"{\"a\":\"x\\ny\",\"n\":[1,2]}\n");
    }

    #[test]
    fn an_event_stream_is_chosen_by_accept() {
        let accept = |vals: &[&str]| {
            let mut h = http::HeaderMap::new();
            for v in vals {
                h.append(http::header::ACCEPT, HeaderValue::from_str(v).unwrap());
            }
            wants_event_stream(&h)
        };
        assert!(accept(&["text/event-stream"]));
        assert!(accept(&["application/json", "Text/Event-Stream; q=0.5"]));
        assert!(accept(&["application/json, text/event-stream;q=1"]));
        assert!(!accept(&[]));
        assert!(!accept(&["application/json", "text/*"]));
    }
}
