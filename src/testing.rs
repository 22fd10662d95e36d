//! Set-up for tests and benches of a consumer over the in-memory Kinesis (feature `test-util`).
//!
//! - [`builder`]: a consumer of a [`MemoryKinesis`] with test settings;
//! - [`Seen`]: a handler that keeps what it was given, per shard and in order;
//! - [`Running`]: a run in a task, stopped gracefully on demand;
//! - [`wait_for`]: polls a condition in (usually paused) time.
//!
//! The builders of records, batches and checkpoints of `kinesis_tower_layers::testing`, and its
//! [`FaultyStore`], are re-exported here.
//!
//! ```
//! use std::time::Duration;
//!
//! use kinesis_tower::kinesis::memory::{shard_name, MemoryKinesis};
//! use kinesis_tower::testing::{builder, sequences, wait_for, Running, Seen};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let kinesis = MemoryKinesis::with_shards(2);
//! kinesis.fill(10, 100);
//! let consumer = builder(&kinesis).build().unwrap();
//! let seen = Seen::default();
//! let run = Running::checkpointed(&consumer, seen.handler());
//! wait_for(Duration::from_secs(10), || seen.count() == 20).await;
//! run.stop().await.unwrap();
//! assert_eq!(seen.of(&shard_name(0)), sequences(&kinesis, &shard_name(0)));
//! # }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kinesis_tower_layers::{Batch, BatchEnd, BoxError, Processed, SequenceNumber, ShardId};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tower::{service_fn, Service};

pub use kinesis_tower_layers::testing::{at, at_sub, batch, batch_of, record, FaultyStore, SHARD};

use crate::kinesis::memory::MemoryKinesis;
use crate::{Consumer, ConsumerBuilder, Error, StartPosition};

/// The stream name [`builder`] gives the consumer (the in-memory Kinesis has one stream, of
/// any name).
pub const STREAM: &str = "test-stream";

/// The application name [`builder`] gives the consumer: its checkpoints are kept under the
/// namespace `tests/test-stream`.
pub const APP: &str = "tests";

/// A consumer of `kinesis`, stream [`STREAM`], application [`APP`], from the trim horizon, with
/// the default settings otherwise (a `MemoryStore`, among others).
pub fn builder(kinesis: &MemoryKinesis) -> ConsumerBuilder {
    Consumer::builder()
        .kinesis_api(Arc::new(kinesis.clone()))
        .stream_name(STREAM)
        .app_name(APP)
        .start_position(StartPosition::TrimHorizon)
}

/// The sequence numbers of every record of `shard`, in shard order.
pub fn sequences(kinesis: &MemoryKinesis, shard: &str) -> Vec<SequenceNumber> {
    kinesis
        .records(shard)
        .iter()
        .map(|r| r.sequence_number)
        .collect()
}

/// Shard `p`, closed, with one record, and its child `c` with one record.
pub fn closed_parent_with_child() -> MemoryKinesis {
    let kinesis = MemoryKinesis::default();
    kinesis.add_shard("p", &[]);
    kinesis.put("p", "k", "parent");
    kinesis.close_shard("p");
    kinesis.add_shard("c", &["p"]);
    kinesis.put("c", "k", "child");
    kinesis
}

/// Polls `cond` every 10 ms until it holds; panics after `limit`.
///
/// Under paused time (`#[tokio::test(start_paused = true)]`) the sleeps complete as soon as
/// every task is idle, so the limit costs nothing when the condition comes.
pub async fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What a handler saw: every record per shard and in the order handled, and every batch that
/// ended a shard's run. Clones share what they saw.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    records: Arc<Mutex<HashMap<ShardId, Vec<SequenceNumber>>>>,
    order: Arc<Mutex<Vec<(ShardId, SequenceNumber)>>>,
    ends: Arc<Mutex<Vec<(ShardId, BatchEnd)>>>,
    count: Arc<AtomicU64>,
    largest_batch: Arc<AtomicU64>,
}

impl Seen {
    /// Keeps the records of `batch`, and its end if it has one.
    pub fn take(&self, batch: &Batch) {
        let mut records = lock(&self.records);
        let mut order = lock(&self.order);
        for r in &batch.records {
            records
                .entry(r.shard_id.clone())
                .or_default()
                .push(r.sequence_number);
            order.push((r.shard_id.clone(), r.sequence_number));
        }
        if let Some(end) = batch.end {
            lock(&self.ends).push((batch.shard_id.clone(), end));
        }
        self.count.fetch_add(batch.len() as u64, Ordering::SeqCst);
        self.largest_batch
            .fetch_max(batch.len() as u64, Ordering::SeqCst);
    }

    /// The most records seen in one batch.
    pub fn largest_batch(&self) -> u64 {
        self.largest_batch.load(Ordering::SeqCst)
    }

    /// How many records were seen, over all shards.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// The sequence numbers seen of `shard`, in the order handled.
    pub fn of(&self, shard: &str) -> Vec<SequenceNumber> {
        lock(&self.records).get(shard).cloned().unwrap_or_default()
    }

    /// Every record seen, as (shard, sequence number), in the order handled.
    pub fn order(&self) -> Vec<(ShardId, SequenceNumber)> {
        lock(&self.order).clone()
    }

    /// Every shard end seen (a batch with [`Batch::end`]), in the order handled.
    pub fn ends(&self) -> Vec<(ShardId, BatchEnd)> {
        lock(&self.ends).clone()
    }

    /// A handler that [takes](Seen::take) every batch and succeeds.
    pub fn handler(
        &self,
    ) -> impl Service<Batch, Response = (), Error = BoxError, Future = impl Send> + Clone {
        let seen = self.clone();
        service_fn(move |batch: Batch| {
            seen.take(&batch);
            async { Ok::<_, BoxError>(()) }
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A consumer running `run_until` in a task until [`Running::stop`].
#[derive(Debug)]
pub struct Running {
    stop: CancellationToken,
    task: JoinHandle<Result<(), Error>>,
}

impl Running {
    /// Spawns `consumer.run_until(service, ..)`.
    pub fn start<S>(consumer: &Consumer, service: S) -> Self
    where
        S: Service<Batch> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
    {
        Self::spawn(|stop| consumer.run_until(service, stop))
    }

    /// Spawns `consumer.process_until(service, ..)`: `service` under a `CheckpointLayer` of
    /// the consumer's checkpointer.
    pub fn checkpointed<S>(consumer: &Consumer, service: S) -> Self
    where
        S: Service<Batch> + Send + 'static,
        S::Response: Into<Processed>,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
    {
        Self::spawn(|stop| consumer.process_until(service, stop))
    }

    fn spawn<F>(run: impl FnOnce(WaitForCancellationFutureOwned) -> F) -> Self
    where
        F: Future<Output = Result<(), Error>> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(stop.clone().cancelled_owned()));
        Self { stop, task }
    }

    /// Whether the run has ended (without being asked to: with an error, unless stopped).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Asks for a graceful shutdown and returns what `run_until` returned.
    pub async fn stop(self) -> Result<(), Error> {
        self.stop.cancel();
        self.join().await
    }

    /// Waits until the run ends by itself and returns what `run_until` returned.
    pub async fn join(self) -> Result<(), Error> {
        self.task.await.expect("the run task panicked")
    }

    /// Ends the run as a crash would: no drain, no final flush.
    pub async fn abort(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}
