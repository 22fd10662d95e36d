//! The same `Service<Batch>` stack inside AWS Lambda (feature `lambda`): a Kinesis event in,
//! a partial batch response out.
//!
//! A Kinesis event source mapping reads the shards, keeps each shard's position, scales, and
//! invokes the function with one shard's records at a time. [`LambdaLayer`] (or
//! [`LambdaService::new`]) turns the stack a consumer would run into the function's handler:
//! a `Service<LambdaEvent<KinesisEvent>>` that `lambda_runtime::run` accepts. Each invocation's
//! records become [`Batch`]es (shard id from the `eventID`, sequence number, partition key,
//! data, arrival time; see [`batches`]), handed to the stack in order, one shard's records
//! per batch.
//!
//! ```no_run
//! use kinesis_tower::lambda::LambdaLayer;
//! use kinesis_tower::retry::RetryLayer;
//! use kinesis_tower::{service_fn, Batch, BoxError};
//! use tower::ServiceBuilder;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), lambda_runtime::Error> {
//!     let handler = service_fn(|batch: Batch| async move {
//!         println!("{} records from {}", batch.records.len(), batch.shard_id);
//!         Ok::<_, BoxError>(())
//!     });
//!     let function = ServiceBuilder::new()
//!         .layer(LambdaLayer::new()) // where a consumer has CheckpointLayer
//!         .layer(RetryLayer::new())
//!         .service(handler);
//!     lambda_runtime::run(function).await
//! }
//! ```
//!
//! # What the function answers
//!
//! Lambda keeps each shard's position; the answer says how far it may move. With
//! `ReportBatchItemFailures` on the event source mapping (`FunctionResponseTypes`), the
//! function answers a *partial batch response* naming the first record that was not processed,
//! and Lambda retries from that record instead of from the start of the batch:
//!
//! | the stack answers | the function answers |
//! |---|---|
//! | `Ok(())` / `Processed::Checkpoint` for every batch | success (no failures) |
//! | `Processed::CheckpointAt(c)` | the first record after `c` (success when `c` is the last) |
//! | `Processed::SkipCheckpoint` | the batch's first record: nothing of it may be kept |
//! | an error with a [`RecordFailed`] in its chain ([`PerRecordLayer`](crate::per_record::PerRecordLayer) returns one) | the record that failed |
//! | any other error | the batch's first record (a batch fails as a whole) |
//! | an error with a [`RetryWholeBatch`] in its chain | an invocation error: Lambda retries the whole batch (and bisects it, if the mapping says so) |
//!
//! Batches after the one that stopped are not handed over: Lambda delivers them again. A
//! stopped batch is logged (`tracing`, warning) with its error, since the answer is a success
//! to Lambda's error metrics. An event that cannot be turned into batches ([`EventError`]) is
//! an invocation error too.
//!
//! Without `ReportBatchItemFailures` Lambda ignores the answer and counts every invocation
//! that did not fail as a success: build the service with
//! [`LambdaLayer::whole_batch_failures`], and every stop above becomes an invocation error
//! instead, so the whole batch is retried.
//!
//! # KPL aggregates
//!
//! Lambda does not deaggregate: a KPL aggregate arrives as one Kinesis record. With
//! [`DeaggregateLayer`](crate::kpl::DeaggregateLayer) in the stack the handler sees user
//! records as under a consumer, but Lambda can only resume at a Kinesis record: a failure (or
//! a `CheckpointAt`) inside an aggregate answers the aggregate itself, and every user record of
//! it is delivered again, the ones handled before the failure included. Handlers of aggregated
//! streams must therefore take duplicates (at least once), as under a consumer after a crash.
//!
//! # Arrival times
//!
//! Under `lambda_runtime::run` the event is read by `aws_lambda_events`, which reads the
//! fraction of `approximateArrivalTimestamp` as a count of milliseconds: an arrival at
//! `.25` s comes out as 25 ms past the second. Records' arrival times are then off by up to
//! a second; [`parse_event`] reads them exactly.
//!
//! # No `CheckpointLayer` here
//!
//! Lambda keeps the position, so nothing reads checkpoints written from a function: the
//! answer above replaces [`CheckpointLayer`](crate::checkpoint::CheckpointLayer), and
//! [`LambdaLayer`] goes where it would be. A stack that keeps one still works the same
//! (`CheckpointLayer` answers what the stack inside it answered), but writes checkpoints that
//! nothing reads: leave it out, or give it a `MemoryStore`. Never give it the store of a
//! consumer of the same stream and application: it would move that consumer's checkpoints.
//! To share a stack between a consumer and a function, build it without `CheckpointLayer` and
//! pass it to [`Consumer::process`](crate::Consumer::process), which adds one.
//!
//! `BatchLayer` has no place either (the event source mapping batches: `BatchSize`,
//! `MaximumBatchingWindowInSeconds`), and a stack with it does not build: its answer is not a
//! `Processed`.
//!
//! ```compile_fail
//! use kinesis_tower::batch::BatchLayer;
//! use kinesis_tower::lambda::LambdaLayer;
//! use kinesis_tower::{service_fn, Batch, BoxError};
//! use tower::ServiceBuilder;
//!
//! fn function<S: tower::Service<lambda_runtime::LambdaEvent<kinesis_tower::lambda::KinesisEvent>>>(_: S) {}
//!
//! function(ServiceBuilder::new()
//!     .layer(LambdaLayer::new())
//!     .layer(BatchLayer::new())
//!     .service(service_fn(|_: Batch| async { Ok::<_, BoxError>(()) })));
//! ```

