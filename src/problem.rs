//! The sidecar's failures as HTTP: [`BridgeError`], the one mapping from an error to a
//! status ([`BridgeError::status`]) and to a response ([`BridgeError::to_response`]), and
//! RFC 9457 `application/problem+json` bodies. Egress, ingress replies and the idempotency
//! guard all answer failures through it. Calls `codec` (for header names) and names the
//! error types it maps (`nats::publish`, `contract`, the idempotency store's).

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
    /// A subject (rendered from path captures) too long for the NATS protocol: sending it
    /// would make the server close the sidecar's connection.
    #[error("the NATS subject would be {len} bytes long; the limit is {max}")]
    SubjectTooLong { len: usize, max: usize },
    #[error("{0}")]
    BadRequest(String),
    #[error("could not read the request body: {0}")]
    BodyRead(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("no service is listening on {subject}")]
    NoResponders { subject: String },
    #[error("no reply on {subject} within {timeout:?}")]
    Timeout { subject: String, timeout: Duration },
    /// The NATS client did not take the message within the route's timeout: its
    /// connection stopped taking commands (a frozen or half-open server filled its
    /// buffers). The hand-off is cancel-safe, so the message was never queued or sent.
    #[error("NATS did not take the message for {subject} within {timeout:?} (the connection is stalled); it was not sent")]
    HandOffTimeout { subject: String, timeout: Duration },
    #[error("NATS is not connected")]
    NatsDisconnected,
    #[error("NATS error: {0}")]
    Nats(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("no JetStream stream captures {subject}")]
    NoStream { subject: String },
    #[error("JetStream did not acknowledge the publish: {0}")]
    JetStream(#[source] crate::nats::publish::PublishError),
    /// The stream refused a `Nats-Expected-*` precondition (wrong last sequence, last
    /// message id or stream): every retry of the same request fails the same way.
    #[error("the stream refused the publish's precondition: {0}")]
    PreconditionFailed(#[source] crate::nats::publish::PublishError),
    /// Any other 4xx the stream answered for this message (its description says why).
    #[error("the stream refused the publish: {0}")]
    JetStreamRefused(#[source] crate::nats::publish::PublishError),
    /// No ack in time, but the stream may have stored the message: retrying with the same
    /// `Idempotency-Key` is safe, retrying without one may duplicate it.
    #[error("JetStream did not acknowledge the publish in time; the outcome is unknown (the message may be stored): {0}")]
    AckTimeout(#[source] crate::nats::publish::PublishError),
    /// A core publish the client took but did not confirm written (flushed) within the
    /// route's timeout, connected or not: it may yet be sent, after a reconnect too.
    #[error("the publish was not confirmed written to NATS within {timeout:?}; the outcome is unknown (it may still be sent)")]
    PublishUnconfirmed { timeout: Duration },
    #[error("too many publishes waiting for JetStream acks")]
    Overloaded,
    /// A tunnel or an async operation would take the listener past `max_connections`
    /// (connections, tunnels and running async operations share it).
    #[error("too many open connections, tunnels and async operations (max_connections = {max})")]
    TooManyConnections { max: usize },
    #[error("the inbound route's buffer is full ({limit} bytes of messages wait for the app)")]
    BufferFull { limit: usize },
    #[error("the reply could not be turned into a response: {0}")]
    BadReply(#[source] crate::codec::ReplyError),
    #[error("{0}")]
    NestReply(#[source] crate::codec::nestjs::ReplyError),
    /// A NestJS handler's `err`; its status comes from the error object.
    #[error("the NestJS handler failed")]
    NestErr(serde_json::Value),
    /// The body breaks the route's contract; every violation is listed.
    #[error("the body breaks contract {schema} ({} violation(s))", violations.len())]
    Contract { schema: String, violations: Vec<crate::contract::Violation> },
    /// The message names a contract version the route does not accept.
    #[error("contract {named:?} is not accepted here (accepted: {})", accepted.join(", "))]
    ContractVersion { named: String, accepted: Vec<String> },
    #[error("upstream failed: {0}")]
    Upstream(String),
    #[error("upstream did not answer within {0:?}")]
    UpstreamTimeout(Duration),
    /// A forwarded call or CONNECT whose target is the sidecar's own listener: it would
    /// come back in forever.
    #[error("{target} is this sidecar's own listener; the call would loop")]
    LoopDetected { target: String },
    /// A CONNECT target outside `[sidecar] connect_allow`.
    #[error("CONNECT to {target} is not in connect_allow")]
    ConnectForbidden { target: String },
    #[error("the sidecar is shutting down")]
    ShuttingDown,
    /// Framing two HTTP parsers could read differently; the connection is closed after.
    #[error("ambiguous request framing: {0}")]
    BadFraming(&'static str),
    /// An HTTP/2 request with more header fields than `max_headers` (hyper counts them
    /// for HTTP/1 itself).
    #[error("more than {max} header fields")]
    TooManyHeaders { max: usize },
    #[error("handler panicked")]
    Panicked,
    #[error("a request with the same idempotency key is still being processed after {wait:?}; retry later")]
    IdempotencyInFlight { wait: Duration },
    #[error("the idempotency key was already used for a request with a different payload")]
    IdempotencyKeyReused,
    #[error("the idempotency store is not bound yet")]
    IdempotencyStoreUnbound,
    #[error("the idempotency store cannot be used: {0}")]
    IdempotencyUnavailable(String),
    /// Ending a claimed delivery failed (the result not stored, or the claim not released).
    #[error(transparent)]
    IdempotencyFinish(#[from] crate::ingress::idempotency::store::FinishError),
    /// A streamed reply lost or reordered a message, or broke the wire contract.
    #[error("the streamed reply is broken: {0}")]
    StreamBroken(#[source] crate::streamed::WireError),
    #[error("the streamed reply stalled: no message for {stall:?}")]
    StreamStalled { stall: Duration },
    #[error("the streamed reply lasted longer than stream_max ({max:?})")]
    StreamTooLong { max: Duration },
    /// The HTTP client read slower than the replies came, past `stream_buffer` messages.
    #[error(
        "the client read the streamed reply too slowly (more than {buffer} messages behind for over {:?}, or {} messages or {} MiB at once)",
        crate::nats::replies::BEHIND_GRACE,
        buffer.saturating_mul(crate::nats::replies::BURST_SLACK),
        buffer.saturating_mul(crate::nats::replies::BYTES_PER_SLOT) >> 20
    )]
    StreamOverflow { buffer: usize },
    /// The responder ended its stream with an error; the detail is its problem document's.
    #[error("the responder failed mid-stream: {0}")]
    StreamFailed(String),
    /// A streamed reply to an HTTP/1.0 client, held whole (1.0 has no chunked encoding to
    /// show a cut), grew past what one stream may hold.
    #[error("the streamed reply is over {limit} bytes, too large to hold whole for an HTTP/1.0 client, which could not tell a cut stream from a complete one; use HTTP/1.1")]
    StreamTooLargeForHttp10 { limit: usize },
    /// An async operation id that is unknown, or whose result expired (`async_ttl`).
    #[error("no operation {id} (unknown, or its result expired)")]
    OperationNotFound { id: String },
    /// The sidecar running an async call stopped before it finished (past its deadline).
    #[error("operation {id} was lost: its call did not finish by its deadline")]
    OperationLost { id: String },
    #[error("the async operation store cannot be used: {0}")]
    OperationStore(String),
}

impl BridgeError {
    /// The one place that decides each failure's HTTP status.
    pub fn status(&self) -> StatusCode {
        use BridgeError::*;
        match self {
            NoRoute { .. } | OperationNotFound { .. } => StatusCode::NOT_FOUND,
            OperationLost { .. } => StatusCode::GATEWAY_TIMEOUT,
            OperationStore(_) => StatusCode::SERVICE_UNAVAILABLE,
            MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            BodyTooLarge { .. } | PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            SubjectTooLong { .. } => StatusCode::URI_TOO_LONG,
            BadRequest(_) | BodyRead(_) | BadFraming(_) => StatusCode::BAD_REQUEST,
            IdempotencyInFlight { .. } | IdempotencyKeyReused => StatusCode::CONFLICT,
            PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            // Not 503: the same request fails the same way every time, so no retry hint.
            // Not 400 or 422: the request was well formed and met its contract; the
            // stream's state or settings (sealed, say) conflict with storing it,
            // and the caller (or an operator) must change something before retrying.
            JetStreamRefused(_) => StatusCode::CONFLICT,
            NoResponders { .. }
            | NatsDisconnected
            | Nats(_)
            | NoStream { .. }
            | JetStream(_)
            | Overloaded
            | TooManyConnections { .. }
            | ShuttingDown
            | BufferFull { .. }
            | IdempotencyStoreUnbound
            | IdempotencyUnavailable(_)
            | IdempotencyFinish(_) => StatusCode::SERVICE_UNAVAILABLE,
            Timeout { .. } | HandOffTimeout { .. } | UpstreamTimeout(_) | AckTimeout(_) | PublishUnconfirmed { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            BadReply(_) | NestReply(_) | Upstream(_) | StreamBroken(_) | StreamFailed(_) => StatusCode::BAD_GATEWAY,
            Contract { .. } | ContractVersion { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            NestErr(err) => crate::codec::nestjs::err_status(err),
            StreamStalled { .. } | StreamTooLong { .. } => StatusCode::GATEWAY_TIMEOUT,
            StreamOverflow { .. } => StatusCode::SERVICE_UNAVAILABLE,
            StreamTooLargeForHttp10 { .. } => StatusCode::BAD_GATEWAY,
            LoopDetected { .. } => StatusCode::LOOP_DETECTED,
            ConnectForbidden { .. } => StatusCode::FORBIDDEN,
            TooManyHeaders { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Panicked => StatusCode::INTERNAL_SERVER_ERROR,
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
            SubjectTooLong { .. } => "subject-too-long",
            AckTimeout(_) | PublishUnconfirmed { .. } => "outcome-unknown",
            BodyRead(_) => "body-read",
            NoResponders { .. } => "no-responders",
            Timeout { .. } | HandOffTimeout { .. } => "timeout",
            NatsDisconnected => "nats-disconnected",
            Nats(_) => "nats-error",
            NoStream { .. } => "no-stream",
            JetStream(_) => "jetstream-unavailable",
            PreconditionFailed(_) => "precondition-failed",
            JetStreamRefused(_) => "jetstream-refused",
            Overloaded => "overloaded",
            TooManyConnections { .. } => "too-many-connections",
            BufferFull { .. } => "buffer-full",
            BadReply(_) | NestReply(_) => "bad-reply",
            NestErr(_) => "nestjs-error",
            Contract { .. } => "contract-violation",
            ContractVersion { .. } => "contract-version",
            Upstream(_) => "upstream-error",
            UpstreamTimeout(_) => "upstream-timeout",
            LoopDetected { .. } => "loop-detected",
            ConnectForbidden { .. } => "connect-forbidden",
            ShuttingDown => "shutting-down",
            BadFraming(_) => "bad-framing",
            TooManyHeaders { .. } => "too-many-headers",
            Panicked => "panic",
            IdempotencyInFlight { .. } => "idempotency-in-flight",
            IdempotencyKeyReused => "idempotency-key-reused",
            IdempotencyStoreUnbound | IdempotencyUnavailable(_) | IdempotencyFinish(_) => "idempotency-unavailable",
            StreamBroken(_) => "stream-broken",
            StreamStalled { .. } => "stream-stalled",
            StreamTooLong { .. } => "stream-limit",
            StreamOverflow { .. } => "stream-overflow",
            StreamTooLargeForHttp10 { .. } => "stream-too-large-for-http10",
            StreamFailed(_) => "stream-error",
            OperationNotFound { .. } => "operation-not-found",
            OperationLost { .. } => "operation-lost",
            OperationStore(_) => "operation-store-unavailable",
        }
    }

    /// Seconds a client should wait before retrying, for the transient failures.
    fn retry_after(&self) -> Option<u32> {
        match self {
            // The other handler of the key is likely done by then.
            BridgeError::IdempotencyInFlight { .. } => Some(1),
            _ if self.status() == StatusCode::SERVICE_UNAVAILABLE => Some(1),
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
    /// A NestJS handler's error object, as it came.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a serde_json::Value>,
    /// The contract a body broke (`<name>/v<N>`) and how.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub violations: Option<&'a [crate::contract::Violation]>,
}

impl From<crate::contract::Refusal> for BridgeError {
    fn from(r: crate::contract::Refusal) -> Self {
        match r {
            crate::contract::Refusal::Schema { schema, violations } => BridgeError::Contract { schema, violations },
            crate::contract::Refusal::Version { named, accepted } => BridgeError::ContractVersion { named, accepted },
        }
    }
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
        error: None,
        schema: None,
        violations: None,
    };
    Bytes::from(serde_json::to_vec(&p).unwrap_or_default())
}

/// A NestJS `err` as a problem: its `message` as the detail, the whole object as `error`.
fn nest_problem(status: StatusCode, err: &serde_json::Value, route: Option<&str>, request_id: Option<&str>) -> Bytes {
    let detail = match err.get("message").unwrap_or(err) {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let p = Problem {
        kind: "urn:natsbridge:problem:nestjs-error".into(),
        title: status.canonical_reason().unwrap_or("Error"),
        status: status.as_u16(),
        detail,
        route,
        instance: request_id,
        error: Some(err),
        schema: None,
        violations: None,
    };
    Bytes::from(serde_json::to_vec(&p).unwrap_or_default())
}

/// An error's message with each of its causes, for a problem's `detail`: hyper's client
/// errors say only "client error (Connect)", the reason ("tcp connect error: …") is in the
/// source chain.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

impl BridgeError {
    /// The response for this error; `route` and `request_id` are named when known.
    pub fn to_response(&self, route: Option<&str>, request_id: Option<&str>) -> Response<Bytes> {
        let status = self.status();
        let body = match self {
            BridgeError::NestErr(err) => nest_problem(status, err, route, request_id),
            BridgeError::Contract { schema, violations } => {
                let p = Problem {
                    kind: format!("urn:natsbridge:problem:{}", self.kind()),
                    title: status.canonical_reason().unwrap_or("Error"),
                    status: status.as_u16(),
                    detail: self.to_string(),
                    route,
                    instance: request_id,
                    error: None,
                    schema: Some(schema),
                    violations: Some(violations),
                };
                Bytes::from(serde_json::to_vec(&p).unwrap_or_default())
            }
            _ => problem_body(status, self.kind(), self.to_string(), route, request_id),
        };
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
        if let BridgeError::BadFraming(_) = self {
            // Nothing after this request on the connection is parsed.
            h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
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
    fn idempotency_finish_errors_keep_their_kind_and_source() {
        use crate::ingress::idempotency::store::{FinishError, IdempotencyError};
        let e = BridgeError::from(FinishError::Complete { key: "k".into(), source: IdempotencyError::Store("bucket gone".into()) });
        assert_eq!((e.status().as_u16(), e.kind()), (503, "idempotency-unavailable"));
        assert_eq!(e.retry_after(), Some(1));
        assert_eq!(error_chain(&e), "storing the result for idempotency key \"k\" failed: idempotency store: bucket gone");
        let lost = FinishError::Release { key: "k".into(), source: IdempotencyError::ClaimLost { key: "k".into() } };
        assert!(!lost.source_error().is_store_failure());
        assert!(error_chain(&lost).starts_with("releasing the claim on idempotency key \"k\" failed: "), "{}", error_chain(&lost));
    }

    #[test]
    fn statuses() {
        assert_eq!(BridgeError::NoResponders { subject: "a".into() }.status(), 503);
        assert_eq!(BridgeError::Timeout { subject: "a".into(), timeout: Duration::from_secs(1) }.status(), 504);
        assert_eq!(BridgeError::BadRequest("x".into()).status(), 400);
        assert_eq!(BridgeError::PayloadTooLarge { max_payload: 1 }.status(), 413);
        assert_eq!(BridgeError::BadFraming("x").status(), 400);
        assert_eq!(BridgeError::TooManyHeaders { max: 1 }.status(), 431);
        assert_eq!(BridgeError::Panicked.status(), 500);
        // The overflow's detail states the feed's limits as they are, not as once written.
        assert_eq!(
            BridgeError::StreamOverflow { buffer: 256 }.to_string(),
            "the client read the streamed reply too slowly (more than 256 messages behind for over 1s, or 1024 messages or 256 MiB at once)"
        );
        assert_eq!(BridgeError::IdempotencyInFlight { wait: Duration::from_secs(1) }.status(), 409);
        assert_eq!(BridgeError::IdempotencyStoreUnbound.status(), 503);
        assert_eq!(
            (BridgeError::IdempotencyKeyReused.status().as_u16(), BridgeError::IdempotencyKeyReused.kind()),
            (409, "idempotency-key-reused")
        );
        assert_eq!(BridgeError::SubjectTooLong { len: 5000, max: 1024 }.status(), 414);
        let p = BridgeError::PublishUnconfirmed { timeout: Duration::from_secs(1) };
        assert_eq!((p.status().as_u16(), p.kind()), (504, "outcome-unknown"));
    }

    #[test]
    fn edge_refusals_keep_their_headers() {
        let r = BridgeError::BadFraming("both Content-Length and Transfer-Encoding").to_response(None, None);
        assert_eq!(r.headers()["connection"], "close");
        assert!(r.headers().get("retry-after").is_none());
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(v["type"], "urn:natsbridge:problem:bad-framing");
        assert_eq!(v["detail"], "ambiguous request framing: both Content-Length and Transfer-Encoding");

        let r = BridgeError::IdempotencyInFlight { wait: Duration::from_secs(2) }.to_response(Some("orders"), Some("rid"));
        assert_eq!(r.status(), 409);
        assert_eq!(r.headers()["retry-after"], "1");
        assert_eq!(r.headers()["x-request-id"], "rid");
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
