//! Streamed replies end to end (issue 11 §1): a real app streaming tokens (chunked and
//! text/event-stream) behind a responder sidecar, a requester sidecar, a real HTTP client
//! reading incrementally, and a real nats-server. Foreign responders are plain NATS
//! clients speaking (or breaking) the wire contract.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::fixtures::routes_toml;
use support::*;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One call the app received: its path, and the writer of its response body.
struct AppCall {
    path: String,
    tx: mpsc::Sender<Result<Bytes, BoxError>>,
}

/// A real HTTP app whose responses are written by the test as it goes: `/sse…` answers
/// `text/event-stream`, anything else `application/octet-stream`, both chunked.
async fn streaming_app() -> (String, mpsc::UnboundedReceiver<AppCall>) {
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

async fn next_call(calls: &mut mpsc::UnboundedReceiver<AppCall>) -> AppCall {
    tokio::time::timeout(Duration::from_secs(10), calls.recv()).await.expect("the app was called").expect("app running")
}

/// The responder's inbound route and the requester's outbound route, one file each.
fn responder_toml(extra: &str) -> String {
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

fn requester_toml(extra: &str) -> String {
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

struct Pair {
    _nats: NatsServer,
    requester: Sidecar,
    responder: Option<Sidecar>,
    calls: mpsc::UnboundedReceiver<AppCall>,
}

async fn pair(requester_extra: &str, responder_extra: &str) -> Pair {
    let nats = NatsServer::start();
    let (app_url, calls) = streaming_app().await;
    let responder = Sidecar::start(&responder_toml(responder_extra), &nats.url(), Some(&app_url)).await;
    let requester = Sidecar::start(&requester_toml(requester_extra), &nats.url(), None).await;
    responder.wait_ready().await;
    requester.wait_ready().await;
    Pair { _nats: nats, requester, responder: Some(responder), calls }
}

/// A GET whose body the test reads frame by frame.
async fn open(url: &str) -> http::Response<Incoming> {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::get(url).body(Full::new(Bytes::new())).unwrap();
    tokio::time::timeout(Duration::from_secs(10), client.request(req)).await.expect("response head in time").unwrap()
}

/// Reads until the body ends: the bytes, and whether it ended cleanly (`Err`: aborted).
async fn read_all(body: &mut Incoming, within: Duration) -> (Vec<u8>, Result<(), String>) {
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
async fn next_data(body: &mut Incoming) -> Bytes {
    loop {
        let f = tokio::time::timeout(Duration::from_secs(10), body.frame()).await.expect("a frame in time").expect("not ended").unwrap();
        if let Ok(d) = f.into_data() {
            return d;
        }
    }
}

fn sse_data(events: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(events)
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap_or(e).to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_tokens_reach_the_client_before_the_app_finishes_and_1000_arrive_in_order() {
    let mut p = pair("", "").await;
    let started = Instant::now();
    let url = p.requester.url("/tokens/sse");
    let client = tokio::spawn(async move {
        let res = open(&url).await;
        let head_at = Instant::now();
        let (parts, mut body) = res.into_parts();
        let first = next_data(&mut body).await;
        let first_at = Instant::now();
        (parts, body, first, head_at, first_at)
    });
    let call = next_call(&mut p.calls).await;
    assert_eq!(call.path, "/sse");
    call.tx.send(Ok(Bytes::from_static(b"data: 0\n\n"))).await.unwrap();
    // The app writes nothing more until the client has read the first token: a sidecar that
    // buffered the body would never deliver it.
    let (parts, mut body, first, _head_at, first_at) = tokio::time::timeout(Duration::from_secs(10), client).await.unwrap().unwrap();
    let app_done_at = Instant::now();
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["content-type"], "text/event-stream");
    assert_eq!(parts.headers["x-app"], "streams");
    assert!(parts.headers.get("bridge-stream-seq").is_none() && parts.headers.get("bridge-stream-control").is_none());
    assert!(parts.headers.get("content-length").is_none());
    assert_eq!(&first[..], b"data: 0\n\n");
    assert!(first_at < app_done_at, "the first token arrived {:?} after start, before the app went on", first_at - started);
    for i in 1..1000 {
        // Events split across writes must still arrive whole.
        let e = format!("data: {i}\n\n");
        let (a, b) = e.as_bytes().split_at(3);
        call.tx.send(Ok(Bytes::copy_from_slice(a))).await.unwrap();
        call.tx.send(Ok(Bytes::copy_from_slice(b))).await.unwrap();
    }
    drop(call.tx);
    let (rest, end) = read_all(&mut body, Duration::from_secs(20)).await;
    assert_eq!(end, Ok(()), "a complete stream ends cleanly");
    let got = sse_data(&rest);
    let want: Vec<String> = (1..1000).map(|i| i.to_string()).collect();
    assert_eq!(got, want);
    let responder = p.responder.as_ref().unwrap();
    eventually("the responder counted a complete stream", Duration::from_secs(5), || async {
        responder.metrics().await.contains(r#"natsbridge_streams_total{end="complete",route="tokens",side="responder"} 1"#).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_streams_through_and_a_small_one_stays_one_plain_reply() {
    let mut p = pair("", "").await;
    let url = p.requester.url("/tokens/chunks");
    let client = tokio::spawn(async move {
        let (parts, mut body) = open(&url).await.into_parts();
        let first = next_data(&mut body).await;
        let (rest, end) = read_all(&mut body, Duration::from_secs(20)).await;
        (parts, first, rest, end)
    });
    let call = next_call(&mut p.calls).await;
    call.tx.send(Ok(Bytes::from_static(b"tok-0,"))).await.unwrap();
    // Wait for the client to have the first chunk before writing the rest.
    started(&p.requester, 1).await;
    let mut want = b"tok-0,".to_vec();
    for i in 1..1000 {
        let t = format!("tok-{i},");
        want.extend_from_slice(t.as_bytes());
        call.tx.send(Ok(Bytes::from(t))).await.unwrap();
    }
    drop(call.tx);
    let (parts, first, rest, end) = tokio::time::timeout(Duration::from_secs(20), client).await.unwrap().unwrap();
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["transfer-encoding"], "chunked");
    assert_eq!(end, Ok(()));
    let mut got = first.to_vec();
    got.extend_from_slice(&rest);
    assert_eq!(String::from_utf8(got).unwrap(), String::from_utf8(want).unwrap());

    // A chunked body that is whole at once is a plain reply, as non-streaming requesters expect.
    let nats = p.requester_client().await;
    let ask = tokio::spawn(async move { nats.request("tokens.small", Bytes::new()).await });
    let call = next_call(&mut p.calls).await;
    call.tx.send(Ok(Bytes::from_static(b"{\"ok\":true}"))).await.unwrap();
    drop(call.tx);
    let reply = ask.await.unwrap().unwrap();
    assert_eq!(&reply.payload[..], b"{\"ok\":true}");
    let h = reply.headers.unwrap();
    assert!(h.get("Bridge-Stream-Seq").is_none(), "{h:?}");
    assert_eq!(h.get("Bridge-Status").unwrap().as_str(), "200");
}

impl Pair {
    async fn requester_client(&self) -> async_nats::Client {
        self._nats.client().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_closes_the_apps_connection_within_a_second() {
    let mut p = pair("", "").await;
    let url = p.requester.url("/tokens/sse");
    let client = tokio::spawn(async move {
        let (_parts, mut body) = open(&url).await.into_parts();
        next_data(&mut body).await
        // The response and its connection are dropped here.
    });
    let call = next_call(&mut p.calls).await;
    call.tx.send(Ok(Bytes::from_static(b"data: 0\n\n"))).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), client).await.unwrap().unwrap();
    let gone = Instant::now();
    // Keep writing, as a model generating tokens would; the app must see its reader leave.
    let tx = call.tx.clone();
    let writer = tokio::spawn(async move {
        for i in 1.. {
            if tx.send(Ok(Bytes::from(format!("data: {i}\n\n")))).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    tokio::time::timeout(Duration::from_secs(5), call.tx.closed()).await.expect("the app's response was dropped");
    let took = gone.elapsed();
    assert!(took < Duration::from_secs(1) * 3, "the app saw the close {took:?} after the client left (goal: 1 s; loaded machine)");
    writer.abort();
    let (req, resp) = (&p.requester, p.responder.as_ref().unwrap());
    eventually("the cancel counted on both sides", Duration::from_secs(5), || async {
        let (a, b) = (req.metrics().await, resp.metrics().await);
        (a.contains(r#"natsbridge_streams_total{end="cancel",route="tokens",side="reader"} 1"#)
            && b.contains(r#"natsbridge_streams_total{end="cancel",route="tokens",side="responder"} 1"#))
        .then_some(())
    })
    .await;
}

/// Waits until the requester has answered `n` requests with a 2xx (its stream started).
async fn started(requester: &Sidecar, n: usize) {
    let want = format!("natsbridge_egress_requests_total{{mode=\"request\",route=\"tokens\",status_class=\"2xx\"}} {n}");
    eventually("the stream started", Duration::from_secs(10), || async { requester.metrics().await.contains(&want).then_some(()) }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_failing_mid_stream_ends_sse_with_an_error_event_and_chunked_with_an_aborted_body() {
    let mut p = pair("", "").await;
    for (n, path, sse) in [(1, "/tokens/sse", true), (2, "/tokens/chunks", false)] {
        let url = p.requester.url(path);
        let client = tokio::spawn(async move {
            let (parts, mut body) = open(&url).await.into_parts();
            let first = next_data(&mut body).await;
            let (rest, end) = read_all(&mut body, Duration::from_secs(20)).await;
            (parts, first, rest, end)
        });
        let call = next_call(&mut p.calls).await;
        call.tx.send(Ok(Bytes::from_static(b"data: 0\n\n"))).await.unwrap();
        call.tx.send(Ok(Bytes::from_static(b"data: 1\n\n"))).await.unwrap();
        // The failure comes once the client has the head: mid-stream.
        started(&p.requester, n).await;
        call.tx.send(Err("the model crashed".into())).await.unwrap();
        let (parts, first, rest, end) = tokio::time::timeout(Duration::from_secs(20), client).await.unwrap().unwrap();
        assert_eq!(parts.status, 200);
        let mut all = first.to_vec();
        all.extend_from_slice(&rest);
        let text = String::from_utf8_lossy(&all).into_owned();
        assert!(text.starts_with("data: 0\n\ndata: 1\n\n"), "{text}");
        if sse {
            assert_eq!(end, Ok(()), "an event stream ends with its error event");
            let last = text.rsplit("\n\n").find(|e| !e.is_empty()).unwrap();
            assert!(last.starts_with("event: error\ndata: {"), "{text}");
            assert!(last.contains("urn:natsbridge:problem:stream-error"), "{last}");
        } else {
            assert!(end.is_err(), "a chunked body must not end cleanly after a failure: {text}");
        }
    }
    let m = p.requester.metrics().await;
    assert!(m.contains(r#"natsbridge_streams_total{end="error",route="tokens",side="reader"} 2"#), "{m}");
    let responder = p.responder.as_ref().unwrap();
    eventually("the responder counted two failed streams", Duration::from_secs(5), || async {
        responder.metrics().await.contains(r#"natsbridge_streams_total{end="error",route="tokens",side="responder"} 2"#).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_ends_as_an_error_and_stops_the_app() {
    let mut p = pair("stream_stall = \"400ms\"", "").await;
    let url = p.requester.url("/tokens/chunks");
    let client = tokio::spawn(async move {
        let (_parts, mut body) = open(&url).await.into_parts();
        let first = next_data(&mut body).await;
        let at = Instant::now();
        let (_, end) = read_all(&mut body, Duration::from_secs(20)).await;
        (first, end, at.elapsed())
    });
    let call = next_call(&mut p.calls).await;
    call.tx.send(Ok(Bytes::from_static(b"tok-0"))).await.unwrap();
    // Then nothing: the app hangs.
    let (first, end, took) = tokio::time::timeout(Duration::from_secs(20), client).await.unwrap().unwrap();
    assert_eq!(&first[..], b"tok-0");
    assert!(end.is_err(), "a stalled stream must not look complete");
    assert!(took >= Duration::from_millis(350) && took < Duration::from_secs(5), "ended {took:?} after the last token");
    // The reader cancelled: the app's connection closes.
    tokio::time::timeout(Duration::from_secs(5), call.tx.closed()).await.expect("the app's response was dropped");
    let m = p.requester.metrics().await;
    assert!(m.contains(r#"natsbridge_streams_total{end="stall",route="tokens",side="reader"} 1"#), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_streams_keep_their_order() {
    const STREAMS: usize = 40;
    const TOKENS: usize = 200;
    let mut p = pair("", "").await;
    let mut clients = Vec::new();
    for _ in 0..STREAMS {
        let url = p.requester.url("/tokens/sse");
        clients.push(tokio::spawn(async move {
            let (_parts, mut body) = open(&url).await.into_parts();
            read_all(&mut body, Duration::from_secs(60)).await
        }));
    }
    let writers = Arc::new(AtomicUsize::new(0));
    for _ in 0..STREAMS {
        let call = next_call(&mut p.calls).await;
        let w = writers.clone();
        tokio::spawn(async move {
            for i in 0..TOKENS {
                call.tx.send(Ok(Bytes::from(format!("data: {i}\n\n")))).await.unwrap();
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            w.fetch_add(1, Ordering::SeqCst);
        });
    }
    let want: Vec<String> = (0..TOKENS).map(|i| i.to_string()).collect();
    for c in clients {
        let (bytes, end) = tokio::time::timeout(Duration::from_secs(60), c).await.unwrap().unwrap();
        assert_eq!(end, Ok(()));
        assert_eq!(sse_data(&bytes), want);
    }
    assert_eq!(writers.load(Ordering::SeqCst), STREAMS);
}

// ---------------------------------------------------------------------------------------
// Foreign responders: plain NATS clients speaking the contract, or breaking it.

async fn requester_only(extra: &str) -> (NatsServer, Sidecar, async_nats::Client) {
    let nats = NatsServer::start();
    let requester = Sidecar::start(&requester_toml(extra), &nats.url(), None).await;
    requester.wait_ready().await;
    let c = nats.client().await;
    (nats, requester, c)
}

fn seq_headers(seq: u64, extra: &[(&str, &str)]) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    h.insert("Bridge-Stream-Seq", seq.to_string().as_str());
    for (k, v) in extra {
        h.insert(*k, *v);
    }
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_the_sequence_ends_the_stream_as_an_error_and_cancels_it() {
    let (_nats, requester, c) = requester_only("").await;
    let mut sub = subscribe_synced(&c, "tokens.sse").await;
    let mut control = subscribe_synced(&c, "control.gap").await;
    let url = requester.url("/tokens/sse");
    let client = tokio::spawn(async move {
        let (parts, mut body) = open(&url).await.into_parts();
        (parts, read_all(&mut body, Duration::from_secs(10)).await)
    });
    let req = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap();
    let reply = req.reply.unwrap();
    let first =
        seq_headers(1, &[("Bridge-Status", "200"), ("Content-Type", "text/event-stream"), ("Bridge-Stream-Control", "control.gap")]);
    c.publish_with_headers(reply.clone(), first, "data: a\n\n".into()).await.unwrap();
    c.publish_with_headers(reply.clone(), seq_headers(2, &[]), "data: b\n\n".into()).await.unwrap();
    c.publish_with_headers(reply.clone(), seq_headers(4, &[]), "data: d\n\n".into()).await.unwrap();
    let (parts, (bytes, end)) = tokio::time::timeout(Duration::from_secs(10), client).await.unwrap().unwrap();
    assert_eq!(parts.status, 200);
    assert_eq!(end, Ok(()));
    let text = String::from_utf8_lossy(&bytes).into_owned();
    assert!(text.starts_with("data: a\n\ndata: b\n\nevent: error\n"), "{text}");
    assert!(text.contains("stream-broken") && !text.contains("data: d"), "{text}");
    let cancel = tokio::time::timeout(Duration::from_secs(5), control.next()).await.expect("a cancel").unwrap();
    assert_eq!(cancel.headers.unwrap().get("Bridge-Stream").unwrap().as_str(), "cancel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_max_ends_a_stream_that_never_stops() {
    let (_nats, requester, c) = requester_only("stream_max = \"600ms\"").await;
    let mut sub = subscribe_synced(&c, "tokens.chunks").await;
    let url = requester.url("/tokens/chunks");
    let client = tokio::spawn(async move {
        let (_parts, mut body) = open(&url).await.into_parts();
        let t = Instant::now();
        let r = read_all(&mut body, Duration::from_secs(10)).await;
        (r, t.elapsed())
    });
    let req = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap();
    let reply = req.reply.unwrap();
    let feeder = tokio::spawn(async move {
        for seq in 1.. {
            let h = if seq == 1 { seq_headers(1, &[("Bridge-Status", "200")]) } else { seq_headers(seq, &[]) };
            c.publish_with_headers(reply.clone(), h, "x".into()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let ((bytes, end), took) = tokio::time::timeout(Duration::from_secs(10), client).await.unwrap().unwrap();
    feeder.abort();
    assert!(end.is_err(), "a stream cut at stream_max must not look complete");
    assert!(!bytes.is_empty() && bytes.iter().all(|b| *b == b'x'));
    assert!(took < Duration::from_secs(5), "{took:?}");
    let m = requester.metrics().await;
    assert!(m.contains(r#"natsbridge_streams_total{end="limit",route="tokens",side="reader"} 1"#), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_responder_ends_its_stream_with_an_empty_sentinel() {
    let (_nats, requester, c) = requester_only("stream_end = \"empty\"").await;
    let mut sub = subscribe_synced(&c, "tokens.chunks").await;
    let url = requester.url("/tokens/chunks");
    let client = tokio::spawn(async move {
        let (parts, mut body) = open(&url).await.into_parts();
        (parts, read_all(&mut body, Duration::from_secs(10)).await)
    });
    let req = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap();
    let reply = req.reply.unwrap();
    for part in ["one ", "two ", "three"] {
        c.publish(reply.clone(), Bytes::from(part)).await.unwrap();
    }
    c.publish(reply.clone(), Bytes::new()).await.unwrap();
    let (parts, (bytes, end)) = tokio::time::timeout(Duration::from_secs(10), client).await.unwrap().unwrap();
    assert_eq!(parts.status, 200);
    assert_eq!(end, Ok(()));
    assert_eq!(&bytes[..], b"one two three");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_responder_sidecar_dying_mid_stream_ends_the_reader_within_stream_stall() {
    let mut p = pair("stream_stall = \"500ms\"", "").await;
    let url = p.requester.url("/tokens/chunks");
    let client = tokio::spawn(async move {
        let (_parts, mut body) = open(&url).await.into_parts();
        let first = next_data(&mut body).await;
        (first, read_all(&mut body, Duration::from_secs(10)).await)
    });
    let call = next_call(&mut p.calls).await;
    call.tx.send(Ok(Bytes::from_static(b"tok"))).await.unwrap();
    started(&p.requester, 1).await;
    // The responder vanishes without a word (its task aborted, its connection dropped).
    let mut responder = p.responder.take().unwrap();
    responder.task.take().unwrap().abort();
    drop(responder);
    let (first, (_rest, end)) = tokio::time::timeout(Duration::from_secs(10), client).await.unwrap().unwrap();
    assert_eq!(&first[..], b"tok");
    assert!(end.is_err(), "the reader must end with an error, not hang or look complete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_slower_than_stream_buffer_gets_an_error_end_and_its_waiter_is_gone() {
    let (_nats, requester, c) = requester_only("stream_buffer = 4").await;
    let mut sub = subscribe_synced(&c, "tokens.chunks").await;
    let url = requester.url("/tokens/chunks");
    let (go, wait) = tokio::sync::oneshot::channel::<()>();
    let client = tokio::spawn(async move {
        let (_parts, mut body) = open(&url).await.into_parts();
        // The client reads nothing until told: the replies pile up in the sidecar.
        wait.await.unwrap();
        read_all(&mut body, Duration::from_secs(20)).await
    });
    let req = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap();
    let reply = req.reply.unwrap();
    // Far more than the socket buffers between the sidecar and the client hold.
    let chunk = Bytes::from(vec![b'x'; 256 << 10]);
    c.publish_with_headers(reply.clone(), seq_headers(1, &[("Bridge-Status", "200")]), chunk.clone()).await.unwrap();
    for seq in 2..=400u64 {
        c.publish_with_headers(reply.clone(), seq_headers(seq, &[]), chunk.clone()).await.unwrap();
    }
    c.flush().await.unwrap();
    // The waiter was dropped when its buffer overflowed: the rest arrived for nobody.
    eventually("replies dropped after the overflow", Duration::from_secs(20), || async {
        let m = requester.metrics().await;
        let late = m.lines().find_map(|l| l.strip_prefix("natsbridge_late_replies_total ")).and_then(|v| v.trim().parse::<u64>().ok());
        late.filter(|n| *n > 0).map(|_| ())
    })
    .await;
    go.send(()).unwrap();
    let (bytes, end) = tokio::time::timeout(Duration::from_secs(30), client).await.unwrap().unwrap();
    assert!(end.is_err(), "an overflowed stream must not look complete");
    assert!(bytes.len() < 400 * (256 << 10), "the client got {} bytes: not the whole stream", bytes.len());
    eventually("the overflow counted", Duration::from_secs(5), || async {
        let m = requester.metrics().await;
        (m.contains(r#"natsbridge_streams_total{end="overflow",route="tokens",side="reader"} 1"#)
            && m.contains("natsbridge_pending_replies 0"))
        .then_some(())
    })
    .await;
}

/// Token latency, app write → HTTP client read, through two sidecars, against a raw NATS
/// publish → subscribe in the same run: 100 streams × 20 tokens/s for 5 s. Prints p50/p99;
/// run with `--ignored --nocapture` (numbers for BENCHMARKS.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn bench_token_latency_through_two_sidecars_against_raw_nats() {
    // STREAM_BENCH_STREAMS: fewer streams, to see the per-token cost on a loaded machine.
    let streams: usize = std::env::var("STREAM_BENCH_STREAMS").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    const TOKENS: usize = 100;
    const GAP: Duration = Duration::from_millis(50);
    let base = Instant::now();
    let micros = move || base.elapsed().as_micros() as u64;
    let stamp_of = |line: &str| line.trim().strip_prefix("data: ").and_then(|v| v.parse::<u64>().ok());

    // Raw NATS baseline.
    let nats = NatsServer::start();
    let (pc, sc) = (nats.client().await, nats.client().await);
    let mut raw = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let mut readers = Vec::new();
    for s in 0..streams {
        let mut sub = sc.subscribe(format!("raw.{s}")).await.unwrap();
        readers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while lat.len() < TOKENS {
                let m = sub.next().await.unwrap();
                let sent: u64 = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
                lat.push(micros() - sent);
            }
            lat
        }));
    }
    sc.flush().await.unwrap();
    let _ = sc.request("_sync", Bytes::new()).await;
    let mut writers = Vec::new();
    for s in 0..streams {
        let pc = pc.clone();
        writers.push(tokio::spawn(async move {
            tokio::time::sleep(GAP * s as u32 / streams as u32).await;
            for _ in 0..TOKENS {
                pc.publish(format!("raw.{s}"), micros().to_string().into()).await.unwrap();
                tokio::time::sleep(GAP).await;
            }
        }));
    }
    for r in readers {
        for l in r.await.unwrap() {
            raw.record(l).unwrap();
        }
    }
    for w in writers {
        w.await.unwrap();
    }

    // Through the sidecars. A stream holds its inbound concurrency slot while it lasts.
    let mut p = pair("", "concurrency = 200").await;
    let mut clients = Vec::new();
    for _ in 0..streams {
        let url = p.requester.url("/tokens/sse");
        clients.push(tokio::spawn(async move {
            let (_parts, mut body) = open(&url).await.into_parts();
            let mut lat = Vec::new();
            let mut buf = String::new();
            while lat.len() < TOKENS {
                let f = body
                    .frame()
                    .await
                    .unwrap_or_else(|| panic!("ended after {} tokens", lat.len()))
                    .unwrap_or_else(|e| panic!("after {} tokens: {e:?} {buf:?}", lat.len()));
                let now = micros();
                if let Ok(d) = f.into_data() {
                    buf.push_str(std::str::from_utf8(&d).unwrap());
                    while let Some(i) = buf.find("\n\n") {
                        let ev: String = buf.drain(..i + 2).collect();
                        lat.push(now - stamp_of(&ev).unwrap());
                    }
                }
            }
            lat
        }));
    }
    let mut writers = Vec::new();
    for s in 0..streams {
        let call = next_call(&mut p.calls).await;
        writers.push(tokio::spawn(async move {
            tokio::time::sleep(GAP * s as u32 / streams as u32).await;
            for _ in 0..TOKENS {
                call.tx.send(Ok(Bytes::from(format!("data: {}\n\n", micros())))).await.unwrap();
                tokio::time::sleep(GAP).await;
            }
        }));
    }
    let mut bridged = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    for c in clients {
        for l in c.await.unwrap() {
            bridged.record(l).unwrap();
        }
    }
    for w in writers {
        w.await.unwrap();
    }
    let q = |h: &hdrhistogram::Histogram<u64>, p: f64| h.value_at_quantile(p) as f64 / 1000.0;
    println!(
        "token latency ms ({streams} streams x {} tokens/s, {} tokens): raw NATS p50 {:.3} p99 {:.3}; two sidecars p50 {:.3} p99 {:.3}; added p50 {:.3}",
        1000 / GAP.as_millis(),
        bridged.len(),
        q(&raw, 0.5),
        q(&raw, 0.99),
        q(&bridged, 0.5),
        q(&bridged, 0.99),
        q(&bridged, 0.5) - q(&raw, 0.5)
    );
}
