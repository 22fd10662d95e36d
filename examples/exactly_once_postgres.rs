//! Copies every record of a Kinesis stream into a PostgreSQL table exactly once: each batch's
//! rows and its checkpoint commit in one transaction.
//!
//! ```text
//! cargo run --example exactly_once_postgres --features postgres -- --stream NAME
//!     [--app NAME] [--db URL] [--sink TABLE] [--checkpoints TABLE]
//!     [--from trim-horizon|latest] [--max-records-per-call N]
//! ```
//!
//! For each batch the handler opens a transaction, inserts one sink row per record, moves the
//! shard's checkpoint with [`PostgresStore::set_in`] (the store's monotonic upsert, on the
//! transaction's connection) and commits; then it answers `Processed::SkipCheckpoint`, so the
//! `CheckpointLayer` does not write the checkpoint again. The process may be killed at any
//! moment: either both the rows and the checkpoint are committed, or neither is, and the next
//! run resumes from the checkpoint. The sink table has no unique key on the record on purpose:
//! nothing is deduplicated after the fact, there is nothing to deduplicate.
//!
//! The sink table (created if missing):
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS "kinesis_sink" (
//!     id                  BIGSERIAL PRIMARY KEY,
//!     shard_id            TEXT NOT NULL,
//!     sequence_number     NUMERIC(128, 0) NOT NULL,
//!     sub_sequence_number NUMERIC(20, 0),
//!     partition_key       TEXT NOT NULL,
//!     data                BYTEA NOT NULL
//! )
//! ```
//!
//! Region, credentials and endpoint come from the usual AWS environment
//! (`aws_config::load_from_env`); for a local emulator, `source scripts/env.sh` first. The
//! database URL defaults to `DATABASE_URL`, else `postgres://postgres@127.0.0.1:5432/test`.
//! Ctrl-C stops it gracefully.

#[path = "support/cli.rs"]
mod cli;

use clap::Parser;
use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::store::PostgresStore;
use kinesis_tower::{Batch, BoxError, Processed};
use tower::{service_fn, ServiceBuilder};

/// Copies every record of a Kinesis stream into a PostgreSQL table, exactly once: each batch's
/// rows and its checkpoint commit in one transaction.
///
/// Region, credentials and endpoint come from the AWS environment; for a local emulator run
/// 'source scripts/env.sh' first.
#[derive(Parser)]
#[command(mut_arg("app", |a| a.default_value("exactly-once-example")))]
struct Args {
    #[command(flatten)]
    reading: cli::Reading,

    /// PostgreSQL URL
    #[arg(
        long,
        value_name = "URL",
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    db: String,

    /// Table the records go to, created if missing
    #[arg(long, value_name = "TABLE", default_value = "kinesis_sink", value_parser = plain_identifier)]
    sink: String,

    /// Checkpoint table, created if missing
    #[arg(long, value_name = "TABLE", default_value = "kinesis_checkpoints")]
    checkpoints: String,
}

/// The sink's name is spliced into SQL: plain identifiers only.
fn plain_identifier(s: &str) -> Result<String, String> {
    let plain = s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if plain {
        Ok(s.to_owned())
    } else {
        Err("1 to 63 letters, digits and '_', starting with a letter or '_'".to_owned())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = cli::aws_config().await?;
    // Write-through: the handler's transactions are the checkpoint writes, nothing is buffered.
    let store = PostgresStore::connect_with_table(&args.db, &args.checkpoints).await?;
    let sink = format!("\"{}\"", args.sink);
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {sink} (
            id                  BIGSERIAL PRIMARY KEY,
            shard_id            TEXT NOT NULL,
            sequence_number     NUMERIC(128, 0) NOT NULL,
            sub_sequence_number NUMERIC(20, 0),
            partition_key       TEXT NOT NULL,
            data                BYTEA NOT NULL
        )"
    ))
    .execute(store.pool())
    .await?;

    let consumer = args
        .reading
        .consumer(&config)
        .store(store.clone())
        .build()?;
    let namespace: std::sync::Arc<str> = consumer.namespace().into();
    let insert: std::sync::Arc<str> = format!(
        "INSERT INTO {sink} (shard_id, sequence_number, sub_sequence_number, partition_key, data)
         VALUES ($1, $2::numeric, $3::numeric, $4, $5)"
    )
    .into();

    let handler = service_fn(move |batch: Batch| {
        let (store, namespace, insert) = (store.clone(), namespace.clone(), insert.clone());
        async move {
            // A heartbeat or an empty last batch: nothing to write (the consumer records a
            // closed shard's end once the checkpoint covers its last record).
            let Some(checkpoint) = batch.checkpoint().filter(|_| !batch.is_empty()) else {
                return Ok::<_, BoxError>(Processed::SkipCheckpoint);
            };
            let mut tx = store.pool().begin().await?;
            for record in &batch.records {
                sqlx::query(&insert)
                    .bind(&*record.shard_id)
                    .bind(record.sequence_number.to_string())
                    .bind(record.sub_sequence_number.map(|s| s.to_string()))
                    .bind(&*record.partition_key)
                    .bind(&record.data[..])
                    .execute(&mut *tx)
                    .await?;
            }
            store
                .set_in(&mut tx, &namespace, &batch.shard_id, checkpoint)
                .await?;
            tx.commit().await?;
            // Already checkpointed, in the transaction.
            Ok(Processed::SkipCheckpoint)
        }
    });
    let service = ServiceBuilder::new()
        .layer(CheckpointLayer::new(consumer.checkpointer()))
        .service(handler);

    eprintln!(
        "copying stream {} into {} (checkpoints: {} in {}); Ctrl-C stops",
        args.reading.stream,
        args.sink,
        consumer.namespace(),
        args.checkpoints
    );
    let shutdown = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    consumer.run_until(service, shutdown).await?;
    eprintln!("stopped");
    Ok(())
}
