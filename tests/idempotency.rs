//! The idempotency store against a real JetStream KV bucket: claims are exclusive across
//! replicas, results replay, failures release, stale claims are taken over.

mod support;

use std::time::Duration;

use bytes::Bytes;
use natsbridge::config::IdempotencyStore;
use natsbridge::ingress::idempotency::store::{kv_key, payload_digest, Claim, IdempotencyError, Store, StoredResponse};
use support::*;

/// The payload digest the claims below stand for.
const D: &str = "d";

async fn stores(nats: &NatsServer, claim_ttl: Duration, n: usize) -> Vec<Store> {
    let js = async_nats::jetstream::new(nats.client().await);
    js.create_key_value(async_nats::jetstream::kv::Config { bucket: "natsbridge_idempotency".into(), history: 1, ..Default::default() })
        .await
        .unwrap();
    let cfg = IdempotencyStore {
        bucket: "natsbridge_idempotency".into(),
        replicas: Some(1),
        claim_ttl,
        max_response_bytes: 16,
        storage: natsbridge::config::Storage::File,
    };
    let mut out = Vec::new();
    for i in 0..n {
        let js = async_nats::jetstream::new(nats.client().await);
        out.push(Store::open(&js, &cfg, format!("replica-{i}")).await.unwrap());
    }
    out
}

fn ok(body: &str) -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![("content-type".into(), "text/plain".into())],
        body: Bytes::copy_from_slice(body.as_bytes()),
        truncated: false,
    }
}

#[tokio::test]
async fn exactly_one_of_many_concurrent_claims_wins() {
    let nats = NatsServer::start();
    let s = stores(&nats, Duration::from_secs(60), 4).await;
    let key = kv_key("svc", "route", "order-1");
    let claims = futures::future::join_all(s.iter().map(|st| st.claim(&key, D))).await;
    let won: Vec<_> = claims.into_iter().map(|c| c.unwrap()).filter(|c| matches!(c, Claim::Acquired(_))).collect();
    assert_eq!(won.len(), 1, "{won:?}");
}

