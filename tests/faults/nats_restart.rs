//! 1. nats-server SIGKILLed and restarted under jetstream-mode egress traffic.

use super::*;

/// Every 202 reaches the app (end to end through a second sidecar's inbound jetstream
/// route); every request, failed or not, is answered within the route timeout (503 while
/// NATS is gone); the egress sidecar recovers without a restart. Delivery is at least once
/// (the consumer's acks in flight at the crash can be lost), so duplicates are counted,
/// not forbidden: this case is about loss and bounded answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_killed_and_restarted_under_jetstream_egress() {
    // The in-process sidecars' own log, kept for a shutdown that hangs (soak runs 3 and 6).
    let trace =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("faults").join(format!("nats-killed-trace-{}.log", std::process::id()));
    std::fs::create_dir_all(trace.parent().unwrap()).unwrap();
    let file = std::fs::File::create(&trace).unwrap();
    let _ = tracing_subscriber::fmt()
        .with_env_filter("natsbridge=debug,async_nats=info")
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
    println!("  the sidecars' log: {}", trace.display());
    bounded(Duration::from_secs(120), async {
        const TIMEOUT: Duration = Duration::from_secs(2);
        let mut nats = NatsServer::start_with_js(SYNC_ALWAYS, "");
        let js = jetstream::new(nats.client().await);
        stream(&js, "EVENTS", "events.>", 1).await;
        stream(&js, "DLQ", "dlq.>", 1).await;
        let app = EffectApp::start(|_, _| async { commit(200) }).await;
        let consumer_cfg = sidecar_toml(
            "consumer",
            &events_route(
                "/effects",
                r#"ack_wait = "2s"
max_deliver = 100
backoff = ["200ms"]
dead_letter = "dlq.events"
concurrency = 16"#,
            ),
        );
        let consumer = Sidecar::start(&consumer_cfg, &nats.url(), Some(&app.url())).await;
        let producer = Sidecar::start(&sidecar_toml("producer", &event_outbound("2s")), &nats.url(), None).await;
        consumer.wait_ready().await;
        producer.wait_ready().await;

        let stop = CancellationToken::new();
        let (log, traffic) = drive(8, producer.url("/events"), Duration::from_millis(20), stop.clone());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let killed = Instant::now();
        nats.kill();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let restarted = Instant::now();
        tokio::task::block_in_place(|| nats.restart());
        let recovery = recovered(&log, restarted, 202, Duration::from_secs(15)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.cancel();
        traffic.await.unwrap();

        let sent = snapshot(&log);
        let acked: Vec<String> = sent.iter().filter(|s| s.status == Some(202)).map(|s| s.id.clone()).collect();
        let all: Vec<String> = sent.iter().map(|s| s.id.clone()).collect();
        // Everything acked must arrive; give the consumer time to catch up after the restart.
        wait_until(Duration::from_secs(20), || async { app.tally(&acked).2 == 0 }).await;
        let (_, duplicate_effects, lost) = app.tally(&acked);
        let (delivered, _, _) = app.tally(&all);
        let t = Tally { sent: sent.len(), acked: acked.len(), delivered, duplicate_effects, lost };
        t.print("nats-killed-jetstream-egress");
        // How the duplicates came about: a redelivery (Bridge-Delivery > 1: an ack lost in
        // the crash), or a first delivery again (the consumer's ack state rolled back).
        let calls = app.calls();
        let twice: Vec<&Call> = calls.iter().filter(|c| app.effects(&c.key) > 1).collect();
        println!(
            "  duplicate calls: {} redeliveries, {} first deliveries again",
            twice.iter().filter(|c| c.earlier > 0 && c.delivery > 1).count(),
            twice.iter().filter(|c| c.earlier > 0 && c.delivery <= 1).count()
        );
        let failed: Vec<&Sent> = sent.iter().filter(|s| s.status != Some(202)).collect();
        let during = sent.iter().filter(|s| s.started >= killed && s.started < restarted).count();
        println!(
            "  statuses {:?}; {during} sent during the outage; max latency failed {:?}, all {:?}; first 202 {:?} after the restart",
            statuses(&sent),
            max_latency(failed.iter().copied()),
            max_latency(&sent),
            recovery
        );

        assert_eq!(lost, 0, "acked requests that never reached the app");
        // 503: no stream answered (nothing stored). 504: no ack in time, "outcome unknown"
        // (the message may be stored, which is why delivered may exceed acked).
        assert!(failed.iter().all(|s| matches!(s.status, Some(503 | 504))), "failures must be 503 or 504: {:?}", statuses(&sent));
        assert!(!failed.is_empty(), "the outage was not observed");
        // A bound against a hung request, not a latency figure (that belongs to the
        // benchmark): the timeout plus a generous margin for a loaded machine.
        let margin = Duration::from_secs(2);
        assert!(max_latency(failed.iter().copied()) <= TIMEOUT + margin, "a failed request took {:?}", max_latency(failed.iter().copied()));
        assert!(max_latency(&sent) <= TIMEOUT + margin, "a request took {:?}", max_latency(&sent));
        assert!(recovery.is_some(), "no 202 after the server came back: the sidecar did not recover");
        assert!(sent.iter().any(|s| s.started < killed && s.status == Some(202)));
        assert_eq!(within("reading the DLQ stream", Duration::from_secs(15), stream_messages(&js, "DLQ")).await, 0);
        // A stop is bounded by the drain_timeout (2 s), whatever the outage left behind;
        // the margin is for a loaded machine.
        within("the producer sidecar's shutdown", Duration::from_secs(5), producer.stop()).await;
        within("the consumer sidecar's shutdown", Duration::from_secs(5), consumer.stop()).await;
    })
    .await
}

