//! The Kubernetes sidecar injector: a MutatingAdmissionWebhook that adds natsbridge to opted-in pods.
//!
//! The decision and the patch are a pure function ([`mutate`]: AdmissionReview in, AdmissionReview
//! out), so every injection rule is tested without a cluster. [`serve`] is the thin TLS + HTTP/1
//! shell the API server talks to, and [`run`] loads the certificate for it.
//!
//! What an opted-in pod (`natsbridge.io/inject: "true"`) gets:
//! - the sidecar as a *native* sidecar (an initContainer with `restartPolicy: Always`), so it is up
//!   before the app starts and is stopped only after the app has exited;
//! - the routes ConfigMap named by `natsbridge.io/routes`, mounted at `/etc/natsbridge`;
//! - `NATSBRIDGE_APP_URL` from `natsbridge.io/app-port` (or the first declared containerPort);
//! - probes on the admin port, resources from `natsbridge.io/{cpu,memory}-{request,limit}` with
//!   defaults from [`InjectSettings`], and Prometheus scrape annotations;
//! - with `natsbridge.io/http-proxy: "true"`, `HTTP_PROXY`/`NO_PROXY` on every app container.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;

/// Annotation that opts a pod in (`"true"`); anything else leaves the pod alone.
pub const ANNOTATION_INJECT: &str = "natsbridge.io/inject";
/// Annotation naming the ConfigMap (key `routes.toml`) in the pod's namespace.
pub const ANNOTATION_ROUTES: &str = "natsbridge.io/routes";
/// Annotation with the port the app listens on, for ingress deliveries.
pub const ANNOTATION_APP_PORT: &str = "natsbridge.io/app-port";
/// Annotation that points the app's outgoing HTTP at the sidecar's egress listener.
pub const ANNOTATION_HTTP_PROXY: &str = "natsbridge.io/http-proxy";
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
/// Name of the admin port on the sidecar; the PodMonitor selects it by this name.
pub const ADMIN_PORT_NAME: &str = "nb-admin";
/// Label put on injected pods (`"true"`): annotations cannot be selected on, and the chart's
/// PodMonitor needs a label selector to find every sidecar.
pub const LABEL_INJECTED: &str = "natsbridge.io/injected";

/// AdmissionReview bodies are whole pod specs; etcd caps objects at ~1.5 MiB, so 4 MiB is ample.
const MAX_BODY: usize = 4 * 1024 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The API server gives up on a webhook after at most 30 s, so in-flight reviews older than that
/// are worthless; don't hold shutdown longer.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the injector library.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// The request body was not an AdmissionReview with a `request`.
    #[error("malformed AdmissionReview: {0}")]
    BadReview(String),
    /// A setting (flag value) is invalid.
    #[error("invalid injector setting {name}: {reason}")]
    Setting { name: &'static str, reason: String },
    /// Reading the certificate or key failed.
    #[error("reading {path}: {source}")]
    ReadTls {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The certificate or key PEM could not be used.
    #[error("TLS material in {path}: {reason}")]
    BadTls { path: PathBuf, reason: String },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// Accepting on the listener failed.
    #[error("accepting connections: {0}")]
    Accept(#[source] std::io::Error),
}

/// Resource requests/limits for the sidecar, as Kubernetes quantities; `None` means unset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_request: Option<String>,
    pub memory_limit: Option<String>,
}

/// A reference to one key of a Secret in the pod's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
}

impl SecretKeyRef {
    /// Parses `name` or `name/key`; the key defaults to `url`.
    pub fn parse(s: &str) -> Option<Self> {
        let (name, key) = match s.split_once('/') {
            Some((n, k)) => (n.trim(), k.trim()),
            None => (s.trim(), "url"),
        };
        (!name.is_empty() && !key.is_empty()).then(|| Self { name: name.into(), key: key.into() })
    }
}

