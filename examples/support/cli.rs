//! What the consumer examples share on the command line: the stream and how to read it, and
//! the AWS configuration from the environment.

// Each program that includes this file uses part of it.
#![allow(dead_code)]

use anyhow::bail;
use clap::ValueEnum;
use kinesis_tower::{Consumer, ConsumerBuilder, StartPosition};

/// Which stream to read, as which application, from where. Each example gives its own
/// default application name: `#[command(mut_arg("app", |a| a.default_value("...")))]`.
#[derive(clap::Args, Debug)]
pub struct Reading {
    /// The stream
    #[arg(long, value_name = "NAME")]
    pub stream: String,

    /// Application name: checkpoints are kept per app and stream
    #[arg(long, value_name = "NAME", required = false)]
    pub app: String,

    /// Where shards without a checkpoint start
    #[arg(long, value_name = "POSITION", value_enum, default_value_t = Start::Latest)]
    pub from: Start,

    /// Records per GetRecords call (or per batch, with --fan-out), so at most per batch
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub max_records_per_call: usize,

    /// Read through enhanced fan-out (SubscribeToShard) as this stream consumer, registered
    /// if missing, instead of polling GetRecords
    #[arg(long, value_name = "CONSUMER")]
    pub fan_out: Option<String>,
}

/// A start position for the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Start {
    /// The oldest record
    TrimHorizon,
    /// Only new records
    Latest,
}

impl Reading {
    /// A consumer builder with these settings and `config`.
    pub fn consumer(&self, config: &aws_config::SdkConfig) -> ConsumerBuilder {
        let builder = Consumer::builder()
            .sdk_config(config)
            .stream_name(&self.stream)
            .app_name(&self.app)
            .start_position(match self.from {
                Start::TrimHorizon => StartPosition::TrimHorizon,
                Start::Latest => StartPosition::Latest,
            })
            .max_records_per_call(self.max_records_per_call);
        match &self.fan_out {
            Some(name) => builder.enhanced_fan_out(name.as_str()),
            None => builder,
        }
    }
}

/// Region, credentials and endpoint from the environment (`aws_config::load_from_env`); an
/// error when no region is set.
pub async fn aws_config() -> anyhow::Result<aws_config::SdkConfig> {
    let config = aws_config::load_from_env().await;
    if config.region().is_none() {
        bail!(
            "no AWS region configured: set AWS_REGION (for local emulators: source scripts/env.sh)"
        );
    }
    Ok(config)
}
