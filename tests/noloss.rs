//! Messages between services (issue 19), with a real nats-server, real apps and two
//! in-process sidecars of different services consuming the same events:
//! - fan-out: each service's app sees every event exactly once (idempotency keys are
//!   scoped by service);
//! - a poison event carrying `Nats-Expected-Stream` lands in the dead-letter stream once
//!   per consumer (publish controls are not copied; each dead letter has its own id);
//! - the last delivery is enforced by the sidecar: a message naked at shutdown on its last
//!   delivery is dead-lettered by the next sidecar without calling the app;
//! - a server paused mid-call does not hang the handler or the shutdown.

mod support;

use std::collections::BTreeMap;
use std::future::Future;
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
            r#"{}
[[inbound]]
name = "execution-events"
subject = "agent.execution.completed"
mode = "jetstream"
stream = "AGENT"
method = "POST"
path = "/events"
idempotency = {{ key = "msg-id", ttl = "1h" }}
{extra}
"#,
            idempotency_section(BUCKET, "5s")
        ),
    )
}

async fn setup(nats: &NatsServer) -> jetstream::Context {
    let js = jetstream::new(nats.client().await);
    js.create_stream(jetstream::stream::Config { name: "AGENT".into(), subjects: vec!["agent.>".into()], ..Default::default() })
        .await
        .unwrap();
    dlq_stream(&js).await;
    js.create_key_value(kv::Config { bucket: BUCKET.into(), history: 1, ..Default::default() }).await.unwrap();
    js
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
        let a = Sidecar::start(&service_toml("orchestration", ""), &nats.url(), Some(&orchestration.url())).await;
        let b = Sidecar::start(&service_toml("execution", ""), &nats.url(), Some(&execution.url())).await;
        a.wait_ready().await;
        b.wait_ready().await;

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
        let a = Sidecar::start(&service_toml("orchestration", ""), &nats.url(), Some(&orchestration.url())).await;
        let b = Sidecar::start(&service_toml("execution", ""), &nats.url(), Some(&execution.url())).await;
        a.wait_ready().await;
        b.wait_ready().await;

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
        assert_eq!(
            ids,
            [format!("AGENT.{}.{}", durable("execution"), ack.sequence), format!("AGENT.{}.{}", durable("orchestration"), ack.sequence)]
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
            std::process::Command::new("kill").args(["-STOP", &pid.to_string()]).status().unwrap();
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
