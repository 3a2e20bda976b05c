//! 7. Fan-out to three services with idempotency, poison events carrying publish
//!    expectations, and the server SIGKILLed and restarted under load (issue 19).

use super::*;

/// The issue's route for `service`: `agent.execution.completed` on stream AGENT, keyed by
/// `Nats-Msg-Id`, durable `<service>-execution-events`.
fn fan_out_route(service: &str) -> String {
    sidecar_toml(
        service,
        &execution_events_route(
            r#"ack_wait = "2s"
backoff = ["100ms", "200ms", "400ms"]
max_deliver = 50
concurrency = 8
idempotency = { key = "msg-id", ttl = "1h" }"#,
        ),
    )
}

/// Publishes until the stream acks it, reusing its `Nats-Msg-Id` (the server may be down).
async fn publish_until_acked(js: &jetstream::Context, id: &str, poison: bool) -> u64 {
    let mut headers = vec![("Nats-Msg-Id", id)];
    if poison {
        headers.push(("Nats-Expected-Stream", "AGENT"));
    }
    loop {
        let ack = async {
            js.publish_with_headers("agent.execution.completed", nats_headers(&headers), Bytes::copy_from_slice(id.as_bytes()))
                .await
                .ok()?
                .await
                .ok()
        };
        if let Ok(Some(a)) = tokio::time::timeout(Duration::from_secs(3), ack).await {
            return a.sequence;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the wiretap saw of event `id` at `service`: the event's publishes and deliveries
/// (its payload is its id), the acks and naks of those deliveries, and the idempotency
/// store's reads and writes of its key, each with the server's answer.
pub(crate) fn timeline(tap: &Wiretap, service: &str, id: &str) -> Vec<Wire> {
    let key = natsbridge::ingress::idempotency::store::kv_key(service, "execution-events", id);
    let durable = format!("$JS.ACK.AGENT.{service}-execution-events.");
    tap.thread(|w| {
        let delivery = w.payload == id && (w.subject.starts_with("agent.") || w.reply.as_deref().is_some_and(|r| r.starts_with(&durable)));
        delivery || w.subject.ends_with(&key)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_to_three_services_with_poison_events_and_a_server_restart() {
    log_warnings();
    bounded(Duration::from_secs(85), async {
        const EVENTS: usize = 120;
        const SERVICES: [&str; 3] = ["orchestration", "execution", "audit"];
        let mut nats = NatsServer::start_with_js(SYNC_ALWAYS, "");
        let tap = Wiretap::start(&nats.url()).await;
        let js = agent_fixtures(&nats).await;
        let mut apps = Vec::new();
        let mut sidecars = Vec::new();
        for s in SERVICES {
            let app = EffectApp::start(|c, _| async move {
                if c.key.starts_with("poison") {
                    return (400, false);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                commit(200)
            })
            .await;
            let sidecar = Sidecar::start(&fan_out_route(s), &nats.url(), Some(&app.url())).await;
            sidecar.wait_ready().await;
            apps.push(app);
            sidecars.push(sidecar);
        }

        // Every tenth event is poison and carries Nats-Expected-Stream; halfway through,
        // the server is SIGKILLed and restarted while the sidecars are working.
        let ids: Vec<String> = (0..EVENTS).map(|i| if i % 10 == 7 { format!("poison-{i:03}") } else { format!("evt-{i:03}") }).collect();
        let normal: Vec<String> = ids.iter().filter(|i| i.starts_with("evt")).cloned().collect();
        let poison = ids.len() - normal.len();
        let mut last = 0;
        for (n, id) in ids.iter().enumerate() {
            if n == EVENTS / 2 {
                println!("{:>9.3}s server SIGKILLed and restarted", tap.now().as_secs_f64());
                nats.restart();
            }
            last = last.max(publish_until_acked(&js, id, id.starts_with("poison")).await);
        }
        let js = jetstream::new(nats.client().await);
        let settled = wait_until(Duration::from_secs(50), || async {
            for s in SERVICES {
                if !consumer_settled(&js, "AGENT", &format!("{s}-execution-events"), last).await {
                    return false;
                }
            }
            apps.iter().all(|a| a.tally(&normal).2 == 0)
        })
        .await;

        let mut t = Tally { sent: EVENTS * SERVICES.len(), acked: EVENTS * SERVICES.len(), ..Default::default() };
        for app in &apps {
            let (delivered, duplicates, lost) = app.tally(&normal);
            t.delivered += delivered;
            t.duplicate_effects += duplicates;
            t.lost += lost;
        }
        // Each poison event once per consumer in the dead-letter stream.
        let dlq = js.get_stream("DLQ").await.unwrap();
        let mut dead: BTreeMap<(String, String), usize> = BTreeMap::new();
        for seq in 1..=dlq.get_info().await.unwrap().state.last_sequence {
            let Ok(m) = dlq.get_raw_message(seq).await else { continue };
            let h = |n: &str| m.headers.get(n).map(|v| v.as_str().to_owned()).unwrap_or_default();
            *dead.entry((h("Bridge-Dlq-Consumer"), h("Bridge-Dlq-Msg-Id"))).or_default() += 1;
        }
        let dead_per_consumer_once = dead.len() == poison * SERVICES.len() && dead.values().all(|n| *n == 1);
        t.delivered += dead.len();
        t.lost += (poison * SERVICES.len()).saturating_sub(dead.len());
        t.print("fan-out-three-services-restart");
        println!(
            "  dead letters {} for {} poison events × {} consumers, settled {settled}",
            dead.values().sum::<usize>(),
            poison,
            SERVICES.len()
        );

        assert_eq!(t.lost, 0, "events a service never handled, or poison events never dead-lettered");
        if t.duplicate_effects > 0 {
            // Which deliveries ran twice: their Bridge-Delivery and idempotency key tell a
            // redelivery from a second copy and from a claim that did not hold.
            for (s, app) in SERVICES.iter().zip(&apps) {
                for k in &normal {
                    if app.effects(k) > 1 {
                        let calls: Vec<_> = app.calls().into_iter().filter(|c| &c.key == k).collect();
                        eprintln!("effect applied twice by {s}, event {k}: calls {calls:?}");
                        eprintln!("its timeline (what the wiretap saw):");
                        for w in timeline(&tap, s, k) {
                            eprintln!("  {w}");
                        }
                    }
                }
            }
        }
        assert_eq!(t.duplicate_effects, 0, "events a service handled more than once");
        assert!(dead_per_consumer_once, "each poison event once per consumer: {dead:?}");
        assert!(settled, "the consumers did not settle");
        for s in sidecars {
            s.stop().await;
        }
    })
    .await
}
