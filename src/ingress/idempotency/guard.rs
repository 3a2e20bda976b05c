//! Consumer-side idempotency for inbound routes that set `idempotency = { key, ttl }`: the
//! protocol around one delivery, on top of the shared KV [`Store`].
//!
//! Per message:
//! - the key is extracted ([`extract_key`]); without one the message runs unprotected and
//!   `missing_key` is counted;
//! - the key is claimed before the app is called. A completed key replays the stored
//!   response (request/tunnel) or is acked (jetstream) without calling the app; a key in
//!   flight elsewhere is waited for (request/tunnel) or naked with a delay (jetstream);
//! - while the app runs, a task refreshes the claim every `claim_ttl / 3`, so a long
//!   handler's claim never goes stale mid-call;
//! - only a 2xx marks the key done (status, headers, body capped at
//!   `max_response_bytes`, kept for the route's `ttl`); anything else releases the claim
//!   so the retry can run;
//! - a store that cannot be reached never lets a message run unprotected: 503 (request)
//!   or a delayed nak (jetstream), and readiness says so;
//! - a key this process holds is in flight for every other copy that reaches it, until the
//!   holder is done, whatever the store's record says: after a server crash lost the
//!   holder's result write, the record is a claim that may look stale while the holder is
//!   still writing its result again (a crash can also lose the consumer's delivery state,
//!   so the copy comes back to the same process as a first delivery).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;

use crate::config::{Idempotency, IdempotencyStore};
use crate::health::{Component, Readiness, State};
use crate::ingress::idempotency::store::{extract_key, kv_key, payload_digest, Claim, FinishError, Store, StoredResponse, Ticket};
use crate::ingress::{retry_delay, sleep_or_stop, AppError, AppResponse};
use crate::metrics::Metrics;
use crate::problem::BridgeError;

/// Set on replies that replay a stored response instead of calling the app.
pub const REPLAY_HEADER: &str = "Bridge-Idempotent-Replay";
/// Set on replays whose body was over `max_response_bytes` and was not stored.
pub const TRUNCATED_HEADER: &str = "Bridge-Idempotent-Truncated";

struct Counters {
    hit: prometheus::IntCounter,
    claim: prometheus::IntCounter,
    conflict: prometheus::IntCounter,
    /// A key already done for another payload.
    reused: prometheus::IntCounter,
    release: prometheus::IntCounter,
    missing_key: prometheus::IntCounter,
    stored: prometheus::IntCounter,
    /// A store operation failed (claim refused for it, result not stored, release lost).
    error: prometheus::IntCounter,
}

/// One route's idempotency: its key spec and the (shared) store once it is open.
pub(crate) struct Guard {
    /// The sidecar's service: keys are scoped by it (see [`kv_key`]).
    service: String,
    route: String,
    spec: Idempotency,
    store: watch::Sender<Option<Arc<Store>>>,
    readiness: Arc<Readiness>,
    /// A store error failed readiness; the next success passes it again.
    degraded: AtomicBool,
    /// The bucket's max_age is shorter than this route's ttl (found when it was bound).
    short_max_age: std::sync::OnceLock<String>,
    /// The KV keys this process's handlers hold claims on.
    held: HeldKeys,
    c: Counters,
}

type HeldKeys = Arc<std::sync::Mutex<HashSet<String>>>;

/// A KV key held by a live handler of this process, until dropped.
struct Held {
    keys: HeldKeys,
    key: String,
}

impl Held {
    /// Holds `key`; `None` when a handler of this process holds it already.
    fn take(keys: &HeldKeys, key: &str) -> Option<Self> {
        keys.lock().unwrap_or_else(PoisonError::into_inner).insert(key.to_owned()).then(|| Self { keys: keys.clone(), key: key.to_owned() })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.key);
    }
}

/// What to do with a message whose key was claimed.
pub(crate) enum Begin {
    /// The key is ours: call the app, then [`Guard::finish`].
    Run(Claimed),
    /// Handled before: the app's stored answer.
    Replay(StoredResponse),
    /// Handled before for another payload: the key was reused; do not call the app.
    Reused,
    /// Another handler holds the key; its claim goes stale in `stale_in` unless refreshed.
    InFlight { stale_in: Duration },
    /// The store cannot be used: do not call the app.
    Unavailable(String),
}

