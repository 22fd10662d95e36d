//! `CheckpointLayer`: records a batch's progress in the store after the inner service succeeds.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures::future::BoxFuture;
use tower::{Layer, Service};

use super::{Checkpoint, Checkpointer, StoreError};
use crate::record::{Batch, ShardId};
use crate::BoxError;

/// What a handler answers for a batch (or a record): how far the checkpoint may move.
///
/// Handlers that return `()` checkpoint everything they were given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Processed {
    /// Processed; checkpoint the whole batch (the default).
    #[default]
    Checkpoint,
    /// Processed, but do not move the checkpoint (the Go library's `SkipCheckpoint`): a later
    /// batch's checkpoint will cover these records, or they are read again after a restart.
    ///
    /// Also the answer of a handler that has already written the checkpoint itself, in the
    /// same transaction as its output (`PostgresStore::set_in`, `MySqlStore::set_in`): the
    /// layer then does not write it a second time.
    SkipCheckpoint,
    /// Processed; checkpoint up to this position, which must not be past the batch's last record.
    CheckpointAt(Checkpoint),
}

impl From<()> for Processed {
    fn from(_: ()) -> Self {
        Processed::Checkpoint
    }
}

/// The checkpoint a handler asked for is past the batch it was given.
#[derive(Debug, thiserror::Error)]
#[error("handler of shard {shard_id} asked to checkpoint at {requested}, past the batch's last record {last}; return Processed::Checkpoint or a position inside the batch")]
pub struct CheckpointPastBatch {
    /// The shard.
    pub shard_id: ShardId,
    /// What the handler asked for.
    pub requested: Checkpoint,
    /// The batch's own checkpoint.
    pub last: Checkpoint,
}

/// Writing a checkpoint failed after the handler succeeded; the checkpoint stays where it was.
#[derive(Debug, thiserror::Error)]
#[error("could not write checkpoint {checkpoint} of shard {shard_id} after the handler succeeded: {source}")]
pub struct CheckpointWriteError {
    /// The shard.
    pub shard_id: ShardId,
    /// The checkpoint that was not written.
    pub checkpoint: Checkpoint,
    /// The store's error.
    #[source]
    pub source: StoreError,
}

/// A batch failed after part of it was handled: the records up to [`checkpoint`](Self::checkpoint)
/// all succeeded, the first record after them did not.
///
/// A service inside [`CheckpointLayer`] returns it (boxed, or anywhere in its error's
/// `source()` chain) to say how far the batch may be checkpointed although it failed, as
/// [`KeyedConcurrencyLayer`](crate::keyed::KeyedConcurrencyLayer) does. `CheckpointLayer` writes
/// that checkpoint, then returns the error unchanged: the consumer stops, and a restart
/// delivers again from the first record after the checkpoint. Any other error leaves the
/// checkpoint where it was.
///
/// It is transparent to retry classification: [`is_transient`](crate::retry::is_transient)
/// walks on to [`source`](Self::source), so a `RetryLayer` outside retries the whole batch when
/// the handler's error is transient.
#[derive(Debug, thiserror::Error)]
#[error("{} of shard {shard_id} failed: {source}; {}", first_failed_text(.first_failed, .partition_key.as_deref()), checkpoint_text(.checkpoint))]
pub struct PartialFailure {
    /// The shard of the batch.
    pub shard_id: ShardId,
    /// How far the batch may be checkpointed: every record of the batch at or before it
    /// succeeded. `None`: not even the first record did.
    pub checkpoint: Option<Checkpoint>,
    /// The position of the first record of the batch that did not succeed; `None` when every
    /// record succeeded and what failed came after them (passing on the batch's end).
    pub first_failed: Option<Checkpoint>,
    /// The partition key of that record.
    pub partition_key: Option<crate::PartitionKey>,
    /// The handler's error.
    #[source]
    pub source: BoxError,
}

fn first_failed_text(first_failed: &Option<Checkpoint>, key: Option<&str>) -> String {
    match (first_failed, key) {
        (Some(at), Some(key)) => format!("record {at} (partition key {key:?})"),
        (Some(at), None) => format!("record {at}"),
        (None, _) => "passing on the end of a batch after its records".to_owned(),
    }
}

