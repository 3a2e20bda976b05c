//! The egress listener (HTTP → NATS): accepts the legacy app's outgoing calls, in origin
//! or absolute (proxy) form, finds the route and carries the call over NATS by the route's
//! mode — request, publish, jetstream, tunnel — or proxies it as plain HTTP.

pub mod routes;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;

use crate::codec;
use crate::config::{Outbound, OutboundTarget};
use crate::egress::routes::{Miss, Routing};
use crate::metrics::{EgressRouteMetrics, InFlight, Metrics};
use crate::nats::connection::is_connected;
use crate::nats::publish::{publish_acked, PublishErrorKind};
use crate::problem::BridgeError;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every response body the sidecar produces: buffered, or streamed from an upstream.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(never).boxed_unsync()
}

/// The routing table with each route's metric handles, swapped whole on reload.
pub struct Table {
    pub routing: Routing,
    metrics: Vec<EgressRouteMetrics>,
}

impl Table {
    pub fn new(routing: Routing, metrics: &Metrics) -> Self {
        let m = routing.table.routes().iter().map(|r| metrics.egress_route(&r.name, r.mode().as_str())).collect();
        Self { routing, metrics: m }
    }
}

/// Shared state of the egress listener. Everything is passed in.
pub struct Egress {
    table: Arc<ArcSwap<Table>>,
    nats: async_nats::Client,
    js: async_nats::jetstream::Context,
    upstream: hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    metrics: Metrics,
    publish_permits: Arc<Semaphore>,
}

impl Egress {
    pub fn new(table: Arc<ArcSwap<Table>>, nats: async_nats::Client, metrics: Metrics) -> Arc<Self> {
        let permits = table.load().routing.config.sidecar.max_inflight_publishes;
        let js = async_nats::jetstream::new(nats.clone());
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        let upstream =
            hyper_util::client::legacy::Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(connector);
        Arc::new(Self { table, nats, js, upstream, metrics, publish_permits: Arc::new(Semaphore::new(permits)) })
    }
}

