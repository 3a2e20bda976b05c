//! Ingress end to end: a real nats-server, a real HTTP app whose answers each test
//! scripts, and sidecars in-process or as processes of the real binary.

mod support;

use std::time::Duration;

use async_nats::jetstream::{self, message::StreamMessage};
use bytes::Bytes;

use support::fixtures::*;
use support::*;

/// An address nothing listens on.
fn closed_port_url() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

fn toml(inbound: &str) -> String {
    routes_toml("svc", "3s", inbound)
}

/// A JetStream route on stream TOOL: `tool.exec.<tool>` → POST /tools/<tool>.
fn js_route(extra: &str) -> String {
    toml(&tool_exec_route(extra))
}

/// The work stream and the dead-letter stream, created directly (provisioning is not
/// under test here).
async fn streams(nats: &NatsServer) -> jetstream::Context {
    let js = jetstream::new(nats.client().await);
    js.create_stream(jetstream::stream::Config { name: "TOOL".into(), subjects: vec!["tool.>".into()], ..Default::default() })
        .await
        .unwrap();
    dlq_stream(&js).await;
    js
}

async fn publish(js: &jetstream::Context, subject: &str, headers: &[(&str, &str)], body: &'static str) -> u64 {
    js_publish(js, subject, headers, body).await.sequence
}

async fn dead_letter(js: &jetstream::Context, seq: u64) -> StreamMessage {
    let dlq = js.get_stream("DLQ").await.unwrap();
    eventually("a dead letter", Duration::from_secs(20), || {
        let dlq = dlq.clone();
        async move { dlq.get_raw_message(seq).await.ok() }
    })
    .await
}

async fn consumer_info(js: &jetstream::Context) -> jetstream::consumer::Info {
    js.get_stream("TOOL").await.unwrap().consumer_info("tool").await.unwrap()
}

fn hdr<'a>(m: &'a StreamMessage, name: &str) -> &'a str {
    m.headers.get(name).map(|v| v.as_str()).unwrap_or_else(|| panic!("dead letter has no {name}: {:?}", m.headers))
}

async fn nats_request(client: &async_nats::Client, subject: &str, headers: &[(&str, &str)], body: &'static str) -> async_nats::Message {
    try_request(client, subject, headers, body).await.unwrap()
}

/// As `nats_request`, but `None` while nobody answers (a route being restarted).
async fn try_request(
    client: &async_nats::Client,
    subject: &str,
    headers: &[(&str, &str)],
    body: &'static str,
) -> Option<async_nats::Message> {
    nats_request_within(client, subject, headers, body, Duration::from_secs(10)).await.ok()
}

// ---------------------------------------------------------------------------------------
// mode = "request"

