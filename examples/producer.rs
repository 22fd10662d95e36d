//! Sends lines of text to a Kinesis stream with PutRecords.
//!
//! ```text
//! cargo run --example producer -- --stream NAME [--partition-key-prefix PREFIX]
//!                                 [--max-attempts N] [--aggregate N] [FILE]
//! ```
//!
//! Reads FILE (or stdin when FILE is missing or `-`), one record per non-empty line (the line
//! without its line ending is the record's data). Records go out in PutRecords requests of at
//! most 500 entries and 5 MiB; the partition key of line N is `<prefix><N>` (default prefix
//! `line-`), which spreads lines evenly over the shards. When Kinesis accepts only part of a
//! request (throttling, internal errors), only the failed entries are sent again, with
//! exponential backoff, up to `--max-attempts` times (default 10).
//!
//! With `--aggregate N`, lines are packed N at a time into KPL aggregates
//! (`kinesis_tower::kpl::Aggregator`; fewer when 1 MiB is reached first), each put as one
//! Kinesis record under its first line's partition key. Consumers read them back as single
//! lines with `DeaggregateLayer`.
//!
//! Region, credentials and endpoint come from the usual AWS environment
//! (`aws_config::load_from_env`). For a local emulator, `source scripts/env.sh` first: it sets
//! dummy credentials, the region and `AWS_ENDPOINT_URL_KINESIS`.
//!
//! ```text
//! printf 'a\nb\nc\n' | cargo run --example producer -- --stream my-stream
//! ```

#[path = "support/cli.rs"]
mod cli;
#[path = "support/put.rs"]
mod put;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use aws_sdk_kinesis::config::http::HttpResponse;
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::operation::put_records::PutRecordsError;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use aws_sdk_kinesis::Client;
use clap::builder::RangedU64ValueParser;
use clap::Parser;
use kinesis_tower::kpl::{Aggregate, Aggregator};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

/// Partition keys are at most this many characters.
const MAX_PARTITION_KEY_CHARS: usize = 256;

/// Sends each non-empty line of FILE (or stdin) as one record to a Kinesis stream, with
/// PutRecords (at most 500 records / 5 MiB per request).
///
/// Region, credentials and endpoint come from the AWS environment; for a local emulator run
/// 'source scripts/env.sh' first.
#[derive(Parser)]
struct Args {
    /// The stream
    #[arg(long, value_name = "NAME")]
    stream: String,

    /// Partition key of line N is PREFIX followed by N
    #[arg(long, value_name = "PREFIX", default_value = "line-", value_parser = key_prefix)]
    partition_key_prefix: String,

    /// Attempts per request when Kinesis rejects some entries
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    max_attempts: u32,

    /// Pack N lines into each record as a KPL aggregate (fewer if 1 MiB is reached first);
    /// read them with DeaggregateLayer
    #[arg(long, value_name = "N", value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    aggregate: Option<usize>,

    /// The lines to send; stdin when missing or '-'
    #[arg(value_name = "FILE")]
    input: Option<PathBuf>,
}

