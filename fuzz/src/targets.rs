//! The fuzz targets' bodies, shared by the cargo-fuzz binaries (`fuzz_targets/*.rs`, via
//! the `natsbridge-fuzz` crate) and the stable randomized driver in the main crate
//! (`tests/fuzz_regressions.rs`, via `#[path]`). Each takes raw bytes, never panics on
//! its own, and asserts the invariants of the code under test.
//!
//! Depends only on `natsbridge`, `http`, `async-nats`, `bytes` and `serde_json`, which both
//! users have.
#![allow(dead_code)]

use std::str::FromStr;
use std::sync::OnceLock;

use natsbridge::codec::{self, HOP_BY_HOP};
use natsbridge::config::{self, OutboundTarget};
use natsbridge::egress::routes::RouteTable;
use natsbridge::subject::SubjectTemplate;

fn fields(data: &[u8]) -> Vec<&[u8]> {
    data.split(|&b| b == 0).collect()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// ---------------------------------------------------------------------------------------
// routes.toml parsing and validation

/// `natsbridge::config::parse` on arbitrary text: never panics; a config it accepts builds
/// a route table, and every template in it renders its own probe.
pub fn config(data: &[u8]) {
    let src = text(data);
    match config::parse(&src, "fuzz.toml") {
        Ok(c) => {
            let table = RouteTable::new(&c);
            assert_eq!(table.len(), c.outbound.len());
            for r in &c.outbound {
                assert!(r.path.starts_with('/'), "accepted a path not starting with '/': {:?}", r.path);
                if let OutboundTarget::Request(t) | OutboundTarget::Publish(t) | OutboundTarget::JetStream(t) = &r.target {
                    let probe = t.probe();
                    assert!(
                        natsbridge::subject::SubjectPattern::parse(&probe).is_ok(),
                        "template {:?} probes to invalid {probe:?}",
                        t.as_str()
                    );
                }
            }
        }
        Err(e) => assert!(!e.diagnostics.is_empty(), "an error without diagnostics"),
    }
}

// ---------------------------------------------------------------------------------------
// path matching + subject rendering

/// The route table the path-matching target runs against.
const ROUTES: &str = include_str!("../routes.toml");

fn table() -> &'static RouteTable {
    static T: OnceLock<RouteTable> = OnceLock::new();
    T.get_or_init(|| RouteTable::new(&config::parse(ROUTES, "fuzz-routes.toml").expect("fuzz routes are valid")))
}

const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];

/// A rendered subject has no wildcard, empty, whitespace or control-character token,
/// and exactly as many tokens as its template.
pub fn check_subject(template: &SubjectTemplate, subject: &str) {
    let tokens: Vec<&str> = subject.split('.').collect();
    for t in &tokens {
        assert!(!t.is_empty(), "empty token in {subject:?} from {:?}", template.as_str());
        assert!(!t.contains('*') && !t.contains('>'), "wildcard in {subject:?} from {:?}", template.as_str());
        assert!(
            !t.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()),
            "whitespace or control character in {subject:?} from {:?}",
            template.as_str()
        );
    }
    assert_eq!(tokens.len(), template.as_str().split('.').count(), "token count of {subject:?} vs template {:?}", template.as_str());
    // A subject past the server's control line would get the sidecar disconnected.
    assert!(subject.len() <= natsbridge::subject::MAX_SUBJECT_LEN, "{}-byte subject from {:?}", subject.len(), template.as_str());
    assert!(natsbridge::subject::control_line_len(subject, 256) <= natsbridge::subject::MAX_CONTROL_LINE);
}

/// A rendered subject or its refusal: a capture too long for one is refused as
/// `TooLong`, never rendered (issue 20: one long path disconnected the sidecar).
fn check_render(template: &SubjectTemplate, rendered: Result<String, natsbridge::subject::RenderError>, longest_capture: usize) {
    match rendered {
        Ok(subject) => check_subject(template, &subject),
        Err(natsbridge::subject::RenderError::TooLong { len, max }) => {
            assert!(len > max && longest_capture > 0, "TooLong({len} > {max}) from {:?}", template.as_str())
        }
        Err(_) => {}
    }
}

