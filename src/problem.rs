//! The sidecar's failures as HTTP: [`BridgeError`], the one mapping from an error to a
//! status, and RFC 9457 `application/problem+json` bodies.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use serde::Serialize;

/// Everything that can go wrong while the sidecar handles a request.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("no route matches {method} {path}")]
    NoRoute { method: String, path: String },
    #[error("method not allowed; allowed: {}", allowed.join(", "))]
    MethodNotAllowed { allowed: Vec<String> },
    #[error("request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("message is larger than the NATS server's max_payload ({max_payload} bytes)")]
    PayloadTooLarge { max_payload: usize },
    #[error("{0}")]
    BadRequest(String),
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    #[error("no service is listening on {subject}")]
    NoResponders { subject: String },
    #[error("no reply on {subject} within {timeout:?}")]
    Timeout { subject: String, timeout: Duration },
    #[error("NATS is not connected")]
    NatsDisconnected,
    #[error("NATS error: {0}")]
    Nats(String),
    #[error("no JetStream stream captures {subject}")]
    NoStream { subject: String },
    #[error("JetStream did not acknowledge the publish: {0}")]
    JetStream(String),
    #[error("too many publishes waiting for JetStream acks")]
    Overloaded,
    #[error("the inbound route's buffer is full ({limit} bytes of messages wait for the app)")]
    BufferFull { limit: usize },
    #[error("the reply could not be turned into a response: {0}")]
    BadReply(String),
    #[error("upstream failed: {0}")]
    Upstream(String),
    #[error("upstream did not answer within {0:?}")]
    UpstreamTimeout(Duration),
    #[error("the sidecar is shutting down")]
    ShuttingDown,
}

impl BridgeError {
    /// The one place that decides each failure's HTTP status.
    pub fn status(&self) -> StatusCode {
        use BridgeError::*;
        match self {
            NoRoute { .. } => StatusCode::NOT_FOUND,
            MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            BodyTooLarge { .. } | PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BadRequest(_) | BodyRead(_) => StatusCode::BAD_REQUEST,
            NoResponders { .. }
            | NatsDisconnected
            | Nats(_)
            | NoStream { .. }
            | JetStream(_)
            | Overloaded
            | BufferFull { .. }
            | ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Timeout { .. } | UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            BadReply(_) | Upstream(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// A stable, machine-readable kind, used as the problem `type` suffix.
    pub fn kind(&self) -> &'static str {
        use BridgeError::*;
        match self {
            NoRoute { .. } => "no-route",
            MethodNotAllowed { .. } => "method-not-allowed",
            BodyTooLarge { .. } => "body-too-large",
            PayloadTooLarge { .. } => "payload-too-large",
            BadRequest(_) => "bad-request",
            BodyRead(_) => "body-read",
            NoResponders { .. } => "no-responders",
            Timeout { .. } => "timeout",
            NatsDisconnected => "nats-disconnected",
            Nats(_) => "nats-error",
            NoStream { .. } => "no-stream",
            JetStream(_) => "jetstream-unavailable",
            Overloaded => "overloaded",
            BufferFull { .. } => "buffer-full",
            BadReply(_) => "bad-reply",
            Upstream(_) => "upstream-error",
            UpstreamTimeout(_) => "upstream-timeout",
            ShuttingDown => "shutting-down",
        }
    }

    /// Seconds a client should wait before retrying, for the transient failures.
    fn retry_after(&self) -> Option<u32> {
        match self.status() {
            StatusCode::SERVICE_UNAVAILABLE => Some(1),
            _ => None,
        }
    }
}

/// An RFC 9457 problem document.
#[derive(Debug, Serialize)]
pub struct Problem<'a> {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: &'a str,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<&'a str>,
}

pub const PROBLEM_JSON: &str = "application/problem+json";

/// Serializes a problem body for `status`; shared by egress and ingress (502 replies).
pub fn problem_body(status: StatusCode, kind: &str, detail: String, route: Option<&str>, request_id: Option<&str>) -> Bytes {
    let p = Problem {
        kind: format!("urn:natsbridge:problem:{kind}"),
        title: status.canonical_reason().unwrap_or("Error"),
        status: status.as_u16(),
        detail,
        route,
        instance: request_id,
    };
    Bytes::from(serde_json::to_vec(&p).unwrap_or_default())
}

impl BridgeError {
    /// The response for this error; `route` and `request_id` are named when known.
    pub fn to_response(&self, route: Option<&str>, request_id: Option<&str>) -> Response<Bytes> {
        let status = self.status();
        let body = problem_body(status, self.kind(), self.to_string(), route, request_id);
        let mut res = Response::new(body);
        *res.status_mut() = status;
        let h = res.headers_mut();
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(secs) = self.retry_after() {
            h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let BridgeError::MethodNotAllowed { allowed } = self {
            if let Ok(v) = HeaderValue::from_str(&allowed.join(", ")) {
                h.insert(http::header::ALLOW, v);
            }
        }
        if let Some(id) = request_id.and_then(|id| HeaderValue::from_str(id).ok()) {
            h.insert(crate::codec::REQUEST_ID, id);
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(BridgeError::NoResponders { subject: "a".into() }.status(), 503);
        assert_eq!(BridgeError::Timeout { subject: "a".into(), timeout: Duration::from_secs(1) }.status(), 504);
        assert_eq!(BridgeError::BadRequest("x".into()).status(), 400);
        assert_eq!(BridgeError::PayloadTooLarge { max_payload: 1 }.status(), 413);
    }

    #[test]
    fn problem_json_names_the_route() {
        let r = BridgeError::NoResponders { subject: "a.b".into() }.to_response(Some("exec"), Some("rid"));
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["content-type"], PROBLEM_JSON);
        assert_eq!(r.headers()["retry-after"], "1");
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(v["status"], 503);
        assert_eq!(v["route"], "exec");
        assert_eq!(v["instance"], "rid");
        assert_eq!(v["type"], "urn:natsbridge:problem:no-responders");
    }
}
