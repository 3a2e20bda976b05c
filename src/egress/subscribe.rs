//! `mode = "subscribe"`: an HTTP `GET` becomes a live SSE stream of a subject, each message
//! one event (`id:` its stream sequence, `event:` its `Bridge-Event` header, `data:` its
//! payload), written by [`super::stream::body`].
//!
//! With `stream`, each client gets its own ordered consumer (ephemeral, in memory, no
//! acks; it recreates itself from the last delivered sequence after a gap or a NATS
//! reconnect), so replay and resume are JetStream's: `Last-Event-ID: N` starts after
//! sequence N, with no gap and no duplicate. The consumer is deleted when the client
//! goes (a recreated one is reaped by the server after 30 s of inactivity). Without
//! `stream`, a core subscription: live messages only, no ids. Its messages are read at
//! once into a bounded buffer (`stream_buffer`, [`crate::nats::replies::subscription`]): a
//! client that falls behind it gets `event: error` (`stream-overflow`) and a cut body, not
//! silently lost messages nor an unbounded backlog. A JetStream stream needs no such
//! bound: the ordered consumer pulls only as the client reads.
//!
//! A message with `Bridge-Stream: end` ends the stream cleanly; a comment every
//! `heartbeat` keeps proxies from cutting an idle one; `stream_max` bounds its life.
//!
//! Only that end is clean. Any other (`stream_max`, a subscription that ended or keeps
//! failing) sends an `event: error` and then aborts the body, so the chunked terminator
//! never comes: neither an SSE parser nor a raw HTTP reader can take it for complete.
//! EventSource reconnects after either, and resumes with `Last-Event-ID`.
//!
//! When the sidecar's stop starts (the `drain` token given to [`Egress`]), every open
//! stream ends at once with a `retry:` hint and no end event: the client reconnects with
//! `Last-Event-ID` (to another pod, as this one is no longer ready) and resumes, instead
//! of holding the listener's drain for its whole budget. A stream asked for while
//! draining gets only the hint, for the same reason (a non-200 would make EventSource
//! give up).

use std::pin::Pin;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::{HeaderValue, Response};
use tokio::time::Instant;

use super::stream::{body, sse_error, Piece};
use crate::config::{Outbound, Subscribe};
use crate::egress::{Body, Egress};
use crate::nats::connection::{is_connected, jetstream};
use crate::problem::BridgeError;
use crate::streamed;

/// The header naming a message's SSE event type.
pub const BRIDGE_EVENT: &str = "Bridge-Event";
const HEARTBEAT: &[u8] = b": keep-alive\n\n";

/// Source errors in a row, with no message between, after which the stream ends: past
/// what a reconnect or a consumer recreate reports, and a bound on a source that fails
/// at once on every poll (each error is a heartbeat to the client).
const MAX_HICCUPS: u32 = 20;

/// One message of the source: its sequence (JetStream), headers and payload.
type Item = Result<(Option<u64>, Option<async_nats::HeaderMap>, Bytes), SourceError>;

/// A source error, and whether it ends the stream now (the ordered consumer gave up;
/// going on would only repeat it).
struct SourceError {
    text: String,
    fatal: bool,
    /// The client fell behind the core subscription's buffer of this many messages.
    overflow: Option<usize>,
}
type Source = Pin<Box<dyn Stream<Item = Item> + Send>>;

