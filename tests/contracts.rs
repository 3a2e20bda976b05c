//! Versioned contracts checked at the border (`schema` on a route), with a real sidecar and
//! nats-server: an invalid body never leaves, a valid one carries `Bridge-Schema`.

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

fn contracts_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("contracts/order.created")).unwrap();
    std::fs::write(dir.path().join("contracts/order.created/v1.json"), SCHEMA).unwrap();
    dir
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
