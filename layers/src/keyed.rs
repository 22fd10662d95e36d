//! `KeyedConcurrencyLayer`: handles the records of different partition keys of a batch at the
//! same time, each key's records in order, and checkpoints only the prefix of the batch that
//! succeeded.

use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;

use std::task::{Context, Poll};

use futures::future::{BoxFuture, Either};
use futures::stream::{FuturesUnordered, StreamExt};
use rustc_hash::FxHashMap;
use tower::util::Oneshot;
use tower::{Layer, Service, ServiceExt};

use crate::checkpoint::{Checkpoint, PartialFailure, Processed};
use crate::record::{Batch, BatchEnd, Record, ShardId, Wake};
use crate::{BoxError, PartitionKey, Records};

/// Default [`KeyedConcurrencyLayer::max_in_flight`]: 64 calls of the inner service at once per
/// batch.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;

/// Says which records must be handled in order with one another: records with equal keys.
///
/// Implemented by [`ByPartitionKey`] (the default) and by any
/// `Fn(&Record) -> K + Clone + Send + Sync + 'static` closure whose `K` is `Hash + Eq`.
pub trait KeyOf: Clone + Send + Sync + 'static {
    /// The key records are grouped by.
    type Key: Hash + Eq;

    /// The key of `record`.
    fn key_of(&self, record: &Record) -> Self::Key;
}

impl<F, K> KeyOf for F
where
    F: Fn(&Record) -> K + Clone + Send + Sync + 'static,
    K: Hash + Eq,
{
    type Key = K;

    fn key_of(&self, record: &Record) -> K {
        self(record)
    }
}

/// The default key: the record's partition key, the unit of order Kinesis itself keeps.
#[derive(Clone, Copy, Debug, Default)]
pub struct ByPartitionKey;

impl KeyOf for ByPartitionKey {
    type Key = PartitionKey;

    fn key_of(&self, record: &Record) -> PartitionKey {
        record.partition_key.clone()
    }
}

/// A [`Layer`] that splits each batch by key (the partition key, or a key function) and calls
/// the inner service once per key with that key's records, in shard order, for different keys
/// at the same time: at most [`max_in_flight`](Self::max_in_flight) calls at once.
///
/// **When it helps.** A handler that waits on something per record or per key (a database
/// round trip, an HTTP call): a shard handled one record after the other does at most one such
/// wait at a time (20 ms each caps it at 50 records/s); with this layer, a batch over many keys
/// does up to `max_in_flight` of them at once. The calls run on the task that handles the
/// batch (they are not spawned): it does not help a handler that is CPU-bound, nor a batch of
/// one key. A batch ends when its slowest key ends, as the shard's next batch waits for it.
///
/// **The order it keeps: per key, not per shard.** The records of one key reach the inner
/// service in shard order, in one call per batch, and never while another call for that key is
/// running (the batch's calls all end before the next batch of the shard is taken). Records of
/// different keys are handled in any order, as Kinesis itself only orders records of one
/// partition key. A key function coarser than the partition key keeps more order, a finer one
/// breaks what Kinesis promised.
///
/// **What it answers.** When every call succeeded: the furthest checkpoint such that every
/// record of the batch up to it succeeded, taking each call's [`Processed`] into account
/// ([`Processed::Checkpoint`] when that is the batch's last record; records of a call that
/// answered `SkipCheckpoint`, or that are past its `CheckpointAt`, are handled but not a place
/// to checkpoint at, as in [`PerRecordLayer`](crate::per_record::PerRecordLayer)). When a call
/// fails: the calls already running finish, no further key is started, and the answer is a
/// [`PartialFailure`] whose checkpoint is that of the longest prefix of the batch whose records
/// all succeeded, with the error of the failed key that comes first in the batch (any other
/// failed key is logged). A failed call counts as none of its records succeeded.
///
/// **What a crash or a failure re-delivers.** [`CheckpointLayer`](crate::checkpoint::CheckpointLayer)
/// outside writes a partly failed batch's checkpoint before it returns the error, so a restart
/// delivers again every record after that prefix: the failed key's records and those of other
/// keys that come after the first failed record in the batch, even if they succeeded (at least
/// once). A crash in the middle of a batch re-delivers the whole batch, as without the layer.
///
/// **With retries.** Put [`RetryLayer`](crate::retry::RetryLayer) *inside* this layer, and only
/// the failed key's call is made again, while the other keys go on. Outside it, a batch whose
/// first failed key has a transient error is retried whole: every key is called again,
/// including those that had succeeded (the [`PartialFailure`] is transparent to the
/// classifier).
///
/// **With KPL aggregates.** Put it inside [`DeaggregateLayer`](crate::kpl::DeaggregateLayer):
/// an aggregate packs records of many partition keys under the key of one of them, so keys
/// must be taken after unpacking (before it, one key's records could sit in two aggregates
/// handled at once). Inside it, the checkpoint of a partly failed batch may be inside an
/// aggregate (a sub-sequence number), where a restart resumes.
///
/// **Empty batches** (heartbeats, and the empty last batch of a shard) are passed to the inner
/// service as they are. The [`Batch::end`] of a batch with records is passed on after its
/// records, in an empty batch with that end, once every key succeeded (so layers inside can
/// flush); the per-key batches carry none. [`Batch::resume_after`] goes with the key of the
/// batch's first record, [`Batch::wake`] and `millis_behind_latest` with every key.
///
/// The inner service must be `Clone` (each concurrent call gets a clone; wrap it in
/// `tower::buffer::Buffer` if it is not). With a per-record handler, put
/// [`PerRecordLayer`](crate::per_record::PerRecordLayer) inside: each key's records are then
/// handled one by one, keys at once.
///
/// ```
/// use kinesis_tower_layers::{Batch, BoxError, Checkpointer, MemoryStore, Record};
/// use kinesis_tower_layers::checkpoint::CheckpointLayer;
/// use kinesis_tower_layers::keyed::KeyedConcurrencyLayer;
/// use kinesis_tower_layers::per_record::PerRecordLayer;
/// use kinesis_tower_layers::retry::RetryLayer;
/// use tower::{service_fn, ServiceBuilder};
///
/// let checkpointer = Checkpointer::new(MemoryStore::new(), "my-app/orders");
/// let service = ServiceBuilder::new()
///     .layer(CheckpointLayer::new(checkpointer))
///     .layer(KeyedConcurrencyLayer::new().max_in_flight(32))
///     .layer(RetryLayer::new())
///     .layer(PerRecordLayer::new())
///     .service(service_fn(|record: Record| async move {
///         // e.g. an UPDATE of the row of this record's key
///         let _ = (&record.partition_key, &record.data);
///         Ok::<_, BoxError>(())
///     }));
/// # drop(service);
///
/// // Or keep order per customer, a part of the partition key:
/// let layer = KeyedConcurrencyLayer::new().key(|record: &Record| {
///     record.partition_key.split(':').next().unwrap_or_default().to_owned()
/// });
/// # drop(layer);
/// ```
#[derive(Clone, Debug)]
pub struct KeyedConcurrencyLayer<K = ByPartitionKey> {
    max_in_flight: usize,
    key: K,
}