impl Egress {
    pub(super) async fn subscribe(
        &self,
        route: &Outbound,
        sub: &Subscribe,
        subject: String,
        headers: &http::HeaderMap,
    ) -> Result<Response<Body>, BridgeError> {
        if !is_connected(&self.nats) {
            return Err(BridgeError::NatsDisconnected);
        }
        let last = match headers.get("last-event-id").map(|v| v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok())) {
            None => None,
            Some(Some(n)) => Some(n),
            Some(None) => return Err(BridgeError::BadRequest("Last-Event-ID is not a stream sequence".into())),
        };
        if self.drain.is_cancelled() {
            return Ok(sse_response(body(futures::stream::iter([Piece::Data(drain_retry())]), true, route.name.clone(), None)));
        }
        let (source, cleanup) = match &sub.stream {
            None => {
                let s = self.nats.subscribe(subject.clone()).await.map_err(|e| BridgeError::Nats(e.into()))?;
                (core(crate::nats::replies::subscription(s, route.stream.buffer)), None)
            }
            Some(stream) => self.ordered(stream, subject, sub.deliver_all, last).await?,
        };
        let rid = headers.get(crate::codec::REQUEST_ID).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let events = Events {
            source,
            heartbeat: sub.heartbeat,
            max: route.stream.max,
            deadline: Instant::now() + route.stream.max,
            drain: self.drain.clone(),
            hiccups: 0,
            failing: None,
            done: false,
            route: route.name.clone(),
            rid: rid.clone(),
            _cleanup: cleanup,
        };
        // Not `sse`: the error event is written by `Events` itself, and a failed end then
        // aborts the body (see the module's header), which `body` does for other bodies.
        Ok(sse_response(body(events.into_stream(), false, route.name.clone(), rid)))
    }

    /// An ordered consumer on `stream` for `subject`, starting after `last` when given.
    async fn ordered(&self, stream: &str, subject: String, all: bool, last: Option<u64>) -> Result<(Source, Option<Cleanup>), BridgeError> {
        let js = jetstream(self.nats.clone());
        let s = js.get_stream(stream).await.map_err(|e| match e.kind() {
            async_nats::jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                BridgeError::NoStream { subject: subject.clone() }
            }
            _ => BridgeError::Nats(e.into()),
        })?;
        let deliver_policy = match last {
            Some(n) => DeliverPolicy::ByStartSequence { start_sequence: n + 1 },
            None if all => DeliverPolicy::All,
            None => DeliverPolicy::New,
        };
        let name = format!("natsbridge-sse-{}", uuid::Uuid::new_v4().simple());
        let config = pull::OrderedConfig { name: Some(name.clone()), filter_subject: subject, deliver_policy, ..Default::default() };
        let consumer = s.create_consumer(config).await.map_err(|e| BridgeError::Nats(e.into()))?;
        let messages = consumer.messages().await.map_err(|e| BridgeError::Nats(e.into()))?;
        let source: Source = Box::pin(messages.map(|m| {
            let m = m.map_err(|e| {
                use async_nats::jetstream::consumer::pull::OrderedErrorKind as K;
                // The crate retries the rest itself; these it has given up on.
                let fatal = matches!(e.kind(), K::Recreate | K::PushBasedConsumer | K::RequestLimitExceeded);
                SourceError { text: e.to_string(), fatal, overflow: None }
            })?;
            let seq = m.info().map(|i| i.stream_sequence).map_err(|e| SourceError { text: e.to_string(), fatal: false, overflow: None })?;
            let m = m.message;
            Ok((Some(seq), m.headers, m.payload))
        }));
        Ok((source, Some(Cleanup { js, stream: stream.to_owned(), consumer: name })))
    }
}

/// A core subscription's buffered messages; an overflow is a fatal error, the
/// subscription's own end is the source's end.
fn core(sub: crate::nats::replies::Subscription) -> Source {
    use crate::nats::replies::Next;
    Box::pin(futures::stream::unfold(Some(sub), |sub| async move {
        let mut sub = sub?;
        match sub.next().await {
            Next::Message(m) => {
                let m = *m;
                Some((Ok((None, m.headers, m.payload)), Some(sub)))
            }
            Next::Ended { overflowed: true } => {
                let buffer = sub.capacity();
                Some((Err(SourceError { text: "the client fell behind".into(), fatal: true, overflow: Some(buffer) }), None))
            }
            Next::Ended { overflowed: false } => None,
        }
    }))
}

fn sse_response(body: Body) -> Response<Body> {
    let mut res = Response::new(body);
    let h = res.headers_mut();
    h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}

/// The last words of a stream ended by the drain: reconnect in 0.5 to 1.5 s (spread, so
/// a pod's clients do not all land on the next one at the same instant), then the body
/// closes with no end event. The comment says why, for a reader of the raw stream.
fn drain_retry() -> Bytes {
    let ms = 500 + (uuid::Uuid::new_v4().as_u128() % 1000) as u64;
    Bytes::from(format!(": draining; reconnect with Last-Event-ID\nretry: {ms}\n\n"))
}

