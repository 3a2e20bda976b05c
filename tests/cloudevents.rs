//! `codec = "cloudevents"` against an independent CloudEvents SDK (npm `cloudevents`, pinned
//! in tests/node, installed by scripts/node-env): the SDK writes events (binary and
//! structured HTTP) that go out through the sidecar's egress onto JetStream, and the SDK,
//! as the app behind an inbound route, reads what the sidecar delivers. The NATS message in
//! between is checked against the NATS binding (binary mode, `ce-*` headers).

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::ChildStdout;

use support::fixtures::*;
use support::*;

const SCHEMA: &str = r#"{"$schema":"https://json-schema.org/draft/2020-12/schema","type":"object","required":["order_id"],
  "properties":{"order_id":{"type":"string"}}}"#;

fn node(args: &[&str]) -> tokio::process::Command {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(root.join("scripts/node-env")).output().unwrap();
    assert!(out.status.success(), "scripts/node-env failed: {}", String::from_utf8_lossy(&out.stderr));
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(root.join("tests/node/cloudevents_interop.cjs")).args(args).kill_on_drop(true);
    cmd
}

/// Sends with the SDK; the sidecar's answer.
async fn emit(url: &str, mode: &str, event: &Value, headers: &Value) -> Value {
    let out = node(&["emit", url, mode, &event.to_string(), &headers.to_string()]).output().await.unwrap();
    assert!(out.status.success(), "emit: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>) -> Value {
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await.expect("the SDK app printed").unwrap().unwrap();
    serde_json::from_str(&line).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_written_by_the_sdk_cross_the_bridge_and_are_read_by_the_sdk() {
    let nats = NatsServer::start();
    let js = jetstream::new(nats.client().await);
    js.create_stream(jetstream::stream::Config { name: "EVENTS".into(), subjects: vec!["events.>".into()], ..Default::default() })
        .await
        .unwrap();
    dlq_stream(&js).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("contracts/order.created")).unwrap();
    let schema = dir.path().join("contracts/order.created/v1.json");
    std::fs::write(&schema, SCHEMA).unwrap();

    // The app: the SDK reading every request as an event.
    let mut app = node(&["receive"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(app.stdout.take().unwrap()).lines();
    let port = next_line(&mut lines).await["port"].as_u64().unwrap();

    let routes = format!(
        "[[outbound]]\nname = \"order-events\"\npath = \"/events/{{kind}}\"\nmode = \"jetstream\"\nsubject = \"events.{{kind}}\"\n\
         codec = \"cloudevents\"\nce_type = \"com.example.order.created\"\nschema = {:?}\n\n\
         [[inbound]]\nname = \"on-event\"\nsubject = \"events.>\"\nmode = \"jetstream\"\nstream = \"EVENTS\"\ndurable = \"on-event\"\n\
         path = \"/ce\"\ncodec = \"cloudevents\"\ndeliver = \"all\"\ndead_letter = \"dlq.on-event\"\nschemas = [{:?}]\n",
        schema.display().to_string(),
        schema.display().to_string()
    );
    let sidecar = Sidecar::start(&routes_toml("shop", "3s", &routes), &nats.url(), Some(&format!("http://127.0.0.1:{port}"))).await;
    sidecar.wait_ready().await;
    let url = sidecar.url("/events/created");
    let stream = js.get_stream("EVENTS").await.unwrap();

    // 1. Binary mode, SDK → sidecar: the attributes are kept and travel as ce-* headers.
    let data = json!({"order_id": "o-1", "note": "Jürgen's order"});
    let binary = json!({"id": "evt-1", "source": "/billing", "type": "order.created", "subject": "o-1", "tenant": "acme",
        "datacontenttype": "application/json", "time": "2026-01-02T03:04:05.678Z", "data": data});
    let r = emit(&url, "binary", &binary, &json!({})).await;
    assert_eq!(r["status"], 202, "{r}");
    let m = stream.get_raw_message(1).await.unwrap();
    let h = |n: &str| m.headers.get(n).map(|v| v.as_str().to_owned());
    for (name, want) in [
        ("ce-id", "evt-1"),
        ("ce-source", "/billing"),
        ("ce-type", "order.created"),
        ("ce-specversion", "1.0"),
        ("ce-time", "2026-01-02T03:04:05.678Z"),
        ("ce-datacontenttype", "application/json"),
        ("ce-subject", "o-1"),
        ("ce-tenant", "acme"),
        ("ce-dataschema", "urn:natsbridge:contract:order.created/v1"),
        ("Nats-Msg-Id", "evt-1"),
        ("Bridge-Schema", "order.created/v1"),
    ] {
        assert_eq!(h(name).as_deref(), Some(want), "{name}: {:?}", m.headers);
    }
    assert_eq!(serde_json::from_slice::<Value>(&m.payload).unwrap(), data, "the payload is the data alone");

    // … and sidecar → SDK: the app reads a binary-mode HTTP CloudEvent with the same attributes.
    let got = next_line(&mut lines).await;
    let e = &got["event"];
    assert!(!got["mode"].as_str().unwrap_or_default().contains("cloudevents"), "binary mode: {got}");
    for k in ["id", "source", "type", "subject", "tenant", "time", "datacontenttype"] {
        assert_eq!(e[k], binary[k], "{k}: {got}");
    }
    assert_eq!((&e["specversion"], &e["data"]), (&json!("1.0"), &data), "{got}");
    assert_eq!(e["dataschema"], "urn:natsbridge:contract:order.created/v1", "{got}");

    // 2. Structured mode, SDK → sidecar: read, then carried in binary mode the same way.
    let structured = json!({"id": "evt-2", "source": "/billing", "type": "order.updated", "data": {"order_id": "o-2"}});
    let r = emit(&url, "structured", &structured, &json!({})).await;
    assert_eq!(r["status"], 202, "{r}");
    let m = stream.get_raw_message(2).await.unwrap();
    assert_eq!(m.headers.get("ce-id").map(|v| v.as_str()), Some("evt-2"));
    assert_eq!(m.headers.get("ce-type").map(|v| v.as_str()), Some("order.updated"));
    let got = next_line(&mut lines).await;
    assert_eq!(
        (&got["event"]["id"], &got["event"]["type"], &got["event"]["data"]),
        (&json!("evt-2"), &json!("order.updated"), &structured["data"]),
        "{got}"
    );

    // 3. A plain HTTP request becomes an event: id = Idempotency-Key (= Nats-Msg-Id),
    //    source /<service>/<route>, type = ce_type, time now.
    let plain = json!({"data": {"order_id": "o-3"}});
    let r = emit(&url, "plain", &plain, &json!({"Idempotency-Key": "k-3"})).await;
    assert_eq!(r["status"], 202, "{r}");
    let m = stream.get_raw_message(3).await.unwrap();
    assert_eq!(m.headers.get("Nats-Msg-Id").map(|v| v.as_str()), Some("k-3"));
    let got = next_line(&mut lines).await;
    let e = &got["event"];
    assert_eq!(
        (&e["id"], &e["source"], &e["type"]),
        (&json!("k-3"), &json!("/shop/order-events"), &json!("com.example.order.created")),
        "{got}"
    );
    assert_eq!(e["data"], plain["data"]);
    assert!(e["time"].as_str().is_some_and(|t| t.starts_with("20")), "{got}");
    // The same key again is the same event: deduplicated by the stream.
    let r = emit(&url, "plain", &plain, &json!({"Idempotency-Key": "k-3"})).await;
    assert_eq!(serde_json::from_str::<Value>(r["body"].as_str().unwrap()).unwrap()["duplicate"], true, "{r}");

    // 4. The contract holds for events too: data breaking it never leaves.
    let bad = json!({"id": "evt-4", "source": "/billing", "type": "order.created", "data": {"order_id": 4}});
    let r = emit(&url, "binary", &bad, &json!({})).await;
    assert_eq!(r["status"], 422, "{r}");
    let r =
        emit(&url, "structured", &json!({"id": "evt-5", "source": "/billing", "type": "t", "specversion": "0.3", "data": {}}), &json!({}))
            .await;
    assert!(r["status"] == 400 || r["status"] == 422, "{r}");

    // 5. A message published without CloudEvents attributes still reaches the app as one.
    js_publish(&js, "events.raw", &[("Nats-Msg-Id", "raw-1"), ("Content-Type", "application/json")], r#"{"order_id":"o-6"}"#).await;
    let got = next_line(&mut lines).await;
    let e = &got["event"];
    assert_eq!((&e["id"], &e["source"], &e["type"]), (&json!("raw-1"), &json!("nats:events.raw"), &json!("events.raw")), "{got}");
    assert_eq!(e["data"], json!({"order_id": "o-6"}));

    // 6. Ingress: `ce-dataschema` names the version; one the route does not accept is
    //    dead-lettered (schema-version) and never reaches the app.
    let ce = |id: &'static str, schema: &'static str| {
        vec![("ce-id", id), ("ce-source", "/x"), ("ce-type", "t"), ("ce-specversion", "1.0"), ("ce-dataschema", schema)]
    };
    js_publish(&js, "events.v", &ce("v9", "urn:natsbridge:contract:order.created/v9"), r#"{"order_id":"o-7"}"#).await;
    js_publish(&js, "events.v", &ce("v1", "https://schemas.example.com/order.created/v1.json"), r#"{"order_id":"o-8"}"#).await;
    let got = next_line(&mut lines).await;
    assert_eq!(got["event"]["id"], "v1", "the v9 event reached the app: {got}");
    let dl = js.get_stream("DLQ").await.unwrap().get_raw_message(1).await.unwrap();
    assert_eq!(dl.headers.get("Bridge-Dlq-Reason").map(|v| v.as_str()), Some("schema-version"));
    assert_eq!(dl.headers.get("ce-id").map(|v| v.as_str()), Some("v9"));
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_structured_event_is_dead_lettered_as_malformed() {
    let nats = NatsServer::start();
    let js = jetstream::new(nats.client().await);
    js.create_stream(jetstream::stream::Config { name: "EVENTS".into(), subjects: vec!["events.>".into()], ..Default::default() })
        .await
        .unwrap();
    dlq_stream(&js).await;
    let app = App::start(|_| respond(200, "ok")).await;
    let routes =
        "[[inbound]]\nname = \"on-event\"\nsubject = \"events.>\"\nmode = \"jetstream\"\nstream = \"EVENTS\"\ndurable = \"on-event\"\n\
                  path = \"/ce\"\ncodec = \"cloudevents\"\ndeliver = \"all\"\ndead_letter = \"dlq.on-event\"\n";
    let sidecar = Sidecar::start(&routes_toml("shop", "3s", routes), &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    js_publish(&js, "events.x", &[("Content-Type", "application/cloudevents+json")], r#"{"specversion":"1.0","id":"1","type":"t"}"#).await;
    let dlq = js.get_stream("DLQ").await.unwrap();
    let dl = eventually("a dead letter", Duration::from_secs(20), || {
        let dlq = dlq.clone();
        async move { dlq.get_raw_message(1).await.ok() }
    })
    .await;
    assert_eq!(dl.headers.get("Bridge-Dlq-Reason").map(|v| v.as_str()), Some("malformed"));
    assert!(dl.headers.get("Bridge-Dlq-Error").is_some_and(|v| v.as_str().contains("source")), "{:?}", dl.headers);
    assert!(app.hits().is_empty());
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_route_gives_the_app_an_event_and_refuses_an_invalid_one() {
    let nats = NatsServer::start();
    let app = App::start(|_| respond(200, "done")).await;
    let routes = "[[inbound]]\nname = \"ask\"\nsubject = \"ask\"\nmode = \"request\"\npath = \"/ask\"\ncodec = \"cloudevents\"\n";
    let sidecar = Sidecar::start(&routes_toml("shop", "3s", routes), &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    let client = nats.client().await;
    let within = Duration::from_secs(10);
    let bad = r#"{"specversion":"1.0","id":"1","type":"t"}"#;
    let r = nats_request_within(&client, "ask", &[("Content-Type", "application/cloudevents+json")], bad, within).await.unwrap();
    assert_eq!(reply_header(&r, "Bridge-Status"), Some("400"));
    assert!(app.hits().is_empty());
    let good = r#"{"specversion":"1.0","id":"e-1","source":"/q","type":"ask.it","subject":"Jürgen x","data":{"q":1}}"#;
    let r = nats_request_within(&client, "ask", &[("Content-Type", "application/cloudevents+json")], good, within).await.unwrap();
    assert_eq!((reply_header(&r, "Bridge-Status"), &r.payload[..]), (Some("200"), &b"done"[..]));
    let hit = &app.hits()[0];
    assert_eq!((hit.header("ce-id"), hit.header("ce-source"), hit.header("ce-type")), (Some("e-1"), Some("/q"), Some("ask.it")));
    assert_eq!(hit.header("ce-subject"), Some("J%C3%BCrgen%20x"), "percent-encoded on HTTP");
    assert_eq!(hit.header("content-type"), Some("application/json"));
    assert_eq!(&hit.seen.body[..], br#"{"q":1}"#);
    sidecar.stop().await;
}
