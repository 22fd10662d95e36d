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

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use aws_sdk_kinesis::Client;
use kinesis_tower::kpl::{Aggregate, Aggregator};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

/// PutRecords limits (per request, and per record: data + partition key).
const MAX_ENTRIES_PER_REQUEST: usize = 500;
const MAX_BYTES_PER_REQUEST: usize = 5 * 1024 * 1024;
const MAX_BYTES_PER_RECORD: usize = 1024 * 1024;
const MAX_PARTITION_KEY_CHARS: usize = 256;

/// Backoff between attempts: 100 ms, 200 ms, 400 ms, ... capped at 5 s.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

const USAGE: &str = "\
usage: producer --stream NAME [--partition-key-prefix PREFIX] [--max-attempts N] [--aggregate N] [FILE]

Sends each non-empty line of FILE (or stdin, when FILE is missing or '-') as one record to
the Kinesis stream NAME, with PutRecords (at most 500 records / 5 MiB per request).

  --stream NAME                  the stream (required)
  --partition-key-prefix PREFIX  partition key of line N is PREFIX followed by N (default 'line-')
  --max-attempts N               attempts per request when Kinesis rejects some entries (default 10)
  --aggregate N                  pack N lines into each record as a KPL aggregate (fewer if 1 MiB
                                 is reached first); read them with DeaggregateLayer

Region, credentials and endpoint come from the AWS environment; for a local emulator run
'source scripts/env.sh' first.";

struct Args {
    stream: String,
    partition_key_prefix: String,
    max_attempts: u32,
    aggregate: Option<usize>,
    input: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut stream = None;
    let mut partition_key_prefix = "line-".to_owned();
    let mut max_attempts = 10;
    let mut aggregate = None;
    let mut input = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--stream" => stream = Some(value("--stream")?),
            "--partition-key-prefix" => partition_key_prefix = value("--partition-key-prefix")?,
            "--max-attempts" => {
                let v = value("--max-attempts")?;
                max_attempts = v
                    .parse()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| format!("--max-attempts: {v:?} is not a number >= 1"))?;
            }
            "--aggregate" => {
                let v = value("--aggregate")?;
                aggregate = Some(
                    v.parse()
                        .ok()
                        .filter(|n| *n >= 1)
                        .ok_or_else(|| format!("--aggregate: {v:?} is not a number >= 1"))?,
                );
            }
            s if s.starts_with("--") => return Err(format!("unknown option {s}")),
            _ if input.is_some() => return Err(format!("unexpected argument {arg:?}")),
            _ => input = Some(arg),
        }
    }
    let stream = stream.ok_or("--stream NAME is required")?;
    if partition_key_prefix.chars().count() + 20 > MAX_PARTITION_KEY_CHARS {
        return Err(format!(
            "--partition-key-prefix is too long: partition keys are at most {MAX_PARTITION_KEY_CHARS} characters"
        ));
    }
    Ok(Args {
        stream,
        partition_key_prefix,
        max_attempts,
        aggregate,
        input: input.filter(|i| i != "-"),
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
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = aws_config::load_from_env().await;
    if config.region().is_none() {
        bail!(
            "no AWS region configured: set AWS_REGION (for local emulators: source scripts/env.sh)"
        );
    }
    let client = Client::new(&config);

    let reader: Box<dyn AsyncBufRead + Unpin> = match &args.input {
        Some(path) => Box::new(BufReader::new(
            tokio::fs::File::open(path)
                .await
                .with_context(|| format!("cannot open {path}"))?,
        )),
        None => Box::new(BufReader::new(tokio::io::stdin())),
    };
    let source = args.input.as_deref().unwrap_or("stdin");
    let mut lines = reader.split(b'\n');

    let mut producer = Producer::new(client, &args);
    let mut batch = Batch::default();
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
            let size = key.len() + line.len();
            if size > MAX_BYTES_PER_RECORD {
                // Send what came before, so that "everything before line N" is a true statement.
                producer.send(batch.take()).await?;
                bail!(
                    "{source} line {line_number} is {} bytes: a Kinesis record holds at most 1 MiB \
                     (data + partition key). The lines before it were sent, nothing after it",
                    line.len()
                );
            }
            batch
                .push(&mut producer, entry(key, None, line)?, size)
                .await?;
            continue;
        };
        let full = match aggregator.add(&key, None, line) {
            Ok(full) => full,
            Err(err) => {
                // Send what came before, so that "everything before line N" is a true statement.
                if let Some(rest) = aggregator.finish() {
                    batch.push_aggregate(&mut producer, rest).await?;
                }
                producer.send(batch.take()).await?;
                bail!(
                    "{source} line {line_number}: {err}. The lines before it were sent, nothing after it"
                );
            }
        };
        if let Some(full) = full {
            batch.push_aggregate(&mut producer, full).await?;
        }
        if aggregator.len() >= *per_record {
            let full = aggregator.finish().expect("not empty");
            batch.push_aggregate(&mut producer, full).await?;
        }
    }
    if let Some(rest) = aggregator.as_mut().and_then(|(_, a)| a.finish()) {
        batch.push_aggregate(&mut producer, rest).await?;
    }
    producer.send(batch.take()).await?;
    producer.finish(source);
    Ok(())
}

