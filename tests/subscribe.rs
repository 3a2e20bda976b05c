//! `mode = "subscribe"` end to end (issue 11 §2): a subject, or a JetStream stream, as a
//! live SSE stream to a real HTTP client reading incrementally; resume with
//! `Last-Event-ID`; the per-client consumer goes away with the client; a nats-server
//! restart mid-stream loses and repeats nothing; the sidecar's stop ends an open stream at
//! once with a retry hint, and another sidecar resumes it; only the end message ends a
//! stream cleanly, and `stream_max` cuts one visibly; a client that stops reading a core
//! subscription's stream gets it ended as overflowed, not a backlog that drops silently.

mod support;

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioExecutor;
use support::fixtures::routes_toml;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn toml(extra: &str) -> String {
    toml_draining(extra, "5s")
}

fn toml_draining(extra: &str, drain_timeout: &str) -> String {
    routes_toml(
        "caller",
        drain_timeout,
        &format!(
            r#"[[outbound]]
name = "execution-tokens"
method = "GET"
path = "/executions/{{id}}/tokens"
subject = "agent.token.streamed.{{id}}"
mode = "subscribe"
{extra}
"#
        ),
    )
}

async fn open(url: &str, last_event_id: Option<u64>) -> http::Response<Incoming> {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::get(url);
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id.to_string());
    }
    let req = req.body(Full::new(Bytes::new())).unwrap();
    tokio::time::timeout(Duration::from_secs(10), client.request(req)).await.expect("response head in time").unwrap()
}

#[derive(Debug, PartialEq)]
struct Event {
    id: Option<u64>,
    event: Option<String>,
    data: String,
}

/// Reads whole events until `n` arrived or the body ends; `Err` when it ended uncleanly.
struct Reader {
    body: Incoming,
    buf: Vec<u8>,
    ended: Option<Result<(), String>>,
    /// The last `retry:` hint the stream gave.
    retry: Option<u64>,
}

impl Reader {
    fn new(res: http::Response<Incoming>) -> Self {
        Self { body: res.into_body(), buf: Vec::new(), ended: None, retry: None }
    }

    /// The next event (comments skipped unless `comments`), `None` at the end.
    async fn next(&mut self, comments: bool) -> Option<Result<Event, String>> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = self.buf.drain(..pos + 2).collect();
                let text = String::from_utf8(raw).unwrap();
                let mut e = Event { id: None, event: None, data: String::new() };
                let mut data = Vec::new();
                for line in text.lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        if comments {
                            return Some(Ok(Event { id: None, event: Some("comment".into()), data: c.trim().into() }));
                        }
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        e.id = Some(v.parse().unwrap());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        e.event = Some(v.into());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("retry: ") {
                        self.retry = Some(v.parse().unwrap());
                    }
                }
                if data.is_empty() && e.id.is_none() {
                    continue;
                }
                e.data = data.join("\n");
                return Some(Ok(e));
            }
            if let Some(end) = &self.ended {
                return end.clone().err().map(Err);
            }
            match tokio::time::timeout(Duration::from_secs(20), self.body.frame()).await.expect("an event in time") {
                None => self.ended = Some(Ok(())),
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.extend_from_slice(&d);
                    }
                }
                Some(Err(e)) => self.ended = Some(Err(e.to_string())),
            }
        }
    }
}