/// Everything the injector needs to build a sidecar; the cluster-wide defaults.
#[derive(Debug, Clone)]
pub struct InjectSettings {
    pub image: String,
    pub image_pull_policy: String,
    /// NATS URL(s) given to sidecars (comma-separated servers allowed).
    pub nats_url: String,
    /// When set, sidecars read the NATS URL from this Secret instead of `nats_url`.
    pub nats_url_secret: Option<SecretKeyRef>,
    pub resources: Resources,
    pub egress_port: u16,
    pub admin_port: u16,
    pub log_format: String,
    pub log_level: String,
    /// UID the sidecar runs as; matches the image's numeric non-root user.
    pub run_as_user: i64,
    /// Extra `NO_PROXY` entries (e.g. the API server's ClusterIP, which only the cluster knows).
    pub extra_no_proxy: Vec<String>,
}

impl Default for InjectSettings {
    fn default() -> Self {
        Self {
            image: "natsbridge:latest".into(),
            image_pull_policy: "IfNotPresent".into(),
            nats_url: "nats://nats:4222".into(),
            nats_url_secret: None,
            resources: Resources {
                cpu_request: Some("50m".into()),
                cpu_limit: None,
                memory_request: Some("64Mi".into()),
                memory_limit: Some("256Mi".into()),
            },
            egress_port: 4280,
            admin_port: 9464,
            log_format: "json".into(),
            log_level: "info".into(),
            run_as_user: 65532,
            extra_no_proxy: Vec::new(),
        }
    }
}

/// Command-line flags of `natsbridge inject`.
#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// Address the webhook listens on (HTTPS).
    #[arg(long = "listen", env = "NATSBRIDGE_INJECT_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// PEM certificate chain served to the API server; re-read when the file changes.
    #[arg(long, env = "NATSBRIDGE_INJECT_TLS_CERT", default_value = "/etc/natsbridge-inject/tls/tls.crt")]
    pub tls_cert: PathBuf,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "NATSBRIDGE_INJECT_TLS_KEY", default_value = "/etc/natsbridge-inject/tls/tls.key")]
    pub tls_key: PathBuf,
    /// Image of the injected sidecar.
    #[arg(long, env = "NATSBRIDGE_INJECT_SIDECAR_IMAGE")]
    pub sidecar_image: String,
    /// imagePullPolicy of the injected sidecar.
    #[arg(long, env = "NATSBRIDGE_INJECT_SIDECAR_PULL_POLICY", default_value = "IfNotPresent")]
    pub sidecar_image_pull_policy: String,
    /// NATS URL given to sidecars (comma-separated for several servers).
    #[arg(long, env = "NATSBRIDGE_INJECT_NATS_URL")]
    pub nats_url: String,
    /// Secret (`name` or `name/key`, key defaults to `url`) in each pod's namespace holding the NATS
    /// URL with credentials; overrides --nats-url for sidecars.
    #[arg(long, env = "NATSBRIDGE_INJECT_NATS_URL_SECRET")]
    pub nats_url_secret: Option<String>,
    /// Default sidecar CPU request (empty = unset).
    #[arg(long, env = "NATSBRIDGE_INJECT_CPU_REQUEST", default_value = "50m")]
    pub cpu_request: String,
    /// Default sidecar CPU limit (empty = unset).
    #[arg(long, env = "NATSBRIDGE_INJECT_CPU_LIMIT", default_value = "")]
    pub cpu_limit: String,
    /// Default sidecar memory request (empty = unset).
    #[arg(long, env = "NATSBRIDGE_INJECT_MEMORY_REQUEST", default_value = "64Mi")]
    pub memory_request: String,
    /// Default sidecar memory limit (empty = unset).
    #[arg(long, env = "NATSBRIDGE_INJECT_MEMORY_LIMIT", default_value = "256Mi")]
    pub memory_limit: String,
    /// Sidecar egress port (loopback).
    #[arg(long, env = "NATSBRIDGE_INJECT_EGRESS_PORT", default_value_t = 4280)]
    pub egress_port: u16,
    /// Sidecar admin port (/healthz, /readyz, /metrics).
    #[arg(long, env = "NATSBRIDGE_INJECT_ADMIN_PORT", default_value_t = 9464)]
    pub admin_port: u16,
    /// Sidecar log format.
    #[arg(long, env = "NATSBRIDGE_INJECT_SIDECAR_LOG_FORMAT", default_value = "json")]
    pub sidecar_log_format: String,
    /// Default sidecar log level (per pod: annotation natsbridge.io/log-level).
    #[arg(long, env = "NATSBRIDGE_INJECT_SIDECAR_LOG_LEVEL", default_value = "info")]
    pub sidecar_log_level: String,
    /// UID the sidecar runs as.
    #[arg(long, env = "NATSBRIDGE_INJECT_RUN_AS_USER", default_value_t = 65532)]
    pub sidecar_run_as_user: i64,
    /// Extra NO_PROXY entries for http-proxy pods, comma-separated (e.g. the API server IP).
    #[arg(long, env = "NATSBRIDGE_INJECT_NO_PROXY", value_delimiter = ',')]
    pub no_proxy: Vec<String>,
}

