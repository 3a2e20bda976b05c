//! The raw-head framing guard: follows a connection's read side request by request (head,
//! then its body by `Content-Length` or chunked coding, then the next head) and judges
//! each head's framing on the wire, pipelined requests included.
//!
//! Why on the wire: hyper hides what a front proxy may read differently (identical
//! `Content-Length` lines merged, `Content-Length` dropped next to `Transfer-Encoding`).
//! Pure: bytes in, one verdict per request head out, in order; the listener pairs them
//! with the requests hyper hands to the service.
//!
//! When the guard cannot follow the stream any more (a head or chunk line it cannot
//! parse, a head past [`MAX_HEAD`], an upgrade or CONNECT, a refused head after which
//! hyper closes anyway) it stops judging: later requests get no verdict and only the
//! hyper-level check applies. Everything it gives up on, hyper refuses or closes on.

use std::collections::VecDeque;

/// Raw heads (and chunk lines) larger than this are not followed: hyper refuses heads
/// past `max_header_bytes` (431) anyway.
pub const MAX_HEAD: usize = 256 << 10;
/// A chunk-size line (size and extensions) longer than this is not followed.
const MAX_CHUNK_LINE: usize = 4096;

/// The start of the HTTP/2 connection preface (RFC 9113 §3.4), which reads as a head.
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// What is wrong with one request head's framing, if anything.
pub type Verdict = Option<&'static str>;

#[derive(Debug)]
enum State {
    /// Reading a request head (or, `trailers`, a chunked body's trailer section) into
    /// `buf` until its blank line.
    Head {
        buf: Vec<u8>,
        trailers: bool,
    },
    /// Skipping a fixed-length body.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize(Vec<u8>),
    /// Skipping chunk data, then its line end.
    ChunkData(u64),
    ChunkDataEnd,
    /// Not following this connection any more.
    Lost,
    /// The connection opened with the HTTP/2 preface: nothing on it is HTTP/1 framing.
    Http2,
}

/// One connection's guard. Feed it every read with [`Guard::read`]; take the verdict of
/// each request hyper hands over with [`Guard::next_verdict`].
#[derive(Debug)]
pub struct Guard {
    state: State,
    verdicts: VecDeque<Verdict>,
    /// A head was read: the HTTP/2 preface counts only as the connection's first bytes.
    seen_head: bool,
}

impl Default for Guard {
    fn default() -> Self {
        Self { state: State::Head { buf: Vec::new(), trailers: false }, verdicts: VecDeque::new(), seen_head: false }
    }
}

impl Guard {
    /// The verdict of the next request hyper parsed, in order; `None` once the guard lost
    /// track (see the module doc) or when nothing is known.
    pub fn next_verdict(&mut self) -> Verdict {
        self.verdicts.pop_front().flatten()
    }

    /// The next verdict not yet taken, `None` when there is none (for the fuzz target,
    /// which tells "no verdict left" from "a verdict of no problem").
    pub fn pending_verdict(&mut self) -> Option<Verdict> {
        self.verdicts.pop_front()
    }

    /// Whether the connection opened with the HTTP/2 preface (h2c, prior knowledge).
    pub fn is_http2(&self) -> bool {
        matches!(self.state, State::Http2)
    }

