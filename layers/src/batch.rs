//! `BatchLayer`: groups each shard's records into batches of up to max records, max bytes or
//! max wait before the inner service sees them.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tower::{Layer, Service};

use crate::checkpoint::Checkpoint;
use crate::record::{Batch, Record, ShardId};
use crate::BoxError;

/// Default [`BatchLayer::max_records`]: 100, the Go library's `WithBatchMaxSize` default.
pub const DEFAULT_MAX_RECORDS: usize = 100;
/// Default [`BatchLayer::max_bytes`]: 1 MiB (data plus partition keys, see [`Record::size`]).
/// One Kinesis record is at most 1 MiB, so a full-size record is always a batch of its own,
/// and a batch stays within the request limits of most sinks.
pub const DEFAULT_MAX_BYTES: usize = 1024 * 1024;
/// Default [`BatchLayer::max_wait`]: 1 s, the Go library's `WithBatchFlushInterval` default.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(1);

/// A [`Layer`] that groups each shard's records before the inner service sees them: a shard's
/// buffered records are handed over when they reach [`max_records`](BatchLayer::max_records)
/// or [`max_bytes`](BatchLayer::max_bytes), when the oldest of them has waited
/// [`max_wait`](BatchLayer::max_wait), whichever comes first, and always with a batch marked
/// [`Batch::end`] (shard end, revoked, shutdown).
///
/// # How it works
///
/// There is no background task. Every call for a shard adds the batch's records to the
/// shard's buffer and checks the limits and the deadline of *that* shard; a call that only
/// buffers completes at once with [`BatchResponse::Buffered`] without calling the inner
/// service. A call that flushes hands the due records to the inner service, in order, and
/// completes when the inner service has handled all of them.
///
/// [`BatchService`]'s `poll_ready` is always Ready: buffering needs nothing from the inner
/// service. A flushing call takes a clone of the inner service (so it must be `Clone`) and
/// awaits that clone's `poll_ready` before each batch it hands over. A call that only buffers
/// therefore neither waits for nor holds what the inner service's readiness reserves (a
/// `ConcurrencyLimit` permit inside is taken only by the batch about to be handled), and
/// backpressure comes from the flushing calls, which complete only when every batch they
/// hand over was handled.
///
/// - **Size:** when the buffer reaches `max_records` records or `max_bytes` bytes, it is cut
///   into batches of at most `max_records` records and at most `max_bytes` bytes (a single
///   record larger than `max_bytes` is a batch alone); every full batch is handed over, one
///   call after the other, and a partial remainder stays buffered. So a reader's answer of
///   10,000 records reaches a `max_records(100)` handler as 100 calls of 100 records, never as
///   one call of 10,000.
/// - **Time:** on any call for a shard (records, or an empty heartbeat) at or after the
///   deadline of its oldest buffered record, everything buffered is handed over.
/// - **End:** a batch marked [`Batch::end`] hands over everything buffered plus its own
///   records; the last batch handed over carries the `end` marker (an empty batch if nothing
///   was buffered), so a [`CheckpointLayer`](crate::checkpoint::CheckpointLayer) inside records
///   `ShardEnd` and the consumer learns that the shard is done only after the buffer was
///   handled.
///
/// When the inner service fails, the rest of that call's records are not handed over and the
/// error is returned (the consumer's `run` then ends). Records still buffered when `run` ends
/// with an error were never checkpointed: they are read again from the last checkpoint.
///
/// Heartbeats (empty batches without `end`) that find nothing due are answered here and never
/// reach the inner service, so they do not count against a `RateLimit` placed inside.
///
/// # Heartbeats: set `heartbeat_interval` when using `max_wait`
///
/// The deadline is only checked when the shard's service is called. On a busy shard, the next
/// records do that; on a shard that went quiet, only heartbeats do, and the consumer sends
/// them only when asked: set `ConsumerBuilder::heartbeat_interval` to at most `max_wait`
/// (half of it is a good choice). A buffered record then waits at most `max_wait` plus one
/// heartbeat interval; without heartbeats it waits until the shard's next records or its end
/// (shutdown always flushes).
///
/// # Merged batches
///
/// A batch handed over keeps the shard id, carries the most recent `millis_behind_latest`
/// reported by the batches that went into it (the reader's latest position, which is what a
/// lag gauge wants), and `end` only on the last one.
///
/// # Where it goes
///
/// Outside [`CheckpointLayer`](crate::checkpoint::CheckpointLayer): the checkpoint layer then only sees
/// records about to be handled, so a checkpoint never covers a buffered record. The
/// [`BatchResponse`] is not a [`Processed`](crate::Processed), so the wrong order (checkpoint
/// outside batching) does not compile. Not inside a retry layer either: [`BatchService`] is
/// not `Clone` (its buffer is state), which tower's `Retry` requires.
///
/// Calls for one shard must not overlap (the consumer's `run` calls each shard's batches one
/// at a time, in order); different shards may be called concurrently.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use kinesis_tower_layers::{Batch, BoxError, Checkpointer, MemoryStore};
/// use kinesis_tower_layers::batch::BatchLayer;
/// use kinesis_tower_layers::checkpoint::CheckpointLayer;
/// use tower::{service_fn, ServiceBuilder};
///
/// let checkpointer = Checkpointer::new(MemoryStore::new(), "my-app/orders");
/// let handler = service_fn(|batch: Batch| async move {
///     // At most 500 records and 4 MiB per call.
///     assert!(batch.len() <= 500);
///     Ok::<_, BoxError>(())
/// });
/// let service = ServiceBuilder::new()
///     .layer(
///         BatchLayer::new()
///             .max_records(500)
///             .max_bytes(4 * 1024 * 1024)
///             .max_wait(Duration::from_secs(2)),
///     )
///     .layer(CheckpointLayer::new(checkpointer))
///     .service(handler);
/// // consumer.run(service), with `.heartbeat_interval(Duration::from_secs(1))` on the builder.
/// # drop(service);
/// ```
///
/// The other order does not compile: a checkpoint layer outside would checkpoint records that
/// are only buffered.
///
/// ```compile_fail
/// use kinesis_tower_layers::{Batch, BoxError, Checkpointer, MemoryStore};
/// use kinesis_tower_layers::batch::BatchLayer;
/// use kinesis_tower_layers::checkpoint::CheckpointLayer;
/// use tower::{service_fn, ServiceBuilder};
///
/// fn run<S: tower::Service<Batch>>(_service: S) {}
///
/// let checkpointer = Checkpointer::new(MemoryStore::new(), "my-app/orders");
/// let handler = service_fn(|_batch: Batch| async { Ok::<_, BoxError>(()) });
/// run(ServiceBuilder::new()
///     .layer(CheckpointLayer::new(checkpointer))
///     .layer(BatchLayer::new())
///     .service(handler));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct BatchLayer {
    max_records: usize,
    max_bytes: usize,
    max_wait: Duration,
}