mod event;
#[cfg(test)]
mod tests;

use std::error::Error as StdError;
use std::fmt;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use kinesis_tower_layers::checkpoint::CheckpointPastBatch;
use kinesis_tower_layers::kpl::{deaggregate, is_aggregate};
use tower::{Layer, Service, ServiceExt};

pub use aws_lambda_events::event::kinesis::{KinesisEvent, KinesisEventRecord, KinesisRecord};
pub use aws_lambda_events::event::streams::{KinesisBatchItemFailure, KinesisEventResponse};
pub use event::{batches, parse_event, shard_of_event_id, EventError};
pub use kinesis_tower_layers::per_record::RecordFailed;
pub use lambda_runtime::{Diagnostic, LambdaEvent};

use crate::{Batch, BoxError, Checkpoint, Processed, Record, SequenceNumber, ShardId};

/// An error that asks Lambda to retry the whole batch: wrap the error in it (anywhere in the
/// `source()` chain), and the function answers with an invocation error instead of a partial
/// batch response. Lambda then retries every record of the batch, and bisects it when the
/// event source mapping has `BisectBatchOnFunctionError`. Under a consumer it is an error
/// like any other.
///
/// It displays as the error it wraps and is otherwise transparent.
///
/// ```
/// use kinesis_tower::lambda::RetryWholeBatch;
/// use kinesis_tower::BoxError;
///
/// let e: BoxError = RetryWholeBatch::new("the warehouse refused the whole load").into();
/// assert!(RetryWholeBatch::is_in(&*e));
/// assert_eq!(e.to_string(), "the warehouse refused the whole load");
/// ```
pub struct RetryWholeBatch(BoxError);

impl RetryWholeBatch {
    /// Marks `error`.
    pub fn new(error: impl Into<BoxError>) -> Self {
        Self(error.into())
    }

    /// The wrapped error.
    pub fn into_inner(self) -> BoxError {
        self.0
    }

    /// Whether a `RetryWholeBatch` is in `error`'s `source()` chain, `error` included.
    pub fn is_in(error: &(dyn StdError + 'static)) -> bool {
        let mut next = Some(error);
        while let Some(e) = next {
            if e.is::<RetryWholeBatch>() {
                return true;
            }
            next = e.source();
        }
        false
    }
}

impl fmt::Debug for RetryWholeBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RetryWholeBatch").field(&self.0).finish()
    }
}

impl fmt::Display for RetryWholeBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl StdError for RetryWholeBatch {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.0.source()
    }
}

/// Why an invocation fails as a whole (Lambda then retries every record of the batch). The
/// runtime reports it to Lambda as an invocation error (`errorType` names the variant).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LambdaError {
    /// The event cannot be turned into batches.
    #[error(transparent)]
    Event(#[from] EventError),
    /// The stack failed with a [`RetryWholeBatch`].
    #[error("shard {shard_id}: the stack asked to retry the whole batch ({first_sequence_number} to {last_sequence_number}): {source}")]
    RetryWholeBatch {
        /// The shard of the batch that failed.
        shard_id: ShardId,
        /// Its first record.
        first_sequence_number: SequenceNumber,
        /// Its last record.
        last_sequence_number: SequenceNumber,
        /// The stack's error.
        #[source]
        source: BoxError,
    },
    /// The stack failed at a record, and partial batch responses are off
    /// ([`LambdaLayer::whole_batch_failures`]).
    #[error("record {sequence_number} of shard {shard_id} failed: {source}; partial batch responses are off, so Lambda retries the whole batch (turn on ReportBatchItemFailures on the event source mapping and drop whole_batch_failures() to retry from this record)")]
    Failed {
        /// The shard.
        shard_id: ShardId,
        /// The first record not processed.
        sequence_number: SequenceNumber,
        /// The stack's error.
        #[source]
        source: BoxError,
    },
    /// The stack left records unprocessed (`CheckpointAt`, `SkipCheckpoint`), and partial
    /// batch responses are off ([`LambdaLayer::whole_batch_failures`]).
    #[error("the stack answered {answer:?} for shard {shard_id}: record {sequence_number} and the ones after it are not processed; partial batch responses are off, so Lambda retries the whole batch (turn on ReportBatchItemFailures on the event source mapping and drop whole_batch_failures() to retry from this record)")]
    Unprocessed {
        /// The shard.
        shard_id: ShardId,
        /// The first record not processed.
        sequence_number: SequenceNumber,
        /// What the stack answered.
        answer: Processed,
    },
    /// The stack answered `CheckpointAt` a position past the batch.
    #[error(transparent)]
    CheckpointPastBatch(#[from] Box<CheckpointPastBatch>),
}

impl LambdaError {
    /// The name Lambda shows as `errorType`.
    pub fn error_type(&self) -> &'static str {
        match self {
            LambdaError::Event(_) => "KinesisTower.InvalidEvent",
            LambdaError::RetryWholeBatch { .. } => "KinesisTower.RetryWholeBatch",
            LambdaError::Failed { .. } => "KinesisTower.Failed",
            LambdaError::Unprocessed { .. } => "KinesisTower.Unprocessed",
            LambdaError::CheckpointPastBatch(_) => "KinesisTower.CheckpointPastBatch",
        }
    }
}

