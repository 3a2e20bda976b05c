//! Everything that talks to the NATS server itself, below routes and HTTP. Calls only
//! `config` (connection settings), `health` and `metrics` (to report the connection).
//! - [`connection`]: the connection, its auth, TLS, reconnects and events.
//! - [`publish`]: the one acknowledged JetStream publish (deadline, leader-election retry).
//! - [`replies`]: our reply multiplexer (one inbox subscription, a waiter per request).

pub mod connection;
pub mod publish;
pub mod replies;
