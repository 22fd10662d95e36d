//! Checkpoint store back-ends. [`MemoryStore`] is always available; the others sit behind
//! cargo features (`sqlite`).

pub use kinesis_tower_layers::{CheckpointStore, MemoryStore, SetOutcome, StoreError};

#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;

#[cfg(any(feature = "postgres", feature = "mysql"))]
mod retry;
#[cfg(any(feature = "postgres", feature = "mysql"))]
mod sql;
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub use sql::DEFAULT_TABLE;

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;

#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "mysql")]
pub use mysql::MySqlStore;
