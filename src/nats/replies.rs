//! Our own reply multiplexer: one wildcard subscription per connection on
//! `<inbox prefix>.<nuid>.>`, and a waiter per request in a concurrent map, keyed by a
//! token that is never reused. A reply goes to the waiter of its subject's first token
//! after the prefix: `<prefix><token>`, or `<prefix><token>.<more>` (a streamed reply's
//! messages each carry their own reply subject under the stream's control token).
//!
//! Why not the client's: async-nats 0.51 keeps an entry for every request that never got
//! a reply, for the life of the connection (nats.rs #1617); a responder that keeps timing
//! out grows the sidecar until it is OOM-killed. Here the entry belongs to a guard the
//! waiter owns, so it goes away however the wait ends: reply, timeout, the HTTP client
//! hanging up (the future is dropped), or shutdown. Pending replies are bounded by the
//! requests in flight, which the egress listener's connection limit bounds.
//!
//! Behaviour kept from async-nats: a reply carrying the `503` status is "no responders",
//! not an answer; the subscription is the client's own, so the client resubscribes it on
//! every reconnect. A reply whose waiter is gone is counted and dropped; tokens are
//! unique per request, so it can never reach a later one.
//!
//! Two kinds of waiter share the map: [`Replies::request`] (one reply) and
//! [`Replies::stream`] (many replies into a bounded buffer, [`feed`], for request-many
//! streams).

mod feed;

pub(crate) use feed::{subscription, Next, Subscription, BEHIND_GRACE, BURST_SLACK, BYTES_PER_SLOT};

use std::fmt;
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Client, HeaderMap, Message, StatusCode, Subject};
use bytes::Bytes;
use dashmap::DashMap;
use futures::StreamExt;
use prometheus::{IntCounter, IntGauge};
use tokio::sync::oneshot;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::metrics::Metrics;

/// What went wrong with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyErrorKind {
    /// The server answered for the subject: nobody is subscribed (`503` status).
    NoResponders,
    /// No reply before the deadline.
    TimedOut,
    /// Headers plus payload exceed the server's `max_payload`.
    MaxPayloadExceeded,
    /// The subject is not a valid publish subject.
    InvalidSubject,
    /// A stream waiter's reader fell behind its bounded buffer; the stream was ended.
    Overflow,
    /// The multiplexer stopped (the connection was drained or closed).
    Closed,
    /// The client refused the publish for another reason; the source says which.
    Other,
}

/// A failed request: a kind to match on and, when the client reported one, its error.
#[derive(Debug)]
pub struct ReplyError {
    kind: ReplyErrorKind,
    source: Option<async_nats::PublishError>,
}

impl ReplyError {
    fn new(kind: ReplyErrorKind) -> Self {
        Self { kind, source: None }
    }

    pub fn kind(&self) -> ReplyErrorKind {
        self.kind
    }
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, &self.source) {
            (_, Some(source)) => write!(f, "publish failed: {source}"),
            (ReplyErrorKind::NoResponders, None) => f.write_str("no responders"),
            (ReplyErrorKind::TimedOut, None) => f.write_str("timed out waiting for the reply"),
            (ReplyErrorKind::MaxPayloadExceeded, None) => f.write_str("max payload size exceeded"),
            (ReplyErrorKind::InvalidSubject, None) => f.write_str("invalid subject"),
            (ReplyErrorKind::Overflow, None) => f.write_str("the reader fell behind the replies"),
            (ReplyErrorKind::Closed, None) => f.write_str("the reply multiplexer stopped"),
            (ReplyErrorKind::Other, None) => f.write_str("request failed"),
        }
    }
}

impl std::error::Error for ReplyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

impl From<async_nats::PublishError> for ReplyError {
    fn from(e: async_nats::PublishError) -> Self {
        use async_nats::client::PublishErrorKind as K;
        let kind = match e.kind() {
            K::MaxPayloadExceeded => ReplyErrorKind::MaxPayloadExceeded,
            K::InvalidSubject => ReplyErrorKind::InvalidSubject,
            _ => ReplyErrorKind::Other,
        };
        Self { kind, source: Some(e) }
    }
}

/// Someone waiting for replies on one token.
enum Waiter {
    /// One reply, with when the dispatcher read it; the entry is removed as it is delivered.
    One(oneshot::Sender<(Message, Instant)>),
    /// Many replies into a bounded buffer, which tells the reader when it overflowed.
    Many(feed::Feed),
}

/// Tokens are our own counter, never chosen by anyone else: a multiply by an odd constant
/// spreads consecutive ones over the map's shards (high bits) and buckets (low bits)
/// without SipHash's cost, paid three times per request (insert, delivery, removal).
#[derive(Default, Clone, Copy)]
struct TokenHasher(u64);

