//! AdmissionReview in, AdmissionReview (with an RFC 6902 patch) out: every injection rule, as
//! pure functions with no I/O, so each rule is tested without a cluster. Calls only the
//! injector's settings and errors.

use base64::Engine as _;
use serde_json::{json, Map, Value};

use serde::Deserialize as _;

use super::admission::{AdmissionReview, Container, Named, PodObject};
use super::error::{InjectError, ReviewDefect};
use super::settings::{is_quantity, InjectSettings, Resources, SecretKeyRef};

/// Annotation that opts a pod in (`"true"`); anything else leaves the pod alone.
pub const ANNOTATION_INJECT: &str = "natsbridge.io/inject";
/// Annotation naming the ConfigMap (key `routes.toml`) in the pod's namespace.
pub const ANNOTATION_ROUTES: &str = "natsbridge.io/routes";
/// Annotation with the port the app listens on, for ingress deliveries.
pub const ANNOTATION_APP_PORT: &str = "natsbridge.io/app-port";
/// Annotation that points the app's outgoing HTTP at the sidecar's egress listener.
pub const ANNOTATION_HTTP_PROXY: &str = "natsbridge.io/http-proxy";
/// Annotation that sends the app's HTTPS calls through the egress listener too, as CONNECT
/// tunnels (opaque: they are passed through, never routed onto NATS).
pub const ANNOTATION_HTTPS_PROXY: &str = "natsbridge.io/https-proxy";
/// Annotation the injector writes, so a re-invocation or a second webhook sees it is done.
pub const ANNOTATION_STATUS: &str = "natsbridge.io/status";
/// Annotation overriding the sidecar's log level for one workload.
pub const ANNOTATION_LOG_LEVEL: &str = "natsbridge.io/log-level";
/// Annotation naming a Secret (`name` or `name/key`) in the pod's namespace holding the NATS URL,
/// for clusters with NATS auth: credentials stay out of the pod spec.
pub const ANNOTATION_NATS_URL_SECRET: &str = "natsbridge.io/nats-url-secret";
/// Resource annotations, each a Kubernetes quantity.
pub const ANNOTATION_CPU_REQUEST: &str = "natsbridge.io/cpu-request";
pub const ANNOTATION_CPU_LIMIT: &str = "natsbridge.io/cpu-limit";
pub const ANNOTATION_MEMORY_REQUEST: &str = "natsbridge.io/memory-request";
pub const ANNOTATION_MEMORY_LIMIT: &str = "natsbridge.io/memory-limit";

/// Name of the injected container; its presence also marks a pod as already injected.
pub const SIDECAR_NAME: &str = "natsbridge";
/// Name of the routes volume added to the pod.
pub const ROUTES_VOLUME: &str = "natsbridge-routes";
/// Where the routes ConfigMap is mounted; the sidecar reads `routes.toml` from here.
pub const ROUTES_DIR: &str = "/etc/natsbridge";
/// Name of the NATS CA volume added to the pod when the servers use TLS.
pub const NATS_CA_VOLUME: &str = "natsbridge-nats-ca";
/// Where the sidecar finds the NATS CA (`NATSBRIDGE_NATS_CA_FILE`).
pub const NATS_CA_DIR: &str = "/etc/natsbridge-nats-ca";
/// Name of the admin port on the sidecar; the PodMonitor selects it by this name.
pub const ADMIN_PORT_NAME: &str = "nb-admin";
/// Label put on injected pods (`"true"`): annotations cannot be selected on, and the chart's
/// PodMonitor needs a label selector to find every sidecar.
pub const LABEL_INJECTED: &str = "natsbridge.io/injected";

/// What the injector decided for one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Leave the pod as it is, with the reason (for logs).
    Skip(&'static str),
    /// Apply these RFC 6902 operations.
    Patch(Vec<Value>),
    /// Refuse the pod: its annotations ask for injection but are unusable. Refusing at admission
    /// shows the mistake to whoever applied the manifest, instead of a crash-looping sidecar.
    Deny(Refusal),
}

