//! The keep-alive connections to the app: HTTP/1 over TCP to one origin, the most recently
//! used first.
//!
//! hyper-util's pooled client did this for any number of origins. On the request path it
//! cost ~5,000 instructions a message (callgrind, issue 14): a SipHash of the pool key on
//! checkout and again on check-in, a checkout future raced against a lazy connect, the
//! response future boxed. A sidecar talks to one app, so here the pool is a stack of idle
//! connections behind a lock, emptied when `app_url` changes origin on a reload. The
//! protocol is still hyper's (`client::conn::http1`); this module only chooses a connection.
//!
//! What it keeps of that client's behaviour:
//! - a request that a reused connection could not start (the app closed it while idle) is
//!   sent again on another, and never one that was started;
//! - a connection returns to the pool only once hyper can send on it again, that is after
//!   the response's body was read (a streamed body can take a while);
//! - connections idle for [`IDLE_TIMEOUT`] are closed, at most [`MAX_IDLE`] are kept;
//! - TCP_NODELAY (small exchanges: Nagle would add up to 40 ms to each) and TCP keep-alive.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::AppError;
use crate::problem::error_chain;

/// How long an unused connection stays open.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The most idle connections kept; more are closed as they finish.
pub(super) const MAX_IDLE: usize = 1024;
/// TCP keep-alive probes start after this long without traffic.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

type Sender = SendRequest<Full<Bytes>>;

/// The pool. Cheap to clone; clones share the connections.
#[derive(Clone, Default)]
pub(super) struct Pool {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    /// The origin the connections go to: `(host, port)`, the host without IPv6 brackets.
    origin: Option<(String, u16)>,
    /// Oldest first; taken from the back.
    conns: VecDeque<(Sender, Instant)>,
    /// Whether the task closing long-idle connections runs.
    sweeping: bool,
}

impl Idle {
    /// Whether the pooled connections go to `host:port`.
    fn goes_to(&self, host: &str, port: u16) -> bool {
        self.origin.as_ref().is_some_and(|(h, p)| h == host && *p == port)
    }
}

impl Pool {
    /// Sends `req` (absolute URI, `Host` set) on an idle connection to its origin, or on a
    /// new one; returns once the response head arrived. The body is the caller's to read;
    /// dropping it, or this future, before the end closes the connection.
    pub(super) async fn send(&self, mut req: Request<Full<Bytes>>) -> Result<Response<Incoming>, AppError> {
        // On a connection to the origin itself the request line carries the path only.
        let path = req.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        let uri = std::mem::replace(req.uri_mut(), Uri::from(path));
        let (host, port) = origin(&uri).ok_or_else(|| AppError::BadUri(uri.to_string()))?;
        loop {
            let (mut conn, reused) = match self.checkout(host, port) {
                Some(conn) => (conn, true),
                None => (self.connect(host, port).await?, false),
            };
            match conn.try_send_request(req).await {
                Ok(res) => {
                    self.checkin_when_ready(conn, host, port);
                    return Ok(res);
                }
                Err(mut e) => match e.take_message() {
                    // Not started: the connection was closed while idle. A fresh connection
                    // failing so is the app's answer, not a stale connection.
                    Some(back) if reused => {
                        tracing::debug!(error = %e.error(), "idle app connection was closed; sending on another");
                        req = back;
                    }
                    _ => return Err(AppError::Unreachable(error_chain(&e.into_error()))),
                },
            }
        }
    }

    /// The most recently used idle connection to `host:port` that can take a request.
    fn checkout(&self, host: &str, port: u16) -> Option<Sender> {
        let mut idle = self.inner.idle.lock().unwrap_or_else(|e| e.into_inner());
        if !idle.goes_to(host, port) {
            // `app_url` moved: what is pooled goes to the old app.
            idle.conns.clear();
            idle.origin = Some((host.to_owned(), port));
            return None;
        }
        while let Some((conn, since)) = idle.conns.pop_back() {
            // Closed by the app (hyper saw the EOF), or past its idle time.
            if conn.is_ready() && since.elapsed() < IDLE_TIMEOUT {
                return Some(conn);
            }
        }
        None
    }

