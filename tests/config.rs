//! The routing file as users meet it: the reference file loads, and `natsbridge check`
//! reports every error of a bad file with file:line and the route's name.

use std::process::Command;

fn check(path: &str) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_natsbridge")).arg("check").arg(path).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn the_reference_routes_toml_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/routes.toml");
    let c = natsbridge::config::load(std::path::Path::new(path)).unwrap_or_else(|e| panic!("{e}"));
    // The issue's example, kept as written.
    let names: Vec<_> = c.outbound.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["execute-agent", "auth-event", "workflow-started", "model-tunnel", "vector-not-migrated", "execution-tokens"]);
    assert!(c.inbound.len() >= 2);
    let (code, out, err) = check(path);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("execute-agent") && out.contains("agent.{agent_id}.execution.requested"), "{out}");
}

#[test]
fn check_reports_every_error_with_file_line_and_route() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bad-routes.toml");
    let (code, _out, err) = check(path);
    assert_eq!(code, 1);
    let lines: Vec<&str> = err.lines().collect();
    let expect = [
        ("bad-routes.toml:12: route \"execute-agent\": duplicate route name; first defined at line 4", true),
        ("bad-routes.toml:14: route \"execute-agent\": `subject` \"b.>\" is not a valid NATS subject", true),
        ("bad-routes.toml:17: route \"tunnel-without-service\": mode \"tunnel\" needs `service`", true),
        ("bad-routes.toml:25: route \"shadowed\": can never match", true),
        ("bad-routes.toml:34: route \"typo\": [[outbound]]: unknown field `timout`", true),
        ("bad-routes.toml:39: route \"bad-capture\": `subject` uses {other}, which `path` does not define", true),
    ];
    for (want, _) in expect {
        assert!(lines.iter().any(|l| l.contains(want)), "missing {want:?} in:\n{err}");
    }
    assert!(err.starts_with("6 errors"), "{err}");
}

#[test]
fn syntax_errors_point_at_the_line() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bad-syntax.toml");
    let (code, _out, err) = check(path);
    assert_eq!(code, 1);
    assert!(err.contains("bad-syntax.toml:6:"), "{err}");
}

#[test]
fn check_warns_when_a_duplicate_window_is_shorter_than_an_idempotency_ttl() {
    let src = |window: &str| {
        format!(
            r#"[sidecar]
service = "svc"

[[inbound]]
name = "orders"
subject = "orders.created"
mode = "jetstream"
stream = "ORDERS"
durable = "orders"
path = "/orders"
dead_letter = "dlq.orders"
idempotency = {{ key = "header:Idempotency-Key", ttl = "1h" }}

[[streams]]
name = "ORDERS"
subjects = ["orders.>"]
duplicate_window = "{window}"
"#
        )
    };
    let c = natsbridge::config::parse(&src("2m"), "t.toml").unwrap_or_else(|e| panic!("{e}"));
    let w: Vec<String> = c.warnings.iter().map(|w| w.to_string()).collect();
    assert!(
        w.iter().any(|w| w.contains(r#"route "orders""#) && w.contains("duplicate_window 2m is shorter than the idempotency ttl 1h")),
        "{w:?}"
    );
    // A window that covers the ttl: no warning.
    let c = natsbridge::config::parse(&src("2h"), "t.toml").unwrap_or_else(|e| panic!("{e}"));
    assert!(!c.warnings.iter().any(|w| w.message.contains("duplicate_window")), "{:?}", c.warnings);
}
