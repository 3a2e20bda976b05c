//! The `[sidecar]` and `[nats]` sections.

use std::net::SocketAddr;
use std::time::Duration;

use super::{duration, size};
use crate::config::diagnostics::{Diagnostics, Table, TableStart};
use crate::config::raw::{RawNats, RawSidecar, RawTls};
use crate::config::values::{parse_http_url, parse_server_url, redact_userinfo};
use crate::config::{
    Forward, HttpLimits, Nats, NatsAuth, NatsTls, ReadinessMode, Secret, Sidecar, Unmatched, DEFAULT_ADMIN_LISTEN, DEFAULT_APP_URL,
    DEFAULT_LISTEN, DEFAULT_NATS_URL, DEFAULT_REPLY_PREFIX, DEFAULT_WORKER_THREADS,
};
use crate::subject;

pub(super) fn sidecar(raw: RawSidecar, start: TableStart, diags: &mut Diagnostics<'_>) -> Sidecar {
    let at = start.unnamed();
    if !subject::is_valid_token(&raw.service) {
        diags.error(at, Some("service"), format!("`service` {:?} must be one subject token: no '.', '*', '>' or spaces", raw.service));
    }
    let listen = socket_addr(at, "listen", &raw.listen, DEFAULT_LISTEN, diags);
    let admin_listen = socket_addr(at, "admin_listen", &raw.admin_listen, DEFAULT_ADMIN_LISTEN, diags);
    let app_url = parse_http_url(raw.app_url.as_deref().unwrap_or(DEFAULT_APP_URL)).unwrap_or_else(|e| {
        diags.error(at, Some("app_url"), format!("`app_url`: {e}"));
        http::Uri::from_static(DEFAULT_APP_URL)
    });
    let http = http_limits(&raw, at, diags);
    let readiness = readiness_mode(at, raw.readiness.as_deref(), diags);
    let reply_prefixes = reply_prefixes(at, &raw.reply_prefixes, diags).unwrap_or_else(|| vec![DEFAULT_REPLY_PREFIX.to_owned()]);
    let forward = forward(&raw, at, diags);
    let version = raw.version.unwrap_or_else(|| DEFAULT_VERSION.to_owned());
    if !is_semver(&version) {
        diags.error(
            at,
            Some("version"),
            format!("`version` {version:?} must be a SemVer version like \"1.4.0\" (NATS micro requires one)"),
        );
    }
    Sidecar {
        version,
        service: raw.service,
        listen,
        admin_listen,
        app_url,
        drain_timeout: duration(at, "drain_timeout", &raw.drain_timeout, Duration::from_secs(30), diags),
        provision: raw.provision,
        max_inflight_publishes: raw.max_inflight_publishes.unwrap_or(4096).max(1),
        worker_threads: worker_threads(at, raw.worker_threads, diags),
        http,
        reply_prefixes,
        readiness,
        app_health_path: app_health_path(at, raw.app_health_path, diags),
        forward,
    }
}

/// `[sidecar] version` when absent.
const DEFAULT_VERSION: &str = "0.0.0";