/// Serves the egress listener until `shutdown` resolves, then stops accepting and lets
/// in-flight requests finish for up to `drain_timeout` (from the config in force).
///
/// Edge limits (`[sidecar]`), enforced per connection by a watchdog (see [`Activity`]):
/// - `header_read_timeout`: a request head must arrive whole within it, counted from the
///   accept (first request) or from its first byte (later requests): slowloris guard;
/// - `idle_timeout`: a keep-alive connection waiting for its next request is closed after
///   it, and so is one with a request in progress but no bytes moving either way;
/// - `max_headers`, `max_header_bytes`: enforced by hyper (431), whatever the read split;
/// - `max_connections`: past it, new connections wait in the kernel backlog.
pub async fn serve(listener: TcpListener, egress: Arc<Egress>, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    let limits = egress.table.load().routing.config.sidecar.http.clone();
    let drain_timeout = egress.table.load().routing.config.sidecar.drain_timeout;
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    // 0 = serve, 1 = finish the request in flight then close, 2 = close now.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(0u8);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        // Ours (the watchdog) instead: hyper's runs while a keep-alive connection idles,
        // which would cut every idle connection at the header timeout.
        .header_read_timeout(None)
        .max_headers(limits.max_headers)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);

    // The tower stack, in one place; cloned per connection.
    // Boxed: erasing the stack's type sidesteps rustc's higher-ranked Send bug (#102211).
    let svc: tower::util::BoxCloneService<Request<Incoming>, Response<Body>, Infallible> = tower::util::BoxCloneService::new(
        ServiceBuilder::new()
            // hyper needs one concrete body type; CatchPanic wraps ours in its own.
            .map_response(unify_body)
            // A panicking handler answers 500 instead of killing the connection.
            .layer(CatchPanicLayer::custom(panic_response))
            .service_fn(move |req: Request<Incoming>| {
                let egress = egress.clone();
                async move {
                    // Framing hyper tolerates but a front proxy might read differently.
                    if let Some(res) = reject_ambiguous_framing(&req) {
                        return Ok(res);
                    }
                    Ok(egress.handle(req).await)
                }
            }),
    );

    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = connections.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let (stream, _peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let activity = Activity::new();
        let io = TokioIo::new(TrackedIo { inner: stream, activity: activity.clone() });
        let service = tracked_service(svc.clone(), activity.clone());
        let conn = http.serve_connection(io, hyper_util::service::TowerToHyperService::new(service));
        let mut stop = stop_rx.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
            let mut draining = false;
            loop {
                let deadline = activity.deadline(&limits);
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "egress connection ended with an error");
                        }
                        break;
                    }
                    changed = stop.changed() => {
                        if changed.is_err() || *stop.borrow() >= 2 {
                            break;
                        }
                        if !draining {
                            draining = true;
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                    _ = activity.changed() => {}
                    _ = tokio::time::sleep_until(deadline.into()) => {
                        match activity.expired(&limits) {
                            Some(Expired::Idle) => {
                                // Nothing in flight: hyper closes at once.
                                draining = true;
                                conn.as_mut().graceful_shutdown();
                            }
                            Some(why) => {
                                tracing::debug!(?why, "egress connection timed out; closing");
                                break;
                            }
                            None => {}
                        }
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    let _ = stop_tx.send(1);
    let drain = drain_timeout;
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    tokio::select! {
        _ = connections.acquire_many(all) => tracing::info!("egress drained"),
        _ = tokio::time::sleep(drain) => {
            tracing::warn!(?drain, "egress drain timed out; dropping remaining connections");
            let _ = stop_tx.send(2);
        }
    }
    Ok(())
}

fn panic_response(_: Box<dyn std::any::Any + Send>) -> Response<Body> {
    let body = crate::problem::problem_body(StatusCode::INTERNAL_SERVER_ERROR, "panic", "handler panicked".into(), None, None);
    let mut r = Response::new(full(body));
    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static(crate::problem::PROBLEM_JSON));
    r
}

fn ensure_request_id(mut req: Request<Incoming>) -> Request<Incoming> {
    if !req.headers().contains_key(codec::REQUEST_ID) {
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let id = new_request_id().hyphenated().encode_lower(&mut buf);
        if let Ok(v) = HeaderValue::from_str(id) {
            req.headers_mut().insert(codec::REQUEST_ID, v);
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

fn request_id(req: &Request<Incoming>) -> Option<String> {
    req.headers().get(codec::REQUEST_ID).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

impl Egress {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let _in_flight = InFlight::new(&self.metrics.egress_in_flight);
        let started = Instant::now();
        let table = self.table.load_full();
        // Every request gets an X-Request-Id (kept when the app sent one), echoed back.
        let req = ensure_request_id(req);
        let rid = request_id(&req);
        // Absolute form (HTTP_PROXY) carries the host in the URI; origin form in Host.
        let host = match req.uri().authority() {
            Some(a) => Some(a.host().to_owned()),
            None => req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned),
        };
        let path = req.uri().path().to_owned();
        let (route, idx, subject) = match table.routing.table.lookup(req.method(), host.as_deref(), &path) {
            Ok(m) => {
                let subject = match &m.route.target {
                    OutboundTarget::Request(t) | OutboundTarget::Publish(t) | OutboundTarget::JetStream(t) => {
                        match t.render(|name| m.params.get(name)) {
                            Ok(s) => Some(s),
                            Err(e) => {
                                let e = BridgeError::BadRequest(e.to_string());
                                let res = e.to_response(Some(&m.route.name), rid.as_deref());
                                table.metrics[m.index].observe(res.status(), started.elapsed().as_secs_f64());
                                return res.map(full);
                            }
                        }
                    }
                    OutboundTarget::Tunnel { subject, .. } => Some(subject.clone()),
                    OutboundTarget::Http { .. } => None,
                };
                (m.route, m.index, subject)
            }
            Err(Miss::NotFound) => {
                let e = BridgeError::NoRoute { method: req.method().to_string(), path };
                return e.to_response(None, rid.as_deref()).map(full);
            }
            Err(Miss::MethodNotAllowed(allowed)) => {
                let e = BridgeError::MethodNotAllowed { allowed: allowed.iter().map(|m| m.to_string()).collect() };
                return e.to_response(None, rid.as_deref()).map(full);
            }
        };
        let res = match self.dispatch(route, subject, req).await {
            Ok(res) => res,
            Err(e) => {
                if e.status().is_server_error() {
                    tracing::debug!(route = %route.name, error = %e, "egress request failed");
                }
                e.to_response(Some(&route.name), rid.as_deref()).map(full)
            }
        };
        table.metrics[idx].observe(res.status(), started.elapsed().as_secs_f64());
        let mut res = res;
        if let Some(id) = rid.as_deref().and_then(|id| HeaderValue::from_str(id).ok()) {
            res.headers_mut().insert(codec::REQUEST_ID, id);
        }
        res
    }

    async fn dispatch(&self, route: &Outbound, subject: Option<String>, req: Request<Incoming>) -> Result<Response<Body>, BridgeError> {
        let (parts, body) = req.into_parts();
        if let Some(len) = parts.headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
        {
            if len > route.max_body as u64 {
                return Err(BridgeError::BodyTooLarge { limit: route.max_body });
            }
        }
        // Streaming bodies obey the same limit as declared ones.
        let body = Limited::new(body, route.max_body).collect().await.map_err(|e: BoxError| {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                BridgeError::BodyTooLarge { limit: route.max_body }
            } else {
                BridgeError::BodyRead(e.to_string())
            }
        })?;
        let body = body.to_bytes();
        let subject = subject.unwrap_or_default();
        match &route.target {
            OutboundTarget::Request(_) => {
                let headers = codec::http_to_nats_headers(&parts.headers);
                self.request(route, subject, headers, body).await
            }
            OutboundTarget::Tunnel { .. } => {
                let headers = codec::tunnel_request_headers(&parts.method, parts.uri.path(), parts.uri.query(), &parts.headers);
                self.request(route, subject, headers, body).await
            }
            OutboundTarget::Publish(_) => self.publish(route, subject, &parts.headers, body).await,
            OutboundTarget::JetStream(_) => self.jetstream(route, subject, &parts.headers, body).await,
            OutboundTarget::Http { upstream } => self.proxy(route, upstream, parts, body).await,
        }
    }

    fn ensure_connected(&self) -> Result<(), BridgeError> {
        // Without this, requests would sit in the client's buffer until their timeout.
        if is_connected(&self.nats) {
            Ok(())
        } else {
            Err(BridgeError::NatsDisconnected)
        }
    }

    async fn request(
        &self,
        route: &Outbound,
        subject: String,
        headers: async_nats::HeaderMap,
        body: Bytes,
    ) -> Result<Response<Body>, BridgeError> {
        self.ensure_connected()?;
        let request = async_nats::client::Request::new().headers(headers).payload(body).timeout(Some(route.timeout));
        let reply = self.nats.send_request(subject.clone(), request).await.map_err(|e| {
            use async_nats::client::RequestErrorKind as K;
            match e.kind() {
                K::NoResponders => BridgeError::NoResponders { subject: subject.clone() },
                K::TimedOut => BridgeError::Timeout { subject: subject.clone(), timeout: route.timeout },
                K::MaxPayloadExceeded => BridgeError::PayloadTooLarge { max_payload: self.nats.server_info().max_payload },
                K::InvalidSubject => BridgeError::BadRequest(format!("invalid subject {subject:?}")),
                K::Other => BridgeError::Nats(e.to_string()),
            }
        })?;
        let r = codec::reply_to_response(reply.headers.as_ref(), reply.payload).map_err(|e| BridgeError::BadReply(e.to_string()))?;
        let mut res = Response::new(full(r.body));
        *res.status_mut() = r.status;
        *res.headers_mut() = r.headers;
        Ok(res)
    }

    async fn publish(
        &self,
        route: &Outbound,
        subject: String,
        headers: &http::HeaderMap,
        body: Bytes,
    ) -> Result<Response<Body>, BridgeError> {
        self.ensure_connected()?;
        let nats_headers = codec::http_to_nats_headers(headers);
        self.nats.publish_with_headers(subject.clone(), nats_headers, body).await.map_err(|e| match e.kind() {
            async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
                BridgeError::PayloadTooLarge { max_payload: self.nats.server_info().max_payload }
            }
            _ => BridgeError::Nats(e.to_string()),
        })?;
        // A buffered publish is no proof of delivery (nats.rs #1177): flush, bounded.
        match tokio::time::timeout(route.timeout, self.nats.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(BridgeError::Nats(e.to_string())),
            Err(_) => return Err(BridgeError::NatsDisconnected),
        }
        Ok(accepted(serde_json::json!({ "subject": subject })))
    }

    async fn jetstream(
        &self,
        route: &Outbound,
        subject: String,
        headers: &http::HeaderMap,
        body: Bytes,
    ) -> Result<Response<Body>, BridgeError> {
        self.ensure_connected()?;
        let _permit = self.publish_permits.try_acquire().map_err(|_| BridgeError::Overloaded)?;
        let _in_flight = InFlight::new(&self.metrics.jetstream_in_flight);
        let mut nats_headers = codec::http_to_nats_headers(headers);
        if let Some(key) = headers.get(codec::IDEMPOTENCY_KEY).and_then(|v| v.to_str().ok()) {
            nats_headers.insert(codec::NATS_MSG_ID, key);
        }
        let ack = publish_acked(&self.js, &subject, nats_headers, body, route.timeout).await.map_err(|e| match e.kind() {
            PublishErrorKind::NoStream => BridgeError::NoStream { subject: subject.clone() },
            PublishErrorKind::PayloadTooLarge => BridgeError::PayloadTooLarge { max_payload: self.nats.server_info().max_payload },
            PublishErrorKind::TimedOut | PublishErrorKind::Failed => BridgeError::JetStream(e),
        })?;
        let mut res = accepted(serde_json::json!({ "stream": ack.stream, "seq": ack.sequence, "duplicate": ack.duplicate }));
        let h = res.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&ack.stream) {
            h.insert(codec::BRIDGE_STREAM, v);
        }
        h.insert(codec::BRIDGE_SEQ, HeaderValue::from(ack.sequence));
        Ok(res)
    }

    async fn proxy(
        &self,
        route: &Outbound,
        upstream: &http::Uri,
        parts: http::request::Parts,
        body: Bytes,
    ) -> Result<Response<Body>, BridgeError> {
        let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let base = upstream.path().trim_end_matches('/');
        let uri = format!(
            "{}://{}{}{}",
            upstream.scheme_str().unwrap_or("http"),
            upstream.authority().map(|a| a.as_str()).unwrap_or(""),
            base,
            pq
        );
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = parts.method;
        *req.uri_mut() = uri.parse().map_err(|e: http::uri::InvalidUri| BridgeError::BadRequest(e.to_string()))?;
        *req.headers_mut() = codec::end_to_end_headers(&parts.headers);
        let res = tokio::time::timeout(route.timeout, self.upstream.request(req))
            .await
            .map_err(|_| BridgeError::UpstreamTimeout(route.timeout))?
            .map_err(|e| BridgeError::Upstream(e.to_string()))?;
        let (mut parts, body) = res.into_parts();
        parts.headers = codec::end_to_end_headers(&parts.headers);
        Ok(Response::from_parts(parts, body.map_err(box_error).boxed_unsync()))
    }
}

