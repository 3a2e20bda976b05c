//! The raw codec: HTTP headers and bodies as they are, the reply → response status rules,
//! and the tunnel envelope.

use async_nats::header::IntoHeaderName as _;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode};

/// Status of a reply or tunnelled response (ours).
pub const BRIDGE_STATUS: &str = "Bridge-Status";
/// The NATS micro convention for errors.
pub const SERVICE_ERROR: &str = "Nats-Service-Error";
pub const SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";
pub const BRIDGE_METHOD: &str = "Bridge-Method";
pub const BRIDGE_PATH: &str = "Bridge-Path";
pub const BRIDGE_QUERY: &str = "Bridge-Query";
pub const BRIDGE_STREAM: &str = "Bridge-Stream";
pub const BRIDGE_SEQ: &str = "Bridge-Seq";
pub const BRIDGE_DELIVERY: &str = "Bridge-Delivery";
/// How far a `202 Accepted` can be trusted: publish mode's is `at-most-once`.
pub const BRIDGE_GUARANTEE: &str = "Bridge-Guarantee";
pub const BRIDGE_IDEMPOTENCY_KEY: &str = "Bridge-Idempotency-Key";
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";
pub const REQUEST_ID: &str = "X-Request-Id";

/// Headers the sidecar sets for the app about a delivery (the README documents them as
/// ours): a copy arriving in a NATS message is a spoof and is removed on every ingress mode.
pub const SPOOFABLE: &[&str] = &[BRIDGE_DELIVERY, BRIDGE_STREAM, BRIDGE_SEQ, BRIDGE_IDEMPOTENCY_KEY];

/// Proxy headers: the app sees ingress calls come from loopback and often trusts loopback
/// as a proxy, so a publisher's copy would spoof the client address, host or scheme.
pub const FORWARDED: &[&str] = &["Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"];

/// Our header names as `http` names, made at compile time, for the per-request paths:
/// `http::HeaderMap` parses and lower-cases a `&str` name on every call, about 550
/// instructions each under callgrind, and a request used up to ten of them (issue 14).
/// A unit test keeps them equal to the `&str` names above.
pub mod http_names {
    use http::HeaderName;

    pub const BRIDGE_STREAM: HeaderName = HeaderName::from_static("bridge-stream");
    pub const BRIDGE_SEQ: HeaderName = HeaderName::from_static("bridge-seq");
    pub const BRIDGE_DELIVERY: HeaderName = HeaderName::from_static("bridge-delivery");
    pub const BRIDGE_GUARANTEE: HeaderName = HeaderName::from_static("bridge-guarantee");
    pub const BRIDGE_IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("bridge-idempotency-key");
    /// The egress response's `Bridge-Path` (which way a call went), the tunnel's request path.
    pub const BRIDGE_PATH: HeaderName = HeaderName::from_static("bridge-path");
    pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
    pub const SPOOFABLE: [HeaderName; 4] = [BRIDGE_DELIVERY, BRIDGE_STREAM, BRIDGE_SEQ, BRIDGE_IDEMPOTENCY_KEY];
    pub const FORWARDED: [HeaderName; 4] = [
        http::header::FORWARDED,
        HeaderName::from_static("x-forwarded-for"),
        HeaderName::from_static("x-forwarded-host"),
        HeaderName::from_static("x-forwarded-proto"),
    ];
}

/// Removes from headers bound for the app what a NATS publisher must not set: our delivery
/// headers always, and the proxy headers unless the route trusts its publishers.
pub fn strip_spoofable(headers: &mut HeaderMap, trust_forwarded: bool) {
    // The usual case, none of them there, told by one look at each name (names are lower
    // case here): eight removals by name cost ~1,600 instructions per message (issue 14).
    let suspect = |n: &HeaderName| {
        let n = n.as_str();
        n.starts_with("bridge-") || n.starts_with("x-forwarded-") || n == "forwarded"
    };
    if !headers.keys().any(suspect) {
        return;
    }
    for h in &http_names::SPOOFABLE {
        headers.remove(h);
    }
    if !trust_forwarded {
        for h in &http_names::FORWARDED {
            headers.remove(h);
        }
    }
}

