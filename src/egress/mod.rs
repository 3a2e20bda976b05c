//! The egress side (HTTP → NATS): the legacy app's outgoing calls, in origin or absolute
//! (proxy) form, carried over NATS by their route's mode or proxied as plain HTTP.
//!
//! - [`listener`]: the accept loop, connection limits, the idle/slowloris watchdog and the
//!   raw-head framing guard; knows nothing of routes.
//! - [`routes`]: the route table, and the table in force with its per-route metrics.
//! - [`dispatch`]: one request, from route lookup to response, one function per mode.
//!
//! Calls `codec` (HTTP ↔ NATS), `nats` (connection state, the acked JetStream publish),
//! `problem` (every failure's status), `config` and `metrics`; nothing calls back in.

mod dispatch;
mod listener;
pub mod routes;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;

use crate::metrics::Metrics;
use crate::nats::replies::Replies;

pub use listener::serve;
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

type UpstreamClient = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// Shared state of the egress listener. Everything is passed in.
pub struct Egress {
    table: Arc<ArcSwap<Table>>,
    nats: async_nats::Client,
    /// The connection's reply multiplexer: request and tunnel replies, JetStream acks.
    replies: Replies,
    upstream: UpstreamClient,
    metrics: Metrics,
    publish_permits: Arc<Semaphore>,
    /// The longest reply subject a request or JetStream publish can carry (an inbox and
    /// a token), counted in each message's control line.
    reply_len: usize,
}

impl Egress {
    pub fn new(table: Arc<ArcSwap<Table>>, nats: async_nats::Client, replies: Replies, metrics: Metrics) -> Arc<Self> {
        let permits = table.load().config().sidecar.max_inflight_publishes;
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        let upstream =
            hyper_util::client::legacy::Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(connector);
        // A reply subject is the multiplexer's inbox plus a token: twice an inbox bounds it.
        let reply_len = 2 * nats.new_inbox().len();
        Arc::new(Self { table, nats, replies, upstream, metrics, publish_permits: Arc::new(Semaphore::new(permits)), reply_len })
    }
}
