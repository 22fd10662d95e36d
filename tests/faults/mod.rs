//! Faults the in-memory Kinesis and `FaultyStore` do not express, for the `consumer_*` tests
//! (`mod faults;` in each): a Kinesis source whose shards expire, whose calls hang or panic, and
//! whose clock is behind; a store whose writes and flushes take time, or never end.
// Each test file uses a part of this module.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use kinesis_tower::checkpoint::SetOutcome;
use kinesis_tower::kinesis::memory::MemoryKinesis;
use kinesis_tower::kinesis::{
    IteratorPosition, KinesisApi, KinesisError, KinesisErrorKind, RecordsPage, ShardPage, StreamRef,
};
use kinesis_tower::store::MemoryStore;
use kinesis_tower::{Checkpoint, CheckpointStore, ShardId, StoreError};
use kinesis_tower::{Consumer, ConsumerBuilder, StartPosition};

/// A `KinesisApi` over the in-memory Kinesis with faults it cannot express by itself. Cheap to
/// clone (shared state).
#[derive(Clone, Default)]
pub struct FaultyKinesis {
    inner: MemoryKinesis,
    /// Expired shards: not listed any more; GetShardIterator and GetRecords answer
    /// ResourceNotFound.
    gone: Arc<Mutex<HashSet<ShardId>>>,
    /// GetShardIterator on this shard panics.
    pub panics: Option<ShardId>,
    /// Kinesis's clock is this far behind ours (AT_TIMESTAMP is compared with its clock).
    pub server_clock_behind: Duration,
    /// ListShards answers this long after it took its snapshot (latency, many pages).
    pub list_delay: Duration,
    /// This many GetRecords calls, from the first, never answer.
    pub hanging_get_records: Arc<AtomicU64>,
    /// Records GetRecords returned, per shard.
    served: Arc<Mutex<HashMap<ShardId, u64>>>,
    /// GetRecords answers up to 10,000 records, whatever the limit asked.
    pub ignores_limit: bool,
}

impl FaultyKinesis {
    /// Over `inner`, with no fault.
    pub fn new(inner: &MemoryKinesis) -> Self {
        Self {
            inner: inner.clone(),
            ..Self::default()
        }
    }

    /// `shard` expires (Kinesis's retention): see `gone`.
    pub fn expire(&self, shard: &str) {
        self.gone.lock().unwrap().insert(shard.into());
    }

    fn is_gone(&self, shard: &ShardId) -> bool {
        self.gone.lock().unwrap().contains(shard)
    }

    /// Records GetRecords returned of `shard` so far.
    pub fn served(&self, shard: &str) -> u64 {
        self.served.lock().unwrap().get(shard).copied().unwrap_or(0)
    }

    /// A consumer of this source, stream `test-stream`, from the trim horizon.
    pub fn consumer(&self) -> ConsumerBuilder {
        Consumer::builder()
            .kinesis_api(Arc::new(self.clone()))
            .stream_name("test-stream")
            .start_position(StartPosition::TrimHorizon)
    }
}

fn not_found(operation: &'static str, shard: &ShardId) -> KinesisError {
    KinesisError::new(
        KinesisErrorKind::ResourceNotFound,
        operation,
        format!("Shard {shard} in stream test-stream does not exist"),
    )
}

impl KinesisApi for FaultyKinesis {
    fn list_shards<'a>(
        &'a self,
        stream: &'a StreamRef,
        next_token: Option<&'a str>,
        max_results: Option<i32>,
    ) -> BoxFuture<'a, Result<ShardPage, KinesisError>> {
        Box::pin(async move {
            let mut page = self
                .inner
                .list_shards(stream, next_token, max_results)
                .await?;
            page.shards.retain(|s| !self.is_gone(&s.shard_id));
            tokio::time::sleep(self.list_delay).await;
            Ok(page)
        })
    }

    fn get_shard_iterator<'a>(
        &'a self,
        stream: &'a StreamRef,
        shard_id: &'a ShardId,
        position: IteratorPosition,
    ) -> BoxFuture<'a, Result<String, KinesisError>> {
        if self.is_gone(shard_id) {
            return Box::pin(async move { Err(not_found("GetShardIterator", shard_id)) });
        }
        if self.panics.as_ref() == Some(shard_id) {
            panic!("bug in a KinesisApi implementation");
        }
        let position = match position {
            // Our "now" is ahead of Kinesis's "now" by the skew.
            IteratorPosition::AtTimestamp(t) => {
                IteratorPosition::AtTimestamp(t + self.server_clock_behind)
            }
            other => other,
        };
        self.inner.get_shard_iterator(stream, shard_id, position)
    }

    fn get_records<'a>(
        &'a self,
        stream: &'a StreamRef,
        shard_id: &'a ShardId,
        iterator: &'a str,
        limit: i32,
    ) -> BoxFuture<'a, Result<RecordsPage, KinesisError>> {
        let hang = self
            .hanging_get_records
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        Box::pin(async move {
            if hang {
                std::future::pending::<()>().await;
            }
            if self.is_gone(shard_id) {
                return Err(not_found("GetRecords", shard_id));
            }
            let limit = if self.ignores_limit { 10_000 } else { limit };
            let page = self
                .inner
                .get_records(stream, shard_id, iterator, limit)
                .await?;
            *self
                .served
                .lock()
                .unwrap()
                .entry(shard_id.clone())
                .or_default() += page.records.len() as u64;
            Ok(page)
        })
    }
}

/// A store over `MemoryStore` whose writes and flushes take time, or never end.
#[derive(Default)]
pub struct SlowStore {
    /// Where the checkpoints are kept.
    pub inner: MemoryStore,
    /// Each write lands this long after it was issued (a network round trip).
    pub set_delay: Duration,
    /// How long a flush takes; `None`: it never returns (a hung back-end).
    pub flush_delay: Option<Duration>,
}

#[async_trait::async_trait]
impl CheckpointStore for SlowStore {
    async fn get(&self, namespace: &str, shard_id: &str) -> Result<Option<Checkpoint>, StoreError> {
        self.inner.get(namespace, shard_id).await
    }

    async fn set(
        &self,
        namespace: &str,
        shard_id: &str,
        checkpoint: Checkpoint,
    ) -> Result<SetOutcome, StoreError> {
        tokio::time::sleep(self.set_delay).await;
        self.inner.set(namespace, shard_id, checkpoint).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        match self.flush_delay {
            Some(delay) => tokio::time::sleep(delay).await,
            None => std::future::pending().await,
        }
        Ok(())
    }

    async fn list(&self, namespace: &str) -> Result<Vec<(String, Checkpoint)>, StoreError> {
        self.inner.list(namespace).await
    }
}
