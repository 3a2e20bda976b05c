//! Shared test inputs and probes for the NATS tests: routing-file text for the sidecars under
//! test, publishing to JetStream, and asking NATS what a stream or consumer holds.

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;

use futures::StreamExt;

use super::{eventually, subscribe_synced, NatsServer};

/// A routing file: the `[sidecar]` and `[nats]` sections, then `sections`. The app and NATS
/// addresses are dummies: the harness passes the real ones to the sidecar it starts.
pub fn routes_toml(service: &str, drain_timeout: &str, sections: &str) -> String {
    format!(
        r#"[sidecar]
service = "{service}"
app_url = "http://127.0.0.1:1"
drain_timeout = "{drain_timeout}"

[nats]
servers = ["nats://127.0.0.1:1"]

{sections}
"#
    )
}

/// The `[idempotency]` section, ending in a newline.
pub fn idempotency_section(bucket: &str, claim_ttl: &str) -> String {
    format!(
        r#"[idempotency]
bucket = "{bucket}"
claim_ttl = "{claim_ttl}"
"#
    )
}

/// The jetstream route `tool.exec.<tool>` → POST /tools/<tool> on stream TOOL, durable `tool`,
/// dead letters to `dlq.tool`, with the `extra` lines after. `deliver = "all"`: tests
/// publish before the sidecar has created its durable, which must still see those messages.
pub fn tool_exec_route(extra: &str) -> String {
    format!(
        r#"[[inbound]]
name = "tool-exec"
subject = "tool.exec.*"
mode = "jetstream"
stream = "TOOL"
durable = "tool"
method = "POST"
path = "/tools/{{3}}"
dead_letter = "dlq.tool"
deliver = "all"
{extra}
"#
    )
}

/// The egress request route `execute-agent`: POST agent-service/agents/{agent_id}/execute
/// → `agent.<agent_id>.execution.requested`; ends in a newline.
pub const EXECUTE_AGENT_ROUTE: &str = r#"[[outbound]]
name = "execute-agent"
method = "POST"
host = "agent-service"
path = "/agents/{agent_id}/execute"
subject = "agent.{agent_id}.execution.requested"
mode = "request"
"#;

/// The routing file of an egress-only sidecar `client-svc` whose calls to `model-service`
/// travel as tunnel requests to the service `model`.
pub const MODEL_TUNNEL_CLIENT: &str = r#"[sidecar]
service = "client-svc"

[nats]
servers = ["nats://127.0.0.1:1"]

[[outbound]]
name = "model-tunnel"
host = "model-service"
path = "/{*rest}"
mode = "tunnel"
service = "model"
timeout = "10s"
"#;

/// The request route `orders` on `orders.create` → POST /orders, with the `extra` lines
/// after; ends in a newline.
pub fn orders_route(extra: &str) -> String {
    format!(
        r#"[[inbound]]
name = "orders"
subject = "orders.create"
mode = "request"
method = "POST"
path = "/orders"
{extra}
"#
    )
}

/// The jetstream route `events` on `events.created` (stream EVENTS, durable `events`) →
/// POST `path`, with the `extra` lines after; ends in a newline.
pub fn events_route(path: &str, extra: &str) -> String {
    format!(
        r#"[[inbound]]
name = "events"
subject = "events.created"
mode = "jetstream"
stream = "EVENTS"
durable = "events"
method = "POST"
path = "{path}"
{extra}
"#
    )
}

/// The egress route `event`: POST /events → JetStream `events.created`, answered within
/// `timeout`; ends in a newline.
pub fn event_outbound(timeout: &str) -> String {
    format!(
        r#"[[outbound]]
name = "event"
method = "POST"
path = "/events"
subject = "events.created"
mode = "jetstream"
timeout = "{timeout}"
"#
    )
}

/// The jetstream route `execution-events` on `agent.execution.completed` (stream AGENT) →
/// POST /events, with the `extra` lines after (the durable defaults to
/// `<service>-execution-events`); ends in a newline.
pub fn execution_events_route(extra: &str) -> String {
    format!(
        r#"[[inbound]]
name = "execution-events"
subject = "agent.execution.completed"
mode = "jetstream"
stream = "AGENT"
method = "POST"
path = "/events"
{extra}
"#
    )
}

