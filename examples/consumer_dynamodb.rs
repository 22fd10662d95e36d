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

use kinesis_tower::store::DynamoDbStore;
use kinesis_tower::BoxError;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let (stream, table) = printing::args(
        "consumer_dynamodb STREAM [TABLE]",
        "KINESIS_CHECKPOINT_TABLE",
        "kinesis_checkpoints",
    )?;
    let config = aws_config::load_from_env().await;
    let store = DynamoDbStore::from_sdk_config(&config, &table)?;
    store.create_table().await?;
    printing::print_records(&stream, "consumer-dynamodb", store.buffered()).await
}
