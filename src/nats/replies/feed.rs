//! The bounded buffer between the reply dispatcher and one stream waiter: the dispatcher
//! pushes through a [`Feed`] (held in the waiter map), the waiter pops through a [`Tap`].
//!
//! Why not tokio's `mpsc`: every egress request and tunnel call opens one, and most get a
//! single reply. tokio's channel cost three allocations per request, one of them aligned
//! to 128 bytes (glibc serves those slowly, through `posix_memalign`), plus the flag that
//! told an overflow from a stop: ~2,800 instructions per request with its drop, under
//! callgrind (issue 14). This is one allocation, and the queue's first push one more.
//! There is one reader, and the writer is the dispatcher task, so a plain mutex is never
//! contended for long.
//!
//! Behind is not slow. The dispatcher hands over a whole socket read of replies before the
//! reader runs, and on a loaded host the reader may wait for a core: a burst of small
//! messages (an SSE event each, a replayed backlog) can outrun a reader that is keeping
//! up. So a reader is slow when it stays more than `capacity` messages behind for longer
//! than [`BEHIND_GRACE`]; [`BURST_SLACK`] × `capacity` behind at once ends it regardless,
//! and so does holding more than `capacity` MiB: a stream's memory stays within what
//! `capacity` messages of the default 1 MiB `max_payload` held before the slack.
//!
//! [`subscription`] puts the same buffer behind a core subscription of a `subscribe`
//! route, for the same reason: left to async-nats, a slow SSE client's messages wait in
//! the subscription's channel, 65,536 of them (up to 64 GiB at 1 MiB), and past that are
//! dropped without a word. Read at once into a feed, a slow client's stream ends as
//! overflowed instead, visibly.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use async_nats::Message;

/// How long a reader may stay more than `capacity` messages behind.
pub(crate) const BEHIND_GRACE: Duration = Duration::from_secs(1);
/// How many times `capacity` a reader may be behind at once, however briefly.
pub(crate) const BURST_SLACK: usize = 4;
/// Bytes a stream may hold per message of `capacity`.
pub(crate) const BYTES_PER_SLOT: usize = 1 << 20;

/// A new buffer of `capacity` messages: its writing and its reading end.
pub(super) fn buffer(capacity: usize) -> (Feed, Tap) {
    buffer_with_grace(capacity, BEHIND_GRACE)
}

fn buffer_with_grace(capacity: usize, grace: Duration) -> (Feed, Tap) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State { queue: VecDeque::new(), waker: None, closed: false, overflowed: false, behind_since: None, bytes: 0 }),
        capacity: capacity.max(1),
        grace,
    });
    (Feed(shared.clone()), Tap(shared))
}

struct Shared {
    state: Mutex<State>,
    capacity: usize,
    grace: Duration,
}

