//! Tunnels' places under `[sidecar] max_connections`, and the listener's stop they obey.
//!
//! A tunnel (a `CONNECT`, or an upgrade after a 101) outlives the HTTP exchange that
//! opened it, so it holds a place of its own under the same limit as connections:
//! - over HTTP/1 the tunnel takes its connection over, so it inherits the connection's
//!   place;
//! - over HTTP/2 the connection stays open beside its tunnels, so each tunnel takes a new
//!   place from the pool, or is refused (503, `Retry-After`) when none is left.
//!
//! An async operation (`Prefer: respond-async`, `async = true`) goes on after its 202
//! answered and its connection may be gone, so it too takes a new place from the pool for
//! as long as it runs, or is refused (503, `Retry-After`). Without it, every 202 would
//! leave a task holding the body and a reply waiter for the route's timeout, unbounded.
//!
//! Held places are what the listener's drain waits for; when the drain times out
//! ([`Stop::Abort`]), the tunnels close, so the stop stays within `drain_timeout`.

use std::sync::{Arc, Mutex};

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::problem::BridgeError;

/// What the accept loop tells its connections and tunnels, by rising severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Stop {
    Serve,
    /// Finish the request in flight, then close.
    Drain,
    /// Close now: the drain timed out.
    Abort,
}

/// Put in each request's extensions by the listener.
#[derive(Clone)]
pub(crate) struct Slots {
    /// The connection's own place, while the connection holds it.
    own: Arc<Mutex<Option<OwnedSemaphorePermit>>>,
    pool: Arc<Semaphore>,
    max: usize,
    stop: watch::Receiver<Stop>,
}

impl Slots {
    pub(crate) fn new(own: OwnedSemaphorePermit, pool: Arc<Semaphore>, max: usize, stop: watch::Receiver<Stop>) -> Self {
        Self { own: Arc::new(Mutex::new(Some(own))), pool, max, stop }
    }

    /// The same pool and stop for requests read inside a tunnel, which has no place of
    /// its own to hand over (the tunnel keeps it).
    pub(crate) fn nested(&self) -> Self {
        Self { own: Arc::new(Mutex::new(None)), ..self.clone() }
    }

    /// Gives the connection's place back (the connection ended) unless a tunnel took it.
    pub(crate) fn release_own(&self) {
        drop(self.own.lock().unwrap_or_else(|e| e.into_inner()).take());
    }

    /// A place for a tunnel opened by a request of `version`; see the module doc.
    pub(crate) fn tunnel(&self, version: http::Version) -> Result<TunnelSlot, BridgeError> {
        let inherited = if version < http::Version::HTTP_2 { self.own.lock().unwrap_or_else(|e| e.into_inner()).take() } else { None };
        let permit = match inherited {
            Some(p) => p,
            None => self.pool.clone().try_acquire_owned().map_err(|_| BridgeError::TooManyConnections { max: self.max })?,
        };
        Ok(TunnelSlot { _permit: permit, stop: self.stop.clone() })
    }
}

/// A place for a tunnel opened by a request of `version` with these `slots` (from its
/// extensions), or the error that refuses it. A request the listener did not mark (none
/// should reach here) is refused rather than left uncounted.
pub(crate) fn for_tunnel(slots: Option<&Slots>, version: http::Version) -> Result<TunnelSlot, BridgeError> {
    match slots {
        Some(slots) => slots.tunnel(version),
        None => Err(BridgeError::TooManyConnections { max: 0 }),
    }
}

/// The listener's pool of places, as [`crate::egress::Egress`] keeps it for async
/// operations, which need no request's marks to find it.
pub(crate) struct Places {
    pub(crate) pool: Arc<Semaphore>,
    pub(crate) max: usize,
}

impl Places {
    /// A place for an async operation; see the module doc.
    pub(crate) fn operation(&self) -> Result<OwnedSemaphorePermit, BridgeError> {
        self.pool.clone().try_acquire_owned().map_err(|_| BridgeError::TooManyConnections { max: self.max })
    }
}

/// One open tunnel's place; given back when the tunnel ends.
pub(crate) struct TunnelSlot {
    _permit: OwnedSemaphorePermit,
    stop: watch::Receiver<Stop>,
}

impl TunnelSlot {
    /// Resolves when the tunnel must close: the listener's drain timed out, or the
    /// listener is gone.
    pub(crate) async fn aborted(&mut self) {
        let _ = self.stop.wait_for(|s| *s >= Stop::Abort).await;
    }
}
