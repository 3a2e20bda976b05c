//! Paths c-min and e-min: the least a sidecar must do on paths c and e, built from the same
//! libraries as natsbridge (a current-thread tokio runtime like the sidecars' default
//! `worker_threads = 1`, hyper 1, async-nats) and run as processes like the sidecars, so
//! /proc tells their CPU and RSS apart.
//!
//! They are the floor the sidecars are measured against (issue 14): what a hand-glued
//! HTTP-to-NATS proxy costs with no routing, no header mapping, no timeouts of its own, no
//! idempotency, metrics, limits or drain. The gap between c and c-min in the same round is
//! natsbridge's own cost; the gap between c-min and the composed limit is the libraries',
//! the runtime's and the kernel's.
//!
//! The bench binary runs one of them when started with [`EGRESS_ARG`] or [`INGRESS_ARG`]
//! (it re-executes itself), and it prints its listening address (or `ready`) on stdout.
//!
//! `BENCH_MIN_HEADERS=1` makes them carry headers as the sidecars do, and nothing else of
//! theirs: the request's headers into the NATS request, the app's response headers and a
//! `Bridge-Status` into the reply, and the reply's headers back into the response, each
//! through async-nats' `HeaderMap`. It is the floor for a sidecar that keeps HTTP's
//! headers across NATS (issue 14: most of what separates A from min-a is there).

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::load::http_client;
use crate::procs::Watched;

/// `<bench> --min-egress <nats-url>`: HTTP in, NATS out.
pub const EGRESS_ARG: &str = "--min-egress";
/// `<bench> --min-ingress <nats-url> <app-url>`: NATS in, HTTP to the app.
pub const INGRESS_ARG: &str = "--min-ingress";
/// The subject between the two (its own, so natsbridge's sidecar B never answers it).
const SUBJECT: &str = "bench.min.echo";

