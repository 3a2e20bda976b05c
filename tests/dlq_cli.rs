//! `natsbridge dlq` end to end: a real nats-server, a running sidecar that dead-letters
//! for real (a 4xx app answer is poison; a 500 with max_deliver 2 runs out of retries),
//! and the real binary's list/show/replay/purge, checked by their output, their exit code
//! and the streams' state.

mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::StreamMessage};
use bytes::Bytes;

use support::*;

const ROUTES: &str = r#"[sidecar]
service = "svc"
app_url = "http://127.0.0.1:1"
drain_timeout = "3s"

[nats]
servers = ["nats://127.0.0.1:1"]

[[inbound]]
name = "legacy"
subject = "legacy.*"
mode = "jetstream"
stream = "LEGACY"
durable = "legacy"
method = "POST"
path = "/legacy/{2}"

[[inbound]]
name = "orders-create"
subject = "orders.create.*"
mode = "jetstream"
stream = "ORDERS"
durable = "orders-create"
method = "POST"
path = "/orders/{3}"
max_deliver = 5

[[inbound]]
name = "orders-ship"
subject = "orders.ship.*"
mode = "jetstream"
stream = "ORDERS"
durable = "orders-ship"
method = "POST"
path = "/ship/{3}"
max_deliver = 2
backoff = ["100ms"]
"#;

/// A live system with six dead letters in DLQ, produced by a running sidecar:
/// - seq 1: `legacy`, poison (422), from stream LEGACY;
/// - seq 2–4: `orders-create`, poison (400), payloads `order-a`..`order-c`;
/// - seq 5–6: `orders-ship`, status (500 twice), payloads `ship-x`, `ship-y`.
///
/// The app fails until `healthy` is set, then answers 200 to everything.
struct Live {
    nats: NatsServer,
    js: jetstream::Context,
    app: App,
    healthy: Arc<AtomicBool>,
    _sidecar: Sidecar,
    dir: tempfile::TempDir,
}

impl Live {
    async fn start() -> Self {
        let nats = NatsServer::start();
        let js = jetstream::new(nats.client().await);
        for (name, subject) in [("ORDERS", "orders.>"), ("LEGACY", "legacy.>"), ("DLQ", "dlq.>")] {
            js.create_stream(jetstream::stream::Config { name: name.into(), subjects: vec![subject.into()], ..Default::default() })
                .await
                .unwrap();
        }
        let healthy = Arc::new(AtomicBool::new(false));
        let h = healthy.clone();
        let app = App::start(move |seen| {
            if h.load(Ordering::SeqCst) {
                return respond(200, "ok");
            }
            match seen.uri.split('/').nth(1) {
                Some("legacy") => respond(422, "unprocessable legacy"),
                Some("orders") => respond(400, "bad order"),
                _ => respond(500, "db down"),
            }
        })
        .await;
        let sidecar = Sidecar::start(ROUTES, &nats.url(), Some(&app.url())).await;
        sidecar.wait_ready().await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("routes.toml"), ROUTES).unwrap();
        let live = Self { nats, js, app, healthy, _sidecar: sidecar, dir };

