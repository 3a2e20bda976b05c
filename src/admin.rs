//! The admin listener: `/healthz` (alive), `/readyz` (NATS connected, config loaded, every
//! inbound subscription and consumer bound) and `/metrics` (Prometheus text).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::health::Readiness;
use crate::metrics::Metrics;
use crate::nats::connection::is_connected;

/// What the admin endpoints look at.
#[derive(Clone)]
pub struct Admin {
    pub metrics: Metrics,
    pub nats: async_nats::Client,
    pub readiness: Arc<Readiness>,
}

impl Admin {
    /// Ready only while NATS is connected and nothing registered a failing check.
    pub fn ready(&self) -> Result<(), BTreeMap<String, String>> {
        let mut failing = self.readiness.failing();
        if !is_connected(&self.nats) {
            // Keep the connection's own, more specific reason when it gave one.
            failing.entry(crate::nats::connection::READINESS_CHECK.into()).or_insert_with(|| "not connected to NATS".into());
        } else {
            // A stale failure reason must not outlive the connection coming back.
            failing.remove(crate::nats::connection::READINESS_CHECK);
        }
        if failing.is_empty() {
            Ok(())
        } else {
            Err(failing)
        }
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let (status, ctype, body): (StatusCode, &'static str, Bytes) = match req.uri().path() {
            "/healthz" | "/livez" => (StatusCode::OK, "text/plain; charset=utf-8", Bytes::from_static(b"ok\n")),
            "/readyz" => match self.ready() {
                Ok(()) => (StatusCode::OK, "text/plain; charset=utf-8", Bytes::from_static(b"ready\n")),
                Err(failing) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "application/json",
                    Bytes::from(serde_json::to_vec(&serde_json::json!({ "ready": false, "failing": failing })).unwrap_or_default()),
                ),
            },
            "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", Bytes::from(self.metrics.encode())),
            _ => (StatusCode::NOT_FOUND, "text/plain; charset=utf-8", Bytes::from_static(b"not found\n")),
        };
        let mut res = Response::new(Full::new(body));
        *res.status_mut() = status;
        res.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ctype));
        res
    }
}

/// Open admin connections at most (probes and a scraper need a handful); further ones wait
/// in the kernel's backlog, so a flood of connections cannot exhaust the sidecar's memory
/// or file descriptors. Idle ones are closed by the 10 s header read timeout.
pub const MAX_CONNECTIONS: usize = 32;

/// Serves the admin endpoints until `shutdown` resolves.
pub async fn serve(listener: TcpListener, admin: Admin, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(std::time::Duration::from_secs(10));
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            p = slots.clone().acquire_owned() => p.expect("never closed"),
        };
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admin = admin.clone();
        let conn = http.serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn(move |req| {
                let res = admin.handle(&req);
                async move { Ok::<_, Infallible>(res) }
            }),
        );
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
}
