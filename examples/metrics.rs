//! Consumes a Kinesis stream with a `MetricsLayer` in the stack and serves every metric of the
//! library in the Prometheus text format on `http://127.0.0.1:PORT/metrics`, until Ctrl-C.
//!
//! ```text
//! cargo run --example metrics -- --stream NAME [--port 9898] [--app NAME]
//!     [--from trim-horizon|latest] [--max-records-per-call N]
//! curl -s http://127.0.0.1:9898/metrics | grep '^kinesis_'
//! ```
//!
//! The stack is `MetricsLayer` → `CheckpointLayer` → a handler that counts records and bytes;
//! checkpoints are kept in memory (see the `consumer` example for a SQLite store). Besides the
//! handler's metrics (`kinesis_handler_*`), the readers report records and bytes read,
//! GetRecords calls and latency, throttles, iterator refreshes and how far each shard is
//! behind, and the checkpointer reports its writes: see `kinesis_tower::metric_names`.
//! Every series has the labels `stream` and `shard`.
//!
//! The listener binds 127.0.0.1 only. Region, credentials and endpoint come from the usual
//! AWS environment (`aws_config::load_from_env`); for a local emulator, `source
//! scripts/env.sh` first.

#[path = "support/cli.rs"]
mod cli;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::metric_names;
use kinesis_tower::metrics::MetricsLayer;
use kinesis_tower::{Batch, BoxError};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tower::{service_fn, ServiceBuilder};

/// Histogram buckets of the `*_seconds` metrics: 1 ms to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Consumes a Kinesis stream and serves the consumer's metrics for Prometheus on
/// http://127.0.0.1:PORT/metrics until Ctrl-C. Checkpoints are kept in memory.
///
/// Region, credentials and endpoint come from the AWS environment; for a local emulator run
/// 'source scripts/env.sh' first.
#[derive(Parser)]
#[command(mut_arg("app", |a| a.default_value("metrics-example")))]
struct Args {
    #[command(flatten)]
    reading: cli::Reading,

    /// The port of the metrics listener on 127.0.0.1
    #[arg(long, value_name = "PORT", default_value_t = 9898)]
    port: u16,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The recorder first: metric handles are registered with the recorder installed when a
    // shard is first seen.
    PrometheusBuilder::new()
        .with_http_listener(([127, 0, 0, 1], args.port))
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .install()
        .with_context(|| format!("cannot serve metrics on 127.0.0.1:{}", args.port))?;
    metric_names::describe();

    let config = cli::aws_config().await?;
    let consumer = args.reading.consumer(&config).build()?;

    let handled = Arc::new(AtomicU64::new(0));
    let handler = service_fn({
        let handled = handled.clone();
        move |batch: Batch| {
            handled.fetch_add(batch.len() as u64, Ordering::Relaxed);
            async { Ok::<_, BoxError>(()) }
        }
    });
    let service = ServiceBuilder::new()
        .layer(MetricsLayer::new(consumer.stream_name()))
        .layer(CheckpointLayer::new(consumer.checkpointer()))
        .service(handler);

    eprintln!(
        "reading stream {}; metrics on http://127.0.0.1:{}/metrics; Ctrl-C stops",
        args.reading.stream, args.port
    );
    let shutdown = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let result = consumer.run_until(service, shutdown).await;
    eprintln!("handled {} records", handled.load(Ordering::Relaxed));
    Ok(result?)
}
