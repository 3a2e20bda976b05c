//! The platform end to end (examples/platform, issue 15): `scripts/demo --once` runs
//! nats-server, the seven services and seven sidecars (five under `natsbridge dev`), one
//! workflow (its tool request redelivered by JetStream after a 503, and the agent's and
//! gateway's sidecars killed and restarted mid-stream), and the poison path (dead letter → failed workflow → fix → `dlq replay`). This
//! test checks what independent observers recorded: the demo's tap (a plain NATS
//! subscriber on `>`, hops.jsonl), the execution service's SQLite file, the tool's effect
//! and delivery files, the `dlq` CLI's output, the sidecars' logs, the agent's log of its
//! retried publishes, and the page's token stream as an EventSource-like reader got it
//! through gateway while the agent's and then gateway's sidecar were killed and restarted
//! mid-stream (sse.jsonl).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Messages per subject for one happy workflow and one poison workflow. The happy one's
/// tool request is published once and delivered twice (a redelivery is no new message);
/// the poison one's is dead-lettered once and replayed once.
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
    ("tool.execution.requested", 3),
    ("tool.execution.started", 2),
    ("tool.execution.completed", 2),
    ("dlq.tool.tool-requested", 1),
    ("execution.log.created", 17),
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

    // Tokens: per workflow, indexes 0..n in order, each once, then exactly one `done`. A
    // publish the agent retried across its sidecar's restart may have crossed the server
    // twice (the tap sees core traffic); it carries the same Nats-Msg-Id, which JetStream
    // stores once, so the tap's copies are counted once per id.
    for wf in &workflows {
        let tokens: Vec<Value> = published_tokens(&hops, wf).iter().map(|d| serde_json::from_str(d).unwrap()).collect();
        assert!(tokens.len() > 5, "{wf}: {} tokens", tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            assert_eq!(t["index"], i, "{wf}: token {i} out of order: {tokens:?}");
            assert_eq!(t["done"], i + 1 == tokens.len(), "{wf}: done only at the end");
        }
    }

    // The agent's sidecar was killed while the agent streamed wf1's tokens: the agent's
    // next token publishes failed and were retried with the same Idempotency-Key, and the
    // sidecar has two lives in its log.
    let agent_log = std::fs::read_to_string(work.join("agent.log")).unwrap();
    let retried: Vec<&str> =
        agent_log.lines().filter(|l| l.starts_with(&format!("agent: /tokens/{}:", workflows[0])) && l.contains("retrying")).collect();
    assert!(!retried.is_empty(), "no token publish failed while the agent's sidecar was down:\n{agent_log}");
    let agent_lives = lines(&work.join("agent-sidecar.log")).iter().filter(|l| l["fields"]["message"] == "natsbridge running").count();
    assert_eq!(agent_lives, 2, "the agent's sidecar was restarted once");

    // The page's token stream for the first workflow, read through gateway and its
    // sidecar's subscribe route, across the agent's sidecar restart (after 3 tokens) and
    // gateway's (after 8): the reader reconnected with the last id it had, and got every
    // token once, in order, exactly as the agent's stream holds them.
    let sse = lines(&work.join("sse.jsonl"));
    let published = published_tokens(&hops, &workflows[0]);
    let read: Vec<String> = sse.iter().map(|e| e["data"].as_str().unwrap().to_owned()).collect();
    assert_eq!(read, published, "the resumed stream is the published one, nothing lost or repeated");
    let ids: Vec<u64> = sse.iter().map(|e| e["id"].as_str().unwrap().parse().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "event ids increase: {ids:?}");
    let first_conn = sse[0]["conn"].as_u64().unwrap();
    let cut = sse.iter().position(|e| e["conn"] != first_conn).expect("the stream was cut and resumed on a new connection");
    assert!(cut >= 8 && cut < sse.len() - 1, "cut mid-stream, after the 8 tokens that trigger gateway's restart: {cut}");
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

    // The tool: wf1's request was published once and delivered twice by JetStream (the
    // tool answered 503 after its effect; Bridge-Delivery 1 then 2); its effect happened
    // once. wf2's happened once, after the replay.
    let requests = hops.iter().filter(|h| h["subject"] == "tool.execution.requested" && h["workflow"] == workflows[0].as_str()).count();
    assert_eq!(requests, 1);
    let wf1_tool = format!("{}-tool", workflows[0]);
    let deliveries: Vec<(u64, bool)> = lines(&work.join("tool-deliveries.jsonl"))
        .iter()
        .filter(|d| d["request_id"] == wf1_tool.as_str())
        .map(|d| (d["delivery"].as_u64().unwrap(), d["effect"].as_bool().unwrap()))
        .collect();
    assert_eq!(deliveries, [(1, true), (2, false)], "one publish, redelivered once, one effect");
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

    // No sidecar logged an error, nor a warning other than the one the routes files cause:
    // gateway's and agent's (`natsbridge run`, JSON logs) and the five under `natsbridge dev`
    // (text, the sidecar's lines prefixed `[sidecar] `).
    let expected = |msg: &str| msg.contains("stream \"DLQ\" is not declared in [[streams]]");
    for svc in ["gateway", "agent"] {
        for l in lines(&work.join(format!("{svc}-sidecar.log"))) {
            let level = l["level"].as_str().unwrap();
            let msg = l["fields"]["message"].as_str().unwrap_or("");
            assert!(level != "ERROR" && (level != "WARN" || expected(msg)), "{svc} sidecar: {l}");
        }
    }
    for svc in ["orchestration", "tool", "vector", "execution", "model"] {
        let log = std::fs::read_to_string(work.join(format!("{svc}-dev.log"))).unwrap();
        let sidecar: Vec<&str> = log.lines().filter(|l| l.starts_with("[sidecar] ")).collect();
        assert!(sidecar.iter().any(|l| l.contains("natsbridge running")), "{svc}: its sidecar ran under dev:\n{log}");
        for l in sidecar {
            assert!(!l.contains(" ERROR ") && (!l.contains(" WARN ") || expected(l)), "{svc} sidecar: {l}");
        }
    }
}

/// A workflow's token payloads as its stream holds them: the tap's copies, once per
/// Nats-Msg-Id (JetStream's dedupe), in order.
fn published_tokens(hops: &[Value], wf: &str) -> Vec<String> {
    let mut ids = HashSet::new();
    hops.iter()
        .filter(|h| h["subject"] == format!("agent.token.streamed.{wf}"))
        .filter(|h| ids.insert(h["headers"]["Nats-Msg-Id"].as_str().unwrap().to_owned()))
        .map(|h| h["data"].as_str().unwrap().to_owned())
        .collect()
}