    /// Puts `conn` back once hyper can send on it again: at once after a response whose
    /// body was read with its head, otherwise when the body has been read (a task waits).
    fn checkin_when_ready(&self, mut conn: Sender, host: &str, port: u16) {
        if conn.is_ready() {
            return self.inner.checkin(conn, host, port);
        }
        if conn.is_closed() {
            return;
        }
        let inner = Arc::downgrade(&self.inner);
        let (host, port) = (host.to_owned(), port);
        tokio::spawn(async move {
            if conn.ready().await.is_ok() {
                if let Some(inner) = inner.upgrade() {
                    inner.checkin(conn, &host, port);
                }
            }
        });
    }

    /// A new connection to `host:port`, its addresses tried in the resolver's order.
    async fn connect(&self, host: &str, port: u16) -> Result<Sender, AppError> {
        let unreachable = |what: String, e: &dyn std::error::Error| AppError::Unreachable(format!("{what}: {}", error_chain(e)));
        let addrs = tokio::net::lookup_host((host, port)).await.map_err(|e| unreachable(format!("resolving {host:?}"), &e))?;
        let mut failed = None;
        let mut stream = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => failed = Some(unreachable(format!("connecting to {addr}"), &e)),
            }
        }
        let stream = stream.ok_or_else(|| failed.unwrap_or_else(|| AppError::Unreachable(format!("{host:?} resolved to no address"))))?;
        stream.set_nodelay(true).map_err(|e| unreachable("setting TCP_NODELAY".into(), &e))?;
        if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE)) {
            tracing::debug!(error = %e, "could not set TCP keep-alive on an app connection");
        }
        let (conn, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| unreachable("HTTP/1 handshake".into(), &e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %error_chain(&e), "app connection ended");
            }
        });
        self.start_sweeping();
        Ok(conn)
    }

    /// Starts the task that closes connections idle past [`IDLE_TIMEOUT`] while no request
    /// comes to take them; it ends with the pool.
    fn start_sweeping(&self) {
        let mut idle = self.inner.idle.lock().unwrap_or_else(|e| e.into_inner());
        if std::mem::replace(&mut idle.sweeping, true) {
            return;
        }
        tokio::spawn(sweep(Arc::downgrade(&self.inner)));
    }
}

impl Inner {
    fn checkin(&self, conn: Sender, host: &str, port: u16) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.goes_to(host, port) && idle.conns.len() < MAX_IDLE {
            idle.conns.push_back((conn, Instant::now()));
        }
    }

    /// Closes the connections idle past [`IDLE_TIMEOUT`] (the oldest are at the front).
    fn expire(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while idle.conns.front().is_some_and(|(c, since)| c.is_closed() || since.elapsed() >= IDLE_TIMEOUT) {
            idle.conns.pop_front();
        }
    }
}

async fn sweep(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(IDLE_TIMEOUT / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        inner.expire();
    }
}

