//! The component registry: each part of the sidecar (the NATS connection, the egress
//! listener, provisioning, each inbound route, the idempotency store) reports its state
//! here, and the admin endpoints read it: `/statusz` lists every component, `/readyz`
//! decides readiness from it. Its own module so that components and the HTTP endpoint
//! depend on it, never on each other.
//!
//! Readiness has two meanings (`[sidecar] readiness`):
//! - `serving` (the default): ready once the egress listener serves and the first NATS
//!   connection attempt has finished, whatever its outcome, until draining. Kubernetes takes
//!   a native sidecar's readiness as the pod's, so tying it to NATS would pull every pod out
//!   of its Services during a NATS outage, HTTP routes that never touch NATS included.
//! - `strict`: ready only while every component is up (for consume-only pods whose rollouts
//!   should wait for their consumers).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

use crate::config::ReadinessMode;

/// A component's name: one home for every name `/statusz`, `/readyz` and the
/// `natsbridge_component_up` gauge show.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Component(Cow<'static, str>);

impl Component {
    /// The NATS connection.
    pub const NATS: Component = Component(Cow::Borrowed("nats"));
    /// The egress HTTP listener.
    pub const EGRESS: Component = Component(Cow::Borrowed("egress"));
    /// The first check (or provisioning) of streams, consumers and buckets.
    pub const PROVISION: Component = Component(Cow::Borrowed("provision"));
    /// The app, when `[sidecar] app_health_path` is set: down pauses inbound routes.
    pub const APP: Component = Component(Cow::Borrowed("app"));
    /// The idempotency store (a KV bucket).
    pub const IDEMPOTENCY: Component = Component(Cow::Borrowed("idempotency"));

    /// An inbound route's subscription or consumer: `inbound:<route>`.
    pub fn inbound(route: &str) -> Self {
        Self(Cow::Owned(format!("inbound:{route}")))
    }