/// Why an opted-in pod is refused; the message is shown to whoever applied the manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{ANNOTATION_INJECT}=true needs {ANNOTATION_ROUTES}: the name of a ConfigMap with key routes.toml")]
    NoRoutesConfigMap,
    #[error("{ANNOTATION_ROUTES}={0:?} is not a valid ConfigMap name")]
    BadRoutesConfigMap(String),
    #[error("{ANNOTATION_APP_PORT}={0:?} is not a port number")]
    BadAppPort(String),
    #[error("app port {port} collides with the sidecar's ports ({egress} egress, {admin} admin) in the pod's shared network namespace")]
    AppPortCollides { port: u16, egress: u16, admin: u16 },
    #[error("{annotation}={value:?} is not a Kubernetes quantity")]
    NotAQuantity { annotation: &'static str, value: String },
    #[error("{ANNOTATION_NATS_URL_SECRET}={0:?} is not name or name/key")]
    BadNatsUrlSecret(String),
}

/// Turns an AdmissionReview (admission.k8s.io/v1) into the AdmissionReview response.
///
/// Only a body without `request.uid` (or not shaped like a review) is an error; everything
/// about the pod is answered inside the response (allowed, allowed with a patch, or denied).
pub fn mutate(review: &Value, settings: &InjectSettings) -> Result<Value, InjectError> {
    let review = AdmissionReview::deserialize(review).map_err(|e| InjectError::BadReview(ReviewDefect::Shape(e.to_string())))?;
    answer(&review, settings)
}

/// As [`mutate`], for a review already parsed into the typed parts the injector reads.
pub fn answer(review: &AdmissionReview, settings: &InjectSettings) -> Result<Value, InjectError> {
    let request = review.request.as_ref().ok_or(InjectError::BadReview(ReviewDefect::NoRequest))?;
    let uid = request.uid.as_deref().ok_or(InjectError::BadReview(ReviewDefect::NoUid))?;
    let api_version = review.api_version.as_deref().unwrap_or("admission.k8s.io/v1");

    let is_pod = request.kind.as_ref().and_then(|k| k.kind.as_deref()) == Some("Pod")
        || request.resource.as_ref().and_then(|r| r.resource.as_deref()) == Some("pods");
    let is_create = request.operation.as_deref().is_none_or(|op| op == "CREATE");
    let decision = match &request.object {
        _ if !is_pod => Decision::Skip("not a pod"),
        _ if !is_create => Decision::Skip("not a CREATE"),
        Some(pod) => decide_injection(pod, settings),
        None => return Err(InjectError::BadReview(ReviewDefect::ObjectNotAPod)),
    };
    let response = admission_response(uid, decision);
    Ok(json!({ "apiVersion": api_version, "kind": "AdmissionReview", "response": response }))
}

/// The `response` object of an AdmissionReview carrying `decision`.
fn admission_response(uid: &str, decision: Decision) -> Map<String, Value> {
    let mut response = Map::new();
    response.insert("uid".into(), Value::String(uid.into()));
    match decision {
        Decision::Skip(_) => {
            response.insert("allowed".into(), Value::Bool(true));
        }
        Decision::Patch(ops) => {
            let patch = serde_json::to_vec(&ops).expect("JSON values serialize");
            response.insert("allowed".into(), Value::Bool(true));
            response.insert("patchType".into(), Value::String("JSONPatch".into()));
            response.insert("patch".into(), Value::String(base64::engine::general_purpose::STANDARD.encode(patch)));
        }
        Decision::Deny(refusal) => {
            response.insert("allowed".into(), Value::Bool(false));
            response.insert("status".into(), json!({ "code": 400, "reason": "BadRequest", "message": refusal.to_string() }));
        }
    }
    response
}

/// The parts of a pod object the injection rules read.
struct Pod<'a> {
    object: &'a PodObject,
    containers: &'a [Container],
}

impl<'a> Pod<'a> {
    fn new(object: &'a PodObject) -> Self {
        Self { object, containers: object.spec.as_ref().map_or(&[], |s| &s.containers) }
    }

    /// An annotation's value, trimmed.
    fn annotation(&self, key: &str) -> Option<&'a str> {
        self.object.metadata.annotations.as_ref().and_then(|a| a.get(key)).map(|v| v.trim())
    }

    fn init_containers(&self) -> Option<&'a [Named]> {
        self.object.spec.as_ref().and_then(|s| s.init_containers.as_deref())
    }
}

/// What an opted-in pod asks of its sidecar, read from its annotations and checked.
struct SidecarRequest<'a> {
    routes_config_map: &'a str,
    app_port: Option<u16>,
    resources: Resources,
    nats_url_secret: Option<SecretKeyRef>,
    log_level: &'a str,
}

