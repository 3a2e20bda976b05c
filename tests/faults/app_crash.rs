//! 3. The app answers 500, then crashes, then comes back, during jetstream ingress.

use super::*;

/// Zero lost and zero duplicate effects with an idempotency key: every key's effect
/// happens exactly once, though every message is retried through both failure modes and a
/// third of the keys are published twice (same key, different Nats-Msg-Id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_failing_then_crashing_then_back_during_jetstream_ingress() {
    bounded(Duration::from_secs(120), async {
        const KEYS: usize = 150;
        let nats = NatsServer::start_with_js(SYNC_ALWAYS, "");
        let js = ingress_fixtures(&nats).await;
        // 0: answers 500; 1: healthy.
        let mode = Arc::new(AtomicU8::new(0));
        let app = {
            let mode = mode.clone();
            EffectApp::start(move |_, _| {
                let healthy = mode.load(Ordering::SeqCst) == 1;
                async move {
                    if !healthy {
                        // Slow failures, so the crash cuts some calls mid-flight.
                        tokio::time::sleep(Duration::from_millis(40)).await;
                        return (500, false);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    commit(200)
                }
            })
            .await
        };
        let cfg = sidecar_toml("svc", &tool_route("ack_wait = \"2s\"\nmax_deliver = 100\nbackoff = [\"200ms\"]\nconcurrency = 16"));
        let sidecar = Sidecar::start(&cfg, &nats.url(), Some(&app.url())).await;
        sidecar.wait_ready().await;

        let keys: Vec<String> = (0..KEYS).map(|i| format!("k-{i:04}")).collect();
        let publisher = {
            let (js, keys) = (js.clone(), keys.clone());
            tokio::spawn(async move {
                let (mut sent, mut last) = (0, 0);
                for (i, k) in keys.iter().enumerate() {
                    last = publish(&js, "tool.exec.grep", k, &format!("{k}-a")).await.sequence;
                    sent += 1;
                    if i % 3 == 0 {
                        // A forced duplicate: same key, a new Nats-Msg-Id, so the stream keeps both.
                        last = publish(&js, "tool.exec.grep", k, &format!("{k}-b")).await.sequence;
                        sent += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                (sent, last)
            })
        };
        // Crash once the app has answered a good number of 500s (evidence, not a timer)...
        eventually("20 calls answered 500 before the crash", Duration::from_secs(30), || async { (app.calls().len() >= 20).then_some(()) })
            .await;
        let naks = |m: &str| metric_sum(m, "natsbridge_ingress_outcomes_total", "outcome=\"nak\"");
        let naks_at_crash = naks(&sidecar.metrics().await);
        let aborted_at_crash = app.aborted().len();
        let calls_500 = app.calls().len();
        app.crash();
        // ...and come back once the sidecar has naked deliveries it could not hand to the
        // app at all: more naks since the crash than calls the crash cut.
        let refused = wait_until(Duration::from_secs(30), || async {
            let cut = app.aborted().len() - aborted_at_crash;
            naks(&sidecar.metrics().await) >= naks_at_crash + cut as f64 + 5.0
        })
        .await;
        assert!(refused, "the sidecar never tried the crashed app");
        mode.store(1, Ordering::SeqCst);
        app.come_back().await;
        let (published, last_seq) = publisher.await.unwrap();

        wait_until(Duration::from_secs(30), || async { app.tally(&keys).2 == 0 && consumer_settled(&js, "TOOL", "tool", last_seq).await }).await;
        let (delivered, duplicate_effects, lost) = app.tally(&keys);
        let t = Tally { sent: published, acked: published, delivered, duplicate_effects, lost };
        t.print("app-500-crash-back");
        let calls = app.calls();
        let m = sidecar.metrics().await;
        let dlq = stream_messages(&js, "DLQ").await;
        println!(
            "  app calls {} ({calls_500} answered 500 before the crash, {} cut by the crash), redelivered calls {}, naks {}, claims released {}, hits {}, dead letters {dlq}",
            calls.len(),
            app.aborted().len(),
            calls.iter().filter(|c| c.delivery > 1).count(),
            metric_sum(&m, "natsbridge_ingress_outcomes_total", "outcome=\"nak\""),
            metric_sum(&m, "natsbridge_idempotency_total", "result=\"release\""),
            metric_sum(&m, "natsbridge_idempotency_total", "result=\"hit\""),
        );

        assert_eq!(lost, 0, "keys whose effect never happened");
        assert_eq!(duplicate_effects, 0, "keys whose effect happened more than once");
        assert_eq!(dlq, 0, "nothing may be dead-lettered: every failure here is retryable");
        assert!(consumer_settled(&js, "TOOL", "tool", last_seq).await, "the consumer did not settle");
        assert!(calls_500 > 0, "the app never answered 500");
        assert!(calls.iter().all(|c| c.idem.as_deref() == Some(c.key.as_str())), "Bridge-Idempotency-Key is the message's key");
        within("the sidecar's shutdown", Duration::from_secs(30), sidecar.stop()).await;
    })
    .await
}