/// A held claim, refreshed in the background until [`Guard::finish`].
pub(crate) struct Claimed {
    store: Arc<Store>,
    ticket: Arc<Mutex<Ticket>>,
    stop: CancellationToken,
    refresher: Option<tokio::task::JoinHandle<()>>,
    /// Dropped last, once the claim is ended (or abandoned at shutdown).
    _held: Held,
}

impl Drop for Claimed {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Guard {
    /// Not ready until [`keep_open`](Self::keep_open) binds the store.
    pub fn new(service: &str, route: &str, spec: Idempotency, metrics: &Metrics, readiness: Arc<Readiness>) -> Arc<Self> {
        readiness.starting(&Component::IDEMPOTENCY, "the idempotency store is not bound yet");
        let c = |r: &str| metrics.idempotency.with_label_values(&[route, r]);
        Arc::new(Self {
            service: service.to_owned(),
            route: route.to_owned(),
            spec,
            store: watch::Sender::new(None),
            readiness,
            degraded: AtomicBool::new(false),
            short_max_age: std::sync::OnceLock::new(),
            held: HeldKeys::default(),
            c: Counters {
                hit: c("hit"),
                claim: c("claim"),
                conflict: c("conflict"),
                reused: c("reused"),
                release: c("release"),
                missing_key: c("missing_key"),
                stored: c("stored"),
                error: c("error"),
            },
        })
    }

    /// Binds the bucket, retrying (readiness failing, naming it) until it exists or `stop`.
    pub async fn keep_open(&self, js: async_nats::jetstream::Context, cfg: IdempotencyStore, stop: CancellationToken) {
        let owner = format!("{}:{}:{}", std::env::var("HOSTNAME").unwrap_or_else(|_| "natsbridge".into()), std::process::id(), self.route);
        let mut attempt = 0;
        let mut last = String::new();
        loop {
            match Store::open(&js, &cfg, owner.clone()).await {
                Ok(store) => {
                    self.check_max_age(&store, &cfg.bucket).await;
                    self.store.send_replace(Some(Arc::new(store)));
                    self.mark_up();
                    tracing::info!(route = %self.route, bucket = %cfg.bucket, "idempotency store bound");
                    return;
                }
                Err(e) => {
                    let why = e.to_string();
                    if why != last {
                        tracing::warn!(route = %self.route, error = %why, "idempotency store unavailable; retrying");
                    }
                    self.readiness.fail(&Component::IDEMPOTENCY, why.clone());
                    last = why;
                }
            }
            if sleep_or_stop(&stop, retry_delay(attempt)).await {
                return;
            }
            attempt += 1;
        }
    }

    /// Waits until the store is bound; false if `stop` came first.
    pub async fn wait_open(&self, stop: &CancellationToken) -> bool {
        let mut rx = self.store.subscribe();
        tokio::select! {
            r = rx.wait_for(|s| s.is_some()) => r.is_ok(),
            _ = stop.cancelled() => false,
        }
    }

    /// Waits while the store is degraded (a store operation failed), probing it every so
    /// often: the pull loop pulls nothing meanwhile, since every claim would fail. False
    /// if `stop` came first.
    pub async fn wait_usable(&self, stop: &CancellationToken) -> bool {
        let mut attempt = 0;
        while self.degraded.load(Ordering::Relaxed) {
            if sleep_or_stop(stop, retry_delay(attempt)).await {
                return false;
            }
            attempt += 1;
            let Some(store) = self.store.borrow().clone() else { continue };
            if store.probe().await.is_ok() {
                tracing::info!(route = %self.route, "idempotency store usable again");
                self.store_ok();
            }
        }
        !stop.is_cancelled()
    }

    /// The message's key; counts `missing_key` when it has none.
    pub fn key(&self, headers: Option<&async_nats::HeaderMap>, payload: &[u8]) -> Option<String> {
        let key = extract_key(&self.spec.key, headers, payload);
        if key.is_none() {
            self.c.missing_key.inc();
        }
        key
    }

    fn store_failed(&self, what: &str, why: &str) {
        self.c.error.inc();
        tracing::warn!(route = %self.route, error = %why, "idempotency store: {what} failed");
        self.degraded.store(true, Ordering::Relaxed);
        self.readiness.fail(&Component::IDEMPOTENCY, format!("idempotency store: {what} failed: {why}"));
    }

