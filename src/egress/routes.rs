//! The egress routes, in three layers, innermost first:
//! - [`RouteTable`]: a radix tree per host (matchit) that finds the outbound route for a
//!   method, host and path in time independent of the number of routes;
//! - [`Routing`]: a config together with its route table, what a reload builds;
//! - [`Table`]: the routing in force with each route's metric handles, what the listener
//!   loads once per request and a reload swaps whole.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{strip_port, Config, Outbound};
use crate::metrics::{EgressRouteMetrics, Metrics};

/// One path pattern's routes, distinguished by method (`None` = any method).
#[derive(Debug, Default)]
struct Candidates(Vec<(Option<http::Method>, usize)>);

/// The immutable lookup structure built from a validated config.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Outbound>,
    by_host: HashMap<String, matchit::Router<Candidates>>,
    any_host: matchit::Router<Candidates>,
}

/// A matched route and its raw (still percent-encoded) path captures.
#[derive(Debug)]
pub struct Match<'t, 'p> {
    pub route: &'t Outbound,
    /// The route's position in [`RouteTable::routes`], for per-route state.
    pub index: usize,
    pub params: matchit::Params<'t, 'p>,
}

/// Why no route was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Miss {
    NotFound,
    /// The path matched, but not the method: the allowed methods.
    MethodNotAllowed(Vec<http::Method>),
}

impl RouteTable {
    /// Builds the table. The config was validated, so insertion cannot conflict.
    pub fn new(config: &Config) -> Self {
        Self::from_routes(config.outbound.clone())
    }

    pub fn from_routes(routes: Vec<Outbound>) -> Self {
        let mut grouped: HashMap<(Option<String>, String), Vec<usize>> = HashMap::new();
        let mut order = Vec::new();
        for (idx, r) in routes.iter().enumerate() {
            let key = (r.host.clone(), r.path.clone());
            if !grouped.contains_key(&key) {
                order.push(key.clone());
            }
            grouped.entry(key).or_default().push(idx);
        }
        let mut by_host: HashMap<String, matchit::Router<Candidates>> = HashMap::new();
        let mut any_host = matchit::Router::new();
        for key in order {
            let idxs = grouped.remove(&key).unwrap_or_default();
            let mut c = Candidates(idxs.iter().map(|&i| (routes[i].method.clone(), i)).collect());
            // Specific methods are tried before the route that takes any method.
            c.0.sort_by_key(|(m, _)| m.is_none());
            let router = match &key.0 {
                Some(h) => by_host.entry(h.clone()).or_default(),
                None => &mut any_host,
            };
            if let Err(e) = router.insert(key.1.as_str(), c) {
                tracing::error!(path = %key.1, error = %e, "route rejected by the router; validation should have caught this");
            }
        }
        Self { routes, by_host, any_host }
    }

    pub fn routes(&self) -> &[Outbound] {
        &self.routes
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Finds the route for a request. `host` may carry a port; it is ignored.
    pub fn lookup<'t, 'p>(&'t self, method: &http::Method, host: Option<&str>, path: &'p str) -> Result<Match<'t, 'p>, Miss> {
        let mut allowed = Vec::new();
        if let Some(host) = host {
            let host = strip_port(host);
            // Host names are case-insensitive; avoid allocating when already lower-case.
            let router = if host.bytes().any(|b| b.is_ascii_uppercase()) {
                self.by_host.get(&host.to_ascii_lowercase())
            } else {
                self.by_host.get(host)
            };
            if let Some(m) = router.and_then(|r| self.pick(r, method, path, &mut allowed)) {
                return Ok(m);
            }
        }
        if let Some(m) = self.pick(&self.any_host, method, path, &mut allowed) {
            return Ok(m);
        }
        if allowed.is_empty() {
            Err(Miss::NotFound)
        } else {
            allowed.sort_by(|a: &http::Method, b| a.as_str().cmp(b.as_str()));
            allowed.dedup();
            Err(Miss::MethodNotAllowed(allowed))
        }
    }

    fn pick<'t, 'p>(
        &'t self,
        router: &'t matchit::Router<Candidates>,
        method: &http::Method,
        path: &'p str,
        allowed: &mut Vec<http::Method>,
    ) -> Option<Match<'t, 'p>> {
        let m = router.at(path).ok()?;
        for (want, idx) in &m.value.0 {
            match want {
                None => return Some(Match { route: &self.routes[*idx], index: *idx, params: m.params }),
                Some(w) if w == method => return Some(Match { route: &self.routes[*idx], index: *idx, params: m.params }),
                Some(w) => allowed.push(w.clone()),
            }
        }
        None
    }
}

/// A config together with its route table: the unit that hot reload swaps.
#[derive(Debug)]
pub struct Routing {
    pub config: Arc<Config>,
    pub table: RouteTable,
}

impl Routing {
    pub fn new(config: Arc<Config>) -> Self {
        let table = RouteTable::new(&config);
        Self { config, table }
    }
}

/// The routing in force, with each route's metric handles (same order as its routes).
pub struct Table {
    pub routing: Routing,
    metrics: Vec<EgressRouteMetrics>,
}

impl Table {
    pub fn new(routing: Routing, metrics: &Metrics) -> Self {
        let per_route = routing.table.routes().iter().map(|r| metrics.egress_route(&r.name, r.mode().as_str())).collect();
        Self { routing, metrics: per_route }
    }

