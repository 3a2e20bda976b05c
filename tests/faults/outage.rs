//! 6. NATS unreachable for 30 s under request-mode egress traffic.

use super::*;

#[derive(Debug, Clone, Copy)]
struct ProcStats {
    rss_kib: u64,
    fds: usize,
    threads: usize,
}

fn proc_stats(pid: u32) -> ProcStats {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    ProcStats { rss_kib: field("VmRSS:"), fds, threads: field("Threads:") as usize }
}

/// Every request is answered (503/504) within its timeout for the whole outage — 15 s of
/// a frozen server (SIGSTOP: connected but silent, as in a partition; requests time out,
/// 504) then 15 s of a dead one (SIGKILL: refused; 503) — and the sidecar process is left
/// with no more memory, file descriptors or threads than before, within tolerances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_unreachable_for_30s_under_request_traffic_leaves_nothing_behind() {
    bounded(Duration::from_secs(120), async {
        const TIMEOUT: Duration = Duration::from_secs(1);
        let mut nats = NatsServer::start_with_js(SYNC_ALWAYS, "");
        // The service behind the subject: another client, which reconnects as well.
        let responder = nats.client().await;
        let mut sub = responder.queue_subscribe("svc.echo", "svc".into()).await.unwrap();
        let echo = {
            let c = responder.clone();
            tokio::spawn(async move {
                use futures::StreamExt;
                while let Some(m) = sub.next().await {
                    if let Some(reply) = m.reply {
                        let _ = c.publish(reply, m.payload).await;
                    }
                }
            })
        };
        responder.flush().await.unwrap();
        let route = sidecar_toml(
            "caller",
            r#"[[outbound]]
name = "echo"
method = "POST"
path = "/echo"
subject = "svc.echo"
mode = "request"
timeout = "1s"
"#,
        );
        let sidecar = SidecarProcess::start(&route, &nats.url(), None);
        sidecar.wait_ready().await;
        let pid = sidecar.child.id();
        let (workers, pace) = (8, Duration::from_millis(50));

        // Warm up with the same traffic, then take the baseline at rest.
        let stop = CancellationToken::new();
        let (warm, t) = drive(workers, sidecar.url("/echo"), pace, stop.clone());
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.cancel();
        t.await.unwrap();
        assert!(snapshot(&warm).iter().all(|s| s.status == Some(200)), "warm-up: {:?}", statuses(&snapshot(&warm)));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = proc_stats(pid);

        let stop = CancellationToken::new();
        let (log, traffic) = drive(workers, sidecar.url("/echo"), pace, stop.clone());
        tokio::time::sleep(Duration::from_millis(300)).await;
        nats.pause();
        // The outage starts once the server is stopped: `pause` returns when every one of
        // its threads is, and a request started before that (spawning `kill` and the
        // group stop are slow on a loaded machine) can still get its 200.
        let down = Instant::now();
        tokio::time::sleep(Duration::from_secs(15)).await;
        let killed = Instant::now();
        nats.kill();
        tokio::time::sleep(Duration::from_secs(15)).await;
        let up = Instant::now();
        tokio::task::block_in_place(|| nats.restart());
        let recovery = recovered(&log, up, 200, Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.cancel();
        traffic.await.unwrap();

        let sent = snapshot(&log);
        let outage: Vec<&Sent> = sent.iter().filter(|s| s.started >= down && s.started + s.latency <= up).collect();
        let frozen = outage.iter().filter(|s| s.started < killed).count();
        let ok = sent.iter().filter(|s| s.status == Some(200)).count();
        // Connections closed by the clients are gone once the sidecar has read their EOF.
        let mut after = proc_stats(pid);
        wait_until(Duration::from_secs(5), || {
            after = proc_stats(pid);
            let settled = after.fds <= before.fds;
            async move { settled }
        })
        .await;
        let metrics = get(&format!("http://{}/metrics", sidecar.admin)).await.map(|r| String::from_utf8_lossy(&r.body).into_owned()).unwrap_or_default();
        let in_flight = metric_sum(&metrics, "natsbridge_egress_requests_in_flight", "");
        let unanswered = sent.iter().filter(|s| s.status.is_none()).count();
        let t = Tally { sent: sent.len(), acked: ok, delivered: ok, duplicate_effects: 0, lost: unanswered };
        t.print("nats-unreachable-30s");
        println!(
            "  statuses {:?}; outage {} requests ({frozen} while frozen), max latency {:?} (timeout {TIMEOUT:?}); first 200 {:?} after the restart",
            statuses(&sent),
            outage.len(),
            max_latency(&sent),
            recovery
        );
        println!(
            "  sidecar process before/after: VmRSS {} / {} KiB, fds {} / {}, threads {} / {}; requests in flight after {in_flight}",
            before.rss_kib, after.rss_kib, before.fds, after.fds, before.threads, after.threads
        );

        assert_eq!(unanswered, 0, "requests without an answer");
        let odd: Vec<String> = outage
            .iter()
            .filter(|s| !matches!(s.status, Some(503 | 504)))
            .map(|s| format!("{} {:?} started {:?} after the pause, answered after {:?}", s.id, s.status, s.started - down, s.latency))
            .collect();
        assert!(odd.is_empty(), "outage answers: {:?}; not 503/504 (the frozen phase lasted {:?}): {odd:#?}", statuses(&sent), killed - down);
        assert!(outage.iter().filter(|s| s.started < killed).any(|s| s.status == Some(504)), "a frozen server times requests out (504)");
        assert!(outage.iter().filter(|s| s.started >= killed).any(|s| s.status == Some(503)), "a dead server fails requests fast (503)");
        assert!(sent.iter().all(|s| matches!(s.status, Some(200 | 503 | 504))), "{:?}", statuses(&sent));
        // A bound against a hung request, not a latency figure (that belongs to the
        // benchmark): the timeout plus a generous margin for a loaded machine.
        let margin = Duration::from_secs(2);
        assert!(max_latency(&sent) <= TIMEOUT + margin, "a request took {:?}", max_latency(&sent));
        assert!(recovery.is_some(), "no 200 after NATS came back");
        assert_eq!(in_flight, 0.0, "requests still in flight:\n{metrics}");
        assert!(after.fds <= before.fds + 2, "file descriptors grew: {before:?} → {after:?}");
        assert!(after.threads <= before.threads + 2, "threads grew: {before:?} → {after:?}");
        assert!(after.rss_kib <= before.rss_kib + 8 * 1024, "memory grew: {before:?} → {after:?}");
        echo.abort();
    })
    .await
}
