//! The `CheckpointStore` trait and the `Checkpointer` handle that binds a store to a namespace.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use tokio::sync::watch;

use super::metrics::CheckpointMetrics;
use super::Checkpoint;
use crate::record::{Record, ShardId};
use crate::BoxError;

/// What a [`CheckpointStore::set`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetOutcome {
    /// The checkpoint moved forward (or was recorded for the first time; for buffered stores:
    /// it is pending and will be written at the next flush).
    Advanced,
    /// The stored checkpoint was already at or past the given one; nothing changed.
    NotAdvanced,
}

/// An error of a checkpoint store. Says which back-end and operation failed and what to check.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The back-end failed or could not be reached.
    #[error("checkpoint store {backend}: {operation} failed{}: {source}; check that the {backend} back-end is reachable and its table exists",
        context_suffix(namespace.as_deref(), shard_id.as_deref()))]
    Backend {
        /// Which back-end (`sqlite`, `redis`, ...).
        backend: &'static str,
        /// What was being done (`get`, `set`, `flush`, `create table`).
        operation: &'static str,
        /// The namespace, when the operation had one.
        namespace: Option<String>,
        /// The shard, when the operation had one.
        shard_id: Option<String>,
        /// Whether trying again later may succeed.
        retryable: bool,
        /// The back-end's own error.
        source: BoxError,
    },
    /// A table, key prefix or namespace name that the back-end cannot take safely.
    #[error("invalid checkpoint {what} {name:?}: {reason}")]
    InvalidName {
        /// `table name`, `key prefix`, ...
        what: &'static str,
        /// The rejected name.
        name: String,
        /// What is allowed.
        reason: &'static str,
    },
    /// The checkpoint was refused because this worker no longer holds the shard's lease (a
    /// consumer group moved the shard to another worker, or this worker missed its renewals
    /// for the lease duration). Not retryable: the consumer stops reading the shard, and its
    /// new owner reads it again from the last checkpoint written under the lease.
    #[error("checkpoint for shard {shard_id} refused: worker {worker} no longer holds its lease ({reason}); the shard's new owner reads it again from its last checkpoint")]
    LeaseLost {
        /// The shard.
        shard_id: String,
        /// This worker.
        worker: String,
        /// Why the lease is gone.
        reason: String,
    },
    /// The stored value is not a checkpoint this library wrote.
    #[error("corrupt checkpoint for shard {shard_id} in namespace {namespace}: {reason}; delete the row/key to restart that shard from the configured position")]
    Corrupt {
        /// The namespace.
        namespace: String,
        /// The shard.
        shard_id: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn context_suffix(namespace: Option<&str>, shard_id: Option<&str>) -> String {
    match (namespace, shard_id) {
        (Some(n), Some(s)) => format!(" for shard {s} in namespace {n}"),
        (Some(n), None) => format!(" in namespace {n}"),
        (None, Some(s)) => format!(" for shard {s}"),
        (None, None) => String::new(),
    }
}

impl StoreError {
    /// Whether trying the same operation again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Backend {
                retryable: true,
                ..
            }
        )
    }
}

/// Where checkpoints live.
///
/// Keys are (namespace, shard id); the consumer uses its app name and stream as the namespace,
/// so several applications and streams can share one table. Every implementation is monotonic:
/// [`set`](CheckpointStore::set) never moves a shard's checkpoint backwards (in
/// [`Checkpoint`]'s order). A buffered store may keep writes in memory until
/// [`flush`](CheckpointStore::flush); [`get`](CheckpointStore::get) must still see them.
#[async_trait]
pub trait CheckpointStore: Send + Sync + 'static {
    /// The shard's checkpoint, or `None` when it has none. An unreachable back-end is an error,
    /// never `None`.
    async fn get(&self, namespace: &str, shard_id: &str) -> Result<Option<Checkpoint>, StoreError>;

    /// Moves the shard's checkpoint to `checkpoint` if that is after the stored one.
    async fn set(
        &self,
        namespace: &str,
        shard_id: &str,
        checkpoint: Checkpoint,
    ) -> Result<SetOutcome, StoreError>;

    /// Writes whatever is buffered. Stores that write through return at once.
    async fn flush(&self) -> Result<(), StoreError>;

    /// Every shard's checkpoint in `namespace`, sorted by shard id (buffered writes included).
    async fn list(&self, namespace: &str) -> Result<Vec<(String, Checkpoint)>, StoreError>;
}

#[async_trait]
impl<T: CheckpointStore + ?Sized> CheckpointStore for Arc<T> {
    async fn get(&self, namespace: &str, shard_id: &str) -> Result<Option<Checkpoint>, StoreError> {
        (**self).get(namespace, shard_id).await
    }