/// Input: `method byte, path, host, template, value` separated by NUL bytes.
/// - the fixed route table looks up (method, host, path) and renders the matched route's
///   subject from the path captures;
/// - a fuzzed subject template renders from fuzzed capture values.
pub fn routes(data: &[u8]) {
    let f = fields(data);
    let method_i = f.first().and_then(|m| m.first()).copied().unwrap_or(0) as usize;
    let method = http::Method::from_str(METHODS[method_i % METHODS.len()]).unwrap();
    let path = text(f.get(1).copied().unwrap_or(b"/"));
    let host = f.get(2).map(|h| text(h));
    if let Ok(m) = table().lookup(&method, host.as_deref(), &path) {
        assert!(std::ptr::eq(m.route, &table().routes()[m.index]));
        if let OutboundTarget::Request(t) | OutboundTarget::Publish(t) | OutboundTarget::JetStream(t) = &m.route.target {
            let longest = m.params.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
            check_render(t, t.render(|name| m.params.get(name)), longest);
            // The same captures stretched past any subject's limit are always refused.
            if t.captures().next().is_some() {
                let long = "a".repeat(5000);
                let r = t.render(|_| Some(long.as_str()));
                assert!(matches!(r, Err(natsbridge::subject::RenderError::TooLong { .. })), "{:?}: {r:?}", t.as_str());
            }
        }
    }
    if let Some(tpl) = f.get(3) {
        if let Ok(t) = SubjectTemplate::parse(&text(tpl)) {
            let value = text(f.get(4).copied().unwrap_or(b"x"));
            let values: Vec<&str> = value.split('/').collect();
            let pick = |name: &str| -> Option<&str> {
                let h = name.bytes().fold(0usize, |a, b| a.wrapping_mul(31).wrapping_add(b as usize));
                values.get(h % values.len()).copied()
            };
            check_render(&t, t.render(pick), values.iter().map(|v| v.len()).max().unwrap_or(0));
        }
    }
}

// ---------------------------------------------------------------------------------------
// header mapping, both directions

/// `name: value` lines → an HTTP header map (invalid names or values skipped).
fn http_headers(b: &[u8]) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for line in b.split(|&c| c == b'\n') {
        let Some(colon) = line.iter().position(|&c| c == b':') else { continue };
        let (Ok(n), Ok(v)) = (http::HeaderName::from_bytes(&line[..colon]), http::HeaderValue::from_bytes(line[colon + 1..].trim_ascii()))
        else {
            continue;
        };
        h.append(n, v);
    }
    h
}

/// `name: value` lines → a NATS header map, through the fallible parsers (as the wire
/// decoder would refuse what they refuse).
fn nats_headers(b: &[u8]) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    for line in b.split(|&c| c == b'\n') {
        let line = text(line);
        let Some((n, v)) = line.split_once(':') else { continue };
        let (Ok(n), Ok(v)) = (async_nats::HeaderName::from_str(n), async_nats::HeaderValue::from_str(v.trim())) else { continue };
        h.append(n, v);
    }
    h
}

