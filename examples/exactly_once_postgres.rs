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

use std::process::ExitCode;

use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::store::PostgresStore;
use kinesis_tower::{Batch, BoxError, Processed};
use kinesis_tower::{Consumer, StartPosition};
use tower::{service_fn, ServiceBuilder};

const USAGE: &str = "\
usage: exactly_once_postgres --stream NAME [--app NAME] [--db URL] [--sink TABLE]
                             [--checkpoints TABLE] [--from trim-horizon|latest]
                             [--max-records-per-call N]

Copies every record of the Kinesis stream NAME into the PostgreSQL table TABLE, exactly once:
each batch's rows and its checkpoint commit in one transaction.

  --stream NAME            the stream (required)
  --app NAME               application name (default 'exactly-once-example')
  --db URL                 PostgreSQL URL (default $DATABASE_URL, else
                           postgres://postgres@127.0.0.1:5432/test)
  --sink TABLE             table the records go to, created if missing (default 'kinesis_sink')
  --checkpoints TABLE      checkpoint table, created if missing (default 'kinesis_checkpoints')
  --from POSITION          where shards without a checkpoint start: trim-horizon or latest
                           (the default)
  --max-records-per-call N records per GetRecords call, so per batch (default 10000)";

struct Args {
    stream: String,
    app: String,
    db: String,
    sink: String,
    checkpoints: String,
    from: StartPosition,
    max_records_per_call: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        stream: String::new(),
        app: "exactly-once-example".to_owned(),
        db: std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned()),
        sink: "kinesis_sink".to_owned(),
        checkpoints: "kinesis_checkpoints".to_owned(),
        from: StartPosition::Latest,
        max_records_per_call: 10_000,
    };
    let mut argv = std::env::args().skip(1);
    while let Some(arg) = argv.next() {
        let mut value = |name: &str| argv.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--stream" => args.stream = value("--stream")?,
            "--app" => args.app = value("--app")?,
            "--db" => args.db = value("--db")?,
            "--sink" => args.sink = value("--sink")?,
            "--checkpoints" => args.checkpoints = value("--checkpoints")?,
            "--from" => {
                args.from = match value("--from")?.as_str() {
                    "trim-horizon" => StartPosition::TrimHorizon,
                    "latest" => StartPosition::Latest,
                    other => {
                        return Err(format!("--from: {other:?} is not trim-horizon or latest"))
                    }
                }
            }
            "--max-records-per-call" => {
                let n = value("--max-records-per-call")?;
                args.max_records_per_call = n
                    .parse()
                    .map_err(|_| format!("--max-records-per-call: {n:?} is not a number"))?;
            }
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    if args.stream.is_empty() {
        return Err("--stream NAME is required".to_owned());
    }
    // The sink's name is spliced into SQL: plain identifiers only.
    let plain = |s: &str| {
        s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && s.len() <= 63
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    if !plain(&args.sink) {
        return Err(format!(
            "--sink: {:?} must be 1 to 63 letters, digits and '_', starting with a letter or '_'",
            args.sink
        ));
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("error: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), BoxError> {
    let config = aws_config::load_from_env().await;
    if config.region().is_none() {
        return Err(
            "no AWS region configured: set AWS_REGION (for local emulators: source scripts/env.sh)"
                .into(),
        );
    }
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

    let consumer = Consumer::builder()
        .sdk_config(&config)
        .stream_name(&args.stream)
        .app_name(&args.app)
        .start_position(args.from.clone())
        .max_records_per_call(args.max_records_per_call)
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
        args.stream,
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
