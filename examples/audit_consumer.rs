//! Consumes a stream with checkpoints in any store and appends one line per handled record to an
//! audit log: what a crash test (or an operator checking "at least once") needs.
//!
//! ```text
//! cargo run --example audit_consumer --all-features -- --stream NAME --store STORE --log PATH
//!     [--app NAME] [--flush-ms N] [--max-records-per-call N]
//! ```
//!
//! STORE is `sqlite:PATH`, `postgres://...`, `mysql://...`, `redis://...` or `dynamodb:TABLE`
//! (the table is created if missing). Postgres, MySQL and DynamoDB are buffered and flush every
//! `--flush-ms` (default 1000); Redis and SQLite write through.
//!
//! Each log line is `shard<TAB>sequence number<TAB>sub-sequence<TAB>unix micros`, written and
//! flushed to the file before the batch's handler returns, so a record whose checkpoint was
//! written is always in the log. Shards without a checkpoint start at TRIM_HORIZON. SIGTERM or
//! Ctrl-C stop it gracefully; SIGKILL is what the crash tests use.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::{Batch, BoxError, CheckpointStore};
use kinesis_tower::{Consumer, StartPosition};
use tower::{service_fn, ServiceBuilder};

const USAGE: &str = "\
usage: audit_consumer --stream NAME --store STORE --log PATH [--app NAME] [--flush-ms N]
                      [--max-records-per-call N]

STORE: sqlite:PATH | postgres://... | mysql://... | redis://... | dynamodb:TABLE";

struct Args {
    stream: String,
    store: String,
    log: PathBuf,
    app: String,
    flush: Duration,
    max_records_per_call: usize,
}

fn parse_args() -> Result<Args, String> {
    let (mut stream, mut store, mut log) = (None, None, None);
    let mut app = "audit-consumer".to_owned();
    let mut flush = Duration::from_secs(1);
    let mut max_records_per_call = 10_000;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        let number = |name: &str, v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{name}: {v:?} is not a number"))
        };
        match arg.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--stream" => stream = Some(value("--stream")?),
            "--store" => store = Some(value("--store")?),
            "--log" => log = Some(PathBuf::from(value("--log")?)),
            "--app" => app = value("--app")?,
            "--flush-ms" => {
                flush = Duration::from_millis(number("--flush-ms", value("--flush-ms")?)?)
            }
            "--max-records-per-call" => {
                max_records_per_call =
                    number("--max-records-per-call", value("--max-records-per-call")?)? as usize
            }
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    Ok(Args {
        stream: stream.ok_or("--stream NAME is required")?,
        store: store.ok_or("--store STORE is required")?,
        log: log.ok_or("--log PATH is required")?,
        app,
        flush,
        max_records_per_call,
    })
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "kinesis_tower=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let mut message = err.to_string();
            let mut source = err.source();
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Opens the store named on the command line.
async fn open_store(spec: &str, flush: Duration) -> Result<Arc<dyn CheckpointStore>, BoxError> {
    let _ = flush;
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
        let config = aws_config::load_from_env().await;
        let store = kinesis_tower::store::DynamoDbStore::from_sdk_config(&config, table)?;
        store.create_table().await?;
        return Ok(Arc::new(store.buffered().flush_interval(flush)));
    }
    Err(format!("--store {spec:?}: not a store this build supports (sqlite:PATH)").into())
}

async fn run(args: Args) -> Result<(), BoxError> {
    let config = aws_config::load_from_env().await;
    let store = open_store(&args.store, args.flush).await?;
    let consumer = Consumer::builder()
        .sdk_config(&config)
        .stream_name(&args.stream)
        .app_name(&args.app)
        .start_position(StartPosition::TrimHorizon)
        .max_records_per_call(args.max_records_per_call)
        .store_arc(store)
        .build()?;
    let log: Arc<Mutex<File>> = Arc::new(Mutex::new(
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&args.log)?,
    ));
    let handler = service_fn(move |batch: Batch| {
        let log = log.clone();
        async move {
            if batch.records.is_empty() {
                return Ok::<_, BoxError>(());
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
            let mut file = log.lock().map_err(|_| "audit log lock poisoned")?;
            file.write_all(lines.as_bytes())?;
            file.flush()?;
            Ok(())
        }
    });
    let service = ServiceBuilder::new()
        .layer(CheckpointLayer::new(consumer.checkpointer()))
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
