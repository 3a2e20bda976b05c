//! The command lines: `natsbridge provision` (with `--prune`) and `natsbridge check`.

use super::*;

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
    assert!(text(&out.stdout).contains("5 created"), "{}", text(&out.stdout));
    assert_eq!(stream_names(&js).await, ["DLQ", "KV_natsbridge_consumer_floors", "KV_natsbridge_idempotency", "TOOL"]);

    let out = cli(&["provision", "--config", file, "--nats-url", &url]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("0 created, 0 updated, 0 recreated, 5 unchanged"), "{}", text(&out.stdout));

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
