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
    assert_eq!(kv.config.max_age, Duration::from_secs(7200 + 60), "the longest idempotency ttl plus claim_ttl");
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

/// Publishes `n` messages to the TOOL stream, acked.
async fn publish_tool(js: &jetstream::Context, n: usize) {
    for i in 0..n {
        js.publish("tool.execution.requested", format!("m{i}").into()).await.unwrap().await.unwrap();
    }
}

async fn consumer_info(js: &jetstream::Context, stream: &str, durable: &str) -> jetstream::consumer::Info {
    js.get_stream(stream).await.unwrap().consumer_info(durable).await.unwrap()
}

#[tokio::test]
async fn a_new_consumer_starts_with_new_messages_unless_the_route_says_otherwise() {
    let server = NatsServer::start();
    let js = js(&server).await;
    // The stream exists with messages before the durable does: a renamed route or service.
    provision::apply(&js, &parse(&routes("", "").replace("durable = \"tool-service\"", "durable = \"old\"")), false).await.unwrap();
    publish_tool(&js, 3).await;

    let plan = provision::apply(&js, &parse(&routes("", "")), false).await.unwrap();
    assert_eq!(status(&plan, Kind::Consumer, "TOOL/tool-service"), &Status::Created, "{plan}");
    let info = consumer_info(&js, "TOOL", "tool-service").await;
    assert_eq!(info.num_pending, 0, "a new durable must not replay the stream");
    assert_eq!(info.config.metadata.get(provision::OWNER_KEY).map(String::as_str), Some("svc"));
    assert_eq!(info.config.metadata.get(provision::ROUTE_KEY).map(String::as_str), Some("tool-exec"));

    let all = routes("", "deliver = \"all\"").replace("durable = \"tool-service\"", "durable = \"replay\"");
    provision::apply(&js, &parse(&all), false).await.unwrap();
    assert_eq!(consumer_info(&js, "TOOL", "replay").await.num_pending, 3, "deliver = all replays");

    // A start time: only what was stored from then on (the server's clock, to the second).
    tokio::time::sleep(Duration::from_millis(1100)).await; // distinct timestamps, not a wait for a condition
    let since = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    publish_tool(&js, 2).await;
    let later = routes("", &format!("deliver = \"{since}\"")).replace("durable = \"tool-service\"", "durable = \"later\"");
    provision::apply(&js, &parse(&later), false).await.unwrap();
    let info = consumer_info(&js, "TOOL", "later").await;
    assert_eq!(info.num_pending, 2, "only the messages stored after {since}: {:?}", info.config.deliver_policy);

    let bad = config::parse(&routes("", "deliver = \"yesterday\""), "routes.toml").unwrap_err().to_string();
    assert!(bad.contains("routes.toml:") && bad.contains("tool-exec") && bad.contains("`deliver`"), "{bad}");
}

#[tokio::test]
async fn force_recreates_a_consumer_from_its_ack_floor_not_from_the_start() {
    let server = NatsServer::start();
    let js = js(&server).await;
    let config = parse(&routes("", ""));
    provision::apply(&js, &config, false).await.unwrap();
    // A hand-made ack-none consumer under the route's durable name: it cannot become an
    // explicit-ack one in place. Two of four messages are consumed (its floor is 2).
    let stream = js.get_stream("TOOL").await.unwrap();
    stream.delete_consumer("tool-service").await.unwrap();
    let c = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("tool-service".into()),
            ack_policy: jetstream::consumer::AckPolicy::None,
            filter_subject: "tool.execution.requested".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    publish_tool(&js, 4).await;
    use futures::StreamExt;
    let got: Vec<_> = c.fetch().max_messages(2).messages().await.unwrap().collect().await;
    assert_eq!(got.len(), 2);

    let plan = provision::apply(&js, &config, true).await.unwrap();
    assert!(matches!(status(&plan, Kind::Consumer, "TOOL/tool-service"), Status::Recreated { .. }), "{plan}");
    let info = consumer_info(&js, "TOOL", "tool-service").await;
    assert_eq!(info.config.ack_policy, jetstream::consumer::AckPolicy::Explicit);
    assert_eq!(info.num_pending, 2, "recreated from its ack floor: only the two unconsumed messages");
}