impl std::hash::Hasher for TokenHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Waiters = DashMap<u64, Waiter, BuildHasherDefault<TokenHasher>>;

/// The map and its metrics, shared by the handles, the guards and the dispatcher task.
struct Shared {
    waiters: Waiters,
    pending: IntGauge,
    late: IntCounter,
    /// The dispatcher stopped: a waiter registered again now would never hear its end.
    stopped: AtomicBool,
}

/// The multiplexer of one connection. Cheap to clone; the subscription ends when the
/// last clone is dropped or the connection is drained.
#[derive(Clone)]
pub struct Replies {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    /// `<inbox prefix>.<nuid>.`: a token appended makes a reply subject.
    prefix: String,
    next: AtomicU64,
    shared: Arc<Shared>,
    _stop: DropGuard,
}

impl Replies {
    /// Subscribes `<inbox prefix>.<nuid>.>` on `client` and starts delivering replies.
    /// The inbox prefix is the client's (`_INBOX`, or `[nats] inbox_prefix`).
    pub async fn start(client: &Client, metrics: &Metrics) -> Result<Self, async_nats::SubscribeError> {
        let prefix = format!("{}.", client.new_inbox());
        let subscriber = client.subscribe(format!("{prefix}>")).await?;
        let shared = Arc::new(Shared {
            waiters: Waiters::default(),
            pending: metrics.pending_replies.clone(),
            late: metrics.late_replies.clone(),
            stopped: AtomicBool::new(false),
        });
        let stop = CancellationToken::new();
        tokio::spawn(dispatch(subscriber, prefix.clone(), shared.clone(), stop.clone()));
        let inner = Inner { client: client.clone(), prefix, next: AtomicU64::new(1), shared, _stop: stop.drop_guard() };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Replies waiting right now (also the `natsbridge_pending_replies` gauge).
    pub fn pending(&self) -> usize {
        self.inner.shared.waiters.len()
    }

    /// Publishes to `subject` with a reply subject of ours and waits up to `timeout` for
    /// the one reply. A `503` status reply is [`ReplyErrorKind::NoResponders`].
    pub async fn request(&self, subject: Subject, headers: HeaderMap, payload: Bytes, timeout: Duration) -> Result<Message, ReplyError> {
        self.request_stamped(subject, headers, payload, timeout).await.map(|s| s.message)
    }

    /// As [`Replies::request`], also telling when the request was handed to the client
    /// and when the reply was read (for [`crate::own_time`]).
    pub async fn request_stamped(
        &self,
        subject: Subject,
        headers: HeaderMap,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Stamped, ReplyError> {
        let (tx, rx) = oneshot::channel();
        let (reply, mut registered) = self.register(Waiter::One(tx));
        let wait = async {
            self.inner.client.publish_with_reply_and_headers(subject, reply, headers, payload).await?;
            let published = Instant::now();
            // The sender only goes away without a reply when the dispatcher stopped.
            let (message, reply_read) = rx.await.map_err(|_| ReplyError::new(ReplyErrorKind::Closed))?;
            // Delivery removed the entry: the guard need not look it up again.
            registered.in_map = false;
            Ok::<_, ReplyError>(Stamped { message, published, reply_read })
        };
        let stamped = tokio::time::timeout(timeout, wait).await.map_err(|_| ReplyError::new(ReplyErrorKind::TimedOut))??;
        if stamped.message.status == Some(StatusCode::NO_RESPONDERS) {
            return Err(ReplyError::new(ReplyErrorKind::NoResponders));
        }
        Ok(stamped)
    }

    /// Registers a waiter for many replies, buffered up to `capacity`, and returns it with
    /// its reply subject; the caller publishes the request with that reply subject. The
    /// waiter is removed when the stream is dropped (end, error, cancel, stall).
    pub fn stream(&self, capacity: usize) -> ReplyStream {
        let (feed, tap) = feed::buffer(capacity);
        let (reply, registered) = self.register(Waiter::Many(feed));
        ReplyStream { reply, tap, _registered: registered }
    }

    /// The client the replies come through (to publish a stream's request).
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    fn register(&self, waiter: Waiter) -> (Subject, Registered) {
        let token = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let shared = &self.inner.shared;
        shared.waiters.insert(token, waiter);
        shared.pending.inc();
        (reply_subject(&self.inner.prefix, token), Registered { shared: shared.clone(), token, in_map: true })
    }
}

/// `<prefix><token>` in one allocation of its exact size (`format!` grew a `String` and
/// then boxed it again to make it `Bytes`: three allocations per request).
fn reply_subject(prefix: &str, token: u64) -> Subject {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = token;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let mut s = String::with_capacity(prefix.len() + digits.len() - at);
    s.push_str(prefix);
    s.extend(digits[at..].iter().map(|&d| char::from(d)));
    Subject::from(s)
}

/// A reply and the two moments the sidecar's own time is measured between.
pub struct Stamped {
    pub message: Message,
    /// The request was handed to the client.
    pub published: Instant,
    /// The dispatcher read the reply off the subscription.
    pub reply_read: Instant,
}

/// Owns a waiter's map entry: dropping it removes the entry, whatever ended the wait.
struct Registered {
    shared: Arc<Shared>,
    token: u64,
    /// False once the delivery of a single reply removed the entry itself.
    in_map: bool,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if self.in_map {
            self.shared.waiters.remove(&self.token);
        }
        self.shared.pending.dec();
    }
}

/// A waiter for many replies to one request (ADR-47's request-many). Its stop conditions
/// (total timeout, stall, count, sentinel) are the caller's; dropping it unregisters it.
pub struct ReplyStream {
    reply: Subject,
    tap: feed::Tap,
    _registered: Registered,
}

impl ReplyStream {
    /// The reply subject to publish the request with.
    pub fn reply_subject(&self) -> &Subject {
        &self.reply
    }

