//! Checkpoint store back-ends. [`MemoryStore`] is always available; the others sit behind
//! cargo features (`sqlite`, `redis`, `postgres`, `mysql`, `dynamodb`). [`BufferedStore`]
//! wraps any store to write on an interval instead of on every checkpoint.

pub use kinesis_tower_layers::checkpoint::SetOutcome;
pub use kinesis_tower_layers::{CheckpointStore, MemoryStore, StoreError};

mod buffered;
#[cfg_attr(
    not(any(
        feature = "sqlite",
        feature = "redis",
        feature = "postgres",
        feature = "mysql",
        feature = "dynamodb"
    )),
    allow(dead_code)
)]
mod retry;

pub use buffered::{BufferedStore, DEFAULT_FLUSH_INTERVAL};

#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;

#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
pub use self::redis::RedisStore;

/// The table every SQL store (SQLite, PostgreSQL, MySQL) and the DynamoDB store use unless
/// another is given.
pub const DEFAULT_TABLE: &str = "kinesis_checkpoints";

#[cfg(feature = "dynamodb")]
pub(crate) mod dynamodb;
#[cfg(feature = "dynamodb")]
pub use dynamodb::DynamoDbStore;

#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) mod sql;

#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;

#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "mysql")]
pub use mysql::MySqlStore;
