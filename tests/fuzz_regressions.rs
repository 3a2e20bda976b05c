//! The fuzz targets (`fuzz/src/targets.rs`) on stable Rust:
//!
//! - always: every seed in `fuzz/corpus/<target>/` and every past crash in
//!   `fuzz/regressions/<target>/` replays through its target, plus the named regression
//!   tests below (one per bug a fuzzer found);
//! - `#[ignore]`d: a seeded, time-bounded mutation fuzzer per target, the fallback for
//!   machines without nightly and cargo-fuzz. `scripts/fuzz-smoke` runs them with
//!   `NATSBRIDGE_FUZZ_SECS` seconds each; `NATSBRIDGE_FUZZ_SEED` replays a run.
//!   A failing input is written to `fuzz/artifacts/<target>/` and printed.

#[path = "../fuzz/src/targets.rs"]
mod targets;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()).collect())
        .unwrap_or_else(|_| Vec::new());
    out.sort();
    out.into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect()
}

fn target(name: &str) -> fn(&[u8]) {
    targets::TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f).unwrap()
}

fn replay(name: &str) {
    let f = target(name);
    let mut n = 0;
    for sub in ["corpus", "regressions"] {
        for (path, data) in files(&fuzz_dir().join(sub).join(name)) {
            if let Err(e) = std::panic::catch_unwind(|| f(&data)) {
                std::panic::resume_unwind(Box::new(format!("{} failed: {}", path.display(), panic_text(&e))));
            }
            n += 1;
        }
    }
    assert!(n > 0, "no corpus for {name}");
}

#[test]
fn corpus_and_regressions_replay_config() {
    replay("config");
}

#[test]
fn corpus_and_regressions_replay_routes() {
    replay("routes");
}

#[test]
fn corpus_and_regressions_replay_stream() {
    replay("stream");
}

#[test]
fn corpus_and_regressions_replay_headers() {
    replay("headers");
}

#[test]
fn corpus_and_regressions_replay_tunnel() {
    replay("tunnel");
}

#[test]
fn corpus_and_regressions_replay_framing() {
    replay("framing");
}

#[test]
fn corpus_and_regressions_replay_nestjs() {
    replay("nestjs");
}

#[test]
fn corpus_and_regressions_replay_cloudevents() {
    replay("cloudevents");
}

// ---------------------------------------------------------------------------------------
// Named regressions: one per bug the fuzzers found.

/// `%01` in a path capture decoded to a control character that `is_valid_token`
/// accepted, so a request could put a raw control byte in a NATS subject (config
/// subjects already refused them). Found by the `routes` target.
#[test]
fn regression_percent_encoded_control_character_never_reaches_a_subject() {
    let t = natsbridge::subject::SubjectTemplate::parse("kv.{bucket}.{key}").unwrap();
    for evil in ["%01", "a%7Fb", "%1B[31m", "%00"] {
        assert!(t.render(|_| Some(evil)).is_err(), "{evil:?} rendered");
    }
    assert!(!natsbridge::subject::is_valid_token("a\u{1}b"));
}

/// A CloudEvent whose `datacontenttype` has a non-ASCII character lost it on its way back
/// from HTTP binary mode: `Content-Type` was read as visible ASCII only. Found by the
/// `cloudevents` target (fuzz/regressions/cloudevents/non-ascii-content-type).
#[test]
fn regression_a_non_ascii_content_type_survives_http_binary_mode() {
    use natsbridge::codec::cloudevents::Event;
    let mut e = Event::new("1", "/s", "t", bytes::Bytes::from_static(b"hi"));
    e.set("datacontenttype", "text/pl\u{e9}ain");
    let mut h = http::HeaderMap::new();
    for (n, v) in e.http_headers() {
        h.insert(http::HeaderName::from_bytes(n.as_bytes()).unwrap(), http::HeaderValue::from_str(&v).unwrap());
    }
    assert_eq!(Event::from_http(&h, e.data.clone()).unwrap(), Some(e));
}

/// A 5,000-byte path capture rendered a 5 KiB subject; nats-server closed the sidecar's
/// connection over its control line (issue 20). Refused before rendering, in the target.
#[test]
fn regression_a_long_capture_never_renders_a_subject() {
    let path = format!("/agents/{}/execute", "a".repeat(5000));
    let mut input = vec![1u8, 0];
    input.extend_from_slice(path.as_bytes());
    input.extend_from_slice(b"\0agent-service");
    targets::routes(&input);
    let t = natsbridge::subject::SubjectTemplate::parse("agent.{id}.execution.requested").unwrap();
    let long = "a".repeat(5000);
    assert!(matches!(t.render(|_| Some(long.as_str())), Err(natsbridge::subject::RenderError::TooLong { .. })));
}

