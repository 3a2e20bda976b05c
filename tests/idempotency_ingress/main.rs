//! Consumer-side idempotency end to end: a real nats-server, the shared KV bucket, a real
//! app that counts its effects (a 2xx answer is an effect), and sidecars in-process.
//!
//! - jetstream: duplicates run the app once; a failure releases the key for the retry; a
//!   key in flight elsewhere is naked with a delay and then acked as a hit; a copy of a key
//!   this sidecar holds waits, whatever the store's record says; messages without a key run
//!   unprotected; json-pointer and msg-id keys;
//! - request: replays, concurrent duplicates, 409 for a key still in flight, 503 while the
//!   bucket is missing (readiness naming it);
//! - egress → ingress: `Idempotency-Key` sent twice through sidecar A reaches sidecar B's
//!   app once, and both callers get the same response.

#[path = "../support/mod.rs"]
mod support;
mod through_egress;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use natsbridge::config::{IdempotencyStore, Storage};
use natsbridge::ingress::idempotency::store::{kv_key, payload_digest, Claim, Store, StoredResponse};
use tokio::sync::Semaphore;

use support::fixtures::*;
use support::*;

const BUCKET: &str = "natsbridge_idempotency";
/// Every test's own bound, on top of the harness's per-wait deadlines.
const TEST_BOUND: Duration = Duration::from_secs(60);

async fn bounded<F: Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_BOUND, f).await.expect("test exceeded its time bound");
}

fn header<'a>(s: &'a Seen, name: &str) -> Option<&'a str> {
    s.headers.get(name).and_then(|v| v.to_str().ok())
}

// ---------------------------------------------------------------------------------------
// NATS fixtures

fn toml(body: &str) -> String {
    routes_toml("svc", "3s", &format!("{}\n{body}", idempotency_section(BUCKET, "10s")))
}

/// `tool.exec.<tool>` → POST /tools/<tool> on stream TOOL, with `extra` settings.
fn js_route(extra: &str) -> String {
    toml(&tool_exec_route(extra))
}

fn request_route(extra: &str) -> String {
    toml(&orders_route(extra))
}

async fn bucket(js: &jetstream::Context) -> kv::Store {
    js.create_key_value(kv::Config { bucket: BUCKET.into(), history: 1, ..Default::default() }).await.unwrap()
}

/// Stream TOOL (with `duplicate_window`), the dead-letter stream and the bucket.
async fn setup_js(nats: &NatsServer, duplicate_window: Duration) -> jetstream::Context {
    let js = jetstream::new(nats.client().await);
    js.create_stream(jetstream::stream::Config {
        name: "TOOL".into(),
        subjects: vec!["tool.>".into()],
        duplicate_window,
        ..Default::default()
    })
    .await
    .unwrap();
    dlq_stream(&js).await;
    bucket(&js).await;
    js
}

/// Another replica, as far as the store is concerned.
async fn other_replica(nats: &NatsServer) -> Store {
    let js = jetstream::new(nats.client().await);
    let cfg = IdempotencyStore {
        bucket: BUCKET.into(),
        replicas: Some(1),
        claim_ttl: Duration::from_secs(60),
        max_response_bytes: 1 << 20,
        storage: Storage::File,
    };
    Store::open(&js, &cfg, "other-replica".into()).await.unwrap()
}

