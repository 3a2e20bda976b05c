//! The injector's settings: the cluster-wide sidecar defaults, the `natsbridge inject` flags
//! they are validated from, and the value checks (Kubernetes quantities, Secret references)
//! that flags and pod annotations share.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::error::{InjectError, SettingDefect};

/// Resource requests/limits for the sidecar, as Kubernetes quantities; `None` means unset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_request: Option<String>,
    pub memory_limit: Option<String>,
}

/// In `--nats-url-secret`, stands for the pod's routes ConfigMap name.
pub const ROUTES_PLACEHOLDER: &str = "{routes}";

/// A reference to one key of a Secret in the pod's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
}

impl SecretKeyRef {
    /// Parses `name` or `name/key`; the key defaults to `url`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::parse_or(s, "url")
    }

    /// This reference for a pod whose routes ConfigMap is `routes`: `{routes}` in the name
    /// becomes that name, so each service's sidecar reads its own NATS user's credentials
    /// (`{routes}-nats-auth` → `orders-routes-nats-auth`).
    pub fn for_routes(&self, routes: &str) -> Self {
        Self { name: self.name.replace(ROUTES_PLACEHOLDER, routes), key: self.key.clone() }
    }

    /// Parses `name` or `name/key`, the key defaulting to `default_key`.
    pub fn parse_or(s: &str, default_key: &str) -> Option<Self> {
        let (name, key) = match s.split_once('/') {
            Some((n, k)) => (n.trim(), k.trim()),
            None => (s.trim(), default_key),
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
    /// The ConfigMap (in each pod's namespace) and key holding the CA that verifies the NATS
    /// servers; mounted into sidecars, which then verify the server with it.
    pub nats_ca: Option<SecretKeyRef>,
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
            nats_ca: None,
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
    /// URL with credentials; overrides --nats-url for sidecars. `{routes}` in the name becomes
    /// the pod's routes ConfigMap, so each service gets its own user (`{routes}-nats-auth/url`).
    #[arg(long, env = "NATSBRIDGE_INJECT_NATS_URL_SECRET")]
    pub nats_url_secret: Option<String>,
    /// ConfigMap (`name` or `name/key`, key defaults to `ca.crt`) in each pod's namespace
    /// holding the CA of the NATS servers' TLS certificate; mounted into sidecars, which
    /// verify the server with it. Optional in the pod: without it the sidecar cannot
    /// connect, but the pod still starts.
    #[arg(long, env = "NATSBRIDGE_INJECT_NATS_CA_CONFIG_MAP")]
    pub nats_ca_config_map: Option<String>,
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
        if self.sidecar_image.trim().is_empty() {
            return Err(InjectError::Setting { name: "--sidecar-image", defect: SettingDefect::Empty });
        }
        if self.nats_url.trim().is_empty() {
            return Err(InjectError::Setting { name: "--nats-url", defect: SettingDefect::Empty });
        }
        let nats_url_secret = secret_flag("--nats-url-secret", self.nats_url_secret.as_deref())?;
        let nats_ca = match self.nats_ca_config_map.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => Some(
                SecretKeyRef::parse_or(s, "ca.crt")
                    .ok_or_else(|| InjectError::Setting { name: "--nats-ca-config-map", defect: SettingDefect::NotASecretRef(s.into()) })?,
            ),
        };
        if self.egress_port == self.admin_port {
            return Err(InjectError::Setting { name: "--admin-port", defect: SettingDefect::SameAsEgressPort });
        }
        Ok(InjectSettings {
            image: self.sidecar_image.trim().into(),
            image_pull_policy: self.sidecar_image_pull_policy.clone(),
            nats_url: self.nats_url.trim().into(),
            nats_url_secret,
            nats_ca,
            resources: Resources {
                cpu_request: quantity_flag("--cpu-request", &self.cpu_request)?,
                cpu_limit: quantity_flag("--cpu-limit", &self.cpu_limit)?,
                memory_request: quantity_flag("--memory-request", &self.memory_request)?,
                memory_limit: quantity_flag("--memory-limit", &self.memory_limit)?,
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

/// An optional quantity flag: empty means unset.
fn quantity_flag(name: &'static str, value: &str) -> Result<Option<String>, InjectError> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    if !is_quantity(value) {
        return Err(InjectError::Setting { name, defect: SettingDefect::NotAQuantity(value.into()) });
    }
    Ok(Some(value.to_string()))
}

/// An optional Secret reference flag: absent or empty means unset.
fn secret_flag(name: &'static str, value: Option<&str>) -> Result<Option<SecretKeyRef>, InjectError> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(s) => {
            SecretKeyRef::parse(s).map(Some).ok_or_else(|| InjectError::Setting { name, defect: SettingDefect::NotASecretRef(s.into()) })
        }
    }
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
