//! A route moving from HTTP to NATS (`upstream` + `cutover`): which path a call takes
//! (the split, sticky by a key), the shadow copy of calls answered over HTTP, and the
//! fallback to `upstream` when NATS failed before any responder got the call.
//!
//! The HTTP side reuses `forward` (the buffered send), the NATS side `dispatch::carry`,
//! so a cut-over call is carried exactly as a plain route of either kind would carry it.
//! The pure parts (the split, the answer comparison) are free functions with unit tests.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, Semaphore};

use crate::config::{Cutover, Outbound, Sticky};
use crate::egress::forward::Outgoing;
use crate::egress::tee::Tee;
use crate::egress::{full, Body, BoxError, Egress};
use crate::metrics::EgressPath;
use crate::problem::BridgeError;

/// The response header that says which way a call went (`nats` or `http`). The tunnel
/// envelope's request header of the same name travels on NATS messages, never here.
pub const RESPONSE_PATH: http::HeaderName = crate::codec::http_names::BRIDGE_PATH;
/// Marks a shadow copy, so the new handler can skip side effects.
pub const BRIDGE_SHADOW: &str = "Bridge-Shadow";
/// Shadow copies in flight at most; past it a copy is skipped, never queued.
pub const SHADOW_CONCURRENCY: usize = 32;
/// Mismatches `/statusz` keeps, newest last.
const MISMATCHES_KEPT: usize = 10;
/// Bytes of each body a kept mismatch shows.
const BODY_SHOWN: usize = 512;
/// An HTTP answer longer than this is compared by status only.
const COMPARE_LIMIT: usize = 1 << 20;
/// How long a shadow waits for the app to finish reading the HTTP answer.
const HTTP_ANSWER_WAIT: Duration = Duration::from_secs(60);

/// The bucket (0–99) of a sticky key: the first 8 bytes of its SHA-256, so the same key
/// lands in the same bucket in every process and after every reload, and raising
/// `nats_percent` only ever moves keys from HTTP to NATS.
pub fn bucket_of(key: &[u8]) -> u64 {
    let digest = Sha256::digest(key);
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) % 100
}

/// Whether a call goes over NATS: by its sticky key's bucket when it has one, else by
/// `draw` (a random number).
pub fn goes_over_nats(cut: &Cutover, headers: &HeaderMap, draw: impl FnOnce() -> u64) -> bool {
    let keyed = match &cut.sticky {
        Some(Sticky::Header(name)) => headers.get(name).map(|v| bucket_of(v.as_bytes())),
        None => None,
    };
    keyed.unwrap_or_else(|| draw() % 100) < u64::from(cut.nats_percent)
}

/// A random number from a per-thread SplitMix64 seeded once from the OS: the split needs
/// an even spread, not secrecy.
fn draw() -> u64 {
    thread_local!(static STATE: std::cell::Cell<u64> = std::cell::Cell::new(uuid::Uuid::new_v4().as_u64_pair().0));
    STATE.with(|s| {
        let mut z = s.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        s.set(z);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

/// How a shadow copy's answer compared with the HTTP answer (the `result` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowResult {
    Match,
    StatusMismatch,
    BodyMismatch,
    Error,
    Timeout,
    Skipped,
}

impl ShadowResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ShadowResult::Match => "match",
            ShadowResult::StatusMismatch => "status_mismatch",
            ShadowResult::BodyMismatch => "body_mismatch",
            ShadowResult::Error => "error",
            ShadowResult::Timeout => "timeout",
            ShadowResult::Skipped => "skipped",
        }
    }
}

/// Compares two answers: the status, then the body, as JSON values when both are JSON
/// (key order and whitespace do not count), else byte for byte. A body is `None` when it
/// was too long to keep (`COMPARE_LIMIT`): then the status decides.
pub fn compare(http_status: StatusCode, http_body: Option<&[u8]>, nats_status: StatusCode, nats_body: Option<&[u8]>) -> ShadowResult {
    if http_status != nats_status {
        return ShadowResult::StatusMismatch;
    }
    let (Some(http_body), Some(nats_body)) = (http_body, nats_body) else { return ShadowResult::Match };
    let same = match (serde_json::from_slice::<serde_json::Value>(http_body), serde_json::from_slice::<serde_json::Value>(nats_body)) {
        (Ok(a), Ok(b)) => a == b,
        _ => http_body == nats_body,
    };
    if same {
        ShadowResult::Match
    } else {
        ShadowResult::BodyMismatch
    }
}

