//! Byte tunnels: `CONNECT host:port` (what `HTTPS_PROXY` clients send) and upgraded
//! connections (WebSocket after its 101). Bytes are spliced both ways until either side
//! closes or nothing moves for the listener's `idle_timeout`; tunnels are counted in
//! `natsbridge_egress_tunnels_total` and `natsbridge_egress_tunnels_open`. Each holds a
//! place under `max_connections` and closes when the listener's drain times out
//! ([`super::slots`]).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::Unmatched;
use crate::egress::framing::{Guard, Verdict};
use crate::egress::slots::{self, Slots, TunnelSlot};
use crate::egress::{full, Body, Egress};
use crate::metrics::{InFlight, Metrics};
use crate::problem::BridgeError;

impl Egress {
    /// `CONNECT host:port`: a TCP connection to the target, then a 200 and the splice. A
    /// target whose host has routes is answered by the sidecar itself (see
    /// [`Egress::routed_tunnel`]).
    pub(super) async fn connect(self: &Arc<Self>, mut req: Request<Incoming>) -> Result<Response<Body>, BridgeError> {
        let forward = self.table.load().config().sidecar.forward.clone();
        let target = req.uri().authority().map(|a| a.as_str().to_owned()).unwrap_or_default();
        if forward.unmatched == Unmatched::Reject {
            return Err(BridgeError::NoRoute { method: "CONNECT".into(), path: target });
        }
        let Some((host, port)) = req.uri().authority().and_then(|a| Some((a.host().to_owned(), a.port_u16()?))) else {
            return Err(BridgeError::BadRequest(format!("CONNECT needs host:port, not {target:?}")));
        };
        let label = self.metrics.forward_hosts.label(&target);
        let count = |outcome: &str| self.metrics.egress_tunnels.with_label_values(&["connect", &label, outcome]).inc();
        self.refuse_loop(&host, port, req.headers()).inspect_err(|_| count("refused"))?;
        if let Some(allow) = &forward.connect_allow {
            if !allow.iter().any(|p| glob(&p.to_ascii_lowercase(), &target.to_ascii_lowercase())) {
                count("refused");
                return Err(BridgeError::ConnectForbidden { target });
            }
        }
        if self.table.load().has_host(&host) {
            let mut slot = slots::for_tunnel(req.extensions().get::<Slots>(), req.version()).inspect_err(|_| count("refused"))?;
            let nested = req.extensions().get::<Slots>().map(Slots::nested);
            count("routed");
            let ours = hyper::upgrade::on(&mut req);
            let egress = self.clone();
            tokio::spawn(async move {
                match ours.await {
                    Ok(ours) => tokio::select! {
                        _ = egress.routed_tunnel(TokioIo::new(ours), target, nested) => {}
                        _ = slot.aborted() => tracing::debug!("listener drain timed out; closing the tunnel"),
                    },
                    Err(e) => tracing::debug!(%target, error = %e, "CONNECT client went away before the tunnel"),
                }
            });
            return Ok(Response::new(full(Bytes::new())));
        }
        let stream = match tokio::time::timeout(forward.connect_timeout, TcpStream::connect((host.as_str(), port))).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                count("failed");
                return Err(BridgeError::Upstream(format!("connect to {target}: {e}")));
            }
            Err(_) => {
                count("failed");
                return Err(BridgeError::UpstreamTimeout(forward.connect_timeout));
            }
        };
        let _ = stream.set_nodelay(true);
        // Taken once the target answered: a failed CONNECT leaves the connection its place.
        let slot = slots::for_tunnel(req.extensions().get::<Slots>(), req.version()).inspect_err(|_| count("refused"))?;
        count("opened");
        let ours = hyper::upgrade::on(&mut req);
        let (metrics, idle) = (self.metrics.clone(), self.idle_timeout());
        tokio::spawn(async move {
            match ours.await {
                Ok(ours) => splice(TokioIo::new(ours), stream, idle, &metrics, Some(slot)).await,
                Err(e) => tracing::debug!(%target, error = %e, "CONNECT client went away before the tunnel"),
            }
        });
        Ok(Response::new(full(Bytes::new())))
    }

    /// A CONNECT to a host with routes. Clients such as Node's undici (`EnvHttpProxyAgent`)
    /// tunnel even plain `http://` calls; splicing those to the origin would bypass the
    /// routes. So the tunnel's first bytes decide: TLS (a handshake record) is spliced to
    /// the origin as usual; anything else is served as HTTP/1.1 right here, each request
    /// taken as `http://<target><path>`, so routes apply and unrouted paths are forwarded.
    /// Requests inside get `nested` (the listener's pool, no place of their own).
    async fn routed_tunnel<T>(self: Arc<Self>, mut ours: T, target: String, nested: Option<Slots>)
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        use tokio::io::AsyncReadExt as _;
        let (idle, connect_timeout) = (self.idle_timeout(), self.table.load().config().sidecar.forward.connect_timeout);
        let mut first = vec![0u8; 4096];
        let n = match tokio::time::timeout(idle, ours.read(&mut first)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return,
        };
        first.truncate(n);
        const TLS_HANDSHAKE: u8 = 0x16;
        if first[0] == TLS_HANDSHAKE {
            let Ok(Ok(mut theirs)) = tokio::time::timeout(connect_timeout, TcpStream::connect(target.as_str())).await else {
                tracing::debug!(%target, "CONNECT target unreachable");
                return;
            };
            let _ = theirs.set_nodelay(true);
            if tokio::io::AsyncWriteExt::write_all(&mut theirs, &first).await.is_ok() {
                // The caller's select holds this tunnel's place and closes it on abort.
                splice(ours, theirs, idle, &self.metrics, None).await;
            }
            return;
        }
        // The HTTP inside gets the listener's idle bound: a request stalled mid-body (or
        // a connection kept silent) is closed after `idle_timeout` with nothing moving.
        // And its framing guard: what two parsers could read differently is refused.
        let (base, last) = (Instant::now(), Arc::new(AtomicU64::new(0)));
        let guard = Arc::new(Mutex::new(Guard::default()));
        let io =
            Tracked { inner: Prefixed { prefix: Bytes::from(first), inner: ours }, base, last: last.clone(), guard: Some(guard.clone()) };
        let egress = self.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (egress, target) = (egress.clone(), target.clone());
            let nested = nested.clone();
            // Taken as hyper hands the request over: its head has been read through the guard.
            let verdict = guard.lock().unwrap_or_else(|e| e.into_inner()).next_verdict();
            async move {
                let mut req = in_tunnel(req, &target);
                if let Some(n) = nested {
                    req.extensions_mut().insert(n);
                }
                Ok::<_, std::convert::Infallible>(handle_boxed(egress, req, verdict).await)
            }
        });
        let limits = self.table.load().config().sidecar.http.clone();
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_headers(limits.max_headers)
            .max_buf_size(limits.max_header_bytes.max(8192));
        tokio::select! {
            r = http.serve_connection(TokioIo::new(io), svc).with_upgrades() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "HTTP inside a CONNECT tunnel ended with an error");
                }
            }
            _ = quiet_for(idle, base, &last) => tracing::debug!(?idle, "HTTP inside a CONNECT tunnel idle; closing"),
        }
    }

    /// After a 101 from upstream: splices the app's connection with the upstream's.
    /// `slot` is the tunnel's place under `max_connections`.
    pub(super) fn splice_upgrade(&self, ours: OnUpgrade, theirs: OnUpgrade, host_label: String, slot: TunnelSlot) {
        let (metrics, idle) = (self.metrics.clone(), self.idle_timeout());
        tokio::spawn(async move {
            match tokio::try_join!(ours, theirs) {
                Ok((ours, theirs)) => {
                    metrics.egress_tunnels.with_label_values(&["upgrade", &host_label, "opened"]).inc();
                    splice(TokioIo::new(ours), TokioIo::new(theirs), idle, &metrics, Some(slot)).await;
                }
                Err(e) => {
                    metrics.egress_tunnels.with_label_values(&["upgrade", &host_label, "failed"]).inc();
                    tracing::debug!(error = %e, "upgrade failed after the 101");
                }
            }
        });
    }

    fn idle_timeout(&self) -> Duration {
        self.table.load().config().sidecar.http.idle_timeout
    }
}

