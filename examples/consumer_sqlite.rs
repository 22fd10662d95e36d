//! The README's quick start, as it is there: consume the stream `orders` with the AWS
//! configuration from the environment, print each batch, checkpoint it in `checkpoints.sqlite`
//! once handled, and stop cleanly on Ctrl-C or SIGTERM. A restart resumes after the last
//! checkpoint. Against the local emulator:
//!
//! ```sh
//! AWS_ENDPOINT_URL=http://127.0.0.1:4567 AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=x \
//!   AWS_SECRET_ACCESS_KEY=x cargo run --example consumer_sqlite --features sqlite
//! ```
use kinesis_tower::{service_fn, store::SqliteStore, Batch, BoxError, Consumer};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let consumer = Consumer::builder()
        .stream_name("orders")
        .store(SqliteStore::open("checkpoints.sqlite").await?)
        .build()?;
    let handler = service_fn(|batch: Batch| async move {
        println!("{} records from {}", batch.records.len(), batch.shard_id);
        Ok::<_, BoxError>(())
    });
    // Checkpoints each batch once the handler succeeded; stops cleanly on Ctrl-C or SIGTERM.
    Ok(consumer.process(handler).await?)
}
