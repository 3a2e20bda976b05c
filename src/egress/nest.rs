//! Egress with `codec = "nestjs"`: the body becomes a Nest packet's `data`; a request
//! collects the handler's replies (by its `id`) until the disposed one.
//!
//! Several `response` messages (an Observable handler) are, until egress can stream a
//! response, collected within the route's `timeout` and `max_body` and answered as one JSON
//! array with `Bridge-Nest-Responses: <n>`; a single value is answered as itself.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use serde_json::Value;

use crate::codec::nestjs::{self, Frame};
use crate::config::{Codec, Outbound};
use crate::egress::{full, Body, Egress};
use crate::nats::replies::ReplyErrorKind;
use crate::problem::BridgeError;

/// Replies buffered per request before the reader takes them.
const REPLY_BUFFER: usize = 64;

/// The route's pattern: its `pattern`, else the subject it sends to.
fn pattern(route: &Outbound, subject: &str) -> Value {
    route.pattern.clone().unwrap_or_else(|| Value::String(subject.to_owned()))
}

fn data(body: &[u8]) -> Result<Option<Value>, BridgeError> {
    nestjs::body_data(body).map_err(|e| BridgeError::BadRequest(e.to_string()))
}

/// The payload a `publish` or `jetstream` route sends: the body itself, or for NestJS the
/// event packet `{"pattern","data"}`.
pub(super) fn event_payload(route: &Outbound, subject: &str, body: Bytes) -> Result<Bytes, BridgeError> {
    match route.codec {
        Codec::Raw | Codec::CloudEvents => Ok(body),
        Codec::NestJs => Ok(nestjs::encode_event(&pattern(route, subject), data(&body)?.as_ref())),
    }
}

impl Egress {
    /// A NestJS `send`: the request packet with a reply subject of ours, then its replies
    /// until the disposed one or an `err`.
    pub(super) async fn nest_request(
        &self,
        route: &Outbound,
        subject: String,
        headers: async_nats::HeaderMap,
        body: Bytes,
    ) -> Result<Response<Body>, BridgeError> {
        let id = nestjs::new_id();
        let payload = nestjs::encode_request(&pattern(route, &subject), data(&body)?.as_ref(), &id);
        self.ensure_connected()?;
        let deadline = tokio::time::Instant::now() + route.timeout;
        let mut replies = self.replies.stream(REPLY_BUFFER);
        let reply = replies.reply_subject().clone();
        self.replies.client().publish_with_reply_and_headers(subject.clone(), reply, headers, payload).await.map_err(|e| {
            match e.kind() {
                async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
                    BridgeError::PayloadTooLarge { max_payload: self.nats.server_info().max_payload }
                }
                _ => BridgeError::Nats(e.into()),
            }
        })?;
        let mut values = Vec::new();
        let mut size = 0;
        loop {
            let msg = match tokio::time::timeout_at(deadline, replies.next()).await {
                Err(_) => return Err(BridgeError::Timeout { subject, timeout: route.timeout }),
                Ok(Err(e)) if e.kind() == ReplyErrorKind::NoResponders => return Err(BridgeError::NoResponders { subject }),
                Ok(Err(e)) => return Err(BridgeError::Nats(e.to_string().into())),
                Ok(Ok(msg)) => msg,
            };
            size += msg.payload.len();
            if size > route.max_body {
                return Err(BridgeError::Upstream(format!("the NestJS replies exceed the route's max_body ({} bytes)", route.max_body)));
            }
            match nestjs::decode_reply(&msg.payload, &id).map_err(BridgeError::NestReply)? {
                Frame::Foreign => {}
                Frame::Next(v) => values.push(v),
                Frame::Last(v) => {
                    values.extend(v);
                    return Ok(nest_response(values));
                }
                Frame::Err(err) => return Err(BridgeError::NestErr(err)),
            }
        }
    }
}

/// The handler's values as a response: none is 204, one is itself, several an array.
fn nest_response(mut values: Vec<Value>) -> Response<Body> {
    let n = values.len();
    let body = match n {
        0 => {
            let mut res = Response::new(full(Bytes::new()));
            *res.status_mut() = StatusCode::NO_CONTENT;
            return res;
        }
        1 => values.pop().unwrap_or_default(),
        _ => Value::Array(values),
    };
    let mut res = Response::new(full(serde_json::to_vec(&body).unwrap_or_default()));
    let h = res.headers_mut();
    h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if n > 1 {
        h.insert(nestjs::BRIDGE_NEST_RESPONSES, HeaderValue::from(n));
    }
    res
}
