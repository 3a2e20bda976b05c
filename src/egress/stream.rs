//! The reader side of streamed replies (the wire contract is in [`crate::streamed`]), and
//! the streamed HTTP response writer any multi-message reply can reuse.
//!
//! [`body`] turns a stream of [`Piece`]s into a response body: data as it comes, and an
//! ending that can never pass for a complete body when it is not one: an event stream
//! gets a final `event: error`, anything else loses its connection before the terminating
//! chunk.
//!
//! [`Egress::request_reply`] sends a request or tunnel call with a waiter on the reply
//! multiplexer (no subscription of its own). A plain reply becomes a whole response; a
//! first reply with `Bridge-Stream-Seq` (or any reply, on a `stream_end = "empty"` route)
//! starts a streamed response whose status and headers go out at once. A gap, a stall
//! past `stream_stall`, `stream_max` or a reader slower than `stream_buffer` end it as
//! an error; whenever the stream ends without the responder ending it (those errors, or
//! the HTTP client going away), `Bridge-Stream: cancel` goes to its control subject.

use std::pin::Pin;
use std::time::Duration;

use async_nats::Subject;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::{HeaderValue, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::time::Instant;

use crate::codec;
use crate::config::Outbound;
use crate::egress::{full, Body, BoxError, Egress};
use crate::nats::replies::{ReplyError, ReplyErrorKind, ReplyStream};
use crate::own_time::Stage;
use crate::problem::BridgeError;
use crate::streamed::{self, Part, Sequence};

/// One piece of a streamed response. A `Fail` is the last piece.
pub(crate) enum Piece {
    Data(Bytes),
    Fail(BridgeError),
}

/// A streamed response body from `pieces`: it ends cleanly when they end; a `Fail` ends
/// an event stream (`sse`) with `event: error` and a problem document, and any other
/// body by aborting it (the client sees the missing terminating chunk).
pub(crate) fn body<S>(pieces: S, sse: bool, route: String, rid: Option<String>) -> Body
where
    S: Stream<Item = Piece> + Send + 'static,
{
    let frames = pieces
        .scan(false, |failed, piece| {
            let next = (!*failed).then(|| {
                *failed = matches!(piece, Piece::Fail(_));
                piece
            });
            std::future::ready(next)
        })
        .then(move |piece| {
            let frame = match piece {
                Piece::Data(b) => Ok(Frame::data(b)),
                Piece::Fail(e) if sse => Ok(Frame::data(sse_error(&e, &route, rid.as_deref()))),
                Piece::Fail(e) => Err(Box::new(e) as BoxError),
            };
            async move {
                if frame.is_err() {
                    // hyper drops what it has buffered but not yet written when a body
                    // fails: one `Pending` first lets it flush the head and the data
                    // before it aborts, or the client would see no response at all.
                    tokio::task::yield_now().await;
                }
                frame
            }
        });
    StreamBody::new(frames).boxed_unsync()
}

/// A streamed answer for an HTTP/1.0 client, held whole. 1.0 has no chunked encoding: a
/// body of unknown length is ended by closing the connection, so a cut stream would look
/// complete to it. Held, it gets the whole body with `Content-Length`, or the stream's
/// error as a problem, or a 502 past `limit` bytes. An answer of known length passes as
/// it is, and so does an event stream (its `event: error` shows a cut; holding a stream
/// meant to stay open would never answer).
pub(crate) async fn whole_for_http10(res: Response<Body>, limit: usize, route: &str, rid: Option<&str>) -> Response<Body> {
    let sse = res
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/event-stream"));
    if sse || http_body::Body::size_hint(res.body()).exact().is_some() {
        return res;
    }
    let (mut parts, mut body) = res.into_parts();
    let mut whole = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let data = match frame {
            Ok(f) => f.into_data().unwrap_or_default(),
            Err(e) => {
                let e = e.downcast::<BridgeError>().map_or_else(|e| BridgeError::StreamFailed(e.to_string()), |e| *e);
                return e.to_response(Some(route), rid).map(full);
            }
        };
        if whole.len() + data.len() > limit {
            // Dropping the body ends the stream: the responder is told to stop.
            return BridgeError::StreamTooLargeForHttp10 { limit }.to_response(Some(route), rid).map(full);
        }
        whole.extend_from_slice(&data);
    }
    parts.headers.remove(http::header::TRANSFER_ENCODING);
    parts.headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(whole.len()));
    Response::from_parts(parts, full(whole.freeze()))
}