    async fn set(
        &self,
        namespace: &str,
        shard_id: &str,
        checkpoint: Checkpoint,
    ) -> Result<SetOutcome, StoreError> {
        (**self).set(namespace, shard_id, checkpoint).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        (**self).flush().await
    }

    async fn list(&self, namespace: &str) -> Result<Vec<(String, Checkpoint)>, StoreError> {
        (**self).list(namespace).await
    }
}

/// A checkpoint store bound to one namespace (app name and stream): what handlers, layers and
/// stream users commit progress through. Cheap to clone.
///
/// Every write to the store is counted and timed per shard through the `metrics` facade
/// (`kinesis_checkpoints_written_total`, `kinesis_checkpoint_duration_seconds`,
/// `kinesis_checkpoint_errors_total`; see [`metric_names`](crate::metric_names)), labelled
/// with the stream set by [`with_stream_label`](Checkpointer::with_stream_label) (the
/// consumer sets its stream's name; otherwise the namespace) and the shard.
///
/// ```
/// # tokio_test_block(async {
/// use kinesis_tower_layers::{Checkpointer, MemoryStore, Checkpoint};
///
/// let checkpointer = Checkpointer::new(MemoryStore::new(), "my-app:orders");
/// let seq = "12345".parse().unwrap();
/// checkpointer.set("shardId-000000000000", Checkpoint::at(seq)).await.unwrap();
/// assert_eq!(checkpointer.get("shardId-000000000000").await.unwrap(), Some(Checkpoint::at(seq)));
/// # });
/// # fn tokio_test_block(f: impl std::future::Future<Output = ()>) {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Clone)]
pub struct Checkpointer {
    store: Arc<dyn CheckpointStore>,
    namespace: Arc<str>,
    /// Closed shards whose last delivered record is not checkpointed yet: once a checkpoint
    /// reaches it, [`Checkpoint::ShardEnd`] is written instead.
    ended: Arc<Mutex<HashMap<String, Ending>>>,
    metrics: Arc<CheckpointMetrics>,
    /// How many record checkpoints (`Checkpoint::Sequence`) were written through any clone.
    progress_writes: Arc<std::sync::atomic::AtomicU64>,
}

/// A closed shard waiting for its last delivered record to be checkpointed.
struct Ending {
    last: Checkpoint,
    /// Turns `true` once [`Checkpoint::ShardEnd`] has been written.
    written: watch::Sender<bool>,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer")
            .field("namespace", &self.namespace)
            .field("stream_label", self.metrics.stream())
            .finish_non_exhaustive()
    }
}

impl Checkpointer {
    /// Binds `store` to `namespace`.
    pub fn new(store: impl CheckpointStore, namespace: impl Into<Arc<str>>) -> Self {
        Self::from_arc(Arc::new(store), namespace)
    }

    /// Binds a shared store to `namespace`.
    pub fn from_arc(store: Arc<dyn CheckpointStore>, namespace: impl Into<Arc<str>>) -> Self {
        let namespace: Arc<str> = namespace.into();
        Self {
            store,
            metrics: Arc::new(CheckpointMetrics::new(namespace.clone())),
            namespace,
            ended: Arc::default(),
            progress_writes: Arc::default(),
        }
    }