impl Default for BatchLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchLayer {
    /// Batches of up to [`DEFAULT_MAX_RECORDS`] records, [`DEFAULT_MAX_BYTES`] bytes, and
    /// [`DEFAULT_MAX_WAIT`].
    pub fn new() -> Self {
        Self {
            max_records: DEFAULT_MAX_RECORDS,
            max_bytes: DEFAULT_MAX_BYTES,
            max_wait: DEFAULT_MAX_WAIT,
        }
    }

    /// The most records per batch handed over; reaching it flushes. 0 is taken as 1.
    pub fn max_records(mut self, records: usize) -> Self {
        self.max_records = records.max(1);
        self
    }

    /// The most bytes ([`Record::size`]) per batch handed over, unless one record alone is
    /// larger; reaching it flushes. 0 is taken as 1.
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.max_bytes = bytes.max(1);
        self
    }

    /// How long a record may stay buffered: the first call for its shard at or after this
    /// long since it was buffered flushes the shard. `Duration::ZERO` flushes on every call;
    /// `Duration::MAX` (or any wait too long for the clock) never flushes on time: only the
    /// size limits and a batch marked [`Batch::end`] hand records over.
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }
}

impl<S> Layer<S> for BatchLayer {
    type Service = BatchService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BatchService {
            inner,
            limits: *self,
            pending: HashMap::new(),
        }
    }
}

/// What a [`BatchService`] call answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchResponse<R> {
    /// Nothing was handed to the inner service: the records (if any) were buffered.
    Buffered,
    /// The inner service handled `batches` batches holding `records` records, in order.
    Flushed {
        /// How many calls of the inner service this call made.
        batches: usize,
        /// How many records they held.
        records: usize,
        /// The inner service's response to the last of them.
        last: R,
    },
}

/// One shard's buffered records.
#[derive(Debug, Default)]
struct Pending {
    records: Vec<Record>,
    bytes: usize,
    /// When the oldest buffered record must be handed over; `None` when nothing is buffered,
    /// or when `max_wait` reaches beyond what an [`Instant`] can hold (no deadline).
    deadline: Option<Instant>,
    millis_behind_latest: Option<i64>,
    /// The first `resume_after` of the buffered records (see [`Batch::resume_after`]): goes
    /// with the first batch handed over.
    resume_after: Option<Checkpoint>,
}

/// The [`Service`] made by [`BatchLayer`]. Not `Clone`: it owns the shards' buffers.
#[derive(Debug)]
pub struct BatchService<S> {
    inner: S,
    limits: BatchLayer,
    pending: HashMap<ShardId, Pending>,
}