impl Default for KeyedConcurrencyLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl KeyedConcurrencyLayer {
    /// Groups by partition key, at most [`DEFAULT_MAX_IN_FLIGHT`] calls at once.
    pub fn new() -> Self {
        Self {
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            key: ByPartitionKey,
        }
    }
}

impl<K> KeyedConcurrencyLayer<K> {
    /// At most this many calls of the inner service at once, per batch (so per shard: the
    /// consumer hands over one batch of a shard at a time). 0 is taken as 1, which handles one
    /// key after the other.
    pub fn max_in_flight(mut self, max: usize) -> Self {
        self.max_in_flight = max.max(1);
        self
    }

    /// Groups records by `key` instead of their partition key: records with equal keys are
    /// handled in order, in one call.
    pub fn key<K2: KeyOf>(self, key: K2) -> KeyedConcurrencyLayer<K2> {
        KeyedConcurrencyLayer {
            max_in_flight: self.max_in_flight,
            key,
        }
    }
}

impl<S, K: Clone> Layer<S> for KeyedConcurrencyLayer<K> {
    type Service = KeyedConcurrencyService<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedConcurrencyService {
            inner,
            max_in_flight: self.max_in_flight,
            key: self.key.clone(),
        }
    }
}

/// The [`Service`] made by [`KeyedConcurrencyLayer`].
#[derive(Clone, Debug)]
pub struct KeyedConcurrencyService<S, K = ByPartitionKey> {
    inner: S,
    max_in_flight: usize,
    key: K,
}

impl<S> KeyedConcurrencyService<S> {
    /// Wraps `inner` with the defaults of [`KeyedConcurrencyLayer::new`].
    pub fn new(inner: S) -> Self {
        KeyedConcurrencyLayer::new().layer(inner)
    }
}

impl<S, K> KeyedConcurrencyService<S, K> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, K> Service<Batch> for KeyedConcurrencyService<S, K>
where
    S: Service<Batch> + Clone + Send + 'static,
    S::Response: Into<Processed>,
    S::Error: Into<BoxError>,
    S::Future: Send,
    K: KeyOf,
{
    type Response = Processed;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Processed, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, batch: Batch) -> Self::Future {
        // Take the service that was driven to readiness; leave a fresh clone in its place.
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        if batch.is_empty() {
            let future = ready.call(batch);
            return Box::pin(async move { future.await.map(Into::into).map_err(Into::into) });
        }
        let plan = Plan::split(batch, &self.key);
        Box::pin(plan.run(ready, self.inner.clone(), self.max_in_flight))
    }
}

/// The records of one key, as the inner service gets them, and where they sit in the batch.
struct Run {
    /// Indices in the batch of the run's records, ascending.
    indices: Vec<usize>,
    batch: Batch,
}