/// SemVer 2.0: `MAJOR.MINOR.PATCH`, numbers without leading zeros, then an optional
/// `-pre.release` and `+build` of dot-separated `[0-9A-Za-z-]` identifiers.
fn is_semver(v: &str) -> bool {
    let (rest, build) = v.split_once('+').map_or((v, None), |(a, b)| (a, Some(b)));
    let (core, pre) = rest.split_once('-').map_or((rest, None), |(a, b)| (a, Some(b)));
    let number = |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && (n == "0" || !n.starts_with('0'));
    let idents = |s: &str| s.split('.').all(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3 && parts.iter().all(|p| number(p)) && pre.is_none_or(idents) && build.is_none_or(idents)
}

/// `worker_threads`: 1 to 64 (one sidecar serves one pod; more threads cost wake-ups).
fn worker_threads(at: Table<'_>, value: Option<usize>, diags: &mut Diagnostics<'_>) -> usize {
    match value {
        None => DEFAULT_WORKER_THREADS,
        Some(n @ 1..=64) => n,
        Some(n) => {
            diags.error(at, Some("worker_threads"), format!("`worker_threads` {n} must be from 1 to 64"));
            DEFAULT_WORKER_THREADS
        }
    }
}

/// A path of the app's (`/healthz`), with an optional query: appended to `app_url`.
fn app_health_path(at: Table<'_>, value: Option<String>, diags: &mut Diagnostics<'_>) -> Option<String> {
    let path = value?;
    let valid =
        path.starts_with('/') && !path.starts_with("//") && path.parse::<http::uri::PathAndQuery>().is_ok_and(|p| p.as_str() == path);
    if !valid {
        diags.error(
            at,
            Some("app_health_path"),
            format!("`app_health_path` {path:?} must be a path of the app starting with '/', like \"/healthz\""),
        );
        return None;
    }
    Some(path)
}

/// `unmatched`, `connect_allow` and `forward_connect_timeout`: the forward proxy.
fn forward(raw: &RawSidecar, at: Table<'_>, diags: &mut Diagnostics<'_>) -> Forward {
    let unmatched = match raw.unmatched.as_deref() {
        None | Some("forward") => Unmatched::Forward,
        Some("reject") => Unmatched::Reject,
        Some(other) => {
            diags.error(at, Some("unmatched"), format!("`unmatched` {other:?} must be \"forward\" or \"reject\""));
            Unmatched::Forward
        }
    };
    for p in raw.connect_allow.iter().flatten() {
        // host:port, where either side may use `*`; a bare host would never match.
        let ok = p
            .rsplit_once(':')
            .is_some_and(|(h, port)| !h.is_empty() && (port == "*" || port.parse::<u16>().is_ok()) && !p.contains(char::is_whitespace));
        if !ok {
            diags.error(at, Some("connect_allow"), format!("`connect_allow`: {p:?} is not a host:port pattern like \"*.example.com:443\""));
        }
    }
    let connect_timeout = duration(at, "forward_connect_timeout", &raw.forward_connect_timeout, Duration::from_secs(10), diags);
    if connect_timeout.is_zero() {
        diags.error(at, Some("forward_connect_timeout"), "`forward_connect_timeout` must be more than zero");
    }
    Forward { unmatched, connect_allow: raw.connect_allow.clone(), connect_timeout }
}

fn readiness_mode(at: Table<'_>, value: Option<&str>, diags: &mut Diagnostics<'_>) -> ReadinessMode {
    match value {
        None | Some("serving") => ReadinessMode::Serving,
        Some("strict") => ReadinessMode::Strict,
        Some(other) => {
            diags.error(at, Some("readiness"), format!("`readiness` {other:?} must be \"serving\" or \"strict\""));
            ReadinessMode::Serving
        }
    }
}

/// `reply_prefixes` (of `[sidecar]` or a route), or `None` when absent. A prefix must not
/// start with `$`: replies there are NATS system and JetStream API requests.
pub(super) fn reply_prefixes(at: Table<'_>, value: &Option<Vec<String>>, diags: &mut Diagnostics<'_>) -> Option<Vec<String>> {
    let prefixes = value.as_ref()?;
    if prefixes.is_empty() {
        diags.error(at, Some("reply_prefixes"), "`reply_prefixes` must name at least one prefix (the default is \"_INBOX.\")");
    }
    for p in prefixes {
        let bad_char = p.chars().any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '>');
        if p.is_empty() || p.starts_with('$') || p.starts_with('.') || p.contains("..") || bad_char {
            diags.error(
                at,
                Some("reply_prefixes"),
                format!("reply prefix {p:?} must be the start of a subject without wildcards or spaces, and must not start with '$' (system and JetStream API subjects)"),
            );
        }
    }
    Some(prefixes.clone())
}

fn socket_addr(at: Table<'_>, key: &str, value: &Option<String>, default: &str, diags: &mut Diagnostics<'_>) -> SocketAddr {
    let s = value.as_deref().unwrap_or(default);
    s.parse().unwrap_or_else(|_| {
        diags.error(at, Some(key), format!("`{key}` {s:?} is not an address like 127.0.0.1:4280"));
        default.parse().expect("default address")
    })
}

fn http_limits(raw: &RawSidecar, at: Table<'_>, diags: &mut Diagnostics<'_>) -> HttpLimits {
    let http = HttpLimits {
        header_read_timeout: duration(at, "header_read_timeout", &raw.header_read_timeout, Duration::from_secs(10), diags),
        max_headers: raw.max_headers.unwrap_or(100),
        max_header_bytes: size(at, "max_header_bytes", &raw.max_header_bytes, 64 << 10, diags),
        idle_timeout: duration(at, "idle_timeout", &raw.idle_timeout, Duration::from_secs(90), diags),
        max_connections: raw.max_connections.unwrap_or(1024),
    };
    if http.max_headers == 0 || http.max_connections == 0 {
        diags.error(at, None, "`max_headers` and `max_connections` must be at least 1");
    }
    // Zero would close every connection at once (the watchdog's deadline is the accept).
    for (key, d) in [("header_read_timeout", http.header_read_timeout), ("idle_timeout", http.idle_timeout)] {
        if d.is_zero() {
            diags.error(at, Some(key), format!("`{key}` must be more than zero"));
        }
    }
    if http.max_header_bytes < 8192 {
        diags.error(at, Some("max_header_bytes"), "`max_header_bytes` must be at least 8KiB");
    }
    http
}