fn metric(text: &str, route: &str, result: &str) -> f64 {
    let prefix = format!(r#"natsbridge_idempotency_total{{result="{result}",route="{route}"}}"#);
    text.lines().find(|l| l.starts_with(&prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

fn outcome(text: &str, route: &str, outcome: &str) -> f64 {
    let prefix = format!(r#"natsbridge_ingress_outcomes_total{{outcome="{outcome}",route="{route}"}}"#);
    text.lines().find(|l| l.starts_with(&prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

async fn wait_metric(sidecar: &Sidecar, route: &str, result: &str, at_least: f64) {
    eventually(&format!("idempotency {result} ≥ {at_least}"), Duration::from_secs(20), || async {
        (metric(&sidecar.metrics().await, route, result) >= at_least).then_some(())
    })
    .await
}

async fn nats_request(client: &async_nats::Client, subject: &str, headers: &[(&str, &str)], body: &str) -> async_nats::Message {
    nats_request_within(client, subject, headers, body, Duration::from_secs(15)).await.unwrap()
}

/// An app that answers 201 with `{"<count>":<n>,"key":"<the idempotency key it got>"}`
/// (n counts its calls) and the header `extra`.
async fn keyed_app(count: &'static str, extra: (&'static str, &'static str)) -> App {
    App::script(move |s, n| async move {
        with_headers(
            201,
            &[("content-type", "application/json"), extra],
            &format!(r#"{{"{count}":{n},"key":"{}"}}"#, header(&s, "bridge-idempotency-key").unwrap_or("")),
        )
    })
    .await
}

/// An app whose every call waits until the test adds permits to the returned gate, then
/// answers `answer(n)` (n counts its calls).
async fn gated_app<F>(answer: F) -> (App, Arc<Semaphore>)
where
    F: Fn(usize) -> http::Response<http_body_util::Full<Bytes>> + Send + Sync + 'static,
{
    let gate = Arc::new(Semaphore::new(0));
    let (g, answer) = (gate.clone(), Arc::new(answer));
    let app = App::script(move |_, n| {
        let (g, answer) = (g.clone(), answer.clone());
        async move {
            let _ = g.acquire().await.unwrap();
            answer(n)
        }
    })
    .await;
    (app, gate)
}

const KEYED: &str = r#"idempotency = { key = "header:Idempotency-Key", ttl = "1h" }"#;

// ---------------------------------------------------------------------------------------
// mode = "jetstream"

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_duplicates_run_the_app_once_and_both_are_acked() {
    bounded(async {
        let nats = NatsServer::start();
        let js = setup_js(&nats, Duration::from_secs(120)).await;
        let app = App::script(|_, _| async { respond(201, "done") }).await;
        let sidecar = Sidecar::start(&js_route(KEYED), &nats.url(), Some(&app.url())).await;
        sidecar.wait_ready().await;

        // Same key, different Nats-Msg-Id: the stream keeps both.
        let a = js_publish(&js, "tool.exec.grep", &[("Idempotency-Key", "order-1"), ("Nats-Msg-Id", "m-1")], "{}").await;
        settled(&js, a.sequence).await;
        let b = js_publish(&js, "tool.exec.grep", &[("Idempotency-Key", "order-1"), ("Nats-Msg-Id", "m-2")], "{}").await;
        assert!(!b.duplicate);
        let info = settled(&js, b.sequence).await;

        assert_eq!(app.requests().len(), 1);
        assert_eq!(app.effects(), 1);
        assert_eq!(info.delivered.consumer_sequence, 2, "no redeliveries");
        assert_eq!(dlq_count(&js).await, 0);
        let m = sidecar.metrics().await;
        assert_eq!(metric(&m, "tool-exec", "claim"), 1.0, "{m}");
        assert_eq!(metric(&m, "tool-exec", "stored"), 1.0, "{m}");
        assert_eq!(metric(&m, "tool-exec", "hit"), 1.0, "{m}");
        assert_eq!(metric(&m, "tool-exec", "release"), 0.0, "{m}");
        assert_eq!(outcome(&m, "tool-exec", "ack"), 2.0, "{m}");
        sidecar.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_failure_releases_the_key_so_the_retry_runs_and_the_effect_happens_once() {
    bounded(async {
        let nats = NatsServer::start();
        let js = setup_js(&nats, Duration::from_secs(120)).await;
        let app = App::script(|_, n| async move {
            if n == 1 {
                respond(500, "boom")
            } else {
                respond(200, "ok")
            }
        })
        .await;
        let sidecar = Sidecar::start(&js_route(&format!("backoff = [\"100ms\"]\n{KEYED}")), &nats.url(), Some(&app.url())).await;
        sidecar.wait_ready().await;

        let a = js_publish(&js, "tool.exec.pay", &[("Idempotency-Key", "pay-1"), ("Nats-Msg-Id", "m-1")], "{}").await;
        let info = settled(&js, a.sequence).await;
        assert_eq!(info.delivered.consumer_sequence, 2, "delivered once more");
        assert_eq!(app.requests().len(), 2, "the retry ran");
        // A later copy of the message is absorbed.
        let b = js_publish(&js, "tool.exec.pay", &[("Idempotency-Key", "pay-1"), ("Nats-Msg-Id", "m-2")], "{}").await;
        settled(&js, b.sequence).await;
        assert_eq!(app.requests().len(), 2);
        assert_eq!(app.effects(), 1);
        let m = sidecar.metrics().await;
        assert_eq!(metric(&m, "tool-exec", "claim"), 2.0, "{m}");
        assert_eq!(metric(&m, "tool-exec", "release"), 1.0, "{m}");
        assert_eq!(metric(&m, "tool-exec", "stored"), 1.0, "{m}");
        assert_eq!(metric(&m, "tool-exec", "hit"), 1.0, "{m}");
        sidecar.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_poison_is_dead_lettered_with_its_claim_released() {
    bounded(async {
        let nats = NatsServer::start();
        let js = setup_js(&nats, Duration::from_secs(120)).await;
        let app = App::script(|_, _| async { respond(400, "bad") }).await;
        let sidecar = Sidecar::start(&js_route(KEYED), &nats.url(), Some(&app.url())).await;
        sidecar.wait_ready().await;
        let a = js_publish(&js, "tool.exec.x", &[("Idempotency-Key", "p-1")], "{}").await;
        settled(&js, a.sequence).await;
        eventually("a dead letter", Duration::from_secs(10), || async { (dlq_count(&js).await == 1).then_some(()) }).await;
        let m = sidecar.metrics().await;
        assert_eq!(metric(&m, "tool-exec", "release"), 1.0, "{m}");
        assert_eq!(metric(&m, "tool-exec", "stored"), 0.0, "{m}");
        // The key is free: a replay of the dead letter could claim it.
        let other = other_replica(&nats).await;
        assert!(matches!(other.claim(&kv_key("svc", "tool-exec", "p-1"), &payload_digest(b"{}")).await.unwrap(), Claim::Acquired(_)));
        sidecar.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_key_in_flight_on_another_replica_is_naked_with_a_delay_then_acked_as_a_hit() {
    bounded(async {
        let nats = NatsServer::start();
        let js = setup_js(&nats, Duration::from_secs(120)).await;
        let app = App::script(|_, _| async { respond(200, "ran") }).await;
        // claim_ttl 2s here, so that waiting out a claim is quick.
        let route = js_route(&format!("backoff = [\"500ms\"]\n{KEYED}")).replace("claim_ttl = \"10s\"", "claim_ttl = \"2s\"");
        let sidecar = Sidecar::start(&route, &nats.url(), Some(&app.url())).await;
        sidecar.wait_ready().await;

        // Another replica is running the handler for this key, refreshing its claim as a
        // live handler does.
        let other = other_replica(&nats).await;
        let Claim::Acquired(ticket) = other.claim(&kv_key("svc", "tool-exec", "busy-1"), &payload_digest(b"{}")).await.unwrap() else {
            panic!("claim")
        };
        let ticket = Arc::new(tokio::sync::Mutex::new(ticket));
        let refresher = {
            let (other, ticket) = (other.clone(), ticket.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    other.refresh(&mut *ticket.lock().await).await.unwrap();
                }
            })
        };

        let a = js_publish(&js, "tool.exec.x", &[("Idempotency-Key", "busy-1")], "{}").await;
        wait_metric(&sidecar, "tool-exec", "conflict", 1.0).await;
        let first = Instant::now();
        wait_metric(&sidecar, "tool-exec", "conflict", 2.0).await;
        // Naked until the claim would go stale (about claim_ttl), not at once nor after the
        // route's shorter backoff: a live holder refreshed it meanwhile.
        assert!(first.elapsed() >= Duration::from_millis(1500), "redelivered after {:?}", first.elapsed());
        assert!(app.requests().is_empty());

        // The other replica finishes: the next delivery is a hit.
        refresher.abort();
        let _ = refresher.await;
        let ticket = ticket.lock().await.clone();
        other
            .complete(
                ticket,
                StoredResponse { status: 200, headers: vec![], body: Bytes::from_static(b"elsewhere"), truncated: false },
                Duration::from_secs(3600),
            )
            .await
            .unwrap();
        let info = settled(&js, a.sequence).await;
        assert!(info.delivered.consumer_sequence >= 3, "{info:?}");
        assert!(app.requests().is_empty(), "the app never ran");
        let m = sidecar.metrics().await;
        assert_eq!(metric(&m, "tool-exec", "hit"), 1.0, "{m}");
        assert_eq!(metric(&m, "tool-exec", "claim"), 0.0, "{m}");
        assert_eq!(dlq_count(&js).await, 0);
        sidecar.stop().await;
    })
    .await
}

/// After a server crash lost a holder's writes, the store's record can look stale while its
/// holder still runs (and the crash can lose the consumer's delivery state, so the copy
/// comes back to the same sidecar). The holder's own sidecar knows better than the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_a_copy_of_a_key_this_sidecar_holds_waits_even_when_the_store_says_stale() {
    bounded(async {
        let nats = NatsServer::start();
        let js = setup_js(&nats, Duration::from_secs(120)).await;
        let (app, gate) = gated_app(|_| respond(201, "done")).await;
        // claim_ttl 6s: the holder's first refresh comes 2 s after its claim, long after the
        // record is made to look stale below; the copy is naked for about claim_ttl.
        let route = js_route(KEYED).replace("claim_ttl = \"10s\"", "claim_ttl = \"6s\"");
        let sidecar = Sidecar::start(&route, &nats.url(), Some(&app.url())).await;
        sidecar.wait_ready().await;

        let a = js_publish(&js, "tool.exec.x", &[("Idempotency-Key", "held-1")], "{}").await;
        eventually("the first copy at the app", Duration::from_secs(10), || async { (!app.requests().is_empty()).then_some(()) }).await;
        // The holder's claim, as a crash leaves it: still its own (same owner and nonce), but
        // written long ago.
        let kv = js.get_key_value(BUCKET).await.unwrap();
        let key = kv_key("svc", "tool-exec", "held-1");
        let mut record: serde_json::Value = serde_json::from_slice(&kv.get(&key).await.unwrap().expect("the holder's claim")).unwrap();
        assert_eq!(record["state"], "claimed", "{record}");
        record["at_ms"] = 1.into();
        kv.put(&key, serde_json::to_vec(&record).unwrap().into()).await.unwrap();

        // A second copy (no Nats-Msg-Id: the stream keeps it) reaches the same sidecar.
        let b = js_publish(&js, "tool.exec.x", &[("Idempotency-Key", "held-1")], "{}").await;
        wait_metric(&sidecar, "tool-exec", "conflict", 1.0).await;
        assert_eq!(app.requests().len(), 1, "a copy of a held key ran beside its holder");
        let m = sidecar.metrics().await;
        assert_eq!(metric(&m, "tool-exec", "claim"), 1.0, "no takeover of the stale-looking claim: {m}");

        // The holder finishes: its result lands on the record it recognises as its own, and
        // the copy's next delivery replays it.
        gate.add_permits(10);
        settled(&js, b.sequence.max(a.sequence)).await;
        assert_eq!(app.requests().len(), 1);
        let m = sidecar.metrics().await;
        assert_eq!(metric(&m, "tool-exec", "stored"), 1.0, "{m}");
        assert_eq!(metric(&m, "tool-exec", "hit"), 1.0, "{m}");
        assert_eq!(dlq_count(&js).await, 0);
        sidecar.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_missing_key_is_processed_and_counted_and_the_key_header_is_ours() {
    bounded(async {
        let nats = NatsServer::start();
        let js = setup_js(&nats, Duration::from_secs(120)).await;
        let app = App::script(|_, _| async { respond(200, "ok") }).await;
        let sidecar = Sidecar::start(&js_route(KEYED), &nats.url(), Some(&app.url())).await;
        sidecar.wait_ready().await;

        // No key (and a spoofed Bridge-Idempotency-Key): runs, unprotected, every time.
        js_publish(&js, "tool.exec.a", &[("Bridge-Idempotency-Key", "spoofed")], "1").await;
        let b = js_publish(&js, "tool.exec.a", &[("Bridge-Idempotency-Key", "spoofed")], "1").await;
        settled(&js, b.sequence).await;
        // A key: the app gets it, never the spoofed one.
        let c = js_publish(&js, "tool.exec.a", &[("Idempotency-Key", "k-9"), ("Bridge-Idempotency-Key", "spoofed")], "2").await;
        settled(&js, c.sequence).await;

        let calls = app.requests();
        assert_eq!(calls.len(), 3);
        assert_eq!(header(&calls[0], "bridge-idempotency-key"), None);
        assert_eq!(header(&calls[1], "bridge-idempotency-key"), None);
        assert_eq!(calls[2].headers.get_all("bridge-idempotency-key").iter().collect::<Vec<_>>(), ["k-9"]);
        let m = sidecar.metrics().await;
        assert_eq!(metric(&m, "tool-exec", "missing_key"), 2.0, "{m}");
        assert_eq!(metric(&m, "tool-exec", "claim"), 1.0, "{m}");
        sidecar.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_json_pointer_keys() {
    bounded(async {
        let nats = NatsServer::start();
        let js = setup_js(&nats, Duration::from_secs(120)).await;
        let app = App::script(|_, _| async { respond(200, "ok") }).await;
        let sidecar =
            Sidecar::start(&js_route(r#"idempotency = { key = "json:/order/id", ttl = "1h" }"#), &nats.url(), Some(&app.url())).await;
        sidecar.wait_ready().await;
        let a = js_publish(&js, "tool.exec.o", &[], r#"{"order":{"id":"o-1"},"attempt":1}"#).await;
        settled(&js, a.sequence).await;
        let b = js_publish(&js, "tool.exec.o", &[], r#"{"order":{"id":"o-1"},"attempt":2}"#).await;
        settled(&js, b.sequence).await;
        let c = js_publish(&js, "tool.exec.o", &[], r#"{"order":{"id":"o-2"}}"#).await;
        settled(&js, c.sequence).await;
        let calls = app.requests();
        assert_eq!(calls.len(), 2);
        assert_eq!(header(&calls[0], "bridge-idempotency-key"), Some("o-1"));
        assert_eq!(header(&calls[1], "bridge-idempotency-key"), Some("o-2"));
        let m = sidecar.metrics().await;
        // The second copy's payload differs (attempt 2): acked as a copy, counted as reused.
        assert_eq!(metric(&m, "tool-exec", "reused"), 1.0, "{m}");
        assert_eq!(metric(&m, "tool-exec", "stored"), 2.0, "{m}");
        sidecar.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_msg_id_keys_catch_what_the_duplicate_window_let_through() {
    bounded(async {
        let nats = NatsServer::start();
        // A tiny dedupe window: a publisher retry after it is stored twice.
        let js = setup_js(&nats, Duration::from_millis(100)).await;
        let app = App::script(|_, _| async { respond(200, "ok") }).await;
        let sidecar = Sidecar::start(&js_route(r#"idempotency = { key = "msg-id", ttl = "1h" }"#), &nats.url(), Some(&app.url())).await;
        sidecar.wait_ready().await;
        let a = js_publish(&js, "tool.exec.m", &[("Nats-Msg-Id", "evt-1")], "x").await;
        settled(&js, a.sequence).await;
        let b = eventually("the stream to keep a second copy", Duration::from_secs(10), || async {
            let ack = js_publish(&js, "tool.exec.m", &[("Nats-Msg-Id", "evt-1")], "x").await;
            (!ack.duplicate).then_some(ack)
        })
        .await;
        settled(&js, b.sequence).await;
        assert_eq!(app.requests().len(), 1);
        assert_eq!(header(&app.requests()[0], "bridge-idempotency-key"), Some("evt-1"));
        let m = sidecar.metrics().await;
        assert_eq!(metric(&m, "tool-exec", "hit"), 1.0, "{m}");
        sidecar.stop().await;
    })
    .await
}

// ---------------------------------------------------------------------------------------
// mode = "request"

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_replays_the_stored_response() {
    bounded(async {
        let nats = NatsServer::start();
        bucket(&jetstream::new(nats.client().await)).await;
        let app = keyed_app("order", ("x-app", "1")).await;
        let sidecar = Sidecar::start(&request_route(KEYED), &nats.url(), Some(&app.url())).await;
        sidecar.wait_ready().await;
        let client = nats.client().await;

        let first =
            nats_request(&client, "orders.create", &[("Idempotency-Key", "o-1"), ("Bridge-Idempotency-Key", "spoofed")], "{}").await;
        let second = nats_request(&client, "orders.create", &[("Idempotency-Key", "o-1")], "{}").await;
        assert_eq!(app.requests().len(), 1);
        assert_eq!(&first.payload[..], br#"{"order":1,"key":"o-1"}"#);
        assert_eq!(first.payload, second.payload);
        for name in ["Bridge-Status", "Content-Type", "X-App"] {
            assert_eq!(reply_header(&first, name), reply_header(&second, name), "{name}");
        }
        assert_eq!(reply_header(&first, "Bridge-Status"), Some("201"));
        assert_eq!(reply_header(&first, "Bridge-Idempotent-Replay"), None);
        assert_eq!(reply_header(&second, "Bridge-Idempotent-Replay"), Some("true"));

        // Another key runs again.
        let third = nats_request(&client, "orders.create", &[("Idempotency-Key", "o-2")], "{}").await;
        assert_eq!(&third.payload[..], br#"{"order":2,"key":"o-2"}"#);
        let m = sidecar.metrics().await;
        assert_eq!(metric(&m, "orders", "hit"), 1.0, "{m}");
        assert_eq!(metric(&m, "orders", "stored"), 2.0, "{m}");
        sidecar.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_concurrent_duplicates_run_once_and_get_the_same_reply() {
    bounded(async {
        let nats = NatsServer::start();
        bucket(&jetstream::new(nats.client().await)).await;
        // The first call blocks until the test lets it go.
        let (app, gate) = gated_app(|n| with_headers(200, &[("content-type", "text/plain")], &format!("effect {n}"))).await;
        let sidecar = Sidecar::start(&request_route(&format!("timeout = \"10s\"\n{KEYED}")), &nats.url(), Some(&app.url())).await;
        sidecar.wait_ready().await;
        let client = nats.client().await;

        let first = tokio::spawn({
            let c = client.clone();
            async move { nats_request(&c, "orders.create", &[("Idempotency-Key", "dup-1")], "{}").await }
        });
        eventually("the first call at the app", Duration::from_secs(10), || async { (!app.requests().is_empty()).then_some(()) }).await;
        let second = tokio::spawn({
            let c = client.clone();
            async move { nats_request(&c, "orders.create", &[("Idempotency-Key", "dup-1")], "{}").await }
        });
        // The second is waiting for the first's result.
        wait_metric(&sidecar, "orders", "conflict", 1.0).await;
        gate.add_permits(10);
        let (first, second) = (first.await.unwrap(), second.await.unwrap());
        assert_eq!(app.requests().len(), 1);
        assert_eq!(app.effects(), 1);
        assert_eq!(&first.payload[..], b"effect 1");
        assert_eq!(first.payload, second.payload);
        assert_eq!(reply_header(&first, "Bridge-Status"), Some("200"));
        assert_eq!(reply_header(&second, "Bridge-Status"), Some("200"));
        assert_eq!(reply_header(&second, "Content-Type"), Some("text/plain"));
        assert_eq!(reply_header(&second, "Bridge-Idempotent-Replay"), Some("true"));
        sidecar.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_failure_is_not_replayed_and_a_key_still_in_flight_gets_409() {
    bounded(async {
        let nats = NatsServer::start();
        bucket(&jetstream::new(nats.client().await)).await;
        let app = App::script(|_, n| async move {
            if n == 1 {
                respond(503, "busy")
            } else {
                respond(200, "ok")
            }
        })
        .await;
        let sidecar = Sidecar::start(&request_route(&format!("timeout = \"500ms\"\n{KEYED}")), &nats.url(), Some(&app.url())).await;
        sidecar.wait_ready().await;
        let client = nats.client().await;

        // A failure releases the key: the retry runs the app and is stored.
        let r = nats_request(&client, "orders.create", &[("Idempotency-Key", "f-1")], "{}").await;
        assert_eq!(reply_header(&r, "Bridge-Status"), Some("503"));
        let r = nats_request(&client, "orders.create", &[("Idempotency-Key", "f-1")], "{}").await;
        assert_eq!(reply_header(&r, "Bridge-Status"), Some("200"));
        assert_eq!(reply_header(&r, "Bridge-Idempotent-Replay"), None);
        assert_eq!(app.requests().len(), 2);

        // Held by another replica past the route timeout: 409 with Retry-After.
        let other = other_replica(&nats).await;
        let Claim::Acquired(_held) = other.claim(&kv_key("svc", "orders", "held-1"), &payload_digest(b"{}")).await.unwrap() else {
            panic!("claim")
        };
        let started = Instant::now();
        let r = nats_request(&client, "orders.create", &[("Idempotency-Key", "held-1"), ("X-Request-Id", "rid-1")], "{}").await;
        assert!(started.elapsed() >= Duration::from_millis(450), "{:?}", started.elapsed());
        assert_eq!(reply_header(&r, "Bridge-Status"), Some("409"));
        assert_eq!(reply_header(&r, "Retry-After"), Some("1"));
        assert_eq!(reply_header(&r, "Content-Type"), Some("application/problem+json"));
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(v["type"], "urn:natsbridge:problem:idempotency-in-flight");
        assert_eq!(v["route"], "orders");
        assert_eq!(v["instance"], "rid-1");
        assert_eq!(app.requests().len(), 2);
        let m = sidecar.metrics().await;
        assert_eq!(metric(&m, "orders", "release"), 1.0, "{m}");
        assert_eq!(metric(&m, "orders", "conflict"), 2.0, "{m}");
        sidecar.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_bucket_fails_readiness_naming_it_and_keyed_requests_get_503() {
    bounded(async {
        let nats = NatsServer::start();
        let app = App::script(|_, _| async { respond(200, "ok") }).await;
        let sidecar = Sidecar::start(&request_route(KEYED), &nats.url(), Some(&app.url())).await;
        let why = eventually("readiness naming the bucket", Duration::from_secs(15), || async {
            let v = sidecar.statusz().await;
            v["failing"]["idempotency"].as_str().filter(|s| s.contains(BUCKET)).map(str::to_owned)
        })
        .await;
        assert!(why.contains("not available"), "{why}");
        // The route itself is bound: keyed messages are refused, never run unprotected.
        eventually("the route bound", Duration::from_secs(15), || async {
            let v = sidecar.statusz().await;
            v["failing"].get("inbound:orders").is_none().then_some(())
        })
        .await;
        let client = nats.client().await;
        let r = nats_request(&client, "orders.create", &[("Idempotency-Key", "k-1")], "{}").await;
        assert_eq!(reply_header(&r, "Bridge-Status"), Some("503"));
        assert_eq!(reply_header(&r, "Retry-After"), Some("1"));
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(v["type"], "urn:natsbridge:problem:idempotency-unavailable");
        assert!(app.requests().is_empty());

        // Once it exists, the sidecar binds it and becomes ready.
        bucket(&jetstream::new(nats.client().await)).await;
        sidecar.wait_ready().await;
        let r = nats_request(&client, "orders.create", &[("Idempotency-Key", "k-1")], "{}").await;
        assert_eq!(reply_header(&r, "Bridge-Status"), Some("200"));
        assert_eq!(app.requests().len(), 1);
        sidecar.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_waits_for_the_bucket_before_pulling() {
    bounded(async {
        let nats = NatsServer::start();
        let js = jetstream::new(nats.client().await);
        js.create_stream(jetstream::stream::Config { name: "TOOL".into(), subjects: vec!["tool.>".into()], ..Default::default() })
            .await
            .unwrap();
        js.create_stream(jetstream::stream::Config { name: "DLQ".into(), subjects: vec!["dlq.>".into()], ..Default::default() })
            .await
            .unwrap();
        let app = App::script(|_, _| async { respond(200, "ok") }).await;
        let sidecar = Sidecar::start(&js_route(KEYED), &nats.url(), Some(&app.url())).await;
        eventually("readiness naming the bucket", Duration::from_secs(15), || async {
            let v = sidecar.statusz().await;
            v["failing"]["idempotency"].as_str().filter(|s| s.contains(BUCKET)).map(|_| ())
        })
        .await;
        let a = js_publish(&js, "tool.exec.w", &[("Idempotency-Key", "w-1")], "{}").await;
        // Nothing is delivered (so no delivery is spent) while the store is missing.
        eventually("the consumer bound", Duration::from_secs(15), || async {
            js.get_stream("TOOL").await.ok()?.consumer_info("tool").await.ok()
        })
        .await;
        let info = js.get_stream("TOOL").await.unwrap().consumer_info("tool").await.unwrap();
        assert_eq!(info.delivered.stream_sequence, 0, "{info:?}");
        bucket(&js).await;
        sidecar.wait_ready().await;
        let info = settled(&js, a.sequence).await;
        assert_eq!(info.delivered.consumer_sequence, 1, "delivered once");
        assert_eq!(app.requests().len(), 1);
        sidecar.stop().await;
    })
    .await
}
