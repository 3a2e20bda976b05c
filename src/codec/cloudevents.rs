//! `codec = "cloudevents"`: CloudEvents 1.0 in binary content mode on NATS (every context
//! attribute a `ce-<name>` header, `ce-datacontenttype` included; the data as the payload)
//! and on HTTP (`ce-<name>` headers, `datacontenttype` as `Content-Type`, as Knative and
//! Dapr apps receive events). Structured mode (`application/cloudevents+json`, the JSON
//! event format) is accepted on the way in, from HTTP and from NATS.
//!
//! Header values are percent-encoded as the HTTP binding (§3.1.3.2) says: space, `"`, `%`
//! and everything outside printable ASCII, as UTF-8 bytes. Pure: no I/O, no clock.

use std::collections::BTreeMap;

use base64::Engine;
use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value;

/// The only spec version this codec speaks.
pub const SPECVERSION: &str = "1.0";
/// The JSON event format's media type (structured mode).
pub const STRUCTURED: &str = "application/cloudevents+json";
/// Binary mode's header prefix, on HTTP and on NATS.
pub const PREFIX: &str = "ce-";

/// Attributes every event has.
const REQUIRED: [&str; 4] = ["id", "source", "specversion", "type"];

/// One event: its context attributes (lower-case names, decoded values) and its data.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    pub attrs: BTreeMap<String, String>,
    pub data: Bytes,
}

/// Why a message is not a readable CloudEvent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CeError {
    #[error("structured CloudEvent: {0}")]
    Structured(String),
    #[error("CloudEvent lacks the required attribute {0:?}")]
    Missing(&'static str),
    #[error("CloudEvent specversion {0:?} is not supported (only 1.0)")]
    SpecVersion(String),
    #[error("CloudEvent attribute name {0:?} must be lower-case letters and digits")]
    Name(String),
}

impl Event {
    /// A new event with the required attributes (spec version 1.0) and `data`.
    pub fn new(id: &str, source: &str, kind: &str, data: Bytes) -> Event {
        let mut attrs = BTreeMap::new();
        attrs.insert("id".to_owned(), id.to_owned());
        attrs.insert("source".to_owned(), source.to_owned());
        attrs.insert("specversion".to_owned(), SPECVERSION.to_owned());
        attrs.insert("type".to_owned(), kind.to_owned());
        Event { attrs, data }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.attrs.get(name).map(String::as_str)
    }

    pub fn set(&mut self, name: &str, value: &str) {
        self.attrs.insert(name.to_owned(), value.to_owned());
    }

    /// The attributes every event must have, the spec version, and well-formed names.
    pub fn validate(&self) -> Result<(), CeError> {
        for r in REQUIRED {
            if self.get(r).is_none_or(str::is_empty) {
                return Err(CeError::Missing(r));
            }
        }
        if let Some(v) = self.get("specversion").filter(|v| *v != SPECVERSION) {
            return Err(CeError::SpecVersion(v.to_owned()));
        }
        match self.attrs.keys().find(|k| !is_attr_name(k)) {
            Some(bad) => Err(CeError::Name(bad.clone())),
            None => Ok(()),
        }
    }

    /// An HTTP message as an event: structured (by its content type) or binary (it has
    /// `ce-` headers); `None` when it is neither (a plain request).
    pub fn from_http(headers: &HeaderMap, body: Bytes) -> Result<Option<Event>, CeError> {
        // UTF-8, not `to_str` (visible ASCII only): a content type is one header both ways,
        // and one with `é` must not vanish on the way back (found by fuzzing).
        let content_type = headers.get(http::header::CONTENT_TYPE).and_then(|v| std::str::from_utf8(v.as_bytes()).ok());
        if content_type.is_some_and(is_structured) {
            return structured(&body).map(Some);
        }
        let pairs = headers.iter().filter_map(|(n, v)| Some((n.as_str(), std::str::from_utf8(v.as_bytes()).ok()?)));
        Ok(binary(pairs, content_type, body))
    }

    /// A NATS message as an event, the same way; the data's content type is
    /// `ce-datacontenttype`, else `Content-Type`.
    pub fn from_nats(headers: Option<&async_nats::HeaderMap>, payload: Bytes) -> Result<Option<Event>, CeError> {
        let Some(h) = headers else { return Ok(None) };
        let content_type = h
            .iter()
            .find(|(n, _)| AsRef::<str>::as_ref(*n).eq_ignore_ascii_case("content-type"))
            .and_then(|(_, v)| v.first())
            .map(|v| v.as_str());
        if content_type.is_some_and(is_structured) {
            return structured(&payload).map(Some);
        }
        let pairs = h.iter().flat_map(|(n, vs)| vs.iter().map(move |v| (n.as_ref(), v.as_str())));
        Ok(binary(pairs, content_type, payload))
    }