fn accepted(v: serde_json::Value) -> Response<Body> {
    let mut res = Response::new(full(serde_json::to_vec(&v).unwrap_or_default()));
    *res.status_mut() = StatusCode::ACCEPTED;
    res.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

fn never(e: Infallible) -> BoxError {
    match e {}
}

fn unify_body<B>(r: Response<B>) -> Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    r.map(|b| b.map_err(Into::into).boxed_unsync())
}

fn box_error(e: hyper::Error) -> BoxError {
    Box::new(e)
}

// ---------------------------------------------------------------------------------------
// Per-connection edge limits: what the connection is doing, and since when.

/// Why a connection's watchdog closed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    /// Waiting for the next request longer than `idle_timeout`.
    Idle,
    /// A request head (started at accept or by its first byte) not complete in time.
    HeaderTimeout,
    /// A request in progress, but no bytes read or written for `idle_timeout`.
    Stalled,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for a request head. `head` is when it started: the accept for a new
    /// connection, the first byte for a later request; `None` while idle.
    AwaitingHead { since: Instant, head: Option<Instant> },
    /// Requests handed to the service whose responses are not yet fully written.
    InRequest(usize),
}

#[derive(Debug)]
struct ActivityState {
    phase: Phase,
    last_io: Instant,
    /// The raw bytes of the request head being read (first read of it onwards), until its
    /// blank line; then `framing` holds what is wrong with it, if anything.
    head_bytes: Vec<u8>,
    head_done: bool,
    framing: Option<&'static str>,
}

