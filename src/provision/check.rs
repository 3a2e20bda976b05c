//! What `run` needs and cannot create itself, checked against the server: the gate behind
//! readiness when `sidecar.provision` is off (and after provisioning when it is on).

use std::collections::BTreeMap;
use std::fmt;

use async_nats::jetstream;

use super::plan::read_stream;
use super::spec::{async_routes, jetstream_routes, kv_stream_name, OPERATIONS_BUCKET};
use super::{Kind, ProvisionError};
use crate::config::{Config, OutboundTarget};
use crate::health::Component;

/// Something `run` needs that does not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub kind: Kind,
    /// The stream or bucket name; the subject for [`Kind::SubjectCapture`].
    pub name: String,
    /// The routes that need it.
    pub needed_by: Vec<String>,
}

impl Missing {
    /// The component it marks down: `provision:<kind>:<name>`.
    pub fn component(&self) -> Component {
        Component::resource(self.kind.key(), &self.name)
    }
}

impl Missing {
    /// What is missing and who needs it, without the hint on how to create it.
    pub fn what(&self) -> String {
        let routes = self.needed_by.iter().map(|r| format!("{r:?}")).collect::<Vec<_>>().join(", ");
        let by = if self.needed_by.len() == 1 { "route" } else { "routes" };
        match self.kind {
            Kind::SubjectCapture => format!("no stream captures subject {:?} (needed by {by} {routes})", self.name),
            Kind::KvBucket => {
                let what = if self.name == OPERATIONS_BUCKET { "async operations (async = true)" } else { "idempotency" };
                format!("kv bucket {:?} does not exist (needed by {by} {routes} for {what})", self.name)
            }
            kind => format!("{kind} {:?} does not exist (needed by {by} {routes})", self.name),
        }
    }
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}; run `natsbridge provision` or set [sidecar] provision = true", self.what())
    }
}

/// What `run` needs and cannot create itself: the streams of the inbound jetstream routes,
/// a stream capturing each outbound jetstream subject, the dead-letter stream, and the
/// idempotency bucket when a route uses it, and the operations bucket for `async = true`
/// routes (routes that only honour `Prefer: respond-async` answer synchronously without
/// it, so its absence never fails them). Consumers are left out: ingress creates them.
pub async fn check(js: &jetstream::Context, config: &Config) -> Result<Vec<Missing>, ProvisionError> {
    let mut needs: BTreeMap<(Kind, String), Vec<String>> = BTreeMap::new();
    for (route, c) in jetstream_routes(config) {
        needs.entry((Kind::Stream, c.stream.clone())).or_default().push(route.name.clone());
        needs.entry((Kind::DeadLetterStream, config.dead_letter.stream.clone())).or_default().push(route.name.clone());
    }
    for route in config.inbound.iter().filter(|i| i.idempotency.is_some()) {
        needs.entry((Kind::KvBucket, config.idempotency.bucket.clone())).or_default().push(route.name.clone());
    }
    for (route, _) in async_routes(config).filter(|(_, always)| *always) {
        needs.entry((Kind::KvBucket, OPERATIONS_BUCKET.to_owned())).or_default().push(route.name.clone());
    }
    for o in &config.outbound {
        if let OutboundTarget::JetStream(t) = &o.target {
            needs.entry((Kind::SubjectCapture, t.probe())).or_default().push(o.name.clone());
        }
    }
    let mut missing = Vec::new();
    for ((kind, name), needed_by) in needs {
        let exists = match kind {
            Kind::SubjectCapture => {
                use jetstream::context::GetStreamByNameErrorKind as K;
                match js.stream_by_subject(name.clone()).await {
                    Ok(_) => true,
                    Err(e) if e.kind() == K::NotFound => false,
                    Err(e) => return Err(ProvisionError::Read { kind, name, source: Box::new(e) }),
                }
            }
            Kind::KvBucket => read_stream(js, kind, &kv_stream_name(&name)).await?.is_some(),
            _ => read_stream(js, kind, &name).await?.is_some(),
        };
        if !exists {
            missing.push(Missing { kind, name, needed_by });
        }
    }
    Ok(missing)
}