impl InjectArgs {
    /// Validates the flags into settings.
    pub fn settings(&self) -> Result<InjectSettings, InjectError> {
        let opt = |name: &'static str, v: &str| -> Result<Option<String>, InjectError> {
            let v = v.trim();
            if v.is_empty() {
                return Ok(None);
            }
            if !is_quantity(v) {
                return Err(InjectError::Setting { name, reason: format!("{v:?} is not a Kubernetes quantity") });
            }
            Ok(Some(v.to_string()))
        };
        if self.sidecar_image.trim().is_empty() {
            return Err(InjectError::Setting { name: "--sidecar-image", reason: "must not be empty".into() });
        }
        if self.nats_url.trim().is_empty() {
            return Err(InjectError::Setting { name: "--nats-url", reason: "must not be empty".into() });
        }
        let nats_url_secret = match self.nats_url_secret.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => Some(
                SecretKeyRef::parse(s)
                    .ok_or_else(|| InjectError::Setting { name: "--nats-url-secret", reason: format!("{s:?} is not name or name/key") })?,
            ),
        };
        if self.egress_port == self.admin_port {
            return Err(InjectError::Setting { name: "--admin-port", reason: "must differ from --egress-port".into() });
        }
        Ok(InjectSettings {
            image: self.sidecar_image.trim().into(),
            image_pull_policy: self.sidecar_image_pull_policy.clone(),
            nats_url: self.nats_url.trim().into(),
            nats_url_secret,
            resources: Resources {
                cpu_request: opt("--cpu-request", &self.cpu_request)?,
                cpu_limit: opt("--cpu-limit", &self.cpu_limit)?,
                memory_request: opt("--memory-request", &self.memory_request)?,
                memory_limit: opt("--memory-limit", &self.memory_limit)?,
            },
            egress_port: self.egress_port,
            admin_port: self.admin_port,
            log_format: self.sidecar_log_format.clone(),
            log_level: self.sidecar_log_level.clone(),
            run_as_user: self.sidecar_run_as_user,
            extra_no_proxy: self.no_proxy.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The pure part.

/// What the injector decided for one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Leave the pod as it is, with the reason (for logs).
    Skip(&'static str),
    /// Apply these RFC 6902 operations.
    Patch(Vec<Value>),
    /// Refuse the pod: its annotations ask for injection but are unusable. Refusing at admission
    /// shows the mistake to whoever applied the manifest, instead of a crash-looping sidecar.
    Deny(String),
}

/// Turns an AdmissionReview (admission.k8s.io/v1) into the AdmissionReview response.
///
/// Only a body without `request.uid` is an error; everything about the pod is answered inside
/// the response (allowed, allowed with a patch, or denied).
pub fn mutate(review: &Value, settings: &InjectSettings) -> Result<Value, InjectError> {
    let request = review.get("request").and_then(Value::as_object).ok_or_else(|| InjectError::BadReview("no request".into()))?;
    let uid = request.get("uid").and_then(Value::as_str).ok_or_else(|| InjectError::BadReview("request.uid missing".into()))?;
    let api_version = review.get("apiVersion").and_then(Value::as_str).unwrap_or("admission.k8s.io/v1");

    let is_pod = request.get("kind").and_then(|k| k.get("kind")).and_then(Value::as_str) == Some("Pod")
        || request.get("resource").and_then(|r| r.get("resource")).and_then(Value::as_str) == Some("pods");
    let is_create = request.get("operation").and_then(Value::as_str).is_none_or(|op| op == "CREATE");
    let decision = match request.get("object") {
        _ if !is_pod => Decision::Skip("not a pod"),
        _ if !is_create => Decision::Skip("not a CREATE"),
        Some(pod) if pod.is_object() => decide(pod, settings),
        _ => return Err(InjectError::BadReview("request.object is not a pod".into())),
    };

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
        Decision::Deny(message) => {
            response.insert("allowed".into(), Value::Bool(false));
            response.insert("status".into(), json!({ "code": 400, "reason": "BadRequest", "message": message }));
        }
    }
    Ok(json!({ "apiVersion": api_version, "kind": "AdmissionReview", "response": response }))
}

/// Decides what to do with one pod object and builds the patch.
pub fn decide(pod: &Value, settings: &InjectSettings) -> Decision {
    let annotations = pod.pointer("/metadata/annotations").and_then(Value::as_object);
    let ann = |k: &str| annotations.and_then(|a| a.get(k)).and_then(Value::as_str).map(str::trim);

    if ann(ANNOTATION_INJECT) != Some("true") {
        return Decision::Skip("not opted in");
    }
    if ann(ANNOTATION_STATUS) == Some("injected") {
        return Decision::Skip("already injected");
    }
    let spec = pod.get("spec").and_then(Value::as_object);
    let containers: &[Value] = spec.and_then(|s| s.get("containers")).and_then(Value::as_array).map_or(&[], |v| v);
    let init_containers: Option<&Vec<Value>> = spec.and_then(|s| s.get("initContainers")).and_then(Value::as_array);
    let named = |c: &Value| c.get("name").and_then(Value::as_str) == Some(SIDECAR_NAME);
    if containers.iter().any(named) || init_containers.is_some_and(|ic| ic.iter().any(named)) {
        return Decision::Skip("sidecar container already present");
    }

    let Some(routes) = ann(ANNOTATION_ROUTES).filter(|r| !r.is_empty()) else {
        return Decision::Deny(format!("{ANNOTATION_INJECT}=true needs {ANNOTATION_ROUTES}: the name of a ConfigMap with key routes.toml"));
    };
    if !is_dns_subdomain(routes) {
        return Decision::Deny(format!("{ANNOTATION_ROUTES}={routes:?} is not a valid ConfigMap name"));
    }

    let app_port = match ann(ANNOTATION_APP_PORT) {
        Some(p) => match p.parse::<u16>() {
            Ok(port) if port != 0 => Some(port),
            _ => return Decision::Deny(format!("{ANNOTATION_APP_PORT}={p:?} is not a port number")),
        },
        // An egress-only app declares no port; then the sidecar simply has no app to deliver to.
        None => containers
            .first()
            .and_then(|c| c.get("ports"))
            .and_then(Value::as_array)
            .and_then(|ps| ps.first())
            .and_then(|p| p.get("containerPort"))
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok()),
    };
    if let Some(port) = app_port {
        if port == settings.admin_port || port == settings.egress_port {
            return Decision::Deny(format!(
                "app port {port} collides with the sidecar's ports ({} egress, {} admin) in the pod's shared network namespace",
                settings.egress_port, settings.admin_port
            ));
        }
    }

    let mut resources = settings.resources.clone();
    for (key, slot) in [
        (ANNOTATION_CPU_REQUEST, &mut resources.cpu_request),
        (ANNOTATION_CPU_LIMIT, &mut resources.cpu_limit),
        (ANNOTATION_MEMORY_REQUEST, &mut resources.memory_request),
        (ANNOTATION_MEMORY_LIMIT, &mut resources.memory_limit),
    ] {
        if let Some(v) = ann(key) {
            // Checked here because the API server's own error would point at a container the
            // user never wrote.
            if !is_quantity(v) {
                return Decision::Deny(format!("{key}={v:?} is not a Kubernetes quantity"));
            }
            *slot = Some(v.to_string());
        }
    }

    let nats_secret = match ann(ANNOTATION_NATS_URL_SECRET) {
        Some(s) => match SecretKeyRef::parse(s) {
            Some(r) => Some(r),
            None => return Decision::Deny(format!("{ANNOTATION_NATS_URL_SECRET}={s:?} is not name or name/key")),
        },
        None => settings.nats_url_secret.clone(),
    };
    let log_level = ann(ANNOTATION_LOG_LEVEL).unwrap_or(&settings.log_level);

    let sidecar = sidecar_container(settings, app_port, &resources, nats_secret.as_ref(), log_level);

    let mut ops = Vec::new();
    // First in initContainers: native sidecars start in order, so placing it first lets the
    // pod's other init containers already use NATS through it.
    match init_containers {
        Some(ic) if !ic.is_empty() => ops.push(op_add("/spec/initContainers/0", sidecar)),
        _ => ops.push(op_add("/spec/initContainers", Value::Array(vec![sidecar]))),
    }

    // No subPath: a subPath mount never sees ConfigMap updates, and the sidecar hot-reloads.
    let volume = json!({
        "name": ROUTES_VOLUME,
        "configMap": { "name": routes, "items": [{ "key": "routes.toml", "path": "routes.toml" }] }
    });
    match spec.and_then(|s| s.get("volumes")).and_then(Value::as_array) {
        Some(_) => ops.push(op_add("/spec/volumes/-", volume)),
        None => ops.push(op_add("/spec/volumes", Value::Array(vec![volume]))),
    }

    if ann(ANNOTATION_HTTP_PROXY) == Some("true") {
        let proxy = format!("http://127.0.0.1:{}", settings.egress_port);
        let no_proxy = no_proxy_list(settings).join(",");
        // Lower-case too: curl and many libraries read only http_proxy (httpoxy hardening).
        let vars = [("HTTP_PROXY", &proxy), ("http_proxy", &proxy), ("NO_PROXY", &no_proxy), ("no_proxy", &no_proxy)];
        for (i, c) in containers.iter().enumerate() {
            let existing: Vec<&str> = c
                .get("env")
                .and_then(Value::as_array)
                .map(|env| env.iter().filter_map(|e| e.get("name").and_then(Value::as_str)).collect())
                .unwrap_or_default();
            // A value the workload sets itself wins: it knows its exceptions better than we do.
            let add: Vec<Value> =
                vars.iter().filter(|(n, _)| !existing.contains(n)).map(|(n, v)| json!({ "name": n, "value": v })).collect();
            if add.is_empty() {
                continue;
            }
            if c.get("env").and_then(Value::as_array).is_some() {
                for e in add {
                    ops.push(op_add(&format!("/spec/containers/{i}/env/-"), e));
                }
            } else {
                ops.push(op_add(&format!("/spec/containers/{i}/env"), Value::Array(add)));
            }
        }
    }

    let mut new_annotations = vec![(ANNOTATION_STATUS, "injected".to_string())];
    // The app may already be scraped through these; taking them over would silently drop its
    // metrics, so only fill them in when absent (the PodMonitor finds the sidecar by port name).
    if ann("prometheus.io/scrape").is_none() && ann("prometheus.io/port").is_none() {
        new_annotations.push(("prometheus.io/scrape", "true".into()));
        new_annotations.push(("prometheus.io/port", settings.admin_port.to_string()));
        new_annotations.push(("prometheus.io/path", "/metrics".into()));
    }
    // The opt-in annotation itself guarantees the map exists, so each key is added on its own.
    for (k, v) in new_annotations {
        ops.push(op_add(&format!("/metadata/annotations/{}", escape_pointer(k)), Value::String(v)));
    }
    match pod.pointer("/metadata/labels").and_then(Value::as_object) {
        Some(_) => ops.push(op_add(&format!("/metadata/labels/{}", escape_pointer(LABEL_INJECTED)), Value::String("true".into()))),
        None => ops.push(op_add("/metadata/labels", json!({ LABEL_INJECTED: "true" }))),
    }
    Decision::Patch(ops)
}

