//! The routing file: parses `routes.toml` into raw serde types, validates them into
//! [`Config`], and reports every problem at once with `file:line` and the route's name.
//!
//! Nothing after loading sees raw TOML: the rest of the crate only knows the validated
//! types below, whose invariants (valid subjects, captures that exist, no overlapping
//! routes) are established here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::subject::{self, PathTemplate, SubjectPattern, SubjectTemplate};

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
    pub http: HttpLimits,
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
}

impl OutboundMode {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboundMode::Request => "request",
            OutboundMode::Publish => "publish",
            OutboundMode::JetStream => "jetstream",
            OutboundMode::Tunnel => "tunnel",
            OutboundMode::Http => "http",
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
}

impl Outbound {
    pub fn mode(&self) -> OutboundMode {
        match self.target {
            OutboundTarget::Request(_) => OutboundMode::Request,
            OutboundTarget::Publish(_) => OutboundMode::Publish,
            OutboundTarget::JetStream(_) => OutboundMode::JetStream,
            OutboundTarget::Tunnel { .. } => OutboundMode::Tunnel,
            OutboundTarget::Http { .. } => OutboundMode::Http,
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
}

impl Inbound {
    pub fn mode_name(&self) -> InboundModeName {
        match self.mode {
            InboundMode::Request { .. } => InboundModeName::Request,
            InboundMode::Tunnel { .. } => InboundModeName::Tunnel,
            InboundMode::JetStream(_) => InboundModeName::JetStream,
        }
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
    pub subjects: Vec<SubjectPattern>,
    pub storage: Storage,
    pub replicas: usize,
    pub retention: Retention,
    pub max_age: Option<Duration>,
    pub max_bytes: Option<i64>,
    pub max_msgs: Option<i64>,
    pub duplicate_window: Duration,
}

/// The stream that captures every dead-letter subject.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterStream {
    pub stream: String,
    pub subjects: Vec<SubjectPattern>,
    pub storage: Storage,
    pub replicas: usize,
    pub max_age: Option<Duration>,
    pub max_bytes: Option<i64>,
}

/// The KV bucket that remembers handled idempotency keys.
#[derive(Debug, Clone, PartialEq)]
pub struct IdempotencyStore {
    pub bucket: String,
    pub replicas: usize,
    /// How long a claim lasts before another handler may take the key over.
    pub claim_ttl: Duration,
    /// Stored responses larger than this keep only their status and headers.
    pub max_response_bytes: usize,
    pub storage: Storage,
}

/// One problem found in the file, located by line and route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub route: Option<String>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file, self.line)?;
        if let Some(route) = &self.route {
            write!(f, "route \"{route}\": ")?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem in a routing file; never empty.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.diagnostics.len();
        writeln!(f, "{n} error{} in routing file", if n == 1 { "" } else { "s" })?;
        for d in &self.diagnostics {
            writeln!(f, "  {d}")?;
        }
        Ok(())
    }
}

/// Settings given on the command line or in `NATSBRIDGE_*` variables; they win over the
/// file, on every load and reload.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub nats_servers: Option<Vec<String>>,
    pub app_url: Option<http::Uri>,
}

impl Config {
    pub fn apply(&mut self, o: &Overrides) {
        if let Some(v) = o.listen {
            self.sidecar.listen = v;
        }
        if let Some(v) = o.admin_listen {
            self.sidecar.admin_listen = v;
        }
        if let Some(v) = &o.nats_servers {
            self.nats.servers = v.clone();
        }
        if let Some(v) = &o.app_url {
            self.sidecar.app_url = v.clone();
        }
    }
}

/// Reads and validates a routing file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
        diagnostics: vec![Diagnostic { file: file.clone(), line: 0, route: None, message: format!("cannot read: {e}") }],
    })?;
    let mut config = parse(&src, &file)?;
    config.source = path.to_path_buf();
    Ok(config)
}

/// Validates routing-file text; `file` is only used in diagnostics.
pub fn parse(src: &str, file: &str) -> Result<Config, ConfigError> {
    let mut cx = Cx { src, file, errors: Vec::new(), warnings: Vec::new() };
    let doc: RawDocument = match toml::from_str(src) {
        Ok(doc) => doc,
        Err(e) => {
            let line = e.span().map(|s| cx.line_of(s.start)).unwrap_or(0);
            return Err(ConfigError {
                diagnostics: vec![Diagnostic { file: file.to_owned(), line, route: None, message: e.message().trim().to_owned() }],
            });
        }
    };
    let config = cx.validate(doc);
    if cx.errors.is_empty() {
        let mut config = config.expect("validated config without errors");
        config.warnings = cx.warnings;
        Ok(config)
    } else {
        cx.errors.sort_by_key(|d| d.line);
        Err(ConfigError { diagnostics: cx.errors })
    }
}

