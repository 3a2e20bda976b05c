//! The spans of each hop and what they carry:
//!
//! - egress: a server span for the app's HTTP call, and under it a producer (publish,
//!   jetstream) or client (request, tunnel) span for the NATS hop, whose context is the
//!   `traceparent` the message carries;
//! - ingress: a consumer (jetstream) or server (request, tunnel) span for the message,
//!   its parent the message's `traceparent`, and under it a client span for the app call,
//!   whose context is the `traceparent` the app gets.
//!
//! Every span carries the route, subject, mode and status, and jetstream deliveries
//! their delivery count. Each handle is `None` inside when telemetry is off.

use std::future::Future;

use futures::future::Either;
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};

use super::{propagation, Inner, Telemetry};
use crate::config::{Inbound, InboundModeName, Outbound, OutboundMode};

/// The attribute keys: OpenTelemetry's semantic conventions where one fits.
pub mod key {
    pub const ROUTE: &str = "natsbridge.route";
    pub const MODE: &str = "natsbridge.mode";
    /// `nats` or `http`: the way a cut-over route's call went.
    pub const PATH: &str = "natsbridge.path";
    pub const DELIVERY_COUNT: &str = "natsbridge.delivery_count";
    pub const SUBJECT: &str = "messaging.destination.name";
    pub const SYSTEM: &str = "messaging.system";
    pub const OPERATION: &str = "messaging.operation.type";
    pub const STATUS: &str = "http.response.status_code";
    pub const METHOD: &str = "http.request.method";
    pub const HTTP_ROUTE: &str = "http.route";
    pub const URL: &str = "url.full";
}

/// An egress call's spans: the HTTP server span, and the NATS hop's under it.
#[must_use = "end the spans with the response's status"]
pub struct EgressSpans(Option<(Context, Option<Context>)>);

/// An ingress message's span; the app call's span is started under it by [`MessageSpan::scope`].
#[must_use = "end the span with the call's status"]
pub struct MessageSpan(Option<Context>);

/// The app call's client span.
#[must_use = "end the span with the app's status"]
pub struct AppSpan(Option<Context>);

/// What the app call's span repeats from its message's: the route and where it came from.
#[derive(Clone)]
struct MessageInfo(Vec<KeyValue>);

impl Telemetry {
    /// Starts an egress call's spans (its parent the caller's `traceparent`) and makes the
    /// request carry the NATS hop's context (the server span's for `http` routes), so the
    /// message, or the upstream call, is their child.
    pub fn egress<B>(&self, route: &Outbound, subject: Option<&str>, req: &mut http::Request<B>) -> EgressSpans {
        let Some(t) = &self.0 else { return EgressSpans(None) };
        let mode = route.mode();
        let mut common = vec![KeyValue::new(key::ROUTE, route.name.clone()), KeyValue::new(key::MODE, mode.as_str())];
        if let Some(s) = subject {
            common.push(KeyValue::new(key::SUBJECT, s.to_owned()));
        }
        let parent = propagation::from_http(&t.propagator, req.headers());
        let mut server_attrs = common.clone();
        server_attrs.push(KeyValue::new(key::METHOD, req.method().to_string()));
        server_attrs.push(KeyValue::new(key::HTTP_ROUTE, route.path.clone()));
        let server = t.start(format!("{} {}", req.method(), route.path), SpanKind::Server, server_attrs, &parent);
        let hop = subject.is_some().then(|| {
            let (kind, op) = match mode {
                OutboundMode::Request | OutboundMode::Tunnel => (SpanKind::Client, "send"),
                _ => (SpanKind::Producer, "publish"),
            };
            let mut attrs = common;
            attrs.push(KeyValue::new(key::SYSTEM, "nats"));
            attrs.push(KeyValue::new(key::OPERATION, op));
            t.start(format!("{op} {}", route.name), kind, attrs, &server)
        });
        propagation::into_http(&t.propagator, hop.as_ref().unwrap_or(&server), req.headers_mut());
        EgressSpans(Some((server, hop)))
    }

    /// Starts the span of a message an inbound route received, its parent the message's
    /// `traceparent`; `delivered` is a JetStream delivery's count.
    pub fn message(&self, route: &Inbound, subject: &str, headers: Option<&async_nats::HeaderMap>, delivered: Option<u64>) -> MessageSpan {
        let Some(t) = &self.0 else { return MessageSpan(None) };
        let mode = route.mode_name();
        let mut attrs = vec![
            KeyValue::new(key::ROUTE, route.name.clone()),
            KeyValue::new(key::MODE, mode.as_str()),
            KeyValue::new(key::SUBJECT, subject.to_owned()),
        ];
        if let Some(n) = delivered {
            attrs.push(KeyValue::new(key::DELIVERY_COUNT, n as i64));
        }
        let info = MessageInfo(attrs.clone());
        attrs.push(KeyValue::new(key::SYSTEM, "nats"));
        attrs.push(KeyValue::new(key::OPERATION, "process"));
        let kind = if mode == InboundModeName::JetStream { SpanKind::Consumer } else { SpanKind::Server };
        let parent = propagation::from_nats(&t.propagator, headers);
        let cx = t.start(format!("process {}", route.name), kind, attrs, &parent);
        MessageSpan(Some(cx.with_value(info)))
    }

