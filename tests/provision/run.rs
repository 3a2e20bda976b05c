//! A running sidecar's own provisioning and readiness: what it creates, retries and waits
//! for, and what `/statusz` and the metrics say meanwhile.

use super::*;

#[tokio::test]
async fn run_with_provision_creates_the_streams() {
    let server = NatsServer::start();
    let js = js(&server).await;
    let src = routes("", "").replace("service = \"svc\"", "service = \"svc\"\nprovision = true");
    let sidecar = Sidecar::start(&src, &server.url(), None).await;
    eventually("streams provisioned", WAIT, || async {
        (stream_names(&js).await == ["DLQ", "KV_natsbridge_consumer_floors", "KV_natsbridge_idempotency", "TOOL"]).then_some(())
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
