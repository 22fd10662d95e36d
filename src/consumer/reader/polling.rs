//! The polling reader: one task per shard, GetRecords in a loop, into the shard's buffer.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use kinesis_tower_layers::kpl::is_aggregate;
use kinesis_tower_layers::{Batch, BatchEnd, Checkpoint, Record, ShardId};
use tokio::time::{sleep_until, Instant};

use super::buffer::ShardBuffer;
use super::metrics::ReaderMetrics;
use super::{ReaderEvent, ReaderOutput, ShardReader};
use crate::backoff::Backoff;
use crate::consumer::assignment::{Fallback, Read, ShardStart};
use crate::consumer::handle::Shared;
use crate::kinesis::{timed, IteratorPosition, KinesisError, KinesisErrorKind};
use crate::retrying::retry;
use crate::Error;

/// Why a reader ended early.
enum Stop {
    /// Retrying will not help.
    Failed(Error),
    /// The shard was not found: expired, or the stream is gone (the consumer checks).
    Gone(Error),
}

impl From<Error> for Stop {
    fn from(error: Error) -> Self {
        Stop::Failed(error)
    }
}

/// How much earlier than our clock an expired LATEST iterator is renewed (see `Reader::run`).
const LATEST_ANCHOR_MARGIN: Duration = Duration::from_secs(30);

/// Reads shards with GetRecords in a loop.
pub(crate) struct PollingReader {
    shared: Arc<Shared>,
}

impl PollingReader {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

impl ShardReader for PollingReader {
    fn read(
        &self,
        start: ShardStart,
        buffer: ShardBuffer,
        output: ReaderOutput,
    ) -> BoxFuture<'static, ()> {
        let shared = self.shared.clone();
        Box::pin(async move {
            let backoff = Backoff::new(shared.settings.backoff_base, shared.settings.backoff_max);
            let metrics = ReaderMetrics::new(shared.settings.stream.stream_name(), &start.shard_id);
            let mut reader = Reader {
                metrics,
                shared,
                shard: start.shard_id.clone(),
                buffer,
                output: output.clone(),
                backoff,
            };
            match reader.run(start).await {
                Ok(()) => {}
                Err(Stop::Gone(error)) => {
                    output.send(ReaderEvent::Gone(error));
                }
                Err(Stop::Failed(error)) => {
                    tracing::error!(%error, "shard reader stopped");
                    output.send(ReaderEvent::Failed(error));
                }
            }
        })
    }
}

struct Reader {
    shared: Arc<Shared>,
    shard: ShardId,
    buffer: ShardBuffer,
    output: ReaderOutput,
    backoff: Backoff,
    metrics: ReaderMetrics,
}

impl Reader {
    fn stream_name(&self) -> &str {
        self.shared.settings.stream.stream_name()
    }

    fn store_error(&self, source: kinesis_tower_layers::StoreError) -> Error {
        Error::Store {
            stream: self.stream_name().to_owned(),
            shard: Some(self.shard.to_string()),
            source: Box::new(source),
        }
    }

    /// The shard's stored checkpoint. The stores retry passing failures themselves: one retry
    /// loop per failure.
    async fn stored_checkpoint(&self) -> Result<Option<Checkpoint>, Error> {
        self.shared
            .checkpointer
            .get(&self.shard)
            .await
            .map_err(|e| self.store_error(e))
    }

    /// Makes where this shard started durable (before anything is read, by time; before its
    /// first record is handed over, at that record), so a restart resumes there instead of at a
    /// start position that has moved on (`LATEST`, a timestamp) and skipping what came in
    /// meanwhile. `flush: false` when a durable start in time covers the shard already (the
    /// record-precise start then only narrows it, and may wait for the store's own flush).
    async fn record_start(&self, started: Checkpoint, flush: bool) -> Result<(), Error> {
        let checkpointer = &self.shared.checkpointer;
        checkpointer
            .set(&self.shard, started)
            .await
            .map_err(|e| self.store_error(e))?;
        if flush {
            checkpointer
                .flush()
                .await
                .map_err(|e| self.store_error(e))?;
        }
        tracing::debug!(%started, "start position recorded");
        Ok(())
    }

    /// What ends a reader early, from a Kinesis error.
    fn stop(&self, error: KinesisError) -> Stop {
        if error.kind() == KinesisErrorKind::ResourceNotFound {
            Stop::Gone(Error::ShardNotFound {
                stream: self.stream_name().to_owned(),
                shard: self.shard.to_string(),
                source: error,
            })
        } else {
            Stop::Failed(Error::from_kinesis(
                self.stream_name(),
                Some(&self.shard),
                error,
            ))
        }
    }

