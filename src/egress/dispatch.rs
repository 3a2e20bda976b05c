//! One egress request, from route lookup to response: the request id, the route and its
//! subject, the body under the route's limit, then one function per mode. Failures are
//! [`BridgeError`]s; `problem` turns them into responses.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::codec;
use crate::config::{Codec, Outbound, OutboundTarget, Unmatched};
use crate::egress::forward::Outgoing;
use crate::egress::routes::{Match, Miss};
use crate::egress::{full, Body, Egress};
use crate::metrics::InFlight;
use crate::nats::connection::is_connected;
use crate::nats::publish::{publish_acked, PublishErrorKind};
use crate::own_time::Stage;
use crate::problem::BridgeError;
use crate::subject::{control_line_len, RenderError, MAX_CONTROL_LINE};

/// One call as the NATS modes take it: the route, its rendered subject, the request's head
/// and its body, already read under the route's limit.
struct Call<'a> {
    route: &'a Outbound,
    subject: String,
    parts: &'a http::request::Parts,
    body: Bytes,
}

impl Egress {
    /// Answers one request; every request gets an `X-Request-Id` (kept when the app sent
    /// one), echoed back.
    ///
    /// The less common branches (CONNECT, operations, passthrough, HTTP, cut-over, subscribe,
    /// NestJS, tunnel and async modes) are awaited boxed: an async fn's future is as large as
    /// its largest branch, and this one is allocated and moved for every request, so an
    /// inline rare branch made every request pay for it (8.5 KB → 3.5 KB; issue 14).
    pub(super) async fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let _in_flight = InFlight::new(&self.metrics.egress_in_flight);
        let started = Instant::now();
        let table = self.table.load_full();
        let req = ensure_request_id(self.h2_origin_form(req));
        // Kept as the header value (a reference count, not a copy) to echo it back.
        let rid_value = request_id(&req);
        let rid = rid_value.as_ref().and_then(|v| v.to_str().ok());
        if req.method() == http::Method::CONNECT {
            return Box::pin(self.connect(req)).await.unwrap_or_else(|e| e.to_response(None, rid).map(full));
        }
        if let Some(id) = req.uri().path().strip_prefix(super::operations::PATH_PREFIX).filter(|_| req.method() == http::Method::GET) {
            let res = Box::pin(self.operation(id, req.headers())).await;
            return res.unwrap_or_else(|e| e.to_response(None, rid).map(full));
        }
        // Absolute form (HTTP_PROXY) carries the host in the URI; origin form in Host. Both
        // are shared with the request's head (reference counts, not copies), so the lookup
        // borrows them while the request moves on.
        let uri = req.uri().clone();
        let host_header = req.headers().get(http::header::HOST).cloned();
        let host = match uri.authority() {
            Some(a) => Some(a.host()),
            None => host_header.as_ref().and_then(|h| h.to_str().ok()),
        };
        let path = uri.path();
        let (route, index, subject) = match table.lookup(req.method(), host, path) {
            Ok(m) => match subject_of(&m) {
                Ok(subject) => (m.route, m.index, subject),
                Err(e) => {
                    let res = e.to_response(Some(&m.route.name), rid);
                    table.observe(m.index, res.status(), started.elapsed());
                    return res.map(full);
                }
            },
            // Absolute form: the app called another host through HTTP_PROXY; without the
            // sidecar that call would have worked, so it still does. That includes a method
            // the host's routes do not take: a route moves that call, not the path's others.
            Err(Miss::NotFound | Miss::MethodNotAllowed(_))
                if req.uri().authority().is_some() && table.config().sidecar.forward.unmatched == Unmatched::Forward =>
            {
                return Box::pin(self.forward(req, rid)).await;
            }
            Err(Miss::NotFound) => {
                let e = BridgeError::NoRoute { method: req.method().to_string(), path: path.to_owned() };
                return e.to_response(None, rid).map(full);
            }
            Err(Miss::MethodNotAllowed(allowed)) => {
                let e = BridgeError::MethodNotAllowed { allowed: allowed.iter().map(|m| m.to_string()).collect() };
                return e.to_response(None, rid).map(full);
            }
        };
        let http10 = req.version() == http::Version::HTTP_10;
        let mut req = req;
        if self.metrics.own_time.enabled() {
            // Only when recording: the first extension allocates the request's map.
            req.extensions_mut().insert(HeadRead(started));
        }
        let spans = self.telemetry.egress(route, subject.as_deref(), &mut req);
        let mut res = match self.dispatch(route, subject, req).await {
            Ok(res) => res,
            Err(e) => {
                if e.status().is_server_error() {
                    tracing::debug!(route = %route.name, error = %e, "egress request failed");
                }
                e.to_response(Some(&route.name), rid).map(full)
            }
        };
        // Only a cut-over chooses the path (and says so on its answer); any other route's
        // `Bridge-Path` came from its upstream (another sidecar's egress, say) and is ours
        // to overwrite, not to believe.
        let path = route.cutover.as_ref().and_then(|_| crate::egress::cutover::path_of(&res)).unwrap_or(default_path(route));
        if http10 && path == crate::metrics::EgressPath::Nats {
            // What an HTTP origin answers keeps its own framing, as without the sidecar.
            let limit = route.stream.buffer.saturating_mul(crate::nats::replies::BYTES_PER_SLOT);
            res = Box::pin(super::stream::whole_for_http10(res, limit, &route.name, rid)).await;
        }
        res.headers_mut().insert(crate::egress::cutover::RESPONSE_PATH, HeaderValue::from_static(path.as_str()));
        table.observe_on(index, path, res.status(), started.elapsed());
        spans.end(res.status(), path.as_str());
        if let Some(id) = rid_value {
            res.headers_mut().insert(REQUEST_ID, id);
        }
        if let Some(super::stream::ReplyRead(read)) = res.extensions_mut().remove::<super::stream::ReplyRead>() {
            self.metrics.own_time.record(Stage::EgressReplyToResponse, read.elapsed());
        }
        res
    }

    /// Reads the body under the route's limit, then carries the request by its mode
    /// (`http` routes stream it instead).
    async fn dispatch(
        self: &Arc<Self>,
        route: &Outbound,
        subject: Option<String>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, BridgeError> {
        if let OutboundTarget::Http { upstream } = &route.target {
            return Box::pin(self.proxy(route, upstream, req)).await;
        }
        if let Some(cut) = &route.cutover {
            return Box::pin(self.cutover(route, cut, subject, req)).await;
        }
        if let OutboundTarget::Subscribe(sub) = &route.target {
            return Box::pin(self.subscribe(route, sub, subject.unwrap_or_default(), req.headers())).await;
        }
        let (mut parts, body) = req.into_parts();
        let body = super::read_body(route, &parts.headers, body).await?;
        self.carry(route, subject.unwrap_or_default(), &mut parts, body).await
    }

    /// Carries a read request over NATS by the route's mode (a cut-over's NATS side too).
    pub(super) async fn carry(
        &self,
        route: &Outbound,
        subject: String,
        parts: &mut http::request::Parts,
        body: Bytes,
    ) -> Result<Response<Body>, BridgeError> {
        self.check_control_line(&subject)?;
        let body = self.border(route, &subject, &mut parts.headers, body)?;
        if route.codec == Codec::NestJs && matches!(route.target, OutboundTarget::Request(_)) {
            let sse = super::nest::wants_event_stream(&parts.headers);
            return Box::pin(self.nest_request(route, subject, nats_headers(route, &parts.headers), body, sse)).await;
        }
        let body = match route.target {
            OutboundTarget::Publish(_) | OutboundTarget::JetStream(_) => super::nest::event_payload(route, &subject, body)?,
            _ => body,
        };
        let call = Call { route, subject, parts: &*parts, body };
        match &route.target {
            OutboundTarget::Request(_) => self.request(call).await,
            OutboundTarget::Tunnel { .. } => Box::pin(self.tunnel(call)).await,
            OutboundTarget::Publish(_) => self.publish(call).await,
            OutboundTarget::JetStream(_) => self.jetstream(call).await,
            OutboundTarget::Http { upstream } => Err(BridgeError::BadRequest(format!("route {} is plain HTTP to {upstream}", route.name))),
            OutboundTarget::Subscribe(_) => unreachable!("answered above"),
        }
    }

    /// What a body must pass before it leaves, and what it becomes: with the CloudEvents
    /// codec, the event (its data is the payload, its attributes `ce-*` headers); with a
    /// contract, the version it satisfies (`Bridge-Schema`, and `ce-dataschema` when the
    /// event names none). An invalid body never leaves.
    fn border(&self, route: &Outbound, subject: &str, headers: &mut http::HeaderMap, body: Bytes) -> Result<Bytes, BridgeError> {
        let mut event = match route.codec {
            Codec::CloudEvents => Some(super::cloudevents::event(route, subject, headers, body.clone())?),
            _ => None,
        };
        let body = event.as_ref().map_or(body, |e| e.data.clone());
        if let Some(contracts) = &route.schema {
            let named = event.as_ref().and_then(|e| e.get("dataschema"));
            let named = named.or_else(|| headers.get(crate::contract::BRIDGE_SCHEMA).and_then(|v| v.to_str().ok()));
            match contracts.check(named, &body) {
                Ok(c) => {
                    // The version travels with it: exactly the one the body was checked against.
                    headers.insert(crate::contract::BRIDGE_SCHEMA, HeaderValue::from_str(&c.id).expect("a contract id is a header value"));
                    if let Some(e) = event.as_mut().filter(|e| e.get("dataschema").is_none()) {
                        e.set("dataschema", &crate::contract::dataschema(&c.id));
                    }
                }
                Err(r) => {
                    self.metrics.contract_violations.with_label_values(&[&route.name, "egress", r.reason()]).inc();
                    return Err(r.into());
                }
            }
        }
        if let Some(e) = &event {
            super::cloudevents::write(e, headers);
        }
        Ok(body)
    }

    /// Refuses a subject whose control line could exceed the server's `max_control_line`:
    /// the server would close the connection, failing every route and consumer with it.
    /// The reply subject is counted at its longest (an inbox), whatever the mode.
    fn check_control_line(&self, subject: &str) -> Result<(), BridgeError> {
        let len = control_line_len(subject, self.reply_len);
        if len > MAX_CONTROL_LINE {
            return Err(BridgeError::SubjectTooLong { len: subject.len(), max: MAX_CONTROL_LINE - (len - subject.len()) });
        }
        Ok(())
    }

    pub(super) fn ensure_connected(&self) -> Result<(), BridgeError> {
        // Without this, requests would sit in the client's buffer until their timeout.
        if is_connected(&self.nats) {
            Ok(())
        } else {
            Err(BridgeError::NatsDisconnected)
        }
    }

    /// `request` mode: a NATS request with the HTTP headers; the reply is the response.
    async fn request(&self, call: Call<'_>) -> Result<Response<Body>, BridgeError> {
        let Call { route, subject, parts: http::request::Parts { headers, extensions, .. }, body } = call;
        let head_read = extensions.get::<HeadRead>().map(|h| h.0);
        self.nats_request(route, subject, nats_headers(route, headers), headers, body, head_read).await
    }

    /// `tunnel` mode: a NATS request carrying the whole HTTP request (method, path, query).
    async fn tunnel(&self, call: Call<'_>) -> Result<Response<Body>, BridgeError> {
        let Call { route, subject, parts, body } = call;
        let headers = codec::tunnel_request_headers(&parts.method, parts.uri.path(), parts.uri.query(), &parts.headers);
        let headers = codec::strip_nats_control(headers, |n| route.allow_nats_headers.allows(n));
        let head_read = parts.extensions.get::<HeadRead>().map(|h| h.0);
        self.nats_request(route, subject, headers, &parts.headers, body, head_read).await
    }

    /// `http` is the request's own headers: whether it runs async and its request id are
    /// read there, where a lookup costs less than in the NATS map (issue 14).
    async fn nats_request(
        &self,
        route: &Outbound,
        subject: String,
        headers: async_nats::HeaderMap,
        http: &http::HeaderMap,
        body: Bytes,
        head_read: Option<Instant>,
    ) -> Result<Response<Body>, BridgeError> {
        self.ensure_connected()?;
        if super::operations::wants_async(route, http) {
            let place = self.operation_place()?;
            return Box::pin(self.start_async(route, subject, headers, body, place)).await;
        }
        // As the NATS headers carry it: UTF-8, not only visible ASCII.
        let rid = http.get(REQUEST_ID).and_then(|v| std::str::from_utf8(v.as_bytes()).ok()).map(str::to_owned);
        self.request_reply(route, subject, headers, body, rid, head_read).await
    }

    /// `publish` mode: fire and forget, answered 202 once the server has the message.
    async fn publish(&self, call: Call<'_>) -> Result<Response<Body>, BridgeError> {
        let Call { route, subject, parts: http::request::Parts { headers, .. }, body } = call;
        self.ensure_connected()?;
        let nats_headers = nats_headers(route, headers);
        // One deadline (one timer) over the hand-off and the flush: the publish awaits room
        // in the client's command queue, which a stalled connection never makes.
        // A buffered publish is no proof of delivery (nats.rs #1177), hence the flush. A
        // flush only writes to the socket, so the 202 says "written", and the response
        // says the guarantee is at most once.
        let mut handed = false;
        let sent = async {
            self.nats.publish_with_headers(subject.clone(), nats_headers, body).await.map_err(|e| match e.kind() {
                async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
                    BridgeError::PayloadTooLarge { max_payload: self.nats.server_info().max_payload }
                }
                _ => BridgeError::Nats(e.into()),
            })?;
            handed = true;
            self.nats.flush().await.map_err(|e| {
                tracing::debug!(route = %route.name, error = %e, "flush failed after the client took the publish");
                BridgeError::PublishUnconfirmed { timeout: route.timeout }
            })
        };
        let done = tokio::time::timeout_at(tokio::time::Instant::now() + route.timeout, sent).await.ok();
        publish_outcome(done, handed, &subject, route.timeout)?;
        #[derive(serde::Serialize)]
        struct Published<'a> {
            subject: &'a str,
        }
        let mut res = accepted(&Published { subject: &subject });
        res.headers_mut().insert(codec::http_names::BRIDGE_GUARANTEE, HeaderValue::from_static("at-most-once"));
        Ok(res)
    }

    /// `jetstream` mode: answered 202 once a stream acknowledged the message; an
    /// `Idempotency-Key` becomes its `Nats-Msg-Id`, so the stream deduplicates retries.
    async fn jetstream(&self, call: Call<'_>) -> Result<Response<Body>, BridgeError> {
        let Call { route, subject, parts: http::request::Parts { headers, .. }, body } = call;
        self.ensure_connected()?;
        let _slot = self.publish_slot().ok_or(BridgeError::Overloaded)?;
        let _in_flight = InFlight::new(&self.metrics.jetstream_in_flight);
        // Built again for a retry rather than cloned for every publish.
        let nats_headers = || {
            let mut h = nats_headers(route, headers);
            if let Some(key) = headers.get(codec::http_names::IDEMPOTENCY_KEY).and_then(|v| v.to_str().ok()) {
                h.insert(codec::NATS_MSG_ID, key);
            }
            if let Some(ttl) = route.ttl {
                h.insert("Nats-TTL", format!("{}s", ttl.as_secs()).as_str());
            }
            h
        };
        let ack = publish_acked(&self.replies, &subject, nats_headers, body, route.timeout).await.map_err(|e| match e.kind() {
            PublishErrorKind::NoStream => BridgeError::NoStream { subject: subject.clone() },
            PublishErrorKind::PayloadTooLarge => BridgeError::PayloadTooLarge { max_payload: self.nats.server_info().max_payload },
            PublishErrorKind::TimedOut => BridgeError::AckTimeout(e),
            // A 4xx refusal fails the same way on every retry: never 503 + Retry-After.
            PublishErrorKind::Failed => match e.api_error() {
                Some(api) if api.is_precondition() => BridgeError::PreconditionFailed(e),
                Some(api) if api.is_refusal() => BridgeError::JetStreamRefused(e),
                _ => BridgeError::JetStream(e),
            },
        })?;
        // The fields in the order `json!` wrote them (sorted), so the body is unchanged.
        #[derive(serde::Serialize)]
        struct Stored<'a> {
            duplicate: bool,
            seq: u64,
            stream: &'a str,
        }
        let mut res = accepted(&Stored { duplicate: ack.duplicate, seq: ack.sequence, stream: &ack.stream });
        let h = res.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&ack.stream) {
            h.insert(codec::http_names::BRIDGE_STREAM, v);
        }
        h.insert(codec::http_names::BRIDGE_SEQ, HeaderValue::from(ack.sequence));
        Ok(res)
    }

    /// `http` routes: proxied to the upstream as plain HTTP, both bodies streamed; the
    /// route's `max_body` applies only when the route sets it.
    async fn proxy(&self, route: &Outbound, upstream: &http::Uri, req: Request<Incoming>) -> Result<Response<Body>, BridgeError> {
        let pq = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let base = upstream.path().trim_end_matches('/');
        let uri = format!(
            "{}://{}{}{}",
            upstream.scheme_str().unwrap_or("http"),
            upstream.authority().map(|a| a.as_str()).unwrap_or(""),
            base,
            pq
        );
        let uri = uri.parse().map_err(|e: http::uri::InvalidUri| BridgeError::BadRequest(e.to_string()))?;
        let host_label = upstream.authority().map(|a| a.as_str()).unwrap_or_default().to_owned();
        self.send_upstream(Outgoing { uri, max_body: route.max_body, timeout: Some(route.timeout), host_label }, req).await
    }
}