const REQUEST_ROUTE: &str = r#"[[inbound]]
name = "agent-requests"
subject = "agent.*.execution.requested"
mode = "request"
method = "PUT"
path = "/agents/{2}/execute"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_maps_status_headers_body_and_subject_tokens() {
    let nats = NatsServer::start();
    let app = App::script(|seen, _| async move {
        match seen.uri.as_str() {
            "/agents/404/execute" => with_headers(404, &[("content-type", "text/plain")], "no such agent"),
            _ => with_headers(201, &[("x-app", "yes"), ("content-type", "application/json")], r#"{"ok":true}"#),
        }
    })
    .await;
    let sidecar = Sidecar::start(&toml(REQUEST_ROUTE), &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    let client = nats.client().await;

    let r = nats_request(&client, "agent.42.execution.requested", &[("X-Trace", "t-1"), ("X-Request-Id", "rid-1")], "hello").await;
    assert_eq!(reply_header(&r, "Bridge-Status"), Some("201"));
    assert_eq!(reply_header(&r, "X-App"), Some("yes"));
    assert_eq!(reply_header(&r, "Content-Type"), Some("application/json"));
    assert!(reply_header(&r, "Nats-Service-Error-Code").is_none());
    assert_eq!(&r.payload[..], br#"{"ok":true}"#);
    let hit = &app.hits()[0];
    assert_eq!(hit.seen.method, http::Method::PUT);
    assert_eq!(hit.seen.uri, "/agents/42/execute");
    assert_eq!(hit.header("x-trace"), Some("t-1"));
    assert_eq!(hit.header("x-request-id"), Some("rid-1"));
    assert_eq!(&hit.seen.body[..], b"hello");

    // Errors carry the NATS micro headers too.
    let r = nats_request(&client, "agent.404.execution.requested", &[], "").await;
    assert_eq!(reply_header(&r, "Bridge-Status"), Some("404"));
    assert_eq!(reply_header(&r, "Nats-Service-Error-Code"), Some("404"));
    assert_eq!(reply_header(&r, "Nats-Service-Error"), Some("Not Found"));
    assert_eq!(&r.payload[..], b"no such agent");

    // No reply subject: delivered all the same, the response dropped.
    client.publish("agent.7.execution.requested", Bytes::from_static(b"fire")).await.unwrap();
    let hits = app.wait_hits(3).await;
    assert_eq!(hits[2].seen.uri, "/agents/7/execute");

    // The app gone: 502 with a problem+json body naming the route.
    app.stop();
    let r = eventually("a 502 reply", Duration::from_secs(10), || async {
        let r = try_request(&client, "agent.9.execution.requested", &[("X-Request-Id", "rid-9")], "").await?;
        (reply_header(&r, "Bridge-Status") == Some("502")).then_some(r)
    })
    .await;
    assert_eq!(reply_header(&r, "Nats-Service-Error-Code"), Some("502"));
    assert_eq!(reply_header(&r, "Content-Type"), Some("application/problem+json"));
    let p: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(p["status"], 502);
    assert_eq!(p["route"], "agent-requests");
    assert_eq!(p["instance"], "rid-9");

    let metrics = sidecar.metrics().await;
    assert!(metric(&metrics, r#"natsbridge_ingress_outcomes_total{outcome="reply",route="agent-requests"}"#).unwrap() >= 3.0, "{metrics}");
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_concurrency_bounds_calls_in_flight_and_drops_none() {
    let nats = NatsServer::start();
    let app = App::script(|_, _| async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        respond(200, "ok")
    })
    .await;
    let route = REQUEST_ROUTE.to_owned() + "concurrency = 2\n";
    let sidecar = Sidecar::start(&toml(&route), &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    let client = nats.client().await;
    let replies = futures::future::join_all((0..8).map(|i| {
        let client = client.clone();
        async move { nats_request(&client, &format!("agent.{i}.execution.requested"), &[], "").await }
    }))
    .await;
    assert!(replies.iter().all(|r| reply_header(r, "Bridge-Status") == Some("200")));
    assert_eq!(app.hits().len(), 8);
    assert_eq!(app.max_in_flight(), 2);
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_group_balances_across_two_sidecars() {
    let nats = NatsServer::start();
    let app_a = App::script(|_, _| async { respond(200, "a") }).await;
    let app_b = App::script(|_, _| async { respond(200, "b") }).await;
    let a = Sidecar::start(&toml(REQUEST_ROUTE), &nats.url(), Some(&app_a.url())).await;
    let b = Sidecar::start(&toml(REQUEST_ROUTE), &nats.url(), Some(&app_b.url())).await;
    a.wait_ready().await;
    b.wait_ready().await;
    let client = nats.client().await;
    let mut answers = (0, 0);
    for i in 0..40 {
        let r = nats_request(&client, &format!("agent.{i}.execution.requested"), &[], "").await;
        match &r.payload[..] {
            b"a" => answers.0 += 1,
            b"b" => answers.1 += 1,
            other => panic!("unexpected reply {other:?}"),
        }
    }
    // Each message went to exactly one member of the group, and both members took some.
    assert_eq!(app_a.hits().len() + app_b.hits().len(), 40);
    assert_eq!((app_a.hits().len(), app_b.hits().len()), answers);
    assert!(answers.0 > 0 && answers.1 > 0, "{answers:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_restarts_changed_routes_and_drops_removed_ones() {
    let nats = NatsServer::start();
    let app = App::script(|_, _| async { respond(200, "ok") }).await;
    let sidecar = Sidecar::start(&toml(REQUEST_ROUTE), &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    let client = nats.client().await;
    nats_request(&client, "agent.1.execution.requested", &[], "").await;
    assert_eq!(app.hits()[0].seen.uri, "/agents/1/execute");

    std::fs::write(&sidecar.config_path, toml(&REQUEST_ROUTE.replace("/agents/{2}/execute", "/v2/agents/{2}"))).unwrap();
    sidecar.reload.send(()).await.unwrap();
    eventually("the changed path in use", Duration::from_secs(10), || async {
        let r = try_request(&client, "agent.2.execution.requested", &[], "").await?;
        let last = app.hits().last().map(|h| h.seen.uri.clone());
        (reply_header(&r, "Bridge-Status") == Some("200") && last.as_deref() == Some("/v2/agents/2")).then_some(())
    })
    .await;

    std::fs::write(&sidecar.config_path, toml("")).unwrap();
    sidecar.reload.send(()).await.unwrap();
    eventually("the removed route unsubscribed", Duration::from_secs(10), || async {
        let req = async_nats::client::Request::new().payload(Bytes::new()).timeout(Some(Duration::from_secs(1)));
        let r = client.send_request("agent.3.execution.requested".to_owned(), req).await;
        matches!(r, Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders).then_some(())
    })
    .await;
    sidecar.wait_ready().await;
    sidecar.stop().await;
}

/// A reload that changes a request route but keeps its subject and queue group hands the
/// subscription to the route's new task. Requests sent all through ten reloads are each
/// answered: none meets a moment with no subscriber ("no responders"), and none is dropped
/// by an unsubscribe racing it (its caller would wait out its timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_request_route_answers_every_request_sent_through_the_reloads() {
    let nats = NatsServer::start();
    let app = App::script(|_, _| async { respond(200, "ok") }).await;
    let sidecar = Sidecar::start(&toml(REQUEST_ROUTE), &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut callers = Vec::new();
    for i in 0..2 {
        let (client, stop) = (nats.client().await, stop.clone());
        callers.push(tokio::spawn(async move {
            let mut outcomes: std::collections::BTreeMap<String, usize> = Default::default();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let subject = format!("agent.{i}.execution.requested");
                let outcome = match nats_request_within(&client, &subject, &[], "", Duration::from_secs(3)).await {
                    Ok(r) => format!("status {}", reply_header(&r, "Bridge-Status").unwrap_or("?")),
                    Err(e) => format!("{:?}", e.kind()),
                };
                *outcomes.entry(outcome).or_default() += 1;
            }
            outcomes
        }));
    }
    for n in 0..10 {
        let path = if n % 2 == 0 { "/v2/agents/{2}" } else { "/agents/{2}/execute" };
        std::fs::write(&sidecar.config_path, toml(&REQUEST_ROUTE.replace("/agents/{2}/execute", path))).unwrap();
        sidecar.reload.send(()).await.unwrap();
        let want = if n % 2 == 0 { "/v2/agents/0" } else { "/agents/0/execute" };
        eventually("the reloaded path in use", Duration::from_secs(10), || async {
            app.hits().iter().rev().take(4).any(|h| h.seen.uri == want).then_some(())
        })
        .await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut outcomes: std::collections::BTreeMap<String, usize> = Default::default();
    for c in callers {
        for (k, v) in c.await.unwrap() {
            *outcomes.entry(k).or_default() += v;
        }
    }
    println!("  requests through ten reloads: {outcomes:?}");
    assert!(outcomes.keys().all(|k| k == "status 200"), "every request answered 200: {outcomes:?}");
    // Each reload waited for a request answered on its new path: ten at least.
    assert!(outcomes.get("status 200").copied().unwrap_or(0) >= 10, "{outcomes:?}");
    sidecar.stop().await;
}

// ---------------------------------------------------------------------------------------
// mode = "tunnel", end to end through two sidecar processes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_end_to_end_through_two_sidecar_processes() {
    let nats = NatsServer::start();
    let app_b = App::script(|seen, _| async move {
        let body = format!("{} {} {}", seen.method, seen.uri, String::from_utf8_lossy(&seen.body));
        with_headers(207, &[("x-from-b", "1"), ("content-type", "text/plain")], &body)
    })
    .await;
    let a_toml = MODEL_TUNNEL_CLIENT;
    let b_toml = r#"[sidecar]
service = "model"

[nats]
servers = ["nats://127.0.0.1:1"]

[[inbound]]
name = "model-tunnel-in"
mode = "tunnel"
"#;
    let b = SidecarProcess::start(b_toml, &nats.url(), Some(&app_b.url()));
    let a = SidecarProcess::start(a_toml, &nats.url(), None);
    b.wait_ready().await;
    a.wait_ready().await;

    let r = call(
        "PATCH",
        &a.url("/v1/models/m-1?dry=1&x=a%20b"),
        &[("host", "model-service"), ("x-custom", "c-1"), ("content-type", "application/json")],
        r#"{"n":1}"#,
    )
    .await;
    assert_eq!(r.status, 207, "{}\n{}\n{}", r.text(), a.log(), b.log());
    assert_eq!(r.header("x-from-b"), Some("1"));
    assert_eq!(r.text(), r#"PATCH /v1/models/m-1?dry=1&x=a%20b {"n":1}"#);
    let hit = &app_b.hits()[0];
    assert_eq!(hit.header("x-custom"), Some("c-1"));
    assert_eq!(hit.header("content-type"), Some("application/json"));

    // The app gone: the tunnel answers 502 with a problem body.
    drop(app_b);
    let r = eventually("a 502 through the tunnel", Duration::from_secs(10), || async {
        let r = call("GET", &a.url("/x"), &[("host", "model-service")], "").await;
        (r.status == 502).then_some(r)
    })
    .await;
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
}

// ---------------------------------------------------------------------------------------
// mode = "jetstream"

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_2xx_is_acked_once_with_delivery_headers() {
    let nats = NatsServer::start();
    let js = streams(&nats).await;
    let app = App::script(|_, _| async { respond(200, "done") }).await;
    let sidecar = Sidecar::start(&js_route(""), &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    let seq = publish(&js, "tool.exec.grep", &[("Nats-Msg-Id", "m-1"), ("X-Trace", "t")], "{}").await;
    let info = settled(&js, seq).await;
    assert_eq!(info.num_redelivered, 0);
    let hits = app.hits();
    assert_eq!(hits.len(), 1);
    let h = &hits[0];
    assert_eq!(h.seen.uri, "/tools/grep");
    assert_eq!(h.seen.method, http::Method::POST);
    assert_eq!(h.delivery(), 1);
    assert_eq!(h.header("bridge-stream"), Some("TOOL"));
    assert_eq!(h.header("bridge-seq"), Some(seq.to_string().as_str()));
    assert_eq!(h.header("nats-msg-id"), Some("m-1"));
    assert_eq!(h.header("x-trace"), Some("t"));
    assert_eq!(dlq_count(&js).await, 0);
    let metrics = sidecar.metrics().await;
    assert_eq!(metric(&metrics, r#"natsbridge_ingress_outcomes_total{outcome="ack",route="tool-exec"}"#), Some(1.0), "{metrics}");
    assert_eq!(metric(&metrics, r#"natsbridge_ingress_deliveries_total{route="tool-exec"}"#), Some(1.0));
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_retryable_status_naks_with_backoff_then_dead_letters() {
    let nats = NatsServer::start();
    let js = streams(&nats).await;
    let app = App::script(|_, _| async { with_headers(503, &[("content-type", "text/plain")], "down for maintenance\r\nline two") }).await;
    let sidecar =
        Sidecar::start(&js_route("max_deliver = 3\nbackoff = [\"300ms\", \"700ms\"]\nack_wait = \"5s\""), &nats.url(), Some(&app.url()))
            .await;
    sidecar.wait_ready().await;
    let seq = publish(&js, "tool.exec.sed", &[("Nats-Msg-Id", "m-2"), ("X-Trace", "t2")], "payload-2").await;

    let dl = dead_letter(&js, 1).await;
    settled(&js, seq).await;
    let hits = app.hits();
    assert_eq!(hits.iter().map(Hit::delivery).collect::<Vec<_>>(), [1, 2, 3]);
    let gaps: Vec<Duration> = hits.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert!(gaps[0] >= Duration::from_millis(270) && gaps[0] < Duration::from_millis(1500), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(650) && gaps[1] < Duration::from_millis(2000), "{gaps:?}");

    assert_eq!(&dl.payload[..], b"payload-2");
    assert_eq!(dl.subject.as_str(), "dlq.tool");
    // The dead letter's own id; the original's is kept beside it.
    assert!(hdr(&dl, "Nats-Msg-Id").starts_with(&format!("TOOL.tool.{seq}.")), "{:?}", dl.headers);
    assert_eq!(hdr(&dl, "Bridge-Dlq-Msg-Id"), "m-2");
    assert_eq!(hdr(&dl, "X-Trace"), "t2");
    assert_eq!(hdr(&dl, "Bridge-Dlq-Reason"), "status");
    assert_eq!(hdr(&dl, "Bridge-Dlq-Status"), "503");
    assert_eq!(hdr(&dl, "Bridge-Dlq-Error"), "down for maintenance  line two");
    assert_eq!(hdr(&dl, "Bridge-Dlq-Deliveries"), "3");
    assert_eq!(hdr(&dl, "Bridge-Dlq-Subject"), "tool.exec.sed");
    assert_eq!(hdr(&dl, "Bridge-Dlq-Stream"), "TOOL");
    assert_eq!(hdr(&dl, "Bridge-Dlq-Seq"), seq.to_string());
    assert_eq!(hdr(&dl, "Bridge-Dlq-Route"), "tool-exec");
    let t = humantime::parse_rfc3339(hdr(&dl, "Bridge-Dlq-Time")).unwrap();
    assert!(std::time::SystemTime::now().duration_since(t).unwrap() < Duration::from_secs(60));
    assert_eq!(dlq_count(&js).await, 1);

    let metrics = sidecar.metrics().await;
    assert_eq!(metric(&metrics, r#"natsbridge_dlq_published_total{reason="status",route="tool-exec"}"#), Some(1.0), "{metrics}");
    assert_eq!(metric(&metrics, r#"natsbridge_ingress_outcomes_total{outcome="nak",route="tool-exec"}"#), Some(2.0));
    assert_eq!(metric(&metrics, r#"natsbridge_ingress_outcomes_total{outcome="term",route="tool-exec"}"#), Some(1.0));
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_408_and_429_retry_honouring_retry_after_then_succeed() {
    let nats = NatsServer::start();
    let js = streams(&nats).await;
    let app = App::script(|seen, n| async move {
        if seen.uri == "/tools/slowdown" {
            match n {
                1 => with_headers(429, &[("retry-after", "1")], "slow down"),
                _ => respond(200, "ok"),
            }
        } else {
            match seen.headers.get("bridge-delivery").map(|v| v.to_str().unwrap().to_owned()).as_deref() {
                Some("1") => respond(408, "timeout"),
                _ => respond(204, ""),
            }
        }
    })
    .await;
    let sidecar = Sidecar::start(&js_route("max_deliver = 3\nbackoff = [\"200ms\"]"), &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    let seq = publish(&js, "tool.exec.slowdown", &[], "a").await;
    settled(&js, seq).await;
    let hits = app.hits();
    assert_eq!(hits.iter().map(Hit::delivery).collect::<Vec<_>>(), [1, 2]);
    let gap = hits[1].at - hits[0].at;
    // Retry-After: 1 beats the 200 ms backoff.
    assert!(gap >= Duration::from_millis(950) && gap < Duration::from_millis(3000), "{gap:?}");

    let seq = publish(&js, "tool.exec.other", &[], "b").await;
    settled(&js, seq).await;
    let hits: Vec<Hit> = app.hits().into_iter().filter(|h| h.seen.uri == "/tools/other").collect();
    assert_eq!(hits.iter().map(Hit::delivery).collect::<Vec<_>>(), [1, 2]);
    assert!(hits[1].at - hits[0].at >= Duration::from_millis(180));
    assert_eq!(dlq_count(&js).await, 0);
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_poison_4xx_is_dead_lettered_on_first_delivery() {
    let nats = NatsServer::start();
    let js = streams(&nats).await;
    let app = App::script(|_, _| async { with_headers(422, &[("content-type", "application/json")], r#"{"error":"bad tool"}"#) }).await;
    let sidecar = Sidecar::start(&js_route("max_deliver = 5"), &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    let seq = publish(&js, "tool.exec.rm", &[], "poison").await;
    let dl = dead_letter(&js, 1).await;
    settled(&js, seq).await;
    assert_eq!(app.hits().len(), 1);
    assert_eq!(hdr(&dl, "Bridge-Dlq-Reason"), "poison");
    assert_eq!(hdr(&dl, "Bridge-Dlq-Status"), "422");
    assert_eq!(hdr(&dl, "Bridge-Dlq-Error"), r#"{"error":"bad tool"}"#);
    assert_eq!(hdr(&dl, "Bridge-Dlq-Deliveries"), "1");
    let metrics = sidecar.metrics().await;
    assert_eq!(metric(&metrics, r#"natsbridge_dlq_published_total{reason="poison",route="tool-exec"}"#), Some(1.0), "{metrics}");
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_unreachable_app_and_timeouts_retry_then_dead_letter() {
    let nats = NatsServer::start();
    let js = streams(&nats).await;
    // Nothing listens: connection refused on every delivery.
    let sidecar = Sidecar::start(&js_route("max_deliver = 2\nbackoff = [\"200ms\"]"), &nats.url(), Some(&closed_port_url())).await;
    sidecar.wait_ready().await;
    let seq = publish(&js, "tool.exec.ls", &[], "x").await;
    let dl = dead_letter(&js, 1).await;
    settled(&js, seq).await;
    assert_eq!(hdr(&dl, "Bridge-Dlq-Reason"), "app_unreachable");
    assert_eq!(hdr(&dl, "Bridge-Dlq-Deliveries"), "2");
    assert!(dl.headers.get("Bridge-Dlq-Status").is_none());
    assert!(hdr(&dl, "Bridge-Dlq-Error").contains("unreachable"), "{:?}", dl.headers);
    sidecar.stop().await;

    // An app slower than the route's timeout: a timeout, retried like a refusal.
    let app = App::script(|_, _| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        respond(200, "too late")
    })
    .await;
    let sidecar =
        Sidecar::start(&js_route("max_deliver = 2\nbackoff = [\"200ms\"]\ntimeout = \"300ms\""), &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    let seq = publish(&js, "tool.exec.sleep", &[], "y").await;
    let dl = dead_letter(&js, 2).await;
    settled(&js, seq).await;
    assert_eq!(app.hits().iter().map(Hit::delivery).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(hdr(&dl, "Bridge-Dlq-Reason"), "app_unreachable");
    assert!(hdr(&dl, "Bridge-Dlq-Error").contains("did not answer"), "{:?}", dl.headers);
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_handler_slower_than_ack_wait_is_not_redelivered() {
    let nats = NatsServer::start();
    let js = streams(&nats).await;
    let app = App::script(|_, _| async {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        respond(200, "finally")
    })
    .await;
    // ack_wait 1s, but the call may take 10s: in-progress acks keep the message ours.
    let sidecar = Sidecar::start(&js_route("ack_wait = \"1s\"\ntimeout = \"10s\""), &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    let seq = publish(&js, "tool.exec.build", &[], "slow").await;
    let info = settled(&js, seq).await;
    assert_eq!(app.hits().len(), 1);
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(info.delivered.stream_sequence, seq);
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_dead_letter_publish_failure_naks_instead_of_terming() {
    let nats = NatsServer::start();
    let js = jetstream::new(nats.client().await);
    js.create_stream(jetstream::stream::Config { name: "TOOL".into(), subjects: vec!["tool.>".into()], ..Default::default() })
        .await
        .unwrap();
    // No dead-letter stream yet: the dead letter cannot be stored.
    let app = App::script(|_, _| async { respond(400, "bad") }).await;
    let sidecar = Sidecar::start(&js_route("max_deliver = 10\nbackoff = [\"200ms\"]"), &nats.url(), Some(&app.url())).await;
    let seq = publish(&js, "tool.exec.x", &[], "keep me").await;
    app.wait_hits(2).await;
    let info = consumer_info(&js).await;
    assert!(info.ack_floor.stream_sequence < seq, "termed without a dead letter: {info:?}");
    dlq_stream(&js).await;
    let dl = dead_letter(&js, 1).await;
    settled(&js, seq).await;
    assert_eq!(&dl.payload[..], b"keep me");
    assert_eq!(hdr(&dl, "Bridge-Dlq-Reason"), "poison");
    assert_eq!(dlq_count(&js).await, 1);
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_last_delivery_lost_with_a_killed_sidecar_is_dead_lettered_by_the_next() {
    let nats = NatsServer::start();
    let js = streams(&nats).await;
    // The app hangs: the first sidecar never gets an answer before it dies.
    let app = App::script(|_, _| async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        respond(200, "never")
    })
    .await;
    let route = js_route("max_deliver = 1\nack_wait = \"1s\"\ntimeout = \"60s\"");
    let mut first = SidecarProcess::start(&route, &nats.url(), Some(&app.url()));
    first.wait_ready().await;
    let seq = publish(&js, "tool.exec.crash", &[("X-Trace", "t-crash")], "lost?").await;
    app.wait_hits(1).await;
    // kill -9 mid-call, on the message's last delivery: no outcome from us, ever.
    first.child.kill().unwrap();
    first.child.wait().unwrap();

    // A new sidecar comes up; the server (max_deliver unlimited) delivers the message once
    // more, and the sidecar, seeing it past the route's max_deliver, dead-letters it.
    let second = Sidecar::start(&route, &nats.url(), Some(&app.url())).await;
    let dl = dead_letter(&js, 1).await;
    assert_eq!(app.hits().len(), 1, "the exhausted message must not reach the app again");
    assert_eq!(&dl.payload[..], b"lost?");
    assert_eq!(hdr(&dl, "X-Trace"), "t-crash");
    assert_eq!(hdr(&dl, "Bridge-Dlq-Reason"), "max_deliver");
    assert_eq!(hdr(&dl, "Bridge-Dlq-Deliveries"), "2");
    assert_eq!(hdr(&dl, "Bridge-Dlq-Seq"), seq.to_string());
    assert_eq!(hdr(&dl, "Bridge-Dlq-Subject"), "tool.exec.crash");
    let metrics = second.metrics().await;
    assert_eq!(metric(&metrics, r#"natsbridge_dlq_published_total{reason="max_deliver",route="tool-exec"}"#), Some(1.0));
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_consumer_deleted_under_a_running_sidecar_is_recreated() {
    let nats = NatsServer::start();
    let js = streams(&nats).await;
    let app = App::script(|_, _| async { respond(200, "ok") }).await;
    let sidecar = Sidecar::start(&js_route(""), &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    let seq = publish(&js, "tool.exec.one", &[], "1").await;
    settled(&js, seq).await;

    js.get_stream("TOOL").await.unwrap().delete_consumer("tool").await.unwrap();
    eventually("the consumer recreated", Duration::from_secs(15), || async {
        js.get_stream("TOOL").await.unwrap().consumer_info("tool").await.ok()
    })
    .await;
    sidecar.wait_ready().await;
    let seq = publish(&js, "tool.exec.two", &[], "2").await;
    settled(&js, seq).await;
    // Recreated from the ack floor the watchdog last saw (every 2 s): a message acked
    // after that look may be delivered once more, never more than that, never lost.
    let hits = app.hits();
    assert_eq!(hits.iter().filter(|h| h.seen.uri == "/tools/two").count(), 1);
    assert!(hits.iter().filter(|h| h.seen.uri == "/tools/one").count() <= 2);
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_readiness_names_a_missing_stream_until_it_exists() {
    let nats = NatsServer::start();
    let app = App::script(|_, _| async { respond(200, "ok") }).await;
    let sidecar = Sidecar::start(&js_route(""), &nats.url(), Some(&app.url())).await;
    let why = eventually("statusz naming the stream", Duration::from_secs(10), || async {
        let v = sidecar.statusz().await;
        v["failing"]["inbound:tool-exec"].as_str().filter(|s| s.contains("not found")).map(str::to_owned)
    })
    .await;
    assert_eq!(why, r#"stream "TOOL" not found"#);
    let js = streams(&nats).await;
    sidecar.wait_ready().await;
    let seq = publish(&js, "tool.exec.late", &[], "x").await;
    settled(&js, seq).await;
    assert_eq!(app.hits().len(), 1);
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_graceful_shutdown_finishes_in_flight_messages() {
    let nats = NatsServer::start();
    let js = streams(&nats).await;
    let app = App::script(|_, _| async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        respond(200, "ok")
    })
    .await;
    let sidecar = Sidecar::start(&js_route(""), &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    let seq = publish(&js, "tool.exec.finish", &[], "x").await;
    app.wait_hits(1).await;
    sidecar.stop().await;
    // Acked on the way out, not left to ack_wait (30s here).
    let info = consumer_info(&js).await;
    assert_eq!(info.ack_floor.stream_sequence, seq, "{info:?}");
    assert_eq!(info.num_ack_pending, 0);
}
