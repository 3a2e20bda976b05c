//! Dead letters at the edges: a recreated stream's message that reuses an earlier one's
//! sequence gets its own dead letter, and a message near `max_payload` is dead-lettered
//! with its description cut short rather than nak'ed for ever.

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
