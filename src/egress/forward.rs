//! Plain HTTP toward an origin, for `http` routes and for calls no route takes (the
//! listener as a forward proxy under `HTTP_PROXY`): the request body streams upstream
//! under an optional limit, the response streams back, hop-by-hop headers (RFC 9110
//! §7.6.1) stay on their hop, and an `Upgrade` (WebSocket) is spliced through after its
//! 101. The route `timeout` bounds the wait for the response head once the request body
//! is sent; the listener's idle watchdog bounds everything else.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::watch;

use crate::codec;
use crate::egress::slots::{self, Slots};
use crate::egress::{full, Body, BoxError, Egress};
use crate::metrics::status_class;
use crate::problem::{error_chain, BridgeError};

/// The route label of forwarded calls in `natsbridge_egress_requests_total`.
pub const UNMATCHED_ROUTE: &str = "(unmatched)";

/// How much of a body without a declared length is read before the upstream is called,
/// when the route has a `max_body`: a limit within it is decided before the upstream sees
/// anything (an over-limit request never reaches the app, as when bodies were buffered);
/// past it the body streams, and an overrun aborts the upstream's request mid-body.
const PREFETCH: usize = 256 << 10;

/// A request body on its way upstream: the prefetched frames first, then streamed as it
/// arrives, refused past `limit`, and telling (through `done`) when it has been sent whole
/// or dropped.
pub struct Upload {
    prefix: std::collections::VecDeque<Frame<Bytes>>,
    /// The inner body ended during the prefetch.
    inner_done: bool,
    /// The app's body as it streams in, or none: a buffered body is all in `prefix`.
    inner: Option<Incoming>,
    limit: usize,
    seen: usize,
    over: Arc<AtomicBool>,
    done: watch::Sender<bool>,
}

impl Upload {
    fn finish(&self) {
        self.done.send_replace(true);
    }
}

impl http_body::Body for Upload {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(frame) = this.prefix.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        let Some(inner) = this.inner.as_mut().filter(|_| !this.inner_done) else {
            this.finish();
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.seen = this.seen.saturating_add(frame.data_ref().map_or(0, Bytes::len));
                if this.seen > this.limit {
                    // Checked while streaming: the upstream sees a broken body, the app a 413.
                    this.over.store(true, Ordering::Relaxed);
                    this.finish();
                    return Poll::Ready(Some(Err(BridgeError::BodyTooLarge { limit: this.limit }.into())));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && (self.inner_done || self.inner.as_ref().is_none_or(|b| b.is_end_stream()))
    }

    // Kept, so a sized request goes upstream with its Content-Length, not chunked.
    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(inner) if !self.inner_done => inner.size_hint(),
            _ => SizeHint::with_exact(self.prefix.iter().filter_map(Frame::data_ref).map(|d| d.len() as u64).sum()),
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Where a request goes and under which limits.
pub(super) struct Outgoing {
    pub uri: Uri,
    /// Refused (413) past this many body bytes; `usize::MAX` for none.
    pub max_body: usize,
    /// The bound on the response head once the body is sent; `None` leaves it to the
    /// listener's idle watchdog, as for forwarded calls (the app's own timeouts apply).
    pub timeout: Option<Duration>,
    /// The `host` label for a tunnel after an upgrade.
    pub host_label: String,
}

impl Egress {
    /// A request no route takes, sent to its origin (`[sidecar] unmatched = "forward"`):
    /// counted under route `(unmatched)` and by host.
    pub(super) async fn forward(&self, req: Request<Incoming>, rid: Option<&str>) -> Response<Body> {
        let started = Instant::now();
        let authority = req.uri().authority().map(|a| a.as_str().to_owned()).unwrap_or_default();
        let host_label = self.metrics.forward_hosts.label(&authority);
        let res = match self.forward_target(req.uri(), req.headers()) {
            Ok(uri) => self.send_upstream(Outgoing { uri, max_body: usize::MAX, timeout: None, host_label: host_label.clone() }, req).await,
            Err(e) => Err(e),
        };
        let res = res.unwrap_or_else(|e| {
            tracing::debug!(target = %authority, error = %e, "forwarded call failed");
            e.to_response(None, rid).map(full)
        });
        self.unmatched.observe(res.status(), started.elapsed().as_secs_f64());
        self.metrics.egress_forwarded.with_label_values(&[&host_label, status_class(res.status())]).inc();
        res
    }

    /// The origin URI of an absolute-form `http://` request, unless it would loop back.
    fn forward_target(&self, uri: &Uri, headers: &HeaderMap) -> Result<Uri, BridgeError> {
        if uri.scheme() != Some(&http::uri::Scheme::HTTP) {
            return Err(BridgeError::BadRequest(format!(
                "only http:// URLs are forwarded; an https:// call goes through CONNECT (HTTPS_PROXY), not {uri}"
            )));
        }
        let authority = uri.authority().ok_or_else(|| BridgeError::BadRequest("no host in the request URL".into()))?;
        self.refuse_loop(authority.host(), authority.port_u16().unwrap_or(80), headers)?;
        Ok(uri.clone())
    }

