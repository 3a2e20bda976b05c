//! The streamed-reply wire contract, as pure functions both sides share: its headers,
//! the sequence check a reader runs on every message, the SSE event splitter a responder
//! frames an event stream with, and the payload splitter for the server's `max_payload`.
//!
//! A streamed reply is a sequence of messages to the request's reply subject, each with
//! `Bridge-Stream-Seq: N` (1, 2, 3…). The first also carries `Bridge-Status`, the
//! response headers and `Bridge-Stream-Control: <subject>`; the last `Bridge-Stream: end`;
//! a failure after the start ends it with `Bridge-Stream: error` and a problem+json
//! payload. The reader publishes `Bridge-Stream: cancel` to the control subject to stop it,
//! or to the reply subject of the latest message when that is under the control subject
//! (`<control>.<seq>`, what our responder sends): NATS response permissions let a reader
//! answer only reply subjects it received, each once.

use bytes::{Bytes, BytesMut};
use http::HeaderMap;

pub const STREAM_SEQ: &str = "Bridge-Stream-Seq";
pub const STREAM: &str = crate::codec::BRIDGE_STREAM;
pub const STREAM_CONTROL: &str = "Bridge-Stream-Control";
pub const END: &str = "end";
pub const ERROR: &str = "error";
pub const CANCEL: &str = "cancel";

/// The headers ours on a streamed reply, never passed to the HTTP client.
pub const CONTROL_HEADERS: &[&str] = &[STREAM_SEQ, STREAM, STREAM_CONTROL];

/// What a message of a stream says, besides its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// More body follows.
    Data,
    /// The last message: its payload is the last of the body.
    End,
    /// The responder failed after the start; the payload is a problem+json document.
    Error,
}

/// Why a message cannot continue a stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("a message of the stream has no {STREAM_SEQ} header")]
    NoSequence,
    #[error("{STREAM_SEQ} {0:?} is not a positive number")]
    BadSequence(String),
    #[error("message {got} of the stream arrived where {expected} was due (lost or reordered)")]
    Gap { expected: u64, got: u64 },
    #[error("{STREAM} {0:?} is not end or error")]
    BadMarker(String),
}

/// Whether a reply starts a stream: it carries a sequence number.
pub fn is_stream(headers: Option<&async_nats::HeaderMap>) -> bool {
    headers.and_then(|h| h.get(STREAM_SEQ)).is_some()
}

/// The reader's view of the sequence: every message must be the next one.
#[derive(Debug)]
pub struct Sequence {
    next: u64,
}

impl Default for Sequence {
    fn default() -> Self {
        Self { next: 1 }
    }
}

impl Sequence {
    /// Checks the next message's headers: its number must be the one due.
    pub fn accept(&mut self, headers: Option<&async_nats::HeaderMap>) -> Result<Part, WireError> {
        let h = headers.ok_or(WireError::NoSequence)?;
        let raw = h.get(STREAM_SEQ).ok_or(WireError::NoSequence)?.as_str();
        let got = raw.trim().parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| WireError::BadSequence(raw.to_owned()))?;
        if got != self.next {
            return Err(WireError::Gap { expected: self.next, got });
        }
        self.next += 1;
        match h.get(STREAM).map(|v| v.as_str()) {
            None => Ok(Part::Data),
            Some(END) => Ok(Part::End),
            Some(ERROR) => Ok(Part::Error),
            Some(other) => Err(WireError::BadMarker(other.to_owned())),
        }
    }
}

/// The headers of message `seq`; `part` other than `Data` marks the end.
pub fn message_headers(seq: u64, part: Part) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    add_message_headers(&mut h, seq, part);
    h
}

/// Adds the sequence and end marker to `h` (the first message's response headers).
pub fn add_message_headers(h: &mut async_nats::HeaderMap, seq: u64, part: Part) {
    h.insert(STREAM_SEQ, seq.to_string().as_str());
    match part {
        Part::Data => {}
        Part::End => h.insert(STREAM, END),
        Part::Error => h.insert(STREAM, ERROR),
    }
}

/// Whether `reply` is the control subject or a subject under it (`<control>.<seq>`).
pub fn is_under_control(control: &str, reply: &str) -> bool {
    reply.strip_prefix(control).is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// Whether a control message asks the responder to stop.
pub fn is_cancel(headers: Option<&async_nats::HeaderMap>) -> bool {
    headers.and_then(|h| h.get(STREAM)).is_some_and(|v| v.as_str() == CANCEL)
}

/// `Content-Type: text/event-stream` (any parameters, any case).
pub fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
}