/// A Host header starting with '[' but without ']' made `strip_port` slice past the end
/// of the string: a panic (a 500) for any request with such a Host. Found by `routes`.
#[test]
fn regression_host_with_an_unclosed_ipv6_bracket_does_not_panic() {
    assert_eq!(natsbridge::config::strip_port("[MODE#-SERVICE:80"), "[MODE#-SERVICE:80");
    assert_eq!(natsbridge::config::strip_port("[::1]:8080"), "[::1]");
    assert_eq!(natsbridge::config::strip_port("["), "[");
    let c = natsbridge::config::parse(
        "[sidecar]\nservice = \"s\"\n[[outbound]]\nname = \"r\"\npath = \"/a\"\nsubject = \"a\"\nmode = \"publish\"\n",
        "t",
    )
    .unwrap();
    let t = natsbridge::egress::routes::RouteTable::new(&c);
    assert!(t.lookup(&http::Method::GET, Some("[oops:80"), "/a").is_ok());
}

/// A `Bridge-Query` header sent by the app went through the tunnel and was replayed as
/// the query of a request that had none (and `Bridge-Path`/`Bridge-Method` were only
/// overridden by luck of insertion order). Found by `tunnel`.
#[test]
fn regression_app_sent_tunnel_control_headers_do_not_pass() {
    let mut h = http::HeaderMap::new();
    h.insert("bridge-query", http::HeaderValue::from_static("admin=true"));
    h.insert("bridge-path", http::HeaderValue::from_static("/elsewhere"));
    h.insert("x-keep", http::HeaderValue::from_static("1"));
    let n = natsbridge::codec::tunnel_request_headers(&http::Method::GET, "/a", None, &h);
    let t = natsbridge::codec::decode_tunnel_request(Some(&n)).unwrap();
    assert_eq!(t.path_and_query, "/a");
    assert_eq!(t.headers.get("x-keep").unwrap(), "1");
}

/// A reply subject aimed at the JetStream API (issue 20): an empty HEAD answer there is
/// a valid `STREAM.DELETE` request sent with the sidecar's credentials.
#[test]
fn regression_hostile_reply_subjects_are_never_answered() {
    for reply in ["$JS.API.STREAM.DELETE.ORDERS", "$SYS.REQ.SERVER.PING", "_INBOX.x", "victim.replies", ""] {
        targets::check_reply(reply);
    }
    let prefixes = [natsbridge::config::DEFAULT_REPLY_PREFIX.to_owned()];
    assert!(!natsbridge::codec::reply_allowed("$JS.API.STREAM.DELETE.ORDERS", &prefixes));
    assert!(natsbridge::codec::reply_allowed("_INBOX.abc.1", &prefixes));
}

// ---------------------------------------------------------------------------------------
// The stable mutation fuzzer.

const DICTIONARY: &[&[u8]] = &[
    b"{",
    b"}",
    b"{*rest}",
    b"{id}",
    b".",
    b"*",
    b">",
    b"..",
    b"%2E",
    b"%2e",
    b"%2A",
    b"%3E",
    b"%20",
    b"%00",
    b"%01",
    b"%7F",
    b"%",
    b"/",
    b"//",
    b"?",
    b"#",
    b"\r\n",
    b"\n",
    b"\0",
    b":",
    b",",
    b" ",
    b"\t",
    b"connection",
    b"Connection: ",
    b"keep-alive",
    b"transfer-encoding",
    b"chunked",
    b"te",
    b"upgrade",
    b"host",
    b"content-length",
    b"Bridge-Method: ",
    b"Bridge-Path: ",
    b"Bridge-Query: ",
    b"Bridge-Status: ",
    b"Nats-Service-Error-Code: ",
    b"[[outbound]]\n",
    b"[[inbound]]\n",
    b"[sidecar]\nservice = \"s\"\n",
    b"[nats]\n",
    b"mode = \"request\"\n",
    b"mode = \"tunnel\"\n",
    b"mode = \"jetstream\"\n",
    b"mode = \"http\"\n",
    b"path = \"/a/{x}\"\n",
    b"subject = \"a.{x}\"\n",
    b"name = \"r\"\n",
    b"method = \"GET\"\n",
    b"host = \"h\"\n",
    b"timeout = \"0s\"\n",
    b"max_body = \"0\"\n",
    b"stream = \"S\"\n",
    b"[[streams]]\n",
    b"\"",
    b"'''",
    b"=",
    b"[",
    b"]",
    b"\xff",
    b"\xc3\xa9",
    b"999999999999999999999",
    b"{\"pattern\":",
    b"\"data\":",
    b"\"id\":",
    b"\"err\":",
    b"\"response\":",
    b"\"isDisposed\":true",
    b"{\"cmd\":\"sum\"}",
    b"1e400",
    b"-0.0",
    b"null",
];