impl From<LambdaError> for Diagnostic {
    fn from(error: LambdaError) -> Self {
        Diagnostic {
            error_type: error.error_type().to_owned(),
            error_message: error.to_string(),
        }
    }
}

/// A [`Layer`] that makes a `Service<Batch>` stack the handler of a Lambda function of a
/// Kinesis event source mapping: see [`LambdaService`] and the [module docs](self).
#[derive(Clone, Copy, Debug)]
pub struct LambdaLayer {
    partial_responses: bool,
}

impl Default for LambdaLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl LambdaLayer {
    /// Answers with partial batch responses: the event source mapping must have
    /// `FunctionResponseTypes: ["ReportBatchItemFailures"]`.
    pub fn new() -> Self {
        Self {
            partial_responses: true,
        }
    }

    /// For an event source mapping without `ReportBatchItemFailures` (which ignores partial
    /// batch responses): whenever records are left unprocessed, the invocation fails, so
    /// Lambda retries the whole batch.
    pub fn whole_batch_failures(mut self) -> Self {
        self.partial_responses = false;
        self
    }
}

impl<S> Layer<S> for LambdaLayer {
    type Service = LambdaService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LambdaService {
            inner,
            partial_responses: self.partial_responses,
        }
    }
}

/// The handler of a Lambda function of a Kinesis event source mapping, made of a
/// `Service<Batch>` stack (by [`LambdaLayer`]): a `Service<LambdaEvent<KinesisEvent>>`
/// answering a [`KinesisEventResponse`], for `lambda_runtime::run`.
///
/// Each invocation's records become batches ([`batches`]), handed to a clone of the stack one
/// after the other, each after the stack is ready; the answer is as the [module
/// docs](self) say. `poll_ready` is always ready: the runtime ends the process on a
/// `poll_ready` error, so the stack's readiness is awaited inside the call, where an error is
/// the batch's failure.
#[derive(Clone, Debug)]
pub struct LambdaService<S> {
    inner: S,
    partial_responses: bool,
}

impl<S> LambdaService<S> {
    /// `inner`, answering with partial batch responses ([`LambdaLayer::new`]).
    pub fn new(inner: S) -> Self {
        LambdaLayer::new().layer(inner)
    }

    /// The stack.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The stack.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Handles `event`: the answer for Lambda, or why the whole batch fails.
    ///
    /// # Errors
    ///
    /// A [`LambdaError`]; see the [module docs](self).
    pub fn handle(
        &self,
        event: KinesisEvent,
    ) -> impl std::future::Future<Output = Result<KinesisEventResponse, LambdaError>> + use<S>
    where
        S: Service<Batch> + Clone,
        S::Response: Into<Processed>,
        S::Error: Into<BoxError>,
    {
        handle(self.inner.clone(), event, self.partial_responses)
    }
}

impl<S> Service<LambdaEvent<KinesisEvent>> for LambdaService<S>
where
    S: Service<Batch> + Clone + Send + 'static,
    S::Response: Into<Processed>,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    type Response = KinesisEventResponse;
    type Error = LambdaError;
    type Future = BoxFuture<'static, Result<KinesisEventResponse, LambdaError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, event: LambdaEvent<KinesisEvent>) -> Self::Future {
        Box::pin(handle(
            self.inner.clone(),
            event.payload,
            self.partial_responses,
        ))
    }
}

/// Where a batch stopped: the index of its first record not processed, and why.
enum Stop {
    Failed { at: usize, error: BoxError },
    Unprocessed { at: usize, answer: Processed },
}

