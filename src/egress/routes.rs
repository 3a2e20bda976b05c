//! The egress routes, in three layers, innermost first:
//! - [`RouteTable`]: a radix tree per host (matchit) that finds the outbound route for a
//!   method, host and path in time independent of the number of routes;
//! - [`Routing`]: a config together with its route table, what a reload builds;
//! - [`Table`]: the routing in force with each route's metric handles, what the listener
//!   loads once per request and a reload swaps whole.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{strip_port, Config, Outbound};
use crate::metrics::{EgressPath, EgressRouteMetrics, Metrics};

/// One path pattern's routes, distinguished by method (`None` = any method).
#[derive(Debug, Default)]
struct Candidates(Vec<(Option<http::Method>, usize)>);

/// One path pattern of a host: a matcher for that pattern alone (a catch-all one also
/// matches its bare prefix: `/{*rest}` takes `/`), and its routes.
#[derive(Debug)]
struct Pattern {
    matcher: matchit::Router<()>,
    candidates: Candidates,
}

/// The routes of one host (or of no host): one radix tree over all its patterns for the
/// usual case, where the most specific match fits; its patterns, most specific first,
/// for falling through when that match's methods do not fit.
#[derive(Debug, Default)]
struct HostRoutes {
    /// Path → index in `patterns`.
    router: matchit::Router<usize>,
    patterns: Vec<Pattern>,
}

/// The immutable lookup structure built from a validated config.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Outbound>,
    by_host: HashMap<String, HostRoutes>,
    any_host: HostRoutes,
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

/// How specific a path pattern is, segment by segment (matchit's priority: a literal
/// segment, then a parameter, then a catch-all); more specific sorts greater.
fn specificity(path: &str) -> Vec<u8> {
    path.split('/')
        .map(|seg| {
            if seg.starts_with("{*") {
                0
            } else if seg.contains('{') {
                1
            } else {
                2
            }
        })
        .collect()
}

/// The bare prefix a trailing catch-all also covers (`/a/{*rest}` → `/a/`), if any.
fn catch_all_prefix(path: &str) -> Option<&str> {
    let at = path.rfind("/{*")?;
    path[at..].ends_with('}').then(|| &path[..=at])
}

impl HostRoutes {
    fn insert(&mut self, path: &str, candidates: Candidates) {
        let mut matcher = matchit::Router::new();
        if let Err(e) = matcher.insert(path, ()).and_then(|_| self.router.insert(path, self.patterns.len())) {
            tracing::error!(%path, error = %e, "route rejected by the router; validation should have caught this");
            return;
        }
        if let Some(prefix) = catch_all_prefix(path) {
            let _ = matcher.insert(prefix, ());
        }
        self.patterns.push(Pattern { matcher, candidates });
    }

