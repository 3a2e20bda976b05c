//! Security hardening of ingress, end to end against a real nats-server and a real app:
//! hostile reply subjects, spoofed forwarded and delivery headers, tunnel methods and
//! `..` segments (issue 20).

mod support;

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;

use support::fixtures::*;
use support::*;

const REQUEST_ROUTE: &str = r#"[[inbound]]
name = "req"
subject = "svc.req"
mode = "request"
method = "HEAD"
path = "/r"
"#;

const TUNNEL_ROUTE: &str = r#"[[inbound]]
name = "tun"
mode = "tunnel"
"#;

fn refused(route: &str, reason: &str) -> String {
    format!(r#"natsbridge_ingress_refused_total{{reason="{reason}",route="{route}"}}"#)
}

async fn wait_metric(sidecar: &Sidecar, line_prefix: &str, at_least: f64) {
    eventually(line_prefix, Duration::from_secs(15), || async {
        metric(&sidecar.metrics().await, line_prefix).filter(|v| *v >= at_least).map(|_| ())
    })
    .await
}

/// A NATS peer allowed to publish to a route's subject aims the empty answer of a HEAD at
/// `$JS.API.STREAM.DELETE.<stream>`: the sidecar must not send it (with its credentials,
/// an empty body is a valid delete request), nor call the app for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_reply_subjects_are_refused() {
    let nats = NatsServer::start();
    let app = App::start(|_| respond(200, "")).await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    js.create_stream(jetstream::stream::Config { name: "VICTIM".into(), subjects: vec!["victim.>".into()], ..Default::default() })
        .await
        .unwrap();
    let sidecar =
        Sidecar::start(&routes_toml("svc", "3s", &format!("{REQUEST_ROUTE}\n{TUNNEL_ROUTE}")), &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    // Whatever reaches the JetStream API's delete subjects, from anyone.
    let mut deletes = subscribe_synced(&client, "$JS.API.STREAM.DELETE.>").await;

    let hostile = "$JS.API.STREAM.DELETE.VICTIM";
    client.publish_with_reply("svc.req", hostile, Bytes::new()).await.unwrap();
    let tunnel = nats_headers(&[("Bridge-Method", "HEAD"), ("Bridge-Path", "/")]);
    client.publish_with_reply_and_headers("natsbridge.tunnel.svc", hostile, tunnel.clone(), Bytes::new()).await.unwrap();
    // A reply outside the inbox prefixes, not `$`-prefixed, is refused too.
    client.publish_with_reply("svc.req", "victim.replies", Bytes::new()).await.unwrap();
    wait_metric(&sidecar, &refused("req", "reply_subject"), 2.0).await;
    wait_metric(&sidecar, &refused("tun", "reply_subject"), 1.0).await;

    // Ordinary requests (an `_INBOX.` reply) still work, and after them nothing reached
    // the delete subject and the stream is whole.
    let r = nats_request_within(&client, "svc.req", &[], "", Duration::from_secs(10)).await.unwrap();
    assert_eq!(reply_header(&r, "Bridge-Status"), Some("200"));
    let r = client.send_request("natsbridge.tunnel.svc", async_nats::client::Request::new().headers(tunnel)).await.unwrap();
    assert_eq!(reply_header(&r, "Bridge-Status"), Some("200"));
    client.flush().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), futures::StreamExt::next(&mut deletes)).await.is_err(),
        "a delete request was sent"
    );
    js.get_stream("VICTIM").await.expect("the stream survived");
    // The app never saw the refused messages: only the two ordinary calls.
    assert_eq!(app.hits().len(), 2, "{:?}", app.requests());
}

/// `reply_prefixes` lets a route answer a client with its own inbox prefix, and only it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_prefixes_are_configurable_per_route() {
    let nats = NatsServer::start();
    let app = App::start(|_| respond(200, "ok")).await;
    let route = REQUEST_ROUTE.replace("method = \"HEAD\"", "method = \"GET\"\nreply_prefixes = [\"app.inbox.\"]");
    let sidecar = Sidecar::start(&routes_toml("svc", "3s", &route), &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    let client = nats.client().await;
    let mut replies = subscribe_synced(&client, "app.inbox.>").await;
    client.publish_with_reply("svc.req", "app.inbox.1", Bytes::new()).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut replies)).await.unwrap().unwrap();
    assert_eq!(&r.payload[..], b"ok");
    // The default prefix is no longer allowed on this route.
    client.publish_with_reply("svc.req", "_INBOX.x", Bytes::new()).await.unwrap();
    wait_metric(&sidecar, &refused("req", "reply_subject"), 1.0).await;
}

