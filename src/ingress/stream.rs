//! The responder side of streamed replies: an app answering a `request` or `tunnel` call
//! with a body of unknown length (chunked, or `text/event-stream`) has it forwarded as a
//! streamed reply while the bytes arrive (the wire contract is in [`crate::streamed`]).
//!
//! - An event stream travels one event per message; other bodies as they arrive, writes
//!   within `stream_coalesce` (2 ms) in one message.
//!   A message never exceeds the server's `max_payload`: larger pieces are split.
//! - A body that ends before its first message is sent travels as one plain reply, so a
//!   small chunked answer reaches non-streaming requesters as it always did. One too
//!   large for a single message under `max_payload` streams instead, whatever its framing
//!   (a `Content-Length` answer too): without the sidecar the caller would have had it,
//!   so a 413 would make the pod worse.
//! - The head does not wait for the body: with no bytes yet, it goes alone once due (at
//!   once for an event stream, after a second for other bodies).
//! - The control subject is a waiter on the connection's reply multiplexer. The first
//!   message is published with it as reply subject, each later one with `<control>.<seq>`
//!   (the multiplexer delivers both to the waiter): a reader's `Bridge-Stream: cancel` (to
//!   the control subject or to a message's reply subject), or the server's "no responders"
//!   when the reader's inbox is gone, arrive there and stop the stream. Stopping drops the
//!   app's body, which closes its connection.

use async_nats::Subject;
use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use http::{HeaderMap, Method, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::app::{self, AppError, AppResponse};
use super::{Route, Shared};
use crate::codec;
use crate::nats::replies::{ReplyErrorKind, ReplyStream};
use crate::problem::BridgeError;
use crate::streamed::{self, Part, SseSplitter};

/// What became of a call: a whole answer for the caller to reply with, or a stream that
/// was already sent (or stopped).
pub(crate) enum Answer {
    Whole(Result<AppResponse, AppError>),
    Streamed,
}

/// Calls the app. With `reply` (a requester waits and the answer is not kept for
/// idempotency), an open body is streamed to it; otherwise the answer is whole.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn call(
    shared: &Shared,
    route: &Route,
    reply: Option<&Subject>,
    method: Method,
    uri: &str,
    headers: HeaderMap,
    body: Bytes,
    rid: Option<&str>,
) -> Answer {
    let (timeout, max_body) = (route.inbound.timeout, route.inbound.max_body);
    let Some(reply) = reply else {
        return Answer::Whole(Box::pin(shared.app.call(method, uri, headers, body, timeout, max_body)).await);
    };
    let deadline = Instant::now() + timeout;
    let res = match tokio::time::timeout_at(deadline, shared.app.send(method, uri, headers, body)).await {
        Ok(Ok(res)) => res,
        Ok(Err(e)) => return Answer::Whole(Err(e)),
        Err(_) => return Answer::Whole(Err(AppError::Timeout(timeout))),
    };
    // A body of known length too large for one message streams as if the app had sent it
    // chunked, rather than getting the 413 (or, past `max_body`, the 502) of a single reply.
    let too_large = || {
        // The length hyper read from the head (no header lookup and parse: ~270
        // instructions per request on path B under callgrind, issue 14).
        let len = http_body::Body::size_hint(res.body()).exact().and_then(|n| usize::try_from(n).ok());
        len.is_some_and(|len| !fits_one_message(shared, res.headers(), len))
    };
    if !streamed::has_open_body(res.status(), res.headers()) && !too_large() {
        let whole = tokio::time::timeout_at(deadline, app::collect(res, max_body)).await;
        return Answer::Whole(whole.unwrap_or(Err(AppError::Timeout(timeout))));
    }
    let sender = Sender::new(shared, route, reply.clone(), rid);
    Box::pin(sender.run(res)).await
}

/// Whether an answer goes in one reply message under the server's `max_payload` (with
/// room for the headers a reply carries).
fn fits_one_message(shared: &Shared, headers: &HeaderMap, body: usize) -> bool {
    // Reading `max_payload` clones the server's info (a handful of allocations): not for
    // the small answers of the hot path. Below this, an answer counts as fitting; on a
    // server configured that small, its publish is refused and it gets the 413 as before.
    const SURELY_FITS: usize = 32 << 10;
    if body < SURELY_FITS {
        return true;
    }
    let head: usize = headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum::<usize>() + 512;
    body.saturating_add(head) <= shared.nats.server_info().max_payload
}

/// One streamed reply being sent.
struct Sender<'a> {
    shared: &'a Shared,
    route: &'a Route,
    reply: Subject,
    rid: Option<&'a str>,
    control: ReplyStream,
    /// The first message's headers (status, response headers, control subject) until sent.
    first: Option<async_nats::HeaderMap>,
    seq: u64,
}

