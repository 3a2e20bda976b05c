//! `codec = "nestjs"` against real @nestjs/microservices processes, Nest 10 (the major the
//! platform's plan names; tests/node) and Nest 11 (the current major; tests/node/nest11),
//! both installed by scripts/node-env with `npm ci`: a Nest ClientProxy calls an HTTP app
//! behind the sidecar, and the sidecar calls a Nest microservice.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncBufReadExt, BufReader};

use support::fixtures::*;
use support::*;

/// A Nest major under test: its version prefix and the folder its packages install into.
#[derive(Clone, Copy)]
struct Nest {
    major: &'static str,
    dir: &'static str,
}

const NEST10: Nest = Nest { major: "10.", dir: "tests/node" };
const NEST11: Nest = Nest { major: "11.", dir: "tests/node/nest11" };

fn node(nest: Nest, mode: &str, nats: &NatsServer) -> tokio::process::Command {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // node-env takes a lock and skips an up-to-date install, so every caller may run it.
    let out = std::process::Command::new(root.join("scripts/node-env")).output().unwrap();
    assert!(out.status.success(), "scripts/node-env failed: {}", String::from_utf8_lossy(&out.stderr));
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(root.join("tests/node/nest_interop.cjs")).arg(mode).arg(nats.url()).env("NEST_DIR", root.join(nest.dir)).kill_on_drop(true);
    cmd
}

const INBOUND: &str = r#"
[[inbound]]
name = "greet"
subject = "svc.greet"
mode = "request"
method = "POST"
path = "/greet"
codec = "nestjs"

[[inbound]]
name = "lookup"
pattern = { cmd = "lookup" }
mode = "request"
method = "POST"
path = "/lookup"
codec = "nestjs"

[[inbound]]
name = "list"
subject = "svc.list"
mode = "request"
method = "GET"
path = "/list"
codec = "nestjs"

[[inbound]]
name = "created"
subject = "svc.created"
mode = "request"
method = "POST"
path = "/created"
codec = "nestjs"
"#;

#[tokio::test]
async fn a_nest10_client_proxy_calls_an_http_app_behind_the_sidecar() {
    client_proxy_calls_an_http_app(NEST10).await;
}

#[tokio::test]
async fn a_nest11_client_proxy_calls_an_http_app_behind_the_sidecar() {
    client_proxy_calls_an_http_app(NEST11).await;
}

