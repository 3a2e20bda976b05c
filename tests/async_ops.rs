//! Async request-reply end to end (issue 11 §3): `Prefer: respond-async` or `async = true`
//! answers 202 with a Location; any replica answers the GET: 202 while running, then the
//! original response; `Prefer: wait`; expiry and unknown ids are 404.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use support::fixtures::routes_toml;
use support::*;

fn requester(async_route: &str) -> String {
    routes_toml(
        "caller",
        "5s",
        &format!(
            r#"[[outbound]]
name = "run"
method = "POST"
path = "/run/{{n}}"
subject = "long.run.{{n}}"
mode = "request"
timeout = "20s"

[[outbound]]
name = "always-async"
method = "POST"
path = "/always/{{n}}"
subject = "long.run.{{n}}"
mode = "request"
timeout = "20s"
async = true
{async_route}
"#
        ),
    )
}

fn responder() -> String {
    routes_toml(
        "long",
        "5s",
        r#"[[inbound]]
name = "run"
subject = "long.run.*"
mode = "request"
method = "POST"
path = "/run/{3}"
timeout = "20s"
"#,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_call_answers_202_then_any_replica_serves_its_result() {
    let nats = NatsServer::start();
    let release = Arc::new(tokio::sync::Notify::new());
    let r = release.clone();
    let app = App::script(move |seen, _| {
        let r = r.clone();
        async move {
            if seen.uri.ends_with("/slow") {
                r.notified().await;
            }
            with_headers(201, &[("x-result", "yes")], &format!("done {}", String::from_utf8_lossy(&seen.body)))
        }
    })
    .await;
    // The operator provisions the bucket, which an `async = true` route's readiness needs.
    provision_operations(&nats, &requester("")).await;
    let resp = Sidecar::start(&responder(), &nats.url(), Some(&app.url())).await;
    let a = Sidecar::start(&requester(""), &nats.url(), None).await;
    let b = Sidecar::start(&requester(""), &nats.url(), None).await;
    for s in [&resp, &a, &b] {
        s.wait_ready().await;
    }
    let started = call("POST", &a.url("/run/slow"), &[("Prefer", "respond-async")], Bytes::from_static(b"job")).await;
    assert_eq!(started.status, 202, "{}", String::from_utf8_lossy(&started.body));
    let location = started.headers["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with("/.natsbridge/operations/"), "{location}");
    assert_eq!(started.headers["retry-after"], "1");
    app.wait_hits(1).await;
    // The other replica knows it, and it is still running.
    let running = call("GET", &b.url(&location), &[], Bytes::new()).await;
    assert_eq!(
        running.status,
        202,
        "{:?} {}",
        app.requests().iter().map(|s| s.uri.clone()).collect::<Vec<_>>(),
        String::from_utf8_lossy(&running.body)
    );
    assert_eq!(running.headers["retry-after"], "1");
    // Held by Prefer: wait until the app answers.
    let b_url = b.url(&location);
    let waiting = tokio::spawn(async move { call("GET", &b_url, &[("Prefer", "wait=15")], Bytes::new()).await });
    release.notify_one();
    let done = waiting.await.unwrap();
    assert_eq!(done.status, 201, "{}", String::from_utf8_lossy(&done.body));
    assert_eq!(done.headers["x-result"], "yes");
    assert_eq!(&done.body[..], b"done job");
    // Served again, by either replica.
    let again = call("GET", &a.url(&location), &[], Bytes::new()).await;
    assert_eq!((again.status, &again.body[..]), (201, &b"done job"[..]));
    assert_eq!(app.hits().len(), 1, "polling never calls the app again");
    // Without the preference, the call is synchronous as before.
    let sync = call("POST", &a.url("/run/fast"), &[], Bytes::from_static(b"now")).await;
    assert_eq!((sync.status, &sync.body[..]), (201, &b"done now"[..]));
    let unknown = call("GET", &a.url("/.natsbridge/operations/0123456789abcdef0123456789abcdef"), &[], Bytes::new()).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.headers["content-type"], "application/problem+json");
    let garbage = call("GET", &a.url("/.natsbridge/operations/..%2f"), &[], Bytes::new()).await;
    assert_eq!(garbage.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_route_keeps_its_result_for_async_ttl_only() {
    let nats = NatsServer::start();
    let app = App::start(|_| respond(200, "ok")).await;
    provision_operations(&nats, &requester("")).await;
    let resp = Sidecar::start(&responder(), &nats.url(), Some(&app.url())).await;
    let a = Sidecar::start(&requester("async_ttl = \"2s\""), &nats.url(), None).await;
    resp.wait_ready().await;
    a.wait_ready().await;
    let started = call("POST", &a.url("/always/x"), &[], Bytes::new()).await;
    assert_eq!(started.status, 202);
    let location = started.headers["location"].to_str().unwrap().to_owned();
    let done = call("GET", &a.url(&location), &[("Prefer", "wait=10")], Bytes::new()).await;
    assert_eq!((done.status, &done.body[..]), (200, &b"ok"[..]));
    let url = a.url(&location);
    eventually("the result expired", Duration::from_secs(15), || async { (get(&url).await.unwrap().status == 404).then_some(()) }).await;
}

/// A requester whose `lost` route gives up after 2 s, and a NATS subscriber on its subject
/// that takes every request and never answers (so no "no responders" either).
async fn never_answered(nats: &NatsServer) -> (String, tokio::task::JoinHandle<()>) {
    let c = nats.client().await;
    let mut sub = subscribe_synced(&c, "lost.run.*").await;
    let hold = tokio::spawn(async move {
        let mut taken = Vec::new();
        while let Some(m) = futures::StreamExt::next(&mut sub).await {
            taken.push(m);
        }
    });
    let toml = routes_toml(
        "caller",
        "5s",
        r#"[[outbound]]
name = "lost"
method = "POST"
path = "/lost/{n}"
subject = "lost.run.{n}"
mode = "request"
timeout = "2s"
async = true
"#,
    );
    (toml, hold)
}

fn assert_gateway_timeout(r: &Reply, problem: &str) {
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/problem+json"), "{}", r.text());
    assert!(r.json()["type"].as_str().unwrap_or_default().ends_with(problem), "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_nobody_answers_ends_as_504_not_202_forever() {
    let nats = NatsServer::start();
    let (toml, _hold) = never_answered(&nats).await;
    provision_operations(&nats, &toml).await;
    let a = Sidecar::start(&toml, &nats.url(), None).await;
    a.wait_ready().await;
    let started = call("POST", &a.url("/lost/1"), &[], Bytes::from_static(b"job")).await;
    assert_eq!(started.status, 202, "{}", started.text());
    let location = started.headers["location"].to_str().unwrap().to_owned();
    // Held until the call's own timeout has passed and its result (a 504) is stored.
    let done = call("GET", &a.url(&location), &[("Prefer", "wait=15")], Bytes::new()).await;
    assert_gateway_timeout(&done, "timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_whose_sidecar_died_ends_as_504_operation_lost() {
    let nats = NatsServer::start();
    let (toml, _hold) = never_answered(&nats).await;
    provision_operations(&nats, &toml).await;
    let holder = SidecarProcess::start(&toml, &nats.url(), None);
    let other = Sidecar::start(&toml, &nats.url(), None).await;
    holder.wait_ready().await;
    other.wait_ready().await;
    let started = call("POST", &holder.url("/lost/2"), &[], Bytes::from_static(b"job")).await;
    assert_eq!(started.status, 202, "{}", started.text());
    let location = started.headers["location"].to_str().unwrap().to_owned();
    // The sidecar carrying the call dies before the call's timeout: nobody will store its result.
    holder.signal("KILL");
    let at = std::time::Instant::now();
    let running = call("GET", &other.url(&location), &[], Bytes::new()).await;
    assert_eq!(running.status, 202, "still within its deadline: {}", running.text());
    let url = other.url(&location);
    let lost = eventually("the operation is reported lost", Duration::from_secs(30), || async {
        let r = call("GET", &url, &[], Bytes::new()).await;
        (r.status != 202).then_some(r)
    })
    .await;
    assert_gateway_timeout(&lost, "operation-lost");
    eprintln!("lost operation reported {:?} after its sidecar died (timeout 2 s + 5 s grace)", at.elapsed());
}

/// `natsbridge provision`'s work for the operations bucket, as an operator runs it first.
async fn provision_operations(nats: &NatsServer, toml: &str) {
    let js = async_nats::jetstream::new(nats.client().await);
    let config = natsbridge::config::parse(toml, "routes.toml").unwrap_or_else(|e| panic!("{e}"));
    let plan = natsbridge::provision::apply(&js, &config, false).await.unwrap();
    assert!(plan.is_ok(), "{plan}");
}

/// One keep-alive HTTP/1.1 connection, so a test knows how many places under
/// `max_connections` its calls hold (a new client per call leaves the last connection
/// closing for a moment after its answer, still holding its place).
struct OneConnection(hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>);

impl OneConnection {
    async fn open(addr: std::net::SocketAddr) -> Self {
        let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(addr).await.unwrap());
        let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        Self(send)
    }

    async fn call(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &'static [u8]) -> Reply {
        use http_body_util::BodyExt as _;
        let mut req = http::Request::builder().method(method).uri(path).header("host", "127.0.0.1");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.0.ready().await.unwrap();
        let res = self.0.send_request(req.body(http_body_util::Full::new(Bytes::from_static(body))).unwrap()).await.unwrap();
        let (parts, body) = res.into_parts();
        Reply { status: parts.status.as_u16(), headers: parts.headers, body: body.collect().await.unwrap().to_bytes() }
    }
}

/// An async call goes on after its 202, so each running one takes a place under
/// `max_connections` until its result is stored: past it, the next is refused 503 with
/// `Retry-After` rather than left to pile up tasks, bodies and reply waiters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_operations_count_under_max_connections() {
    let nats = NatsServer::start();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let app = App::script(move |seen, _| {
        let g = g.clone();
        async move {
            let _pass = g.acquire().await;
            with_headers(201, &[], &format!("done {}", String::from_utf8_lossy(&seen.body)))
        }
    })
    .await;
    // One place for the connection that asks, two for operations.
    let toml = requester("").replace("[sidecar]\n", "[sidecar]\nmax_connections = 3\n");
    provision_operations(&nats, &toml).await;
    let resp = Sidecar::start(&responder(), &nats.url(), Some(&app.url())).await;
    let a = Sidecar::start(&toml, &nats.url(), None).await;
    resp.wait_ready().await;
    a.wait_ready().await;
    let mut c = OneConnection::open(a.egress).await;
    let mut locations = Vec::new();
    for (path, body) in [("/always/1", &b"job1"[..]), ("/always/2", b"job2")] {
        let r = c.call("POST", path, &[], body).await;
        assert_eq!(r.status, 202, "{}", r.text());
        locations.push(r.headers["location"].to_str().unwrap().to_owned());
    }
    app.wait_hits(2).await;
    let refused = c.call("POST", "/always/3", &[], b"job3").await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.header("content-type"), Some("application/problem+json"));
    assert!(refused.json()["type"].as_str().unwrap_or_default().ends_with("too-many-connections"), "{}", refused.text());
    assert!(refused.headers.contains_key("retry-after"), "{:?}", refused.headers);
    assert_eq!(app.hits().len(), 2, "the refused call never reached the app");

    gate.add_permits(100);
    let done = c.call("GET", &locations[0], &[("Prefer", "wait=15")], b"").await;
    assert_eq!((done.status, &done.body[..]), (201, &b"done job1"[..]));
    let done = c.call("GET", &locations[1], &[("Prefer", "wait=15")], b"").await;
    assert_eq!((done.status, &done.body[..]), (201, &b"done job2"[..]));
    // Stored results give their places back (just after the store): a new one runs again.
    let mut again = None;
    for _ in 0..300 {
        let r = c.call("POST", "/always/4", &[], b"job4").await;
        if r.status == 202 {
            again = Some(r);
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = again.expect("an operation accepted once the others finished");
    let location = again.headers["location"].to_str().unwrap().to_owned();
    let done = c.call("GET", &location, &[("Prefer", "wait=15")], b"").await;
    assert_eq!((done.status, &done.body[..]), (201, &b"done job4"[..]));
}