const SPOOFS: &[(&str, &str)] = &[
    ("X-Forwarded-For", "10.0.0.1"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Proto", "https"),
    ("Forwarded", "for=10.0.0.1;host=evil.example"),
    ("Bridge-Stream", "FAKE"),
    ("Bridge-Seq", "1"),
    ("Bridge-Delivery", "9"),
];

const FORWARDED: &[&str] = &["x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "forwarded"];
const DELIVERY: &[&str] = &["bridge-stream", "bridge-seq", "bridge-delivery"];

/// Forwarded headers from a NATS publisher never reach the app unless the route trusts
/// them; the sidecar's own delivery headers never do, on request and tunnel routes alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_forwarded_and_delivery_headers_are_dropped() {
    let nats = NatsServer::start();
    let app = App::start(|_| respond(200, "")).await;
    let trusting = r#"[[inbound]]
name = "trusting"
subject = "svc.trusting"
mode = "request"
path = "/t"
forwarded = "trust"
"#;
    let sidecar =
        Sidecar::start(&routes_toml("svc", "3s", &format!("{REQUEST_ROUTE}\n{TUNNEL_ROUTE}\n{trusting}")), &nats.url(), Some(&app.url()))
            .await;
    sidecar.wait_ready().await;
    let client = nats.client().await;
    let within = Duration::from_secs(10);
    nats_request_within(&client, "svc.req", SPOOFS, "", within).await.unwrap();
    let mut tunnel = SPOOFS.to_vec();
    tunnel.extend([("Bridge-Method", "GET"), ("Bridge-Path", "/x")]);
    nats_request_within(&client, "natsbridge.tunnel.svc", &tunnel, "", within).await.unwrap();
    nats_request_within(&client, "svc.trusting", SPOOFS, "", within).await.unwrap();
    let hits = app.wait_hits(3).await;
    for hit in &hits[..2] {
        for h in FORWARDED.iter().chain(DELIVERY) {
            assert!(hit.header(h).is_none(), "{h} reached the app on {}: {:?}", hit.seen.uri, hit.seen.headers);
        }
    }
    let trusted = hits.iter().find(|h| h.seen.uri == "/t").unwrap();
    assert_eq!(trusted.header("x-forwarded-for"), Some("10.0.0.1"));
    assert_eq!(trusted.header("forwarded"), Some("for=10.0.0.1;host=evil.example"));
    for h in DELIVERY {
        assert!(trusted.header(h).is_none(), "{h} reached the app");
    }
}

/// A jetstream route drops forwarded headers too (its delivery headers are its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_routes_drop_forwarded_headers() {
    let nats = NatsServer::start();
    let app = App::start(|_| respond(200, "")).await;
    let js = jetstream::new(nats.client().await);
    js.create_stream(jetstream::stream::Config { name: "TOOL".into(), subjects: vec!["tool.>".into()], ..Default::default() })
        .await
        .unwrap();
    dlq_stream(&js).await;
    let sidecar = Sidecar::start(&routes_toml("svc", "3s", &tool_exec_route("")), &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    js_publish(&js, "tool.exec.x", SPOOFS, "").await;
    let hit = &app.wait_hits(1).await[0];
    for h in FORWARDED {
        assert!(hit.header(h).is_none(), "{h} reached the app: {:?}", hit.seen.headers);
    }
    assert_eq!(hit.header("bridge-stream"), Some("TOOL"));
    assert_eq!(hit.header("bridge-delivery"), Some("1"));
}

async fn tunnel_status(client: &async_nats::Client, method: &str, path: &str) -> (String, async_nats::Message) {
    let r = nats_request_within(
        client,
        "natsbridge.tunnel.svc",
        &[("Bridge-Method", method), ("Bridge-Path", path)],
        "",
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    (reply_header(&r, "Bridge-Status").unwrap_or_default().to_owned(), r)
}

/// The tunnel replays the standard methods and the route's `extra_methods` only, and a
/// `..` segment cannot climb above the base path of `app_url`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_methods_and_dot_segments_are_checked() {
    let nats = NatsServer::start();
    let app = App::start(|_| respond(200, "")).await;
    let route = format!("{TUNNEL_ROUTE}extra_methods = [\"PROPFIND\"]\n");
    let sidecar = Sidecar::start(&routes_toml("svc", "3s", &route), &nats.url(), Some(&format!("{}/v1", app.url()))).await;
    sidecar.wait_ready().await;
    let client = nats.client().await;
    for method in ["TRACE", "CONNECT", "get", "BREW"] {
        let (status, r) = tunnel_status(&client, method, "/x").await;
        assert_eq!(status, "405", "{method}");
        assert_eq!(reply_header(&r, "Content-Type"), Some("application/problem+json"));
        assert!(reply_header(&r, "Allow").is_some_and(|a| a.contains("PROPFIND") && !a.contains("TRACE")), "{method}");
    }
    for path in ["/a/../../admin", "/..", "/a/%2e%2E/admin", "/./x"] {
        let (status, r) = tunnel_status(&client, "GET", path).await;
        assert_eq!(status, "400", "{path}");
        assert!(String::from_utf8_lossy(&r.payload).contains("app_url base path"), "{path}");
    }
    assert_eq!(tunnel_status(&client, "PROPFIND", "/a/b..c/d").await.0, "200");
    let hits = app.hits();
    assert_eq!(hits.len(), 1, "{:?}", app.requests());
    assert_eq!((hits[0].seen.method.as_str(), hits[0].seen.uri.as_str()), ("PROPFIND", "/v1/a/b..c/d"));
    wait_metric(&sidecar, &refused("tun", "request"), 8.0).await;
}

/// Runs `natsbridge <args>` with stdout and stderr piped, bounded; its exit code and output.
async fn natsbridge(args: &[&str]) -> (i32, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_natsbridge"));
    cmd.args(args).env_remove("NATSBRIDGE_NATS_URL").env_remove("NATSBRIDGE_CONFIG").kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output()).await.expect("natsbridge hung").unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("$ natsbridge {}\n-> {:?}\n{text}", args.join(" "), out.status.code());
    (out.status.code().unwrap_or(-1), text)
}