/// The methods a tunnel replays without configuration: RFC 9110's, minus `TRACE` (it echoes
/// the request, credentials included) and `CONNECT` (a raw tunnel), plus `PATCH`.
pub const TUNNEL_METHODS: &[Method] =
    &[Method::GET, Method::HEAD, Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS, Method::PATCH];

/// Whether a subject is one an ingress route may publish its reply to: it starts with one of
/// `prefixes`, and never with `$` (system and JetStream API subjects, where an empty
/// reply is a valid request such as `$JS.API.STREAM.DELETE.<stream>`).
pub fn reply_allowed(reply: &str, prefixes: &[String]) -> bool {
    !reply.starts_with('$') && prefixes.iter().any(|p| reply.starts_with(p.as_str()))
}

/// Whether a request path has a `.` or `..` segment (also percent-encoded), which the app
/// would resolve against its own root, above a base path the sidecar put in front.
pub fn has_dot_segment(path: &str) -> bool {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    path.split('/').any(|seg| {
        let decoded = percent_encoding::percent_decode_str(seg).decode_utf8_lossy();
        decoded == "." || decoded == ".."
    })
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus those a NATS hop recomputes: never carried
/// across (the fuzz targets check that none survives).
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

fn is_hop_by_hop(name: &HeaderName, connection: &[&str]) -> bool {
    let n = name.as_str();
    HOP_BY_HOP.contains(&n) || connection.iter().any(|c| c.eq_ignore_ascii_case(n))
}

/// Headers listed in `Connection:` are hop-by-hop too.
fn connection_tokens(headers: &HeaderMap) -> Vec<&str> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

/// The end-to-end headers of an HTTP message, for the next HTTP hop (the `http` mode's
/// reverse proxy): hop-by-hop ones, including those `Connection:` lists, are dropped.
pub fn end_to_end_headers(headers: &HeaderMap) -> HeaderMap {
    let connection = connection_tokens(headers);
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if !is_hop_by_hop(name, &connection) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// `x-request-id` → `X-Request-Id`: NATS peers (Go, NestJS, the server's own `Nats-Msg-Id`
/// dedupe) read header names case-sensitively in canonical form.
pub fn canonical_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = true;
    for c in name.chars() {
        if upper {
            out.push(c.to_ascii_uppercase());
        } else {
            out.push(c.to_ascii_lowercase());
        }
        upper = c == '-';
    }
    out
}

/// The canonical NATS name of `name`: a static name (no allocation) for the headers that
/// nearly every request carries, else [`canonical_name`].
fn nats_header_name(name: &HeaderName) -> async_nats::HeaderName {
    use async_nats::HeaderName as N;
    match name.as_str() {
        "content-type" => N::from_static("Content-Type"),
        "accept" => N::from_static("Accept"),
        "user-agent" => N::from_static("User-Agent"),
        "authorization" => N::from_static("Authorization"),
        "x-request-id" => N::from_static("X-Request-Id"),
        "traceparent" => N::from_static("Traceparent"),
        "tracestate" => N::from_static("Tracestate"),
        "accept-encoding" => N::from_static("Accept-Encoding"),
        "content-encoding" => N::from_static("Content-Encoding"),
        "idempotency-key" => N::from_static("Idempotency-Key"),
        "date" => N::from_static("Date"),
        "cache-control" => N::from_static("Cache-Control"),
        // CloudEvents' NATS binding names its attribute headers in lower case (`ce-id`),
        // and NATS header names are case-sensitive.
        other if crate::codec::cloudevents::is_ce_header(other) => {
            other.parse().unwrap_or_else(|_| canonical_name(other).into_header_name())
        }
        other => canonical_name(other).into_header_name(),
    }
}

/// End-to-end HTTP headers → NATS headers. Hop-by-hop headers are dropped. UTF-8 values
/// travel as they are (NATS headers are UTF-8 text); only values that are not UTF-8 at
/// all are dropped.
pub fn http_to_nats_headers(headers: &HeaderMap) -> async_nats::HeaderMap {
    let connection = connection_tokens(headers);
    let mut out = async_nats::HeaderMap::new();
    for (name, value) in headers {
        if is_hop_by_hop(name, &connection) {
            continue;
        }
        // Not `to_str`: it accepts visible ASCII only, and dropped `café` or `Jürgen`.
        if let Ok(v) = std::str::from_utf8(value.as_bytes()) {
            out.append(nats_header_name(name), v);
        }
    }
    out
}

/// Removes the app's `Nats-*` headers that `allows` (the route's setting) does not let through, all but
/// `Nats-Msg-Id` (egress sets it from `Idempotency-Key`): they steer how a stream stores a
/// message (`Nats-Expected-*`, `Nats-Rollup`, `Nats-TTL`, …), not what the message says.
pub fn strip_nats_control(headers: async_nats::HeaderMap, allows: impl Fn(&str) -> bool) -> async_nats::HeaderMap {
    let is_control = |n: &str| n.len() > 5 && n[..5].eq_ignore_ascii_case("nats-") && !n.eq_ignore_ascii_case(NATS_MSG_ID);
    if !headers.iter().any(|(n, _)| is_control(n.as_ref()) && !allows(n.as_ref())) {
        // The usual case: nothing to remove, no copy.
        return headers;
    }
    let mut out = async_nats::HeaderMap::new();
    for (name, values) in headers.iter() {
        let n: &str = name.as_ref();
        if is_control(n) && !allows(n) {
            continue;
        }
        for v in values {
            out.append(name.clone(), v.clone());
        }
    }
    out
}

/// NATS headers → HTTP headers, skipping names or values HTTP cannot carry and our own
/// protocol headers (`Bridge-*` control headers are re-added explicitly where wanted).
pub fn nats_to_http_headers(headers: &async_nats::HeaderMap, skip: &[&str]) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, values) in headers.iter() {
        let n: &str = name.as_ref();
        if skip.iter().any(|s| s.eq_ignore_ascii_case(n)) {
            continue;
        }
        let Ok(hn) = HeaderName::from_bytes(n.as_bytes()) else { continue };
        if is_hop_by_hop(&hn, &[]) {
            continue;
        }
        for v in values {
            if let Ok(hv) = HeaderValue::from_str(v.as_str()) {
                out.append(hn.clone(), hv);
            }
        }
    }
    out
}