fn connection_tokens(h: &http::HeaderMap) -> Vec<String> {
    h.get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Input: `http header lines, nats header lines, status byte pair, payload` separated by
/// NUL bytes. No hop-by-hop header (nor one named in `Connection:`) survives either
/// direction; nothing panics; reply statuses stay in 200..=599.
pub fn headers(data: &[u8]) {
    let f = fields(data);
    let h = http_headers(f.first().copied().unwrap_or_default());
    let out = codec::http_to_nats_headers(&h);
    let conn = connection_tokens(&h);
    for (name, _) in out.iter() {
        let n = AsRef::<str>::as_ref(name).to_ascii_lowercase();
        assert!(!HOP_BY_HOP.contains(&n.as_str()), "hop-by-hop {n:?} survived http→nats");
        assert!(!conn.contains(&n), "{n:?} named in Connection survived http→nats");
    }
    // And back again: still none, and every value survives unchanged.
    let back = codec::nats_to_http_headers(&out, &[]);
    for (name, value) in &back {
        assert!(!HOP_BY_HOP.contains(&name.as_str()), "hop-by-hop {name} survived the round trip");
        assert!(h.get_all(name).iter().any(|v| v == value), "{name}: {value:?} was not in the input");
    }

    let n = nats_headers(f.get(1).copied().unwrap_or_default());
    let out = codec::nats_to_http_headers(&n, &[codec::BRIDGE_STATUS]);
    for (name, _) in &out {
        assert!(!HOP_BY_HOP.contains(&name.as_str()), "hop-by-hop {name} survived nats→http");
        assert!(!name.as_str().eq_ignore_ascii_case(codec::BRIDGE_STATUS), "a skipped header survived");
    }

    let code = f.get(2).map(|s| s.iter().fold(0u16, |a, &b| a.wrapping_mul(10).wrapping_add(b as u16) % 1000)).unwrap_or(200);
    if let Ok(status) = http::StatusCode::from_u16(code) {
        let reply = codec::response_to_reply_headers(status, &h);
        if status.as_u16() >= 200 {
            let r = codec::reply_to_response(Some(&reply), bytes::Bytes::new()).expect("our own reply headers decode");
            // Past 599 an app's answer is not HTTP: it travels as a bad gateway.
            let want = if status.as_u16() > 599 { http::StatusCode::BAD_GATEWAY } else { status };
            assert_eq!(r.status, want);
        }
    }
    let payload = bytes::Bytes::copy_from_slice(f.get(3).copied().unwrap_or_default());
    if let Ok(r) = codec::reply_to_response(Some(&n), payload) {
        assert!(r.status.as_u16() >= 200, "informational status from a reply: {}", r.status);
        for (name, _) in &r.headers {
            assert!(!HOP_BY_HOP.contains(&name.as_str()), "hop-by-hop {name} in a reply response");
        }
    }
}

// ---------------------------------------------------------------------------------------
// tunnel request decoding

/// Input: `nats header lines, method, path-and-query, http header lines, reply subject`
/// separated by NUL bytes.
/// - decoding arbitrary tunnel headers yields an origin-form path (starts with '/', not
///   '//') that parses as a URI path, and none of the control or hop-by-hop headers;
///   after the ingress strip, none of the sidecar's delivery or the forwarded headers;
/// - encoding a request and decoding it gives the same method and path back;
/// - a reply subject is answered only under the inbox prefix, never a `$` subject.
pub fn tunnel(data: &[u8]) {
    let f = fields(data);
    let n = nats_headers(f.first().copied().unwrap_or_default());
    let decoded = codec::decode_tunnel_request(Some(&n));
    if let Ok(mut t) = decoded.clone() {
        codec::strip_spoofable(&mut t.headers, false);
        for h in codec::SPOOFABLE.iter().chain(codec::FORWARDED) {
            assert!(!t.headers.contains_key(*h), "{h} reaches the app");
        }
    }
    check_decoded(decoded);
    check_reply(&text(f.get(4).copied().unwrap_or_default()));

    let method = f.get(1).and_then(|m| http::Method::from_bytes(m).ok());
    let pq = f.get(2).and_then(|p| http::uri::PathAndQuery::try_from(*p).ok());
    if let (Some(method), Some(pq)) = (method, pq) {
        let h = http_headers(f.get(3).copied().unwrap_or_default());
        let encoded = codec::tunnel_request_headers(&method, pq.path(), pq.query(), &h);
        let decoded = codec::decode_tunnel_request(Some(&encoded));
        if pq.path().starts_with('/') && !pq.path().starts_with("//") {
            let t = decoded.clone().unwrap_or_else(|e| panic!("{method} {pq} did not survive the tunnel: {e}"));
            assert_eq!(t.method, method);
            // `PathAndQuery` keeps "?q" as written but reports its path as "/".
            let want = match pq.query() {
                Some(q) => format!("{}?{q}", pq.path()),
                None => pq.path().to_owned(),
            };
            assert_eq!(t.path_and_query, want);
        }
        check_decoded(decoded);
    }
}

/// A reply subject the ingress would answer starts with the inbox prefix, and no `$`
/// subject (`$JS.API.STREAM.DELETE.<stream>`) is ever answered.
pub fn check_reply(reply: &str) {
    let prefixes = [config::DEFAULT_REPLY_PREFIX.to_owned()];
    if codec::reply_allowed(reply, &prefixes) {
        assert!(reply.starts_with(config::DEFAULT_REPLY_PREFIX) && !reply.starts_with('$'), "answered reply {reply:?}");
    }
    assert!(!codec::reply_allowed(&format!("${reply}"), &prefixes), "answered a $ reply");
    assert!(!codec::reply_allowed(&format!("$JS.API.{reply}"), &[reply.to_owned()]), "a $ prefix allowed");
}

fn check_decoded(r: Result<codec::TunnelRequest, codec::TunnelError>) {
    let Ok(t) = r else { return };
    assert!(t.path_and_query.starts_with('/') && !t.path_and_query.starts_with("//"), "decoded path {:?}", t.path_and_query);
    assert!(http::uri::PathAndQuery::try_from(t.path_and_query.as_str()).is_ok(), "decoded path {:?} does not parse", t.path_and_query);
    for (name, _) in &t.headers {
        let n = name.as_str();
        assert!(!HOP_BY_HOP.contains(&n), "hop-by-hop {n} in a decoded tunnel request");
        for control in [codec::BRIDGE_METHOD, codec::BRIDGE_PATH, codec::BRIDGE_QUERY] {
            assert!(!n.eq_ignore_ascii_case(control), "{control} leaked into the replayed request");
        }
    }
}

// ---------------------------------------------------------------------------------------
// the egress framing guard (pipelined requests)

/// `egress::framing::Guard` on an arbitrary byte stream: never panics, and what it judges
/// does not depend on how the stream was split into reads. The first byte picks the split
/// size; the verdicts of the whole stream in one read and in those pieces must match.
pub fn framing(data: &[u8]) {
    use natsbridge::egress::framing::Guard;
    let Some((&piece, stream)) = data.split_first() else { return };
    let verdicts = |piece: usize| {
        let mut g = Guard::default();
        for p in stream.chunks(piece.max(1)) {
            g.read(p);
        }
        let mut out = Vec::new();
        while let Some(v) = g.pending_verdict() {
            out.push(v);
        }
        out
    };
    let whole = verdicts(stream.len());
    assert_eq!(whole, verdicts(usize::from(piece % 16) + 1), "verdicts depend on the read split");
}

// ---------------------------------------------------------------------------------------
// nestjs: `payload \0 id \0 subject-or-body \0 status`, through every codec::nestjs
// decoder, and encode → decode round trips.

/// JSON equality with numbers compared as f64 within an ulp or two: a float printed by
/// serde_json and parsed again may differ in its last bit (no `float_roundtrip`).
fn same_json(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) if x.is_finite() && y.is_finite() => (x - y).abs() <= x.abs().max(y.abs()) * 1e-15,
            _ => x == y,
        },
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y)),
        (Value::Object(x), Value::Object(y)) => x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w))),
        _ => a == b,
    }
}