struct State {
    /// Boxed: a message is ~180 bytes, and the queue grows in steps of whole slots.
    queue: VecDeque<Box<Message>>,
    waker: Option<Waker>,
    /// The feed is gone: nothing more will come.
    closed: bool,
    /// The feed was dropped because the reader fell behind, not because replies stopped.
    overflowed: bool,
    /// Since when the queue has held `capacity` messages or more (read only then: no
    /// clock read on the common path).
    behind_since: Option<Instant>,
    /// What the queue holds, as the messages' wire lengths.
    bytes: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned lock still holds a consistent queue.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why a push was refused.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refused {
    /// The buffer is full: the feed is now closed as overflowed.
    Full,
    /// The reader is gone.
    Closed,
}

/// The writing end, owned by the waiter map. Dropping it ends the stream.
pub(super) struct Feed(Arc<Shared>);

impl Feed {
    /// Queues `message` and wakes the reader; refused when the reader is gone or too slow
    /// (the module's header). Core NATS has no flow control, so a slow reader ends the
    /// stream rather than let it grow: the reader gets what was buffered, then `overflowed`.
    pub(super) fn push(&self, message: Message) -> Result<(), Refused> {
        // Only the reader holds the other reference: when it is gone, nobody will read.
        if Arc::strong_count(&self.0) == 1 {
            return Err(Refused::Closed);
        }
        let mut s = self.0.lock();
        let capacity = self.0.capacity;
        if s.queue.len() >= capacity {
            let now = Instant::now();
            let since = *s.behind_since.get_or_insert(now);
            if s.queue.len() >= capacity.saturating_mul(BURST_SLACK)
                || s.bytes.saturating_add(message.length) > capacity.saturating_mul(BYTES_PER_SLOT)
                || now.duration_since(since) > self.0.grace
            {
                s.overflowed = true;
                return Err(Refused::Full);
            }
        }
        s.bytes += message.length;
        s.queue.push_back(Box::new(message));
        let waker = s.waker.take();
        drop(s);
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.closed = true;
        let waker = s.waker.take();
        drop(s);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The reading end, owned by the waiter.
pub(super) struct Tap(Arc<Shared>);

/// What the reader gets: a message, or the end and whether it came from an overflow.
pub(crate) enum Next {
    Message(Box<Message>),
    Ended { overflowed: bool },
}

impl Tap {
    /// How many messages the buffer holds before the reader counts as behind.
    pub(super) fn capacity(&self) -> usize {
        self.0.capacity
    }

    /// The next message; after the last one, the end (buffered messages come first).
    pub(super) async fn next(&mut self) -> Next {
        poll_fn(|cx| {
            let mut s = self.0.lock();
            if let Some(m) = s.queue.pop_front() {
                s.bytes = s.bytes.saturating_sub(m.length);
                if s.queue.len() < self.0.capacity {
                    s.behind_since = None;
                }
                return Poll::Ready(Next::Message(m));
            }
            if s.closed {
                return Poll::Ready(Next::Ended { overflowed: s.overflowed });
            }
            match &mut s.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                w => *w = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }
}

/// `sub` read at once into a buffer of `capacity` messages by a task of its own; the
/// task and the subscription end when the reader is dropped, when the buffer overflows
/// or when the subscription ends.
pub(crate) fn subscription(sub: async_nats::Subscriber, capacity: usize) -> Subscription {
    let (feed, tap) = buffer(capacity);
    let task = tokio::spawn(async move {
        use futures::StreamExt;
        let mut sub = sub;
        while let Some(m) = sub.next().await {
            if feed.push(m).is_err() {
                break;
            }
        }
        // Dropping `sub` unsubscribes; dropping `feed` ends the reader's stream.
    });
    Subscription { tap, task: task.abort_handle() }
}

/// The reading end of [`subscription`].
pub(crate) struct Subscription {
    tap: Tap,
    task: tokio::task::AbortHandle,
}

impl Subscription {
    /// The next message; after the last one, the end and whether it was an overflow.
    pub(crate) async fn next(&mut self) -> Next {
        self.tap.next().await
    }

    /// Messages held before the reader counts as behind.
    pub(crate) fn capacity(&self) -> usize {
        self.tap.capacity()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // The task may be waiting for a message that never comes.
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn message(n: u8) -> Message {
        Message {
            subject: "s".into(),
            reply: None,
            payload: Bytes::from(vec![n]),
            headers: None,
            status: None,
            description: None,
            length: 1,
        }
    }

    fn payload(n: Next) -> Option<u8> {
        match n {
            Next::Message(m) => Some(m.payload[0]),
            Next::Ended { .. } => None,
        }
    }

    #[tokio::test]
    async fn messages_come_in_order_then_the_end() {
        let (feed, mut tap) = buffer(4);
        feed.push(message(1)).unwrap();
        feed.push(message(2)).unwrap();
        drop(feed);
        assert_eq!(payload(tap.next().await), Some(1));
        assert_eq!(payload(tap.next().await), Some(2));
        assert!(matches!(tap.next().await, Next::Ended { overflowed: false }));
    }

    #[tokio::test]
    async fn a_waiting_reader_is_woken_by_a_push_and_by_the_end() {
        let (feed, mut tap) = buffer(1);
        let reader = tokio::spawn(async move { (payload(tap.next().await), payload(tap.next().await)) });
        tokio::task::yield_now().await;
        feed.push(message(7)).unwrap();
        tokio::task::yield_now().await;
        drop(feed);
        assert_eq!(reader.await.unwrap(), (Some(7), None));
    }

    #[tokio::test]
    async fn a_burst_past_capacity_is_held_up_to_the_slack_then_refused_after_what_it_holds() {
        let (feed, mut tap) = buffer(2);
        for n in 0..(2 * BURST_SLACK) as u8 {
            feed.push(message(n)).unwrap();
        }
        assert_eq!(feed.push(message(99)), Err(Refused::Full));
        drop(feed);
        for n in 0..(2 * BURST_SLACK) as u8 {
            assert_eq!(payload(tap.next().await), Some(n));
        }
        assert!(matches!(tap.next().await, Next::Ended { overflowed: true }));
    }

    #[test]
    fn past_capacity_a_stream_holds_at_most_capacity_mib() {
        let big = |n: u8| Message { length: 600 << 10, ..message(n) };
        let (feed, tap) = buffer(2);
        // Up to capacity, any size (as before the slack); past it, 2 MiB in all.
        feed.push(big(0)).unwrap();
        feed.push(big(1)).unwrap();
        feed.push(big(2)).unwrap();
        assert_eq!(feed.push(big(3)), Err(Refused::Full));
        drop(tap);
    }

    #[tokio::test]
    async fn a_reader_behind_past_the_grace_is_refused_and_one_that_catches_up_is_not() {
        // Long enough that a loaded host cannot stretch the pushes below past it.
        let grace = Duration::from_millis(300);
        // Catches up: drained below capacity before the grace ends, it starts over.
        let (feed, mut tap) = buffer_with_grace(2, grace);
        for n in 0..3 {
            feed.push(message(n)).unwrap();
        }
        assert_eq!(payload(tap.next().await), Some(0));
        assert_eq!(payload(tap.next().await), Some(1));
        tokio::time::sleep(grace * 2).await;
        feed.push(message(3)).unwrap();
        feed.push(message(4)).unwrap();
        assert_eq!(payload(tap.next().await), Some(2));
        // Stays behind (it reads, but never gets below capacity) past the grace: refused.
        let (feed, mut tap) = buffer_with_grace(2, grace);
        for n in 0..4 {
            feed.push(message(n)).unwrap();
        }
        assert_eq!(payload(tap.next().await), Some(0));
        let behind = Instant::now();
        while behind.elapsed() <= grace {
            tokio::time::sleep(grace / 5).await;
        }
        assert_eq!(feed.push(message(4)), Err(Refused::Full));
        drop(feed);
        assert_eq!([payload(tap.next().await), payload(tap.next().await), payload(tap.next().await)], [Some(1), Some(2), Some(3)]);
        assert!(matches!(tap.next().await, Next::Ended { overflowed: true }));
    }

    #[test]
    fn a_push_without_a_reader_is_refused() {
        let (feed, tap) = buffer(2);
        drop(tap);
        assert_eq!(feed.push(message(1)), Err(Refused::Closed));
    }
}
