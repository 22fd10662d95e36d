//! A checkpoint store for tests of code that writes checkpoints.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;

use crate::checkpoint::{Checkpoint, CheckpointStore, MemoryStore, SetOutcome, StoreError};

/// A [`MemoryStore`] that counts the reads and writes it takes, fails writes, reads or flushes
/// while told to (with a retryable [`StoreError::Backend`] from back-end `faulty`), and runs a
/// hook on each write.
#[derive(Default)]
pub struct FaultyStore {
    inner: MemoryStore,
    writes: AtomicUsize,
    reads: AtomicUsize,
    failing: AtomicBool,
    failing_reads: AtomicBool,
    failing_flushes: AtomicBool,
    on_write: Option<Box<dyn Fn() + Send + Sync>>,
}

fn failure(operation: &'static str, namespace: Option<&str>, shard_id: Option<&str>) -> StoreError {
    StoreError::Backend {
        backend: "faulty",
        operation,
        namespace: namespace.map(str::to_owned),
        shard_id: shard_id.map(str::to_owned),
        retryable: true,
        source: format!("{operation} is failing").into(),
    }
}

impl FaultyStore {
    /// A store that takes every write.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `hook` on every write that reaches the store (before it is applied or refused).
    pub fn on_write(mut self, hook: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_write = Some(Box::new(hook));
        self
    }

    /// From now on, fails (`true`) or takes (`false`) every write.
    pub fn fail_writes(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// From now on, fails (`true`) or answers (`false`) every read.
    pub fn fail_reads(&self, failing: bool) {
        self.failing_reads.store(failing, Ordering::SeqCst);
    }

    /// From now on, fails (`true`) or completes (`false`) every flush.
    pub fn fail_flushes(&self, failing: bool) {
        self.failing_flushes.store(failing, Ordering::SeqCst);
    }

    /// Reads asked for so far (failed ones counted).
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }

    /// Writes taken so far (failed ones not counted).
    pub fn writes(&self) -> usize {
        self.writes.load(Ordering::SeqCst)
    }

    /// The memory store underneath, to read what was written.
    pub fn memory(&self) -> &MemoryStore {
        &self.inner
    }
}

#[async_trait]
impl CheckpointStore for FaultyStore {
    async fn get(&self, namespace: &str, shard_id: &str) -> Result<Option<Checkpoint>, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        if self.failing_reads.load(Ordering::SeqCst) {
            return Err(failure("get", Some(namespace), Some(shard_id)));
        }
        self.inner.get(namespace, shard_id).await
    }

    async fn set(
        &self,
        namespace: &str,
        shard_id: &str,
        checkpoint: Checkpoint,
    ) -> Result<SetOutcome, StoreError> {
        if let Some(hook) = &self.on_write {
            hook();
        }
        if self.failing.load(Ordering::SeqCst) {
            return Err(failure("set", Some(namespace), Some(shard_id)));
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.set(namespace, shard_id, checkpoint).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        if self.failing_flushes.load(Ordering::SeqCst) {
            return Err(failure("flush", None, None));
        }
        self.inner.flush().await
    }

    async fn list(&self, namespace: &str) -> Result<Vec<(String, Checkpoint)>, StoreError> {
        self.inner.list(namespace).await
    }
}
