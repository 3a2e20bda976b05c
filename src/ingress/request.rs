//! `mode = "request"` and `mode = "tunnel"`: a core-NATS queue subscription whose messages
//! become HTTP calls to the app and whose replies carry the app's response.
//!
//! Request mode calls the route's method and path (`{N}` = the N-th subject token);
//! tunnel mode replays the tunnelled request word for word. Either way the reply has the
//! status in `Bridge-Status`, and for errors the NATS micro headers too.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use http::{HeaderMap, StatusCode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::handoff::Handoff;
use super::idempotency::guard;
use super::{retry_delay, sleep_or_stop, AppError, AppResponse, InFlight, Route, Shared};
use crate::codec::{self, nestjs};
use crate::own_time::Stage;
use crate::problem::BridgeError;

/// Runs one route until `stop`: subscribes (again, if the subscription ever ends), reads
/// every message at once into a buffer bounded in bytes (`max_buffer`) and count, hands
/// each to a handler once one of `concurrency` permits is free, and on `stop` drains the
/// subscription so requests already received still get their answers.
/// `inherit`: a reload's replacement reads on from the old task's subscription (see
/// `handoff`).
pub(crate) async fn run(
    shared: Arc<Shared>,
    route: Arc<Route>,
    queue: String,
    tunnel: bool,
    inherit: Option<Arc<Handoff>>,
    stop: CancellationToken,
) {
    let name = route.inbound.name.as_str();
    let subject = route.inbound.subject.as_str().to_owned();
    let permits = Arc::new(Semaphore::new(route.inbound.concurrency));
    let h = Handlers { shared: shared.clone(), route: route.clone(), tunnel, permits: permits.clone(), abort: CancellationToken::new() };
    let mut waiting = Buffer::default();
    let mut attempt = 0;
    let mut sub = None;
    let mut paused = false;
    let mut inherited = match inherit {
        Some(h) => h.take().await,
        None => None,
    };
    while !stop.is_cancelled() {
        // While the app is down, no subscription: callers get "no responders" (503) at
        // once, and another replica's subscription takes the requests.
        if inherited.is_some() && shared.gate.shut().now_or_never().is_some() {
            inherited = None;
        }
        if !shared.gate.wait_open(&stop).await {
            break;
        }
        let subscribed = match inherited.take() {
            Some(s) => Ok(s),
            None => shared.nats.queue_subscribe(subject.clone(), queue.clone()).await,
        };
        let mut s = match subscribed {
            Ok(s) => s,
            Err(e) => {
                shared.readiness.fail(&route.check, format!("cannot subscribe to {subject:?}: {e}"));
                tracing::warn!(route = name, error = %e, "inbound subscribe failed; retrying");
                if sleep_or_stop(&stop, retry_delay(attempt)).await {
                    break;
                }
                attempt += 1;
                continue;
            }
        };
        attempt = 0;
        shared.readiness.pass(&route.check);
        tracing::info!(route = name, subject = %subject, queue = %queue, tunnel, "inbound subscription bound");
        loop {
            // Hand out what waits first; read on meanwhile, so the client's own buffer (65,536
            // messages, however large) never fills.
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = shared.gate.shut() => {
                    // What already arrived is answered like the rest.
                    while let Some(Some(msg)) = s.next().now_or_never() {
                        h.buffer(&mut waiting, msg);
                    }
                    shared.readiness.fail(&route.check, "paused: the app is down");
                    tracing::info!(route = name, "the app is down: inbound subscription paused");
                    paused = true;
                    break;
                }
                permit = permits.clone().acquire_owned(), if !waiting.is_empty() => {
                    h.spawn(waiting.pop().expect("not empty"), permit.expect("never closed"));
                }
                msg = s.next() => {
                    let Some(msg) = msg else {
                        // The client closed it (or the server did): bind a new one.
                        shared.readiness.fail(&route.check, format!("subscription to {subject:?} ended; resubscribing"));
                        tracing::warn!(route = name, "inbound subscription ended; resubscribing");
                        break;
                    };
                    h.buffer(&mut waiting, msg);
                }
            }
        }
        if std::mem::take(&mut paused) {
            // Unsubscribes; the buffered messages are handed out as the gate opens.
            drop(s);
            h.hand_out(&mut waiting, &stop).await;
            continue;
        }
        sub = Some(s);
        if !stop.is_cancelled() && sleep_or_stop(&stop, retry_delay(0)).await {
            break;
        }
    }
    h.drain(waiting, sub).await;
}

