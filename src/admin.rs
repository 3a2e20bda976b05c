//! The admin listener: `/healthz` (alive), `/readyz` (can serve; see [`crate::health`] for
//! its two meanings), `/statusz` (every component, its state, why and since when, as JSON)
//! `/metrics` (Prometheus text) and `/debug/own-time` (the sidecar's own time per request,
//! see [`crate::own_time`]); `POST /drain` stops the inbound routes ahead of the
//! sidecar's own stop (an app's preStop hook).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::ReadinessMode;
use crate::health::{Component, Readiness, State, Status};
use crate::metrics::Metrics;
use crate::nats::connection::is_connected;

/// What the admin endpoints look at.
#[derive(Clone)]
pub struct Admin {
    pub metrics: Metrics,
    pub nats: async_nats::Client,
    pub readiness: Arc<Readiness>,
    /// What `/readyz` means (`[sidecar] readiness`).
    pub mode: ReadinessMode,
    pub drain: DrainControl,
    /// Cut-over shadows' last mismatches.
    pub shadows: Arc<crate::egress::cutover::Shadows>,
}

/// What `POST /drain` needs: an app's preStop hook calls it so the sidecar stops handing
/// it work before it shuts down.
#[derive(Clone)]
pub struct DrainControl {
    /// Stops the inbound routes.
    pub stop: CancellationToken,
    /// True once they have stopped and their handlers are done.
    pub done: watch::Receiver<bool>,
    /// How long `/drain` waits for that: the `drain_timeout` in force, read at each call
    /// (a reload changes it at once).
    pub timeout: Arc<dyn Fn() -> Duration + Send + Sync>,
}

impl DrainControl {
    /// Stops ingress and waits for its handlers: 200 once done, 503 past the timeout.
    async fn drain(&self, readiness: &Readiness) -> (StatusCode, Bytes) {
        readiness.drain();
        self.stop.cancel();
        let mut done = self.done.clone();
        let stopped = tokio::time::timeout((self.timeout)(), async { done.wait_for(|d| *d).await.is_ok() }).await;
        match stopped {
            Ok(true) => (StatusCode::OK, Bytes::from_static(b"drained: inbound routes stopped, no handler running\n")),
            _ => (StatusCode::SERVICE_UNAVAILABLE, Bytes::from_static(b"inbound routes still stopping\n")),
        }
    }
}

impl Admin {
    /// Every component, with the client's own view of the connection laid over the last
    /// event: the client knows it lost the server before its event arrives.
    pub fn components(&self) -> BTreeMap<Component, Status> {
        let mut all = self.readiness.snapshot();
        if !is_connected(&self.nats) {
            if let Some(s) = all.get_mut(&Component::NATS).filter(|s| s.state == State::Up) {
                s.state = State::Down;
                s.reason = "not connected to NATS".into();
            }
        }
        all
    }

    /// Ready under the configured mode, or what keeps it from being so.
    pub fn ready(&self) -> Result<(), BTreeMap<String, String>> {
        let mut failing = self.readiness.ready(self.mode).err().unwrap_or_default();
        if self.mode == ReadinessMode::Strict && !self.readiness.draining() && !is_connected(&self.nats) {
            failing.entry(Component::NATS.to_string()).or_insert_with(|| "not connected to NATS".into());
        }
        if failing.is_empty() {
            Ok(())
        } else {
            Err(failing)
        }
    }

    /// The `/statusz` document.
    fn status(&self) -> serde_json::Value {
        let components = self.components();
        let failing: BTreeMap<&str, &str> =
            components.iter().filter(|(_, s)| s.state != State::Up).map(|(c, s)| (c.as_str(), s.reason.as_str())).collect();
        let by_name: BTreeMap<&str, &Status> = components.iter().map(|(c, s)| (c.as_str(), s)).collect();
        serde_json::json!({
            "ready": self.ready().is_ok(),
            "readiness": match self.mode { ReadinessMode::Serving => "serving", ReadinessMode::Strict => "strict" },
            "draining": self.readiness.draining(),
            "components": by_name,
            "failing": failing,
            "shadow_mismatches": self.shadows.recent(),
        })
    }

    /// The Prometheus text, with `natsbridge_component_up` taken from the registry now.
    fn metrics_text(&self) -> Vec<u8> {
        // Reset first: a component that went away (a removed route) must not linger.
        self.metrics.component_up.reset();
        for (c, s) in self.components() {
            self.metrics.component_up.with_label_values(&[c.as_str()]).set(i64::from(s.state == State::Up));
        }
        self.metrics.encode()
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
            "/statusz" => (StatusCode::OK, "application/json", Bytes::from(serde_json::to_vec_pretty(&self.status()).unwrap_or_default())),
            "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", Bytes::from(self.metrics_text())),
            "/debug/own-time" => {
                let reset = req.uri().query().is_some_and(|q| q.split('&').any(|p| p == "reset=1"));
                let v = self.metrics.own_time.snapshot(reset);
                (StatusCode::OK, "application/json", Bytes::from(serde_json::to_vec(&v).unwrap_or_default()))
            }
            _ => (StatusCode::NOT_FOUND, "text/plain; charset=utf-8", Bytes::from_static(b"not found\n")),
        };
        let mut res = Response::new(Full::new(body));
        *res.status_mut() = status;
        res.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ctype));
        res
    }
}

fn text(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(body));
    *res.status_mut() = status;
    res.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    res
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
            hyper::service::service_fn(move |req: Request<Incoming>| {
                let admin = admin.clone();
                async move {
                    let res = match (req.uri().path(), req.method()) {
                        ("/drain", &http::Method::POST) => {
                            let (status, body) = admin.drain.drain(&admin.readiness).await;
                            text(status, body)
                        }
                        ("/drain", _) => {
                            let mut res = text(StatusCode::METHOD_NOT_ALLOWED, Bytes::from_static(b"POST /drain\n"));
                            res.headers_mut().insert(http::header::ALLOW, HeaderValue::from_static("POST"));
                            res
                        }
                        _ => admin.handle(&req),
                    };
                    Ok::<_, Infallible>(res)
                }
            }),
        );
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
}
