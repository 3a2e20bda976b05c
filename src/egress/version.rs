//! HTTP/1.1 and HTTP/2 (h2c, prior knowledge) on one port: the connection's first bytes
//! tell which, and hyper's own builder for that version serves it.
//!
//! hyper-util's `auto` builder does the same, but it replays the preface bytes it read as
//! a first read of their own. hyper's HTTP/1 reader then wants 8 KiB free beside those 24
//! bytes and doubles its buffer, so every HTTP/1 connection kept a 16 KiB read buffer
//! instead of 8 (issue 14: massif, 200 idle connections). Here the replayed bytes and
//! whatever the socket has after them arrive in one read (`Replay`, used by the listener's
//! `TrackedIo`), so hyper parses the usual one-read head without growing its buffer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::Body;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::HttpLimits;
use crate::egress::BoxError;

/// The HTTP/2 connection preface (RFC 9113, section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Version {
    Http1,
    Http2,
}

/// The bytes read to tell the version, given back before anything else is read.
#[derive(Debug, Default)]
pub(super) struct Replay {
    buf: [u8; PREFACE.len()],
    at: usize,
    len: usize,
}

impl Replay {
    /// Copies what is left to replay into `out`; the number of bytes copied.
    pub(super) fn take_into(&mut self, out: &mut ReadBuf<'_>) -> usize {
        let n = (self.len - self.at).min(out.remaining());
        out.put_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        n
    }

    #[cfg(test)]
    fn bytes(&self) -> &[u8] {
        &self.buf[self.at..self.len]
    }
}

/// Reads a connection's first bytes until they tell its version: the whole preface is
/// HTTP/2, any byte off it HTTP/1. `None` if the peer closed or failed first. The caller
/// bounds the wait (the listener's `header_read_timeout`, and its stop).
pub(super) async fn sniff(stream: &mut TcpStream) -> Option<(Version, Replay)> {
    let mut r = Replay::default();
    loop {
        // At most the rest of the preface: what follows it belongs to hyper.
        let n = stream.read(&mut r.buf[r.len..]).await.ok()?;
        if n == 0 {
            return None;
        }
        r.len += n;
        if !PREFACE.starts_with(&r.buf[..r.len]) {
            return Some((Version::Http1, r));
        }
        if r.len == PREFACE.len() {
            return Some((Version::Http2, r));
        }
    }
}

/// The I/O either version's connection can be served over.
pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// A service either version can serve: what hyper's two builders ask of it (HTTP/2 runs
/// each request's future as a task of its own, hence `Send + 'static`), named once.
pub(super) trait Served:
    HttpService<Incoming, Future: Send + 'static, ResBody: Body<Data: Send, Error: Into<BoxError>> + Send + 'static>
{
}
impl<S> Served for S where
    S: HttpService<Incoming, Future: Send + 'static, ResBody: Body<Data: Send, Error: Into<BoxError>> + Send + 'static>
{
}

/// hyper's builders, configured once from the listener's limits.
pub(super) struct Builders {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

impl Builders {
    pub(super) fn new(limits: &HttpLimits) -> Self {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            // The listener's watchdog times heads, on both versions alike. hyper's own timer
            // runs while a keep-alive connection idles, so it would cut every idle connection
            // at the header timeout.
            .header_read_timeout(None)
            .max_headers(limits.max_headers)
            .max_buf_size(limits.max_header_bytes.max(8192))
            .keep_alive(true);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        // Advertised in SETTINGS; a larger header block is answered 431 by h2 itself.
        h2.timer(TokioTimer::new()).max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
        Self { h1, h2 }
    }