impl<S> BatchService<S> {
    /// Wraps `inner` with the limits of `layer`.
    pub fn new(inner: S, layer: BatchLayer) -> Self {
        layer.layer(inner)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// How many records of `shard_id` are buffered.
    pub fn buffered(&self, shard_id: &str) -> usize {
        self.pending.get(shard_id).map_or(0, |p| p.records.len())
    }

    /// Adds `batch` to its shard's buffer and takes out what is due, as the batches to hand
    /// over, in order.
    fn take_due(&mut self, batch: Batch) -> VecDeque<Batch> {
        let BatchLayer {
            max_records,
            max_bytes,
            max_wait,
        } = self.limits;
        let now = Instant::now();
        let Batch {
            shard_id,
            records,
            millis_behind_latest,
            end,
            resume_after,
            wake,
        } = batch;
        let pending = match self.pending.get_mut(&shard_id) {
            Some(pending) => pending,
            None => self.pending.entry(shard_id.clone()).or_default(),
        };
        if millis_behind_latest.is_some() {
            pending.millis_behind_latest = millis_behind_latest;
        }
        if pending.resume_after.is_none() {
            pending.resume_after = resume_after;
        }
        let old_len = pending.records.len();
        if !records.is_empty() {
            pending.bytes += records.iter().map(Record::size).sum::<usize>();
            if pending.records.is_empty() {
                pending.records = records.into_vec();
                pending.deadline = now.checked_add(max_wait);
            } else {
                pending.records.extend(records);
            }
        }
        let flush_all = end.is_some() || pending.deadline.is_some_and(|d| now >= d);
        if !flush_all && pending.records.len() < max_records && pending.bytes < max_bytes {
            wake.request(pending.deadline);
            return VecDeque::new();
        }

        // Cut the buffer into batches within both limits: `starts` holds where each batch
        // after the first begins; `last_len`/`last_bytes` describe the last batch.
        let mut starts = Vec::new();
        let (mut last_len, mut last_bytes) = (0usize, 0usize);
        for (i, record) in pending.records.iter().enumerate() {
            let size = record.size();
            if last_len > 0 && (last_len == max_records || last_bytes + size > max_bytes) {
                starts.push(i);
                last_len = 0;
                last_bytes = 0;
            }
            last_len += 1;
            last_bytes += size;
        }
        let last_start = starts.last().copied().unwrap_or(0);
        let mut records = std::mem::take(&mut pending.records);
        let keep_last = !flush_all && last_len < max_records && last_bytes < max_bytes;
        if keep_last {
            // A partial batch stays buffered (only a size limit was reached). Its records
            // came with this call unless it starts inside what was already buffered.
            pending.records = records.split_off(last_start);
            pending.bytes = last_bytes;
            if last_start >= old_len {
                pending.deadline = now.checked_add(max_wait);
            }
        } else {
            pending.bytes = 0;
            pending.deadline = None;
        }
        let millis_behind_latest = pending.millis_behind_latest;
        let resume_after = pending.resume_after.take();
        if end.is_some() {
            self.pending.remove(&shard_id);
        }

        // Cut from the back, so each record moves once; the last batch carries `end`.
        let make = |records: Vec<Record>| {
            let mut batch = Batch::new(shard_id.clone(), records);
            batch.millis_behind_latest = millis_behind_latest;
            batch
        };
        let mut pieces = VecDeque::with_capacity(starts.len() + 1);
        for &start in starts.iter().rev() {
            if start < records.len() {
                pieces.push_front(make(records.split_off(start)));
            }
        }
        if !records.is_empty() || end.is_some() {
            pieces.push_front(make(records));
        }
        if let Some(last) = pieces.back_mut() {
            last.end = end;
        }
        match pieces.front_mut() {
            Some(first) => first.resume_after = resume_after,
            None => {
                if let Some(pending) = self.pending.get_mut(&shard_id) {
                    pending.resume_after = resume_after;
                }
            }
        }
        // Ask for a heartbeat at the deadline of what stays buffered, so a quiet shard's
        // records are handed over in time without a second setting on the consumer.
        wake.request(self.pending.get(&shard_id).and_then(|p| p.deadline));
        pieces
    }
}

impl<S> Service<Batch> for BatchService<S>
where
    S: Service<Batch> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = BatchResponse<S::Response>;
    type Error = BoxError;
    type Future = BatchFuture<S>;

