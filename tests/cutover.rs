//! Cut-over routes end to end (issue 13 §2): a real nats-server, a real NATS responder, a
//! real HTTP upstream, the sidecar in between. The split, its stickiness, shadows,
//! fallbacks, and a reload changing the share under load.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use support::*;

fn routes(upstream: &str, sections: &str) -> String {
    format!(
        r#"[sidecar]
service = "orchestration"
drain_timeout = "5s"

[defaults]
timeout = "2s"

{}
"#,
        sections.replace("UPSTREAM", upstream)
    )
}

/// Answers every request on `subject` with `f(message)` after `delay`, each in its own
/// task; counts what it received and how many were marked `Bridge-Shadow: true`.
struct Responder {
    seen: Arc<AtomicUsize>,
    shadows: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

async fn responder(nats: &NatsServer, subject: &str, delay: Duration, f: fn(&async_nats::Message) -> Option<Bytes>) -> Responder {
    let client = nats.client().await;
    let mut sub = subscribe_synced(&client, subject).await;
    let (seen, shadows) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (s, sh) = (seen.clone(), shadows.clone());
    let task = tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            s.fetch_add(1, Ordering::SeqCst);
            if msg.headers.as_ref().and_then(|h| h.get("Bridge-Shadow")).is_some_and(|v| v.as_str() == "true") {
                sh.fetch_add(1, Ordering::SeqCst);
            }
            let client = client.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let (Some(reply), Some(body)) = (msg.reply.clone(), f(&msg)) {
                    let _ = client.publish(reply, body).await;
                }
            });
        }
    });
    Responder { seen, shadows, _task: task }
}

fn answer_nats(_: &async_nats::Message) -> Option<Bytes> {
    Some(Bytes::from_static(b"nats"))
}

/// The value of one series in the Prometheus text, 0 when absent.
fn series(metrics: &str, name_and_labels: &str) -> u64 {
    metrics.lines().find_map(|l| l.strip_prefix(name_and_labels).and_then(|v| v.trim().parse::<f64>().ok())).map(|v| v as u64).unwrap_or(0)
}

/// Sends `n` calls, `concurrency` at a time, and returns their (status, Bridge-Path, body).
async fn load(url: &str, n: usize, concurrency: usize, headers: impl Fn(usize) -> Vec<(String, String)>) -> Vec<(u16, String, String)> {
    let calls = (0..n).map(|i| {
        let hs = headers(i);
        let url = url.to_owned();
        async move {
            let hs: Vec<(&str, &str)> = hs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let r = call("POST", &url, &hs, "{}").await;
            (r.status, r.header("bridge-path").unwrap_or("").to_owned(), r.text())
        }
    });
    futures::stream::iter(calls).buffered(concurrency).collect().await
}

const SPLIT: &str = r#"
[[outbound]]
name = "exec"
path = "/agents/{agent_id}/execute"
subject = "agent.{agent_id}.execute"
mode = "request"
upstream = "UPSTREAM"
cutover = { nats_percent = 30 }

[[outbound]]
name = "exec-sticky"
path = "/sticky/{agent_id}"
subject = "agent.{agent_id}.execute"
mode = "request"
upstream = "UPSTREAM"
cutover = { nats_percent = 30, sticky = "header:X-Workflow-Id" }
"#;

