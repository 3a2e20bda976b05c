//! Egress end to end: real nats-server, real sidecar, real HTTP.

mod support;

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use support::fixtures::{responder, EXECUTE_AGENT_ROUTE};
use support::*;

fn routes(extra: &str) -> String {
    format!(
        r#"
[sidecar]
service = "orchestration"
drain_timeout = "10s"

[defaults]
timeout = "2s"
max_body = "64KiB"

{EXECUTE_AGENT_ROUTE}
[[outbound]]
name = "slow"
method = "POST"
path = "/slow"
subject = "slow.op"
mode = "request"
timeout = "300ms"

[[outbound]]
name = "auth-event"
method = "POST"
path = "/events/auth"
subject = "gateway.auth.login"
mode = "publish"

[[outbound]]
name = "workflow-started"
method = "POST"
path = "/workflows/{{workflow_id}}/started"
subject = "workflow.execution.started"
mode = "jetstream"

[[outbound]]
name = "orphan-publish"
method = "POST"
path = "/orphan"
subject = "nostream.x"
mode = "jetstream"
timeout = "1s"

[[outbound]]
name = "model-tunnel"
host = "model-service"
path = "/{{*rest}}"
mode = "tunnel"
service = "model"

{extra}
"#
    )
}

#[tokio::test]
async fn request_mode_carries_body_headers_and_status() {
    let nats = NatsServer::start();
    let _r = responder(&nats, "agent.*.execution.requested", |m| {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Bridge-Status", "201");
        h.insert("Content-Type", "application/json");
        let seen = m.headers.as_ref().unwrap();
        let echo = serde_json::json!({
            "subject": m.subject.as_str(),
            "body": String::from_utf8_lossy(&m.payload),
            "trace": seen.get("Traceparent").map(|v| v.as_str().to_owned()),
            "request_id": seen.get("X-Request-Id").map(|v| v.as_str().to_owned()),
            "connection": seen.get("Connection").map(|v| v.as_str().to_owned()),
        });
        (h, Bytes::from(echo.to_string()))
    })
    .await;
    let sc = Sidecar::start(&routes(""), &nats.url(), None).await;
    sc.wait_nats().await;

    let r = call(
        "POST",
        &sc.url("/agents/7/execute"),
        &[
            ("host", "agent-service:8080"),
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ("connection", "keep-alive"),
        ],
        "hello",
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["subject"], "agent.7.execution.requested");
    assert_eq!(v["body"], "hello");
    assert_eq!(v["trace"], "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
    assert!(v["connection"].is_null(), "hop-by-hop header leaked: {v}");
    // A request id was generated, sent along, and echoed back.
    let rid = v["request_id"].as_str().expect("generated X-Request-Id");
    assert_eq!(r.header("x-request-id"), Some(rid));

    // The app's own X-Request-Id is kept.
    let r = call("POST", &sc.url("/agents/8/execute"), &[("host", "agent-service"), ("x-request-id", "abc-123")], "").await;
    assert_eq!(r.json()["request_id"], "abc-123");
    assert_eq!(r.header("x-request-id"), Some("abc-123"));
}

#[tokio::test]
async fn absolute_form_proxy_requests_are_routed_by_authority() {
    let nats = NatsServer::start();
    let _r = responder(&nats, "agent.*.execution.requested", |m| (async_nats::HeaderMap::new(), Bytes::from(m.subject.to_string()))).await;
    let sc = Sidecar::start(&routes(""), &nats.url(), None).await;
    sc.wait_nats().await;

    // What an app run with HTTP_PROXY sends: the absolute URI in the request line.
    let mut stream = tokio::net::TcpStream::connect(sc.egress).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"POST http://agent-service/agents/42/execute HTTP/1.1\r\nHost: agent-service\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // A buffered reply is sent with its length, not chunked.
    assert!(out.to_ascii_lowercase().contains("content-length: 28\r\n"), "{out}");
    assert!(out.ends_with("agent.42.execution.requested"), "{out}");

    // Without the host the host-specific route does not match.
    let r = call("POST", &sc.url("/agents/42/execute"), &[], "").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
}

#[tokio::test]
async fn micro_service_errors_and_failures_map_to_statuses() {
    let nats = NatsServer::start();
    let _r = responder(&nats, "agent.*.execution.requested", |_| {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Service-Error-Code", "422");
        h.insert("Nats-Service-Error", "bad agent");
        (h, Bytes::new())
    })
    .await;
    // Subscribed but never answers: a timeout, not "no responders".
    let c = nats.client().await;
    let _silent = subscribe_synced(&c, "slow.op").await;
    let sc = Sidecar::start(&routes(""), &nats.url(), None).await;
    sc.wait_nats().await;

    let r = call("POST", &sc.url("/agents/1/execute"), &[("host", "agent-service")], "").await;
    assert_eq!(r.status, 422);
    assert_eq!(r.text(), "bad agent");

    let started = std::time::Instant::now();
    let r = post(&sc.url("/slow"), "").await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(started.elapsed() < Duration::from_secs(2), "timeout not honoured: {:?}", started.elapsed());
    let p = r.json();
    assert_eq!(p["route"], "slow");
    assert_eq!(p["status"], 504);

    // Nobody on the tunnel subject: 503 with Retry-After.
    let r = call("GET", &sc.url("/v1/x"), &[("host", "model-service")], "").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["type"], "urn:natsbridge:problem:no-responders");
    assert_eq!(r.json()["route"], "model-tunnel");

    // Unknown route and wrong method.
    assert_eq!(post(&sc.url("/nope"), "").await.status, 404);
    let r = call("GET", &sc.url("/events/auth"), &[], "").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
}