    /// A lost claim is no store outage: counted and logged, but the route is not paused.
    fn finish_failed(&self, e: &FinishError) {
        let what = match e {
            FinishError::Complete { .. } => "storing a result",
            FinishError::Release { .. } => "releasing a claim",
        };
        let source = e.source_error();
        if source.is_store_failure() {
            self.store_failed(what, &source.to_string());
        } else {
            self.c.error.inc();
            tracing::warn!(route = %self.route, error = %source, "idempotency store: {what} failed");
        }
    }

    fn store_ok(&self) {
        if self.degraded.swap(false, Ordering::Relaxed) {
            self.mark_up();
        }
    }

    /// Up, or up but degraded when the bucket's max_age is short for this route. A route
    /// without that finding does not clear another route's: it passes only a component
    /// that is not up.
    fn mark_up(&self) {
        match self.short_max_age.get() {
            Some(why) => self.readiness.degraded(&Component::IDEMPOTENCY, why.clone()),
            None if self.readiness.state(&Component::IDEMPOTENCY) != Some(State::Up) => self.readiness.pass(&Component::IDEMPOTENCY),
            None => {}
        }
    }

    /// The bucket collects entries after its max_age: shorter than the route's ttl, a
    /// result is gone before its ttl and a late copy of the message runs again. `provision`
    /// sets it from the longest ttl; a bucket made by hand, or a ttl raised since, is only
    /// caught here. A store that cannot say is not held against it.
    async fn check_max_age(&self, store: &Store, bucket: &str) {
        let Ok(max_age) = store.max_age().await else { return };
        if max_age.is_zero() || max_age >= self.spec.ttl {
            return;
        }
        let why = format!(
            "idempotency bucket {bucket:?} max_age {} is shorter than route {:?} ttl {}: results are collected early and a late copy runs again; run `natsbridge provision`",
            humantime::format_duration(max_age),
            self.route,
            humantime::format_duration(self.spec.ttl)
        );
        tracing::warn!(route = %self.route, "{why}");
        let _ = self.short_max_age.set(why);
    }

    /// Claims `key` for this delivery of `payload` (counts claim, hit, reused or conflict).
    pub async fn claim(&self, key: &str, payload: &[u8]) -> Begin {
        let Some(store) = self.store.borrow().clone() else {
            self.c.error.inc();
            return Begin::Unavailable("the idempotency store is not bound yet".into());
        };
        let kv_key = kv_key(&self.service, &self.route, key);
        // Held here for the whole claim: no store round trip, and no takeover of a claim
        // whose holder is alive (see the module's notes).
        let Some(held) = Held::take(&self.held, &kv_key) else {
            self.c.conflict.inc();
            return Begin::InFlight { stale_in: store.claim_ttl() };
        };
        match store.claim(&kv_key, &payload_digest(payload)).await {
            Ok(Claim::Acquired(ticket)) => {
                self.store_ok();
                self.c.claim.inc();
                Begin::Run(Claimed::start(store, ticket, held))
            }
            Ok(Claim::Done(r)) => {
                self.store_ok();
                self.c.hit.inc();
                Begin::Replay(r)
            }
            Ok(Claim::Reused) => {
                self.store_ok();
                self.c.reused.inc();
                Begin::Reused
            }
            Ok(Claim::InFlight { stale_in }) => {
                self.store_ok();
                self.c.conflict.inc();
                Begin::InFlight { stale_in }
            }
            Err(e) => {
                let why = e.to_string();
                self.store_failed("claim", &why);
                Begin::Unavailable(why)
            }
        }
    }