/// What every handler of one route shares, so that starting one is a single call.
struct Handlers {
    shared: Arc<Shared>,
    route: Arc<Route>,
    tunnel: bool,
    /// The route's `concurrency`: a handler holds one while it runs.
    permits: Arc<Semaphore>,
    /// Cancelled when handlers outlive the drain deadline.
    abort: CancellationToken,
}

impl Handlers {
    /// Runs one handler for `msg`, read off the subscription at `read`.
    fn spawn(&self, (msg, read): (async_nats::Message, Instant), permit: OwnedSemaphorePermit) {
        // Boxed first: tokio moves a task's future by value through `spawn` and each change of
        // the task's stage, which for this future (4 KB in a debug build) was ~2,850
        // instructions of memcpy per message (callgrind); a box is moved once.
        tokio::spawn(Box::pin(handle(self.shared.clone(), self.route.clone(), msg, read, self.tunnel, permit, self.abort.clone())));
    }

    /// Queues `msg`, or refuses it when the buffer is full.
    fn buffer(&self, waiting: &mut Buffer, msg: async_nats::Message) {
        if let Some(msg) = waiting.push(msg, self.route.inbound.max_buffer) {
            tokio::spawn(refuse_full(self.shared.clone(), self.route.clone(), msg));
        }
    }

    /// Hands out every buffered message as permits free up (the subscription is gone), or
    /// until `stop`.
    async fn hand_out(&self, waiting: &mut Buffer, stop: &CancellationToken) {
        while !waiting.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => break,
                permit = self.permits.clone().acquire_owned() => {
                    self.spawn(waiting.pop().expect("not empty"), permit.expect("never closed"));
                }
            }
        }
    }

    /// The stop: within the route's `drain_timeout`, answers what was received, drains the
    /// subscription and answers what the drain brings, then waits for the handlers.
    async fn drain(&self, mut waiting: Buffer, mut sub: Option<async_nats::Subscriber>) {
        // Replaced by a reload with a task on the same subscription: it reads on from it.
        if let Some(h) = self.route.handoff.get() {
            h.give(sub.take());
        }
        let deadline = tokio::time::Instant::now() + self.route.drain_timeout;
        // Received before the stop: answered like the rest, then what the drain still brings.
        while let Some(msg) = waiting.pop() {
            let Ok(Ok(permit)) = tokio::time::timeout_at(deadline, self.permits.clone().acquire_owned()).await else { break };
            self.spawn(msg, permit);
        }
        // A drain ends with the server's PONG: while disconnected none comes, and the
        // subscription has nothing more to bring anyway.
        if let Some(mut s) = sub.filter(|_| crate::nats::connection::is_connected(&self.shared.nats)) {
            // Sending the drain waits for room in the client's command queue, which fills while
            // the connection is down.
            if matches!(tokio::time::timeout_at(deadline, s.drain()).await, Ok(Ok(()))) {
                while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, s.next()).await {
                    let Ok(Ok(permit)) = tokio::time::timeout_at(deadline, self.permits.clone().acquire_owned()).await else { break };
                    self.spawn((msg, Instant::now()), permit);
                }
            }
        }
        wait_in_flight(&self.permits, self.route.inbound.concurrency, deadline, &self.abort).await;
    }
}

/// Messages received but waiting for a `concurrency` permit, in arrival order, bounded in
/// bytes and in count: core NATS has no flow control, so a slow app must not make the
/// sidecar hold whatever publishers send.
#[derive(Default)]
struct Buffer {
    /// Each message with when it was read (the start of the sidecar's own time).
    queue: VecDeque<(async_nats::Message, Instant)>,
    bytes: usize,
}

/// The most messages a route buffers, whatever their size (the client's own default).
const MAX_BUFFERED: usize = 65_536;

impl Buffer {
    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Queues `msg`, or gives it back when it would take the buffer past `max_bytes`
    /// (one message is always accepted into an empty buffer, so none is too large to run).
    #[must_use]
    fn push(&mut self, msg: async_nats::Message, max_bytes: usize) -> Option<async_nats::Message> {
        let size = msg.length;
        let over = !self.queue.is_empty() && (self.bytes + size > max_bytes || self.queue.len() >= MAX_BUFFERED);
        if over {
            return Some(msg);
        }
        self.bytes += size;
        self.queue.push_back((msg, Instant::now()));
        None
    }