    /// A JetStream resource a route needs: `provision:<kind>:<name>`.
    pub fn resource(kind: &str, name: &str) -> Self {
        Self(Cow::Owned(format!("provision:{kind}:{name}")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Not yet tried (binding, first check, first connection attempt).
    Starting,
    Up,
    Down,
}

/// One component's state, why, and since when (the last change of state).
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub state: State,
    pub reason: String,
    #[serde(serialize_with = "rfc3339")]
    pub since: SystemTime,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

/// The registry. Callers only say `starting`, `fail` or `pass`; it keeps the since-when.
#[derive(Debug, Default)]
pub struct Readiness {
    components: Mutex<BTreeMap<Component, Status>>,
    draining: AtomicBool,
}

impl Readiness {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn set(&self, c: &Component, state: State, reason: String) {
        let mut all = self.components.lock().unwrap_or_else(|e| e.into_inner());
        match all.get_mut(c) {
            // Same state, new words: the since-when is the state's, not the reason's.
            Some(s) if s.state == state => s.reason = reason,
            _ => {
                all.insert(c.clone(), Status { state, reason, since: SystemTime::now() });
            }
        }
    }

    /// Marks `c` as not tried yet, saying what it waits for.
    pub fn starting(&self, c: &Component, why: impl Into<String>) {
        self.set(c, State::Starting, why.into());
    }

    /// Marks `c` as down, saying why.
    pub fn fail(&self, c: &Component, why: impl Into<String>) {
        self.set(c, State::Down, why.into());
    }

    /// Marks `c` as down unless it has already reported: bounds a first attempt whose
    /// outcome never arrived.
    pub fn fail_if_starting(&self, c: &Component, why: impl Into<String>) {
        if self.state(c) == Some(State::Starting) {
            self.fail(c, why);
        }
    }

    /// Marks `c` as up but degraded: it serves (readiness counts it as up) while
    /// something about it needs an operator, which `why` says.
    pub fn degraded(&self, c: &Component, why: impl Into<String>) {
        self.set(c, State::Up, why.into());
    }

    pub fn pass(&self, c: &Component) {
        self.set(c, State::Up, "ok".into());
    }

    /// Forgets `c` (a resource no route needs any more).
    pub fn remove(&self, c: &Component) {
        self.components.lock().unwrap_or_else(|e| e.into_inner()).remove(c);
    }

    pub fn state(&self, c: &Component) -> Option<State> {
        self.components.lock().unwrap_or_else(|e| e.into_inner()).get(c).map(|s| s.state)
    }

    /// From now on not ready, whatever the mode: shutdown has begun.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.fail(&Component::EGRESS, "draining");
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Every component and its status.
    pub fn snapshot(&self) -> BTreeMap<Component, Status> {
        self.components.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The components that are not up, and why.
    pub fn failing(&self) -> BTreeMap<String, String> {
        let all = self.components.lock().unwrap_or_else(|e| e.into_inner());
        all.iter().filter(|(_, s)| s.state != State::Up).map(|(c, s)| (c.to_string(), s.reason.clone())).collect()
    }

    /// Ready under `mode`, or what keeps it from being so.
    pub fn ready(&self, mode: ReadinessMode) -> Result<(), BTreeMap<String, String>> {
        if self.draining() {
            return Err(BTreeMap::from([("shutdown".to_owned(), "draining".to_owned())]));
        }
        let all = self.snapshot();
        // Egress and NATS register at start: absent means not started yet.
        let mut blocking = BTreeMap::new();
        for c in [Component::EGRESS, Component::NATS] {
            if !all.contains_key(&c) {
                blocking.insert(c.to_string(), "not started".to_owned());
            }
        }
        for (c, s) in &all {
            let blocks = match mode {
                ReadinessMode::Strict => s.state != State::Up,
                // Only what "can serve" needs: egress serving and the first NATS attempt over.
                ReadinessMode::Serving => {
                    (*c == Component::EGRESS && s.state != State::Up) || (*c == Component::NATS && s.state == State::Starting)
                }
            };
            if blocks {
                blocking.insert(c.to_string(), s.reason.clone());
            }
        }
        if blocking.is_empty() {
            Ok(())
        } else {
            Err(blocking)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started() -> Arc<Readiness> {
        let r = Readiness::new();
        r.starting(&Component::NATS, "connecting");
        r.starting(&Component::EGRESS, "binding");
        r
    }

    #[test]
    fn serving_waits_for_egress_and_the_first_nats_attempt_only() {
        let r = started();
        r.starting(&Component::inbound("orders"), "not bound yet");
        assert!(r.ready(ReadinessMode::Serving).is_err());
        r.pass(&Component::EGRESS);
        assert!(r.ready(ReadinessMode::Serving).unwrap_err().contains_key("nats"));
        r.fail(&Component::NATS, "connection refused");
        assert_eq!(r.ready(ReadinessMode::Serving), Ok(()));
        r.fail(&Component::inbound("orders"), "stream not found");
        assert_eq!(r.ready(ReadinessMode::Serving), Ok(()));
        let strict = r.ready(ReadinessMode::Strict).unwrap_err();
        assert_eq!(strict.keys().collect::<Vec<_>>(), ["inbound:orders", "nats"]);
        r.drain();
        assert!(r.ready(ReadinessMode::Serving).unwrap_err().contains_key("shutdown"));
    }

    #[test]
    fn since_changes_with_the_state_not_the_reason() {
        let r = started();
        r.fail(&Component::NATS, "a");
        let first = r.snapshot()[&Component::NATS].since;
        r.fail(&Component::NATS, "b");
        let s = &r.snapshot()[&Component::NATS];
        assert_eq!((s.since, s.reason.as_str(), s.state), (first, "b", State::Down));
        r.pass(&Component::NATS);
        let s = &r.snapshot()[&Component::NATS];
        assert!(s.since >= first && s.state == State::Up);
    }
}