fn checkpoint_text(checkpoint: &Option<Checkpoint>) -> String {
    match checkpoint {
        Some(at) => format!(
            "the records up to {at} succeeded and may be checkpointed; a restart delivers again from the record after it"
        ),
        None => "no record of the batch before it succeeded; a restart delivers the whole batch again".to_owned(),
    }
}

impl PartialFailure {
    /// The first [`PartialFailure`] in `error` or its `source()` chain.
    pub fn find<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a PartialFailure> {
        let mut next = Some(error);
        while let Some(e) = next {
            if let Some(partial) = e.downcast_ref::<PartialFailure>() {
                return Some(partial);
            }
            next = e.source();
        }
        None
    }
}

/// A [`Layer`] that checkpoints each batch after the inner service handled it successfully.
///
/// The inner service's response says how far to checkpoint ([`Processed`]; `()` means the whole
/// batch). An error from the inner service leaves the checkpoint where it was and is returned
/// unchanged, except a [`PartialFailure`]: its checkpoint (when it is inside the batch) is
/// written first, then the error is returned unchanged (a failure to write it is logged, and
/// the handler's error is still the one returned). The last batch of a closed shard checkpoints [`Checkpoint::ShardEnd`], which is
/// what lets the shard's children start after a restart without reading it again.
///
/// Put it *outside* retries (so it sees only the final outcome) and *inside* batching (so it
/// sees only records about to be handled).
#[derive(Clone, Debug)]
pub struct CheckpointLayer {
    checkpointer: Checkpointer,
}

impl CheckpointLayer {
    /// Checkpoints through `checkpointer` (see `Consumer::checkpointer`).
    pub fn new(checkpointer: Checkpointer) -> Self {
        Self { checkpointer }
    }
}

impl<S> Layer<S> for CheckpointLayer {
    type Service = CheckpointService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CheckpointService {
            inner,
            checkpointer: self.checkpointer.clone(),
        }
    }
}

/// The [`Service`] made by [`CheckpointLayer`].
#[derive(Clone, Debug)]
pub struct CheckpointService<S> {
    inner: S,
    checkpointer: Checkpointer,
}