    /// Binary mode on NATS: every attribute as `ce-<name>`, `ce-datacontenttype` included.
    pub fn nats_headers(&self) -> Vec<(String, String)> {
        self.attrs.iter().map(|(k, v)| (format!("{PREFIX}{k}"), encode_value(v))).collect()
    }

    /// Binary mode on HTTP: `ce-<name>` headers, and `datacontenttype` as `Content-Type`.
    pub fn http_headers(&self) -> Vec<(String, String)> {
        self.attrs
            .iter()
            .map(|(k, v)| match k.as_str() {
                "datacontenttype" => ("content-type".to_owned(), v.clone()),
                _ => (format!("{PREFIX}{k}"), encode_value(v)),
            })
            .collect()
    }
}

/// `application/cloudevents+json`, with or without parameters.
pub fn is_structured(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case(STRUCTURED)
}

/// A `ce-` header (any case).
pub fn is_ce_header(name: &str) -> bool {
    name.len() > PREFIX.len() && name.is_char_boundary(PREFIX.len()) && name[..PREFIX.len()].eq_ignore_ascii_case(PREFIX)
}

fn is_attr_name(n: &str) -> bool {
    !n.is_empty() && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Binary mode: the `ce-` headers are the attributes; none means not an event.
fn binary<'a>(headers: impl Iterator<Item = (&'a str, &'a str)>, content_type: Option<&str>, data: Bytes) -> Option<Event> {
    let mut attrs = BTreeMap::new();
    for (name, value) in headers.filter(|(n, _)| is_ce_header(n)) {
        attrs.entry(name[PREFIX.len()..].to_ascii_lowercase()).or_insert_with(|| decode_value(value));
    }
    if attrs.is_empty() {
        return None;
    }
    if let Some(ct) = content_type {
        attrs.entry("datacontenttype".to_owned()).or_insert_with(|| ct.to_owned());
    }
    Some(Event { attrs, data })
}

/// The JSON event format: attributes as members, the data as `data` (JSON, or text for a
/// non-JSON content type) or `data_base64`.
fn structured(body: &[u8]) -> Result<Event, CeError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| CeError::Structured(format!("not JSON: {e}")))?;
    let Value::Object(members) = v else { return Err(CeError::Structured("not a JSON object".into())) };
    let mut attrs = BTreeMap::new();
    let (mut data, mut data_b64) = (None, None);
    for (k, v) in members {
        match (k.as_str(), v) {
            ("data", v) => data = Some(v),
            ("data_base64", Value::String(s)) => data_b64 = Some(s),
            ("data_base64", _) => return Err(CeError::Structured("data_base64 must be a string".into())),
            (_, Value::Null) => {}
            (_, Value::String(s)) => drop(attrs.insert(k, s)),
            (_, v @ (Value::Bool(_) | Value::Number(_))) => drop(attrs.insert(k, v.to_string())),
            (_, _) => return Err(CeError::Structured(format!("attribute {k:?} must be a string, number or boolean"))),
        }
    }
    let data = match (data, data_b64) {
        (Some(_), Some(_)) => return Err(CeError::Structured("both data and data_base64".into())),
        (None, Some(b)) => {
            Bytes::from(base64::engine::general_purpose::STANDARD.decode(b).map_err(|e| CeError::Structured(format!("data_base64: {e}")))?)
        }
        (Some(Value::String(s)), None) if !attrs.get("datacontenttype").is_none_or(|ct| is_json(ct)) => Bytes::from(s),
        (Some(v), None) => {
            attrs.entry("datacontenttype".to_owned()).or_insert_with(|| "application/json".to_owned());
            Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
        }
        (None, None) => Bytes::new(),
    };
    Ok(Event { attrs, data })
}

/// `application/json`, `…+json`, `text/json`: data the JSON format writes as JSON.
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

