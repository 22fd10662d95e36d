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
//! - [`DeaggregateLayer`]: replace KPL aggregates by their user records ([`kpl`]), with
//!   [`Aggregator`] to build aggregates.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod kpl;
mod per_record;
mod record;
mod sequence;

pub use checkpoint::{
    Checkpoint, CheckpointLayer, CheckpointService, CheckpointStore, Checkpointer, MemoryStore,
    Processed, SetOutcome, StoreError,
};
pub use kpl::{Aggregator, CorruptPolicy, DeaggregateLayer, KplError};
pub use per_record::{PerRecord, PerRecordLayer};
pub use record::{Batch, BatchEnd, Record, ShardId};
pub use sequence::{InvalidSequenceNumber, SequenceNumber, MAX_DIGITS};

/// The boxed error type used between services, as in `tower`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