    /// Serves `io` as `version`; HTTP/1 with upgrades (CONNECT tunnels and WebSocket take
    /// the connection over after the head).
    pub(super) fn serve<I: Io, S: Served>(&self, version: Version, io: I, service: S) -> Conn<I, S> {
        let io = TokioIo::new(io);
        match version {
            Version::Http1 => Conn::Http1(Box::pin(self.h1.serve_connection(io, service).with_upgrades())),
            Version::Http2 => Conn::Http2(Box::pin(self.h2.serve_connection(io, service))),
        }
    }
}

/// One served connection, of either version. Each is boxed: the watchdog's task then
/// holds a pointer, and the enum is `Unpin` without projecting pins.
pub(super) enum Conn<I, S: Served> {
    Http1(Pin<Box<http1::UpgradeableConnection<TokioIo<I>, S>>>),
    Http2(Pin<Box<http2::Connection<TokioIo<I>, S, TokioExecutor>>>),
}

impl<I: Io, S: Served> Conn<I, S> {
    /// Stops taking requests: HTTP/1 closes once the one in flight is answered, HTTP/2
    /// sends GOAWAY and lets its open streams finish.
    pub(super) fn graceful_shutdown(&mut self) {
        match self {
            Conn::Http1(c) => c.as_mut().graceful_shutdown(),
            Conn::Http2(c) => c.as_mut().graceful_shutdown(),
        }
    }
}

impl<I: Io, S: Served> Future for Conn<I, S> {
    type Output = Result<(), hyper::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Conn::Http1(c) => c.as_mut().poll(cx),
            Conn::Http2(c) => c.as_mut().poll(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;
    use tokio::net::TcpListener;

    /// Both ends of a real loopback connection: the client's and the listener's.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    /// Waits until `n` bytes are on the server's socket, unread.
    async fn arrived(server: &TcpStream, n: usize) {
        let mut buf = vec![0u8; n];
        while server.peek(&mut buf).await.unwrap() < n {
            server.readable().await.unwrap();
        }
    }

    /// `first` is sniffed alone (the sniffer must wait for more), then `rest` arrives.
    async fn in_two_parts(first: &[u8], rest: &[u8]) -> Option<(Version, Vec<u8>)> {
        let (mut client, mut server) = pair().await;
        client.write_all(first).await.unwrap();
        arrived(&server, first.len()).await;
        let mut fut = Box::pin(sniff(&mut server));
        assert!(futures::poll!(&mut fut).is_pending(), "{first:?} alone tells no version");
        client.write_all(rest).await.unwrap();
        fut.await.map(|(v, r)| (v, r.bytes().to_vec()))
    }

    #[tokio::test]
    async fn http1_is_told_at_its_first_byte_off_the_preface() {
        let head: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let (mut client, mut server) = pair().await;
        client.write_all(head).await.unwrap();
        let (v, r) = sniff(&mut server).await.unwrap();
        assert_eq!(v, Version::Http1);
        // Never more than the preface's length: the rest stays on the socket for hyper.
        assert!(!r.bytes().is_empty() && r.bytes().len() <= PREFACE.len());
        assert_eq!(r.bytes(), &head[..r.bytes().len()]);
        // A method that starts like the preface is still HTTP/1 once it differs.
        let got = in_two_parts(b"PRI * HT", b"TP/1.1\r\n\r\n").await;
        assert_eq!(got, Some((Version::Http1, b"PRI * HTTP/1.1\r\n\r\n".to_vec())));
    }

    #[tokio::test]
    async fn http2_needs_the_whole_preface_even_in_parts() {
        let got = in_two_parts(&PREFACE[..5], &PREFACE[5..]).await;
        assert_eq!(got, Some((Version::Http2, PREFACE.to_vec())));
    }

    #[tokio::test]
    async fn a_peer_that_closes_first_is_no_version() {
        for sent in [&b""[..], &PREFACE[..10]] {
            let (mut client, mut server) = pair().await;
            client.write_all(sent).await.unwrap();
            drop(client);
            assert!(sniff(&mut server).await.is_none(), "{sent:?}");
        }
    }

    #[test]
    fn replay_gives_back_its_bytes_across_small_reads() {
        let mut r = Replay { len: 5, ..Replay::default() };
        r.buf[..5].copy_from_slice(b"hello");
        let mut out = [0u8; 3];
        let mut rb = ReadBuf::new(&mut out);
        assert_eq!(r.take_into(&mut rb), 3);
        assert_eq!(rb.filled(), b"hel");
        let mut out = [0u8; 8];
        let mut rb = ReadBuf::new(&mut out);
        assert_eq!(r.take_into(&mut rb), 2);
        assert_eq!(rb.filled(), b"lo");
        assert_eq!(r.take_into(&mut rb), 0);
    }
}
