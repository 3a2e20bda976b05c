//! Egress → ingress: an `Idempotency-Key` sent twice through sidecar A reaches sidecar B's
//! app once; a handler longer than the claim's TTL keeps its claim; tunnel routes
//! deduplicate too.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_through_egress_reaches_the_app_once() {
    bounded(async {
        let nats = NatsServer::start();
        bucket(&jetstream::new(nats.client().await)).await;
        let app = keyed_app("n", ("location", "/orders/1")).await;
        let a_toml = r#"[sidecar]
service = "client-svc"

[nats]
servers = ["nats://127.0.0.1:1"]

[[outbound]]
name = "create-order"
method = "POST"
path = "/orders"
subject = "orders.create"
mode = "request"
timeout = "10s"
"#;
        let b = Sidecar::start(&request_route(KEYED), &nats.url(), Some(&app.url())).await;
        let a = Sidecar::start(a_toml, &nats.url(), None).await;
        b.wait_ready().await;
        a.wait_ready().await;

        let url = a.url("/orders");
        let send = || call("POST", &url, &[("idempotency-key", "client-key-7"), ("content-type", "application/json")], r#"{"item":1}"#);
        let first = send().await;
        let second = send().await;
        assert_eq!(first.status, 201, "{}", first.text());
        assert_eq!(second.status, 201, "{}", second.text());
        assert_eq!(first.body, second.body);
        assert_eq!(first.text(), r#"{"n":1,"key":"client-key-7"}"#);
        assert_eq!(first.header("location"), second.header("location"));
        assert_eq!(first.header("content-type"), second.header("content-type"));
        assert_eq!(first.header("bridge-idempotent-replay"), None);
        assert_eq!(second.header("bridge-idempotent-replay"), Some("true"));
        assert_eq!(app.requests().len(), 1);
        assert_eq!(app.effects(), 1);
        a.stop().await;
        b.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_handler_keeps_its_claim_past_claim_ttl() {
    bounded(async {
        let nats = NatsServer::start();
        bucket(&jetstream::new(nats.client().await)).await;
        let (app, gate) = gated_app(|_| respond(200, "slow but done")).await;
        let toml = request_route(&format!("timeout = \"20s\"\n{KEYED}")).replace(r#"claim_ttl = "10s""#, r#"claim_ttl = "1s""#);
        let sidecar = Sidecar::start(&toml, &nats.url(), Some(&app.url())).await;
        sidecar.wait_ready().await;
        let client = nats.client().await;
        let first = tokio::spawn({
            let c = client.clone();
            async move { nats_request(&c, "orders.create", &[("Idempotency-Key", "slow-1")], "{}").await }
        });
        eventually("the call at the app", Duration::from_secs(10), || async { (!app.requests().is_empty()).then_some(()) }).await;

        // Another replica, judging staleness by the same 1 s claim_ttl, never sees the claim
        // go stale while the handler runs (three claim_ttls here).
        let js = jetstream::new(nats.client().await);
        let cfg = IdempotencyStore {
            bucket: BUCKET.into(),
            replicas: Some(1),
            claim_ttl: Duration::from_secs(1),
            max_response_bytes: 1 << 20,
            storage: Storage::File,
        };
        let other = Store::open(&js, &cfg, "other-replica".into()).await.unwrap();
        let key = kv_key("svc", "orders", "slow-1");
        let started = Instant::now();
        let mut looks = 0;
        while started.elapsed() < Duration::from_secs(3) {
            match other.claim(&key, &payload_digest(b"{}")).await.unwrap() {
                Claim::InFlight { .. } => looks += 1,
                other => panic!("after {:?} the claim was {other:?}", started.elapsed()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(looks > 10);
        gate.add_permits(1);
        let r = first.await.unwrap();
        assert_eq!(&r.payload[..], b"slow but done");
        assert!(matches!(other.claim(&key, &payload_digest(b"{}")).await.unwrap(), Claim::Done(_)));
        assert_eq!(app.requests().len(), 1);
        sidecar.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_routes_deduplicate_too() {
    bounded(async {
        let nats = NatsServer::start();
        bucket(&jetstream::new(nats.client().await)).await;
        let app =
            App::script(
                |s, n| async move { with_headers(200, &[("content-type", "text/plain")], &format!("{} {} #{n}", s.method, s.uri)) },
            )
            .await;
        let a_toml = MODEL_TUNNEL_CLIENT;
        let b_toml = toml(&format!("[[inbound]]\nname = \"model-in\"\nmode = \"tunnel\"\n{KEYED}\n"))
            .replace(r#"service = "svc""#, r#"service = "model""#);
        let b = Sidecar::start(&b_toml, &nats.url(), Some(&app.url())).await;
        let a = Sidecar::start(a_toml, &nats.url(), None).await;
        b.wait_ready().await;
        a.wait_ready().await;
        let url = a.url("/v1/jobs?x=1");
        let send = |key: &'static str| {
            let url = url.clone();
            async move {
                call("POST", &url, &[("host", "model-service"), ("idempotency-key", key), ("bridge-idempotency-key", "spoofed")], "{}")
                    .await
            }
        };
        let first = send("t-1").await;
        let second = send("t-1").await;
        let other = send("t-2").await;
        assert_eq!(first.status, 200, "{}", first.text());
        assert_eq!(first.text(), "POST /v1/jobs?x=1 #1");
        assert_eq!(second.text(), first.text());
        assert_eq!(second.header("bridge-idempotent-replay"), Some("true"));
        assert_eq!(other.text(), "POST /v1/jobs?x=1 #2");
        let calls = app.requests();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].headers.get_all("bridge-idempotency-key").iter().collect::<Vec<_>>(), ["t-1"]);
        a.stop().await;
        b.stop().await;
    })
    .await
}
