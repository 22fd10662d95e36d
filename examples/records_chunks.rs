//! `records()` as a stream pipeline: every shard's records merged, cut into chunks of at most
//! 500 records or 2 seconds, each chunk committed once handled; Ctrl-C or SIGTERM ends the
//! stream, and the shutdown handle flushes the checkpoints and says how the consumer ended.
//!
//! ```sh
//! AWS_ENDPOINT_URL=http://127.0.0.1:4567 AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=x \
//!   AWS_SECRET_ACCESS_KEY=x cargo run --example records_chunks --features sqlite -- --stream orders
//! ```
use std::time::Duration;

use clap::Parser;
use kinesis_tower::{shutdown_signal, store::SqliteStore, BoxError, Consumer};
use tokio_stream::StreamExt;

/// Consume a stream in chunks, checkpointing each chunk in a SQLite file.
#[derive(Parser)]
struct Args {
    /// The stream to read.
    #[arg(long, default_value = "orders")]
    stream: String,
    /// The SQLite file that keeps the checkpoints.
    #[arg(long, default_value = "checkpoints.sqlite")]
    store: String,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let consumer = Consumer::builder()
        .stream_name(args.stream)
        .store(SqliteStore::open(&args.store).await?)
        .build()?;
    let records = consumer.records_until(shutdown_signal());
    let (checkpointer, stop) = (records.checkpointer(), records.shutdown_handle());
    let mut chunks = std::pin::pin!(records.chunks_timeout(500, Duration::from_secs(2)));
    while let Some(chunk) = chunks.next().await {
        println!("{} records", chunk.len());
        checkpointer.commit_all(&chunk).await?;
    }
    // Flushes the checkpoints; the error that ended the stream, if one did.
    Ok(stop.shutdown().await?)
}
