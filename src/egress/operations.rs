//! Async request-reply for long calls: a request or tunnel call with `Prefer:
//! respond-async` (RFC 7240), or on a route with `async = true`, is answered `202
//! Accepted` at once, with `Location: /.natsbridge/operations/<id>` and `Retry-After`.
//! The call goes on in its own task, carried as its mode says; its result (status,
//! headers, body; a streamed reply is collected) is kept in the JetStream KV bucket
//! `natsbridge_operations` for the route's `async_ttl`, as a per-message TTL.
//!
//! `GET /.natsbridge/operations/<id>` on any replica answers `202` while the call runs and
//! the original response once it is done; `Prefer: wait=N` holds the GET up to N seconds
//! (at most 60). An unknown or expired id is a 404; a call whose sidecar died before its
//! deadline passed is a 504 `operation-lost`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv;
use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};

use super::stream::Replier;
use crate::config::Outbound;
use crate::egress::{full, Body, Egress};
use crate::nats::connection::jetstream;
use crate::problem::BridgeError;

/// Where operations are read: `<prefix><id>`.
pub const PATH_PREFIX: &str = "/.natsbridge/operations/";
pub use crate::provision::OPERATIONS_BUCKET as BUCKET;
const PREFER: http::HeaderName = http::HeaderName::from_static("prefer");
/// The longest `Prefer: wait`.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// An operation as stored: running until its deadline, or done.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "state", rename_all = "lowercase")]
enum Record {
    Running { deadline_ms: u64 },
    Done { status: u16, headers: Vec<(String, String)>, body: String },
}

/// Whether a request or tunnel call runs async: the route says so, or the client prefers it.
/// Read from the HTTP request, not from its NATS headers: a lookup in async-nats' map
/// hashes the name with SipHash, ~600 instructions per request (issue 14, callgrind).
pub(super) fn wants_async(route: &Outbound, headers: &http::HeaderMap) -> bool {
    route.always_async || prefer(headers).any(|(k, _)| k.eq_ignore_ascii_case("respond-async"))
}

/// The preferences of `Prefer` headers (RFC 7240): `token[=value]`, comma-separated.
/// Values that are not UTF-8 say nothing.
fn prefer(headers: &http::HeaderMap) -> impl Iterator<Item = (&str, Option<&str>)> + '_ {
    headers.get_all(PREFER).iter().filter_map(|v| std::str::from_utf8(v.as_bytes()).ok()).flat_map(|v| {
        v.split(',').map(|p| {
            let p = p.split(';').next().unwrap_or_default().trim();
            match p.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim().trim_matches('"'))),
                None => (p, None),
            }
        })
    })
}

/// `Prefer: wait=N` from an HTTP request, capped.
fn wait_of(headers: &http::HeaderMap) -> Option<Duration> {
    let secs = prefer(headers).find(|(k, _)| k.eq_ignore_ascii_case("wait")).and_then(|(_, v)| v?.parse::<u64>().ok())?;
    Some(Duration::from_secs(secs).min(MAX_WAIT))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default()
}

/// Puts `record` under `id` with a per-message TTL: expiry is the server's.
async fn put(js: &async_nats::jetstream::Context, id: &str, record: &Record, ttl: Duration) -> Result<(), BridgeError> {
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-TTL", format!("{}s", ttl.as_secs().max(1)).as_str());
    let body = serde_json::to_vec(record).map_err(|e| BridgeError::OperationStore(e.to_string()))?;
    let ack = js.publish_with_headers(format!("$KV.{BUCKET}.{id}"), h, body.into()).await;
    let ack = ack.map_err(|e| BridgeError::OperationStore(e.to_string()))?;
    tokio::time::timeout(Duration::from_secs(5), ack)
        .await
        .map_err(|_| BridgeError::OperationStore("no ack from the operations bucket".into()))?
        .map_err(|e| BridgeError::OperationStore(e.to_string()))?;
    Ok(())
}

