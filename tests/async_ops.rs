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
