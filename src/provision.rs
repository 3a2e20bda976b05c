//! JetStream provisioning: the stream, dead-letter stream, KV bucket and consumer
//! configurations derived from the routing file, and creating or checking them.

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};

use crate::config::{Consumer, Inbound};

/// The durable pull consumer an inbound JetStream route binds to.
pub fn consumer_config(route: &Inbound, c: &Consumer) -> pull::Config {
    pull::Config {
        durable_name: Some(c.durable.clone()),
        description: Some(format!("natsbridge inbound route {}", route.name)),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: c.ack_wait,
        max_deliver: c.max_deliver,
        // The server applies `backoff` to redeliveries after ack timeouts too.
        backoff: c.backoff.clone(),
        filter_subject: route.subject.as_str().to_owned(),
        max_ack_pending: c.max_ack_pending,
        ..Default::default()
    }
}
