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
mod telemetry;
mod validate;
mod values;

pub use cutover::{Cutover, Sticky};
pub use diagnostics::{ConfigError, Diagnostic};
pub use telemetry::Telemetry;
pub use values::{parse_duration, parse_http_url, parse_server_url, parse_size, redact_userinfo, strip_port, ValueError};

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::subject::{PathTemplate, SubjectPattern, SubjectTemplate};
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

/// Egress mode names, as written in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutboundMode {
    Request,
    Publish,
    JetStream,
    Tunnel,
    Http,
    Subscribe,
}

impl OutboundMode {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboundMode::Request => "request",
            OutboundMode::Publish => "publish",
            OutboundMode::JetStream => "jetstream",
            OutboundMode::Tunnel => "tunnel",
            OutboundMode::Http => "http",
            OutboundMode::Subscribe => "subscribe",
        }
    }
}

/// What an egress route does with a matched request.
#[derive(Debug, Clone)]
pub enum OutboundTarget {
    Request(SubjectTemplate),
    Publish(SubjectTemplate),
    JetStream(SubjectTemplate),
    /// The subject is `natsbridge.tunnel.<service>`.
    Tunnel {
        service: String,
        subject: String,
    },
    Http {
        upstream: http::Uri,
    },
    /// A `GET` becomes a live SSE stream of the subject: from `stream` (a JetStream
    /// stream: replay and `Last-Event-ID` resume) or, without one, core NATS.
    Subscribe(Subscribe),
}

/// What a `subscribe` route reads.
#[derive(Debug, Clone)]
pub struct Subscribe {
    pub subject: SubjectTemplate,
    pub stream: Option<String>,
    /// Without `Last-Event-ID`: from the subject's first message (`deliver = "all"`, the
    /// default) or only new ones (`"new"`).
    pub deliver_all: bool,
    /// A comment line this often keeps proxies from cutting an idle stream (`heartbeat`, 15 s).
    pub heartbeat: Duration,
}

#[derive(Debug, Clone)]
pub struct Outbound {
    pub name: String,
    pub line: usize,
    pub method: Option<http::Method>,
    /// Lower-case host without port.
    pub host: Option<String>,
    /// The path pattern in matchit syntax: `{name}` one segment, `{*rest}` the remainder.
    pub path: String,
    pub target: OutboundTarget,
    pub timeout: Duration,
    pub max_body: usize,
    /// Which `Nats-*` publish-control headers from the app reach NATS.
    pub allow_nats_headers: AllowNatsHeaders,
    /// Request and tunnel routes: how a streamed reply is read (`stream_*` keys).
    pub stream: StreamLimits,
    /// Jetstream routes: each message expires after this (`ttl`, sent as `Nats-TTL`).
    pub ttl: Option<Duration>,
    /// Request and tunnel routes: every call answers `202` at once and its result is
    /// fetched later (`async = true`; a client can ask with `Prefer: respond-async`).
    pub always_async: bool,
    /// How long an async call's result is kept (`async_ttl`, 1 h).
    pub async_ttl: Duration,
    /// NATS routes moving over from an HTTP `upstream`: the split, shadow and fallback.
    pub cutover: Option<Cutover>,
    pub codec: Codec,
    /// NestJS: the route's `pattern`, whose normalised text is the subject; `None`: the
    /// rendered subject is the pattern.
    pub pattern: Option<serde_json::Value>,
    /// The contract versions a body must satisfy before it is sent (`schema`/`schemas`).
    pub schema: Option<crate::contract::Contracts>,
    /// `codec = "cloudevents"`: what a plain HTTP request's event is made of.
    pub cloudevents: Option<CloudEventsRoute>,
}

/// The attributes an egress route gives the event it makes of a plain HTTP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudEventsRoute {
    /// `/<service>/<route>`.
    pub source: String,
    /// `ce_type`; `None`: the rendered subject.
    pub kind: Option<String>,
}

/// `codec`: how a route writes an HTTP message on NATS and reads it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Codec {
    /// Body as the payload, headers as headers (see [`crate::codec`]).
    #[default]
    Raw,
    /// The `@nestjs/microservices` NATS transport's JSON packets ([`crate::codec::nestjs`]).
    NestJs,
    /// CloudEvents 1.0 in binary mode ([`crate::codec::cloudevents`]).
    CloudEvents,
}

impl Codec {
    pub fn as_str(self) -> &'static str {
        match self {
            Codec::Raw => "raw",
            Codec::NestJs => "nestjs",
            Codec::CloudEvents => "cloudevents",
        }
    }
}