async fn tokens_stream(js: &jetstream::Context) {
    js.create_stream(jetstream::stream::Config {
        name: "TOKENS".into(),
        subjects: vec!["agent.token.streamed.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn consumers(js: &jetstream::Context) -> usize {
    js.get_stream("TOKENS").await.unwrap().info().await.unwrap().state.consumer_count
}

async fn publish(js: &jetstream::Context, subject: &str, headers: &[(&str, &str)], payload: String) -> u64 {
    let mut h = async_nats::HeaderMap::new();
    for (k, v) in headers {
        h.insert(*k, *v);
    }
    js.publish_with_headers(subject.to_owned(), h, payload.into()).await.unwrap().await.unwrap().sequence
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_subject_replays_1000_tokens_in_order_as_sse_and_ends_cleanly() {
    let nats = NatsServer::start();
    let js = jetstream::new(nats.client().await);
    tokens_stream(&js).await;
    let mut want = Vec::new();
    for i in 0..1000 {
        // Another execution's tokens interleave; they must not show.
        publish(&js, "agent.token.streamed.other", &[], format!("x{i}")).await;
        let (headers, payload): (&[(&str, &str)], String) = match i {
            7 => (&[("Bridge-Event", "tool")], "line one\nline two".into()),
            _ => (&[], format!("tok-{i}")),
        };
        let seq = publish(&js, "agent.token.streamed.e1", headers, payload.clone()).await;
        want.push(Event { id: Some(seq), event: headers.first().map(|(_, v)| v.to_string()), data: payload });
    }
    let end = publish(&js, "agent.token.streamed.e1", &[("Bridge-Stream", "end")], String::new()).await;
    let sidecar = Sidecar::start(&toml("stream = \"TOKENS\""), &nats.url(), None).await;
    sidecar.wait_ready().await;
    let res = open(&sidecar.url("/executions/e1/tokens"), None).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut r = Reader::new(res);
    let mut got = Vec::new();
    while let Some(e) = r.next(false).await {
        got.push(e.expect("a clean end"));
    }
    assert_eq!(got.len(), 1000);
    assert_eq!(got, want);
    assert!(got.last().unwrap().id.unwrap() < end);
    assert_eq!(r.ended, Some(Ok(())));
    // The client's consumer is gone once its stream ended.
    eventually("no consumer left", Duration::from_secs(10), || async { (consumers(&js).await == 0).then_some(()) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_resumes_after_a_disconnect_with_no_gap_and_no_duplicate() {
    let nats = NatsServer::start();
    let js = jetstream::new(nats.client().await);
    tokens_stream(&js).await;
    let sidecar = Sidecar::start(&toml("stream = \"TOKENS\""), &nats.url(), None).await;
    sidecar.wait_ready().await;
    let mut sent = Vec::new();
    for i in 0..100 {
        sent.push((publish(&js, "agent.token.streamed.e2", &[], format!("t{i}")).await, format!("t{i}")));
    }
    let mut r = Reader::new(open(&sidecar.url("/executions/e2/tokens"), None).await);
    let mut got = Vec::new();
    for _ in 0..40 {
        got.push(r.next(false).await.unwrap().unwrap());
    }
    // The client goes away mid-stream (connection dropped), and more tokens come meanwhile.
    drop(r);
    for i in 100..150 {
        sent.push((publish(&js, "agent.token.streamed.e2", &[], format!("t{i}")).await, format!("t{i}")));
    }
    publish(&js, "agent.token.streamed.e2", &[("Bridge-Stream", "end")], String::new()).await;
    let last = got.last().unwrap().id;
    let mut r = Reader::new(open(&sidecar.url("/executions/e2/tokens"), last).await);
    while let Some(e) = r.next(false).await {
        got.push(e.unwrap());
    }
    let got: Vec<(u64, String)> = got.into_iter().map(|e| (e.id.unwrap(), e.data)).collect();
    assert_eq!(got, sent, "every token exactly once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stop_ends_open_streams_at_once_with_a_retry_hint_and_another_sidecar_resumes_them() {
    let nats = NatsServer::start();
    let js = jetstream::new(nats.client().await);
    tokens_stream(&js).await;
    // A 20 s drain budget: before the fix the open stream held the stop for all of it.
    let routes = toml_draining("stream = \"TOKENS\"", "20s");
    let sidecar = Sidecar::start(&routes, &nats.url(), None).await;
    sidecar.wait_ready().await;
    let mut sent = Vec::new();
    for i in 0..30 {
        sent.push((publish(&js, "agent.token.streamed.e7", &[], format!("t{i}")).await, format!("t{i}")));
    }
    let mut r = Reader::new(open(&sidecar.url("/executions/e7/tokens"), None).await);
    let mut got = Vec::new();
    for _ in 0..30 {
        got.push(r.next(false).await.unwrap().unwrap());
    }
    // More tokens in flight as the stop comes: the first stream may or may not carry them.
    for i in 30..60 {
        sent.push((publish(&js, "agent.token.streamed.e7", &[], format!("t{i}")).await, format!("t{i}")));
    }
    let started = std::time::Instant::now();
    let stop = tokio::spawn(sidecar.stop());
    while let Some(e) = r.next(false).await {
        got.push(e.expect("the drain is not an error"));
    }
    tokio::time::timeout(Duration::from_secs(15), stop).await.expect("the sidecar stopped").unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "the stop took {took:?} of its 20 s budget");
    assert_eq!(r.ended, Some(Ok(())), "the body closes, with no error event");
    let retry = r.retry.expect("a retry hint before the close");
    assert!((500..=1500).contains(&retry), "retry {retry}");
    assert!(got.iter().all(|e| e.event.is_none()), "no end or error event: {got:?}");
    assert!(got.len() >= 30);

    // The producer ends the stream with an end event only now: the resumed stream carries
    // it, and everything between, exactly once.
    for i in 60..80 {
        sent.push((publish(&js, "agent.token.streamed.e7", &[], format!("t{i}")).await, format!("t{i}")));
    }
    let end = publish(&js, "agent.token.streamed.e7", &[("Bridge-Stream", "end"), ("Bridge-Event", "end")], "done".into()).await;
    let other = Sidecar::start(&routes, &nats.url(), None).await;
    other.wait_ready().await;
    let last = got.last().unwrap().id;
    let mut r = Reader::new(open(&other.url("/executions/e7/tokens"), last).await);
    let mut resumed = Vec::new();
    while let Some(e) = r.next(false).await {
        resumed.push(e.unwrap());
    }
    assert_eq!(r.retry, None, "a clean end gives no retry hint");
    let marker = resumed.pop().expect("the end event");
    assert_eq!((marker.id, marker.event.as_deref(), marker.data.as_str()), (Some(end), Some("end"), "done"));
    let got: Vec<(u64, String)> = got.into_iter().chain(resumed).map(|e| (e.id.unwrap(), e.data)).collect();
    assert_eq!(got, sent, "every token exactly once, in order");
    other.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_mid_stream_resumes_with_nothing_lost_or_repeated() {
    let mut nats = NatsServer::start();
    let publisher = nats.client().await;
    let js = jetstream::new(publisher.clone());
    tokens_stream(&js).await;
    let sidecar = Sidecar::start(&toml("stream = \"TOKENS\""), &nats.url(), None).await;
    sidecar.wait_ready().await;
    let mut sent = Vec::new();
    for i in 0..50 {
        sent.push(publish(&js, "agent.token.streamed.e3", &[], format!("t{i}")).await);
    }
    let mut r = Reader::new(open(&sidecar.url("/executions/e3/tokens"), None).await);
    let mut got = Vec::new();
    for _ in 0..50 {
        got.push(r.next(false).await.unwrap().unwrap().id.unwrap());
    }
    nats.restart();
    sidecar.wait_nats().await;
    let js = jetstream::new(nats.client().await);
    for i in 50..100 {
        sent.push(publish(&js, "agent.token.streamed.e3", &[], format!("t{i}")).await);
    }
    publish(&js, "agent.token.streamed.e3", &[("Bridge-Stream", "end")], String::new()).await;
    while let Some(e) = r.next(false).await {
        got.push(e.expect("no error across the restart").id.unwrap());
    }
    assert_eq!(got, sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_subscribe_streams_live_messages_and_heartbeats_an_idle_stream() {
    let nats = NatsServer::start();
    let c = nats.client().await;
    let sidecar = Sidecar::start(&toml("heartbeat = \"300ms\""), &nats.url(), None).await;
    sidecar.wait_ready().await;
    let mut r = Reader::new(open(&sidecar.url("/executions/e4/tokens"), None).await);
    // Idle: a comment arrives, nothing else.
    let hb = r.next(true).await.unwrap().unwrap();
    assert_eq!((hb.event.as_deref(), hb.data.as_str()), (Some("comment"), "keep-alive"));
    // The subscription is live now (it was bound before the head was sent).
    for i in 0..200 {
        c.publish("agent.token.streamed.e4", format!("t{i}").into()).await.unwrap();
    }
    let mut h = async_nats::HeaderMap::new();
    h.insert("Bridge-Stream", "end");
    c.publish_with_headers("agent.token.streamed.e4", h, Bytes::new()).await.unwrap();
    let mut got = Vec::new();
    while let Some(e) = r.next(false).await {
        let e = e.unwrap();
        assert_eq!(e.id, None, "core NATS has no sequence to resume from");
        got.push(e.data);
    }
    assert_eq!(got, (0..200).map(|i| format!("t{i}")).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_takes_its_consumer_with_it_and_a_bad_last_event_id_is_refused() {
    let nats = NatsServer::start();
    let js = jetstream::new(nats.client().await);
    tokens_stream(&js).await;
    publish(&js, "agent.token.streamed.e5", &[], "t0".into()).await;
    let sidecar = Sidecar::start(&toml("stream = \"TOKENS\""), &nats.url(), None).await;
    sidecar.wait_ready().await;
    let mut readers = Vec::new();
    for _ in 0..10 {
        let mut r = Reader::new(open(&sidecar.url("/executions/e5/tokens"), None).await);
        assert_eq!(r.next(false).await.unwrap().unwrap().data, "t0");
        readers.push(r);
    }
    assert_eq!(consumers(&js).await, 10);
    drop(readers);
    // Deleted by the sidecar, well before the server's 30 s inactivity reaping.
    eventually("every consumer deleted", Duration::from_secs(10), || async { (consumers(&js).await == 0).then_some(()) }).await;
    let bad = call("GET", &sidecar.url("/executions/e5/tokens"), &[("Last-Event-ID", "abc")], Bytes::new()).await;
    assert_eq!(bad.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_route_with_ttl_gets_a_stream_that_expires_its_messages() {
    let nats = NatsServer::start();
    let js = jetstream::new(nats.client().await);
    let toml = r#"[sidecar]
service = "agent"
app_url = "http://127.0.0.1:1"
provision = true

[nats]
servers = ["nats://127.0.0.1:1"]

[[streams]]
name = "TOKENS"
subjects = ["agent.token.streamed.>"]

[[outbound]]
name = "token-out"
method = "POST"
path = "/tokens/{id}"
subject = "agent.token.streamed.{id}"
mode = "jetstream"
ttl = "1s"
"#;
    let sidecar = Sidecar::start(toml, &nats.url(), None).await;
    sidecar.wait_ready().await;
    let info = js.get_stream("TOKENS").await.unwrap().info().await.unwrap().clone();
    assert!(info.config.allow_message_ttl, "provisioning enables per-message TTLs");
    let res = post(&sidecar.url("/tokens/e6"), "tok").await;
    assert_eq!(res.status, 202);
    let stored = js.get_stream("TOKENS").await.unwrap().get_last_raw_message_by_subject("agent.token.streamed.e6").await.unwrap();
    assert_eq!(stored.headers.get("Nats-TTL").map(|v| v.as_str()), Some("1s"));
    eventually("the token expired", Duration::from_secs(15), || async { (stored_messages(&js).await == 0).then_some(()) }).await;
}

async fn stored_messages(js: &jetstream::Context) -> u64 {
    js.get_stream("TOKENS").await.unwrap().info().await.unwrap().state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_asked_for_while_draining_gets_only_the_retry_hint() {
    let nats = NatsServer::start();
    let js = jetstream::new(nats.client().await);
    tokens_stream(&js).await;
    publish(&js, "agent.token.streamed.e8", &[], "t0".into()).await;
    // An order held at the app keeps ingress draining, and so egress accepting, meanwhile.
    let (go, go_rx) = tokio::sync::watch::channel(false);
    let app = App::script(move |_, _| {
        let mut go = go_rx.clone();
        async move {
            let _ = go.wait_for(|g| *g).await;
            respond(200, "{}")
        }
    })
    .await;
    let routes = toml_draining("stream = \"TOKENS\"", "20s") + &support::fixtures::orders_route("timeout = \"30s\"");
    let sidecar = Sidecar::start(&routes, &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    let client = nats.client().await;
    let order =
        tokio::spawn(
            async move { support::fixtures::nats_request_within(&client, "orders.create", &[], "{}", Duration::from_secs(20)).await },
        );
    app.wait_hits(1).await;
    sidecar.shutdown.cancel();
    let admin = sidecar.admin;
    eventually("draining", Duration::from_secs(10), || async move { (!all_up(admin).await).then_some(()) }).await;
    let res = open(&sidecar.url("/executions/e8/tokens"), None).await;
    assert_eq!(res.status(), 200, "EventSource gives up on anything else");
    let mut r = Reader::new(res);
    assert!(r.next(false).await.is_none(), "no event while draining");
    assert_eq!(r.ended, Some(Ok(())));
    assert!(r.retry.is_some(), "a retry hint");
    assert_eq!(consumers(&js).await, 0, "no consumer made for it");
    go.send(true).unwrap();
    order.await.unwrap().expect("the order in flight is answered");
    sidecar.stop().await;
}

/// A raw HTTP/1.1 `GET` with `Connection: close`: the socket, once the response head has
/// arrived, and what was read so far.
async fn raw_open(addr: std::net::SocketAddr, path: &str) -> (tokio::net::TcpStream, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await.expect("a head in time").unwrap();
        assert!(n > 0, "closed before the head: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
    (s, buf)
}

/// Everything the server writes until it closes the connection (an abort may reset it).
async fn raw_rest(mut s: tokio::net::TcpStream, mut buf: Vec<u8>) -> String {
    let read = async {
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = s.read(&mut chunk).await {
            buf.extend_from_slice(&chunk[..n]);
        }
        buf
    };
    let buf = tokio::time::timeout(Duration::from_secs(10), read).await.expect("the connection closes in time");
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_end_message_ends_a_stream_cleanly_and_stream_max_cuts_it_visibly() {
    let nats = NatsServer::start();
    let js = jetstream::new(nats.client().await);
    tokens_stream(&js).await;
    let sidecar = Sidecar::start(&toml("stream = \"TOKENS\"\nstream_max = \"1s\""), &nats.url(), None).await;
    sidecar.wait_ready().await;

    // Cut at stream_max: an error event, then no terminating chunk.
    let (s, head) = raw_open(sidecar.egress, "/executions/e10/tokens").await;
    let raw = raw_rest(s, head).await;
    assert!(raw.starts_with("HTTP/1.1 200") && raw.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{raw}");
    assert!(raw.contains("event: error\n") && raw.contains("stream-limit"), "{raw}");
    assert!(!raw.ends_with("0\r\n\r\n"), "a cut stream must not end like a complete one: {raw:?}");
    // hyper's client sees the same: an error, after the error event.
    let mut r = Reader::new(open(&sidecar.url("/executions/e11/tokens"), None).await);
    let e = r.next(false).await.unwrap().unwrap();
    assert_eq!(e.event.as_deref(), Some("error"));
    assert!(matches!(r.next(false).await, Some(Err(_))), "the body ends with an error");

    // Ended by the end message: clean, with the terminating chunk.
    publish(&js, "agent.token.streamed.e12", &[("Bridge-Stream", "end")], "last".into()).await;
    let (s, head) = raw_open(sidecar.egress, "/executions/e12/tokens").await;
    let raw = raw_rest(s, head).await;
    assert!(raw.contains("data: last\n\n") && !raw.contains("event: error"), "{raw}");
    assert!(raw.ends_with("0\r\n\r\n"), "a complete stream ends with the terminating chunk: {raw:?}");
}

/// A client that stops reading a core subscription's stream. Left to async-nats, up to
/// 65,536 messages (1 GiB here) waited for it and any more were dropped without a word.
/// Now the sidecar buffers at most four times `stream_buffer` (256) messages, then
/// unsubscribes and ends the stream visibly: what was buffered, `event: error`
/// (stream-overflow), and no terminating chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_core_subscription_gets_an_overflow_error_not_a_silent_gap() {
    let nats = NatsServer::start();
    let c = nats.client().await;
    let sidecar = Sidecar::start(&toml(""), &nats.url(), None).await;
    sidecar.wait_ready().await;
    const SUBJECT: &str = "agent.token.streamed.e20";
    // The subscription is bound before the head is sent; the client reads no more.
    let (s, head) = raw_open(sidecar.egress, "/executions/e20/tokens").await;
    // Far more than the socket buffers hold (a few MiB) plus 4 × 256 messages.
    let payload = Bytes::from("x".repeat(16 * 1024));
    for _ in 0..4000 {
        c.publish(SUBJECT, payload.clone()).await.unwrap();
    }
    c.flush().await.unwrap();
    // The sidecar gave up on the client: nobody is subscribed to the subject any more.
    eventually("the sidecar unsubscribing the slow client", Duration::from_secs(20), || {
        let c = c.clone();
        async move {
            match tokio::time::timeout(Duration::from_millis(500), c.request(SUBJECT, Bytes::new())).await {
                Ok(Err(e)) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => Some(()),
                _ => None,
            }
        }
    })
    .await;
    let raw = raw_rest(s, head).await;
    let events = raw.matches("data: x").count();
    assert!(events > 0 && events < 4000, "what was buffered comes first, not all: {events}");
    assert!(raw.contains("event: error\n") && raw.contains("stream-overflow"), "{}", &raw[raw.len().saturating_sub(600)..]);
    assert!(!raw.ends_with("0\r\n\r\n"), "an overflowed stream must not end like a complete one");
}
