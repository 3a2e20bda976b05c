//! Integration tests for the sidecar injector: AdmissionReview in, JSONPatch out, applied to real
//! pod specs; and the webhook served over real TLS.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use natsbridge::inject::{self, InjectArgs, InjectSettings};
use serde_json::{json, Value};

mod tls;

fn settings() -> InjectSettings {
    InjectSettings {
        image: "registry.example/natsbridge:1.2.3".into(),
        nats_url: "nats://nats.nats-system.svc.cluster.local:4222".into(),
        ..InjectSettings::default()
    }
}

fn review(pod: &Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "shop",
            "operation": "CREATE",
            "object": pod,
        }
    })
}

/// Runs the review through the webhook and returns (response, patch ops, patched pod).
fn admit(pod: &Value, settings: &InjectSettings) -> (Value, Option<Vec<Value>>, Value) {
    let resp = inject::mutate(&review(pod), settings).expect("a well-formed review is answered");
    assert_eq!(resp["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(resp["kind"], "AdmissionReview");
    assert_eq!(resp["response"]["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    let Some(patch_b64) = resp["response"]["patch"].as_str() else {
        assert!(resp["response"].get("patchType").is_none());
        return (resp.clone(), None, pod.clone());
    };
    assert_eq!(resp["response"]["patchType"], "JSONPatch");
    let raw = base64::engine::general_purpose::STANDARD.decode(patch_b64).unwrap();
    let ops: Vec<Value> = serde_json::from_slice(&raw).unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&raw).unwrap();
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).expect("the patch applies to the pod it was made for");
    (resp, Some(ops), patched)
}

fn plain_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "orchestration-7d9c-",
            "labels": { "app": "orchestration" },
            "annotations": {
                "natsbridge.io/inject": "true",
                "natsbridge.io/routes": "orchestration-routes",
                "natsbridge.io/app-port": "3000"
            }
        },
        "spec": {
            "containers": [{
                "name": "app",
                "image": "orchestration:5",
                "ports": [{ "containerPort": 3000 }]
            }]
        }
    })
}

fn env_of<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"].as_array()?.iter().find(|e| e["name"] == name)?["value"].as_str()
}

fn sidecar(pod: &Value) -> &Value {
    let ic = pod["spec"]["initContainers"].as_array().expect("initContainers");
    ic.iter().find(|c| c["name"] == "natsbridge").expect("sidecar injected")
}

