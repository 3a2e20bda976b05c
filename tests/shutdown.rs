//! Shutdown that is always bounded (issue 21 §4): a sidecar stops within one
//! `drain_timeout` whether NATS was never reachable, was killed under it, or is up, and
//! the real binary exits at once on a second signal. Real nats-server processes, real HTTP
//! apps, in-process sidecars and the real binary.

mod support;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use support::fixtures::*;
use support::*;

/// The `drain_timeout` of the sidecars here, and the margin a loaded machine gets on top.
const DRAIN: Duration = Duration::from_secs(2);
const MARGIN: Duration = Duration::from_millis(1500);

/// A request route, a jetstream route (stream EVENTS, DLQ) and an egress publish route.
fn routes() -> String {
    let egress = event_outbound("1s");
    let ingress = orders_route("") + &events_route("/events", "ack_wait = \"2s\"\ndead_letter = \"dlq.events\"");
    routes_toml("shutdown", "2s", &format!("{egress}\n{ingress}"))
}

/// Stops `sidecar` and says how long it took; panics past `limit` (the sidecar hung).
async fn stop_within(sidecar: Sidecar, limit: Duration) -> Duration {
    // The sidecar's own account of each step, shown when the case fails.
    let _ = tracing_subscriber::fmt().with_env_filter("natsbridge=info").with_test_writer().try_init();
    let started = Instant::now();
    tokio::time::timeout(limit, sidecar.stop()).await.unwrap_or_else(|_| panic!("the sidecar did not stop within {limit:?}"));
    started.elapsed()
}