/// The reply headers that are ours, not the app's. `Bridge-Path` is the egress answer's
/// (which way the call went), set by the sidecar alone: a responder's copy would lie.
const REPLY_CONTROL: &[&str] = &[BRIDGE_STATUS, SERVICE_ERROR, SERVICE_ERROR_CODE, BRIDGE_PATH];

/// Why a reply could not become a response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply status {0:?} is not an HTTP status code")]
    BadStatus(String),
}

/// The HTTP response a NATS reply stands for.
#[derive(Debug)]
pub struct ReplyResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

fn parse_status(v: &str) -> Result<StatusCode, ReplyError> {
    v.trim()
        .parse::<u16>()
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
        // `StatusCode` takes up to 999; HTTP defines 100–599, and 1xx is no final answer.
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or_else(|| ReplyError::BadStatus(v.to_owned()))
}

/// Reply → response: status from `Bridge-Status`, else `Nats-Service-Error-Code` (NATS
/// micro), else 200; the other headers become response headers; the payload the body.
pub fn reply_to_response(headers: Option<&async_nats::HeaderMap>, payload: Bytes) -> Result<ReplyResponse, ReplyError> {
    let Some(h) = headers else {
        return Ok(ReplyResponse { status: StatusCode::OK, headers: HeaderMap::new(), body: payload });
    };
    let status = if let Some(s) = h.get(BRIDGE_STATUS) {
        parse_status(s.as_str())?
    } else if let Some(s) = h.get(SERVICE_ERROR_CODE) {
        // A code outside HTTP's range is a reply the sidecar cannot pass on: 502.
        parse_status(s.as_str())?
    } else {
        StatusCode::OK
    };
    let mut headers = nats_to_http_headers(h, REPLY_CONTROL);
    if !headers.contains_key(http::header::CONTENT_TYPE) && h.get(SERVICE_ERROR).is_some() && payload.is_empty() {
        // A micro error with no body: surface its description as text.
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        let msg = h.get(SERVICE_ERROR).map(|v| Bytes::copy_from_slice(v.as_str().as_bytes())).unwrap_or_default();
        return Ok(ReplyResponse { status, headers, body: msg });
    }
    Ok(ReplyResponse { status, headers, body: payload })
}

