//! W3C trace context (`traceparent`, `tracestate`) in and out of HTTP and NATS headers:
//! the carriers the OpenTelemetry propagator reads and writes. Pure.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// The headers the W3C propagator reads and writes, canonical for NATS.
const NATS_NAMES: [(&str, &str); 2] = [("traceparent", "Traceparent"), ("tracestate", "Tracestate")];

/// HTTP headers the propagator writes.
struct HttpWrite<'a>(&'a mut http::HeaderMap);

/// HTTP headers the propagator reads.
struct HttpRead<'a>(&'a http::HeaderMap);

impl Injector for HttpWrite<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator writes an empty `tracestate` when there is none: not worth a header.
        if value.is_empty() {
            return;
        }
        if let (Ok(name), Ok(value)) = (http::HeaderName::try_from(key), http::HeaderValue::try_from(value)) {
            self.0.insert(name, value);
        }
    }
}

impl Extractor for HttpRead<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// NATS headers, read case-insensitively: egress writes `Traceparent` (NATS peers read
/// canonical names), other publishers often `traceparent`.
struct NatsHeaders<'a>(&'a async_nats::HeaderMap);

impl Extractor for NatsHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let canonical = NATS_NAMES.iter().find(|(lower, _)| *lower == key).map(|(_, c)| *c);
        canonical.and_then(|c| self.0.get(c)).or_else(|| self.0.get(key)).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        NATS_NAMES.iter().map(|(lower, _)| *lower).collect()
    }
}

/// The caller's trace context in `headers`; an empty context (a new trace) without one.
pub(crate) fn from_http(propagator: &TraceContextPropagator, headers: &http::HeaderMap) -> Context {
    propagator.extract(&HttpRead(headers))
}

/// The publisher's trace context in a message's headers.
pub(crate) fn from_nats(propagator: &TraceContextPropagator, headers: Option<&async_nats::HeaderMap>) -> Context {
    match headers {
        Some(h) => propagator.extract(&NatsHeaders(h)),
        None => Context::new(),
    }
}

/// Writes `cx`'s span as the `traceparent` (and `tracestate`) of `headers`, replacing the
/// caller's: the next hop is the child of our span, not of the caller's.
pub(crate) fn into_http(propagator: &TraceContextPropagator, cx: &Context, headers: &mut http::HeaderMap) {
    headers.remove(http::header::HeaderName::from_static("tracestate"));
    propagator.inject_context(cx, &mut HttpWrite(headers));
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};

    use super::*;

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn context(trace: u128, span: u64) -> Context {
        let sc = SpanContext::new(TraceId::from(trace), SpanId::from(span), TraceFlags::SAMPLED, true, TraceState::default());
        Context::new().with_remote_span_context(sc)
    }

    #[test]
    fn reads_http_and_nats_headers_in_either_case() {
        let p = TraceContextPropagator::new();
        let mut http = http::HeaderMap::new();
        http.insert("traceparent", PARENT.parse().unwrap());
        let from_http = from_http(&p, &http);
        assert_eq!(from_http.span().span_context().trace_id().to_string(), "0af7651916cd43dd8448eb211c80319c");
        for name in ["Traceparent", "traceparent"] {
            let mut nats = async_nats::HeaderMap::new();
            nats.insert(name, PARENT);
            let cx = from_nats(&p, Some(&nats));
            assert_eq!(cx.span().span_context().span_id().to_string(), "b7ad6b7169203331", "{name}");
            assert!(cx.span().span_context().is_remote());
        }
        assert!(!from_nats(&p, None).span().span_context().is_valid());
    }

    #[test]
    fn writing_replaces_the_callers_context() {
        let p = TraceContextPropagator::new();
        let mut h = http::HeaderMap::new();
        h.insert("traceparent", PARENT.parse().unwrap());
        h.insert("tracestate", "vendor=old".parse().unwrap());
        into_http(&p, &context(0x42, 0x7), &mut h);
        assert_eq!(h["traceparent"], "00-00000000000000000000000000000042-0000000000000007-01");
        assert!(h.get("tracestate").is_none(), "{h:?}");
    }
}
