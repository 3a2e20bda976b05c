//! Dead letters at the edges: a recreated stream's message that reuses an earlier one's
//! sequence gets its own dead letter, a message near `max_payload` is dead-lettered
//! with its description cut short rather than nak'ed for ever, and one whose dead letter
//! cannot fit even bare is kept (nak'ed, counted) until the dead-letter stream takes it.

mod support;

use std::time::Duration;

use async_nats::jetstream::{self, message::StreamMessage};
use bytes::Bytes;

use support::fixtures::*;
use support::*;

fn route(extra: &str) -> String {
    routes_toml("svc", "3s", &tool_exec_route(extra))
}

async fn tool_stream(js: &jetstream::Context) {
    js.create_stream(jetstream::stream::Config { name: "TOOL".into(), subjects: vec!["tool.>".into()], ..Default::default() })
        .await
        .unwrap();
}

async fn dead_letter(js: &jetstream::Context, seq: u64) -> StreamMessage {
    let dlq = js.get_stream("DLQ").await.unwrap();
    eventually(&format!("dead letter {seq}"), Duration::from_secs(20), || {
        let dlq = dlq.clone();
        async move { dlq.get_raw_message(seq).await.ok() }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_streams_message_reusing_a_sequence_gets_its_own_dead_letter() {
    let nats = NatsServer::start();
    let js = jetstream::new(nats.client().await);
    tool_stream(&js).await;
    dlq_stream(&js).await;
    let app = App::script(|_, _| async { respond(422, "no") }).await;
    let first = Sidecar::start(&route(""), &nats.url(), Some(&app.url())).await;
    let seq = js_publish(&js, "tool.exec.a", &[], "before").await.sequence;
    assert_eq!(&dead_letter(&js, 1).await.payload[..], b"before");
    settled(&js, seq).await;
    first.stop().await;

    // The stream is recreated (its consumer goes with it) within the dead-letter stream's
    // duplicate window, and numbers its messages from 1 again.
    js.delete_stream("TOOL").await.unwrap();
    tool_stream(&js).await;
    let again = js_publish(&js, "tool.exec.a", &[], "after").await.sequence;
    assert_eq!(again, seq, "the same sequence");
    let second = Sidecar::start(&route(""), &nats.url(), Some(&app.url())).await;
    let dl = dead_letter(&js, 2).await;
    assert_eq!(&dl.payload[..], b"after", "not taken for the earlier message's dead letter");
    settled(&js, again).await;
    assert_eq!(dlq_count(&js).await, 2);
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_near_max_payload_is_dead_lettered_with_its_error_cut_short() {
    // 8 KiB: a 7,000-byte message fits, and so does its dead letter with a short error,
    // but not with the first KiB of the app's answer.
    let nats = NatsServer::start_with("max_payload: 8192");
    let js = jetstream::new(nats.client().await);
    tool_stream(&js).await;
    dlq_stream(&js).await;
    let answer = "e".repeat(4096);
    let app = App::script(move |_, _| {
        let answer = answer.clone();
        async move { respond(422, &answer) }
    })
    .await;
    let sidecar = Sidecar::start(&route("backoff = [\"200ms\"]"), &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    let payload = "p".repeat(7000);
    let seq = js.publish("tool.exec.big", Bytes::from(payload.clone())).await.unwrap().await.unwrap().sequence;
    let dl = dead_letter(&js, 1).await;
    settled(&js, seq).await;
    assert!(dl.payload[..] == *payload.as_bytes(), "the payload is kept whole");
    let error = dl.headers.get("Bridge-Dlq-Error").map(|v| v.as_str().to_owned()).unwrap_or_default();
    assert!(error.len() <= 128 && error.chars().all(|c| c == 'e'), "{error}");
    assert_eq!(dl.headers.get("Bridge-Dlq-Reason").map(|v| v.as_str()), Some("poison"));
    assert_eq!(app.hits().len(), 1, "termed after its dead letter, not redelivered");
    sidecar.stop().await;
}

/// The payload alone is over the dead-letter stream's `max_msg_size`, so no trim makes
/// its dead letter fit. The message must not be termed (that would lose it): it is
/// nak'ed and counted, and it stays in its stream until an operator makes room; then it
/// is dead-lettered whole, with its full description, and only then settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_even_bare_keeps_its_message_until_the_stream_takes_it() {
    let nats = NatsServer::start();
    let js = jetstream::new(nats.client().await);
    tool_stream(&js).await;
    let small =
        jetstream::stream::Config { name: "DLQ".into(), subjects: vec!["dlq.>".into()], max_message_size: 4096, ..Default::default() };
    js.create_stream(small.clone()).await.unwrap();
    let app = App::script(|_, _| async { respond(422, "no") }).await;
    let sidecar = Sidecar::start(&route("backoff = [\"200ms\"]"), &nats.url(), Some(&app.url())).await;
    sidecar.wait_ready().await;
    let payload = "p".repeat(5000);
    let seq = js.publish("tool.exec.big", Bytes::from(payload.clone())).await.unwrap().await.unwrap().sequence;

    // Refused, counted, and delivered again: a second call to the app is the proof that
    // the first outcome was a nak, not a term.
    eventually("the dead letter refused and the message back", Duration::from_secs(20), || async {
        let too_large = metric(&sidecar.metrics().await, r#"natsbridge_dlq_too_large_total{route="tool-exec"}"#).unwrap_or(0.0);
        (too_large >= 1.0 && app.hits().len() >= 2).then_some(())
    })
    .await;
    assert_eq!(dlq_count(&js).await, 0);
    let info = js.get_stream("TOOL").await.unwrap().consumer_info("tool").await.unwrap();
    assert!(info.ack_floor.stream_sequence < seq, "settled without a dead letter: {info:?}");

    js.update_stream(jetstream::stream::Config { max_message_size: 64 << 10, ..small }).await.unwrap();
    let dl = dead_letter(&js, 1).await;
    settled(&js, seq).await;
    assert!(dl.payload[..] == *payload.as_bytes(), "the payload is kept whole");
    assert_eq!(dl.headers.get("Bridge-Dlq-Reason").map(|v| v.as_str()), Some("poison"));
    assert_eq!(dl.headers.get("Bridge-Dlq-Error").map(|v| v.as_str()), Some("no"), "the whole description once it fits");
    assert_eq!(dlq_count(&js).await, 1);
    sidecar.stop().await;
}
