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

// ---------------------------------------------------------------------------------------------
// Over TLS.

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap() }
    }

    fn cert_path(&self) -> std::path::PathBuf {
        self.dir.path().join("tls.crt")
    }

    fn key_path(&self) -> std::path::PathBuf {
        self.dir.path().join("tls.key")
    }

    /// Writes a fresh self-signed certificate for the webhook's Service name and returns its DER
    /// (for the client's trust store). `mtime` makes the rotation visible regardless of the file
    /// system's timestamp granularity.
    fn issue(&self, mtime: SystemTime) -> rustls::pki_types::CertificateDer<'static> {
        let names = vec!["natsbridge-inject.natsbridge.svc".to_string(), "localhost".to_string()];
        let ck = rcgen::generate_simple_self_signed(names).unwrap();
        std::fs::write(self.key_path(), ck.signing_key.serialize_pem()).unwrap();
        std::fs::write(self.cert_path(), ck.cert.pem()).unwrap();
        for p in [self.cert_path(), self.key_path()] {
            std::fs::File::options().write(true).open(p).unwrap().set_modified(mtime).unwrap();
        }
        ck.cert.der().clone()
    }
}

fn client_config(trust: &rustls::pki_types::CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// An HTTP/1 connection to the webhook the way the API server opens it: TLS verified against
/// the CA bundle, with the Service DNS name as SNI.
async fn connect<B>(
    addr: std::net::SocketAddr,
    trust: &rustls::pki_types::CertificateDer<'static>,
) -> Result<hyper::client::conn::http1::SendRequest<B>, String>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(client_config(trust));
    let name = rustls::pki_types::ServerName::try_from("natsbridge-inject.natsbridge.svc").unwrap();
    let tls = connector.connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One HTTPS request the way the API server makes it: TLS verified against the CA bundle, with
/// the Service DNS name as SNI.
async fn https(
    addr: std::net::SocketAddr,
    trust: &rustls::pki_types::CertificateDer<'static>,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, Bytes), String> {
    let mut sender = connect(addr, trust).await?;
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "natsbridge-inject.natsbridge.svc")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, body))
}

#[tokio::test]
async fn serves_the_webhook_over_tls_and_follows_certificate_rotation() {
    let pki = Pki::new();
    let t0 = SystemTime::now() - Duration::from_secs(3600);
    let first = pki.issue(t0);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = inject::tls_config(&pki.cert_path(), &pki.key_path()).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(inject::serve(listener, tls, settings(), async {
        let _ = stop_rx.await;
    }));

    // The listener is bound before serve() starts, so the first request needs no readiness wait.
    let (status, body) = https(addr, &first, "GET", "/healthz", vec![]).await.unwrap();
    assert_eq!((status, &body[..]), (200, &b"ok\n"[..]));

    let (status, body) = https(addr, &first, "POST", "/mutate", serde_json::to_vec(&review(&plain_pod())).unwrap()).await.unwrap();
    assert_eq!(status, 200);
    let resp: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(resp["response"]["allowed"], true);
    let raw = base64::engine::general_purpose::STANDARD.decode(resp["response"]["patch"].as_str().unwrap()).unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&raw).unwrap();
    let mut pod = plain_pod();
    json_patch::patch(&mut pod, &patch).unwrap();
    assert_eq!(pod["spec"]["initContainers"][0]["restartPolicy"], "Always");

    let (status, _) = https(addr, &first, "POST", "/mutate", b"not json".to_vec()).await.unwrap();
    assert_eq!(status, 400);
    let (status, _) = https(addr, &first, "POST", "/mutate", b"{}".to_vec()).await.unwrap();
    assert_eq!(status, 400);
    let (status, _) = https(addr, &first, "GET", "/mutate", vec![]).await.unwrap();
    assert_eq!(status, 405);
    let (status, _) = https(addr, &first, "GET", "/nope", vec![]).await.unwrap();
    assert_eq!(status, 404);

    // Rotate the certificate the way cert-manager does (files replaced in place). The next
    // handshake must present the new one: a client trusting only the new cert now succeeds and
    // one trusting only the old cert fails.
    let second = pki.issue(t0 + Duration::from_secs(60));
    let (status, _) = https(addr, &second, "GET", "/healthz", vec![]).await.unwrap();
    assert_eq!(status, 200);
    let err = https(addr, &first, "GET", "/healthz", vec![]).await.unwrap_err();
    assert!(err.starts_with("TLS"), "{err}");

    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server).await.expect("serve stops on shutdown").unwrap().unwrap();
}

