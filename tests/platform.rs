//! The platform end to end (examples/platform, issue 15): `scripts/demo --once` runs
//! nats-server, the seven services and six sidecars, one workflow (with a tool request sent
//! twice), and the poison path (dead letter → failed workflow → fix → `dlq replay`). This
//! test checks what independent observers recorded: the demo's tap (a plain NATS
//! subscriber on `>`, hops.jsonl), the execution service's SQLite file, the tool's effect
//! file, the `dlq` CLI's output, the sidecars' JSON logs, and the page's token stream as
//! an EventSource-like reader got it through gateway while gateway's sidecar was killed
//! and restarted mid-stream (sse.jsonl).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Messages per subject for one happy workflow and one poison workflow. The happy one's
/// tool request is sent twice (a new message id, as after a lost ack); the poison one's is
/// dead-lettered once and replayed once.
const EXPECTED: &[(&str, usize)] = &[
    ("gateway.auth.authenticated", 2),
    ("natsbridge.tunnel.orchestration", 2),
    ("workflow.execution.started", 2),
    ("workflow.execution.completed", 1),
    ("workflow.execution.failed", 1),
    ("agent.execution.requested", 2),
    ("agent.execution.started", 2),
    ("agent.execution.completed", 2),
    ("model.key.requested", 2),
    ("model.key.retrieved", 2),
    ("model.config.requested", 2),
    ("vector.search.requested", 2),
    ("vector.upsert.requested", 2),
    ("tool.execution.requested", 4),
    ("tool.execution.started", 2),
    ("tool.execution.completed", 2),
    ("dlq.tool.tool-requested", 1),
    ("execution.log.created", 18),
];

fn lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display()))).collect()
}

/// The execution log's rows, read with Python's sqlite3 (the service's own database driver).
fn rows(db: &Path) -> Vec<Value> {
    let out = Command::new("python3")
        .args(["-c", "import json,sqlite3,sys; c=sqlite3.connect(sys.argv[1]); print(json.dumps([dict(zip(('stream','seq','subject','workflow_id','msg_id'),r)) for r in c.execute('SELECT stream,seq,subject,workflow_id,msg_id FROM events')]))"])
        .arg(db)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
}

fn run_demo(work: &Path) -> String {
    let out = Command::new(Path::new(ROOT).join("scripts/demo"))
        .arg("--once")
        .env("PLATFORM_WORK", work)
        .env("NATSBRIDGE_BIN", env!("CARGO_BIN_EXE_natsbridge"))
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/demo");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "scripts/demo --once failed:\n{text}");
    text
}

