//! 4. The sidecar SIGKILLed mid-handler, then restarted.
//!
//! What can be guaranteed, precisely: the bridge never marks a key done before the app's
//! 2xx reached it, and never calls the app for a key another live handler holds. A
//! sidecar killed mid-call leaves only a claim; after `claim_ttl` (no refreshes from the
//! dead process) the redelivery takes it over and calls the app again, with the same
//! Bridge-Idempotency-Key. So:
//! - 4a: the app had not committed when its caller died (its handler is dropped with the
//!   connection, as a transaction rolls back): the effect happens exactly once.
//! - 4b: the app had already committed (it commits, then is slow to answer): the bridge
//!   cannot know, and calls the app again. Exactly once then needs the app to check
//!   Bridge-Idempotency-Key; this case shows it does get the same key, and that a naive app
//!   would have applied the effect twice.

use super::*;

/// The production defaults scaled by 1/10: ack_wait 30s → 3s, claim_ttl 60s → 6s, the
/// default backoff 1s, 2s, 4s, 8s → 100ms … 800ms, max_deliver 5 (unscaled).
fn killable_route() -> String {
    sidecar_toml_claim(
        "svc",
        "6s",
        &tool_route("ack_wait = \"3s\"\nmax_deliver = 5\nbackoff = [\"100ms\", \"200ms\", \"400ms\", \"800ms\"]"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_killed_mid_handler_before_the_app_commits() {
    bounded(Duration::from_secs(120), async {
        let nats = NatsServer::start_with_js(SYNC_ALWAYS, "");
        let js = ingress_fixtures(&nats).await;
        // The first call holds (never answers) until its caller goes away.
        let app = EffectApp::start(|c, _| async move {
            if c.earlier == 0 {
                std::future::pending::<()>().await;
            }
            commit(200)
        })
        .await;
        let route = killable_route();
        let mut first = SidecarProcess::start(&route, &nats.url(), Some(&app.url()));
        first.wait_ready().await;
        let a = publish(&js, "tool.exec.grep", "order-1", "m-1").await;
        eventually("the first call at the app", Duration::from_secs(10), || async { (!app.calls().is_empty()).then_some(()) }).await;

        first.child.kill().unwrap();
        first.child.wait().unwrap();
        let killed = Instant::now();
        // The app's handler is dropped with its connection: no effect.
        eventually("the held call to be abandoned", Duration::from_secs(5), || async { (app.aborted().len() == 1).then_some(()) }).await;
        let second = SidecarProcess::start(&route, &nats.url(), Some(&app.url()));
        second.wait_ready().await;
        let effected = wait_until(Duration::from_secs(20), || async { app.effects("order-1") >= 1 }).await;
        let took = killed.elapsed();
        // A late duplicate of the same key is acked as handled.
        let b = publish(&js, "tool.exec.grep", "order-1", "m-2").await;
        wait_until(Duration::from_secs(15), || async { consumer_settled(&js, "TOOL", "tool", b.sequence).await }).await;
        let keys = vec!["order-1".to_string()];
        let (delivered, duplicate_effects, lost) = app.tally(&keys);
        let t = Tally { sent: 2, acked: 2, delivered, duplicate_effects, lost };
        t.print("sidecar-killed-mid-handler");
        let calls = app.calls();
        println!(
            "  app calls {} (deliveries {:?}), abandoned {}, effect {took:?} after the kill",
            calls.len(),
            calls.iter().map(|c| c.delivery).collect::<Vec<_>>(),
            app.aborted().len()
        );

        assert!(effected, "the message was not redelivered to the restarted sidecar:\n{}", second.log());
        assert_eq!(lost, 0);
        assert_eq!(duplicate_effects, 0);
        assert_eq!(calls.len(), 2, "the killed call and its redelivery; the duplicate never reaches the app");
        assert!(calls[1].delivery >= 2, "the second call is a redelivery of seq {}", a.sequence);
        assert!(calls.iter().all(|c| c.idem.as_deref() == Some("order-1")));
        assert!(consumer_settled(&js, "TOOL", "tool", b.sequence).await);
        assert_eq!(stream_messages(&js, "DLQ").await, 0);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_killed_after_the_app_committed_needs_the_app_to_check_the_key() {
    bounded(Duration::from_secs(120), async {
        let nats = NatsServer::start_with_js(SYNC_ALWAYS, "");
        let js = ingress_fixtures(&nats).await;
        // The app applies the effect at once — keyed by Bridge-Idempotency-Key, which it
        // checks first — then is slow to answer the first call (it never does).
        let app = EffectApp::start(|c, ledger| async move {
            let key = c.idem.clone().unwrap_or_default();
            {
                let mut l = ledger.lock().unwrap();
                let e = l.effects.entry(key).or_default();
                if *e == 0 {
                    *e = 1;
                }
            }
            if c.earlier == 0 {
                std::future::pending::<()>().await;
            }
            (200, false)
        })
        .await;
        let route = killable_route();
        let mut first = SidecarProcess::start(&route, &nats.url(), Some(&app.url()));
        first.wait_ready().await;
        publish(&js, "tool.exec.grep", "order-2", "m-1").await;
        eventually("the first call at the app", Duration::from_secs(10), || async { (!app.calls().is_empty()).then_some(()) }).await;
        first.child.kill().unwrap();
        first.child.wait().unwrap();
        let second = SidecarProcess::start(&route, &nats.url(), Some(&app.url()));
        second.wait_ready().await;
        let b = publish(&js, "tool.exec.grep", "order-2", "m-2").await;
        let settled = wait_until(Duration::from_secs(20), || async { consumer_settled(&js, "TOOL", "tool", b.sequence).await }).await;
        let calls = app.calls();
        let keys = vec!["order-2".to_string()];
        let (delivered, duplicate_effects, lost) = app.tally(&keys);
        let t = Tally { sent: 2, acked: 2, delivered, duplicate_effects, lost };
        t.print("sidecar-killed-after-app-commit");
        println!(
            "  the bridge called the app {} times for the key (deliveries {:?}); a naive app would have applied {} effects, this one checked Bridge-Idempotency-Key",
            calls.len(),
            calls.iter().map(|c| c.delivery).collect::<Vec<_>>(),
            calls.len()
        );

        assert!(settled, "the consumer did not settle:\n{}", second.log());
        assert_eq!(lost, 0);
        assert_eq!(duplicate_effects, 0);
        // The documented gap: the redelivery re-runs the handler once — never more, and
        // the late duplicate (published after the key was done) never reaches the app.
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert!(calls.iter().all(|c| c.idem.as_deref() == Some("order-2")), "both calls carry the same key: {calls:?}");
    })
    .await
}
