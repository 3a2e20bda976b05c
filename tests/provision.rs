//! Provisioning against a real nats-server: the plan, apply, idempotency, dry runs,
//! refused and forced changes, the `provision` command, and `run`'s provisioning and
//! readiness checks.

mod support;

use std::time::Duration;

use async_nats::jetstream::{self, stream::StorageType};
use natsbridge::config::{self, Config};
use natsbridge::provision::{self, FieldDiff, Kind, Status};
use support::*;

const WAIT: Duration = Duration::from_secs(20);

fn routes(stream_extra: &str, consumer_extra: &str) -> String {
    format!(
        r#"
[sidecar]
service = "svc"

[[inbound]]
name = "tool-exec"
subject = "tool.execution.requested"
mode = "jetstream"
stream = "TOOL"
durable = "tool-service"
path = "/tools/execute"
max_deliver = 5
backoff = ["1s", "5s"]
ack_wait = "30s"
dead_letter = "dlq.tool.execution.requested"
idempotency = {{ key = "header:Idempotency-Key", ttl = "2h" }}
{consumer_extra}

[[streams]]
name = "TOOL"
subjects = ["tool.>"]
storage = "file"
duplicate_window = "2h"
{stream_extra}
"#
    )
}

fn parse(src: &str) -> Config {
    config::parse(src, "routes.toml").unwrap_or_else(|e| panic!("{e}"))
}

async fn js(server: &NatsServer) -> jetstream::Context {
    jetstream::new(server.client().await)
}

async fn stream_names(js: &jetstream::Context) -> Vec<String> {
    use futures::TryStreamExt;
    let mut v: Vec<String> = js.stream_names().try_collect().await.unwrap();
    v.sort();
    v
}

async fn stream_info(js: &jetstream::Context, name: &str) -> jetstream::stream::Info {
    js.get_stream(name).await.unwrap().info().await.unwrap().clone()
}

fn status<'a>(plan: &'a provision::Plan, kind: Kind, name: &str) -> &'a Status {
    &plan.item(kind, name).unwrap_or_else(|| panic!("no {kind} {name} in\n{plan}")).status
}

#[tokio::test]
async fn provision_creates_everything_and_a_second_run_changes_nothing() {
    let server = NatsServer::start();
    let js = js(&server).await;
    let config = parse(&routes("max_age = \"7d\"", ""));

    let plan = provision::apply(&js, &config, false).await.unwrap();
    assert!(plan.is_ok(), "{plan}");
    for (kind, name) in [
        (Kind::KvBucket, "natsbridge_idempotency"),
        (Kind::Stream, "TOOL"),
        (Kind::DeadLetterStream, "DLQ"),
        (Kind::Consumer, "TOOL/tool-service"),
    ] {
        assert_eq!(status(&plan, kind, name), &Status::Created, "{plan}");
    }
    assert_eq!(stream_names(&js).await, ["DLQ", "KV_natsbridge_idempotency", "TOOL"]);

    let tool = stream_info(&js, "TOOL").await;
    assert_eq!(tool.config.subjects, ["tool.>"]);
    assert_eq!(tool.config.storage, StorageType::File);
    assert_eq!(tool.config.max_age, Duration::from_secs(7 * 86400));
    assert_eq!(tool.config.duplicate_window, Duration::from_secs(7200));
    let dlq = stream_info(&js, "DLQ").await;
    assert_eq!(dlq.config.subjects, ["dlq.>"]);
    let kv = stream_info(&js, "KV_natsbridge_idempotency").await;
    assert_eq!(kv.config.max_age, Duration::from_secs(7200), "the longest idempotency ttl");
    assert_eq!(kv.config.max_messages_per_subject, 1);
    assert!(kv.config.allow_message_ttl, "per-message TTL for claims");
    let consumer = js.get_stream("TOOL").await.unwrap().consumer_info("tool-service").await.unwrap();
    assert_eq!(consumer.config.ack_wait, Duration::from_secs(30), "backoff must not override ack_wait");
    assert_eq!(consumer.config.max_deliver, -1, "the sidecar enforces the route's max_deliver, the server none");
    assert!(consumer.config.backoff.is_empty());
    assert_eq!(consumer.config.filter_subject, "tool.execution.requested");

    let again = provision::apply(&js, &config, false).await.unwrap();
    assert!(again.is_unchanged(), "second run must be all unchanged:\n{again}");
    assert_eq!(again.items.len(), 4);
    let planned = provision::plan(&js, &config).await.unwrap();
    assert!(planned.is_unchanged(), "{planned}");
    assert!(!planned.applied);
}