    #[doc(hidden)]
    /// The value of the `stream` label of this checkpointer's metrics (default: the
    /// namespace). Shards' metric handles are registered again under the new label.
    pub fn with_stream_label(mut self, stream: impl Into<Arc<str>>) -> Self {
        self.metrics = Arc::new(CheckpointMetrics::new(stream.into()));
        self
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn CheckpointStore> {
        &self.store
    }

    /// The shard's checkpoint.
    pub async fn get(&self, shard_id: &str) -> Result<Option<Checkpoint>, StoreError> {
        // `(*self.store)`: the store's own method; `self.store.get` would go through the
        // `Arc<T>` impl first and box one more future.
        (*self.store).get(&self.namespace, shard_id).await
    }

    /// Moves the shard's checkpoint forward to `checkpoint` (never backwards). On a shard that
    /// has ended (see [`shard_ended`](Checkpointer::shard_ended)), reaching its last record
    /// writes [`Checkpoint::ShardEnd`].
    pub async fn set(
        &self,
        shard_id: &str,
        checkpoint: Checkpoint,
    ) -> Result<SetOutcome, StoreError> {
        if !self.reaches_end(shard_id, &checkpoint) {
            let outcome = self.write(shard_id, checkpoint).await?;
            // `shard_ended` may have registered the end while this write was on its way (after
            // its own read of the store): look again now that the write has landed.
            if !self.reaches_end(shard_id, &checkpoint) {
                return Ok(outcome);
            }
        }
        let outcome = self.write(shard_id, Checkpoint::ShardEnd).await?;
        if let Some(ending) = self.lock_ended().remove(shard_id) {
            ending.written.send_replace(true);
        }
        Ok(outcome)
    }

    /// One write to the store, counted and timed.
    async fn write(
        &self,
        shard_id: &str,
        checkpoint: Checkpoint,
    ) -> Result<SetOutcome, StoreError> {
        let timer = self.metrics.start(shard_id);
        // Through the `dyn` store directly, not the `Arc<T>` impl (one boxed future, not two).
        let result = (*self.store)
            .set(&self.namespace, shard_id, checkpoint)
            .await;
        timer.finish(&result);
        if result.is_ok() && matches!(checkpoint, Checkpoint::Sequence { .. }) {
            self.progress_writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        result
    }

    /// How many record checkpoints were written through this checkpointer and its clones (the
    /// consumer warns when a stack handles records and this stays 0).
    #[doc(hidden)]
    pub fn progress_writes(&self) -> u64 {
        self.progress_writes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn reaches_end(&self, shard_id: &str, checkpoint: &Checkpoint) -> bool {
        self.lock_ended()
            .get(shard_id)
            .is_some_and(|ending| *checkpoint >= ending.last)
    }

    #[doc(hidden)]
    /// Records that a closed shard has been read to its end, `last` being the last record this
    /// consumer delivered from it (`None` if it delivered none). Once the shard's checkpoint
    /// covers `last` (already, or through a later [`set`](Checkpointer::set) or
    /// [`commit`](Checkpointer::commit)), it becomes [`Checkpoint::ShardEnd`], so after a
    /// restart the shard is not read again and its children start where they stopped.
    ///
    /// The consumer calls this when a shard's last batch has been handled; `CheckpointLayer`
    /// users have usually written `ShardEnd` already, stream users get it when they commit the
    /// shard's last record.
    pub async fn shard_ended(
        &self,
        shard_id: &str,
        last: Option<Checkpoint>,
    ) -> Result<(), StoreError> {
        let Some(last) = last else {
            self.write(shard_id, Checkpoint::ShardEnd).await?;
            return Ok(());
        };
        // Registered before reading the store, so a commit racing with this call either sees
        // the registration or is seen by the read below.
        self.lock_ended().insert(
            shard_id.to_owned(),
            Ending {
                last,
                written: watch::Sender::new(false),
            },
        );
        if let Some(stored) = self.get(shard_id).await? {
            if stored >= last {
                self.set(shard_id, stored).await?;
            }
        }
        Ok(())
    }

    #[doc(hidden)]
    /// Resolves once [`Checkpoint::ShardEnd`] has been written for a shard registered with
    /// [`shard_ended`](Checkpointer::shard_ended) (at once if it is not waiting for its last
    /// record: written already, never registered, or [forgotten](Checkpointer::forget_ended)).
    ///
    /// The consumer starts a closed shard's children only after this (and a flush), so a
    /// restart never reads a child's records before the end of its parent.
    pub fn shard_end_written(&self, shard_id: &str) -> impl Future<Output = ()> + Send + 'static {
        let receiver = self
            .lock_ended()
            .get(shard_id)
            .map(|ending| ending.written.subscribe());
        async move {
            if let Some(mut receiver) = receiver {
                // An error means the entry was dropped (forgotten): stop waiting.
                let _ = receiver.wait_for(|written| *written).await;
            }
        }
    }

    #[doc(hidden)]
    /// Stops waiting for the end of `shard_id` to be checkpointed (the consumer calls it for
    /// the shards whose end was still pending when a run ended, or that were revoked), so
    /// long runs do not keep every shard that ever ended. A later commit of the shard's last
    /// record then only moves its checkpoint; a restart reads the rest of the shard (nothing)
    /// and writes [`Checkpoint::ShardEnd`] then.
    pub fn forget_ended(&self, shard_id: &str) {
        self.lock_ended().remove(shard_id);
    }

    #[doc(hidden)]
    /// Whether `shard_id` ended and waits for its last delivered record to be checkpointed.
    pub fn pending_shard_end(&self, shard_id: &str) -> bool {
        self.lock_ended().contains_key(shard_id)
    }

    /// How many ended shards wait for their last record to be checkpointed.
    #[doc(hidden)]
    pub fn pending_shard_ends(&self) -> usize {
        self.lock_ended().len()
    }

    fn lock_ended(&self) -> MutexGuard<'_, HashMap<String, Ending>> {
        // Single inserts and removes: a poisoned lock still holds a consistent map.
        self.ended.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks `record` and everything before it in its shard processed.
    pub async fn commit(&self, record: &Record) -> Result<SetOutcome, StoreError> {
        self.set(&record.shard_id, record.checkpoint()).await
    }

    /// Marks every record of `records` processed: per shard, the greatest checkpoint among them
    /// is set (records may come from several shards, as in a chunk of the merged stream).
    pub async fn commit_all<'a>(
        &self,
        records: impl IntoIterator<Item = &'a Record>,
    ) -> Result<(), StoreError> {
        // The greatest checkpoint of each shard, in the order the shards first appear. Records
        // come in runs of one shard: only a record of another shard than the one before looks
        // its shard up (shard ids that are clones of one another compare by pointer).
        let mut last: Vec<(&ShardId, Checkpoint)> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut current = 0;
        for record in records {
            let checkpoint = record.checkpoint();
            if last
                .get(current)
                .is_none_or(|(shard, _)| **shard != record.shard_id)
            {
                match index.entry(&record.shard_id) {
                    Entry::Occupied(entry) => current = *entry.get(),
                    Entry::Vacant(entry) => {
                        current = last.len();
                        entry.insert(current);
                        last.push((&record.shard_id, checkpoint));
                        continue;
                    }
                }
            }
            let greatest = &mut last[current].1;
            if checkpoint > *greatest {
                *greatest = checkpoint;
            }
        }
        for (shard, checkpoint) in last {
            self.set(shard, checkpoint).await?;
        }
        Ok(())
    }

    /// Writes whatever the store buffers.
    pub async fn flush(&self) -> Result<(), StoreError> {
        (*self.store).flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{at, at_sub};
    use crate::MemoryStore;

    #[tokio::test]
    async fn commit_all_sets_each_shards_greatest_checkpoint() {
        let store = Arc::new(MemoryStore::new());
        let checkpointer = Checkpointer::from_arc(store.clone(), "ns");
        let record = |shard: &str, sequence: u64, sub: Option<u64>| Record {
            sub_sequence_number: sub,
            ..crate::testing::record(shard, sequence)
        };
        let records = [
            record("a", 5, None),
            record("a", 7, Some(1)),
            record("b", 3, None),
            // Back to a shard seen before, behind its greatest so far.
            record("a", 6, None),
            record("c", 1, None),
            record("b", 9, Some(0)),
            record("b", 9, Some(2)),
            record("a", 7, Some(0)),
            record("b", 8, None),
        ];
        checkpointer.commit_all(&records).await.unwrap();
        // One write per shard, of its greatest checkpoint (the store would also refuse a
        // smaller one, so the count is what shows it).
        assert_eq!(checkpointer.progress_writes(), 3);
        assert_eq!(checkpointer.get("a").await.unwrap(), Some(at_sub(7, 1)));
        assert_eq!(checkpointer.get("b").await.unwrap(), Some(at_sub(9, 2)));
        assert_eq!(checkpointer.get("c").await.unwrap(), Some(at(1)));
        // A later commit of smaller checkpoints moves nothing back.
        checkpointer
            .commit_all(&[record("a", 2, None), record("c", 0, None)])
            .await
            .unwrap();
        assert_eq!(checkpointer.get("a").await.unwrap(), Some(at_sub(7, 1)));
        assert_eq!(checkpointer.get("c").await.unwrap(), Some(at(1)));
    }

    #[tokio::test]
    async fn an_ended_shard_becomes_shard_end_once_its_last_record_is_checkpointed() {
        let store = Arc::new(MemoryStore::new());
        let checkpointer = Checkpointer::from_arc(store.clone(), "ns");
        checkpointer.set("s", at(5)).await.unwrap();
        checkpointer.shard_ended("s", Some(at(9))).await.unwrap();
        assert_eq!(checkpointer.get("s").await.unwrap(), Some(at(5)));
        checkpointer.set("s", at(7)).await.unwrap();
        assert_eq!(checkpointer.get("s").await.unwrap(), Some(at(7)));
        // A clone shares what it knows about ended shards.
        checkpointer.clone().set("s", at(9)).await.unwrap();
        assert_eq!(
            checkpointer.get("s").await.unwrap(),
            Some(Checkpoint::ShardEnd)
        );
    }

    #[tokio::test]
    async fn shard_end_is_written_at_once_when_already_covered_or_nothing_was_delivered() {
        let store = Arc::new(MemoryStore::new());
        let checkpointer = Checkpointer::from_arc(store.clone(), "ns");
        checkpointer.set("a", at(9)).await.unwrap();
        checkpointer.shard_ended("a", Some(at(9))).await.unwrap();
        assert_eq!(
            checkpointer.get("a").await.unwrap(),
            Some(Checkpoint::ShardEnd)
        );
        checkpointer.shard_ended("b", None).await.unwrap();
        assert_eq!(
            checkpointer.get("b").await.unwrap(),
            Some(Checkpoint::ShardEnd)
        );
        // Already at shard end (CheckpointLayer wrote it): nothing changes.
        checkpointer.shard_ended("a", Some(at(9))).await.unwrap();
        assert_eq!(
            checkpointer.get("a").await.unwrap(),
            Some(Checkpoint::ShardEnd)
        );
    }
}