        // One kind at a time, so the dead-letter sequences are known.
        live.publish("legacy.l1", "l-1", "legacy-1").await;
        live.wait_dead_letters(1).await;
        let mut n = 1;
        for (s, id, body) in [
            ("orders.create.a", "o-a", "order-a"),
            ("orders.create.b", "o-b", "order-b"),
            ("orders.create.c", "o-c", "order-c"),
            ("orders.ship.x", "s-x", "ship-x"),
            ("orders.ship.y", "s-y", "ship-y"),
        ] {
            live.publish(s, id, body).await;
            n += 1;
            live.wait_dead_letters(n).await;
        }
        let expected = [
            (1, "legacy", "poison"),
            (2, "orders-create", "poison"),
            (3, "orders-create", "poison"),
            (4, "orders-create", "poison"),
            (5, "orders-ship", "status"),
            (6, "orders-ship", "status"),
        ];
        for (seq, route, reason) in expected {
            let m = live.dead_letter(seq).await.unwrap_or_else(|| panic!("no dead letter {seq}"));
            assert_eq!(hdr(&m, "Bridge-Dlq-Route"), route);
            assert_eq!(hdr(&m, "Bridge-Dlq-Reason"), reason);
        }
        live
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("routes.toml")
    }

    async fn publish(&self, subject: &str, msg_id: &str, body: &'static str) -> u64 {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", msg_id);
        h.insert("X-Trace", format!("trace-{body}").as_str());
        self.js.publish_with_headers(subject.to_owned(), h, Bytes::from_static(body.as_bytes())).await.unwrap().await.unwrap().sequence
    }

    async fn dlq_count(&self) -> u64 {
        self.js.get_stream("DLQ").await.unwrap().get_info().await.unwrap().state.messages
    }

    async fn wait_dead_letters(&self, n: u64) {
        eventually(&format!("{n} dead letters"), Duration::from_secs(20), || async { (self.dlq_count().await >= n).then_some(()) }).await;
        assert_eq!(self.dlq_count().await, n, "more dead letters than expected");
    }

    async fn dead_letter(&self, seq: u64) -> Option<StreamMessage> {
        self.js.get_stream("DLQ").await.unwrap().get_raw_message(seq).await.ok()
    }

    async fn present(&self) -> Vec<u64> {
        let mut v = Vec::new();
        for seq in 1..=6 {
            if self.dead_letter(seq).await.is_some() {
                v.push(seq);
            }
        }
        v
    }

    async fn last_seq(&self, stream: &str) -> u64 {
        self.js.get_stream(stream).await.unwrap().get_info().await.unwrap().state.last_sequence
    }

    /// The app's requests with this body.
    fn hits(&self, body: &str) -> Vec<Seen> {
        self.app.requests().into_iter().filter(|s| s.body == body.as_bytes()).collect()
    }

    /// Waits until the durable has nothing pending or unacked: the app has seen all it
    /// ever will of what was published so far.
    async fn settled(&self, durable: &str) {
        let stream = self.js.get_stream("ORDERS").await.unwrap();
        eventually(&format!("{durable} to settle"), Duration::from_secs(20), || async {
            let i = stream.consumer_info(durable).await.ok()?;
            (i.num_pending == 0 && i.num_ack_pending == 0).then_some(())
        })
        .await
    }

    /// Runs the real binary: `natsbridge dlq <args> --config routes.toml --nats-url <url>`.
    async fn dlq(&self, args: &[&str]) -> Out {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend(["--config".into(), self.config().display().to_string(), "--nats-url".into(), self.nats.url()]);
        run(&all, &[]).await
    }
}

#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `natsbridge dlq …` with stdout and stderr piped (not a terminal), bounded.
async fn run(args: &[String], env: &[(&str, &str)]) -> Out {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_natsbridge"));
    cmd.arg("dlq").args(args).env_remove("NATSBRIDGE_NATS_URL").env_remove("NATSBRIDGE_CONFIG").kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output()).await.expect("natsbridge dlq hung").unwrap();
    let out = Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    };
    eprintln!("$ natsbridge dlq {}\n-> exit {}\n{}{}", args.join(" "), out.code, out.stdout, out.stderr);
    out
}

fn hdr<'a>(m: &'a StreamMessage, name: &str) -> &'a str {
    m.headers.get(name).map(|v| v.as_str()).unwrap_or_else(|| panic!("dead letter has no {name}: {:?}", m.headers))
}

fn line<'a>(text: &'a str, starts: &str) -> &'a str {
    text.lines().find(|l| l.trim_start().starts_with(starts)).unwrap_or_else(|| panic!("no line starting {starts:?} in:\n{text}"))
}

