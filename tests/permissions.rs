//! Least privilege (issue 10 §4): a nats-server configured with exactly what `natsbridge
//! permissions` prints runs a service's egress and ingress without one permission
//! violation, and the same user's calls outside its routes are refused by the server.
//!
//! The sidecar is the real binary, so its log is the evidence that nothing it did was
//! refused; the server's log is the evidence of what was.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use support::fixtures::{consumer_settled, js_publish, stream_messages};
use support::*;

const PASSWORD: &str = "orders-secret";

/// Every kind of route: request, publish and jetstream egress; request ingress and
/// jetstream ingress with idempotency and dead letters; and the sidecar provisions its
/// streams, dead-letter stream and bucket itself.
fn routes(password_file: &Path) -> String {
    format!(
        r#"[sidecar]
service = "orders"
provision = true

[nats]
user = "orders"
password_file = {password_file:?}
connect_timeout = "2s"

[[outbound]]
name = "agent-exec"
method = "POST"
path = "/agents/{{id}}/execute"
mode = "request"
subject = "agent.{{id}}.execution.requested"

[[outbound]]
name = "audit"
method = "POST"
path = "/audit"
mode = "publish"
subject = "audit.orders"

[[outbound]]
name = "tool"
method = "POST"
path = "/tools"
mode = "jetstream"
subject = "tool.execution.requested"

[[inbound]]
name = "create"
subject = "orders.create"
mode = "request"
method = "POST"
path = "/orders"

[[inbound]]
name = "events"
subject = "orders.events.*"
mode = "jetstream"
stream = "ORDERS"
durable = "orders-events"
method = "POST"
path = "/events/{{3}}"
max_deliver = 2
backoff = ["100ms"]
idempotency = {{ key = "msg-id" }}

[[streams]]
name = "ORDERS"
subjects = ["orders.events.>"]

[[streams]]
name = "TOOLS"
subjects = ["tool.execution.>"]
"#
    )
}

/// `natsbridge permissions FILE --password-env …`, as an operator would run it.
fn permissions_conf(routes: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_natsbridge"))
        .args(["permissions", "--password-env", "NATS_PASSWORD_{SERVICE}"])
        .arg(routes)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

async fn connect(server: &NatsServer, user: &str, password: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(user.into(), password.into()).connect(server.url()).await.unwrap()
}

/// The permission refusals in a log: the server's (`Publish Violation - Subject "x"`, or
/// `Permissions Violation for Publish to "x"` before 2.11) and the client's as the sidecar
/// logs them.
fn violations(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.to_ascii_lowercase().contains("violation")).collect()
}

/// The `orders` routes (changed by `edit`) in `dir`, and a server configured with what
/// `natsbridge permissions` prints for them: the routes file, that configuration, the
/// server and a connection of the test's own user `admin`. The server reads the
/// password from its environment, as the chart runs it; the test harness adds a user of
/// its own for setup and observation.
async fn orders_under_generated_permissions(
    dir: &Path,
    edit: impl FnOnce(String) -> String,
) -> (String, String, NatsServer, async_nats::Client) {
    let pw = dir.join("password");
    std::fs::write(&pw, PASSWORD).unwrap();
    let routes_path = dir.join("routes.toml");
    let toml = edit(routes(&pw));
    std::fs::write(&routes_path, &toml).unwrap();
    let conf = permissions_conf(&routes_path);
    std::env::set_var("NATS_PASSWORD_ORDERS", PASSWORD);
    let conf = conf.replacen("  users = [\n", "  users = [\n    { user: \"admin\", password: \"admin\" }\n", 1);
    let server = NatsServer::start_with(&conf);
    let admin = connect(&server, "admin", "admin").await;
    (toml, conf, server, admin)
}