/// A prefix that leaves room for the line number in a partition key.
fn key_prefix(prefix: &str) -> Result<String, String> {
    if prefix.chars().count() + 20 > MAX_PARTITION_KEY_CHARS {
        return Err(format!(
            "too long: partition keys are at most {MAX_PARTITION_KEY_CHARS} characters"
        ));
    }
    Ok(prefix.to_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = cli::aws_config().await?;
    let client = Client::new(&config);

    let input = args.input.as_ref().filter(|i| i.as_os_str() != "-");
    let reader: Box<dyn AsyncBufRead + Unpin> = match input {
        Some(path) => Box::new(BufReader::new(
            tokio::fs::File::open(path)
                .await
                .with_context(|| format!("cannot open {}", path.display()))?,
        )),
        None => Box::new(BufReader::new(tokio::io::stdin())),
    };
    let source = input.map_or("stdin".into(), |i| i.display().to_string());
    let mut lines = reader.split(b'\n');

    let mut producer = Producer::new(client, &args);
    let mut aggregator = args.aggregate.map(|n| (n, Aggregator::new()));
    let mut line_number = 0u64;
    while let Some(mut line) = lines
        .next_segment()
        .await
        .with_context(|| format!("cannot read {source}"))?
    {
        line_number += 1;
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.is_empty() {
            producer.skipped += 1;
            continue;
        }
        let key = format!("{}{line_number}", args.partition_key_prefix);
        let Some((per_record, aggregator)) = aggregator.as_mut() else {
            if key.len() + line.len() > put::MAX_BYTES_PER_RECORD {
                // Send what came before, so that "everything before line N" is a true statement.
                producer.flush().await?;
                bail!(
                    "{source} line {line_number} is {} bytes: a Kinesis record holds at most 1 MiB \
                     (data + partition key). The lines before it were sent, nothing after it",
                    line.len()
                );
            }
            producer.push(put::entry(key, None, line)?).await?;
            continue;
        };
        let full = match aggregator.add(&key, None, line) {
            Ok(full) => full,
            Err(err) => {
                // Send what came before, so that "everything before line N" is a true statement.
                if let Some(rest) = aggregator.finish() {
                    producer.push_aggregate(rest).await?;
                }
                producer.flush().await?;
                bail!(
                    "{source} line {line_number}: {err}. The lines before it were sent, nothing after it"
                );
            }
        };
        if let Some(full) = full {
            producer.push_aggregate(full).await?;
        }
        if aggregator.len() >= *per_record {
            let full = aggregator.finish().expect("not empty");
            producer.push_aggregate(full).await?;
        }
    }
    if let Some(rest) = aggregator.as_mut().and_then(|(_, a)| a.finish()) {
        producer.push_aggregate(rest).await?;
    }
    producer.flush().await?;
    producer.finish(&source);
    Ok(())
}

struct Producer {
    writer: put::Writer,
    /// The entries of the next request.
    request: put::Request,
    started: Instant,
    last_progress: Instant,
    skipped: u64,
    /// Lines packed into aggregates (with `--aggregate`).
    user_records: u64,
    terminal: bool,
}

impl Producer {
    fn new(client: Client, args: &Args) -> Self {
        let now = Instant::now();
        Self {
            writer: put::Writer::new(client, &args.stream).max_attempts(args.max_attempts),
            request: put::Request::default(),
            started: now,
            last_progress: now,
            skipped: 0,
            user_records: 0,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    /// Adds an entry to the next request, sending the request first when it is full.
    async fn push(&mut self, entry: PutRecordsRequestEntry) -> anyhow::Result<()> {
        match self.request.push(entry) {
            Some(full) => self.send(full).await,
            None => Ok(()),
        }
    }

    async fn push_aggregate(&mut self, aggregate: Aggregate) -> anyhow::Result<()> {
        self.user_records += aggregate.user_records as u64;
        let entry = put::entry(
            aggregate.partition_key,
            aggregate.explicit_hash_key,
            aggregate.data,
        )?;
        self.push(entry).await
    }

    /// Sends the entries of the next request.
    async fn flush(&mut self) -> anyhow::Result<()> {
        let entries = self.request.take();
        self.send(entries).await
    }

    async fn send(&mut self, entries: Vec<PutRecordsRequestEntry>) -> anyhow::Result<()> {
        if let Err(err) = self.writer.send(entries).await {
            let advice = advice(&err, self.writer.stream());
            return Err(err.context(format!(
                "{advice}. Stopped after {} records were sent; the rest of this request and all \
                 later lines were not",
                self.writer.sent
            )));
        }
        self.progress();
        Ok(())
    }

    /// A progress line on stderr, at most once a second.
    fn progress(&mut self) {
        if self.last_progress.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_progress = Instant::now();
        let line = format!(
            "sent {} records ({:.0} records/s)",
            self.writer.sent,
            self.rate()
        );
        if self.terminal {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }

    fn rate(&self) -> f64 {
        self.writer.sent as f64 / self.started.elapsed().as_secs_f64().max(1e-3)
    }

    fn finish(&self, source: &str) {
        if self.terminal && self.last_progress != self.started {
            eprintln!();
        }
        let requests = self.writer.requests;
        let mut line = format!(
            "done: sent {} records from {source} to stream {} in {:.2?} ({:.0} records/s, {requests} PutRecords request{})",
            self.writer.sent,
            self.writer.stream(),
            self.started.elapsed(),
            self.rate(),
            if requests == 1 { "" } else { "s" }
        );
        if self.writer.retried > 0 {
            line.push_str(&format!(
                "; {} entry retries after rejections",
                self.writer.retried
            ));
        }
        if self.user_records > 0 {
            line.push_str(&format!(
                "; {} lines packed into those records as KPL aggregates",
                self.user_records
            ));
        }
        if self.skipped > 0 {
            line.push_str(&format!("; {} empty lines skipped", self.skipped));
        }
        eprintln!("{line}");
    }
}

/// What to do about a failed request: entries still rejected after the last attempt, or the
/// error of the PutRecords call.
fn advice(err: &anyhow::Error, stream: &str) -> String {
    let endpoint = std::env::var("AWS_ENDPOINT_URL_KINESIS")
        .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
        .map(|e| format!("the endpoint {e}"))
        .unwrap_or_else(|_| "AWS".to_owned());
    if err.is::<put::Rejected>() {
        return "the stream may be under-provisioned: add shards (UpdateShardCount), slow down, \
                or raise --max-attempts"
            .to_owned();
    }
    let Some(call) = err.downcast_ref::<SdkError<PutRecordsError, HttpResponse>>() else {
        return format!("PutRecords on stream {stream} at {endpoint} failed");
    };
    match call {
        SdkError::ServiceError(service) => match service.err().code() {
            Some("ResourceNotFoundException") => format!(
                "stream {stream} not found at {endpoint}: create it first, e.g. \
                 `aws kinesis create-stream --stream-name {stream} --shard-count 1` \
                 (for a local emulator add --endpoint-url and --region), or fix --stream / the \
                 region / AWS_ENDPOINT_URL_KINESIS"
            ),
            Some(
                "AccessDeniedException"
                | "UnrecognizedClientException"
                | "InvalidSignatureException"
                | "ExpiredTokenException",
            ) => format!(
                "check the AWS credentials and that they may call kinesis:PutRecords on stream \
                 {stream} at {endpoint}"
            ),
            _ => format!("Kinesis at {endpoint} refused PutRecords on stream {stream}"),
        },
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => format!(
            "cannot reach Kinesis at {endpoint}: is the endpoint right and the service (or \
             emulator) running? For the local kinesis-mock: `source scripts/env.sh && \
             ensure_kinesis_mock`"
        ),
        _ => "check AWS_REGION and the credentials".to_owned(),
    }
}