/// `(host, port)` of an absolute `http` URI, the host without IPv6 brackets.
fn origin(uri: &Uri) -> Option<(&str, u16)> {
    let host = uri.host()?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    Some((host, uri.port_u16().unwrap_or(80)))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    #[test]
    fn origins() {
        let o = |u: &str| origin(&u.parse().unwrap()).map(|(h, p)| (h.to_owned(), p));
        assert_eq!(o("http://127.0.0.1:8080/x"), Some(("127.0.0.1".into(), 8080)));
        assert_eq!(o("http://app/"), Some(("app".into(), 80)));
        assert_eq!(o("http://[::1]:3000/"), Some(("::1".into(), 3000)));
        assert_eq!(o("/relative"), None);
    }

    /// A raw HTTP/1 app on port 0: `conn` runs on each accepted connection, numbered from 0.
    async fn app<F, Fut>(conn: F) -> (String, Arc<AtomicUsize>)
    where
        F: Fn(TcpStream, usize) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(conn(s, count.fetch_add(1, Ordering::SeqCst)));
            }
        });
        (url, accepted)
    }

    /// Reads one request head (these requests have no body).
    async fn read_head(s: &mut TcpStream) -> Option<String> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).await.ok()? == 0 {
                return None;
            }
            head.push(byte[0]);
        }
        Some(String::from_utf8(head).unwrap())
    }

    /// Answers every request on the connection with `ok <connection> <request line>`.
    async fn keep_alive(mut s: TcpStream, n: usize) {
        while let Some(head) = read_head(&mut s).await {
            let body = format!("ok {n} {}", head.lines().next().unwrap());
            let res = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
            if s.write_all(res.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    async fn get(pool: &Pool, url: &str) -> Result<String, AppError> {
        let uri: Uri = url.parse().unwrap();
        let host = uri.authority().unwrap().as_str().to_owned();
        let req = Request::builder().uri(uri).header(http::header::HOST, host).body(Full::new(Bytes::new())).unwrap();
        let res = pool.send(req).await?;
        Ok(String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap())
    }

    fn idle(pool: &Pool) -> usize {
        pool.inner.idle.lock().unwrap().conns.len()
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection_in_origin_form() {
        let (url, accepted) = app(keep_alive).await;
        let pool = Pool::default();
        for i in 0..10 {
            assert_eq!(get(&pool, &format!("{url}/x/{i}?q=1")).await.unwrap(), format!("ok 0 GET /x/{i}?q=1 HTTP/1.1"));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(idle(&pool), 1);
    }

    /// An app that closes each connection after one answer, without saying so: every
    /// request still gets its answer, on a connection of its own.
    #[tokio::test]
    async fn connections_the_app_closed_while_idle_cost_no_request() {
        let (url, accepted) = app(|mut s, n| async move {
            if read_head(&mut s).await.is_some() {
                let body = format!("ok {n}");
                let _ = s.write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len()).as_bytes()).await;
            }
        })
        .await;
        let pool = Pool::default();
        for i in 0..20 {
            assert_eq!(get(&pool, &format!("{url}/")).await.unwrap(), format!("ok {i}"));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 20);
    }

    /// The app closes an idle connection just as a request is handed to it: the request,
    /// not yet written, goes out on a new connection.
    ///
    /// The order is made, not raced: the runtime (current-thread) is blocked until the app
    /// has written a byte on a second socket and then closed the connection, so one poll of
    /// the driver wakes this test before the connection's task, and the request is queued
    /// on a connection that still looks ready.
    #[tokio::test]
    async fn a_request_queued_on_a_connection_the_app_just_closed_goes_out_on_another() {
        use std::io::{Read, Write};
        let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let signals = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", http.local_addr().unwrap());
        let mut signal = TcpStream::connect(signals.local_addr().unwrap()).await.unwrap();
        let (close, close_rx) = std::sync::mpsc::channel::<()>();
        let (closed_tx, closed) = std::sync::mpsc::channel::<()>();
        let app = std::thread::spawn(move || {
            let (mut to_test, _) = signals.accept().unwrap();
            let answer = |s: &mut std::net::TcpStream, n: usize| {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    assert_eq!(s.read(&mut byte).unwrap(), 1, "the request was cut short");
                    head.push(byte[0]);
                }
                s.write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nok {n}").as_bytes()).unwrap();
            };
            let (mut first, _) = http.accept().unwrap();
            answer(&mut first, 0);
            close_rx.recv().unwrap();
            to_test.write_all(b"!").unwrap();
            drop(first);
            closed_tx.send(()).unwrap();
            let (mut second, _) = http.accept().unwrap();
            answer(&mut second, 1);
            // Nothing more: a third connection would block here and fail the join below.
        });
        let pool = Pool::default();
        assert_eq!(get(&pool, &format!("{url}/")).await.unwrap(), "ok 0");
        close.send(()).unwrap();
        // Blocks the runtime on purpose (see above).
        closed.recv().unwrap();
        signal.read_exact(&mut [0u8; 1]).await.unwrap();
        assert_eq!(get(&pool, &format!("{url}/")).await.unwrap(), "ok 1");
        app.join().unwrap();
    }

    /// A request the app read and then dropped the connection on may have had its effect:
    /// it fails, and is not sent again.
    #[tokio::test]
    async fn a_started_request_is_never_sent_again() {
        let seen = Arc::new(AtomicUsize::new(0));
        let count = seen.clone();
        let (url, accepted) = app(move |mut s, _| {
            let count = count.clone();
            async move {
                if read_head(&mut s).await.is_some() {
                    count.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
        .await;
        let pool = Pool::default();
        let e = get(&pool, &format!("{url}/pay")).await.unwrap_err();
        assert!(matches!(e, AppError::Unreachable(_)), "{e:?}");
        assert_eq!(seen.load(Ordering::SeqCst), 1);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// After a reload moves `app_url`, no request goes on a connection to the old app.
    #[tokio::test]
    async fn a_new_origin_never_gets_the_old_ones_connections() {
        let (old, _) = app(keep_alive).await;
        let (new, new_accepted) = app(|s, _| keep_alive(s, 7)).await;
        let pool = Pool::default();
        assert_eq!(get(&pool, &format!("{old}/a")).await.unwrap(), "ok 0 GET /a HTTP/1.1");
        assert_eq!(get(&pool, &format!("{new}/b")).await.unwrap(), "ok 7 GET /b HTTP/1.1");
        assert_eq!(get(&pool, &format!("{new}/c")).await.unwrap(), "ok 7 GET /c HTTP/1.1");
        assert_eq!(new_accepted.load(Ordering::SeqCst), 1);
    }

    /// A body that arrives in pieces keeps its connection out of the pool until it ends.
    #[tokio::test]
    async fn a_connection_returns_once_its_streamed_body_was_read() {
        let (release, released) = tokio::sync::watch::channel(false);
        let (url, accepted) = app(move |mut s, n| {
            let mut released = released.clone();
            async move {
                while read_head(&mut s).await.is_some() {
                    let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n";
                    s.write_all(head.as_bytes()).await.unwrap();
                    let _ = released.wait_for(|r| *r).await;
                    s.write_all(format!("1\r\n{n}\r\n0\r\n\r\n").as_bytes()).await.unwrap();
                }
            }
        })
        .await;
        let pool = Pool::default();
        let uri: Uri = format!("{url}/s").parse().unwrap();
        let req = Request::builder().uri(uri).header(http::header::HOST, "app").body(Full::new(Bytes::new())).unwrap();
        let mut body = pool.send(req).await.unwrap().into_body();
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "first");
        assert_eq!(idle(&pool), 0, "pooled while its body was still being read");
        release.send(true).unwrap();
        assert_eq!(body.collect().await.unwrap().to_bytes(), "0");
        tokio::time::timeout(Duration::from_secs(5), async {
            while idle(&pool) == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the connection came back to the pool");
        assert_eq!(get(&pool, &format!("{url}/t")).await.unwrap(), "first0");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn connections_idle_past_the_timeout_are_closed() {
        let (url, accepted) = app(keep_alive).await;
        let pool = Pool::default();
        get(&pool, &format!("{url}/")).await.unwrap();
        let age = |pool: &Pool| pool.inner.idle.lock().unwrap().conns[0].1 -= IDLE_TIMEOUT;
        age(&pool);
        // Not taken by a request...
        assert_eq!(get(&pool, &format!("{url}/")).await.unwrap(), "ok 1 GET / HTTP/1.1");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // ...and closed by the sweep when no request comes.
        assert_eq!(idle(&pool), 1);
        age(&pool);
        pool.inner.expire();
        assert_eq!(idle(&pool), 0);
    }

    #[tokio::test]
    async fn an_app_that_is_not_listening_is_unreachable_with_the_reason() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let e = get(&Pool::default(), &format!("http://127.0.0.1:{port}/")).await.unwrap_err();
        let AppError::Unreachable(why) = e else { panic!("{e:?}") };
        assert!(why.starts_with(&format!("connecting to 127.0.0.1:{port}: ")), "{why}");
        assert!(why.to_lowercase().contains("refused"), "{why}");
    }
}