/// A request read inside a routed tunnel, served as the listener serves one (the framing
/// check, a panic answered 500), behind a plain function returning a boxed future: the
/// tunnel's future then names no opaque type of `handle`, whose own future contains
/// `connect`'s (rustc cannot prove `Send` through that cycle).
fn handle_boxed(
    egress: Arc<Egress>,
    req: Request<Incoming>,
    verdict: Verdict,
) -> Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send>> {
    match verdict {
        Some(why) => Box::pin(std::future::ready(super::listener::bad_framing(why))),
        None => Box::pin(super::listener::serve_one(egress, req)),
    }
}

/// A request read inside a tunnel to `target`, in absolute form: `http://<target><path>`.
fn in_tunnel(mut req: Request<Incoming>, target: &str) -> Request<Incoming> {
    if req.uri().authority().is_none() {
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        if let Ok(uri) = format!("http://{target}{pq}").parse() {
            *req.uri_mut() = uri;
        }
    }
    req
}

/// An IO whose first reads return `prefix` (bytes already read to sniff the protocol).
struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Copies bytes both ways until both sides are done, either fails, nothing moved either
/// way for `idle`, or the listener's drain timed out (`slot`, when the caller does not
/// watch it itself).
async fn splice<A, B>(a: A, b: B, idle: Duration, metrics: &Metrics, slot: Option<TunnelSlot>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let _open = InFlight::new(&metrics.egress_tunnels_open);
    let base = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut a = Tracked { inner: a, base, last: last.clone(), guard: None };
    let mut b = Tracked { inner: b, base, last: last.clone(), guard: None };
    let watchdog = quiet_for(idle, base, &last);
    let aborted = async {
        match slot {
            Some(mut slot) => slot.aborted().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut a, &mut b) => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "tunnel ended with an error");
            }
        }
        _ = watchdog => tracing::debug!(?idle, "tunnel idle; closing"),
        _ = aborted => tracing::debug!("listener drain timed out; closing the tunnel"),
    }
}