#[tokio::test]
async fn the_split_keeps_its_share_and_sticks_by_key() {
    let nats = NatsServer::start();
    let _r = responder(&nats, "agent.*.execute", Duration::ZERO, answer_nats).await;
    let (app, sc) = app_and_sidecar(&nats, |_| respond(200, "http"), |app| routes(app, SPLIT)).await;

    // 3 000 calls at 30 %: 900 expected, sigma about 25; 5 sigma either side.
    let n = 3000;
    let out = load(&sc.url("/agents/7/execute"), n, 16, |_| Vec::new()).await;
    assert!(out.iter().all(|(s, p, b)| *s == 200 && p == b), "every answer names the path that gave it");
    let over_nats = out.iter().filter(|(_, p, _)| p == "nats").count();
    assert!((775..=1025).contains(&over_nats), "{over_nats} of {n} over NATS at 30%");
    let m = sc.metrics().await;
    let label = |path: &str| format!(r#"natsbridge_egress_requests_total{{mode="request",path="{path}",route="exec",status_class="2xx"}}"#);
    assert_eq!(series(&m, &label("nats")), over_nats as u64, "{m}");
    assert_eq!(series(&m, &label("http")), (n - over_nats) as u64, "{m}");
    assert_eq!(app.hits().len(), n - over_nats);

    // Sticky: 400 workflows, 5 calls each; every workflow stays on one path, and the
    // workflows split at the share (120 expected, sigma about 9).
    let out = load(&sc.url("/sticky/7"), 2000, 16, |i| vec![("X-Workflow-Id".into(), format!("wf-{}", i % 400))]).await;
    let mut path_of = std::collections::HashMap::new();
    for (i, (status, path, _)) in out.iter().enumerate() {
        assert_eq!(*status, 200);
        let first = path_of.entry(i % 400).or_insert_with(|| path.clone());
        assert_eq!(first, path, "workflow wf-{} changed path", i % 400);
    }
    let nats_workflows = path_of.values().filter(|p| *p == "nats").count();
    assert!((75..=165).contains(&nats_workflows), "{nats_workflows} of 400 workflows over NATS at 30%");
}

const SHADOW: &str = r#"
[[outbound]]
name = "plain"
path = "/plain/{id}"
subject = "items.{id}"
mode = "request"
upstream = "UPSTREAM"
cutover = { nats_percent = 0 }

[[outbound]]
name = "items"
path = "/items/{id}"
subject = "items.{id}"
mode = "request"
upstream = "UPSTREAM"
cutover = { nats_percent = 0, shadow = true }
"#;

/// The NATS side's answers: the same JSON with its keys in another order for `same`,
/// another value for `diff`.
fn answer_items(m: &async_nats::Message) -> Option<Bytes> {
    Some(match m.subject.as_str() {
        "items.same" => Bytes::from_static(br#"{ "b": [1, 2], "a": "x" }"#),
        _ => Bytes::from_static(br#"{"a":"y","b":[1,2]}"#),
    })
}

/// Median answer time of `n` sequential calls.
async fn median_latency(url: &str, method: &str, n: usize) -> Duration {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let r = call(method, url, &[], "").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("bridge-path"), Some("http"));
        assert_eq!(r.text(), r#"{"a":"x","b":[1,2]}"#, "the HTTP answer is the answer");
        times.push(started.elapsed());
    }
    times.sort();
    times[n / 2]
}

#[tokio::test]
async fn shadows_are_compared_and_counted_without_delaying_the_answer() {
    let nats = NatsServer::start();
    // The shadow's handler is slow: a shadow that held the answer back would show it.
    let slow = Duration::from_millis(400);
    let r = responder(&nats, "items.*", slow, answer_items).await;
    let (_app, sc) = app_and_sidecar(
        &nats,
        |_| with_headers(200, &[("content-type", "application/json")], r#"{"a":"x","b":[1,2]}"#),
        |app| routes(app, SHADOW),
    )
    .await;

    // Same-run baseline: the same upstream through a route without shadows.
    let baseline = median_latency(&sc.url("/plain/same"), "GET", 15).await;
    assert_eq!(r.seen.load(Ordering::SeqCst), 0, "a route at 0% without shadow never touches NATS");
    let same = median_latency(&sc.url("/items/same"), "GET", 15).await;
    let diff = median_latency(&sc.url("/items/diff"), "GET", 5).await;
    eprintln!(
        "answer latency medians: baseline {baseline:?}, shadowed (match) {same:?}, shadowed (mismatch) {diff:?}; shadow handler {slow:?}"
    );
    assert!(same < baseline + Duration::from_millis(150), "shadowed median {same:?} vs baseline {baseline:?}");
    assert!(diff < baseline + Duration::from_millis(150), "shadowed median {diff:?} vs baseline {baseline:?}");

    let m = eventually("shadows counted", Duration::from_secs(10), || async {
        let m = sc.metrics().await;
        let done = series(&m, r#"natsbridge_shadow_total{result="match",route="items"}"#) == 15
            && series(&m, r#"natsbridge_shadow_total{result="body_mismatch",route="items"}"#) == 5;
        done.then_some(m)
    })
    .await;
    assert_eq!(r.shadows.load(Ordering::SeqCst), 20, "every shadow is marked Bridge-Shadow: true");
    assert!(!m.contains(r#"natsbridge_shadow_total{result="match",route="plain"}"#), "{m}");

    // POST is neither safe nor idempotent: not shadowed without shadow_unsafe.
    let res = call("POST", &sc.url("/items/same"), &[], "{}").await;
    assert_eq!(res.header("bridge-path"), Some("http"));
    tokio::time::sleep(slow * 2).await; // a shadow sent now would have been counted by then
    assert_eq!(r.seen.load(Ordering::SeqCst), 20, "a POST was shadowed");

    // The last mismatches, both bodies shown.
    let status = sc.statusz().await;
    let kept = status["shadow_mismatches"].as_array().expect("shadow_mismatches");
    assert_eq!(kept.len(), 5, "{status:#}");
    assert_eq!(kept[0]["route"], "items");
    assert_eq!(kept[0]["result"], "body_mismatch");
    assert_eq!(kept[0]["http_body"], r#"{"a":"x","b":[1,2]}"#);
    assert_eq!(kept[0]["nats_body"], r#"{"a":"y","b":[1,2]}"#);
}

const FALLBACK: &str = r#"
[[outbound]]
name = "no-responders"
path = "/nobody"
subject = "nobody.home"
mode = "request"
upstream = "UPSTREAM"
cutover = { nats_percent = 100, fallback = true }

[[outbound]]
name = "no-fallback"
path = "/strict"
subject = "nobody.home"
mode = "request"
upstream = "UPSTREAM"
cutover = { nats_percent = 100 }

[[outbound]]
name = "no-stream"
path = "/events"
subject = "unstored.events"
mode = "jetstream"
upstream = "UPSTREAM"
cutover = { nats_percent = 100, fallback = true }

[[outbound]]
name = "silent"
path = "/silent"
subject = "silent.op"
mode = "request"
timeout = "300ms"
upstream = "UPSTREAM"
cutover = { nats_percent = 100, fallback = true }

[[outbound]]
name = "answered"
path = "/answered"
subject = "answered.op"
mode = "request"
upstream = "UPSTREAM"
cutover = { nats_percent = 100, fallback = true }
"#;

fn never(_: &async_nats::Message) -> Option<Bytes> {
    None
}

#[tokio::test]
async fn fallback_only_before_delivery() {
    let mut nats = NatsServer::start();
    let _silent = responder(&nats, "silent.op", Duration::ZERO, never).await;
    let _answered = responder(&nats, "answered.op", Duration::ZERO, answer_nats).await;
    let (app, sc) = app_and_sidecar(&nats, |seen| respond(200, &format!("http {}", seen.uri)), |app| routes(app, FALLBACK)).await;
    let fallbacks =
        |m: &str, route: &str, reason: &str| series(m, &format!(r#"natsbridge_fallback_total{{reason="{reason}",route="{route}"}}"#));

    // Delivered and answered: no fallback.
    let r = post(&sc.url("/answered"), "").await;
    assert_eq!((r.status, r.header("bridge-path"), r.text().as_str()), (200, Some("nats"), "nats"));

    // No responders: upstream, once.
    let r = post(&sc.url("/nobody?q=1"), "").await;
    assert_eq!((r.status, r.header("bridge-path"), r.text().as_str()), (200, Some("http"), "http /nobody?q=1"));
    // Without `fallback` the failure stands.
    let r = post(&sc.url("/strict"), "").await;
    assert_eq!((r.status, r.header("bridge-path")), (503, Some("nats")), "{}", r.text());

    // No stream: upstream.
    let r = post(&sc.url("/events"), "").await;
    assert_eq!((r.status, r.header("bridge-path"), r.text().as_str()), (200, Some("http"), "http /events"));

    // Delivered, then no answer in time: 504, never the upstream (it could double the effect).
    let hits = app.hits().len();
    let r = post(&sc.url("/silent"), "").await;
    assert_eq!((r.status, r.header("bridge-path")), (504, Some("nats")), "{}", r.text());
    assert_eq!(app.hits().len(), hits, "a timed-out call went to the upstream too");

    let m = sc.metrics().await;
    assert_eq!(fallbacks(&m, "no-responders", "no_responders"), 1, "{m}");
    assert_eq!(fallbacks(&m, "no-stream", "no_stream"), 1, "{m}");
    assert_eq!(fallbacks_total(&m, "silent"), 0, "{m}");
    assert_eq!(fallbacks_total(&m, "answered"), 0, "{m}");

    // NATS gone: upstream, reason disconnected.
    nats.kill();
    let r = eventually("fallback while disconnected", Duration::from_secs(10), || async {
        let r = post(&sc.url("/answered"), "").await;
        (r.header("bridge-path") == Some("http")).then_some(r)
    })
    .await;
    assert_eq!((r.status, r.text().as_str()), (200, "http /answered"));
    let m = sc.metrics().await;
    assert!(fallbacks(&m, "answered", "disconnected") >= 1, "{m}");
    assert_eq!(app.hits().len(), hits + fallbacks(&m, "answered", "disconnected") as usize);
}

/// Every fallback of `route`, whatever the reason.
fn fallbacks_total(m: &str, route: &str) -> u64 {
    m.lines()
        .filter(|l| l.starts_with("natsbridge_fallback_total{") && l.contains(&format!(r#"route="{route}""#)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn reload_routes(upstream: &str, percent: u8) -> String {
    routes(
        upstream,
        &format!(
            r#"
[[outbound]]
name = "exec"
path = "/agents/{{agent_id}}/execute"
subject = "agent.{{agent_id}}.execute"
mode = "request"
upstream = "UPSTREAM"
cutover = {{ nats_percent = {percent} }}
"#
        ),
    )
}

#[tokio::test]
async fn a_reload_changes_the_share_under_load_without_an_error() {
    let nats = NatsServer::start();
    let _r = responder(&nats, "agent.*.execute", Duration::ZERO, answer_nats).await;
    let (app, sc) = app_and_sidecar(&nats, |_| respond(200, "http"), |app| reload_routes(app, 0)).await;
    let url = sc.url("/agents/7/execute");

    // Load throughout: four callers until told to stop, every answer recorded.
    let stop = tokio_util::sync::CancellationToken::new();
    let answers = Arc::new(std::sync::Mutex::new(Vec::new()));
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, answers, url) = (stop.clone(), answers.clone(), url.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let r = call("POST", &url, &[], "{}").await;
                    answers.lock().unwrap().push((r.status, r.header("bridge-path").unwrap_or("").to_owned()));
                }
            })
        })
        .collect();
    let path_now = |want: &'static str| {
        let url = url.clone();
        async move {
            let out = load(&url, 20, 4, |_| Vec::new()).await;
            out.iter().all(|(_, p, _)| p == want).then_some(())
        }
    };
    eventually("load running", Duration::from_secs(5), || async { (answers.lock().unwrap().len() > 20).then_some(()) }).await;
    for (percent, want) in [(100, "nats"), (0, "http"), (100, "nats")] {
        std::fs::write(&sc.config_path, reload_routes(&app.url(), percent)).unwrap();
        sc.reload.send(()).await.unwrap();
        eventually(&format!("{percent}% over NATS"), Duration::from_secs(10), || path_now(want)).await;
    }
    stop.cancel();
    for c in callers {
        c.await.unwrap();
    }
    let answers = answers.lock().unwrap().clone();
    assert!(answers.iter().all(|(s, _)| *s == 200), "an error under reload: {:?}", answers.iter().find(|(s, _)| *s != 200));
    assert!(answers.iter().any(|(_, p)| p == "nats") && answers.iter().any(|(_, p)| p == "http"));
    assert!(sc.metrics().await.contains("natsbridge_config_reload_failures_total 0"));
}

const TUNNEL_SHADOW: &str = r#"
[[outbound]]
name = "model"
host = "model-service"
path = "/{*rest}"
mode = "tunnel"
service = "model"
upstream = "UPSTREAM"
cutover = { nats_percent = 0, shadow = true }
"#;

/// A tunnel's shadow carries the whole request (method, path, query) and the mark.
fn answer_tunnel(m: &async_nats::Message) -> Option<Bytes> {
    let h = m.headers.as_ref()?;
    let (path, query, mark) = (h.get("Bridge-Path")?, h.get("Bridge-Query")?, h.get("Bridge-Shadow")?);
    Some(Bytes::from(format!("{} {}?{} {}", h.get("Bridge-Method")?, path, query, mark)))
}

#[tokio::test]
async fn tunnel_shadows_carry_the_whole_request_and_the_mark() {
    let nats = NatsServer::start();
    let r = responder(&nats, "natsbridge.tunnel.model", Duration::ZERO, answer_tunnel).await;
    let (_app, sc) = app_and_sidecar(&nats, |seen| respond(200, &format!("GET {} true", seen.uri)), |app| routes(app, TUNNEL_SHADOW)).await;
    let res = call("GET", &sc.url("/v1/models?x=1"), &[("host", "model-service")], "").await;
    assert_eq!((res.status, res.header("bridge-path")), (200, Some("http")));
    eventually("tunnel shadow matched", Duration::from_secs(10), || async {
        (series(&sc.metrics().await, r#"natsbridge_shadow_total{result="match",route="model"}"#) == 1).then_some(())
    })
    .await;
    assert_eq!(r.shadows.load(Ordering::SeqCst), 1);
}

const SLOW_SHADOW: &str = r#"
[[outbound]]
name = "slow"
path = "/slow/{id}"
subject = "slow.{id}"
mode = "request"
timeout = "10s"
upstream = "UPSTREAM"
cutover = { nats_percent = 0, shadow = true }
"#;

#[tokio::test]
async fn shadows_past_the_concurrency_bound_are_skipped_not_queued() {
    let nats = NatsServer::start();
    // Each shadow holds its place for 3 s: every call below starts while the first ones wait.
    let _r = responder(&nats, "slow.*", Duration::from_secs(3), answer_nats).await;
    let (_app, sc) = app_and_sidecar(&nats, |_| respond(200, "nats"), |app| routes(app, SLOW_SHADOW)).await;
    let n = natsbridge::egress::cutover::SHADOW_CONCURRENCY + 16;
    let url = sc.url("/slow/1");
    let started = Instant::now();
    let out = futures::future::join_all((0..n).map(|_| call("GET", &url, &[], ""))).await;
    assert!(out.iter().all(|r| r.status == 200 && r.header("bridge-path") == Some("http")));
    assert!(started.elapsed() < Duration::from_secs(3), "answers waited for their shadows: {:?}", started.elapsed());
    let m = eventually("every shadow counted", Duration::from_secs(20), || async {
        let m = sc.metrics().await;
        let (matched, skipped) = (
            series(&m, r#"natsbridge_shadow_total{result="match",route="slow"}"#),
            series(&m, r#"natsbridge_shadow_total{result="skipped",route="slow"}"#),
        );
        (matched + skipped == n as u64).then_some((matched, skipped))
    })
    .await;
    assert_eq!(m, (natsbridge::egress::cutover::SHADOW_CONCURRENCY as u64, 16), "(matched, skipped)");
}

/// A `publish` cut-over with `fallback`: once the client took the message, a flush that
/// never completes is `504 outcome-unknown` even when the connection is gone by then.
/// It answered 503 "disconnected" and fell back to the upstream, yet async-nats keeps
/// what it was not able to write and sends it after reconnecting: sent twice.
///
/// The server is frozen and its socket filled (large requests the client has handed on,
/// counted by `/debug/own-time`), so the events' flushes stay pending; then it is killed,
/// and the client is disconnected when their timeout comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_the_client_took_never_falls_back() {
    const FILLERS: usize = 48;
    const EVENTS: usize = 4;
    let mut nats = NatsServer::start();
    let sections = r#"
[[outbound]]
name = "fill"
path = "/fill"
subject = "fill.x"
mode = "request"
timeout = "8s"
max_body = "1MiB"

[[outbound]]
name = "events"
path = "/events"
subject = "events.x"
mode = "publish"
timeout = "3s"
upstream = "UPSTREAM"
cutover = { nats_percent = 100, fallback = true }
"#;
    let (app, sc) = app_and_sidecar(&nats, |_| respond(200, "http"), |app| routes(app, sections)).await;
    let r = post(&sc.url("/events"), "{}").await;
    assert_eq!((r.status, r.header("bridge-path")), (202, Some("nats")), "{}", r.text());
    let own = |admin| async move { get(&format!("http://{admin}/debug/own-time")).await.unwrap().json() };
    own(sc.admin).await; // starts recording

    nats.pause();
    let big = Bytes::from(vec![b'x'; 512 << 10]);
    let fillers: Vec<_> = (0..FILLERS)
        .map(|_| {
            let (url, big) = (sc.url("/fill"), big.clone());
            tokio::spawn(async move { call("POST", &url, &[], big).await.status })
        })
        .collect();
    let admin = sc.admin;
    eventually("every filler handed to the client", Duration::from_secs(10), || async move {
        (own(admin).await["egress_to_nats"]["count"] == FILLERS).then_some(())
    })
    .await;
    let events: Vec<_> = (0..EVENTS)
        .map(|_| {
            let url = sc.url("/events");
            tokio::spawn(async move { call("POST", &url, &[], "{}").await })
        })
        .collect();
    // Every event in the sidecar or already answered (a loaded machine may get to its
    // timeout first); the fillers stay in flight, their timeout is longer than all this.
    eventually("every event in the sidecar or answered", Duration::from_secs(10), || async {
        let answered = events.iter().filter(|e| e.is_finished()).count();
        let in_flight = series(&sc.metrics().await, "natsbridge_egress_requests_in_flight") as usize;
        (in_flight + answered == FILLERS + EVENTS).then_some(())
    })
    .await;
    nats.kill();

    let mut unknown = 0;
    for e in events {
        let r = e.await.unwrap();
        if r.status == 202 {
            continue; // written to the socket before it filled
        }
        assert_eq!((r.status, r.header("bridge-path")), (504, Some("nats")), "{}", r.text());
        assert_eq!(r.json()["type"], "urn:natsbridge:problem:outcome-unknown");
        unknown += 1;
    }
    assert!(unknown > 0, "no event's flush was left pending; the test did not exercise the case");
    assert!(app.hits().is_empty(), "the upstream got a message NATS may still deliver: {:?}", app.requests());
    assert_eq!(fallbacks_total(&sc.metrics().await, "events"), 0);
    for f in fillers {
        assert_eq!(f.await.unwrap(), 504);
    }
}

/// A fallback sends the app's own request: `carry` had rewritten its headers for NATS (a
/// contract's `Bridge-Schema`; the CloudEvents codec's `ce-*`, `Content-Type` and
/// `Idempotency-Key`) and the upstream got those instead of what the app sent.
#[tokio::test]
async fn a_fallback_sends_the_apps_own_headers() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("v1.json");
    std::fs::write(&schema, r#"{"type":"object"}"#).unwrap();
    let sections = format!(
        "[[outbound]]\nname = \"ev\"\npath = \"/ev\"\nsubject = \"nobody.ev\"\nmode = \"request\"\ncodec = \"cloudevents\"\n\
         schema = {:?}\nupstream = \"UPSTREAM\"\ncutover = {{ nats_percent = 100, fallback = true }}\n",
        schema.display().to_string()
    );
    let (app, sc) = app_and_sidecar(&nats, |_| respond(200, "http"), |app| routes(app, &sections)).await;

    let sent = [("content-type", "application/json; charset=utf-8"), ("x-app", "mine")];
    let r = call("POST", &sc.url("/ev"), &sent, r#"{"a":1}"#).await;
    assert_eq!((r.status, r.header("bridge-path")), (200, Some("http")), "{}", r.text());
    let hit = app.hits().pop().expect("the upstream was called once");
    assert_eq!(hit.header("content-type"), Some("application/json; charset=utf-8"));
    assert_eq!(hit.header("x-app"), Some("mine"));
    assert_eq!(hit.header("bridge-schema"), None);
    assert_eq!(hit.header("idempotency-key"), None);
    assert!(!hit.seen.headers.keys().any(|n| n.as_str().starts_with("ce-")), "{:?}", hit.seen.headers);
    assert_eq!(&hit.seen.body[..], br#"{"a":1}"#);
}