/// A batch split by key, runs in the order of their first record.
struct Plan {
    shard_id: ShardId,
    /// Each record's checkpoint, by index in the batch.
    positions: Vec<Checkpoint>,
    /// Each run's first record's partition key, for the error.
    first_keys: Vec<PartitionKey>,
    runs: Vec<Run>,
    end: Option<BatchEnd>,
    millis_behind_latest: Option<i64>,
    wake: Wake,
}

/// How a run ended: what it may checkpoint, or the error.
enum Outcome {
    NotStarted,
    Done(Processed),
    Failed(BoxError),
}

impl Plan {
    fn split<K: KeyOf>(batch: Batch, key: &K) -> Self {
        let Batch {
            shard_id,
            records,
            millis_behind_latest,
            end,
            resume_after,
            wake,
        } = batch;
        let mut positions = Vec::with_capacity(records.len());
        let mut runs: Vec<Run> = Vec::new();
        let mut first_keys = Vec::new();
        let mut slots: FxHashMap<K::Key, usize> = FxHashMap::default();
        for (index, record) in records.into_iter().enumerate() {
            positions.push(record.checkpoint());
            let slot = *slots.entry(key.key_of(&record)).or_insert_with(|| {
                first_keys.push(record.partition_key.clone());
                runs.push(Run {
                    indices: Vec::new(),
                    batch: Batch {
                        shard_id: shard_id.clone(),
                        records: Records::new(),
                        millis_behind_latest,
                        end: None,
                        resume_after: None,
                        wake: wake.clone(),
                    },
                });
                runs.len() - 1
            });
            let run = &mut runs[slot];
            run.indices.push(index);
            run.batch.records.push(record);
        }
        if let Some(first) = runs.first_mut() {
            first.batch.resume_after = resume_after;
        }
        Plan {
            shard_id,
            positions,
            first_keys,
            runs,
            end,
            millis_behind_latest,
            wake,
        }
    }

    async fn run<S>(
        self,
        ready: S,
        template: S,
        max_in_flight: usize,
    ) -> Result<Processed, BoxError>
    where
        S: Service<Batch> + Clone + Send + 'static,
        S::Response: Into<Processed>,
        S::Error: Into<BoxError>,
        S::Future: Send,
    {
        let Plan {
            shard_id,
            positions,
            first_keys,
            runs,
            end,
            millis_behind_latest,
            wake,
        } = self;
        let (indices, batches): (Vec<Vec<usize>>, Vec<Batch>) =
            runs.into_iter().map(|r| (r.indices, r.batch)).unzip();
        let mut outcomes: Vec<Outcome> = indices.iter().map(|_| Outcome::NotStarted).collect();
        // Runs start in the order of their first record; a run not started when one fails
        // starts after the failed one's first record, so it could not lengthen the prefix that
        // succeeded: none is started after a failure.
        let mut failed = false;
        let mut ready = Some(ready);
        let mut waiting = batches.into_iter().enumerate();
        let mut running = FuturesUnordered::new();
        loop {
            while !failed && running.len() < max_in_flight {
                let Some((run, batch)) = waiting.next() else {
                    break;
                };
                let call: Either<S::Future, Oneshot<S, Batch>> = match ready.take() {
                    Some(mut service) => Either::Left(service.call(batch)),
                    None => Either::Right(template.clone().oneshot(batch)),
                };
                running.push(Tagged { run, call });
            }
            let Some((run, result)) = running.next().await else {
                break;
            };
            outcomes[run] = match result {
                Ok(response) => Outcome::Done(response.into()),
                Err(error) => {
                    failed = true;
                    Outcome::Failed(error.into())
                }
            };
        }

        // The prefix that succeeded ends before the first record of the first run (in the
        // order of their first record) that did not succeed: the first failed one, since runs
        // start in that order and none starts after a failure.
        let total = positions.len();
        let failed_run = outcomes
            .iter()
            .position(|outcome| !matches!(outcome, Outcome::Done(_)));
        let prefix = failed_run.map_or(total, |run| indices[run][0]);
        // The furthest record of the prefix a run's answer lets the batch checkpoint at.
        let mut furthest: Option<usize> = None;
        let mut error = None;
        for (run, outcome) in outcomes.into_iter().enumerate() {
            match outcome {
                Outcome::Done(processed) => {
                    let allowed = |&&i: &&usize| match processed {
                        Processed::Checkpoint => true,
                        Processed::SkipCheckpoint => false,
                        Processed::CheckpointAt(at) => positions[i] <= at,
                    };
                    let last = indices[run]
                        .iter()
                        .rev()
                        .filter(|&&i| i < prefix)
                        .find(allowed);
                    furthest = furthest.max(last.copied());
                }
                Outcome::Failed(e) if Some(run) == failed_run => error = Some(e),
                Outcome::Failed(e) => {
                    tracing::warn!(shard = %shard_id, partition_key = %first_keys[run], error = %e,
                        "handler failed for another key of the batch too");
                }
                Outcome::NotStarted => {}
            }
        }
        let checkpoint = furthest.map(|i| positions[i]);
        if let (Some(run), Some(source)) = (failed_run, error) {
            return Err(Box::new(PartialFailure {
                shard_id,
                checkpoint,
                first_failed: Some(positions[prefix]),
                partition_key: Some(first_keys[run].clone()),
                source,
            }));
        }
        if end.is_some() {
            let last = Batch {
                shard_id: shard_id.clone(),
                records: Records::new(),
                millis_behind_latest,
                end,
                resume_after: None,
                wake,
            };
            if let Err(source) = template.oneshot(last).await {
                return Err(Box::new(PartialFailure {
                    shard_id,
                    checkpoint,
                    first_failed: None,
                    partition_key: None,
                    source: source.into(),
                }));
            }
        }
        Ok(match checkpoint {
            _ if furthest == Some(total - 1) => Processed::Checkpoint,
            Some(at) => Processed::CheckpointAt(at),
            None => Processed::SkipCheckpoint,
        })
    }
}