/// How an egress route reads a streamed reply: each limit ends the stream as an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamLimits {
    /// The longest wait between two messages of a stream (`stream_stall`, 30 s).
    pub stall: Duration,
    /// The longest a whole stream may last (`stream_max`, 10 min).
    pub max: Duration,
    /// Messages buffered for a slow HTTP client before the stream is ended (`stream_buffer`, 256).
    pub buffer: usize,
    /// `stream_end = "empty"`: replies from a foreign responder are a stream ended by an
    /// empty payload (ADR-47's sentinel), without sequence numbers.
    pub end_on_empty: bool,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self { stall: Duration::from_secs(30), max: Duration::from_secs(600), buffer: 256, end_on_empty: false }
    }
}

/// Which of an app's `Nats-*` headers (`Nats-Expected-Stream`, `Nats-Rollup`, `Nats-TTL`,
/// …) an egress route passes on. They steer how a stream stores the message, so by
/// default none do: an HTTP caller should not roll up or expire a stream's messages.
/// `Nats-Msg-Id` is egress's own (from `Idempotency-Key`) and always passes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AllowNatsHeaders {
    #[default]
    None,
    All,
    /// Canonical names (`Nats-Expected-Last-Sequence`).
    Names(Vec<String>),
}

impl AllowNatsHeaders {
    /// Does a `Nats-*` header named `name` (any case) pass?
    pub fn allows(&self, name: &str) -> bool {
        match self {
            AllowNatsHeaders::None => false,
            AllowNatsHeaders::All => true,
            AllowNatsHeaders::Names(names) => names.iter().any(|n| n.eq_ignore_ascii_case(name)),
        }
    }
}

impl Outbound {
    pub fn mode(&self) -> OutboundMode {
        match self.target {
            OutboundTarget::Request(_) => OutboundMode::Request,
            OutboundTarget::Publish(_) => OutboundMode::Publish,
            OutboundTarget::JetStream(_) => OutboundMode::JetStream,
            OutboundTarget::Tunnel { .. } => OutboundMode::Tunnel,
            OutboundTarget::Http { .. } => OutboundMode::Http,
            OutboundTarget::Subscribe(_) => OutboundMode::Subscribe,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InboundModeName {
    Request,
    Tunnel,
    JetStream,
}

impl InboundModeName {
    pub fn as_str(self) -> &'static str {
        match self {
            InboundModeName::Request => "request",
            InboundModeName::Tunnel => "tunnel",
            InboundModeName::JetStream => "jetstream",
        }
    }
}

/// How an ingress route receives messages.
#[derive(Debug, Clone)]
pub enum InboundMode {
    /// A core-NATS queue subscription; replies carry the app's response.
    Request { queue: String },
    /// Answers `natsbridge.tunnel.<service>` and replays whole HTTP requests.
    Tunnel { queue: String },
    /// A durable pull consumer.
    JetStream(Consumer),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Consumer {
    pub stream: String,
    pub durable: String,
    pub max_deliver: i64,
    pub backoff: Vec<Duration>,
    pub ack_wait: Duration,
    pub max_ack_pending: i64,
    pub dead_letter: String,
    /// Where a newly created durable starts. Only read when the consumer is created: the
    /// server cannot move an existing consumer's start.
    pub deliver: Deliver,
    /// `[sidecar] service`: written into the consumer's metadata, which is how
    /// `provision --prune` recognises the consumers this service owns.
    pub service: String,
}

/// Where a new durable consumer starts (`deliver` on a jetstream route).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deliver {
    /// Only messages published after the consumer is created: the default, so a renamed
    /// route or service (a new durable) does not replay the whole stream.
    New,
    /// Every message the stream holds.
    All,
    /// Messages stored at or after this time.
    StartTime(std::time::SystemTime),
}

#[derive(Debug, Clone)]
pub struct Inbound {
    pub name: String,
    pub line: usize,
    /// The subscription subject; may contain wildcards.
    pub subject: SubjectPattern,
    pub mode: InboundMode,
    pub method: http::Method,
    /// The app path; `{N}` is the N-th (1-based) token of the received subject.
    pub path: PathTemplate,
    pub concurrency: usize,
    /// The HTTP call's deadline. For JetStream it is derived from `ack_wait` unless set.
    pub timeout: Duration,
    pub max_body: usize,
    pub idempotency: Option<Idempotency>,
    /// Reply subjects this route answers, by prefix (the route's or `[sidecar]`'s); a
    /// reply elsewhere (`$JS.API…`) would run a request with the sidecar's credentials.
    pub reply_prefixes: Vec<String>,
    /// What happens to `Forwarded` / `X-Forwarded-*` headers arriving over NATS.
    pub forwarded: Forwarded,
    /// Tunnel routes: methods replayed besides the standard ones (upper case).
    pub extra_methods: Vec<http::Method>,
    /// Request and tunnel routes: bytes of received messages that may wait for a free
    /// `concurrency` slot; past it a message is refused (503 reply), not buffered.
    pub max_buffer: usize,
    pub codec: Codec,
    /// Request and tunnel routes: writes of a streamed app body (not an event stream, whose
    /// events go one by one at once) within this window travel as one message
    /// (`stream_coalesce`, 2 ms; `0s`: only writes that arrived together).
    pub stream_coalesce: Duration,
    /// Request and tunnel routes: the longest pause of a streamed app body between two
    /// writes before the stream ends as an error (`stream_stall`, 30 s).
    pub stream_stall: Duration,
    /// The contract versions a message must satisfy before the app sees it
    /// (`schema`/`schemas`; not on tunnels).
    pub schema: Option<crate::contract::Contracts>,
}

/// Proxy headers (`Forwarded`, `X-Forwarded-For`, `-Host`, `-Proto`) arriving over NATS.
/// The app sees the call come from loopback, and apps often trust loopback as a proxy, so
/// a publisher's copy would spoof the client address, host or scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Forwarded {
    /// Removed before the app is called (the default).
    #[default]
    Drop,
    /// Passed to the app: every publisher on the subject is trusted to set them.
    Trust,
}

impl Inbound {
    pub fn mode_name(&self) -> InboundModeName {
        match self.mode {
            InboundMode::Request { .. } => InboundModeName::Request,
            InboundMode::Tunnel { .. } => InboundModeName::Tunnel,
            InboundMode::JetStream(_) => InboundModeName::JetStream,
        }
    }

