//! Path f: JetStream ingress, a preloaded stream drained through a consumer into the app.

use std::future::IntoFuture;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};

use crate::load::{App, Phase, Recorder};
use crate::procs::{HttpClient, Usage};

pub async fn create_streams(js: &async_nats::jetstream::Context) {
    use async_nats::jetstream::stream::{Config, StorageType};
    for (name, subject) in [("BENCH_E", "benche.>"), ("BENCH_F", "benchf.>")] {
        let _ = js.delete_stream(name).await;
        js.create_stream(Config {
            name: name.into(),
            subjects: vec![subject.into()],
            storage: StorageType::File,
            num_replicas: 1,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("create stream {name}: {e}"));
    }
}

pub async fn preload(js: &async_nats::jetstream::Context, n: usize, body: &Bytes) {
    let mut acks = futures::stream::FuturesUnordered::new();
    for i in 0..n {
        let ack = js.publish("benchf.job", body.clone()).await.expect("publish");
        acks.push(ack.into_future());
        if acks.len() >= 256 || i + 1 == n {
            while let Some(r) = acks.next().await {
                r.expect("preload ack");
            }
        }
    }
}

/// Waits until `durable` on BENCH_F has acked everything; returns when the last ack landed.
pub async fn wait_drained(js: &async_nats::jetstream::Context, durable: &str, n: usize, timeout: Duration) -> Result<Instant, String> {
    let deadline = Instant::now() + timeout;
    let stream = js.get_stream("BENCH_F").await.map_err(|e| e.to_string())?;
    loop {
        if let Ok(info) = stream.consumer_info(durable).await {
            if info.ack_floor.stream_sequence >= n as u64 && info.num_ack_pending == 0 {
                return Ok(Instant::now());
            }
        }
        if Instant::now() > deadline {
            let info = stream.consumer_info(durable).await.map(|i| format!("{:?}", (i.ack_floor, i.num_ack_pending, i.num_pending)));
            return Err(format!("consumer {durable} did not drain {n} messages in {timeout:?}: {info:?}"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The raw baseline: an async-nats pull consumer calling the same app, `conc` in flight,
/// double-acking each message as the sidecar does.
pub async fn raw_consumer(
    js: &async_nats::jetstream::Context,
    client: &HttpClient,
    app: &App,
    conc: usize,
    stop: tokio_util::sync::CancellationToken,
) {
    use async_nats::jetstream::consumer::{pull, AckPolicy};
    let stream = js.get_stream("BENCH_F").await.unwrap();
    let consumer = stream
        .get_or_create_consumer(
            "raw-f",
            pull::Config {
                durable_name: Some("raw-f".into()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: (conc * 2) as i64,
                filter_subject: "benchf.>".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let uri: Uri = format!("http://{}/ingest", app.addr).parse().unwrap();
    let messages = consumer.stream().max_messages_per_batch(conc * 2).messages().await.unwrap();
    let client = client.clone();
    let work = messages.take_until(stop.cancelled_owned()).for_each_concurrent(conc, move |m| {
        let (client, uri) = (client.clone(), uri.clone());
        async move {
            let Ok(m) = m else { return };
            let mut b = Request::post(uri).header(http::header::CONTENT_TYPE, "application/octet-stream");
            if let Some(h) = &m.headers {
                for (k, vs) in h.iter() {
                    for v in vs {
                        b = b.header(k.as_ref() as &str, v.as_str());
                    }
                }
            }
            let req = b.body(Full::new(m.payload.clone())).unwrap();
            match client.request(req).await {
                Ok(r) if r.status().is_success() => {
                    let _ = r.into_body().collect().await;
                    let _ = m.double_ack().await;
                }
                _ => {
                    let _ = m.ack_with(async_nats::jetstream::AckKind::Nak(Some(Duration::from_secs(1)))).await;
                }
            }
        }
    });
    work.await;
}

/// A drain's phase: throughput from the app's first call to the last ack.
pub fn drain_phase(path: &str, label: &str, app: &App, n: usize, conc: usize, drained: Result<Instant, String>, usage: Usage) -> Phase {
    let rec = Recorder::new();
    let first = *app.first_ingest.lock().unwrap();
    let mut p = Phase::from(path, label, "drain", &rec, 0.0, 0);
    p.concurrency = Some(conc);
    p.set_usage(usage);
    match (drained, first) {
        (Ok(end), Some(first)) => {
            p.seconds = end.saturating_duration_since(first).as_secs_f64();
            p.requests = n as u64;
            p.throughput = n as f64 / p.seconds.max(1e-9);
            // Redeliveries would show up as extra app calls.
            let calls = app.ingested.load(Ordering::Relaxed);
            if calls < n as u64 {
                p.errors = n as u64 - calls;
                p.first_error = Some(format!("the app saw {calls} calls for {n} messages"));
            }
        }
        (Err(e), _) => {
            p.errors = 1;
            p.first_error = Some(e);
        }
        (Ok(_), None) => {
            p.errors = 1;
            p.first_error = Some("the app saw no calls".into());
        }
    }
    p
}