/// App response → reply headers: the status in `Bridge-Status`, and for errors the NATS
/// micro headers too, so plain NATS clients and micro tooling see the failure.
pub fn response_to_reply_headers(status: StatusCode, headers: &HeaderMap) -> async_nats::HeaderMap {
    let mut out = http_to_nats_headers(headers);
    // hyper takes any three digits from an app; HTTP ends at 599, and the requesting side
    // refuses more (found by fuzzing): an answer that is not HTTP is a bad gateway's.
    let status = if status.as_u16() > 599 { StatusCode::BAD_GATEWAY } else { status };
    out.insert(BRIDGE_STATUS, status.as_str());
    if status.as_u16() >= 400 {
        out.insert(SERVICE_ERROR_CODE, status.as_str());
        out.insert(SERVICE_ERROR, status.canonical_reason().unwrap_or("error"));
    }
    out
}

/// Request line parts → tunnel headers, added to the request's own end-to-end headers.
pub fn tunnel_request_headers(method: &Method, path: &str, query: Option<&str>, headers: &HeaderMap) -> async_nats::HeaderMap {
    // The request's own `Bridge-*` tunnel headers must not pass: a `Bridge-Query` sent by
    // the app would otherwise be replayed as the query of a request that had none (found
    // by fuzzing).
    let control = [BRIDGE_METHOD, BRIDGE_PATH, BRIDGE_QUERY];
    let mut out = if control.iter().any(|h| headers.contains_key(*h)) {
        let mut own = headers.clone();
        for h in control {
            own.remove(h);
        }
        http_to_nats_headers(&own)
    } else {
        http_to_nats_headers(headers)
    };
    out.insert(BRIDGE_METHOD, method.as_str());
    out.insert(BRIDGE_PATH, path);
    if let Some(q) = query {
        out.insert(BRIDGE_QUERY, q);
    }
    out
}

