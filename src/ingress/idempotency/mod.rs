//! Consumer-side idempotency: a handler runs at most once per key.
//! - [`keys`]: where a message's key comes from and the KV key it is stored under (pure).
//! - [`store`]: the shared JetStream KV store of claims and stored results (pure records and
//!   compare-and-set operations; knows nothing of routes or HTTP).
//! - [`guard`]: one route's use of the store around an app call (claim, refresh, finish).

pub mod guard;
pub mod keys;
pub mod store;