#[tokio::test]
async fn captured_values_cannot_inject_wildcards() {
    let nats = NatsServer::start();
    // Would see any injected subject.
    let c = nats.client().await;
    let mut spy = c.subscribe(">").await.unwrap();
    c.flush().await.unwrap();
    // The spy is live once it sees a message published from another connection.
    let other = nats.client().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        other.publish("probe.start", Bytes::new()).await.unwrap();
        other.flush().await.unwrap();
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), spy.next()).await {
            if m.subject.as_str() == "probe.start" {
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline, "spy subscription never became live");
    }
    let sc = Sidecar::start(&routes(""), &nats.url(), None).await;
    sc.wait_nats().await;
    for evil in ["a.b", "*", "%3E", "a%2Eb", "x%20y", "%2A"] {
        let r = call("POST", &sc.url(&format!("/agents/{evil}/execute")), &[("host", "agent-service")], "").await;
        assert_eq!(r.status, 400, "{evil}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
        assert_eq!(r.json()["route"], "execute-agent");
    }
    // Nothing reached NATS on an agent subject.
    c.publish("probe.done", Bytes::new()).await.unwrap();
    c.flush().await.unwrap();
    while let Some(m) = tokio::time::timeout(Duration::from_secs(5), spy.next()).await.unwrap() {
        if m.subject.as_str() == "probe.done" {
            break;
        }
        assert!(!m.subject.starts_with("agent."), "injected: {}", m.subject);
    }
}

#[tokio::test]
async fn publish_mode_answers_202_after_flushing() {
    let nats = NatsServer::start();
    let c = nats.client().await;
    let mut sub = subscribe_synced(&c, "gateway.auth.login").await;
    let sc = Sidecar::start(&routes(""), &nats.url(), None).await;
    sc.wait_nats().await;
    let r = call("POST", &sc.url("/events/auth"), &[("x-user", "ada")], "login").await;
    assert_eq!(r.status, 202);
    let m = tokio::time::timeout(Duration::from_secs(5), sub.next()).await.unwrap().unwrap();
    assert_eq!(&m.payload[..], b"login");
    assert_eq!(m.headers.unwrap().get("X-User").unwrap().as_str(), "ada");
}

