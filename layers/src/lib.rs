//! Records, sequence numbers, checkpoints and `tower` layers for Kinesis consumers.
//!
//! This crate has no AWS SDK dependency: it is the vocabulary shared by the `kinesis-tower`
//! consumer (which re-exports all of it at its root) and by handlers and layers that want to be
//! tested without Kinesis.
//!
//! At the root, the vocabulary: [`Record`], [`Batch`], [`ShardId`], [`SequenceNumber`] (what a
//! handler receives), [`Processed`] (what it may answer), [`Checkpoint`], [`CheckpointStore`],
//! [`Checkpointer`], [`MemoryStore`] (progress and where it is kept), [`BoxError`].
//!
//! One module per layer, each with its `Layer`, its `Service`, its response future and its
//! errors, as in `tower-http`:
//! - [`batch`]: group each shard's records up to max records / max bytes / max wait.
//! - [`checkpoint`]: checkpoint each batch after the inner service succeeded.
//! - [`retry`]: retry failed calls with exponential backoff and jitter.
//! - [`metrics`]: count and time the handler's calls per stream and shard through the
//!   `metrics` facade; [`metric_names`] lists every metric the library emits.
//! - [`kpl`]: replace KPL aggregates by their user records (`DeaggregateLayer`), and build
//!   aggregates (`Aggregator`).
//! - [`per_record`]: run a `Service<Record>` over each batch, in order.
//! - [`keyed`]: handle the records of different partition keys of a batch at the same time,
//!   each key in order, checkpointing only the prefix of the batch that succeeded.
//!
//! [`backoff`] is the one backoff policy of the consumer, its stores and `RetryLayer`.
//!
//! With the `test-util` feature, `testing` builds records, batches and checkpoints to test
//! handlers and layers with, and has a checkpoint store that fails when told to.
//!
//! The recommended order, outermost first: `BatchLayer`, `MetricsLayer`, `CheckpointLayer`,
//! `RetryLayer`, `DeaggregateLayer`, then the handler (the README says why). With
//! `KeyedConcurrencyLayer`: `BatchLayer`, `MetricsLayer`, `CheckpointLayer`, `DeaggregateLayer`,
//! `KeyedConcurrencyLayer`, `RetryLayer`, then the handler.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod backoff;
pub mod batch;
pub mod checkpoint;
pub mod keyed;
pub mod kpl;
pub mod metric_names;
pub mod metrics;
mod partition_key;
pub mod per_record;
mod record;
mod records;
pub mod retry;
mod sequence;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;

pub use checkpoint::{
    Checkpoint, CheckpointStore, Checkpointer, MemoryStore, Processed, StoreError,
};
pub use partition_key::PartitionKey;
pub use record::{Batch, BatchEnd, Record, ShardId, Wake};
pub use records::Records;
pub use sequence::{InvalidSequenceNumber, SequenceNumber};

/// The boxed error type used between services, as in `tower`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
