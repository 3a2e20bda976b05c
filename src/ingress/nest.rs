//! Ingress with `codec = "nestjs"`: a Nest packet's `data` becomes the app's JSON body and
//! its pattern `Bridge-Pattern`; the app's whole response goes back as one disposed reply
//! (`response`, or `err` for a status ≥ 400) carrying the request's `id`.
//!
//! A payload without the envelope is the data itself, as Nest takes it. A message without
//! an `id` is an event to Nest; when it still has a reply subject (a plain NATS requester),
//! it is answered the raw way, since no Nest client waits for it.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};

use crate::codec::{self, nestjs};

/// The app's body, and its headers completed with the pattern and the JSON content type.
pub(crate) fn app_body(nest: Option<&nestjs::Incoming>, payload: &Bytes, headers: &mut HeaderMap) -> Bytes {
    let Some(n) = nest else { return payload.clone() };
    if let Ok(v) = HeaderValue::from_str(&n.pattern) {
        headers.insert(nestjs::BRIDGE_PATTERN, v);
    }
    if n.json {
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    n.body.clone()
}

/// The reply to a request: Nest's packet with no headers (Nest writes none) for a Nest
/// request, else the raw codec's.
pub(crate) fn reply(
    nest: Option<&nestjs::Incoming>,
    status: StatusCode,
    headers: &HeaderMap,
    body: Bytes,
) -> (async_nats::HeaderMap, Bytes) {
    match nest.and_then(|n| n.id.as_ref()) {
        Some(id) => (async_nats::HeaderMap::new(), nestjs::encode_reply(id, status, &body)),
        None => (codec::response_to_reply_headers(status, headers), body),
    }
}