/// The last event of a failed event stream: `event: error`, the problem document as data.
pub(crate) fn sse_error(e: &BridgeError, route: &str, rid: Option<&str>) -> Bytes {
    let doc = e.to_response(Some(route), rid).into_body();
    let mut out = Vec::with_capacity(doc.len() + 32);
    out.extend_from_slice(b"event: error\n");
    // A problem document is one line of JSON, but data must never carry a raw newline.
    for line in doc.split(|b| *b == b'\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.push(b'\n');
    Bytes::from(out)
}

/// What reading replies takes, apart from the egress listener (an async call runs on its
/// own task, with its own clones of these).
#[derive(Clone, Copy)]
pub(crate) struct Replier<'a> {
    pub nats: &'a async_nats::Client,
    pub replies: &'a crate::nats::replies::Replies,
    pub metrics: &'a crate::metrics::Metrics,
    /// When the HTTP request's head was read, for the sidecar's own time (`own_time`);
    /// `None` for calls that are not an HTTP request's (async operations).
    pub head_read: Option<std::time::Instant>,
}

impl Egress {
    pub(super) fn replier(&self) -> Replier<'_> {
        Replier { nats: &self.nats, replies: &self.replies, metrics: &self.metrics, head_read: None }
    }

    pub(super) async fn request_reply(
        &self,
        route: &Outbound,
        subject: String,
        headers: async_nats::HeaderMap,
        payload: Bytes,
        rid: Option<String>,
        head_read: Option<std::time::Instant>,
    ) -> Result<Response<Body>, BridgeError> {
        Replier { head_read, ..self.replier() }.request_reply(route, subject, headers, payload, rid).await
    }
}

impl Replier<'_> {
    /// A request or tunnel call: publishes with a multiplexer waiter as reply subject, then
    /// answers with the reply, whole or streamed.
    pub(crate) async fn request_reply(
        &self,
        route: &Outbound,
        subject: String,
        headers: async_nats::HeaderMap,
        payload: Bytes,
        rid: Option<String>,
    ) -> Result<Response<Body>, BridgeError> {
        let started = Instant::now();
        let mut waiter = self.replies.stream(route.stream.buffer);
        let reply = waiter.reply_subject().clone();
        // One deadline over the hand-off and the wait: the client's publish awaits room in
        // its command queue, which a frozen or half-open server never makes, so an
        // unbounded hand-off hung the call past its timeout with no answer. One timer, and
        // it is only registered if something is still pending.
        let mut handed = false;
        let sent = async {
            self.nats
                .publish_with_reply_and_headers(subject.clone(), reply, headers, payload)
                .await
                .map_err(|e| self.reply_error(ReplyError::from(e), &subject, route))?;
            handed = true;
            if let Some(read) = self.head_read {
                self.metrics.own_time.record(Stage::EgressToNats, read.elapsed());
            }
            waiter.next().await.map_err(|e| self.reply_error(e, &subject, route))
        };
        let first = match tokio::time::timeout_at(started + route.timeout, sent).await {
            Ok(first) => first?,
            // Never queued (the queue's send is cancel-safe): nothing reached NATS.
            Err(_) if !handed => return Err(BridgeError::HandOffTimeout { subject, timeout: route.timeout }),
            Err(_) => return Err(BridgeError::Timeout { subject, timeout: route.timeout }),
        };
        // The waiter got the reply: the start of the sidecar's own time on the way back.
        let reply_read = std::time::Instant::now();
        let seq = streamed::is_stream(first.headers.as_ref());
        if !seq && !route.stream.end_on_empty {
            let r = codec::reply_to_response(first.headers.as_ref(), first.payload).map_err(BridgeError::BadReply)?;
            let mut res = Response::new(full(r.body));
            *res.status_mut() = r.status;
            *res.headers_mut() = r.headers;
            // `handle` records the rest of this stage once the response is complete (only
            // when recording: the first extension allocates the response's map).
            if self.metrics.own_time.enabled() {
                res.extensions_mut().insert(ReplyRead(reply_read));
            }
            return Ok(res);
        }
        let mut sequence = seq.then(Sequence::default);
        let part = match &mut sequence {
            Some(s) => s.accept(first.headers.as_ref()).map_err(BridgeError::StreamBroken)?,
            None if first.payload.is_empty() => Part::End,
            None => Part::Data,
        };
        let control = first.headers.as_ref().and_then(|h| h.get(streamed::STREAM_CONTROL)).map(|v| Subject::from(v.as_str()));
        let r = codec::reply_to_response(first.headers.as_ref(), Bytes::new()).map_err(BridgeError::BadReply)?;
        let mut res_headers = r.headers;
        for h in streamed::CONTROL_HEADERS {
            res_headers.remove(*h);
        }
        let sse = streamed::is_event_stream(&res_headers);
        if sse {
            // Proxies in front of the client must not buffer the events.
            res_headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
        }
        let mut guard = Guard::new(self.nats.clone(), control, self.metrics.clone(), route.name.clone());
        guard.heard(first.reply.as_ref());
        let reader = Reader {
            waiter,
            sequence,
            first: Some((first.payload, part)),
            stall: route.stream.stall,
            max: route.stream.max,
            deadline: started + route.stream.max,
            buffer: route.stream.buffer,
            guard,
            done: false,
        };
        let mut res = Response::new(body(reader.into_stream(), sse, route.name.clone(), rid));
        *res.status_mut() = r.status;
        *res.headers_mut() = res_headers;
        Ok(res)
    }

    fn reply_error(&self, e: ReplyError, subject: &str, route: &Outbound) -> BridgeError {
        match e.kind() {
            ReplyErrorKind::NoResponders => BridgeError::NoResponders { subject: subject.to_owned() },
            ReplyErrorKind::TimedOut => BridgeError::Timeout { subject: subject.to_owned(), timeout: route.timeout },
            ReplyErrorKind::MaxPayloadExceeded => BridgeError::PayloadTooLarge { max_payload: self.nats.server_info().max_payload },
            ReplyErrorKind::InvalidSubject => BridgeError::BadRequest(format!("invalid subject {subject:?}")),
            ReplyErrorKind::Overflow | ReplyErrorKind::Closed | ReplyErrorKind::Other => BridgeError::Nats(e.into()),
        }
    }
}