/// Decides whether one pod gets the sidecar (and builds the patch that adds it), is left
/// alone, or is refused.
pub fn decide_injection(object: &PodObject, settings: &InjectSettings) -> Decision {
    let pod = Pod::new(object);
    if let Some(reason) = reason_to_skip(&pod) {
        return Decision::Skip(reason);
    }
    match read_sidecar_request(&pod, settings) {
        Ok(request) => Decision::Patch(injection_patch(&pod, &request, settings)),
        Err(refusal) => Decision::Deny(refusal),
    }
}

/// Why the pod needs nothing from us, if it does not: not opted in, or already injected.
fn reason_to_skip(pod: &Pod<'_>) -> Option<&'static str> {
    if pod.annotation(ANNOTATION_INJECT) != Some("true") {
        return Some("not opted in");
    }
    if pod.annotation(ANNOTATION_STATUS) == Some("injected") {
        return Some("already injected");
    }
    if pod.containers.iter().any(|c| c.name.as_deref() == Some(SIDECAR_NAME))
        || pod.init_containers().is_some_and(|ic| ic.iter().any(|c| c.name.as_deref() == Some(SIDECAR_NAME)))
    {
        return Some("sidecar container already present");
    }
    None
}

/// Reads the pod's annotations, in the order their refusals are reported.
fn read_sidecar_request<'a>(pod: &Pod<'a>, settings: &'a InjectSettings) -> Result<SidecarRequest<'a>, Refusal> {
    let routes_config_map = routes_config_map(pod)?;
    let app_port = app_port(pod, settings)?;
    let resources = sidecar_resources(pod, settings)?;
    let nats_url_secret = match pod.annotation(ANNOTATION_NATS_URL_SECRET) {
        Some(s) => Some(SecretKeyRef::parse(s).ok_or_else(|| Refusal::BadNatsUrlSecret(s.into()))?),
        None => settings.nats_url_secret.as_ref().map(|r| r.for_routes(routes_config_map)),
    };
    let log_level = pod.annotation(ANNOTATION_LOG_LEVEL).unwrap_or(&settings.log_level);
    Ok(SidecarRequest { routes_config_map, app_port, resources, nats_url_secret, log_level })
}

fn routes_config_map<'a>(pod: &Pod<'a>) -> Result<&'a str, Refusal> {
    let routes = pod.annotation(ANNOTATION_ROUTES).filter(|r| !r.is_empty()).ok_or(Refusal::NoRoutesConfigMap)?;
    if !is_dns_subdomain(routes) {
        return Err(Refusal::BadRoutesConfigMap(routes.into()));
    }
    Ok(routes)
}

/// The port the sidecar delivers to: the annotation, else the first container's first port.
fn app_port(pod: &Pod<'_>, settings: &InjectSettings) -> Result<Option<u16>, Refusal> {
    let port = match pod.annotation(ANNOTATION_APP_PORT) {
        Some(p) => match p.parse::<u16>() {
            Ok(port) if port != 0 => Some(port),
            _ => return Err(Refusal::BadAppPort(p.into())),
        },
        // An egress-only app declares no port; then the sidecar simply has no app to deliver to.
        None => pod.containers.first().and_then(|c| c.ports.first()).and_then(|p| p.container_port).and_then(|p| u16::try_from(p).ok()),
    };
    match port {
        Some(port) if port == settings.admin_port || port == settings.egress_port => {
            Err(Refusal::AppPortCollides { port, egress: settings.egress_port, admin: settings.admin_port })
        }
        _ => Ok(port),
    }
}

/// The settings' resources, each overridden by its annotation.
fn sidecar_resources(pod: &Pod<'_>, settings: &InjectSettings) -> Result<Resources, Refusal> {
    let mut resources = settings.resources.clone();
    for (annotation, slot) in [
        (ANNOTATION_CPU_REQUEST, &mut resources.cpu_request),
        (ANNOTATION_CPU_LIMIT, &mut resources.cpu_limit),
        (ANNOTATION_MEMORY_REQUEST, &mut resources.memory_request),
        (ANNOTATION_MEMORY_LIMIT, &mut resources.memory_limit),
    ] {
        if let Some(value) = pod.annotation(annotation) {
            // Checked here because the API server's own error would point at a container the
            // user never wrote.
            if !is_quantity(value) {
                return Err(Refusal::NotAQuantity { annotation, value: value.into() });
            }
            *slot = Some(value.to_string());
        }
    }
    Ok(resources)
}

