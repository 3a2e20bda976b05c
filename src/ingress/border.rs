//! The ingress border: a message is decoded by its route's codec ([`Decoded`]) and checked
//! against its route's `schema` / `schemas` before the app sees it. A refusal is counted
//! (`natsbridge_contract_violations_total{direction="ingress"}`) and logged at a rate
//! limit; the caller dead-letters it (jetstream) or answers it (request).

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};

use super::Route;
use crate::codec::cloudevents::{self, CeError, Event};
use crate::codec::nestjs;
use crate::config::{Codec, Inbound};
use crate::contract::{Refusal, BRIDGE_SCHEMA};
use crate::metrics::Metrics;

/// The contract version a message was checked against (`None`: the route has no contract),
/// or why it is refused. `named` is the version the message names, when it names one.
pub(crate) fn check(route: &Route, metrics: &Metrics, named: Option<&str>, body: &[u8]) -> Result<Option<String>, Refusal> {
    let Some(contracts) = &route.inbound.schema else { return Ok(None) };
    match contracts.check(named, body) {
        Ok(c) => Ok(Some(c.id.clone())),
        Err(r) => {
            metrics.contract_violations.with_label_values(&[&route.inbound.name, "ingress", r.reason()]).inc();
            if let Some(suppressed) = route.refusals.check() {
                tracing::warn!(route = %route.inbound.name, reason = r.reason(), detail = %r.detail(), suppressed, "message refused by its contract; the app was not called");
            }
            Err(r)
        }
    }
}

/// Why the border turned a message away before the app.
#[derive(Debug)]
pub(crate) enum Refused {
    /// The codec cannot read it (an invalid CloudEvent).
    Malformed(CeError),
    /// It breaks the route's contract.
    Contract(Refusal),
}

impl Refused {
    /// The dead-letter reason a jetstream route records.
    pub fn reason(&self) -> crate::dlq::Reason {
        use crate::dlq::Reason;
        match self {
            Refused::Malformed(_) => Reason::Malformed,
            Refused::Contract(Refusal::Version { .. }) => Reason::SchemaVersion,
            Refused::Contract(Refusal::Schema { .. }) => Reason::Schema,
        }
    }

    /// One line for `Bridge-Dlq-Error`.
    pub fn detail(&self) -> String {
        match self {
            Refused::Malformed(e) => e.to_string(),
            Refused::Contract(r) => r.detail(),
        }
    }
}

/// What a request route answers: 400 for what the codec cannot read, 422 for a contract.
impl From<Refused> for crate::problem::BridgeError {
    fn from(r: Refused) -> Self {
        match r {
            Refused::Malformed(e) => crate::problem::BridgeError::BadRequest(e.to_string()),
            Refused::Contract(r) => r.into(),
        }
    }
}

/// The border in one step: the message decoded by the route's codec (kept when refused: a
/// refused Nest request is still answered as Nest expects), and the contract version it
/// satisfies (`None`: the route has no contract) or why it is refused.
pub(crate) fn admit(
    route: &Route,
    metrics: &Metrics,
    msg_headers: Option<&async_nats::HeaderMap>,
    payload: &Bytes,
    subject: &str,
    fallback_id: Option<String>,
) -> (Decoded, Result<Option<String>, Refused>) {
    let decoded = match Decoded::decode(&route.inbound, msg_headers, payload, subject, fallback_id) {
        Ok(d) => d,
        Err(e) => return (Decoded::default(), Err(Refused::Malformed(e))),
    };
    let verdict = check(route, metrics, decoded.named(msg_headers), decoded.body(payload)).map_err(Refused::Contract);
    (decoded, verdict)
}

/// The version a NATS message names: its `Bridge-Schema` header.
pub(crate) fn named(headers: Option<&async_nats::HeaderMap>) -> Option<&str> {
    headers.and_then(|h| h.get(BRIDGE_SCHEMA)).map(|v| v.as_str())
}