#[tokio::test]
async fn jetstream_mode_acks_dedupes_and_fails_fast_without_a_stream() {
    let nats = NatsServer::start();
    let js = async_nats::jetstream::new(nats.client().await);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "WORKFLOW".into(),
        subjects: vec!["workflow.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let sc = Sidecar::start(&routes(""), &nats.url(), None).await;
    sc.wait_nats().await;

    let r = call("POST", &sc.url("/workflows/w1/started"), &[("idempotency-key", "w1-start")], "{}").await;
    assert_eq!(r.status, 202, "{}", r.text());
    let v = r.json();
    assert_eq!(v["stream"], "WORKFLOW");
    assert_eq!(v["seq"], 1);
    assert_eq!(v["duplicate"], false);
    assert_eq!(r.header("bridge-stream"), Some("WORKFLOW"));
    assert_eq!(r.header("bridge-seq"), Some("1"));

    // The retry with the same key is deduplicated by the stream.
    let r = call("POST", &sc.url("/workflows/w1/started"), &[("idempotency-key", "w1-start")], "{}").await;
    assert_eq!(r.status, 202);
    assert_eq!(r.json()["duplicate"], true);
    assert_eq!(r.json()["seq"], 1);
    let mut stream = js.get_stream("WORKFLOW").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
    let stored = stream.get_raw_message(1).await.unwrap();
    assert_eq!(stored.headers.get("Nats-Msg-Id").unwrap().as_str(), "w1-start");

    // No stream captures the subject: 503 with Retry-After, within the route timeout.
    let started = std::time::Instant::now();
    let r = post(&sc.url("/orphan"), "{}").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
}

#[tokio::test]
async fn jetstream_publish_with_a_core_subscriber_but_no_stream_is_bounded() {
    // nats-server #8038: the publish stalls; the route timeout must still answer.
    let nats = NatsServer::start();
    let c = nats.client().await;
    let _sub = subscribe_synced(&c, "nostream.x").await;
    let sc = Sidecar::start(&routes(""), &nats.url(), None).await;
    sc.wait_nats().await;
    let started = std::time::Instant::now();
    let r = post(&sc.url("/orphan"), "{}").await;
    // No ack in time: the outcome is unknown (issue 19), so 504, not a retryable 503.
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["type"], "urn:natsbridge:problem:outcome-unknown");
    assert!(started.elapsed() < Duration::from_millis(1800), "{:?}", started.elapsed());
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_even_when_streamed() {
    let nats = NatsServer::start();
    let _r = responder(&nats, "gateway.>", |_| (async_nats::HeaderMap::new(), Bytes::new())).await;
    let sc = Sidecar::start(&routes(""), &nats.url(), None).await;
    sc.wait_nats().await;
    let big = vec![b'x'; 65 * 1024];
    let r = call("POST", &sc.url("/events/auth"), &[], big.clone()).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["route"], "auth-event");

    // Chunked, no Content-Length: the limit still applies.
    let body = http_body_util::StreamBody::new(futures::stream::iter(
        big.chunks(4096)
            .map(|c| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::copy_from_slice(c))))
            .collect::<Vec<_>>(),
    ));
    let req = http::Request::post(sc.url("/events/auth")).body(body).unwrap();
    let res = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http().request(req).await.unwrap();
    assert_eq!(res.status(), 413);
}

#[tokio::test]
async fn payload_over_max_payload_is_413() {
    let nats = NatsServer::start_with("max_payload: 1KB");
    let sc = Sidecar::start(&routes(""), &nats.url(), None).await;
    sc.wait_nats().await;
    let r = call("POST", &sc.url("/events/auth"), &[], vec![b'x'; 4096]).await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["type"], "urn:natsbridge:problem:payload-too-large");
}

#[tokio::test]
async fn tunnel_mode_sends_the_whole_request() {
    let nats = NatsServer::start();
    let _r = responder(&nats, "natsbridge.tunnel.model", |m| {
        let h = m.headers.clone().unwrap();
        let mut out = async_nats::HeaderMap::new();
        out.insert("Bridge-Status", "202");
        out.insert("X-Seen-Method", h.get("Bridge-Method").unwrap().as_str());
        out.insert("X-Seen-Path", h.get("Bridge-Path").unwrap().as_str());
        out.insert("X-Seen-Query", h.get("Bridge-Query").map(|v| v.as_str()).unwrap_or(""));
        out.insert("X-Seen-Auth", h.get("Authorization").map(|v| v.as_str()).unwrap_or(""));
        (out, m.payload.clone())
    })
    .await;
    let sc = Sidecar::start(&routes(""), &nats.url(), None).await;
    sc.wait_nats().await;
    let r = call("PUT", &sc.url("/v1/keys/9?force=1&x=y"), &[("host", "model-service"), ("authorization", "Bearer t")], "payload").await;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.header("x-seen-method"), Some("PUT"));
    assert_eq!(r.header("x-seen-path"), Some("/v1/keys/9"));
    assert_eq!(r.header("x-seen-query"), Some("force=1&x=y"));
    assert_eq!(r.header("x-seen-auth"), Some("Bearer t"));
    assert_eq!(r.text(), "payload");
}

