//! The routing file: parses `routes.toml` into raw serde types, validates them into
//! [`Config`], and reports every problem at once with `file:line` and the route's name.
//!
//! Nothing after loading sees raw TOML: the rest of the crate only knows the validated
//! types below, whose invariants (valid subjects, captures that exist, no overlapping
//! routes) are established here. `raw` is what serde reads, `validate` turns it into these
//! types, `diagnostics` locates and collects the problems, `values` parses durations,
//! sizes and URLs. Calls only `crate::subject`; everything else in the crate calls this.

mod cutover;
mod diagnostics;
mod raw;
mod routes;
mod streams;
mod telemetry;
mod validate;
mod values;

pub use cutover::{Cutover, Sticky};
pub use diagnostics::{ConfigError, Diagnostic};
pub use routes::*;
pub use streams::*;
pub use telemetry::Telemetry;
pub use values::{parse_duration, parse_http_url, parse_server_url, parse_size, redact_userinfo, strip_port, ValueError};

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use diagnostics::{Diagnostics, SourceLocator};
use raw::RawDocument;

/// A validated routing file.
#[derive(Debug, Clone)]
pub struct Config {
    pub sidecar: Sidecar,
    pub nats: Nats,
    pub defaults: Defaults,
    pub outbound: Vec<Outbound>,
    pub inbound: Vec<Inbound>,
    pub streams: Vec<StreamSpec>,
    pub dead_letter: DeadLetterStream,
    pub idempotency: IdempotencyStore,
    /// `[telemetry]`: spans exported over OTLP; `None` exports nothing (read at start).
    pub telemetry: Option<Telemetry>,
    /// Things that are legal but probably wrong (`check` prints them, `run` logs them).
    pub warnings: Vec<Diagnostic>,
    /// Where the file came from, for diagnostics and hot reload.
    pub source: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Sidecar {
    pub service: String,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub app_url: http::Uri,
    pub drain_timeout: Duration,
    /// Create streams, consumers and buckets at start instead of only checking them.
    pub provision: bool,
    /// JetStream publishes waiting for their ack, across all routes; past it → 503.
    pub max_inflight_publishes: usize,
    /// Runtime threads: 1 (the default) runs everything on one thread (a current-thread
    /// runtime, no cross-thread wake-ups); more starts a multi-thread runtime with that many
    /// workers. Read at start.
    pub worker_threads: usize,
    pub http: HttpLimits,
    /// What `/readyz` means (read at start; a reload does not change it).
    pub readiness: ReadinessMode,
    /// The reply subjects inbound request and tunnel routes answer, by prefix, unless a
    /// route sets its own (default `_INBOX.`).
    pub reply_prefixes: Vec<String>,
    /// The app's health check (`/healthz`), probed every few seconds: while it fails or
    /// the app refuses connections, inbound routes pause. `None`: never probed.
    pub app_health_path: Option<String>,
    /// What the egress listener does with a request no route matches.
    pub forward: Forward,
    /// The service's SemVer version, announced by NATS micro discovery (`$SRV.INFO`).
    pub version: String,
}

/// The egress listener as a forward proxy (`HTTP_PROXY`): what happens to the calls no
/// route takes, so that the app's other calls work as they did without the sidecar.
#[derive(Debug, Clone)]
pub struct Forward {
    pub unmatched: Unmatched,
    /// `CONNECT` targets allowed, as `host:port` patterns (`*` matches any run of
    /// characters); `None` allows every target.
    pub connect_allow: Option<Vec<String>>,
    /// The bound on connecting to an origin (forwarded calls, CONNECT, upgrades).
    pub connect_timeout: Duration,
}

/// `[sidecar] unmatched`: an absolute-form request (`HTTP_PROXY`) whose host no route takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unmatched {
    /// Forwarded to its origin as a plain forward proxy would, CONNECT tunnels allowed.
    #[default]
    Forward,
    /// 404 `no-route` (and CONNECT refused): a closed list of what the app may call.
    Reject,
}

/// What `/readyz` means: see [`crate::health`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadinessMode {
    /// Ready once the sidecar can serve HTTP, through NATS outages (the default).
    #[default]
    Serving,
    /// Ready only while every component is up.
    Strict,
}

/// Limits of the egress HTTP listener.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    pub header_read_timeout: Duration,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

#[derive(Debug, Clone)]
pub struct Nats {
    pub servers: Vec<String>,
    pub connect_timeout: Duration,
    /// The reply subjects' prefix, when not `_INBOX` (accounts with subject permissions).
    pub inbox_prefix: Option<String>,
    pub auth: NatsAuth,
    pub tls: Option<NatsTls>,
}

/// Where a secret lives. Never inline: values are read at connect time and never logged.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    File(PathBuf),
    Env(String),
}

