//! The leases this worker holds, shared by the worker loop (renewals, handoffs) and the
//! group's checkpoint store (checkpoints ride on the lease rows).
//!
//! Every write of a held lease goes through its lock, so renewals and checkpoints of one lease
//! never race: each is conditional on the counter the previous one left.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kinesis_tower_layers::Checkpoint;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::lease::{LeaseBackend, LeaseError};

/// One held lease.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) state: tokio::sync::Mutex<HeldState>,
}

#[derive(Debug)]
pub(crate) struct HeldState {
    /// The counter the last write of this worker left.
    pub(crate) counter: u64,
    /// When this worker's last conditional write of the lease succeeded.
    pub(crate) renewed_at: Instant,
    /// What the table holds.
    pub(crate) stored: Option<Checkpoint>,
    /// Accepted, written at the next renewal or flush.
    pub(crate) pending: Option<Checkpoint>,
    pub(crate) pending_since: Option<Instant>,
    /// Why the lease is gone, once it is: nothing is written under it any more.
    pub(crate) lost: Option<String>,
}

impl HeldState {
    /// The checkpoint as this worker knows it (pending included).
    pub(crate) fn current(&self) -> Option<Checkpoint> {
        self.pending.or(self.stored)
    }
}

/// What a write of a held lease found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Written {
    Done,
    /// The lease is gone (taken, or this worker missed its renewals).
    Lost,
}

/// The group's state that outlives one listing: held leases and the last listing's
/// checkpoints.
#[derive(Debug)]
pub(crate) struct Leases {
    pub(crate) worker: String,
    pub(crate) backend: Arc<dyn LeaseBackend>,
    pub(crate) lease_duration: Duration,
    held: Mutex<HashMap<String, Arc<Held>>>,
    /// Checkpoints of the last listing, for shards this worker does not hold.
    listed: Mutex<HashMap<String, Option<Checkpoint>>>,
    /// Tells the running worker loop that a write found a lease lost.
    lost: Mutex<Option<mpsc::UnboundedSender<String>>>,
    /// The run is stopping: renew what is held, take nothing new.
    pub(crate) stopping: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for dyn LeaseBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Leases {
    pub(crate) fn new(
        worker: String,
        backend: Arc<dyn LeaseBackend>,
        lease_duration: Duration,
    ) -> Self {
        Self {
            worker,
            backend,
            lease_duration,
            held: Mutex::default(),
            listed: Mutex::default(),
            lost: Mutex::default(),
            stopping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<Arc<Held>> {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    pub(crate) fn all(&self) -> Vec<(String, Arc<Held>)> {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, h)| (k.clone(), h.clone()))
            .collect()
    }

    pub(crate) fn count(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Holds `key` from now, at `counter`, with the table's checkpoint.
    pub(crate) fn insert(&self, key: &str, counter: u64, stored: Option<Checkpoint>) {
        let held = Arc::new(Held {
            state: tokio::sync::Mutex::new(HeldState {
                counter,
                renewed_at: Instant::now(),
                stored,
                pending: None,
                pending_since: None,
                lost: None,
            }),
        });
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.to_owned(), held);
    }

    pub(crate) fn remove(&self, key: &str) {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }

    /// Keeps the checkpoints of a listing.
    pub(crate) fn set_listed(&self, listed: HashMap<String, Option<Checkpoint>>) {
        *self.listed.lock().unwrap_or_else(PoisonError::into_inner) = listed;
    }

    /// The last listing's checkpoint of `key`: `None` if the listing did not have it.
    pub(crate) fn listed(&self, key: &str) -> Option<Option<Checkpoint>> {
        self.listed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .copied()
    }

    pub(crate) fn set_lost_channel(&self, channel: Option<mpsc::UnboundedSender<String>>) {
        *self.lost.lock().unwrap_or_else(PoisonError::into_inner) = channel;
    }

    fn report_lost(&self, key: &str) {
        if let Some(channel) = &*self.lost.lock().unwrap_or_else(PoisonError::into_inner) {
            let _ = channel.send(key.to_owned());
        }
    }

    /// Whether the lease is past the lease duration since this worker's last successful write:
    /// others may have taken it, so this worker writes nothing more under it.
    pub(crate) fn self_expired(&self, state: &HeldState, now: Instant) -> bool {
        now.saturating_duration_since(state.renewed_at) > self.lease_duration
    }

    /// Renews the lease, writing its pending checkpoint with the renewal if it has one. A
    /// write refused by its condition (or not attempted because the lease self-expired) marks
    /// the lease lost and tells the worker loop.
    pub(crate) async fn write(
        &self,
        key: &str,
        state: &mut HeldState,
    ) -> Result<Written, LeaseError> {
        if state.lost.is_some() {
            return Ok(Written::Lost);
        }
        let now = Instant::now();
        if self.self_expired(state, now) {
            self.mark_lost(
                key,
                state,
                format!(
                    "no renewal succeeded for {:?}, the lease duration",
                    self.lease_duration
                ),
            );
            return Ok(Written::Lost);
        }
        let counter = state.counter;
        let pending = state.pending.filter(|p| Some(*p) > state.stored);
        let written = match pending {
            Some(checkpoint) => {
                self.backend
                    .checkpoint(key, &self.worker, counter, checkpoint)
                    .await?
            }
            None => self.backend.renew(key, &self.worker, counter).await?,
        };
        if written {
            state.counter = counter + 1;
            state.renewed_at = now;
            if pending.is_some() {
                state.stored = pending;
            }
            state.pending = None;
            state.pending_since = None;
            return Ok(Written::Done);
        }
        // The condition failed. A write of this worker may have landed unseen (this one, its
        // answer lost and the request sent again; or an earlier one that answered an error):
        // the row then shows this worker one counter further. Take the row as it is and, if
        // this checkpoint is not in it yet, write it once more.
        match self.row(key).await {
            Some(row) if row.is_owned_by(&self.worker) && row.counter == counter + 1 => {
                state.counter = row.counter;
                state.renewed_at = now;
                state.stored = row.checkpoint;
                if pending.is_some_and(|p| row.checkpoint.is_some_and(|c| c >= p))
                    || pending.is_none()
                {
                    state.pending = None;
                    state.pending_since = None;
                    return Ok(Written::Done);
                }
                Box::pin(self.write(key, state)).await
            }
            _ => {
                self.mark_lost(key, state, "another worker took it".to_owned());
                Ok(Written::Lost)
            }
        }
    }

    /// The lease's row as the table holds it now; `None` if it is gone or cannot be read.
    async fn row(&self, key: &str) -> Option<super::lease::Lease> {
        let leases = self.backend.list().await.ok()?;
        leases.into_iter().find(|lease| lease.key == key)
    }

    pub(crate) fn mark_lost(&self, key: &str, state: &mut HeldState, reason: String) {
        if state.lost.is_none() {
            tracing::warn!(worker = %self.worker, shard = %key, %reason, "lease lost; the shard stops here");
            state.lost = Some(reason);
            state.pending = None;
            self.report_lost(key);
        }
    }
}