// ---------------------------------------------------------------------------------------
// Raw types: exactly what serde reads. Each section is kept as a spanned `toml::Value` at
// the top so that one bad route does not hide the errors of the others.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDocument {
    sidecar: Option<Spanned<toml::Value>>,
    nats: Option<Spanned<toml::Value>>,
    defaults: Option<Spanned<toml::Value>>,
    #[serde(default)]
    outbound: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    inbound: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    streams: Vec<Spanned<toml::Value>>,
    dead_letter: Option<Spanned<toml::Value>>,
    idempotency: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSidecar {
    service: String,
    listen: Option<String>,
    admin_listen: Option<String>,
    app_url: Option<String>,
    drain_timeout: Option<String>,
    #[serde(default)]
    provision: bool,
    max_inflight_publishes: Option<usize>,
    header_read_timeout: Option<String>,
    max_headers: Option<usize>,
    max_header_bytes: Option<String>,
    idle_timeout: Option<String>,
    max_connections: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNats {
    servers: Option<Vec<String>>,
    connect_timeout: Option<String>,
    token_file: Option<String>,
    token_env: Option<String>,
    user: Option<String>,
    password_file: Option<String>,
    password_env: Option<String>,
    nkey_seed_file: Option<String>,
    nkey_seed_env: Option<String>,
    creds_file: Option<String>,
    tls: Option<RawTls>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_file: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
    #[serde(default)]
    require: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    timeout: Option<String>,
    max_body: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutbound {
    name: String,
    method: Option<String>,
    host: Option<String>,
    path: String,
    subject: Option<String>,
    mode: String,
    timeout: Option<String>,
    max_body: Option<String>,
    service: Option<String>,
    upstream: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInbound {
    name: String,
    subject: Option<String>,
    mode: String,
    method: Option<String>,
    path: Option<String>,
    queue: Option<String>,
    stream: Option<String>,
    durable: Option<String>,
    max_deliver: Option<i64>,
    backoff: Option<Vec<String>>,
    ack_wait: Option<String>,
    max_ack_pending: Option<i64>,
    dead_letter: Option<String>,
    concurrency: Option<usize>,
    timeout: Option<String>,
    max_body: Option<String>,
    idempotency: Option<RawIdempotency>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdempotency {
    key: String,
    ttl: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStream {
    name: String,
    subjects: Vec<String>,
    storage: Option<String>,
    replicas: Option<usize>,
    retention: Option<String>,
    max_age: Option<String>,
    max_bytes: Option<String>,
    max_msgs: Option<i64>,
    duplicate_window: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDeadLetter {
    stream: Option<String>,
    subjects: Option<Vec<String>>,
    storage: Option<String>,
    replicas: Option<usize>,
    max_age: Option<String>,
    max_bytes: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawIdempotencyStore {
    bucket: Option<String>,
    replicas: Option<usize>,
    claim_ttl: Option<String>,
    max_response_bytes: Option<String>,
    storage: Option<String>,
}

// ---------------------------------------------------------------------------------------
// Validation.

pub const DEFAULT_LISTEN: &str = "127.0.0.1:4280";
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:9464";
pub const DEFAULT_APP_URL: &str = "http://127.0.0.1:3000";
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
pub const TUNNEL_PREFIX: &str = "natsbridge.tunnel";

struct Cx<'a> {
    src: &'a str,
    file: &'a str,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

/// The span of one table in the file, for locating its keys.
#[derive(Clone, Copy)]
struct Loc {
    start: usize,
}

impl<'a> Cx<'a> {
    fn line_of(&self, offset: usize) -> usize {
        let offset = offset.min(self.src.len());
        self.src[..offset].bytes().filter(|&b| b == b'\n').count() + 1
    }

    /// The line of `key = …` inside a table, or the table's own line. toml's span of an
    /// array-of-tables element may cover only its header, so scan to the next header.
    fn key_line(&self, loc: Loc, key: &str) -> usize {
        let start = loc.start.min(self.src.len());
        let mut offset = start;
        for (n, line) in self.src[start..].split_inclusive('\n').enumerate() {
            let trimmed = line.trim_start();
            if n > 0 && trimmed.starts_with('[') {
                break;
            }
            if let Some(rest) = trimmed.strip_prefix(key) {
                if rest.trim_start().starts_with('=') {
                    return self.line_of(offset);
                }
            }
            offset += line.len();
        }
        self.line_of(start)
    }

    fn error(&mut self, loc: Loc, key: Option<&str>, route: Option<&str>, message: impl Into<String>) {
        let line = match key {
            Some(k) => self.key_line(loc, k),
            None => self.line_of(loc.start),
        };
        self.errors.push(Diagnostic { file: self.file.to_owned(), line, route: route.map(str::to_owned), message: message.into() });
    }

    fn warn(&mut self, loc: Loc, key: Option<&str>, route: Option<&str>, message: impl Into<String>) {
        let line = match key {
            Some(k) => self.key_line(loc, k),
            None => self.line_of(loc.start),
        };
        self.warnings.push(Diagnostic { file: self.file.to_owned(), line, route: route.map(str::to_owned), message: message.into() });
    }

    /// Deserializes one section; on failure records the error at the offending key.
    fn section<T: for<'de> Deserialize<'de>>(&mut self, value: Spanned<toml::Value>, what: &str) -> Option<(T, Loc)> {
        let span = value.span();
        let loc = Loc { start: span.start };
        let value = value.into_inner();
        let route = value.get("name").and_then(|n| n.as_str()).map(str::to_owned);
        match value.try_into::<T>() {
            Ok(t) => Some((t, loc)),
            Err(e) => {
                let message = e.message().trim().to_owned();
                // serde names the offending key in backticks; point at its line.
                let key = message.split('`').nth(1).map(str::to_owned);
                let message = format!("{what}: {message}");
                self.error(loc, key.as_deref(), route.as_deref(), message);
                None
            }
        }
    }

    fn duration(&mut self, loc: Loc, key: &str, route: Option<&str>, v: &Option<String>, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => match parse_duration(s) {
                Ok(d) => d,
                Err(e) => {
                    self.error(loc, Some(key), route, format!("`{key}`: {e}"));
                    default
                }
            },
        }
    }

    fn size(&mut self, loc: Loc, key: &str, route: Option<&str>, v: &Option<String>, default: usize) -> usize {
        match v {
            None => default,
            Some(s) => match parse_size(s) {
                Ok(d) => d,
                Err(e) => {
                    self.error(loc, Some(key), route, format!("`{key}`: {e}"));
                    default
                }
            },
        }
    }

    fn storage(&mut self, loc: Loc, route: Option<&str>, v: &Option<String>) -> Storage {
        match v.as_deref() {
            None | Some("file") => Storage::File,
            Some("memory") => Storage::Memory,
            Some(other) => {
                self.error(loc, Some("storage"), route, format!("`storage` must be \"file\" or \"memory\", not {other:?}"));
                Storage::File
            }
        }
    }

    fn validate(&mut self, doc: RawDocument) -> Option<Config> {
        let top = Loc { start: 0 };
        let sidecar = match doc.sidecar {
            Some(v) => self.section::<RawSidecar>(v, "[sidecar]"),
            None => {
                self.error(top, None, None, "missing [sidecar] section (it needs at least `service`)");
                None
            }
        };
        let nats = match doc.nats {
            Some(v) => self.section::<RawNats>(v, "[nats]"),
            None => Some((RawNats::default(), top)),
        };
        let defaults = match doc.defaults {
            Some(v) => self.section::<RawDefaults>(v, "[defaults]"),
            None => Some((RawDefaults::default(), top)),
        };
        let dead_letter = match doc.dead_letter {
            Some(v) => self.section::<RawDeadLetter>(v, "[dead_letter]"),
            None => Some((RawDeadLetter::default(), top)),
        };
        let idem_store = match doc.idempotency {
            Some(v) => self.section::<RawIdempotencyStore>(v, "[idempotency]"),
            None => Some((RawIdempotencyStore::default(), top)),
        };
        self.check_raw_names(doc.outbound.iter().chain(doc.inbound.iter()));
        let outbound: Vec<_> = doc.outbound.into_iter().map(|v| self.section::<RawOutbound>(v, "[[outbound]]")).collect();
        let inbound: Vec<_> = doc.inbound.into_iter().map(|v| self.section::<RawInbound>(v, "[[inbound]]")).collect();
        let streams: Vec<_> = doc.streams.into_iter().map(|v| self.section::<RawStream>(v, "[[streams]]")).collect();

        let sidecar = sidecar.map(|(raw, loc)| self.sidecar(raw, loc));
        let nats = nats.map(|(raw, loc)| self.nats(raw, loc));
        let defaults = defaults.map(|(raw, loc)| Defaults {
            timeout: self.duration(loc, "timeout", None, &raw.timeout, Duration::from_secs(5)),
            max_body: self.size(loc, "max_body", None, &raw.max_body, 1 << 20),
        });
        let streams: Vec<StreamSpec> = streams.into_iter().flatten().filter_map(|(raw, loc)| self.stream(raw, loc)).collect();
        let service = sidecar.as_ref().map(|s| s.service.clone()).unwrap_or_default();
        let dead_letter = dead_letter.map(|(raw, loc)| self.dead_letter(raw, loc));
        let idempotency = idem_store.map(|(raw, loc)| self.idempotency_store(raw, loc));

        let defaults_v = defaults.clone().unwrap_or(Defaults { timeout: Duration::from_secs(5), max_body: 1 << 20 });
        let outbound: Vec<(Outbound, Loc)> =
            outbound.into_iter().flatten().filter_map(|(raw, loc)| self.outbound(raw, loc, &defaults_v).map(|o| (o, loc))).collect();
        let inbound: Vec<(Inbound, Loc)> = inbound
            .into_iter()
            .flatten()
            .filter_map(|(raw, loc)| self.inbound(raw, loc, &defaults_v, &service).map(|i| (i, loc)))
            .collect();

        self.check_names(&inbound, &streams);
        self.check_overlaps(&outbound);
        self.check_inbound_overlaps(&inbound);
        if let Some(dl) = &dead_letter {
            self.check_coverage(&outbound, &inbound, &streams, dl);
        }
        if let Some(stream) = streams.iter().find(|s| dead_letter.as_ref().is_some_and(|d| d.stream == s.name)) {
            self.errors.push(Diagnostic {
                file: self.file.to_owned(),
                line: stream.line,
                route: Some(stream.name.clone()),
                message: "this stream has the dead-letter stream's name; set [dead_letter] stream to another".into(),
            });
        }

        Some(Config {
            sidecar: sidecar?,
            nats: nats?,
            defaults: defaults?,
            outbound: outbound.into_iter().map(|(o, _)| o).collect(),
            inbound: inbound.into_iter().map(|(i, _)| i).collect(),
            streams,
            dead_letter: dead_letter?,
            idempotency: idempotency?,
            warnings: Vec::new(),
            source: PathBuf::from(self.file),
        })
    }

    fn sidecar(&mut self, raw: RawSidecar, loc: Loc) -> Sidecar {
        if !subject::is_valid_token(&raw.service) {
            self.error(
                loc,
                Some("service"),
                None,
                format!("`service` {:?} must be one subject token: no '.', '*', '>' or spaces", raw.service),
            );
        }
        let addr = |cx: &mut Self, key: &str, v: &Option<String>, default: &str| -> SocketAddr {
            let s = v.as_deref().unwrap_or(default);
            s.parse().unwrap_or_else(|_| {
                cx.error(loc, Some(key), None, format!("`{key}` {s:?} is not an address like 127.0.0.1:4280"));
                default.parse().expect("default address")
            })
        };
        let listen = addr(self, "listen", &raw.listen, DEFAULT_LISTEN);
        let admin_listen = addr(self, "admin_listen", &raw.admin_listen, DEFAULT_ADMIN_LISTEN);
        let app_url = match parse_http_url(raw.app_url.as_deref().unwrap_or(DEFAULT_APP_URL)) {
            Ok(u) => u,
            Err(e) => {
                self.error(loc, Some("app_url"), None, format!("`app_url`: {e}"));
                http::Uri::from_static(DEFAULT_APP_URL)
            }
        };
        let http = HttpLimits {
            header_read_timeout: self.duration(loc, "header_read_timeout", None, &raw.header_read_timeout, Duration::from_secs(10)),
            max_headers: raw.max_headers.unwrap_or(100),
            max_header_bytes: self.size(loc, "max_header_bytes", None, &raw.max_header_bytes, 64 << 10),
            idle_timeout: self.duration(loc, "idle_timeout", None, &raw.idle_timeout, Duration::from_secs(90)),
            max_connections: raw.max_connections.unwrap_or(1024),
        };
        if http.max_headers == 0 || http.max_connections == 0 {
            self.error(loc, None, None, "`max_headers` and `max_connections` must be at least 1");
        }
        if http.max_header_bytes < 8192 {
            self.error(loc, Some("max_header_bytes"), None, "`max_header_bytes` must be at least 8KiB");
        }
        Sidecar {
            service: raw.service,
            listen,
            admin_listen,
            app_url,
            drain_timeout: self.duration(loc, "drain_timeout", None, &raw.drain_timeout, Duration::from_secs(30)),
            provision: raw.provision,
            max_inflight_publishes: raw.max_inflight_publishes.unwrap_or(4096).max(1),
            http,
        }
    }

    fn nats(&mut self, raw: RawNats, loc: Loc) -> Nats {
        let servers = raw.servers.unwrap_or_else(|| vec![DEFAULT_NATS_URL.to_owned()]);
        if servers.is_empty() {
            self.error(loc, Some("servers"), None, "`servers` must name at least one server");
        }
        for s in &servers {
            if !(s.starts_with("nats://")
                || s.starts_with("tls://")
                || s.starts_with("ws://")
                || s.starts_with("wss://")
                || !s.contains("://"))
            {
                self.error(loc, Some("servers"), None, format!("server {s:?} must be nats://, tls://, ws:// or wss://"));
            }
        }
        let secret = |file: Option<String>, env: Option<String>| -> Result<Option<Secret>, String> {
            match (file, env) {
                (Some(_), Some(_)) => Err("set the file or the environment variable, not both".into()),
                (Some(f), None) => Ok(Some(Secret::File(f.into()))),
                (None, Some(e)) => Ok(Some(Secret::Env(e))),
                (None, None) => Ok(None),
            }
        };
        let mut kinds = Vec::new();
        let token = secret(raw.token_file, raw.token_env);
        let password = secret(raw.password_file, raw.password_env);
        let nkey = secret(raw.nkey_seed_file, raw.nkey_seed_env);
        let mut auth = NatsAuth::None;
        for (key, r) in [("token", &token), ("password", &password), ("nkey_seed", &nkey)] {
            if let Err(e) = r {
                self.error(loc, Some(&format!("{key}_file")), None, format!("`{key}`: {e}"));
            }
        }
        if let Ok(Some(t)) = token {
            kinds.push("token");
            auth = NatsAuth::Token(t);
        }
        match (raw.user, password) {
            (Some(user), Ok(Some(password))) => {
                kinds.push("user/password");
                auth = NatsAuth::UserPassword { user, password };
            }
            (Some(_), Ok(None)) => self.error(loc, Some("user"), None, "`user` needs `password_file` or `password_env`"),
            (None, Ok(Some(_))) => self.error(loc, Some("user"), None, "a password needs `user`"),
            _ => {}
        }
        if let Ok(Some(n)) = nkey {
            kinds.push("nkey");
            auth = NatsAuth::NkeySeed(n);
        }
        if let Some(c) = raw.creds_file {
            kinds.push("creds");
            auth = NatsAuth::Credentials(c.into());
        }
        if kinds.len() > 1 {
            self.error(loc, None, None, format!("choose one NATS authentication, not {}", kinds.join(" and ")));
        }
        let tls = raw.tls.map(|t| {
            if t.cert_file.is_some() != t.key_file.is_some() {
                self.error(loc, Some("cert_file"), None, "TLS `cert_file` and `key_file` go together");
            }
            NatsTls {
                ca_file: t.ca_file.map(Into::into),
                cert_file: t.cert_file.map(Into::into),
                key_file: t.key_file.map(Into::into),
                require: t.require,
            }
        });
        Nats {
            servers,
            connect_timeout: self.duration(loc, "connect_timeout", None, &raw.connect_timeout, Duration::from_secs(5)),
            auth,
            tls,
        }
    }

    fn outbound(&mut self, raw: RawOutbound, loc: Loc, defaults: &Defaults) -> Option<Outbound> {
        let name = raw.name.clone();
        let route = Some(name.as_str());
        let errors_before = self.errors.len();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            self.error(loc, Some("name"), route, "`name` must be letters, digits, '-' or '_'");
        }
        let method = raw.method.as_deref().and_then(|m| match http::Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
            Ok(m) => Some(m),
            Err(_) => {
                self.error(loc, Some("method"), route, format!("`method` {m:?} is not an HTTP method"));
                None
            }
        });
        let host = raw.host.as_deref().map(|h| {
            let h = h.trim().to_ascii_lowercase();
            let h = strip_port(&h).to_owned();
            if h.is_empty() || h.contains('/') || h.contains(' ') {
                self.error(loc, Some("host"), route, format!("`host` {h:?} is not a host name"));
            }
            h
        });
        let captures = match subject::path_captures(&raw.path) {
            Ok(c) => c,
            Err(e) => {
                self.error(loc, Some("path"), route, format!("`path` {:?} can never match: {e}", raw.path));
                Vec::new()
            }
        };
        let timeout = self.duration(loc, "timeout", route, &raw.timeout, defaults.timeout);
        let max_body = self.size(loc, "max_body", route, &raw.max_body, defaults.max_body);
        if timeout.is_zero() {
            self.error(loc, Some("timeout"), route, "`timeout` must be more than zero");
        }
        let mode = raw.mode.as_str();
        let subject_template = |cx: &mut Self| -> Option<SubjectTemplate> {
            let Some(s) = raw.subject.as_deref() else {
                cx.error(loc, None, route, format!("mode \"{mode}\" needs `subject`"));
                return None;
            };
            match SubjectTemplate::parse(s) {
                Ok(t) => {
                    for cap in t.captures() {
                        if !captures.iter().any(|c| c == cap) {
                            cx.error(loc, Some("subject"), route, format!("`subject` uses {{{cap}}}, which `path` does not define"));
                        }
                    }
                    Some(t)
                }
                Err(e) => {
                    cx.error(loc, Some("subject"), route, format!("`subject` {s:?} is not a valid NATS subject: {e}"));
                    None
                }
            }
        };
        let unexpected = |cx: &mut Self, key: &str, present: bool| {
            if present {
                cx.error(loc, Some(key), route, format!("`{key}` does not apply to mode \"{mode}\""));
            }
        };
        let target = match mode {
            "request" | "publish" | "jetstream" => {
                unexpected(self, "service", raw.service.is_some());
                unexpected(self, "upstream", raw.upstream.is_some());
                let t = subject_template(self);
                t.map(|t| match mode {
                    "request" => OutboundTarget::Request(t),
                    "publish" => OutboundTarget::Publish(t),
                    _ => OutboundTarget::JetStream(t),
                })
            }
            "tunnel" => {
                unexpected(self, "subject", raw.subject.is_some());
                unexpected(self, "upstream", raw.upstream.is_some());
                match raw.service {
                    Some(s) if subject::is_valid_token(&s) => {
                        Some(OutboundTarget::Tunnel { subject: format!("{TUNNEL_PREFIX}.{s}"), service: s })
                    }
                    Some(s) => {
                        self.error(loc, Some("service"), route, format!("`service` {s:?} must be one subject token"));
                        None
                    }
                    None => {
                        self.error(loc, None, route, "mode \"tunnel\" needs `service` (the target's sidecar service)");
                        None
                    }
                }
            }
            "http" => {
                unexpected(self, "subject", raw.subject.is_some());
                unexpected(self, "service", raw.service.is_some());
                match raw.upstream.as_deref().map(parse_http_url) {
                    Some(Ok(upstream)) => Some(OutboundTarget::Http { upstream }),
                    Some(Err(e)) => {
                        self.error(loc, Some("upstream"), route, format!("`upstream`: {e}"));
                        None
                    }
                    None => {
                        self.error(loc, None, route, "mode \"http\" needs `upstream`");
                        None
                    }
                }
            }
            other => {
                self.error(
                    loc,
                    Some("mode"),
                    route,
                    format!("unknown mode {other:?}; expected request, publish, jetstream, tunnel or http"),
                );
                None
            }
        };
        if self.errors.len() > errors_before {
            return None;
        }
        Some(Outbound { name, line: self.line_of(loc.start), method, host, path: raw.path, target: target?, timeout, max_body })
    }

    fn inbound(&mut self, raw: RawInbound, loc: Loc, defaults: &Defaults, service: &str) -> Option<Inbound> {
        let name = raw.name.clone();
        let route = Some(name.as_str());
        let errors_before = self.errors.len();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            self.error(loc, Some("name"), route, "`name` must be letters, digits, '-' or '_'");
        }
        let mode = raw.mode.as_str();
        let mode_name = match mode {
            "request" => InboundModeName::Request,
            "tunnel" => InboundModeName::Tunnel,
            "jetstream" => InboundModeName::JetStream,
            other => {
                self.error(loc, Some("mode"), route, format!("unknown mode {other:?}; expected request, tunnel or jetstream"));
                return None;
            }
        };
        let unexpected = |cx: &mut Self, key: &str, present: bool| {
            if present {
                cx.error(loc, Some(key), route, format!("`{key}` does not apply to mode \"{mode}\""));
            }
        };
        let subject_str = match (mode_name, raw.subject.as_deref()) {
            (InboundModeName::Tunnel, None) => format!("{TUNNEL_PREFIX}.{service}"),
            (_, Some(s)) => s.to_owned(),
            (_, None) => {
                self.error(loc, None, route, format!("mode \"{mode}\" needs `subject`"));
                return None;
            }
        };
        let subject = match SubjectPattern::parse(&subject_str) {
            Ok(s) => Some(s),
            Err(e) => {
                self.error(loc, Some("subject"), route, format!("`subject` {subject_str:?} is not a valid NATS subject: {e}"));
                None
            }
        };
        let method = match mode_name {
            InboundModeName::Tunnel => {
                unexpected(self, "method", raw.method.is_some());
                unexpected(self, "path", raw.path.is_some());
                http::Method::GET
            }
            _ => {
                let m = raw.method.as_deref().unwrap_or("POST");
                http::Method::from_bytes(m.to_ascii_uppercase().as_bytes()).unwrap_or_else(|_| {
                    self.error(loc, Some("method"), route, format!("`method` {m:?} is not an HTTP method"));
                    http::Method::POST
                })
            }
        };
        let path = match (mode_name, raw.path.as_deref()) {
            (InboundModeName::Tunnel, _) => PathTemplate::parse("/").ok(),
            (_, None) => {
                self.error(loc, None, route, format!("mode \"{mode}\" needs `path` (the app's path)"));
                None
            }
            (_, Some(p)) => match PathTemplate::parse(p) {
                Ok(t) => {
                    if let Some(s) = &subject {
                        if let Some(max) = t.max_token() {
                            if !s.has_token(max) {
                                self.error(
                                    loc,
                                    Some("path"),
                                    route,
                                    format!("`path` uses {{{max}}} but `subject` {subject_str:?} has only {} tokens", s.len()),
                                );
                            }
                        }
                    }
                    Some(t)
                }
                Err(e) => {
                    self.error(loc, Some("path"), route, format!("`path` {p:?}: {e}"));
                    None
                }
            },
        };
        let concurrency = raw.concurrency.unwrap_or(64);
        if concurrency == 0 {
            self.error(loc, Some("concurrency"), route, "`concurrency` must be at least 1");
        }
        let max_body = self.size(loc, "max_body", route, &raw.max_body, defaults.max_body);
        let queue = raw.queue.clone().unwrap_or_else(|| service.to_owned());
        if raw.queue.as_deref().is_some_and(|q| !subject::is_valid_token(q)) {
            self.error(loc, Some("queue"), route, "`queue` must be one subject token");
        }
        let jet_keys = [
            ("stream", raw.stream.is_some()),
            ("durable", raw.durable.is_some()),
            ("max_deliver", raw.max_deliver.is_some()),
            ("backoff", raw.backoff.is_some()),
            ("ack_wait", raw.ack_wait.is_some()),
            ("max_ack_pending", raw.max_ack_pending.is_some()),
            ("dead_letter", raw.dead_letter.is_some()),
        ];
        let (mode_v, timeout) = match mode_name {
            InboundModeName::Request | InboundModeName::Tunnel => {
                for (k, present) in jet_keys {
                    unexpected(self, k, present);
                }
                let timeout = self.duration(loc, "timeout", route, &raw.timeout, defaults.timeout);
                let m = if mode_name == InboundModeName::Request { InboundMode::Request { queue } } else { InboundMode::Tunnel { queue } };
                (Some(m), timeout)
            }
            InboundModeName::JetStream => {
                unexpected(self, "queue", raw.queue.is_some());
                let ack_wait = self.duration(loc, "ack_wait", route, &raw.ack_wait, Duration::from_secs(30));
                let backoff: Vec<Duration> = raw
                    .backoff
                    .iter()
                    .flatten()
                    .map(|b| self.duration(loc, "backoff", route, &Some(b.clone()), Duration::from_secs(1)))
                    .collect();
                let max_deliver = raw.max_deliver.unwrap_or(5);
                if max_deliver < 1 {
                    self.error(loc, Some("max_deliver"), route, "`max_deliver` must be at least 1");
                }
                if !backoff.is_empty() && backoff.len() as i64 >= max_deliver {
                    // Delay n is used before delivery n+1, so steps past max_deliver-1 never apply.
                    self.warn(loc, Some("backoff"), route, format!("`backoff` has {} steps but only {} redeliveries happen (max_deliver {max_deliver}); the extra steps are unused", backoff.len(), max_deliver - 1));
                }
                if ack_wait < Duration::from_secs(1) {
                    self.error(loc, Some("ack_wait"), route, "`ack_wait` must be at least 1s");
                }
                // Knative's rule: the call must end before the server redelivers.
                let derived = ack_wait.saturating_sub(Duration::from_millis(200));
                let timeout = match &raw.timeout {
                    // A handler may run past ack_wait: in-progress acks keep the message.
                    Some(_) => self.duration(loc, "timeout", route, &raw.timeout, derived),
                    None => derived,
                };
                let stream = raw.stream.clone().unwrap_or_default();
                if raw.stream.is_none() {
                    self.error(loc, None, route, "mode \"jetstream\" needs `stream`");
                } else if !is_valid_stream_name(&stream) {
                    self.error(loc, Some("stream"), route, format!("`stream` {stream:?} is not a valid stream name"));
                }
                let durable = raw.durable.clone().unwrap_or_else(|| format!("{service}-{name}"));
                if !is_valid_stream_name(&durable) {
                    self.error(loc, Some("durable"), route, format!("`durable` {durable:?} is not a valid consumer name"));
                }
                let dead_letter = raw.dead_letter.clone().unwrap_or_else(|| format!("dlq.{service}.{name}"));
                match SubjectPattern::parse(&dead_letter) {
                    Ok(p) if !p.has_wildcards() => {}
                    _ => self.error(
                        loc,
                        Some("dead_letter"),
                        route,
                        format!("`dead_letter` {dead_letter:?} must be a subject without wildcards"),
                    ),
                }
                let max_ack_pending = raw.max_ack_pending.unwrap_or(concurrency as i64 * 2);
                (
                    Some(InboundMode::JetStream(Consumer {
                        stream,
                        durable,
                        max_deliver,
                        backoff,
                        ack_wait,
                        max_ack_pending,
                        dead_letter,
                    })),
                    timeout,
                )
            }
        };
        let idempotency = raw.idempotency.as_ref().and_then(|i| {
            let key = if let Some(h) = i.key.strip_prefix("header:") {
                http::HeaderName::from_bytes(h.as_bytes()).ok().map(|_| IdempotencyKey::Header(h.to_owned()))
            } else if i.key == "msg-id" {
                Some(IdempotencyKey::MsgId)
            } else if let Some(p) = i.key.strip_prefix("json:") {
                (p.is_empty() || p.starts_with('/')).then(|| IdempotencyKey::Json(p.to_owned()))
            } else {
                None
            };
            let Some(key) = key else {
                self.error(
                    loc,
                    Some("idempotency"),
                    route,
                    format!("idempotency `key` {:?} must be header:<Name>, msg-id or json:<pointer>", i.key),
                );
                return None;
            };
            if mode_name == InboundModeName::Tunnel && key != IdempotencyKey::MsgId {
                // Fine: tunnels carry headers, so header keys work too.
            }
            let ttl = self.duration(loc, "idempotency", route, &i.ttl, Duration::from_secs(24 * 3600));
            Some(Idempotency { key, ttl })
        });
        if self.errors.len() > errors_before {
            return None;
        }
        Some(Inbound {
            name,
            line: self.line_of(loc.start),
            subject: subject?,
            mode: mode_v?,
            method,
            path: path?,
            concurrency,
            timeout,
            max_body,
            idempotency,
        })
    }

    fn stream(&mut self, raw: RawStream, loc: Loc) -> Option<StreamSpec> {
        let name = raw.name.clone();
        let route = Some(name.as_str());
        let before = self.errors.len();
        if !is_valid_stream_name(&name) {
            self.error(loc, Some("name"), route, format!("stream name {name:?} must not contain '.', '*', '>', '/', '\\' or spaces"));
        }
        if raw.subjects.is_empty() {
            self.error(loc, Some("subjects"), route, "`subjects` must list at least one subject");
        }
        let subjects: Vec<SubjectPattern> = raw
            .subjects
            .iter()
            .filter_map(|s| match SubjectPattern::parse(s) {
                Ok(p) => Some(p),
                Err(e) => {
                    self.error(loc, Some("subjects"), route, format!("{s:?} is not a valid NATS subject: {e}"));
                    None
                }
            })
            .collect();
        let storage = self.storage(loc, route, &raw.storage);
        let retention = match raw.retention.as_deref() {
            None | Some("limits") => Retention::Limits,
            Some("interest") => Retention::Interest,
            Some("workqueue") => Retention::WorkQueue,
            Some(o) => {
                self.error(loc, Some("retention"), route, format!("`retention` must be limits, interest or workqueue, not {o:?}"));
                Retention::Limits
            }
        };
        let replicas = raw.replicas.unwrap_or(1);
        if !(1..=5).contains(&replicas) {
            self.error(loc, Some("replicas"), route, "`replicas` must be 1 to 5");
        }
        let max_age = raw.max_age.as_ref().map(|_| self.duration(loc, "max_age", route, &raw.max_age, Duration::ZERO));
        let max_bytes = raw.max_bytes.as_ref().map(|_| self.size(loc, "max_bytes", route, &raw.max_bytes, 0) as i64);
        let duplicate_window = self.duration(loc, "duplicate_window", route, &raw.duplicate_window, Duration::from_secs(120));
        if self.errors.len() > before {
            return None;
        }
        Some(StreamSpec {
            name,
            line: self.line_of(loc.start),
            subjects,
            storage,
            replicas,
            retention,
            max_age,
            max_bytes,
            max_msgs: raw.max_msgs,
            duplicate_window,
        })
    }

    fn dead_letter(&mut self, raw: RawDeadLetter, loc: Loc) -> DeadLetterStream {
        let stream = raw.stream.unwrap_or_else(|| "DLQ".to_owned());
        if !is_valid_stream_name(&stream) {
            self.error(loc, Some("stream"), None, format!("[dead_letter] `stream` {stream:?} is not a valid stream name"));
        }
        let subjects = raw
            .subjects
            .unwrap_or_else(|| vec!["dlq.>".to_owned()])
            .iter()
            .filter_map(|s| match SubjectPattern::parse(s) {
                Ok(p) => Some(p),
                Err(e) => {
                    self.error(loc, Some("subjects"), None, format!("[dead_letter] {s:?}: {e}"));
                    None
                }
            })
            .collect();
        let replicas = raw.replicas.unwrap_or(1);
        DeadLetterStream {
            stream,
            subjects,
            storage: self.storage(loc, None, &raw.storage),
            replicas,
            max_age: raw.max_age.as_ref().map(|_| self.duration(loc, "max_age", None, &raw.max_age, Duration::ZERO)),
            max_bytes: raw.max_bytes.as_ref().map(|_| self.size(loc, "max_bytes", None, &raw.max_bytes, 0) as i64),
        }
    }

    fn idempotency_store(&mut self, raw: RawIdempotencyStore, loc: Loc) -> IdempotencyStore {
        let bucket = raw.bucket.unwrap_or_else(|| "natsbridge_idempotency".to_owned());
        if bucket.is_empty() || !bucket.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            self.error(loc, Some("bucket"), None, format!("[idempotency] `bucket` {bucket:?} must be letters, digits, '-' or '_'"));
        }
        IdempotencyStore {
            bucket,
            replicas: raw.replicas.unwrap_or(1),
            claim_ttl: self.duration(loc, "claim_ttl", None, &raw.claim_ttl, Duration::from_secs(60)),
            max_response_bytes: self.size(loc, "max_response_bytes", None, &raw.max_response_bytes, 64 << 10),
            storage: self.storage(loc, None, &raw.storage),
        }
    }

    /// Route names are unique across outbound and inbound, checked on the raw tables so a
    /// duplicate is reported even when the route has errors of its own.
    fn check_raw_names<'v>(&mut self, routes: impl Iterator<Item = &'v Spanned<toml::Value>>) {
        let mut seen: HashMap<String, usize> = HashMap::new();
        for v in routes {
            let Some(name) = v.get_ref().get("name").and_then(|n| n.as_str()) else { continue };
            let loc = Loc { start: v.span().start };
            let line = self.line_of(loc.start);
            match seen.get(name) {
                Some(first) => {
                    let first = *first;
                    self.error(loc, Some("name"), Some(name), format!("duplicate route name; first defined at line {first}"));
                }
                None => {
                    seen.insert(name.to_owned(), line);
                }
            }
        }
    }

    fn check_names(&mut self, inbound: &[(Inbound, Loc)], streams: &[StreamSpec]) {
        let mut stream_names: HashMap<&str, usize> = HashMap::new();
        for s in streams {
            if let Some(first) = stream_names.insert(&s.name, s.line) {
                self.errors.push(Diagnostic {
                    file: self.file.to_owned(),
                    line: s.line,
                    route: Some(s.name.clone()),
                    message: format!("duplicate stream name; first defined at line {first}"),
                });
            }
        }
        let mut durables: HashMap<(&str, &str), &str> = HashMap::new();
        for (i, loc) in inbound {
            if let InboundMode::JetStream(c) = &i.mode {
                if let Some(other) = durables.insert((&c.stream, &c.durable), &i.name) {
                    self.error(
                        *loc,
                        Some("durable"),
                        Some(&i.name),
                        format!("durable {:?} on stream {:?} is already used by route \"{other}\"", c.durable, c.stream),
                    );
                }
            }
        }
    }

    /// Two routes overlap when one request could match both and nothing decides between
    /// them: same host (or both none), the same path shape, and methods that intersect.
    fn check_overlaps(&mut self, outbound: &[(Outbound, Loc)]) {
        let mut by_shape: BTreeMap<(Option<&str>, String), Vec<usize>> = BTreeMap::new();
        for (idx, (o, _)) in outbound.iter().enumerate() {
            by_shape.entry((o.host.as_deref(), subject::path_shape(&o.path))).or_default().push(idx);
        }
        for idxs in by_shape.values() {
            for (n, &b) in idxs.iter().enumerate() {
                for &a in &idxs[..n] {
                    let (ra, _) = &outbound[a];
                    let (rb, lb) = &outbound[b];
                    let shadowed = match (&ra.method, &rb.method) {
                        (None, _) => true,
                        (Some(x), Some(y)) => x == y,
                        (Some(_), None) => false,
                    };
                    let overlap = shadowed || rb.method.is_none();
                    if shadowed {
                        self.error(
                            *lb,
                            Some("path"),
                            Some(&rb.name),
                            format!("can never match: route \"{}\" (line {}) takes every request it would", ra.name, ra.line),
                        );
                    } else if overlap {
                        self.error(
                            *lb,
                            Some("path"),
                            Some(&rb.name),
                            format!("overlaps route \"{}\" (line {}): same host and path, methods intersect", ra.name, ra.line),
                        );
                    }
                }
            }
        }
        // matchit refuses some shapes that are not literally the same (e.g. two different
        // catch-alls or conflicting parameter names at one position): report those too.
        let mut routers: HashMap<Option<&str>, matchit::Router<usize>> = HashMap::new();
        let mut inserted: HashMap<(Option<&str>, String), ()> = HashMap::new();
        for (o, loc) in outbound {
            let key = (o.host.as_deref(), subject::path_shape(&o.path));
            if inserted.insert(key, ()).is_some() {
                continue;
            }
            let router = routers.entry(o.host.as_deref()).or_default();
            if let Err(e) = router.insert(o.path.as_str(), 0) {
                self.error(*loc, Some("path"), Some(&o.name), format!("`path` {:?} conflicts with another route: {e}", o.path));
            }
        }
    }

    fn check_inbound_overlaps(&mut self, inbound: &[(Inbound, Loc)]) {
        let mut seen: HashMap<(String, String), &str> = HashMap::new();
        for (i, loc) in inbound {
            let group = match &i.mode {
                InboundMode::Request { queue } | InboundMode::Tunnel { queue } => queue.clone(),
                InboundMode::JetStream(_) => continue,
            };
            if let Some(other) = seen.insert((i.subject.as_str().to_owned(), group), &i.name) {
                self.error(
                    *loc,
                    Some("subject"),
                    Some(&i.name),
                    format!("subscribes to the same subject and queue as route \"{other}\"; each message would reach only one of them"),
                );
            }
        }
    }

    fn check_coverage(&mut self, outbound: &[(Outbound, Loc)], inbound: &[(Inbound, Loc)], streams: &[StreamSpec], dl: &DeadLetterStream) {
        let stream_names: BTreeSet<&str> = streams.iter().map(|s| s.name.as_str()).collect();
        for (o, loc) in outbound {
            if let OutboundTarget::JetStream(t) = &o.target {
                let probe = t.probe();
                if !streams.iter().any(|s| s.subjects.iter().any(|p| p.matches(&probe))) {
                    self.warn(
                        *loc,
                        Some("subject"),
                        Some(&o.name),
                        format!("no [[streams]] entry captures {:?}; publishes will answer 503 unless the stream exists", t.as_str()),
                    );
                }
            }
        }
        for (i, loc) in inbound {
            if let InboundMode::JetStream(c) = &i.mode {
                if !stream_names.contains(c.stream.as_str()) {
                    self.warn(
                        *loc,
                        Some("stream"),
                        Some(&i.name),
                        format!("stream {:?} is not declared in [[streams]]; it must exist already", c.stream),
                    );
                } else if let Some(s) = streams.iter().find(|s| s.name == c.stream) {
                    if !s.subjects.iter().any(|p| p.covers(&i.subject)) {
                        self.warn(
                            *loc,
                            Some("subject"),
                            Some(&i.name),
                            format!("stream {:?} does not capture {:?}", c.stream, i.subject.as_str()),
                        );
                    }
                }
                if !dl.subjects.iter().any(|p| SubjectPattern::parse(&c.dead_letter).is_ok_and(|d| p.covers(&d))) {
                    self.error(
                        *loc,
                        Some("dead_letter"),
                        Some(&i.name),
                        format!(
                            "dead letters to {:?} would not be captured by the dead-letter stream {:?} (subjects {})",
                            c.dead_letter,
                            dl.stream,
                            dl.subjects.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                        ),
                    );
                }
                if streams.iter().any(|s| s.subjects.iter().any(|p| SubjectPattern::parse(&c.dead_letter).is_ok_and(|d| p.covers(&d)))) {
                    self.error(
                        *loc,
                        Some("dead_letter"),
                        Some(&i.name),
                        format!(
                            "dead-letter subject {:?} is also captured by a [[streams]] entry; two streams cannot share a subject",
                            c.dead_letter
                        ),
                    );
                }
                if let Some(idem) = &i.idempotency {
                    if let Some(s) = streams.iter().find(|s| s.name == c.stream) {
                        if s.duplicate_window < idem.ttl {
                            self.warn(*loc, Some("idempotency"), Some(&i.name), format!(
                                "stream {:?} duplicate_window {} is shorter than the idempotency ttl {}; publisher retries after the window are caught only by the KV store",
                                s.name, humantime::format_duration(s.duplicate_window), humantime::format_duration(idem.ttl)));
                        }
                    }
                }
            }
        }
    }
}

/// Parses `5s`, `250ms`, `2m`, `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?} is not a duration like \"5s\" or \"250ms\" ({e})"))
}

