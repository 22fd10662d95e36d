//! `DeaggregateLayer`: hands the inner service user records instead of KPL aggregates.

use std::borrow::Borrow;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::deaggregate::{check_digests, deaggregate_checked_into, is_aggregate, Digest};
use super::error::KplError;
use crate::checkpoint::Checkpoint;
use crate::record::{Batch, Record};
use crate::BoxError;

/// Name of the counter of corrupt aggregates (label `shard`).
pub const CORRUPT_RECORDS_METRIC: &str = "kinesis_kpl_corrupt_records_total";

/// What [`DeaggregateLayer`] does with a record that has the KPL magic but is not a valid
/// aggregate (see [`KplError`]). Every policy counts it ([`DeaggregateLayer::corrupt_records`]
/// and the `kinesis_kpl_corrupt_records_total` counter) and logs a warning.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CorruptPolicy {
    /// Hand the record over as it is, as a plain record (the default; what the KCL and the
    /// Go library do): the handler sees the raw bytes.
    #[default]
    PassThrough,
    /// Drop the record. It is checkpointed with the rest of the batch: it is never seen again.
    Skip,
    /// Fail the batch with the [`KplError`] without calling the inner service: nothing of the
    /// batch is checkpointed and the consumer stops with the error.
    Fail,
}

/// A [`Layer`] that replaces each KPL aggregate of a batch by its user records, in order.
///
/// User records keep the aggregate's shard, sequence number and arrival time, get
/// sub-sequence numbers `0..n` and their own partition key, explicit hash key and data (which
/// shares the aggregate's buffer). Records that are not aggregates pass through unchanged;
/// corrupt aggregates follow the [`CorruptPolicy`].
///
/// Resuming inside an aggregate: when the batch carries [`Batch::resume_after`] (the consumer
/// sets it after restarting from a checkpoint with a sub-sequence number), the user records
/// of that aggregate up to and including the checkpoint's sub-sequence number are dropped, so
/// they are not handled twice; the batch passed inward has `resume_after` cleared. Without
/// this layer such records are delivered again (at least once).
///
/// Put it innermost, inside checkpointing and retries: `CheckpointLayer` then writes an
/// aggregate's sequence number once the whole aggregate is handled, and a handler that
/// checkpoints part of one (`Processed::CheckpointAt(user_record.checkpoint())`) gets a
/// sub-sequence checkpoint that a restart resumes inside.
///
/// # Example
///
/// ```
/// use kinesis_tower_layers::{Batch, BoxError};
/// use kinesis_tower_layers::kpl::{CorruptPolicy, DeaggregateLayer};
/// use tower::{service_fn, ServiceBuilder};
///
/// let deaggregate = DeaggregateLayer::new().corrupt_policy(CorruptPolicy::Skip);
/// let service = ServiceBuilder::new()
///     .layer(deaggregate.clone())
///     .service(service_fn(|batch: Batch| async move {
///         for record in &batch.records {
///             // one user record at a time
///             let _ = (&record.partition_key, record.sub_sequence_number, &record.data);
///         }
///         Ok::<_, BoxError>(())
///     }));
/// # drop(service);
/// // later: how many corrupt aggregates were skipped
/// assert_eq!(deaggregate.corrupt_records(), 0);
/// ```
#[derive(Clone, Debug, Default)]
pub struct DeaggregateLayer {
    policy: CorruptPolicy,
    corrupt: Arc<AtomicU64>,
}

impl DeaggregateLayer {
    /// A layer with the default policy, [`CorruptPolicy::PassThrough`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets what happens to corrupt aggregates.
    pub fn corrupt_policy(mut self, policy: CorruptPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How many corrupt aggregates the services made by this layer (and its clones) have met.
    pub fn corrupt_records(&self) -> u64 {
        self.corrupt.load(Ordering::Relaxed)
    }
}

impl<S> Layer<S> for DeaggregateLayer {
    type Service = DeaggregateService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DeaggregateService {
            inner,
            policy: self.policy,
            corrupt: self.corrupt.clone(),
        }
    }
}