pub(super) fn nats(raw: RawNats, start: TableStart, diags: &mut Diagnostics<'_>) -> Nats {
    let at = start.unnamed();
    let servers = raw.servers.clone().unwrap_or_else(|| vec![DEFAULT_NATS_URL.to_owned()]);
    check_servers(&servers, at, diags);
    let auth = nats_auth(&raw, at, diags);
    let tls = raw.tls.as_ref().map(|t| nats_tls(t, at, diags));
    let inbox_prefix = raw.inbox_prefix.clone();
    if let Some(p) = &inbox_prefix {
        check_inbox_prefix(p, at, diags);
    }
    let connect_timeout = duration(at, "connect_timeout", &raw.connect_timeout, Duration::from_secs(5), diags);
    Nats { servers, connect_timeout, inbox_prefix, auth, tls }
}

/// Replies come back on `<inbox_prefix>.<nuid>.<token>`: the prefix must be literal tokens.
fn check_inbox_prefix(prefix: &str, at: Table<'_>, diags: &mut Diagnostics<'_>) {
    let literal = prefix.split('.').all(crate::subject::is_valid_token);
    if !literal {
        diags.error(
            at,
            Some("inbox_prefix"),
            format!("`inbox_prefix` {prefix:?} must be a subject without wildcards, like \"_INBOX_orders\" or \"svc.orders.inbox\""),
        );
    }
}

fn check_servers(servers: &[String], at: Table<'_>, diags: &mut Diagnostics<'_>) {
    if servers.is_empty() {
        diags.error(at, Some("servers"), "`servers` must name at least one server");
    }
    for s in servers {
        // Without a scheme the client assumes nats://.
        if let Err(e) = parse_server_url(s) {
            diags.error(at, Some("servers"), redact_userinfo(&e.to_string()));
        }
    }
}

/// A secret given both as a file and as an environment variable.
#[derive(Debug, thiserror::Error)]
#[error("set the file or the environment variable, not both")]
struct SecretGivenTwice;

fn secret(file: &Option<String>, env: &Option<String>) -> Result<Option<Secret>, SecretGivenTwice> {
    match (file, env) {
        (Some(_), Some(_)) => Err(SecretGivenTwice),
        (Some(f), None) => Ok(Some(Secret::File(f.into()))),
        (None, Some(e)) => Ok(Some(Secret::Env(e.clone()))),
        (None, None) => Ok(None),
    }
}

/// The one authentication the section sets; more than one is an error.
fn nats_auth(raw: &RawNats, at: Table<'_>, diags: &mut Diagnostics<'_>) -> NatsAuth {
    let token = secret(&raw.token_file, &raw.token_env);
    let password = secret(&raw.password_file, &raw.password_env);
    let nkey = secret(&raw.nkey_seed_file, &raw.nkey_seed_env);
    for (key, r) in [("token", &token), ("password", &password), ("nkey_seed", &nkey)] {
        if let Err(e) = r {
            diags.error(at, Some(&format!("{key}_file")), format!("`{key}`: {e}"));
        }
    }
    let mut kinds = Vec::new();
    let mut auth = NatsAuth::None;
    if let Ok(Some(t)) = token {
        kinds.push("token");
        auth = NatsAuth::Token(t);
    }
    match (raw.user.clone(), password) {
        (Some(user), Ok(Some(password))) => {
            kinds.push("user/password");
            auth = NatsAuth::UserPassword { user, password };
        }
        (Some(_), Ok(None)) => diags.error(at, Some("user"), "`user` needs `password_file` or `password_env`"),
        (None, Ok(Some(_))) => diags.error(at, Some("user"), "a password needs `user`"),
        _ => {}
    }
    if let Ok(Some(n)) = nkey {
        kinds.push("nkey");
        auth = NatsAuth::NkeySeed(n);
    }
    if let Some(c) = &raw.creds_file {
        kinds.push("creds");
        auth = NatsAuth::Credentials(c.into());
    }
    if kinds.len() > 1 {
        diags.error(at, None, format!("choose one NATS authentication, not {}", kinds.join(" and ")));
    }
    auth
}

