//! The egress listener (HTTP → NATS): accepts the legacy app's outgoing calls, in origin
//! or absolute (proxy) form, finds the route and carries the call over NATS by the route's
//! mode — request, publish, jetstream, tunnel — or proxies it as plain HTTP.

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
use crate::connection::is_connected;
use crate::metrics::{EgressRouteMetrics, Metrics};
use crate::problem::BridgeError;
use crate::routes::{Miss, Routing};

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
        let upstream = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Arc::new(Self { table, nats, js, upstream, metrics, publish_permits: Arc::new(Semaphore::new(permits)) })
    }
}

/// Serves the egress listener until `shutdown` resolves, then stops accepting and lets
/// in-flight requests finish for up to `drain_timeout` (from the config in force).
pub async fn serve(listener: TcpListener, egress: Arc<Egress>, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    let limits = egress.table.load().routing.config.sidecar.http.clone();
    let drain_timeout = egress.table.load().routing.config.sidecar.drain_timeout;
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.max_headers)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);

    // The tower stack, in one place; cloned per connection.
    // Boxed: erasing the stack's type sidesteps rustc's higher-ranked Send bug (#102211).
    let svc: tower::util::BoxCloneService<Request<Incoming>, Response<Body>, Infallible> = tower::util::BoxCloneService::new(ServiceBuilder::new()
        // hyper needs one concrete body type; CatchPanic wraps ours in its own.
        .map_response(unify_body)
        // A panicking handler answers 500 instead of killing the connection.
        .layer(CatchPanicLayer::custom(panic_response))
        .service_fn(move |req| {
            let egress = egress.clone();
            async move { Ok(egress.handle(req).await) }
        }));

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
        let conn = http.serve_connection(TokioIo::new(stream), hyper_util::service::TowerToHyperService::new(svc.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "egress connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let drain = drain_timeout;
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("egress drained"),
        _ = tokio::time::sleep(drain) => tracing::warn!(?drain, "egress drain timed out; dropping remaining connections"),
    }
    Ok(())
}

/// Decrements the in-flight gauge however the request ends.
struct InFlight<'a>(&'a prometheus::IntGauge);
impl<'a> InFlight<'a> {
    fn new(g: &'a prometheus::IntGauge) -> Self {
        g.inc();
        Self(g)
    }
}
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
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
        let id = uuid::Uuid::new_v4().hyphenated().to_string();
        if let Ok(v) = HeaderValue::from_str(&id) {
            req.headers_mut().insert(codec::REQUEST_ID, v);
        }
    }
    req
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
        if let Some(len) = parts.headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()) {
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

    async fn request(&self, route: &Outbound, subject: String, headers: async_nats::HeaderMap, body: Bytes) -> Result<Response<Body>, BridgeError> {
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

    async fn publish(&self, route: &Outbound, subject: String, headers: &http::HeaderMap, body: Bytes) -> Result<Response<Body>, BridgeError> {
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

    async fn jetstream(&self, route: &Outbound, subject: String, headers: &http::HeaderMap, body: Bytes) -> Result<Response<Body>, BridgeError> {
        self.ensure_connected()?;
        let _permit = self.publish_permits.try_acquire().map_err(|_| BridgeError::Overloaded)?;
        let _in_flight = InFlight::new(&self.metrics.jetstream_in_flight);
        let mut nats_headers = codec::http_to_nats_headers(headers);
        if let Some(key) = headers.get(codec::IDEMPOTENCY_KEY).and_then(|v| v.to_str().ok()) {
            nats_headers.insert(codec::NATS_MSG_ID, key);
        }
        let deadline = tokio::time::Instant::now() + route.timeout;
        // During a stream leader election the server answers "no responders"; like the Go
        // and .NET clients, retry twice 250 ms apart with the same Nats-Msg-Id.
        let mut attempt = 0;
        let ack = loop {
            attempt += 1;
            let publish = async {
                let fut = self.js.publish_with_headers(subject.clone(), nats_headers.clone(), body.clone()).await?;
                fut.await
            };
            // The ack future uses the client's timeout, not ours (nats.rs #1558).
            match tokio::time::timeout_at(deadline, publish).await {
                Ok(Ok(ack)) => break ack,
                Ok(Err(e)) => {
                    use async_nats::jetstream::context::PublishErrorKind as K;
                    match e.kind() {
                        K::StreamNotFound if attempt < 3 && tokio::time::Instant::now() + Duration::from_millis(250) < deadline => {
                            tokio::time::sleep(Duration::from_millis(250)).await;
                        }
                        K::StreamNotFound => return Err(BridgeError::NoStream { subject }),
                        K::MaxPayloadExceeded => {
                            return Err(BridgeError::PayloadTooLarge { max_payload: self.nats.server_info().max_payload })
                        }
                        _ => return Err(BridgeError::JetStream(e.to_string())),
                    }
                }
                Err(_) => return Err(BridgeError::JetStream(format!("no ack within {:?}", route.timeout))),
            }
        };
        let mut res = accepted(serde_json::json!({ "stream": ack.stream, "seq": ack.sequence, "duplicate": ack.duplicate }));
        let h = res.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&ack.stream) {
            h.insert(codec::BRIDGE_STREAM, v);
        }
        h.insert(codec::BRIDGE_SEQ, HeaderValue::from(ack.sequence));
        Ok(res)
    }

    async fn proxy(&self, route: &Outbound, upstream: &http::Uri, parts: http::request::Parts, body: Bytes) -> Result<Response<Body>, BridgeError> {
        let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let base = upstream.path().trim_end_matches('/');
        let uri = format!("{}://{}{}{}", upstream.scheme_str().unwrap_or("http"), upstream.authority().map(|a| a.as_str()).unwrap_or(""), base, pq);
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = parts.method;
        *req.uri_mut() = uri.parse().map_err(|e: http::uri::InvalidUri| BridgeError::BadRequest(e.to_string()))?;
        let headers = req.headers_mut();
        for (name, value) in &parts.headers {
            if !is_hop(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        let res = tokio::time::timeout(route.timeout, self.upstream.request(req))
            .await
            .map_err(|_| BridgeError::UpstreamTimeout(route.timeout))?
            .map_err(|e| BridgeError::Upstream(e.to_string()))?;
        let (mut parts, body) = res.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, body.map_err(box_error).boxed_unsync()))
    }
}

fn is_hop(name: &http::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "proxy-authenticate" | "proxy-authorization" | "proxy-connection" | "te" | "trailer" | "transfer-encoding" | "upgrade" | "host"
    )
}

fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let hop: Vec<_> = headers.keys().filter(|k| is_hop(k)).cloned().collect();
    for k in hop {
        headers.remove(k);
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