    async fn run(&mut self, start: ShardStart) -> Result<(), Stop> {
        let checkpoint = self.stored_checkpoint().await?;
        // Resuming inside a KPL aggregate reads it again from its start: the first records
        // delivered say which of its user records were processed (`Batch::resume_after`).
        let mut resume_after = checkpoint.filter(|c| {
            matches!(
                c,
                Checkpoint::Sequence {
                    sub_sequence_number: Some(_),
                    ..
                }
            )
        });
        if checkpoint == Some(Checkpoint::ShardEnd) && start.listed_open {
            // Wrong, unless the shard closed (and was read to its end elsewhere) since the
            // listing the start came from: the next listing decides.
            self.output
                .send(ReaderEvent::EndedWhileListedOpen(Error::EndedShardIsOpen {
                    stream: self.stream_name().to_owned(),
                    namespace: self.shared.checkpointer.namespace().to_owned(),
                    shard: self.shard.to_string(),
                }));
            return Ok(());
        }
        let stored = checkpoint.map(resume_position);
        let from_checkpoint = matches!(stored, Some(Some(_)));
        let mut position = match (stored, start.fallback) {
            (Some(Some(position)), _) => position,
            (Some(None), _) => return self.already_finished(Read::Resumed),
            (None, Fallback::Skip) => return self.already_finished(Read::No),
            (None, Fallback::Read(position)) => position,
        };
        // Without a record-precise start, a start that depends on when it happens is recorded
        // at its first record before that goes out (TRIM_HORIZON is the same position at every
        // start; a start in time was recorded when the iterator opened, this narrows it).
        let started_at_record = checkpoint
            .is_some_and(|c| c.is_progress() || matches!(c, Checkpoint::StartedAt { .. }));
        let mut start_to_record = !started_at_record && position != IteratorPosition::TrimHorizon;
        // A start in time is durable already (stored, or recorded below).
        let mut started_in_time = matches!(checkpoint, Some(Checkpoint::StartedAtTime { .. }));
        tracing::info!(?position, from_checkpoint, "reading shard");
        if from_checkpoint {
            self.output.send(ReaderEvent::Resumed);
        }
        let (mut iterator, opened_at) = self.iterator(position).await?;
        if position == IteratorPosition::Latest {
            // Anchor LATEST in time: if the iterator expires before a record is read, the new
            // one starts at this moment instead of jumping to the tip and losing what came in.
            // Kinesis compares the timestamp with its own clock: start a margin earlier so a
            // clock behind ours loses nothing (at the cost of re-reading that margin).
            let anchor = opened_at
                .checked_sub(LATEST_ANCHOR_MARGIN)
                .unwrap_or(opened_at);
            position = IteratorPosition::AtTimestamp(anchor);
        }
        if !from_checkpoint {
            if let IteratorPosition::AtTimestamp(at) = position {
                // Where a start in time began is durable before anything is read: a run that
                // stops before its first record leaves it too.
                let started = Checkpoint::StartedAtTime {
                    timestamp_millis: millis_since_epoch(at),
                };
                self.record_start(started, true).await?;
                started_in_time = true;
            }
        }

        let shared = self.shared.clone();
        let settings = &shared.settings;
        let limit = settings.records_per_call();
        let mut next_call = Instant::now();
        loop {
            // The timer wheel has millisecond ticks: sleeping until a moment already past can
            // still wait for the next tick, so only sleep when there is time to wait.
            if next_call > Instant::now() {
                sleep_until(next_call).await;
            }
            let mut permit = self.buffer.reserve_records(limit).await;
            let reserved = limit as usize;
            let called_at = Instant::now();
            let answer = timed(
                "GetRecords",
                self.shared
                    .api
                    .get_records(&settings.stream, &self.shard, &iterator, limit as i32),
            )
            .await;
            self.metrics.get_records_call(called_at.elapsed());
            let mut page = match answer {
                Ok(page) => page,
                Err(e) => {
                    drop(permit);
                    match e.kind() {
                        // Retried by this loop: its next call waits out the backoff.
                        KinesisErrorKind::Throttled | KinesisErrorKind::Transient => {
                            let delay = self.backoff.next_delay();
                            backing_off(&self.metrics, "GetRecords", &e, delay);
                            next_call = (Instant::now() + delay)
                                .max(called_at + settings.min_get_records_interval);
                        }
                        KinesisErrorKind::ExpiredIterator => {
                            tracing::info!(?position, "shard iterator expired; renewing it");
                            iterator = self.iterator(position).await?.0;
                            self.metrics.iterator_refreshed();
                            // The failed call counted: keep to the per-shard call rate.
                            next_call = called_at + settings.min_get_records_interval;
                        }
                        _ => return Err(self.stop(e)),
                    }
                    continue;
                }
            };
            self.backoff.reset();
            // A source that answers more records than asked must not overrun the buffer's caps:
            // keep what was asked for and read the rest again after it.
            let clamped = page.records.len() > reserved;
            if clamped {
                tracing::warn!(
                    asked = reserved,
                    answered = page.records.len(),
                    "GetRecords answered more records than asked; keeping the first and reading on after them"
                );
                page.records.truncate(reserved);
            }
            let count = page.records.len();
            let bytes: usize = page.records.iter().map(Record::size).sum();
            self.metrics.read(count, bytes, page.millis_behind_latest);
            if let Some(last) = page.records.last() {
                position = IteratorPosition::AfterSequenceNumber(last.sequence_number);
            }
            tracing::trace!(
                count,
                bytes,
                millis_behind_latest = page.millis_behind_latest,
                "GetRecords"
            );
            self.buffer.settle(&mut permit, count, bytes).await;

            // Pacing: never more than one call per min interval; stay under the per-shard read
            // rate after large answers; wait the poll interval only when caught up.
            let behind = count as u32 >= limit || page.millis_behind_latest.unwrap_or(0) > 0;
            let byte_pace =
                Duration::from_secs_f64(bytes as f64 / settings.read_bytes_per_second as f64);
            next_call = called_at + settings.min_get_records_interval.max(byte_pace);
            if !behind {
                next_call = next_call.max(Instant::now() + settings.poll_interval);
            }

            if start_to_record {
                if let Some(first) = page.records.first() {
                    let started = Checkpoint::StartedAt {
                        sequence_number: first.sequence_number,
                    };
                    self.record_start(started, !started_in_time).await?;
                    start_to_record = false;
                }
            }
            let mut records = page.records;
            if let Some(Checkpoint::Sequence {
                sequence_number, ..
            }) = resume_after
            {
                if records.first().is_some_and(|first| {
                    first.sequence_number == sequence_number && !is_aggregate(&first.data)
                }) {
                    // A plain record is its own only user record (index 0), so a checkpoint
                    // inside it (as the KCL writes for every record) covers it whole.
                    records.remove(0);
                    resume_after = None;
                }
            }
            let mut batch = Batch::new(self.shard.clone(), records);
            batch.millis_behind_latest = page.millis_behind_latest;
            if !batch.is_empty() {
                batch.resume_after = resume_after.take();
            }
            match page.next_iterator {
                _ if clamped => {
                    iterator = self.iterator(position).await?.0;
                    if !self.output.send(ReaderEvent::Batch { batch, permit }) {
                        return Ok(());
                    }
                }
                Some(next) => {
                    iterator = next;
                    if !self.output.send(ReaderEvent::Batch { batch, permit }) {
                        return Ok(());
                    }
                }
                None => {
                    tracing::info!("shard closed and fully read");
                    self.metrics.shard_read();
                    if !page.child_shards.is_empty() {
                        self.output.send(ReaderEvent::Children(page.child_shards));
                    }
                    batch.end = Some(BatchEnd::ShardEnd);
                    self.output.send(ReaderEvent::Batch { batch, permit });
                    return Ok(());
                }
            }
        }
    }