    /// Starts the client span of an app call made while a message's span is current (see
    /// [`MessageSpan::scope`]) and makes `headers` carry it; calls outside one (the health
    /// probe) get none.
    pub fn app_call(&self, method: &http::Method, uri: &str, headers: &mut http::HeaderMap) -> AppSpan {
        let Some(t) = &self.0 else { return AppSpan(None) };
        let parent = Context::current();
        let Some(info) = parent.get::<MessageInfo>().filter(|_| parent.has_active_span()) else { return AppSpan(None) };
        let mut attrs = info.0.clone();
        attrs.push(KeyValue::new(key::METHOD, method.to_string()));
        attrs.push(KeyValue::new(key::URL, uri.to_owned()));
        let cx = t.start(method.to_string(), SpanKind::Client, attrs, &parent);
        propagation::into_http(&t.propagator, &cx, headers);
        AppSpan(Some(cx))
    }
}

impl Inner {
    /// A started span, as the context its children start from.
    fn start(&self, name: String, kind: SpanKind, attrs: Vec<KeyValue>, parent: &Context) -> Context {
        let span = self.tracer.span_builder(name).with_kind(kind).with_attributes(attrs).start_with_context(&self.tracer, parent);
        parent.with_span(span)
    }
}

impl EgressSpans {
    /// Ends both spans with the response's status and the way the call went.
    pub fn end(self, status: http::StatusCode, path: &'static str) {
        let Some((server, hop)) = self.0 else { return };
        if let Some(hop) = hop {
            end(&hop, Ok(status), Some(path));
        }
        end(&server, Ok(status), Some(path));
    }
}

impl MessageSpan {
    /// Runs `call` with this span current, so the app call made in it is its child.
    pub fn scope<F: Future>(&self, call: F) -> impl Future<Output = F::Output> {
        match &self.0 {
            Some(cx) => Either::Left(call.with_context(cx.clone())),
            None => Either::Right(call),
        }
    }

    /// Ends the span with the status answered, or the failure that left none.
    pub fn end(self, outcome: Result<http::StatusCode, String>) {
        if let Some(cx) = self.0 {
            end(&cx, outcome, None);
        }
    }
}

impl AppSpan {
    /// Ends the span with the app's status, or the failure that left none.
    pub fn end(self, outcome: Result<http::StatusCode, String>) {
        if let Some(cx) = self.0 {
            end(&cx, outcome, None);
        }
    }
}

/// Records the outcome on `cx`'s span and ends it. A 5xx (a failure of the hop or
/// behind it) or a failure without a status is an error.
fn end(cx: &Context, outcome: Result<http::StatusCode, String>, path: Option<&'static str>) {
    let span = cx.span();
    if let Some(p) = path {
        span.set_attribute(KeyValue::new(key::PATH, p));
    }
    match outcome {
        Ok(status) => {
            span.set_attribute(KeyValue::new(key::STATUS, i64::from(status.as_u16())));
            if status.is_server_error() {
                span.set_status(Status::error(status.to_string()));
            }
        }
        Err(e) => span.set_status(Status::error(e)),
    }
    span.end();
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn config() -> crate::config::Config {
        let src = "[sidecar]\nservice = \"s\"\n[telemetry]\notlp_endpoint = \"http://127.0.0.1:1\"\n[[outbound]]\nname = \"o\"\npath = \"/o\"\nmode = \"publish\"\nsubject = \"o\"\n[[inbound]]\nname = \"i\"\nsubject = \"i\"\nmode = \"request\"\nmethod = \"POST\"\npath = \"/i\"\n";
        crate::config::parse(src, "t.toml").unwrap()
    }

    #[test]
    fn off_leaves_the_callers_traceparent_and_starts_nothing() {
        let c = config();
        let t = Telemetry::off();
        let mut req = http::Request::new(());
        req.headers_mut().insert("traceparent", PARENT.parse().unwrap());
        let spans = t.egress(&c.outbound[0], Some("o"), &mut req);
        assert!(spans.0.is_none());
        assert_eq!(req.headers()["traceparent"], PARENT);
        let mut h = http::HeaderMap::new();
        assert!(t.app_call(&http::Method::GET, "http://app/", &mut h).0.is_none());
        assert!(t.message(&c.inbound[0], "i", None, None).0.is_none());
    }

    #[tokio::test]
    async fn an_app_call_is_traced_only_under_a_message_span() {
        let c = config();
        let t = Telemetry::start(c.telemetry.as_ref()).unwrap();
        let mut probe = http::HeaderMap::new();
        // The health probe: no message, no span, no traceparent.
        assert!(t.app_call(&http::Method::GET, "http://app/healthz", &mut probe).0.is_none());
        assert!(probe.get("traceparent").is_none());
        let mut nats = async_nats::HeaderMap::new();
        nats.insert("Traceparent", PARENT);
        let message = t.message(&c.inbound[0], "i", Some(&nats), None);
        let (span, headers) = message
            .scope(async {
                let mut h = http::HeaderMap::new();
                (t.app_call(&http::Method::POST, "http://app/i", &mut h), h)
            })
            .await;
        let sent = headers["traceparent"].to_str().unwrap();
        assert!(sent.starts_with("00-0af7651916cd43dd8448eb211c80319c-"), "{sent}");
        let client = span.0.as_ref().unwrap().span().span_context().span_id().to_string();
        assert!(sent.contains(&client), "{sent} carries the client span {client}");
        span.end(Ok(http::StatusCode::OK));
        message.end(Ok(http::StatusCode::OK));
        // Nothing listens on the endpoint: the stop gives up within its budget.
        let by = Instant::now() + Duration::from_secs(2);
        t.shutdown(by).await;
        assert!(Instant::now() <= by + Duration::from_millis(500));
    }
}
