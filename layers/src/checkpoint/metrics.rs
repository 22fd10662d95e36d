//! The checkpoint metrics a [`Checkpointer`](super::Checkpointer) records, per stream and shard.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use metrics::{Counter, Histogram};

use super::{SetOutcome, StoreError};
use crate::metric_names as names;

/// The metric handles of one shard's checkpoint writes.
struct ShardHandles {
    written: Counter,
    duration: Histogram,
    errors: Counter,
}

/// Every shard's handles, registered the first time the shard is written, under one stream
/// label. Shared by a checkpointer and its clones.
pub(super) struct CheckpointMetrics {
    stream: Arc<str>,
    shards: Mutex<HashMap<Arc<str>, Arc<ShardHandles>>>,
}

impl CheckpointMetrics {
    pub(super) fn new(stream: Arc<str>) -> Self {
        Self {
            stream,
            shards: Mutex::default(),
        }
    }

    pub(super) fn stream(&self) -> &Arc<str> {
        &self.stream
    }

    fn shard(&self, shard_id: &str) -> Arc<ShardHandles> {
        // Only inserts: a poisoned lock still holds a consistent map.
        let mut shards = self.shards.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(handles) = shards.get(shard_id) {
            return handles.clone();
        }
        let labels = names::labels(self.stream.clone(), shard_id);
        let handles = Arc::new(ShardHandles {
            written: metrics::counter!(names::CHECKPOINTS_WRITTEN_TOTAL, labels.clone()),
            duration: metrics::histogram!(names::CHECKPOINT_DURATION_SECONDS, labels.clone()),
            errors: metrics::counter!(names::CHECKPOINT_ERRORS_TOTAL, labels),
        });
        shards.insert(shard_id.into(), handles.clone());
        handles
    }

    /// Starts timing a write of `shard_id`'s checkpoint.
    pub(super) fn start(&self, shard_id: &str) -> WriteTimer {
        WriteTimer {
            handles: self.shard(shard_id),
            started: Instant::now(),
        }
    }
}

/// A checkpoint write being timed.
pub(super) struct WriteTimer {
    handles: Arc<ShardHandles>,
    started: Instant,
}

impl WriteTimer {
    /// Records the write's time and outcome.
    pub(super) fn finish(self, result: &Result<SetOutcome, StoreError>) {
        self.handles
            .duration
            .record(self.started.elapsed().as_secs_f64());
        match result {
            Ok(SetOutcome::Advanced) => self.handles.written.increment(1),
            Ok(SetOutcome::NotAdvanced) => {}
            Err(_) => self.handles.errors.increment(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use metrics_util::debugging::DebuggingRecorder;

    use super::super::Checkpointer;
    use crate::metric_names as names;
    use crate::metrics::tests::Values;
    use crate::testing::{at, FaultyStore};
    use crate::MemoryStore;

    #[test]
    fn writes_are_counted_and_timed_per_shard_under_the_stream_label() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let store = std::sync::Arc::new(FaultyStore::new());
        metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                let checkpointer =
                    Checkpointer::from_arc(store.clone(), "app/orders").with_stream_label("orders");
                checkpointer.set("s-0", at(5)).await.unwrap();
                // Not past the stored one: timed, not counted as written.
                checkpointer.clone().set("s-0", at(3)).await.unwrap();
                checkpointer.set("s-1", at(1)).await.unwrap();
                store.fail_writes(true);
                checkpointer.set("s-1", at(2)).await.unwrap_err();
                store.fail_writes(false);
                // A shard that ended with nothing delivered: ShardEnd at once.
                checkpointer.shard_ended("s-2", None).await.unwrap();
            })
        });
        let values = Values::take(&snapshotter, "orders");
        assert_eq!(
            values.counter(names::CHECKPOINTS_WRITTEN_TOTAL, "s-0"),
            Some(1)
        );
        assert_eq!(
            values
                .histogram(names::CHECKPOINT_DURATION_SECONDS, "s-0")
                .len(),
            2
        );
        assert_eq!(
            values.counter(names::CHECKPOINT_ERRORS_TOTAL, "s-0"),
            Some(0)
        );
        assert_eq!(
            values.counter(names::CHECKPOINTS_WRITTEN_TOTAL, "s-1"),
            Some(1)
        );
        assert_eq!(
            values.counter(names::CHECKPOINT_ERRORS_TOTAL, "s-1"),
            Some(1)
        );
        assert_eq!(
            values
                .histogram(names::CHECKPOINT_DURATION_SECONDS, "s-1")
                .len(),
            2
        );
        assert_eq!(
            values.counter(names::CHECKPOINTS_WRITTEN_TOTAL, "s-2"),
            Some(1)
        );
    }

    #[test]
    fn the_stream_label_defaults_to_the_namespace() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                let checkpointer = Checkpointer::new(MemoryStore::new(), "app/orders");
                checkpointer.set("s-0", at(1)).await.unwrap();
            })
        });
        let values = Values::take(&snapshotter, "app/orders");
        assert_eq!(
            values.counter(names::CHECKPOINTS_WRITTEN_TOTAL, "s-0"),
            Some(1)
        );
    }
}