/// Why a stream stopped early.
enum Stop {
    /// The reader cancelled, or is gone: nobody to tell.
    Reader(&'static str),
    /// NATS refused a message: nobody can be told.
    Publish,
}

impl<'a> Sender<'a> {
    fn new(shared: &'a Shared, route: &'a Route, reply: Subject, rid: Option<&'a str>) -> Self {
        let control = shared.replies.stream(4);
        Self { shared, route, reply, rid, control, first: None, seq: 0 }
    }

    /// Reads the app's body and sends it; the whole answer when it ended before anything
    /// was sent.
    async fn run(mut self, res: Response<Incoming>) -> Answer {
        let (parts, mut body) = res.into_parts();
        let sse = streamed::is_event_stream(&parts.headers);
        self.start(&parts);
        let mut sse_split = SseSplitter::default();
        let mut pending = BytesMut::new();
        let coalesce = self.route.inbound.stream_coalesce;
        let idle = self.route.inbound.stream_stall;
        // The head does not wait for the body's first bytes: an app that answered at once
        // and is slow to its first token (a model thinking) would otherwise be a 504 at the
        // caller's route timeout, where without the sidecar its client had the head.
        let mut flush_at = Some(Instant::now() + head_alone_after(sse, coalesce));
        let end = loop {
            let read = tokio::select! {
                biased;
                stop = stopped(&mut self.control) => break Err(stop),
                _ = sleep_until(flush_at) => None,
                read = tokio::time::timeout(idle, body.frame()) => Some(read),
            };
            let Some(read) = read else {
                flush_at = None;
                let data = pending.split().freeze();
                let sent = if data.is_empty() && self.first.is_some() {
                    // Nothing of the body yet: the head goes alone (an empty first message).
                    self.send(data, Part::Data).await
                } else {
                    self.send_all(data, Part::Data).await
                };
                match sent {
                    Ok(()) => continue,
                    Err(stop) => break Err(stop),
                }
            };
            // What else has already arrived joins this read.
            let more_may_come = matches!(read, Ok(Some(Ok(_))));
            let mut reads = vec![read];
            while let Some(more) = more_may_come.then(|| body.frame().now_or_never()).flatten() {
                let done = !matches!(more, Some(Ok(_)));
                reads.push(Ok(more));
                if done {
                    break;
                }
            }
            let mut ended = None;
            for read in reads {
                match read {
                    Ok(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data() {
                            if sse {
                                sse_split.push(&data)
                            } else {
                                pending.extend_from_slice(&data)
                            }
                        }
                    }
                    Ok(None) => ended = ended.or(Some(Ok(()))),
                    Ok(Some(Err(e))) => {
                        ended = ended.or_else(|| {
                            Some(Err(BridgeError::Upstream(format!("the app's body failed: {}", crate::problem::error_chain(&e)))))
                        })
                    }
                    Err(_) => ended = ended.or(Some(Err(BridgeError::UpstreamTimeout(idle)))),
                }
            }
            if let Some(ended) = ended {
                break Ok(ended);
            }
            let sent = if sse {
                self.send_events(&mut sse_split).await
            } else if coalesce.is_zero() {
                self.send_all(pending.split().freeze(), Part::Data).await
            } else {
                // Due `coalesce` after the first bytes, or sooner when the head was due first.
                let due = Instant::now() + coalesce;
                flush_at = Some(flush_at.map_or(due, |at| at.min(due)));
                Ok(())
            };
            if let Err(stop) = sent {
                break Err(stop);
            }
        };
        let rest = if sse { sse_split.rest() } else { pending.freeze() };
        self.finish(end, parts, rest).await
    }

    /// The first message's headers: the response's, and the control subject.
    fn start(&mut self, parts: &http::response::Parts) {
        let mut first = codec::response_to_reply_headers(parts.status, &parts.headers);
        first.insert(streamed::STREAM_CONTROL, self.control.reply_subject().as_str());
        self.first = Some(first);
    }

    /// Ends the stream: the end or error message, or, when nothing was sent yet and the
    /// body fits one message, the whole answer for the caller to reply with.
    async fn finish(mut self, end: Result<Result<(), BridgeError>, Stop>, parts: http::response::Parts, rest: Bytes) -> Answer {
        let how = match end {
            Ok(Ok(())) if self.seq == 0 && fits_one_message(self.shared, &parts.headers, rest.len()) => {
                return Answer::Whole(Ok(AppResponse { status: parts.status, headers: parts.headers, body: rest }));
            }
            Ok(Err(BridgeError::UpstreamTimeout(t))) if self.seq == 0 => return Answer::Whole(Err(AppError::Timeout(t))),
            Ok(Err(BridgeError::Upstream(e))) if self.seq == 0 => return Answer::Whole(Err(AppError::Unreachable(e))),
            Ok(Ok(())) => match self.send_all(rest, Part::End).await {
                Ok(()) => "complete",
                Err(_) => "gone",
            },
            Ok(Err(e)) => {
                if !rest.is_empty() {
                    let _ = self.send_all(rest, Part::Data).await;
                }
                let body = e.to_response(Some(&self.route.inbound.name), self.rid).into_body();
                let _ = self.send(body, Part::Error).await;
                tracing::debug!(route = %self.route.inbound.name, error = %e, "streamed reply ended with an error");
                "error"
            }
            Err(Stop::Reader(how)) => how,
            Err(Stop::Publish) => "gone",
        };
        self.shared.metrics.streams.with_label_values(&["responder", &self.route.inbound.name, how]).inc();
        self.route.metrics.reply.inc();
        Answer::Streamed
    }