    /// Always ready: a call that only buffers needs nothing from the inner service.
    ///
    /// The inner service's readiness is awaited by the flushing call's future instead, on its
    /// own clone of the inner service, before each batch it hands over. So a call that only
    /// buffers never waits for, nor holds, what the inner service's readiness reserves (such
    /// as a `ConcurrencyLimit` permit), and a shard whose flush is between two batches is not
    /// stalled by another shard's call that only buffers. Backpressure stays:
    /// a flushing call completes only when the inner service has handled all of its batches.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, batch: Batch) -> Self::Future {
        let pieces = self.take_due(batch);
        if pieces.is_empty() {
            return BatchFuture {
                state: State::Buffered,
            };
        }
        BatchFuture {
            state: State::Flushing {
                inner: self.inner.clone(),
                pieces,
                current: None,
                batches: 0,
                records: 0,
                last: None,
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`BatchService`]: completes at once for a call that only buffers,
    /// otherwise when the inner service has handled every batch due, in order.
    pub struct BatchFuture<S>
    where
        S: Service<Batch>,
    {
        #[pin]
        state: State<S, S::Future, S::Response>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<S, F, R> {
        Buffered,
        Flushing {
            inner: S,
            pieces: VecDeque<Batch>,
            #[pin]
            current: Option<F>,
            batches: usize,
            records: usize,
            last: Option<R>,
        },
        Done,
    }
}

impl<S> Future for BatchFuture<S>
where
    S: Service<Batch>,
    S::Error: Into<BoxError>,
{
    type Output = Result<BatchResponse<S::Response>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        let output = match state.as_mut().project() {
            StateProj::Buffered => Ok(BatchResponse::Buffered),
            StateProj::Done => panic!("BatchFuture polled after completion"),
            StateProj::Flushing {
                inner,
                pieces,
                mut current,
                batches,
                records,
                last,
            } => loop {
                if let Some(future) = current.as_mut().as_pin_mut() {
                    match ready!(future.poll(cx)) {
                        Ok(response) => {
                            current.set(None);
                            *last = Some(response);
                            *batches += 1;
                        }
                        // What was not handed over yet is dropped: `run` ends, and those
                        // records are read again from the last checkpoint.
                        Err(e) => break Err(e.into()),
                    }
                    continue;
                }
                if pieces.is_empty() {
                    break match last.take() {
                        Some(last) => Ok(BatchResponse::Flushed {
                            batches: *batches,
                            records: *records,
                            last,
                        }),
                        // A flush has at least one piece, so one response.
                        None => unreachable!("a flush hands over at least one batch"),
                    };
                }
                if let Err(e) = ready!(inner.poll_ready(cx)) {
                    break Err(e.into());
                }
                let Some(piece) = pieces.pop_front() else {
                    continue;
                };
                *records += piece.len();
                current.set(Some(inner.call(piece)));
            },
        };
        state.set(State::Done);
        Poll::Ready(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::CheckpointLayer;
    use crate::testing::{at, at_sub, batch, batch_of, record, SHARD};
    use crate::{BatchEnd, Checkpoint, Checkpointer, MemoryStore};
    use bytes::Bytes;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use tower::{service_fn, ServiceBuilder, ServiceExt};

    /// A record of `shard` with `data_len` bytes of data (its size: `data_len` + 2).
    fn sized(shard: &str, seq: u64, data_len: usize) -> Record {
        Record {
            data: Bytes::from(vec![b'x'; data_len]),
            ..record(shard, seq)
        }
    }

    fn seqs(batch: &Batch) -> Vec<u64> {
        batch
            .records
            .iter()
            .map(|r| r.sequence_number.to_string().parse().unwrap())
            .collect()
    }

    /// An inner service that records every batch it is called with, fails the batches
    /// `fail_when` says so, and counts calls made without a Ready `poll_ready` before them.
    #[derive(Clone)]
    struct Inner {
        calls: Arc<Mutex<Vec<Batch>>>,
        unready_calls: Arc<AtomicUsize>,
        ready: bool,
        fail_when: Arc<dyn Fn(&Batch) -> bool + Send + Sync>,
    }

    impl Inner {
        fn new() -> Self {
            Self::failing_when(|_| false)
        }

        fn failing_when(f: impl Fn(&Batch) -> bool + Send + Sync + 'static) -> Self {
            Self {
                calls: Arc::default(),
                unready_calls: Arc::default(),
                ready: false,
                fail_when: Arc::new(f),
            }
        }

        fn seen(&self) -> Vec<Vec<u64>> {
            self.calls.lock().unwrap().iter().map(seqs).collect()
        }

        fn batches(&self) -> Vec<Batch> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl Service<Batch> for Inner {
        type Response = ();
        type Error = BoxError;
        type Future = std::future::Ready<Result<(), BoxError>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            self.ready = true;
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, batch: Batch) -> Self::Future {
            if !std::mem::replace(&mut self.ready, false) {
                self.unready_calls.fetch_add(1, Ordering::SeqCst);
            }
            let fail = (self.fail_when)(&batch);
            self.calls.lock().unwrap().push(batch);
            std::future::ready(if fail {
                Err("handler failed".into())
            } else {
                Ok(())
            })
        }
    }

    async fn send<S>(svc: &mut S, batch: Batch) -> Result<S::Response, S::Error>
    where
        S: Service<Batch>,
    {
        svc.ready().await?.call(batch).await
    }

    fn flushed(batches: usize, records: usize) -> BatchResponse<()> {
        BatchResponse::Flushed {
            batches,
            records,
            last: (),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn max_records_hands_over_full_batches_in_order_and_keeps_the_rest() {
        let inner = Inner::new();
        let layer = BatchLayer::new()
            .max_records(3)
            .max_wait(Duration::from_secs(3600));
        let mut svc = layer.layer(inner.clone());
        assert_eq!(
            send(&mut svc, batch([1])).await.unwrap(),
            BatchResponse::Buffered
        );
        assert_eq!(
            send(&mut svc, batch([2])).await.unwrap(),
            BatchResponse::Buffered
        );
        assert!(inner.seen().is_empty());
        // 2 buffered + 6 = 8: two full batches of 3 go, 2 stay.
        assert_eq!(send(&mut svc, batch(3..=8)).await.unwrap(), flushed(2, 6));
        assert_eq!(inner.seen(), vec![vec![1, 2, 3], vec![4, 5, 6]]);
        assert_eq!(svc.buffered(SHARD), 2);
        // A heartbeat before the deadline hands over nothing and never reaches the inner service.
        assert_eq!(
            send(&mut svc, Batch::empty(SHARD.into(), None))
                .await
                .unwrap(),
            BatchResponse::Buffered
        );
        assert_eq!(inner.seen().len(), 2);
        // Exactly max_records: handed over at once.
        assert_eq!(send(&mut svc, batch([9])).await.unwrap(), flushed(1, 3));
        assert_eq!(inner.seen()[2], vec![7, 8, 9]);
        assert_eq!(svc.buffered(SHARD), 0);
        assert_eq!(inner.unready_calls.load(Ordering::SeqCst), 0);
        assert!(inner.batches().iter().all(|b| b.end.is_none()));
    }

    /// A reader that resumed inside a KPL aggregate marks its first batch; merged with later
    /// ones, the mark goes with the first batch handed over, and only with it.
    #[tokio::test(start_paused = true)]
    async fn resume_after_goes_with_the_first_batch_handed_over() {
        let inner = Inner::new();
        let layer = BatchLayer::new()
            .max_records(3)
            .max_wait(Duration::from_secs(3600));
        let mut svc = layer.layer(inner.clone());
        let mark = at_sub(1, 37);
        let mut first = batch([1]);
        first.resume_after = Some(mark);
        send(&mut svc, first).await.unwrap();
        send(&mut svc, batch([2])).await.unwrap();
        send(&mut svc, batch(3..=7)).await.unwrap();
        let handed = inner.batches();
        assert_eq!(handed.len(), 2);
        assert_eq!(handed[0].resume_after, Some(mark));
        assert_eq!(handed[1].resume_after, None);
        send(&mut svc, batch([8, 9])).await.unwrap();
        assert!(inner.batches()[2..]
            .iter()
            .all(|b| b.resume_after.is_none()));
    }

    #[tokio::test(start_paused = true)]
    async fn max_bytes_cuts_batches_within_the_limit_and_a_large_record_goes_alone() {
        let inner = Inner::new();
        let layer = BatchLayer::new()
            .max_bytes(7)
            .max_wait(Duration::from_secs(3600));
        let mut svc = layer.layer(inner.clone());
        // Records of 3 bytes: 6 buffered, then 9 >= 7: the first two fit in 7 bytes.
        assert_eq!(
            send(&mut svc, batch([1])).await.unwrap(),
            BatchResponse::Buffered
        );
        assert_eq!(
            send(&mut svc, batch([2])).await.unwrap(),
            BatchResponse::Buffered
        );
        assert_eq!(send(&mut svc, batch([3])).await.unwrap(), flushed(1, 2));
        assert_eq!(inner.seen(), vec![vec![1, 2]]);
        assert_eq!(svc.buffered(SHARD), 1);
        // A 25-byte record: over the limit alone, so it is a batch alone, after record 3.
        let big = Batch::new(SHARD.into(), vec![sized(SHARD, 4, 23)]);
        assert_eq!(send(&mut svc, big).await.unwrap(), flushed(2, 2));
        assert_eq!(inner.seen(), vec![vec![1, 2], vec![3], vec![4]]);
        for b in &inner.batches()[..2] {
            assert!(b.size() <= 7, "{} bytes", b.size());
        }
        assert_eq!(svc.buffered(SHARD), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn max_wait_flushes_on_the_first_call_at_or_after_the_deadline() {
        let inner = Inner::new();
        let mut svc = BatchLayer::new()
            .max_wait(Duration::from_secs(1))
            .layer(inner.clone());
        let heartbeat = || Batch::empty(SHARD.into(), None);
        send(&mut svc, batch([1])).await.unwrap();
        tokio::time::advance(Duration::from_millis(600)).await;
        // The deadline is the oldest record's: a later record does not push it back.
        send(&mut svc, batch([2])).await.unwrap();
        tokio::time::advance(Duration::from_millis(399)).await;
        assert_eq!(
            send(&mut svc, heartbeat()).await.unwrap(),
            BatchResponse::Buffered
        );
        assert!(inner.seen().is_empty());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(send(&mut svc, heartbeat()).await.unwrap(), flushed(1, 2));
        assert_eq!(inner.seen(), vec![vec![1, 2]]);

        // A new record starts a new wait; records arriving after the deadline go with it.
        send(&mut svc, batch([3])).await.unwrap();
        tokio::time::advance(Duration::from_millis(500)).await;
        send(&mut svc, heartbeat()).await.unwrap();
        assert_eq!(inner.seen().len(), 1);
        tokio::time::advance(Duration::from_millis(700)).await;
        assert_eq!(send(&mut svc, batch([4])).await.unwrap(), flushed(1, 2));
        assert_eq!(inner.seen(), vec![vec![1, 2], vec![3, 4]]);
        // Heartbeats with nothing buffered never reach the inner service.
        tokio::time::advance(Duration::from_secs(10)).await;
        send(&mut svc, heartbeat()).await.unwrap();
        assert_eq!(inner.seen().len(), 2);
    }

    /// `Duration::MAX` is a wait that never ends: records are handed over by size and at the
    /// end only, and no deadline computation overflows.
    #[tokio::test(start_paused = true)]
    async fn max_wait_of_duration_max_means_no_deadline() {
        let inner = Inner::new();
        let mut svc = BatchLayer::new()
            .max_records(3)
            .max_wait(Duration::MAX)
            .layer(inner.clone());
        let heartbeat = || Batch::empty(SHARD.into(), None);
        // The first record of an empty buffer starts the wait.
        assert_eq!(
            send(&mut svc, batch([1])).await.unwrap(),
            BatchResponse::Buffered
        );
        tokio::time::advance(Duration::from_secs(10 * 365 * 24 * 3600)).await;
        assert_eq!(
            send(&mut svc, heartbeat()).await.unwrap(),
            BatchResponse::Buffered
        );
        assert!(inner.seen().is_empty());
        // A full batch goes; the remainder came with this call and starts a new wait.
        assert_eq!(send(&mut svc, batch(2..=4)).await.unwrap(), flushed(1, 3));
        assert_eq!(svc.buffered(SHARD), 1);
        tokio::time::advance(Duration::from_secs(10 * 365 * 24 * 3600)).await;
        assert_eq!(
            send(&mut svc, heartbeat()).await.unwrap(),
            BatchResponse::Buffered
        );
        let end = Batch::empty(SHARD.into(), Some(BatchEnd::Shutdown));
        assert_eq!(send(&mut svc, end).await.unwrap(), flushed(1, 1));
        assert_eq!(inner.seen(), vec![vec![1, 2, 3], vec![4]]);
    }

    #[tokio::test(start_paused = true)]
    async fn shards_are_buffered_and_timed_apart() {
        let inner = Inner::new();
        let mut svc = BatchLayer::new()
            .max_records(2)
            .max_wait(Duration::from_secs(1))
            .layer(inner.clone());
        send(&mut svc, batch_of("a", [1])).await.unwrap();
        tokio::time::advance(Duration::from_millis(800)).await;
        send(&mut svc, batch_of("b", [10])).await.unwrap();
        tokio::time::advance(Duration::from_millis(200)).await;
        // b's call does not flush a (a's deadline passed, but only a's calls hand a over).
        send(&mut svc, Batch::empty("b".into(), None))
            .await
            .unwrap();
        assert!(inner.seen().is_empty());
        send(&mut svc, Batch::empty("a".into(), None))
            .await
            .unwrap();
        assert_eq!(inner.seen(), vec![vec![1]]);
        send(&mut svc, batch_of("b", [11])).await.unwrap();
        assert_eq!(inner.seen(), vec![vec![1], vec![10, 11]]);
        assert!(inner
            .batches()
            .iter()
            .all(|b| b.records.iter().all(|r| r.shard_id == b.shard_id)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_marked_batch_hands_over_the_buffer_with_its_own_records_and_the_marker() {
        let inner = Inner::new();
        let mut svc = BatchLayer::new()
            .max_records(2)
            .max_wait(Duration::from_secs(3600))
            .layer(inner.clone());
        send(&mut svc, batch([1])).await.unwrap();
        let mut last = batch(2..=4);
        last.end = Some(BatchEnd::ShardEnd);
        assert_eq!(send(&mut svc, last).await.unwrap(), flushed(2, 4));
        assert_eq!(inner.seen(), vec![vec![1, 2], vec![3, 4]]);
        let ends: Vec<_> = inner.batches().iter().map(|b| b.end).collect();
        assert_eq!(ends, vec![None, Some(BatchEnd::ShardEnd)]);
        assert!(
            svc.pending.is_empty(),
            "an ended shard leaves nothing behind"
        );

        // Nothing buffered: the marker still reaches the inner service, as an empty batch.
        send(&mut svc, batch_of("other", [7])).await.unwrap();
        send(
            &mut svc,
            Batch::empty("other".into(), Some(BatchEnd::Shutdown)),
        )
        .await
        .unwrap();
        send(
            &mut svc,
            Batch::empty("idle".into(), Some(BatchEnd::Revoked)),
        )
        .await
        .unwrap();
        let batches = inner.batches();
        assert_eq!(seqs(&batches[2]), vec![7]);
        assert_eq!(batches[2].end, Some(BatchEnd::Shutdown));
        assert!(batches[3].is_empty());
        assert_eq!(batches[3].end, Some(BatchEnd::Revoked));
        assert_eq!(inner.unready_calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn merged_batches_carry_the_latest_millis_behind_latest() {
        let inner = Inner::new();
        let mut svc = BatchLayer::new().max_records(3).layer(inner.clone());
        for (seq, behind) in [(1, Some(500)), (2, None), (3, Some(100))] {
            let mut b = batch([seq]);
            b.millis_behind_latest = behind;
            send(&mut svc, b).await.unwrap();
        }
        assert_eq!(inner.batches()[0].millis_behind_latest, Some(100));
    }

    fn checkpointed(seq: u64) -> Option<Checkpoint> {
        Some(at(seq))
    }

    /// CheckpointLayer inside: buffered records are never checkpointed; on a failure, only
    /// the batches handed over before it are.
    #[tokio::test(start_paused = true)]
    async fn checkpoints_cover_only_handled_records_and_a_failure_keeps_its_batch_out() {
        let store = Arc::new(MemoryStore::new());
        let checkpointer = Checkpointer::from_arc(store.clone(), "ns");
        let inner = Inner::failing_when(|b| seqs(b).contains(&13));
        let mut svc = ServiceBuilder::new()
            .layer(
                BatchLayer::new()
                    .max_records(2)
                    .max_wait(Duration::from_secs(3600)),
            )
            .layer(CheckpointLayer::new(checkpointer.clone()))
            .service(inner.clone());
        send(&mut svc, batch([1])).await.unwrap();
        assert_eq!(checkpointer.get(SHARD).await.unwrap(), None);
        send(&mut svc, batch(2..=6)).await.unwrap();
        assert_eq!(inner.seen(), vec![vec![1, 2], vec![3, 4], vec![5, 6]]);
        assert_eq!(checkpointer.get(SHARD).await.unwrap(), checkpointed(6));
        // 11-12 handled, 13-14 fail: the error comes back, the checkpoint stops at 12, and
        // 15-16 are never handed over.
        let err = send(&mut svc, batch(11..=17)).await.unwrap_err();
        assert_eq!(err.to_string(), "handler failed");
        assert_eq!(inner.seen()[3..], [vec![11, 12], vec![13, 14]]);
        assert_eq!(checkpointer.get(SHARD).await.unwrap(), checkpointed(12));
        assert_eq!(store.snapshot("ns").len(), 1);
    }

    /// What [`one_second_handler`] was called with: shard, sequence numbers, when.
    type Started = Arc<Mutex<Vec<(ShardId, Vec<u64>, Instant)>>>;

    /// A handler that takes 1 s per call and records each call.
    fn one_second_handler() -> (
        Started,
        impl Service<Batch, Response = (), Error = BoxError, Future = impl Send> + Clone,
    ) {
        let started: Started = Arc::default();
        let handler = {
            let started = started.clone();
            service_fn(move |b: Batch| {
                started
                    .lock()
                    .unwrap()
                    .push((b.shard_id.clone(), seqs(&b), Instant::now()));
                async {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Ok::<_, BoxError>(())
                }
            })
        };
        (started, handler)
    }

    /// The inner service's readiness is awaited before each of its calls: a ConcurrencyLimit
    /// of 1 inside holds a second shard's flush until the first one is done.
    #[tokio::test(start_paused = true)]
    async fn inner_readiness_is_awaited_before_every_inner_call() {
        let (started, handler) = one_second_handler();
        let mut svc = ServiceBuilder::new()
            .layer(BatchLayer::new().max_records(2))
            .concurrency_limit(1)
            .service(handler);
        let t0 = Instant::now();
        let a = svc.ready().await.unwrap().call(batch_of("a", 1..=4));
        let a = tokio::spawn(a);
        // b is full at once: its flush waits for the permit a holds.
        let b = svc.ready().await.unwrap().call(batch_of("b", [10, 11]));
        b.await.unwrap();
        a.await.unwrap().unwrap();
        let started = started.lock().unwrap().clone();
        // One call at a time (one per second), a's batches in order; which shard gets the
        // freed permit first is the semaphore's business.
        let at: Vec<u64> = started
            .iter()
            .map(|(_, _, t)| (*t - t0).as_secs())
            .collect();
        assert_eq!(at, vec![0, 1, 2]);
        let of = |shard: &str| -> Vec<Vec<u64>> {
            started
                .iter()
                .filter(|(s, _, _)| &**s == shard)
                .map(|(_, q, _)| q.clone())
                .collect()
        };
        assert_eq!(of("a"), vec![vec![1, 2], vec![3, 4]]);
        assert_eq!(of("b"), vec![vec![10, 11]]);
    }

    /// Driven like the consumer's dispatcher (`poll_ready`, then `call`; one call in flight
    /// per shard, shards concurrently) over `CheckpointLayer` and a `ConcurrencyLimit` of 1:
    /// shard b's call, which only buffers, must not take the permit that shard a's flush
    /// needs for its next piece.
    #[tokio::test(start_paused = true)]
    async fn a_call_that_only_buffers_does_not_hold_the_inner_permit() {
        let (started, handler) = one_second_handler();
        let checkpointer = Checkpointer::new(MemoryStore::new(), "ns");
        let mut svc = ServiceBuilder::new()
            .layer(
                BatchLayer::new()
                    .max_records(2)
                    .max_wait(Duration::from_secs(3600)),
            )
            .layer(CheckpointLayer::new(checkpointer.clone()))
            .concurrency_limit(1)
            .service(handler);
        let t0 = Instant::now();
        // Shard a: 6 records, handed over as 3 pieces of 2, one after the other.
        let a = tokio::spawn(svc.ready().await.unwrap().call(batch_of("a", 1..=6)));
        // Shard b: 1 record, which only buffers.
        let b = svc.ready().await.unwrap().call(batch_of("b", [10]));
        assert_eq!(b.await.unwrap(), BatchResponse::Buffered);
        let b_done = Instant::now();
        let a = tokio::time::timeout_at(t0 + Duration::from_millis(3_500), a)
            .await
            .expect("shard a's flush stalled: its next piece never got the inner permit")
            .unwrap()
            .unwrap();
        assert!(
            matches!(
                a,
                BatchResponse::Flushed {
                    batches: 3,
                    records: 6,
                    ..
                }
            ),
            "{a:?}"
        );
        assert_eq!(b_done, t0, "a call that only buffers completes at once");
        let started = started.lock().unwrap().clone();
        let pieces: Vec<(&str, Vec<u64>, u64)> = started
            .iter()
            .map(|(s, q, t)| (&**s, q.clone(), (*t - t0).as_secs()))
            .collect();
        assert_eq!(
            pieces,
            vec![
                ("a", vec![1, 2], 0),
                ("a", vec![3, 4], 1),
                ("a", vec![5, 6], 2)
            ]
        );
        assert_eq!(checkpointer.get("a").await.unwrap(), checkpointed(6));
        assert_eq!(checkpointer.get("b").await.unwrap(), None);
        assert_eq!(svc.buffered("b"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_only_buffers_completes_at_once_and_split_calls_are_each_readied() {
        let inner = Inner::new();
        let mut svc = BatchLayer::new().max_records(1).layer(inner.clone());
        send(&mut svc, batch(1..=50)).await.unwrap();
        assert_eq!(inner.seen().len(), 50);
        assert_eq!(inner.unready_calls.load(Ordering::SeqCst), 0);
        assert!(inner.seen().iter().flatten().copied().eq(1..=50));
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Records of these data sizes for shard `a` (false) or `b` (true).
        Records(bool, Vec<usize>),
        Heartbeat(bool),
        AdvanceMillis(u64),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (any::<bool>(), proptest::collection::vec(0usize..40, 0..30))
                .prop_map(|(b, sizes)| Op::Records(b, sizes)),
            2 => any::<bool>().prop_map(Op::Heartbeat),
            2 => (0u64..1_500).prop_map(Op::AdvanceMillis),
        ]
    }

    proptest::proptest! {
        /// Whatever the calls: every record reaches the inner service once, in shard order;
        /// batches keep both limits (a record alone may exceed max bytes); after any call,
        /// less than the limits stay buffered and nothing older than max wait; `end` comes
        /// last, once.
        #[test]
        fn any_sequence_of_calls_keeps_order_limits_and_max_wait(
            ops in proptest::collection::vec(op(), 0..60),
            max_records in 1usize..12,
            max_bytes in 1usize..120,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async move {
                let max_wait = Duration::from_secs(1);
                let inner = Inner::new();
                let mut svc = BatchLayer::new()
                    .max_records(max_records)
                    .max_bytes(max_bytes)
                    .max_wait(max_wait)
                    .layer(inner.clone());
                // Per shard: every record sent, with its size and when it was sent.
                let mut sent: HashMap<&str, Vec<(u64, usize, Instant)>> = HashMap::new();
                let mut seq = 0;
                let delivered = |shard: &str| -> usize {
                    inner.batches().iter().filter(|b| &*b.shard_id == shard).map(Batch::len).sum()
                };
                for op in ops {
                    let shard = match &op {
                        Op::Records(b, _) | Op::Heartbeat(b) => if *b { "b" } else { "a" },
                        Op::AdvanceMillis(ms) => {
                            tokio::time::advance(Duration::from_millis(*ms)).await;
                            continue;
                        }
                    };
                    let batch = match op {
                        Op::Records(_, data_lens) => {
                            let records = data_lens.into_iter().map(|len| {
                                seq += 1;
                                let r = sized(shard, seq, len);
                                sent.entry(shard).or_default().push((seq, r.size(), Instant::now()));
                                r
                            }).collect();
                            Batch::new(shard.into(), records)
                        }
                        _ => Batch::empty(shard.into(), None),
                    };
                    send(&mut svc, batch).await.unwrap();
                    let all = sent.get(shard).map_or(&[][..], Vec::as_slice);
                    let buffered = &all[delivered(shard)..];
                    assert_eq!(svc.buffered(shard), buffered.len());
                    assert!(buffered.len() < max_records);
                    let bytes = svc.pending.get(shard).map_or(0, |p| p.bytes);
                    assert_eq!(bytes, buffered.iter().map(|(_, size, _)| size).sum::<usize>());
                    assert!(bytes < max_bytes || buffered.is_empty());
                    if let Some((_, _, oldest)) = buffered.first() {
                        assert!(oldest.elapsed() < max_wait);
                    }
                }
                for shard in ["a", "b"] {
                    send(&mut svc, Batch::empty(shard.into(), Some(BatchEnd::Shutdown))).await.unwrap();
                }
                for shard in ["a", "b"] {
                    let batches: Vec<Batch> =
                        inner.batches().into_iter().filter(|b| &*b.shard_id == shard).collect();
                    let got: Vec<u64> = batches.iter().flat_map(seqs).collect();
                    let want: Vec<u64> =
                        sent.get(shard).into_iter().flatten().map(|(s, _, _)| *s).collect();
                    assert_eq!(got, want);
                    for b in &batches {
                        assert!(b.len() <= max_records);
                        assert!(b.size() <= max_bytes || b.len() == 1, "{} bytes", b.size());
                    }
                    let ends: Vec<_> = batches.iter().map(|b| b.end).collect();
                    assert_eq!(ends.last(), Some(&Some(BatchEnd::Shutdown)));
                    assert_eq!(ends.iter().filter(|e| e.is_some()).count(), 1);
                }
                assert_eq!(inner.unready_calls.load(Ordering::SeqCst), 0);
            });
        }
    }
}