/// §3.1.3.2: space, `"`, `%` and everything outside printable ASCII, as `%XX` of its UTF-8.
pub fn encode_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The inverse of [`encode_value`]; a value that does not decode to UTF-8 is kept as sent.
pub fn decode_value(v: &str) -> String {
    match percent_encoding::percent_decode_str(v).decode_utf8() {
        Ok(s) => s.into_owned(),
        Err(_) => v.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hmap(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn binary_http_keeps_attributes_and_maps_the_content_type() {
        let h = hmap(&[
            ("ce-id", "e-1"),
            ("Ce-Source", "/shop/orders"),
            ("ce-specversion", "1.0"),
            ("ce-type", "order.created"),
            ("ce-traceparent", "00-abc"),
            ("content-type", "application/json"),
            ("x-other", "kept out"),
        ]);
        let e = Event::from_http(&h, Bytes::from_static(b"{}")).unwrap().unwrap();
        e.validate().unwrap();
        assert_eq!(e.get("source"), Some("/shop/orders"));
        assert_eq!(e.get("datacontenttype"), Some("application/json"));
        assert_eq!(e.get("traceparent"), Some("00-abc"));
        assert_eq!(e.attrs.len(), 6);
        let n: BTreeMap<_, _> = e.nats_headers().into_iter().collect();
        assert_eq!(n["ce-datacontenttype"], "application/json");
        let back: BTreeMap<_, _> = e.http_headers().into_iter().collect();
        assert_eq!(back["content-type"], "application/json");
        assert!(!back.contains_key("ce-datacontenttype"));
        assert!(Event::from_http(&hmap(&[("content-type", "text/plain")]), Bytes::new()).unwrap().is_none());
    }

    #[test]
    fn structured_mode_reads_json_text_and_base64_data() {
        let s = br#"{"specversion":"1.0","id":"1","source":"s","type":"t","n":3,"ok":true,"data":{"a":1}}"#;
        let e = Event::from_http(&hmap(&[("content-type", "application/cloudevents+json; charset=utf-8")]), Bytes::from_static(s))
            .unwrap()
            .unwrap();
        assert_eq!(
            (&e.data[..], e.get("datacontenttype"), e.get("n"), e.get("ok")),
            (&br#"{"a":1}"#[..], Some("application/json"), Some("3"), Some("true"))
        );
        let s = br#"{"specversion":"1.0","id":"1","source":"s","type":"t","datacontenttype":"text/plain","data":"hi"}"#;
        assert_eq!(&structured(s).unwrap().data[..], b"hi");
        let s = br#"{"specversion":"1.0","id":"1","source":"s","type":"t","data_base64":"AAEC"}"#;
        assert_eq!(&structured(s).unwrap().data[..], &[0, 1, 2]);
        for bad in [&b"[]"[..], b"nope", br#"{"data":1,"data_base64":"AA=="}"#, br#"{"x":{}}"#, br#"{"data_base64":"**"}"#] {
            assert!(structured(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn validation_names_what_is_missing_or_wrong() {
        let mut e = Event::new("1", "/s/r", "t", Bytes::new());
        e.validate().unwrap();
        e.set("specversion", "0.3");
        assert_eq!(e.validate(), Err(CeError::SpecVersion("0.3".into())));
        e.set("specversion", "1.0");
        e.set("Bad_Name", "x");
        assert!(matches!(e.validate(), Err(CeError::Name(_))));
        e.attrs.remove("Bad_Name");
        e.attrs.remove("source");
        assert_eq!(e.validate(), Err(CeError::Missing("source")));
    }

    #[test]
    fn values_are_percent_encoded_both_ways() {
        assert_eq!(encode_value("a b\"%é"), "a%20b%22%25%C3%A9");
        assert_eq!(decode_value("a%20b%22%25%C3%A9"), "a b\"%é");
        assert_eq!(decode_value("%FF"), "%FF");
        let mut e = Event::new("id 1", "/s", "t", Bytes::from_static(b"x"));
        e.set("subject", "Jürgen \"q\" 100%");
        let nats: Vec<(String, String)> = e.nats_headers();
        let mut h = async_nats::HeaderMap::new();
        for (k, v) in &nats {
            assert!(v.bytes().all(|b| (0x21..=0x7e).contains(&b)), "{v}");
            h.insert(k.as_str(), v.as_str());
        }
        assert_eq!(Event::from_nats(Some(&h), e.data.clone()).unwrap().unwrap(), e);
    }

    #[test]
    fn nats_structured_and_plain_messages() {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Content-Type", STRUCTURED);
        let s = Bytes::from_static(br#"{"specversion":"1.0","id":"1","source":"s","type":"t","data":"x"}"#);
        assert_eq!(&Event::from_nats(Some(&h), s).unwrap().unwrap().data[..], b"\"x\"");
        let mut plain = async_nats::HeaderMap::new();
        plain.insert("X-A", "1");
        assert!(Event::from_nats(Some(&plain), Bytes::new()).unwrap().is_none());
        assert!(Event::from_nats(None, Bytes::new()).unwrap().is_none());
    }
}
