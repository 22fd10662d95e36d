//! Prints every record of a Kinesis stream, with checkpoints in DynamoDB, until Ctrl-C.
//!
//! ```text
//! cargo run --example consumer_dynamodb --features dynamodb -- STREAM [TABLE]
//! ```
//!
//! The checkpoints go to TABLE (default `kinesis_checkpoints`; created if missing), buffered in
//! memory and written once a second and when the run ends. Run it again: it resumes after the
//! last checkpoint. AWS settings, for Kinesis and DynamoDB alike, come from the environment
//! (`source scripts/env.sh` points both at the local emulators).

#[path = "support/printing.rs"]
mod printing;

use clap::Parser;
use kinesis_tower::store::DynamoDbStore;

/// Prints every record of a Kinesis stream (shard, sequence number, data), with checkpoints in
/// DynamoDB, until Ctrl-C; a second run resumes after them.
#[derive(Parser)]
struct Args {
    /// The stream
    stream: String,

    /// DynamoDB checkpoint table, created if missing
    #[arg(
        env = "KINESIS_CHECKPOINT_TABLE",
        default_value = "kinesis_checkpoints"
    )]
    table: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = aws_config::load_from_env().await;
    let store = DynamoDbStore::from_sdk_config(&config, &args.table)?;
    store.create_table().await?;
    printing::print_records(&args.stream, "consumer-dynamodb", store.buffered()).await
}
