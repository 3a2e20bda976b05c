//! Readiness: the named conditions that components (the NATS connection, provisioning,
//! ingress, the idempotency store) report, and that the admin endpoints read. Its own module
//! so that components and the HTTP endpoint depend on it, never on each other.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Named readiness conditions that other components set; ready when none is failing.
#[derive(Debug, Default)]
pub struct Readiness {
    failing: Mutex<BTreeMap<String, String>>,
}

impl Readiness {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Marks `check` as not ready, saying why (shown by `/readyz`).
    pub fn fail(&self, check: impl Into<String>, why: impl Into<String>) {
        self.failing.lock().unwrap_or_else(|e| e.into_inner()).insert(check.into(), why.into());
    }

    pub fn pass(&self, check: &str) {
        self.failing.lock().unwrap_or_else(|e| e.into_inner()).remove(check);
    }

    /// The failing checks and their reasons.
    pub fn failing(&self) -> BTreeMap<String, String> {
        self.failing.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