#[tokio::test]
async fn generated_permissions_carry_every_route_and_refuse_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (toml, conf, server, admin) = orders_under_generated_permissions(dir.path(), |t| t).await;
    let js = jetstream::new(admin.clone());

    let mut agent = admin.subscribe("agent.*.execution.requested").await.unwrap();
    let responder = admin.clone();
    tokio::spawn(async move {
        while let Some(m) = agent.next().await {
            if let Some(reply) = m.reply {
                responder.publish(reply, "agent-ok".into()).await.unwrap();
            }
        }
    });
    let mut audit = subscribe_synced(&admin, "audit.orders").await;
    let app = App::start(|seen| if seen.uri.ends_with("/bad") { respond(422, "no") } else { respond(200, "done") }).await;
    let sidecar = SidecarProcess::start(&toml, &server.url(), Some(&app.url()));
    sidecar.wait_ready().await;

    // Egress: request, publish, jetstream.
    let r = call("POST", &sidecar.url("/agents/a1/execute"), &[], "go").await;
    assert_eq!((r.status, r.text()), (200, "agent-ok".to_owned()), "{}", sidecar.log());
    let r = call("POST", &sidecar.url("/audit"), &[], "seen").await;
    assert_eq!(r.status, 202, "{}", r.text());
    let m = tokio::time::timeout(Duration::from_secs(5), audit.next()).await.expect("audit message").unwrap();
    assert_eq!(&m.payload[..], b"seen");
    let r = call("POST", &sidecar.url("/tools"), &[], "t").await;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(stream_messages(&js, "TOOLS").await, 1);

    // Ingress: a request route, and a jetstream route with idempotency and a dead letter.
    let reply = admin.request("orders.create", "o1".into()).await.unwrap();
    assert_eq!(&reply.payload[..], b"done");
    js_publish(&js, "orders.events.good", &[("Nats-Msg-Id", "m1")], "e1").await;
    js_publish(&js, "orders.events.bad", &[("Nats-Msg-Id", "m2")], "e2").await;
    eventually("both events settled", Duration::from_secs(20), || async {
        consumer_settled(&js, "ORDERS", "orders-events", 2).await.then_some(())
    })
    .await;
    assert_eq!(stream_messages(&js, "DLQ").await, 1, "the poison event is dead-lettered");
    let kv = js.get_key_value("natsbridge_idempotency").await.unwrap();
    assert!(kv.status().await.unwrap().values() >= 1, "the handled key is in the bucket");

    let server_violations: Vec<String> = violations(&server.log()).into_iter().map(str::to_owned).collect();
    assert!(server_violations.is_empty(), "the server refused the sidecar:\n{}\n\n{conf}", server_violations.join("\n"));
    let log = sidecar.log();
    assert!(violations(&log).is_empty() && !log.contains(" ERROR ") && !log.contains(" WARN "), "sidecar log:\n{log}\n\n{conf}");

    // Outside its routes, the same user is refused by the server.
    let mut payments = subscribe_synced(&admin, "payments.charge").await;
    let orders = connect(&server, "orders", PASSWORD).await;
    orders.publish("payments.charge", "steal".into()).await.unwrap();
    let _ = orders.subscribe("payments.>").await.unwrap();
    let delete = orders.request("$JS.API.STREAM.DELETE.ORDERS", "".into());
    let _ = tokio::time::timeout(Duration::from_secs(2), delete).await;
    // Messages of one connection arrive in order: once this one is in, the refused
    // publish would have been too.
    orders.publish("audit.orders", "marker".into()).await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), audit.next()).await.expect("marker").unwrap();
    assert_eq!(&m.payload[..], b"marker");
    assert!(futures::FutureExt::now_or_never(payments.next()).flatten().is_none(), "a refused publish was delivered");
    let log = server.log();
    for (op, subject) in [("Publish", "payments.charge"), ("Subscription", "payments.>"), ("Publish", "$JS.API.STREAM.DELETE.ORDERS")] {
        let refused = violations(&log).into_iter().any(|l| l.contains(op) && l.contains(&format!("{subject:?}")) && l.contains("orders"));
        assert!(refused, "the server did not refuse {op} {subject}:\n{log}");
    }
    assert!(js.get_stream("ORDERS").await.is_ok(), "the stream survived");
}

