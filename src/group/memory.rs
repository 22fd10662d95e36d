//! `MemoryLeases`: a lease table in memory, for tests and for several consumers in one
//! process.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use kinesis_tower_layers::Checkpoint;

use super::lease::{Lease, LeaseBackend, LeaseError};

/// A lease table in memory, with the same conditions as the real back-ends. Clones share the
/// table, so consumers in one process can form a group over it (nothing survives the
/// process).
#[derive(Clone, Debug, Default)]
pub struct MemoryLeases {
    table: Arc<Mutex<BTreeMap<String, Lease>>>,
}

impl MemoryLeases {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<String, Lease>) -> T) -> T {
        f(&mut self.table.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Applies `f` to the lease if `worker` holds it at `counter`.
    fn if_held(&self, key: &str, worker: &str, counter: u64, f: impl FnOnce(&mut Lease)) -> bool {
        self.if_held_and(key, worker, counter, |_| true, f)
    }

    /// Applies `f` to the lease if `worker` holds it at `counter` and `also` holds of it.
    fn if_held_and(
        &self,
        key: &str,
        worker: &str,
        counter: u64,
        also: impl FnOnce(&Lease) -> bool,
        f: impl FnOnce(&mut Lease),
    ) -> bool {
        self.with(|table| match table.get_mut(key) {
            Some(lease) if lease.is_owned_by(worker) && lease.counter == counter && also(lease) => {
                f(lease);
                lease.counter += 1;
                true
            }
            _ => false,
        })
    }
}

#[async_trait]
impl LeaseBackend for MemoryLeases {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn list(&self) -> Result<Vec<Lease>, LeaseError> {
        Ok(self.with(|table| table.values().cloned().collect()))
    }

    async fn create(&self, lease: &Lease) -> Result<(), LeaseError> {
        self.with(|table| {
            table
                .entry(lease.key.clone())
                .or_insert_with(|| lease.clone());
        });
        Ok(())
    }

    async fn claim(&self, seen: &Lease, worker: &str) -> Result<Option<Lease>, LeaseError> {
        Ok(self.with(|table| match table.get_mut(&seen.key) {
            Some(lease) if lease.owner == seen.owner && lease.counter == seen.counter => {
                if !lease.is_owned_by(worker) {
                    lease.owner_switches += 1;
                }
                lease.owner = Some(worker.to_owned());
                lease.counter += 1;
                lease.handoff_to = None;
                Some(lease.clone())
            }
            _ => None,
        }))
    }

    async fn renew(&self, key: &str, worker: &str, counter: u64) -> Result<bool, LeaseError> {
        Ok(self.if_held(key, worker, counter, |_| {}))
    }

    async fn checkpoint(
        &self,
        key: &str,
        worker: &str,
        counter: u64,
        checkpoint: Checkpoint,
    ) -> Result<bool, LeaseError> {
        Ok(self.if_held(key, worker, counter, |lease| {
            lease.checkpoint = Some(checkpoint);
            lease.owner_switches = 0;
        }))
    }

    async fn release(
        &self,
        key: &str,
        worker: &str,
        counter: u64,
        to: Option<&str>,
    ) -> Result<bool, LeaseError> {
        let answers_request = |lease: &Lease| to.is_none() || lease.handoff_to.as_deref() == to;
        Ok(
            self.if_held_and(key, worker, counter, answers_request, |lease| {
                lease.owner = to.map(str::to_owned);
                if to.is_some() {
                    lease.owner_switches += 1;
                }
                lease.handoff_to = None;
            }),
        )
    }

    async fn request_handoff(
        &self,
        key: &str,
        owner: &str,
        worker: &str,
    ) -> Result<bool, LeaseError> {
        Ok(self.with(|table| match table.get_mut(key) {
            Some(lease) if lease.is_owned_by(owner) && lease.handoff_to.is_none() => {
                lease.handoff_to = Some(worker.to_owned());
                true
            }
            _ => false,
        }))
    }

    async fn withdraw_handoff(&self, key: &str, worker: &str) -> Result<bool, LeaseError> {
        Ok(self.with(|table| match table.get_mut(key) {
            Some(lease) if lease.handoff_to.as_deref() == Some(worker) => {
                lease.handoff_to = None;
                true
            }
            _ => false,
        }))
    }
}
