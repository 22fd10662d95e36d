//! Consume AWS Kinesis Data Streams the `tower` way.
//!
//! A [`Consumer`] reads every shard of a stream (polling GetRecords, one task per shard, each
//! with a bounded buffer), follows resharding (parents before children), and either
//! - merges all shards into one `Stream` of records: [`Consumer::records`], or
//! - drives a `tower::Service<Batch>` with each shard's batches, in order:
//!   [`Consumer::run`] / [`Consumer::run_until`].
//!
//! Which shards a consumer reads is decided by a stream of [`assignment`] events (a shard may
//! start, ended, is taken away) passed through an [`assignment::AssignmentFilter`]: every
//! shard by default, chosen shards with [`ConsumerBuilder::shards`], or a filter of your own.
//!
//! Processing is composed from `tower` layers: [`checkpoint::CheckpointLayer`] records progress in
//! a [`CheckpointStore`] after the handler succeeded, [`per_record::PerRecordLayer`] runs a
//! per-record handler, [`metrics::MetricsLayer`] counts and times the handler's calls (the
//! readers and checkpoints report their own metrics; [`metric_names`] lists them all), and
//! tower's own `ConcurrencyLimit`, `RateLimit`, `Timeout`, `Buffer`
//! stack with them.
//!
//! ```no_run
//! use kinesis_tower::{Consumer, StartPosition};
//! use kinesis_tower::{Batch, BoxError};
//! use kinesis_tower::checkpoint::CheckpointLayer;
//! use tower::{service_fn, ServiceBuilder};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let config = aws_config::load_from_env().await;
//! let consumer = Consumer::builder()
//!     .sdk_config(&config)
//!     .stream_name("orders")
//!     .app_name("billing")
//!     .start_position(StartPosition::TrimHorizon)
//!     .build()?;
//! let handler = service_fn(|batch: Batch| async move {
//!     for record in &batch.records {
//!         println!("{} {}", record.sequence_number, String::from_utf8_lossy(&record.data));
//!     }
//!     Ok::<_, BoxError>(())
//! });
//! let service = ServiceBuilder::new()
//!     .layer(CheckpointLayer::new(consumer.checkpointer()))
//!     .service(handler);
//! consumer.run_until(service, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod consumer;
mod error;
pub mod kinesis;
mod retrying;
pub mod store;

pub use consumer::assignment;
pub use consumer::{Consumer, ConsumerBuilder, RecordStream, StartPosition};
pub use error::Error;

// The vocabulary: what a handler receives and answers, and where progress is kept.
pub use kinesis_tower_layers::{
    Batch, BatchEnd, BoxError, Checkpoint, CheckpointStore, Checkpointer, InvalidSequenceNumber,
    Processed, Record, SequenceNumber, ShardId, StoreError, Wake,
};
// One module per layer (its Layer, Service, future and errors), as in tower-http.
pub use kinesis_tower_layers::{
    backoff, batch, checkpoint, kpl, metric_names, metrics, per_record, retry,
};

// The README's examples use every store.
#[cfg(all(
    doctest,
    feature = "sqlite",
    feature = "redis",
    feature = "postgres",
    feature = "mysql",
    feature = "dynamodb"
))]
#[doc = include_str!("../README.md")]
mod readme {}