#[test]
fn the_platform_runs_a_workflow_and_its_failure_path() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let out = run_demo(work);
    let hops = lines(&work.join("hops.jsonl"));

    // Every subject with its count; the execution log is read over the tunnel as often as
    // the demo polls, so it is only required to appear.
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for h in &hops {
        let s = h["subject"].as_str().unwrap();
        let key = if s.starts_with("agent.token.streamed.") { "agent.token.streamed.*" } else { s };
        *seen.entry(key.to_owned()).or_default() += 1;
    }
    for (subject, n) in EXPECTED {
        assert_eq!(seen.get(*subject).copied().unwrap_or(0), *n, "{subject}: {seen:#?}\n{out}");
    }
    assert!(seen.contains_key("natsbridge.tunnel.execution"), "{seen:#?}");
    let known: HashSet<&str> = EXPECTED.iter().map(|(s, _)| *s).chain(["natsbridge.tunnel.execution", "agent.token.streamed.*"]).collect();
    let unknown: Vec<_> = seen.keys().filter(|s| !known.contains(s.as_str())).collect();
    assert!(unknown.is_empty(), "subjects nobody planned: {unknown:?}");
    // Every hop line names its mode and both ends from the routes files.
    assert!(hops.iter().all(|h| h["mode"] != "?" && h["from"] != "?"), "a hop the routes files do not explain");

    let workflows: Vec<String> =
        hops.iter().filter(|h| h["subject"] == "workflow.execution.started").map(|h| h["workflow"].as_str().unwrap().to_owned()).collect();
    assert_eq!(workflows.len(), 2);

    // Tokens: per workflow, indexes 0..n in order, each once, then exactly one `done`.
    for wf in &workflows {
        let tokens: Vec<Value> = hops
            .iter()
            .filter(|h| h["subject"] == format!("agent.token.streamed.{wf}"))
            .map(|h| serde_json::from_str(h["data"].as_str().unwrap()).unwrap())
            .collect();
        assert!(tokens.len() > 5, "{wf}: {} tokens", tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            assert_eq!(t["index"], i, "{wf}: token {i} out of order: {tokens:?}");
            assert_eq!(t["done"], i + 1 == tokens.len(), "{wf}: done only at the end");
        }
    }

    // The page's token stream for the first workflow, read through gateway and its
    // sidecar's subscribe route, with gateway's sidecar killed and restarted after 3 tokens:
    // the reader reconnected with the last id it had, and got every token once, in order,
    // exactly as the agent published them.
    let sse = lines(&work.join("sse.jsonl"));
    let published: Vec<String> = hops
        .iter()
        .filter(|h| h["subject"] == format!("agent.token.streamed.{}", workflows[0]))
        .map(|h| h["data"].as_str().unwrap().to_owned())
        .collect();
    let read: Vec<String> = sse.iter().map(|e| e["data"].as_str().unwrap().to_owned()).collect();
    assert_eq!(read, published, "the resumed stream is the published one, nothing lost or repeated");
    let ids: Vec<u64> = sse.iter().map(|e| e["id"].as_str().unwrap().parse().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "event ids increase: {ids:?}");
    let first_conn = sse[0]["conn"].as_u64().unwrap();
    let cut = sse.iter().position(|e| e["conn"] != first_conn).expect("the stream was cut and resumed on a new connection");
    assert!(cut >= 3 && cut < sse.len() - 1, "cut mid-stream, after the 3 tokens that trigger the restart: {cut}");
    assert_eq!(sse[cut]["sent_last_event_id"], sse[cut - 1]["id"], "resumed with Last-Event-ID = the last id received");
    assert!(sse[..cut].iter().all(|e| e["sent_last_event_id"].is_null()));

    // The execution log: every execution event the tap saw published is one row, no more.
    let rows = rows(&work.join("execution.sqlite"));
    let published: Vec<&Value> = hops
        .iter()
        .filter(|h| {
            let s = h["subject"].as_str().unwrap();
            ["workflow.execution.", "agent.execution.", "tool.execution."].iter().any(|p| s.starts_with(p))
        })
        .collect();
    assert_eq!(rows.len(), published.len(), "rows {rows:#?}");
    let ids: HashSet<&str> = rows.iter().map(|r| r["msg_id"].as_str().unwrap()).collect();
    let sent: HashSet<&str> = published.iter().map(|h| h["headers"]["Nats-Msg-Id"].as_str().unwrap()).collect();
    assert_eq!(ids, sent, "the stored events are exactly the published ones");
    assert_eq!(seen["execution.log.created"], rows.len(), "one notification per stored event");

    // The tool: wf1's request reached the tool's consumer twice (two message ids, one
    // request_id); its effect happened once. wf2's happened once, after the replay.
    let requests: Vec<Value> = hops
        .iter()
        .filter(|h| h["subject"] == "tool.execution.requested" && h["workflow"] == workflows[0].as_str())
        .map(|h| h["headers"]["Nats-Msg-Id"].clone())
        .collect();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_ne!(requests[0], requests[1]);
    let effects = lines(&work.join("tool-effects.jsonl"));
    let per_request: Vec<&str> = effects.iter().map(|e| e["request_id"].as_str().unwrap()).collect();
    assert_eq!(per_request, [format!("{}-tool", workflows[0]), format!("{}-tool", workflows[1])], "{effects:?}");

    // The dead-letter stream held exactly the poison message until its replay.
    let before = std::fs::read_to_string(work.join("dlq-before-replay.txt")).unwrap();
    assert_eq!(before.lines().filter(|l| l.starts_with("seq ")).count(), 1, "{before}");
    assert!(before.contains("reason poison") && before.contains(&format!("\"workflow_id\": \"{}\"", workflows[1])), "{before}");
    assert!(before.contains("\"input\": \"poison\""), "{before}");
    let after = std::fs::read_to_string(work.join("dlq-after-replay.txt")).unwrap();
    assert!(after.contains("no dead letters"), "{after}");
    let replayed = hops.iter().filter(|h| h["headers"].get("Bridge-Replay-Of").is_some()).count();
    assert_eq!(replayed, 1);

    // No sidecar logged an error, nor a warning other than the one the routes files cause.
    for svc in ["gateway", "orchestration", "agent", "tool", "vector", "execution"] {
        for l in lines(&work.join(format!("{svc}-sidecar.log"))) {
            let level = l["level"].as_str().unwrap();
            let msg = l["fields"]["message"].as_str().unwrap_or("");
            let expected = msg.contains("stream \"DLQ\" is not declared in [[streams]]");
            assert!(level != "ERROR" && (level != "WARN" || expected), "{svc} sidecar: {l}");
        }
    }
}