    pub fn config(&self) -> &Config {
        &self.routing.config
    }

    /// Finds the route for a request; see [`RouteTable::lookup`].
    pub fn lookup<'t, 'p>(&'t self, method: &http::Method, host: Option<&str>, path: &'p str) -> Result<Match<'t, 'p>, Miss> {
        self.routing.table.lookup(method, host, path)
    }

    /// Records one answered request of the route at `index` (from its [`Match`]).
    pub fn observe(&self, index: usize, status: http::StatusCode, elapsed: std::time::Duration) {
        self.metrics[index].observe(status, elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use http::Method;

    fn table(routes: &str) -> RouteTable {
        let src = format!("[sidecar]\nservice = \"s\"\n{routes}");
        RouteTable::new(&parse(&src, "t").unwrap())
    }

    const ROUTES: &str = r#"
[[outbound]]
name = "exec"
method = "POST"
host = "agent-service"
path = "/agents/{agent_id}/execute"
subject = "agent.{agent_id}.execution.requested"
mode = "request"

[[outbound]]
name = "exec-any-host"
method = "POST"
path = "/agents/{agent_id}/execute"
subject = "agents.{agent_id}"
mode = "publish"

[[outbound]]
name = "get-agent"
method = "GET"
path = "/agents/{agent_id}/execute"
subject = "agents.get"
mode = "request"

[[outbound]]
name = "catch-all"
host = "model-service"
path = "/{*rest}"
mode = "tunnel"
service = "model"
"#;

    #[test]
    fn host_routes_take_precedence() {
        let t = table(ROUTES);
        let m = t.lookup(&Method::POST, Some("agent-service:8080"), "/agents/7/execute").unwrap();
        assert_eq!(m.route.name, "exec");
        assert_eq!(m.params.get("agent_id"), Some("7"));
        let m = t.lookup(&Method::POST, Some("AGENT-SERVICE"), "/agents/7/execute").unwrap();
        assert_eq!(m.route.name, "exec");
        let m = t.lookup(&Method::POST, Some("localhost:4280"), "/agents/7/execute").unwrap();
        assert_eq!(m.route.name, "exec-any-host");
        let m = t.lookup(&Method::POST, None, "/agents/7/execute").unwrap();
        assert_eq!(m.route.name, "exec-any-host");
    }

    #[test]
    fn method_falls_back_to_hostless_then_reports_allowed() {
        let t = table(ROUTES);
        let m = t.lookup(&Method::GET, Some("agent-service"), "/agents/7/execute").unwrap();
        assert_eq!(m.route.name, "get-agent");
        let e = t.lookup(&Method::DELETE, None, "/agents/7/execute").unwrap_err();
        assert_eq!(e, Miss::MethodNotAllowed(vec![Method::GET, Method::POST]));
        assert_eq!(t.lookup(&Method::GET, None, "/nope").unwrap_err(), Miss::NotFound);
    }

    #[test]
    fn catch_all_captures_the_rest() {
        let t = table(ROUTES);
        let m = t.lookup(&Method::PUT, Some("model-service"), "/v1/keys/9").unwrap();
        assert_eq!(m.route.name, "catch-all");
        assert_eq!(m.params.get("rest"), Some("v1/keys/9"));
    }
}
