//! The egress listener: accepts connections under `max_connections`, serves HTTP/1.1 and
//! HTTP/2 with prior knowledge (h2c, told apart by the connection preface: [`super::version`])
//! on them through one service per connection ([`Tracked`]), and guards the edge. Knows nothing of routes:
//! each request goes to [`Egress::handle`].
//!
//! Edge limits (`[sidecar]`), enforced per connection by a watchdog (see [`Activity`]):
//! - `header_read_timeout`: a request head must arrive whole within it, counted from the
//!   accept (first request) or from its first byte (later requests): slowloris guard;
//! - `idle_timeout`: a keep-alive connection waiting for its next request is closed after
//!   it, and so is one with a request in progress but no bytes moving either way;
//! - `max_headers`, `max_header_bytes`: enforced by hyper (431), whatever the read split;
//!   on HTTP/2, `max_header_bytes` is the advertised header list size (h2 answers 431)
//!   and `max_headers` is counted here (431);
//! - `max_connections`: past it, new connections wait in the kernel backlog. Open tunnels
//!   (`CONNECT`, upgrades) count too, and the drain waits for them ([`super::slots`]).
//!
//! On HTTP/2 the header timeout covers the preface and the first request's headers; an
//! idle connection's control frames (pings, window updates) do not start it again, so
//! it idles out after `idle_timeout` like an HTTP/1 keep-alive connection.
//!
//! Requests whose framing two HTTP parsers could read differently are refused before
//! they reach the handler: on the wire, every HTTP/1 request on the connection, pipelined
//! ones included ([`super::framing`]), and again on what hyper parsed, HTTP/2 included
//! (its requests may be forwarded over HTTP/1) ([`reject_ambiguous_framing`]).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::config::HttpLimits;
use crate::egress::framing::Guard;
use crate::egress::slots::{Slots, Stop};
use crate::egress::version::{self, Builders, Conn, Replay, Served};
use crate::egress::{full, Body, BoxError, Egress};
use crate::problem::BridgeError;

