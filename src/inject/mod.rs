//! The Kubernetes sidecar injector: a MutatingAdmissionWebhook that adds natsbridge to opted-in pods.
//!
//! - [`review`]: the decision and the patch, a pure function ([`mutate`]: AdmissionReview in,
//!   AdmissionReview out), so every injection rule is tested without a cluster.
//! - [`settings`]: the cluster-wide sidecar defaults and the `natsbridge inject` flags.
//! - [`tls`]: the certificate, reloaded when it is rotated.
//! - here: [`serve`], the thin TLS + HTTP/1 shell the API server talks to, and [`run`], the
//!   command's entry. Only this file does I/O beyond reading the certificate; nothing in the
//!   injector calls the rest of the sidecar.
//!
//! What an opted-in pod (`natsbridge.io/inject: "true"`) gets:
//! - the sidecar as a *native* sidecar (an initContainer with `restartPolicy: Always`), so it is up
//!   before the app starts and is stopped only after the app has exited;
//! - the routes ConfigMap named by `natsbridge.io/routes`, mounted at `/etc/natsbridge`;
//! - `NATSBRIDGE_APP_URL` from `natsbridge.io/app-port` (or the first declared containerPort);
//! - probes on the admin port, resources from `natsbridge.io/{cpu,memory}-{request,limit}` with
//!   defaults from [`InjectSettings`], and Prometheus scrape annotations;
//! - with `natsbridge.io/http-proxy: "true"`, `HTTP_PROXY`/`NO_PROXY` on every app container;
//!   with `natsbridge.io/https-proxy: "true"`, `HTTPS_PROXY` too (CONNECT tunnels).

pub mod admission;
mod error;
pub mod review;
pub mod settings;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::Value;
use tokio::net::TcpListener;

use admission::AdmissionReview;

pub use error::{InjectError, ReviewDefect, SettingDefect, TlsDefect};
pub use review::{
    decide_injection, escape_pointer, mutate, nats_hosts, no_proxy_list, Decision, Refusal, ADMIN_PORT_NAME, ANNOTATION_APP_PORT,
    ANNOTATION_CPU_LIMIT, ANNOTATION_CPU_REQUEST, ANNOTATION_HTTPS_PROXY, ANNOTATION_HTTP_PROXY, ANNOTATION_INJECT, ANNOTATION_LOG_LEVEL,
    ANNOTATION_MEMORY_LIMIT, ANNOTATION_MEMORY_REQUEST, ANNOTATION_NATS_URL_SECRET, ANNOTATION_ROUTES, ANNOTATION_STATUS, LABEL_INJECTED,
    ROUTES_DIR, ROUTES_VOLUME, SIDECAR_NAME,
};
pub use settings::{is_quantity, InjectArgs, InjectSettings, Resources, SecretKeyRef};
pub use tls::{load_certified_key, tls_config, ReloadingCert};

/// AdmissionReview bodies are whole pod specs; etcd caps objects at ~1.5 MiB and the API
/// server sends well under 3 MiB. Larger bodies get 413 without being read.
pub const MAX_BODY: usize = 3 * 1024 * 1024;
/// Open connections; further ones wait in the kernel's backlog (the API server keeps a
/// few). Each may buffer up to [`MAX_BODY`], and the injector's memory limit is 128 Mi.
pub const MAX_CONNECTIONS: usize = 24;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A body must arrive whole within this: a trickled body would hold a review slot forever.
/// The API server's own webhook timeout is at most 30 s.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// The API server gives up on a webhook after at most 30 s, so in-flight reviews older than that
/// are worthless; don't hold shutdown longer.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `POST /mutate` and `GET /healthz` over TLS until `shutdown` resolves, then stops
/// accepting and lets in-flight reviews finish (bounded by 30 s).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    settings: InjectSettings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), InjectError> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let settings = Arc::new(settings);
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);

    loop {
        // At the cap, stop accepting: further connections wait in the kernel's backlog.
        let permit = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            p = connections.clone().acquire_owned() => p.expect("never closed"),
        };
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            // Reap finished connections so the set does not grow without bound.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) if is_transient_accept_error(&e) => {
                    tracing::warn!(error = %e, "inject: accept failed, continuing");
                    continue;
                }
                Err(e) => return Err(InjectError::Accept(e)),
            },
        };
        let (acceptor, settings, stop_rx) = (acceptor.clone(), settings.clone(), stop_rx.clone());
        conns.spawn(async move {
            serve_connection(acceptor, tcp, peer, settings, stop_rx).await;
            drop(permit);
        });
    }

    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!("inject: connections still open after the drain timeout; dropping them");
        conns.abort_all();
    }
    Ok(())
}