/// The operations bucket. `natsbridge provision` creates it (and readiness requires it for
/// `async = true` routes); a sidecar that finds it missing creates it on first use, with
/// the same configuration, so `Prefer: respond-async` works unprovisioned too.
async fn bucket(js: &async_nats::jetstream::Context) -> Result<kv::Store, BridgeError> {
    if let Ok(store) = js.get_key_value(BUCKET).await {
        return Ok(store);
    }
    let config = crate::provision::operations_kv_config(crate::provision::cluster_size(&js.client()));
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        // Another replica created it meanwhile.
        Err(_) => js.get_key_value(BUCKET).await.map_err(|e| BridgeError::OperationStore(e.to_string())),
    }
}

impl Egress {
    /// Starts an async call: records it as running, answers 202, and carries it on.
    pub(super) async fn start_async(
        &self,
        route: &Outbound,
        subject: String,
        headers: async_nats::HeaderMap,
        body: Bytes,
        place: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<Response<Body>, BridgeError> {
        let js = jetstream(self.nats.clone());
        bucket(&js).await?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let deadline_ms = now_ms() + route.timeout.as_millis() as u64;
        put(&js, &id, &Record::Running { deadline_ms }, route.async_ttl).await?;
        let id_run = id.clone();
        let call = Call { nats: self.nats.clone(), replies: self.replies.clone(), metrics: self.metrics.clone(), route: route.clone() };
        let task: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = Box::pin(async move {
            call.run(js, id_run, subject, headers, body).await;
            // Held until the result is stored: running operations count under
            // `max_connections` (`slots`).
            drop(place);
        });
        tokio::spawn(task);
        let mut res = Response::new(full(serde_json::to_vec(&serde_json::json!({ "operation": id })).unwrap_or_default()));
        *res.status_mut() = StatusCode::ACCEPTED;
        let h = res.headers_mut();
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(http::header::RETRY_AFTER, HeaderValue::from(1));
        h.insert("preference-applied", HeaderValue::from_static("respond-async"));
        if let Ok(v) = HeaderValue::from_str(&format!("{PATH_PREFIX}{id}")) {
            h.insert(http::header::LOCATION, v);
        }
        Ok(res)
    }

    /// `GET /.natsbridge/operations/<id>`.
    pub(super) async fn operation(&self, id: &str, headers: &http::HeaderMap) -> Result<Response<Body>, BridgeError> {
        let not_found = || BridgeError::OperationNotFound { id: id.to_owned() };
        if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(not_found());
        }
        let js = jetstream(self.nats.clone());
        let store = bucket(&js).await?;
        let read = |v: Option<Bytes>| -> Result<Record, BridgeError> {
            let v = v.filter(|v| !v.is_empty()).ok_or_else(not_found)?;
            serde_json::from_slice(&v).map_err(|_| not_found())
        };
        let mut record = read(store.get(id).await.map_err(|e| BridgeError::OperationStore(e.to_string()))?)?;
        if let (Record::Running { .. }, Some(wait)) = (&record, wait_of(headers)) {
            record = wait_done(&store, id, wait).await.unwrap_or(record);
        }
        match record {
            Record::Running { deadline_ms } if now_ms() > deadline_ms + 5_000 => Err(BridgeError::OperationLost { id: id.to_owned() }),
            Record::Running { .. } => {
                let mut res = Response::new(full(
                    serde_json::to_vec(&serde_json::json!({ "operation": id, "state": "running" })).unwrap_or_default(),
                ));
                *res.status_mut() = StatusCode::ACCEPTED;
                res.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from(1));
                res.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                Ok(res)
            }
            Record::Done { status, headers, body } => {
                let body = base64::engine::general_purpose::STANDARD.decode(body).map_err(|_| not_found())?;
                let mut res = Response::new(full(body));
                *res.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
                for (k, v) in headers {
                    if let (Ok(k), Ok(v)) = (http::HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(&v)) {
                        res.headers_mut().append(k, v);
                    }
                }
                Ok(res)
            }
        }
    }
}

/// An async call on its own task.
struct Call {
    nats: async_nats::Client,
    replies: crate::nats::replies::Replies,
    metrics: crate::metrics::Metrics,
    route: Outbound,
}

