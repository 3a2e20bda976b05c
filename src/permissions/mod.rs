//! Least privilege: the NATS publish and subscribe allow-lists one service's sidecar needs,
//! derived from its routing file, and written as a nats-server `authorization` block or as
//! `nsc` flags (see [`render`]).
//!
//! Pure: nothing here talks to a server. What a route needs follows what the code does:
//! - every request, JetStream publish, KV write and API call expects its answer on the
//!   client's inbox (`<inbox prefix>.>`, `_INBOX` unless `[nats] inbox_prefix`);
//! - egress publishes to its routes' subjects (a capture is one token: `*`), and a tunnel
//!   route to `natsbridge.tunnel.<service>`; a jetstream route's start-up check lists
//!   streams by subject (`$JS.API.STREAM.NAMES`);
//! - request and tunnel ingress subscribes in its queue group and answers reply subjects
//!   under the route's `reply_prefixes`;
//! - jetstream ingress reads its stream and consumer, creates or updates its durable (it
//!   does so even without provisioning), pulls, acks on `$JS.ACK.<stream>.<durable>.>`,
//!   and publishes dead letters (checking the dead-letter stream exists);
//! - idempotency reads and writes the KV bucket (`$KV.<bucket>.>`, stream `KV_<bucket>`);
//! - request and tunnel egress may read a streamed reply, and ends one it stops reading
//!   with `Bridge-Stream: cancel` to the responder's control subject, which lives under the
//!   *responder's* inbox: no subject list can name it, so the reader gets the server's
//!   response permission instead (`allow_responses`: it may answer, once each, the reply
//!   subject of a message it received, and every stream message carries the control
//!   subject as its reply subject), for as long as a stream may go quiet (`stream_stall`);
//! - request and tunnel egress honour `Prefer: respond-async`: they read and write the
//!   operations bucket (`$KV.natsbridge_operations.>`, and watch it for `Prefer: wait`);
//!   it is created by `natsbridge provision` (or `provision = true`), never by a user
//!   without that, so a sidecar that is not allowed to provision never tries in vain;
//! - request ingress also answers NATS micro discovery (`$SRV.*`, by service name and id);
//! - `[sidecar] provision = true` adds account info and creating/updating the streams,
//!   the dead-letter stream and the bucket. Never a delete: the sidecar never forces.

pub mod render;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::{Config, InboundMode, Outbound, OutboundTarget};
use crate::subject::SubjectPattern;

/// The inbox prefix of NATS clients when `[nats] inbox_prefix` is not set.
pub const DEFAULT_INBOX_PREFIX: &str = "_INBOX";

/// The server's response permission (`allow_responses`): publishing to the reply subject of
/// a message received, `max` times each, within `expires` of receiving it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Responses {
    pub max: usize,
    pub expires: Duration,
    pub why: Vec<String>,
}

/// One service's allow-lists. Each subject carries why it is there (routes, resources),
/// which the NATS config output prints as comments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// The service name, also the NATS user name.
    pub service: String,
    /// Subject → reasons, sorted by subject.
    pub publish: BTreeMap<String, Vec<String>>,
    /// Subject (optionally `"<subject> <queue>"`) → reasons.
    pub subscribe: BTreeMap<String, Vec<String>>,
    /// Replies to the reply subjects of messages received (streamed-reply cancels).
    pub responses: Option<Responses>,
    /// Things the reader should know (a shared `_INBOX`, …).
    pub notes: Vec<String>,
}

impl Permissions {
    fn new(service: &str) -> Self {
        Self { service: service.to_owned(), publish: BTreeMap::new(), subscribe: BTreeMap::new(), responses: None, notes: Vec::new() }
    }

    fn pub_(&mut self, subject: impl Into<String>, why: impl Into<String>) {
        grant(&mut self.publish, subject.into(), why.into());
    }

    fn sub(&mut self, subject: impl Into<String>, why: impl Into<String>) {
        grant(&mut self.subscribe, subject.into(), why.into());
    }
}

/// Adds `subject` to a list with its reason, once per distinct reason.
fn grant(list: &mut BTreeMap<String, Vec<String>>, subject: String, why: String) {
    let reasons = list.entry(subject).or_default();
    if !reasons.contains(&why) {
        reasons.push(why);
    }
}

/// NATS micro discovery (request routes): `$SRV.<VERB>`, by name, and by name and id
/// (the id is random, so a wildcard), answered on the asker's inbox under the sidecar's
/// `reply_prefixes`.
fn discovery(config: &Config, p: &mut Permissions) {
    if !config.inbound.iter().any(|i| matches!(i.mode, InboundMode::Request { .. })) {
        return;
    }
    let service = &config.sidecar.service;
    let why = "NATS micro discovery ($SRV.PING|INFO|STATS)";
    for s in ["$SRV.*".to_owned(), format!("$SRV.*.{service}"), format!("$SRV.*.{service}.*")] {
        p.sub(s, why);
    }
    for prefix in &config.sidecar.reply_prefixes {
        for s in reply_patterns(prefix) {
            p.pub_(s, format!("{why}: replies"));
        }
    }
}