fn sidecar_container(
    settings: &InjectSettings,
    app_port: Option<u16>,
    resources: &Resources,
    nats_secret: Option<&SecretKeyRef>,
    log_level: &str,
) -> Value {
    let mut env = vec![
        json!({ "name": "NATSBRIDGE_LISTEN", "value": format!("127.0.0.1:{}", settings.egress_port) }),
        json!({ "name": "NATSBRIDGE_ADMIN_LISTEN", "value": format!("0.0.0.0:{}", settings.admin_port) }),
    ];
    env.push(match nats_secret {
        Some(r) => json!({ "name": "NATSBRIDGE_NATS_URL", "valueFrom": { "secretKeyRef": { "name": r.name, "key": r.key } } }),
        None => json!({ "name": "NATSBRIDGE_NATS_URL", "value": settings.nats_url }),
    });
    if let Some(port) = app_port {
        env.push(json!({ "name": "NATSBRIDGE_APP_URL", "value": format!("http://127.0.0.1:{port}") }));
    }

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
        "readinessProbe": probe("/readyz", 5, 3),
        "livenessProbe": probe("/healthz", 10, 3),
        "resources": res,
        "volumeMounts": [{ "name": ROUTES_VOLUME, "mountPath": ROUTES_DIR, "readOnly": true }],
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

/// A Kubernetes resource quantity: a signed decimal with an optional SI, binary or exponent
/// suffix (`100m`, `1.5`, `64Mi`, `1e3`).
pub fn is_quantity(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let num_end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, suffix) = s.split_at(num_end);
    let digits = num.chars().filter(char::is_ascii_digit).count();
    if digits == 0 || num.matches('.').count() > 1 {
        return false;
    }
    match suffix {
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => true,
        e => {
            let Some(exp) = e.strip_prefix(['e', 'E']) else {
                return false;
            };
            let exp = exp.strip_prefix(['+', '-']).unwrap_or(exp);
            !exp.is_empty() && exp.chars().all(|c| c.is_ascii_digit())
        }
    }
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

// ---------------------------------------------------------------------------------------------
// The TLS + HTTP shell.

/// Serves `POST /mutate` and `GET /healthz` over TLS until `shutdown` resolves, then stops
/// accepting and lets in-flight reviews finish (bounded by 30 s).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    settings: InjectSettings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), InjectError> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let settings = Arc::new(settings);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);

    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            // Reap finished connections so the set does not grow without bound.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) if is_transient_accept_error(&e) => {
                    tracing::warn!(error = %e, "inject: accept failed, continuing");
                    continue;
                }
                Err(e) => return Err(InjectError::Accept(e)),
            },
        };
        let acceptor = acceptor.clone();
        let settings = settings.clone();
        let mut stop_rx = stop_rx.clone();
        conns.spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "inject: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "inject: TLS handshake timed out");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |req| {
                let settings = settings.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(req, &settings).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service);
            tokio::pin!(conn);
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        tracing::debug!(%peer, error = %e, "inject: connection ended with an error");
                    }
                }
                // The watch guard is not Send, so drop it inside the branch future.
                () = async { let _ = stop_rx.wait_for(|stop| *stop).await; } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }

    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!("inject: connections still open after the drain timeout; dropping them");
        conns.abort_all();
    }
    Ok(())
}

