//! Messages between services (issue 19), with a real nats-server, real apps and two
//! in-process sidecars of different services consuming the same events:
//! - fan-out: each service's app sees every event exactly once (idempotency keys are
//!   scoped by service);
//! - a poison event carrying `Nats-Expected-Stream` lands in the dead-letter stream once
//!   per consumer (publish controls are not copied; each dead letter has its own id);
//! - the last delivery is enforced by the sidecar: a message naked at shutdown on its last
//!   delivery is dead-lettered by the next sidecar without calling the app;
//! - a server paused mid-call does not hang the handler or the shutdown;
//! - an idempotency store gone for longer than the backoffs add up to pauses the route
//!   (no dead letters) and every message runs once when it is back;
//! - in-progress acks cover a slow settle (a dead letter slower than ack_wait): no
//!   redelivery;
//! - a handler aborted at shutdown leaves its claim to go stale: its redelivery does not
//!   run beside the app's still-running call;
//! - a stream deleted and created again while the sidecar could not look, already longer
//!   than the old consumer's ack floor, loses none of its first messages;
//! - a durable lost while its sidecar was down is recreated from the floor the last
//!   sidecar kept, so what was published meanwhile still reaches the app;
//! - a durable lost while its stream cannot say where it ends is recreated once it can,
//!   after its floor: the app sees nothing twice.

mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};

use support::fixtures::*;
use support::*;

const BUCKET: &str = "natsbridge_idempotency";
const TEST_BOUND: Duration = Duration::from_secs(90);

async fn bounded<F: Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_BOUND, f).await.expect("test exceeded its time bound");
}

/// The issue's route, for `service`: `agent.execution.completed` on stream AGENT, keyed by
/// `Nats-Msg-Id`, durable `<service>-execution-events`, dead letters to
/// `dlq.<service>.execution-events`.
fn service_toml(service: &str, extra: &str) -> String {
    routes_toml(
        service,
        "1s",
        &format!(
            "{}\n{}",
            idempotency_section(BUCKET, "5s"),
            execution_events_route(&format!("idempotency = {{ key = \"msg-id\", ttl = \"1h\" }}\n{extra}"))
        ),
    )
}

/// Stream AGENT on `agent.>`.
async fn agent_stream(nats: &NatsServer) -> jetstream::Context {
    let js = jetstream::new(nats.client().await);
    js.create_stream(jetstream::stream::Config { name: "AGENT".into(), subjects: vec!["agent.>".into()], ..Default::default() })
        .await
        .unwrap();
    js
}

/// Stream AGENT, the dead-letter stream and the bucket.
async fn setup(nats: &NatsServer) -> jetstream::Context {
    let js = agent_stream(nats).await;
    dlq_stream(&js).await;
    js.create_key_value(kv::Config { bucket: BUCKET.into(), history: 1, ..Default::default() }).await.unwrap();
    js
}

/// Sidecars for the services `orchestration` and `execution`, each in front of its app, both
/// ready.
async fn both_services(nats: &NatsServer, orchestration: &App, execution: &App) -> (Sidecar, Sidecar) {
    let a = Sidecar::start(&service_toml("orchestration", ""), &nats.url(), Some(&orchestration.url())).await;
    let b = Sidecar::start(&service_toml("execution", ""), &nats.url(), Some(&execution.url())).await;
    a.wait_ready().await;
    b.wait_ready().await;
    (a, b)
}

fn durable(service: &str) -> String {
    format!("{service}-execution-events")
}