/// Raw heads larger than this are not sniffed: hyper refuses them anyway (431).
const MAX_SNIFF: usize = 256 << 10;

/// Shared by a connection's IO wrapper, its service and its watchdog.
#[derive(Debug)]
struct Activity {
    state: std::sync::Mutex<ActivityState>,
    /// Wakes the watchdog when a deadline may have moved earlier (a head started).
    notify: tokio::sync::Notify,
}

impl Activity {
    fn new() -> Arc<Self> {
        let now = Instant::now();
        Arc::new(Self {
            state: std::sync::Mutex::new(ActivityState {
                phase: Phase::AwaitingHead { since: now, head: Some(now) },
                last_io: now,
                head_bytes: Vec::new(),
                head_done: false,
                framing: None,
            }),
            notify: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut s = self.lock();
        s.last_io = now;
        if let Phase::AwaitingHead { head, .. } = &mut s.phase {
            let started = head.is_none();
            if started {
                *head = Some(now);
            }
            if !s.head_done && s.head_bytes.is_empty() {
                // The usual case: the whole head (and often the body) in one read. Look at
                // it in place instead of copying the read into `head_bytes`.
                if let Some(end) = find_blank_line(data) {
                    s.framing = framing_problem(&data[..end]);
                    s.head_done = true;
                }
            }
            if !s.head_done {
                // hyper hides framing details (identical Content-Length lines merged,
                // Content-Length dropped next to Transfer-Encoding): look at the wire.
                let from = s.head_bytes.len().saturating_sub(3);
                s.head_bytes.extend_from_slice(data);
                if let Some(end) = find_blank_line(&s.head_bytes[from..]).map(|e| e + from) {
                    s.framing = framing_problem(&s.head_bytes[..end]);
                    s.head_done = true;
                    s.head_bytes = Vec::new();
                } else if s.head_bytes.len() > MAX_SNIFF {
                    s.head_done = true;
                    s.head_bytes = Vec::new();
                }
            }
            drop(s);
            if started {
                self.notify.notify_one();
            }
        }
    }

    fn wrote(&self) {
        self.lock().last_io = Instant::now();
    }

    /// The service got a request: its head is complete. Returns what is wrong with its
    /// framing on the wire, if anything.
    fn begin(&self) -> Option<&'static str> {
        let mut s = self.lock();
        s.phase = match s.phase {
            Phase::InRequest(n) => Phase::InRequest(n + 1),
            Phase::AwaitingHead { .. } => Phase::InRequest(1),
        };
        s.head_done = false;
        s.head_bytes = Vec::new();
        s.framing.take()
    }

    /// A response was written (its body dropped by hyper): the connection may idle.
    fn end(&self) {
        let now = Instant::now();
        let mut s = self.lock();
        s.phase = match s.phase {
            Phase::InRequest(n) if n > 1 => Phase::InRequest(n - 1),
            _ => Phase::AwaitingHead { since: now, head: None },
        };
        drop(s);
        self.notify.notify_one();
    }

    async fn changed(&self) {
        self.notify.notified().await
    }

    fn deadline(&self, limits: &crate::config::HttpLimits) -> Instant {
        let s = self.lock();
        match s.phase {
            Phase::AwaitingHead { head: Some(h), .. } => h + limits.header_read_timeout,
            Phase::AwaitingHead { since, head: None } => since + limits.idle_timeout,
            Phase::InRequest(_) => s.last_io + limits.idle_timeout,
        }
    }

    fn expired(&self, limits: &crate::config::HttpLimits) -> Option<Expired> {
        let now = Instant::now();
        let s = self.lock();
        match s.phase {
            Phase::AwaitingHead { head: Some(h), .. } if now >= h + limits.header_read_timeout => Some(Expired::HeaderTimeout),
            Phase::AwaitingHead { since, head: None } if now >= since + limits.idle_timeout => Some(Expired::Idle),
            Phase::InRequest(_) if now >= s.last_io + limits.idle_timeout => Some(Expired::Stalled),
            _ => None,
        }
    }
}

/// Marks the connection's activity on every read and write.
struct TrackedIo {
    inner: tokio::net::TcpStream,
    activity: Arc<Activity>,
}

impl tokio::io::AsyncRead for TrackedIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = r {
            this.activity.read(&buf.filled()[before..]);
        }
        r
    }
}