    fn pop(&mut self) -> Option<(async_nats::Message, Instant)> {
        let (msg, read) = self.queue.pop_front()?;
        self.bytes -= msg.length;
        Some((msg, read))
    }
}

/// A message the full buffer cannot take: counted, logged at a rate limit, and answered
/// 503 when it has an allowed reply subject, so the requester need not wait for a timeout.
async fn refuse_full(shared: Arc<Shared>, route: Arc<Route>, msg: async_nats::Message) {
    let m = &route.metrics;
    m.buffer_full.inc();
    let limit = route.inbound.max_buffer;
    if let Some(suppressed) = route.refusals.check() {
        tracing::warn!(route = %route.inbound.name, max_buffer = limit, suppressed, "inbound buffer full: the app is slower than its publishers; message refused");
    }
    let Some(reply) = msg.reply.filter(|r| codec::reply_allowed(r, &route.inbound.reply_prefixes)) else { return };
    let rid = msg.headers.as_ref().and_then(|h| h.get(codec::REQUEST_ID)).map(|v| v.as_str().to_owned());
    let (status, headers, body) = problem(&BridgeError::BufferFull { limit }, &route.inbound.name, rid.as_deref());
    if shared.nats.publish_with_headers(reply, codec::response_to_reply_headers(status, &headers), body).await.is_ok() {
        m.reply.inc();
    }
}

/// Waits until every permit is back (no handler running); past `deadline`, tells the
/// handlers to give up and waits for that.
pub(crate) async fn wait_in_flight(permits: &Semaphore, n: usize, deadline: tokio::time::Instant, abort: &CancellationToken) {
    let n = n as u32;
    if tokio::time::timeout_at(deadline, permits.acquire_many(n)).await.is_err() {
        tracing::warn!("inbound handlers still running at the drain deadline; giving up on them");
        abort.cancel();
        let _ = permits.acquire_many(n).await;
    }
}

// Idempotency's store calls (and, in `stream::call`, streamed and no-reply calls) are
// awaited boxed: this future is allocated per message and is as large as its largest
// branch, and the common request needs none of them (5.3 KB → 3.0 KB; issue 14).
async fn handle(
    shared: Arc<Shared>,
    route: Arc<Route>,
    msg: async_nats::Message,
    read: Instant,
    tunnel: bool,
    _permit: OwnedSemaphorePermit,
    abort: CancellationToken,
) {
    let m = &route.metrics;
    m.deliveries.inc();
    if refuse_reply(&route, &msg) {
        return;
    }
    let _in_flight = InFlight::new(&m.in_flight);
    let started = Instant::now();
    // The app's share of this message's time, left out of the sidecar's own time.
    let mut app_time = std::time::Duration::ZERO;
    let rid = msg.headers.as_ref().and_then(|h| h.get(codec::REQUEST_ID)).map(|v| v.as_str().to_owned());
    // The codec, then the contract: a refused message claims no idempotency key and never
    // reaches the app; its requester gets 400 (not the codec's message) or 422 problem+json
    // listing the violations.
    let (decoded, checked) = super::border::admit(&route, &shared.metrics, msg.headers.as_ref(), &msg.payload, &msg.subject, None);
    let checked = checked.map_err(BridgeError::from);
    // Idempotency: claim the key first; a replay, a conflict or an unusable store is
    // answered without calling the app.
    let idem = route.idem.as_deref();
    let key = idem.and_then(|g| g.key(msg.headers.as_ref(), &msg.payload));
    let gate = match (&checked, idem, key.as_deref()) {
        (Err(_), _, _) => Ok(None),
        (Ok(_), Some(g), Some(k)) => Box::pin(g.gate_request(k, &msg.payload, route.inbound.timeout, rid.as_deref())).await.map(Some),
        _ => Ok(None),
    };
    let span = shared.telemetry.message(&route.inbound, &msg.subject, msg.headers.as_ref(), None);
    let call = match (checked, gate) {
        (Err(refusal), _) => Err(refusal),
        (Ok(_), Err(answer)) => Ok(answer),
        (Ok(checked), Ok(claimed)) => {
            // An open body streams to a requester, unless the answer is to be kept (idempotency)
            // or the codec frames one reply (NestJS, CloudEvents).
            let plain = decoded.nest.is_none() && decoded.event.is_none();
            let stream_to = msg.reply.as_ref().filter(|_| claimed.is_none() && plain);
            let how =
                HowToCall { tunnel, key: key.as_deref(), decoded: &decoded, checked: checked.as_deref(), stream_to, rid: rid.as_deref() };
            let app_started = Instant::now();
            let answer = span.scope(call_app(&shared, &route, &msg, how, &abort)).await;
            app_time = app_started.elapsed();
            let call = match answer {
                Ok(super::stream::Answer::Whole(r)) => Ok(r),
                Ok(super::stream::Answer::Streamed) => {
                    m.duration.observe(started.elapsed().as_secs_f64());
                    // The stream's first message carried the app's status; its end is the
                    // streams metric's to tell.
                    span.end(Ok(StatusCode::OK));
                    return;
                }
                Err(e) => Err(e),
            };
            if let (Some(g), Some(c)) = (idem, claimed) {
                Box::pin(settle_claim(g, c, &call)).await;
            }
            call.and_then(|r| r.map_err(|e| app_error(&e)))
        }
    };
    m.duration.observe(started.elapsed().as_secs_f64());
    span.end(Ok(call.as_ref().map_or_else(BridgeError::status, |r| r.status)));
    if let Some(stats) = &route.micro {
        stats.record(call.as_ref().map_or_else(BridgeError::status, |r| r.status), started.elapsed());
    }
    let Some(reply) = msg.reply else {
        // Nobody waits for an answer: the call was the point.
        if let Err(e) = &call {
            tracing::debug!(route = %route.inbound.name, error = %e, "inbound message without reply subject failed");
        }
        return;
    };
    if send_reply(&shared, &route, reply, call, rid.as_deref(), decoded.nest.as_ref()).await {
        shared.metrics.own_time.record(Stage::IngressOwn, read.elapsed().saturating_sub(app_time));
    }
}

