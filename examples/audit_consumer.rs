//! Consumes a stream with checkpoints in any store and appends one line per handled record to an
//! audit log: what a crash test (or an operator checking "at least once") needs.
//!
//! ```text
//! cargo run --example audit_consumer --all-features -- --stream NAME --store STORE --log PATH
//!     [--app NAME] [--flush-ms N] [--max-records-per-call N] [--from trim-horizon|latest]
//!     [--keyed N] [--handler-ms N]
//! ```
//!
//! STORE is `sqlite:PATH`, `postgres://...`, `mysql://...`, `redis://...` or `dynamodb:TABLE`
//! (the table is created if missing). Postgres, MySQL and DynamoDB are buffered and flush every
//! `--flush-ms` (default 1000); Redis and SQLite write through.
//!
//! Each log line is `shard<TAB>sequence number<TAB>sub-sequence<TAB>unix micros`, written and
//! flushed to the file before the batch's handler returns, so a record whose checkpoint was
//! written is always in the log. Shards without a checkpoint start at TRIM_HORIZON unless
//! `--from latest`. With `--handler-ms N` the handler takes N ms per record, as a database
//! call would; with `--keyed N` it runs under `KeyedConcurrencyLayer` (N calls at once, each
//! partition key in order). SIGTERM or Ctrl-C stop it gracefully; SIGKILL is what the crash tests use.

#[path = "support/cli.rs"]
mod cli;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use clap::Parser;
use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::keyed::KeyedConcurrencyLayer;
use kinesis_tower::{Batch, BoxError, CheckpointStore, Processed};
use tower::{service_fn, ServiceBuilder};

/// Consumes a Kinesis stream with checkpoints in any store and appends one line per handled
/// record to an audit log (shard, sequence number, sub-sequence, unix micros; tab-separated).
#[derive(Parser)]
#[command(mut_arg("app", |a| a.default_value("audit-consumer")))]
#[command(mut_arg("from", |a| a.default_value("trim-horizon")))]
struct Args {
    #[command(flatten)]
    reading: cli::Reading,

    /// The checkpoint store: sqlite:PATH | postgres://... | mysql://... | redis://... |
    /// dynamodb:TABLE
    #[arg(long, value_name = "STORE")]
    store: String,

    /// The audit log, appended to
    #[arg(long, value_name = "PATH")]
    log: PathBuf,

    /// Flush interval of the buffered stores (Postgres, MySQL, DynamoDB), in milliseconds
    #[arg(long = "flush-ms", value_name = "N", default_value = "1000", value_parser = millis)]
    flush: Duration,

    /// Handle the records of different partition keys at once, at most N calls at a time
    /// (KeyedConcurrencyLayer); 0: one batch after the other, as read
    #[arg(long, value_name = "N", default_value_t = 0)]
    keyed: usize,

    /// Time the handler takes per record, after logging it, in milliseconds
    #[arg(long = "handler-ms", value_name = "N", default_value = "0", value_parser = millis)]
    handler: Duration,
}

fn millis(text: &str) -> Result<Duration, std::num::ParseIntError> {
    text.parse().map(Duration::from_millis)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "kinesis_tower=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = cli::aws_config().await?;
    let store = open_store(&args.store, args.flush, &config).await?;
    let consumer = args.reading.consumer(&config).store_arc(store).build()?;
    let log: Arc<Mutex<File>> = Arc::new(Mutex::new(
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&args.log)?,
    ));
    let work = args.handler;
    let handler = service_fn(move |batch: Batch| {
        let log = log.clone();
        async move {
            if batch.records.is_empty() {
                return Ok::<_, BoxError>(Processed::Checkpoint);
            }
            let micros = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros();
            let mut lines = String::with_capacity(batch.records.len() * 96);
            for record in &batch.records {
                let sub = record
                    .sub_sequence_number
                    .map_or(String::from("-"), |s| s.to_string());
                lines.push_str(&format!(
                    "{}\t{}\t{sub}\t{micros}\n",
                    record.shard_id, record.sequence_number
                ));
            }
            // One write per batch (O_APPEND), so a kill never leaves half a line, then flushed
            // to the OS before the checkpoint can be written.
            {
                let mut file = log.lock().map_err(|_| "audit log lock poisoned")?;
                file.write_all(lines.as_bytes())?;
                file.flush()?;
            }
            if !work.is_zero() {
                let records = u32::try_from(batch.records.len()).unwrap_or(u32::MAX);
                tokio::time::sleep(work.saturating_mul(records)).await;
            }
            Ok(Processed::Checkpoint)
        }
    });
    let keyed = (args.keyed > 0).then(|| KeyedConcurrencyLayer::new().max_in_flight(args.keyed));
    let service = ServiceBuilder::new()
        .layer(CheckpointLayer::new(consumer.checkpointer()))
        .option_layer(keyed)
        .service(handler);
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    consumer.run_until(service, shutdown).await?;
    Ok(())
}

/// Opens the store named on the command line.
async fn open_store(
    spec: &str,
    flush: Duration,
    config: &aws_config::SdkConfig,
) -> anyhow::Result<Arc<dyn CheckpointStore>> {
    // Only the buffered stores, which this build may lack, use them.
    let _ = (flush, config);
    if let Some(path) = spec.strip_prefix("sqlite:") {
        return Ok(Arc::new(
            kinesis_tower::store::SqliteStore::open(path).await?,
        ));
    }
    #[cfg(feature = "postgres")]
    if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
        let store = kinesis_tower::store::PostgresStore::connect(spec).await?;
        return Ok(Arc::new(store.buffered().flush_interval(flush)));
    }
    #[cfg(feature = "mysql")]
    if spec.starts_with("mysql://") {
        let store = kinesis_tower::store::MySqlStore::connect(spec).await?;
        return Ok(Arc::new(store.buffered().flush_interval(flush)));
    }
    #[cfg(feature = "redis")]
    if spec.starts_with("redis://") || spec.starts_with("rediss://") {
        return Ok(Arc::new(
            kinesis_tower::store::RedisStore::connect(spec).await?,
        ));
    }
    #[cfg(feature = "dynamodb")]
    if let Some(table) = spec.strip_prefix("dynamodb:") {
        let store = kinesis_tower::store::DynamoDbStore::from_sdk_config(config, table)?;
        store.create_table().await?;
        return Ok(Arc::new(store.buffered().flush_interval(flush)));
    }
    bail!("--store {spec:?}: not a store this build supports (sqlite:PATH)")
}