/// Serves the egress listener until `shutdown` resolves, then stops accepting and lets
/// in-flight requests finish for up to `drain_timeout` (from the config in force).
pub async fn serve(listener: TcpListener, egress: Arc<Egress>, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    // The edge limits are the listener's, set up once; the drain's length is read when the
    // stop comes, so a reload changes it.
    let limits = egress.table.load().config().sidecar.http.clone();
    if let Ok(addr) = listener.local_addr() {
        let _ = egress.listen.set(addr);
    }
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let _ = egress.places.set(crate::egress::slots::Places { pool: connections.clone(), max: limits.max_connections });
    let (stop_tx, stop_rx) = watch::channel(Stop::Serve);
    let http = Arc::new(Builders::new(&limits));

    tokio::pin!(shutdown);
    loop {
        // Waits for a free place without holding it while idle in accept: an HTTP/2
        // tunnel may need it first.
        tokio::select! {
            _ = &mut shutdown => break,
            p = connections.acquire() => drop(p),
        };
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            s = accept(&listener) => s,
        };
        let Some(mut stream) = stream else { continue };
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = connections.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let _ = stream.set_nodelay(true);
        let activity = Activity::new();
        let slots = Slots::new(permit, connections.clone(), limits.max_connections, stop_rx.clone());
        let tracked = Tracked { egress: egress.clone(), activity: activity.clone(), max_headers: limits.max_headers, slots: slots.clone() };
        let (http, mut stop, limits) = (http.clone(), stop_rx.clone(), limits.clone());
        tokio::spawn(async move {
            // The first bytes, under the same bounds as a head: a peer that sends nothing
            // is closed as the watchdog would close it, and so is one still silent at the stop.
            let sniffed = tokio::select! {
                biased;
                v = version::sniff(&mut stream) => v,
                _ = tokio::time::sleep(limits.header_read_timeout) => None,
                _ = stop.changed() => None,
            };
            let Some((v, replay)) = sniffed else {
                slots.release_own();
                return;
            };
            let service = hyper::service::service_fn(move |req| tracked.call(req));
            let io = TrackedIo { inner: stream, activity: activity.clone(), replay };
            watch_connection(http.serve(v, io, service), activity, stop, limits, slots).await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(Stop::Drain);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let drain_timeout = egress.table.load().config().sidecar.drain_timeout;
    tokio::select! {
        _ = connections.acquire_many(all) => tracing::info!("egress drained"),
        _ = tokio::time::sleep(drain_timeout) => {
            tracing::warn!(drain = ?drain_timeout, "egress drain timed out; dropping remaining connections");
            let _ = stop_tx.send(Stop::Abort);
        }
    }
    Ok(())
}

/// The next connection; `None` after a failed accept, once a short back-off has passed.
async fn accept(listener: &TcpListener) -> Option<TcpStream> {
    match listener.accept().await {
        Ok((stream, _peer)) => Some(stream),
        Err(e) => {
            // EMFILE and friends: back off instead of spinning.
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

/// One request past the connection's checks: refused when its framing is ambiguous, else
/// handled, a panicking handler answering 500 instead of killing the connection.
///
/// A plain async function rather than a tower stack (tower-http's `CatchPanic` and a body
/// unifier): those boxed the response body twice and the service once more per request.
pub(super) async fn serve_one(egress: Arc<Egress>, req: Request<Incoming>) -> Response<Body> {
    // Framing hyper tolerates but a front proxy might read differently.
    if let Some(res) = reject_ambiguous_framing(&req) {
        return res;
    }
    or_500_on_panic(egress.handle(req)).await
}

/// The handler's response, or a 500 problem if it panicked: a bug in one request's handling
/// must cost that request, not the connection or the other requests on it.
///
/// A plain function, not an `async fn`: an async fn keeps its argument (here the handler's
/// whole future) in its state beside the future it awaits, so the slot hyper keeps per
/// connection for the request in flight held the handler twice (issue 14).
fn or_500_on_panic(handler: impl Future<Output = Response<Body>>) -> impl Future<Output = Response<Body>> {
    use futures::FutureExt as _;
    // Unwind safety: a panic drops the handler's future and everything it borrowed; the
    // shared state it leaves (metrics, the table) is only ever updated atomically.
    std::panic::AssertUnwindSafe(handler).catch_unwind().map(|r| r.unwrap_or_else(panic_response))
}

/// Drives one connection until it ends, the listener stops, or its watchdog expires;
/// holds the connection's `max_connections` place until then, unless a tunnel took the
/// connection (and its place) over.
async fn watch_connection<S: Served>(
    mut conn: Conn<TrackedIo, S>,
    activity: Arc<Activity>,
    mut stop: watch::Receiver<Stop>,
    limits: HttpLimits,
    slots: Slots,
) {
    let mut draining = false;
    // The watchdog never needs waking: it sleeps at most the shorter of the two timeouts,
    // so whatever starts after it went to sleep (a head, an idle spell, a stall) cannot
    // be due before it wakes. It recomputes the real deadline then. A wake per request
    // (a head started, a response written) cost the connection's task two extra polls
    // and two timers per request (issue 14).
    let period = limits.header_read_timeout.min(limits.idle_timeout);
    loop {
        let deadline = activity.deadline(&limits).min(Instant::now() + period);
        tokio::select! {
            // The connection first: it is what wakes this task, request after request.
            biased;
            r = &mut conn => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "egress connection ended with an error");
                }
                break;
            }
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() >= Stop::Abort {
                    break;
                }
                if !draining {
                    draining = true;
                    conn.graceful_shutdown();
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                match activity.expired(&limits) {
                    Some(Expired::Idle) => {
                        // Nothing in flight: hyper closes at once.
                        draining = true;
                        conn.graceful_shutdown();
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
    slots.release_own();
}

fn panic_response(_: Box<dyn std::any::Any + Send>) -> Response<Body> {
    BridgeError::Panicked.to_response(None, None).map(full)
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
    /// Follows the read side request by request and judges each head's framing.
    framing: Guard,
}

/// Shared by a connection's IO wrapper, its service and its watchdog, which reads it
/// when it wakes (see [`watch_connection`]).
#[derive(Debug)]
struct Activity {
    state: std::sync::Mutex<ActivityState>,
}

impl Activity {
    fn new() -> Arc<Self> {
        let now = Instant::now();
        Arc::new(Self {
            state: std::sync::Mutex::new(ActivityState {
                phase: Phase::AwaitingHead { since: now, head: Some(now) },
                last_io: now,
                framing: Guard::default(),
            }),
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
        // Every byte, whatever the phase: a pipelined head often arrives with (or while
        // serving) the request before it.
        s.framing.read(data);
        let http2 = s.framing.is_http2();
        if let Phase::AwaitingHead { head, .. } = &mut s.phase {
            // An idle HTTP/2 connection's control frames are not the start of a request.
            if head.is_none() && !http2 {
                *head = Some(now);
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
        // HTTP/2 requests are frames, not heads: the guard has no verdict for them.
        if s.framing.is_http2() {
            return None;
        }
        s.framing.next_verdict()
    }

    /// A response was written (its body dropped by hyper): the connection may idle.
    fn end(&self) {
        let now = Instant::now();
        let mut s = self.lock();
        s.phase = match s.phase {
            Phase::InRequest(n) if n > 1 => Phase::InRequest(n - 1),
            _ => Phase::AwaitingHead { since: now, head: None },
        };
    }

    fn deadline(&self, limits: &HttpLimits) -> Instant {
        let s = self.lock();
        match s.phase {
            Phase::AwaitingHead { head: Some(h), .. } => h + limits.header_read_timeout,
            Phase::AwaitingHead { since, head: None } => since + limits.idle_timeout,
            Phase::InRequest(_) => s.last_io + limits.idle_timeout,
        }
    }

    fn expired(&self, limits: &HttpLimits) -> Option<Expired> {
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

/// Marks the connection's activity on every read and write; replays the bytes read to
/// tell the version first.
struct TrackedIo {
    inner: tokio::net::TcpStream,
    activity: Arc<Activity>,
    replay: Replay,
}

impl tokio::io::AsyncRead for TrackedIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = match this.replay.take_into(buf) {
            0 => Pin::new(&mut this.inner).poll_read(cx, buf),
            // The replayed bytes and what follows them in one read (see `version`). They
            // are the caller's now, whatever the socket says: nothing ready is no news, and
            // an error or the end shows on the next read (after an error, as the end).
            _ if buf.remaining() > 0 => {
                let _ = Pin::new(&mut this.inner).poll_read(cx, buf);
                Poll::Ready(Ok(()))
            }
            _ => Poll::Ready(Ok(())),
        };
        if let Poll::Ready(Ok(())) = r {
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

/// The egress service for one connection: marks each request's start and end, refuses a
/// request whose head was ambiguous on the wire, and counts an HTTP/2 request's header
/// fields (hyper counts HTTP/1's).
///
/// Served through `service_fn`, so the request's future keeps its own (unnameable) type
/// and hyper's HTTP/1 dispatcher holds it in the slot it allocates once per connection.
/// As a `Service` impl it had to be boxed per request: a ~3.5 KB allocation, which glibc
/// serves from its large bins after consolidating the fast ones (issue 14). Before that,
/// tower's `BoxCloneService` also cloned the whole service per request.
struct Tracked {
    egress: Arc<Egress>,
    activity: Arc<Activity>,
    max_headers: usize,
    slots: Slots,
}

impl Tracked {
    fn call(
        &self,
        mut req: Request<Incoming>,
    ) -> impl Future<Output = Result<Response<Guarded<EndOfResponse>>, Infallible>> + Send + 'static {
        // Only a request that can open a tunnel needs its connection's places: inserting
        // them in every request would allocate an extensions map per request.
        if req.method() == http::Method::CONNECT || req.headers().contains_key(http::header::UPGRADE) {
            req.extensions_mut().insert(self.slots.clone());
        }
        let framing = self.activity.begin();
        let guard = EndOfResponse(self.activity.clone());
        let egress = self.egress.clone();
        let max_headers = self.max_headers;
        async move {
            let res = match framing {
                Some(why) => bad_framing(why),
                None if req.headers().len() > max_headers => {
                    BridgeError::TooManyHeaders { max: max_headers }.to_response(None, None).map(full)
                }
                None => serve_one(egress, req).await,
            };
            Ok::<_, Infallible>(res.map(move |body| Guarded { body, _guard: guard }))
        }
    }
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
pub(super) fn bad_framing(why: &'static str) -> Response<Body> {
    BridgeError::BadFraming(why).to_response(None, None).map(full)
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::*;

    #[tokio::test]
    async fn a_panicking_handler_answers_500_with_a_problem_and_a_sound_one_passes_through() {
        let res = or_500_on_panic(async {
            // A handler that panics after it has started (awaited once), as a real one would.
            tokio::task::yield_now().await;
            panic!("a bug in one request's handling")
        })
        .await;
        assert_eq!(res.status(), 500);
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        let body: serde_json::Value = serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(body["status"], 500, "{body}");
        // The panic's message is not the caller's business (it may hold request data).
        assert!(!body.to_string().contains("a bug"), "{body}");

        let res = or_500_on_panic(async { Response::builder().status(201).body(full("made")).unwrap() }).await;
        assert_eq!(res.status(), 201);
        assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "made");
    }
}
