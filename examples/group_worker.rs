//! One worker of a consumer group: several of these (processes, hosts) share a stream, each
//! reading the shards whose leases it holds, with checkpoints on the lease rows.
//!
//! ```text
//! cargo run --example group_worker --features dynamodb,postgres -- \
//!     --worker a --leases postgres://postgres@127.0.0.1:5432/test --stream orders
//! cargo run --example group_worker --features dynamodb,postgres -- \
//!     --worker b --leases dynamodb://orders-processor --stream orders
//! ```
//!
//! `--leases` is a PostgreSQL URL (table `kinesis_leases`, group `--group`) or
//! `dynamodb://<table>` (the KCL's lease table layout; endpoint and region from the AWS
//! environment). The table is created if missing. Start a second worker and watch the shards
//! split between them; stop one (Ctrl-C) and the other takes its shards within a listing; kill
//! one and the other takes them once the lease duration has passed.
//!
//! It prints `held <shards>` whenever the set of leases it holds changes, and `record <shard>
//! <sequence number>` for each record handled.

#[path = "support/cli.rs"]
mod cli;

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use kinesis_tower::group::{ConsumerGroup, DynamoDbLeases, LeaseBackend, PostgresLeases};
use kinesis_tower::{service_fn, shutdown_signal, Batch, BoxError};
use tracing_subscriber::EnvFilter;

/// One worker of a consumer group.
#[derive(Parser)]
#[command(mut_arg("app", |a| a.default_value("group-worker")))]
struct Args {
    #[command(flatten)]
    reading: cli::Reading,

    /// This worker's name, unique in the group
    #[arg(long)]
    worker: String,

    /// Lease table: a PostgreSQL URL, or dynamodb://<table>
    #[arg(long, value_name = "URL")]
    leases: String,

    /// Group name in a PostgreSQL lease table (default: <app>:<stream>)
    #[arg(long)]
    group: Option<String>,

    /// Lease duration in milliseconds
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    lease_duration_ms: u64,

    /// How often the lease table is listed, in milliseconds
    #[arg(long, value_name = "MS", default_value_t = 500)]
    poll_interval_ms: u64,
}

async fn backend(
    args: &Args,
    config: &aws_config::SdkConfig,
) -> anyhow::Result<Box<dyn LeaseBackend>> {
    if let Some(table) = args.leases.strip_prefix("dynamodb://") {
        let leases = DynamoDbLeases::new(aws_sdk_dynamodb::Client::new(config), table)?;
        leases.create_table().await?;
        Ok(Box::new(leases))
    } else if args.leases.starts_with("postgres://") || args.leases.starts_with("postgresql://") {
        let group = args
            .group
            .clone()
            .unwrap_or_else(|| format!("{}:{}", args.reading.app, args.reading.stream));
        let leases = PostgresLeases::connect(&args.leases, &group).await?;
        leases.create_table().await?;
        Ok(Box::new(leases))
    } else {
        bail!(
            "--leases {:?}: use a postgres:// URL or dynamodb://<table>",
            args.leases
        )
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Lease events (acquired, handed over, lost, released) are logged at info.
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("kinesis_tower=info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = cli::aws_config().await?;
    let leases = backend(&args, &config)
        .await
        .context("opening the lease table")?;
    let group = ConsumerGroup::builder(leases, &args.worker)
        .lease_duration(Duration::from_millis(args.lease_duration_ms))
        .poll_interval(Duration::from_millis(args.poll_interval_ms))
        .build()?;
    let consumer = args
        .reading
        .consumer(&config)
        .group(group.clone())
        .build()?;

    // Say which shards this worker holds whenever that changes.
    let watch = tokio::spawn(async move {
        let mut last = None;
        loop {
            let held = group.held();
            if last.as_ref() != Some(&held) {
                println!("held {}", held.join(","));
                last = Some(held);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let handler = service_fn(|batch: Batch| async move {
        let mut out = std::io::stdout().lock();
        for record in &batch.records {
            writeln!(out, "record {} {}", batch.shard_id, record.sequence_number)?;
        }
        out.flush()?;
        Ok::<_, BoxError>(())
    });
    let result = consumer.process_until(handler, shutdown_signal()).await;
    watch.abort();
    println!("held ");
    Ok(result?)
}
