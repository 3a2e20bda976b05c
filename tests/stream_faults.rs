//! Streams and vanishing clients (issue 11, faults): 200 concurrent streams through real
//! sidecar processes, streamed request/reply through two sidecars and `subscribe` SSE
//! streams backed by JetStream, and half of the HTTP clients drop their connection
//! mid-stream. Afterwards nothing is left behind: the app saw every abandoned call's
//! connection close, no reply waiter is pending, no JetStream consumer is left on the
//! stream, and the sidecars' memory is back near where it was before the streams.

mod support;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use support::streaming::{next_data, open, read_all, streaming_app, AppCall};
use support::*;

/// Streams of each kind; half of each kind's clients vanish.
const STREAMS: usize = 100;
/// Tokens a kept stream carries before it ends.
const TOKENS: usize = 20;
/// How far above its baseline a sidecar's RSS may settle (a leak of what 100 abandoned
/// streams hold — their buffers, waiters, consumers' subscriptions — is larger; the
/// allocator keeping some freed pages is not).
const RSS_SLACK_KB: u64 = 8 * 1024;

fn responder_toml() -> String {
    support::streaming::responder_toml("")
}

/// The requester: streamed request/reply on `/tokens/{kind}`, and `subscribe` on the
/// JetStream stream TOKENS at `/events/{id}`.
fn requester_toml() -> String {
    support::streaming::requester_toml(
        r#"
[[outbound]]
name = "events"
method = "GET"
path = "/events/{id}"
subject = "tok.{id}"
mode = "subscribe"
stream = "TOKENS"
"#,
    )
}

