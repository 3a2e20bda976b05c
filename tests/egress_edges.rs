//! Egress edges end to end (issues 19, 20, 21): subjects too long for the protocol,
//! routes that fall through, statuses and header values at the edge, and limits that
//! apply on reload. Real nats-server, real sidecar, real HTTP.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use support::fixtures::{metric, responder};
use support::*;

fn routes(extra: &str) -> String {
    format!(
        r#"
[sidecar]
service = "edges"
drain_timeout = "5s"

[defaults]
timeout = "2s"

[[outbound]]
name = "execute-agent"
method = "POST"
path = "/agents/{{id}}/execute"
subject = "agent.{{id}}.execution.requested"
mode = "request"

{extra}
"#
    )
}

/// Issue 20 item 1: a 5,000-byte path capture used to render a 5 KiB subject; the server
/// closed the connection over its control line and the next call got 503.
#[tokio::test]
async fn a_long_capture_is_refused_without_losing_the_connection() {
    let nats = NatsServer::start();
    let _r = responder(&nats, "agent.*.execution.requested", |m| (async_nats::HeaderMap::new(), Bytes::from(m.subject.to_string()))).await;
    let sc = Sidecar::start(&routes(""), &nats.url(), None).await;
    sc.wait_nats().await;

    let r = post(&sc.url(&format!("/agents/{}/execute", "a".repeat(5000))), "").await;
    assert_eq!(r.status, 414, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(r.json()["type"], "urn:natsbridge:problem:subject-too-long");
    assert_eq!(r.json()["route"], "execute-agent");

    // The connection stayed up: the next normal call is answered, nothing reconnected.
    let r = post(&sc.url("/agents/7/execute"), "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "agent.7.execution.requested");
    let m = sc.metrics().await;
    assert_eq!(metric(&m, "natsbridge_nats_reconnects_total"), Some(0.0), "{m}");
    assert_eq!(metric(&m, "natsbridge_nats_connected"), Some(1.0), "{m}");
}

/// Issue 21 section 1: one moved call plus a catch-all `http` route for the rest of the
/// same host. The other methods of the moved path, the root and HEAD reach the upstream.
#[tokio::test]
async fn routes_fall_through_to_the_catch_all_of_the_same_host() {
    let nats = NatsServer::start();
    let _r = responder(&nats, "model.key.*", |_| (async_nats::HeaderMap::new(), Bytes::from_static(b"over nats"))).await;
    let upstream = App::start(|s| respond(200, &format!("upstream {} {}", s.method, s.uri))).await;
    let extra = format!(
        r#"
[[outbound]]
name = "key"
method = "POST"
host = "model-service"
path = "/v1/keys/{{id}}"
subject = "model.key.{{id}}"
mode = "request"

[[outbound]]
name = "agent-get"
method = "GET"
host = "model-service"
path = "/v1/agents/{{id}}"
mode = "http"
upstream = "{}"

[[outbound]]
name = "rest"
host = "model-service"
path = "/{{*rest}}"
mode = "http"
upstream = "{}"
"#,
        upstream.url(),
        upstream.url()
    );
    let sc = Sidecar::start(&routes(&extra), &nats.url(), None).await;
    sc.wait_nats().await;
    let host = [("host", "model-service")];

    let r = call("POST", &sc.url("/v1/keys/9"), &host, "").await;
    assert_eq!((r.status, r.text().as_str()), (200, "over nats"));
    // Was 405 (Allow: POST): the catch-all takes the other methods.
    let r = call("GET", &sc.url("/v1/keys/9"), &host, "").await;
    assert_eq!((r.status, r.text().as_str()), (200, "upstream GET /v1/keys/9"));
    // Was 404: `/{*rest}` covers `/`.
    let r = call("GET", &sc.url("/"), &host, "").await;
    assert_eq!((r.status, r.text().as_str()), (200, "upstream GET /"));
    // Was 405: HEAD is served by the GET route (no body on the wire).
    let r = call("HEAD", &sc.url("/v1/agents/3"), &host, "").await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    let seen = upstream.requests();
    assert!(seen.iter().any(|s| s.method == http::Method::HEAD && s.uri == "/v1/agents/3"), "{seen:?}");
    let m = sc.metrics().await;
    assert!(m.contains(r#"natsbridge_egress_requests_total{mode="http",path="http",route="agent-get",status_class="2xx"} 1"#), "{m}");
}

/// Issue 21 §2: statuses outside HTTP's range are a bad reply (502), not an HTTP 999;
/// UTF-8 header values are carried both ways.
#[tokio::test]
async fn reply_statuses_and_utf8_headers_at_the_edge() {
    let nats = NatsServer::start();
    let _r = responder(&nats, "agent.*.execution.requested", |m| {
        let mut h = async_nats::HeaderMap::new();
        match m.subject.as_str() {
            "agent.bridge.execution.requested" => h.insert("Bridge-Status", "999"),
            "agent.micro.execution.requested" => h.insert("Nats-Service-Error-Code", "1001"),
            _ => {
                let seen = m.headers.as_ref().and_then(|h| h.get("X-Name")).map(|v| v.as_str().to_owned()).unwrap_or_default();
                h.insert("X-Seen", seen.as_str());
            }
        }
        (h, Bytes::new())
    })
    .await;
    let sc = Sidecar::start(&routes(""), &nats.url(), None).await;
    sc.wait_nats().await;

    for who in ["bridge", "micro"] {
        let r = post(&sc.url(&format!("/agents/{who}/execute")), "").await;
        assert_eq!(r.status, 502, "{who}: {}", r.text());
        assert_eq!(r.json()["type"], "urn:natsbridge:problem:bad-reply");
    }
    let r = call("POST", &sc.url("/agents/u/execute"), &[("x-name", "Jürgen café")], "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers.get("x-seen").map(|v| v.as_bytes()), Some("Jürgen café".as_bytes()));
}

/// Issue 19 item 2: an HTTP caller's `Nats-*` publish controls do not reach the stream
/// unless the route allows them; `Nats-Msg-Id` from `Idempotency-Key` still does. A
/// stream's 4xx refusal is not retryable: 412 for a failed expectation, else 409.
#[tokio::test]
async fn nats_publish_controls_from_callers_are_stripped_unless_allowed() {
    let nats = NatsServer::start();
    let js = async_nats::jetstream::new(nats.client().await);
    js.create_stream(async_nats::jetstream::stream::Config { name: "EV".into(), subjects: vec!["ev.>".into()], ..Default::default() })
        .await
        .unwrap();
    let extra = r#"
[[outbound]]
name = "strict"
method = "POST"
path = "/strict"
subject = "ev.strict"
mode = "jetstream"

[[outbound]]
name = "trusted"
method = "POST"
path = "/trusted"
subject = "ev.trusted"
mode = "jetstream"
allow_nats_headers = ["Nats-Expected-Stream", "Nats-Expected-Last-Sequence"]

[[outbound]]
name = "sealed"
method = "POST"
path = "/sealed"
subject = "sealed.x"
mode = "jetstream"
"#;
    let sc = Sidecar::start(&routes(extra), &nats.url(), None).await;
    sc.wait_nats().await;
    let wrong = [("nats-expected-stream", "OTHER"), ("nats-rollup", "sub"), ("idempotency-key", "k1")];

    // Stripped: the wrong expectation would have failed the publish, the rollup purged.
    let r = call("POST", &sc.url("/strict"), &wrong, "one").await;
    assert_eq!(r.status, 202, "{}", r.text());
    let stored = js.get_stream("EV").await.unwrap().get_raw_message(r.json()["seq"].as_u64().unwrap()).await.unwrap();
    assert!(stored.headers.get("Nats-Rollup").is_none() && stored.headers.get("Nats-Expected-Stream").is_none(), "{:?}", stored.headers);
    assert_eq!(stored.headers.get("Nats-Msg-Id").map(|v| v.as_str()), Some("k1"));

    // Allowed by name: the expectation reaches the stream, which refuses it. A failed
    // precondition is 412, not 503 with Retry-After: a retry fails the same way.
    let r = call("POST", &sc.url("/trusted"), &wrong[..1], "two").await;
    assert_eq!((r.status, r.header("retry-after")), (412, None), "{}", r.text());
    assert_eq!(r.json()["type"], "urn:natsbridge:problem:precondition-failed");
    let r = call("POST", &sc.url("/trusted"), &[("nats-expected-stream", "EV")], "three").await;
    assert_eq!(r.status, 202, "{}", r.text());
    let last = r.json()["seq"].as_u64().unwrap();

    // A lost race on the last sequence: 412 naming it; the right one is stored.
    let r = call("POST", &sc.url("/trusted"), &[("nats-expected-last-sequence", &(last - 1).to_string())], "four").await;
    assert_eq!((r.status, r.header("retry-after")), (412, None), "{}", r.text());
    assert!(r.json()["detail"].as_str().unwrap().contains("wrong last sequence"), "{}", r.text());
    let r = call("POST", &sc.url("/trusted"), &[("nats-expected-last-sequence", &last.to_string())], "four").await;
    assert_eq!(r.status, 202, "{}", r.text());

    // Any other refusal (a sealed stream): not retryable either, and the stream's
    // description says why.
    let config = async_nats::jetstream::stream::Config { name: "SEALED".into(), subjects: vec!["sealed.>".into()], ..Default::default() };
    js.create_stream(config.clone()).await.unwrap();
    js.update_stream(async_nats::jetstream::stream::Config { sealed: true, ..config }).await.unwrap();
    let r = call("POST", &sc.url("/sealed"), &[], "five").await;
    assert_eq!((r.status, r.header("retry-after")), (409, None), "{}", r.text());
    assert_eq!(r.json()["type"], "urn:natsbridge:problem:jetstream-refused");
    assert!(r.json()["detail"].as_str().unwrap().contains("sealed"), "{}", r.text());
}

/// Issue 21 §2: publish mode's 202 is honest about its guarantee.
#[tokio::test]
async fn publish_mode_says_at_most_once() {
    let nats = NatsServer::start();
    let extra = "[[outbound]]\nname = \"ev\"\nmethod = \"POST\"\npath = \"/ev\"\nsubject = \"ev.x\"\nmode = \"publish\"\n";
    let sc = Sidecar::start(&routes(extra), &nats.url(), None).await;
    sc.wait_nats().await;
    let r = post(&sc.url("/ev"), "{}").await;
    assert_eq!(r.status, 202);
    assert_eq!(r.header("bridge-guarantee"), Some("at-most-once"));
}

/// Issue 21 §2: environment overrides are checked like the file, and refused at start.
#[tokio::test]
async fn environment_overrides_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.toml");
    std::fs::write(&path, routes("")).unwrap();
    for (var, value) in [("NATSBRIDGE_APP_URL", "ftp://app:3000"), ("NATSBRIDGE_NATS_URL", "http://nats:4222")] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_natsbridge"))
            .args(["run", "--config"])
            .arg(&path)
            .env(var, value)
            .env("NATSBRIDGE_LISTEN", "127.0.0.1:0")
            .env("NATSBRIDGE_ADMIN_LISTEN", "127.0.0.1:0")
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(10), out).await.expect("refused at once").unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}={value} accepted");
        assert!(err.contains(value), "{var}: {err}");
    }
}

/// Issue 21 §2: a JetStream ack is awaited for the route's `timeout`, not async-nats'
/// built-in 5 s. The server is paused (SIGSTOP) with both publishes unread; it stores and
/// acks them once resumed ~6 s later. The same-run control, a 2 s route, answers 504.
#[tokio::test]
async fn jetstream_acks_are_awaited_for_the_route_timeout_beyond_five_seconds() {
    let nats = NatsServer::start();
    let js = async_nats::jetstream::new(nats.client().await);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "SLOWACK".into(),
        subjects: vec!["slowack.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let extra = r#"
[[outbound]]
name = "patient"
method = "POST"
path = "/patient"
subject = "slowack.patient"
mode = "jetstream"
timeout = "20s"

[[outbound]]
name = "hasty"
method = "POST"
path = "/hasty"
subject = "slowack.hasty"
mode = "jetstream"
timeout = "2s"
"#;
    let sc = Sidecar::start(&routes(extra), &nats.url(), None).await;
    sc.wait_nats().await;
    for path in ["/patient", "/hasty"] {
        assert_eq!(post(&sc.url(path), "warm").await.status, 202, "{path} works before the pause");
    }

    nats.pause();
    let paused = std::time::Instant::now();
    let patient = tokio::spawn({
        let url = sc.url("/patient");
        async move { (post(&url, "late").await, std::time::Instant::now()) }
    });
    let hasty = post(&sc.url("/hasty"), "late").await;
    assert_eq!(hasty.status, 504, "control: the 2 s route times out while the server is paused: {}", hasty.text());
    // The fault's length is the point of the test: the ack must come after ~6 s.
    tokio::time::sleep_until((paused + Duration::from_secs(6)).into()).await;
    if patient.is_finished() {
        nats.resume();
        let (r, answered) = patient.await.unwrap();
        panic!(
            "the 20 s route answered before the server was resumed, {:?} after the pause: {} {:?} {}",
            answered.duration_since(paused),
            r.status,
            r.headers,
            r.text()
        );
    }
    nats.resume();
    let (r, answered) = patient.await.unwrap();
    assert_eq!(r.status, 202, "an ack after ~6 s is within the route's 20 s: {}", r.text());
    assert!(answered.duration_since(paused) >= Duration::from_secs(6), "{:?}", answered.duration_since(paused));
    assert_eq!(r.header("bridge-stream"), Some("SLOWACK"));
}

/// A frozen server (SIGSTOP: connected but silent) stops the client's connection from
/// taking commands once the socket and its write buffer are full; then a publish waits for
/// room in the client's queue (2,048 commands). That wait was outside the route timeout:
/// such calls hung until the idle watchdog cut them, with no answer. Now one deadline
/// covers the hand-off and the wait, so every call gets a 504 within about its timeout.
///
/// Large bodies fill the sockets, then more calls than the queue holds; over HTTP/2 (16
/// connections of at most 150 streams), so that thousands of calls in flight need
/// neither thousands of connections nor a deep accept backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_connection_answers_every_call_within_its_route_timeout() {
    use http_body_util::{BodyExt, Full};
    let nats = NatsServer::start();
    let extra = r#"
[[outbound]]
name = "stall-req"
method = "POST"
path = "/stall/req"
subject = "stall.req"
mode = "request"
max_body = "1MiB"

[[outbound]]
name = "stall-pub"
method = "POST"
path = "/stall/pub"
subject = "stall.pub"
mode = "publish"
max_body = "1MiB"
"#;
    let sc = Sidecar::start(&routes(extra), &nats.url(), None).await;
    sc.wait_nats().await;
    assert_eq!(post(&sc.url("/stall/pub"), "warm").await.status, 202);

    let clients: Vec<hyper_util::client::legacy::Client<_, Stamped>> = (0..16)
        .map(|_| hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).http2_only(true).build_http())
        .collect();
    // The routes' timeout is 2 s, counted once the body is read. Each call's time runs
    // from when the client began sending it (its body first polled): before that it only
    // waits for the client's own connection and stream limits, which on a loaded machine
    // (thousands of calls and 32 MiB from one debug-build process) took seconds of the
    // 7 s once allowed from the spawn. The room left is generous for a loaded machine, far below the
    // 90 s a hung call waited.
    let bound = Duration::from_secs(2 + 5);
    let spawn_call = |i: usize, url: String, body: Bytes| {
        let client = clients[i % clients.len()].clone();
        tokio::spawn(async move {
            let sent = Arc::new(std::sync::OnceLock::new());
            let req = http::Request::post(&url).body(Stamped { inner: Full::new(body), sent: sent.clone() }).unwrap();
            let answer = async {
                let (parts, body) = client.request(req).await.map_err(|e| e.to_string())?.into_parts();
                let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
                Ok::<_, String>((parts.status.as_u16(), parts.headers, body))
            };
            // A hang guard only; each call's own time is checked against `bound` below.
            let answer = tokio::time::timeout(Duration::from_secs(60), answer).await;
            let took = sent.get().map(|at| at.elapsed()).unwrap_or_default();
            (url, answer, took)
        })
    };
    nats.pause();
    // Two phases, in this order, so that the stall does not depend on which calls the
    // sidecar happens to read first. First 32 MiB of publishes, far more than the kernel's
    // socket buffers take (4 MiB send and 128 KiB receive by default on Linux); each is
    // answered once it is in the client's queue, so when all are answered the bytes the
    // writer cannot get into the socket sit at the head of that queue. Only then more
    // small calls than the queue holds (2,048): whatever the socket took, at least 252 of
    // them must wait for room. When the small calls raced the large ones, CI once read
    // all of them first; they fit in the socket and nothing waited.
    let big = Bytes::from(vec![b'x'; 512 << 10]);
    let mut answered = Vec::new();
    let fill: Vec<_> = (0..64).map(|i| spawn_call(i, sc.url("/stall/pub"), big.clone())).collect();
    for call in fill {
        answered.push(call.await.unwrap());
    }
    let calls: Vec<_> =
        (0..2300).map(|i| spawn_call(i, sc.url(if i % 2 == 0 { "/stall/req" } else { "/stall/pub" }), Bytes::from_static(b"x"))).collect();
    let mut hand_offs = 0;
    for call in calls {
        answered.push(call.await.unwrap());
    }
    let mut tooks: Vec<_> = answered.iter().map(|(_, _, t)| *t).collect();
    tooks.sort();
    println!("answered after the send within min {:?} median {:?} max {:?}", tooks[0], tooks[tooks.len() / 2], tooks[tooks.len() - 1]);
    for (url, answer, took) in answered {
        let (status, headers, body) = answer.unwrap_or_else(|_| panic!("{url}: no answer within 60 s")).unwrap();
        assert!(took <= bound, "{url}: answered {took:?} after its send, past {bound:?}");
        let doc: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        // A publish written to the socket before it filled is answered 202, as it should be.
        if status == 202 && url.ends_with("/pub") {
            continue;
        }
        assert_eq!(status, 504, "{url} after {took:?}: {doc}");
        assert_eq!(headers.get("content-type").map(|v| v.as_bytes()), Some(&b"application/problem+json"[..]));
        assert!(doc["type"] == "urn:natsbridge:problem:timeout" || doc["type"] == "urn:natsbridge:problem:outcome-unknown", "{doc}");
        hand_offs += usize::from(doc["detail"].as_str().is_some_and(|d| d.contains("did not take the message")));
    }
    nats.resume();
    println!("{hand_offs} calls were answered that NATS did not take the message");
    // The case under test happened: with the writer stuck behind the large publishes,
    // at least the small calls beyond the queue's 2,048 slots never got into it.
    assert!(
        hand_offs >= 2300 - 2048,
        "only {hand_offs} calls waited for room in the client's queue; the test did not stall the connection"
    );
}

/// A request body that notes when the client first took data from it: from then on the
/// request is on its way to the sidecar.
struct Stamped {
    inner: http_body_util::Full<Bytes>,
    sent: Arc<std::sync::OnceLock<std::time::Instant>>,
}

impl http_body::Body for Stamped {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.sent.get_or_init(std::time::Instant::now);
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
