//! Streamed-reply test parts (tests/streaming*.rs): a real app whose chunked or SSE
//! responses the test writes as it goes, the responder and requester sidecars around it,
//! foreign responders' headers, and an HTTP client that reads frame by frame.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::fixtures::routes_toml;
use super::{eventually, NatsServer, Sidecar};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One call the app received: its path, and the writer of its response body.
pub struct AppCall {
    pub path: String,
    pub tx: mpsc::Sender<Result<Bytes, BoxError>>,
}

/// A real HTTP app whose responses are written by the test as it goes: `/sse…` answers
/// `text/event-stream`, anything else `application/octet-stream`, both chunked.
pub async fn streaming_app() -> (String, mpsc::UnboundedReceiver<AppCall>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (calls_tx, calls) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            // A token server writes small chunks: Nagle would hold them for the peer's ACK.
            let _ = stream.set_nodelay(true);
            let calls_tx = calls_tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let calls_tx = calls_tx.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        let (tx, mut rx) = mpsc::channel::<Result<Bytes, BoxError>>(1024);
                        let ctype = if path.starts_with("/sse") { "text/event-stream" } else { "application/octet-stream" };
                        let _ = calls_tx.send(AppCall { path, tx });
                        let frames = futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))));
                        let mut res = http::Response::new(StreamBody::new(frames));
                        res.headers_mut().insert("content-type", ctype.parse().unwrap());
                        res.headers_mut().insert("x-app", "streams".parse().unwrap());
                        Ok::<_, std::convert::Infallible>(res)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    (url, calls)
}

pub async fn next_call(calls: &mut mpsc::UnboundedReceiver<AppCall>) -> AppCall {
    tokio::time::timeout(Duration::from_secs(10), calls.recv()).await.expect("the app was called").expect("app running")
}

/// The responder's inbound route and the requester's outbound route, one file each.
pub fn responder_toml(extra: &str) -> String {
    routes_toml(
        "tokens",
        "5s",
        &format!(
            r#"[[inbound]]
name = "tokens"
subject = "tokens.*"
mode = "request"
method = "GET"
path = "/{{2}}"
timeout = "5s"
{extra}
"#
        ),
    )
}

pub fn requester_toml(extra: &str) -> String {
    routes_toml(
        "caller",
        "5s",
        &format!(
            r#"[[outbound]]
name = "tokens"
method = "GET"
path = "/tokens/{{kind}}"
subject = "tokens.{{kind}}"
mode = "request"
timeout = "5s"
{extra}
"#
        ),
    )
}

pub struct Pair {
    pub _nats: NatsServer,
    pub requester: Sidecar,
    pub responder: Option<Sidecar>,
    pub calls: mpsc::UnboundedReceiver<AppCall>,
}

/// Waits until the pair's responder counted `n` streams of route `tokens` ending `end`.
pub async fn responder_counted(p: &Pair, end: &str, n: u64) {
    let responder = p.responder.as_ref().unwrap();
    let want = format!(r#"natsbridge_streams_total{{end="{end}",route="tokens",side="responder"}} {n}"#);
    let what = format!("the responder counted {n} {end} stream(s)");
    eventually(&what, Duration::from_secs(5), || async { responder.metrics().await.contains(&want).then_some(()) }).await;
}

pub async fn pair(requester_extra: &str, responder_extra: &str) -> Pair {
    let nats = NatsServer::start();
    let (app_url, calls) = streaming_app().await;
    let responder = Sidecar::start(&responder_toml(responder_extra), &nats.url(), Some(&app_url)).await;
    let requester = Sidecar::start(&requester_toml(requester_extra), &nats.url(), None).await;
    responder.wait_ready().await;
    requester.wait_ready().await;
    Pair { _nats: nats, requester, responder: Some(responder), calls }
}

/// A GET whose body the test reads frame by frame.
pub async fn open(url: &str) -> http::Response<Incoming> {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::get(url).body(Full::new(Bytes::new())).unwrap();
    tokio::time::timeout(Duration::from_secs(10), client.request(req)).await.expect("response head in time").unwrap()
}

/// A whole response: the head, the bytes, and how the body ended (`Err`: aborted).
pub type WholeRead = (http::response::Parts, (Vec<u8>, Result<(), String>));

/// Opens `url` and reads the whole body in a task.
pub fn read_in_background(url: String) -> tokio::task::JoinHandle<WholeRead> {
    tokio::spawn(async move {
        let (parts, mut body) = open(&url).await.into_parts();
        (parts, read_all(&mut body, Duration::from_secs(10)).await)
    })
}

/// Reads until the body ends: the bytes, and whether it ended cleanly (`Err`: aborted).
pub async fn read_all(body: &mut Incoming, within: Duration) -> (Vec<u8>, Result<(), String>) {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await.expect("the body ends in time") {
            None => return (out, Ok(())),
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    out.extend_from_slice(&d);
                }
            }
            Some(Err(e)) => return (out, Err(e.to_string())),
        }
    }
}

/// The next data frame's bytes.
pub async fn next_data(body: &mut Incoming) -> Bytes {
    loop {
        let f = tokio::time::timeout(Duration::from_secs(10), body.frame()).await.expect("a frame in time").expect("not ended").unwrap();
        if let Ok(d) = f.into_data() {
            return d;
        }
    }
}

pub fn sse_data(events: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(events)
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap_or(e).to_owned())
        .collect()
}

impl Pair {
    pub async fn requester_client(&self) -> async_nats::Client {
        self._nats.client().await
    }
}

/// Waits until the requester has answered `n` requests with a 2xx (its stream started).
pub async fn started(requester: &Sidecar, n: usize) {
    let want = format!("natsbridge_egress_requests_total{{mode=\"request\",path=\"nats\",route=\"tokens\",status_class=\"2xx\"}} {n}");
    eventually("the stream started", Duration::from_secs(10), || async { requester.metrics().await.contains(&want).then_some(()) }).await
}

// ---------------------------------------------------------------------------------------
// Foreign responders: plain NATS clients speaking the contract, or breaking it.

pub async fn requester_only(extra: &str) -> (NatsServer, Sidecar, async_nats::Client) {
    let nats = NatsServer::start();
    let requester = Sidecar::start(&requester_toml(extra), &nats.url(), None).await;
    requester.wait_ready().await;
    let c = nats.client().await;
    (nats, requester, c)
}

pub fn seq_headers(seq: u64, extra: &[(&str, &str)]) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    h.insert("Bridge-Stream-Seq", seq.to_string().as_str());
    for (k, v) in extra {
        h.insert(*k, *v);
    }
    h
}