/// Every operation of the injection, in the order the API server applies them.
fn injection_patch(pod: &Pod<'_>, request: &SidecarRequest<'_>, settings: &InjectSettings) -> Vec<Value> {
    let sidecar = sidecar_container(settings, request);
    let mut ops = Vec::new();
    // First in initContainers: native sidecars start in order, so placing it first lets the
    // pod's other init containers already use NATS through it.
    match pod.init_containers() {
        Some(ic) if !ic.is_empty() => ops.push(op_add("/spec/initContainers/0", sidecar)),
        _ => ops.push(op_add("/spec/initContainers", Value::Array(vec![sidecar]))),
    }

    // No subPath: a subPath mount never sees ConfigMap updates, and the sidecar hot-reloads.
    // Every key is mounted, not only routes.toml: the contracts its `schema` lines name
    // (the chart's `routes[].files`) sit beside it, so the sidecar checks them in the pod.
    let volume = json!({
        "name": ROUTES_VOLUME,
        "configMap": { "name": request.routes_config_map }
    });
    let mut volumes = vec![volume];
    if let Some(ca) = &settings.nats_ca {
        // Optional: a namespace without the CA still gets its pods started (the sidecar
        // reports NATS down), rather than pods stuck in ContainerCreating.
        volumes.push(json!({
            "name": NATS_CA_VOLUME,
            "configMap": { "name": ca.name, "items": [{ "key": ca.key, "path": "ca.crt" }], "optional": true }
        }));
    }
    match pod.object.spec.as_ref().and_then(|s| s.volumes.as_ref()) {
        Some(_) => ops.extend(volumes.into_iter().map(|v| op_add("/spec/volumes/-", v))),
        None => ops.push(op_add("/spec/volumes", Value::Array(volumes))),
    }

    let (http, https) = (pod.annotation(ANNOTATION_HTTP_PROXY) == Some("true"), pod.annotation(ANNOTATION_HTTPS_PROXY) == Some("true"));
    if http || https {
        ops.extend(proxy_env_ops(pod, settings, http, https));
    }
    ops.extend(marker_ops(pod, settings));
    ops
}

/// `HTTP_PROXY` (when `http`), `HTTPS_PROXY` (when `https`) and `NO_PROXY`, in both cases,
/// on every app container that does not set them itself.
fn proxy_env_ops(pod: &Pod<'_>, settings: &InjectSettings, http: bool, https: bool) -> Vec<Value> {
    let proxy = format!("http://127.0.0.1:{}", settings.egress_port);
    let no_proxy = no_proxy_list(settings).join(",");
    // Lower-case too: curl and many libraries read only http_proxy (httpoxy hardening).
    let mut vars = vec![("NO_PROXY", &no_proxy), ("no_proxy", &no_proxy)];
    if http {
        vars.extend([("HTTP_PROXY", &proxy), ("http_proxy", &proxy)]);
    }
    if https {
        // The proxy URL stays http://: the app speaks TLS inside the CONNECT tunnel.
        vars.extend([("HTTPS_PROXY", &proxy), ("https_proxy", &proxy)]);
    }
    let mut ops = Vec::new();
    for (i, c) in pod.containers.iter().enumerate() {
        let existing: Vec<&str> = c.env.iter().flatten().filter_map(|e| e.name.as_deref()).collect();
        // A value the workload sets itself wins: it knows its exceptions better than we do.
        let add: Vec<Value> = vars.iter().filter(|(n, _)| !existing.contains(n)).map(|(n, v)| json!({ "name": n, "value": v })).collect();
        if add.is_empty() {
            continue;
        }
        if c.env.is_some() {
            for e in add {
                ops.push(op_add(&format!("/spec/containers/{i}/env/-"), e));
            }
        } else {
            ops.push(op_add(&format!("/spec/containers/{i}/env"), Value::Array(add)));
        }
    }
    ops
}

