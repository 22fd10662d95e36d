//! The group's checkpoint store: checkpoints live on the lease rows, and a checkpoint is
//! accepted only for a lease this worker holds. Accepted checkpoints are written with the
//! lease's next renewal (at most a second later) and on flush, each write conditional on the
//! owner and the counter: a worker that lost the lease cannot move the checkpoint, forwards
//! or backwards.

use std::sync::Arc;

use async_trait::async_trait;
use kinesis_tower_layers::checkpoint::SetOutcome;
use kinesis_tower_layers::{Checkpoint, CheckpointStore, StoreError};
use tokio::time::Instant;

use super::held::Leases;
use super::lease::LeaseError;

/// The checkpoint store of a [`ConsumerGroup`](super::ConsumerGroup): its lease table.
/// [`ConsumerBuilder::group`](crate::ConsumerBuilder::group) installs it; there is no need
/// to build one.
#[derive(Clone, Debug)]
pub struct GroupStore {
    pub(crate) leases: Arc<Leases>,
}

fn store_error(namespace: Option<&str>, error: LeaseError) -> StoreError {
    let (backend, retryable) = match &error {
        LeaseError::Backend {
            backend, retryable, ..
        } => (*backend, *retryable),
        _ => ("lease table", false),
    };
    let shard_id = match &error {
        LeaseError::Backend { key, .. } => key.clone(),
        LeaseError::Corrupt { key, .. } => Some(key.clone()),
        LeaseError::InvalidName { .. } => None,
    };
    StoreError::Backend {
        backend,
        operation: "lease checkpoint",
        namespace: namespace.map(str::to_owned),
        shard_id,
        retryable,
        source: Box::new(error),
    }
}

#[async_trait]
impl CheckpointStore for GroupStore {
    async fn get(&self, namespace: &str, shard_id: &str) -> Result<Option<Checkpoint>, StoreError> {
        if let Some(held) = self.leases.get(shard_id) {
            return Ok(held.state.lock().await.current());
        }
        if let Some(listed) = self.leases.listed(shard_id) {
            return Ok(listed);
        }
        let leases = self
            .leases
            .backend
            .list()
            .await
            .map_err(|e| store_error(Some(namespace), e))?;
        Ok(leases
            .into_iter()
            .find(|lease| lease.key == shard_id)
            .and_then(|lease| lease.checkpoint))
    }

    async fn set(
        &self,
        _namespace: &str,
        shard_id: &str,
        checkpoint: Checkpoint,
    ) -> Result<SetOutcome, StoreError> {
        let lost = |reason: &str| StoreError::LeaseLost {
            shard_id: shard_id.to_owned(),
            worker: self.leases.worker.clone(),
            reason: reason.to_owned(),
        };
        let Some(held) = self.leases.get(shard_id) else {
            return Err(lost("this worker does not hold it"));
        };
        let mut state = held.state.lock().await;
        if let Some(reason) = &state.lost {
            return Err(lost(reason));
        }
        if self.leases.self_expired(&state, Instant::now()) {
            return Err(lost("no renewal succeeded for the lease duration"));
        }
        if state.current().is_some_and(|current| current >= checkpoint) {
            return Ok(SetOutcome::NotAdvanced);
        }
        state.pending = Some(checkpoint);
        state.pending_since.get_or_insert_with(Instant::now);
        Ok(SetOutcome::Advanced)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        for (key, held) in self.leases.all() {
            let mut state = held.state.lock().await;
            if state.pending.is_none() || state.lost.is_some() {
                continue;
            }
            // A lost lease is not a failed flush: its checkpoint is dropped, the worker loop
            // revokes the shard, and its new owner reads it from the last checkpoint.
            self.leases
                .write(&key, &mut state)
                .await
                .map_err(|e| store_error(None, e))?;
        }
        Ok(())
    }

    async fn list(&self, namespace: &str) -> Result<Vec<(String, Checkpoint)>, StoreError> {
        let leases = self
            .leases
            .backend
            .list()
            .await
            .map_err(|e| store_error(Some(namespace), e))?;
        let mut out = Vec::with_capacity(leases.len());
        for lease in leases {
            let checkpoint = match self.leases.get(&lease.key) {
                Some(held) => held.state.lock().await.current(),
                None => lease.checkpoint,
            };
            if let Some(checkpoint) = checkpoint {
                out.push((lease.key, checkpoint));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}
