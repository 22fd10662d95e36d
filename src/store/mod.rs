//! Checkpoint store back-ends. [`MemoryStore`] is always available; the others sit behind
//! cargo features (`sqlite`, `redis`, `dynamodb`).

pub use kinesis_tower_layers::{CheckpointStore, MemoryStore, SetOutcome, StoreError};

#[cfg(any(feature = "redis", feature = "dynamodb"))]
mod retry;

#[cfg(feature = "dynamodb")]
mod dynamodb;
#[cfg(feature = "dynamodb")]
pub use dynamodb::DynamoDbStore;

#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
pub use self::redis::RedisStore;

#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;