/// One API server connection: the TLS handshake, then HTTP/1 until the peer closes or
/// `stop_rx` turns true, when in-flight reviews are finished first.
async fn serve_connection(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    settings: Arc<InjectSettings>,
    mut stop_rx: tokio::sync::watch::Receiver<bool>,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "inject: TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "inject: TLS handshake timed out");
            return;
        }
    };
    let service = hyper::service::service_fn(move |req| {
        let settings = settings.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(req, &settings).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(%peer, error = %e, "inject: connection ended with an error");
            }
        }
        // The watch guard is not Send, so drop it inside the branch future.
        () = async { let _ = stop_rx.wait_for(|stop| *stop).await; } => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

fn is_transient_accept_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    // Per-connection failures and fd exhaustion pass; the listener itself is still fine.
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | TimedOut)
        || e.raw_os_error().is_some_and(|c| c == 24 || c == 23) // EMFILE, ENFILE
}

async fn handle(req: Request<hyper::body::Incoming>, settings: &InjectSettings) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::POST, "/mutate") => {
            let review = match read_review(req).await {
                Ok(r) => r,
                Err(res) => return res,
            };
            match review::answer(&review, settings) {
                Ok(resp) => {
                    log_outcome(&review, &resp);
                    let body = serde_json::to_vec(&resp).expect("JSON values serialize");
                    Response::builder()
                        .status(StatusCode::OK)
                        .header(http::header::CONTENT_TYPE, "application/json")
                        .body(Full::new(Bytes::from(body)))
                        .expect("static response parts are valid")
                }
                Err(e) => text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
            }
        }
        (_, "/mutate" | "/healthz") => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The body, read within [`BODY_TIMEOUT`] and at most [`MAX_BODY`] bytes (a declared larger
/// length is refused before reading), parsed into the parts the injector reads.
async fn read_review(req: Request<hyper::body::Incoming>) -> Result<AdmissionReview, Response<Full<Bytes>>> {
    let too_large = || text(StatusCode::PAYLOAD_TOO_LARGE, &format!("body over {MAX_BODY} bytes\n"));
    let declared = req.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let body = match tokio::time::timeout(BODY_TIMEOUT, Limited::new(req.into_body(), MAX_BODY).collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => return Err(too_large()),
        Ok(Err(e)) => return Err(text(StatusCode::BAD_REQUEST, &format!("reading body: {e}\n"))),
        Err(_) => return Err(text(StatusCode::REQUEST_TIMEOUT, &format!("body not received within {BODY_TIMEOUT:?}\n"))),
    };
    serde_json::from_slice(&body).map_err(|e| text(StatusCode::BAD_REQUEST, &format!("body is not an AdmissionReview: {e}\n")))
}

fn log_outcome(review: &AdmissionReview, resp: &Value) {
    let req = review.request.as_ref();
    let ns = req.and_then(|r| r.namespace.as_deref()).unwrap_or("");
    let meta = req.and_then(|r| r.object.as_ref()).map(|o| &o.metadata);
    let name = meta.and_then(|m| m.name.as_deref().or(m.generate_name.as_deref())).unwrap_or("");
    let r = &resp["response"];
    if r["allowed"] == Value::Bool(false) {
        tracing::info!(namespace = ns, pod = name, reason = r["status"]["message"].as_str().unwrap_or(""), "inject: denied");
    } else if r.get("patch").is_some() {
        tracing::info!(namespace = ns, pod = name, "inject: sidecar injected");
    } else {
        tracing::debug!(namespace = ns, pod = name, "inject: left untouched");
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts are valid")
}

/// `natsbridge inject`: validates the flags, loads the certificate and serves on `listener`
/// (which the binary binds from `args.listen`) until `shutdown` resolves.
pub async fn run(args: InjectArgs, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<(), InjectError> {
    let settings = args.settings()?;
    let tls = tls_config(&args.tls_cert, &args.tls_key)?;
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        image = %settings.image,
        "inject: serving the mutating webhook"
    );
    serve(listener, tls, settings, shutdown).await
}
