//! 5. Two replicas on the same durable, redeliveries forced.

use super::*;

/// Each effect exactly once: a quarter of the keys fail (500) on their first call, a tenth
/// are slower than the route's app timeout on their first call (the sidecar gives up and
/// the message is naked), and half of the keys are published twice, so both replicas hold
/// copies of the same key at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_with_forced_redeliveries_apply_each_effect_once() {
    bounded(Duration::from_secs(120), async {
        const KEYS: usize = 200;
        let nats = NatsServer::start_with_js(SYNC_ALWAYS, "");
        let js = ingress_fixtures(&nats).await;
        let app = EffectApp::start(|c, _| async move {
            let i: usize = c.key.trim_start_matches("k-").parse().unwrap_or(0);
            if c.earlier == 0 && i % 4 == 1 {
                return (500, false);
            }
            if c.earlier == 0 && i % 10 == 3 {
                // Far past the app timeout (ack_wait - 200ms): the sidecar drops the call,
                // and the handler is dropped with its connection before it commits. Far
                // past, not just past: on a loaded machine the app may notice the closed
                // connection late, and a commit after the retry's would count twice.
                tokio::time::sleep(Duration::from_secs(20)).await;
                return commit(200);
            }
            tokio::time::sleep(Duration::from_millis(5 + (i as u64 * 7) % 30)).await;
            commit(200)
        })
        .await;
        let cfg = sidecar_toml("svc", &tool_route("ack_wait = \"1s\"\nmax_deliver = 50\nbackoff = [\"100ms\"]\nconcurrency = 8"));
        let r1 = Sidecar::start(&cfg, &nats.url(), Some(&app.url())).await;
        let r2 = Sidecar::start(&cfg, &nats.url(), Some(&app.url())).await;
        r1.wait_ready().await;
        r2.wait_ready().await;

        let keys: Vec<String> = (0..KEYS).map(|i| format!("k-{i:04}")).collect();
        let (mut published, mut last) = (0, 0);
        for (i, k) in keys.iter().enumerate() {
            last = publish(&js, "tool.exec.grep", k, &format!("{k}-a")).await.sequence;
            published += 1;
            if i % 2 == 0 {
                last = publish(&js, "tool.exec.grep", k, &format!("{k}-b")).await.sequence;
                published += 1;
            }
        }
        wait_until(Duration::from_secs(40), || async { app.tally(&keys).2 == 0 && consumer_settled(&js, "TOOL", "tool", last).await }).await;
        let (delivered, duplicate_effects, lost) = app.tally(&keys);
        let t = Tally { sent: published, acked: published, delivered, duplicate_effects, lost };
        t.print("two-replicas-redeliveries");
        let calls = app.calls();
        let (m1, m2) = (r1.metrics().await, r2.metrics().await);
        let deliveries = |m: &str| metric_sum(m, "natsbridge_ingress_deliveries_total", "tool-exec");
        let conflicts = metric_sum(&m1, "natsbridge_idempotency_total", "result=\"conflict\"") + metric_sum(&m2, "natsbridge_idempotency_total", "result=\"conflict\"");
        let dlq = stream_messages(&js, "DLQ").await;
        println!(
            "  app calls {}, redelivered calls {}, abandoned by the sidecar {}, deliveries per replica {} / {}, in-flight conflicts {conflicts}, dead letters {dlq}",
            calls.len(),
            calls.iter().filter(|c| c.delivery > 1).count(),
            app.aborted().len(),
            deliveries(&m1),
            deliveries(&m2)
        );

        assert_eq!(lost, 0, "keys whose effect never happened");
        assert_eq!(duplicate_effects, 0, "keys whose effect happened more than once");
        assert_eq!(dlq, 0);
        assert!(consumer_settled(&js, "TOOL", "tool", last).await, "the consumer did not settle");
        assert!(calls.iter().any(|c| c.delivery > 1), "no redelivery was forced");
        // Every slow first call was abandoned by the sidecar (its handler dropped before
        // it could commit a second effect).
        let slow = (0..KEYS).filter(|i| i % 10 == 3 && i % 4 != 1).count();
        let abandoned = wait_until(Duration::from_secs(15), || async { app.aborted().len() == slow }).await;
        assert!(abandoned, "slow calls abandoned: {} of {slow}", app.aborted().len());
        assert!(deliveries(&m1) > 0.0 && deliveries(&m2) > 0.0, "both replicas must take part");
        within("replica r1's shutdown", Duration::from_secs(30), r1.stop()).await;
        within("replica r2's shutdown", Duration::from_secs(30), r2.stop()).await;
    })
    .await
}