/// Says how a reader's stream ended, and cancels the responder's stream unless the
/// responder ended it: dropped with the body, so a client going away cancels too. Without
/// a `control` subject (a NestJS stream) it only counts the ending.
pub(super) struct Guard {
    nats: async_nats::Client,
    /// The responder's control subject (`Bridge-Stream-Control`); `None` once nothing is
    /// to be cancelled.
    control: Option<Subject>,
    /// Where the cancel goes: the reply subject of the latest message, when it is the
    /// control subject or under it, else the control subject.
    cancel_to: Option<Subject>,
    /// How it ended; `cancel` until something else is known.
    pub(super) end: &'static str,
    metrics: crate::metrics::Metrics,
    pub(super) route: String,
}

impl Guard {
    pub(super) fn new(nats: async_nats::Client, control: Option<Subject>, metrics: crate::metrics::Metrics, route: String) -> Self {
        Self { nats, control, cancel_to: None, end: "cancel", metrics, route }
    }

    /// A message of the stream came with `reply`. Under NATS response permissions
    /// (`allow_responses`) a reader may publish only to reply subjects of messages it
    /// received, and nats-server 2.14 spends that right when a second message arrives with
    /// the same reply subject; a responder that gives each message its own subject under
    /// the control subject (as ours does) leaves the latest one always answerable.
    pub(super) fn heard(&mut self, reply: Option<&Subject>) {
        let (Some(control), Some(reply)) = (&self.control, reply) else { return };
        if streamed::is_under_control(control, reply) {
            self.cancel_to = Some(reply.clone());
        }
    }

    /// The responder ended the stream: nothing to cancel.
    pub(super) fn ended(&mut self, end: &'static str) {
        self.end = end;
        self.control = None;
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.metrics.streams.with_label_values(&["reader", &self.route, self.end]).inc();
        let Some(control) = self.control.take() else { return };
        let control = self.cancel_to.take().unwrap_or(control);
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let nats = self.nats.clone();
        let mut h = async_nats::HeaderMap::new();
        h.insert(streamed::STREAM, streamed::CANCEL);
        rt.spawn(async move {
            if let Err(e) = nats.publish_with_headers(control, h, Bytes::new()).await {
                tracing::debug!(error = %e, "could not cancel a streamed reply");
            }
        });
    }
}

/// Reads a streamed reply's messages, in order, under the route's limits.
struct Reader {
    waiter: ReplyStream,
    /// `None` on `stream_end = "empty"` routes: no sequence numbers, an empty payload ends.
    sequence: Option<Sequence>,
    first: Option<(Bytes, Part)>,
    stall: Duration,
    max: Duration,
    deadline: Instant,
    buffer: usize,
    guard: Guard,
    done: bool,
}

impl Reader {
    fn into_stream(self) -> Pin<Box<dyn Stream<Item = Piece> + Send>> {
        Box::pin(futures::stream::unfold(self, |mut r| async move {
            let piece = r.next().await?;
            Some((piece, r))
        }))
    }