#[tokio::test]
async fn a_full_workqueue_stream_refuses_new_messages_instead_of_dropping_stored_ones() {
    let server = NatsServer::start();
    let js = js(&server).await;
    let config = parse(&routes("retention = \"workqueue\"\nmax_msgs = 2", ""));
    let plan = provision::apply(&js, &config, false).await.unwrap();
    assert!(plan.is_ok(), "{plan}");
    assert_eq!(stream_info(&js, "TOOL").await.config.discard, jetstream::stream::DiscardPolicy::New);
    publish_tool(&js, 2).await;
    let third = js.publish("tool.execution.requested", "m2".into()).await.unwrap().await;
    assert!(third.is_err(), "a full workqueue stream must refuse the publisher");
    let tool = stream_info(&js, "TOOL").await;
    assert_eq!((tool.state.messages, tool.state.first_sequence), (2, 1), "the acked messages stay");

    // The dead-letter stream: bounded by default, and never drops a dead letter for space.
    let dlq = stream_info(&js, "DLQ").await.config;
    assert_eq!(dlq.max_age, Duration::from_secs(30 * 24 * 3600));
    assert_eq!(dlq.max_bytes, 1 << 30);
    assert_eq!(dlq.discard, jetstream::stream::DiscardPolicy::New);
}

#[tokio::test]
async fn a_filter_subject_change_is_shown_as_affecting_data() {
    let server = NatsServer::start();
    let js = js(&server).await;
    provision::apply(&js, &parse(&routes("", "")), false).await.unwrap();
    let moved = parse(&routes("", "").replace("subject = \"tool.execution.requested\"", "subject = \"tool.execution.other\""));
    let plan = provision::apply(&js, &moved, false).await.unwrap();
    let Status::Refused { reason, .. } = status(&plan, Kind::Consumer, "TOOL/tool-service") else { panic!("{plan}") };
    assert!(reason.contains("filter_subject affects data"), "{reason}");
    assert_eq!(consumer_info(&js, "TOOL", "tool-service").await.config.filter_subject, "tool.execution.requested");
    let plan = provision::apply(&js, &moved, true).await.unwrap();
    assert!(plan.is_ok(), "{plan}");
    assert_eq!(consumer_info(&js, "TOOL", "tool-service").await.config.filter_subject, "tool.execution.other");
}

#[tokio::test]
async fn the_bucket_keeps_the_longest_max_age_and_hand_added_settings() {
    let server = NatsServer::start();
    let js = js(&server).await;
    provision::apply(&js, &parse(&routes("", "")), false).await.unwrap();
    let mut kv = stream_info(&js, "KV_natsbridge_idempotency").await.config;
    kv.max_bytes = 1 << 20; // by hand
    js.update_stream(kv).await.unwrap();

    // Another service sharing the bucket with a shorter ttl: the longer max_age stays.
    let shorter = parse(&routes("", "").replace("ttl = \"2h\"", "ttl = \"1h\""));
    let plan = provision::apply(&js, &shorter, false).await.unwrap();
    let item = plan.item(Kind::KvBucket, "natsbridge_idempotency").unwrap();
    assert_eq!(item.status, Status::Unchanged, "{plan}");
    assert!(item.note.as_deref().is_some_and(|n| n.contains("keeps max_age 2h 1m")), "{plan}");
    assert_eq!(stream_info(&js, "KV_natsbridge_idempotency").await.config.max_age, Duration::from_secs(7260));

    // A longer one raises it, in place, keeping the hand-added max_bytes.
    let longer = parse(&routes("", "").replace("ttl = \"2h\"", "ttl = \"3h\""));
    let plan = provision::apply(&js, &longer, false).await.unwrap();
    assert!(matches!(status(&plan, Kind::KvBucket, "natsbridge_idempotency"), Status::Updated { .. }), "{plan}");
    let kv = stream_info(&js, "KV_natsbridge_idempotency").await.config;
    assert_eq!((kv.max_age, kv.max_bytes), (Duration::from_secs(3 * 3600 + 60), 1 << 20));
}

