//! The validated route types: outbound (egress) routes with their modes, codecs and
//! limits, and inbound (ingress) routes with their consumers, policies and idempotency.
//! Built by `validate`; read by everything that routes.

use std::time::Duration;

use crate::subject::{PathTemplate, SubjectPattern, SubjectTemplate};

use super::Cutover;

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
    /// Messages an HTTP client may be behind for up to a second, or four times that at once,
    /// before the stream is ended as too slow (`stream_buffer`, 256).
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
