//! Readiness that means "can serve" (issue 13 §1): a NATS outage or a missing stream leaves
//! the pod ready and its HTTP routes serving while `/statusz` says what is down; `[sidecar]
//! readiness = "strict"` keeps the old meaning; the injector probes that meaning. Real
//! nats-server processes, real HTTP apps, in-process sidecars.

mod support;

use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use support::*;

const WAIT: Duration = Duration::from_secs(15);

/// An `http` route to `app` (never touches NATS), a NATS `request` route, and an inbound
/// request route, with extra `[sidecar]` keys.
fn pod_routes(sidecar: &str, app: &str, extra: &str) -> String {
    format!(
        r#"[sidecar]
service = "pod"
{sidecar}

[[outbound]]
name = "legacy"
path = "/legacy/{{*rest}}"
mode = "http"
upstream = "{app}"

[[outbound]]
name = "moved"
method = "POST"
path = "/moved"
subject = "moved.call"
mode = "request"

{}
{extra}"#,
        support::fixtures::orders_route("")
    )
}

async fn readyz(sc: &Sidecar) -> Reply {
    get(&format!("http://{}/readyz", sc.admin)).await.unwrap()
}

/// Waits until `/statusz` shows NATS down, and returns its entry.
async fn nats_down(sc: &Sidecar) -> Value {
    eventually("statusz shows NATS down", WAIT, || async {
        let v = sc.statusz().await;
        (v["components"]["nats"]["state"] == "down").then(|| v["components"]["nats"].clone())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_keeps_the_pod_ready_and_http_routes_serving() {
    let mut nats = NatsServer::start();
    let app = App::start(|s| respond(200, &format!("legacy {}", s.uri))).await;
    let sc = Sidecar::start(&pod_routes("", &app.url(), ""), &nats.url(), Some(&app.url())).await;
    sc.wait_ready().await;
    assert_eq!(readyz(&sc).await.status, 200);

    nats.kill();
    let entry = nats_down(&sc).await;
    let why = entry["reason"].as_str().unwrap();
    assert!(why.contains("NATS"), "{entry}");
    // RFC 3339, as `since` promises.
    assert!(humantime::parse_rfc3339(entry["since"].as_str().unwrap()).is_ok(), "{entry}");
    let metrics = sc.metrics().await;
    assert!(metrics.contains(r#"natsbridge_component_up{component="nats"} 0"#), "{metrics}");

    // Still ready; the http route serves; the NATS route says 503 with Retry-After.
    let r = readyz(&sc).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(&sc.url("/legacy/still-here")).await.unwrap();
    assert_eq!((r.status, r.text()), (200, "legacy /legacy/still-here".to_owned()));
    let r = post(&sc.url("/moved"), "x").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let s = sc.statusz().await;
    assert_eq!((s["ready"].clone(), s["readiness"].clone()), (json!(true), json!("serving")), "{s}");

    // Back up: NATS is up again in /statusz and the gauge.
    nats.restart();
    eventually("NATS up again", WAIT, || async { (sc.statusz().await["components"]["nats"]["state"] == "up").then_some(()) }).await;
    sc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_goes_not_ready_when_nats_is_killed() {
    let mut nats = NatsServer::start();
    let app = App::start(|_| respond(200, "legacy")).await;
    let sc = Sidecar::start(&pod_routes("readiness = \"strict\"", &app.url(), ""), &nats.url(), Some(&app.url())).await;
    sc.wait_ready().await;
    eventually("strict ready once all is up", WAIT, || async { sc.ready().await.then_some(()) }).await;
    nats.kill();
    let r = eventually("strict not ready", WAIT, || async {
        let r = readyz(&sc).await;
        (r.status == 503).then_some(r)
    })
    .await;
    assert!(r.json()["failing"]["nats"].as_str().is_some(), "{}", r.text());
    assert_eq!(sc.statusz().await["readiness"], "strict");
    // Not ready, yet the http route still serves: strict changes the probe, not the routes.
    assert_eq!(get(&sc.url("/legacy/x")).await.unwrap().status, 200);
    // Dropped, not stopped: a graceful stop with NATS gone waits out drain_timeout.
    drop(sc);
}

/// A jetstream inbound route whose stream does not exist.
fn missing_stream(sidecar: &str, app: &str) -> String {
    pod_routes(sidecar, app, &fixtures::tool_exec_route(""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_stream_leaves_the_pod_ready_and_statusz_names_it() {
    let nats = NatsServer::start();
    let app = App::start(|_| respond(200, "legacy")).await;
    let sc = Sidecar::start(&missing_stream("", &app.url()), &nats.url(), Some(&app.url())).await;
    let entry = eventually("statusz naming the route and its stream", WAIT, || async {
        let v = sc.statusz().await;
        let e = v["components"]["inbound:tool-exec"].clone();
        e["reason"].as_str().is_some_and(|r| r.contains("TOOL")).then_some(e)
    })
    .await;
    assert_eq!(entry["state"], "down", "{entry}");
    assert_eq!(readyz(&sc).await.status, 200);
    let m = sc.metrics().await;
    assert!(m.contains(r#"natsbridge_component_up{component="inbound:tool-exec"} 0"#), "{m}");
    assert!(m.contains(r#"natsbridge_component_up{component="egress"} 1"#), "{m}");
    sc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_is_not_ready_while_a_stream_is_missing() {
    let nats = NatsServer::start();
    let app = App::start(|_| respond(200, "legacy")).await;
    let sc = Sidecar::start(&missing_stream("readiness = \"strict\"", &app.url()), &nats.url(), Some(&app.url())).await;
    sc.wait_nats().await;
    let r = eventually("strict names the route", WAIT, || async {
        let r = readyz(&sc).await;
        (r.status == 503 && r.json()["failing"].get("inbound:tool-exec").is_some()).then_some(r)
    })
    .await;
    assert!(r.json()["failing"]["inbound:tool-exec"].as_str().unwrap().contains("TOOL"), "{}", r.text());
    sc.stop().await;
}

/// The sidecar container the injector adds to a pod.
fn injected_sidecar() -> Value {
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "generateName": "shop-", "annotations": { "natsbridge.io/inject": "true", "natsbridge.io/routes": "shop-routes" } },
        "spec": { "containers": [{ "name": "app", "image": "shop:1" }] }
    });
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "u-1", "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "shop", "operation": "CREATE", "object": pod.clone(),
        }
    });
    let settings = natsbridge::inject::InjectSettings { image: "natsbridge:test".into(), ..Default::default() };
    let resp = natsbridge::inject::mutate(&review, &settings).unwrap();
    let raw = base64::engine::general_purpose::STANDARD.decode(resp["response"]["patch"].as_str().expect("a patch")).unwrap();
    let mut patched = pod;
    let patch: json_patch::Patch = serde_json::from_slice(&raw).unwrap();
    json_patch::patch(&mut patched, &patch).unwrap();
    let init = patched["spec"]["initContainers"].as_array().unwrap();
    init.iter().find(|c| c["name"] == "natsbridge").expect("sidecar injected").clone()
}

/// Kubernetes takes a native sidecar's readiness as the pod's: the injected readinessProbe
/// must hit the endpoint that stays 200 while NATS is unreachable and streams are missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_injected_probes_mean_can_serve() {
    let sc_spec = injected_sidecar();
    let probe = &sc_spec["readinessProbe"]["httpGet"];
    assert_eq!(*probe, json!({ "path": "/readyz", "port": "nb-admin" }));
    assert_eq!(sc_spec["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(sc_spec["startupProbe"]["httpGet"]["path"], "/healthz");

    // NATS unreachable (nothing listens on port 1) and a route whose stream cannot exist.
    let app = App::start(|_| respond(200, "legacy")).await;
    let sc = Sidecar::start(&missing_stream("", &app.url()), "nats://127.0.0.1:1", Some(&app.url())).await;
    let path = probe["path"].as_str().unwrap();
    eventually("the probed path answers 200", WAIT, || async {
        get(&format!("http://{}{path}", sc.admin)).await.ok().filter(|r| r.status == 200).map(|_| ())
    })
    .await;
    let s = nats_down(&sc).await;
    assert!(s["reason"].as_str().unwrap().contains("not connected to NATS"), "{s}");
    // And it says "can serve": the http route answers through the sidecar.
    assert_eq!(get(&sc.url("/legacy/x")).await.unwrap().status, 200);
    let live = get(&format!("http://{}{}", sc.admin, sc_spec["livenessProbe"]["httpGet"]["path"].as_str().unwrap())).await.unwrap();
    assert_eq!(live.status, 200);
    // Dropped, not stopped: a graceful stop with NATS unreachable waits out drain_timeout.
    drop(sc);
}