    /// Follows the stream over `data`.
    pub fn read(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let used = self.step(data);
            data = &data[used..];
        }
    }

    /// Consumes a prefix of `data` (at least one byte unless lost); returns its length.
    fn step(&mut self, data: &[u8]) -> usize {
        match &mut self.state {
            State::Lost | State::Http2 => data.len(),
            State::Body(n) | State::ChunkData(n) => {
                let used = usize::try_from(*n).unwrap_or(usize::MAX).min(data.len());
                *n -= used as u64;
                if *n == 0 {
                    self.state = match self.state {
                        State::Body(_) => head_state(),
                        _ => State::ChunkDataEnd,
                    };
                }
                used
            }
            State::ChunkDataEnd => {
                // CRLF (or a bare LF) after the data; anything else is hyper's error.
                match data[0] {
                    b'\r' => 1,
                    b'\n' => {
                        self.state = State::ChunkSize(Vec::new());
                        1
                    }
                    _ => {
                        self.state = State::Lost;
                        data.len()
                    }
                }
            }
            State::ChunkSize(buf) => {
                let Some(nl) = data.iter().position(|&b| b == b'\n') else {
                    buf.extend_from_slice(data);
                    if buf.len() > MAX_CHUNK_LINE {
                        self.state = State::Lost;
                    }
                    return data.len();
                };
                buf.extend_from_slice(&data[..nl]);
                self.state = match chunk_size(buf) {
                    Some(0) => State::Head { buf: Vec::new(), trailers: true },
                    Some(n) => State::ChunkData(n),
                    None => State::Lost,
                };
                nl + 1
            }
            State::Head { .. } => self.step_head(data),
        }
    }

    /// Reads a head (or trailer section); returns how much of `data` it used.
    fn step_head(&mut self, data: &[u8]) -> usize {
        let State::Head { buf, trailers } = &mut self.state else { unreachable!("only called in Head") };
        let trailers = *trailers;
        // Blank lines before a request line are skipped (RFC 9112 §2.2), as hyper does.
        if !trailers && buf.is_empty() {
            let skip = data.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
            if skip > 0 {
                return skip;
            }
        }
        // The usual case, a whole head in one read, is judged in place, uncopied.
        if buf.is_empty() {
            if let Some(end) = head_end_from(data, 0) {
                self.head_done(&data[..end], trailers);
                return end;
            }
        }
        let prior = buf.len();
        // Where the blank line may start: a few bytes back, in case it was split.
        let from = prior.saturating_sub(3);
        buf.extend_from_slice(data);
        match head_end_from(buf, from) {
            Some(end) => {
                let head = std::mem::take(buf);
                self.head_done(&head[..end], trailers);
                end - prior
            }
            None => {
                if buf.len() > MAX_HEAD {
                    self.state = State::Lost;
                }
                data.len()
            }
        }
    }

    /// A head (or trailer section) is complete: judge it and follow its body.
    fn head_done(&mut self, head: &[u8], trailers: bool) {
        if trailers {
            self.state = head_state();
            return;
        }
        let first = !std::mem::replace(&mut self.seen_head, true);
        if first && head.starts_with(HTTP2_PREFACE) {
            // h2c with prior knowledge: its requests are HTTP/2 frames, never judged here.
            self.state = State::Http2;
            return;
        }
        let frame = frame(head);
        self.verdicts.push_back(frame.problem);
        self.state = match frame {
            // Refused with `Connection: close`: nothing after it is parsed.
            Frame { problem: Some(_), .. } => State::Lost,
            // The connection may become a tunnel after the head.
            Frame { upgrade: true, .. } => State::Lost,
            Frame { chunked: true, .. } => State::ChunkSize(Vec::new()),
            Frame { length: Some(0) | None, .. } => head_state(),
            Frame { length: Some(n), .. } => State::Body(n),
        };
        if frame.unparsed_length {
            self.state = State::Lost;
        }
    }
}

fn head_state() -> State {
    State::Head { buf: Vec::new(), trailers: false }
}

/// The end of a head (just past its blank line) in `b`, lines ending in CRLF or LF,
/// looking at line ends from `from` on.
fn head_end_from(b: &[u8], from: usize) -> Option<usize> {
    // One pass: each line's start is carried from the line before (looking it up again
    // per line scanned every line twice; this runs on every request head, issue 14).
    let mut line_start = memchr::memrchr(b'\n', &b[..from]).map_or(0, |p| p + 1);
    let mut i = from;
    while let Some(nl) = memchr::memchr(b'\n', &b[i..]) {
        let nl = i + nl;
        // The line before this LF is empty, or just a CR: blank. A head's first line
        // (or a trailer section that is empty) can be blank too.
        let line = &b[line_start..nl];
        if line.is_empty() || line == b"\r" {
            return Some(nl + 1);
        }
        line_start = nl + 1;
        i = nl + 1;
    }
    None
}

/// A chunk-size line's size (hex, before any `;` extension); `None` if unparseable.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let size = line.split(|&b| b == b';').next()?.trim_ascii();
    if size.is_empty() || size.len() > 15 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(size).ok()?, 16).ok()
}

/// What a request head says about its body, and what is wrong with its framing.
#[derive(Debug, Clone, Copy, Default)]
struct Frame {
    problem: Verdict,
    chunked: bool,
    length: Option<u64>,
    unparsed_length: bool,
    upgrade: bool,
}