/// Two services, each under the user `natsbridge permissions` prints for it: `caller`
/// reads a streamed reply from `tokens` and cancels it by going away, and runs an async
/// call (`Prefer: respond-async`) through the operations bucket its sidecar provisions.
fn stream_routes(service: &str, password_file: &Path) -> String {
    let routes = if service == "caller" {
        r#"[[outbound]]
name = "tokens"
method = "GET"
path = "/tokens/{kind}"
subject = "tokens.{kind}"
mode = "request"
timeout = "10s"
"#
    } else {
        r#"[[inbound]]
name = "tokens"
subject = "tokens.*"
mode = "request"
method = "GET"
path = "/{2}"
timeout = "10s"
"#
    };
    let provision = if service == "caller" { "provision = true" } else { "" };
    format!(
        "[sidecar]\nservice = {service:?}\n{provision}\n\n[nats]\nuser = {service:?}\npassword_file = {password_file:?}\nconnect_timeout = \"2s\"\n\n{routes}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_reply_its_cancel_and_an_async_call_run_under_the_generated_permissions() {
    use support::streaming::{next_call, next_data, open, read_all, streaming_app};
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("password");
    std::fs::write(&pw, "stream-secret").unwrap();
    let (caller, tokens) = (stream_routes("caller", &pw), stream_routes("tokens", &pw));
    let (caller_path, tokens_path) = (dir.path().join("caller.toml"), dir.path().join("tokens.toml"));
    std::fs::write(&caller_path, &caller).unwrap();
    std::fs::write(&tokens_path, &tokens).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_natsbridge"))
        .args(["permissions", "--password-env", "NATS_PASSWORD_{SERVICE}"])
        .arg(&caller_path)
        .arg(&tokens_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let conf = String::from_utf8(out.stdout).unwrap();
    assert!(conf.contains("allow_responses"), "{conf}");
    std::env::set_var("NATS_PASSWORD_CALLER", "stream-secret");
    std::env::set_var("NATS_PASSWORD_TOKENS", "stream-secret");
    let server = NatsServer::start_with(&conf);
    let (app_url, mut calls) = streaming_app().await;
    let responder = SidecarProcess::start(&tokens, &server.url(), Some(&app_url));
    let requester = SidecarProcess::start(&caller, &server.url(), None);
    responder.wait_ready().await;
    requester.wait_ready().await;

    // A whole stream.
    let url = requester.url("/tokens/sse");
    let client = tokio::spawn(async move {
        let (parts, mut body) = open(&url).await.into_parts();
        (parts.status, read_all(&mut body, Duration::from_secs(20)).await)
    });
    let call = next_call(&mut calls).await;
    for i in 0..5 {
        call.tx.send(Ok(format!("data: {i}\n\n").into())).await.unwrap();
    }
    drop(call);
    let (status, (body, end)) = client.await.unwrap();
    assert_eq!((status.as_u16(), end), (200, Ok(())), "{}", requester.log());
    assert_eq!(String::from_utf8_lossy(&body).matches("data: ").count(), 5);

    // Streams the client leaves after one token and after two: the cancel reaches the
    // responder, which closes the app's connection (without the response permission the
    // server drops the cancel, and the app would only be stopped by the 30 s stall). The
    // head goes alone before the first token, so the reader has had two messages, then
    // three: nats-server 2.14 refused a cancel to a reply subject delivered an even number
    // of times, so a responder reusing one subject for every message fails one of the two.
    for tokens in 1..=2 {
        let url = requester.url("/tokens/sse");
        let (read_tx, mut read_rx) = tokio::sync::mpsc::unbounded_channel();
        let client = tokio::spawn(async move {
            let (_parts, mut body) = open(&url).await.into_parts();
            read_tx.send(()).unwrap();
            for _ in 0..tokens {
                next_data(&mut body).await;
                read_tx.send(()).unwrap();
            }
        });
        let call = next_call(&mut calls).await;
        // One message per token: each written once the client has what came before.
        read_rx.recv().await.expect("the client has the head");
        for i in 0..tokens {
            call.tx.send(Ok(format!("data: {i}\n\n").into())).await.unwrap();
            read_rx.recv().await.expect("the client read the token");
        }
        client.await.unwrap();
        let stopped = tokio::time::timeout(Duration::from_secs(10), call.tx.closed()).await;
        assert!(stopped.is_ok(), "the cancel after {tokens} token(s) stopped the app's response\n{}", server.log());
    }

    // A reader that follows the written contract (any language) cancels to the subject in
    // `Bridge-Stream-Control`. The responder gives that reply subject to the first message
    // only and every later one its own, so after three messages it is still answerable.
    let foreign =
        async_nats::ConnectOptions::with_user_and_password("caller".into(), "stream-secret".into()).connect(server.url()).await.unwrap();
    let inbox = foreign.new_inbox();
    let mut messages = foreign.subscribe(inbox.clone()).await.unwrap();
    foreign.publish_with_reply("tokens.sse", inbox, bytes::Bytes::new()).await.unwrap();
    let call = next_call(&mut calls).await;
    let first = tokio::time::timeout(Duration::from_secs(10), messages.next()).await.unwrap().unwrap();
    let control = first.headers.as_ref().and_then(|h| h.get("Bridge-Stream-Control")).expect("a control subject").to_string();
    for i in 0..2 {
        call.tx.send(Ok(format!("data: {i}\n\n").into())).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), messages.next()).await.expect("the token's message").unwrap();
    }
    let mut cancel = async_nats::HeaderMap::new();
    cancel.insert("Bridge-Stream", "cancel");
    foreign.publish_with_headers(control, cancel, bytes::Bytes::new()).await.unwrap();
    foreign.flush().await.unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(10), call.tx.closed()).await;
    assert!(stopped.is_ok(), "a foreign reader's cancel to the control subject stopped the app's response\n{}", server.log());

    // An async call: 202, then its result from the operations bucket.
    let url = requester.url("/tokens/plain");
    let started = tokio::spawn(async move { call_async(&url).await });
    let app_call = next_call(&mut calls).await;
    app_call.tx.send(Ok("result".into())).await.unwrap();
    drop(app_call);
    let location = started.await.unwrap();
    let done = support::call("GET", &requester.url(&location), &[("Prefer", "wait=10")], "").await;
    assert_eq!((done.status, done.text()), (200, "result".to_owned()), "{}", requester.log());

    let server_violations: Vec<String> = violations(&server.log()).into_iter().map(str::to_owned).collect();
    assert!(server_violations.is_empty(), "the server refused a sidecar:\n{}\n\n{conf}", server_violations.join("\n"));
    for (name, log) in [("requester", requester.log()), ("responder", responder.log())] {
        assert!(violations(&log).is_empty() && !log.contains(" ERROR "), "{name} log:\n{log}\n\n{conf}");
    }
}

