//! The reply multiplexer against a real nats-server: replies reach exactly their own
//! request, late ones are counted and dropped, "no responders" is not a timeout, stream
//! waiters end on overflow, the inbox subscription survives a server restart, and
//! JetStream acks and API errors are read by our own code.

mod support;

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use natsbridge::metrics::Metrics;
use natsbridge::nats::publish::{publish_acked, PublishErrorKind};
use natsbridge::nats::replies::{Replies, ReplyErrorKind};
use support::fixtures::routes_toml;
use support::{eventually, subscribe_synced, NatsServer, Sidecar};

async fn mux(nats: &NatsServer) -> (Replies, Metrics) {
    let metrics = Metrics::new();
    let replies = Replies::start(&nats.client().await, &metrics).await.unwrap();
    (replies, metrics)
}

async fn request(replies: &Replies, subject: &str, body: &'static str, timeout: Duration) -> Result<Bytes, ReplyErrorKind> {
    replies
        .request(subject.into(), HeaderMap::new(), Bytes::from_static(body.as_bytes()), timeout)
        .await
        .map(|m| m.payload)
        .map_err(|e| e.kind())
}

#[tokio::test]
async fn a_late_reply_is_counted_and_never_reaches_a_later_request() {
    let nats = NatsServer::start();
    let (replies, metrics) = mux(&nats).await;
    let responder = nats.client().await;
    let mut requests = subscribe_synced(&responder, "late.op").await;

    assert_eq!(request(&replies, "late.op", "first", Duration::from_millis(100)).await, Err(ReplyErrorKind::TimedOut));
    let first = requests.next().await.unwrap();
    assert_eq!(replies.pending(), 0, "the timed-out waiter is gone");

    // A second request is waiting when the first one's answer finally comes.
    let second = tokio::spawn({
        let replies = replies.clone();
        async move { request(&replies, "late.op", "second", Duration::from_secs(10)).await }
    });
    let second_msg = requests.next().await.unwrap();
    assert_eq!(second_msg.payload, "second");
    responder.publish(first.reply.unwrap(), "answer to first".into()).await.unwrap();
    responder.flush().await.unwrap();
    eventually("the late reply counted", Duration::from_secs(5), || async { (metrics.late_replies.get() == 1).then_some(()) }).await;
    responder.publish(second_msg.reply.unwrap(), "answer to second".into()).await.unwrap();

    assert_eq!(second.await.unwrap().unwrap(), "answer to second");
    assert_eq!(metrics.late_replies.get(), 1);
    assert_eq!((replies.pending(), metrics.pending_replies.get()), (0, 0));
}

#[tokio::test]
async fn no_responders_is_not_a_timeout() {
    let nats = NatsServer::start();
    let (replies, metrics) = mux(&nats).await;
    assert_eq!(request(&replies, "nobody.here", "x", Duration::from_secs(5)).await, Err(ReplyErrorKind::NoResponders));
    let silent = nats.client().await;
    let _sub = subscribe_synced(&silent, "silent.op").await;
    assert_eq!(request(&replies, "silent.op", "x", Duration::from_millis(50)).await, Err(ReplyErrorKind::TimedOut));
    assert_eq!(metrics.pending_replies.get(), 0);
}

/// Answers every request on `subject` with `reply-to-<payload>` after a random delay of
/// up to `max_delay_ms`, each in its own task so answers overtake one another.
async fn shuffling_responder(nats: &NatsServer, subject: &str, max_delay_ms: u64) -> tokio::task::JoinHandle<()> {
    support::fixtures::answer_each(nats, subject, move |client, m| async move {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=max_delay_ms))).await;
        let body = format!("reply-to-{}", String::from_utf8_lossy(&m.payload));
        let _ = client.publish(m.reply.unwrap(), body.into()).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_each_caller_gets_exactly_its_own_reply() {
    let nats = NatsServer::start();
    let _responder = shuffling_responder(&nats, "corr.op", 50).await;
    let routes = r#"[[outbound]]
name = "corr"
method = "POST"
path = "/corr"
subject = "corr.op"
mode = "request"
timeout = "10s"
"#;
    let sidecar = Sidecar::start(&routes_toml("corr", "1s", routes), &nats.url(), None).await;
    sidecar.wait_nats().await;
    let url = sidecar.url("/corr");
    for round in 0..3 {
        let calls = (0..64).map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let body = format!("r{round}-c{i}");
                let r = support::post(&url, &body).await;
                (body, r.status, r.text())
            })
        });
        for call in futures::future::join_all(calls).await {
            let (body, status, text) = call.unwrap();
            assert_eq!((status, text), (200, format!("reply-to-{body}")));
        }
    }
    let metrics = sidecar.metrics().await;
    assert!(metrics.contains("\nnatsbridge_pending_replies 0\n"), "{metrics}");
    assert!(metrics.contains("\nnatsbridge_late_replies_total 0\n"), "{metrics}");
}

