//! Consume AWS Kinesis Data Streams the `tower` way.
//!
//! A [`Consumer`] reads every shard of a stream (polling GetRecords, one task per shard, each
//! with a bounded buffer), follows resharding (parents before children), and either
//! - merges all shards into one `Stream` of records: [`Consumer::records`], or
//! - drives a `tower::Service<Batch>` with each shard's batches, in order:
//!   [`Consumer::process`] (with checkpoints after success, until Ctrl-C or SIGTERM) or
//!   [`Consumer::run`] / [`Consumer::run_until`] (the stack is yours).
//!
//! Which shards a consumer reads is decided by a stream of [`assignment`] events (a shard may
//! start, ended, is taken away) passed through an [`assignment::AssignmentFilter`]: every
//! shard by default, chosen shards with [`ConsumerBuilder::shards`], or a filter of your own.
//!
//! Processing is composed from `tower` layers: [`checkpoint::CheckpointLayer`] records progress in
//! a [`CheckpointStore`] after the handler succeeded, [`per_record::PerRecordLayer`] runs a
//! per-record handler, [`keyed::KeyedConcurrencyLayer`] handles a shard's partition keys at
//! the same time (each key in order), [`metrics::MetricsLayer`] counts and times the handler's
//! calls (the readers and checkpoints report their own metrics; [`metric_names`] lists them
//! all), and tower's own `ConcurrencyLimit`, `RateLimit`, `Timeout`, `Buffer` stack with them.
//!
//! With the `lambda` feature, the same stack runs inside AWS Lambda, behind a Kinesis event
//! source mapping: the `lambda` module (`lambda::LambdaLayer` where the consumer has
//! `CheckpointLayer`; partial batch responses instead of checkpoints).
//!
//! ```no_run
//! use kinesis_tower::{service_fn, store::MemoryStore, Batch, BoxError, Consumer};
//!
//! # async fn example() -> Result<(), BoxError> {
//! let consumer = Consumer::builder()
//!     .stream_name("orders")
//!     .store(MemoryStore::new())
//!     .build()?;
//! let handler = service_fn(|batch: Batch| async move {
//!     println!("{} records from {}", batch.records.len(), batch.shard_id);
//!     Ok::<_, BoxError>(())
//! });
//! // Checkpoints each batch once the handler succeeded; stops cleanly on Ctrl-C or SIGTERM.
//! consumer.process(handler).await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod consumer;
mod error;
pub mod group;
pub mod kinesis;
#[cfg(feature = "lambda")]
pub mod lambda;
mod retrying;
pub mod store;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;

pub use consumer::assignment;
pub use consumer::{
    shutdown_signal, Consumer, ConsumerBuilder, EnhancedFanOut, RecordStream, ShutdownHandle,
    StartPosition,
};
pub use error::Error;

// The vocabulary: what a handler receives and answers, and where progress is kept.
pub use kinesis_tower_layers::{
    Batch, BatchEnd, BoxError, Checkpoint, CheckpointStore, Checkpointer, InvalidSequenceNumber,
    PartitionKey, Processed, Record, SequenceNumber, ShardId, StoreError, Wake,
};
/// `tower::service_fn`: a handler from an async closure, without another import.
pub use tower::service_fn;

// One module per layer (its Layer, Service, future and errors), as in tower-http.
pub use kinesis_tower_layers::{
    backoff, batch, checkpoint, keyed, kpl, metric_names, metrics, per_record, retry,
};

// The README's examples use every store.
#[cfg(all(
    doctest,
    feature = "sqlite",
    feature = "redis",
    feature = "postgres",
    feature = "mysql",
    feature = "dynamodb",
    feature = "lambda"
))]
#[doc = include_str!("../README.md")]
mod readme {}