/// `GET` with `Prefer: respond-async`: the 202's Location.
async fn call_async(url: &str) -> String {
    let r = call("GET", url, &[("Prefer", "respond-async")], "").await;
    assert_eq!(r.status, 202, "{}", r.text());
    r.header("location").unwrap().to_owned()
}

/// The README's least-privilege example is the real output for the file it names, so it
/// cannot fall behind what the command grants.
#[test]
fn the_readme_example_is_the_real_output() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let file = "examples/permissions/orders.toml";
    let shown_command = format!("$ natsbridge permissions {file} --password-env 'NATS_PASSWORD_{{SERVICE}}'\n");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let start = readme.find(&shown_command).expect("the README shows the example") + shown_command.len();
    let shown = &readme[start..start + readme[start..].find("```").unwrap()];
    let out = Command::new(env!("CARGO_BIN_EXE_natsbridge"))
        .current_dir(root)
        .args(["permissions", file, "--password-env", "NATS_PASSWORD_{SERVICE}"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(shown, String::from_utf8(out.stdout).unwrap(), "README.md's permissions example is stale: run the command it shows");
}

/// Without `provision`, the user `natsbridge permissions` prints may not create the
/// consumer floors bucket (nor read the account's limits, which creating it starts
/// with). A sidecar that finds it missing tries once, in the background, and warns: its
/// jetstream route binds and runs as before, and the refused create is the only thing
/// the server refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_floors_bucket_it_may_not_create_costs_a_sidecar_only_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let (toml, _, server, admin) =
        orders_under_generated_permissions(dir.path(), |t| t.replace("provision = true", "provision = false")).await;
    let js = jetstream::new(admin.clone());
    // What an operator's provisioning made, less the floors bucket.
    for (name, subject) in [("ORDERS", "orders.events.>"), ("TOOLS", "tool.execution.>"), ("DLQ", "dlq.>")] {
        js.create_stream(jetstream::stream::Config { name: name.into(), subjects: vec![subject.into()], ..Default::default() })
            .await
            .unwrap();
    }
    js.create_key_value(jetstream::kv::Config { bucket: "natsbridge_idempotency".into(), history: 1, ..Default::default() }).await.unwrap();

    let app = App::start(|_| respond(200, "done")).await;
    let sidecar = SidecarProcess::start(&toml, &server.url(), Some(&app.url()));
    sidecar.wait_ready().await;
    js_publish(&js, "orders.events.good", &[("Nats-Msg-Id", "m1")], "e1").await;
    eventually("the event settled", Duration::from_secs(20), || async {
        consumer_settled(&js, "ORDERS", "orders-events", 1).await.then_some(())
    })
    .await;
    assert_eq!(app.hits().len(), 1);

    let warned = || sidecar.log().lines().filter(|l| l.contains("consumer floors bucket does not exist")).count();
    eventually("the warning", Duration::from_secs(20), || async { (warned() > 0).then_some(()) }).await;
    assert_eq!(warned(), 1, "{}", sidecar.log());
    assert!(js.get_key_value("natsbridge_consumer_floors").await.is_err(), "the bucket was not created");
    let refused: Vec<String> = violations(&server.log()).into_iter().map(str::to_owned).collect();
    // async-nats reads the account's limits (`$JS.API.INFO`) before it creates a bucket.
    let create = |l: &String| l.contains("\"$JS.API.INFO\"") || l.contains("STREAM.CREATE.KV_natsbridge_consumer_floors");
    assert!(!refused.is_empty() && refused.iter().all(create), "only the bucket's create is refused:\n{}", refused.join("\n"));
}