/// Whether an app's response body has an unknown length (chunked or until close) or is
/// an event stream: such a body travels as a streamed reply, as it arrives.
pub fn has_open_body(status: http::StatusCode, headers: &HeaderMap) -> bool {
    let bodiless = status.is_informational() || status == http::StatusCode::NO_CONTENT || status == http::StatusCode::NOT_MODIFIED;
    !bodiless && (is_event_stream(headers) || !headers.contains_key(http::header::CONTENT_LENGTH))
}

/// Cuts an event-stream body into whole events, whatever the chunking it arrived in: an
/// event ends at a blank line (`\n`, `\r\n` or `\r` line ends, as the SSE spec allows).
#[derive(Debug, Default)]
pub struct SseSplitter {
    buf: BytesMut,
    /// Scanned up to here without finding an event's end.
    scanned: usize,
    /// The byte at `scanned` starts a line.
    line_start: bool,
}

impl SseSplitter {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole event, blank line included, if one has arrived.
    pub fn next_event(&mut self) -> Option<Bytes> {
        let mut i = self.scanned;
        while i < self.buf.len() {
            let term = match self.buf[i] {
                b'\n' => 1,
                // A `\r` last in the buffer may be half of `\r\n`: wait for the next byte.
                b'\r' if i + 1 == self.buf.len() => break,
                b'\r' if self.buf[i + 1] == b'\n' => 2,
                b'\r' => 1,
                _ => 0,
            };
            if term == 0 {
                self.line_start = false;
                i += 1;
                continue;
            }
            if self.line_start {
                self.scanned = 0;
                return Some(self.buf.split_to(i + term).freeze());
            }
            self.line_start = true;
            i += term;
        }
        self.scanned = i;
        None
    }

    /// What is left of an unfinished event, at the end of the body.
    pub fn rest(&mut self) -> Bytes {
        self.scanned = 0;
        self.line_start = false;
        self.buf.split().freeze()
    }

    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// One SSE event for a message: `id:` (when known), `event:` (when named; line breaks
/// removed, they would end the field), and the payload as `data:` lines, however its
/// lines end, so a multi-line payload stays one event.
pub fn sse_event(id: Option<u64>, event: Option<&str>, data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + 32);
    if let Some(id) = id {
        out.extend_from_slice(format!("id: {id}\n").as_bytes());
    }
    if let Some(e) = event.map(|e| e.replace(['\r', '\n'], "")).filter(|e| !e.is_empty()) {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(e.as_bytes());
        out.push(b'\n');
    }
    let text = data;
    let mut start = 0;
    let mut i = 0;
    loop {
        let end_here = i == text.len() || text[i] == b'\n' || text[i] == b'\r';
        if end_here {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(&text[start..i]);
            out.push(b'\n');
            if i == text.len() {
                break;
            }
            // `\r\n` is one line end.
            i += if text[i] == b'\r' && text.get(i + 1) == Some(&b'\n') { 2 } else { 1 };
            start = i;
            continue;
        }
        i += 1;
    }
    out.push(b'\n');
    Bytes::from(out)
}

/// `payload` in pieces of at most `max` bytes (one piece when it fits; never none).
pub fn split(mut payload: Bytes, max: usize) -> Vec<Bytes> {
    let max = max.max(1);
    let mut out = Vec::with_capacity(payload.len() / max + 1);
    while payload.len() > max {
        out.push(payload.split_to(max));
    }
    out.push(payload);
    out
}