impl tokio::io::AsyncWrite for TrackedIo {
    fn poll_write(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = r {
            if n > 0 {
                this.activity.wrote();
            }
        }
        r
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let std::task::Poll::Ready(Ok(n)) = r {
            if n > 0 {
                this.activity.wrote();
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Ends the request's activity when hyper drops the response body (fully written, or the
/// connection failed).
struct EndOfResponse(Arc<Activity>);

impl Drop for EndOfResponse {
    fn drop(&mut self) {
        self.0.end();
    }
}

type EgressService = tower::util::BoxCloneService<Request<Incoming>, Response<Body>, Infallible>;

/// The egress service for one connection: marks each request's start and end, and
/// refuses a request whose head was ambiguous on the wire.
fn tracked_service(svc: EgressService, activity: Arc<Activity>) -> EgressService {
    use tower::ServiceExt as _;
    tower::util::BoxCloneService::new(tower::service_fn(move |req: Request<Incoming>| {
        let framing = activity.begin();
        let guard = EndOfResponse(activity.clone());
        let svc = svc.clone();
        async move {
            let res = match framing {
                Some(why) => bad_framing(why),
                None => svc.oneshot(req).await?,
            };
            Ok::<_, Infallible>(res.map(move |body| Guarded { body, _guard: guard }.boxed_unsync()))
        }
    }))
}

/// A response body that holds a guard until it is dropped, and keeps the inner body's
/// size hint so a sized response still gets its `Content-Length`.
struct Guarded<G> {
    body: Body,
    _guard: G,
}

impl<G: Unpin> http_body::Body for Guarded<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

fn find_blank_line(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").or_else(|| b.windows(2).position(|w| w == b"\n\n"))
}

/// What makes a raw request head's framing ambiguous, if anything (see
/// [`reject_ambiguous_framing`]). Header names are matched case-insensitively.
fn framing_problem(head: &[u8]) -> Option<&'static str> {
    let (mut cl, mut te) = (0, 0);
    let mut te_chunked_only = true;
    for line in head.split(|&b| b == b'\n').skip(1) {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (name, value) = (line[..colon].trim_ascii(), line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"content-length") {
            cl += 1;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            te += 1;
            te_chunked_only &= value.eq_ignore_ascii_case(b"chunked");
        }
    }
    if cl > 1 {
        Some("more than one Content-Length header")
    } else if te > 1 {
        Some("more than one Transfer-Encoding header")
    } else if te == 1 && !te_chunked_only {
        Some("unsupported Transfer-Encoding (only chunked)")
    } else if cl > 0 && te > 0 {
        Some("both Content-Length and Transfer-Encoding")
    } else {
        None
    }
}

/// Requests whose framing two HTTP parsers could disagree on: more than one
/// `Content-Length` line (even identical), more than one `Transfer-Encoding` line, a
/// transfer coding other than exactly `chunked`, or both headers at once (hyper follows
/// RFC 9112 and lets chunked win; a proxy in front may not). hyper already refuses
/// `Content-Length: +3`, lists, and a `Transfer-Encoding` not ending in `chunked`.
/// Answered 400 with `Connection: close`, so nothing after it on the connection is parsed.
fn reject_ambiguous_framing(req: &Request<Incoming>) -> Option<Response<Body>> {
    let h = req.headers();
    let cl = h.get_all(http::header::CONTENT_LENGTH).iter().count();
    let te: Vec<_> = h.get_all(http::header::TRANSFER_ENCODING).iter().collect();
    let why = if cl > 1 {
        "more than one Content-Length header"
    } else if te.len() > 1 {
        "more than one Transfer-Encoding header"
    } else if te.first().is_some_and(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked")) {
        "unsupported Transfer-Encoding (only chunked)"
    } else if cl > 0 && !te.is_empty() {
        "both Content-Length and Transfer-Encoding"
    } else {
        return None;
    };
    Some(bad_framing(why))
}

/// 400 with `Connection: close`: nothing after this request on the connection is parsed.
fn bad_framing(why: &str) -> Response<Body> {
    let body =
        crate::problem::problem_body(StatusCode::BAD_REQUEST, "bad-framing", format!("ambiguous request framing: {why}"), None, None);
    let mut r = Response::new(full(body));
    *r.status_mut() = StatusCode::BAD_REQUEST;
    r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static(crate::problem::PROBLEM_JSON));
    r.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    r
}

#[cfg(test)]
mod edge_tests {
    use super::framing_problem;

    #[test]
    fn framing_is_judged_on_the_raw_head() {
        let head = |h: &str| format!("POST / HTTP/1.1\r\nHost: x\r\n{h}");
        assert_eq!(framing_problem(head("Content-Length: 3\r\n").as_bytes()), None);
        assert_eq!(framing_problem(head("Transfer-Encoding: chunked\r\n").as_bytes()), None);
        assert_eq!(framing_problem(head("TRANSFER-ENCODING:  Chunked \r\n").as_bytes()), None);
        assert!(framing_problem(head("Content-Length: 3\r\ncontent-length: 3\r\n").as_bytes()).is_some());
        assert!(framing_problem(head("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n").as_bytes()).is_some());
        assert!(framing_problem(head("Transfer-Encoding: gzip, chunked\r\n").as_bytes()).is_some());
        assert!(framing_problem(head("Content-Length: 3\r\nTransfer-Encoding: chunked\r\n").as_bytes()).is_some());
        // The request line is not a header, whatever it contains.
        assert_eq!(framing_problem(b"GET /content-length:1 HTTP/1.1\r\nContent-Length: 0\r\n"), None);
    }
}