impl<S> CheckpointService<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, checkpointer: Checkpointer) -> Self {
        Self {
            inner,
            checkpointer,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S> Service<Batch> for CheckpointService<S>
where
    S: Service<Batch>,
    S::Response: Into<Processed>,
    S::Error: Into<BoxError>,
{
    type Response = Processed;
    type Error = BoxError;
    type Future = CheckpointFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, batch: Batch) -> Self::Future {
        // An empty last batch says nothing about the records before it (a record may have
        // answered SkipCheckpoint): the consumer turns the checkpoint into ShardEnd once it
        // covers the last record delivered (`Checkpointer::shard_ended`).
        let target = if batch.is_empty() {
            None
        } else {
            batch.checkpoint()
        };
        let shard_id = batch.shard_id.clone();
        CheckpointFuture {
            state: State::Inner {
                future: self.inner.call(batch),
            },
            target,
            shard_id,
            checkpointer: self.checkpointer.clone(),
            response: Processed::Checkpoint,
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`CheckpointService`].
    pub struct CheckpointFuture<F> {
        #[pin]
        state: State<F>,
        target: Option<Checkpoint>,
        shard_id: ShardId,
        checkpointer: Checkpointer,
        response: Processed,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F> {
        Inner { #[pin] future: F },
        Writing { future: BoxFuture<'static, Result<(), CheckpointWriteError>> },
        // Writing the checkpoint of a partly failed batch; then `error` is returned.
        WritingPartial {
            future: BoxFuture<'static, Result<(), CheckpointWriteError>>,
            error: Option<BoxError>,
        },
    }
}

impl<F, R, E> Future for CheckpointFuture<F>
where
    F: Future<Output = Result<R, E>>,
    R: Into<Processed>,
    E: Into<BoxError>,
{
    type Output = Result<Processed, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Inner { future } => {
                    let processed: Processed = match ready!(future.poll(cx)) {
                        Ok(response) => response.into(),
                        Err(error) => {
                            let error: BoxError = error.into();
                            let Some(checkpoint) =
                                partial_checkpoint(&error, this.shard_id, *this.target)
                            else {
                                return Poll::Ready(Err(error));
                            };
                            let future = write(this.checkpointer, this.shard_id, checkpoint);
                            this.state.set(State::WritingPartial {
                                future,
                                error: Some(error),
                            });
                            continue;
                        }
                    };
                    *this.response = processed;
                    let position = match (processed, *this.target) {
                        (_, None) | (Processed::SkipCheckpoint, _) => None,
                        (Processed::Checkpoint, Some(target)) => Some(target),
                        (Processed::CheckpointAt(requested), Some(last)) => {
                            if requested > last {
                                return Poll::Ready(Err(Box::new(CheckpointPastBatch {
                                    shard_id: this.shard_id.clone(),
                                    requested,
                                    last,
                                })));
                            }
                            Some(requested)
                        }
                    };
                    let Some(checkpoint) = position else {
                        return Poll::Ready(Ok(processed));
                    };
                    let future = write(this.checkpointer, this.shard_id, checkpoint);
                    this.state.set(State::Writing { future });
                }
                StateProj::Writing { future } => {
                    ready!(future.as_mut().poll(cx)).map_err(|e| Box::new(e) as BoxError)?;
                    return Poll::Ready(Ok(*this.response));
                }
                StateProj::WritingPartial { future, error } => {
                    if let Err(write) = ready!(future.as_mut().poll(cx)) {
                        tracing::warn!(shard = %this.shard_id, error = %write,
                            "the checkpoint of a partly failed batch was not written; a restart delivers the whole batch again");
                    }
                    let error = error
                        .take()
                        .unwrap_or_else(|| "checkpoint future polled after completion".into());
                    return Poll::Ready(Err(error));
                }
            }
        }
    }
}

fn write(
    checkpointer: &Checkpointer,
    shard_id: &ShardId,
    checkpoint: Checkpoint,
) -> BoxFuture<'static, Result<(), CheckpointWriteError>> {
    let checkpointer = checkpointer.clone();
    let shard_id = shard_id.clone();
    Box::pin(async move {
        checkpointer
            .set(&shard_id, checkpoint)
            .await
            .map(drop)
            .map_err(|source| CheckpointWriteError {
                shard_id,
                checkpoint,
                source,
            })
    })
}

/// The checkpoint a failed batch may still write: a [`PartialFailure`]'s, when it is of this
/// shard and inside the batch (`last`); anything else writes nothing.
fn partial_checkpoint(
    error: &BoxError,
    shard_id: &ShardId,
    last: Option<Checkpoint>,
) -> Option<Checkpoint> {
    let partial = PartialFailure::find(&**error)?;
    let (checkpoint, last) = (partial.checkpoint?, last?);
    if partial.shard_id != *shard_id || checkpoint > last {
        tracing::warn!(shard = %shard_id, %checkpoint, %last, reported_shard = %partial.shard_id,
            "a partly failed batch reported a checkpoint outside the batch; not writing it");
        return None;
    }
    Some(checkpoint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{at, batch};
    use crate::{CheckpointStore, MemoryStore};
    use std::sync::Arc;
    use tower::{service_fn, ServiceExt};

    fn setup() -> (Arc<MemoryStore>, Checkpointer) {
        let store = Arc::new(MemoryStore::new());
        (store.clone(), Checkpointer::from_arc(store, "ns"))
    }

    #[tokio::test]
    async fn checkpoints_last_record_after_success_only() {
        let (store, checkpointer) = setup();
        let ok = service_fn(|_b: Batch| async { Ok::<_, BoxError>(()) });
        let mut svc = CheckpointLayer::new(checkpointer.clone()).layer(ok);
        svc.ready()
            .await
            .unwrap()
            .call(batch([1, 2, 3]))
            .await
            .unwrap();
        assert_eq!(store.get("ns", "shard-0").await.unwrap(), Some(at(3)));

        let failing = service_fn(|_b: Batch| async { Err::<(), BoxError>("boom".into()) });
        let mut svc = CheckpointLayer::new(checkpointer).layer(failing);
        let err = svc
            .ready()
            .await
            .unwrap()
            .call(batch([4, 5]))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "boom");
        assert_eq!(store.get("ns", "shard-0").await.unwrap(), Some(at(3)));
    }

    #[tokio::test]
    async fn skip_checkpoint_and_checkpoint_at() {
        let (store, checkpointer) = setup();
        let skip = service_fn(|_b: Batch| async { Ok::<_, BoxError>(Processed::SkipCheckpoint) });
        let mut svc = CheckpointLayer::new(checkpointer.clone()).layer(skip);
        svc.ready()
            .await
            .unwrap()
            .call(batch([1, 2]))
            .await
            .unwrap();
        assert_eq!(store.get("ns", "shard-0").await.unwrap(), None);

        let partial =
            service_fn(|_b: Batch| async { Ok::<_, BoxError>(Processed::CheckpointAt(at(7))) });
        let mut svc = CheckpointLayer::new(checkpointer.clone()).layer(partial);
        svc.ready()
            .await
            .unwrap()
            .call(batch([6, 7, 8]))
            .await
            .unwrap();
        assert_eq!(store.get("ns", "shard-0").await.unwrap(), Some(at(7)));

        let past =
            service_fn(|_b: Batch| async { Ok::<_, BoxError>(Processed::CheckpointAt(at(99))) });
        let mut svc = CheckpointLayer::new(checkpointer).layer(past);
        let err = svc
            .ready()
            .await
            .unwrap()
            .call(batch([9]))
            .await
            .unwrap_err();
        assert!(err.is::<CheckpointPastBatch>(), "{err}");
        assert_eq!(store.get("ns", "shard-0").await.unwrap(), Some(at(7)));
    }

    #[tokio::test]
    async fn shard_end_batch_checkpoints_shard_end_and_heartbeats_write_nothing() {
        let (store, checkpointer) = setup();
        let ok = service_fn(|_b: Batch| async { Ok::<_, BoxError>(()) });
        let mut svc = CheckpointLayer::new(checkpointer).layer(ok);
        let shard = ShardId::from("shard-0");
        svc.ready()
            .await
            .unwrap()
            .call(Batch::empty(shard.clone(), None))
            .await
            .unwrap();
        assert_eq!(store.get("ns", "shard-0").await.unwrap(), None);
        // An empty last batch alone writes nothing (the consumer's `shard_ended` does, once
        // the checkpoint covers the last record delivered); one with records writes ShardEnd.
        svc.ready()
            .await
            .unwrap()
            .call(Batch::empty(shard.clone(), Some(crate::BatchEnd::ShardEnd)))
            .await
            .unwrap();
        assert_eq!(store.get("ns", "shard-0").await.unwrap(), None);
        let mut last = batch([1, 2]);
        last.end = Some(crate::BatchEnd::ShardEnd);
        svc.ready().await.unwrap().call(last).await.unwrap();
        assert_eq!(
            store.get("ns", "shard-0").await.unwrap(),
            Some(Checkpoint::ShardEnd)
        );
    }

    /// A PartialFailure's checkpoint is written, then its error returned; one of another shard
    /// or past the batch is not written; a failed write still returns the handler's error.
    #[tokio::test]
    async fn a_partial_failure_writes_its_checkpoint_then_fails() {
        use crate::testing::FaultyStore;
        let partial = |shard: &str, checkpoint| PartialFailure {
            shard_id: shard.into(),
            checkpoint: Some(checkpoint),
            first_failed: Some(at(6)),
            partition_key: Some("k".into()),
            source: "key k failed".into(),
        };
        let store = Arc::new(FaultyStore::new());
        let checkpointer = Checkpointer::from_arc(store.clone(), "ns");
        let cases = [
            (partial("shard-0", at(5)), false, Some(at(5))),
            (partial("shard-1", at(6)), false, Some(at(5))),
            (partial("shard-0", at(99)), false, Some(at(5))),
            (partial("shard-0", at(7)), true, Some(at(5))),
        ];
        for (error, fail_write, expected) in cases {
            store.fail_writes(fail_write);
            let error = std::sync::Mutex::new(Some(error));
            let handler = service_fn(move |_b: Batch| {
                let error = error.lock().unwrap().take().unwrap();
                async move { Err::<(), BoxError>(Box::new(error)) }
            });
            let mut svc = CheckpointLayer::new(checkpointer.clone()).layer(handler);
            let err = svc
                .ready()
                .await
                .unwrap()
                .call(batch([4, 5, 6, 7, 8]))
                .await
                .unwrap_err();
            assert!(err.is::<PartialFailure>(), "{err}");
            assert!(err.to_string().contains("key k failed"), "{err}");
            store.fail_writes(false);
            assert_eq!(store.get("ns", "shard-0").await.unwrap(), expected);
        }
    }
}