    /// Refuses a target that is this sidecar's listener: loopback or its listen address at
    /// its port, or a request that already went through this very process (its `Via`).
    pub(super) fn refuse_loop(&self, host: &str, port: u16, headers: &HeaderMap) -> Result<(), BridgeError> {
        let target = || format!("{host}:{port}");
        let via_us = headers
            .get_all(http::header::VIA)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| self.via.to_str().is_ok_and(|ours| v.contains(ours))));
        if via_us {
            return Err(BridgeError::LoopDetected { target: target() });
        }
        if self.is_own_listener(host, port) {
            return Err(BridgeError::LoopDetected { target: target() });
        }
        Ok(())
    }

    /// Whether `host:port` is this sidecar's listener: loopback, unspecified or its listen
    /// address, at its port.
    fn is_own_listener(&self, host: &str, port: u16) -> bool {
        let Some(listen) = self.listen.get() else { return false };
        if port != listen.port() {
            return false;
        }
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        bare.eq_ignore_ascii_case("localhost")
            || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified() || ip == listen.ip())
    }

    /// An HTTP/2 request always carries its target in `:authority` (its URI is absolute),
    /// where HTTP/1 tells a proxy call (absolute form) from a direct one (origin form,
    /// `Host`). One addressed to this listener is a direct call: it becomes origin form
    /// with that `Host`, and is routed, refused or answered 404 exactly as over HTTP/1.
    /// Any other authority is a forward-proxy call, as absolute form is.
    pub(super) fn h2_origin_form(&self, mut req: Request<Incoming>) -> Request<Incoming> {
        if req.version() != http::Version::HTTP_2 || req.method() == http::Method::CONNECT {
            return req;
        }
        let Some(authority) = req.uri().authority().cloned() else { return req };
        if !self.is_own_listener(authority.host(), authority.port_u16().unwrap_or(80)) {
            return req;
        }
        let pq = req.uri().path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(pq);
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            req.headers_mut().entry(http::header::HOST).or_insert(host);
        }
        req
    }

    /// Sends a request whose body was already read (a cut-over route's upstream share or
    /// fallback) to `to.uri` and streams the answer back. No upgrade: the route is not
    /// `http`, so its calls never switched protocols.
    pub(super) async fn send_buffered(
        &self,
        to: Outgoing,
        parts: &http::request::Parts,
        body: Bytes,
    ) -> Result<Response<Body>, BridgeError> {
        let len = body.len();
        let over = Arc::new(AtomicBool::new(false));
        let (done, mut sent) = watch::channel(false);
        let prefix = if body.is_empty() { Default::default() } else { [Frame::data(body)].into() };
        let upload = Upload { prefix, inner_done: true, inner: None, limit: usize::MAX, seen: len, over, done };
        let mut out = Request::new(upload);
        *out.method_mut() = parts.method.clone();
        *out.uri_mut() = to.uri;
        *out.headers_mut() = codec::end_to_end_headers(&parts.headers);
        out.headers_mut().remove(http::header::UPGRADE);
        out.headers_mut().append(http::header::VIA, self.via.clone());
        let send = self.upstream.request(out);
        let res = match to.timeout {
            None => send.await,
            Some(timeout) => {
                tokio::pin!(send);
                tokio::select! {
                    r = &mut send => r,
                    _ = async { let _ = sent.wait_for(|d| *d).await; } => tokio::time::timeout(timeout, send).await.map_err(|_| BridgeError::UpstreamTimeout(timeout))?,
                }
            }
        };
        let res = res.map_err(|e| BridgeError::Upstream(error_chain(&e)))?;
        let (mut parts, body) = res.into_parts();
        parts.headers = passed_through(&parts.headers);
        Ok(Response::from_parts(parts, body.map_err(|e| Box::new(e) as BoxError).boxed_unsync()))
    }

    /// Sends a request to `to.uri` and streams the answer back; see the module doc.
    pub(super) async fn send_upstream(&self, to: Outgoing, mut req: Request<Incoming>) -> Result<Response<Body>, BridgeError> {
        let declared = req.body().size_hint().exact();
        if declared.is_some_and(|len| len > to.max_body as u64) {
            return Err(BridgeError::BodyTooLarge { limit: to.max_body });
        }
        let protocol = upgrade_protocol(req.headers());
        let ours = protocol.is_some().then(|| hyper::upgrade::on(&mut req));
        // For the tunnel's place under `max_connections`, taken on a 101.
        let slots = (req.extensions().get::<Slots>().cloned(), req.version());
        let (parts, mut body) = req.into_parts();
        let (prefix, seen, inner_done) = match (declared, to.max_body) {
            // Sized bodies were checked above; unlimited ones need no look ahead.
            (Some(_), _) | (None, usize::MAX) => Default::default(),
            (None, limit) => prefetch(&mut body, limit).await?,
        };
        let over = Arc::new(AtomicBool::new(false));
        let (done, mut sent) = watch::channel(false);
        let upload = Upload { prefix, inner_done, inner: Some(body), limit: to.max_body, seen, over: over.clone(), done };
        let mut out = Request::new(upload);
        *out.method_mut() = parts.method;
        *out.uri_mut() = to.uri;
        *out.headers_mut() = codec::end_to_end_headers(&parts.headers);
        if let Some(p) = &protocol {
            set_upgrade(out.headers_mut(), p.clone());
        }
        out.headers_mut().append(http::header::VIA, self.via.clone());

        let send = self.upstream.request(out);
        tokio::pin!(send);
        let res = match to.timeout {
            None => send.await,
            Some(timeout) => tokio::select! {
                r = &mut send => r,
                // The body is sent (or gone): from now on the route's timeout runs.
                _ = async { let _ = sent.wait_for(|d| *d).await; } => tokio::time::timeout(timeout, send).await.map_err(|_| BridgeError::UpstreamTimeout(timeout))?,
            },
        };
        let mut res = res.map_err(|e| {
            if over.load(Ordering::Relaxed) {
                BridgeError::BodyTooLarge { limit: to.max_body }
            } else {
                BridgeError::Upstream(error_chain(&e))
            }
        })?;
        if let (StatusCode::SWITCHING_PROTOCOLS, Some(ours)) = (res.status(), ours) {
            // Over HTTP/1 (the only upgrade) the tunnel inherits the connection's place.
            let slot = slots::for_tunnel(slots.0.as_ref(), slots.1)?;
            let theirs = hyper::upgrade::on(&mut res);
            self.splice_upgrade(ours, theirs, to.host_label, slot);
            let mut headers = codec::end_to_end_headers(res.headers());
            if let Some(p) = res.headers().get(http::header::UPGRADE) {
                set_upgrade(&mut headers, p.clone());
            }
            let mut switched = Response::new(full(Bytes::new()));
            *switched.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            *switched.headers_mut() = headers;
            return Ok(switched);
        }
        let (mut parts, body) = res.into_parts();
        parts.headers = passed_through(&parts.headers);
        Ok(Response::from_parts(parts, body.map_err(|e| Box::new(e) as BoxError).boxed_unsync()))
    }
}