/// The bytes `h` takes on the wire (an estimate from above), to keep a message with its
/// headers under `max_payload`.
pub fn headers_len(h: &async_nats::HeaderMap) -> usize {
    h.iter().map(|(n, vs)| vs.iter().map(|v| AsRef::<str>::as_ref(n).len() + v.as_str().len() + 4).sum::<usize>()).sum::<usize>() + 16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_goes_only_to_the_control_subject_or_under_it() {
        assert!(is_under_control("_INBOX.a.7", "_INBOX.a.7"));
        assert!(is_under_control("_INBOX.a.7", "_INBOX.a.7.3"));
        assert!(!is_under_control("_INBOX.a.7", "_INBOX.a.71"), "another token");
        assert!(!is_under_control("_INBOX.a.7", "_INBOX.a"));
        assert!(!is_under_control("_INBOX.a.7", "orders.create"));
    }

    fn h(pairs: &[(&str, &str)]) -> async_nats::HeaderMap {
        let mut m = async_nats::HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, *v);
        }
        m
    }

    #[test]
    fn the_sequence_must_run_one_by_one() {
        let mut s = Sequence::default();
        assert_eq!(s.accept(Some(&h(&[(STREAM_SEQ, "1")]))), Ok(Part::Data));
        assert_eq!(s.accept(Some(&h(&[(STREAM_SEQ, "3")]))), Err(WireError::Gap { expected: 2, got: 3 }));
        assert_eq!(s.accept(Some(&h(&[(STREAM_SEQ, "2"), (STREAM, END)]))), Ok(Part::End));
        assert_eq!(s.accept(Some(&h(&[(STREAM_SEQ, "3"), (STREAM, ERROR)]))), Ok(Part::Error));
        assert_eq!(s.accept(Some(&h(&[(STREAM_SEQ, "3")]))), Err(WireError::Gap { expected: 4, got: 3 }), "a duplicate is a gap too");
        assert_eq!(s.accept(None), Err(WireError::NoSequence));
        assert_eq!(s.accept(Some(&h(&[(STREAM_SEQ, "x")]))), Err(WireError::BadSequence("x".into())));
        let mut s = Sequence::default();
        assert_eq!(s.accept(Some(&h(&[(STREAM_SEQ, "1"), (STREAM, "done")]))), Err(WireError::BadMarker("done".into())));
    }

    #[test]
    fn message_headers_round_trip() {
        let mut s = Sequence::default();
        assert_eq!(s.accept(Some(&message_headers(1, Part::Data))), Ok(Part::Data));
        assert_eq!(s.accept(Some(&message_headers(2, Part::End))), Ok(Part::End));
        assert!(is_cancel(Some(&h(&[(STREAM, CANCEL)]))) && !is_cancel(Some(&h(&[(STREAM, END)]))) && !is_cancel(None));
    }

    #[test]
    fn sse_events_come_out_whole_whatever_the_chunking() {
        let body = b"data: a\n\nid: 2\r\ndata: b\r\ndata: c\r\n\r\n: comment\r\rdata: d\n\ndata: tail";
        let whole = {
            let mut s = SseSplitter::default();
            s.push(body);
            std::iter::from_fn(|| s.next_event()).collect::<Vec<_>>()
        };
        assert_eq!(whole, vec![&b"data: a\n\n"[..], b"id: 2\r\ndata: b\r\ndata: c\r\n\r\n", b": comment\r\r", b"data: d\n\n"]);
        // Byte by byte: the same events, and the unfinished one stays for `rest`.
        let mut s = SseSplitter::default();
        let mut events = Vec::new();
        for b in body {
            s.push(&[*b]);
            events.extend(std::iter::from_fn(|| s.next_event()));
        }
        assert_eq!(events, whole);
        assert_eq!(s.rest(), &b"data: tail"[..]);
        assert_eq!(s.buffered(), 0);
    }

    #[test]
    fn open_bodies_are_chunked_or_event_streams() {
        let mut hm = HeaderMap::new();
        assert!(has_open_body(http::StatusCode::OK, &hm));
        assert!(!has_open_body(http::StatusCode::NO_CONTENT, &hm));
        hm.insert(http::header::CONTENT_LENGTH, "3".parse().unwrap());
        assert!(!has_open_body(http::StatusCode::OK, &hm));
        hm.insert(http::header::CONTENT_TYPE, "Text/Event-Stream; charset=utf-8".parse().unwrap());
        assert!(has_open_body(http::StatusCode::OK, &hm));
    }

    #[test]
    fn sse_events_frame_multi_line_payloads_and_names() {
        assert_eq!(&sse_event(Some(7), Some("token"), b"hi")[..], b"id: 7\nevent: token\ndata: hi\n\n");
        assert_eq!(&sse_event(None, None, b"a\nb\r\nc\rd")[..], b"data: a\ndata: b\ndata: c\ndata: d\n\n");
        assert_eq!(&sse_event(Some(1), Some("x\ny"), b"")[..], b"id: 1\nevent: xy\ndata: \n\n");
        assert_eq!(&sse_event(None, None, b"end\n")[..], b"data: end\ndata: \n\n");
        // Whatever the payload, the event parses back into one event with the same data.
        let payload = b"line one\n\nline three: with colon\r\n";
        let framed = sse_event(Some(2), None, payload);
        let mut split = SseSplitter::default();
        split.push(&framed);
        assert_eq!(split.next_event().as_deref(), Some(&framed[..]));
        let data: Vec<&str> = std::str::from_utf8(&framed).unwrap().lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        assert_eq!(data.join("\n"), "line one\n\nline three: with colon\n");
    }

    #[test]
    fn split_keeps_every_byte_in_order() {
        let p = Bytes::from_static(b"abcdefg");
        assert_eq!(split(p.clone(), 3), vec![&b"abc"[..], b"def", b"g"]);
        assert_eq!(split(p.clone(), 7), vec![p.clone()]);
        assert_eq!(split(Bytes::new(), 3), vec![Bytes::new()]);
    }
}
