//! Prints every record of a Kinesis stream, with checkpoints in SQLite, until Ctrl-C.
//!
//! ```text
//! cargo run --example consumer --features sqlite -- --stream NAME [--app NAME]
//!     [--db PATH] [--from trim-horizon|latest] [--max-records-per-call N]
//! ```
//!
//! Each record becomes one line on stdout: shard, sequence number, partition key and data
//! (lossy UTF-8; line breaks and tabs escaped), separated by tabs. Logs go to stderr
//! (`RUST_LOG` is respected; default `kinesis_tower=info`).
//!
//! The handler is plain `tower`: a per-record `service_fn`, adapted to batches by
//! `PerRecordLayer`, under a `CheckpointLayer` that records each batch in a `SqliteStore`
//! once every record of it was printed. Run it again with the same `--db` and `--app`: it
//! resumes after the last checkpoint instead of printing everything again. `--from` only
//! applies to shards without a checkpoint.
//!
//! Ctrl-C stops it gracefully (`run_until`): the batch being printed is finished and
//! checkpointed, then a summary is printed.
//!
//! Region, credentials and endpoint come from the usual AWS environment
//! (`aws_config::load_from_env`); for a local emulator, `source scripts/env.sh` first.

#[path = "support/cli.rs"]
mod cli;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::Parser;
use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::per_record::PerRecordLayer;
use kinesis_tower::store::SqliteStore;
use kinesis_tower::BoxError;
use kinesis_tower::{Record, ShardId};
use tower::{service_fn, ServiceBuilder};
use tracing_subscriber::EnvFilter;

/// Prints every record of a Kinesis stream (shard, sequence number, partition key, data;
/// tab-separated) until Ctrl-C, keeping checkpoints in a SQLite file so that the next run
/// resumes where this one stopped.
///
/// Region, credentials and endpoint come from the AWS environment; for a local emulator run
/// 'source scripts/env.sh' first. Logs go to stderr; RUST_LOG overrides the default
/// 'kinesis_tower=info'.
#[derive(Parser)]
#[command(mut_arg("app", |a| a.default_value("consumer-example")))]
struct Args {
    #[command(flatten)]
    reading: cli::Reading,

    /// SQLite checkpoint file, created if missing
    #[arg(long, value_name = "PATH", default_value = "checkpoints.sqlite")]
    db: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("kinesis_tower=info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = cli::aws_config().await?;
    let store = SqliteStore::open(&args.db).await?;
    let consumer = args.reading.consumer(&config).store(store).build()?;

    // Records printed per shard, shared by every clone of the handler.
    let printed: Arc<Mutex<BTreeMap<ShardId, u64>>> = Arc::default();
    let handler = service_fn({
        let printed = printed.clone();
        move |record: Record| {
            let result = print_record(&record);
            if result.is_ok() {
                *printed
                    .lock()
                    .unwrap()
                    .entry(record.shard_id.clone())
                    .or_default() += 1;
            }
            // An error (stdout closed) fails the batch: it is not checkpointed, and the run
            // stops with the error.
            std::future::ready(result.map_err(BoxError::from))
        }
    });
    let service = ServiceBuilder::new()
        .layer(CheckpointLayer::new(consumer.checkpointer()))
        .layer(PerRecordLayer::new())
        .service(handler);

    eprintln!(
        "reading stream {} (checkpoints: {} in {}; shards without one start at {}); Ctrl-C stops",
        args.reading.stream,
        consumer.namespace(),
        args.db.display(),
        match args.reading.from {
            cli::Start::TrimHorizon => "the oldest record",
            cli::Start::Latest => "the newest record",
        }
    );
    let started = Instant::now();
    let shutdown = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            // Without a signal handler, run until an error instead of stopping at once.
            tracing::warn!(%err, "cannot listen for Ctrl-C; stop the process another way");
            std::future::pending::<()>().await;
        }
    };
    let result = consumer.run_until(service, shutdown).await;

    // The summary, also after an error: it says how far this run got.
    let printed = std::mem::take(&mut *printed.lock().unwrap());
    let total: u64 = printed.values().sum();
    eprintln!(
        "{} after {:.1?}: printed {total} records",
        if result.is_ok() { "stopped" } else { "failed" },
        started.elapsed()
    );
    let checkpointer = consumer.checkpointer();
    for (shard, count) in &printed {
        let checkpoint = match checkpointer.get(shard).await {
            Ok(Some(checkpoint)) => checkpoint.to_string(),
            Ok(None) => "none".to_owned(),
            Err(err) => format!("unreadable ({err})"),
        };
        let plural = if *count == 1 { "" } else { "s" };
        eprintln!("  {shard}: {count} record{plural}, checkpoint {checkpoint}");
    }
    if result.is_ok() && total > 0 {
        eprintln!(
            "the next run with --db {} --app {} resumes after these checkpoints",
            args.db.display(),
            args.reading.app
        );
    }
    Ok(result?)
}

/// One tab-separated line: shard, sequence number, partition key, data.
fn print_record(record: &Record) -> std::io::Result<()> {
    let data = String::from_utf8_lossy(&record.data);
    let mut escaped = String::with_capacity(data.len());
    for c in data.chars() {
        match c {
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            '\\' => escaped.push_str("\\\\"),
            c => escaped.push(c),
        }
    }
    // Stdout is line-buffered: each record is written out as soon as it is printed.
    writeln!(
        std::io::stdout().lock(),
        "{}\t{}\t{}\t{escaped}",
        record.shard_id,
        record.sequence_number,
        record.partition_key
    )
}