/// When the HTTP request's head was read (a request extension, set in `handle`): the start
/// of the sidecar's own time on the way out.
#[derive(Clone, Copy)]
struct HeadRead(Instant);

/// The request's headers for NATS, without the `Nats-*` publish controls the route does
/// not allow (issue 19: a caller's `Nats-Expected-Stream` or `Nats-Rollup` steered the
/// stream).
fn nats_headers(route: &Outbound, headers: &http::HeaderMap) -> async_nats::HeaderMap {
    codec::strip_nats_control(codec::http_to_nats_headers(headers), |n| route.allow_nats_headers.allows(n))
}

/// A publish-mode call's failure, from how far it got: `done` is `None` when the route's
/// deadline passed first, `handed` whether the client took the message. Once it did,
/// anything short of a flush is "outcome unknown" whatever the connection's state: the
/// message waits in the client's buffers, which async-nats still sends after a reconnect,
/// so a "not delivered" answer (503, on which a cut-over falls back) could send it twice.
fn publish_outcome(
    done: Option<Result<(), BridgeError>>,
    handed: bool,
    subject: &str,
    timeout: std::time::Duration,
) -> Result<(), BridgeError> {
    match done {
        Some(r) => r,
        // Never queued (the queue's send is cancel-safe): nothing will be sent.
        None if !handed => Err(BridgeError::HandOffTimeout { subject: subject.to_owned(), timeout }),
        None => Err(BridgeError::PublishUnconfirmed { timeout }),
    }
}