#[tokio::test]
async fn the_inbox_subscription_survives_a_server_restart() {
    let mut nats = NatsServer::start();
    let (replies, metrics) = mux(&nats).await;
    let _responder = shuffling_responder(&nats, "echo", 0).await;
    assert_eq!(request(&replies, "echo", "before", Duration::from_secs(5)).await.unwrap(), "reply-to-before");
    nats.restart();
    // Both clients reconnect and resubscribe; until then requests fail, and none may
    // fail once they are back (the mux's subscription is the only way a reply arrives).
    eventually("a reply after the restart", Duration::from_secs(20), || async {
        request(&replies, "echo", "after", Duration::from_millis(500)).await.ok().filter(|b| b == "reply-to-after")
    })
    .await;
    for _ in 0..20 {
        assert_eq!(request(&replies, "echo", "again", Duration::from_secs(5)).await.unwrap(), "reply-to-again");
    }
    assert_eq!(metrics.pending_replies.get(), 0);
}

#[tokio::test]
async fn a_stream_waiter_takes_many_replies_and_ends_on_overflow() {
    let nats = NatsServer::start();
    let (replies, metrics) = mux(&nats).await;
    let sender = nats.client().await;

    let mut stream = replies.stream(4);
    for i in 0..3 {
        sender.publish(stream.reply_subject().clone(), format!("part {i}").into()).await.unwrap();
    }
    for i in 0..3 {
        assert_eq!(stream.next().await.unwrap().payload, format!("part {i}"));
    }
    assert_eq!(replies.pending(), 1);
    drop(stream);
    assert_eq!((replies.pending(), metrics.pending_replies.get()), (0, 0));

    // A reader that does not keep up: the buffered replies (a burst may run 4 × capacity
    // ahead of it), then the overflow; never more growth.
    let mut stream = replies.stream(2);
    for i in 0..10 {
        sender.publish(stream.reply_subject().clone(), format!("part {i}").into()).await.unwrap();
    }
    sender.flush().await.unwrap();
    eventually("the overflowing waiter removed", Duration::from_secs(5), || async { (replies.pending() == 0).then_some(()) }).await;
    for i in 0..8 {
        assert_eq!(stream.next().await.unwrap().payload, format!("part {i}"));
    }
    assert_eq!(stream.next().await.unwrap_err().kind(), ReplyErrorKind::Overflow);
    eventually("dropped replies counted", Duration::from_secs(5), || async { (metrics.late_replies.get() == 2).then_some(()) }).await;
    drop(stream);
    assert_eq!(metrics.pending_replies.get(), 0);
}

#[tokio::test]
async fn jetstream_acks_and_api_errors_are_parsed_by_us() {
    let nats = NatsServer::start();
    let (replies, metrics) = mux(&nats).await;
    let js = async_nats::jetstream::new(nats.client().await);
    js.create_stream(async_nats::jetstream::stream::Config { name: "ACKS".into(), subjects: vec!["acks.>".into()], ..Default::default() })
        .await
        .unwrap();
    let timeout = Duration::from_secs(5);
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", "m1");
    let ack = publish_acked(&replies, "acks.a", || h.clone(), "one".into(), timeout).await.unwrap();
    assert_eq!((ack.stream.as_str(), ack.sequence, ack.duplicate), ("ACKS", 1, false));
    let ack = publish_acked(&replies, "acks.a", || h.clone(), "one".into(), timeout).await.unwrap();
    assert_eq!((ack.sequence, ack.duplicate), (1, true));

    let mut h = HeaderMap::new();
    h.insert("Nats-Expected-Last-Sequence", "99");
    let e = publish_acked(&replies, "acks.a", || h.clone(), "x".into(), timeout).await.unwrap_err();
    assert_eq!(e.kind(), PublishErrorKind::Failed);
    let api = e.api_error().expect("the stream's error");
    assert_eq!((api.code, api.err_code), (400, 10071), "{e}");

    let e = publish_acked(&replies, "nostream.a", HeaderMap::new, "x".into(), timeout).await.unwrap_err();
    assert_eq!(e.kind(), PublishErrorKind::NoStream, "{e}");

    // A core subscriber and no stream: the ack never comes (nats-server #8038).
    let silent = nats.client().await;
    let _sub = subscribe_synced(&silent, "captured.a").await;
    let e = publish_acked(&replies, "captured.a", HeaderMap::new, "x".into(), Duration::from_millis(50)).await.unwrap_err();
    assert_eq!(e.kind(), PublishErrorKind::TimedOut, "{e}");
    assert_eq!(metrics.pending_replies.get(), 0);
}
