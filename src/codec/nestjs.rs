//! The `@nestjs/microservices` NATS transport, byte for byte as its `NatsRecordSerializer`
//! and JSON deserializers (10.x and 11.x) write and read it:
//! - request `{"pattern","data","id"}` on the subject [`normalize_pattern`] derives, with a
//!   reply subject; event (emit) `{"pattern","data"}` without one;
//! - replies `{"response","isDisposed","id"}` (one per value of an Observable, the last
//!   one disposed, or a lone `{"isDisposed":true,"id"}`), or `{"err","isDisposed","id"}`.
//!
//! A client keeps only replies whose `id` is its request's, takes an empty payload as an
//! error, and treats JSON without any of `err`/`response`/`isDisposed` as one whole
//! response (`IncomingResponseDeserializer`). A server treats JSON without `pattern` and
//! `data` as the data itself, with the subject as pattern (`IncomingRequestDeserializer`).

use bytes::Bytes;
use http::StatusCode;
use serde::Serialize;
use serde_json::{Map, Value};

/// The pattern of an inbound Nest message, for the app.
pub const BRIDGE_PATTERN: &str = "Bridge-Pattern";

/// Nest's `transformPatternToRoute`: a string or number as it prints; an object as `{…}`
/// with its keys sorted by `localeCompare` and string values quoted without escaping
/// (Nest's own quirk, kept so that the subjects agree).
pub fn normalize_pattern(p: &Value) -> String {
    match p {
        Value::String(s) => s.clone(),
        Value::Object(m) => normalize_entries(m.iter().map(|(k, v)| (k.clone(), v))),
        // `Object.keys` of an array are its indices.
        Value::Array(a) => normalize_entries(a.iter().enumerate().map(|(i, v)| (i.to_string(), v))),
        other => js_text(other),
    }
}

fn normalize_entries<'a>(entries: impl Iterator<Item = (String, &'a Value)>) -> String {
    let mut entries: Vec<_> = entries.collect();
    entries.sort_by(|a, b| locale_compare(&a.0, &b.0));
    let parts: Vec<String> = entries
        .into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => format!("\"{k}\":\"{s}\""),
            v => format!("\"{k}\":{}", normalize_pattern(v)),
        })
        .collect();
    format!("{{{}}}", parts.join(","))
}

/// How JavaScript's template literal prints a scalar: `1.0` is `1`.
fn js_text(v: &Value) -> String {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e21 => format!("{}", f as i64),
            _ => n.to_string(),
        },
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// ICU root collation's order of printable ASCII (what V8's `localeCompare` uses), by
/// primary weight: punctuation, then digits, then letters case-insensitively.
const ICU_ASCII: &str = " _-,;:!?.'\"()[]{}@*/\\&#%`^+<=>|~$0123456789abcdefghijklmnopqrstuvwxyz";

fn primary(c: char) -> u32 {
    let lower = c.to_ascii_lowercase();
    match ICU_ASCII.find(lower) {
        Some(i) if c.is_ascii() => i as u32,
        // Past ASCII: code point order, after every ASCII character.
        _ => 0x100 + c as u32,
    }
}

/// `a.localeCompare(b)` for the keys patterns use: primary weights over the whole key
/// first, then lower case before upper case, then code points.
fn locale_compare(a: &str, b: &str) -> std::cmp::Ordering {
    let prim = |s: &str| s.chars().map(primary).collect::<Vec<_>>();
    let case = |s: &str| s.chars().map(|c| c.is_ascii_uppercase()).collect::<Vec<_>>();
    prim(a).cmp(&prim(b)).then_with(|| case(a).cmp(&case(b))).then_with(|| a.cmp(b))
}

/// A request or event packet, with Nest's key order.
#[derive(Serialize)]
struct Packet<'a> {
    pattern: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
}

/// Why an HTTP body cannot be a Nest packet's `data`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the nestjs codec sends JSON: the request body is not JSON ({0})")]
pub struct NotJson(pub String);

/// An HTTP body as `data`: JSON, or nothing for an empty body.
pub fn body_data(body: &[u8]) -> Result<Option<Value>, NotJson> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(body).map(Some).map_err(|e| NotJson(e.to_string()))
}

/// A `send` packet: `{"pattern","data","id"}`.
pub fn encode_request(pattern: &Value, data: Option<&Value>, id: &str) -> Bytes {
    Bytes::from(serde_json::to_vec(&Packet { pattern, data, id: Some(id) }).unwrap_or_default())
}