/// After the app call: only a 2xx marks the idempotency key done (a store error after it is
/// logged; the reply still carries the app's answer). Aborted at shutdown, the app may still
/// be running the dropped request, so the claim is left to go stale rather than released
/// for a concurrent retry.
async fn settle_claim(g: &guard::Guard, claimed: guard::Claimed, call: &Result<Result<AppResponse, AppError>, BridgeError>) {
    if matches!(call, Err(BridgeError::ShuttingDown)) {
        return drop(claimed);
    }
    let _ = g.finish(claimed, call.as_ref().ok().and_then(guard::success)).await;
}

/// Refuses (counts, logs at a rate limit) a message whose reply subject is outside the
/// route's `reply_prefixes`.
fn refuse_reply(route: &Route, msg: &async_nats::Message) -> bool {
    let Some(reply) = msg.reply.as_deref().filter(|r| !codec::reply_allowed(r, &route.inbound.reply_prefixes)) else {
        return false;
    };
    // A publisher could aim the app's answer at `$JS.API.STREAM.DELETE.<stream>` and
    // have the sidecar send it with its own credentials: neither the app nor the
    // reply runs.
    route.metrics.refused_reply.inc();
    if let Some(suppressed) = route.refusals.check() {
        let prefixes = &route.inbound.reply_prefixes;
        tracing::warn!(route = %route.inbound.name, reply = ?reply, ?prefixes, suppressed, "refused a message whose reply subject is outside reply_prefixes; the app was not called");
    }
    true
}

/// How one message's app call is made: its idempotency `key`, what its codec made of it,
/// the contract version it satisfied, and whether (and to whom) an open app body streams.
struct HowToCall<'a> {
    tunnel: bool,
    key: Option<&'a str>,
    decoded: &'a super::border::Decoded,
    checked: Option<&'a str>,
    stream_to: Option<&'a async_nats::Subject>,
    rid: Option<&'a str>,
}

/// Calls the app with the request `msg` stands for, unless `abort` comes first. With
/// `how.stream_to`, an open app body is streamed there and the answer is `Streamed`.
async fn call_app(
    shared: &Shared,
    route: &Route,
    msg: &async_nats::Message,
    how: HowToCall<'_>,
    abort: &CancellationToken,
) -> Result<super::stream::Answer, BridgeError> {
    let (method, uri, mut headers) = prepare(route, msg, how.tunnel)?;
    if let Some(k) = how.key {
        guard::set_key_header(&mut headers, k);
    }
    super::border::tell_app(&mut headers, how.checked);
    let body = how.decoded.app_request(&msg.payload, &mut headers);
    let call = super::stream::call(shared, route, how.stream_to, method, &uri, headers, body, how.rid);
    tokio::select! {
        r = call => Ok(r),
        _ = abort.cancelled() => Err(BridgeError::ShuttingDown),
    }
}