impl Call {
    async fn run(self, js: async_nats::jetstream::Context, id: String, subject: String, headers: async_nats::HeaderMap, body: Bytes) {
        let route = &self.route;
        let replier = Replier { nats: &self.nats, replies: &self.replies, metrics: &self.metrics, head_read: None };
        let rid = headers.get(crate::codec::REQUEST_ID).map(|v| v.as_str().to_owned());
        let max = self.nats.server_info().max_payload.saturating_sub(64 << 10).max(1024);
        let res = match replier.request_reply(route, subject, headers, body, rid.clone()).await {
            Ok(res) => res,
            Err(e) => e.to_response(Some(&route.name), rid.as_deref()).map(full),
        };
        let record = done(res, max, &route.name, rid.as_deref()).await;
        if let Err(e) = put(&js, &id, &record, route.async_ttl).await {
            tracing::warn!(route = %route.name, operation = %id, error = %e, "could not store an async call's result");
        }
    }
}

/// Watches `id` up to `wait` for its result.
async fn wait_done(store: &kv::Store, id: &str, wait: Duration) -> Option<Record> {
    // With history: a result stored between the read and the watch is seen too.
    let mut watch = store.watch_with_history(id).await.ok()?;
    let watching = async {
        while let Some(Ok(entry)) = watch.next().await {
            if let Ok(r @ Record::Done { .. }) = serde_json::from_slice::<Record>(&entry.value) {
                return Some(r);
            }
        }
        None
    };
    tokio::time::timeout(wait, watching).await.ok().flatten()
}

/// A finished call's response as a record; a body past `max` bytes (the bucket's message
/// limit), or one that broke off, is stored as a 502 problem instead.
async fn done(res: Response<Body>, max: usize, route: &str, rid: Option<&str>) -> Record {
    let (parts, mut body) = res.into_parts();
    // Read by hand: `Limited` over a boxed body trips a higher-ranked `From` bound when
    // the future must be `Send` (rust-lang/rust#102211).
    let mut buf = bytes::BytesMut::new();
    let read: Result<(), String> = loop {
        match body.frame().await {
            None => break Ok(()),
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    buf.extend_from_slice(&d);
                    if buf.len() > max {
                        break Err(format!("the body is larger than {max} bytes"));
                    }
                }
            }
            Some(Err(e)) => break Err(e.to_string()),
        }
    };
    let (status, headers, body) = match read {
        Ok(()) => (parts.status, parts.headers, buf.freeze()),
        Err(e) => {
            let e = BridgeError::Upstream(format!("the async call's response could not be kept: {e}"));
            let (p, b) = e.to_response(Some(route), rid).into_parts();
            (p.status, p.headers, b)
        }
    };
    let headers = headers.iter().filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned()))).collect();
    Record::Done { status: status.as_u16(), headers, body: base64::engine::general_purpose::STANDARD.encode(&body) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefer_headers_are_read_per_rfc_7240() {
        let mut h = http::HeaderMap::new();
        h.insert("prefer", "return=minimal, Respond-Async; x=1".parse().unwrap());
        h.append("prefer", "wait=\"7\"".parse().unwrap());
        let p: Vec<_> = prefer(&h).collect();
        assert_eq!(p, vec![("return", Some("minimal")), ("Respond-Async", None), ("wait", Some("7"))]);
        let mut hh = http::HeaderMap::new();
        hh.insert("prefer", "wait=5".parse().unwrap());
        assert_eq!(wait_of(&hh), Some(Duration::from_secs(5)));
        hh.insert("prefer", "wait=3600".parse().unwrap());
        assert_eq!(wait_of(&hh), Some(MAX_WAIT));
        hh.insert("prefer", "respond-async".parse().unwrap());
        assert_eq!(wait_of(&hh), None);
    }

    #[test]
    fn records_round_trip() {
        let r = Record::Done { status: 201, headers: vec![("a".into(), "b".into())], body: "eA==".into() };
        let v = serde_json::to_vec(&r).unwrap();
        assert_eq!(serde_json::from_slice::<Record>(&v).unwrap(), r);
        let v = serde_json::to_vec(&Record::Running { deadline_ms: 5 }).unwrap();
        assert_eq!(std::str::from_utf8(&v).unwrap(), r#"{"state":"running","deadline_ms":5}"#);
    }
}