/// The NATS subject a matched route sends to (`None` for plain HTTP routes), its
/// template filled from the path captures.
fn subject_of(m: &Match<'_, '_>) -> Result<Option<String>, BridgeError> {
    match &m.route.target {
        OutboundTarget::Request(t)
        | OutboundTarget::Publish(t)
        | OutboundTarget::JetStream(t)
        | OutboundTarget::Subscribe(crate::config::Subscribe { subject: t, .. }) => {
            t.render(|name| m.params.get(name)).map(Some).map_err(|e| match e {
                RenderError::TooLong { len, max } => BridgeError::SubjectTooLong { len, max },
                e => BridgeError::BadRequest(e.to_string()),
            })
        }
        OutboundTarget::Tunnel { subject, .. } => Ok(Some(subject.clone())),
        OutboundTarget::Http { .. } => Ok(None),
    }
}

/// The way a route's calls go unless a cut-over says otherwise.
fn default_path(route: &Outbound) -> crate::metrics::EgressPath {
    match route.target {
        OutboundTarget::Http { .. } => crate::metrics::EgressPath::Http,
        _ => crate::metrics::EgressPath::Nats,
    }
}

/// A 202 with a JSON body, serialized from a borrowed struct: a `json!` value cost a map,
/// its keys and values as allocations, ~2,100 instructions per request (issue 14).
fn accepted(v: &impl serde::Serialize) -> Response<Body> {
    let mut res = Response::new(full(serde_json::to_vec(v).unwrap_or_default()));
    *res.status_mut() = StatusCode::ACCEPTED;
    res.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

/// `X-Request-Id` as a static name: inserting by `&str` allocates a lower-cased copy of
/// the name each time.
const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

fn ensure_request_id(mut req: Request<Incoming>) -> Request<Incoming> {
    if !req.headers().contains_key(REQUEST_ID) {
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let id = new_request_id().hyphenated().encode_lower(&mut buf);
        if let Ok(v) = HeaderValue::from_str(id) {
            req.headers_mut().insert(REQUEST_ID, v);
        }
    }
    req
}

/// A random (v4) UUID for `X-Request-Id`, from a per-thread generator seeded once from the
/// OS: request ids need to be unique, not unpredictable, and a `getrandom` system call
/// per request showed up in the profile.
fn new_request_id() -> uuid::Uuid {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(uuid::Uuid::new_v4().as_u64_pair().0 | 1);
    }
    // SplitMix64: a full-period 64-bit sequence with well-mixed output.
    fn next(state: &Cell<u64>) -> u64 {
        let s = state.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        state.set(s);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    let bits = STATE.with(|s| ((next(s) as u128) << 64) | next(s) as u128);
    uuid::Builder::from_random_bytes(bits.to_le_bytes()).into_uuid()
}

/// The request's id, when it is text (a value that is not is neither reported nor echoed).
fn request_id(req: &Request<Incoming>) -> Option<HeaderValue> {
    req.headers().get(REQUEST_ID).filter(|v| v.to_str().is_ok()).cloned()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::egress::cutover::fallback_reason;

    #[test]
    fn a_publish_the_client_took_is_never_reported_undelivered() {
        let t = Duration::from_secs(1);
        // The deadline passed after the hand-off: connected or not, the outcome is unknown.
        let e = publish_outcome(None, true, "a.b", t).unwrap_err();
        assert!(matches!(e, BridgeError::PublishUnconfirmed { .. }), "{e}");
        assert_eq!((e.status().as_u16(), e.kind(), fallback_reason(&e)), (504, "outcome-unknown", None));
        // Before the hand-off nothing was queued; still a timeout, never a fallback (the
        // route's time is spent).
        let e = publish_outcome(None, false, "a.b", t).unwrap_err();
        assert_eq!((e.status().as_u16(), e.kind(), fallback_reason(&e)), (504, "timeout", None));
        assert!(publish_outcome(Some(Ok(())), true, "a.b", t).is_ok());
    }
}
