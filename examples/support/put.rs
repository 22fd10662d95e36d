//! PutRecords in requests within Kinesis' limits, sending again only the entries Kinesis
//! rejected, with the crate's backoff between attempts. The `producer` and `demo` examples and
//! the integration tests (`tests/common`) write records with it.

// Each program that includes this file uses part of it.
#![allow(dead_code)]

use std::time::Duration;

use anyhow::{bail, Context};
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use aws_sdk_kinesis::Client;
use kinesis_tower::backoff::Backoff;

/// PutRecords limits: entries and bytes (data + partition keys) per request, bytes per record.
pub const MAX_ENTRIES_PER_REQUEST: usize = 500;
pub const MAX_BYTES_PER_REQUEST: usize = 5 * 1024 * 1024;
pub const MAX_BYTES_PER_RECORD: usize = 1024 * 1024;

/// Where Kinesis put a record: its shard id and sequence number.
pub type Written = (String, String);

/// Entries Kinesis still rejected after the last attempt (the error of [`Writer::send`]).
#[derive(Debug, thiserror::Error)]
#[error("PutRecords on stream {stream}: {records} records still rejected after {attempts} attempts (last error: {last_error})")]
pub struct Rejected {
    pub stream: String,
    pub records: usize,
    pub attempts: u32,
    pub last_error: String,
}

/// A PutRecords entry.
pub fn entry(
    partition_key: impl Into<String>,
    explicit_hash_key: Option<String>,
    data: impl Into<Vec<u8>>,
) -> anyhow::Result<PutRecordsRequestEntry> {
    PutRecordsRequestEntry::builder()
        .partition_key(partition_key)
        .set_explicit_hash_key(explicit_hash_key)
        .data(Blob::new(data))
        .build()
        .context("building a PutRecords entry")
}

/// The size Kinesis counts for an entry: data plus partition key.
pub fn size(entry: &PutRecordsRequestEntry) -> usize {
    entry.data().as_ref().len() + entry.partition_key().map_or(0, str::len)
}

/// The entries of the next PutRecords request.
#[derive(Default)]
pub struct Request {
    entries: Vec<PutRecordsRequestEntry>,
    bytes: usize,
}

impl Request {
    /// Adds `entry`. When it does not fit, the entries before it come back first: a full
    /// request, to send.
    pub fn push(&mut self, entry: PutRecordsRequestEntry) -> Option<Vec<PutRecordsRequestEntry>> {
        let size = size(&entry);
        let full = (self.entries.len() == MAX_ENTRIES_PER_REQUEST
            || (!self.entries.is_empty() && self.bytes + size > MAX_BYTES_PER_REQUEST))
            .then(|| self.take());
        self.entries.push(entry);
        self.bytes += size;
        full
    }

    /// The entries so far (maybe none); the request starts over empty.
    pub fn take(&mut self) -> Vec<PutRecordsRequestEntry> {
        self.bytes = 0;
        std::mem::take(&mut self.entries)
    }
}

/// Writes to one stream, and counts what it did.
pub struct Writer {
    client: Client,
    stream: String,
    max_attempts: u32,
    backoff: Backoff,
    /// Records Kinesis accepted.
    pub sent: u64,
    /// PutRecords calls made.
    pub requests: u64,
    /// Entries sent again after Kinesis rejected them.
    pub retried: u64,
}

impl Writer {
    /// A writer to `stream`: 10 attempts per request, waits from up to 100 ms doubling to 5 s.
    pub fn new(client: Client, stream: impl Into<String>) -> Self {
        Self {
            client,
            stream: stream.into(),
            max_attempts: 10,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            sent: 0,
            requests: 0,
            retried: 0,
        }
    }