/// Tells the app which version the body satisfies (replacing whatever the publisher wrote).
pub(crate) fn tell_app(headers: &mut HeaderMap, checked: Option<&str>) {
    if let Some(v) = checked.and_then(|id| HeaderValue::from_str(id).ok()) {
        headers.insert(BRIDGE_SCHEMA, v);
    }
}

/// What the route's codec makes of a message before its contract and the app see it: a
/// Nest packet, a CloudEvent, or (raw) the message itself.
#[derive(Default)]
pub(crate) struct Decoded {
    pub nest: Option<nestjs::Incoming>,
    pub event: Option<Event>,
}

impl Decoded {
    /// `fallback_id`: the `id` of the event made of a message that is no CloudEvent, when
    /// it has no `Nats-Msg-Id` (a jetstream route's `<stream>.<seq>`, stable across
    /// redeliveries); else a new UUID.
    pub fn decode(
        route: &Inbound,
        msg_headers: Option<&async_nats::HeaderMap>,
        payload: &Bytes,
        subject: &str,
        fallback_id: Option<String>,
    ) -> Result<Decoded, CeError> {
        match route.codec {
            Codec::Raw => Ok(Decoded::default()),
            Codec::NestJs => Ok(Decoded { nest: Some(nestjs::decode_incoming(payload, subject)), event: None }),
            Codec::CloudEvents => {
                let event = match Event::from_nats(msg_headers, payload.clone())? {
                    Some(e) => e,
                    None => plain_event(msg_headers, payload, subject, fallback_id),
                };
                event.validate()?;
                Ok(Decoded { nest: None, event: Some(event) })
            }
        }
    }

    /// The body the contract checks and the app gets.
    pub fn body<'a>(&'a self, payload: &'a Bytes) -> &'a Bytes {
        match (&self.nest, &self.event) {
            (Some(n), _) => &n.body,
            (_, Some(e)) => &e.data,
            _ => payload,
        }
    }

    /// The contract version the message names: an event's `dataschema`, else `Bridge-Schema`.
    pub fn named<'a>(&'a self, msg_headers: Option<&'a async_nats::HeaderMap>) -> Option<&'a str> {
        self.event.as_ref().and_then(|e| e.get("dataschema")).or_else(|| named(msg_headers))
    }

    /// The app's body, its headers completed for the codec: Nest's pattern and content type,
    /// or the event in HTTP binary mode (`ce-*`, `Content-Type` = `datacontenttype`).
    pub fn app_request(&self, payload: &Bytes, headers: &mut HeaderMap) -> Bytes {
        if let Some(e) = &self.event {
            let own: Vec<http::HeaderName> = headers.keys().filter(|n| cloudevents::is_ce_header(n.as_str())).cloned().collect();
            for n in own {
                headers.remove(n);
            }
            headers.remove(http::header::CONTENT_TYPE);
            for (name, value) in e.http_headers() {
                if let (Ok(n), Ok(v)) = (http::HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(&value)) {
                    headers.insert(n, v);
                }
            }
            return e.data.clone();
        }
        super::nest::app_body(self.nest.as_ref(), payload, headers)
    }
}

/// A message that is no CloudEvent, as one: `id` its `Nats-Msg-Id` (else `fallback_id`, else
/// a UUID), `source` `nats:<subject>`, `type` the subject, its `Content-Type` the data's.
fn plain_event(msg_headers: Option<&async_nats::HeaderMap>, payload: &Bytes, subject: &str, fallback_id: Option<String>) -> Event {
    let header = |n: &str| msg_headers.and_then(|h| h.get(n)).map(|v| v.as_str().to_owned());
    let id = header(crate::codec::NATS_MSG_ID).or(fallback_id).unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut e = Event::new(&id, &format!("nats:{subject}"), subject, payload.clone());
    if let Some(ct) = header("Content-Type") {
        e.set("datacontenttype", &ct);
    }
    e
}