    /// The next reply. `Err(NoResponders)` for a `503` status, `Err(Overflow)` once the
    /// reader fell behind (the buffered replies come first), `Err(Closed)` when the
    /// multiplexer stopped.
    pub async fn next(&mut self) -> Result<Message, ReplyError> {
        match self.tap.next().await {
            feed::Next::Message(m) if m.status == Some(StatusCode::NO_RESPONDERS) => Err(ReplyError::new(ReplyErrorKind::NoResponders)),
            feed::Next::Message(m) => Ok(*m),
            feed::Next::Ended { overflowed: true } => Err(ReplyError::new(ReplyErrorKind::Overflow)),
            feed::Next::Ended { overflowed: false } => Err(ReplyError::new(ReplyErrorKind::Closed)),
        }
    }

    /// After `Err(Overflow)`: a fresh, empty buffer on the same reply subject, for a waiter
    /// that must keep listening there (the subject was already handed out, so a new one
    /// would not reach whoever holds it). What arrived between the overflow and now is
    /// lost. `Err(Closed)` when the multiplexer stopped. Without this, `next` answers
    /// `Overflow` at once forever: a caller that reads on would spin.
    pub fn reopen(&mut self) -> Result<(), ReplyError> {
        let (feed, tap) = feed::buffer(self.tap.capacity());
        let r = &self._registered;
        r.shared.waiters.insert(r.token, Waiter::Many(feed));
        // Checked after the insert: a dispatcher that stops later clears the entry itself.
        if r.shared.stopped.load(Ordering::SeqCst) {
            r.shared.waiters.remove(&r.token);
            return Err(ReplyError::new(ReplyErrorKind::Closed));
        }
        self.tap = tap;
        Ok(())
    }
}

/// Delivers each reply to its waiter until the subscription ends (drain, close) or the
/// last handle is dropped; then every waiter still registered learns it is `Closed`.
async fn dispatch(mut subscriber: async_nats::Subscriber, prefix: String, shared: Arc<Shared>, stop: CancellationToken) {
    // One stop future for the task's life, polled only when no reply is ready: a new one
    // per reply registered and unregistered a waiter under the token's lock every time.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let message = tokio::select! {
            biased;
            m = subscriber.next() => m,
            _ = &mut stopped => None,
        };
        let Some(message) = message else { break };
        let read = Instant::now();
        let token = message.subject.strip_prefix(prefix.as_str()).and_then(token_of);
        if !token.is_some_and(|t| deliver(&shared, t, message, read)) {
            shared.late.inc();
        }
    }
    // Dropping the senders wakes every waiter at once instead of at its deadline. Marked
    // first, so a stream reopened from now on learns it is closed (`ReplyStream::reopen`).
    shared.stopped.store(true, Ordering::SeqCst);
    shared.waiters.clear();
}

/// The waiter's token in what follows the prefix: its first token (`7` of `7` or `7.3`).
fn token_of(rest: &str) -> Option<u64> {
    rest.split('.').next()?.parse().ok()
}