    /// Attempts per request (at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The waits between attempts: up to `base` before the first retry, doubling up to `max`.
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff = Backoff::new(base, max);
        self
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Writes `entries` in as many requests as the limits need; where each entry went, in
    /// order.
    pub async fn put_all(
        &mut self,
        entries: Vec<PutRecordsRequestEntry>,
    ) -> anyhow::Result<Vec<Written>> {
        let mut written = Vec::new();
        let mut request = Request::default();
        for entry in entries {
            if let Some(full) = request.push(entry) {
                written.extend(self.send(full).await?);
            }
        }
        written.extend(self.send(request.take()).await?);
        Ok(written)
    }

    /// Sends one request's entries; sends the rejected ones again, up to the maximum attempts
    /// (then the error is a [`Rejected`]). Throttling and transient errors of the whole call
    /// (which the SDK already retried) count as attempts too; any other error of the call is
    /// returned at once, an `SdkError<PutRecordsError, _>` under a context. Where each entry
    /// went, in order.
    pub async fn send(
        &mut self,
        entries: Vec<PutRecordsRequestEntry>,
    ) -> anyhow::Result<Vec<Written>> {
        let mut written: Vec<Option<Written>> = vec![None; entries.len()];
        // The entries still to write, with their index in `entries`.
        let mut pending: Vec<(usize, PutRecordsRequestEntry)> =
            entries.into_iter().enumerate().collect();
        self.backoff.reset();
        while !pending.is_empty() {
            let count = pending.len();
            self.requests += 1;
            let result = self
                .client
                .put_records()
                .stream_name(&self.stream)
                .set_records(Some(pending.iter().map(|(_, e)| e.clone()).collect()))
                .send()
                .await;
            let last_error = match result {
                Ok(output) => {
                    if output.records().len() != count {
                        bail!(
                            "PutRecords on stream {} answered {} results for {count} entries",
                            self.stream,
                            output.records().len()
                        );
                    }
                    let mut last_error = String::new();
                    let mut failed = Vec::new();
                    for ((i, entry), result) in pending.into_iter().zip(output.records()) {
                        match (
                            result.error_code(),
                            result.shard_id(),
                            result.sequence_number(),
                        ) {
                            (None, Some(shard), Some(sequence_number)) => {
                                written[i] = Some((shard.to_owned(), sequence_number.to_owned()));
                            }
                            (code, _, _) => {
                                let code = code.unwrap_or("no shard or sequence number");
                                let message = result.error_message().unwrap_or("");
                                last_error = format!("{code}: {message}");
                                failed.push((i, entry));
                            }
                        }
                    }
                    self.sent += (count - failed.len()) as u64;
                    pending = failed;
                    last_error
                }
                Err(err) => match retryable(&err) {
                    Some(description) => description,
                    None => {
                        let context = format!("PutRecords on stream {}", self.stream);
                        return Err(anyhow::Error::new(err).context(context));
                    }
                },
            };
            if pending.is_empty() {
                break;
            }
            let attempt = self.backoff.attempts() + 1;
            if attempt >= self.max_attempts {
                bail!(Rejected {
                    stream: self.stream.clone(),
                    records: pending.len(),
                    attempts: attempt,
                    last_error,
                });
            }
            let delay = self.backoff.next_delay();
            self.retried += pending.len() as u64;
            eprintln!(
                "{} of {count} records rejected ({last_error}); sending them again in {delay:?} \
                 (attempt {} of {})",
                pending.len(),
                attempt + 1,
                self.max_attempts
            );
            tokio::time::sleep(delay).await;
        }
        Ok(written
            .into_iter()
            .map(|w| w.expect("every entry was written"))
            .collect())
    }
}

/// A failed call worth making again (throttling, a transient service error): its
/// description.
fn retryable<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> Option<String> {
    let service = err.as_service_error()?;
    match service.code()? {
        code @ ("ProvisionedThroughputExceededException"
        | "KMSThrottlingException"
        | "InternalFailure"
        | "ServiceUnavailable"
        | "LimitExceededException") => Some(format!("{code}: {}", service.message().unwrap_or(""))),
        _ => None,
    }
}