/// A restarted server knows nothing of the pull request the sidecar had open when it died:
/// the sidecar pulls again as soon as it has reconnected, instead of waiting for async-nats'
/// own timer on the lost request (its `expires`, 5 s, plus 5 s), during which no message of
/// the route would reach the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_server_restart_a_consumer_pulls_again_at_once() {
    log_warnings();
    bounded(Duration::from_secs(60), async {
        let mut nats = NatsServer::start_with_js(SYNC_ALWAYS, "");
        let js = agent_fixtures(&nats).await;
        let app = EffectApp::start(|_, _| async { commit(200) }).await;
        let sidecar = Sidecar::start(&sidecar_toml("svc", &execution_events_route("")), &nats.url(), Some(&app.url())).await;
        sidecar.wait_ready().await;
        js_publish(&js, "agent.execution.completed", &[("Nats-Msg-Id", "before")], "before").await;
        let before = vec!["before".to_owned()];
        assert!(wait_until(Duration::from_secs(20), || async { app.tally(&before).2 == 0 }).await, "the first event never reached the app");

        // The loop has pulled again by now; that request dies with the server.
        nats.restart();
        let reconnected = wait_until(Duration::from_secs(20), || async {
            sidecar.metrics().await.lines().any(|l| l.starts_with("natsbridge_nats_reconnects_total ") && !l.ends_with(" 0"))
        })
        .await;
        assert!(reconnected, "the sidecar did not reconnect");
        let since = Instant::now();
        let js = jetstream::new(nats.client().await);
        js_publish(&js, "agent.execution.completed", &[("Nats-Msg-Id", "after")], "after").await;
        let after = vec!["after".to_owned()];
        assert!(wait_until(Duration::from_secs(20), || async { app.tally(&after).2 == 0 }).await, "the second event never reached the app");
        let took = since.elapsed();
        println!("  the event published after the reconnect reached the app in {took:?}");
        assert!(took < Duration::from_secs(4), "{took:?}: the consumer waited for the pull request the restart lost");
        sidecar.stop().await;
    })
    .await
}
