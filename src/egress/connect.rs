//! Byte tunnels: `CONNECT host:port` (what `HTTPS_PROXY` clients send) and upgraded
//! connections (WebSocket after its 101). Bytes are spliced both ways until either side
//! closes or nothing moves for the listener's `idle_timeout`; tunnels are counted in
//! `natsbridge_egress_tunnels_total` and `natsbridge_egress_tunnels_open`.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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
use crate::egress::{full, Body, Egress};
use crate::metrics::{InFlight, Metrics};
use crate::problem::BridgeError;

impl Egress {
    /// `CONNECT host:port`: a TCP connection to the target, then a 200 and the splice.
    pub(super) async fn connect(&self, mut req: Request<Incoming>) -> Result<Response<Body>, BridgeError> {
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
        count("opened");
        let ours = hyper::upgrade::on(&mut req);
        let (metrics, idle) = (self.metrics.clone(), self.idle_timeout());
        tokio::spawn(async move {
            match ours.await {
                Ok(ours) => splice(TokioIo::new(ours), stream, idle, &metrics).await,
                Err(e) => tracing::debug!(%target, error = %e, "CONNECT client went away before the tunnel"),
            }
        });
        Ok(Response::new(full(Bytes::new())))
    }

    /// After a 101 from upstream: splices the app's connection with the upstream's.
    pub(super) fn splice_upgrade(&self, ours: OnUpgrade, theirs: OnUpgrade, host_label: String) {
        let (metrics, idle) = (self.metrics.clone(), self.idle_timeout());
        tokio::spawn(async move {
            match tokio::try_join!(ours, theirs) {
                Ok((ours, theirs)) => {
                    metrics.egress_tunnels.with_label_values(&["upgrade", &host_label, "opened"]).inc();
                    splice(TokioIo::new(ours), TokioIo::new(theirs), idle, &metrics).await;
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

/// Copies bytes both ways until both sides are done, either fails, or nothing moved
/// either way for `idle`.
async fn splice<A, B>(a: A, b: B, idle: Duration, metrics: &Metrics)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let _open = InFlight::new(&metrics.egress_tunnels_open);
    let base = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut a = Tracked { inner: a, base, last: last.clone() };
    let mut b = Tracked { inner: b, base, last: last.clone() };
    let watchdog = async {
        loop {
            let deadline = base + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut a, &mut b) => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "tunnel ended with an error");
            }
        }
        _ = watchdog => tracing::debug!(?idle, "tunnel idle; closing"),
    }
}

/// Marks the time of the last byte moved, for the splice's idle watchdog.
struct Tracked<T> {
    inner: T,
    base: Instant,
    last: Arc<AtomicU64>,
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
