//! Contracts at the ingress border: a message is checked against its route's `schema` /
//! `schemas` before the app sees it. A refusal is counted
//! (`natsbridge_contract_violations_total{direction="ingress"}`) and logged at a rate
//! limit; the caller dead-letters it (jetstream) or answers it (request).

use http::{HeaderMap, HeaderValue};

use super::Route;
use crate::contract::{Refusal, BRIDGE_SCHEMA};
use crate::metrics::Metrics;

/// The contract version a message was checked against (`None`: the route has no contract),
/// or why it is refused. `named` is the version the message names, when it names one.
pub(crate) fn check(route: &Route, metrics: &Metrics, named: Option<&str>, body: &[u8]) -> Result<Option<String>, Refusal> {
    let Some(contracts) = &route.inbound.schema else { return Ok(None) };
    match contracts.check(named, body) {
        Ok(c) => Ok(Some(c.id.clone())),
        Err(r) => {
            metrics.contract_violations.with_label_values(&[&route.inbound.name, "ingress", r.reason()]).inc();
            if let Some(suppressed) = route.refusals.check() {
                tracing::warn!(route = %route.inbound.name, reason = r.reason(), detail = %r.detail(), suppressed, "message refused by its contract; the app was not called");
            }
            Err(r)
        }
    }
}

/// The version a NATS message names: its `Bridge-Schema` header.
pub(crate) fn named(headers: Option<&async_nats::HeaderMap>) -> Option<&str> {
    headers.and_then(|h| h.get(BRIDGE_SCHEMA)).map(|v| v.as_str())
}

/// Tells the app which version the body satisfies (replacing whatever the publisher wrote).
pub(crate) fn tell_app(headers: &mut HeaderMap, checked: Option<&str>) {
    if let Some(v) = checked.and_then(|id| HeaderValue::from_str(id).ok()) {
        headers.insert(BRIDGE_SCHEMA, v);
    }
}