/// The status annotation, the scrape annotations when the app has none, and the label.
fn marker_ops(pod: &Pod<'_>, settings: &InjectSettings) -> Vec<Value> {
    let mut new_annotations = vec![(ANNOTATION_STATUS, "injected".to_string())];
    // The app may already be scraped through these; taking them over would silently drop its
    // metrics, so only fill them in when absent (the PodMonitor finds the sidecar by port name).
    if pod.annotation("prometheus.io/scrape").is_none() && pod.annotation("prometheus.io/port").is_none() {
        new_annotations.push(("prometheus.io/scrape", "true".into()));
        new_annotations.push(("prometheus.io/port", settings.admin_port.to_string()));
        new_annotations.push(("prometheus.io/path", "/metrics".into()));
    }
    // The opt-in annotation itself guarantees the map exists, so each key is added on its own.
    let mut ops: Vec<Value> = new_annotations
        .into_iter()
        .map(|(k, v)| op_add(&format!("/metadata/annotations/{}", escape_pointer(k)), Value::String(v)))
        .collect();
    match &pod.object.metadata.labels {
        Some(_) => ops.push(op_add(&format!("/metadata/labels/{}", escape_pointer(LABEL_INJECTED)), Value::String("true".into()))),
        None => ops.push(op_add("/metadata/labels", json!({ LABEL_INJECTED: "true" }))),
    }
    ops
}

/// The sidecar's container: a native sidecar with the routes mounted and probes on the admin port.
fn sidecar_container(settings: &InjectSettings, request: &SidecarRequest<'_>) -> Value {
    let env = sidecar_env(settings, request);
    let res = resource_requirements(&request.resources);
    let log_level = request.log_level;
    let probe = |path: &str, period: u32, failures: u32| {
        json!({
            "httpGet": { "path": path, "port": ADMIN_PORT_NAME },
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": 2
        })
    };
    json!({
        "name": SIDECAR_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        // Native sidecar (Kubernetes >= 1.29): runs for the pod's lifetime, started before and
        // stopped after the app containers, so no request is lost at either end.
        "restartPolicy": "Always",
        "args": [
            "run",
            "--config", format!("{ROUTES_DIR}/routes.toml"),
            "--log-format", settings.log_format,
            "--log-level", log_level
        ],
        "env": env,
        "ports": [{ "name": ADMIN_PORT_NAME, "containerPort": settings.admin_port, "protocol": "TCP" }],
        // The kubelet starts the app only once a native sidecar's startupProbe passes, so the
        // egress listener is bound before the app's first outgoing call. It probes /healthz, not
        // /readyz, so a NATS outage does not keep the app from starting at all.
        "startupProbe": probe("/healthz", 1, 60),
        // The pod's Ready condition follows this probe, so /readyz means "can serve" and
        // stays 200 through NATS outages (tests/readiness.rs holds it to that).
        "readinessProbe": probe("/readyz", 5, 3),
        "livenessProbe": probe("/healthz", 10, 3),
        "resources": res,
        "volumeMounts": volume_mounts(settings),
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_user,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": { "drop": ["ALL"] },
            "seccompProfile": { "type": "RuntimeDefault" }
        }
    })
}

fn volume_mounts(settings: &InjectSettings) -> Vec<Value> {
    let mut mounts = vec![json!({ "name": ROUTES_VOLUME, "mountPath": ROUTES_DIR, "readOnly": true })];
    if settings.nats_ca.is_some() {
        mounts.push(json!({ "name": NATS_CA_VOLUME, "mountPath": NATS_CA_DIR, "readOnly": true }));
    }
    mounts
}

fn sidecar_env(settings: &InjectSettings, request: &SidecarRequest<'_>) -> Vec<Value> {
    let mut env = vec![
        json!({ "name": "NATSBRIDGE_LISTEN", "value": format!("127.0.0.1:{}", settings.egress_port) }),
        json!({ "name": "NATSBRIDGE_ADMIN_LISTEN", "value": format!("0.0.0.0:{}", settings.admin_port) }),
    ];
    env.push(match &request.nats_url_secret {
        // Optional: a missing Secret must not keep the pod (app included: the sidecar is an
        // init container) from starting. The sidecar then falls back to routes.toml's
        // servers, NATS routes fail loudly, and plain HTTP keeps working.
        Some(r) => {
            json!({ "name": "NATSBRIDGE_NATS_URL", "valueFrom": { "secretKeyRef": { "name": r.name, "key": r.key, "optional": true } } })
        }
        None => json!({ "name": "NATSBRIDGE_NATS_URL", "value": settings.nats_url }),
    });
    if let Some(port) = request.app_port {
        env.push(json!({ "name": "NATSBRIDGE_APP_URL", "value": format!("http://127.0.0.1:{port}") }));
    }
    if settings.nats_ca.is_some() {
        env.push(json!({ "name": "NATSBRIDGE_NATS_CA_FILE", "value": format!("{NATS_CA_DIR}/ca.crt") }));
    }
    env
}

