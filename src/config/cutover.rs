//! The validated `cutover` of an outbound route: the HTTP `upstream` a NATS route
//! replaces, and how calls are shared between the two while the route moves over.

/// A NATS route's cut-over from the HTTP `upstream` it replaces (`cutover = { … }`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cutover {
    /// The HTTP service the route used to call: the path taken by the calls that do not
    /// go over NATS, and by fallbacks.
    pub upstream: http::Uri,
    /// The share of calls (0–100) carried over NATS; the rest go to `upstream`.
    pub nats_percent: u8,
    /// What keeps one caller on one path; `None`: each call is drawn on its own.
    pub sticky: Option<Sticky>,
    /// Calls answered over HTTP are also sent over NATS (`Bridge-Shadow: true`) and the
    /// two answers compared.
    pub shadow: bool,
    /// Shadow methods that are not safe and idempotent too (POST, PATCH).
    pub shadow_unsafe: bool,
    /// A call whose NATS path failed before any responder got it goes to `upstream` once.
    pub fallback: bool,
}

/// The key a sticky split hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sticky {
    /// `header:X-Workflow-Id`: calls with the same value take the same path.
    Header(http::HeaderName),
}

impl Cutover {
    /// Whether a call with this method may be shadowed (RFC 9110 §9.2: safe or
    /// idempotent methods only, unless `shadow_unsafe`).
    pub fn shadows(&self, method: &http::Method) -> bool {
        use http::Method as M;
        let idempotent = matches!(*method, M::GET | M::HEAD | M::OPTIONS | M::TRACE | M::PUT | M::DELETE);
        self.shadow && (idempotent || self.shadow_unsafe)
    }
}
