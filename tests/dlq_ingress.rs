//! Dead letters at the edges: a recreated stream's message that reuses an earlier one's
//! sequence gets its own dead letter.

mod support;

use std::time::Duration;

use async_nats::jetstream::{self, message::StreamMessage};

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
