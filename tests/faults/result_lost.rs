//! 8. The server stopped while a handler stores its result in the idempotency store, then
//!    SIGKILLed and restarted past the claim's ttl: the crash loses the result write (and,
//!    often, the consumer's record of the delivery), so the message comes back while the
//!    store still holds a claim that looks stale. The effect must still happen once.

use super::*;
use crate::fan_out;

/// Events, each through its own crash.
const TRIES: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_write_lost_in_a_server_crash_does_not_run_the_effect_twice() {
    log_warnings();
    bounded(Duration::from_secs(150), async {
        let mut nats = NatsServer::start_with_js(SYNC_ALWAYS, "");
        let tap = Wiretap::start(&nats.url()).await;
        agent_fixtures(&nats).await;
        // The app stops (SIGSTOP) the server as it answers an `evt-` event's first call: the
        // sidecar's result write then waits in the server's socket, unread, and the kill
        // that follows loses it, every time.
        let pid = Arc::new(AtomicU64::new(u64::from(nats.pid().unwrap())));
        let app = EffectApp::start({
            let pid = pid.clone();
            move |c, _| {
                let pid = pid.load(Ordering::SeqCst);
                async move {
                    if c.earlier == 0 && c.key.starts_with("evt-") {
                        freeze(u32::try_from(pid).unwrap());
                    }
                    commit(200)
                }
            }
        })
        .await;
        // A claim of 1 s, refreshed every 333 ms while the app runs: the outage below is
        // longer, so the claim the crash leaves behind is stale when the server is back, and
        // the message's redelivery may take the key over.
        let route = execution_events_route("ack_wait = \"2s\"\nconcurrency = 4\nidempotency = { key = \"msg-id\", ttl = \"1h\" }");
        let sidecar = Sidecar::start(&sidecar_toml_claim("svc", "1s", &route), &nats.url(), Some(&app.url())).await;
        sidecar.wait_ready().await;

        let mut ids = Vec::new();
        let mut settled = true;
        for i in 0..TRIES {
            let id = format!("evt-{i}");
            let seq =
                js_publish(&jetstream::new(nats.client().await), "agent.execution.completed", &[("Nats-Msg-Id", &id)], &id).await.sequence;
            eventually("the app's call", Duration::from_secs(20), || async { app.calls().iter().any(|c| c.key == id).then_some(()) }).await;
            // The outage itself (not a wait for a condition): longer than the claim's ttl and
            // than a NATS request's 5 s timeout, so the holder's first try to store its
            // result has failed for good, and shorter than the holder's budget for trying
            // again (10 s): only a holder that tries again stores the result.
            tokio::time::sleep(Duration::from_secs(6)).await;
            nats.restart();
            pid.store(u64::from(nats.pid().unwrap()), Ordering::SeqCst);
            ids.push(id);
            // Settled (its result stored and acked, or its copy handled) before the next
            // event stops the server again: each event gets one outage.
            let js = jetstream::new(nats.client().await);
            settled &=
                wait_until(Duration::from_secs(30), || async { consumer_settled(&js, "AGENT", "svc-execution-events", seq).await }).await;
        }
        let (delivered, duplicates, lost) = app.tally(&ids);
        Tally { sent: TRIES, acked: TRIES, delivered, duplicate_effects: duplicates, lost }.print("result-write-lost");
        for id in ids.iter().filter(|id| app.effects(id) > 1) {
            let calls: Vec<_> = app.calls().into_iter().filter(|c| &c.key == id).collect();
            eprintln!("effect applied twice, event {id}: calls {calls:?}");
            for w in fan_out::timeline(&tap, "svc", id) {
                eprintln!("  {w}");
            }
        }
        assert_eq!(duplicates, 0, "an event whose result write was lost ran twice");
        assert!(settled, "the consumer did not settle");
        sidecar.stop().await;
    })
    .await
}