fn nats_tls(raw: &RawTls, at: Table<'_>, diags: &mut Diagnostics<'_>) -> NatsTls {
    if raw.cert_file.is_some() != raw.key_file.is_some() {
        diags.error(at, Some("cert_file"), "TLS `cert_file` and `key_file` go together");
    }
    NatsTls {
        ca_file: raw.ca_file.as_ref().map(Into::into),
        cert_file: raw.cert_file.as_ref().map(Into::into),
        key_file: raw.key_file.as_ref().map(Into::into),
        require: raw.require,
    }
}

#[cfg(test)]
mod semver_tests {
    #[test]
    fn versions_are_semver() {
        for ok in ["0.0.0", "1.4.0", "10.20.30", "1.0.0-rc.1", "1.0.0+build.5", "1.0.0-alpha-1+x"] {
            assert!(super::is_semver(ok), "{ok}");
        }
        for bad in ["1", "1.0", "01.0.0", "1.0.0-", "1.0.0+", "v1.0.0", "1.0.0-a..b", "1.0.x"] {
            assert!(!super::is_semver(bad), "{bad}");
        }
        let e = crate::config::test_support::errors("[sidecar]\nservice = \"s\"\nversion = \"v2\"\n");
        assert!(e.len() == 1 && e[0].starts_with("t.toml:3:") && e[0].contains("SemVer"), "{e:?}");
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{errors, MINIMAL};
    use crate::config::{parse, NatsAuth, Secret, Unmatched};

    #[test]
    fn forward_proxy_keys() {
        let c = parse(MINIMAL, "t").unwrap();
        assert_eq!(c.sidecar.forward.unmatched, Unmatched::Forward);
        assert_eq!(c.sidecar.forward.connect_allow, None);
        let src = format!("{MINIMAL}unmatched = \"reject\"\nconnect_allow = [\"*.example.com:443\", \"db:*\"]\n");
        let c = parse(&src, "t").unwrap();
        assert_eq!(c.sidecar.forward.unmatched, Unmatched::Reject);
        assert_eq!(c.sidecar.forward.connect_allow.as_ref().map(Vec::len), Some(2));
        let e = errors(&format!("{MINIMAL}unmatched = \"drop\"\n"));
        assert!(e[0].contains("t.toml:3") && e[0].contains("`unmatched`"), "{e:#?}");
        let e = errors(&format!("{MINIMAL}connect_allow = [\"example.com\"]\n"));
        assert!(e[0].contains("host:port"), "{e:#?}");
    }

    #[test]
    fn worker_threads_default_to_one_and_are_bounded() {
        assert_eq!(parse(MINIMAL, "t").unwrap().sidecar.worker_threads, 1);
        assert_eq!(parse(&format!("{MINIMAL}worker_threads = 4\n"), "t").unwrap().sidecar.worker_threads, 4);
        for bad in [0, 65] {
            let e = errors(&format!("{MINIMAL}worker_threads = {bad}\n"));
            assert!(e[0].contains("t.toml:3") && e[0].contains("`worker_threads`"), "{e:#?}");
        }
    }

    #[test]
    fn secrets_are_never_inline() {
        let e = errors(&format!("{MINIMAL}[nats]\ntoken = \"hunter2\"\n"));
        assert!(e[0].contains("unknown field `token`"), "{e:#?}");
        let c = parse(&format!("{MINIMAL}[nats]\ntoken_env = \"NATS_TOKEN\"\n"), "t").unwrap();
        assert_eq!(c.nats.auth, NatsAuth::Token(Secret::Env("NATS_TOKEN".into())));
    }

    #[test]
    fn the_inbox_prefix_is_a_literal_subject() {
        let c = parse(&format!("{MINIMAL}[nats]\ninbox_prefix = \"svc.orders.inbox\"\n"), "t").unwrap();
        assert_eq!(c.nats.inbox_prefix.as_deref(), Some("svc.orders.inbox"));
        assert_eq!(parse(MINIMAL, "t").unwrap().nats.inbox_prefix, None);
        for bad in ["_INBOX.>", "a.*.b", "a..b", "", "a.b."] {
            let e = errors(&format!("{MINIMAL}[nats]\ninbox_prefix = {bad:?}\n"));
            assert!(e[0].contains("`inbox_prefix`") && e[0].contains("without wildcards"), "{bad}: {e:#?}");
        }
    }
}
