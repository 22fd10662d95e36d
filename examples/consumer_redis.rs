//! Prints every record of a Kinesis stream, with checkpoints in Redis, until Ctrl-C.
//!
//! ```text
//! cargo run --example consumer_redis --features redis -- STREAM [REDIS_URL]
//! ```
//!
//! Checkpoints go to the hash `kinesis-checkpoints:consumer-redis/<STREAM>` (one field per
//! shard), written through after each batch has been printed; a second run resumes after them
//! (`redis-cli HGETALL kinesis-checkpoints:consumer-redis/<STREAM>` shows them). The URL
//! defaults to `REDIS_URL`, else the local server; AWS settings come from the environment
//! (`source scripts/env.sh` for the local emulator).

#[path = "support/printing.rs"]
mod printing;

use kinesis_tower::store::RedisStore;
use kinesis_tower::BoxError;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let (stream, url) = printing::args(
        "consumer_redis STREAM [REDIS_URL]",
        "REDIS_URL",
        "redis://127.0.0.1:6379/",
    )?;
    let store = RedisStore::connect(&url).await?;
    printing::print_records(&stream, "consumer-redis", store).await
}
