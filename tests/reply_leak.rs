//! Requests that never get a reply must not grow the sidecar (issue 17): through the real
//! binary, requests to a subscriber that never answers and JetStream publishes whose ack
//! never comes, each timing out at 20 ms, 200 at a time. Afterwards nothing is pending and
//! the process's RSS is within 5 MB of where it was after the first 10,000.
//!
//! `NATSBRIDGE_LEAK_REQUESTS` overrides the count (150,000 by default, as in the issue).

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use support::fixtures::routes_toml;
use support::{eventually, get, subscribe_synced, NatsServer, SidecarProcess};

const WARMUP: usize = 10_000;
const CONCURRENCY: usize = 200;
const MAX_GROWTH_KB: u64 = 5 * 1024;

fn total_requests() -> usize {
    std::env::var("NATSBRIDGE_LEAK_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(150_000).max(2 * WARMUP)
}

const ROUTES: &str = r#"[[outbound]]
name = "silent"
method = "POST"
path = "/silent"
subject = "silent.op"
mode = "request"
timeout = "20ms"

[[outbound]]
name = "silent-js"
method = "POST"
path = "/silent-js"
subject = "silentjs.op"
mode = "jetstream"
timeout = "20ms"
"#;

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS in /proc/<pid>/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `count` POSTs to `url` from `CONCURRENCY` workers on kept-alive connections; every
/// answer must be `status`.
async fn load(url: &str, count: usize, status: u16) {
    let client = support::client();
    let per_worker = count.div_ceil(CONCURRENCY);
    let workers = (0..CONCURRENCY).map(|w| {
        let (client, url) = (client.clone(), url.to_owned());
        tokio::spawn(async move {
            for _ in 0..per_worker.min(count.saturating_sub(w * per_worker)) {
                let req = http::Request::post(&url).body(Full::new(Bytes::from_static(b"{}"))).unwrap();
                let res = client.request(req).await.expect("the sidecar answers");
                let got = res.status().as_u16();
                let body = res.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                assert_eq!(got, status, "{}", String::from_utf8_lossy(&body));
            }
        })
    });
    for w in futures::future::join_all(workers).await {
        w.unwrap();
    }
}

async fn pending_replies(sidecar: &SidecarProcess) -> Option<u64> {
    let text = String::from_utf8(get(&format!("http://{}/metrics", sidecar.admin)).await.ok()?.body.to_vec()).ok()?;
    text.lines().find_map(|l| l.strip_prefix("natsbridge_pending_replies ")).and_then(|v| v.parse().ok())
}

/// Runs the whole load against `path`, whose target swallows every message on `subject`.
async fn no_growth(path: &str, subject: &str, status: u16) {
    let nats = NatsServer::start();
    let silent = nats.client().await;
    let mut swallowed = subscribe_synced(&silent, subject).await;
    // Read and drop them, so the test's own client is never the slow one.
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while swallowed.next().await.is_some() {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let sidecar = SidecarProcess::start(&routes_toml("leak", "1s", ROUTES), &nats.url(), None);
    sidecar.wait_nats().await;
    let pid = sidecar.child.id();
    let url = sidecar.url(path);
    let total = total_requests();

    load(&url, WARMUP, status).await;
    let after_warmup = rss_kb(pid);
    load(&url, total - WARMUP, status).await;
    let after_all = rss_kb(pid);

    let pending =
        eventually("the pending gauge at 0", Duration::from_secs(10), || async { pending_replies(&sidecar).await.filter(|n| *n == 0) })
            .await;
    assert_eq!(pending, 0);
    eprintln!("{path}: {total} requests; RSS {after_warmup} kB after {WARMUP}, {after_all} kB after all");
    assert!(
        after_all <= after_warmup + MAX_GROWTH_KB,
        "RSS grew from {after_warmup} kB to {after_all} kB over {} timed-out requests",
        total - WARMUP
    );
    // The requests did go out: the silent subscriber saw every one.
    eventually("every request seen by the silent subscriber", Duration::from_secs(10), || async {
        (seen.load(Ordering::Relaxed) >= total).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_time_out_do_not_grow_the_sidecar() {
    no_growth("/silent", "silent.op", 504).await;
}

/// A core subscriber and no stream on the subject: the JetStream ack never comes
/// (nats-server #8038), so every publish times out; that is answered 504, "outcome
/// unknown" (a stream could have stored it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_whose_ack_never_comes_do_not_grow_the_sidecar() {
    no_growth("/silent-js", "silentjs.op", 504).await;
}