    /// Request and tunnel modes: claims `key`; a key in flight elsewhere is waited for
    /// (up to `wait`), then claimed once more. `Err` is the reply to send instead of
    /// calling the app: the replayed response, 409 when the other handler is still at it
    /// after `wait`, 409 `idempotency-key-reused` when the key's result belongs to another
    /// payload, 503 when the store cannot be used.
    pub async fn gate_request(&self, key: &str, payload: &[u8], wait: Duration, rid: Option<&str>) -> Result<Claimed, AppResponse> {
        match self.claim(key, payload).await {
            Begin::Run(c) => return Ok(c),
            Begin::Replay(r) => return Err(replay(r)),
            Begin::Reused => return Err(self.refusal(BridgeError::IdempotencyKeyReused, rid)),
            Begin::Unavailable(why) => return Err(self.refusal(BridgeError::IdempotencyUnavailable(why), rid)),
            Begin::InFlight { .. } => {}
        }
        let Some(store) = self.store.borrow().clone() else {
            return Err(self.refusal(BridgeError::IdempotencyStoreUnbound, rid));
        };
        let deadline = tokio::time::Instant::now() + wait;
        match store.wait_done(&kv_key(&self.service, &self.route, key), &payload_digest(payload), deadline).await {
            Ok(Some(Claim::Done(r))) => {
                self.c.hit.inc();
                return Err(replay(r));
            }
            Ok(Some(Claim::Reused)) => {
                self.c.reused.inc();
                return Err(self.refusal(BridgeError::IdempotencyKeyReused, rid));
            }
            Ok(_) => {}
            Err(e) => {
                let why = e.to_string();
                self.store_failed("wait", &why);
                return Err(self.refusal(BridgeError::IdempotencyUnavailable(why), rid));
            }
        }
        // Released (the other handler failed), expired, or still running: once more.
        match self.claim(key, payload).await {
            Begin::Run(c) => Ok(c),
            Begin::Replay(r) => Err(replay(r)),
            Begin::Reused => Err(self.refusal(BridgeError::IdempotencyKeyReused, rid)),
            Begin::Unavailable(why) => Err(self.refusal(BridgeError::IdempotencyUnavailable(why), rid)),
            Begin::InFlight { .. } => Err(self.refusal(BridgeError::IdempotencyInFlight { wait }, rid)),
        }
    }

    /// Ends a claimed delivery: `success` (the app's 2xx, see [`success`]) marks the key
    /// done; `None` releases it so the retry can run. Store errors are logged and counted,
    /// never turned into a retry: after a success the effect has happened.
    pub async fn finish(&self, mut claimed: Claimed, success: Option<StoredResponse>) -> Result<(), FinishError> {
        let ticket = claimed.stop_refreshing().await;
        let store = claimed.store.clone();
        let key = ticket.key.clone();
        let done = match success {
            Some(r) => store
                .complete(ticket, r, self.spec.ttl)
                .await
                .map(|()| &self.c.stored)
                .map_err(|source| FinishError::Complete { key, source }),
            // On failure the claim goes stale after claim_ttl; the retry runs then.
            None => store.release(ticket).await.map(|()| &self.c.release).map_err(|source| FinishError::Release { key, source }),
        };
        match done {
            Ok(counter) => {
                self.store_ok();
                counter.inc();
                Ok(())
            }
            Err(e) => {
                self.finish_failed(&e);
                Err(e)
            }
        }
    }

    /// The reply instead of calling the app; its status and body come from `problem`.
    fn refusal(&self, e: BridgeError, rid: Option<&str>) -> AppResponse {
        let (parts, body) = e.to_response(Some(&self.route), rid).into_parts();
        AppResponse { status: parts.status, headers: parts.headers, body }
    }
}

impl Claimed {
    fn start(store: Arc<Store>, ticket: Ticket, held: Held) -> Self {
        let ticket = Arc::new(Mutex::new(ticket));
        let stop = CancellationToken::new();
        let every = (store.claim_ttl() / 3).max(Duration::from_millis(50));
        let refresher = tokio::spawn({
            let (store, ticket, stop) = (store.clone(), ticket.clone(), stop.clone());
            async move {
                loop {
                    if sleep_or_stop(&stop, every).await {
                        return;
                    }
                    // Held across the update: finishing waits for it, so the ticket it
                    // finishes with has the latest revision.
                    let mut t = ticket.lock().await;
                    match store.refresh(&mut t).await {
                        Ok(()) => {}
                        Err(e) if !e.is_store_failure() => {
                            // Taken over once stale: refreshing can only fail from now on.
                            tracing::warn!(key = %t.key, error = %e, "idempotency claim lost while the handler ran");
                            return;
                        }
                        Err(e) => tracing::warn!(key = %t.key, error = %e, "could not refresh an idempotency claim"),
                    }
                }
            }
        });
        Self { store, ticket, stop, refresher: Some(refresher), _held: held }
    }

