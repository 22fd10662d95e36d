//! Prints every record of a Kinesis stream with checkpoints in DynamoDB, until Ctrl-C.
//!
//! ```text
//! cargo run --example consumer_dynamodb --features dynamodb -- STREAM [APP] [TABLE]
//! ```
//!
//! The checkpoint table (default `kinesis_checkpoints`) is created if missing (on-demand
//! billing). Checkpoints are buffered: kept in memory per shard and written once a second and
//! when the run stops, so a crash re-delivers at most about a second of records. A second run
//! with the same app name resumes after them. Shards without a checkpoint start at the oldest
//! record.
//!
//! Region, credentials and endpoints (Kinesis and DynamoDB) come from the AWS environment; for
//! local emulators, `source scripts/env.sh` first (it sets `AWS_ENDPOINT_URL_DYNAMODB`).

use std::process::ExitCode;

use kinesis_tower::layers::{BoxError, CheckpointLayer, CheckpointStore, PerRecordLayer};
use kinesis_tower::store::DynamoDbStore;
use kinesis_tower::{Consumer, Record, StartPosition};
use tower::{service_fn, ServiceBuilder};

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(stream) = args.next().filter(|a| !a.starts_with('-')) else {
        eprintln!("usage: consumer_dynamodb STREAM [APP] [TABLE]");
        return ExitCode::from(2);
    };
    let app = args
        .next()
        .unwrap_or_else(|| "consumer-dynamodb-example".to_owned());
    let table = args
        .next()
        .unwrap_or_else(|| DynamoDbStore::DEFAULT_TABLE.to_owned());
    match run(&stream, &app, &table).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(stream: &str, app: &str, table: &str) -> Result<(), BoxError> {
    let config = aws_config::load_from_env().await;
    let store = DynamoDbStore::from_sdk_config(&config, table)?;
    store.create_table().await?;
    let consumer = Consumer::builder()
        .sdk_config(&config)
        .stream_name(stream)
        .app_name(app)
        .start_position(StartPosition::TrimHorizon)
        .store(store.clone().buffered())
        .build()?;

    let print = service_fn(|record: Record| async move {
        println!(
            "{}\t{}\t{}",
            record.shard_id,
            record.sequence_number,
            String::from_utf8_lossy(&record.data)
        );
        Ok::<_, BoxError>(())
    });
    let service = ServiceBuilder::new()
        .layer(CheckpointLayer::new(consumer.checkpointer()))
        .layer(PerRecordLayer::new())
        .service(print);

    eprintln!(
        "reading {stream}; checkpoints in DynamoDB table {table}, namespace {}; Ctrl-C stops",
        consumer.namespace()
    );
    // `run_until` flushes the buffered checkpoints before it returns.
    let result = consumer
        .run_until(service, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    for (shard, checkpoint) in store.list(consumer.namespace()).await? {
        eprintln!("  {shard}: checkpoint {checkpoint}");
    }
    result.map_err(Into::into)
}