/// The allow-lists `config`'s sidecar needs.
pub fn for_config(config: &Config) -> Permissions {
    let mut p = Permissions::new(&config.sidecar.service);
    let inbox = config.nats.inbox_prefix.as_deref().unwrap_or(DEFAULT_INBOX_PREFIX);
    p.sub(format!("{inbox}.>"), "replies to this sidecar's requests, JetStream publishes and API calls");
    if config.nats.inbox_prefix.is_none() {
        p.notes.push(format!(
            "replies come back on the shared {DEFAULT_INBOX_PREFIX}.>: set [nats] inbox_prefix (e.g. \"_INBOX_{}\") so this user cannot read other clients' replies, and add it to the reply_prefixes of the services it calls",
            config.sidecar.service
        ));
    }
    egress(config, &mut p);
    ingress(config, &mut p);
    discovery(config, &mut p);
    if config.sidecar.provision {
        provisioning(config, &mut p);
    }
    p
}

/// How long after a stream's last message its reader may still cancel it, beyond the
/// route's `stream_stall`: the cancel of a stall goes out right at the stall.
const CANCEL_SLACK: Duration = Duration::from_secs(30);

/// Publish grants of the egress routes.
fn egress(config: &Config, p: &mut Permissions) {
    for o in &config.outbound {
        let why = format!("route {} ({})", o.name, o.mode().as_str());
        if matches!(o.target, OutboundTarget::Request(_) | OutboundTarget::Tunnel { .. }) {
            replies_of(o, &why, p);
        }
        match &o.target {
            OutboundTarget::Request(t) | OutboundTarget::Publish(t) => p.pub_(template_pattern(t.as_str()), why),
            OutboundTarget::JetStream(t) => {
                p.pub_(template_pattern(t.as_str()), why.clone());
                // The start-up check looks for a stream capturing the subject.
                p.pub_("$JS.API.STREAM.NAMES", why);
            }
            OutboundTarget::Tunnel { subject, .. } => p.pub_(subject.clone(), why),
            OutboundTarget::Http { .. } => {}
            OutboundTarget::Subscribe(sub) => match &sub.stream {
                None => p.sub(template_pattern(sub.subject.as_str()), why),
                Some(s) => {
                    // An ordered consumer per client: created, pulled, deleted when it leaves.
                    p.pub_(format!("$JS.API.STREAM.INFO.{s}"), why.clone());
                    for api in ["CONSUMER.CREATE", "CONSUMER.MSG.NEXT", "CONSUMER.DELETE", "CONSUMER.INFO"] {
                        p.pub_(format!("$JS.API.{api}.{s}.>"), why.clone());
                    }
                }
            },
        }
    }
}

/// What a request or tunnel route's replies need: cancelling a streamed reply (a response
/// permission, see the module doc) and the async operations bucket.
fn replies_of(o: &Outbound, why: &str, p: &mut Permissions) {
    let expires = o.stream.stall + CANCEL_SLACK;
    let r = p.responses.get_or_insert_with(|| Responses { max: 1, expires, why: Vec::new() });
    r.expires = r.expires.max(expires);
    let cancel = format!("{why}: cancels streamed replies (Bridge-Stream-Control)");
    if !r.why.contains(&cancel) {
        r.why.push(cancel);
    }
    // The results bucket: read, written and watched (`Prefer: wait`).
    let kv = crate::provision::OPERATIONS_BUCKET;
    let why = format!("{why}: async results (async = true or Prefer: respond-async)");
    p.pub_(format!("$JS.API.STREAM.INFO.KV_{kv}"), why.clone());
    p.pub_(format!("$JS.API.CONSUMER.CREATE.KV_{kv}"), why.clone());
    p.pub_(format!("$JS.API.CONSUMER.CREATE.KV_{kv}.>"), why.clone());
    p.pub_(format!("$JS.API.DIRECT.GET.KV_{kv}.>"), why.clone());
    p.pub_(format!("$KV.{kv}.>"), why);
}