/// A dead letter planted by anyone who can publish to the dead-letter stream names
/// `$JS.API.STREAM.DELETE.ORDERS` as its original subject: replay refuses it (and any
/// subject the routing file does not cover) unless `--to` names the subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_refuses_planted_subjects() {
    let nats = NatsServer::start();
    let js = jetstream::new(nats.client().await);
    js.create_stream(jetstream::stream::Config { name: "ORDERS".into(), subjects: vec!["orders.>".into()], ..Default::default() })
        .await
        .unwrap();
    dlq_stream(&js).await;
    for subject in ["$JS.API.STREAM.DELETE.ORDERS", "elsewhere.x"] {
        let h = [("Bridge-Dlq-Subject", subject), ("Bridge-Dlq-Route", "orders"), ("Bridge-Dlq-Reason", "poison")];
        js_publish(&js, "dlq.svc.orders", &h, "planted").await;
    }
    let route = "[[inbound]]\nname = \"orders\"\nsubject = \"orders.*\"\nmode = \"jetstream\"\nstream = \"ORDERS\"\npath = \"/o\"\n";
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("routes.toml");
    std::fs::write(&config, routes_toml("svc", "3s", route)).unwrap();
    let (config, url) = (config.display().to_string(), nats.url());
    let base = ["dlq", "replay", "--config", &config, "--nats-url", &url];

    let (code, out) = natsbridge(&[&base[..], &["--dry-run"]].concat()).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("seq 1: would refuse to replay to \"$JS.API.STREAM.DELETE.ORDERS\""), "{out}");
    assert!(out.contains("seq 2: would refuse to replay to \"elsewhere.x\": no inbound route or [[streams]] entry"), "{out}");

    let (code, out) = natsbridge(&base).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("seq 1: FAILED refused to replay to \"$JS.API.STREAM.DELETE.ORDERS\": a `$` subject"), "{out}");
    assert!(out.contains("seq 2: FAILED refused to replay to \"elsewhere.x\""), "{out}");
    assert!(out.contains("replayed 0, failed 2, skipped 0"), "{out}");
    js.get_stream("ORDERS").await.expect("the stream survived");
    assert_eq!(stream_messages(&js, "DLQ").await, 2, "both dead letters stay");

    // Named explicitly, the subject is the operator's choice.
    let (code, out) = natsbridge(&[&base[..], &["--seq", "2", "--to", "orders.x"]].concat()).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("seq 2: replayed to orders.x (stream ORDERS seq 1"), "{out}");
    assert_eq!(stream_messages(&js, "ORDERS").await, 1);
    let (code, out) = natsbridge(&[&base[..], &["--to", "orders.*"]].concat()).await;
    assert_eq!(code, 2, "a wildcard --to is a usage error: {out}");
}