    /// After every pattern is in: catch-alls take their bare prefix where no route
    /// names it, and the fall-through order is fixed, most specific first.
    fn finish(&mut self, paths: &[String]) {
        let mut order: Vec<usize> = (0..self.patterns.len()).collect();
        order.sort_by(|&a, &b| specificity(&paths[b]).cmp(&specificity(&paths[a])));
        // Remap the router's values to the sorted positions.
        let mut position = vec![0; order.len()];
        for (pos, &i) in order.iter().enumerate() {
            position[i] = pos;
        }
        let mut router = matchit::Router::new();
        for (i, path) in paths.iter().enumerate() {
            let _ = router.insert(path.as_str(), position[i]);
        }
        for (i, path) in paths.iter().enumerate() {
            if let Some(prefix) = catch_all_prefix(path) {
                // An explicit route for the prefix wins: the insert then fails, quietly.
                let _ = router.insert(prefix, position[i]);
            }
        }
        self.router = router;
        let mut patterns: Vec<Option<Pattern>> = std::mem::take(&mut self.patterns).into_iter().map(Some).collect();
        self.patterns = order.iter().filter_map(|&i| patterns[i].take()).collect();
    }
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
        let mut by_host: HashMap<String, HostRoutes> = HashMap::new();
        let mut any_host = HostRoutes::default();
        let mut paths: HashMap<Option<String>, Vec<String>> = HashMap::new();
        for key in order {
            let idxs = grouped.remove(&key).unwrap_or_default();
            let mut c = Candidates(idxs.iter().map(|&i| (routes[i].method.clone(), i)).collect());
            // Specific methods are tried before the route that takes any method.
            c.0.sort_by_key(|(m, _)| m.is_none());
            let host = match &key.0 {
                Some(h) => by_host.entry(h.clone()).or_default(),
                None => &mut any_host,
            };
            let before = host.patterns.len();
            host.insert(&key.1, c);
            if host.patterns.len() > before {
                paths.entry(key.0.clone()).or_default().push(key.1);
            }
        }
        for (host, paths) in &paths {
            match host {
                Some(h) => by_host.get_mut(h).expect("inserted above").finish(paths),
                None => any_host.finish(paths),
            }
        }
        Self { routes, by_host, any_host }
    }

    pub fn routes(&self) -> &[Outbound] {
        &self.routes
    }

    /// Whether some route names `host` (without port) explicitly.
    pub fn has_host(&self, host: &str) -> bool {
        self.by_host.contains_key(&host.to_ascii_lowercase())
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Finds the route for a request. `host` may carry a port; it is ignored. The most
    /// specific match of the request's host wins; when its methods do not fit, the next
    /// matching pattern of that host is tried (a specific route, then its catch-all),
    /// then the routes without a host. `HEAD` is served by a `GET` route.
    pub fn lookup<'t, 'p>(&'t self, method: &http::Method, host: Option<&str>, path: &'p str) -> Result<Match<'t, 'p>, Miss> {
        let mut allowed = Vec::new();
        if let Some(host) = host {
            let host = strip_port(host);
            // Host names are case-insensitive; avoid allocating when already lower-case.
            let routes = if host.bytes().any(|b| b.is_ascii_uppercase()) {
                self.by_host.get(&host.to_ascii_lowercase())
            } else {
                self.by_host.get(host)
            };
            if let Some(m) = routes.and_then(|r| self.pick(r, method, path, &mut allowed)) {
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
        routes: &'t HostRoutes,
        method: &http::Method,
        path: &'p str,
        allowed: &mut Vec<http::Method>,
    ) -> Option<Match<'t, 'p>> {
        let first = routes.router.at(path).ok()?;
        if let Some(idx) = self.fit(&routes.patterns[*first.value].candidates, method, allowed) {
            return Some(Match { route: &self.routes[idx], index: idx, params: first.params });
        }
        // Fall through: the other patterns that match, most specific first. Only on
        // this path (a method mismatch) is the cost linear in the host's patterns.
        for (i, p) in routes.patterns.iter().enumerate() {
            if i == *first.value {
                continue;
            }
            let Ok(m) = p.matcher.at(path) else { continue };
            if let Some(idx) = self.fit(&p.candidates, method, allowed) {
                return Some(Match { route: &self.routes[idx], index: idx, params: m.params });
            }
        }
        None
    }

    /// The route among one pattern's candidates that takes `method`, else the methods
    /// they take (into `allowed`). `HEAD` is answered by a `GET` route when no route
    /// names `HEAD` (hyper sends no body for it).
    fn fit(&self, candidates: &Candidates, method: &http::Method, allowed: &mut Vec<http::Method>) -> Option<usize> {
        let mut get_for_head = None;
        for (want, idx) in &candidates.0 {
            match want {
                None => return get_for_head.or(Some(*idx)),
                Some(w) if w == method => return Some(*idx),
                Some(w) if method == http::Method::HEAD && w == http::Method::GET => get_for_head = Some(*idx),
                Some(w) => allowed.push(w.clone()),
            }
        }
        if get_for_head.is_none() && candidates.0.iter().any(|(w, _)| w.as_ref() == Some(&http::Method::GET)) {
            allowed.push(http::Method::HEAD);
        }
        get_for_head
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
        let per_route = routing
            .table
            .routes()
            .iter()
            .map(|r| {
                let path = if r.mode() == crate::config::OutboundMode::Http { EgressPath::Http } else { EgressPath::Nats };
                metrics.egress_route(&r.name, r.mode().as_str(), path, r.cutover.is_some())
            })
            .collect();
        Self { routing, metrics: per_route }
    }

    pub fn config(&self) -> &Config {
        &self.routing.config
    }

    /// Finds the route for a request; see [`RouteTable::lookup`].
    pub fn lookup<'t, 'p>(&'t self, method: &http::Method, host: Option<&str>, path: &'p str) -> Result<Match<'t, 'p>, Miss> {
        self.routing.table.lookup(method, host, path)
    }

    /// Whether some route names `host` (without port) explicitly.
    pub fn has_host(&self, host: &str) -> bool {
        self.routing.table.has_host(host)
    }

    /// Records one answered request of the route at `index` (from its [`Match`]).
    pub fn observe(&self, index: usize, status: http::StatusCode, elapsed: std::time::Duration) {
        self.metrics[index].observe(status, elapsed.as_secs_f64());
    }

    /// As [`Table::observe`], for a call that went by `path` (a cut-over route's).
    pub fn observe_on(&self, index: usize, path: EgressPath, status: http::StatusCode, elapsed: std::time::Duration) {
        self.metrics[index].observe_on(path, status, elapsed.as_secs_f64());
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
        // A GET route serves HEAD too, so `Allow` names it.
        assert_eq!(e, Miss::MethodNotAllowed(vec![Method::GET, Method::HEAD, Method::POST]));
        assert_eq!(t.lookup(&Method::GET, None, "/nope").unwrap_err(), Miss::NotFound);
    }

    #[test]
    fn catch_all_captures_the_rest() {
        let t = table(ROUTES);
        let m = t.lookup(&Method::PUT, Some("model-service"), "/v1/keys/9").unwrap();
        assert_eq!(m.route.name, "catch-all");
        assert_eq!(m.params.get("rest"), Some("v1/keys/9"));
    }

    /// Issue 21: one moved call plus a catch-all for the rest of the same host.
    const MIGRATION: &str = r#"
[[outbound]]
name = "key"
method = "POST"
host = "model-service"
path = "/v1/keys/{id}"
subject = "model.key.{id}"
mode = "request"

[[outbound]]
name = "key-get"
method = "GET"
host = "model-service"
path = "/v1/keys/{id}/meta"
subject = "model.meta.{id}"
mode = "request"

[[outbound]]
name = "rest"
host = "model-service"
path = "/{*rest}"
mode = "http"
upstream = "http://127.0.0.1:1"
"#;

    #[test]
    fn a_method_mismatch_falls_through_to_the_catch_all() {
        let t = table(MIGRATION);
        let h = Some("model-service");
        assert_eq!(t.lookup(&Method::POST, h, "/v1/keys/9").unwrap().route.name, "key");
        let m = t.lookup(&Method::GET, h, "/v1/keys/9").unwrap();
        assert_eq!(m.route.name, "rest");
        assert_eq!(m.params.get("rest"), Some("v1/keys/9"));
        assert_eq!(t.lookup(&Method::DELETE, h, "/v1/keys/9/meta").unwrap().route.name, "rest");
    }

    #[test]
    fn a_catch_all_covers_its_bare_prefix() {
        let t = table(MIGRATION);
        let m = t.lookup(&Method::GET, Some("model-service"), "/").unwrap();
        assert_eq!(m.route.name, "rest");
        assert_eq!(m.params.get("rest"), None);
        let t = table(ROUTES);
        assert_eq!(t.lookup(&Method::GET, Some("model-service"), "/").unwrap().route.name, "catch-all");
    }

    #[test]
    fn head_is_served_by_get_routes() {
        let t = table(MIGRATION);
        assert_eq!(t.lookup(&Method::HEAD, Some("model-service"), "/v1/keys/9/meta").unwrap().route.name, "key-get");
        let t = table(ROUTES);
        assert_eq!(t.lookup(&Method::HEAD, None, "/agents/1/execute").unwrap().route.name, "get-agent");
        assert_eq!(t.lookup(&Method::HEAD, None, "/nope").unwrap_err(), Miss::NotFound);
    }
}
