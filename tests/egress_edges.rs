//! Egress edges end to end (issues 19, 20, 21): subjects too long for the protocol,
//! routes that fall through, statuses and header values at the edge, and limits that
//! apply on reload. Real nats-server, real sidecar, real HTTP.

mod support;

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use support::*;

fn routes(extra: &str) -> String {
    format!(
        r#"
[sidecar]
service = "edges"
drain_timeout = "5s"

[defaults]
timeout = "2s"

[[outbound]]
name = "execute-agent"
method = "POST"
path = "/agents/{{id}}/execute"
subject = "agent.{{id}}.execution.requested"
mode = "request"

{extra}
"#
    )
}

/// Answers every request on `subject` with `f(message)`.
async fn responder(
    nats: &NatsServer,
    subject: &str,
    f: impl Fn(&async_nats::Message) -> (async_nats::HeaderMap, Bytes) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let client = nats.client().await;
    let mut sub = subscribe_synced(&client, subject).await;
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let (h, body) = f(&msg);
            if let Some(reply) = msg.reply.clone() {
                client.publish_with_headers(reply, h, body).await.unwrap();
            }
        }
    })
}

fn metric(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Issue 20 item 1: a 5,000-byte path capture used to render a 5 KiB subject; the server
/// closed the connection over its control line and the next call got 503.
#[tokio::test]
async fn a_long_capture_is_refused_without_losing_the_connection() {
    let nats = NatsServer::start();
    let _r = responder(&nats, "agent.*.execution.requested", |m| (async_nats::HeaderMap::new(), Bytes::from(m.subject.to_string()))).await;
    let sc = Sidecar::start(&routes(""), &nats.url(), None).await;
    sc.wait_nats().await;

    let r = post(&sc.url(&format!("/agents/{}/execute", "a".repeat(5000))), "").await;
    assert_eq!(r.status, 414, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(r.json()["type"], "urn:natsbridge:problem:subject-too-long");
    assert_eq!(r.json()["route"], "execute-agent");

    // The connection stayed up: the next normal call is answered, nothing reconnected.
    let r = post(&sc.url("/agents/7/execute"), "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "agent.7.execution.requested");
    let m = sc.metrics().await;
    assert_eq!(metric(&m, "natsbridge_nats_reconnects_total"), Some(0.0), "{m}");
    assert_eq!(metric(&m, "natsbridge_nats_connected"), Some(1.0), "{m}");
}

/// Issue 21 section 1: one moved call plus a catch-all `http` route for the rest of the
/// same host. The other methods of the moved path, the root and HEAD reach the upstream.
#[tokio::test]
async fn routes_fall_through_to_the_catch_all_of_the_same_host() {
    let nats = NatsServer::start();
    let _r = responder(&nats, "model.key.*", |_| (async_nats::HeaderMap::new(), Bytes::from_static(b"over nats"))).await;
    let upstream = App::start(|s| respond(200, &format!("upstream {} {}", s.method, s.uri))).await;
    let extra = format!(
        r#"
[[outbound]]
name = "key"
method = "POST"
host = "model-service"
path = "/v1/keys/{{id}}"
subject = "model.key.{{id}}"
mode = "request"

[[outbound]]
name = "agent-get"
method = "GET"
host = "model-service"
path = "/v1/agents/{{id}}"
mode = "http"
upstream = "{}"

[[outbound]]
name = "rest"
host = "model-service"
path = "/{{*rest}}"
mode = "http"
upstream = "{}"
"#,
        upstream.url(),
        upstream.url()
    );
    let sc = Sidecar::start(&routes(&extra), &nats.url(), None).await;
    sc.wait_nats().await;
    let host = [("host", "model-service")];

    let r = call("POST", &sc.url("/v1/keys/9"), &host, "").await;
    assert_eq!((r.status, r.text().as_str()), (200, "over nats"));
    // Was 405 (Allow: POST): the catch-all takes the other methods.
    let r = call("GET", &sc.url("/v1/keys/9"), &host, "").await;
    assert_eq!((r.status, r.text().as_str()), (200, "upstream GET /v1/keys/9"));
    // Was 404: `/{*rest}` covers `/`.
    let r = call("GET", &sc.url("/"), &host, "").await;
    assert_eq!((r.status, r.text().as_str()), (200, "upstream GET /"));
    // Was 405: HEAD is served by the GET route (no body on the wire).
    let r = call("HEAD", &sc.url("/v1/agents/3"), &host, "").await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    let seen = upstream.requests();
    assert!(seen.iter().any(|s| s.method == http::Method::HEAD && s.uri == "/v1/agents/3"), "{seen:?}");
    let m = sc.metrics().await;
    assert!(m.contains(r#"natsbridge_egress_requests_total{mode="http",route="agent-get",status_class="2xx"} 1"#), "{m}");
}