/// The container's `resources`: `requests` and `limits`, each only when something is set.
fn resource_requirements(resources: &Resources) -> Map<String, Value> {
    let quantities = |cpu: &Option<String>, memory: &Option<String>| -> Map<String, Value> {
        [("cpu", cpu), ("memory", memory)]
            .into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), Value::String(v.clone()))))
            .collect()
    };
    let requests = quantities(&resources.cpu_request, &resources.memory_request);
    let limits = quantities(&resources.cpu_limit, &resources.memory_limit);
    let mut res = Map::new();
    if !requests.is_empty() {
        res.insert("requests".into(), Value::Object(requests));
    }
    if !limits.is_empty() {
        res.insert("limits".into(), Value::Object(limits));
    }
    res
}

/// The `NO_PROXY` entries for an http-proxy pod.
///
/// Loopback must bypass the proxy (the app talking to the sidecar, or to itself, must not loop),
/// and so must the NATS servers and the Kubernetes API, which are not HTTP routes. Cluster
/// service names (`.svc`, `.cluster.local`) are deliberately *not* listed: calls to other
/// services are exactly the traffic the egress route table is there to move onto NATS.
pub fn no_proxy_list(settings: &InjectSettings) -> Vec<String> {
    let mut out: Vec<String> = ["localhost", "127.0.0.1", "::1"].iter().map(|s| s.to_string()).collect();
    for host in nats_hosts(&settings.nats_url) {
        if !out.contains(&host) {
            out.push(host);
        }
    }
    for s in ["kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"] {
        out.push(s.into());
    }
    for s in &settings.extra_no_proxy {
        if !out.contains(s) {
            out.push(s.clone());
        }
    }
    out
}

/// Host names in a (comma-separated) NATS URL list, without scheme, credentials or port.
pub fn nats_hosts(urls: &str) -> Vec<String> {
    urls.split(',')
        .filter_map(|u| {
            let u = u.trim();
            let rest = u.split_once("://").map_or(u, |(_, r)| r);
            let rest = rest.split(['/', '?']).next().unwrap_or(rest);
            let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            let host = if let Some(v6) = rest.strip_prefix('[') {
                v6.split(']').next().unwrap_or(v6)
            } else {
                rest.split(':').next().unwrap_or(rest)
            };
            (!host.is_empty()).then(|| host.to_string())
        })
        .collect()
}

fn op_add(path: &str, value: Value) -> Value {
    json!({ "op": "add", "path": path, "value": value })
}

/// Escapes one JSON Pointer reference token (RFC 6901): `~` → `~0`, `/` → `~1`.
pub fn escape_pointer(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The refusal texts are what users read in `kubectl apply` errors; pin them word for word.
    #[test]
    fn refusal_messages_name_the_annotation_and_the_value() {
        let cases = [
            (
                Refusal::NoRoutesConfigMap,
                "natsbridge.io/inject=true needs natsbridge.io/routes: the name of a ConfigMap with key routes.toml",
            ),
            (Refusal::BadRoutesConfigMap("Bad_Name".into()), "natsbridge.io/routes=\"Bad_Name\" is not a valid ConfigMap name"),
            (Refusal::BadAppPort("0".into()), "natsbridge.io/app-port=\"0\" is not a port number"),
            (
                Refusal::AppPortCollides { port: 4280, egress: 4280, admin: 9464 },
                "app port 4280 collides with the sidecar's ports (4280 egress, 9464 admin) in the pod's shared network namespace",
            ),
            (
                Refusal::NotAQuantity { annotation: ANNOTATION_CPU_LIMIT, value: "lots".into() },
                "natsbridge.io/cpu-limit=\"lots\" is not a Kubernetes quantity",
            ),
            (Refusal::BadNatsUrlSecret("/".into()), "natsbridge.io/nats-url-secret=\"/\" is not name or name/key"),
        ];
        for (refusal, message) in cases {
            assert_eq!(refusal.to_string(), message);
        }
    }

    #[test]
    fn malformed_review_errors_keep_their_wording() {
        assert_eq!(InjectError::BadReview(ReviewDefect::NoUid).to_string(), "malformed AdmissionReview: request.uid missing");
        let setting = InjectError::Setting { name: "--cpu-limit", defect: crate::inject::SettingDefect::NotAQuantity("x".into()) };
        assert_eq!(setting.to_string(), "invalid injector setting --cpu-limit: \"x\" is not a Kubernetes quantity");
    }
}