/// How many times the app saw each event (by body).
fn seen(app: &App) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in app.requests() {
        *m.entry(String::from_utf8_lossy(&r.body).into_owned()).or_default() += 1;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_services_on_one_route_each_see_every_event_once() {
    bounded(async {
        let nats = NatsServer::start();
        let js = setup(&nats).await;
        let orchestration = App::start(|_| respond(200, "ok")).await;
        let execution = App::start(|_| respond(200, "ok")).await;
        let (a, b) = both_services(&nats, &orchestration, &execution).await;

        let mut last = 0;
        for i in 0..20 {
            let id = format!("evt-{i:02}");
            last = js_publish(&js, "agent.execution.completed", &[("Nats-Msg-Id", &id)], &id).await.sequence;
        }
        for s in ["orchestration", "execution"] {
            eventually(&format!("{s} settled"), Duration::from_secs(30), || async {
                consumer_settled(&js, "AGENT", &durable(s), last).await.then_some(())
            })
            .await;
        }
        let want: BTreeMap<String, usize> = (0..20).map(|i| (format!("evt-{i:02}"), 1)).collect();
        assert_eq!(seen(&orchestration), want, "orchestration's app");
        assert_eq!(seen(&execution), want, "execution's app");
        assert_eq!(dlq_count(&js).await, 0);
        a.stop().await;
        b.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_with_expectations_is_dead_lettered_once_per_consumer() {
    bounded(async {
        let nats = NatsServer::start();
        let js = setup(&nats).await;
        let orchestration = App::start(|_| respond(400, "bad event")).await;
        let execution = App::start(|_| respond(400, "bad event")).await;
        let (a, b) = both_services(&nats, &orchestration, &execution).await;

        let ack = js_publish(
            &js,
            "agent.execution.completed",
            &[("Nats-Msg-Id", "poison-1"), ("Nats-Expected-Stream", "AGENT"), ("X-Trace", "t-1")],
            "poison",
        )
        .await;
        for s in ["orchestration", "execution"] {
            eventually(&format!("{s} settled"), Duration::from_secs(30), || async {
                consumer_settled(&js, "AGENT", &durable(s), ack.sequence).await.then_some(())
            })
            .await;
        }
        assert_eq!(dlq_count(&js).await, 2, "one dead letter per consumer");
        let dlq = js.get_stream("DLQ").await.unwrap();
        let mut ids = Vec::new();
        for seq in 1..=2 {
            let m = dlq.get_raw_message(seq).await.unwrap();
            let h = &m.headers;
            assert_eq!(h.get("Bridge-Dlq-Msg-Id").map(|v| v.as_str()), Some("poison-1"));
            assert_eq!(h.get("Bridge-Dlq-Reason").map(|v| v.as_str()), Some("poison"));
            assert_eq!(h.get("X-Trace").map(|v| v.as_str()), Some("t-1"));
            assert!(h.get("Nats-Expected-Stream").is_none());
            ids.push(h.get("Nats-Msg-Id").unwrap().as_str().to_owned());
        }
        ids.sort();
        // `<stream>.<durable>.<seq>.<stored ns>`: the time tells a recreated stream's
        // message from an earlier one under the same sequence.
        let stored = js.get_stream("AGENT").await.unwrap().get_raw_message(ack.sequence).await.unwrap().time.unix_timestamp_nanos();
        assert_eq!(
            ids,
            [
                format!("AGENT.{}.{}.{stored}", durable("execution"), ack.sequence),
                format!("AGENT.{}.{}.{stored}", durable("orchestration"), ack.sequence)
            ]
        );
        // Poison: one call per service, no retries.
        assert_eq!(orchestration.requests().len(), 1);
        assert_eq!(execution.requests().len(), 1);
        a.stop().await;
        b.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_naked_at_shutdown_on_its_last_delivery_is_dead_lettered_without_the_app() {
    bounded(async {
        let nats = NatsServer::start();
        let js = setup(&nats).await;
        // The first sidecar's app never answers in time: shutdown naks the message, which
        // was on its only delivery (max_deliver = 1).
        let stuck = App::script(|_, _| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            respond(200, "late")
        })
        .await;
        let toml = service_toml("svc", "max_deliver = 1\nack_wait = \"30s\"\ntimeout = \"25s\"");
        let first = Sidecar::start(&toml, &nats.url(), Some(&stuck.url())).await;
        first.wait_ready().await;
        let info = js.get_stream("AGENT").await.unwrap().consumer_info(&durable("svc")).await.unwrap();
        assert_eq!(info.config.max_deliver, -1, "the server must not enforce max_deliver");
        let ack = js_publish(&js, "agent.execution.completed", &[("Nats-Msg-Id", "last-1")], "last").await;
        stuck.wait_hits(1).await;
        first.stop().await;

        let app = App::start(|_| respond(200, "ok")).await;
        let second = Sidecar::start(&toml, &nats.url(), Some(&app.url())).await;
        second.wait_ready().await;
        eventually("settled", Duration::from_secs(30), || async {
            consumer_settled(&js, "AGENT", &durable("svc"), ack.sequence).await.then_some(())
        })
        .await;
        assert_eq!(dlq_count(&js).await, 1, "the message must be dead-lettered, not stranded");
        let m = js.get_stream("DLQ").await.unwrap().get_raw_message(1).await.unwrap();
        assert_eq!(m.headers.get("Bridge-Dlq-Reason").map(|v| v.as_str()), Some("max_deliver"));
        assert_eq!(app.requests().len(), 0, "past max_deliver the app is not called again");
        second.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_paused_mid_call_neither_hangs_the_handler_nor_the_shutdown() {
    bounded(async {
        let nats = NatsServer::start();
        let js = setup(&nats).await;
        let pid = nats.pid().unwrap();
        // The app stops the server while it handles the event: every JetStream call after
        // it (the store write, the ack, the watchdog's consumer info) gets no answer.
        let app = App::script(move |_, _| async move {
            freeze(pid);
            respond(200, "ok")
        })
        .await;
        let sidecar = Sidecar::start(&service_toml("svc", ""), &nats.url(), Some(&app.url())).await;
        sidecar.wait_ready().await;
        js_publish(&js, "agent.execution.completed", &[("Nats-Msg-Id", "paused-1")], "paused").await;
        app.wait_hits(1).await;

        // The handler gives up on the paused server and releases its permit.
        eventually("the handler to finish", Duration::from_secs(30), || async {
            let m = sidecar.metrics().await;
            let line = m.lines().find(|l| l.starts_with("natsbridge_ingress_in_flight{route=\"execution-events\"}"));
            (line.and_then(|l| l.rsplit(' ').next()) == Some("0")).then_some(())
        })
        .await;
        // And the shutdown finishes while the server is still paused.
        let stopped = tokio::time::timeout(Duration::from_secs(20), sidecar.stop()).await;
        nats.resume();
        assert!(stopped.is_ok(), "shutdown hung on a paused server");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_longer_than_the_backoffs_dead_letters_nothing_and_runs_each_message_once() {
    bounded(async {
        let nats = NatsServer::start();
        let js = setup(&nats).await;
        let app = App::start(|_| respond(200, "ok")).await;
        // Three deliveries 300 ms apart: an outage of seconds would exhaust them many times
        // over if a failed claim spent a delivery.
        let toml = service_toml("svc", "max_deliver = 3\nbackoff = [\"300ms\"]\nack_wait = \"5s\"");
        let sidecar = Sidecar::start(&toml, &nats.url(), Some(&app.url())).await;
        sidecar.wait_ready().await;
        js_publish(&js, "agent.execution.completed", &[("Nats-Msg-Id", "before")], "before").await;
        app.wait_hits(1).await;

        js.delete_key_value(BUCKET).await.unwrap();
        // Messages keep arriving during the outage: the first is delivered while the store is
        // gone (its claim fails and is held), the rest after the sidecar knows it is degraded.
        js_publish(&js, "agent.execution.completed", &[("Nats-Msg-Id", "during-0")], "during-0").await;
        eventually("the idempotency component degraded", Duration::from_secs(15), || async {
            sidecar.statusz().await["failing"]["idempotency"].as_str().map(str::to_owned)
        })
        .await;
        for i in 1..6 {
            let id = format!("during-{i}");
            js_publish(&js, "agent.execution.completed", &[("Nats-Msg-Id", &id)], &id).await;
        }
        // The outage itself (not a wait for a condition): longer than max_deliver × backoff
        // many times over, and than the pull loop's backoff steps.
        tokio::time::sleep(Duration::from_secs(16)).await;
        assert_eq!(dlq_count(&js).await, 0, "nothing may be dead-lettered while the store is out");
        assert_eq!(app.requests().len(), 1, "nothing may run unprotected while the store is out");

        js.create_key_value(kv::Config { bucket: BUCKET.into(), history: 1, ..Default::default() }).await.unwrap();
        let last = js_publish(&js, "agent.execution.completed", &[("Nats-Msg-Id", "after")], "after").await.sequence;
        eventually("settled", Duration::from_secs(45), || async {
            consumer_settled(&js, "AGENT", &durable("svc"), last).await.then_some(())
        })
        .await;
        let mut want: BTreeMap<String, usize> = (0..6).map(|i| (format!("during-{i}"), 1)).collect();
        want.insert("before".into(), 1);
        want.insert("after".into(), 1);
        assert_eq!(seen(&app), want);
        assert_eq!(dlq_count(&js).await, 0);
        sidecar.wait_ready().await;
        sidecar.stop().await;
    })
    .await
}

/// A dead-letter "stream" that takes `delay` to store: a real NATS responder on `subject`
/// that stores each message in the DLQ stream (as `dlqstore.slow`) after `delay` and
/// answers with the stream's own PubAck.
async fn slow_dead_letters(nats: &NatsServer, subject: &str, delay: Duration) -> tokio::task::JoinHandle<()> {
    answer_each(nats, subject, move |client, m| async move {
        tokio::time::sleep(delay).await;
        let headers = m.headers.clone().unwrap_or_default();
        let ack = client.request_with_headers("dlqstore.slow", headers, m.payload.clone()).await.unwrap();
        client.publish(m.reply.unwrap(), ack.payload).await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_progress_acks_run_until_a_slow_dead_letter_is_stored() {
    bounded(async {
        let nats = NatsServer::start();
        let js = agent_stream(&nats).await;
        // The DLQ stream holds `dlqstore.>`: the route's `dlq.svc.slow` reaches it only
        // through the slow front. Storing the dead letter takes 3 s, past the 2 s ack_wait
        // that began at the delivery.
        js.create_stream(jetstream::stream::Config { name: "DLQ".into(), subjects: vec!["dlqstore.>".into()], ..Default::default() })
            .await
            .unwrap();
        js.create_key_value(kv::Config { bucket: BUCKET.into(), history: 1, ..Default::default() }).await.unwrap();
        let front = slow_dead_letters(&nats, "dlq.svc.slow", Duration::from_secs(3)).await;
        let app = App::start(|_| respond(400, "poison")).await;
        let toml = service_toml("svc", "ack_wait = \"2s\"\ndead_letter = \"dlq.svc.slow\"");
        let sidecar = Sidecar::start(&toml, &nats.url(), Some(&app.url())).await;
        sidecar.wait_ready().await;
        let ack = js_publish(&js, "agent.execution.completed", &[("Nats-Msg-Id", "slow-1")], "slow").await;
        eventually("settled", Duration::from_secs(30), || async {
            consumer_settled(&js, "AGENT", &durable("svc"), ack.sequence).await.then_some(())
        })
        .await;
        assert_eq!(dlq_count(&js).await, 1);
        let hits = app.hits();
        assert_eq!(
            hits.len(),
            1,
            "redelivered while its dead letter was being stored: {:?}",
            hits.iter().map(Hit::delivery).collect::<Vec<_>>()
        );
        let info = js.get_stream("AGENT").await.unwrap().consumer_info(&durable("svc")).await.unwrap();
        assert_eq!(info.num_redelivered, 0);
        sidecar.stop().await;
        front.abort();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_aborted_at_shutdown_leaves_its_claim_to_go_stale() {
    bounded(async {
        let nats = NatsServer::start();
        let js = setup(&nats).await;
        // The app goes on with a dropped request (as real apps do): each call runs 3 s in its
        // own task whether or not the sidecar still waits for it.
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let app = App::script({
            let (running, most) = (running.clone(), most.clone());
            move |_, _| {
                let (running, most) = (running.clone(), most.clone());
                async move {
                    let work = tokio::spawn(async move {
                        most.fetch_max(running.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        running.fetch_sub(1, Ordering::SeqCst);
                    });
                    let _ = work.await;
                    respond(200, "ok")
                }
            }
        })
        .await;
        // drain_timeout 1 s (the fixture's): the first sidecar aborts the call 1 s into it.
        // claim_ttl 5 s (the fixture's): the claim outlives the app's call.
        let toml = service_toml("svc", "ack_wait = \"30s\"\ntimeout = \"25s\"");
        let first = Sidecar::start(&toml, &nats.url(), Some(&app.url())).await;
        first.wait_ready().await;
        let ack = js_publish(&js, "agent.execution.completed", &[("Nats-Msg-Id", "abort-1")], "abort").await;
        app.wait_hits(1).await;
        // A replica of the same service, waiting for the redelivery.
        let second = Sidecar::start(&toml, &nats.url(), Some(&app.url())).await;
        second.wait_ready().await;
        first.stop().await;
        eventually("settled", Duration::from_secs(30), || async {
            consumer_settled(&js, "AGENT", &durable("svc"), ack.sequence).await.then_some(())
        })
        .await;
        assert_eq!(most.load(Ordering::SeqCst), 1, "the redelivery ran the key beside the aborted call");
        assert_eq!(app.hits().len(), 2, "the aborted call, then the redelivery once the claim went stale");
        assert_eq!(dlq_count(&js).await, 0);
        second.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_max_age_shorter_than_the_route_ttl_shows_the_store_degraded() {
    bounded(async {
        let nats = NatsServer::start();
        let js = agent_stream(&nats).await;
        dlq_stream(&js).await;
        // Made by hand, not by `provision`: results would go after 1 minute, not the route's 1 h.
        js.create_key_value(kv::Config { bucket: BUCKET.into(), history: 1, max_age: Duration::from_secs(60), ..Default::default() })
            .await
            .unwrap();
        let app = App::start(|_| respond(200, "ok")).await;
        let sidecar = Sidecar::start(&service_toml("svc", ""), &nats.url(), Some(&app.url())).await;
        sidecar.wait_ready().await;
        let v = sidecar.statusz().await;
        let c = &v["components"]["idempotency"];
        assert_eq!(c["state"], "up", "{v}");
        let why = c["reason"].as_str().unwrap();
        assert!(why.contains("max_age 1m") && why.contains("\"execution-events\" ttl 1h"), "{why}");
        // Degraded, not down: the route still runs.
        let ack = js_publish(&js, "agent.execution.completed", &[("Nats-Msg-Id", "e-1")], "e").await;
        eventually("settled", Duration::from_secs(30), || async {
            consumer_settled(&js, "AGENT", &durable("svc"), ack.sequence).await.then_some(())
        })
        .await;
        assert_eq!(app.requests().len(), 1);
        sidecar.stop().await;
    })
    .await
}

/// Stream AGENT, the dead-letter stream, an app answering 200, and a sidecar process
/// (ready) consuming `agent.execution.completed` with durable `events`, to which five
/// events `old-0`…`old-4` were published. Also the routes file it runs.
async fn events_sidecar(nats: &NatsServer) -> (jetstream::Context, App, String, SidecarProcess) {
    let js = agent_stream(nats).await;
    dlq_stream(&js).await;
    let app = App::script(|_, _| async { respond(200, "ok") }).await;
    let toml = routes_toml("svc", "1s", &execution_events_route("durable = \"events\""));
    let sidecar = SidecarProcess::start(&toml, &nats.url(), Some(&app.url()));
    sidecar.wait_ready().await;
    for i in 0..5 {
        js_publish(&js, "agent.execution.completed", &[], &format!("old-{i}")).await;
    }
    (js, app, toml, sidecar)
}

/// Waits until the app has seen every body in `want`; then how often it saw each.
async fn seen_all(app: &App, want: &[String], what: &str) -> BTreeMap<String, usize> {
    eventually(what, Duration::from_secs(30), || {
        let seen = seen(app);
        async move { want.iter().all(|w| seen.contains_key(w)).then_some(seen) }
    })
    .await
}

/// Waits until the watchdog of `sidecar`'s route `execution-events` has read its ack floor
/// at `seq`: from then on it knows where a recreated durable must start.
async fn watchdog_floor_at(sidecar: &SidecarProcess, seq: u64) {
    let admin = sidecar.admin;
    eventually(&format!("the watchdog reading the ack floor at {seq}"), Duration::from_secs(20), || async move {
        let text = get(&format!("http://{admin}/metrics")).await.ok().map(|r| String::from_utf8_lossy(&r.body).into_owned())?;
        (metric(&text, r#"natsbridge_ingress_consumer_ack_floor{route="execution-events"}"#) == Some(seq as f64)).then_some(())
    })
    .await
}

/// The watchdog compared the new stream's length with the old ack floor: a stream created
/// again that already held more messages than the floor looked like the same stream, so
/// its consumer was recreated after the old floor and skipped its first messages. The
/// sidecar is frozen (SIGSTOP) across the deletion, the creation and the publishes, so it
/// finds the consumer gone only once the new stream is longer than the floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_created_again_longer_than_the_old_floor_loses_none_of_its_first_messages() {
    bounded(async {
        let nats = NatsServer::start();
        let (js, app, _, sidecar) = events_sidecar(&nats).await;
        watchdog_floor_at(&sidecar, 5).await;

        sidecar.freeze();
        js.delete_stream("AGENT").await.unwrap();
        agent_stream(&nats).await;
        for i in 0..10 {
            js_publish(&js, "agent.execution.completed", &[], &format!("new-{i}")).await;
        }
        sidecar.signal("CONT");

        let want: Vec<String> = (0..10).map(|i| format!("new-{i}")).collect();
        let got = seen_all(&app, &want, "the app seeing every message of the new stream").await;
        for w in &want {
            assert_eq!(got[w], 1, "{w} once: {got:?}");
        }
        for i in 0..5 {
            assert_eq!(got[&format!("old-{i}")], 1, "old-{i} once: {got:?}");
        }
    })
    .await;
}

/// The floor a sidecar keeps for durable `events` on AGENT, once it is at `seq`.
async fn kept_floor(js: &jetstream::Context, seq: u64) -> Option<()> {
    let kv = js.get_key_value("natsbridge_consumer_floors").await.ok()?;
    let v = kv.get("AGENT.events").await.ok()??;
    let record: serde_json::Value = serde_json::from_slice(&v).ok()?;
    (record["seq"] == seq).then_some(())
}

/// A durable deleted while no sidecar ran: before, the next sidecar created it at the
/// route's `deliver` ("new"), which skipped everything published meanwhile. Now it starts
/// after the floor the last sidecar kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_lost_while_its_sidecar_was_down_resumes_from_the_floor_kept_for_it() {
    bounded(async {
        let nats = NatsServer::start();
        let (js, app, toml, first) = events_sidecar(&nats).await;
        eventually("the floor kept at 5", Duration::from_secs(20), || kept_floor(&js, 5)).await;
        drop(first);

        js.get_stream("AGENT").await.unwrap().delete_consumer("events").await.unwrap();
        for i in 0..3 {
            js_publish(&js, "agent.execution.completed", &[], &format!("new-{i}")).await;
        }
        let second = SidecarProcess::start(&toml, &nats.url(), Some(&app.url()));
        let want: Vec<String> = (0..3).map(|i| format!("new-{i}")).collect();
        let got = seen_all(&app, &want, "the app seeing what was published while no sidecar ran").await;
        for (body, n) in &got {
            assert_eq!(*n, 1, "{body} once: {got:?}");
        }
        assert_eq!(got.len(), 8, "{got:?}");
        drop(second);
    })
    .await;
}

/// The sidecar's user may do everything; with `deny_stream_info`, everything but read
/// stream AGENT's info. The test's own user may do everything.
fn users(deny_stream_info: bool) -> String {
    let deny = if deny_stream_info { r#", deny: "$JS.API.STREAM.INFO.AGENT""# } else { "" };
    format!(
        r#"authorization {{ users = [
  {{ user: "admin", password: "pw" }},
  {{ user: "bridge", password: "pw", permissions: {{ publish: {{ allow: ">"{deny} }}, subscribe: ">" }} }}
] }}"#
    )
}

/// A durable that vanished while its stream's info could not be read: the watchdog
/// cannot tell the stream it knew from a new one, so it must not guess "new" (that
/// replayed the whole stream to the app, `1ff3e60`). It waits, readiness failing, and
/// recreates the durable after its floor once the stream answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_lost_while_its_stream_cannot_say_where_it_ends_is_recreated_after_its_floor() {
    bounded(async {
        let nats = NatsServer::start_with(&users(false));
        let admin = async_nats::ConnectOptions::with_user_and_password("admin".into(), "pw".into()).connect(nats.url()).await.unwrap();
        let js = jetstream::new(admin);
        js.create_stream(jetstream::stream::Config { name: "AGENT".into(), subjects: vec!["agent.>".into()], ..Default::default() })
            .await
            .unwrap();
        dlq_stream(&js).await;
        let app = App::script(|_, _| async { respond(200, "ok") }).await;
        let toml = routes_toml("svc", "1s", &execution_events_route("durable = \"events\""));
        let url = format!("nats://bridge:pw@127.0.0.1:{}", nats.port);
        let sidecar = SidecarProcess::start(&toml, &url, Some(&app.url()));
        sidecar.wait_ready().await;
        for i in 0..5 {
            js_publish(&js, "agent.execution.completed", &[], &format!("old-{i}")).await;
        }
        let old: Vec<String> = (0..5).map(|i| format!("old-{i}")).collect();
        seen_all(&app, &old, "the app seeing the first five").await;
        watchdog_floor_at(&sidecar, 5).await;
        let addr = sidecar.admin;

        nats.reload_with(&users(true));
        js.get_stream("AGENT").await.unwrap().delete_consumer("events").await.unwrap();
        eventually("the watchdog finding the durable gone and its stream's info refused", Duration::from_secs(30), || async {
            sidecar.log().contains("its stream's info failed").then_some(())
        })
        .await;
        let stream = js.get_stream("AGENT").await.unwrap();
        assert!(stream.consumer_info("events").await.is_err(), "recreated without knowing where the stream ends");
        let failing = statusz(addr).await.unwrap_or_default()["failing"]["inbound:execution-events"].clone();
        assert!(failing.as_str().is_some_and(|f| f.contains("vanished")), "readiness: {failing}");

        nats.reload_with(&users(false));
        sidecar.wait_ready().await;
        for i in 0..3 {
            js_publish(&js, "agent.execution.completed", &[], &format!("new-{i}")).await;
        }
        let want: Vec<String> = (0..3).map(|i| format!("new-{i}")).collect();
        let got = seen_all(&app, &want, "the app seeing what was published after the durable came back").await;
        for (body, n) in &got {
            assert_eq!(*n, 1, "{body} once: {got:?}");
        }
        assert_eq!(got.len(), 8, "{got:?}");
    })
    .await;
}