async fn client_proxy_calls_an_http_app(nest: Nest) {
    let nats = NatsServer::start();
    let app = App::start(|seen| match seen.uri.as_str() {
        "/greet" => {
            let v: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
            with_headers(200, &[("content-type", "application/json")], &serde_json::json!({ "hello": v["name"] }).to_string())
        }
        "/lookup" => with_headers(404, &[("content-type", "application/json")], r#"{"message":"no such id"}"#),
        "/list" => with_headers(200, &[("content-type", "application/json")], "[1,2]"),
        _ => respond(204, ""),
    })
    .await;
    let sidecar = Sidecar::start(&routes_toml("svc", "3s", INBOUND), &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    let out = tokio::time::timeout(Duration::from_secs(60), node(nest, "client", &nats).output()).await.expect("client finished").unwrap();
    assert!(out.status.success(), "nest client failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["nest"].as_str().unwrap().starts_with(nest.major), "{}", v["nest"]);
    assert_eq!(v["greet"], serde_json::json!({"hello": "nest"}));
    // A 404 from the app is Nest's `err`, with the status and the app's message.
    assert_eq!(v["lookup"], serde_json::json!({"statusCode": 404, "message": "no such id"}));
    assert_eq!(v["list"], serde_json::json!([[1, 2]]));
    let hits = app.wait_hits(4).await;
    let greet = hits.iter().find(|h| h.seen.uri == "/greet").unwrap();
    assert_eq!(greet.header("bridge-pattern"), Some("svc.greet"));
    assert_eq!(greet.header("content-type"), Some("application/json"));
    let lookup = hits.iter().find(|h| h.seen.uri == "/lookup").unwrap();
    assert_eq!(lookup.header("bridge-pattern"), Some(r#"{"cmd":"lookup"}"#));
    assert_eq!(&lookup.seen.body[..], br#"{"id":7}"#);
    let created = hits.iter().find(|h| h.seen.uri == "/created").unwrap();
    assert_eq!(&created.seen.body[..], br#"{"id":1}"#);
}

/// A POST whose body is read as it streams: the head, the body, and how it ended
/// (`Err`: aborted).
async fn stream(url: &str, body: &str, accept: Option<&str>) -> (Reply, String, Result<(), String>) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::post(url);
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let req = req.body(Full::new(Bytes::copy_from_slice(body.as_bytes()))).unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), client.request(req)).await.expect("a response head in time").unwrap();
    let (parts, mut incoming) = res.into_parts();
    let (bytes, end) = support::streaming::read_all(&mut incoming, Duration::from_secs(20)).await;
    let head = Reply { status: parts.status.as_u16(), headers: parts.headers, body: Bytes::new() };
    (head, String::from_utf8(bytes).unwrap(), end)
}

const OUTBOUND: &str = r#"
[[outbound]]
name = "sum"
path = "/sum"
mode = "request"
codec = "nestjs"
pattern = { cmd = "sum" }

[[outbound]]
name = "count"
path = "/count"
mode = "request"
codec = "nestjs"
subject = "nest.count"

[[outbound]]
name = "fail"
path = "/fail"
mode = "request"
codec = "nestjs"
subject = "nest.fail"

[[outbound]]
name = "boom"
path = "/boom"
mode = "request"
codec = "nestjs"
subject = "nest.boom"

[[outbound]]
name = "flaky"
path = "/flaky"
mode = "request"
codec = "nestjs"
subject = "nest.flaky"

[[outbound]]
name = "hang"
path = "/hang"
mode = "request"
codec = "nestjs"
subject = "nest.hang"
stream_stall = "500ms"

[[outbound]]
name = "nobody"
path = "/nobody"
mode = "request"
codec = "nestjs"
subject = "nest.nobody"

[[outbound]]
name = "event"
path = "/event"
mode = "publish"
codec = "nestjs"
subject = "nest.event"
"#;

#[tokio::test]
async fn the_sidecar_calls_a_nest10_microservice() {
    sidecar_calls_a_nest_microservice(NEST10).await;
}

#[tokio::test]
async fn the_sidecar_calls_a_nest11_microservice() {
    sidecar_calls_a_nest_microservice(NEST11).await;
}

async fn sidecar_calls_a_nest_microservice(nest: Nest) {
    let nats = NatsServer::start();
    let mut server = node(nest, "server", &nats).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await.expect("server started").unwrap();
    let version = first.as_deref().and_then(|l| l.strip_prefix("ready ")).expect("a ready line");
    assert!(version.starts_with(nest.major), "Nest {version}");
    let sidecar = Sidecar::start(&routes_toml("edge", "3s", OUTBOUND), &nats.url(), None).await;
    sidecar.wait_nats().await;
    let r = eventually("the Nest handler answers", Duration::from_secs(20), || async {
        Some(post(&sidecar.url("/sum"), "[1,2,3]").await).filter(|r| r.status != 503)
    })
    .await;
    assert_eq!((r.status, r.text()), (200, "6".to_owned()));
    assert_eq!(r.header("content-type"), Some("application/json"));

    // An Observable handler: three `response` messages, streamed as NDJSON lines, or as
    // events when the client accepts an event stream.
    let (head, body, end) = stream(&sidecar.url("/count"), "{}", None).await;
    assert_eq!((head.status, head.header("content-type")), (200, Some("application/x-ndjson")));
    assert_eq!((body.as_str(), end), ("1\n2\n3\n", Ok(())));
    let (head, body, end) = stream(&sidecar.url("/count"), "{}", Some("text/event-stream")).await;
    assert_eq!((head.status, head.header("content-type")), (200, Some("text/event-stream")));
    assert_eq!((body.as_str(), end), ("data: 1\n\ndata: 2\n\ndata: 3\n\n", Ok(())));

    // An error after the stream started ends it as an error, never a clean end: the
    // chunked body is aborted, the event stream's last event is `event: error`.
    let (head, body, end) = stream(&sidecar.url("/flaky"), r#"{"values":[1,2]}"#, None).await;
    assert_eq!((head.status, body.as_str()), (200, "1\n2\n"));
    assert!(end.is_err(), "an aborted body, not a clean end");
    let (head, body, end) = stream(&sidecar.url("/flaky"), r#"{"values":["a","b"]}"#, Some("text/event-stream")).await;
    assert_eq!((head.status, end), (200, Ok(())));
    let (values, error) = body.split_once("event: error\n").expect("an error event");
    assert_eq!(values, "data: \"a\"\n\ndata: \"b\"\n\n");
    let problem: serde_json::Value = serde_json::from_str(error.strip_prefix("data: ").unwrap().trim_end()).unwrap();
    assert_eq!((problem["status"].clone(), problem["detail"].clone()), (serde_json::json!(409), serde_json::json!("late")));
    // An error after one value comes before any stream: the error's own status.
    let r = post(&sidecar.url("/flaky"), r#"{"values":[1]}"#).await;
    assert_eq!((r.status, r.header("content-type")), (409, Some("application/problem+json")));
    // A stream that stalls past `stream_stall` (500ms) ends as an error too.
    let (head, body, end) = stream(&sidecar.url("/hang"), "{}", None).await;
    assert_eq!((head.status, body.as_str()), (200, "1\n2\n"));
    assert!(end.is_err(), "a stalled stream is aborted");

    // RpcException({statusCode: 409, …}) → 409 problem+json carrying Nest's error.
    let r = post(&sidecar.url("/fail"), "{}").await;
    assert_eq!(r.status, 409);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let p = r.json();
    assert_eq!(p["error"], serde_json::json!({"statusCode": 409, "message": "taken"}));
    assert_eq!(p["detail"], "taken");
    // RpcException('plain') has no numeric status: 500.
    let r = post(&sidecar.url("/boom"), "{}").await;
    assert_eq!((r.status, r.json()["error"].clone()), (500, serde_json::json!({"status": "error", "message": "plain"})));

    let r = post(&sidecar.url("/nobody"), "{}").await;
    assert_eq!(r.status, 503);
    let r = post(&sidecar.url("/sum"), "not json").await;
    assert_eq!(r.status, 400);

    // emit → @EventPattern: the handler republishes the data it got.
    let watcher = nats.client().await;
    let mut seen = subscribe_synced(&watcher, "nest.seen").await;
    let r = post(&sidecar.url("/event"), r#"{"a":1}"#).await;
    assert_eq!(r.status, 202);
    let m = tokio::time::timeout(Duration::from_secs(20), seen.next()).await.expect("the event handler ran").unwrap();
    assert_eq!(&m.payload[..], br#"{"a":1}"#);
    drop(server);
}