fn header<'a>(s: &'a Seen, name: &str) -> Option<&'a str> {
    s.headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_show_report_what_a_running_sidecar_dead_lettered() {
    let live = Live::start().await;

    let out = live.dlq(&["list"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.starts_with("DLQ: 6 dead letters, "), "{}", out.stdout);
    let l = line(&out.stdout, "orders-create:");
    assert!(l.contains("3 messages, oldest ") && l.contains(", newest "), "{l}");
    assert!(!l.contains("not in the routing file"), "{l}");
    assert!(line(&out.stdout, "orders-ship:").contains("2 messages"));
    assert!(line(&out.stdout, "legacy:").contains("1 message, oldest"));
    // Per reason, under each route, with the sequence span.
    let lines: Vec<&str> = out.stdout.lines().collect();
    let i = lines.iter().position(|l| l.starts_with("orders-create:")).unwrap();
    assert!(
        lines[i + 1].trim_start().starts_with("poison:") && lines[i + 1].contains("3 messages") && lines[i + 1].ends_with("(seq 2..4)"),
        "{}",
        out.stdout
    );
    let i = lines.iter().position(|l| l.starts_with("orders-ship:")).unwrap();
    assert!(lines[i + 1].trim_start().starts_with("status:") && lines[i + 1].ends_with("(seq 5..6)"), "{}", out.stdout);

    // NATSBRIDGE_NATS_URL works in place of --nats-url; filters narrow the count.
    let cfg = live.config().display().to_string();
    let out = run(
        &["list".into(), "--config".into(), cfg.clone(), "--reason".into(), "status".into()],
        &[("NATSBRIDGE_NATS_URL", &live.nats.url())],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.starts_with("DLQ: 2 dead letters matching reason status"), "{}", out.stdout);
    assert!(!out.stdout.contains("orders-create"), "{}", out.stdout);

    // show: every field of each message, oldest first.
    let out = live.dlq(&["show", "--route", "orders-ship"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout.matches("\nseq ").count() + 1, 2, "{}", out.stdout);
    let first = out.stdout.split("\n\n").next().unwrap();
    assert!(first.starts_with("seq 5  route orders-ship  reason status  status 500  deliveries 2\n"), "{first}");
    assert!(line(first, "subject:").contains("orders.ship.x  (stream ORDERS seq "), "{first}");
    assert!(line(first, "subject:").ends_with(", consumer orders-ship)"), "{first}");
    assert!(line(first, "time:").ends_with(" ago)"), "{first}");
    assert_eq!(line(first, "error:").trim(), "error:    db down");
    assert_eq!(line(first, "payload:").trim(), "payload:  ship-x (6 bytes)");
    assert!(out.stdout.contains("payload:  ship-y (6 bytes)"), "{}", out.stdout);

    // --reason, --seq and --limit select the right ones.
    let out = live.dlq(&["show", "--reason", "poison", "--limit", "2"]).await;
    let seqs: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("seq ")).map(|l| l.split_whitespace().nth(1).unwrap()).collect();
    assert_eq!(seqs, ["1", "2"], "{}", out.stdout);
    assert!(out.stdout.contains("status 422") && out.stdout.contains("error:    unprocessable legacy"), "{}", out.stdout);
    let out = live.dlq(&["show", "--seq", "3..5", "--route", "orders-create"]).await;
    let seqs: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("seq ")).map(|l| l.split_whitespace().nth(1).unwrap()).collect();
    assert_eq!(seqs, ["3", "4"], "{}", out.stdout);
    assert!(out.stdout.contains("payload:  order-b (7 bytes)"), "{}", out.stdout);

    // A route the routing file does not name: warned about, still matched (here: nothing).
    let out = live.dlq(&["show", "--route", "nope"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains(
            r#"warning: route "nope" is not an inbound route in the routing file (inbound routes: legacy, orders-create, orders-ship)"#
        ),
        "{}",
        out.stderr
    );
    assert!(out.stdout.contains("no dead letters match (route nope)"), "{}", out.stdout);

    // Bad filters are refused by the command line.
    let out = live.dlq(&["show", "--seq", "9..5"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("the start is after the end"), "{}", out.stderr);
    let out = live.dlq(&["list", "--reason", "bored"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("one of: status, poison, max_deliver, app_unreachable"), "{}", out.stderr);

    // Reading changed nothing.
    assert_eq!(live.present().await, [1, 2, 3, 4, 5, 6]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_reaches_the_app_once_and_deletes_only_acked_dead_letters() {
    let live = Live::start().await;
    live.healthy.store(true, Ordering::SeqCst);
    let orders_before = live.last_seq("ORDERS").await;
    let hits_before = live.app.requests().len();

    // --dry-run: says what it would do, changes nothing.
    let out = live.dlq(&["replay", "--dry-run"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("seq 2: would replay to orders.create.a (route orders-create, reason poison)"), "{}", out.stdout);
    assert!(out.stdout.contains("dry run: 6 would be replayed, 0 skipped; nothing changed"), "{}", out.stdout);
    assert_eq!(live.present().await, [1, 2, 3, 4, 5, 6]);
    assert_eq!(live.last_seq("ORDERS").await, orders_before);
    assert_eq!(live.app.requests().len(), hits_before);

    // The legacy stream is gone: its dead letter cannot be replayed. It comes first (seq 1)
    // and must not stop the others.
    live.js.delete_stream("LEGACY").await.unwrap();
    let out = live.dlq(&["replay", "--reason", "poison"]).await;
    assert_eq!(out.code, 1, "a failed replay exits 1: {out:?}");
    assert!(
        line(&out.stdout, "seq 1:").contains("FAILED replay to legacy.l1: no stream captures this subject; the dead letter stays"),
        "{}",
        out.stdout
    );
    for (seq, subject) in [(2, "orders.create.a"), (3, "orders.create.b"), (4, "orders.create.c")] {
        let l = line(&out.stdout, &format!("seq {seq}:"));
        assert!(l.contains(&format!("replayed to {subject} (stream ORDERS seq ")) && l.ends_with("dead letter deleted"), "{l}");
    }
    assert!(out.stdout.trim_end().ends_with("replayed 3, failed 1, skipped 0"), "{}", out.stdout);
    // No terminal, so no progress bar escapes in the output.
    assert!(!out.stdout.contains('\x1b') && !out.stderr.contains('\x1b'), "{out:?}");
    assert_eq!(live.present().await, [1, 5, 6], "only the acked replays' dead letters are deleted");
    assert_eq!(live.last_seq("ORDERS").await, orders_before + 3);

    // Each replay reached the app exactly once, with the original payload and headers,
    // a fresh Nats-Msg-Id (the original is still inside ORDERS' 2-minute duplicate
    // window: reusing it would have been silently dropped) and no Bridge-Dlq-* headers.
    live.settled("orders-create").await;
    for (body, id, seq) in [("order-a", "o-a", 2), ("order-b", "o-b", 3), ("order-c", "o-c", 4)] {
        let hits = live.hits(body);
        assert_eq!(hits.len(), 2, "{body}: the failed delivery and exactly one replay");
        let r = &hits[1];
        assert_eq!(r.uri, format!("/orders/{}", &body[6..]));
        assert_eq!(header(r, "nats-msg-id"), Some(format!("{id}-replay-{seq}").as_str()));
        assert_eq!(header(r, "bridge-replay-of"), Some(format!("DLQ/{seq}").as_str()));
        assert_eq!(header(r, "x-trace"), Some(format!("trace-{body}").as_str()));
        assert!(r.headers.keys().all(|k| !k.as_str().starts_with("bridge-dlq-")), "{:?}", r.headers);
    }
    assert_eq!(live.dlq_count().await, 3, "the replays were not dead-lettered again");

    // --seq and --limit: only seq 5, of the two status letters.
    let out = live.dlq(&["replay", "--route", "orders-ship", "--seq", "5..", "--limit", "1"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.trim_end().ends_with("replayed 1, failed 0, skipped 0"), "{}", out.stdout);
    assert_eq!(live.present().await, [1, 6]);
    live.settled("orders-ship").await;
    assert_eq!(live.hits("ship-x").len(), 3, "two failed deliveries and one replay");
    assert_eq!(live.hits("ship-y").len(), 2, "not replayed");

    // The legacy letter still fails, and stays, on a rerun.
    let out = live.dlq(&["replay", "--route", "legacy"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stdout.trim_end().ends_with("replayed 0, failed 1, skipped 0"), "{}", out.stdout);
    assert_eq!(hdr(&live.dead_letter(1).await.expect("the failed letter stays"), "Bridge-Dlq-Subject"), "legacy.l1");

    // A replay interrupted after its ack but before the dead letter's deletion (simulated
    // by publishing what it would have published): the rerun is deduplicated by ORDERS,
    // so the app sees ship-y once, and the dead letter is deleted.
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Msg-Id", "s-y-replay-6");
    live.js.publish_with_headers("orders.ship.y", h, Bytes::from_static(b"ship-y")).await.unwrap().await.unwrap();
    live.settled("orders-ship").await;
    assert_eq!(live.hits("ship-y").len(), 3);
    let out = live.dlq(&["replay", "--seq", "6"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(line(&out.stdout, "seq 6:").contains(", a duplicate of an earlier replay); dead letter deleted"), "{}", out.stdout);
    assert_eq!(live.present().await, [1]);
    live.settled("orders-ship").await;
    assert_eq!(live.hits("ship-y").len(), 3, "the rerun was not delivered again");

    // Nothing left to match: a clean no-op.
    let out = live.dlq(&["replay", "--route", "orders-create"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.starts_with("no dead letters match (route orders-create)"), "{}", out.stdout);
    assert!(out.stdout.trim_end().ends_with("replayed 0, failed 0, skipped 0"), "{}", out.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_refuses_without_yes_and_deletes_only_what_matches() {
    let live = Live::start().await;

    let out = live.dlq(&["purge", "--route", "orders-create", "--seq", "..3"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stdout.starts_with("would delete 2 dead letters from DLQ (route orders-create, seq 1..3):"), "{}", out.stdout);
    assert!(line(&out.stdout, "orders-create:").contains("2 messages"), "{}", out.stdout);
    assert!(out.stderr.contains("refusing to delete without --yes"), "{}", out.stderr);
    assert_eq!(live.present().await, [1, 2, 3, 4, 5, 6]);

    let out = live.dlq(&["purge", "--route", "orders-create", "--seq", "..3", "--yes"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.trim_end().ends_with("deleted 2 of 2 dead letters from DLQ"), "{}", out.stdout);
    assert_eq!(live.present().await, [1, 4, 5, 6]);

    let out = live.dlq(&["purge", "--reason", "status", "--limit", "1", "--yes"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(live.present().await, [1, 4, 6]);

    let out = live.dlq(&["purge", "--route", "orders-create", "--reason", "status", "--yes"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("no dead letters match (route orders-create, reason status); nothing to delete"), "{}", out.stdout);

    let out = live.dlq(&["purge", "--yes"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.trim_end().ends_with("deleted 3 of 3 dead letters from DLQ"), "{}", out.stdout);
    assert_eq!(live.dlq_count().await, 0);
    let out = live.dlq(&["list"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout.trim_end(), "DLQ: no dead letters");
    // The app was never called again: purging replays nothing.
    assert!(live.hits("order-a").len() == 1 && live.hits("ship-x").len() == 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dead_letter_stream_or_server_is_a_clear_error() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("routes.toml");
    std::fs::write(&cfg, ROUTES).unwrap();
    let cfg = cfg.display().to_string();
    let out = run(&["list".into(), "--config".into(), cfg.clone(), "--nats-url".into(), nats.url()], &[]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains(r#"error: the dead-letter stream "DLQ" does not exist (natsbridge provision creates it)"#),
        "{}",
        out.stderr
    );
    drop(nats);
    let url = format!("nats://127.0.0.1:{}", free_port());
    let out = run(&["show".into(), "--config".into(), cfg, "--nats-url".into(), url], &[]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("error: cannot connect to NATS"), "{}", out.stderr);
}

/// A large dead-letter stream, with gaps and a deleted tail, is streamed through in
/// batches: counts are exact, `--seq` starts mid-stream, binary payloads are previewed as
/// hex, and a message that is not a natsbridge dead letter is skipped by replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_streams_with_gaps_are_read_in_full() {
    let nats = NatsServer::start();
    let js = jetstream::new(nats.client().await);
    js.create_stream(jetstream::stream::Config { name: "DLQ".into(), subjects: vec!["dlq.>".into()], ..Default::default() }).await.unwrap();
    let mut acks = Vec::new();
    for i in 1..=1500u32 {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Bridge-Dlq-Route", if i % 3 == 0 { "orders-ship" } else { "orders-create" });
        h.insert("Bridge-Dlq-Reason", if i % 3 == 0 { "status" } else { "poison" });
        h.insert("Bridge-Dlq-Subject", "orders.create.z");
        let payload = if i == 1001 { Bytes::from_static(&[0, 159, 146, 150, 255]) } else { Bytes::from(format!("p{i}")) };
        acks.push(js.publish_with_headers("dlq.svc.orders", h, payload).await.unwrap());
    }
    // Not a natsbridge dead letter: no Bridge-Dlq-* headers at all.
    acks.push(js.publish("dlq.other", Bytes::from_static(b"stray")).await.unwrap());
    for a in acks {
        a.await.unwrap();
    }
    let dlq = js.get_stream("DLQ").await.unwrap();
    // Gaps: 200..=299 and the tail 1490..=1501 (the stray included).
    for seq in (200..=299).chain(1490..=1501) {
        assert!(dlq.delete_message(seq).await.unwrap());
    }
    // What `dlq` takes for "deleted meanwhile" (a concurrent purge or replay).
    let e = dlq.delete_message(250).await.unwrap_err().to_string();
    assert!(e.contains("sequence 250 not found") && e.contains("error code 10043"), "{e}");
    let mut h = async_nats::HeaderMap::new();
    h.insert("Bridge-Dlq-Route", "orders-create");
    h.insert("Bridge-Dlq-Reason", "poison");
    js.publish_with_headers("dlq.other", h, Bytes::from_static(b"no subject")).await.unwrap().await.unwrap(); // seq 1502

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("routes.toml");
    std::fs::write(&cfg, ROUTES).unwrap();
    let base = |args: &[&str]| {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.extend(["--config".into(), cfg.display().to_string(), "--nats-url".into(), nats.url()]);
        v
    };

    // 1..=1489 less 100 deleted = 1389, plus the one without a subject.
    let out = run(&base(&["list"]), &[]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.starts_with("DLQ: 1390 dead letters, "), "{}", out.stdout);
    // Multiples of 3 in 1..=1489 less those in 200..=299: 496 - 33.
    assert!(line(&out.stdout, "orders-ship:").contains("463 messages"), "{}", out.stdout);
    assert!(line(&out.stdout, "orders-create:").contains("927 messages"), "{}", out.stdout);
    assert_eq!(dlq.get_info().await.unwrap().state.consumer_count, 0, "the reading consumer is deleted, not left to expire");

    let out = run(&base(&["show", "--seq", "1000..", "--limit", "3"]), &[]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let seqs: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("seq ")).map(|l| l.split_whitespace().nth(1).unwrap()).collect();
    assert_eq!(seqs, ["1000", "1001", "1002"], "{}", out.stdout);
    assert!(out.stdout.contains("payload:  binary, 5 bytes: 00 9f 92 96 ff"), "{}", out.stdout);

    let out = run(&base(&["show", "--seq", "150..350", "--reason", "status"]), &[]).await;
    // Multiples of 3 in 150..=199 and 300..=350: 17 + 17.
    assert_eq!(out.stdout.lines().filter(|l| l.starts_with("seq ")).count(), 34, "{}", out.stdout);

    // The letter without Bridge-Dlq-Subject is skipped, not failed, and stays.
    let out = run(&base(&["replay", "--seq", "1502"]), &[]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("seq 1502: skipped: no Bridge-Dlq-Subject header: not a natsbridge dead letter"), "{}", out.stdout);
    assert!(out.stdout.trim_end().ends_with("replayed 0, failed 0, skipped 1"), "{}", out.stdout);
    assert!(dlq.get_raw_message(1502).await.is_ok());

    let out = run(&base(&["purge", "--seq", "1000..1489", "--yes"]), &[]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.trim_end().ends_with("deleted 490 of 490 dead letters from DLQ"), "{}", out.stdout);
    assert_eq!(dlq.get_info().await.unwrap().state.messages, 1390 - 490);
}
