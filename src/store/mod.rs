//! Checkpoint store back-ends. [`MemoryStore`] is always available; the others sit behind
//! cargo features (`sqlite`).

pub use kinesis_tower_layers::{CheckpointStore, MemoryStore, SetOutcome, StoreError};

#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;