fn is_transient_accept_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    // Per-connection failures and fd exhaustion pass; the listener itself is still fine.
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | TimedOut)
        || e.raw_os_error().is_some_and(|c| c == 24 || c == 23) // EMFILE, ENFILE
}

async fn handle(req: Request<hyper::body::Incoming>, settings: &InjectSettings) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::POST, "/mutate") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return text(StatusCode::PAYLOAD_TOO_LARGE, &format!("reading body: {e}\n")),
            };
            let review: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return text(StatusCode::BAD_REQUEST, &format!("body is not JSON: {e}\n")),
            };
            match mutate(&review, settings) {
                Ok(resp) => {
                    log_outcome(&review, &resp);
                    let body = serde_json::to_vec(&resp).expect("JSON values serialize");
                    Response::builder()
                        .status(StatusCode::OK)
                        .header(http::header::CONTENT_TYPE, "application/json")
                        .body(Full::new(Bytes::from(body)))
                        .expect("static response parts are valid")
                }
                Err(e) => text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
            }
        }
        (_, "/mutate" | "/healthz") => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn log_outcome(review: &Value, resp: &Value) {
    let req = &review["request"];
    let ns = req["namespace"].as_str().unwrap_or("");
    let obj = &req["object"]["metadata"];
    let name = obj["name"].as_str().or_else(|| obj["generateName"].as_str()).unwrap_or("");
    let r = &resp["response"];
    if r["allowed"] == Value::Bool(false) {
        tracing::info!(namespace = ns, pod = name, reason = r["status"]["message"].as_str().unwrap_or(""), "inject: denied");
    } else if r.get("patch").is_some() {
        tracing::info!(namespace = ns, pod = name, "inject: sidecar injected");
    } else {
        tracing::debug!(namespace = ns, pod = name, "inject: left untouched");
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts are valid")
}

// ---------------------------------------------------------------------------------------------
// Certificates.

/// Loads a PEM chain and key into a [`CertifiedKey`] signed with ring (the provider async-nats
/// already links, so the binary carries one TLS crypto library).
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, InjectError> {
    let cert_pem = std::fs::read(cert).map_err(|source| InjectError::ReadTls { path: cert.into(), source })?;
    let key_pem = std::fs::read(key).map_err(|source| InjectError::ReadTls { path: key.into(), source })?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| InjectError::BadTls { path: cert.into(), reason: e.to_string() })?;
    if chain.is_empty() {
        return Err(InjectError::BadTls { path: cert.into(), reason: "no CERTIFICATE block".into() });
    }
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| InjectError::BadTls { path: key.into(), reason: e.to_string() })?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| InjectError::BadTls { path: key.into(), reason: e.to_string() })?;
    Ok(CertifiedKey::new(chain, signer))
}