pub fn nestjs(data: &[u8]) {
    use codec::nestjs::{self as nest, Frame};
    use serde_json::Value;
    let f = fields(data);
    let payload = bytes::Bytes::copy_from_slice(f[0]);
    let id = text(f.get(1).copied().unwrap_or_default());
    let third = f.get(2).copied().unwrap_or_default();
    let subject = text(third);

    // Any reply payload: a verdict, never a panic; an empty one is Nest's error.
    let frame = nest::decode_reply(&payload, &id);
    assert_eq!(payload.is_empty(), frame == Err(nest::ReplyError::Empty));
    if let Ok(Frame::Err(e)) = &frame {
        let s = nest::err_status(e).as_u16();
        assert!((400..=599).contains(&s), "err → {s}");
    }
    // Any inbound payload: a JSON body for the app is JSON.
    let inc = nest::decode_incoming(&payload, &subject);
    if inc.json {
        assert!(serde_json::from_slice::<Value>(&inc.body).is_ok(), "json body {:?}", inc.body);
    }

    // A body the codec accepts, sent as a request, is what the receiving side hands on.
    if let Ok(Some(body)) = nest::body_data(third) {
        let pattern = serde_json::from_slice::<Value>(&payload)
            .ok()
            .filter(|p| p.is_string() || p.is_object())
            .unwrap_or(Value::String(subject.clone()));
        let packet = nest::encode_request(&pattern, Some(&body), &id);
        let back = nest::decode_incoming(&packet, "fallback");
        assert_eq!(back.pattern, nest::normalize_pattern(&pattern));
        assert_eq!(back.id, Some(Value::String(id.clone())));
        let got: Value = serde_json::from_slice(&back.body).unwrap();
        assert!(same_json(&got, &body), "data {body} came back as {got}");
    }

    // Our reply, read by Nest's client for the same id.
    let code = f.get(3).map(|b| b.iter().fold(0u16, |a, &x| a.wrapping_mul(31).wrapping_add(x as u16))).unwrap_or(200);
    let status = http::StatusCode::from_u16(100 + code % 500).unwrap();
    let reply = nest::encode_reply(&Value::String(id.clone()), status, third);
    match nest::decode_reply(&reply, &id) {
        Ok(Frame::Err(e)) => {
            assert!(status.as_u16() >= 400, "{status} became err {e}");
            assert_eq!(nest::err_status(&e), status, "err {e}");
        }
        Ok(Frame::Last(v)) => {
            assert!(status.as_u16() < 400, "{status} became a response");
            let want = if third.is_empty() {
                None
            } else {
                Some(serde_json::from_slice(third).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(third).into_owned())))
            };
            match (&v, &want) {
                (Some(a), Some(b)) => assert!(same_json(a, b), "{a} != {b}"),
                _ => assert_eq!(v, want),
            }
        }
        other => panic!("our reply for {status} decoded as {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// CloudEvents

/// `codec::cloudevents` (input: `body\0header lines`, `name: value` per line): an HTTP
/// message read as an event, and arbitrary NATS headers too, never panic; a valid event
/// survives binary mode on NATS and on HTTP; header values survive percent-encoding.
pub fn cloudevents(data: &[u8]) {
    use codec::cloudevents::{decode_value, encode_value, is_structured, Event};
    let f = fields(data);
    let body = bytes::Bytes::copy_from_slice(f[0]);
    let lines = text(f.get(1).copied().unwrap_or_default());
    let mut headers = http::HeaderMap::new();
    let mut nats = async_nats::HeaderMap::new();
    for line in lines.lines() {
        let Some((n, v)) = line.split_once(':') else { continue };
        let v = v.trim();
        if let (Ok(name), Ok(value)) = (http::HeaderName::from_str(n.trim()), http::HeaderValue::from_str(v)) {
            headers.append(name, value);
        }
        if let (Ok(name), Ok(value)) = (n.trim().parse::<async_nats::HeaderName>(), v.parse::<async_nats::HeaderValue>()) {
            nats.append(name, value);
        }
        assert_eq!(decode_value(&encode_value(v)), v, "value {v:?}");
        assert!(encode_value(v).bytes().all(|b| (0x21..=0x7e).contains(&b)));
    }
    let _ = Event::from_nats(Some(&nats), body.clone());
    let Ok(Some(event)) = Event::from_http(&headers, body) else { return };
    if event.validate().is_err() {
        return;
    }
    // Binary mode on NATS gives the same event back.
    let mut on_nats = async_nats::HeaderMap::new();
    for (n, v) in event.nats_headers() {
        on_nats.insert(n.as_str(), v.as_str());
    }
    let back = Event::from_nats(Some(&on_nats), event.data.clone()).expect("our binary mode reads back").expect("an event");
    assert_eq!(back, event);
    // And on HTTP, when its content type is a header value that does not mean structured.
    let ct_ok = event.get("datacontenttype").is_none_or(|ct| !is_structured(ct) && http::HeaderValue::from_str(ct).is_ok());
    if ct_ok {
        let mut on_http = http::HeaderMap::new();
        for (n, v) in event.http_headers() {
            on_http.insert(http::HeaderName::from_str(&n).unwrap(), http::HeaderValue::from_str(&v).unwrap());
        }
        let back = Event::from_http(&on_http, event.data.clone()).expect("our binary mode reads back").expect("an event");
        assert_eq!(back, event);
    }
}

/// A fuzz target: panics when an invariant breaks.
pub type Target = fn(&[u8]);

/// The streamed-reply framing (`natsbridge::streamed`): field 0 chunk sizes, field 1 an
/// event-stream body, field 2 a payload framed as one SSE event, field 3 an event name.
///
/// - However the body is chunked, the splitter yields the same events, each ending in a
///   blank line, and events plus the unfinished rest are the body, byte for byte.
/// - A framed message is exactly one event whose `data:` lines give back the payload
///   (line ends normalised to `\n`).
pub fn stream(data: &[u8]) {
    use natsbridge::streamed::{self, SseSplitter};
    let f = fields(data);
    let sizes = f.first().copied().unwrap_or_default();
    let body = f.get(1).copied().unwrap_or_default();
    let events = |chunks: &mut dyn Iterator<Item = &[u8]>| {
        let mut s = SseSplitter::default();
        let mut out = Vec::new();
        for c in chunks {
            s.push(c);
            out.extend(std::iter::from_fn(|| s.next_event()));
        }
        (out, s.rest())
    };
    let (whole, whole_rest) = events(&mut std::iter::once(body));
    let mut at = 0;
    let mut i = 0;
    let mut pieces = Vec::new();
    while at < body.len() {
        let n = (sizes.get(i).copied().unwrap_or(7) as usize % 16 + 1).min(body.len() - at);
        pieces.push(&body[at..at + n]);
        at += n;
        i += 1;
    }
    let (chunked, chunked_rest) = events(&mut pieces.into_iter());
    assert_eq!(whole, chunked, "the events depend on the chunking");
    assert_eq!(whole_rest, chunked_rest);
    let mut joined: Vec<u8> = whole.iter().flat_map(|e| e.iter().copied()).collect();
    joined.extend_from_slice(&whole_rest);
    assert_eq!(joined, body, "bytes were lost or added");
    for e in &whole {
        assert!(e.ends_with(b"\n") || e.ends_with(b"\r"), "an event without its blank line: {e:?}");
    }

    let payload = f.get(2).copied().unwrap_or_default();
    let name = String::from_utf8_lossy(f.get(3).copied().unwrap_or_default()).into_owned();
    let framed = streamed::sse_event(Some(1), Some(&name), payload);
    let mut s = SseSplitter::default();
    s.push(&framed);
    assert_eq!(s.next_event().as_deref(), Some(&framed[..]), "a framed message is not one whole event");
    assert!(s.next_event().is_none() && s.rest().is_empty());
    let text = String::from_utf8_lossy(&framed).into_owned();
    let data: Vec<&str> = text.split('\n').filter_map(|l| l.strip_prefix("data: ")).collect();
    let want = String::from_utf8_lossy(payload).replace("\r\n", "\n").replace('\r', "\n");
    assert_eq!(data.join("\n"), want);
}

/// Every target by name, for drivers.
pub const TARGETS: &[(&str, Target)] = &[
    ("config", config),
    ("routes", routes),
    ("headers", headers),
    ("tunnel", tunnel),
    ("framing", framing),
    ("nestjs", nestjs),
    ("stream", stream),
    ("cloudevents", cloudevents),
];