fn frame(head: &[u8]) -> Frame {
    // Every request head is read twice, by hyper and here, so this scan is kept cheap
    // (issue 14): line ends and colons found with memchr, and a header's name compared only
    // when its length is one of the three that matter.
    let mut start = 0;
    let mut lines = memchr::memchr_iter(b'\n', head).map(Some).chain(std::iter::once(None)).map(|end| {
        let end = end.unwrap_or(head.len());
        let line = &head[start.min(end)..end];
        start = end + 1;
        line
    });
    let request_line = lines.next().unwrap_or_default();
    let mut f = Frame { upgrade: request_line.starts_with(b"CONNECT "), ..Frame::default() };
    let (mut cl, mut te) = (0, 0);
    let mut te_chunked_only = true;
    for line in lines {
        let Some(colon) = memchr::memchr(b':', line) else { continue };
        let name = line[..colon].trim_ascii();
        let value = || line[colon + 1..].trim_ascii();
        match name.len() {
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                cl += 1;
                f.length = std::str::from_utf8(value()).ok().filter(|v| v.bytes().all(|b| b.is_ascii_digit())).and_then(|v| v.parse().ok());
                f.unparsed_length |= f.length.is_none();
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                te += 1;
                te_chunked_only &= value().eq_ignore_ascii_case(b"chunked");
                f.chunked = true;
            }
            7 if name.eq_ignore_ascii_case(b"upgrade") => f.upgrade = true,
            _ => {}
        }
    }
    f.problem = if cl > 1 {
        Some("more than one Content-Length header")
    } else if te > 1 {
        Some("more than one Transfer-Encoding header")
    } else if te == 1 && !te_chunked_only {
        Some("unsupported Transfer-Encoding (only chunked)")
    } else if cl > 0 && te > 0 {
        Some("both Content-Length and Transfer-Encoding")
    } else {
        None
    };
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framing_problem(head: &[u8]) -> Verdict {
        frame(head).problem
    }

    fn verdicts(stream: &[u8], piece: usize) -> Vec<Verdict> {
        let mut g = Guard::default();
        for p in stream.chunks(piece.max(1)) {
            g.read(p);
        }
        std::iter::from_fn(|| g.verdicts.pop_front()).collect()
    }

    #[test]
    fn framing_is_judged_on_the_raw_head() {
        let head = |h: &str| format!("POST / HTTP/1.1\r\nHost: x\r\n{h}");
        assert_eq!(framing_problem(head("Content-Length: 3\r\n").as_bytes()), None);
        assert_eq!(framing_problem(head("Transfer-Encoding: chunked\r\n").as_bytes()), None);
        assert_eq!(framing_problem(head("TRANSFER-ENCODING:  Chunked \r\n").as_bytes()), None);
        assert!(framing_problem(head("Content-Length: 3\r\ncontent-length: 3\r\n").as_bytes()).is_some());
        assert!(framing_problem(head("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n").as_bytes()).is_some());
        assert!(framing_problem(head("Transfer-Encoding: gzip, chunked\r\n").as_bytes()).is_some());
        assert!(framing_problem(head("Content-Length: 3\r\nTransfer-Encoding: chunked\r\n").as_bytes()).is_some());
        // The request line is not a header, whatever it contains.
        assert_eq!(framing_problem(b"GET /content-length:1 HTTP/1.1\r\nContent-Length: 0\r\n"), None);
    }

    const BAD: &str = "POST /b HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx";

    #[test]
    fn every_pipelined_head_is_judged_whatever_the_read_split() {
        let cases = [
            format!("POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc{BAD}"),
            format!("GET /a HTTP/1.1\r\n\r\n\r\n{BAD}"),
            format!(
                "POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nT: 1\r\n\r\n{BAD}"
            ),
            format!("POST /a HTTP/1.1\nContent-Length: 2\n\nab{BAD}"),
        ];
        for case in &cases {
            for piece in [1, 2, 3, 5, 7, 64, 4096] {
                let v = verdicts(case.as_bytes(), piece);
                assert_eq!(v.len(), 2, "{case:?} split {piece}: {v:?}");
                assert_eq!(v[0], None, "{case:?} split {piece}");
                assert_eq!(v[1], Some("more than one Content-Length header"), "{case:?} split {piece}");
            }
        }
    }

    #[test]
    fn body_bytes_that_look_like_a_head_are_not_judged() {
        let body = "GET /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        let stream = format!("POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}GET /c HTTP/1.1\r\n\r\n", body.len());
        for piece in [1, 4, 4096] {
            assert_eq!(verdicts(stream.as_bytes(), piece), [None, None], "split {piece}");
        }
    }

    #[test]
    fn the_guard_stops_after_what_it_cannot_follow() {
        // Refused (closed), upgraded, unparseable length or chunk size: nothing after is judged.
        for first in [
            BAD.to_string(),
            "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n".into(),
            "CONNECT h:443 HTTP/1.1\r\n\r\n".into(),
            "POST /a HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc".into(),
            "POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".into(),
        ] {
            let v = verdicts(format!("{first}{BAD}").as_bytes(), 4096);
            assert_eq!(v.len(), 1, "{first:?}: {v:?}");
        }
        let mut g = Guard::default();
        g.read(&vec![b'a'; MAX_HEAD + 10]);
        g.read(b"\r\n\r\n");
        assert_eq!(g.next_verdict(), None);
        assert!(g.verdicts.is_empty());
    }

    #[test]
    fn an_http2_connection_is_not_judged() {
        // The preface, then frames whose bytes could look like a bad HTTP/1 head.
        let stream = format!("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\x12\x04\0{BAD}");
        for piece in [1, 3, 4096] {
            let mut g = Guard::default();
            for p in stream.as_bytes().chunks(piece) {
                g.read(p);
            }
            assert!(g.is_http2(), "split {piece}");
            assert!(g.verdicts.is_empty(), "split {piece}");
        }
        // Only as the connection's first bytes: later, hyper reads it as an HTTP/1 request.
        let v = verdicts(format!("GET / HTTP/1.1\r\n\r\nPRI * HTTP/2.0\r\n\r\n{BAD}").as_bytes(), 4096);
        assert_eq!(v, [None, None, Some("more than one Content-Length header")]);
    }
}
