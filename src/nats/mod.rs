//! Everything that talks to the NATS server itself, below routes and HTTP.
//! - [`connection`]: the connection, its auth, TLS, reconnects and events.

pub mod connection;
