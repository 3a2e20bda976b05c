//! `provision --prune`: deleting the durable consumers this service owns whose routes are
//! gone. Ownership is the metadata provisioning and ingress write on every consumer
//! ([`OWNER_KEY`]), never the durable's name: a consumer someone else made under a
//! similar name is never touched.

use std::collections::BTreeSet;

use async_nats::jetstream;
use futures::TryStreamExt;

use super::plan::{item, Item, Plan, Status};
use super::spec::{jetstream_routes, OWNER_KEY};
use super::{Kind, ProvisionError};
use crate::config::Config;

/// Finds this service's consumers whose routes are gone and, unless `dry_run`, deletes
/// them. One still holding messages (pending or unacked) is refused unless `force`.
pub async fn prune(js: &jetstream::Context, config: &Config, force: bool, dry_run: bool) -> Result<Plan, ProvisionError> {
    let service = &config.sidecar.service;
    let wanted: BTreeSet<(String, String)> = jetstream_routes(config).map(|(_, c)| (c.stream.clone(), c.durable.clone())).collect();
    let read =
        |name: &str, e: Box<dyn std::error::Error + Send + Sync>| ProvisionError::Read { kind: Kind::Stream, name: name.into(), source: e };
    let streams: Vec<String> = js.stream_names().try_collect().await.map_err(|e| read("*", Box::new(e)))?;
    let mut items = Vec::new();
    for name in streams {
        let stream = js.get_stream_no_info(&name).await.map_err(|e| read(&name, Box::new(e)))?;
        let consumers: Vec<jetstream::consumer::Info> = stream.consumers().try_collect().await.map_err(|e| read(&name, Box::new(e)))?;
        for info in consumers {
            let owned = info.config.metadata.get(OWNER_KEY) == Some(service);
            let Some(durable) = info.config.durable_name.clone().filter(|_| owned) else { continue };
            if wanted.contains(&(name.clone(), durable.clone())) {
                continue;
            }
            items.push(prune_one(&stream, &name, &durable, &info, force, dry_run).await);
        }
    }
    Ok(Plan { items, applied: !dry_run })
}

async fn prune_one(
    stream: &jetstream::stream::Stream<()>,
    name: &str,
    durable: &str,
    info: &jetstream::consumer::Info,
    force: bool,
    dry_run: bool,
) -> Item {
    let label = format!("{name}/{durable}");
    let held = info.num_pending + info.num_ack_pending as u64;
    if held > 0 && !force {
        let reason = format!(
            "no route of this service uses it, but it still holds {held} message{} ({} not delivered, {} unacked); with --force they are never delivered",
            if held == 1 { "" } else { "s" },
            info.num_pending,
            info.num_ack_pending
        );
        return item(Kind::Consumer, label, Status::Refused { reason, diff: Vec::new() });
    }
    if dry_run {
        return item(Kind::Consumer, label, Status::Deleted);
    }
    match stream.delete_consumer(durable).await {
        Ok(_) => item(Kind::Consumer, label, Status::Deleted),
        Err(e) => item(Kind::Consumer, label, Status::Failed { error: format!("cannot delete: {e}") }),
    }
}