/// A tunnelled request, as the receiving sidecar replays it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelRequest {
    pub method: Method,
    /// Path and query, ready for a request URI.
    pub path_and_query: String,
    pub headers: HeaderMap,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TunnelError {
    #[error("not a tunnelled request: no headers")]
    NoHeaders,
    #[error("missing or invalid {0} header")]
    Missing(&'static str),
    #[error("invalid {0}: {1:?}")]
    Invalid(&'static str, String),
}

/// Tunnel headers → the request to replay. Refuses anything that could not have come
/// from `tunnel_request_headers` (relative paths, absolute URLs, bad methods).
pub fn decode_tunnel_request(headers: Option<&async_nats::HeaderMap>) -> Result<TunnelRequest, TunnelError> {
    let h = headers.ok_or(TunnelError::NoHeaders)?;
    let method = h.get(BRIDGE_METHOD).ok_or(TunnelError::Missing(BRIDGE_METHOD))?.as_str();
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| TunnelError::Invalid(BRIDGE_METHOD, method.to_owned()))?;
    let path = h.get(BRIDGE_PATH).ok_or(TunnelError::Missing(BRIDGE_PATH))?.as_str();
    // Only origin-form paths: "//host" or "http://" would redirect the replay elsewhere.
    if !path.starts_with('/') || path.starts_with("//") {
        return Err(TunnelError::Invalid(BRIDGE_PATH, path.to_owned()));
    }
    let mut path_and_query = path.to_owned();
    if let Some(q) = h.get(BRIDGE_QUERY) {
        path_and_query.push('?');
        path_and_query.push_str(q.as_str());
    }
    if http::uri::PathAndQuery::try_from(path_and_query.as_str()).is_err() {
        return Err(TunnelError::Invalid(BRIDGE_PATH, path_and_query));
    }
    let headers = nats_to_http_headers(h, &[BRIDGE_METHOD, BRIDGE_PATH, BRIDGE_QUERY]);
    Ok(TunnelRequest { method, path_and_query, headers })
}

/// Status class label for metrics: "2xx", "4xx", …
pub fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn http_names_are_the_str_names() {
        use super::http_names as h;
        let pairs = [
            (h::BRIDGE_STREAM, BRIDGE_STREAM),
            (h::BRIDGE_SEQ, BRIDGE_SEQ),
            (h::BRIDGE_DELIVERY, BRIDGE_DELIVERY),
            (h::BRIDGE_GUARANTEE, BRIDGE_GUARANTEE),
            (h::BRIDGE_IDEMPOTENCY_KEY, BRIDGE_IDEMPOTENCY_KEY),
            (h::BRIDGE_PATH, BRIDGE_PATH),
            (h::IDEMPOTENCY_KEY, IDEMPOTENCY_KEY),
        ];
        for (name, s) in pairs {
            assert_eq!(name, HeaderName::from_bytes(s.as_bytes()).unwrap(), "{s}");
        }
        let spoofable: Vec<_> = SPOOFABLE.iter().map(|s| HeaderName::from_bytes(s.as_bytes()).unwrap()).collect();
        assert_eq!(h::SPOOFABLE.to_vec(), spoofable);
        let forwarded: Vec<_> = FORWARDED.iter().map(|s| HeaderName::from_bytes(s.as_bytes()).unwrap()).collect();
        assert_eq!(h::FORWARDED.to_vec(), forwarded);
    }

    #[test]
    fn each_spoofable_name_alone_is_stripped_and_others_stay() {
        for (name, trust) in SPOOFABLE.iter().map(|n| (n, true)).chain(FORWARDED.iter().map(|n| (n, false))) {
            let mut h = HeaderMap::new();
            h.insert("x-kept", HeaderValue::from_static("1"));
            h.insert(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_static("spoof"));
            strip_spoofable(&mut h, trust);
            assert!(!h.contains_key(*name), "{name} stayed");
            assert!(h.contains_key("x-kept"), "{name}: x-kept went too");
        }
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        strip_spoofable(&mut h, true);
        assert!(h.contains_key("x-forwarded-for"), "a trusted route keeps the proxy headers");
    }

    #[test]
    fn utf8_header_values_travel_both_ways() {
        let mut h = HeaderMap::new();
        h.insert("x-name", HeaderValue::from_bytes("Jürgen café".as_bytes()).unwrap());
        h.insert("x-latin1", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        let n = http_to_nats_headers(&h);
        assert_eq!(n.get("X-Name").map(|v| v.as_str()), Some("Jürgen café"));
        // Not UTF-8 at all: cannot be NATS header text.
        assert!(n.get("X-Latin1").is_none());
        let back = nats_to_http_headers(&n, &[]);
        assert_eq!(back.get("x-name").unwrap().as_bytes(), "Jürgen café".as_bytes());
    }

    use super::*;

    #[test]
    fn an_app_status_past_599_is_sent_as_a_bad_gateway_that_decodes() {
        let reply = response_to_reply_headers(StatusCode::from_u16(831).unwrap(), &HeaderMap::new());
        let r = reply_to_response(Some(&reply), Bytes::new()).expect("our own reply headers decode");
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    }

    fn hm(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn canonical_names() {
        assert_eq!(canonical_name("x-request-id"), "X-Request-Id");
        assert_eq!(canonical_name("nats-msg-id"), "Nats-Msg-Id");
        assert_eq!(canonical_name("traceparent"), "Traceparent");
        // The static names agree with the general rule.
        for n in [
            "content-type",
            "accept",
            "user-agent",
            "authorization",
            "x-request-id",
            "traceparent",
            "tracestate",
            "accept-encoding",
            "content-encoding",
            "idempotency-key",
            "date",
            "cache-control",
            "x-custom-thing",
        ] {
            let got = nats_header_name(&HeaderName::from_static(n));
            assert_eq!(got.as_ref() as &str, canonical_name(n), "{n}");
        }
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let h = hm(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("host", "agent-service"),
            ("traceparent", "00-abc-def-01"),
            ("accept", "a"),
            ("accept", "b"),
        ]);
        let n = http_to_nats_headers(&h);
        assert!(n.get("X-Secret").is_none());
        assert!(n.get("Transfer-Encoding").is_none());
        assert!(n.get("Host").is_none());
        assert_eq!(n.get("Traceparent").unwrap().as_str(), "00-abc-def-01");
        assert_eq!(n.get_all("Accept").map(|v| v.as_str().to_owned()).collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn end_to_end_headers_for_a_proxy_hop() {
        let h = hm(&[("connection", "close, x-hop"), ("x-hop", "1"), ("keep-alive", "5"), ("host", "a"), ("accept", "b")]);
        let out = end_to_end_headers(&h);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out["accept"], "b");
    }

    #[test]
    fn reply_status_rules() {
        let r = reply_to_response(None, Bytes::from_static(b"hi")).unwrap();
        assert_eq!(r.status, StatusCode::OK);

        let mut h = async_nats::HeaderMap::new();
        h.insert(BRIDGE_STATUS, "201");
        h.insert(SERVICE_ERROR_CODE, "500");
        h.insert("Content-Type", "application/json");
        h.insert(BRIDGE_PATH, "http");
        let r = reply_to_response(Some(&h), Bytes::new()).unwrap();
        assert_eq!(r.status, StatusCode::CREATED);
        assert_eq!(r.headers.get("content-type").unwrap(), "application/json");
        assert!(r.headers.get("bridge-status").is_none());
        assert!(r.headers.get("bridge-path").is_none(), "only the sidecar says which path a call took");

        let mut h = async_nats::HeaderMap::new();
        h.insert(SERVICE_ERROR_CODE, "404");
        h.insert(SERVICE_ERROR, "no such key");
        let r = reply_to_response(Some(&h), Bytes::new()).unwrap();
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(&r.body[..], b"no such key");

        let mut h = async_nats::HeaderMap::new();
        h.insert(SERVICE_ERROR_CODE, "9999");
        assert!(reply_to_response(Some(&h), Bytes::new()).is_err());
        for out_of_range in ["999", "600", "0", "-1"] {
            let mut h = async_nats::HeaderMap::new();
            h.insert(BRIDGE_STATUS, out_of_range);
            assert!(reply_to_response(Some(&h), Bytes::new()).is_err(), "{out_of_range}");
            let mut h = async_nats::HeaderMap::new();
            h.insert(SERVICE_ERROR_CODE, out_of_range);
            assert!(reply_to_response(Some(&h), Bytes::new()).is_err(), "{out_of_range}");
        }
        let mut h = async_nats::HeaderMap::new();
        h.insert(BRIDGE_STATUS, "599");
        assert_eq!(reply_to_response(Some(&h), Bytes::new()).unwrap().status.as_u16(), 599);

        let mut h = async_nats::HeaderMap::new();
        h.insert(BRIDGE_STATUS, "teapot");
        assert!(reply_to_response(Some(&h), Bytes::new()).is_err());
        h.insert(BRIDGE_STATUS, "101");
        assert!(reply_to_response(Some(&h), Bytes::new()).is_err());
    }

    #[test]
    fn response_to_reply_marks_errors_for_micro_clients() {
        let h = hm(&[("content-type", "text/plain")]);
        let ok = response_to_reply_headers(StatusCode::OK, &h);
        assert_eq!(ok.get(BRIDGE_STATUS).unwrap().as_str(), "200");
        assert!(ok.get(SERVICE_ERROR_CODE).is_none());
        let err = response_to_reply_headers(StatusCode::NOT_FOUND, &h);
        assert_eq!(err.get(SERVICE_ERROR_CODE).unwrap().as_str(), "404");
        assert_eq!(err.get(SERVICE_ERROR).unwrap().as_str(), "Not Found");
        // And the round trip gives the same status back.
        let back = reply_to_response(Some(&err), Bytes::new()).unwrap();
        assert_eq!(back.status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn tunnel_round_trip() {
        let h = hm(&[("content-type", "application/json"), ("x-trace", "1"), ("connection", "close")]);
        let n = tunnel_request_headers(&Method::PATCH, "/v1/keys/9", Some("a=1&b=2"), &h);
        let t = decode_tunnel_request(Some(&n)).unwrap();
        assert_eq!(t.method, Method::PATCH);
        assert_eq!(t.path_and_query, "/v1/keys/9?a=1&b=2");
        assert_eq!(t.headers.get("x-trace").unwrap(), "1");
        assert!(t.headers.get("bridge-method").is_none());
        assert!(t.headers.get("connection").is_none());
    }

    #[test]
    fn tunnel_decoding_refuses_redirects() {
        for bad in ["//evil.example/x", "http://evil/x", "x", "/a b"] {
            let mut n = async_nats::HeaderMap::new();
            n.insert(BRIDGE_METHOD, "GET");
            n.insert(BRIDGE_PATH, bad);
            assert!(decode_tunnel_request(Some(&n)).is_err(), "{bad}");
        }
        assert_eq!(decode_tunnel_request(None), Err(TunnelError::NoHeaders));
    }
}
