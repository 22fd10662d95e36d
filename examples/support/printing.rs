//! What the `consumer_<store>` examples share: run a consumer that
//! prints every record, checkpointing each batch in the given store, until Ctrl-C.

use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::per_record::PerRecordLayer;
use kinesis_tower::{BoxError, CheckpointStore};
use kinesis_tower::{Consumer, Record, StartPosition};
use tower::{service_fn, ServiceBuilder};

/// Prints `stream`'s records (shard, sequence number, data) from the oldest one not yet
/// checkpointed under `app`, until Ctrl-C; then drains, flushes the store and returns.
pub async fn print_records(
    stream: &str,
    app: &str,
    store: impl CheckpointStore,
) -> anyhow::Result<()> {
    let config = aws_config::load_from_env().await;
    let consumer = Consumer::builder()
        .sdk_config(&config)
        .stream_name(stream)
        .app_name(app)
        .start_position(StartPosition::TrimHorizon)
        .store(store)
        .build()?;
    let handler = service_fn(|record: Record| async move {
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
        .service(handler);
    eprintln!("reading {stream} as {app}; Ctrl-C stops");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    consumer.run_until(service, shutdown).await?;
    Ok(())
}