/// An `emit` packet: `{"pattern","data"}`.
pub fn encode_event(pattern: &Value, data: Option<&Value>) -> Bytes {
    Bytes::from(serde_json::to_vec(&Packet { pattern, data, id: None }).unwrap_or_default())
}

/// A fresh request id (Nest uses a v4 UUID too).
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// One reply message, as Nest's `ClientNats` reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// Another request's reply (its `id` differs): ignored.
    Foreign,
    /// A value; more follow.
    Next(Value),
    /// The last message: its value, if it carries one.
    Last(Option<Value>),
    /// The handler failed: Nest's error object (or string).
    Err(Value),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// Nest's `EmptyResponseException`.
    #[error("empty reply to a nestjs request")]
    Empty,
    #[error("nestjs reply is not JSON: {0}")]
    NotJson(String),
}

/// JavaScript truthiness, for the `if (err)` and `if (isDisposed)` tests.
fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0 && !f.is_nan()),
        Some(_) => true,
    }
}

/// A reply payload → what it means for request `id`.
pub fn decode_reply(payload: &[u8], id: &str) -> Result<Frame, ReplyError> {
    if payload.is_empty() {
        return Err(ReplyError::Empty);
    }
    let v: Value = serde_json::from_slice(payload).map_err(|e| ReplyError::NotJson(e.to_string()))?;
    let Value::Object(mut m) = v else { return Ok(Frame::Last(Some(v))) };
    // Nest compares ids before anything else, the `id` of a foreign JSON object included.
    if truthy(m.get("id")) && m.get("id") != Some(&Value::String(id.to_owned())) {
        return Ok(Frame::Foreign);
    }
    if !["err", "response", "isDisposed"].iter().any(|k| m.contains_key(*k)) {
        // Not a Nest reply: the whole JSON is the response (`mapToSchema`).
        return Ok(Frame::Last(Some(Value::Object(m))));
    }
    if truthy(m.get("err")) {
        return Ok(Frame::Err(m.remove("err").unwrap_or_default()));
    }
    let response = m.remove("response");
    if truthy(m.get("isDisposed")) {
        return Ok(Frame::Last(response));
    }
    // `{"response": undefined}` cannot be written in JSON; a missing value is `undefined`.
    Ok(Frame::Next(response.unwrap_or(Value::Null)))
}

/// The HTTP status a Nest error stands for: its numeric `statusCode` or `status` when that
/// is an HTTP error status, else 500.
pub fn err_status(err: &Value) -> StatusCode {
    ["statusCode", "status"]
        .iter()
        .filter_map(|k| err.get(*k).and_then(Value::as_u64))
        .filter(|c| (400..=599).contains(c))
        .find_map(|c| StatusCode::from_u16(c as u16).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// An inbound message as a Nest server reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    /// The pattern as text (an object pattern normalised), for `Bridge-Pattern`.
    pub pattern: String,
    /// The app's body: `data` as JSON, or the payload as it came when it is not JSON.
    pub body: Bytes,
    /// Whether `body` is JSON.
    pub json: bool,
    /// The request id; `None` for an event.
    pub id: Option<Value>,
}

/// A received payload → the app's request. A payload without `pattern` or `data` (a
/// publisher that is not Nest) is the data itself, as Nest takes it.
pub fn decode_incoming(payload: &Bytes, subject: &str) -> Incoming {
    let Ok(v) = serde_json::from_slice::<Value>(payload) else {
        return Incoming { pattern: subject.to_owned(), body: payload.clone(), json: false, id: None };
    };
    match v {
        Value::Object(mut m) if m.contains_key("pattern") || m.contains_key("data") => {
            let pattern = m.get("pattern").map(normalize_pattern).unwrap_or_else(|| subject.to_owned());
            let body = m.remove("data").map(|d| Bytes::from(serde_json::to_vec(&d).unwrap_or_default())).unwrap_or_default();
            Incoming { pattern, json: !body.is_empty(), body, id: m.remove("id") }
        }
        _ => Incoming { pattern: subject.to_owned(), body: payload.clone(), json: true, id: None },
    }
}

#[derive(Serialize)]
struct Reply<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    response: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    err: Option<Value>,
    #[serde(rename = "isDisposed")]
    is_disposed: bool,
    id: &'a Value,
}