/// Runs a minimal forwarder and exits when this process was started as one; returns
/// otherwise.
pub fn run_role(args: &[String]) {
    let role = match args.first().map(String::as_str) {
        Some(r @ (EGRESS_ARG | INGRESS_ARG)) => r,
        _ => return,
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    match role {
        EGRESS_ARG => rt.block_on(egress(&args[1])),
        _ => rt.block_on(ingress(&args[1], &args[2])),
    }
    std::process::exit(0);
}

async fn egress(nats_url: &str) {
    let nc = async_nats::connect(nats_url).await.expect("min-egress: connect to nats");
    let js = async_nats::jetstream::new(nc.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    announce(&listener.local_addr().unwrap().to_string());
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let (nc, js) = (nc.clone(), js.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let (nc, js) = (nc.clone(), js.clone());
                async move { Ok::<_, Infallible>(forward(req, &nc, &js).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// `/echo` → a NATS request to min-ingress; `/events/{id}` → a JetStream publish, 202 once
/// acked (path e's work).
async fn forward(
    req: Request<hyper::body::Incoming>,
    nc: &async_nats::Client,
    js: &async_nats::jetstream::Context,
) -> Response<Full<Bytes>> {
    let event = req.uri().path().strip_prefix("/events/").map(|id| format!("benche.{id}"));
    let echo = req.uri().path() == "/echo";
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return status(StatusCode::BAD_REQUEST);
    };
    if echo {
        if !carry_headers() {
            return match nc.request(SUBJECT, body).await {
                Ok(m) => Response::new(Full::new(m.payload)),
                Err(_) => status(StatusCode::BAD_GATEWAY),
            };
        }
        return match nc.request_with_headers(SUBJECT, to_nats(&parts.headers), body).await {
            Ok(m) => {
                let mut res = Response::new(Full::new(m.payload));
                for (name, values) in m.headers.iter().flat_map(|h| h.iter()) {
                    let name: &str = name.as_ref();
                    if name == "Bridge-Status" {
                        continue;
                    }
                    for v in values {
                        if let (Ok(n), Ok(v)) = (http::HeaderName::from_bytes(name.as_bytes()), http::HeaderValue::from_str(v.as_str())) {
                            res.headers_mut().append(n, v);
                        }
                    }
                }
                res
            }
            Err(_) => status(StatusCode::BAD_GATEWAY),
        };
    }
    let Some(subject) = event else { return status(StatusCode::NOT_FOUND) };
    let acked = match js.publish(subject, body).await {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    status(if acked { StatusCode::ACCEPTED } else { StatusCode::BAD_GATEWAY })
}

async fn ingress(nats_url: &str, app_url: &str) {
    let nc = async_nats::connect(nats_url).await.expect("min-ingress: connect to nats");
    let mut sub = nc.queue_subscribe(SUBJECT, "bench-min".into()).await.unwrap();
    nc.flush().await.unwrap();
    let client = http_client();
    let uri: Uri = format!("{app_url}/echo").parse().unwrap();
    announce("ready");
    while let Some(m) = sub.next().await {
        let (nc, client, uri) = (nc.clone(), client.clone(), uri.clone());
        tokio::spawn(async move {
            let Some(reply) = m.reply else { return };
            let req = Request::post(uri).header(http::header::CONTENT_TYPE, "application/octet-stream").body(Full::new(m.payload)).unwrap();
            let (headers, payload) = match client.request(req).await {
                Ok(res) => {
                    let (parts, body) = res.into_parts();
                    (parts.headers, body.collect().await.map(|b| b.to_bytes()).unwrap_or_default())
                }
                Err(_) => (http::HeaderMap::new(), Bytes::new()),
            };
            if carry_headers() {
                let mut h = to_nats(&headers);
                h.insert("Bridge-Status", "200");
                let _ = nc.publish_with_headers(reply, h, payload).await;
            } else {
                let _ = nc.publish(reply, payload).await;
            }
        });
    }
}

/// `BENCH_MIN_HEADERS=1`: carry headers across NATS (see the module's doc).
pub fn carry_headers() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("BENCH_MIN_HEADERS").is_ok_and(|v| v == "1"))
}

/// HTTP headers as NATS headers, hop-by-hop ones left out, as a sidecar sends them.
fn to_nats(headers: &http::HeaderMap) -> async_nats::HeaderMap {
    let mut out = async_nats::HeaderMap::new();
    for (name, value) in headers {
        if matches!(name.as_str(), "connection" | "keep-alive" | "transfer-encoding" | "te" | "upgrade" | "host" | "content-length") {
            continue;
        }
        if let Ok(v) = std::str::from_utf8(value.as_bytes()) {
            out.append(name.as_str(), v);
        }
    }
    out
}

fn status(s: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = s;
    r
}

fn announce(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A minimal forwarder as a child process of the bench; killed on drop.
pub struct MinProc {
    pub name: &'static str,
    pub child: Child,
    /// min-egress's listening address (None for min-ingress).
    pub addr: Option<SocketAddr>,
}

impl MinProc {
    /// Starts it and waits for its first line (the address, or `ready` once subscribed).
    pub fn start(name: &'static str, args: &[&str]) -> Self {
        // BENCH_WRAP_MINIMAL="valgrind --tool=callgrind" (say) runs it under that, as
        // BENCH_WRAP_SIDECAR does the sidecars, so the two can be profiled alike.
        let exe = std::env::current_exe().expect("the bench's own binary");
        let wrap: Vec<String> =
            std::env::var("BENCH_WRAP_MINIMAL").map(|w| w.split_whitespace().map(str::to_owned).collect()).unwrap_or_default();
        let mut cmd = match wrap.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let mut child = cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("start a minimal forwarder");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("its first line");
        let addr = line.trim().parse().ok();
        assert!(addr.is_some() || line.trim() == "ready", "{name} did not start: {line:?}");
        Self { name, child, addr }
    }

    pub fn watched(&self) -> Watched {
        Watched { name: self.name.to_owned(), pid: self.child.id() }
    }
}

impl Drop for MinProc {
    fn drop(&mut self) {
        crate::procs::terminate(&mut self.child, std::env::var("BENCH_WRAP_MINIMAL").is_ok());
    }
}