    async fn stop_refreshing(&mut self) -> Ticket {
        self.stop.cancel();
        if let Some(r) = self.refresher.take() {
            let _ = r.await;
        }
        self.ticket.lock().await.clone()
    }
}

/// The header the app receives: the extracted key (dropped if it is not a valid value).
pub(crate) fn set_key_header(headers: &mut HeaderMap, key: &str) {
    match HeaderValue::from_str(key) {
        Ok(v) => {
            headers.insert(crate::codec::http_names::BRIDGE_IDEMPOTENCY_KEY, v);
        }
        Err(_) => tracing::debug!("idempotency key is not a valid header value; not passed to the app"),
    }
}

/// Response headers never stored with a result, so never replayed: a session cookie
/// belongs to the caller it was issued to, not to whoever sends the key again.
const NOT_STORED: [http::HeaderName; 1] = [http::header::SET_COOKIE];

/// The result worth remembering: a 2xx answer (a 2xx whose body was over the route's
/// `max_body` is stored without it). Anything else is a failure that releases the claim.
pub(crate) fn success(result: &Result<AppResponse, AppError>) -> Option<StoredResponse> {
    match result {
        Ok(r) if r.status.is_success() => Some(StoredResponse {
            status: r.status.as_u16(),
            headers: r
                .headers
                .iter()
                .filter(|(n, _)| !NOT_STORED.contains(n))
                .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
                .collect(),
            body: r.body.clone(),
            truncated: false,
        }),
        Err(AppError::TooLarge { status, .. }) if status.is_success() => {
            Some(StoredResponse { status: status.as_u16(), headers: Vec::new(), body: Bytes::new(), truncated: true })
        }
        _ => None,
    }
}

/// A stored response as a reply: status, headers and body as the app gave them, marked
/// as a replay. A body that was too large to store is left out (and its content headers
/// with it), and the reply says so.
pub(crate) fn replay(r: StoredResponse) -> AppResponse {
    let mut headers = HeaderMap::with_capacity(r.headers.len() + 2);
    for (n, v) in &r.headers {
        let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n.as_bytes()), HeaderValue::from_str(v)) else { continue };
        if r.truncated && (n == http::header::CONTENT_TYPE || n == http::header::CONTENT_ENCODING) {
            continue;
        }
        headers.append(n, v);
    }
    headers.insert(HeaderName::from_static("bridge-idempotent-replay"), HeaderValue::from_static("true"));
    if r.truncated {
        headers.insert(HeaderName::from_static("bridge-idempotent-truncated"), HeaderValue::from_static("true"));
    }
    AppResponse { status: StatusCode::from_u16(r.status).unwrap_or(StatusCode::OK), headers, body: r.body }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_2xx_is_stored() {
        let ok = |s: u16| {
            Ok(AppResponse { status: StatusCode::from_u16(s).unwrap(), headers: HeaderMap::new(), body: Bytes::from_static(b"b") })
        };
        assert!(success(&ok(201)).is_some_and(|r| r.status == 201 && &r.body[..] == b"b" && !r.truncated));
        for s in [302, 400, 404, 409, 429, 500, 503] {
            assert!(success(&ok(s)).is_none(), "{s}");
        }
        assert!(success(&Err(AppError::Timeout(Duration::from_secs(1)))).is_none());
        assert!(success(&Err(AppError::Unreachable("x".into()))).is_none());
        assert!(success(&Err(AppError::TooLarge { status: StatusCode::OK, limit: 1 })).is_some_and(|r| r.truncated));
        assert!(success(&Err(AppError::TooLarge { status: StatusCode::BAD_GATEWAY, limit: 1 })).is_none());
    }

    #[test]
    fn replays_carry_the_stored_response_and_say_so() {
        let r = replay(StoredResponse {
            status: 201,
            headers: vec![("content-type".into(), "application/json".into()), ("x-app".into(), "1".into())],
            body: Bytes::from_static(b"{}"),
            truncated: false,
        });
        assert_eq!(r.status, 201);
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers["x-app"], "1");
        assert_eq!(r.headers[REPLAY_HEADER], "true");
        assert!(r.headers.get(TRUNCATED_HEADER).is_none());
        assert_eq!(&r.body[..], b"{}");

        let r = replay(StoredResponse {
            status: 200,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: Bytes::new(),
            truncated: true,
        });
        assert!(r.headers.get("content-type").is_none());
        assert_eq!(r.headers[TRUNCATED_HEADER], "true");
    }
}
