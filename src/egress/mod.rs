//! The egress side (HTTP → NATS): the legacy app's outgoing calls, in origin or absolute
//! (proxy) form, carried over NATS by their route's mode or proxied as plain HTTP.
//!
//! - [`listener`]: the accept loop, connection limits, the idle/slowloris watchdog and the
//!   per-connection edge state; knows nothing of routes. [`version`]: HTTP/1.1 or HTTP/2
//!   told apart by the preface, and hyper's builder for each.
//! - [`framing`]: the raw-head framing guard, which follows a connection's requests on the
//!   wire (pipelined ones included) and judges each head's framing; pure.
//! - [`routes`]: the route table, and the table in force with its per-route metrics.
//! - [`dispatch`]: one request, from route lookup to response, one function per mode.
//! - [`stream`]: replies read as streams (`Bridge-Stream-Seq`), and the streamed response
//!   writer any multi-message reply reuses.
//! - `operations`: async request-reply (`Prefer: respond-async`, `async = true`) and the
//!   `/.natsbridge/operations/<id>` results, kept in a KV bucket.
//! - `subscribe`: `subscribe` routes, a subject (or a JetStream stream) as a live SSE stream.
//! - `cloudevents` and `nest`: what `codec = "cloudevents"` / `"nestjs"` make of a request.
//! - [`forward`]: plain HTTP to an origin (`http` routes, calls no route takes), streamed,
//!   upgrades included; [`connect`]: `CONNECT` tunnels and the byte splice; [`slots`]:
//!   the places of tunnels and async operations under `max_connections`, and when they
//!   must close.
//! - [`cutover`]: routes moving from an HTTP `upstream` to NATS: the split, shadow copies
//!   (their comparison, with [`tee`] keeping the HTTP answer) and the fallback.
//!
//! Calls `codec` (HTTP ↔ NATS), `nats` (connection state, the acked JetStream publish),
//! `problem` (every failure's status), `config`, `metrics` and `telemetry` (each routed
//! call's spans); nothing calls back in.

mod cloudevents;
mod connect;
pub mod cutover;
mod dispatch;
mod forward;
pub mod framing;
mod listener;
mod nest;
mod operations;
pub mod routes;
mod slots;
pub(crate) mod stream;
mod subscribe;
mod tee;
mod version;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;

use crate::metrics::Metrics;
use crate::nats::replies::Replies;

pub use listener::serve;
pub use operations::BUCKET as OPERATIONS_BUCKET;
pub use routes::Table;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every response body the sidecar produces: buffered, or streamed from an upstream.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(never).boxed_unsync()
}

fn never(e: Infallible) -> BoxError {
    match e {}
}

type UpstreamClient = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, forward::Upload>;

/// Shared state of the egress listener. Everything is passed in.
pub struct Egress {
    table: Arc<ArcSwap<Table>>,
    nats: async_nats::Client,
    /// The connection's reply multiplexer: request and tunnel replies, JetStream acks.
    replies: Replies,
    upstream: UpstreamClient,
    metrics: Metrics,
    /// JetStream publishes awaiting their ack, bounded by the `max_inflight_publishes` in
    /// force: read at each publish, so a reload applies at once.
    publishes_in_flight: AtomicUsize,
    /// The longest reply subject a request or JetStream publish can carry (an inbox and
    /// a token), counted in each message's control line.
    reply_len: usize,
    /// The listener's bound address, for refusing calls that would loop back to it.
    listen: std::sync::OnceLock<std::net::SocketAddr>,
    /// The listener's places under `max_connections`, which async operations share.
    places: std::sync::OnceLock<slots::Places>,
    /// This process's `Via` entry on forwarded calls: seeing it come back is a loop.
    via: http::HeaderValue,
    /// Metric handles of route `(unmatched)`: the calls forwarded to their origin.
    unmatched: crate::metrics::EgressRouteMetrics,
    /// Cut-over shadows: their concurrency bound and last mismatches (read by `/statusz`).
    shadows: Arc<cutover::Shadows>,
    /// The spans of each routed call (off without `[telemetry]`).
    telemetry: crate::telemetry::Telemetry,
    /// Cancelled when the stop starts: open `subscribe` streams end at once (they resume
    /// elsewhere), rather than holding the listener's drain for its whole budget.
    drain: tokio_util::sync::CancellationToken,
}

impl Egress {
    pub fn new(
        table: Arc<ArcSwap<Table>>,
        nats: async_nats::Client,
        replies: Replies,
        metrics: Metrics,
        shadows: Arc<cutover::Shadows>,
        telemetry: crate::telemetry::Telemetry,
        drain: tokio_util::sync::CancellationToken,
    ) -> Arc<Self> {
        let connect_timeout = table.load().config().sidecar.forward.connect_timeout;
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        // Read at start: a reload does not rebuild the client.
        connector.set_connect_timeout(Some(connect_timeout));
        let upstream =
            hyper_util::client::legacy::Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(connector);
        // A reply subject is the multiplexer's inbox plus a token: twice an inbox bounds it.
        let reply_len = 2 * nats.new_inbox().len();
        let via = http::HeaderValue::try_from(format!("1.1 natsbridge-{:08x}", uuid::Uuid::new_v4().as_u128() as u32))
            .expect("ASCII header value");
        let unmatched = metrics.egress_route(forward::UNMATCHED_ROUTE, "forward", crate::metrics::EgressPath::Http, false);
        Arc::new(Self {
            table,
            nats,
            replies,
            upstream,
            metrics,
            publishes_in_flight: AtomicUsize::new(0),
            reply_len,
            listen: std::sync::OnceLock::new(),
            places: std::sync::OnceLock::new(),
            via,
            unmatched,
            shadows,
            telemetry,
            drain,
        })
    }
}

/// One JetStream publish's place under `max_inflight_publishes`, given back on drop.
pub(crate) struct PublishSlot<'a>(&'a AtomicUsize);

impl Egress {
    /// Takes a place for a JetStream publish if fewer than the configured maximum are in
    /// flight. A reload that lowers the maximum refuses new publishes until enough finish.
    pub(crate) fn publish_slot(&self) -> Option<PublishSlot<'_>> {
        let max = self.table.load().config().sidecar.max_inflight_publishes;
        self.publishes_in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(PublishSlot(&self.publishes_in_flight))
    }
}

impl Egress {
    /// A place for an async operation under `max_connections`, or 503 when none is left.
    /// Without a listener (none should run one) nothing bounds it, so it is refused.
    pub(crate) fn operation_place(&self) -> Result<tokio::sync::OwnedSemaphorePermit, crate::problem::BridgeError> {
        self.places.get().ok_or(crate::problem::BridgeError::TooManyConnections { max: 0 })?.operation()
    }
}

impl Drop for PublishSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The whole request body, refused (413) past the route's `max_body` whether declared
/// by `Content-Length` or streamed.
async fn read_body(
    route: &crate::config::Outbound,
    headers: &http::HeaderMap,
    body: hyper::body::Incoming,
) -> Result<Bytes, crate::problem::BridgeError> {
    let declared = headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > route.max_body as u64) {
        return Err(crate::problem::BridgeError::BodyTooLarge { limit: route.max_body });
    }
    let body = http_body_util::Limited::new(body, route.max_body).collect().await.map_err(|e: BoxError| {
        if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
            crate::problem::BridgeError::BodyTooLarge { limit: route.max_body }
        } else {
            crate::problem::BridgeError::BodyRead(e)
        }
    })?;
    Ok(body.to_bytes())
}
