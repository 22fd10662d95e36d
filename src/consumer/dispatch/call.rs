//! The handler side of `run`: the service with its types erased, and the calls in flight.

use std::task::{Context, Poll};

use futures::future::BoxFuture;
use kinesis_tower_layers::{
    Batch, BatchEnd, BoxError, Checkpoint, Checkpointer, SequenceNumber, ShardId, StoreError,
};
use tower::Service;

use crate::consumer::reader::BufferPermit;

/// Why a call did not succeed.
pub(crate) enum Failure {
    /// The service failed.
    Handler(BoxError),
    /// The service succeeded on a shard's last batch, but recording the shard's end failed.
    Store(StoreError),
}

pub(crate) struct Completed {
    pub(crate) shard: ShardId,
    pub(crate) end: Option<BatchEnd>,
    /// The batch's first and last sequence numbers, for the error if it failed.
    pub(crate) first: Option<SequenceNumber>,
    pub(crate) last: Option<SequenceNumber>,
    /// How many records the batch held.
    pub(crate) records: usize,
    pub(crate) result: Result<(), Failure>,
}

/// The handler service with its future and error types erased.
///
/// `run` works on this rather than on a generic `S: Service<Batch>`: when a generic `async fn`
/// holds `S::Future`s across awaits, the compiler cannot prove the future `Send` for services
/// whose impls require `E: Into<BoxError>` (tower's `Timeout`, among others), and users could
/// not spawn a run inside an `async` block. Erased, `run` needs no such proof.
///
/// A call takes the batch's buffer room (`permit`) with it: a service holds it until the batch
/// was handled (a slow handler stops its shard's reader), `records()` until the stream has
/// yielded the batch's records.
pub(crate) trait Dispatch: Send {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>>;
    fn call(
        &mut self,
        batch: Batch,
        permit: BufferPermit,
    ) -> BoxFuture<'static, Result<(), BoxError>>;
}

/// Erases a `Service<Batch>` into a [`Dispatch`].
pub(crate) struct Erased<S>(pub(crate) S);

impl<S> Dispatch for Erased<S>
where
    S: Service<Batch> + Send,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(
        &mut self,
        batch: Batch,
        permit: BufferPermit,
    ) -> BoxFuture<'static, Result<(), BoxError>> {
        let future = self.0.call(batch);
        Box::pin(async move {
            let result = future.await.map(drop).map_err(Into::into);
            drop(permit);
            result
        })
    }
}

/// A call in flight. For a closed shard's last batch, once the call succeeded, the shard's end
/// is recorded (`Checkpointer::shard_ended`) before its children may start.
pub(crate) async fn tracked(
    future: BoxFuture<'static, Result<(), BoxError>>,
    shard: ShardId,
    end: Option<BatchEnd>,
    (first, last, records): (Option<SequenceNumber>, Option<SequenceNumber>, usize),
    shard_end: Option<(Checkpointer, Option<Checkpoint>)>,
) -> Completed {
    let mut result = future.await.map_err(Failure::Handler);
    if let (Ok(()), Some((checkpointer, last_delivered))) = (&result, shard_end) {
        result = checkpointer
            .shard_ended(&shard, last_delivered)
            .await
            .map_err(Failure::Store);
    }
    Completed {
        shard,
        end,
        first,
        last,
        records,
        result,
    }
}
