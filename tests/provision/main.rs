//! Provisioning against a real nats-server: the plan, apply, idempotency, dry runs,
//! refused and forced changes, the `provision` command, and `run`'s provisioning and
//! readiness checks.
//!
//! The tests, by what they drive: `plan` (the library's plan and apply), `command` (the
//! `provision`, `check` and `--prune` command lines), `run` (a running sidecar's
//! provisioning and readiness). The helpers they share are here.

#[path = "../support/mod.rs"]
mod support;

mod command;
mod plan;
mod run;

use std::time::Duration;

use async_nats::jetstream::{self, stream::StorageType};
use natsbridge::config::{self, Config};
use natsbridge::provision::{self, FieldDiff, Kind, Status};
use support::*;

const WAIT: Duration = Duration::from_secs(20);

fn routes(stream_extra: &str, consumer_extra: &str) -> String {
    format!(
        r#"
[sidecar]
service = "svc"

[[inbound]]
name = "tool-exec"
subject = "tool.execution.requested"
mode = "jetstream"
stream = "TOOL"
durable = "tool-service"
path = "/tools/execute"
max_deliver = 5
backoff = ["1s", "5s"]
ack_wait = "30s"
dead_letter = "dlq.tool.execution.requested"
idempotency = {{ key = "header:Idempotency-Key", ttl = "2h" }}
{consumer_extra}

[[streams]]
name = "TOOL"
subjects = ["tool.>"]
storage = "file"
duplicate_window = "2h"
{stream_extra}
"#
    )
}

fn parse(src: &str) -> Config {
    config::parse(src, "routes.toml").unwrap_or_else(|e| panic!("{e}"))
}

async fn js(server: &NatsServer) -> jetstream::Context {
    jetstream::new(server.client().await)
}

async fn stream_names(js: &jetstream::Context) -> Vec<String> {
    use futures::TryStreamExt;
    let mut v: Vec<String> = js.stream_names().try_collect().await.unwrap();
    v.sort();
    v
}

async fn stream_info(js: &jetstream::Context, name: &str) -> jetstream::stream::Info {
    js.get_stream(name).await.unwrap().info().await.unwrap().clone()
}

fn status<'a>(plan: &'a provision::Plan, kind: Kind, name: &str) -> &'a Status {
    &plan.item(kind, name).unwrap_or_else(|| panic!("no {kind} {name} in\n{plan}")).status
}

/// Publishes `n` messages to the TOOL stream, acked.
async fn publish_tool(js: &jetstream::Context, n: usize) {
    for i in 0..n {
        js.publish("tool.execution.requested", format!("m{i}").into()).await.unwrap().await.unwrap();
    }
}

async fn consumer_info(js: &jetstream::Context, stream: &str, durable: &str) -> jetstream::consumer::Info {
    js.get_stream(stream).await.unwrap().consumer_info(durable).await.unwrap()
}

fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_natsbridge")).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// What is down, and why, as `/statusz` says.
async fn failing(s: &Sidecar) -> serde_json::Value {
    s.statusz().await["failing"].clone()
}

/// A file for service `service` with one jetstream route on the shared stream EV, and
/// `stream` as its `[[streams]]` entry.
fn shared(service: &str, stream: &str) -> String {
    format!(
        "[sidecar]\nservice = \"{service}\"\n\n[[inbound]]\nname = \"{service}-ev\"\nsubject = \"ev.{service}\"\nmode = \"jetstream\"\nstream = \"EV\"\ndurable = \"{service}\"\npath = \"/ev\"\n\n{stream}\n"
    )
}