/// Subscribe and publish grants of the ingress routes and what they use.
fn ingress(config: &Config, p: &mut Permissions) {
    for i in &config.inbound {
        let why = format!("route {} ({})", i.name, i.mode_name().as_str());
        match &i.mode {
            InboundMode::Request { queue } | InboundMode::Tunnel { queue } => {
                p.sub(format!("{} {queue}", i.subject.as_str()), why.clone());
                for prefix in &i.reply_prefixes {
                    for s in reply_patterns(prefix) {
                        p.pub_(s, format!("{why}: replies"));
                    }
                }
            }
            InboundMode::JetStream(c) => {
                let (s, d) = (&c.stream, &c.durable);
                p.pub_(format!("$JS.API.STREAM.INFO.{s}"), why.clone());
                for api in ["CONSUMER.INFO", "CONSUMER.MSG.NEXT", "CONSUMER.CREATE", "CONSUMER.DURABLE.CREATE"] {
                    p.pub_(format!("$JS.API.{api}.{s}.{d}"), why.clone());
                }
                // Creating with a filter names it: `CONSUMER.CREATE.<stream>.<durable>.<filter>`.
                p.pub_(format!("$JS.API.CONSUMER.CREATE.{s}.{d}.>"), why.clone());
                p.pub_(format!("$JS.ACK.{s}.{d}.>"), format!("{why}: acks"));
                p.pub_(c.dead_letter.clone(), format!("{why}: dead letters"));
                p.pub_(format!("$JS.API.STREAM.INFO.{}", config.dead_letter.stream), "dead-letter stream");
                floors(p, &why);
            }
        }
        if i.idempotency.is_some() {
            let b = &config.idempotency.bucket;
            let why = format!("idempotency bucket {b}");
            p.pub_(format!("$KV.{b}.>"), why.clone());
            p.pub_(format!("$JS.API.STREAM.INFO.KV_{b}"), why.clone());
            p.pub_(format!("$JS.API.STREAM.MSG.GET.KV_{b}"), why.clone());
            p.pub_(format!("$JS.API.DIRECT.GET.KV_{b}.>"), why);
        }
    }
}

/// The floors bucket a jetstream route keeps its durable's ack floor in: read when the
/// durable is missing, written as it moves.
fn floors(p: &mut Permissions, why: &str) {
    let kv = crate::provision::FLOORS_BUCKET;
    let why = format!("{why}: its consumer's ack floor");
    p.pub_(format!("$JS.API.STREAM.INFO.KV_{kv}"), why.clone());
    p.pub_(format!("$JS.API.STREAM.MSG.GET.KV_{kv}"), why.clone());
    p.pub_(format!("$JS.API.DIRECT.GET.KV_{kv}.>"), why.clone());
    p.pub_(format!("$KV.{kv}.>"), why);
}

/// What `[sidecar] provision = true` adds: reading the account and creating or updating
/// every stream and the bucket (the consumers are already there: ingress binds them).
fn provisioning(config: &Config, p: &mut Permissions) {
    let why = "provision = true";
    p.pub_("$JS.API.INFO", why);
    // (name, owned): a referenced stream is only read; its owner's user changes it.
    let mut streams: Vec<(String, bool)> = config.streams.iter().map(|s| (s.name.clone(), !s.reference)).collect();
    if config.inbound.iter().any(|i| matches!(i.mode, InboundMode::JetStream(_))) {
        streams.push((config.dead_letter.stream.clone(), !config.dead_letter.reference));
    }
    if crate::provision::uses_idempotency(config) {
        streams.push((crate::provision::kv_stream_name(&config.idempotency.bucket), true));
    }
    if crate::provision::uses_operations(config) {
        streams.push((crate::provision::kv_stream_name(crate::provision::OPERATIONS_BUCKET), true));
    }
    if crate::provision::uses_floors(config) {
        streams.push((crate::provision::kv_stream_name(crate::provision::FLOORS_BUCKET), true));
    }
    for (s, owned) in streams {
        let apis: &[&str] = if owned { &["STREAM.INFO", "STREAM.CREATE", "STREAM.UPDATE"] } else { &["STREAM.INFO"] };
        for api in apis {
            p.pub_(format!("$JS.API.{api}.{s}"), why);
        }
    }
}

/// A subject template as a permission: a token holding a capture becomes `*` (a capture
/// always renders as exactly one token).
pub fn template_pattern(template: &str) -> String {
    template.split('.').map(|t| if t.contains('{') { "*" } else { t }).collect::<Vec<_>>().join(".")
}

/// A reply prefix as permissions. `_INBOX.` → `_INBOX.>`. A prefix that stops inside a
/// token (`svc.inbox`) cannot be said in NATS: it is narrowed to the token boundary
/// (`svc.inbox` and `svc.inbox.>`).
fn reply_patterns(prefix: &str) -> Vec<String> {
    match prefix.strip_suffix('.') {
        Some(p) => vec![format!("{p}.>")],
        None => vec![prefix.to_owned(), format!("{prefix}.>")],
    }
}

/// Drops the subjects another subject of the same list already allows, moving their
/// reasons to it, so the printed lists stay short.
pub fn simplify(list: &mut BTreeMap<String, Vec<String>>) {
    let keys: Vec<String> = list.keys().cloned().collect();
    for k in &keys {
        let Some(narrow) = as_pattern(k) else { continue };
        let wider = keys
            .iter()
            .find(|w| *w != k && list.contains_key(*w) && as_pattern(w).is_some_and(|w| w.covers(&narrow) && !narrow.covers(&w)));
        if let Some(w) = wider {
            for why in list.remove(k).unwrap_or_default() {
                grant(list, w.clone(), why);
            }
        }
    }
}

/// A list entry as a subject pattern; queue entries (`"<subject> <queue>"`) are left alone.
fn as_pattern(entry: &str) -> Option<SubjectPattern> {
    if entry.contains(' ') {
        return None;
    }
    SubjectPattern::parse(entry).ok()
}

#[cfg(test)]
mod tests;