/// Why a failed NATS call may go to `upstream`: NATS never delivered it to a responder.
/// A timeout is not here: the responder may have acted, and a second try could double it.
pub fn fallback_reason(e: &BridgeError) -> Option<&'static str> {
    match e {
        BridgeError::NatsDisconnected => Some("disconnected"),
        BridgeError::NoResponders { .. } => Some("no_responders"),
        BridgeError::NoStream { .. } => Some("no_stream"),
        _ => None,
    }
}

/// One shadow whose answers differed, as `/statusz` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Mismatch {
    pub route: String,
    pub at: String,
    pub method: String,
    pub path: String,
    pub result: &'static str,
    pub http_status: u16,
    pub nats_status: Option<u16>,
    /// Both bodies cut to their first few hundred bytes.
    pub http_body: String,
    pub nats_body: String,
}

/// Shadow state shared across reloads: the concurrency bound and the last mismatches.
pub struct Shadows {
    permits: Arc<Semaphore>,
    recent: Mutex<VecDeque<Mismatch>>,
}

impl Default for Shadows {
    fn default() -> Self {
        Self { permits: Arc::new(Semaphore::new(SHADOW_CONCURRENCY)), recent: Mutex::default() }
    }
}

impl Shadows {
    /// The last mismatches, oldest first.
    pub fn recent(&self) -> Vec<Mismatch> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    fn keep(&self, m: Mismatch) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == MISMATCHES_KEPT {
            recent.pop_front();
        }
        recent.push_back(m);
    }
}

fn shown(body: &[u8]) -> String {
    let cut = &body[..body.len().min(BODY_SHOWN)];
    let mut s = String::from_utf8_lossy(cut).into_owned();
    if body.len() > BODY_SHOWN {
        s.push('…');
    }
    s
}

/// `upstream` with the call's path and query appended, as an `http` route sends it.
pub(super) fn upstream_uri(upstream: &Uri, path_and_query: &str) -> Result<Uri, BridgeError> {
    let uri = format!(
        "{}://{}{}{}",
        upstream.scheme_str().unwrap_or("http"),
        upstream.authority().map(|a| a.as_str()).unwrap_or(""),
        upstream.path().trim_end_matches('/'),
        path_and_query
    );
    uri.parse().map_err(|e: http::uri::InvalidUri| BridgeError::BadRequest(e.to_string()))
}

/// What a shadow copy needs, owned: it outlives the call.
struct ShadowCall {
    route: Outbound,
    subject: String,
    parts: http::request::Parts,
    body: Bytes,
    http: oneshot::Receiver<(StatusCode, Option<Bytes>)>,
}