/// Hands `message` to the waiter of `token`; false when there is none (late, or the
/// waiter gave up).
fn deliver(shared: &Shared, token: u64, message: Message, read: Instant) -> bool {
    use dashmap::mapref::entry::Entry;
    let Entry::Occupied(entry) = shared.waiters.entry(token) else { return false };
    match entry.get() {
        Waiter::One(_) => match entry.remove() {
            Waiter::One(tx) => tx.send((message, read)).is_ok(),
            Waiter::Many(..) => unreachable!("matched One above"),
        },
        Waiter::Many(feed) => match feed.push(message) {
            Ok(()) => true,
            // Full: core NATS has no flow control, so the stream ends (the feed dropped
            // with the entry) rather than grow. Closed: the reader is gone.
            Err(feed::Refused::Full | feed::Refused::Closed) => {
                entry.remove();
                false
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        let m = Metrics::new();
        Shared {
            waiters: Waiters::default(),
            pending: m.pending_replies.clone(),
            late: m.late_replies.clone(),
            stopped: AtomicBool::new(false),
        }
    }

    fn message(subject: &str) -> Message {
        Message {
            subject: subject.into(),
            reply: None,
            payload: Bytes::from_static(b"x"),
            headers: None,
            status: None,
            description: None,
            length: 1,
        }
    }

    #[test]
    fn a_subjects_first_token_after_the_prefix_names_its_waiter() {
        assert_eq!(token_of("7"), Some(7));
        assert_eq!(token_of("7.3"), Some(7), "a streamed reply's message subject");
        assert_eq!(token_of("7.3.1"), Some(7));
        assert_eq!(token_of("x.7"), None);
        assert_eq!(token_of(""), None);
        assert_eq!(token_of(".7"), None);
    }

    #[test]
    fn a_reply_goes_to_its_waiter_once_and_a_late_one_to_nobody() {
        let s = shared();
        let (tx, mut rx) = oneshot::channel();
        s.waiters.insert(7, Waiter::One(tx));
        assert!(deliver(&s, 7, message("p.7"), Instant::now()));
        assert_eq!(rx.try_recv().unwrap().0.payload, "x");
        assert!(s.waiters.is_empty());
        assert!(!deliver(&s, 7, message("p.7"), Instant::now()), "a second reply on a used token is dropped");
    }

    #[test]
    fn a_reply_subject_is_the_prefix_and_the_token() {
        for t in [0, 7, 10, 1234567890, u64::MAX] {
            assert_eq!(reply_subject("_INBOX.abc.", t).as_str(), format!("_INBOX.abc.{t}"));
        }
    }

    #[test]
    fn a_stream_that_overflows_is_ended_and_told() {
        let s = shared();
        let (feed, mut tap) = feed::buffer(1);
        s.waiters.insert(1, Waiter::Many(feed));
        for _ in 0..BURST_SLACK {
            assert!(deliver(&s, 1, message("p.1"), Instant::now()));
        }
        assert!(!deliver(&s, 1, message("p.1"), Instant::now()));
        assert!(s.waiters.is_empty());
        for _ in 0..BURST_SLACK {
            let next = futures::FutureExt::now_or_never(tap.next());
            assert!(matches!(next, Some(feed::Next::Message(_))));
        }
        let next = futures::FutureExt::now_or_never(tap.next());
        assert!(matches!(next, Some(feed::Next::Ended { overflowed: true })));
    }

    #[test]
    fn an_overflowed_stream_reopened_hears_its_subject_again_but_not_once_the_dispatcher_stopped() {
        let s = Arc::new(shared());
        let (feed, tap) = feed::buffer(1);
        s.waiters.insert(1, Waiter::Many(feed));
        s.pending.inc();
        let mut stream = ReplyStream { reply: "p.1".into(), tap, _registered: Registered { shared: s.clone(), token: 1, in_map: true } };
        while deliver(&s, 1, message("p.1"), Instant::now()) {}
        let overflowed = |stream: &mut ReplyStream| loop {
            match futures::FutureExt::now_or_never(stream.next()) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => break e.kind(),
                None => panic!("pending: the overflow must be told"),
            }
        };
        assert_eq!(overflowed(&mut stream), ReplyErrorKind::Overflow);
        // Told again on every call, at once: a reader that just reads on would spin.
        assert_eq!(overflowed(&mut stream), ReplyErrorKind::Overflow);
        stream.reopen().unwrap();
        assert!(futures::FutureExt::now_or_never(stream.next()).is_none(), "an empty buffer waits");
        assert!(deliver(&s, 1, message("p.1"), Instant::now()), "the same subject reaches it again");
        assert!(matches!(futures::FutureExt::now_or_never(stream.next()), Some(Ok(_))));
        // The dispatcher stops (and clears the map): reopening now would wait forever.
        s.stopped.store(true, Ordering::SeqCst);
        s.waiters.clear();
        assert_eq!(stream.reopen().unwrap_err().kind(), ReplyErrorKind::Closed);
        assert!(s.waiters.is_empty());
    }
}