fn entry(
    key: String,
    explicit_hash_key: Option<String>,
    data: impl Into<Vec<u8>>,
) -> anyhow::Result<PutRecordsRequestEntry> {
    PutRecordsRequestEntry::builder()
        .partition_key(key)
        .set_explicit_hash_key(explicit_hash_key)
        .data(Blob::new(data))
        .build()
        .context("building a PutRecords entry")
}

/// The entries of the next PutRecords request.
#[derive(Default)]
struct Batch {
    entries: Vec<PutRecordsRequestEntry>,
    bytes: usize,
}

impl Batch {
    /// Adds an entry of `size` bytes, sending the batch first when it would not fit.
    async fn push(
        &mut self,
        producer: &mut Producer,
        entry: PutRecordsRequestEntry,
        size: usize,
    ) -> anyhow::Result<()> {
        if self.entries.len() == MAX_ENTRIES_PER_REQUEST
            || self.bytes + size > MAX_BYTES_PER_REQUEST
        {
            producer.send(self.take()).await?;
        }
        self.entries.push(entry);
        self.bytes += size;
        Ok(())
    }

    async fn push_aggregate(
        &mut self,
        producer: &mut Producer,
        aggregate: Aggregate,
    ) -> anyhow::Result<()> {
        producer.user_records += aggregate.user_records as u64;
        let size = aggregate.size();
        let entry = entry(
            aggregate.partition_key,
            aggregate.explicit_hash_key,
            aggregate.data,
        )?;
        self.push(producer, entry, size).await
    }

    fn take(&mut self) -> Vec<PutRecordsRequestEntry> {
        self.bytes = 0;
        std::mem::take(&mut self.entries)
    }
}

struct Producer {
    client: Client,
    stream: String,
    max_attempts: u32,
    started: Instant,
    last_progress: Instant,
    sent: u64,
    requests: u64,
    retried: u64,
    skipped: u64,
    /// Lines packed into aggregates (with `--aggregate`).
    user_records: u64,
    terminal: bool,
}