    fn already_finished(&self, read: Read) -> Result<(), Stop> {
        tracing::debug!(?read, "shard needs no reading");
        self.output.send(ReaderEvent::AlreadyFinished { read });
        Ok(())
    }

    /// GetShardIterator, retrying throttling and transient errors with the shard's backoff, as
    /// long as it takes.
    async fn iterator(&mut self, position: IteratorPosition) -> Result<(String, SystemTime), Stop> {
        let (shared, shard, metrics) = (&self.shared, &self.shard, &self.metrics);
        let answer = retry(
            &mut self.backoff,
            u32::MAX,
            KinesisError::is_retryable,
            |error, delay, _| backing_off(metrics, "GetShardIterator", error, delay),
            || async move {
                let opened_at = SystemTime::now();
                let iterator = timed(
                    "GetShardIterator",
                    shared
                        .api
                        .get_shard_iterator(&shared.settings.stream, shard, position),
                )
                .await?;
                Ok((iterator, opened_at))
            },
        )
        .await;
        answer.map_err(|e| self.stop(e))
    }
}

/// Notes a throttled or transient failure of `call` that the reader backs off from for `delay`.
fn backing_off(metrics: &ReaderMetrics, call: &str, error: &KinesisError, delay: Duration) {
    if error.kind() == KinesisErrorKind::Throttled {
        metrics.throttled();
    }
    tracing::warn!(%error, ?delay, "{call} failed; backing off");
}

/// Where to resume after a stored checkpoint; `None` when the shard has ended.
fn resume_position(checkpoint: Checkpoint) -> Option<IteratorPosition> {
    match checkpoint {
        Checkpoint::ShardEnd => None,
        // Nothing processed yet: read again from where the first run started.
        Checkpoint::StartedAt { sequence_number } => {
            Some(IteratorPosition::AtSequenceNumber(sequence_number))
        }
        Checkpoint::StartedAtTime { timestamp_millis } => Some(IteratorPosition::AtTimestamp(
            SystemTime::UNIX_EPOCH + Duration::from_millis(timestamp_millis),
        )),
        Checkpoint::Sequence {
            sequence_number,
            sub_sequence_number: None,
        } => Some(IteratorPosition::AfterSequenceNumber(sequence_number)),
        // Part of a KPL aggregate was processed: read the aggregate again; the first batch
        // carries the checkpoint in `resume_after`, so a deaggregating layer drops the user
        // records already processed (without one they come again: at least once).
        Checkpoint::Sequence {
            sequence_number,
            sub_sequence_number: Some(_),
        } => Some(IteratorPosition::AtSequenceNumber(sequence_number)),
        // A kind this version does not know: read the whole shard rather than skip any of it.
        _ => Some(IteratorPosition::TrimHorizon),
    }
}

/// Milliseconds since the Unix epoch (0 before it).
fn millis_since_epoch(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
