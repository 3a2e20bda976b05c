//! Idempotency keys (pure, for tests and fuzzing): where a message's key comes from, the
//! KV key it is stored under, and the payload digest a result is bound to.

use sha2::{Digest, Sha256};

use crate::config::IdempotencyKey;

/// Where a message's key comes from (pure, for tests and fuzzing).
pub fn extract_key(spec: &IdempotencyKey, headers: Option<&async_nats::HeaderMap>, payload: &[u8]) -> Option<String> {
    let value = match spec {
        IdempotencyKey::Header(name) => header(headers?, name),
        IdempotencyKey::MsgId => headers?.get(crate::codec::NATS_MSG_ID).map(|v| v.as_str().to_owned()),
        IdempotencyKey::Json(pointer) => {
            let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
            match v.pointer(pointer)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Null => None,
                other => Some(other.to_string()),
            }
        }
    }?;
    (!value.trim().is_empty()).then_some(value)
}

/// A header's first value, its name matched without regard to case: NATS header names
/// are case-sensitive, but `header:idempotency-key` must find the `Idempotency-Key` the
/// egress side sends (it canonicalizes names), and any other spelling a peer uses.
fn header(headers: &async_nats::HeaderMap, name: &str) -> Option<String> {
    if let Some(v) = headers.get(name) {
        return Some(v.as_str().to_owned());
    }
    headers
        .iter()
        .find(|(n, _)| AsRef::<str>::as_ref(*n).eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v.first())
        .map(|v| v.as_str().to_owned())
}

/// The KV key for an idempotency key of `service`'s route `route`:
/// `<service>.<route>.<sha256 of key>`. Keys are hashed because KV keys allow only a few
/// characters. They are scoped by service because every service that consumes an event
/// runs its own handler for it: a key shared across services would let one service ack,
/// without running, what another had processed (replicas of one service share the
/// service name, and so their claims). They are scoped by route because each route is
/// its own handler.
pub fn kv_key(service: &str, route: &str, key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(service.len() + route.len() + 2 + 64);
    push_scope(&mut out, service);
    out.push('.');
    push_scope(&mut out, route);
    out.push('.');
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// A scope segment: the name itself when it is only letters, digits, '-' and '_' (route
/// names always are), else `=` and its hex bytes. The two forms never meet (a plain name
/// has no `=`) and neither has a `.`, so two different (service, route) pairs never share
/// a prefix.
pub(crate) fn push_scope(out: &mut String, name: &str) {
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        out.push_str(name);
    } else {
        out.push('=');
        for b in name.bytes() {
            out.push_str(&format!("{b:02x}"));
        }
    }
}

/// The digest a result is bound to: sha256 of the message payload, in hex.
pub fn payload_digest(payload: &[u8]) -> String {
    Sha256::digest(payload).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_headers_msg_id_or_json() {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Idempotency-Key", "k1");
        h.insert("Nats-Msg-Id", "m1");
        assert_eq!(extract_key(&IdempotencyKey::Header("Idempotency-Key".into()), Some(&h), b""), Some("k1".into()));
        assert_eq!(extract_key(&IdempotencyKey::MsgId, Some(&h), b""), Some("m1".into()));
        assert_eq!(extract_key(&IdempotencyKey::MsgId, None, b""), None);
        // Header names match without regard to case (egress sends `Idempotency-Key`).
        assert_eq!(extract_key(&IdempotencyKey::Header("idempotency-key".into()), Some(&h), b""), Some("k1".into()));
        assert_eq!(extract_key(&IdempotencyKey::Header("X-Other".into()), Some(&h), b""), None);
        let body = br#"{"order":{"id":"o-9","n":7},"blank":" "}"#;
        assert_eq!(extract_key(&IdempotencyKey::Json("/order/id".into()), None, body), Some("o-9".into()));
        assert_eq!(extract_key(&IdempotencyKey::Json("/order/n".into()), None, body), Some("7".into()));
        assert_eq!(extract_key(&IdempotencyKey::Json("/blank".into()), None, body), None);
        assert_eq!(extract_key(&IdempotencyKey::Json("/missing".into()), None, body), None);
        assert_eq!(extract_key(&IdempotencyKey::Json("/order/id".into()), None, b"not json"), None);
    }

    #[test]
    fn kv_keys_are_valid_and_scoped_by_service_and_route() {
        let a = kv_key("tools", "tool-exec", "a key with spaces/and.dots*>");
        assert!(a.starts_with("tools.tool-exec."));
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || "-_.=".contains(c)), "{a}");
        assert_ne!(a, kv_key("tools", "other", "a key with spaces/and.dots*>"));
        assert_ne!(a, kv_key("orchestration", "tool-exec", "a key with spaces/and.dots*>"));
        assert_eq!(a, kv_key("tools", "tool-exec", "a key with spaces/and.dots*>"));
        // A service name KV keys cannot hold is encoded, and never meets a plain one.
        let odd = kv_key("svc:1", "r", "k");
        assert!(odd.starts_with("=7376633a31.r."), "{odd}");
        assert!(odd.chars().all(|c| c.is_ascii_alphanumeric() || "-_.=".contains(c)), "{odd}");
        assert_ne!(kv_key("=7376633a31", "r", "k"), odd);
    }
}