/// Deletes a client's consumer when its stream is dropped (the client left, or it ended).
struct Cleanup {
    js: async_nats::jetstream::Context,
    stream: String,
    consumer: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let (js, stream, consumer) = (self.js.clone(), std::mem::take(&mut self.stream), std::mem::take(&mut self.consumer));
        rt.spawn(async move {
            if let Err(e) = js.delete_consumer_from_stream(&consumer, &stream).await {
                tracing::debug!(stream, consumer, error = %e, "could not delete an SSE client's consumer; the server reaps it");
            }
        });
    }
}

/// The SSE events of one client.
struct Events {
    source: Source,
    heartbeat: std::time::Duration,
    max: std::time::Duration,
    deadline: Instant,
    /// The sidecar's stop: ends the stream with [`drain_retry`].
    drain: tokio_util::sync::CancellationToken,
    /// Source errors since the last message.
    hiccups: u32,
    /// The error whose event was sent: the body aborts with it next.
    failing: Option<BridgeError>,
    done: bool,
    route: String,
    rid: Option<String>,
    _cleanup: Option<Cleanup>,
}

impl Events {
    fn into_stream(self) -> Pin<Box<dyn Stream<Item = Piece> + Send>> {
        Box::pin(futures::stream::unfold(self, |mut e| async move {
            let piece = e.next().await?;
            Some((piece, e))
        }))
    }

    async fn next(&mut self) -> Option<Piece> {
        if let Some(e) = self.failing.take() {
            return Some(Piece::Fail(e));
        }
        if self.done {
            return None;
        }
        let item = tokio::select! {
            // First: a stop that comes with messages waiting still ends the stream now;
            // the client resumes from the last id it got.
            biased;
            _ = self.drain.cancelled() => {
                self.done = true;
                return Some(Piece::Data(drain_retry()));
            }
            item = self.source.next() => item,
            _ = tokio::time::sleep(self.heartbeat) => return Some(Piece::Data(Bytes::from_static(HEARTBEAT))),
            _ = tokio::time::sleep_until(self.deadline) => {
                // Cut, not complete: the client reconnects with Last-Event-ID and resumes.
                return Some(self.fail(BridgeError::StreamTooLong { max: self.max }));
            }
        };
        let (seq, headers, payload) = match item {
            Some(Ok(m)) => m,
            Some(Err(SourceError { overflow: Some(buffer), .. })) => {
                tracing::debug!(route = %self.route, buffer, "SSE client too slow for its core subscription; ending the stream");
                return Some(self.fail(BridgeError::StreamOverflow { buffer }));
            }
            Some(Err(e)) if e.fatal || self.hiccups >= MAX_HICCUPS => {
                tracing::debug!(route = %self.route, error = %e.text, "SSE subscription failed; ending the stream");
                return Some(self.fail(BridgeError::Nats(format!("the subscription failed: {}", e.text).into())));
            }
            Some(Err(e)) => {
                // The ordered consumer reports what it recovers from (a pull that failed
                // during a server restart) and goes on from the last sequence it delivered:
                // not an end. `MAX_HICCUPS` and `stream_max` bound one that never recovers.
                self.hiccups += 1;
                tracing::debug!(error = %e.text, "SSE subscription hiccup; the ordered consumer recovers");
                return Some(Piece::Data(Bytes::from_static(HEARTBEAT)));
            }
            None => return Some(self.fail(BridgeError::Nats("the subscription ended".into()))),
        };
        self.hiccups = 0;
        let end = headers.as_ref().and_then(|h| h.get(streamed::STREAM)).is_some_and(|v| v.as_str() == streamed::END);
        if end {
            self.done = true;
            if payload.is_empty() {
                return None;
            }
        }
        let event = headers.as_ref().and_then(|h| h.get(BRIDGE_EVENT)).map(|v| v.as_str().to_owned());
        Some(Piece::Data(streamed::sse_event(seq, event.as_deref(), &payload)))
    }

    /// A stream that ends other than cleanly: its `event: error` now, the body's abort
    /// next.
    fn fail(&mut self, e: BridgeError) -> Piece {
        self.done = true;
        let event = sse_error(&e, &self.route, self.rid.as_deref());
        self.failing = Some(e);
        Piece::Data(event)
    }
}
