//! HTTP edge hardening of the egress listener (issue 4 §4), one test per case, driven by
//! raw TCP writes so that framing, splits and timing are exactly what the test says.
//!
//! The routes proxy to a recording app (`mode = "http"`), so "how many requests were
//! parsed" is observable: the app counts what reached it. No NATS server is needed.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Edge {
    sidecar: Sidecar,
    app: App,
}

/// A sidecar whose only route proxies everything to a recording app. `sidecar` is extra
/// `[sidecar]` keys.
async fn edge(sidecar: &str) -> Edge {
    let app = App::start(|s| respond(200, &format!("ok {}", s.body.len()))).await;
    let toml = format!(
        "[sidecar]\nservice = \"edge\"\n{sidecar}\n\n[[outbound]]\nname = \"app\"\npath = \"/{{*rest}}\"\nmode = \"http\"\nupstream = \"{}\"\nmax_body = \"1KiB\"\n",
        app.url()
    );
    // NATS is not used by http-mode routes; nothing listens on port 1.
    let sidecar = Sidecar::start(&toml, "nats://127.0.0.1:1", None).await;
    Edge { sidecar, app }
}

const LIMITS: &str = "header_read_timeout = \"1s\"\nidle_timeout = \"1s\"\nmax_headers = 20\nmax_header_bytes = \"8KiB\"\n";

async fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Reads until the peer closes or `timeout` passes; returns what arrived and whether the
/// connection was closed.
async fn read_until_close(s: &mut TcpStream, timeout: Duration) -> (String, bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

/// Reads one response head and its Content-Length body (keep-alive stays usable).
async fn read_response(s: &mut TcpStream, timeout: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_lowercase();
            let len: usize = head.lines().find_map(|l| l.strip_prefix("content-length:")).map(|v| v.trim().parse().unwrap()).unwrap_or(0);
            if out.len() >= end + 4 + len {
                return Some(String::from_utf8_lossy(&out).into_owned());
            }
        }
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// The status lines in a stream of responses (bodies here never end in a newline).
fn status_lines(text: &str) -> Vec<&str> {
    text.match_indices("HTTP/1.1 ").map(|(i, _)| &text[i..text[i..].find("\r\n").map_or(text.len(), |e| i + e)]).collect()
}

/// Sends `raw` and expects exactly one response, a 400, then the connection closed; the
/// app must not have seen a second (smuggled) request, and none at all if `reaches_app`
/// is false.
async fn assert_rejected(raw: &str, reaches_app: bool) {
    let e = edge(LIMITS).await;
    let mut s = connect(e.sidecar.egress).await;
    s.write_all(raw.as_bytes()).await.unwrap();
    let (text, closed) = read_until_close(&mut s, Duration::from_secs(5)).await;
    let lines = status_lines(&text);
    assert_eq!(lines.len(), 1, "expected one response, got:\n{text}");
    assert!(lines[0].starts_with("HTTP/1.1 400"), "expected 400, got:\n{text}");
    assert!(closed, "connection left open after a rejected request:\n{text}");
    // Positive evidence instead of a pause: a request on a fresh connection, sent after the
    // rejected one was closed, has reached the app, so a request smuggled through the
    // rejected connection (parsed before its close) would have reached it by now.
    let mut probe = connect(e.sidecar.egress).await;
    probe.write_all(b"GET /probe-after-rejection HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let r = read_response(&mut probe, Duration::from_secs(10)).await.expect("the probe on a fresh connection was answered");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let seen: Vec<Seen> = e.app.requests().into_iter().filter(|r| r.uri != "/probe-after-rejection").collect();
    assert!(seen.iter().all(|r| !r.uri.contains("smuggled")), "a smuggled request reached the app: {seen:#?}");
    if !reaches_app {
        assert!(seen.is_empty(), "the rejected request reached the app: {seen:#?}");
    }
}

// ---------------------------------------------------------------------------------------
// Smuggling

const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";

#[tokio::test]
async fn conflicting_content_length_is_rejected() {
    assert_rejected(&format!("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 40\r\n\r\nabc{SMUGGLED}"), false).await;
}

#[tokio::test]
async fn duplicate_identical_content_length_is_rejected() {
    assert_rejected(&format!("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc{SMUGGLED}"), false).await;
}

#[tokio::test]
async fn content_length_list_is_rejected() {
    assert_rejected(&format!("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\nabc{SMUGGLED}"), false).await;
}

#[tokio::test]
async fn content_length_with_a_plus_sign_is_rejected() {
    // RUSTSEC-2021-0078
    assert_rejected(&format!("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc{SMUGGLED}"), false).await;
}

#[tokio::test]
async fn negative_or_hex_content_length_is_rejected() {
    assert_rejected("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", false).await;
    assert_rejected("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0x3\r\n\r\nabc", false).await;
}

#[tokio::test]
async fn repeated_transfer_encoding_is_rejected() {
    // RUSTSEC-2021-0020
    assert_rejected(
        &format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n{SMUGGLED}"),
        false,
    )
    .await;
}

#[tokio::test]
async fn chunked_listed_twice_is_rejected() {
    assert_rejected(
        &format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n{SMUGGLED}"),
        false,
    )
    .await;
}

#[tokio::test]
async fn a_coding_before_chunked_is_rejected() {
    assert_rejected(
        &format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n{SMUGGLED}"),
        false,
    )
    .await;
}

#[tokio::test]
async fn chunked_then_identity_is_rejected() {
    assert_rejected(
        &format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n{SMUGGLED}"),
        false,
    )
    .await;
}

#[tokio::test]
async fn odd_transfer_encoding_is_rejected() {
    for te in ["xchunked", "chunked-x", "identity", "gzip", "chunked;q=1"] {
        assert_rejected(&format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {te}\r\n\r\n3\r\nabc\r\n0\r\n\r\n{SMUGGLED}"), false)
            .await;
    }
}

#[tokio::test]
async fn transfer_encoding_with_a_space_before_the_colon_is_rejected() {
    assert_rejected(&format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n{SMUGGLED}"), false)
        .await;
}

#[tokio::test]
async fn transfer_encoding_with_content_length_is_rejected() {
    // The classic CL.TE desync: a front end trusting Content-Length would see the
    // smuggled request as body; one trusting chunked would see it as a second request.
    assert_rejected(
        &format!("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"),
        false,
    )
    .await;
}

#[tokio::test]
async fn oversized_chunk_size_is_rejected() {
    assert_rejected("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nabc\r\n0\r\n\r\n", true).await;
}

#[tokio::test]
async fn a_legitimate_pipelined_pair_is_two_requests() {
    // The control case: framing the parser does accept gives exactly the requests sent.
    let e = edge(LIMITS).await;
    let mut s = connect(e.sidecar.egress).await;
    s.write_all(b"POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (text, _) = read_until_close(&mut s, Duration::from_secs(5)).await;
    assert_eq!(status_lines(&text).len(), 2, "{text}");
    let uris: Vec<String> = e.app.requests().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(uris, ["/one", "/two"]);
}

/// Sends a good request and a second, pipelined one whose framing is ambiguous: the first
/// is served, the second answered 400 and the connection closed, nothing smuggled.
async fn assert_second_rejected(second: &str) {
    let e = edge(LIMITS).await;
    let mut s = connect(e.sidecar.egress).await;
    let raw = format!("POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc{second}");
    s.write_all(raw.as_bytes()).await.unwrap();
    let (text, closed) = read_until_close(&mut s, Duration::from_secs(5)).await;
    let lines = status_lines(&text);
    assert_eq!(lines.len(), 2, "expected two responses, got:\n{text}");
    assert!(lines[0].starts_with("HTTP/1.1 200"), "{text}");
    assert!(lines[1].starts_with("HTTP/1.1 400"), "the pipelined request was not refused:\n{text}");
    assert!(text.contains("application/problem+json"), "{text}");
    assert!(closed, "connection left open after a rejected request:\n{text}");
    let uris: Vec<String> = e.app.requests().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(uris, ["/one"], "only the first request may reach the app");
}

#[tokio::test]
async fn a_pipelined_request_with_duplicate_content_length_is_rejected() {
    assert_second_rejected(&format!("POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc{SMUGGLED}")).await;
}

#[tokio::test]
async fn a_pipelined_request_after_a_chunked_one_is_judged_too() {
    // The guard follows the chunked body (extensions, trailers) to find the next head.
    let e = edge(LIMITS).await;
    let mut s = connect(e.sidecar.egress).await;
    let raw = format!(
        "POST /one HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n\
         POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
    );
    s.write_all(raw.as_bytes()).await.unwrap();
    let (text, closed) = read_until_close(&mut s, Duration::from_secs(5)).await;
    let lines = status_lines(&text);
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("HTTP/1.1 200") && lines[1].starts_with("HTTP/1.1 400"), "{text}");
    assert!(closed, "{text}");
    let uris: Vec<String> = e.app.requests().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(uris, ["/one"]);
}

#[tokio::test]
async fn a_pipelined_request_sent_while_the_first_is_served_is_judged_too() {
    // The second head arrives in a later read, while the first request is in progress.
    let e = edge(LIMITS).await;
    let mut s = connect(e.sidecar.egress).await;
    s.write_all(b"POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc").await.unwrap();
    let first = read_response(&mut s, Duration::from_secs(5)).await.expect("first answered");
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let second = format!("POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\nabc{SMUGGLED}");
    for piece in second.as_bytes().chunks(7) {
        s.write_all(piece).await.unwrap();
    }
    let (text, closed) = read_until_close(&mut s, Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(closed, "{text}");
    let uris: Vec<String> = e.app.requests().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(uris, ["/one"]);
}

// ---------------------------------------------------------------------------------------
// Header limits

fn request_with_headers(n: usize, value_len: usize) -> String {
    let mut r = String::from("GET /h HTTP/1.1\r\nHost: x\r\n");
    for i in 0..n {
        r += &format!("X-H{i}: {}\r\n", "v".repeat(value_len));
    }
    r + "\r\n"
}

async fn send_split(s: &mut TcpStream, raw: &[u8], piece: usize, pause: Duration) {
    for chunk in raw.chunks(piece) {
        if s.write_all(chunk).await.is_err() {
            return; // the server may close as soon as the limit is crossed
        }
        let _ = s.flush().await;
        tokio::time::sleep(pause).await;
    }
}

async fn first_status(e: &Edge, raw: &str, split: Option<usize>) -> String {
    let mut s = connect(e.sidecar.egress).await;
    match split {
        None => s.write_all(raw.as_bytes()).await.unwrap(),
        Some(n) => send_split(&mut s, raw.as_bytes(), n, Duration::from_millis(2)).await,
    }
    let (text, _) = read_until_close(&mut s, Duration::from_secs(3)).await;
    text.lines().next().unwrap_or("").to_owned()
}

#[tokio::test]
async fn too_many_headers_get_431() {
    let e = edge(LIMITS).await;
    // Host + 18 = 19 headers pass; Host + 25 do not.
    assert!(first_status(&e, &request_with_headers(18, 4), None).await.starts_with("HTTP/1.1 200"));
    let st = first_status(&e, &request_with_headers(25, 4), None).await;
    assert!(st.starts_with("HTTP/1.1 431"), "{st}");
}

#[tokio::test]
async fn too_many_headers_in_split_writes_get_431() {
    let e = edge(LIMITS).await;
    let st = first_status(&e, &request_with_headers(25, 4), Some(7)).await;
    assert!(st.starts_with("HTTP/1.1 431"), "{st}");
}

#[tokio::test]
async fn oversized_header_block_gets_431() {
    let e = edge(LIMITS).await;
    let st = first_status(&e, &request_with_headers(1, 10_000), None).await;
    assert!(st.starts_with("HTTP/1.1 431"), "{st}");
}

#[tokio::test]
async fn oversized_header_block_in_split_writes_gets_431() {
    // hyper #4081: in 1.10.0 the size limit was bypassed when the head arrived across
    // several reads. 9 headers of 1000 bytes (over 8KiB in total, under the count limit),
    // written 512 bytes at a time.
    let e = edge(LIMITS).await;
    let raw = request_with_headers(9, 1000);
    assert!(raw.len() > 8192);
    let st = first_status(&e, &raw, Some(512)).await;
    assert!(st.starts_with("HTTP/1.1 431"), "{st}");
    assert!(e.app.requests().is_empty());
}

#[tokio::test]
async fn header_block_just_under_the_limit_in_split_writes_passes() {
    let e = edge(LIMITS).await;
    let raw = request_with_headers(7, 1000);
    assert!(raw.len() < 8192);
    let st = first_status(&e, &raw, Some(300)).await;
    assert!(st.starts_with("HTTP/1.1 200"), "{st}");
}

// ---------------------------------------------------------------------------------------
// Timeouts

#[tokio::test]
async fn slowloris_head_is_cut_at_the_header_read_timeout() {
    let e = edge("header_read_timeout = \"1s\"\nidle_timeout = \"30s\"\n").await;
    let mut s = connect(e.sidecar.egress).await;
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = Instant::now();
    // Keep dripping header bytes: activity must not extend the header deadline.
    let closed_at = loop {
        if s.write_all(b"X-Drip: a\r\n").await.is_err() {
            break started.elapsed();
        }
        let mut b = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            _ => {}
        }
        assert!(started.elapsed() < Duration::from_secs(10), "slowloris connection still open after 10s");
    };
    assert!(closed_at >= Duration::from_millis(800), "closed too early: {closed_at:?}");
    assert!(closed_at < Duration::from_secs(8), "closed too late: {closed_at:?}");
    assert!(e.app.requests().is_empty());
}

#[tokio::test]
async fn a_later_slow_head_on_a_keep_alive_connection_is_cut_at_the_header_read_timeout() {
    // The watchdog is not woken when a later head starts (issue 14): it must still cut
    // that head at its own header deadline, not at the 30 s idle timeout.
    let e = edge("header_read_timeout = \"1s\"\nidle_timeout = \"30s\"\n").await;
    let mut s = connect(e.sidecar.egress).await;
    s.write_all(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert!(read_response(&mut s, Duration::from_secs(5)).await.unwrap().starts_with("HTTP/1.1 200"));
    // Idle for part of a header period, so the watchdog went to sleep before the head.
    tokio::time::sleep(Duration::from_millis(600)).await;
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = Instant::now();
    let (_, closed) = read_until_close(&mut s, Duration::from_secs(10)).await;
    assert!(closed, "the slow second head was never cut");
    let t = started.elapsed();
    assert!(t >= Duration::from_millis(800) && t < Duration::from_secs(3), "cut after {t:?}, want about 1s");
    assert_eq!(e.app.requests().len(), 1);
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_cut_at_the_header_read_timeout() {
    let e = edge("header_read_timeout = \"1s\"\nidle_timeout = \"30s\"\n").await;
    let mut s = connect(e.sidecar.egress).await;
    let started = Instant::now();
    let (_, closed) = read_until_close(&mut s, Duration::from_secs(10)).await;
    assert!(closed, "silent connection never closed");
    let t = started.elapsed();
    assert!(t >= Duration::from_millis(800) && t < Duration::from_secs(8), "{t:?}");
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed_at_the_idle_timeout() {
    let e = edge("header_read_timeout = \"10s\"\nidle_timeout = \"1s\"\n").await;
    let mut s = connect(e.sidecar.egress).await;
    s.write_all(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let r = read_response(&mut s, Duration::from_secs(5)).await.expect("first response");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let idle_from = Instant::now();
    let (rest, closed) = read_until_close(&mut s, Duration::from_secs(10)).await;
    assert!(closed, "idle connection never closed");
    assert!(rest.is_empty(), "unexpected bytes: {rest}");
    let t = idle_from.elapsed();
    assert!(t >= Duration::from_millis(800) && t < Duration::from_secs(8), "closed after {t:?}");
}

#[tokio::test]
async fn idle_timeout_longer_than_header_timeout_keeps_the_connection() {
    // hyper's own header timer also runs while a keep-alive connection idles; ours only
    // starts at the next request's first byte, so idle_timeout is what applies.
    let e = edge("header_read_timeout = \"500ms\"\nidle_timeout = \"5s\"\n").await;
    let mut s = connect(e.sidecar.egress).await;
    s.write_all(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert!(read_response(&mut s, Duration::from_secs(5)).await.unwrap().starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.write_all(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let r = read_response(&mut s, Duration::from_secs(5)).await.expect("the connection survived 1.5s idle");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(e.app.requests().len(), 2);
}

#[tokio::test]
async fn a_request_in_progress_is_not_cut_by_the_idle_timeout_while_bytes_flow() {
    // A body trickling in for longer than idle_timeout, never silent for that long.
    let e = edge("header_read_timeout = \"1s\"\nidle_timeout = \"1s\"\n").await;
    let mut s = connect(e.sidecar.egress).await;
    s.write_all(b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n").await.unwrap();
    for b in [b"a", b"b", b"c", b"d", b"e", b"f"] {
        tokio::time::sleep(Duration::from_millis(400)).await;
        s.write_all(b).await.unwrap();
    }
    let r = read_response(&mut s, Duration::from_secs(5)).await.expect("response");
    assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("ok 6"), "{r}");
}

#[tokio::test]
async fn a_stalled_request_body_is_cut_at_the_idle_timeout() {
    let e = edge("header_read_timeout = \"1s\"\nidle_timeout = \"1s\"\n").await;
    let mut s = connect(e.sidecar.egress).await;
    s.write_all(b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc").await.unwrap();
    let started = Instant::now();
    let (_, closed) = read_until_close(&mut s, Duration::from_secs(10)).await;
    assert!(closed, "stalled upload never closed");
    assert!(started.elapsed() < Duration::from_secs(8), "{:?}", started.elapsed());
    assert!(e.app.requests().is_empty());
}

// ---------------------------------------------------------------------------------------
// Body limit (1KiB on the route)

#[tokio::test]
async fn declared_body_over_the_limit_gets_413() {
    let e = edge(LIMITS).await;
    let mut s = connect(e.sidecar.egress).await;
    s.write_all(b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n").await.unwrap();
    let r = read_response(&mut s, Duration::from_secs(5)).await.expect("response before the body was sent");
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    assert!(e.app.requests().is_empty());
}

#[tokio::test]
async fn chunked_body_over_the_limit_gets_413() {
    let e = edge(LIMITS).await;
    let mut s = connect(e.sidecar.egress).await;
    let mut raw = String::from("POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    for _ in 0..4 {
        raw += &format!("200\r\n{}\r\n", "x".repeat(0x200));
    }
    raw += "0\r\n\r\n";
    send_split(&mut s, raw.as_bytes(), 300, Duration::from_millis(5)).await;
    let r = read_response(&mut s, Duration::from_secs(5)).await.expect("response");
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    assert!(e.app.requests().is_empty());
}

#[tokio::test]
async fn endless_chunked_body_is_cut_at_the_limit() {
    // The client never finishes; the sidecar answers 413 once 1KiB has arrived.
    let e = edge(LIMITS).await;
    let mut s = connect(e.sidecar.egress).await;
    s.write_all(b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").await.unwrap();
    let writer = async {
        for _ in 0..200 {
            if s.write_all(format!("40\r\n{}\r\n", "y".repeat(0x40)).as_bytes()).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    writer.await;
    let r = read_response(&mut s, Duration::from_secs(5)).await.expect("response");
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
}

#[tokio::test]
async fn chunked_body_under_the_limit_passes() {
    let e = edge(LIMITS).await;
    let mut s = connect(e.sidecar.egress).await;
    s.write_all(b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n100\r\n").await.unwrap();
    s.write_all(&[b'z'; 0x100]).await.unwrap();
    s.write_all(b"\r\n0\r\n\r\n").await.unwrap();
    let r = read_response(&mut s, Duration::from_secs(5)).await.expect("response");
    assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("ok 256"), "{r}");
}

// ---------------------------------------------------------------------------------------
// Connection limit

#[tokio::test]
async fn connections_past_max_connections_wait_until_one_closes() {
    let e = edge("header_read_timeout = \"10s\"\nidle_timeout = \"10s\"\nmax_connections = 2\n").await;
    // Two connections hold the only slots (keep-alive, idle).
    let mut a = connect(e.sidecar.egress).await;
    let mut b = connect(e.sidecar.egress).await;
    for s in [&mut a, &mut b] {
        s.write_all(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        assert!(read_response(s, Duration::from_secs(5)).await.unwrap().starts_with("HTTP/1.1 200"));
    }
    let mut c = connect(e.sidecar.egress).await;
    c.write_all(b"GET /third HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    // Positive evidence that the third waits: requests sent on a held connection after it
    // are served while the third's, written first, has not reached the app.
    for i in 0..5 {
        b.write_all(format!("GET /probe-{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        assert!(read_response(&mut b, Duration::from_secs(10)).await.unwrap().starts_with("HTTP/1.1 200"));
        assert!(e.app.requests().iter().all(|r| r.uri != "/third"), "a third connection was served past max_connections = 2");
    }
    assert_eq!(e.app.requests().iter().filter(|r| r.uri.starts_with("/probe-")).count(), 5);
    drop(a);
    let r = read_response(&mut c, Duration::from_secs(5)).await.expect("served once a slot freed");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(e.app.requests().iter().filter(|r| r.uri == "/third").count(), 1);
}

// ---------------------------------------------------------------------------------------
// Listeners

#[test]
fn egress_binds_loopback_by_default_and_admin_is_a_separate_listener() {
    let c = natsbridge::config::parse("[sidecar]\nservice = \"s\"\n", "t.toml").unwrap();
    assert!(c.sidecar.listen.ip().is_loopback(), "egress must default to loopback: {}", c.sidecar.listen);
    assert_eq!(c.sidecar.listen.to_string(), "127.0.0.1:4280");
    assert_ne!(c.sidecar.listen.port(), c.sidecar.admin_listen.port());
    assert_eq!(c.sidecar.admin_listen.port(), 9464);
}

#[tokio::test]
async fn admin_endpoints_are_not_served_on_the_egress_listener() {
    let e = edge(LIMITS).await;
    // On egress, /readyz is just a path routed to the app, never the sidecar's readiness.
    let r = get(&e.sidecar.url("/readyz")).await.unwrap();
    assert_eq!(r.text(), "ok 0");
    let r = get(&format!("http://{}/readyz", e.sidecar.admin)).await.unwrap();
    assert_ne!(r.text(), "ok 0");
    assert_ne!(e.sidecar.egress.port(), e.sidecar.admin.port());
}
