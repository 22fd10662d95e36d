//! Records, sequence numbers, checkpoints and `tower` layers for Kinesis consumers.
//!
//! This crate has no AWS SDK dependency: it is the vocabulary shared by the `kinesis-tower`
//! consumer (which re-exports it as `kinesis_tower::layers`) and by handlers and layers that
//! want to be tested without Kinesis.
//!
//! - [`Record`], [`Batch`], [`ShardId`], [`SequenceNumber`]: what a handler receives.
//! - [`Checkpoint`], [`CheckpointStore`], [`Checkpointer`], [`MemoryStore`]: progress and where
//!   it is kept.
//! - [`CheckpointLayer`]: checkpoint each batch after the inner service succeeded.
//! - [`PerRecordLayer`]: run a `Service<Record>` over each batch, in order.
//! - [`BatchLayer`]: group each shard's records up to max records / max bytes / max wait.
//! - [`RetryLayer`]: retry failed calls with exponential backoff and full jitter
//!   ([`backoff::Backoff`], the backoff policy of the whole consumer).
//! - [`MetricsLayer`]: count and time the handler's calls per stream and shard through the
//!   `metrics` facade; [`metric_names`] lists every metric the library emits.
//! - [`DeaggregateLayer`]: replace KPL aggregates by their user records ([`kpl`]), with
//!   [`Aggregator`] to build aggregates.
//!
//! The recommended order, outermost first: [`BatchLayer`], [`MetricsLayer`], [`CheckpointLayer`],
//! [`RetryLayer`], [`DeaggregateLayer`], then the handler (the README says why).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod backoff;
mod batch;
pub mod checkpoint;
pub mod kpl;
pub mod metric_names;
mod metrics;
mod per_record;
mod record;
mod retry;
mod sequence;

pub use batch::{
    BatchFuture, BatchLayer, BatchResponse, BatchService, PolledAfterCompletion, DEFAULT_MAX_BYTES,
    DEFAULT_MAX_RECORDS, DEFAULT_MAX_WAIT,
};
pub use checkpoint::{
    Checkpoint, CheckpointLayer, CheckpointService, CheckpointStore, Checkpointer, MemoryStore,
    Processed, SetOutcome, StoreError,
};
pub use kpl::{Aggregator, CorruptPolicy, DeaggregateLayer, KplError};
pub use metrics::{MetricsFuture, MetricsLayer, MetricsService};
pub use per_record::{PerRecord, PerRecordLayer};
pub use record::{Batch, BatchEnd, Record, ShardId, Wake};
pub use retry::{
    is_transient, BoxErrors, Classify, RetryFuture, RetryLayer, RetryPolicy, RetryService,
    Transient, TransientErrors, DEFAULT_INITIAL_BACKOFF, DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_BACKOFF,
    DEFAULT_MAX_ELAPSED,
};
pub use sequence::{InvalidSequenceNumber, SequenceNumber, MAX_DIGITS};

/// The boxed error type used between services, as in `tower`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