/// Sends the app's answer (or the failure as problem+json) to `reply`; an answer too large
/// for the server's `max_payload` goes back as a 413 problem instead. True when the answer
/// itself was handed to the client.
async fn send_reply(
    shared: &Shared,
    route: &Route,
    reply: async_nats::Subject,
    call: Result<AppResponse, BridgeError>,
    rid: Option<&str>,
    nest: Option<&nestjs::Incoming>,
) -> bool {
    let (status, headers, body) = match call {
        Ok(r) => (r.status, r.headers, r.body),
        Err(e) => problem(&e, &route.inbound.name, rid),
    };
    let (reply_headers, body) = super::nest::reply(nest, status, &headers, body);
    match shared.nats.publish_with_headers(reply.clone(), reply_headers, body).await {
        Ok(()) => {
            route.metrics.reply.inc();
            true
        }
        Err(e) if matches!(e.kind(), async_nats::client::PublishErrorKind::MaxPayloadExceeded) => {
            let e = BridgeError::PayloadTooLarge { max_payload: shared.nats.server_info().max_payload };
            let (status, headers, body) = problem(&e, &route.inbound.name, rid);
            let (headers, body) = super::nest::reply(nest, status, &headers, body);
            let _ = shared.nats.publish_with_headers(reply, headers, body).await;
            route.metrics.reply.inc();
            false
        }
        Err(e) => {
            tracing::warn!(route = %route.inbound.name, error = %e, "could not send the reply");
            false
        }
    }
}

/// The HTTP request a message stands for: method, absolute URI and headers.
fn prepare(route: &Route, msg: &async_nats::Message, tunnel: bool) -> Result<(http::Method, String, HeaderMap), BridgeError> {
    let trust_forwarded = route.inbound.trusts_forwarded();
    if tunnel {
        let mut t = codec::decode_tunnel_request(msg.headers.as_ref()).map_err(|e| BridgeError::BadRequest(e.to_string()))?;
        check_tunnel_request(route, &t).inspect_err(|_| route.metrics.refused_request.inc())?;
        codec::strip_spoofable(&mut t.headers, trust_forwarded);
        let mut uri = String::with_capacity(route.base.len() + t.path_and_query.len());
        uri.push_str(&route.base);
        uri.push_str(&t.path_and_query);
        Ok((t.method, uri, t.headers))
    } else {
        let path = route.inbound.path.render(msg.subject.as_str());
        let mut uri = String::with_capacity(route.base.len() + path.len());
        uri.push_str(&route.base);
        uri.push_str(&path);
        let mut headers = msg.headers.as_ref().map(|h| codec::nats_to_http_headers(h, codec::SPOOFABLE)).unwrap_or_default();
        codec::strip_spoofable(&mut headers, trust_forwarded);
        Ok((route.inbound.method.clone(), uri, headers))
    }
}

/// A tunnelled request the route may replay: a standard method or one of the route's
/// `extra_methods`, and no `.`/`..` segment that the app would resolve above the base
/// path of `app_url`.
fn check_tunnel_request(route: &Route, t: &codec::TunnelRequest) -> Result<(), BridgeError> {
    let extra = &route.inbound.extra_methods;
    if !codec::TUNNEL_METHODS.contains(&t.method) && !extra.contains(&t.method) {
        let allowed = codec::TUNNEL_METHODS.iter().chain(extra).map(|m| m.to_string()).collect();
        return Err(BridgeError::MethodNotAllowed { allowed });
    }
    if route.base_has_path && codec::has_dot_segment(&t.path_and_query) {
        return Err(BridgeError::BadRequest(format!(
            "tunnelled path {:?} has a '.' or '..' segment, which would leave the app_url base path",
            t.path_and_query
        )));
    }
    Ok(())
}

fn app_error(e: &AppError) -> BridgeError {
    match e {
        AppError::Unreachable(_) | AppError::TooLarge { .. } => BridgeError::Upstream(e.to_string()),
        AppError::Timeout(t) => BridgeError::UpstreamTimeout(*t),
        AppError::BadUri(_) => BridgeError::BadRequest(e.to_string()),
    }
}

/// A failure as the response a reply carries: a problem+json body naming the route.
fn problem(e: &BridgeError, route: &str, rid: Option<&str>) -> (StatusCode, HeaderMap, Bytes) {
    let (parts, body) = e.to_response(Some(route), rid).into_parts();
    (parts.status, parts.headers, body)
}
