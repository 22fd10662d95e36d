//! The consumer: the handle, its builder, shard assignment, the readers, `run` (dispatch) and
//! `records()` (the merged stream).
//!
//! A record's way: `assignment` says which shards start (discovery, lineage, the filter) →
//! `reader` fetches each shard's batches into its bounded buffer → `dispatch` hands them to
//! the service, one call in flight per shard (`run`), or `stream` merges them (`records()`).

pub mod assignment;
mod builder;
mod dispatch;
mod handle;
mod reader;
mod settings;
mod stream;

pub use builder::ConsumerBuilder;
pub use handle::{shutdown_signal, Consumer};
pub use settings::{EnhancedFanOut, StartPosition};
pub use stream::{RecordStream, ShutdownHandle};

#[cfg(test)]
mod tests;
