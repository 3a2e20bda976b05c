//! Versioned contracts checked at the border (`schema` / `schemas` on a route), with a real
//! sidecar, nats-server and app: an invalid body never leaves, a valid one carries
//! `Bridge-Schema`; an invalid inbound message never reaches the app (dead-lettered on a
//! jetstream route, answered 422 on a request route).

mod support;

use std::time::Duration;

use futures::StreamExt;

use support::fixtures::*;
use support::*;

const SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["order_id", "amount"],
  "properties": {
    "order_id": { "type": "string" },
    "amount": { "type": "number", "exclusiveMinimum": 0 }
  }
}"#;

/// v2 adds a required `currency`.
const SCHEMA_V2: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["order_id", "amount", "currency"],
  "properties": {
    "order_id": { "type": "string" },
    "amount": { "type": "number", "exclusiveMinimum": 0 },
    "currency": { "type": "string", "pattern": "^[A-Z]{3}$" }
  }
}"#;

fn contracts_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("contracts/order.created")).unwrap();
    std::fs::write(dir.path().join("contracts/order.created/v1.json"), SCHEMA).unwrap();
    std::fs::write(dir.path().join("contracts/order.created/v2.json"), SCHEMA_V2).unwrap();
    dir
}

fn schema_path(dir: &tempfile::TempDir, version: u32) -> String {
    dir.path().join(format!("contracts/order.created/v{version}.json")).display().to_string()
}