#[test]
fn plain_pod_gets_a_native_sidecar() {
    let (resp, ops, pod) = admit(&plain_pod(), &settings());
    assert_eq!(resp["response"]["allowed"], true);
    let ops = ops.expect("a patch");
    // The pod had neither initContainers nor volumes: whole arrays are added, not appended.
    assert!(ops.iter().any(|o| o["path"] == "/spec/initContainers"));
    assert!(ops.iter().any(|o| o["path"] == "/spec/volumes"));
    // Annotation keys contain '/', which JSON Pointer spells ~1.
    assert!(ops.iter().any(|o| o["path"] == "/metadata/annotations/natsbridge.io~1status"));

    let sc = sidecar(&pod);
    assert_eq!(pod["spec"]["initContainers"][0]["name"], "natsbridge");
    assert_eq!(sc["restartPolicy"], "Always");
    assert_eq!(sc["image"], "registry.example/natsbridge:1.2.3");
    assert_eq!(sc["args"], json!(["run", "--config", "/etc/natsbridge/routes.toml", "--log-format", "json", "--log-level", "info"]));
    assert_eq!(env_of(sc, "NATSBRIDGE_APP_URL"), Some("http://127.0.0.1:3000"));
    assert_eq!(env_of(sc, "NATSBRIDGE_NATS_URL"), Some("nats://nats.nats-system.svc.cluster.local:4222"));
    assert_eq!(env_of(sc, "NATSBRIDGE_LISTEN"), Some("127.0.0.1:4280"));
    assert_eq!(env_of(sc, "NATSBRIDGE_ADMIN_LISTEN"), Some("0.0.0.0:9464"));
    assert_eq!(sc["readinessProbe"]["httpGet"], json!({ "path": "/readyz", "port": "nb-admin" }));
    assert_eq!(sc["livenessProbe"]["httpGet"], json!({ "path": "/healthz", "port": "nb-admin" }));
    assert_eq!(sc["startupProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(sc["ports"][0], json!({ "name": "nb-admin", "containerPort": 9464, "protocol": "TCP" }));
    assert_eq!(sc["resources"], json!({ "requests": { "cpu": "50m", "memory": "64Mi" }, "limits": { "memory": "256Mi" } }));
    assert_eq!(sc["securityContext"]["runAsNonRoot"], true);
    assert_eq!(sc["securityContext"]["runAsUser"], 65532);
    assert_eq!(sc["volumeMounts"][0], json!({ "name": "natsbridge-routes", "mountPath": "/etc/natsbridge", "readOnly": true }));

    assert_eq!(pod["spec"]["volumes"], json!([{ "name": "natsbridge-routes", "configMap": { "name": "orchestration-routes" } }]));
    let ann = &pod["metadata"]["annotations"];
    assert_eq!(pod["metadata"]["labels"], json!({ "app": "orchestration", "natsbridge.io/injected": "true" }));
    assert_eq!(ann["natsbridge.io/status"], "injected");
    assert_eq!(ann["natsbridge.io/inject"], "true");
    assert_eq!(ann["prometheus.io/scrape"], "true");
    assert_eq!(ann["prometheus.io/port"], "9464");
    assert_eq!(ann["prometheus.io/path"], "/metrics");
    // The app container is untouched without http-proxy.
    assert_eq!(pod["spec"]["containers"], plain_pod()["spec"]["containers"]);

    // Feeding the injected pod back in (reinvocation, or a second webhook pass) changes nothing.
    let (_, again, _) = admit(&pod, &settings());
    assert!(again.is_none());
}

#[test]
fn pod_without_any_annotations_is_untouched() {
    let pod = json!({ "metadata": { "name": "plain" }, "spec": { "containers": [{ "name": "a", "image": "x" }] } });
    let (resp, ops, _) = admit(&pod, &settings());
    assert_eq!(resp["response"]["allowed"], true);
    assert!(ops.is_none());
}

#[test]
fn opted_out_pods_are_untouched() {
    for value in ["false", "no", "True ", "enabled"] {
        let mut pod = plain_pod();
        pod["metadata"]["annotations"]["natsbridge.io/inject"] = json!(value);
        let (resp, ops, _) = admit(&pod, &settings());
        assert_eq!(resp["response"]["allowed"], true);
        // "True " is trimmed but still not "true": opting in is exact on purpose.
        assert!(ops.is_none(), "inject={value:?} must not inject");
    }
}

#[test]
fn already_injected_pods_are_untouched() {
    let mut by_status = plain_pod();
    by_status["metadata"]["annotations"]["natsbridge.io/status"] = json!("injected");
    assert!(admit(&by_status, &settings()).1.is_none());

    let mut by_init_container = plain_pod();
    by_init_container["spec"]["initContainers"] = json!([{ "name": "natsbridge", "image": "old", "restartPolicy": "Always" }]);
    assert!(admit(&by_init_container, &settings()).1.is_none());

    let mut by_container = plain_pod();
    by_container["spec"]["containers"].as_array_mut().unwrap().push(json!({ "name": "natsbridge", "image": "old" }));
    assert!(admit(&by_container, &settings()).1.is_none());
}

#[test]
fn https_proxy_annotation_sets_https_proxy() {
    let pod = |annotations: Value| {
        let mut a = json!({ "natsbridge.io/inject": "true", "natsbridge.io/routes": "r" });
        a.as_object_mut().unwrap().extend(annotations.as_object().unwrap().clone());
        json!({ "metadata": { "name": "p", "annotations": a }, "spec": { "containers": [{ "name": "app", "image": "app:1" }] } })
    };
    // Both: every call of the app goes through the sidecar, HTTPS as CONNECT tunnels.
    let (_, _, out) = admit(&pod(json!({ "natsbridge.io/http-proxy": "true", "natsbridge.io/https-proxy": "true" })), &settings());
    let app = &out["spec"]["containers"][0];
    for var in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"] {
        assert_eq!(env_of(app, var), Some("http://127.0.0.1:4280"), "{var}");
    }
    assert!(env_of(app, "NO_PROXY").is_some_and(|n| n.split(',').any(|e| e == "127.0.0.1")));
    // HTTPS alone: no HTTP_PROXY, but NO_PROXY still keeps loopback and NATS off the proxy.
    let (_, _, out) = admit(&pod(json!({ "natsbridge.io/https-proxy": "true" })), &settings());
    let app = &out["spec"]["containers"][0];
    assert_eq!(env_of(app, "https_proxy"), Some("http://127.0.0.1:4280"));
    assert!(env_of(app, "HTTP_PROXY").is_none());
    assert!(env_of(app, "no_proxy").is_some());
    // Only exactly "true" opts in.
    let (_, _, out) = admit(&pod(json!({ "natsbridge.io/https-proxy": "yes" })), &settings());
    assert!(env_of(&out["spec"]["containers"][0], "HTTPS_PROXY").is_none());
}

#[test]
fn http_proxy_with_several_containers() {
    let pod = json!({
        "metadata": {
            "name": "agent-0",
            "annotations": {
                "natsbridge.io/inject": "true",
                "natsbridge.io/routes": "agent-routes",
                "natsbridge.io/http-proxy": "true",
                "prometheus.io/scrape": "true",
                "prometheus.io/port": "8081"
            }
        },
        "spec": {
            "initContainers": [{ "name": "migrate", "image": "agent:5", "command": ["migrate"] }],
            "containers": [
                { "name": "agent", "image": "agent:5", "ports": [{ "containerPort": 8080 }], "env": [{ "name": "MODE", "value": "prod" }] },
                { "name": "worker", "image": "agent:5" },
                { "name": "custom", "image": "agent:5", "env": [{ "name": "NO_PROXY", "value": "mine" }] }
            ],
            "volumes": [{ "name": "data", "emptyDir": {} }]
        }
    });
    let (_, ops, out) = admit(&pod, &settings());
    let ops = ops.expect("a patch");
    assert!(ops.iter().any(|o| o["path"] == "/spec/initContainers/0"));
    assert!(ops.iter().any(|o| o["path"] == "/spec/volumes/-"));

    let ic = out["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(ic.len(), 2);
    assert_eq!(ic[0]["name"], "natsbridge", "the sidecar starts before the pod's own init containers");
    assert_eq!(ic[1]["name"], "migrate");
    assert!(ic[1].get("env").is_none(), "init containers are not proxied");
    // App port falls back to the first container's first declared port.
    assert_eq!(env_of(&ic[0], "NATSBRIDGE_APP_URL"), Some("http://127.0.0.1:8080"));

    let vols = out["spec"]["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 2);
    assert_eq!(vols[0]["name"], "data");
    assert_eq!(vols[1]["configMap"]["name"], "agent-routes");

    let containers = out["spec"]["containers"].as_array().unwrap();
    for c in containers {
        assert_eq!(env_of(c, "HTTP_PROXY"), Some("http://127.0.0.1:4280"), "{}", c["name"]);
        assert_eq!(env_of(c, "http_proxy"), Some("http://127.0.0.1:4280"));
        assert!(env_of(c, "HTTPS_PROXY").is_none(), "HTTPS goes through the sidecar only with natsbridge.io/https-proxy");
    }
    assert_eq!(env_of(&containers[0], "MODE"), Some("prod"), "existing env is kept");
    let no_proxy = env_of(&containers[0], "NO_PROXY").unwrap();
    let entries: Vec<&str> = no_proxy.split(',').collect();
    for must in ["localhost", "127.0.0.1", "::1", "nats.nats-system.svc.cluster.local", "kubernetes.default.svc"] {
        assert!(entries.contains(&must), "NO_PROXY {no_proxy:?} lacks {must}");
    }
    // Service-to-service calls must reach the proxy: that is the traffic being migrated.
    assert!(!entries.iter().any(|e| *e == ".svc" || *e == ".cluster.local" || *e == ".svc.cluster.local"));
    assert_eq!(env_of(&containers[1], "no_proxy"), Some(no_proxy));
    // A workload's own NO_PROXY wins and is not duplicated.
    let custom_env = containers[2]["env"].as_array().unwrap();
    assert_eq!(custom_env.iter().filter(|e| e["name"] == "NO_PROXY").count(), 1);
    assert_eq!(env_of(&containers[2], "NO_PROXY"), Some("mine"));

    // The app's own scrape annotations are kept, not taken over.
    let ann = &out["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/port"], "8081");
    assert!(ann.get("prometheus.io/path").is_none());
    assert_eq!(ann["natsbridge.io/status"], "injected");
    // No labels map before: the whole map is added.
    assert!(ops.iter().any(|o| o["path"] == "/metadata/labels"));
    assert_eq!(out["metadata"]["labels"], json!({ "natsbridge.io/injected": "true" }));
}

#[test]
fn resources_and_log_level_from_annotations() {
    let mut pod = plain_pod();
    let ann = pod["metadata"]["annotations"].as_object_mut().unwrap();
    ann.insert("natsbridge.io/cpu-request".into(), json!("200m"));
    ann.insert("natsbridge.io/cpu-limit".into(), json!("1"));
    ann.insert("natsbridge.io/memory-limit".into(), json!("1Gi"));
    ann.insert("natsbridge.io/log-level".into(), json!("debug"));
    ann.insert("natsbridge.io/nats-url-secret".into(), json!("nats-creds"));
    let (_, _, out) = admit(&pod, &settings());
    let sc = sidecar(&out);
    assert_eq!(sc["resources"], json!({ "requests": { "cpu": "200m", "memory": "64Mi" }, "limits": { "cpu": "1", "memory": "1Gi" } }));
    assert_eq!(sc["args"][6], "debug");
    let url = sc["env"].as_array().unwrap().iter().find(|e| e["name"] == "NATSBRIDGE_NATS_URL").unwrap();
    assert_eq!(url["valueFrom"]["secretKeyRef"], json!({ "name": "nats-creds", "key": "url", "optional": true }));
    assert!(url.get("value").is_none());
}

#[test]
fn a_routes_placeholder_in_the_url_secret_gives_each_service_its_own_credentials() {
    let cli = Cli::try_parse_from([
        "inject",
        "--sidecar-image",
        "i",
        "--nats-url",
        "nats://nats:4222",
        "--nats-url-secret",
        "{routes}-nats-auth/url",
    ])
    .unwrap();
    let s = cli.inject.settings().unwrap();
    let secret_of = |pod: &Value| {
        let (_, _, out) = admit(pod, &s);
        let url = sidecar(&out)["env"].as_array().unwrap().iter().find(|e| e["name"] == "NATSBRIDGE_NATS_URL").unwrap().clone();
        assert!(url.get("value").is_none(), "{url}");
        url["valueFrom"]["secretKeyRef"].clone()
    };
    assert_eq!(secret_of(&plain_pod()), json!({ "name": "orchestration-routes-nats-auth", "key": "url", "optional": true }));
    let mut agent = plain_pod();
    agent["metadata"]["annotations"]["natsbridge.io/routes"] = json!("agent-routes");
    assert_eq!(secret_of(&agent), json!({ "name": "agent-routes-nats-auth", "key": "url", "optional": true }));
    // A pod's own annotation still wins.
    agent["metadata"]["annotations"]["natsbridge.io/nats-url-secret"] = json!("mine/u");
    assert_eq!(secret_of(&agent), json!({ "name": "mine", "key": "u", "optional": true }));
}

#[test]
fn unusable_annotations_are_denied_with_a_reason() {
    let cases: &[(&str, Option<&str>, &str)] = &[
        ("natsbridge.io/routes", None, "natsbridge.io/routes"),
        ("natsbridge.io/routes", Some("Bad_Name"), "not a valid ConfigMap name"),
        ("natsbridge.io/app-port", Some("http"), "not a port number"),
        ("natsbridge.io/app-port", Some("70000"), "not a port number"),
        ("natsbridge.io/app-port", Some("4280"), "collides"),
        ("natsbridge.io/app-port", Some("9464"), "collides"),
        ("natsbridge.io/memory-limit", Some("lots"), "not a Kubernetes quantity"),
        ("natsbridge.io/cpu-request", Some("1.2.3"), "not a Kubernetes quantity"),
        ("natsbridge.io/nats-url-secret", Some("name/"), "not name or name/key"),
    ];
    for (key, value, expect) in cases {
        let mut pod = plain_pod();
        let ann = pod["metadata"]["annotations"].as_object_mut().unwrap();
        match value {
            Some(v) => ann.insert(key.to_string(), json!(v)),
            None => ann.remove(*key),
        };
        let (resp, ops, _) = admit(&pod, &settings());
        assert_eq!(resp["response"]["allowed"], false, "{key}={value:?}");
        assert!(ops.is_none());
        assert_eq!(resp["response"]["status"]["code"], 400);
        let msg = resp["response"]["status"]["message"].as_str().unwrap();
        assert!(msg.contains(expect), "{key}={value:?}: {msg}");
    }
}

#[test]
fn non_pod_and_non_create_requests_pass_through() {
    let mut r = review(&plain_pod());
    r["request"]["operation"] = json!("UPDATE");
    let resp = inject::mutate(&r, &settings()).unwrap();
    assert_eq!(resp["response"]["allowed"], true);
    assert!(resp["response"].get("patch").is_none());

    let mut r = review(&json!({ "metadata": { "name": "cm" } }));
    r["request"]["kind"]["kind"] = json!("ConfigMap");
    r["request"]["resource"]["resource"] = json!("configmaps");
    let resp = inject::mutate(&r, &settings()).unwrap();
    assert_eq!(resp["response"]["allowed"], true);
}

#[test]
fn malformed_reviews_are_errors() {
    assert!(matches!(inject::mutate(&json!({}), &settings()), Err(inject::InjectError::BadReview(_))));
    assert!(matches!(
        inject::mutate(&json!({ "request": { "kind": { "kind": "Pod" } } }), &settings()),
        Err(inject::InjectError::BadReview(_))
    ));
}

#[test]
fn helpers() {
    assert_eq!(inject::escape_pointer("a/b~c"), "a~1b~0c");
    assert_eq!(
        inject::nats_hosts("nats://u:p@nats-0.nats:4222, tls://[fd00::1]:4222,nats-2:4222,nats://plain"),
        vec!["nats-0.nats", "fd00::1", "nats-2", "plain"]
    );
    for ok in ["100m", "1", "0.5", "64Mi", "1e3", "2E-1", "+1G", ".5"] {
        assert!(inject::is_quantity(ok), "{ok}");
    }
    for bad in ["", "m", "1.2.3", "64MB", "1e", "ten", "1 Gi"] {
        assert!(!inject::is_quantity(bad), "{bad}");
    }
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    inject: InjectArgs,
}

#[test]
fn args_parse_into_settings() {
    let cli = Cli::try_parse_from([
        "inject",
        "--sidecar-image",
        "img:1",
        "--nats-url",
        "nats://a:4222,nats://b:4222",
        "--cpu-limit",
        "500m",
        "--memory-limit",
        "",
        "--no-proxy",
        "10.96.0.1,metadata.internal",
    ])
    .unwrap();
    let s = cli.inject.settings().unwrap();
    assert_eq!(s.image, "img:1");
    assert_eq!(s.resources.cpu_limit.as_deref(), Some("500m"));
    assert_eq!(s.resources.memory_limit, None);
    assert_eq!(s.extra_no_proxy, vec!["10.96.0.1", "metadata.internal"]);
    let np = inject::no_proxy_list(&s);
    assert!(np.contains(&"a".to_string()) && np.contains(&"b".to_string()) && np.contains(&"10.96.0.1".to_string()));

    let bad = Cli::try_parse_from(["inject", "--sidecar-image", "i", "--nats-url", "n", "--cpu-request", "x"]).unwrap();
    assert!(matches!(bad.inject.settings(), Err(inject::InjectError::Setting { .. })));
}

#[test]
fn with_nats_tls_the_sidecar_gets_the_ca_mounted_and_pointed_at() {
    let cli = Cli::try_parse_from(["inject", "--sidecar-image", "i", "--nats-url", "tls://nats:4222", "--nats-ca-config-map", "nats-ca"])
        .unwrap();
    let s = cli.inject.settings().unwrap();
    let (_, _, pod) = admit(&plain_pod(), &s);
    let sc = sidecar(&pod);
    assert_eq!(env_of(sc, "NATSBRIDGE_NATS_CA_FILE"), Some("/etc/natsbridge-nats-ca/ca.crt"));
    assert!(sc["volumeMounts"]
        .as_array()
        .unwrap()
        .contains(&json!({ "name": "natsbridge-nats-ca", "mountPath": "/etc/natsbridge-nats-ca", "readOnly": true })));
    // Optional, so a namespace without the CA still starts its pods.
    let ca = json!({ "name": "natsbridge-nats-ca", "configMap": { "name": "nats-ca", "items": [{ "key": "ca.crt", "path": "ca.crt" }], "optional": true } });
    assert!(pod["spec"]["volumes"].as_array().unwrap().contains(&ca), "{}", pod["spec"]["volumes"]);

    // A pod with volumes of its own gets both appended; another key is honoured.
    let cli =
        Cli::try_parse_from(["inject", "--sidecar-image", "i", "--nats-url", "n", "--nats-ca-config-map", "bundle/root.pem"]).unwrap();
    let mut with_volume = plain_pod();
    with_volume["spec"]["volumes"] = json!([{ "name": "data", "emptyDir": {} }]);
    let (_, _, pod) = admit(&with_volume, &cli.inject.settings().unwrap());
    let names: Vec<&str> = pod["spec"]["volumes"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["data", "natsbridge-routes", "natsbridge-nats-ca"]);
    assert_eq!(pod["spec"]["volumes"][2]["configMap"]["items"][0]["key"], "root.pem");

    // Without the flag nothing about a CA is added (the plain pod test pins the whole pod).
    let (_, _, plain) = admit(&plain_pod(), &settings());
    assert_eq!(env_of(sidecar(&plain), "NATSBRIDGE_NATS_CA_FILE"), None);
    let bad = Cli::try_parse_from(["inject", "--sidecar-image", "i", "--nats-url", "n", "--nats-ca-config-map", "/k"]).unwrap();
    assert!(matches!(bad.inject.settings(), Err(inject::InjectError::Setting { name: "--nats-ca-config-map", .. })));
}