    pub fn trusts_forwarded(&self) -> bool {
        self.forwarded == Forwarded::Trust
    }
}

/// Where a message's idempotency key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyKey {
    Header(String),
    MsgId,
    /// A JSON pointer into the payload (RFC 6901).
    Json(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    pub key: IdempotencyKey,
    pub ttl: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    File,
    Memory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    Limits,
    Interest,
    WorkQueue,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StreamSpec {
    pub name: String,
    pub line: usize,
    /// `reference = true`: another routes file owns this stream's settings; this one only
    /// needs it to exist (provisioning checks, never creates or updates it). The settings
    /// below are then unknown and left at their defaults, `subjects` empty.
    pub reference: bool,
    pub subjects: Vec<SubjectPattern>,
    pub storage: Storage,
    pub replicas: usize,
    pub retention: Retention,
    pub max_age: Option<Duration>,
    pub max_bytes: Option<i64>,
    pub max_msgs: Option<i64>,
    pub duplicate_window: Duration,
    /// Per-message TTLs (`Nats-TTL`): set for streams that capture a jetstream route with
    /// `ttl`.
    pub allow_msg_ttl: bool,
}

/// The stream that captures every dead-letter subject.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterStream {
    pub stream: String,
    /// The `[dead_letter]` section's line; `None` when the file leaves it out (defaults).
    pub line: Option<usize>,
    /// `reference = true`: another routes file owns the stream's settings (see
    /// [`StreamSpec::reference`]); `subjects` still say what it captures, for the checks.
    pub reference: bool,
    pub subjects: Vec<SubjectPattern>,
    pub storage: Storage,
    /// `None`: min(3, the cluster's size), read from the server when provisioning.
    pub replicas: Option<usize>,
    /// Dead letters older than this are deleted; zero: kept until purged.
    pub max_age: Duration,
    /// Past this size new dead letters are refused (and retried), not old ones dropped;
    /// 0: unlimited.
    pub max_bytes: i64,
}

/// The dead-letter stream's `max_age` unless set: long enough to be noticed and replayed.
pub const DEFAULT_DLQ_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
/// The dead-letter stream's `max_bytes` unless set.
pub const DEFAULT_DLQ_MAX_BYTES: usize = 1 << 30;

/// The KV bucket that remembers handled idempotency keys.
#[derive(Debug, Clone, PartialEq)]
pub struct IdempotencyStore {
    pub bucket: String,
    /// `None`: min(3, the cluster's size), read from the server when provisioning.
    pub replicas: Option<usize>,
    /// How long a claim lasts before another handler may take the key over.
    pub claim_ttl: Duration,
    /// Stored responses larger than this keep only their status and headers.
    pub max_response_bytes: usize,
    pub storage: Storage,
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
