//! `PerRecordLayer`: runs a per-record handler (`Service<Record>`) over each batch, in order.

use std::error::Error as StdError;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tower::{Layer, Service, ServiceExt};

use crate::checkpoint::{Checkpoint, Processed};
use crate::record::{Batch, Record, ShardId};
use crate::BoxError;

/// A batch failed at one of its records: the records before it were handled, this one and
/// the ones after it were not.
///
/// [`PerRecordLayer`] wraps the per-record handler's error in it, and a batch handler that
/// works through its records one by one may return it too
/// (`Err(RecordFailed::new(&record, error).into())`). Under `Consumer::run` it is an error
/// like any other (the batch is not checkpointed); inside AWS Lambda (the `lambda` feature of
/// `kinesis-tower`) it is what lets the function answer with this record, so Lambda retries
/// from it instead of from the start of the batch.
///
/// It displays its position and the error it wraps, and its `source()` is that error, so
/// [`is_transient`](crate::retry::is_transient) and downcasts along the chain still find what
/// the handler returned.
#[derive(Debug, thiserror::Error)]
#[error(
    "record {position} of shard {shard_id} failed (the records before it were handled): {source}"
)]
pub struct RecordFailed {
    /// The shard.
    pub shard_id: ShardId,
    /// The record that failed: its sequence number, and its sub-sequence number for a user
    /// record of a KPL aggregate.
    pub position: Checkpoint,
    /// The handler's error.
    #[source]
    pub source: BoxError,
}

impl RecordFailed {
    /// `record` failed with `error`.
    pub fn new(record: &Record, error: impl Into<BoxError>) -> Self {
        Self {
            shard_id: record.shard_id.clone(),
            position: record.checkpoint(),
            source: error.into(),
        }
    }

    /// The first `RecordFailed` in `error`'s `source()` chain, `error` included.
    pub fn find<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a RecordFailed> {
        let mut next = Some(error);
        while let Some(e) = next {
            if let Some(found) = e.downcast_ref::<RecordFailed>() {
                return Some(found);
            }
            next = e.source();
        }
        None
    }
}

/// Adapts a `Service<Record>` into a `Service<Batch>` that calls it for each record of the batch,
/// one after the other, in shard order, waiting for readiness before each call.
///
/// The first error stops the batch and is returned in a [`RecordFailed`] naming the record
/// (records before it were handled; with `CheckpointLayer` outside, none of the batch is
/// checkpointed). Each record's response says
/// how far it may be checkpointed ([`Processed`]; `()` means checkpoint): a record answering
/// [`Processed::SkipCheckpoint`] is covered by the next record that does not.
///
/// The batch future owns a clone of the inner service, so the inner service must be `Clone`
/// (wrap it in `tower::buffer::Buffer` if it is not).
#[derive(Clone, Copy, Debug, Default)]
pub struct PerRecordLayer;

impl PerRecordLayer {
    /// The layer.
    pub fn new() -> Self {
        PerRecordLayer
    }
}

impl<S> Layer<S> for PerRecordLayer {
    type Service = PerRecordService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PerRecordService { inner }
    }
}

/// The [`Service`] made by [`PerRecordLayer`].
#[derive(Clone, Debug)]
pub struct PerRecordService<S> {
    inner: S,
}

impl<S> PerRecordService<S> {
    /// Wraps a per-record service.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S> Service<Batch> for PerRecordService<S>
where
    S: Service<Record> + Clone + Send + 'static,
    S::Response: Into<Processed>,
    S::Error: Into<BoxError>,
    S::Future: Send,
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
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let mut covered = None;
            let mut last_checkpointed = true;
            let mut first = true;
            let shard_id = batch.shard_id;
            for record in batch.records {
                let position = record.checkpoint();
                let failed = |e: BoxError| -> BoxError {
                    Box::new(RecordFailed {
                        shard_id: shard_id.clone(),
                        position,
                        source: e,
                    })
                };
                if !first {
                    inner.ready().await.map_err(|e| failed(e.into()))?;
                }
                first = false;
                let answer = inner.call(record).await.map_err(|e| failed(e.into()))?;
                match answer.into() {
                    Processed::Checkpoint => {
                        covered = Some(position);
                        last_checkpointed = true;
                    }
                    Processed::SkipCheckpoint => last_checkpointed = false,
                    Processed::CheckpointAt(at) => {
                        covered = covered.max(Some(at));
                        last_checkpointed = false;
                    }
                }
            }
            Ok(match (last_checkpointed, covered) {
                (true, _) => Processed::Checkpoint,
                (false, Some(at)) => Processed::CheckpointAt(at),
                (false, None) => Processed::SkipCheckpoint,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{at, batch};
    use std::sync::{Arc, Mutex};
    use tower::service_fn;

    #[tokio::test]
    async fn calls_each_record_in_order_and_stops_at_first_error() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let handler = service_fn(move |r: Record| {
            let s = s.clone();
            async move {
                let n: u64 = r.sequence_number.to_string().parse().unwrap();
                s.lock().unwrap().push(n);
                if n == 3 {
                    return Err::<(), BoxError>("record 3 failed".into());
                }
                Ok(())
            }
        });
        let mut svc = PerRecordLayer.layer(handler);
        assert_eq!(
            svc.ready()
                .await
                .unwrap()
                .call(batch([1, 2]))
                .await
                .unwrap(),
            Processed::Checkpoint
        );
        let err = svc
            .ready()
            .await
            .unwrap()
            .call(batch([3, 4]))
            .await
            .unwrap_err();
        // The error names the record that failed and wraps the handler's.
        let failed = RecordFailed::find(&*err).expect("a RecordFailed");
        assert_eq!(failed.position, at(3));
        assert_eq!(&*failed.shard_id, "shard-0");
        assert_eq!(failed.source.to_string(), "record 3 failed");
        assert_eq!(
            err.to_string(),
            "record 3 of shard shard-0 failed (the records before it were handled): record 3 failed"
        );
        assert_eq!(*seen.lock().unwrap(), vec![1, 2, 3]);
    }

    #[tokio::test]
    async fn skipped_records_are_covered_by_the_last_checkpointed_one() {
        let handler = service_fn(|r: Record| async move {
            let n: u64 = r.sequence_number.to_string().parse().unwrap();
            Ok::<_, BoxError>(if n % 2 == 0 {
                Processed::SkipCheckpoint
            } else {
                Processed::Checkpoint
            })
        });
        let mut svc = PerRecordLayer.layer(handler);
        let answer = svc
            .ready()
            .await
            .unwrap()
            .call(batch([1, 2, 3, 4]))
            .await
            .unwrap();
        assert_eq!(answer, Processed::CheckpointAt(at(3)));
        let answer = svc.ready().await.unwrap().call(batch([2])).await.unwrap();
        assert_eq!(answer, Processed::SkipCheckpoint);
    }
}
