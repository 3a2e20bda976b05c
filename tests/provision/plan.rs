//! The library's plan and apply: what is created, changed, refused or forced, and what
//! a dry run shows.

use super::*;

#[tokio::test]
async fn provision_creates_everything_and_a_second_run_changes_nothing() {
    let server = NatsServer::start();
    let js = js(&server).await;
    let config = parse(&routes("max_age = \"7d\"", ""));

    let plan = provision::apply(&js, &config, false).await.unwrap();
    assert!(plan.is_ok(), "{plan}");
    for (kind, name) in [
        (Kind::KvBucket, "natsbridge_idempotency"),
        (Kind::KvBucket, "natsbridge_consumer_floors"),
        (Kind::Stream, "TOOL"),
        (Kind::DeadLetterStream, "DLQ"),
        (Kind::Consumer, "TOOL/tool-service"),
    ] {
        assert_eq!(status(&plan, kind, name), &Status::Created, "{plan}");
    }
    assert_eq!(stream_names(&js).await, ["DLQ", "KV_natsbridge_consumer_floors", "KV_natsbridge_idempotency", "TOOL"]);

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
    assert_eq!(again.items.len(), 5);
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
    assert!(text.contains("5 created"), "{text}");
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