/// The [`Service`] made by [`DeaggregateLayer`].
#[derive(Clone, Debug)]
pub struct DeaggregateService<S> {
    inner: S,
    policy: CorruptPolicy,
    corrupt: Arc<AtomicU64>,
}

impl<S> DeaggregateService<S> {
    /// Wraps `inner` with the default policy.
    pub fn new(inner: S) -> Self {
        DeaggregateLayer::new().layer(inner)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The batch with its aggregates replaced by their user records.
    ///
    /// # Errors
    ///
    /// The first corrupt aggregate's error, under [`CorruptPolicy::Fail`].
    pub fn expand(&self, mut batch: Batch) -> Result<Batch, KplError> {
        let resume_after = batch.resume_after.take();
        if resume_after.is_none() && !batch.records.iter().any(|r| is_aggregate(&r.data)) {
            return Ok(batch);
        }
        let records = std::mem::take(&mut batch.records);
        let digests = check_digests(&records);
        let mut out = Vec::with_capacity(records.len());
        // Records nobody else holds are moved; records a layer above still holds (RetryLayer
        // keeps its copy of the batch) are read in place, and only the plain ones cloned.
        match records.try_into_vec() {
            Ok(owned) => self.expand_into(owned.into_iter().zip(digests), &mut out)?,
            Err(shared) => self.expand_into(shared.iter().zip(digests), &mut out)?,
        }
        if let Some(checkpoint) = resume_after {
            drop_processed(&mut out, checkpoint);
        }
        batch.records = out.into();
        Ok(batch)
    }
}

impl<S> DeaggregateService<S> {
    /// Appends the user records of each record (a plain record as it is) to `out`, following
    /// the corrupt policy; `R` is a record owned (moved into `out`) or borrowed (cloned).
    fn expand_into<R: IntoRecord>(
        &self,
        records: impl Iterator<Item = (R, Digest)>,
        out: &mut Vec<Record>,
    ) -> Result<(), KplError> {
        for (record, digest) in records {
            match deaggregate_checked_into(record.borrow(), digest, out) {
                Ok(true) => {}
                Ok(false) => out.push(record.into_record()),
                Err(error) => {
                    self.corrupt.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(CORRUPT_RECORDS_METRIC, "shard" => error.shard_id().to_string())
                        .increment(1);
                    tracing::warn!(%error, policy = ?self.policy, "corrupt KPL aggregate");
                    match self.policy {
                        CorruptPolicy::PassThrough => out.push(record.into_record()),
                        CorruptPolicy::Skip => {}
                        CorruptPolicy::Fail => return Err(error),
                    }
                }
            }
        }
        Ok(())
    }
}

/// A record [`DeaggregateService::expand_into`] may keep: moved when owned, cloned when
/// borrowed.
trait IntoRecord: Borrow<Record> {
    fn into_record(self) -> Record;
}

impl IntoRecord for Record {
    fn into_record(self) -> Record {
        self
    }
}

impl IntoRecord for &Record {
    fn into_record(self) -> Record {
        self.clone()
    }
}

/// Drops the user records at or before `checkpoint` inside its aggregate.
fn drop_processed(records: &mut Vec<Record>, checkpoint: Checkpoint) {
    let Checkpoint::Sequence {
        sequence_number,
        sub_sequence_number: Some(last),
    } = checkpoint
    else {
        return;
    };
    records.retain(|r| {
        r.sequence_number != sequence_number || r.sub_sequence_number.is_none_or(|sub| sub > last)
    });
}

impl<S> Service<Batch> for DeaggregateService<S>
where
    S: Service<Batch>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = DeaggregateFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, batch: Batch) -> Self::Future {
        match self.expand(batch) {
            Ok(batch) => DeaggregateFuture {
                state: State::Inner {
                    future: self.inner.call(batch),
                },
            },
            Err(error) => DeaggregateFuture {
                state: State::Failed { error: Some(error) },
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`DeaggregateService`].
    pub struct DeaggregateFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F> {
        // The inner service is handling the batch.
        Inner { #[pin] future: F },
        // The batch held a corrupt aggregate under `CorruptPolicy::Fail`.
        Failed { error: Option<KplError> },
    }
}

impl<F, R, E> Future for DeaggregateFuture<F>
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
{
    type Output = Result<R, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Inner { future } => future.poll(cx).map_err(Into::into),
            StateProj::Failed { error } => Poll::Ready(Err(match error.take() {
                Some(error) => Box::new(error),
                None => "DeaggregateFuture polled after completion".into(),
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kpl::{Aggregator, Corruption};
    use crate::testing::{at, at_sub};
    use crate::{SequenceNumber, ShardId};
    use bytes::Bytes;
    use std::sync::Mutex;
    use tower::{service_fn, ServiceExt};

    fn shard() -> ShardId {
        ShardId::from("shardId-000000000002")
    }

    fn record(n: u64, data: impl Into<Bytes>) -> Record {
        Record {
            partition_key: "outer".into(),
            data: data.into(),
            ..crate::testing::record(&shard(), n)
        }
    }

    /// An aggregate whose user records' data are `<tag>-<i>`.
    fn aggregate(tag: &str, n: usize) -> Bytes {
        let mut aggregator = Aggregator::new();
        for i in 0..n {
            aggregator.add("pk", None, format!("{tag}-{i}")).unwrap();
        }
        aggregator.finish().unwrap().data
    }

    fn corrupt() -> Bytes {
        let mut data = aggregate("bad", 2).to_vec();
        let last = data.len() - 1;
        data[last] ^= 0xFF;
        Bytes::from(data)
    }

    fn names(batch: &Batch) -> Vec<String> {
        batch
            .records
            .iter()
            .map(|r| {
                format!(
                    "{}/{}:{}",
                    r.sequence_number,
                    r.sub_sequence_number
                        .map_or("-".to_owned(), |s| s.to_string()),
                    String::from_utf8_lossy(&r.data)
                )
            })
            .collect()
    }

    /// Runs `batch` through the layer; the batches the inner service saw.
    async fn run(layer: &DeaggregateLayer, batch: Batch) -> (Result<(), BoxError>, Vec<Batch>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let inner = service_fn(move |b: Batch| {
            sink.lock().unwrap().push(b);
            async { Ok::<_, BoxError>(()) }
        });
        let result = layer.layer(inner).oneshot(batch).await;
        let seen = seen.lock().unwrap().clone();
        (result, seen)
    }

    #[tokio::test]
    async fn plain_batches_pass_through_untouched() {
        let batch = Batch::new(shard(), vec![record(1, "a"), record(2, "b")]);
        let (result, seen) = run(&DeaggregateLayer::new(), batch.clone()).await;
        result.unwrap();
        assert_eq!(seen, vec![batch]);
    }

    #[tokio::test]
    async fn mixed_batch_keeps_order() {
        let mut batch = Batch::new(
            shard(),
            vec![
                record(1, "plain-1"),
                record(2, aggregate("x", 3)),
                record(3, "plain-3"),
                record(4, aggregate("y", 2)),
            ],
        );
        batch.millis_behind_latest = Some(12);
        let (result, seen) = run(&DeaggregateLayer::new(), batch).await;
        result.unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(
            names(&seen[0]),
            [
                "1/-:plain-1",
                "2/0:x-0",
                "2/1:x-1",
                "2/2:x-2",
                "3/-:plain-3",
                "4/0:y-0",
                "4/1:y-1"
            ]
        );
        assert_eq!(seen[0].millis_behind_latest, Some(12));
        assert_eq!(seen[0].shard_id, shard());
    }

    /// A batch whose records a layer above still holds (as RetryLayer does) expands the same
    /// as one nobody else holds, and the holder's copy stays as it was.
    #[test]
    fn shared_batches_expand_like_owned_ones() {
        let batch = Batch::new(
            shard(),
            vec![
                record(1, "plain-1"),
                record(2, aggregate("x", 3)),
                record(3, corrupt()),
                record(4, aggregate("y", 2)),
            ],
        );
        let service = DeaggregateService::new(());
        let owned = service.expand(batch.clone()).unwrap();
        let kept = batch.clone();
        let shared = service.expand(batch).unwrap();
        assert_eq!(shared, owned);
        assert_eq!(names(&shared).len(), 1 + 3 + 1 + 2);
        assert_eq!(kept.records.len(), 4);
        assert_eq!(kept.records[1].data, aggregate("x", 3));
    }

    #[tokio::test]
    async fn corrupt_aggregate_under_each_policy() {
        let batch = || {
            Batch::new(
                shard(),
                vec![
                    record(1, aggregate("x", 1)),
                    record(2, corrupt()),
                    record(3, "p"),
                ],
            )
        };

        let layer = DeaggregateLayer::new();
        let (result, seen) = run(&layer, batch()).await;
        result.unwrap();
        assert_eq!(seen[0].records[1], record(2, corrupt()));
        assert_eq!(names(&seen[0]).len(), 3);
        assert_eq!(layer.corrupt_records(), 1);

        let layer = DeaggregateLayer::new().corrupt_policy(CorruptPolicy::Skip);
        let (result, seen) = run(&layer, batch()).await;
        result.unwrap();
        assert_eq!(names(&seen[0]), ["1/0:x-0", "3/-:p"]);
        assert_eq!(layer.corrupt_records(), 1);

        let layer = DeaggregateLayer::new().corrupt_policy(CorruptPolicy::Fail);
        let (result, seen) = run(&layer, batch()).await;
        let error = result.unwrap_err();
        let error = error.downcast_ref::<KplError>().expect("a KplError");
        assert_eq!(error.shard_id(), &shard());
        assert_eq!(error.sequence_number(), SequenceNumber::from(2));
        assert_eq!(error.problem(), &Corruption::ChecksumMismatch);
        assert!(seen.is_empty(), "the inner service must not be called");
        assert_eq!(layer.corrupt_records(), 1);
    }

    /// A batch with enough aggregates for their digests to be computed side by side: of
    /// different sizes (so lanes are refilled at different times), between plain records, two
    /// corrupt (a flipped digest byte, a flipped message byte). Each is checked on its own.
    #[tokio::test]
    async fn many_aggregates_are_checked_each_against_its_own_digest() {
        let mut records = Vec::new();
        let mut expected = Vec::new();
        for n in 1..=20u64 {
            let data = match n {
                7 => corrupt(),
                13 => {
                    let mut data = aggregate("m", 40).to_vec();
                    data[crate::kpl::MAGIC.len() + 3] ^= 0x01;
                    Bytes::from(data)
                }
                n if n % 5 == 0 => Bytes::from(format!("plain-{n}")),
                n => aggregate(&format!("a{n}"), n as usize * 3),
            };
            if n % 5 == 0 {
                expected.push(format!("{n}/-:plain-{n}"));
            } else if n != 7 && n != 13 {
                expected.extend((0..n * 3).map(|i| format!("{n}/{i}:a{n}-{i}")));
            }
            records.push(record(n, data));
        }
        let layer = DeaggregateLayer::new().corrupt_policy(CorruptPolicy::Skip);
        let (result, seen) = run(&layer, Batch::new(shard(), records.clone())).await;
        result.unwrap();
        assert_eq!(names(&seen[0]), expected);
        assert_eq!(layer.corrupt_records(), 2);

        let layer = DeaggregateLayer::new().corrupt_policy(CorruptPolicy::Fail);
        let (result, _) = run(&layer, Batch::new(shard(), records)).await;
        let error = result.unwrap_err();
        let error = error.downcast_ref::<KplError>().expect("a KplError");
        assert_eq!(error.sequence_number(), SequenceNumber::from(7));
        assert_eq!(error.problem(), &Corruption::ChecksumMismatch);
    }

    #[tokio::test]
    async fn every_corruption_kind_follows_the_policy() {
        use crate::kpl::deaggregate::tests::frame;
        let kinds: Vec<Bytes> = vec![
            corrupt(),
            Bytes::from(frame(&[0x0F, 0x00])),
            Bytes::from(frame(&[0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F])),
            Bytes::from(frame(&[
                0x0A, 0x01, b'k', 0x1A, 0x04, 0x08, 0x01, 0x1A, 0x00,
            ])),
            Bytes::from(frame(&[])),
        ];
        for data in kinds {
            for policy in [
                CorruptPolicy::PassThrough,
                CorruptPolicy::Skip,
                CorruptPolicy::Fail,
            ] {
                let layer = DeaggregateLayer::new().corrupt_policy(policy);
                let batch = Batch::new(shard(), vec![record(5, data.clone())]);
                let (result, seen) = run(&layer, batch).await;
                match policy {
                    CorruptPolicy::PassThrough => {
                        result.unwrap();
                        assert_eq!(seen[0].records, vec![record(5, data.clone())]);
                    }
                    CorruptPolicy::Skip => {
                        result.unwrap();
                        assert!(seen[0].records.is_empty());
                    }
                    CorruptPolicy::Fail => {
                        assert!(result.unwrap_err().is::<KplError>());
                        assert!(seen.is_empty());
                    }
                }
                assert_eq!(layer.corrupt_records(), 1);
            }
        }
    }

    #[tokio::test]
    async fn corrupt_records_are_counted_in_metrics() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let layer = DeaggregateLayer::new().corrupt_policy(CorruptPolicy::Skip);
        let service = layer.layer(service_fn(|_b: Batch| async { Ok::<_, BoxError>(()) }));
        let batch = Batch::new(shard(), vec![record(1, corrupt()), record(2, corrupt())]);
        metrics::with_local_recorder(&recorder, || {
            let mut service = service.clone();
            // The batch is expanded synchronously in `call`.
            drop(Service::call(&mut service, batch));
        });
        let counted: Vec<_> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, ..)| key.key().name() == CORRUPT_RECORDS_METRIC)
            .map(|(key, _, _, value)| {
                let labels: Vec<_> = key
                    .key()
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect();
                (labels, value)
            })
            .collect();
        assert_eq!(
            counted,
            vec![(
                vec![("shard".to_owned(), shard().to_string())],
                DebugValue::Counter(2)
            )]
        );
    }

    fn resume(n: u64, sub: u64) -> Option<Checkpoint> {
        Some(at_sub(n, sub))
    }

    #[tokio::test]
    async fn resume_after_drops_the_processed_user_records() {
        let batch = |resume_after| {
            let mut b = Batch::new(
                shard(),
                vec![record(7, aggregate("a", 5)), record(8, aggregate("b", 2))],
            );
            b.resume_after = resume_after;
            b
        };
        let layer = DeaggregateLayer::new();

        let (result, seen) = run(&layer, batch(resume(7, 2))).await;
        result.unwrap();
        assert_eq!(
            names(&seen[0]),
            ["7/3:a-3", "7/4:a-4", "8/0:b-0", "8/1:b-1"]
        );
        assert_eq!(seen[0].resume_after, None);

        // The last user record: the whole aggregate goes.
        let (_, seen) = run(&layer, batch(resume(7, 4))).await;
        assert_eq!(names(&seen[0]), ["8/0:b-0", "8/1:b-1"]);

        // Another sequence number (the aggregate expired, say): nothing is dropped.
        for other in [resume(6, 3), resume(9, 0), Some(at(7))] {
            let (_, seen) = run(&layer, batch(other)).await;
            assert_eq!(names(&seen[0]).len(), 7);
            assert_eq!(seen[0].resume_after, None);
        }

        // A plain record at the checkpoint's sequence number is kept.
        let mut plain = Batch::new(shard(), vec![record(7, "plain")]);
        plain.resume_after = resume(7, 2);
        let (_, seen) = run(&layer, plain).await;
        assert_eq!(names(&seen[0]), ["7/-:plain"]);
        assert_eq!(seen[0].resume_after, None);
    }

    #[tokio::test]
    async fn user_records_share_the_aggregate_buffer_and_key() {
        let data = aggregate("z", 3);
        let batch = Batch::new(shard(), vec![record(1, data.clone())]);
        let (_, seen) = run(&DeaggregateLayer::new(), batch).await;
        let records = &seen[0].records;
        assert!(data.as_ptr_range().contains(&records[2].data.as_ptr()));
        assert!(data
            .as_ptr_range()
            .contains(&records[2].partition_key.as_ptr()));
        assert_eq!(
            records[0].partition_key.as_ptr(),
            records[2].partition_key.as_ptr()
        );
    }
}