#[tokio::test]
async fn replicas_follow_the_cluster_and_a_single_replica_copy_is_warned_about() {
    let cluster = Cluster::start("");
    let client = eventually("the cluster's JetStream", WAIT, || async {
        let c = cluster.nodes[0].client().await;
        let js = jetstream::new(c.clone());
        (provision::cluster_size(&c) == 3 && js.query_account().await.is_ok()).then_some(c)
    })
    .await;
    let js = jetstream::new(client);
    let plan = eventually("provisioning on the cluster", WAIT, || async {
        let p = provision::apply(&js, &parse(&routes("", "")), false).await.ok()?;
        p.is_ok().then_some(p)
    })
    .await;
    assert!(plan.items.iter().all(|i| i.note.is_none()), "{plan}");
    assert_eq!(stream_info(&js, "DLQ").await.config.num_replicas, 3);
    assert_eq!(stream_info(&js, "KV_natsbridge_idempotency").await.config.num_replicas, 3);
    assert_eq!(stream_info(&js, "TOOL").await.config.num_replicas, 1, "a [[streams]] entry keeps its own default");

    let single = format!("{}\n[dead_letter]\nreplicas = 1\n[idempotency]\nreplicas = 1\n", routes("", ""));
    let plan = provision::plan(&js, &parse(&single)).await.unwrap();
    for (kind, name) in [(Kind::DeadLetterStream, "DLQ"), (Kind::KvBucket, "natsbridge_idempotency")] {
        let note = plan.item(kind, name).unwrap().note.clone().unwrap_or_default();
        assert!(note.contains("one replica on a cluster of 3 servers"), "{plan}");
    }
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

/// Issue 21 §3: a create that fails at start is retried by the running sidecar until it
/// succeeds, and `/statusz` says why it waits. The failure is real: another stream holds
/// the subjects, so the server refuses the create ("subjects overlap"); once the test
/// deletes it, the sidecar's retry creates TOOL and its consumer without a restart.
#[tokio::test]
async fn run_with_provision_retries_a_failed_create_and_says_why_it_waits() {
    let server = NatsServer::start();
    let js = js(&server).await;
    js.create_stream(jetstream::stream::Config { name: "SQUATTER".into(), subjects: vec!["tool.>".into()], ..Default::default() })
        .await
        .unwrap();
    let src = routes("", "").replace("service = \"svc\"", "service = \"svc\"\nprovision = true");
    let sidecar = Sidecar::start(&src, &server.url(), None).await;
    let body = eventually("statusz says why TOOL waits", WAIT, || async {
        let f = failing(&sidecar).await;
        f.get("provision:stream:TOOL").and_then(|v| v.as_str()).filter(|w| w.contains("retrying")).map(str::to_owned)
    })
    .await;
    assert!(body.contains("cannot create stream \"TOOL\" yet") && body.contains("overlap"), "{body}");
    // The rest of the plan went through despite the failed item.
    assert!(stream_names(&js).await.contains(&"DLQ".to_string()));

    js.delete_stream("SQUATTER").await.unwrap();
    eventually("the retry created TOOL", WAIT, || async { stream_names(&js).await.contains(&"TOOL".to_string()).then_some(()) }).await;
    eventually("and its consumer", WAIT, || async {
        js.get_stream("TOOL").await.ok()?.consumer_info("tool-service").await.ok().map(|_| ())
    })
    .await;
    eventually("statusz no longer names TOOL", WAIT, || async {
        failing(&sidecar).await.get("provision:stream:TOOL").is_none().then_some(())
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

#[tokio::test]
async fn prune_deletes_only_this_services_consumers_whose_routes_are_gone() {
    let server = NatsServer::start();
    let js = js(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.toml");
    let file = path.to_str().unwrap();
    let url = server.url();
    // Two routes of service "svc"; then "tool-exec" goes and "renamed" stays.
    let second = "\n[[inbound]]\nname = \"renamed\"\nsubject = \"tool.other\"\nmode = \"jetstream\"\nstream = \"TOOL\"\npath = \"/o\"\n";
    std::fs::write(&path, format!("{}{second}", routes("", ""))).unwrap();
    let out = cli(&["provision", "--config", file, "--nats-url", &url]);
    assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
    // Not ours: a look-alike without metadata, and another service's consumer.
    let tool = js.get_stream("TOOL").await.unwrap();
    for (durable, owner) in [("svc-tool-exec-copy", None), ("other-consumer", Some("other"))] {
        let metadata = owner.map(|o| [(provision::OWNER_KEY.to_owned(), o.to_owned())].into()).unwrap_or_default();
        let config = jetstream::consumer::pull::Config { durable_name: Some(durable.into()), metadata, ..Default::default() };
        tool.create_consumer(config).await.unwrap();
    }
    publish_tool(&js, 1).await; // tool-service (deliver new) now holds one message

    let idem = "idempotency = { key = \"header:Idempotency-Key\", ttl = \"2h\" }";
    let remaining = routes("", "")
        .replace("name = \"tool-exec\"", "name = \"renamed\"")
        .replace("durable = \"tool-service\"", "durable = \"svc-renamed\"");
    std::fs::write(&path, remaining.replace("subject = \"tool.execution.requested\"", "subject = \"tool.other\"").replace(idem, ""))
        .unwrap();
    let out = cli(&["provision", "--config", file, "--nats-url", &url, "--prune", "--dry-run"]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("TOOL/tool-service") && stdout.contains("REFUSED") && stdout.contains("holds 1 message"), "{stdout}");
    assert_eq!(out.status.code(), Some(1), "a refused prune fails the command");

    let out = cli(&["provision", "--config", file, "--nats-url", &url, "--prune", "--force", "--dry-run"]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("- consumer           TOOL/tool-service") && stdout.contains("delete (its route is gone)"), "{stdout}");
    consumer_info(&js, "TOOL", "tool-service").await; // a dry run deletes nothing

    let out = cli(&["provision", "--config", file, "--nats-url", &url, "--prune", "--force"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("1 deleted"), "{}", text(&out.stdout));
    use futures::TryStreamExt;
    let mut left: Vec<String> = tool.consumer_names().try_collect().await.unwrap();
    left.sort();
    assert_eq!(left, ["other-consumer", "svc-renamed", "svc-tool-exec-copy"]);
}

/// Issue 21 §3: how full the dead-letter stream is, against the limits the server holds
/// for it (here set by hand: 10 messages, 100 KiB), as `natsbridge_dlq_fill_ratio`.
#[tokio::test]
async fn the_dead_letter_stream_fill_is_a_gauge() {
    let server = NatsServer::start();
    let js = js(&server).await;
    js.create_stream(jetstream::stream::Config {
        name: "DLQ".into(),
        subjects: vec!["dlq.>".into()],
        max_messages: 10,
        max_bytes: 100 * 1024,
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .unwrap();
    for i in 0..4 {
        js.publish("dlq.tool.execution.requested", format!("dead {i}").into()).await.unwrap().await.unwrap();
    }
    let bytes = stream_info(&js, "DLQ").await.state.bytes;
    let sidecar = Sidecar::start(&routes("", ""), &server.url(), None).await;
    let series = |text: &str, name: &str| -> Option<f64> { text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()) };
    let text = eventually("the dead-letter gauges", WAIT, || async {
        let m = sidecar.metrics().await;
        series(&m, "natsbridge_dlq_fill_ratio{limit=\"messages\"}").is_some().then_some(m)
    })
    .await;
    assert_eq!(series(&text, "natsbridge_dlq_fill_ratio{limit=\"messages\"}"), Some(0.4), "{text}");
    let by_bytes = series(&text, "natsbridge_dlq_fill_ratio{limit=\"bytes\"}").unwrap();
    assert!((by_bytes - bytes as f64 / 102400.0).abs() < 1e-9, "{by_bytes} vs {bytes} bytes\n{text}");
    assert_eq!(series(&text, "natsbridge_dlq_stored{unit=\"messages\"}"), Some(4.0), "{text}");
    assert_eq!(series(&text, "natsbridge_dlq_stored{unit=\"bytes\"}"), Some(bytes as f64), "{text}");
    sidecar.stop().await;
}

/// A file for service `service` with one jetstream route on the shared stream EV, and
/// `stream` as its `[[streams]]` entry.
fn shared(service: &str, stream: &str) -> String {
    format!(
        "[sidecar]\nservice = \"{service}\"\n\n[[inbound]]\nname = \"{service}-ev\"\nsubject = \"ev.{service}\"\nmode = \"jetstream\"\nstream = \"EV\"\ndurable = \"{service}\"\npath = \"/ev\"\n\n{stream}\n"
    )
}

/// Issue 21 §3: one routes file owns a shared stream's settings. A second service whose
/// file disagrees is refused (the stream does not flap between the two), one that
/// references it only checks it exists, and `--force` takes ownership over explicitly.
#[tokio::test]
async fn a_shared_stream_keeps_its_owners_settings() {
    let server = NatsServer::start();
    let js = js(&server).await;
    let a = parse(&shared("a", "[[streams]]\nname = \"EV\"\nsubjects = [\"ev.>\"]\nmax_age = \"1h\""));
    let b = parse(&shared("b", "[[streams]]\nname = \"EV\"\nsubjects = [\"ev.>\"]\nmax_age = \"2h\""));
    let c = parse(&shared("c", "[[streams]]\nname = \"EV\"\nreference = true"));

    // A reference to a stream nobody created yet fails (a running sidecar retries it).
    let plan = provision::apply(&js, &c, false).await.unwrap();
    assert!(matches!(status(&plan, Kind::Stream, "EV"), Status::Failed { error } if error.contains("reference")), "{plan}");
    assert!(!stream_names(&js).await.contains(&"EV".to_string()));

    let plan = provision::apply(&js, &a, false).await.unwrap();
    assert_eq!(status(&plan, Kind::Stream, "EV"), &Status::Created);
    let info = stream_info(&js, "EV").await;
    assert_eq!(info.config.metadata.get(provision::OWNER_KEY).map(String::as_str), Some("a"));

    // b disagrees: refused, nothing changed, and a's next start changes nothing either.
    let plan = provision::apply(&js, &b, false).await.unwrap();
    let Status::Refused { reason, diff } = status(&plan, Kind::Stream, "EV") else { panic!("{plan}") };
    assert!(reason.contains("owned by service \"a\"") && reason.contains("reference = true"), "{reason}");
    assert_eq!(diff.iter().map(|d| d.field).collect::<Vec<_>>(), ["max_age"], "{plan}");
    assert_eq!(stream_info(&js, "EV").await.config.max_age, Duration::from_secs(3600));
    assert_eq!(status(&provision::apply(&js, &a, false).await.unwrap(), Kind::Stream, "EV"), &Status::Unchanged);
    // b's consumer is still made: only the stream's settings are a's.
    assert!(js.get_stream("EV").await.unwrap().consumer_info("b").await.is_ok());

    // c only references it: unchanged, and said whose it is.
    let plan = provision::apply(&js, &c, false).await.unwrap();
    assert_eq!(status(&plan, Kind::Stream, "EV"), &Status::Unchanged);
    let note = plan.item(Kind::Stream, "EV").unwrap().note.clone().unwrap_or_default();
    assert!(note.contains("owned by service \"a\""), "{note}");

    // --force is the explicit hand-over.
    let plan = provision::apply(&js, &b, true).await.unwrap();
    assert!(matches!(status(&plan, Kind::Stream, "EV"), Status::Updated { .. }), "{plan}");
    let info = stream_info(&js, "EV").await;
    assert_eq!(info.config.metadata.get(provision::OWNER_KEY).map(String::as_str), Some("b"));
    assert_eq!(info.config.max_age, Duration::from_secs(7200));
}

/// `natsbridge check FILE…` reports two files owning one stream with different settings,
/// with both places; a reference instead is fine.
#[test]
fn check_across_files_reports_conflicting_stream_owners() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let a = write("a.toml", shared("a", "[[streams]]\nname = \"EV\"\nsubjects = [\"ev.>\"]\nreplicas = 3"));
    let b = write("b.toml", shared("b", "[[streams]]\nname = \"EV\"\nsubjects = [\"ev.>\"]\nreplicas = 1"));
    let c = write("c.toml", shared("c", "[[streams]]\nname = \"EV\"\nreference = true"));
    let out = cli(&["check", &a, &b]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("{b}:12: stream \"EV\" is also owned by {a}:12")), "{err}");
    assert!(err.contains("replicas: 3 vs 1") && err.contains("reference = true"), "{err}");
    let out = cli(&["check", &a, &c]);
    assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
    // A reference carries no settings of its own.
    let d = write("d.toml", shared("d", "[[streams]]\nname = \"EV\"\nreference = true\nreplicas = 3"));
    let out = cli(&["check", &d]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("`replicas` on a stream with reference = true"), "{}", text(&out.stderr));
}

/// A running sidecar that only references a shared stream waits for its owner: `/statusz`
/// says so, and the retry finds the stream once the owner's provisioning made it.
#[tokio::test]
async fn a_sidecar_referencing_a_missing_stream_waits_for_its_owner() {
    let server = NatsServer::start();
    let js = js(&server).await;
    let src = shared("c", "[[streams]]\nname = \"EV\"\nreference = true").replace("service = \"c\"", "service = \"c\"\nprovision = true");
    let sidecar = Sidecar::start(&src, &server.url(), None).await;
    let why = eventually("statusz says EV is referenced but missing", WAIT, || async {
        let f = failing(&sidecar).await;
        f.get("provision:stream:EV").and_then(|v| v.as_str()).filter(|w| w.contains("reference")).map(str::to_owned)
    })
    .await;
    assert!(why.contains("the routes file that owns it creates it") && why.contains("retrying"), "{why}");

    let owner = parse(&shared("a", "[[streams]]\nname = \"EV\"\nsubjects = [\"ev.>\"]"));
    assert_eq!(status(&provision::apply(&js, &owner, false).await.unwrap(), Kind::Stream, "EV"), &Status::Created);
    eventually("the referencing sidecar's consumer", WAIT, || async {
        js.get_stream("EV").await.ok()?.consumer_info("c").await.ok().map(|_| ())
    })
    .await;
    eventually("statusz no longer names EV", WAIT, || async { failing(&sidecar).await.get("provision:stream:EV").is_none().then_some(()) })
        .await;
    // The owner's settings stand: the reference wrote nothing.
    assert_eq!(stream_info(&js, "EV").await.config.metadata.get(provision::OWNER_KEY).map(String::as_str), Some("a"));
    sidecar.stop().await;
}

/// Issue 11 §3: the async operations bucket. A request route honours `Prefer:
/// respond-async`, so provisioning creates the bucket (with per-message TTL, which async
/// results need) and a second run leaves it; a sidecar with an `async = true` route and no
/// provisioning names it missing until it exists, and one with `provision = true` creates it.
#[tokio::test]
async fn the_operations_bucket_is_provisioned_for_request_routes_and_required_by_async_ones() {
    let server = NatsServer::start();
    let js = js(&server).await;
    let request_route = |extra: &str| {
        format!(
            "[sidecar]\nservice = \"caller\"\n{extra}\n\n[[outbound]]\nname = \"run\"\nmethod = \"POST\"\npath = \"/run\"\nsubject = \"long.run\"\nmode = \"request\"\n"
        )
    };
    let always = request_route("").replace("mode = \"request\"", "mode = \"request\"\nasync = true");

    // Without provisioning, an async = true route needs the bucket: named until it exists.
    let sidecar = Sidecar::start(&always, &server.url(), None).await;
    let body = eventually("statusz names the missing bucket", WAIT, || async {
        let f = failing(&sidecar).await;
        f.get("provision:kv:natsbridge_operations").is_some().then_some(f)
    })
    .await;
    let why = body["provision:kv:natsbridge_operations"].as_str().unwrap();
    assert!(why.contains("needed by route \"run\" for async operations") && why.contains("natsbridge provision"), "{why}");
    // A route that only honours the preference answers synchronously without it: nothing is named.
    let plain = Sidecar::start(&request_route(""), &server.url(), None).await;
    plain.wait_ready().await;

    let plan = provision::apply(&js, &parse(&request_route("")), false).await.unwrap();
    assert_eq!(status(&plan, Kind::KvBucket, "natsbridge_operations"), &Status::Created, "{plan}");
    let info = stream_info(&js, "KV_natsbridge_operations").await;
    assert!(info.config.allow_message_ttl, "async results expire per message: {:?}", info.config);
    assert_eq!(info.config.max_messages_per_subject, 1);
    let again = provision::apply(&js, &parse(&always), false).await.unwrap();
    assert!(again.is_unchanged(), "{again}");
    sidecar.wait_ready().await;
    sidecar.stop().await;
    plain.stop().await;

    // `provision = true` creates it too.
    js.delete_key_value("natsbridge_operations").await.unwrap();
    let sidecar = Sidecar::start(&request_route("provision = true"), &server.url(), None).await;
    eventually("the bucket provisioned", WAIT, || async {
        stream_names(&js).await.contains(&"KV_natsbridge_operations".to_owned()).then_some(())
    })
    .await;
    sidecar.wait_ready().await;
    sidecar.stop().await;
}