#[tokio::test]
async fn done_keys_replay_the_response_and_in_flight_keys_wait() {
    let nats = NatsServer::start();
    let s = stores(&nats, Duration::from_secs(60), 2).await;
    let key = kv_key("svc", "route", "k");
    let Claim::Acquired(t) = s[0].claim(&key, D).await.unwrap() else { panic!() };
    assert!(matches!(s[1].claim(&key, D).await.unwrap(), Claim::InFlight { .. }));

    // The other replica waits for the result...
    let waiter = {
        let st = s[1].clone();
        let key = key.clone();
        tokio::spawn(async move { st.wait_done(&key, D, tokio::time::Instant::now() + Duration::from_secs(5)).await.unwrap() })
    };
    s[0].complete(t, ok("first"), Duration::from_secs(3600)).await.unwrap();
    assert!(matches!(waiter.await.unwrap(), Some(Claim::Done(r)) if r == ok("first")));
    // ... and later deliveries get the stored response.
    match s[1].claim(&key, D).await.unwrap() {
        Claim::Done(r) => assert_eq!(r, ok("first")),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_failed_handler_releases_so_the_retry_runs() {
    let nats = NatsServer::start();
    let s = stores(&nats, Duration::from_secs(60), 2).await;
    let key = kv_key("svc", "route", "k");
    let Claim::Acquired(t) = s[0].claim(&key, D).await.unwrap() else { panic!() };
    s[0].release(t).await.unwrap();
    assert!(matches!(s[1].claim(&key, D).await.unwrap(), Claim::Acquired(_)));
}

#[tokio::test]
async fn stale_claims_and_expired_results_are_taken_over() {
    let nats = NatsServer::start();
    let s = stores(&nats, Duration::from_millis(300), 2).await;
    let key = kv_key("svc", "route", "k");
    let Claim::Acquired(_crashed) = s[0].claim(&key, D).await.unwrap() else { panic!() };
    assert!(matches!(s[1].claim(&key, D).await.unwrap(), Claim::InFlight { .. }));
    // The crashed handler's claim goes stale after claim_ttl; then another may run.
    let t = eventually("stale claim taken over", Duration::from_secs(5), || async {
        match s[1].claim(&key, D).await.unwrap() {
            Claim::Acquired(t) => Some(t),
            _ => None,
        }
    })
    .await;
    // The stale owner can no longer complete: its revision is gone.
    s[1].complete(t, ok("x"), Duration::from_millis(200)).await.unwrap();
    assert!(matches!(s[0].claim(&key, D).await.unwrap(), Claim::Done(_)));
    eventually("result expired", Duration::from_secs(5), || async {
        matches!(s[0].claim(&key, D).await.unwrap(), Claim::Acquired(_)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn large_bodies_are_stored_without_their_body() {
    let nats = NatsServer::start();
    let s = stores(&nats, Duration::from_secs(60), 1).await;
    let key = kv_key("svc", "route", "big");
    let Claim::Acquired(t) = s[0].claim(&key, D).await.unwrap() else { panic!() };
    s[0].complete(t, ok("this body is longer than sixteen bytes"), Duration::from_secs(60)).await.unwrap();
    let Claim::Done(r) = s[0].claim(&key, D).await.unwrap() else { panic!() };
    assert!(r.truncated);
    assert!(r.body.is_empty());
    assert_eq!(r.status, 201);
}

#[tokio::test]
async fn a_stale_ticket_cannot_overwrite_a_newer_claim() {
    let nats = NatsServer::start();
    let s = stores(&nats, Duration::from_millis(200), 2).await;
    let key = kv_key("svc", "route", "k");
    let Claim::Acquired(old) = s[0].claim(&key, D).await.unwrap() else { panic!() };
    let _new = eventually("takeover", Duration::from_secs(5), || async {
        match s[1].claim(&key, D).await.unwrap() {
            Claim::Acquired(t) => Some(t),
            _ => None,
        }
    })
    .await;
    let e = s[0].complete(old, ok("late"), Duration::from_secs(60)).await.unwrap_err();
    assert!(matches!(e, IdempotencyError::ClaimLost { .. }), "{e}");
}

/// A refresh whose reply was lost (timed out) may have been applied: the entry's revision
/// moves on while the ticket stays behind. The holder must recognise its own claim (by its
/// nonce) and carry on, not lose it. Here the applied write is the entry's own value put
/// again, as the lost refresh would have left it.
#[tokio::test]
async fn a_refresh_applied_though_its_reply_was_lost_leaves_no_stale_ticket() {
    let nats = NatsServer::start();
    let s = stores(&nats, Duration::from_secs(60), 2).await;
    let kv = async_nats::jetstream::new(nats.client().await).get_key_value("natsbridge_idempotency").await.unwrap();
    let key = kv_key("svc", "route", "k");
    let Claim::Acquired(mut t) = s[0].claim(&key, D).await.unwrap() else { panic!() };
    let lost_reply = |kv: async_nats::jetstream::kv::Store, key: String| async move {
        let entry = kv.entry(&key).await.unwrap().unwrap();
        kv.update(&key, entry.value, entry.revision).await.unwrap();
    };
    lost_reply(kv.clone(), key.clone()).await;
    s[0].refresh(&mut t).await.expect("our own claim, one revision on");
    lost_reply(kv.clone(), key.clone()).await;
    s[0].complete(t, ok("x"), Duration::from_secs(60)).await.expect("complete from the entry's revision");
    assert!(matches!(s[1].claim(&key, D).await.unwrap(), Claim::Done(_)));

    // Release too.
    let key = kv_key("svc", "route", "k2");
    let Claim::Acquired(t) = s[0].claim(&key, D).await.unwrap() else { panic!() };
    lost_reply(kv.clone(), key.clone()).await;
    s[0].release(t).await.expect("release from the entry's revision");
    assert!(matches!(s[1].claim(&key, D).await.unwrap(), Claim::Acquired(_)));
}

/// A result is bound to the payload that produced it (issue 20 item 8): a copy with the
/// same payload replays it, another payload under the same key gets `Reused`, never the
/// stored response.
#[tokio::test]
async fn a_result_replays_only_to_the_same_payload() {
    let nats = NatsServer::start();
    let s = stores(&nats, Duration::from_secs(60), 2).await;
    let key = kv_key("svc", "route", "k");
    let (a, b) = (payload_digest(b"{\"amount\":1}"), payload_digest(b"{\"amount\":1000}"));
    let Claim::Acquired(t) = s[0].claim(&key, &a).await.unwrap() else { panic!() };
    s[0].complete(t, ok("x"), Duration::from_secs(60)).await.unwrap();
    assert!(matches!(s[1].claim(&key, &a).await.unwrap(), Claim::Done(_)));
    assert!(matches!(s[1].claim(&key, &b).await.unwrap(), Claim::Reused));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    assert!(matches!(s[1].wait_done(&key, &b, deadline).await.unwrap(), Some(Claim::Reused)));
}

/// Request mode, through a sidecar: the same key with another body is 409
/// `idempotency-key-reused` problem+json, not the first caller's response; the app runs
/// once; a replay to the same body never carries the first caller's Set-Cookie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_mode_refuses_a_key_reused_with_another_payload() {
    let nats = NatsServer::start();
    stores(&nats, Duration::from_secs(60), 0).await;
    let app = App::start(|_| with_headers(201, &[("set-cookie", "session=first-caller"), ("x-app", "1")], "created")).await;
    let toml = support::fixtures::routes_toml(
        "svc",
        "1s",
        &format!(
            "[idempotency]\nbucket = \"natsbridge_idempotency\"\n\n{}",
            support::fixtures::orders_route(r#"idempotency = { key = "header:Idempotency-Key", ttl = "1h" }"#)
        ),
    );
    let sidecar = Sidecar::start(&toml, &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    let client = nats.client().await;
    let ask = |body: &'static str| {
        let client = client.clone();
        async move {
            let headers = support::fixtures::nats_headers(&[("Idempotency-Key", "pay-1")]);
            client.request_with_headers("orders.create", headers, Bytes::from_static(body.as_bytes())).await.unwrap()
        }
    };
    let status = |m: &async_nats::Message| support::fixtures::reply_header(m, "Bridge-Status").map(str::to_owned);
    let first = ask(r#"{"amount":1}"#).await;
    assert_eq!(status(&first).as_deref(), Some("201"));
    assert_eq!(support::fixtures::reply_header(&first, "Set-Cookie"), Some("session=first-caller"));

    let other = ask(r#"{"amount":1000}"#).await;
    assert_eq!(status(&other).as_deref(), Some("409"));
    let v: serde_json::Value = serde_json::from_slice(&other.payload).unwrap();
    assert_eq!(v["type"], "urn:natsbridge:problem:idempotency-key-reused", "{v}");
    assert_eq!(support::fixtures::reply_header(&other, "Content-Type"), Some("application/problem+json"));
    assert!(support::fixtures::reply_header(&other, "Set-Cookie").is_none());

    let same = ask(r#"{"amount":1}"#).await;
    assert_eq!(status(&same).as_deref(), Some("201"));
    assert_eq!(support::fixtures::reply_header(&same, "Bridge-Idempotent-Replay"), Some("true"));
    assert_eq!(support::fixtures::reply_header(&same, "X-App"), Some("1"));
    assert!(support::fixtures::reply_header(&same, "Set-Cookie").is_none(), "a replay must not hand out the first caller's cookie");
    assert_eq!(app.requests().len(), 1);
    sidecar.stop().await;
}