fn mutate(rng: &mut fastrand::Rng, input: &mut Vec<u8>) {
    for _ in 0..rng.usize(1..=4) {
        let len = input.len();
        match rng.u8(0..8) {
            0 if len > 0 => {
                let i = rng.usize(0..len);
                input[i] ^= 1 << rng.u8(0..8);
            }
            1 => {
                let i = rng.usize(0..=len);
                input.insert(i, rng.u8(..));
            }
            2 if len > 0 => {
                let a = rng.usize(0..len);
                let b = (a + rng.usize(1..=16)).min(len);
                input.drain(a..b);
            }
            3 if len > 0 => {
                let a = rng.usize(0..len);
                let b = (a + rng.usize(1..=32)).min(len);
                let chunk = input[a..b].to_vec();
                let at = rng.usize(0..=input.len());
                input.splice(at..at, chunk);
            }
            4 | 5 => {
                let word = DICTIONARY[rng.usize(0..DICTIONARY.len())];
                let at = rng.usize(0..=len);
                input.splice(at..at, word.iter().copied());
            }
            6 if len > 0 => {
                let i = rng.usize(0..len);
                input[i] = *rng.choice(b"{}.*>%/:\n\0 ?#\r".iter()).unwrap();
            }
            _ => {
                let at = rng.usize(0..=len);
                let n = rng.usize(1..=8);
                input.splice(at..at, (0..n).map(|_| rng.u8(..)));
            }
        }
    }
    input.truncate(16 << 10);
}

fn panic_text(e: &Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "panic".into())
}

fn fuzz(name: &str) {
    let secs: u64 = std::env::var("NATSBRIDGE_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let seed: u64 = std::env::var("NATSBRIDGE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64);
    let f = target(name);
    let mut corpus: Vec<Vec<u8>> =
        ["corpus", "regressions"].iter().flat_map(|sub| files(&fuzz_dir().join(sub).join(name))).map(|(_, d)| d).collect();
    corpus.push(Vec::new());
    let mut rng = fastrand::Rng::with_seed(seed);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    // Silence the default hook: panics are caught and reported with their input.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut runs = 0u64;
    let mut failure = None;
    while Instant::now() < deadline {
        let mut input = corpus[rng.usize(0..corpus.len())].clone();
        mutate(&mut rng, &mut input);
        runs += 1;
        if let Err(e) = std::panic::catch_unwind(|| f(&input)) {
            failure = Some((input, panic_text(&e)));
            break;
        }
        // Keep a few mutants around so mutations can stack.
        if runs % 64 == 0 && corpus.len() < 4096 {
            corpus.push(input);
        }
    }
    std::panic::set_hook(hook);
    eprintln!("fuzz {name}: {runs} runs in {:.1?} (NATSBRIDGE_FUZZ_SEED={seed})", started.elapsed());
    if let Some((input, msg)) = failure {
        let dir = fuzz_dir().join("artifacts").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let hash = input.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3));
        let path = dir.join(format!("crash-{hash:016x}"));
        std::fs::write(&path, &input).unwrap();
        panic!(
            "fuzz {name} failed after {runs} runs (NATSBRIDGE_FUZZ_SEED={seed}): {msg}\ninput ({}): {:?}\nsaved to {}; add it to fuzz/regressions/{name}/ once fixed",
            input.len(),
            String::from_utf8_lossy(&input),
            path.display()
        );
    }
}

#[test]
#[ignore = "randomized; run by scripts/fuzz-smoke"]
fn fuzz_config() {
    fuzz("config");
}

#[test]
#[ignore = "randomized; run by scripts/fuzz-smoke"]
fn fuzz_routes() {
    fuzz("routes");
}

#[test]
#[ignore = "randomized; run by scripts/fuzz-smoke"]
fn fuzz_headers() {
    fuzz("headers");
}

#[test]
#[ignore = "randomized; run by scripts/fuzz-smoke"]
fn fuzz_tunnel() {
    fuzz("tunnel");
}

#[test]
#[ignore = "randomized; run by scripts/fuzz-smoke"]
fn fuzz_framing() {
    fuzz("framing");
}

#[test]
#[ignore = "randomized; run by scripts/fuzz-smoke"]
fn fuzz_nestjs() {
    fuzz("nestjs");
}

#[test]
#[ignore = "randomized; run by scripts/fuzz-smoke"]
fn fuzz_stream() {
    fuzz("stream");
}

#[test]
#[ignore = "randomized; run by scripts/fuzz-smoke"]
fn fuzz_cloudevents() {
    fuzz("cloudevents");
}
