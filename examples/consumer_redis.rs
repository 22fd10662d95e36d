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

use clap::Parser;
use kinesis_tower::store::RedisStore;

/// Prints every record of a Kinesis stream (shard, sequence number, data), with checkpoints in
/// Redis, until Ctrl-C; a second run resumes after them.
#[derive(Parser)]
struct Args {
    /// The stream
    stream: String,

    /// Redis URL
    #[arg(
        env = "REDIS_URL",
        hide_env_values = true,
        default_value = "redis://127.0.0.1:6379/"
    )]
    redis_url: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let store = RedisStore::connect(&args.redis_url).await?;
    printing::print_records(&args.stream, "consumer-redis", store).await
}