/// Parses `1MiB`, `512KiB`, `64KB`, `1048576`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num.parse().map_err(|_| format!("{s:?} is not a size like \"1MiB\""))?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        _ => return Err(format!("{s:?} has an unknown unit; use B, KiB, MiB, GiB, KB, MB or GB")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

fn parse_http_url(s: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL ({e})"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{s:?} must be an http:// URL"));
    }
    if uri.authority().is_none() {
        return Err(format!("{s:?} has no host"));
    }
    Ok(uri)
}

/// `host:port` → `host`; keeps bracketed IPv6 literals whole.
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // An IPv6 literal; without its ']' (a malformed Host header) keep it whole. The
        // old slice panicked there (found by fuzzing).
        return host.find(']').map(|end| &host[..=end]).unwrap_or(host);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

fn is_valid_stream_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && !s.chars().any(|c| matches!(c, '.' | '*' | '>' | '/' | '\\') || c.is_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[sidecar]\nservice = \"orchestration\"\n";

    fn errors(src: &str) -> Vec<String> {
        match parse(src, "t.toml") {
            Ok(_) => Vec::new(),
            Err(e) => e.diagnostics.iter().map(|d| d.to_string()).collect(),
        }
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let c = parse(MINIMAL, "t.toml").unwrap();
        assert_eq!(c.sidecar.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.nats.servers, vec![DEFAULT_NATS_URL.to_owned()]);
        assert_eq!(c.defaults.timeout, Duration::from_secs(5));
        assert_eq!(c.defaults.max_body, 1 << 20);
        assert_eq!(c.dead_letter.stream, "DLQ");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("64KB").unwrap(), 64_000);
        assert_eq!(parse_size("17").unwrap(), 17);
        assert!(parse_size("1XB").is_err());
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn all_errors_are_reported_at_once_with_lines_and_names() {
        let src = format!(
            "{MINIMAL}\n[[outbound]]\nname = \"a\"\npath = \"/a\"\nmode = \"request\"\nsubject = \"a..b\"\n\n[[outbound]]\nname = \"b\"\npath = \"/b\"\nmode = \"teleport\"\n\n[[outbound]]\nname = \"c\"\npath = \"/c\"\nmode = \"publish\"\nsubject = \"c\"\nbogus = 1\n"
        );
        let e = errors(&src);
        assert_eq!(e.len(), 3, "{e:#?}");
        assert!(e[0].starts_with("t.toml:8: route \"a\": `subject`"), "{}", e[0]);
        assert!(e[1].starts_with("t.toml:13: route \"b\": unknown mode"), "{}", e[1]);
        assert!(e[2].starts_with("t.toml:20: route \"c\": [[outbound]]: unknown field `bogus`"), "{}", e[2]);
    }

    #[test]
    fn capture_missing_from_path_is_rejected() {
        let src = format!("{MINIMAL}[[outbound]]\nname = \"x\"\npath = \"/a/{{id}}\"\nsubject = \"a.{{other}}\"\nmode = \"request\"\n");
        let e = errors(&src);
        assert_eq!(e.len(), 1);
        assert!(e[0].contains("uses {other}, which `path` does not define"), "{}", e[0]);
        assert!(e[0].starts_with("t.toml:6:"), "{}", e[0]);
    }

    #[test]
    fn duplicate_and_overlapping_routes() {
        let src = format!(
            "{MINIMAL}[[outbound]]\nname = \"x\"\npath = \"/a/{{id}}\"\nsubject = \"a\"\nmode = \"publish\"\n\
             [[outbound]]\nname = \"x\"\nmethod = \"POST\"\npath = \"/b\"\nsubject = \"b\"\nmode = \"publish\"\n\
             [[outbound]]\nname = \"y\"\nmethod = \"POST\"\npath = \"/a/{{other}}\"\nsubject = \"a\"\nmode = \"publish\"\n\
             [[outbound]]\nname = \"z\"\npath = \"/b\"\nsubject = \"b\"\nmode = \"publish\"\n\
             [[outbound]]\nname = \"h\"\nhost = \"svc:8080\"\npath = \"/b\"\nsubject = \"b\"\nmode = \"publish\"\n"
        );
        let e = errors(&src);
        assert!(e.iter().any(|m| m.contains("route \"x\": duplicate route name")), "{e:#?}");
        assert!(e.iter().any(|m| m.contains("route \"y\": can never match")), "{e:#?}");
        assert!(e.iter().any(|m| m.contains("route \"z\": overlaps route \"x\"")), "{e:#?}");
        // A host-specific route is not an overlap.
        assert!(!e.iter().any(|m| m.contains("route \"h\"")), "{e:#?}");
    }

    #[test]
    fn mode_specific_keys() {
        let src = format!(
            "{MINIMAL}[[outbound]]\nname = \"t\"\npath = \"/t\"\nmode = \"tunnel\"\n\
             [[outbound]]\nname = \"h\"\npath = \"/h\"\nmode = \"http\"\nsubject = \"x\"\nupstream = \"http://127.0.0.1:1\"\n"
        );
        let e = errors(&src);
        assert!(e.iter().any(|m| m.contains("\"t\": mode \"tunnel\" needs `service`")), "{e:#?}");
        assert!(e.iter().any(|m| m.contains("\"h\": `subject` does not apply")), "{e:#?}");
    }

    #[test]
    fn inbound_routes_validate_tokens_and_jetstream_defaults() {
        let src = format!(
            "{MINIMAL}[[inbound]]\nname = \"agent\"\nsubject = \"agent.*.execution.requested\"\nmode = \"request\"\npath = \"/agents/{{2}}/execute\"\n\
             [[inbound]]\nname = \"bad\"\nsubject = \"a.b\"\nmode = \"request\"\npath = \"/x/{{3}}\"\n"
        );
        let e = errors(&src);
        assert_eq!(e.len(), 1, "{e:#?}");
        assert!(e[0].contains("route \"bad\": `path` uses {3}"), "{e:#?}");

        let src = format!(
            "{MINIMAL}[[inbound]]\nname = \"tool\"\nsubject = \"tool.execution.requested\"\nmode = \"jetstream\"\nstream = \"TOOL\"\npath = \"/tools\"\nack_wait = \"10s\"\n"
        );
        let c = parse(&src, "t.toml").unwrap();
        let InboundMode::JetStream(consumer) = &c.inbound[0].mode else { panic!() };
        assert_eq!(consumer.durable, "orchestration-tool");
        assert_eq!(consumer.dead_letter, "dlq.orchestration.tool");
        assert_eq!(c.inbound[0].timeout, Duration::from_millis(9800));
        assert!(c.warnings.iter().any(|w| w.message.contains("not declared in [[streams]]")));
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let e = errors("[sidecar]\nservice = \"x\"\nlisten = \n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("t.toml:3:"), "{}", e[0]);
    }

    #[test]
    fn secrets_are_never_inline() {
        let e = errors(&format!("{MINIMAL}[nats]\ntoken = \"hunter2\"\n"));
        assert!(e[0].contains("unknown field `token`"), "{e:#?}");
        let c = parse(&format!("{MINIMAL}[nats]\ntoken_env = \"NATS_TOKEN\"\n"), "t").unwrap();
        assert_eq!(c.nats.auth, NatsAuth::Token(Secret::Env("NATS_TOKEN".into())));
    }

    #[test]
    fn strip_port_handles_ipv6() {
        assert_eq!(strip_port("svc:80"), "svc");
        assert_eq!(strip_port("svc"), "svc");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
    }
}