async fn handle<S>(
    mut inner: S,
    event: KinesisEvent,
    partial_responses: bool,
) -> Result<KinesisEventResponse, LambdaError>
where
    S: Service<Batch>,
    S::Response: Into<Processed>,
    S::Error: Into<BoxError>,
{
    for batch in batches(event)? {
        let shard_id = batch.shard_id.clone();
        let records = batch.records.clone();
        let ready: Result<&mut S, BoxError> = inner.ready().await.map_err(Into::into);
        let stop = match ready {
            Err(error) => Some(Stop::Failed { at: 0, error }),
            Ok(ready) => match ready.call(batch).await {
                Ok(answer) => stopped_at(&shard_id, &records, answer.into())?,
                Err(error) => {
                    let error = error.into();
                    if RetryWholeBatch::is_in(&*error) {
                        return Err(LambdaError::RetryWholeBatch {
                            first_sequence_number: records[0].sequence_number,
                            last_sequence_number: records[records.len() - 1].sequence_number,
                            shard_id,
                            source: error,
                        });
                    }
                    Some(Stop::Failed {
                        at: failed_at(&shard_id, &records, &*error),
                        error,
                    })
                }
            },
        };
        let Some(stop) = stop else { continue };
        let (at, reason) = match &stop {
            Stop::Failed { at, error } => (*at, error.to_string()),
            Stop::Unprocessed { at, answer } => (*at, format!("the stack answered {answer:?}")),
        };
        let sequence_number = records[at].sequence_number;
        if !partial_responses {
            return Err(match stop {
                Stop::Failed { error, .. } => LambdaError::Failed {
                    shard_id,
                    sequence_number,
                    source: error,
                },
                Stop::Unprocessed { answer, .. } => LambdaError::Unprocessed {
                    shard_id,
                    sequence_number,
                    answer,
                },
            });
        }
        tracing::warn!(
            shard = %shard_id,
            %sequence_number,
            reason,
            "records left unprocessed: answering Lambda with a partial batch response, so it \
             retries from this record"
        );
        let mut failure = KinesisBatchItemFailure::default();
        failure.item_identifier = Some(sequence_number.to_string());
        let mut response = KinesisEventResponse::default();
        response.batch_item_failures.push(failure);
        return Ok(response);
    }
    Ok(KinesisEventResponse::default())
}

/// Where an answer leaves the batch `records` (never empty): `None` when all is processed.
fn stopped_at(
    shard_id: &ShardId,
    records: &[Record],
    answer: Processed,
) -> Result<Option<Stop>, Box<CheckpointPastBatch>> {
    let covered = match answer {
        Processed::Checkpoint => return Ok(None),
        Processed::SkipCheckpoint => None,
        Processed::CheckpointAt(checkpoint) => Some(checkpoint),
    };
    let at = match covered {
        None => Some(0),
        Some(Checkpoint::ShardEnd) => None,
        Some(Checkpoint::Sequence {
            sequence_number,
            sub_sequence_number,
        }) => {
            let last = records[records.len() - 1].checkpoint();
            let requested = Checkpoint::Sequence {
                sequence_number,
                sub_sequence_number,
            };
            // A user record's checkpoint sorts before its aggregate's own.
            if requested > last {
                return Err(Box::new(CheckpointPastBatch {
                    shard_id: shard_id.clone(),
                    requested,
                    last,
                }));
            }
            records.iter().position(|r| {
                r.sequence_number > sequence_number
                    || (r.sequence_number == sequence_number
                        && sub_sequence_number.is_some_and(|sub| !aggregate_done(r, sub)))
            })
        }
        // A position before any record (where a shard started): nothing is processed.
        Some(_) => Some(0),
    };
    Ok(at.map(|at| Stop::Unprocessed { at, answer }))
}

/// Whether the user record `sub` is the last of the aggregate `record`.
fn aggregate_done(record: &Record, sub: u64) -> bool {
    if !is_aggregate(&record.data) {
        return false;
    }
    match deaggregate(record) {
        Ok(users) => sub.saturating_add(1) >= users.len() as u64,
        Err(_) => false,
    }
}

/// The index of the first record `error` leaves unprocessed: the record a [`RecordFailed`]
/// names (its aggregate, for a user record), else the batch's first.
fn failed_at(shard_id: &ShardId, records: &[Record], error: &(dyn StdError + 'static)) -> usize {
    let Some(failed) = RecordFailed::find(error) else {
        return 0;
    };
    let Some(sequence_number) = failed.position.sequence_number() else {
        return 0;
    };
    if failed.shard_id != *shard_id {
        return 0;
    }
    records
        .iter()
        .position(|r| r.sequence_number >= sequence_number)
        .unwrap_or(0)
}