/// A process's resident set size, in kB (`VmRSS` of /proc/<pid>/status).
fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The value of an unlabelled gauge in a sidecar's metrics.
async fn gauge(admin: std::net::SocketAddr, name: &str) -> Option<f64> {
    let m = get(&format!("http://{admin}/metrics")).await.ok()?;
    let text = String::from_utf8_lossy(&m.body).into_owned();
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

async fn consumers(js: &jetstream::Context) -> usize {
    js.get_stream("TOKENS").await.unwrap().info().await.unwrap().state.consumer_count
}

/// The app's side of one streamed call: a kept one writes `TOKENS` tokens and ends; an
/// abandoned one writes until its connection closes (true) or a minute passes (false).
async fn write_tokens(call: AppCall) -> bool {
    let keep = call.path.contains("keep");
    for i in 0.. {
        if keep && i == TOKENS {
            return true;
        }
        let token = Bytes::from(format!("data: {i}\n\n"));
        if call.tx.send(Ok(token)).await.is_err() {
            return !keep;
        }
        if i > 3000 {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    unreachable!()
}

/// One HTTP client: reads the first token, then leaves (`keep` false) or reads to the end;
/// the body it read when it stayed.
async fn client(url: String, keep: bool) -> Option<(Vec<u8>, Result<(), String>)> {
    let (parts, mut body) = open(&url).await.into_parts();
    assert_eq!(parts.status, 200, "{url}");
    let first = next_data(&mut body).await;
    if !keep {
        return None;
    }
    let (rest, end) = read_all(&mut body, Duration::from_secs(90)).await;
    Some(([first.to_vec(), rest].concat(), end))
}

/// Runs `STREAMS` streams of each kind, half of whose clients leave after their first
/// token; returns once every client is done, with the app's writers' results.
async fn round(
    requester: &SidecarProcess,
    js: &jetstream::Context,
    calls: &mut tokio::sync::mpsc::UnboundedReceiver<AppCall>,
    tag: &str,
) -> Vec<tokio::task::JoinHandle<bool>> {
    let mut clients = Vec::new();
    for i in 0..STREAMS {
        let keep = i % 2 == 0;
        let how = if keep { "keep" } else { "drop" };
        // The subject's messages are there before the client comes: it replays them.
        let subject = format!("tok.{tag}-{how}-{i}");
        for t in 0..TOKENS {
            js.publish(subject.clone(), format!("t{t}").into()).await.unwrap().await.unwrap();
        }
        if keep {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Bridge-Stream", "end");
            js.publish_with_headers(subject, h, Bytes::new()).await.unwrap().await.unwrap();
        }
        clients.push((keep, "sse", tokio::spawn(client(requester.url(&format!("/tokens/sse-{tag}-{how}-{i}")), keep))));
        clients.push((keep, "subscribe", tokio::spawn(client(requester.url(&format!("/events/{tag}-{how}-{i}")), keep))));
    }
    let mut writers = Vec::new();
    for _ in 0..STREAMS {
        let call = tokio::time::timeout(Duration::from_secs(60), calls.recv()).await.expect("every stream reached the app").unwrap();
        writers.push(tokio::spawn(write_tokens(call)));
    }
    for (keep, kind, c) in clients {
        let read = tokio::time::timeout(Duration::from_secs(120), c).await.expect("client done in time").unwrap();
        if let Some((bytes, end)) = read {
            assert!(keep);
            assert_eq!(end, Ok(()), "a kept {kind} stream ends cleanly");
            let text = String::from_utf8_lossy(&bytes);
            let want = if kind == "sse" { format!("data: {}\n\n", TOKENS - 1) } else { format!("data: t{}\n", TOKENS - 1) };
            assert!(text.contains(&want), "a kept {kind} stream is complete: {text}");
        }
    }
    writers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_streams_with_half_the_clients_vanishing_leave_nothing_behind() {
    let nats = NatsServer::start();
    let js = jetstream::new(nats.client().await);
    js.create_stream(jetstream::stream::Config { name: "TOKENS".into(), subjects: vec!["tok.>".into()], ..Default::default() })
        .await
        .unwrap();
    let (app_url, mut calls) = streaming_app().await;
    let responder = SidecarProcess::start(&responder_toml(), &nats.url(), Some(&app_url));
    let requester = SidecarProcess::start(&requester_toml(), &nats.url(), None);
    responder.wait_ready().await;
    requester.wait_ready().await;
    let pids = [("requester", requester.child.id(), requester.admin), ("responder", responder.child.id(), responder.admin)];

    // A small warm-up, so the baseline includes what any first stream sets up once
    // (thread-local buffers, the reply multiplexer, JetStream contexts).
    let warm = round_small(&requester, &js, &mut calls).await;
    for w in warm {
        assert!(w.await.unwrap());
    }
    let baseline: Vec<u64> = pids.iter().map(|(_, pid, _)| rss_kb(*pid)).collect();

    let started = Instant::now();
    let writers = round(&requester, &js, &mut calls, "r").await;
    let peak: Vec<u64> = pids.iter().map(|(_, pid, _)| rss_kb(*pid)).collect();
    // Every abandoned call's connection closed (a kept one ended after its tokens).
    for w in writers {
        assert!(
            tokio::time::timeout(Duration::from_secs(60), w).await.expect("the app's writer ended").unwrap(),
            "an abandoned call's connection stayed open"
        );
    }
    eventually("no consumer left on TOKENS", Duration::from_secs(30), || async { (consumers(&js).await == 0).then_some(()) }).await;
    for (name, _, admin) in pids {
        eventually(&format!("no pending replies on the {name}"), Duration::from_secs(30), || async move {
            (gauge(admin, "natsbridge_pending_replies").await == Some(0.0)).then_some(())
        })
        .await;
    }
    for (i, (name, pid, _)) in pids.iter().enumerate() {
        let after = eventually(&format!("the {name}'s RSS back near its baseline"), Duration::from_secs(30), || async {
            let now = rss_kb(*pid);
            (now <= baseline[i] + RSS_SLACK_KB).then_some(now)
        })
        .await;
        eprintln!("{name}: RSS {} kB before, {} kB at the end of the streams, {after} kB after", baseline[i], peak[i]);
    }
    eprintln!("200 streams, 100 clients vanishing: settled {:?} after the start", started.elapsed());
    assert!(!responder.log().contains(" ERROR ") && !requester.log().contains(" ERROR "), "{}\n{}", responder.log(), requester.log());
}

/// Four streams of each kind, half of them abandoned.
async fn round_small(
    requester: &SidecarProcess,
    js: &jetstream::Context,
    calls: &mut tokio::sync::mpsc::UnboundedReceiver<AppCall>,
) -> Vec<tokio::task::JoinHandle<bool>> {
    let mut writers = Vec::new();
    for i in 0..4 {
        let keep = i % 2 == 0;
        let how = if keep { "keep" } else { "drop" };
        let subject = format!("tok.w-{how}-{i}");
        js.publish(subject.clone(), "t".into()).await.unwrap().await.unwrap();
        if keep {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Bridge-Stream", "end");
            js.publish_with_headers(subject, h, Bytes::new()).await.unwrap().await.unwrap();
        }
        let sse = tokio::spawn(client(requester.url(&format!("/tokens/sse-w-{how}-{i}")), keep));
        let sub = tokio::spawn(client(requester.url(&format!("/events/w-{how}-{i}")), keep));
        let call = tokio::time::timeout(Duration::from_secs(30), calls.recv()).await.unwrap().unwrap();
        writers.push(tokio::spawn(write_tokens(call)));
        sse.await.unwrap();
        sub.await.unwrap();
    }
    eventually("the warm-up's consumers gone", Duration::from_secs(30), || async { (consumers(js).await == 0).then_some(()) }).await;
    writers
}