#[tokio::test]
async fn run_refuses_unusable_tls_material() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tls.crt"), "not a pem").unwrap();
    std::fs::write(dir.path().join("tls.key"), "not a pem").unwrap();
    let cli = Cli::try_parse_from([
        "inject",
        "--sidecar-image",
        "i",
        "--nats-url",
        "nats://n:4222",
        "--tls-cert",
        dir.path().join("tls.crt").to_str().unwrap(),
        "--tls-key",
        dir.path().join("tls.key").to_str().unwrap(),
    ])
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = inject::run(cli.inject, listener, std::future::pending()).await.unwrap_err();
    assert!(matches!(err, inject::InjectError::BadTls { .. }), "{err}");

    let missing = inject::tls_config(&dir.path().join("absent.crt"), &dir.path().join("tls.key")).unwrap_err();
    assert!(matches!(missing, inject::InjectError::ReadTls { .. }), "{missing}");
}

/// A `POST /mutate` that declares `declared` body bytes and never sends them: its status.
async fn stalled_body(
    addr: std::net::SocketAddr,
    trust: &rustls::pki_types::CertificateDer<'static>,
    declared: usize,
) -> Result<u16, String> {
    let mut sender = connect(addr, trust).await?;
    let (_keep, rx) = futures::channel::mpsc::channel::<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>(1);
    let req = http::Request::builder()
        .method("POST")
        .uri("/mutate")
        .header("host", "natsbridge-inject.natsbridge.svc")
        .header("content-length", declared.to_string())
        .body(http_body_util::StreamBody::new(rx))
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.status().as_u16())
}

/// The webhook cannot be pushed out of memory: bodies over 3 MiB get 413 unread, a body
/// that stalls gets 408 after the read deadline (so stalled reviews cannot hold the slots
/// forever), and many stalled connections at once do not stop it answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_bodies_are_capped_and_deadlined() {
    let pki = Pki::new();
    let cert = pki.issue(SystemTime::now() - Duration::from_secs(3600));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = inject::tls_config(&pki.cert_path(), &pki.key_path()).unwrap();
    let _server = tokio::spawn(inject::serve(listener, tls, settings(), std::future::pending()));

    // A JSON array of tiny elements: as a serde_json::Value it takes ~16 times its size.
    let array = |bytes: usize| format!("[{}0]", "0,".repeat(bytes / 2)).into_bytes();
    assert_eq!(stalled_body(addr, &cert, 64 << 20).await.unwrap(), 413, "a declared length over the cap is refused unread");
    // Under the cap, not a review: refused without building the array.
    let (status, body) = https(addr, &cert, "POST", "/mutate", array(inject::MAX_BODY - 1024)).await.unwrap();
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));

    // More stalled bodies than connections allowed: each ends with 408 by the
    // deadline, and a real review is answered all the same.
    let stalled: Vec<_> = (0..inject::MAX_CONNECTIONS + 4)
        .map(|_| {
            let cert = cert.clone();
            tokio::spawn(async move { stalled_body(addr, &cert, 100).await })
        })
        .collect();
    let review = serde_json::to_vec(&review(&plain_pod())).unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(60), https(addr, &cert, "POST", "/mutate", review)).await;
    assert_eq!(answered.expect("answered despite stalled connections").unwrap().0, 200);
    for s in stalled {
        let status = tokio::time::timeout(Duration::from_secs(60), s).await.expect("a stalled body is cut off").unwrap();
        assert_eq!(status.unwrap(), 408);
    }
}