    /// Each whole event that arrived, one message each.
    async fn send_events(&mut self, split: &mut SseSplitter) -> Result<(), Stop> {
        while let Some(event) = split.next_event() {
            self.send_all(event, Part::Data).await?;
        }
        Ok(())
    }

    /// `payload` in as many messages as `max_payload` needs; the last one is `part`.
    async fn send_all(&mut self, payload: Bytes, part: Part) -> Result<(), Stop> {
        if payload.is_empty() && part == Part::Data {
            return Ok(());
        }
        let head = self.first.as_ref().map_or(0, streamed::headers_len) + 64;
        let max = self.shared.nats.server_info().max_payload.saturating_sub(head).max(1024);
        let pieces = streamed::split(payload, max);
        let n = pieces.len();
        for (i, piece) in pieces.into_iter().enumerate() {
            self.send(piece, if i + 1 == n { part } else { Part::Data }).await?;
        }
        Ok(())
    }

    async fn send(&mut self, payload: Bytes, part: Part) -> Result<(), Stop> {
        self.seq += 1;
        let mut headers = self.first.take().unwrap_or_default();
        streamed::add_message_headers(&mut headers, self.seq, part);
        // Each message its own reply subject: the control subject for the first (what a
        // reader that follows the contract, or an older natsbridge, cancels to), then
        // `<control>.<seq>`, which the multiplexer delivers to the same waiter.
        // nats-server 2.14's response permission (`allow_responses`, max 1) counts a second
        // delivery with the same reply subject as the reader's response, so after an even
        // number of messages sharing one subject the reader's cancel was refused and the app
        // streamed on to nobody.
        let control = match self.seq {
            1 => self.control.reply_subject().clone(),
            seq => Subject::from(format!("{}.{seq}", self.control.reply_subject())),
        };
        self.shared.nats.publish_with_reply_and_headers(self.reply.clone(), control, headers, payload).await.map_err(|e| {
            tracing::warn!(route = %self.route.inbound.name, error = %e, "could not send a streamed reply message; stopping the stream");
            Stop::Publish
        })
    }
}

/// Resolves when the reader cancels or is gone (pending forever otherwise).
async fn stopped(control: &mut ReplyStream) -> Stop {
    loop {
        // Messages that keep coming (a flood of them) must not hold the task: this gives
        // the worker back every so often, so the body and other tasks still run.
        tokio::task::consume_budget().await;
        match control.next().await {
            Ok(m) if streamed::is_cancel(m.headers.as_ref()) => return Stop::Reader("cancel"),
            // Anything else on the control subject is not ours to act on.
            Ok(_) => continue,
            // Someone sent more than the buffer holds (only a cancel means anything here),
            // and the multiplexer dropped our waiter. Left so, `next` would answer
            // `Overflow` at once forever and this loop would spin. Watching on under the
            // same subject, the one the reader knows, keeps its cancel and the server's
            // "no responders" (the reader gone) stopping the stream. Ending the stream
            // instead would stop it for messages that ask for no such thing, and ceasing
            // to watch would stream on to a reader that is gone (an endless event stream
            // for ever). A cancel lost in the flood is the cost; the reader's going away
            // still shows on the next message.
            Err(e) if e.kind() == ReplyErrorKind::Overflow => match control.reopen() {
                Ok(()) => {
                    tracing::debug!("the control subject of a streamed reply overflowed; watching it afresh");
                    continue;
                }
                Err(_) => return Stop::Reader("gone"),
            },
            Err(_) => return Stop::Reader("gone"),
        }
    }
}

/// How long after the app's head its first message is due when no bytes of the body have
/// come: `stream_coalesce` for an event stream (a stream by nature, whose client waits for
/// the head to know it is connected), a second for other bodies, which mostly end soon
/// after their head and then travel as one plain reply that any NATS requester reads.
fn head_alone_after(sse: bool, coalesce: std::time::Duration) -> std::time::Duration {
    const OTHER_BODIES: std::time::Duration = std::time::Duration::from_secs(1);
    if sse {
        coalesce
    } else {
        OTHER_BODIES.max(coalesce)
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