impl Egress {
    /// A cut-over route's call: split, shadowed or fallen back as its `cutover` says.
    /// Every answer, failures included, carries `Bridge-Path`.
    pub(super) async fn cutover(
        self: &Arc<Self>,
        route: &Outbound,
        cut: &Cutover,
        subject: Option<String>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, BridgeError> {
        let (mut parts, body) = req.into_parts();
        let body = super::read_body(route, &parts.headers, body).await?;
        // Only the sidecar marks shadows: the app's own mark would make a live call skip
        // its effects.
        parts.headers.remove(BRIDGE_SHADOW);
        let subject = subject.unwrap_or_default();
        if goes_over_nats(cut, &parts.headers, draw) {
            // `carry` rewrites the headers for NATS (a contract's `Bridge-Schema`, the
            // CloudEvents codec's own `ce-*` and `Content-Type`); a fallback must send the
            // app's own, so they are kept, but only where a fallback can happen.
            let mut own = cut.fallback.then(|| parts.headers.clone());
            let res = match self.carry(route, subject, &mut parts, body.clone()).await {
                Err(e) if fallback_reason(&e).is_some() && own.is_some() => {
                    parts.headers = own.take().unwrap_or_default();
                    let reason = fallback_reason(&e).unwrap_or_default();
                    self.metrics.fallback.with_label_values(&[route.name.as_str(), reason]).inc();
                    tracing::info!(route = %route.name, %reason, error = %e, "NATS path failed before delivery; calling upstream once");
                    let res = self.call_upstream(route, cut, &parts, body).await;
                    return Ok(answer(route, &parts, res, EgressPath::Http));
                }
                res => res,
            };
            return Ok(answer(route, &parts, res, EgressPath::Nats));
        }
        let shadow = cut.shadows(&parts.method).then(|| self.start_shadow(route, subject, &parts, body.clone())).flatten();
        let res = answer(route, &parts, self.call_upstream(route, cut, &parts, body).await, EgressPath::Http);
        Ok(match shadow {
            Some(tx) => {
                let status = res.status();
                res.map(|b| Tee::new(b, COMPARE_LIMIT, status, tx).boxed_unsync())
            }
            None => res,
        })
    }

    async fn call_upstream(
        &self,
        route: &Outbound,
        cut: &Cutover,
        parts: &http::request::Parts,
        body: Bytes,
    ) -> Result<Response<Body>, BridgeError> {
        let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let uri = upstream_uri(&cut.upstream, pq)?;
        let host_label = cut.upstream.authority().map(|a| a.as_str()).unwrap_or_default().to_owned();
        self.send_buffered(Outgoing { uri, max_body: usize::MAX, timeout: Some(route.timeout), host_label }, parts, body).await
    }

    /// Sends the shadow copy in the background, under the concurrency bound; the sender
    /// takes the HTTP answer for the comparison. `None` when the bound is reached.
    fn start_shadow(
        self: &Arc<Self>,
        route: &Outbound,
        subject: String,
        parts: &http::request::Parts,
        body: Bytes,
    ) -> Option<oneshot::Sender<(StatusCode, Option<Bytes>)>> {
        let Ok(permit) = self.shadows.permits.clone().try_acquire_owned() else {
            self.metrics.shadow.with_label_values(&[route.name.as_str(), ShadowResult::Skipped.as_str()]).inc();
            return None;
        };
        let (tx, http) = oneshot::channel();
        let mut parts = parts.clone();
        parts.headers.insert(BRIDGE_SHADOW, HeaderValue::from_static("true"));
        let call = ShadowCall { route: route.clone(), subject, parts, body, http };
        let this = self.clone();
        tokio::spawn(async move {
            this.shadow(call).await;
            drop(permit);
        });
        Some(tx)
    }

    async fn shadow(&self, call: ShadowCall) {
        let ShadowCall { route, subject, mut parts, body, http } = call;
        let nats = match self.carry(&route, subject, &mut parts, body).await {
            // Kept up to the same limit as the HTTP answer: a shadow's streamed reply may be
            // long, and up to `SHADOW_CONCURRENCY` of them are read at once.
            Ok(res) => {
                let status = res.status();
                kept(res.into_body()).await.map(|b| (status, b)).map_err(|_| ShadowResult::Error)
            }
            Err(BridgeError::Timeout { .. }) => Err(ShadowResult::Timeout),
            Err(_) => Err(ShadowResult::Error),
        };
        // The app may still be reading the HTTP answer; without it there is nothing to
        // compare (the app went away, or the answer was a failure of our own).
        let Ok(Ok((http_status, http_body))) = tokio::time::timeout(HTTP_ANSWER_WAIT, http).await else {
            self.metrics.shadow.with_label_values(&[route.name.as_str(), ShadowResult::Skipped.as_str()]).inc();
            return;
        };
        let result = match &nats {
            Ok((status, b)) => compare(http_status, http_body.as_deref(), *status, b.as_deref()),
            Err(r) => *r,
        };
        self.metrics.shadow.with_label_values(&[route.name.as_str(), result.as_str()]).inc();
        if result != ShadowResult::Match {
            self.shadows.keep(Mismatch {
                route: route.name.clone(),
                at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                method: parts.method.to_string(),
                path: parts.uri.path().to_owned(),
                result: result.as_str(),
                http_status: http_status.as_u16(),
                nats_status: nats.as_ref().ok().map(|(s, _)| s.as_u16()),
                http_body: http_body.as_deref().map(shown).unwrap_or_else(|| "(too long to compare)".into()),
                nats_body: match &nats {
                    Ok((_, Some(b))) => shown(b),
                    Ok((_, None)) => "(too long to compare)".into(),
                    Err(_) => String::new(),
                },
            });
        }
    }
}

/// A shadow's NATS answer, or `None` past `COMPARE_LIMIT` (read no further). Read frame
/// by frame: `http_body_util::Limited` over this boxed error makes the spawned shadow's
/// future fail rustc's `Send` check (rust-lang/rust#102211).
async fn kept(mut body: Body) -> Result<Option<Bytes>, BoxError> {
    let mut kept = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if kept.len() + data.len() > COMPARE_LIMIT {
                return Ok(None);
            }
            kept.extend_from_slice(&data);
        }
    }
    Ok(Some(kept.freeze()))
}

/// The call's response (a failure as problem+json) with `Bridge-Path` set.
fn answer(route: &Outbound, parts: &http::request::Parts, res: Result<Response<Body>, BridgeError>, path: EgressPath) -> Response<Body> {
    let mut res = res.unwrap_or_else(|e| {
        if e.status().is_server_error() {
            tracing::debug!(route = %route.name, path = path.as_str(), error = %e, "cut-over call failed");
        }
        let rid = parts.headers.get(crate::codec::REQUEST_ID).and_then(|v| v.to_str().ok());
        e.to_response(Some(&route.name), rid).map(full)
    });
    res.headers_mut().insert(RESPONSE_PATH, HeaderValue::from_static(path.as_str()));
    res
}

