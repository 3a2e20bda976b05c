//! The sidecars' routing files: A (egress), B (ingress), F (the pull consumer).

pub const SIDECAR_A: &str = r#"
[sidecar]
service = "bench-a"

[defaults]
timeout = "10s"
max_body = "1MiB"

[[outbound]]
name = "echo"
method = "POST"
path = "/echo"
subject = "bench.echo"
mode = "request"

[[outbound]]
name = "app-b"
host = "app-b"
path = "/{*rest}"
mode = "tunnel"
service = "bench-b"

[[outbound]]
name = "events"
method = "POST"
path = "/events/{id}"
subject = "benche.{id}"
mode = "jetstream"

[[outbound]]
name = "tokens"
method = "GET"
path = "/tokens/{n}/{gap}"
subject = "benchtok.{n}.{gap}"
mode = "request"
timeout = "60s"
"#;

/// Both routes keep the default `concurrency` (64), as a new user would. Each app call in
/// flight holds a pooled connection to the app, ~50 KB of the sidecar's memory: at 256 the
/// 16k rps step opened ~250 of them and B peaked at 21.7 MB instead of 12.8 MB, with no
/// throughput gained (BENCHMARKS.md, 2026-12-01 afternoon).
pub const SIDECAR_B: &str = r#"
[sidecar]
service = "bench-b"

[defaults]
timeout = "10s"
max_body = "1MiB"

[[inbound]]
name = "echo"
subject = "bench.echo"
mode = "request"
method = "POST"
path = "/echo"

[[inbound]]
name = "tunnel"
mode = "tunnel"
"#;

pub fn sidecar_f(conc: usize) -> String {
    format!(
        r#"
[sidecar]
service = "bench-f"
provision = true

[defaults]
timeout = "10s"
max_body = "1MiB"

[[inbound]]
name = "jobs"
subject = "benchf.>"
mode = "jetstream"
stream = "BENCH_F"
durable = "sidecar-f"
# The bench fills the stream before the sidecar binds: read it from the start.
deliver = "all"
method = "POST"
path = "/ingest"
ack_wait = "30s"
max_deliver = 5
concurrency = {conc}
"#
    )
}

/// `BENCH_SKIP_INGRESS=1` runs only the paths without ingress (a, b, e and the raw f).
pub fn ingress_available() -> bool {
    std::env::var("BENCH_SKIP_INGRESS").is_err()
}

/// A sidecar's routing file with `worker_threads` set when the bench was told to.
pub fn with_threads(toml: &str, threads: Option<usize>) -> String {
    match threads {
        Some(n) => toml.replacen("[sidecar]\n", &format!("[sidecar]\nworker_threads = {n}\n"), 1),
        None => toml.to_owned(),
    }
}