/// A NATS URL with credentials never appears in `provision` or `dlq` errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_nats_urls_are_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("routes.toml");
    std::fs::write(&config, "[sidecar]\nservice = \"svc\"\n[nats]\nconnect_timeout = \"1s\"\n").unwrap();
    let config = config.display().to_string();
    let url = "nats://someone:hunter2@127.0.0.1:1";
    for args in [vec!["provision", "--config", &config, "--nats-url", url], vec!["dlq", "list", "--config", &config, "--nats-url", url]] {
        let (code, out) = natsbridge(&args).await;
        assert_ne!(code, 0, "{out}");
        assert!(out.contains("nats://***@127.0.0.1:1"), "the server is still named: {out}");
        assert!(!out.contains("hunter2") && !out.contains("someone"), "credentials printed: {out}");
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Core NATS has no flow control: 1 MB messages against a slow app used to pile up in the
/// client's 65,536-message buffer. The route's buffer is bounded in bytes, the excess is
/// refused and counted, and the sidecar's memory stays bounded (the real binary's RSS).
///
/// The server holds up to 512 MB for a client that reads slowly, and waits two minutes on
/// it. With its defaults (64 MB, 10 s), a loaded machine made it drop the sidecar as a
/// slow consumer mid-burst (seen: 148 of 391 refused, the rest dropped by nats-server),
/// which is core NATS' at-most-once, not the sidecar's bound. So every message reaches the
/// sidecar here, and the count refused is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_buffering_is_bounded_in_bytes() {
    let nats = NatsServer::start_with("max_pending: 512MB\nwrite_deadline: \"2m\"");
    let app = App::script(|_, _| async {
        // The slow app: holds each call far longer than the test runs.
        tokio::time::sleep(Duration::from_secs(120)).await;
        respond(200, "")
    })
    .await;
    let route =
        "[[inbound]]\nname = \"big\"\nsubject = \"svc.big\"\nmode = \"request\"\npath = \"/big\"\nconcurrency = 1\nmax_buffer = \"8MiB\"\n";
    let sidecar = SidecarProcess::start(&routes_toml("svc", "1s", route), &nats.url(), Some(&app.url()));
    sidecar.wait_ready().await;
    let before = rss_kib(sidecar.child.id());
    let client = nats.client().await;
    let payload = Bytes::from(vec![b'x'; 1000 * 1000]);
    let sent = 400;
    for _ in 0..sent {
        client.publish("svc.big", payload.clone()).await.unwrap();
    }
    client.flush().await.unwrap();
    // 1 at the app and 8 waiting (8 MB of the 8 MiB buffer; a 9th would pass it): the
    // rest refused.
    let expected = (sent - 1 - 8) as f64;
    let admin = sidecar.admin;
    let line = refused("big", "buffer_full");
    // Polled by hand rather than with `eventually`, so that a timeout can say how many.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let refused_n = loop {
        let text = get(&format!("http://{admin}/metrics")).await.map(|r| String::from_utf8_lossy(&r.body).into_owned());
        let n = text.ok().and_then(|t| metric(&t, &line));
        if n.is_some_and(|n| n >= expected) || tokio::time::Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let slow: Vec<_> = nats.log().lines().filter(|l| l.contains("Slow Consumer")).map(str::to_owned).collect();
    assert!(slow.is_empty(), "nats-server dropped the sidecar (refused {refused_n:?}): {slow:?}");
    assert_eq!(refused_n, Some(expected), "refused of {sent}: 1 at the app and 8 in the buffer");
    let after = rss_kib(sidecar.child.id());
    eprintln!("sidecar RSS: {before} KiB before, {after} KiB after {sent} × 1 MB messages against a slow app");
    // Unbounded, the 400 MB would sit in the sidecar. Bounded, 9 MB wait; the rest is what
    // is in transit under load (the client's socket reader, refusals) and what the
    // allocator keeps.
    assert!(after < before + 160 * 1024, "RSS grew from {before} KiB to {after} KiB");
    assert_eq!(app.hits().len(), 1);
}

/// The admin listener serves at most `MAX_CONNECTIONS` at once: past it a connection waits
/// in the backlog until one closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_are_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let nats = NatsServer::start();
    let sidecar = Sidecar::start(&routes_toml("svc", "3s", ""), &nats.url(), None).await;
    sidecar.wait_ready().await;
    let mut idle = Vec::new();
    for _ in 0..natsbridge::admin::MAX_CONNECTIONS {
        idle.push(tokio::net::TcpStream::connect(sidecar.admin).await.unwrap());
    }
    let mut probe = tokio::net::TcpStream::connect(sidecar.admin).await.unwrap();
    probe.write_all(b"GET /healthz HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    // Not served while every slot is taken (the idle ones hold them for the 10 s header timeout).
    assert!(tokio::time::timeout(Duration::from_millis(500), probe.read_to_end(&mut buf)).await.is_err(), "served past the cap");
    idle.pop();
    tokio::time::timeout(Duration::from_secs(10), probe.read_to_end(&mut buf)).await.expect("served once a slot is free").unwrap();
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf));
}