#[tokio::test]
async fn http_mode_proxies_to_the_upstream() {
    let nats = NatsServer::start();
    let app = App::start(|s| {
        let mut r = respond(207, &format!("{} {} {}", s.method, s.uri, String::from_utf8_lossy(&s.body)));
        r.headers_mut().insert("x-upstream", "yes".parse().unwrap());
        r
    })
    .await;
    let extra = format!(
        "[[outbound]]\nname = \"vector\"\nhost = \"vector-service\"\npath = \"/{{*rest}}\"\nmode = \"http\"\nupstream = \"{}\"\n",
        app.url()
    );
    let sc = Sidecar::start(&routes(&extra), &nats.url(), None).await;
    sc.wait_nats().await;
    let r = call("PATCH", &sc.url("/search?q=1"), &[("host", "vector-service")], "v").await;
    assert_eq!(r.status, 207);
    assert_eq!(r.text(), "PATCH /search?q=1 v");
    assert_eq!(r.header("x-upstream"), Some("yes"));

    // Upstream down: 502 problem.
    app.stop();
    drop(app);
    let extra = "[[outbound]]\nname = \"dead\"\npath = \"/dead\"\nmode = \"http\"\nupstream = \"http://127.0.0.1:9\"\n";
    let sc2 = Sidecar::start(&routes(extra), &nats.url(), None).await;
    sc2.wait_nats().await;
    let r = call("GET", &sc2.url("/dead"), &[], "").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["route"], "dead");
}

