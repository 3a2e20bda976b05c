//! The egress sidecar's life: NATS down at start, hot reload, graceful shutdown and
//! SIGTERM, metrics, the bound on JetStream publishes in flight, the own-time histograms.

use super::*;

#[tokio::test]
async fn nats_down_at_start_then_up() {
    // Reserve a port for a server that is not running yet.
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let sc = Sidecar::start(&routes(""), &url, None).await;
    // Serving, but NATS routes answer 503 and /statusz says why.
    let r = post(&sc.url("/events/auth"), "x").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["type"], "urn:natsbridge:problem:nats-disconnected");
    let why = eventually("statusz naming the NATS failure", Duration::from_secs(10), || async {
        sc.statusz().await["failing"]["nats"].as_str().filter(|w| w.contains("not connected to NATS")).map(str::to_owned)
    })
    .await;
    assert!(!why.is_empty());

    // Now start NATS on that port: the sidecar recovers without a restart.
    // (Readiness itself also waits for the WORKFLOW stream this file's routes need.)
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(nats_server_bin())
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    sc.wait_nats().await;
    let c = async_nats::connect(&url).await.unwrap();
    let mut sub = subscribe_synced(&c, "gateway.auth.login").await;
    let r = post(&sc.url("/events/auth"), "x").await;
    assert_eq!(r.status, 202);
    assert!(tokio::time::timeout(Duration::from_secs(5), sub.next()).await.unwrap().is_some());
    assert!(sc.metrics().await.contains("natsbridge_nats_connected 1"));
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn hot_reload_swaps_valid_files_and_keeps_the_old_table_on_errors() {
    let nats = NatsServer::start();
    let _r = responder(&nats, "v.>", |m| (async_nats::HeaderMap::new(), Bytes::from(m.subject.to_string()))).await;
    let base = "[sidecar]\nservice = \"s\"\n";
    let v1 = format!("{base}[[outbound]]\nname = \"a\"\npath = \"/a\"\nsubject = \"v.one\"\nmode = \"request\"\n");
    let sc = Sidecar::start(&v1, &nats.url(), None).await;
    sc.wait_nats().await;
    assert_eq!(post(&sc.url("/a"), "").await.text(), "v.one");

    // A valid edit takes effect (file watch, no signal).
    let v2 = format!("{base}[[outbound]]\nname = \"a\"\npath = \"/a\"\nsubject = \"v.two\"\nmode = \"request\"\n");
    std::fs::write(&sc.config_path, &v2).unwrap();
    eventually("reloaded table", Duration::from_secs(10), || async { (post(&sc.url("/a"), "").await.text() == "v.two").then_some(()) })
        .await;

    // An invalid edit is rejected; the old table keeps serving.
    std::fs::write(&sc.config_path, format!("{base}[[outbound]]\nname = \"a\"\npath = \"/a\"\nsubject = \"v..bad\"\nmode = \"request\"\n"))
        .unwrap();
    eventually("reload failure counted", Duration::from_secs(10), || async {
        sc.metrics().await.contains("natsbridge_config_reload_failures_total 1").then_some(())
    })
    .await;
    assert_eq!(post(&sc.url("/a"), "").await.text(), "v.two");

    // A ConfigMap-style symlink swap is seen too.
    let dir = sc.config_path.parent().unwrap();
    let v3 = format!("{base}[[outbound]]\nname = \"a\"\npath = \"/a\"\nsubject = \"v.three\"\nmode = \"request\"\n");
    let data = dir.join("..2026_data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("routes.toml"), v3).unwrap();
    let tmp = dir.join("routes.toml.tmp");
    std::os::unix::fs::symlink(data.join("routes.toml"), &tmp).unwrap();
    std::fs::rename(&tmp, &sc.config_path).unwrap();
    eventually("symlink swap reloaded", Duration::from_secs(10), || async {
        (post(&sc.url("/a"), "").await.text() == "v.three").then_some(())
    })
    .await;

    // SIGHUP (the reload channel) reloads even without a file event.
    sc.reload.send(()).await.unwrap();
    eventually("explicit reload counted", Duration::from_secs(10), || async {
        let m = sc.metrics().await;
        m.contains("natsbridge_config_reloads_total 3").then_some(())
    })
    .await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut sub = subscribe_synced(&client, "agent.*.execution.requested").await;
    let sc = Sidecar::start(&routes(""), &nats.url(), None).await;
    sc.wait_nats().await;
    let url = sc.url("/agents/1/execute");
    let in_flight = tokio::spawn(async move { call("POST", &url, &[("host", "agent-service")], "x").await });
    // The request has reached NATS: it is in flight.
    let msg = tokio::time::timeout(Duration::from_secs(5), sub.next()).await.unwrap().unwrap();
    let (egress, admin) = (sc.egress, sc.admin);
    let stop = tokio::spawn(sc.stop());
    // Readiness drops while draining, so no new work is routed here.
    eventually("not ready while draining", Duration::from_secs(5), || async move {
        let r = get(&format!("http://{admin}/readyz")).await.ok()?;
        (r.status == 503 && r.text().contains("draining")).then_some(())
    })
    .await;
    // New connections are refused once shutdown started.
    eventually(
        "listener closed",
        Duration::from_secs(5),
        || async move { tokio::net::TcpStream::connect(egress).await.is_err().then_some(()) },
    )
    .await;
    client.publish(msg.reply.unwrap(), Bytes::from_static(b"done")).await.unwrap();
    client.flush().await.unwrap();
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "done");
    tokio::time::timeout(Duration::from_secs(10), stop).await.unwrap().unwrap();
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let nats = NatsServer::start();
    let p = SidecarProcess::start(&routes(""), &nats.url(), None);
    p.wait_nats().await;
    let mut p = p;
    p.signal("TERM");
    let status = tokio::task::spawn_blocking(move || {
        let s = p.child.wait().unwrap();
        (s, p)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "exit: {:?}\n{}", status.0, status.1.log());
}

#[tokio::test]
async fn metrics_count_requests_by_route_mode_and_status_class() {
    let nats = NatsServer::start();
    let sc = Sidecar::start(&routes(""), &nats.url(), None).await;
    sc.wait_nats().await;
    assert_eq!(post(&sc.url("/events/auth"), "").await.status, 202);
    let _ = call("GET", &sc.url("/v1"), &[("host", "model-service")], "").await;
    let m = sc.metrics().await;
    assert!(m.contains(r#"natsbridge_egress_requests_total{mode="publish",path="nats",route="auth-event",status_class="2xx"} 1"#), "{m}");
    assert!(m.contains(r#"natsbridge_egress_requests_total{mode="tunnel",path="nats",route="model-tunnel",status_class="5xx"} 1"#), "{m}");
    assert!(m.contains(r#"natsbridge_egress_request_duration_seconds_count{path="nats",route="auth-event"} 1"#), "{m}");
    assert!(m.contains("natsbridge_egress_requests_in_flight 0"), "{m}");
}

#[tokio::test]
async fn jetstream_publishes_in_flight_are_bounded() {
    let nats = NatsServer::start();
    // A core subscriber and no stream: a JetStream publish stalls until its timeout
    // (nats-server #8038), holding its in-flight slot.
    let c = nats.client().await;
    let _stall = subscribe_synced(&c, "stall.x").await;
    let toml = routes("[[outbound]]\nname = \"stall\"\nmethod = \"POST\"\npath = \"/stall\"\nsubject = \"stall.x\"\nmode = \"jetstream\"\ntimeout = \"3s\"\n")
        .replace("drain_timeout = \"10s\"", "drain_timeout = \"10s\"\nmax_inflight_publishes = 1");
    let sc = Sidecar::start(&toml, &nats.url(), None).await;
    sc.wait_nats().await;
    let url = sc.url("/stall");
    let first = tokio::spawn(async move { post(&url, "{}").await });
    eventually("first publish in flight", Duration::from_secs(5), || async {
        sc.metrics().await.contains("natsbridge_jetstream_publishes_in_flight 1").then_some(())
    })
    .await;
    // The bound is reached: the next publish is refused at once, not queued.
    let started = std::time::Instant::now();
    let r = post(&sc.url("/stall"), "{}").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["type"], "urn:natsbridge:problem:overloaded");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    // The stalled one still ends within its timeout, and frees its slot.
    assert_eq!(first.await.unwrap().status, 504);
    assert!(sc.metrics().await.contains("natsbridge_jetstream_publishes_in_flight 0"));
}

/// `max_inflight_publishes` applies on reload: the bound is read at each publish.
#[tokio::test]
async fn the_publish_bound_follows_a_reload() {
    let nats = NatsServer::start();
    let c = nats.client().await;
    let _stall = subscribe_synced(&c, "stall.x").await;
    let route = "[[outbound]]\nname = \"stall\"\nmethod = \"POST\"\npath = \"/stall\"\nsubject = \"stall.x\"\nmode = \"jetstream\"\ntimeout = \"4s\"\n";
    let with_bound =
        |n: usize| routes(route).replace("drain_timeout = \"10s\"", &format!("drain_timeout = \"10s\"\nmax_inflight_publishes = {n}"));
    let sc = Sidecar::start(&with_bound(1), &nats.url(), None).await;
    sc.wait_nats().await;
    let in_flight = |n: usize| {
        let sc = &sc;
        async move {
            eventually(&format!("{n} publishes in flight"), Duration::from_secs(5), || async {
                sc.metrics().await.contains(&format!("natsbridge_jetstream_publishes_in_flight {n}")).then_some(())
            })
            .await
        }
    };
    let stall = |url: String| tokio::spawn(async move { post(&url, "{}").await.status });
    let first = stall(sc.url("/stall"));
    in_flight(1).await;
    assert_eq!(post(&sc.url("/stall"), "{}").await.status, 503, "bound 1 reached");

    // Raised to 2 by rewriting the file and reloading: one more fits, the third does not.
    // The file write and the explicit reload each may reload (which one comes first depends on
    // when the watcher's event arrives), so the count is 1 or 2: wait for at least one.
    std::fs::write(&sc.config_path, with_bound(2)).unwrap();
    sc.reload.send(()).await.unwrap();
    eventually("the reload", Duration::from_secs(5), || async {
        let m = sc.metrics().await;
        let n = m.lines().find_map(|l| l.strip_prefix("natsbridge_config_reloads_total ")).and_then(|v| v.trim().parse::<u64>().ok());
        (n >= Some(1)).then_some(())
    })
    .await;
    let second = stall(sc.url("/stall"));
    in_flight(2).await;
    let r = post(&sc.url("/stall"), "{}").await;
    assert_eq!((r.status, r.json()["type"].as_str().map(str::to_owned)), (503, Some("urn:natsbridge:problem:overloaded".into())));
    assert_eq!(first.await.unwrap(), 504);
    assert_eq!(second.await.unwrap(), 504);
}

#[tokio::test]
async fn own_time_counts_every_answered_request_once_read_and_resets_when_read() {
    let nats = NatsServer::start();
    let _r = responder(&nats, "agent.*.execution.requested", |m| (async_nats::HeaderMap::new(), m.payload.clone())).await;
    let sc = Sidecar::start(&routes(""), &nats.url(), None).await;
    sc.wait_nats().await;
    let own = || async { get(&format!("http://{}/debug/own-time?reset=1", sc.admin)).await.unwrap().json() };
    // Nothing is recorded until the first read (a request then costs no lock or histogram).
    let r = call("POST", &sc.url("/agents/0/execute"), &[("host", "agent-service")], "x").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let first = own().await;
    assert_eq!(first["egress_to_nats"], serde_json::json!({ "count": 0 }), "{first}");
    for i in 0..5 {
        let r = call("POST", &sc.url(&format!("/agents/{i}/execute")), &[("host", "agent-service")], "x").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let v = own().await;
    for stage in ["egress_to_nats", "egress_reply_to_response"] {
        assert_eq!(v[stage]["count"], 5, "{v}");
        let (p50, max) = (v[stage]["p50_us"].as_f64().unwrap(), v[stage]["max_us"].as_f64().unwrap());
        assert!(p50 > 0.0 && p50 <= max, "{v}");
    }
    // No inbound route here: no sample, and so no percentile (never a zero).
    assert_eq!(v["ingress_own"], serde_json::json!({ "count": 0 }), "{v}");
    // Read with reset=1: the next read starts from nothing.
    assert_eq!(own().await["egress_to_nats"]["count"], 0);
}

/// `drain_timeout` applies on reload, as the README says: the stop that follows a reload
/// lasts the new one, not the one the sidecar started with.
#[tokio::test]
async fn a_reloaded_drain_timeout_bounds_the_next_stop() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    // Takes the call and never answers: it stays in flight through the stop.
    let mut sub = subscribe_synced(&client, "held.op").await;
    let held = "[[outbound]]\nname = \"held\"\nmethod = \"POST\"\npath = \"/held\"\nsubject = \"held.op\"\nmode = \"request\"\ntimeout = \"60s\"\n";
    let sc = Sidecar::start(&routes(held), &nats.url(), None).await;
    sc.wait_nats().await;
    let shorter = routes(held).replace("drain_timeout = \"10s\"", "drain_timeout = \"1s\"");
    assert_ne!(shorter, routes(held));
    std::fs::write(&sc.config_path, shorter).unwrap();
    eventually("the reload counted", Duration::from_secs(10), || async {
        sc.metrics().await.contains("natsbridge_config_reloads_total 1").then_some(())
    })
    .await;
    let url = sc.url("/held");
    let in_flight = tokio::spawn(async move { call("POST", &url, &[], "x").await });
    tokio::time::timeout(Duration::from_secs(5), sub.next()).await.unwrap().unwrap();
    let started = std::time::Instant::now();
    // 10 s (the first drain_timeout) would pass this bound; 1 s and a loaded machine do not.
    tokio::time::timeout(Duration::from_secs(6), sc.stop()).await.expect("the stop lasted the drain_timeout of start-up");
    println!("stopped in {:?} with drain_timeout reloaded to 1 s", started.elapsed());
    in_flight.abort();
}