/// The upstream response's headers as the app gets them: the end-to-end ones, and its
/// `Content-Length`. That one is on the hop-by-hop list because a NATS hop recomputes it,
/// but a body passed through unchanged keeps its length, and hyper writes none on its own
/// for a HEAD (or a 304): dropping it answered the app with less than the origin said.
/// Not beside a `Transfer-Encoding`: then the length is the chunks' (RFC 9112 §6.3).
fn passed_through(headers: &HeaderMap) -> HeaderMap {
    let mut out = codec::end_to_end_headers(headers);
    let len = headers.get(http::header::CONTENT_LENGTH).filter(|_| !headers.contains_key(http::header::TRANSFER_ENCODING));
    if let Some(len) = len {
        out.insert(http::header::CONTENT_LENGTH, len.clone());
    }
    out
}

/// Reads up to [`PREFETCH`] bytes of a body without a declared length: its frames, their
/// size, and whether the body ended. 413 when they already pass `limit`.
async fn prefetch(body: &mut Incoming, limit: usize) -> Result<(std::collections::VecDeque<Frame<Bytes>>, usize, bool), BridgeError> {
    let mut frames = std::collections::VecDeque::new();
    let mut seen = 0usize;
    while seen <= PREFETCH {
        let Some(frame) = body.frame().await else { return Ok((frames, seen, true)) };
        let frame = frame.map_err(|e| BridgeError::BodyRead(e.into()))?;
        seen = seen.saturating_add(frame.data_ref().map_or(0, Bytes::len));
        if seen > limit {
            return Err(BridgeError::BodyTooLarge { limit });
        }
        frames.push_back(frame);
    }
    Ok((frames, seen, false))
}

/// The protocol a request asks to switch to (`Connection: upgrade` plus `Upgrade: …`).
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")));
    asks.then(|| headers.get(http::header::UPGRADE).cloned()).flatten()
}

/// `Upgrade` is hop-by-hop: each hop that passes the switch on sets it again.
fn set_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(http::header::UPGRADE, protocol);
    headers.insert(http::header::CONNECTION, HeaderValue::from_static("upgrade"));
}