/// Resolves once no byte moved through the [`Tracked`] ends sharing `last` for `idle`.
async fn quiet_for(idle: Duration, base: Instant, last: &AtomicU64) {
    loop {
        let deadline = base + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// Marks the time of the last byte moved, for the idle watchdogs of tunnels; with a
/// `guard`, also follows the HTTP read through it, as the listener's connections do.
struct Tracked<T> {
    inner: T,
    base: Instant,
    last: Arc<AtomicU64>,
    guard: Option<Arc<Mutex<Guard>>>,
}

impl<T> Tracked<T> {
    fn touch(&self) {
        self.last.store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.touch();
            if let Some(guard) = &this.guard {
                guard.lock().unwrap_or_else(|e| e.into_inner()).read(&buf.filled()[before..]);
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// `connect_allow` patterns: `*` matches any run of characters (`*.example.com:443`).
fn glob(pattern: &str, s: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == s,
        Some((head, rest)) => {
            let Some(s) = s.strip_prefix(head) else { return false };
            (0..=s.len()).filter(|&i| s.is_char_boundary(i)).any(|i| glob(rest, &s[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn allow_patterns() {
        assert!(glob("*.example.com:443", "api.example.com:443"));
        assert!(!glob("*.example.com:443", "api.example.com:8443"));
        assert!(!glob("*.example.com:443", "example.org:443"));
        assert!(glob("db:*", "db:5432"));
        assert!(glob("exact:1", "exact:1"));
        assert!(!glob("exact:1", "exact:10"));
    }
}