    async fn next(&mut self) -> Option<Piece> {
        loop {
            if self.done {
                return None;
            }
            let (payload, part) = match self.first.take() {
                Some(first) => first,
                None => match self.receive().await {
                    Ok(m) => m,
                    Err((end, e)) => return Some(self.fail(end, e)),
                },
            };
            match part {
                Part::Data if payload.is_empty() => continue,
                Part::Data => return Some(Piece::Data(payload)),
                Part::End => {
                    self.done = true;
                    self.guard.ended("complete");
                    if payload.is_empty() {
                        return None;
                    }
                    return Some(Piece::Data(payload));
                }
                Part::Error => {
                    self.guard.ended("error");
                    let detail = serde_json::from_slice::<serde_json::Value>(&payload)
                        .ok()
                        .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(str::to_owned))
                        .unwrap_or_else(|| String::from_utf8_lossy(&payload).into_owned());
                    self.done = true;
                    return Some(Piece::Fail(BridgeError::StreamFailed(detail)));
                }
            }
        }
    }

    fn fail(&mut self, end: &'static str, e: BridgeError) -> Piece {
        self.done = true;
        // Still armed: the responder is told to stop when the stream is dropped.
        self.guard.end = end;
        tracing::debug!(route = %self.guard.route, error = %e, "streamed reply ended as an error");
        Piece::Fail(e)
    }

    /// The next message, checked; `Err` with how the stream ends.
    async fn receive(&mut self) -> Result<(Bytes, Part), (&'static str, BridgeError)> {
        let now = Instant::now();
        if now >= self.deadline {
            return Err(("limit", BridgeError::StreamTooLong { max: self.max }));
        }
        let wait = self.stall.min(self.deadline - now);
        let m = match tokio::time::timeout(wait, self.waiter.next()).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) if e.kind() == ReplyErrorKind::Overflow => {
                return Err(("overflow", BridgeError::StreamOverflow { buffer: self.buffer }));
            }
            Ok(Err(e)) if e.kind() == ReplyErrorKind::NoResponders => {
                return Err(("gone", BridgeError::StreamBroken(streamed::WireError::NoSequence)));
            }
            Ok(Err(e)) => return Err(("gone", BridgeError::Nats(e.into()))),
            Err(_) if wait < self.stall => return Err(("limit", BridgeError::StreamTooLong { max: self.max })),
            Err(_) => return Err(("stall", BridgeError::StreamStalled { stall: self.stall })),
        };
        self.guard.heard(m.reply.as_ref());
        let part = match &mut self.sequence {
            Some(s) => s.accept(m.headers.as_ref()).map_err(|e| ("gap", BridgeError::StreamBroken(e)))?,
            None if m.payload.is_empty() => Part::End,
            None => Part::Data,
        };
        Ok((m.payload, part))
    }
}

/// When the reply of a NATS request was read (a response extension, taken off in `handle`).
#[derive(Clone, Copy)]
pub(super) struct ReplyRead(pub(super) std::time::Instant);

#[cfg(test)]
mod tests {
    use super::*;

    fn streamed(pieces: Vec<Piece>, content_type: &'static str) -> Response<Body> {
        let mut res = Response::new(body(futures::stream::iter(pieces), false, "r".into(), None));
        res.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        res
    }

    async fn text(res: Response<Body>) -> (u16, Option<String>, String) {
        let status = res.status().as_u16();
        let len = res.headers().get(http::header::CONTENT_LENGTH).map(|v| v.to_str().unwrap().to_owned());
        let body = res.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        (status, len, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn a_whole_stream_gets_its_length_and_a_cut_or_oversized_one_a_problem() {
        let data = |s: &'static str| Piece::Data(Bytes::from_static(s.as_bytes()));
        let res = whole_for_http10(streamed(vec![data("ab"), data("cd")], "text/plain"), 4, "r", None).await;
        assert_eq!(text(res).await, (200, Some("4".into()), "abcd".into()));
        let res = whole_for_http10(streamed(vec![data("ab"), data("cde")], "text/plain"), 4, "r", None).await;
        let (status, _, body) = text(res).await;
        assert!(status == 502 && body.contains("stream-too-large-for-http10"), "{status} {body}");
        let cut = Piece::Fail(BridgeError::StreamStalled { stall: Duration::from_secs(1) });
        let res = whole_for_http10(streamed(vec![data("ab"), cut], "text/plain"), 4, "r", None).await;
        let (status, _, body) = text(res).await;
        assert!(status == 504 && body.contains("stream-stalled") && !body.contains("ab"), "{status} {body}");
    }

    #[tokio::test]
    async fn an_event_stream_or_a_body_of_known_length_passes_as_it_is() {
        let sse = streamed(vec![Piece::Data(Bytes::from_static(b"data: 1\n\n"))], "Text/Event-Stream; charset=utf-8");
        let res = whole_for_http10(sse, 1, "r", None).await;
        assert!(res.headers().get(http::header::CONTENT_LENGTH).is_none());
        assert_eq!(text(res).await.2, "data: 1\n\n");
        let known = Response::new(full(Bytes::from_static(b"whole")));
        assert_eq!(text(whole_for_http10(known, 1, "r", None).await).await.2, "whole");
    }
}