/// The path a response went by, from its `Bridge-Path`.
pub(super) fn path_of(res: &Response<Body>) -> Option<EgressPath> {
    match res.headers().get(RESPONSE_PATH)?.as_bytes() {
        b"nats" => Some(EgressPath::Nats),
        b"http" => Some(EgressPath::Http),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(percent: u8, sticky: Option<&'static str>) -> Cutover {
        Cutover {
            upstream: "http://a:1".parse().unwrap(),
            nats_percent: percent,
            sticky: sticky.map(|h| Sticky::Header(http::HeaderName::from_static(h))),
            shadow: false,
            shadow_unsafe: false,
            fallback: false,
        }
    }

    #[test]
    fn buckets_are_stable_and_even() {
        // Fixed: the same key must land in the same bucket in every process and build.
        assert_eq!(bucket_of(b"wf-1"), bucket_of(b"wf-1"));
        let mut counts = [0u32; 10];
        for i in 0..10_000 {
            counts[(bucket_of(format!("wf-{i}").as_bytes()) / 10) as usize] += 1;
        }
        // 1 000 expected per decile; 5 sigma is about 150.
        assert!(counts.iter().all(|&c| (850..=1150).contains(&c)), "{counts:?}");
    }

    #[test]
    fn the_split_follows_the_share_and_the_key() {
        let mut h = HeaderMap::new();
        h.insert("x-wf", HeaderValue::from_static("wf-42"));
        let b = bucket_of(b"wf-42");
        assert!(!goes_over_nats(&cut(b as u8, Some("x-wf")), &h, || 0));
        assert!(goes_over_nats(&cut(b as u8 + 1, Some("x-wf")), &h, || 99));
        assert!(!goes_over_nats(&cut(0, None), &h, || 0));
        assert!(goes_over_nats(&cut(100, None), &h, || 99));
        assert!(goes_over_nats(&cut(10, None), &h, || 109));
        // Without its key a sticky route draws.
        assert!(goes_over_nats(&cut(10, Some("x-other")), &h, || 9));
        assert!(!goes_over_nats(&cut(10, Some("x-other")), &h, || 10));
    }

    #[test]
    fn answers_compare_as_json_when_both_are() {
        let ok = StatusCode::OK;
        assert_eq!(compare(ok, Some(br#"{"a":1,"b":[1,2]}"#), ok, Some(b"{ \"b\": [1, 2], \"a\": 1 }")), ShadowResult::Match);
        assert_eq!(compare(ok, Some(br#"{"a":1}"#), ok, Some(br#"{"a":2}"#)), ShadowResult::BodyMismatch);
        assert_eq!(compare(ok, Some(b"plain"), ok, Some(b"plain")), ShadowResult::Match);
        assert_eq!(compare(ok, Some(b"plain"), ok, Some(b"plain ")), ShadowResult::BodyMismatch);
        assert_eq!(compare(ok, Some(b"x"), StatusCode::CREATED, Some(b"x")), ShadowResult::StatusMismatch);
        assert_eq!(compare(ok, None, ok, Some(b"anything")), ShadowResult::Match);
        assert_eq!(compare(ok, Some(b"short"), ok, None), ShadowResult::Match, "a NATS answer too long to keep: the status decides");
        assert_eq!(compare(ok, Some(b"short"), StatusCode::CREATED, None), ShadowResult::StatusMismatch);
    }

    #[tokio::test]
    async fn a_shadows_answer_is_kept_up_to_the_compare_limit() {
        let at_limit = Bytes::from(vec![b'x'; COMPARE_LIMIT]);
        assert_eq!(kept(full(at_limit.clone())).await.unwrap(), Some(at_limit));
        assert_eq!(kept(full(vec![b'x'; COMPARE_LIMIT + 1])).await.unwrap(), None);
    }

    #[test]
    fn only_undelivered_calls_fall_back() {
        assert_eq!(fallback_reason(&BridgeError::NatsDisconnected), Some("disconnected"));
        assert_eq!(fallback_reason(&BridgeError::NoResponders { subject: "a".into() }), Some("no_responders"));
        assert_eq!(fallback_reason(&BridgeError::NoStream { subject: "a".into() }), Some("no_stream"));
        let timeout = BridgeError::Timeout { subject: "a".into(), timeout: Duration::from_secs(1) };
        assert_eq!(fallback_reason(&timeout), None);
    }

    #[test]
    fn upstream_keeps_the_call_path() {
        let u: Uri = "http://agent:3000/base/".parse().unwrap();
        assert_eq!(upstream_uri(&u, "/agents/7?x=1").unwrap().to_string(), "http://agent:3000/base/agents/7?x=1");
    }
}
