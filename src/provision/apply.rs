//! Carrying a plan out: one JetStream call (or a delete and a create) per planned item.

use async_nats::jetstream::{
    self,
    context::{CreateKeyValueError, CreateStreamError, DeleteStreamError, GetStreamError, KeyValueError, UpdateStreamError},
    stream::ConsumerError,
};

use super::plan::{compute, Op, Plan, Planned, Status};
use super::ProvisionError;
use crate::config::Config;

/// Why one planned change could not be made. The text is what the plan shows after
/// `FAILED:`, so the server's own error stays in front (and in [`source`](std::error::Error::source)).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    CreateStream(CreateStreamError),
    #[error(transparent)]
    UpdateStream(UpdateStreamError),
    #[error("cannot delete: {0}")]
    DeleteStream(#[source] DeleteStreamError),
    #[error(transparent)]
    OpenStream(GetStreamError),
    #[error(transparent)]
    CreateConsumer(ConsumerError),
    #[error("cannot delete: {0}")]
    DeleteConsumer(#[source] ConsumerError),
    #[error(transparent)]
    CreateKv(CreateKeyValueError),
    #[error("cannot delete: {0}")]
    DeleteKv(#[source] KeyValueError),
}

async fn execute(js: &jetstream::Context, op: Op) -> Result<(), ApplyError> {
    match op {
        Op::None => Ok(()),
        Op::CreateStream(c) => js.create_stream(c).await.map(drop).map_err(ApplyError::CreateStream),
        Op::UpdateStream(c) => js.update_stream(c).await.map(drop).map_err(ApplyError::UpdateStream),
        Op::RecreateStream(c) => {
            js.delete_stream(&c.name).await.map_err(ApplyError::DeleteStream)?;
            js.create_stream(c).await.map(drop).map_err(ApplyError::CreateStream)
        }
        Op::CreateConsumer { stream, config } | Op::UpdateConsumer { stream, config } => {
            js.create_consumer_on_stream(config, stream).await.map(drop).map_err(ApplyError::CreateConsumer)
        }
        Op::RecreateConsumer { stream, config } => {
            let durable = config.durable_name.clone().unwrap_or_default();
            let s = js.get_stream_no_info(&stream).await.map_err(ApplyError::OpenStream)?;
            s.delete_consumer(&durable).await.map_err(ApplyError::DeleteConsumer)?;
            js.create_consumer_on_stream(config, stream).await.map(drop).map_err(ApplyError::CreateConsumer)
        }
        Op::CreateKv(c) => js.create_key_value(c).await.map(drop).map_err(ApplyError::CreateKv),
        Op::RecreateKv(c) => {
            js.delete_key_value(&c.bucket).await.map_err(ApplyError::DeleteKv)?;
            js.create_key_value(c).await.map(drop).map_err(ApplyError::CreateKv)
        }
    }
}

/// Makes JetStream match the file and returns what was done. Idempotent: a second run is
/// all [`Status::Unchanged`]. Destructive changes are refused unless `force`. A failure on
/// one item is recorded in the plan and the others still run.
pub async fn apply(js: &jetstream::Context, config: &Config, force: bool) -> Result<Plan, ProvisionError> {
    let planned = compute(js, config, force).await?;
    let mut items = Vec::with_capacity(planned.len());
    for Planned { mut item, op } in planned {
        if let Err(error) = execute(js, op).await {
            // The plan is a report that is compared and cloned: it keeps the error's text.
            item.status = Status::Failed { error: error.to_string() };
        }
        items.push(item);
    }
    Ok(Plan { items, applied: true })
}