impl fmt::Debug for Secret {
    // Only the secret's location is ever printed, never its value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::File(p) => write!(f, "file:{}", p.display()),
            Secret::Env(v) => write!(f, "env:{v}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsAuth {
    None,
    Token(Secret),
    UserPassword { user: String, password: Secret },
    NkeySeed(Secret),
    Credentials(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsTls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub require: bool,
}

#[derive(Debug, Clone)]
pub struct Defaults {
    pub timeout: Duration,
    pub max_body: usize,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:4280";
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:9464";
pub const DEFAULT_APP_URL: &str = "http://127.0.0.1:3000";
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
pub const TUNNEL_PREFIX: &str = "natsbridge.tunnel";
/// The inbox prefix of every NATS client library unless configured otherwise.
pub const DEFAULT_REPLY_PREFIX: &str = "_INBOX.";
/// `[sidecar] worker_threads` when unset (see BENCHMARKS.md for the measurement).
pub const DEFAULT_WORKER_THREADS: usize = 1;

/// Settings given on the command line or in `NATSBRIDGE_*` variables; they win over the
/// file, on every load and reload.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub nats_servers: Option<Vec<String>>,
    pub app_url: Option<http::Uri>,
    /// The CA that verifies the NATS servers (`[nats.tls] ca_file`): the injector mounts the
    /// chart's CA and points here, so routing files need not know where it is.
    pub nats_ca_file: Option<PathBuf>,
}

impl Config {
    /// Applies the overrides; returns the settings they changed (as named in the file),
    /// so the start can say so: in injected pods they silently won over the ConfigMap.
    pub fn apply(&mut self, o: &Overrides) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if let Some(v) = o.listen {
            if self.sidecar.listen != v {
                changed.push("sidecar.listen");
            }
            self.sidecar.listen = v;
        }
        if let Some(v) = o.admin_listen {
            if self.sidecar.admin_listen != v {
                changed.push("sidecar.admin_listen");
            }
            self.sidecar.admin_listen = v;
        }
        if let Some(v) = &o.nats_servers {
            if &self.nats.servers != v {
                changed.push("nats.servers");
            }
            self.nats.servers = v.clone();
        }
        if let Some(v) = &o.app_url {
            if &self.sidecar.app_url != v {
                changed.push("sidecar.app_url");
            }
            self.sidecar.app_url = v.clone();
        }
        if let Some(v) = &o.nats_ca_file {
            let tls = self.nats.tls.get_or_insert(NatsTls { ca_file: None, cert_file: None, key_file: None, require: false });
            if tls.ca_file.as_ref() != Some(v) {
                changed.push("nats.tls.ca_file");
            }
            tls.ca_file = Some(v.clone());
        }
        changed
    }
}

/// Reads and validates a routing file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    from_text(path, &read(path)?)
}

/// Reads the routing file; a failure is a diagnostic on the file itself.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        diagnostics: vec![Diagnostic { file: path.display().to_string(), line: 0, route: None, message: format!("cannot read: {e}") }],
    })
}

/// Validates text already read from `path` (hot reload reads the file once per change).
pub fn from_text(path: &Path, src: &str) -> Result<Config, ConfigError> {
    let mut config = parse(src, &path.display().to_string())?;
    config.source = path.to_path_buf();
    Ok(config)
}

/// Validates routing-file text; `file` is only used in diagnostics.
pub fn parse(src: &str, file: &str) -> Result<Config, ConfigError> {
    let locator = SourceLocator::new(src, file);
    let doc: RawDocument = toml::from_str(src).map_err(|e| {
        let line = e.span().map(|s| locator.line_of(s.start)).unwrap_or(0);
        ConfigError { diagnostics: vec![Diagnostic { file: file.to_owned(), line, route: None, message: e.message().trim().to_owned() }] }
    })?;
    let mut diags = Diagnostics::new(locator);
    let config = validate::validate(doc, &mut diags);
    let warnings = diags.finish()?;
    let mut config = config.expect("validated config without errors");
    config.warnings = warnings;
    Ok(config)
}

#[cfg(test)]
pub(crate) mod test_support {
    /// The smallest valid file.
    pub const MINIMAL: &str = "[sidecar]\nservice = \"orchestration\"\n";

    /// Each error of `src` as printed, or nothing when it is valid.
    pub fn errors(src: &str) -> Vec<String> {
        match super::parse(src, "t.toml") {
            Ok(_) => Vec::new(),
            Err(e) => e.diagnostics.iter().map(|d| d.to_string()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{errors, MINIMAL};
    use super::*;

    #[test]
    fn minimal_file_gets_defaults() {
        let c = parse(MINIMAL, "t.toml").unwrap();
        assert_eq!(c.sidecar.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.nats.servers, vec![DEFAULT_NATS_URL.to_owned()]);
        assert_eq!(c.defaults.timeout, Duration::from_secs(5));
        assert_eq!(c.defaults.max_body, 1 << 20);
        assert_eq!(c.dead_letter.stream, "DLQ");
        assert_eq!(c.sidecar.readiness, ReadinessMode::Serving);
    }

    #[test]
    fn readiness_is_serving_or_strict_and_a_typo_points_at_its_line() {
        let strict = parse("[sidecar]\nservice = \"x\"\nreadiness = \"strict\"\n", "t.toml").unwrap();
        assert_eq!(strict.sidecar.readiness, ReadinessMode::Strict);
        let e = errors("[sidecar]\nservice = \"x\"\nreadiness = \"strcit\"\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("t.toml:3:") && e[0].contains("\"serving\" or \"strict\""), "{}", e[0]);
    }

    #[test]
    fn a_ca_file_override_turns_server_verification_on_and_keeps_a_client_certificate() {
        let o = Overrides { nats_ca_file: Some("/etc/ca.crt".into()), ..Default::default() };
        let mut plain = parse(MINIMAL, "t.toml").unwrap();
        assert_eq!(plain.apply(&o), ["nats.tls.ca_file"]);
        assert_eq!(plain.nats.tls.unwrap().ca_file.unwrap(), PathBuf::from("/etc/ca.crt"));
        let src = format!("{MINIMAL}[nats.tls]\nca_file = \"/old.crt\"\ncert_file = \"/c.crt\"\nkey_file = \"/c.key\"\n");
        let mut with_cert = parse(&src, "t.toml").unwrap();
        with_cert.apply(&o);
        let tls = with_cert.nats.tls.unwrap();
        assert_eq!((tls.ca_file.unwrap(), tls.cert_file.unwrap()), (PathBuf::from("/etc/ca.crt"), PathBuf::from("/c.crt")));
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let e = errors("[sidecar]\nservice = \"x\"\nlisten = \n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("t.toml:3:"), "{}", e[0]);
    }
}