#[tokio::test]
async fn nats_down_at_start_then_up() {
    // Reserve a port for a server that is not running yet.
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let sc = Sidecar::start(&routes(""), &url, None).await;
    // Serving, but NATS routes answer 503 and /statusz says why.
    let r = post(&sc.url("/events/auth"), "x").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["type"], "urn:natsbridge:problem:nats-disconnected");
    let why = eventually("statusz naming the NATS failure", Duration::from_secs(10), || async {
        sc.statusz().await["failing"]["nats"].as_str().filter(|w| w.contains("not connected to NATS")).map(str::to_owned)
    })
    .await;
    assert!(!why.is_empty());

    // Now start NATS on that port: the sidecar recovers without a restart.
    // (Readiness itself also waits for the WORKFLOW stream this file's routes need.)
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(nats_server_bin())
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    sc.wait_nats().await;
    let c = async_nats::connect(&url).await.unwrap();
    let mut sub = subscribe_synced(&c, "gateway.auth.login").await;
    let r = post(&sc.url("/events/auth"), "x").await;
    assert_eq!(r.status, 202);
    assert!(tokio::time::timeout(Duration::from_secs(5), sub.next()).await.unwrap().is_some());
    assert!(sc.metrics().await.contains("natsbridge_nats_connected 1"));
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn hot_reload_swaps_valid_files_and_keeps_the_old_table_on_errors() {
    let nats = NatsServer::start();
    let _r = responder(&nats, "v.>", |m| (async_nats::HeaderMap::new(), Bytes::from(m.subject.to_string()))).await;
    let base = "[sidecar]\nservice = \"s\"\n";
    let v1 = format!("{base}[[outbound]]\nname = \"a\"\npath = \"/a\"\nsubject = \"v.one\"\nmode = \"request\"\n");
    let sc = Sidecar::start(&v1, &nats.url(), None).await;
    sc.wait_nats().await;
    assert_eq!(post(&sc.url("/a"), "").await.text(), "v.one");

    // A valid edit takes effect (file watch, no signal).
    let v2 = format!("{base}[[outbound]]\nname = \"a\"\npath = \"/a\"\nsubject = \"v.two\"\nmode = \"request\"\n");
    std::fs::write(&sc.config_path, &v2).unwrap();
    eventually("reloaded table", Duration::from_secs(10), || async { (post(&sc.url("/a"), "").await.text() == "v.two").then_some(()) })
        .await;

    // An invalid edit is rejected; the old table keeps serving.
    std::fs::write(&sc.config_path, format!("{base}[[outbound]]\nname = \"a\"\npath = \"/a\"\nsubject = \"v..bad\"\nmode = \"request\"\n"))
        .unwrap();
    eventually("reload failure counted", Duration::from_secs(10), || async {
        sc.metrics().await.contains("natsbridge_config_reload_failures_total 1").then_some(())
    })
    .await;
    assert_eq!(post(&sc.url("/a"), "").await.text(), "v.two");

    // A ConfigMap-style symlink swap is seen too.
    let dir = sc.config_path.parent().unwrap();
    let v3 = format!("{base}[[outbound]]\nname = \"a\"\npath = \"/a\"\nsubject = \"v.three\"\nmode = \"request\"\n");
    let data = dir.join("..2026_data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("routes.toml"), v3).unwrap();
    let tmp = dir.join("routes.toml.tmp");
    std::os::unix::fs::symlink(data.join("routes.toml"), &tmp).unwrap();
    std::fs::rename(&tmp, &sc.config_path).unwrap();
    eventually("symlink swap reloaded", Duration::from_secs(10), || async {
        (post(&sc.url("/a"), "").await.text() == "v.three").then_some(())
    })
    .await;

    // SIGHUP (the reload channel) reloads even without a file event.
    sc.reload.send(()).await.unwrap();
    eventually("explicit reload counted", Duration::from_secs(10), || async {
        let m = sc.metrics().await;
        m.contains("natsbridge_config_reloads_total 3").then_some(())
    })
    .await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut sub = subscribe_synced(&client, "agent.*.execution.requested").await;
    let sc = Sidecar::start(&routes(""), &nats.url(), None).await;
    sc.wait_nats().await;
    let url = sc.url("/agents/1/execute");
    let in_flight = tokio::spawn(async move { call("POST", &url, &[("host", "agent-service")], "x").await });
    // The request has reached NATS: it is in flight.
    let msg = tokio::time::timeout(Duration::from_secs(5), sub.next()).await.unwrap().unwrap();
    let (egress, admin) = (sc.egress, sc.admin);
    let stop = tokio::spawn(sc.stop());
    // Readiness drops while draining, so no new work is routed here.
    eventually("not ready while draining", Duration::from_secs(5), || async move {
        let r = get(&format!("http://{admin}/readyz")).await.ok()?;
        (r.status == 503 && r.text().contains("draining")).then_some(())
    })
    .await;
    // New connections are refused once shutdown started.
    eventually(
        "listener closed",
        Duration::from_secs(5),
        || async move { tokio::net::TcpStream::connect(egress).await.is_err().then_some(()) },
    )
    .await;
    client.publish(msg.reply.unwrap(), Bytes::from_static(b"done")).await.unwrap();
    client.flush().await.unwrap();
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "done");
    tokio::time::timeout(Duration::from_secs(10), stop).await.unwrap().unwrap();
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let nats = NatsServer::start();
    let p = SidecarProcess::start(&routes(""), &nats.url(), None);
    p.wait_nats().await;
    let mut p = p;
    p.signal("TERM");
    let status = tokio::task::spawn_blocking(move || {
        let s = p.child.wait().unwrap();
        (s, p)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "exit: {:?}\n{}", status.0, status.1.log());
}

#[tokio::test]
async fn metrics_count_requests_by_route_mode_and_status_class() {
    let nats = NatsServer::start();
    let sc = Sidecar::start(&routes(""), &nats.url(), None).await;
    sc.wait_nats().await;
    assert_eq!(post(&sc.url("/events/auth"), "").await.status, 202);
    let _ = call("GET", &sc.url("/v1"), &[("host", "model-service")], "").await;
    let m = sc.metrics().await;
    assert!(m.contains(r#"natsbridge_egress_requests_total{mode="publish",path="nats",route="auth-event",status_class="2xx"} 1"#), "{m}");
    assert!(m.contains(r#"natsbridge_egress_requests_total{mode="tunnel",path="nats",route="model-tunnel",status_class="5xx"} 1"#), "{m}");
    assert!(m.contains(r#"natsbridge_egress_request_duration_seconds_count{path="nats",route="auth-event"} 1"#), "{m}");
    assert!(m.contains("natsbridge_egress_requests_in_flight 0"), "{m}");
}

#[tokio::test]
async fn jetstream_publishes_in_flight_are_bounded() {
    let nats = NatsServer::start();
    // A core subscriber and no stream: a JetStream publish stalls until its timeout
    // (nats-server #8038), holding its in-flight slot.
    let c = nats.client().await;
    let _stall = subscribe_synced(&c, "stall.x").await;
    let toml = routes("[[outbound]]\nname = \"stall\"\nmethod = \"POST\"\npath = \"/stall\"\nsubject = \"stall.x\"\nmode = \"jetstream\"\ntimeout = \"3s\"\n")
        .replace("drain_timeout = \"10s\"", "drain_timeout = \"10s\"\nmax_inflight_publishes = 1");
    let sc = Sidecar::start(&toml, &nats.url(), None).await;
    sc.wait_nats().await;
    let url = sc.url("/stall");
    let first = tokio::spawn(async move { post(&url, "{}").await });
    eventually("first publish in flight", Duration::from_secs(5), || async {
        sc.metrics().await.contains("natsbridge_jetstream_publishes_in_flight 1").then_some(())
    })
    .await;
    // The bound is reached: the next publish is refused at once, not queued.
    let started = std::time::Instant::now();
    let r = post(&sc.url("/stall"), "{}").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["type"], "urn:natsbridge:problem:overloaded");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    // The stalled one still ends within its timeout, and frees its slot.
    assert_eq!(first.await.unwrap().status, 504);
    assert!(sc.metrics().await.contains("natsbridge_jetstream_publishes_in_flight 0"));
}

/// `max_inflight_publishes` applies on reload: the bound is read at each publish.
#[tokio::test]
async fn the_publish_bound_follows_a_reload() {
    let nats = NatsServer::start();
    let c = nats.client().await;
    let _stall = subscribe_synced(&c, "stall.x").await;
    let route = "[[outbound]]\nname = \"stall\"\nmethod = \"POST\"\npath = \"/stall\"\nsubject = \"stall.x\"\nmode = \"jetstream\"\ntimeout = \"4s\"\n";
    let with_bound =
        |n: usize| routes(route).replace("drain_timeout = \"10s\"", &format!("drain_timeout = \"10s\"\nmax_inflight_publishes = {n}"));
    let sc = Sidecar::start(&with_bound(1), &nats.url(), None).await;
    sc.wait_nats().await;
    let in_flight = |n: usize| {
        let sc = &sc;
        async move {
            eventually(&format!("{n} publishes in flight"), Duration::from_secs(5), || async {
                sc.metrics().await.contains(&format!("natsbridge_jetstream_publishes_in_flight {n}")).then_some(())
            })
            .await
        }
    };
    let stall = |url: String| tokio::spawn(async move { post(&url, "{}").await.status });
    let first = stall(sc.url("/stall"));
    in_flight(1).await;
    assert_eq!(post(&sc.url("/stall"), "{}").await.status, 503, "bound 1 reached");

    // Raised to 2 by rewriting the file and reloading: one more fits, the third does not.
    // The file write and the explicit reload each may reload (which one comes first depends on
    // when the watcher's event arrives), so the count is 1 or 2: wait for at least one.
    std::fs::write(&sc.config_path, with_bound(2)).unwrap();
    sc.reload.send(()).await.unwrap();
    eventually("the reload", Duration::from_secs(5), || async {
        let m = sc.metrics().await;
        let n = m.lines().find_map(|l| l.strip_prefix("natsbridge_config_reloads_total ")).and_then(|v| v.trim().parse::<u64>().ok());
        (n >= Some(1)).then_some(())
    })
    .await;
    let second = stall(sc.url("/stall"));
    in_flight(2).await;
    let r = post(&sc.url("/stall"), "{}").await;
    assert_eq!((r.status, r.json()["type"].as_str().map(str::to_owned)), (503, Some("urn:natsbridge:problem:overloaded".into())));
    assert_eq!(first.await.unwrap(), 504);
    assert_eq!(second.await.unwrap(), 504);
}

#[tokio::test]
async fn own_time_counts_every_answered_request_once_read_and_resets_when_read() {
    let nats = NatsServer::start();
    let _r = responder(&nats, "agent.*.execution.requested", |m| (async_nats::HeaderMap::new(), m.payload.clone())).await;
    let sc = Sidecar::start(&routes(""), &nats.url(), None).await;
    sc.wait_nats().await;
    let own = || async { get(&format!("http://{}/debug/own-time?reset=1", sc.admin)).await.unwrap().json() };
    // Nothing is recorded until the first read (a request then costs no lock or histogram).
    let r = call("POST", &sc.url("/agents/0/execute"), &[("host", "agent-service")], "x").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let first = own().await;
    assert_eq!(first["egress_to_nats"], serde_json::json!({ "count": 0 }), "{first}");
    for i in 0..5 {
        let r = call("POST", &sc.url(&format!("/agents/{i}/execute")), &[("host", "agent-service")], "x").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let v = own().await;
    for stage in ["egress_to_nats", "egress_reply_to_response"] {
        assert_eq!(v[stage]["count"], 5, "{v}");
        let (p50, max) = (v[stage]["p50_us"].as_f64().unwrap(), v[stage]["max_us"].as_f64().unwrap());
        assert!(p50 > 0.0 && p50 <= max, "{v}");
    }
    // No inbound route here: no sample, and so no percentile (never a zero).
    assert_eq!(v["ingress_own"], serde_json::json!({ "count": 0 }), "{v}");
    // Read with reset=1: the next read starts from nothing.
    assert_eq!(own().await["egress_to_nats"]["count"], 0);
}