/// Egress calls while NATS is away: each buffers a publish in the client, the way a busy
/// pod's traffic would during an outage.
async fn egress_burst(sidecar: &Sidecar, n: usize) {
    let url = sidecar.url("/events");
    let calls = (0..n).map(|i| {
        let url = url.clone();
        async move { call("POST", &url, &[], format!("e{i}")).await.status }
    });
    let statuses = futures::future::join_all(calls).await;
    assert!(statuses.iter().all(|s| *s >= 500), "calls during the outage must fail: {statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stop_with_nats_never_reachable_is_bounded() {
    let app = App::start(|_| respond(200, "ok")).await;
    let nowhere = format!("nats://127.0.0.1:{}", free_port());
    let sidecar = Sidecar::start(&routes(), &nowhere, Some(&app.url())).await;
    let admin = sidecar.admin;
    // Both inbound routes are trying to bind (and failing) before the stop.
    eventually("the inbound routes trying to bind", Duration::from_secs(15), || async move {
        let s = statusz(admin).await?;
        let c = &s["components"];
        (c["nats"]["state"] != "up" && c["inbound:orders"].is_object() && c["inbound:events"].is_object()).then_some(())
    })
    .await;
    egress_burst(&sidecar, 50).await;
    let took = stop_within(sidecar, DRAIN + MARGIN).await;
    println!("stopped in {took:?} with NATS never reachable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stop_with_nats_killed_is_bounded() {
    let mut nats = NatsServer::start();
    let js = jetstream::new(nats.client().await);
    events_streams(&js).await;
    let app = App::start(|_| respond(200, "ok")).await;
    let sidecar = Sidecar::start(&routes(), &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    nats.kill();
    let admin = sidecar.admin;
    eventually("the sidecar seeing NATS gone", Duration::from_secs(15), || async move { (!nats_ready(admin).await).then_some(()) }).await;
    egress_burst(&sidecar, 50).await;
    let took = stop_within(sidecar, DRAIN + MARGIN).await;
    println!("stopped in {took:?} with NATS killed");
}

/// An inbound request route to the app's `/orders` (which may call back out through the
/// sidecar) and an `http` egress route to the app's `/legacy/…`.
fn callback_routes(app: &str, drain_timeout: &str) -> String {
    routes_toml(
        "callback",
        drain_timeout,
        &format!(
            r#"[[outbound]]
name = "legacy"
path = "/legacy/{{*rest}}"
mode = "http"
upstream = "{app}"

{}"#,
            orders_route("timeout = \"30s\"")
        ),
    )
}

/// Waits until the process has exited; its status and how long that took.
async fn exited_within(p: &mut SidecarProcess, limit: Duration) -> (std::process::ExitStatus, Duration) {
    let started = Instant::now();
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            return (status, started.elapsed());
        }
        assert!(started.elapsed() < limit, "the sidecar process did not exit within {limit:?}:\n{}", p.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An app whose `/orders` waits for `go`, then calls the sidecar's egress `/legacy/ping`
/// and answers with that call's status; `/legacy/ping` answers 200.
async fn callback_app(egress: std::sync::Arc<std::sync::OnceLock<String>>, go: tokio::sync::watch::Receiver<bool>) -> App {
    App::script(move |seen, _| {
        let (egress, mut go) = (egress.clone(), go.clone());
        async move {
            if seen.uri.starts_with("/legacy/") {
                return respond(200, "pong");
            }
            let _ = go.wait_for(|g| *g).await;
            let url = format!("{}/legacy/ping", egress.get().expect("set before any order"));
            match get(&url).await {
                Ok(r) => respond(r.status, "called back"),
                Err(_) => respond(502, "egress refused the call"),
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_flight_handlers_call_out_through_egress_during_the_drain() {
    let nats = NatsServer::start();
    let egress = std::sync::Arc::new(std::sync::OnceLock::new());
    let (go, go_rx) = tokio::sync::watch::channel(false);
    let app = callback_app(egress.clone(), go_rx).await;
    let mut p = SidecarProcess::start(&callback_routes(&app.url(), "10s"), &nats.url(), Some(&app.url()));
    egress.set(p.url("")).unwrap();
    p.wait_ready().await;
    let client = nats.client().await;
    let order = tokio::spawn(async move { nats_request_within(&client, "orders.create", &[], "{}", Duration::from_secs(20)).await });
    app.wait_hits(1).await;
    // The order is in flight at the app when the stop begins; only then does the app call
    // out through the sidecar.
    p.signal("TERM");
    eventually("the sidecar draining", Duration::from_secs(10), || async { p.log().contains("SIGTERM").then_some(()) }).await;
    go.send(true).unwrap();
    let reply = order.await.unwrap().expect("the order in flight is answered");
    assert_eq!(reply_header(&reply, "Bridge-Status"), Some("200"), "the handler's egress call failed: {:?}", reply.payload);
    let (status, took) = exited_within(&mut p, Duration::from_secs(10) + MARGIN).await;
    assert!(status.success(), "exit status {status:?}:\n{}", p.log());
    println!("exited {took:?} after the order was answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_signal_exits_at_once() {
    let nats = NatsServer::start();
    let egress = std::sync::Arc::new(std::sync::OnceLock::new());
    // `go` never comes: the order stays in flight, and the drain would wait 30 s for it.
    let (_go, go_rx) = tokio::sync::watch::channel(false);
    let app = callback_app(egress.clone(), go_rx).await;
    let mut p = SidecarProcess::start(&callback_routes(&app.url(), "30s"), &nats.url(), Some(&app.url()));
    egress.set(p.url("")).unwrap();
    p.wait_ready().await;
    let client = nats.client().await;
    let _order = tokio::spawn(async move { nats_request_within(&client, "orders.create", &[], "{}", Duration::from_secs(40)).await });
    app.wait_hits(1).await;
    p.signal("TERM");
    eventually("the sidecar draining", Duration::from_secs(10), || async { p.log().contains("SIGTERM").then_some(()) }).await;
    p.signal("INT");
    let (status, took) = exited_within(&mut p, MARGIN).await;
    assert_eq!(status.code(), Some(130), "exit status {status:?}:\n{}", p.log());
    println!("exited {took:?} after the second signal");
}

// ---------------------------------------------------------------------------------------
// The app's health (`app_health_path`): inbound routes pause while the app is down.

/// An app whose `/healthz` and `/events` answer 200 while `healthy`, 503 otherwise.
async fn flaky_app(healthy: std::sync::Arc<std::sync::atomic::AtomicBool>) -> App {
    App::start(move |_| if healthy.load(std::sync::atomic::Ordering::SeqCst) { respond(200, "ok") } else { respond(503, "down") }).await
}

fn health_routes() -> String {
    let events = events_route("/events", "ack_wait = \"1s\"\nmax_deliver = 2\nbackoff = [\"100ms\"]\ndead_letter = \"dlq.events\"");
    routes_toml("health", "2s", &format!("{}\n{events}", orders_route("")))
        .replace("[sidecar]\n", "[sidecar]\napp_health_path = \"/healthz\"\n")
}

async fn app_state(admin: std::net::SocketAddr) -> Option<String> {
    statusz(admin).await.and_then(|s| s["components"]["app"]["state"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inbound_routes_pause_while_the_app_is_unhealthy_and_resume() {
    use std::sync::atomic::Ordering;
    let nats = NatsServer::start();
    let js = jetstream::new(nats.client().await);
    events_streams(&js).await;
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let app = flaky_app(healthy.clone()).await;
    let sidecar = Sidecar::start(&health_routes(), &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    let admin = sidecar.admin;
    assert_eq!(app_state(admin).await.as_deref(), Some("up"));

    healthy.store(false, Ordering::SeqCst);
    eventually("the app seen down", Duration::from_secs(10), || async move { (app_state(admin).await? == "down").then_some(()) }).await;
    // Request routes unsubscribe: callers get no responders at once.
    let client = nats.client().await;
    eventually("no responders for the paused request route", Duration::from_secs(10), || {
        let client = client.clone();
        async move {
            let r = nats_request_within(&client, "orders.create", &[], "{}", Duration::from_secs(1)).await;
            matches!(r, Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders).then_some(())
        }
    })
    .await;
    // JetStream routes hold their messages: with max_deliver = 2, delivering them to the
    // unhealthy app would dead-letter them within a second.
    const N: usize = 10;
    for i in 0..N {
        js_publish(&js, "events.created", &[], &format!("e{i}")).await;
    }
    let events = |app: &App| app.hits().iter().filter(|h| h.seen.uri == "/events").count();
    // Several probes (each a hit on /healthz) pass with the messages stored.
    let probes = app.hits().len();
    app.wait_hits(probes + 4).await;
    assert_eq!(events(&app), 0, "the app was called while paused");
    assert_eq!(dlq_count(&js).await, 0, "dead letters while paused");

    healthy.store(true, Ordering::SeqCst);
    eventually("every message delivered after the app recovered", Duration::from_secs(15), || async { (events(&app) >= N).then_some(()) })
        .await;
    eventually("the consumer settled", Duration::from_secs(15), || settled_consumer(&js, "EVENTS", "events", N as u64)).await;
    assert_eq!(dlq_count(&js).await, 0, "dead letters after the app recovered");
    let r = nats_request_within(&client, "orders.create", &[], "{}", Duration::from_secs(5)).await.expect("the request route is back");
    assert_eq!(reply_header(&r, "Bridge-Status"), Some("200"));
    stop_within(sidecar, DRAIN + MARGIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn post_drain_stops_ingress_and_answers_once_handlers_are_done() {
    let nats = NatsServer::start();
    let egress = std::sync::Arc::new(std::sync::OnceLock::new());
    let (go, go_rx) = tokio::sync::watch::channel(false);
    let app = callback_app(egress.clone(), go_rx).await;
    let sidecar = Sidecar::start(&callback_routes(&app.url(), "10s"), &nats.url(), Some(&app.url())).await;
    egress.set(sidecar.url("")).unwrap();
    sidecar.wait_ready().await;
    let client = nats.client().await;
    let order = {
        let client = client.clone();
        tokio::spawn(async move { nats_request_within(&client, "orders.create", &[], "{}", Duration::from_secs(20)).await })
    };
    app.wait_hits(1).await;
    let admin = sidecar.admin;
    assert_eq!(get(&format!("http://{admin}/drain")).await.unwrap().status, 405, "GET /drain");
    let drain = tokio::spawn(async move { post(&format!("http://{admin}/drain"), "").await.status });
    // The route stops taking requests while the handler in flight runs on.
    eventually("the request route unsubscribed", Duration::from_secs(10), || {
        let client = client.clone();
        async move {
            let r = nats_request_within(&client, "orders.create", &[], "{}", Duration::from_secs(1)).await;
            matches!(r, Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders).then_some(())
        }
    })
    .await;
    assert!(!drain.is_finished(), "/drain answered while a handler was still running");
    // (Probes sent before the unsubscribe took effect reached the app too.)
    let orders = |app: &App| app.hits().iter().filter(|h| h.seen.uri == "/orders").count();
    let before = orders(&app);
    go.send(true).unwrap();
    let reply = order.await.unwrap().expect("the order in flight is answered");
    assert_eq!(reply_header(&reply, "Bridge-Status"), Some("200"), "the handler's egress call failed: {:?}", reply.payload);
    // (The reply may reach this client after /drain answers: both follow the handler.)
    assert_eq!(drain.await.unwrap(), 200);
    assert_eq!(orders(&app), before, "the app got work after /drain");
    stop_within(sidecar, DRAIN + MARGIN).await;
}

#[test]
fn a_bad_app_health_path_is_reported_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.toml");
    std::fs::write(&path, "[sidecar]\nservice = \"s\"\napp_health_path = \"healthz\"\n").unwrap();
    let err = natsbridge::config::load(&path).expect_err("a path without '/' is refused").to_string();
    assert!(err.contains("routes.toml:3:") && err.contains("`app_health_path` \"healthz\""), "{err}");
    std::fs::write(&path, "[sidecar]\nservice = \"s\"\napp_health_path = \"/healthz?full=1\"\n").unwrap();
    let c = natsbridge::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.sidecar.app_health_path.as_deref(), Some("/healthz?full=1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jetstream_routes_hold_messages_while_the_app_refuses_connections() {
    let nats = NatsServer::start();
    let js = jetstream::new(nats.client().await);
    events_streams(&js).await;
    let app = App::start(|_| respond(200, "ok")).await;
    let addr = app.addr;
    let sidecar = Sidecar::start(&health_routes(), &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    let admin = sidecar.admin;
    // The app goes away (a restart): its port refuses connections.
    app.stop();
    drop(app);
    eventually("the app seen down", Duration::from_secs(10), || async move { (app_state(admin).await? == "down").then_some(()) }).await;
    const N: usize = 10;
    for i in 0..N {
        js_publish(&js, "events.created", &[], &format!("e{i}")).await;
    }
    // Held, not tried: each try would be refused, and with max_deliver = 2 and a 100 ms
    // backoff the messages would be dead-lettered within a second. The invariant is checked
    // over three ack_waits.
    let consumer = js.get_stream("EVENTS").await.unwrap();
    for _ in 0..30 {
        let info = consumer.consumer_info("events").await.unwrap();
        assert_eq!(info.num_pending + info.num_ack_pending as u64, N as u64, "{info:?}");
        assert_eq!((info.num_redelivered, info.ack_floor.stream_sequence), (0, 0), "deliveries spent while the app was away: {info:?}");
        assert_eq!(dlq_count(&js).await, 0, "dead letters while the app was away");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The app comes back on the same port.
    let back =
        App::serve(tokio::net::TcpListener::bind(addr).await.unwrap(), std::sync::Arc::new(|_, _| Box::pin(async { respond(200, "ok") })));
    eventually("every message delivered once the app is back", Duration::from_secs(15), || async {
        (back.hits().iter().filter(|h| h.seen.uri == "/events").count() >= N).then_some(())
    })
    .await;
    eventually("the consumer settled", Duration::from_secs(15), || settled_consumer(&js, "EVENTS", "events", N as u64)).await;
    assert_eq!(dlq_count(&js).await, 0, "dead letters after the app came back");
    stop_within(sidecar, DRAIN + MARGIN).await;
}