#[tokio::test]
async fn dry_run_changes_nothing_but_shows_the_plan() {
    let server = NatsServer::start();
    let js = js(&server).await;
    let config = parse(&routes("", ""));

    let plan = provision::plan(&js, &config).await.unwrap();
    let text = plan.to_string();
    assert!(text.contains("dry run"), "{text}");
    assert!(text.contains("+ stream             TOOL"), "{text}");
    assert!(text.contains("4 created"), "{text}");
    assert!(stream_names(&js).await.is_empty(), "a dry run created something");

    // Now with something to update: the dry run reports it and the server keeps its value.
    provision::apply(&js, &config, false).await.unwrap();
    let changed = parse(&routes("max_age = \"1d\"", "max_ack_pending = 7"));
    let plan = provision::plan(&js, &changed).await.unwrap();
    assert!(matches!(status(&plan, Kind::Consumer, "TOOL/tool-service"), Status::Updated { .. }), "{plan}");
    // unlimited → 1d deletes old messages: refused in a plan without force.
    assert!(matches!(status(&plan, Kind::Stream, "TOOL"), Status::Refused { .. }), "{plan}");
    assert_eq!(stream_info(&js, "TOOL").await.config.max_age, Duration::ZERO);
    let consumer = js.get_stream("TOOL").await.unwrap().consumer_info("tool-service").await.unwrap();
    assert_eq!(consumer.config.max_ack_pending, 128, "2 × the default concurrency");
}

#[tokio::test]
async fn a_changed_field_shows_its_diff_and_is_applied() {
    let server = NatsServer::start();
    let js = js(&server).await;
    provision::apply(&js, &parse(&routes("max_age = \"1h\"", "")), false).await.unwrap();

    let changed = parse(
        &routes("max_age = \"2h\"", "max_ack_pending = 9").replace("subjects = [\"tool.>\"]", "subjects = [\"tool.>\", \"tools.>\"]"),
    );
    let plan = provision::apply(&js, &changed, false).await.unwrap();
    assert!(plan.is_ok(), "{plan}");
    let Status::Updated { diff } = status(&plan, Kind::Stream, "TOOL") else { panic!("{plan}") };
    assert_eq!(
        diff,
        &[
            FieldDiff { field: "subjects", old: "[tool.>]".into(), new: "[tool.>, tools.>]".into() },
            FieldDiff { field: "max_age", old: "1h".into(), new: "2h".into() },
            // The window is capped at max_age, so it follows it.
            FieldDiff { field: "duplicate_window", old: "1h".into(), new: "2h".into() },
        ],
        "{plan}"
    );
    let Status::Updated { diff } = status(&plan, Kind::Consumer, "TOOL/tool-service") else { panic!("{plan}") };
    assert_eq!(diff, &[FieldDiff { field: "max_ack_pending", old: "128".into(), new: "9".into() }]);
    let text = plan.to_string();
    assert!(text.contains("~ stream             TOOL") && text.contains("max_age           1h -> 2h"), "{text}");
    assert_eq!(status(&plan, Kind::DeadLetterStream, "DLQ"), &Status::Unchanged);

    let tool = stream_info(&js, "TOOL").await;
    assert_eq!(tool.config.max_age, Duration::from_secs(7200));
    assert_eq!(tool.config.subjects, ["tool.>", "tools.>"]);
    assert!(provision::apply(&js, &changed, false).await.unwrap().is_unchanged());
}

