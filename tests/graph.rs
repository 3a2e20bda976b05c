//! `natsbridge graph FILE…` on the example services in examples/flows (shop, billing,
//! notify): the flows in every format, the loose ends, exit 1 when contract versions
//! disagree, and the picture committed in docs/ being the real output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/flows");
    let mut files: Vec<PathBuf> = ["shop.toml", "billing.toml", "notify.toml"].iter().map(|f| dir.join(f)).collect();
    files.sort();
    files
}

fn graph(files: &[PathBuf], format: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_natsbridge")).arg("graph").args(files).args(["--format", format]).output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn json_has_the_services_subjects_streams_edges_and_loose_ends() {
    let out = graph(&examples(), "json");
    let g: Value = serde_json::from_str(&ok(&out)).unwrap();
    let label = |id: &str| g["nodes"].as_array().unwrap().iter().find(|n| n["id"] == id).map(|n| (n["kind"].clone(), n["label"].clone()));
    let mut labels: Vec<String> = g["nodes"].as_array().unwrap().iter().map(|n| n["label"].as_str().unwrap().to_owned()).collect();
    labels.sort();
    for want in [
        "shop",
        "billing",
        "notify",
        "orders.{kind}",
        "orders.created",
        "ORDERS",
        "PAYMENTS",
        "AUDIT",
        "DLQ",
        "dlq.billing.on-order",
        r#"{"cmd":"quote"}"#,
    ] {
        assert!(labels.iter().any(|l| l == want), "{want} in {labels:?}");
    }
    assert_eq!(label("svc_shop"), Some((Value::from("service"), Value::from("shop"))));
    let edge = |from: &str, to: &str| {
        let from_id = g["nodes"].as_array().unwrap().iter().find(|n| n["label"] == from).unwrap()["id"].clone();
        let to_id = g["nodes"].as_array().unwrap().iter().find(|n| n["label"] == to).unwrap()["id"].clone();
        g["edges"].as_array().unwrap().iter().find(|e| e["from"] == from_id && e["to"] == to_id).cloned().unwrap_or(Value::Null)
    };
    let e = edge("shop", "orders.{kind}");
    assert_eq!(
        (&e["kind"], &e["mode"], &e["codec"], &e["route"]),
        (&"produces".into(), &"jetstream".into(), &"cloudevents".into(), &"shop/order-created".into()),
        "{e}"
    );
    assert_eq!(e["schemas"], serde_json::json!(["order.created/v2"]));
    assert_eq!(edge("orders.{kind}", "ORDERS")["kind"], "stores");
    let e = edge("ORDERS", "billing");
    assert_eq!((&e["kind"], &e["schemas"]), (&"consumes".into(), &serde_json::json!(["order.created/v1", "order.created/v2"])), "{e}");
    assert_eq!(edge("billing", "dlq.billing.on-order")["kind"], "dead_letter");
    assert_eq!(edge("dlq.billing.on-order", "DLQ")["kind"], "stores");
    let e = edge(r#"{"cmd":"quote"}"#, "billing");
    assert_eq!((&e["mode"], &e["codec"]), (&"request".into(), &"nestjs".into()), "{e}");

    let l = &g["loose_ends"];
    assert_eq!(l["unconsumed"], serde_json::json!(["audit.billing"]));
    assert_eq!(l["unproduced"], serde_json::json!(["shipments.dispatched"]));
    assert_eq!(l["streams_without_consumer"], serde_json::json!(["AUDIT"]));
    assert_eq!(l["schema_mismatches"], serde_json::json!([]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"audit.billing\" is sent on but no route consumes it"), "{err}");
    assert!(err.contains("\"shipments.dispatched\" is consumed but no route produces it"), "{err}");
    assert!(err.contains("stream \"AUDIT\" has no consumer"), "{err}");
}

#[test]
fn svg_is_well_formed_xml_with_every_node() {
    let svg = ok(&graph(&examples(), "svg"));
    let doc = roxmltree::Document::parse(&svg).expect("well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let texts: Vec<String> = doc
        .descendants()
        .filter(|n| n.tag_name().name() == "text")
        .map(|n| n.descendants().filter(|d| d.is_text()).filter_map(|d| d.text()).collect::<String>().trim().to_owned())
        .collect();
    let json: Value = serde_json::from_str(&ok(&graph(&examples(), "json"))).unwrap();
    for n in json["nodes"].as_array().unwrap() {
        let label = n["label"].as_str().unwrap();
        assert!(texts.iter().any(|t| t == label), "node {label:?} not drawn; texts: {texts:?}");
    }
    assert!(texts.iter().any(|t| t == "dead letter"), "{texts:?}");
    assert!(texts.iter().any(|t| t.contains("jetstream · cloudevents · order.created/v2")), "{texts:?}");
    assert!(doc.descendants().filter(|n| n.tag_name().name() == "rect").count() >= json["nodes"].as_array().unwrap().len());
}

#[test]
fn mermaid_and_dot_draw_the_same_edges() {
    let m = ok(&graph(&examples(), "mermaid"));
    assert!(m.starts_with("flowchart LR\n"), "{m}");
    assert!(m.contains("svc_shop -->|\"jetstream · cloudevents · order.created/v2\"| subj_orders__kind_"), "{m}");
    assert!(m.contains("svc_billing -.->|\"dead letter\"| subj_dlq_billing_on_order"), "{m}");
    assert!(m.contains("stream_ORDERS[(\"ORDERS\")]"), "{m}");
    let d = ok(&graph(&examples(), "dot"));
    assert!(d.starts_with("digraph natsbridge {") && d.trim_end().ends_with('}'), "{d}");
    assert!(d.contains("svc_billing -> subj_dlq_billing_on_order [label=\"dead letter\", style=dashed];"), "{d}");
    assert!(d.contains("stream_ORDERS [label=\"ORDERS\", shape=cylinder"), "{d}");
}

#[test]
fn disagreeing_contract_versions_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/flows");
    for f in ["shop.toml", "notify.toml"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let billing = std::fs::read_to_string(src.join("billing.toml")).unwrap();
    let v1_only = billing.replace(
        r#"schemas = ["contracts/order.created/v1.json", "contracts/order.created/v2.json"]"#,
        r#"schema = "contracts/order.created/v1.json""#,
    );
    assert_ne!(billing, v1_only);
    std::fs::write(dir.path().join("billing.toml"), v1_only).unwrap();
    for v in ["order.created/v1.json", "order.created/v2.json", "payment.settled/v1.json"] {
        std::fs::create_dir_all(dir.path().join("contracts").join(v).parent().unwrap()).unwrap();
        std::fs::copy(src.join("contracts").join(v), dir.path().join("contracts").join(v)).unwrap();
    }
    let files: Vec<PathBuf> = ["shop.toml", "billing.toml", "notify.toml"].iter().map(|f| dir.path().join(f)).collect();
    let out = graph(&files, "json");
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("error: \"orders.{kind}\": shop/order-created sends order.created/v2 but billing/on-order accepts order.created/v1"),
        "{err}"
    );
    let g: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(g["loose_ends"]["schema_mismatches"][0]["consumer"], "billing/on-order");
}

#[test]
fn a_broken_file_is_reported_and_nothing_drawn() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[sidecar]\nservice = \"x\"\n[[inbound]]\nname = \"a\"\nmode = \"nope\"\n").unwrap();
    let out = graph(&[bad], "mermaid");
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown mode"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_committed_pictures_are_the_real_output() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (file, format) in [("docs/flows.svg", "svg"), ("docs/flows.mmd", "mermaid")] {
        let committed = std::fs::read_to_string(root.join(file)).unwrap();
        assert_eq!(
            committed,
            ok(&graph(&examples(), format)),
            "{file} is stale: natsbridge graph examples/flows/*.toml --format {format} -o {file}"
        );
    }
}