/// Stream EVENTS on `events.>` (what [`events_route`] consumes) and the dead-letter stream.
pub async fn events_streams(js: &jetstream::Context) {
    js.create_stream(jetstream::stream::Config { name: "EVENTS".into(), subjects: vec!["events.>".into()], ..Default::default() })
        .await
        .unwrap();
    dlq_stream(js).await;
}

/// The dead-letter stream DLQ on `dlq.>`.
pub async fn dlq_stream(js: &jetstream::Context) {
    js.create_stream(jetstream::stream::Config { name: "DLQ".into(), subjects: vec!["dlq.>".into()], ..Default::default() }).await.unwrap();
}

pub fn nats_headers(pairs: &[(&str, &str)]) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    for (k, v) in pairs {
        headers.insert(*k, *v);
    }
    headers
}

/// The value of one series (`name{labels}`, exactly as exposed) in a Prometheus text
/// exposition; `None` when it is absent.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Publishes to JetStream and waits for the stream's ack.
pub async fn js_publish(js: &jetstream::Context, subject: &str, headers: &[(&str, &str)], body: &str) -> jetstream::publish::PublishAck {
    js.publish_with_headers(subject.to_owned(), nats_headers(headers), Bytes::copy_from_slice(body.as_bytes()))
        .await
        .unwrap()
        .await
        .unwrap()
}

/// A core-NATS request with headers; the error when nobody answers within `timeout`.
pub async fn nats_request_within(
    client: &async_nats::Client,
    subject: &str,
    headers: &[(&str, &str)],
    body: &str,
    timeout: Duration,
) -> Result<async_nats::Message, async_nats::RequestError> {
    let req = async_nats::client::Request::new()
        .headers(nats_headers(headers))
        .payload(Bytes::copy_from_slice(body.as_bytes()))
        .timeout(Some(timeout));
    client.send_request(subject.to_owned(), req).await
}

pub fn reply_header<'a>(m: &'a async_nats::Message, name: &str) -> Option<&'a str> {
    m.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str())
}

/// How many messages stream `name` holds.
pub async fn stream_messages(js: &jetstream::Context, name: &str) -> u64 {
    js.get_stream(name).await.unwrap().get_info().await.unwrap().state.messages
}

pub async fn dlq_count(js: &jetstream::Context) -> u64 {
    stream_messages(js, "DLQ").await
}

/// The consumer's info once nothing is pending or unacked and the ack floor has reached
/// `through`: every delivery has had its final outcome. `None` before that, or while the
/// stream or the consumer does not exist.
pub async fn settled_consumer(js: &jetstream::Context, stream: &str, durable: &str, through: u64) -> Option<jetstream::consumer::Info> {
    let info = js.get_stream(stream).await.ok()?.consumer_info(durable).await.ok()?;
    (info.num_ack_pending == 0 && info.num_pending == 0 && info.ack_floor.stream_sequence >= through).then_some(info)
}

pub async fn consumer_settled(js: &jetstream::Context, stream: &str, durable: &str, through: u64) -> bool {
    settled_consumer(js, stream, durable, through).await.is_some()
}

/// Waits until the consumer `tool` on TOOL has settled through `through`, so the app has seen
/// all it ever will.
pub async fn settled(js: &jetstream::Context, through: u64) -> jetstream::consumer::Info {
    eventually("the consumer to settle", Duration::from_secs(20), || settled_consumer(js, "TOOL", "tool", through)).await
}

/// Answers every request on `subject` with `f(message)`.
pub async fn responder(
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

/// Answers each request on `subject` in a task of its own, `f` given a client to answer
/// with and the message: answers may overtake one another.
pub async fn answer_each<F, Fut>(nats: &NatsServer, subject: &str, f: F) -> tokio::task::JoinHandle<()>
where
    F: Fn(async_nats::Client, async_nats::Message) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let client = nats.client().await;
    let mut sub = subscribe_synced(&client, subject).await;
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            tokio::spawn(f(client.clone(), m));
        }
    })
}
