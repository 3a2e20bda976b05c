//! The pure translations between HTTP messages and NATS messages, one module per wire
//! format a route can name with `codec = "…"`:
//! - [`raw`] (the default, re-exported here): header mapping in both directions, the reply
//!   → response status rules, and the tunnel envelope.
//! - [`nestjs`]: the `@nestjs/microservices` NATS transport's JSON packets.
//! - [`cloudevents`]: CloudEvents 1.0, binary mode on NATS and HTTP, structured mode read.
//!
//! No I/O here, so every rule is unit-tested and fuzzed directly.

pub mod cloudevents;
pub mod nestjs;
mod raw;

pub use raw::*;