pin_project_lite::pin_project! {
    /// A run's call, tagged with the run.
    struct Tagged<F> {
        run: usize,
        #[pin]
        call: F,
    }
}

impl<F: Future> Future for Tagged<F> {
    type Output = (usize, F::Output);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        this.call.poll(cx).map(|output| (*this.run, output))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::CheckpointLayer;
    use crate::retry::{RetryLayer, Transient};
    use crate::testing::{at, record, SHARD};
    use crate::{CheckpointStore, Checkpointer, MemoryStore};
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashMap, HashSet};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tower::ServiceBuilder;

    /// Record `n` of [`SHARD`] with partition key `key`.
    fn keyed(n: u64, key: &str) -> Record {
        Record {
            partition_key: key.into(),
            ..record(SHARD, n)
        }
    }

    /// A batch of [`SHARD`] of `(sequence number, partition key)`.
    fn batch_of_keys(records: &[(u64, &str)]) -> Batch {
        Batch::new(
            SHARD.into(),
            records.iter().map(|(n, key)| keyed(*n, key)).collect(),
        )
    }

    fn seq(record: &Record) -> u64 {
        record.sequence_number.to_string().parse().unwrap()
    }

    #[derive(Default)]
    struct Log {
        /// Every call: its records' sequence numbers, whether it had `end` and `resume_after`.
        calls: Vec<(Vec<u64>, Option<BatchEnd>, Option<Checkpoint>)>,
        /// Keys with a call running now.
        active: HashSet<PartitionKey>,
        running: usize,
        peak: usize,
        /// Records of calls that succeeded.
        succeeded: HashSet<u64>,
        /// Records of calls that succeeded since the test last cleared it.
        recent: HashSet<u64>,
        /// Failures left per record: a call with such a record fails and uses one up.
        failures: HashMap<u64, u32>,
        /// Per key, the records in the order the handler saw them (this run).
        per_key: HashMap<PartitionKey, Vec<u64>>,
    }

    /// A `Service<Batch>` handler: notes each call, checks that no key has two calls at once,
    /// sleeps `latency(first record)`, and fails while a record of the call has failures left.
    #[derive(Clone)]
    struct Handler {
        log: Arc<Mutex<Log>>,
        latency: Arc<dyn Fn(u64) -> Duration + Send + Sync>,
        answer: Arc<dyn Fn(&Batch) -> Processed + Send + Sync>,
        transient: bool,
    }

    impl Handler {
        fn new(latency: impl Fn(u64) -> Duration + Send + Sync + 'static) -> Self {
            Self {
                log: Arc::default(),
                latency: Arc::new(latency),
                answer: Arc::new(|_| Processed::Checkpoint),
                transient: false,
            }
        }

        fn answer(mut self, answer: impl Fn(&Batch) -> Processed + Send + Sync + 'static) -> Self {
            self.answer = Arc::new(answer);
            self
        }

        fn fail(self, n: u64, times: u32) -> Self {
            self.log.lock().unwrap().failures.insert(n, times);
            self
        }

        fn log(&self) -> std::sync::MutexGuard<'_, Log> {
            self.log.lock().unwrap()
        }
    }

    impl Service<Batch> for Handler {
        type Response = Processed;
        type Error = BoxError;
        type Future = BoxFuture<'static, Result<Processed, BoxError>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, batch: Batch) -> Self::Future {
            let handler = self.clone();
            Box::pin(async move {
                let seqs: Vec<u64> = batch.records.iter().map(seq).collect();
                let key = batch.records.first().map(|r| r.partition_key.clone());
                {
                    let mut log = handler.log();
                    log.calls
                        .push((seqs.clone(), batch.end, batch.resume_after));
                    if let Some(key) = &key {
                        assert!(
                            batch.records.iter().all(|r| &r.partition_key == key),
                            "one key per call: {seqs:?}"
                        );
                        assert!(
                            log.active.insert(key.clone()),
                            "two calls for key {key} at once"
                        );
                        log.per_key.entry(key.clone()).or_default().extend(&seqs);
                    }
                    log.running += 1;
                    log.peak = log.peak.max(log.running);
                }
                let latency = seqs
                    .first()
                    .map_or(Duration::ZERO, |n| (handler.latency)(*n));
                tokio::time::sleep(latency).await;
                let mut log = handler.log();
                log.running -= 1;
                if let Some(key) = &key {
                    log.active.remove(key);
                }
                let mut failing = false;
                for n in &seqs {
                    if let Some(left) = log.failures.get_mut(n).filter(|left| **left > 0) {
                        *left -= 1;
                        failing = true;
                    }
                }
                if failing {
                    let error = format!("records {seqs:?} failed");
                    return Err(if handler.transient {
                        Transient::new(error).into()
                    } else {
                        error.into()
                    });
                }
                log.succeeded.extend(&seqs);
                log.recent.extend(&seqs);
                Ok((handler.answer)(&batch))
            })
        }
    }

    fn setup() -> (Arc<MemoryStore>, Checkpointer) {
        let store = Arc::new(MemoryStore::new());
        (store.clone(), Checkpointer::from_arc(store, "ns"))
    }

    async fn send<S>(svc: &mut S, batch: Batch) -> Result<Processed, BoxError>
    where
        S: Service<Batch, Response = Processed, Error = BoxError>,
    {
        svc.ready().await?.call(batch).await
    }

    /// Keys run at once up to the bound; each key's records come in one call, in order; the
    /// batch's answer is a whole checkpoint.
    #[tokio::test(start_paused = true)]
    async fn different_keys_run_at_once_up_to_the_bound_and_each_key_in_order() {
        for (max, expected_peak) in [(2, 2), (64, 4), (1, 1)] {
            let handler = Handler::new(|_| Duration::from_millis(10));
            let mut svc = KeyedConcurrencyLayer::new()
                .max_in_flight(max)
                .layer(handler.clone());
            let records = [
                (1, "a"),
                (2, "b"),
                (3, "a"),
                (4, "c"),
                (5, "d"),
                (6, "b"),
                (7, "a"),
            ];
            let answer = send(&mut svc, batch_of_keys(&records)).await.unwrap();
            assert_eq!(answer, Processed::Checkpoint);
            let log = handler.log();
            assert_eq!(log.peak, expected_peak, "max_in_flight {max}");
            let mut calls: Vec<Vec<u64>> = log.calls.iter().map(|c| c.0.clone()).collect();
            calls.sort();
            assert_eq!(calls, vec![vec![1, 3, 7], vec![2, 6], vec![4], vec![5]]);
        }
    }

    /// One key fails: the other keys finish; the answer is a PartialFailure at the longest
    /// prefix that succeeded, which CheckpointLayer writes before it returns the error.
    #[tokio::test(start_paused = true)]
    async fn a_failed_key_checkpoints_the_prefix_before_its_first_record() {
        let (store, checkpointer) = setup();
        // Key b (records 3 and 6) fails; a and c succeed, c (record 4) after the failure.
        let handler =
            Handler::new(|n| Duration::from_millis(if n == 4 { 30 } else { 5 })).fail(6, 1);
        let mut svc = ServiceBuilder::new()
            .layer(CheckpointLayer::new(checkpointer))
            .layer(KeyedConcurrencyLayer::new())
            .service(handler.clone());
        let records = [(1, "a"), (2, "a"), (3, "b"), (4, "c"), (5, "a"), (6, "b")];
        let error = send(&mut svc, batch_of_keys(&records)).await.unwrap_err();
        let partial = PartialFailure::find(&*error).expect("a PartialFailure");
        assert_eq!(partial.checkpoint, Some(at(2)));
        assert_eq!(partial.first_failed, Some(at(3)));
        assert_eq!(partial.partition_key.as_deref(), Some("b"));
        assert_eq!(partial.source.to_string(), "records [3, 6] failed");
        let text = error.to_string();
        assert!(
            text.contains("shard-0") && text.contains("record 3") && text.contains("\"b\""),
            "{text}"
        );
        // c finished although b had failed before it.
        assert_eq!(handler.log().succeeded, HashSet::from([1, 2, 5, 4]));
        assert_eq!(store.get("ns", SHARD).await.unwrap(), Some(at(2)));

        // The first record fails: nothing to checkpoint, the checkpoint stays.
        let handler = Handler::new(|_| Duration::from_millis(1)).fail(7, 1);
        let mut svc = ServiceBuilder::new()
            .layer(CheckpointLayer::new(Checkpointer::from_arc(
                store.clone(),
                "ns",
            )))
            .layer(KeyedConcurrencyLayer::new())
            .service(handler);
        let error = send(&mut svc, batch_of_keys(&[(7, "x"), (8, "y")]))
            .await
            .unwrap_err();
        assert_eq!(PartialFailure::find(&*error).unwrap().checkpoint, None);
        assert_eq!(store.get("ns", SHARD).await.unwrap(), Some(at(2)));
    }

    /// After a failure no further key starts: with one call at a time, the keys after the
    /// failed one are never called.
    #[tokio::test(start_paused = true)]
    async fn no_key_starts_after_a_failure() {
        let handler = Handler::new(|_| Duration::from_millis(1)).fail(2, 1);
        let mut svc = KeyedConcurrencyLayer::new()
            .max_in_flight(1)
            .layer(handler.clone());
        let error = send(
            &mut svc,
            batch_of_keys(&[(1, "a"), (2, "b"), (3, "c"), (4, "a")]),
        )
        .await
        .unwrap_err();
        assert_eq!(
            PartialFailure::find(&*error).unwrap().checkpoint,
            Some(at(1))
        );
        let calls: Vec<Vec<u64>> = handler.log().calls.iter().map(|c| c.0.clone()).collect();
        assert_eq!(calls, vec![vec![1, 4], vec![2]]);
    }

    type Answer = dyn Fn(&Batch) -> Processed + Send + Sync;

    /// The calls' answers combine as PerRecordLayer's do: a key that answers SkipCheckpoint
    /// or CheckpointAt holds the batch's checkpoint back to the last record allowed.
    #[tokio::test(start_paused = true)]
    async fn answers_of_the_keys_combine_into_the_batchs() {
        let records = [(1, "a"), (2, "b"), (3, "a"), (4, "b")];
        let cases: Vec<(Box<Answer>, Processed)> = vec![
            (Box::new(|_| Processed::Checkpoint), Processed::Checkpoint),
            (
                Box::new(|b| {
                    if b.records[0].partition_key.as_ref() == "b" {
                        Processed::SkipCheckpoint
                    } else {
                        Processed::Checkpoint
                    }
                }),
                Processed::CheckpointAt(at(3)),
            ),
            (
                Box::new(|b| {
                    if b.records[0].partition_key.as_ref() == "b" {
                        Processed::CheckpointAt(at(2))
                    } else {
                        Processed::Checkpoint
                    }
                }),
                Processed::CheckpointAt(at(3)),
            ),
            (
                Box::new(|b| {
                    if b.records[0].partition_key.as_ref() == "a" {
                        Processed::CheckpointAt(at(1))
                    } else {
                        Processed::SkipCheckpoint
                    }
                }),
                Processed::CheckpointAt(at(1)),
            ),
            (
                Box::new(|_| Processed::SkipCheckpoint),
                Processed::SkipCheckpoint,
            ),
        ];
        for (answer, expected) in cases {
            let handler = Handler::new(|_| Duration::ZERO).answer(answer);
            let mut svc = KeyedConcurrencyLayer::new().layer(handler);
            assert_eq!(
                send(&mut svc, batch_of_keys(&records)).await.unwrap(),
                expected
            );
        }
    }

    /// Empty batches pass as they are; a batch's end is passed on after its records, in an
    /// empty batch, and `resume_after` goes with the key of the first record. The last batch
    /// of a closed shard checkpoints ShardEnd.
    #[tokio::test(start_paused = true)]
    async fn ends_and_heartbeats_pass_through_after_the_records() {
        let (store, checkpointer) = setup();
        let handler = Handler::new(|n| Duration::from_millis(10 - n));
        let mut svc = ServiceBuilder::new()
            .layer(CheckpointLayer::new(checkpointer))
            .layer(KeyedConcurrencyLayer::new())
            .service(handler.clone());
        send(&mut svc, Batch::empty(SHARD.into(), None))
            .await
            .unwrap();
        let mut last = batch_of_keys(&[(1, "a"), (2, "b"), (3, "a")]);
        last.end = Some(BatchEnd::ShardEnd);
        last.resume_after = Some(at(1));
        assert_eq!(send(&mut svc, last).await.unwrap(), Processed::Checkpoint);
        assert_eq!(
            store.get("ns", SHARD).await.unwrap(),
            Some(Checkpoint::ShardEnd)
        );
        send(
            &mut svc,
            Batch::empty(SHARD.into(), Some(BatchEnd::Shutdown)),
        )
        .await
        .unwrap();
        let calls = handler.log().calls.clone();
        assert_eq!(
            calls,
            vec![
                (vec![], None, None),
                (vec![1, 3], None, Some(at(1))),
                (vec![2], None, None),
                (vec![], Some(BatchEnd::ShardEnd), None),
                (vec![], Some(BatchEnd::Shutdown), None),
            ]
        );

        // The end's call fails: every record succeeded, so the checkpoint is the last record.
        let failing_end = tower::service_fn(|b: Batch| async move {
            if b.end.is_some() {
                return Err::<(), BoxError>("flush failed".into());
            }
            Ok(())
        });
        let (store, checkpointer) = setup();
        let mut svc = ServiceBuilder::new()
            .layer(CheckpointLayer::new(checkpointer))
            .layer(KeyedConcurrencyLayer::new())
            .service(failing_end);
        let mut last = batch_of_keys(&[(4, "a"), (5, "b")]);
        last.end = Some(BatchEnd::ShardEnd);
        let error = send(&mut svc, last).await.unwrap_err();
        let partial = PartialFailure::find(&*error).unwrap();
        assert_eq!(
            (partial.checkpoint, partial.first_failed),
            (Some(at(5)), None)
        );
        assert_eq!(store.get("ns", SHARD).await.unwrap(), Some(at(5)));
    }

    /// A key function coarser than the partition key keeps its records together.
    #[tokio::test(start_paused = true)]
    async fn a_key_function_groups_records() {
        let handler = Handler::new(|_| Duration::from_millis(1));
        let mut svc = KeyedConcurrencyLayer::new()
            .key(|r: &Record| r.partition_key.len())
            .layer(tower::service_fn({
                let handler = handler.clone();
                move |b: Batch| {
                    handler
                        .log()
                        .calls
                        .push((b.records.iter().map(seq).collect(), None, None));
                    async { Ok::<_, BoxError>(()) }
                }
            }));
        send(
            &mut svc,
            batch_of_keys(&[(1, "a"), (2, "bb"), (3, "c"), (4, "dd")]),
        )
        .await
        .unwrap();
        let mut calls: Vec<Vec<u64>> = handler.log().calls.iter().map(|c| c.0.clone()).collect();
        calls.sort();
        assert_eq!(calls, vec![vec![1, 3], vec![2, 4]]);
    }

    /// RetryLayer outside: a transient failure of one key retries the whole batch (every key
    /// is called again); the final success checkpoints the whole batch. RetryLayer inside:
    /// only the failed key is called again.
    #[tokio::test(start_paused = true)]
    async fn retries_outside_repeat_the_batch_inside_only_the_failed_key() {
        let records = [(1, "a"), (2, "b"), (3, "a"), (4, "c")];
        for retry_outside in [true, false] {
            let (store, checkpointer) = setup();
            let mut handler = Handler::new(|_| Duration::from_millis(1)).fail(2, 2);
            handler.transient = true;
            let answer = if retry_outside {
                let mut svc = ServiceBuilder::new()
                    .layer(CheckpointLayer::new(checkpointer))
                    .layer(RetryLayer::new())
                    .layer(KeyedConcurrencyLayer::new())
                    .service(handler.clone());
                send(&mut svc, batch_of_keys(&records)).await
            } else {
                let mut svc = ServiceBuilder::new()
                    .layer(CheckpointLayer::new(checkpointer))
                    .layer(KeyedConcurrencyLayer::new())
                    .layer(RetryLayer::new())
                    .service(handler.clone());
                send(&mut svc, batch_of_keys(&records)).await
            };
            assert_eq!(answer.unwrap(), Processed::Checkpoint);
            assert_eq!(store.get("ns", SHARD).await.unwrap(), Some(at(4)));
            let mut calls: BTreeMap<Vec<u64>, usize> = BTreeMap::new();
            for call in &handler.log().calls {
                *calls.entry(call.0.clone()).or_default() += 1;
            }
            let expected = if retry_outside { 3 } else { 1 };
            assert_eq!(
                calls,
                BTreeMap::from([(vec![1, 3], expected), (vec![2], 3), (vec![4], expected)]),
                "retry outside: {retry_outside}"
            );
        }
    }

    /// RetryLayer outside, a key that keeps failing: a permanent error is not retried, a
    /// transient one until max attempts, each attempt calling every key again; either way the
    /// last PartialFailure reaches CheckpointLayer, which writes the prefix that succeeded.
    #[tokio::test(start_paused = true)]
    async fn retries_outside_give_up_with_the_prefix_checkpointed() {
        let records = [(1, "a"), (2, "b"), (3, "a"), (4, "c")];
        for transient in [false, true] {
            let (store, checkpointer) = setup();
            let mut handler = Handler::new(|_| Duration::from_millis(1)).fail(2, u32::MAX);
            handler.transient = transient;
            let mut svc = ServiceBuilder::new()
                .layer(CheckpointLayer::new(checkpointer))
                .layer(RetryLayer::new().max_attempts(3))
                .layer(KeyedConcurrencyLayer::new())
                .service(handler.clone());
            let error = send(&mut svc, batch_of_keys(&records)).await.unwrap_err();
            let partial = PartialFailure::find(&*error).expect("a PartialFailure");
            assert_eq!(partial.checkpoint, Some(at(1)));
            assert_eq!(crate::retry::is_transient(&*error), transient);
            assert_eq!(store.get("ns", SHARD).await.unwrap(), Some(at(1)));
            let attempts = if transient { 3 } else { 1 };
            let calls = handler.log().calls.len();
            assert_eq!(calls, 3 * attempts, "transient: {transient}");
        }
    }

    #[derive(Clone, Debug)]
    struct Spec {
        key: u8,
        latency_ms: u64,
        failures: u32,
    }

    fn spec() -> impl Strategy<Value = Spec> {
        (0u8..8, 0u64..20, prop_oneof![8 => Just(0u32), 1 => 1u32..3]).prop_map(
            |(key, latency_ms, failures)| Spec {
                key,
                latency_ms,
                failures,
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Any records over any keys, random latencies and failures, the consumer restarting
        /// from the checkpoint after each failure: per key the handler sees records in order
        /// and never two calls at once, never more than `max_in_flight` calls; the checkpoint
        /// is exactly the longest prefix that succeeded (never a record that did not); a
        /// restart from it delivers every record not yet succeeded; the shard ends at
        /// ShardEnd with every record succeeded.
        #[test]
        fn per_key_order_and_checkpoint_of_the_longest_prefix_that_succeeded(
            specs in proptest::collection::vec(spec(), 1..60),
            batch_size in 1usize..25,
            max_in_flight in 1usize..10,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(check(specs, batch_size, max_in_flight));
        }
    }

    async fn check(specs: Vec<Spec>, batch_size: usize, max_in_flight: usize) {
        let total = specs.len() as u64;
        let latencies: Vec<u64> = specs.iter().map(|s| s.latency_ms).collect();
        let mut handler = Handler::new(move |n| Duration::from_millis(latencies[n as usize - 1]));
        for (i, s) in specs.iter().enumerate() {
            handler = handler.fail(i as u64 + 1, s.failures);
        }
        let key = |n: u64| -> String { format!("k{}", specs[n as usize - 1].key) };
        let (store, checkpointer) = setup();
        let mut restarts = 0;
        'run: loop {
            restarts += 1;
            assert!(restarts <= 4 * total + 2, "no progress");
            // A new consumer run: starts after the stored checkpoint.
            let start = match store.get("ns", SHARD).await.unwrap() {
                None => 1,
                Some(Checkpoint::ShardEnd) => break,
                Some(c) => {
                    c.sequence_number()
                        .unwrap()
                        .to_string()
                        .parse::<u64>()
                        .unwrap()
                        + 1
                }
            };
            {
                let mut log = handler.log();
                // Every record not yet succeeded is delivered again.
                for n in 1..start {
                    assert!(
                        log.succeeded.contains(&n),
                        "record {n} below the checkpoint did not succeed"
                    );
                }
                log.per_key.clear();
            }
            let mut svc = ServiceBuilder::new()
                .layer(CheckpointLayer::new(checkpointer.clone()))
                .layer(KeyedConcurrencyLayer::new().max_in_flight(max_in_flight))
                .service(handler.clone());
            let seqs: Vec<u64> = (start..=total).collect();
            let chunks: Vec<&[u64]> = if seqs.is_empty() {
                vec![&[]]
            } else {
                seqs.chunks(batch_size).collect()
            };
            let last_chunk = chunks.len() - 1;
            for (i, chunk) in chunks.into_iter().enumerate() {
                let before = store.get("ns", SHARD).await.unwrap();
                let names: Vec<String> = chunk.iter().map(|n| key(*n)).collect();
                let records: Vec<(u64, &str)> = chunk
                    .iter()
                    .zip(&names)
                    .map(|(n, k)| (*n, k.as_str()))
                    .collect();
                let mut batch = batch_of_keys(&records);
                handler.log().recent.clear();
                if i == last_chunk {
                    batch.end = Some(BatchEnd::ShardEnd);
                }
                let result = send(&mut svc, batch).await;
                let after = store.get("ns", SHARD).await.unwrap();
                let log = handler.log();
                assert!(log.peak <= max_in_flight);
                for seen in log.per_key.values() {
                    assert!(
                        seen.windows(2).all(|w| w[0] < w[1]),
                        "per-key order: {seen:?}"
                    );
                }
                // The longest prefix of the batch whose records all succeeded this time.
                let prefix: Vec<u64> = chunk
                    .iter()
                    .copied()
                    .take_while(|n| log.recent.contains(n))
                    .collect();
                let expected = match (prefix.len() == chunk.len(), prefix.last()) {
                    (true, _) if i == last_chunk => Some(Checkpoint::ShardEnd),
                    (_, Some(n)) => Some(at(*n)),
                    (_, None) => before,
                };
                assert_eq!(after, expected, "batch {chunk:?}: {result:?}");
                if let Err(error) = result {
                    assert!(
                        prefix.len() < chunk.len(),
                        "an error for a batch that succeeded: {error}"
                    );
                    // Records of the failed key after the prefix did not succeed.
                    let failed = chunk[prefix.len()];
                    assert!(!log.recent.contains(&failed));
                    continue 'run;
                }
            }
        }
        let log = handler.log();
        assert_eq!(log.succeeded.len() as u64, total);
        assert_eq!(log.running, 0);
    }
}
