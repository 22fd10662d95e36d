//! Prints every record of a Kinesis stream with checkpoints in Redis, until Ctrl-C.
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example consumer_redis --features redis -- STREAM [APP]
//! ```
//!
//! Checkpoints go to the hash `kinesis-checkpoints:<APP>/<STREAM>` (one field per shard),
//! written through after each batch has been printed; a second run with the same app name
//! resumes after them (`redis-cli HGETALL kinesis-checkpoints:<APP>/<STREAM>` shows them).
//! Shards without a checkpoint start at the oldest record.
//!
//! Kinesis region, credentials and endpoint come from the AWS environment; for a local
//! emulator, `source scripts/env.sh` first.

use std::process::ExitCode;

use kinesis_tower::layers::{BoxError, CheckpointLayer, CheckpointStore, PerRecordLayer};
use kinesis_tower::store::RedisStore;
use kinesis_tower::{Consumer, Record, StartPosition};
use tower::{service_fn, ServiceBuilder};

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(stream) = args.next().filter(|a| !a.starts_with('-')) else {
        eprintln!("usage: consumer_redis STREAM [APP]   (REDIS_URL selects the server)");
        return ExitCode::from(2);
    };
    let app = args
        .next()
        .unwrap_or_else(|| "consumer-redis-example".to_owned());
    match run(&stream, &app).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(stream: &str, app: &str) -> Result<(), BoxError> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned());
    let store = RedisStore::connect(&url).await?;
    let config = aws_config::load_from_env().await;
    let consumer = Consumer::builder()
        .sdk_config(&config)
        .stream_name(stream)
        .app_name(app)
        .start_position(StartPosition::TrimHorizon)
        .store(store.clone())
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
        "reading {stream}; checkpoints in the Redis hash {}; Ctrl-C stops",
        store.key(consumer.namespace())
    );
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