impl Producer {
    fn new(client: Client, args: &Args) -> Self {
        let now = Instant::now();
        Self {
            client,
            stream: args.stream.clone(),
            max_attempts: args.max_attempts,
            started: now,
            last_progress: now,
            sent: 0,
            requests: 0,
            retried: 0,
            skipped: 0,
            user_records: 0,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    /// Sends one request's worth of entries; retries only the entries Kinesis rejected.
    async fn send(&mut self, mut pending: Vec<PutRecordsRequestEntry>) -> anyhow::Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let mut attempt = 1;
        loop {
            let count = pending.len();
            self.requests += 1;
            let result = self
                .client
                .put_records()
                .stream_name(&self.stream)
                .set_records(Some(pending.clone()))
                .send()
                .await;
            let (failed, last_error) = match result {
                Ok(output) => {
                    if output.records().len() != count {
                        bail!(
                            "PutRecords on stream {} answered {} results for {count} entries; giving up",
                            self.stream,
                            output.records().len()
                        );
                    }
                    let mut failed = Vec::new();
                    let mut last_error = String::new();
                    for (entry, result) in pending.into_iter().zip(output.records()) {
                        if let Some(code) = result.error_code() {
                            last_error =
                                format!("{code}: {}", result.error_message().unwrap_or(""));
                            failed.push(entry);
                        }
                    }
                    self.sent += (count - failed.len()) as u64;
                    (failed, last_error)
                }
                Err(err) => {
                    let retryable = classify(&err, &self.stream)?;
                    (pending, retryable)
                }
            };
            self.progress();
            if failed.is_empty() {
                return Ok(());
            }
            if attempt >= self.max_attempts {
                bail!(
                    "{} records still rejected after {attempt} attempts (last error: {last_error}); \
                     stopped: {} records were sent, the rejected ones and all later lines were not. \
                     The stream may be under-provisioned: add shards (UpdateShardCount), slow down, \
                     or raise --max-attempts",
                    failed.len(),
                    self.sent
                );
            }
            let delay = BACKOFF_BASE
                .saturating_mul(1u32 << (attempt - 1).min(16))
                .min(BACKOFF_MAX);
            self.retried += failed.len() as u64;
            eprintln!(
                "{} of {count} records rejected ({last_error}); retrying them in {delay:?} (attempt {} of {})",
                failed.len(),
                attempt + 1,
                self.max_attempts
            );
            tokio::time::sleep(delay).await;
            pending = failed;
            attempt += 1;
        }
    }

    /// A progress line on stderr, at most once a second.
    fn progress(&mut self) {
        if self.last_progress.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_progress = Instant::now();
        let line = format!("sent {} records ({:.0} records/s)", self.sent, self.rate());
        if self.terminal {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }

    fn rate(&self) -> f64 {
        self.sent as f64 / self.started.elapsed().as_secs_f64().max(1e-3)
    }

    fn finish(&self, source: &str) {
        if self.terminal && self.last_progress != self.started {
            eprintln!();
        }
        let mut line = format!(
            "done: sent {} records from {source} to stream {} in {:.2?} ({:.0} records/s, {} PutRecords request{})",
            self.sent,
            self.stream,
            self.started.elapsed(),
            self.rate(),
            self.requests,
            if self.requests == 1 { "" } else { "s" }
        );
        if self.retried > 0 {
            line.push_str(&format!(
                "; {} entry retries after rejections",
                self.retried
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

/// A failed PutRecords call: `Ok(description)` when sending again may help (throttling,
/// transient service errors, which the SDK already retried a few times), otherwise an error
/// that says what to do.
fn classify<E, R>(err: &SdkError<E, R>, stream: &str) -> anyhow::Result<String>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    let endpoint = std::env::var("AWS_ENDPOINT_URL_KINESIS")
        .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
        .map(|e| format!("the endpoint {e}"))
        .unwrap_or_else(|_| "AWS".to_owned());
    match err {
        SdkError::ServiceError(service) => {
            let e = service.err();
            let code = e.code().unwrap_or("unknown error");
            let message = e.message().unwrap_or("");
            match code {
                "ResourceNotFoundException" => bail!(
                    "stream {stream} not found at {endpoint} ({message}): create it first, e.g. \
                     `aws kinesis create-stream --stream-name {stream} --shard-count 1` \
                     (for a local emulator add --endpoint-url and --region), or fix --stream / the region / \
                     AWS_ENDPOINT_URL_KINESIS"
                ),
                "AccessDeniedException" | "UnrecognizedClientException" | "InvalidSignatureException"
                | "ExpiredTokenException" => bail!(
                    "{code} from {endpoint}: {message}; check the AWS credentials and that they \
                     may call kinesis:PutRecords on stream {stream}"
                ),
                "ProvisionedThroughputExceededException"
                | "KMSThrottlingException"
                | "InternalFailure"
                | "ServiceUnavailable"
                | "LimitExceededException" => Ok(format!("{code}: {message}")),
                _ => bail!("PutRecords on stream {stream} failed: {code}: {message}"),
            }
        }
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => bail!(
            "cannot reach Kinesis at {endpoint}: {}; is the endpoint right and the service (or \
             emulator) running? For the local kinesis-mock: `source scripts/env.sh && ensure_kinesis_mock`",
            error_chain(err)
        ),
        _ => bail!(
            "PutRecords on stream {stream} failed: {}; check AWS_REGION and the credentials",
            error_chain(err)
        ),
    }
}

/// An error with its sources (an SDK error's own message is just "service error" or
/// "dispatch failure").
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
