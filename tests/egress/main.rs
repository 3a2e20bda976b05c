//! Egress end to end: real nats-server, real sidecar, real HTTP: each mode, limits and
//! errors here; start, reload, shutdown, metrics and bounds in `lifecycle.rs`.

mod lifecycle;
#[path = "../support/mod.rs"]
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