#[tokio::test]
async fn an_invalid_body_never_leaves_and_a_valid_one_names_its_version() {
    let nats = NatsServer::start();
    let dir = contracts_dir();
    let schema = dir.path().join("contracts/order.created/v1.json");
    let routes = format!(
        "[[outbound]]\nname = \"order-created\"\npath = \"/orders\"\nmode = \"publish\"\nsubject = \"order.created\"\nschema = {:?}\n",
        schema.display().to_string()
    );
    let sidecar = Sidecar::start(&routes_toml("shop", "3s", &routes), &nats.url(), None).await;
    sidecar.wait_nats().await;
    let watcher = nats.client().await;
    let mut seen = subscribe_synced(&watcher, "order.created").await;

    let r = post(&sidecar.url("/orders"), r#"{"amount": -1, "note": 3}"#).await;
    assert_eq!(r.status, 422);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let p = r.json();
    assert_eq!(p["type"], "urn:natsbridge:problem:contract-violation");
    assert_eq!(p["schema"], "order.created/v1");
    let mut v: Vec<(String, String)> = p["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["instance"].as_str().unwrap().to_owned(), v["keyword"].as_str().unwrap().to_owned()))
        .collect();
    v.sort();
    assert_eq!(v, [("".to_owned(), "required".to_owned()), ("/amount".to_owned(), "exclusiveMinimum".to_owned())]);
    assert!(p["violations"].as_array().unwrap().iter().all(|v| !v["message"].as_str().unwrap().is_empty()));
    let r = post(&sidecar.url("/orders"), "not json").await;
    assert_eq!((r.status, r.json()["violations"][0]["keyword"].clone()), (422, serde_json::json!("json")));

    // The valid one is the first and only message the subscriber sees.
    let r = post(&sidecar.url("/orders"), r#"{"order_id": "o-1", "amount": 9.5}"#).await;
    assert_eq!(r.status, 202);
    let m = tokio::time::timeout(Duration::from_secs(10), seen.next()).await.expect("the valid order was published").unwrap();
    assert_eq!(&m.payload[..], br#"{"order_id": "o-1", "amount": 9.5}"#);
    assert_eq!(m.headers.as_ref().and_then(|h| h.get("Bridge-Schema")).map(|v| v.as_str()), Some("order.created/v1"));
}

#[test]
fn check_reports_a_broken_schema_with_its_route() {
    let dir = contracts_dir();
    std::fs::create_dir_all(dir.path().join("contracts/order.paid")).unwrap();
    std::fs::write(dir.path().join("contracts/order.paid/v1.json"), r#"{"type": "objekt"}"#).unwrap();
    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        "[sidecar]\nservice = \"shop\"\n\n[[outbound]]\nname = \"ok\"\npath = \"/a\"\nmode = \"publish\"\nsubject = \"a\"\nschema = \"contracts/order.created/v1.json\"\n\n\
         [[outbound]]\nname = \"paid\"\npath = \"/b\"\nmode = \"publish\"\nsubject = \"b\"\nschema = \"contracts/order.paid/v1.json\"\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(&routes).unwrap();
    let line = 1 + text.lines().position(|l| l.contains("order.paid")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_natsbridge")).arg("check").arg(&routes).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("routes.toml:{line}:")) && err.contains("\"paid\"") && err.contains("contracts/order.paid/v1.json"),
        "{err}"
    );
    assert!(err.contains("not a valid JSON Schema"), "{err}");
    assert!(!err.contains("\"ok\""), "{err}");
}

#[tokio::test]
async fn an_app_names_its_version_and_an_unknown_one_is_refused() {
    let nats = NatsServer::start();
    let dir = contracts_dir();
    let routes = format!(
        "[[outbound]]\nname = \"order-created\"\npath = \"/orders\"\nmode = \"publish\"\nsubject = \"order.created\"\nschemas = [{:?}, {:?}]\n",
        schema_path(&dir, 1),
        schema_path(&dir, 2)
    );
    let sidecar = Sidecar::start(&routes_toml("shop", "3s", &routes), &nats.url(), None).await;
    sidecar.wait_nats().await;
    let watcher = nats.client().await;
    let mut seen = subscribe_synced(&watcher, "order.created").await;
    let v1 = r#"{"order_id": "o-1", "amount": 2}"#;
    // Unnamed: the newest version, which this v1 body breaks.
    let r = post(&sidecar.url("/orders"), v1).await;
    assert_eq!((r.status, r.json()["schema"].clone()), (422, serde_json::json!("order.created/v2")), "{}", r.text());
    let r = call("POST", &sidecar.url("/orders"), &[("Bridge-Schema", "order.created/v7")], v1.to_owned()).await;
    assert_eq!((r.status, r.json()["type"].clone()), (422, serde_json::json!("urn:natsbridge:problem:contract-version")), "{}", r.text());
    let r = call("POST", &sidecar.url("/orders"), &[("Bridge-Schema", "order.created/v1")], v1.to_owned()).await;
    assert_eq!(r.status, 202, "{}", r.text());
    let m = tokio::time::timeout(Duration::from_secs(10), seen.next()).await.expect("the v1 order was published").unwrap();
    assert_eq!(m.headers.as_ref().and_then(|h| h.get("Bridge-Schema")).map(|v| v.as_str()), Some("order.created/v1"));
    let metrics = sidecar.metrics().await;
    for (reason, n) in [("schema", 1.0), ("schema-version", 1.0)] {
        let series = format!(r#"natsbridge_contract_violations_total{{direction="egress",reason="{reason}",route="order-created"}}"#);
        assert_eq!(metric(&metrics, &series), Some(n), "{series}\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_ingress_dead_letters_what_breaks_the_contract_and_the_app_never_sees_it() {
    use async_nats::jetstream;
    let nats = NatsServer::start();
    let dir = contracts_dir();
    let js = jetstream::new(nats.client().await);
    js.create_stream(jetstream::stream::Config { name: "ORDERS".into(), subjects: vec!["order.>".into()], ..Default::default() })
        .await
        .unwrap();
    dlq_stream(&js).await;
    let app = App::start(|_| respond(200, "ok")).await;
    let routes = format!(
        "[[inbound]]\nname = \"orders\"\nsubject = \"order.created\"\nmode = \"jetstream\"\nstream = \"ORDERS\"\ndurable = \"orders\"\n\
         path = \"/orders\"\ndead_letter = \"dlq.orders\"\ndeliver = \"all\"\nmax_deliver = 5\nschemas = [{:?}, {:?}]\n",
        schema_path(&dir, 1),
        schema_path(&dir, 2)
    );
    let sidecar = Sidecar::start(&routes_toml("shop", "3s", &routes), &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    let v2 = r#"{"order_id":"o-2","amount":3,"currency":"EUR"}"#;
    let v1 = r#"{"order_id":"o-1","amount":2}"#;
    js_publish(&js, "order.created", &[], v2).await; // unnamed: the newest, satisfied
    js_publish(&js, "order.created", &[("Bridge-Schema", "order.created/v1")], v1).await; // named v1, satisfied
    js_publish(&js, "order.created", &[("Nats-Msg-Id", "m-3")], v1).await; // unnamed: v2, no currency
    js_publish(&js, "order.created", &[("Bridge-Schema", "order.created/v9")], v2).await; // unknown version
    let last = js_publish(&js, "order.created", &[("Bridge-Schema", "order.created/v1")], "not json").await.sequence;
    eventually("the consumer to settle", Duration::from_secs(20), || settled_consumer(&js, "ORDERS", "orders", last)).await;
    eventually("three dead letters", Duration::from_secs(20), || async { (stream_messages(&js, "DLQ").await == 3).then_some(()) }).await;

    // Deliveries are handled concurrently, so the app may see the two in either order.
    let mut seen: Vec<(String, String)> = app
        .hits()
        .iter()
        .map(|h| (String::from_utf8_lossy(&h.seen.body).into_owned(), h.header("bridge-schema").unwrap_or_default().to_owned()))
        .collect();
    seen.sort();
    let mut want = vec![(v2.to_owned(), "order.created/v2".to_owned()), (v1.to_owned(), "order.created/v1".to_owned())];
    want.sort();
    assert_eq!(seen, want, "only conforming messages reach the app, each with the version it satisfied");

    let dlq = js.get_stream("DLQ").await.unwrap();
    let mut letters = Vec::new();
    for seq in 1..=3 {
        let m = dlq.get_raw_message(seq).await.unwrap();
        let h = |n: &str| m.headers.get(n).map(|v| v.as_str().to_owned()).unwrap_or_default();
        letters.push((h("Bridge-Dlq-Seq"), h("Bridge-Dlq-Reason"), h("Bridge-Dlq-Error"), h("Bridge-Dlq-Deliveries"), m.payload.clone()));
    }
    letters.sort();
    let (seq, reason, error, deliveries, payload) = &letters[0];
    assert_eq!((seq.as_str(), reason.as_str(), deliveries.as_str(), &payload[..]), ("3", "schema", "1", v1.as_bytes()));
    assert!(error.starts_with("order.created/v2: / required:") && error.contains("currency"), "{error}");
    let (seq, reason, error, ..) = &letters[1];
    assert_eq!((seq.as_str(), reason.as_str()), ("4", "schema-version"));
    assert!(error.contains("order.created/v9") && error.contains("order.created/v1, order.created/v2"), "{error}");
    let (seq, reason, error, ..) = &letters[2];
    assert_eq!((seq.as_str(), reason.as_str()), ("5", "schema"));
    assert!(error.starts_with("order.created/v1: / json: not JSON"), "{error}");

    let metrics = sidecar.metrics().await;
    for (series, n) in [
        (r#"natsbridge_contract_violations_total{direction="ingress",reason="schema",route="orders"}"#, 2.0),
        (r#"natsbridge_contract_violations_total{direction="ingress",reason="schema-version",route="orders"}"#, 1.0),
        (r#"natsbridge_dlq_published_total{reason="schema",route="orders"}"#, 2.0),
        (r#"natsbridge_dlq_published_total{reason="schema-version",route="orders"}"#, 1.0),
        (r#"natsbridge_ingress_outcomes_total{outcome="term",route="orders"}"#, 3.0),
    ] {
        assert_eq!(metric(&metrics, series), Some(n), "{series}\n{metrics}");
    }
    assert_eq!(app.hits().len(), 2, "terminated originals are not redelivered");
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ingress_answers_422_for_what_breaks_the_contract() {
    let nats = NatsServer::start();
    let dir = contracts_dir();
    let app = App::start(|_| respond(201, r#"{"ok":true}"#)).await;
    let routes = format!(
        "[[inbound]]\nname = \"create\"\nsubject = \"orders.create\"\nmode = \"request\"\npath = \"/orders\"\nschema = {:?}\n\n\
         [[inbound]]\nname = \"nest-create\"\nmode = \"request\"\ncodec = \"nestjs\"\npattern = \"orders.nest\"\npath = \"/orders\"\nschema = {:?}\n",
        schema_path(&dir, 1),
        schema_path(&dir, 1)
    );
    let sidecar = Sidecar::start(&routes_toml("shop", "3s", &routes), &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    let client = nats.client().await;
    let within = Duration::from_secs(10);

    let r = nats_request_within(&client, "orders.create", &[], r#"{"amount":0}"#, within).await.unwrap();
    assert_eq!(reply_header(&r, "Bridge-Status"), Some("422"));
    assert_eq!(reply_header(&r, "Content-Type"), Some("application/problem+json"));
    let p: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(
        (p["type"].as_str(), p["schema"].as_str(), p["route"].as_str()),
        (Some("urn:natsbridge:problem:contract-violation"), Some("order.created/v1"), Some("create"))
    );
    let mut kw: Vec<_> = p["violations"].as_array().unwrap().iter().map(|v| v["keyword"].as_str().unwrap().to_owned()).collect();
    kw.sort();
    assert_eq!(kw, ["exclusiveMinimum", "required"]);
    let r =
        nats_request_within(&client, "orders.create", &[("Bridge-Schema", "order.created/v2")], r#"{"order_id":"a","amount":1}"#, within)
            .await
            .unwrap();
    assert_eq!(reply_header(&r, "Bridge-Status"), Some("422"));
    assert!(String::from_utf8_lossy(&r.payload).contains("contract-version"));
    assert!(app.hits().is_empty(), "the app saw a refused message");

    // A Nest client gets its error packet, the violations inside, for the data it sent.
    let packet = r#"{"pattern":"orders.nest","data":{"order_id":7,"amount":1},"id":"n-1"}"#;
    let r = nats_request_within(&client, "orders.nest", &[], packet, within).await.unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!((reply["id"].as_str(), reply["isDisposed"].as_bool()), (Some("n-1"), Some(true)), "{reply}");
    assert_eq!(reply["err"]["statusCode"], 422, "{reply}");
    assert_eq!(reply["err"]["violations"][0]["instance"], "/order_id", "{reply}");
    assert!(app.hits().is_empty(), "the app saw a refused message");

    let r = nats_request_within(&client, "orders.create", &[], r#"{"order_id":"a","amount":1}"#, within).await.unwrap();
    assert_eq!(reply_header(&r, "Bridge-Status"), Some("201"));
    let packet = r#"{"pattern":"orders.nest","data":{"order_id":"b","amount":1},"id":"n-2"}"#;
    let r = nats_request_within(&client, "orders.nest", &[], packet, within).await.unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(reply["response"]["ok"], true, "{reply}");
    let hits = app.hits();
    assert_eq!(hits.len(), 2);
    assert!(hits.iter().all(|h| h.header("bridge-schema") == Some("order.created/v1")));
    let metrics = sidecar.metrics().await;
    let series = r#"natsbridge_contract_violations_total{direction="ingress",reason="schema",route="create"}"#;
    assert_eq!(metric(&metrics, series), Some(1.0), "{metrics}");
    sidecar.stop().await;
}

#[test]
fn check_refuses_mixed_or_duplicate_versions_and_contracts_on_tunnels() {
    let dir = contracts_dir();
    std::fs::create_dir_all(dir.path().join("contracts/order.paid")).unwrap();
    std::fs::write(dir.path().join("contracts/order.paid/v1.json"), "{}").unwrap();
    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        "[sidecar]\nservice = \"shop\"\n\n\
         [[inbound]]\nname = \"mixed\"\nsubject = \"a\"\nmode = \"request\"\npath = \"/a\"\nschemas = [\"contracts/order.created/v1.json\", \"contracts/order.paid/v1.json\"]\n\n\
         [[inbound]]\nname = \"both\"\nsubject = \"b\"\nmode = \"request\"\npath = \"/b\"\nschema = \"contracts/order.created/v1.json\"\nschemas = [\"contracts/order.created/v2.json\"]\n\n\
         [[inbound]]\nname = \"tun\"\nmode = \"tunnel\"\nschema = \"contracts/order.created/v1.json\"\n\n\
         [[inbound]]\nname = \"twice\"\nsubject = \"c\"\nmode = \"request\"\npath = \"/c\"\nschemas = [\"contracts/order.created/v1.json\", \"contracts/order.created/v1.json\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_natsbridge")).arg("check").arg(&routes).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    for want in [
        "route \"mixed\": `schemas` must be versions of one contract",
        "route \"both\": set `schema` or `schemas`, not both",
        "route \"tun\": `schema` does not apply to mode \"tunnel\"",
        "route \"twice\": `schemas` names version order.created/v1 twice",
    ] {
        assert!(err.contains(want), "{want}\n{err}");
    }
}