#[tokio::test]
async fn a_storage_change_is_refused_without_force_and_recreated_with_it() {
    let server = NatsServer::start();
    let js = js(&server).await;
    let original = parse(&routes("", ""));
    provision::apply(&js, &original, false).await.unwrap();
    js.publish("tool.execution.requested", "x".into()).await.unwrap().await.unwrap();

    let memory = parse(&routes("", "").replace("storage = \"file\"", "storage = \"memory\""));
    let plan = provision::apply(&js, &memory, false).await.unwrap();
    assert!(!plan.is_ok());
    let Status::Refused { reason, diff } = status(&plan, Kind::Stream, "TOOL") else { panic!("{plan}") };
    assert!(reason.contains("storage cannot change in place") && reason.contains("1 message"), "{reason}");
    assert_eq!(diff, &[FieldDiff { field: "storage", old: "file".into(), new: "memory".into() }]);
    let tool = stream_info(&js, "TOOL").await;
    assert_eq!(tool.config.storage, StorageType::File);
    assert_eq!(tool.state.messages, 1, "a refused change must not touch the data");

    let plan = provision::apply(&js, &memory, true).await.unwrap();
    assert!(plan.is_ok(), "{plan}");
    assert!(matches!(status(&plan, Kind::Stream, "TOOL"), Status::Recreated { .. }), "{plan}");
    assert_eq!(status(&plan, Kind::Consumer, "TOOL/tool-service"), &Status::Created, "the consumer goes with its stream");
    assert!(plan.to_string().contains("deleted and recreated"), "{plan}");
    let tool = stream_info(&js, "TOOL").await;
    assert_eq!(tool.config.storage, StorageType::Memory);
    js.get_stream("TOOL").await.unwrap().consumer_info("tool-service").await.unwrap();
    assert!(provision::apply(&js, &memory, false).await.unwrap().is_unchanged());

    // Removing a subject may lose data: refused, then applied in place with force.
    let narrower = parse(&routes("", "").replace("storage = \"file\"", "storage = \"memory\"").replace("tool.>", "tool.execution.>"));
    let plan = provision::apply(&js, &narrower, false).await.unwrap();
    let Status::Refused { reason, .. } = status(&plan, Kind::Stream, "TOOL") else { panic!("{plan}") };
    assert!(reason.contains("removes subjects [tool.>]"), "{reason}");
    let plan = provision::apply(&js, &narrower, true).await.unwrap();
    let item = plan.item(Kind::Stream, "TOOL").unwrap();
    assert!(matches!(item.status, Status::Updated { .. }) && item.note.as_deref().is_some_and(|n| n.starts_with("forced")), "{plan}");
    assert_eq!(stream_info(&js, "TOOL").await.config.subjects, ["tool.execution.>"]);
}

#[tokio::test]
async fn a_consumer_on_an_undeclared_missing_stream_is_refused() {
    let server = NatsServer::start();
    let js = js(&server).await;
    let src = routes("", "").replace("stream = \"TOOL\"", "stream = \"ELSEWHERE\"");
    let plan = provision::apply(&js, &parse(&src), true).await.unwrap();
    let Status::Refused { reason, .. } = status(&plan, Kind::Consumer, "ELSEWHERE/tool-service") else { panic!("{plan}") };
    assert!(reason.contains("does not exist and no [[streams]] entry declares it"), "{reason}");
}

fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_natsbridge")).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn the_provision_command_end_to_end() {
    let server = NatsServer::start();
    let js = js(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.toml");
    std::fs::write(&path, routes("", "")).unwrap();
    let file = path.to_str().unwrap();
    let url = server.url();

    let out = cli(&["provision", "--config", file, "--nats-url", &url, "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("dry run") && stdout.contains("+ stream             TOOL") && stdout.contains("create"), "{stdout}");
    assert!(stream_names(&js).await.is_empty());

    let out = cli(&["provision", "--config", file, "--nats-url", &url]);
    assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("4 created"), "{}", text(&out.stdout));
    assert_eq!(stream_names(&js).await, ["DLQ", "KV_natsbridge_idempotency", "TOOL"]);

    let out = cli(&["provision", "--config", file, "--nats-url", &url]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("0 created, 0 updated, 0 recreated, 4 unchanged"), "{}", text(&out.stdout));

    std::fs::write(&path, routes("", "").replace("storage = \"file\"", "storage = \"memory\"")).unwrap();
    let out = cli(&["provision", "--config", file, "--nats-url", &url]);
    assert_eq!(out.status.code(), Some(1), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("REFUSED: storage cannot change in place"), "{}", text(&out.stdout));
    assert!(text(&out.stderr).contains("--force"), "{}", text(&out.stderr));
    assert_eq!(stream_info(&js, "TOOL").await.config.storage, StorageType::File);

    let out = cli(&["provision", "--config", file, "--nats-url", &url, "--force", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("delete and recreate"), "{}", text(&out.stdout));
    assert_eq!(stream_info(&js, "TOOL").await.config.storage, StorageType::File);

    let out = cli(&["provision", "--config", file, "--nats-url", &url, "--force"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("deleted and recreated"), "{}", text(&out.stdout));
    assert_eq!(stream_info(&js, "TOOL").await.config.storage, StorageType::Memory);

    // NATS unreachable: a clear error and exit 1, within the connect timeout.
    let dead = format!("nats://127.0.0.1:{}", free_port());
    let started = std::time::Instant::now();
    let out = cli(&["provision", "--config", file, "--nats-url", &dead]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot connect to NATS"), "{}", text(&out.stderr));
    assert!(started.elapsed() < Duration::from_secs(15));

    // A broken routing file: exit 1 with its diagnostics.
    std::fs::write(&path, "[sidecar]\n").unwrap();
    let out = cli(&["provision", "--config", file, "--nats-url", &url]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("routes.toml"), "{}", text(&out.stderr));
}

/// What is down, and why, as `/statusz` says.
async fn failing(s: &Sidecar) -> serde_json::Value {
    s.statusz().await["failing"].clone()
}

#[tokio::test]
async fn run_with_provision_creates_the_streams() {
    let server = NatsServer::start();
    let js = js(&server).await;
    let src = routes("", "").replace("service = \"svc\"", "service = \"svc\"\nprovision = true");
    let sidecar = Sidecar::start(&src, &server.url(), None).await;
    eventually("streams provisioned", WAIT, || async {
        (stream_names(&js).await == ["DLQ", "KV_natsbridge_idempotency", "TOOL"]).then_some(())
    })
    .await;
    eventually("consumer provisioned", WAIT, || async {
        js.get_stream("TOOL").await.ok()?.consumer_info("tool-service").await.ok().map(|_| ())
    })
    .await;
    eventually("no provision check failing", WAIT, || async {
        let f = failing(&sidecar).await;
        (f.is_object() && !f.to_string().contains("provision")).then_some(())
    })
    .await;
    sidecar.stop().await;
}

#[tokio::test]
async fn run_without_provision_names_the_missing_stream_until_it_exists() {
    let server = NatsServer::start();
    let js = js(&server).await;
    let src = r#"
[sidecar]
service = "svc"

[[outbound]]
name = "started"
method = "POST"
path = "/started"
subject = "workflow.execution.started"
mode = "jetstream"

[[streams]]
name = "WORKFLOW"
subjects = ["workflow.>"]
"#;
    let sidecar = Sidecar::start(src, &server.url(), None).await;
    let body = eventually("statusz names the missing stream", WAIT, || async {
        let f = failing(&sidecar).await;
        f.get("provision:subject:workflow.execution.started").is_some().then_some(f)
    })
    .await;
    let why = body["provision:subject:workflow.execution.started"].as_str().unwrap();
    assert!(why.contains("no stream captures subject") && why.contains("\"started\"") && why.contains("natsbridge provision"), "{why}");

    let plan = provision::apply(&js, &parse(src), false).await.unwrap();
    assert_eq!(status(&plan, Kind::Stream, "WORKFLOW"), &Status::Created);
    sidecar.wait_ready().await;
    sidecar.stop().await;
}

#[tokio::test]
async fn run_without_provision_names_each_missing_stream_and_bucket() {
    let server = NatsServer::start();
    let sidecar = Sidecar::start(&routes("", ""), &server.url(), None).await;
    let body = eventually("statusz names what is missing", WAIT, || async {
        let f = failing(&sidecar).await;
        f.get("provision:stream:TOOL").is_some().then_some(f)
    })
    .await;
    let failing = body.as_object().unwrap();
    for key in ["provision:stream:TOOL", "provision:dead-letter-stream:DLQ", "provision:kv:natsbridge_idempotency"] {
        assert!(failing.contains_key(key), "{key} missing from {body}");
    }
    assert!(
        failing["provision:stream:TOOL"].as_str().unwrap().contains("stream \"TOOL\" does not exist (needed by route \"tool-exec\")"),
        "{body}"
    );
    sidecar.stop().await;
}

#[test]
fn check_warns_about_uncovered_subjects_and_streams() {
    let src = r#"
[sidecar]
service = "svc"

[[outbound]]
name = "orders"
method = "POST"
path = "/orders"
subject = "orders.created"
mode = "jetstream"

[[inbound]]
name = "pay"
subject = "pay.requested"
mode = "jetstream"
stream = "PAY"
path = "/pay"

[[inbound]]
name = "ship"
subject = "ship.requested"
mode = "jetstream"
stream = "WORKFLOW"
path = "/ship"

[[streams]]
name = "WORKFLOW"
subjects = ["workflow.>"]
"#;
    let c = parse(src);
    let w: Vec<String> = c.warnings.iter().map(|d| d.to_string()).collect();
    assert!(w.iter().any(|m| m.contains("route \"orders\"") && m.contains("no [[streams]] entry captures \"orders.created\"")), "{w:#?}");
    assert!(w.iter().any(|m| m.contains("route \"pay\"") && m.contains("stream \"PAY\" is not declared in [[streams]]")), "{w:#?}");
    assert!(w.iter().any(|m| m.contains("route \"ship\"") && m.contains("does not capture \"ship.requested\"")), "{w:#?}");

    // The `check` command prints them.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.toml");
    std::fs::write(&path, src).unwrap();
    let out = cli(&["check", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.matches("warning:").count(), 3, "{stdout}");
}
