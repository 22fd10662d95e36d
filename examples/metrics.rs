//! Consumes a Kinesis stream with a `MetricsLayer` in the stack and serves every metric of the
//! library in the Prometheus text format on `http://127.0.0.1:PORT/metrics`, until Ctrl-C.
//!
//! ```text
//! cargo run --example metrics -- --stream NAME [--port 9898] [--app NAME]
//!                                [--from trim-horizon|latest]
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

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::metrics::MetricsLayer;
use kinesis_tower::{metric_names, Consumer, StartPosition};
use kinesis_tower::{Batch, BoxError};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tower::{service_fn, ServiceBuilder};

const USAGE: &str = "\
usage: metrics --stream NAME [--port PORT] [--app NAME] [--from trim-horizon|latest]

Consumes the Kinesis stream NAME and serves the consumer's metrics for Prometheus on
http://127.0.0.1:PORT/metrics until Ctrl-C.

  --stream NAME     the stream (required)
  --port PORT       the port of the metrics listener on 127.0.0.1 (default 9898)
  --app NAME        application name (default 'metrics-example')
  --from POSITION   where shards start: trim-horizon (oldest record) or latest (only new
                    records; the default)

Region, credentials and endpoint come from the AWS environment; for a local emulator run
'source scripts/env.sh' first.";

/// Histogram buckets of the `*_seconds` metrics: 1 ms to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

struct Args {
    stream: String,
    port: u16,
    app: String,
    from: StartPosition,
}

fn parse_args() -> Result<Args, String> {
    let mut stream = None;
    let mut port = 9898;
    let mut app = "metrics-example".to_owned();
    let mut from = StartPosition::Latest;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--stream" => stream = Some(value("--stream")?),
            "--port" => {
                let text = value("--port")?;
                port = text
                    .parse()
                    .map_err(|_| format!("--port: {text:?} is not a port number"))?;
            }
            "--app" => app = value("--app")?,
            "--from" => {
                from = match value("--from")?.as_str() {
                    "trim-horizon" => StartPosition::TrimHorizon,
                    "latest" => StartPosition::Latest,
                    other => {
                        return Err(format!(
                            "--from: {other:?} is not one of trim-horizon, latest"
                        ))
                    }
                }
            }
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    Ok(Args {
        stream: stream.ok_or("--stream NAME is required")?,
        port,
        app,
        from,
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
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // The recorder first: metric handles are registered with the recorder installed when a
    // shard is first seen.
    PrometheusBuilder::new()
        .with_http_listener(([127, 0, 0, 1], args.port))
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .install()
        .map_err(|e| format!("cannot serve metrics on 127.0.0.1:{}: {e}", args.port))?;
    metric_names::describe();

    let config = aws_config::load_from_env().await;
    if config.region().is_none() {
        return Err(
            "no AWS region configured: set AWS_REGION (for local emulators: source scripts/env.sh)"
                .into(),
        );
    }
    let consumer = Consumer::builder()
        .sdk_config(&config)
        .stream_name(&args.stream)
        .app_name(&args.app)
        .start_position(args.from)
        .build()?;

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
        args.stream, args.port
    );
    let shutdown = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let result = consumer.run_until(service, shutdown).await;
    eprintln!("handled {} records", handled.load(Ordering::Relaxed));
    result.map_err(Into::into)
}