/// Serves the certificate from files and re-reads them when their mtime changes: cert-manager
/// rotates the Secret in place and the kubelet swaps the mounted files, and a webhook still
/// presenting the old certificate would fail every admission once it expires.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<(Option<SystemTime>, Arc<CertifiedKey>)>,
}

impl ReloadingCert {
    /// Loads the files once; a failure here is fatal, later failures keep the last good pair.
    pub fn new(cert: PathBuf, key: PathBuf) -> Result<Self, InjectError> {
        let loaded = Arc::new(load_certified_key(&cert, &key)?);
        let stamp = Self::stamp(&cert, &key);
        Ok(Self { cert, key, state: Mutex::new((stamp, loaded)) })
    }

    fn stamp(cert: &Path, key: &Path) -> Option<SystemTime> {
        let c = std::fs::metadata(cert).and_then(|m| m.modified()).ok()?;
        let k = std::fs::metadata(key).and_then(|m| m.modified()).ok()?;
        Some(c.max(k))
    }

    fn current(&self) -> Arc<CertifiedKey> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let stamp = Self::stamp(&self.cert, &self.key);
        if stamp.is_some() && stamp != state.0 {
            match load_certified_key(&self.cert, &self.key) {
                Ok(k) => {
                    tracing::info!(cert = %self.cert.display(), "inject: reloaded TLS certificate");
                    *state = (stamp, Arc::new(k));
                }
                // Mid-rotation the key may not match the cert yet; keep serving the old pair.
                Err(e) => {
                    tracing::warn!(error = %e, "inject: TLS reload failed, keeping the previous certificate")
                }
            }
        }
        state.1.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// Builds the server TLS configuration (ring, HTTP/1.1 ALPN) over a reloading certificate.
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, InjectError> {
    let resolver = ReloadingCert::new(cert.into(), key.into())?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    // Only HTTP/1.1 is served; advertising it keeps the API server's Go client from trying h2.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// `natsbridge inject`: validates the flags, loads the certificate and serves on `listener`
/// (which the binary binds from `args.listen`) until `shutdown` resolves.
pub async fn run(args: InjectArgs, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<(), InjectError> {
    let settings = args.settings()?;
    let tls = tls_config(&args.tls_cert, &args.tls_key)?;
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        image = %settings.image,
        "inject: serving the mutating webhook"
    );
    serve(listener, tls, settings, shutdown).await
}