/// The app's whole response → the one disposed reply. A status ≥ 400 is `err` with
/// `statusCode` and `message` (the app's JSON object body kept around them); a body that is
/// not JSON travels as a string; an empty one as no value.
pub fn encode_reply(id: &Value, status: StatusCode, body: &[u8]) -> Bytes {
    let value = if body.is_empty() {
        None
    } else {
        Some(serde_json::from_slice(body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned())))
    };
    let reply = if status.as_u16() >= 400 {
        Reply { response: None, err: Some(error_object(status, value)), is_disposed: true, id }
    } else {
        Reply { response: value, err: None, is_disposed: true, id }
    };
    Bytes::from(serde_json::to_vec(&reply).unwrap_or_default())
}

/// `{"statusCode", "message", …}`: the message from the app's JSON (`message`, else a
/// problem's `detail` or `title`), its text, or the status's reason.
fn error_object(status: StatusCode, body: Option<Value>) -> Value {
    let mut m = Map::new();
    let mut message = None;
    match body {
        Some(Value::Object(o)) => {
            message = ["message", "detail", "title"].iter().find_map(|k| o.get(*k).cloned());
            m = o;
        }
        Some(Value::String(s)) => message = Some(Value::String(s)),
        Some(other) => message = Some(Value::String(other.to_string())),
        None => {}
    }
    m.insert("statusCode".into(), Value::from(status.as_u16()));
    let reason = status.canonical_reason().unwrap_or("Error");
    m.insert("message".into(), message.unwrap_or_else(|| Value::String(reason.into())));
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn patterns_normalise_as_nest_does() {
        // Expected strings printed by @nestjs/microservices 10.4 `transformPatternToRoute`.
        assert_eq!(normalize_pattern(&json!("agent.run")), "agent.run");
        assert_eq!(normalize_pattern(&json!({"role": "math", "cmd": "sum"})), r#"{"cmd":"sum","role":"math"}"#);
        let p = json!({"role":"math","cmd":"sum","n":1.0,"f":1.5,"b":true,"z":null,"o":{"y":2,"x":"s"},"arr":[1,"a"]});
        assert_eq!(
            normalize_pattern(&p),
            r#"{"arr":{"0":1,"1":"a"},"b":true,"cmd":"sum","f":1.5,"n":1,"o":{"x":"s","y":2},"role":"math","z":null}"#
        );
    }

    #[test]
    fn keys_sort_as_locale_compare_does() {
        // Node 20: [...].sort((a, b) => a.localeCompare(b)).
        let mut k = vec!["b", "B", "a", "A", "_x", "-y", "1", "Z", "cmd", "Cmd", "role", "x.y", "a_b", "ab", "$s", "~t", "a1", "aa"];
        k.sort_by(|a, b| locale_compare(a, b));
        assert_eq!(k, ["_x", "-y", "~t", "$s", "1", "a", "A", "a_b", "a1", "aa", "ab", "b", "B", "cmd", "Cmd", "role", "x.y", "Z"]);
        let mut k = vec!["a", "A", "aA", "Aa", "AA", "aa", "a-", "a ", "ab"];
        k.sort_by(|a, b| locale_compare(a, b));
        assert_eq!(k, ["a", "A", "a ", "a-", "aa", "aA", "Aa", "AA", "ab"]);
    }

    #[test]
    fn packets_have_nests_key_order() {
        let p = json!({"cmd": "sum"});
        assert_eq!(&encode_request(&p, Some(&json!([1, 2])), "x")[..], br#"{"pattern":{"cmd":"sum"},"data":[1,2],"id":"x"}"#);
        assert_eq!(&encode_event(&json!("ev"), None)[..], br#"{"pattern":"ev"}"#);
        assert_eq!(body_data(b" \n").unwrap(), None);
        assert_eq!(body_data(b"{\"a\":1}").unwrap(), Some(json!({"a": 1})));
        assert!(body_data(b"plain").is_err());
    }

    #[test]
    fn replies_decode_as_client_nats_reads_them() {
        let r = |s: &str| decode_reply(s.as_bytes(), "me");
        assert_eq!(r(r#"{"response":3,"isDisposed":true,"id":"me"}"#), Ok(Frame::Last(Some(json!(3)))));
        assert_eq!(r(r#"{"response":1,"id":"me"}"#), Ok(Frame::Next(json!(1))));
        assert_eq!(r(r#"{"isDisposed":true,"id":"me"}"#), Ok(Frame::Last(None)));
        assert_eq!(r(r#"{"response":1,"id":"other"}"#), Ok(Frame::Foreign));
        assert_eq!(r(r#"{"err":{"status":404},"isDisposed":true,"id":"me"}"#), Ok(Frame::Err(json!({"status":404}))));
        // The no-handler packet has no `isDisposed`, a string `err` and a string `status`.
        let nh = r#"{"id":"me","status":"error","err":"There is no matching message handler defined in the remote service."}"#;
        assert!(matches!(r(nh), Ok(Frame::Err(Value::String(_)))));
        // Not a Nest reply: the whole JSON is the one response.
        assert_eq!(r(r#"{"total":3}"#), Ok(Frame::Last(Some(json!({"total":3})))));
        assert_eq!(r(r#"{"total":3,"id":"abc"}"#), Ok(Frame::Foreign));
        assert_eq!(r(r#"{"err":null,"response":1,"id":"me"}"#), Ok(Frame::Next(json!(1))));
        assert_eq!(r("[1]"), Ok(Frame::Last(Some(json!([1])))));
        assert_eq!(r(""), Err(ReplyError::Empty));
        assert!(matches!(r("nope"), Err(ReplyError::NotJson(_))));
    }

    #[test]
    fn err_statuses() {
        assert_eq!(err_status(&json!({"statusCode": 404, "message": "x"})), 404);
        assert_eq!(err_status(&json!({"status": 409})), 409);
        assert_eq!(err_status(&json!({"status": "error", "message": "x"})), 500);
        assert_eq!(err_status(&json!({"status": 200})), 500);
        assert_eq!(err_status(&json!("boom")), 500);
    }

    #[test]
    fn incoming_envelopes_and_foreign_payloads() {
        let m = decode_incoming(&Bytes::from_static(br#"{"pattern":{"cmd":"sum"},"data":[1,2],"id":"r1"}"#), "x");
        assert_eq!((m.pattern.as_str(), &m.body[..], m.json, m.id), (r#"{"cmd":"sum"}"#, &b"[1,2]"[..], true, Some(json!("r1"))));
        let e = decode_incoming(&Bytes::from_static(br#"{"pattern":"ev","data":{"a":1}}"#), "ev");
        assert_eq!((&e.body[..], e.id), (&br#"{"a":1}"#[..], None));
        let raw = decode_incoming(&Bytes::from_static(br#"{"a":1}"#), "sub.j");
        assert_eq!((raw.pattern.as_str(), &raw.body[..], raw.json, raw.id), ("sub.j", &br#"{"a":1}"#[..], true, None));
        let text = decode_incoming(&Bytes::from_static(b"hello"), "s");
        assert_eq!((&text.body[..], text.json), (&b"hello"[..], false));
    }

    #[test]
    fn app_responses_become_disposed_replies() {
        let id = json!("r1");
        assert_eq!(&encode_reply(&id, StatusCode::OK, br#"{"a":1}"#)[..], br#"{"response":{"a":1},"isDisposed":true,"id":"r1"}"#);
        assert_eq!(&encode_reply(&id, StatusCode::NO_CONTENT, b"")[..], br#"{"isDisposed":true,"id":"r1"}"#);
        assert_eq!(&encode_reply(&id, StatusCode::OK, b"hi")[..], br#"{"response":"hi","isDisposed":true,"id":"r1"}"#);
        let e: Value = serde_json::from_slice(&encode_reply(&id, StatusCode::NOT_FOUND, br#"{"detail":"no key"}"#)).unwrap();
        assert_eq!(e, json!({"err": {"detail": "no key", "statusCode": 404, "message": "no key"}, "isDisposed": true, "id": "r1"}));
        let e: Value = serde_json::from_slice(&encode_reply(&id, StatusCode::BAD_GATEWAY, b"")).unwrap();
        assert_eq!(e["err"], json!({"statusCode": 502, "message": "Bad Gateway"}));
        // What we send decodes as the same answer.
        assert_eq!(decode_reply(&encode_reply(&json!("me"), StatusCode::CREATED, b"7"), "me"), Ok(Frame::Last(Some(json!(7)))));
        assert_eq!(err_status(&e["err"]), 502);
    }
}
