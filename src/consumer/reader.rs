//! The polling reader: one task per shard, GetRecords in a loop, into the shard's buffer.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kinesis_tower_layers::{Batch, BatchEnd, Checkpoint, Record, ShardId};
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::{sleep_until, Instant};

use super::buffer::{BufferPermit, ShardBuffer};
use super::lineage::Fallback;
use super::reader_metrics::ReaderMetrics;
use super::Shared;
use crate::backoff::Backoff;
use crate::kinesis::{
    timed, ChildShard, IteratorPosition, KinesisError, KinesisErrorKind, ShardDescription,
};
use crate::Error;

/// What readers and the shard lister tell the dispatcher.
#[derive(Debug)]
pub(crate) enum Event {
    /// Records (or a heartbeat, or the last batch of a closed shard) with their buffer room.
    Batch { batch: Batch, permit: BufferPermit },
    /// A closed shard's children, reported before its last batch.
    Children(Vec<ChildShard>),
    /// The shard needs no reading: its checkpoint says it ended, or it is skipped.
    AlreadyFinished { shard: ShardId, read: bool },
    /// The shard's reader hit an error that retrying will not fix.
    Failed { shard: ShardId, error: Error },
    /// Kinesis says the shard does not exist: expired, or the stream is gone. `error` is what
    /// to report if a listing still shows the shard.
    ShardGone { shard: ShardId, error: Error },
    /// A complete ListShards answer, or an error that retrying will not fix.
    Listing(Result<Vec<ShardDescription>, Error>),
    /// ListShards kept failing for a passing reason; the next refresh tries again.
    ListingUnavailable(crate::kinesis::KinesisError),
}

/// Why a reader ended early.
pub(crate) enum Stop {
    /// Retrying will not help.
    Failed(Error),
    /// The shard was not found: expired, or the stream is gone (the dispatcher checks).
    Gone(Error),
}

impl From<Error> for Stop {
    fn from(error: Error) -> Self {
        Stop::Failed(error)
    }
}

/// How much earlier than our clock an expired LATEST iterator is renewed (see `Reader::run`).
const LATEST_ANCHOR_MARGIN: Duration = Duration::from_secs(30);

/// How many times a retryable checkpoint-store error is retried before it ends the consumer.
const STORE_ATTEMPTS: u32 = 5;

/// Reads one shard until it ends, or until the task is cancelled.
pub(crate) async fn read_shard(
    shared: Arc<Shared>,
    shard: ShardId,
    fallback: Fallback,
    buffer: ShardBuffer,
    events: UnboundedSender<Event>,
) {
    let backoff = Backoff::new(shared.settings.backoff_base, shared.settings.backoff_max);
    let metrics = ReaderMetrics::new(shared.settings.stream.stream_name(), &shard);
    let mut reader = Reader {
        metrics,
        shared,
        shard: shard.clone(),
        buffer,
        events: events.clone(),
        backoff,
    };
    match reader.run(fallback).await {
        Ok(()) => {}
        Err(Stop::Gone(error)) => {
            let _ = events.send(Event::ShardGone { shard, error });
        }
        Err(Stop::Failed(error)) => {
            tracing::error!(%error, "shard reader stopped");
            let _ = events.send(Event::Failed { shard, error });
        }
    }
}

struct Reader {
    shared: Arc<Shared>,
    shard: ShardId,
    buffer: ShardBuffer,
    events: UnboundedSender<Event>,
    backoff: Backoff,
    metrics: ReaderMetrics,
}

impl Reader {
    fn stream_name(&self) -> &str {
        self.shared.settings.stream.stream_name()
    }

    /// The shard's stored checkpoint, retrying what the store says is passing.
    async fn stored_checkpoint(&mut self) -> Result<Option<Checkpoint>, Error> {
        loop {
            match self.shared.checkpointer.get(&self.shard).await {
                Ok(checkpoint) => return Ok(checkpoint),
                Err(e) if e.is_retryable() && self.backoff.attempts() < STORE_ATTEMPTS => {
                    let delay = self.backoff.next_delay();
                    tracing::warn!(error = %e, ?delay, "reading the checkpoint failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(source) => {
                    return Err(Error::Store {
                        stream: self.stream_name().to_owned(),
                        shard: Some(self.shard.to_string()),
                        source: Box::new(source),
                    })
                }
            }
        }
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

    async fn run(&mut self, fallback: Fallback) -> Result<(), Stop> {
        let checkpoint = self.stored_checkpoint().await?;
        self.backoff.reset();
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
        let stored = checkpoint.map(resume_position);
        let from_checkpoint = matches!(stored, Some(Some(_)));
        let mut position = match (stored, fallback) {
            (Some(Some(position)), _) => position,
            (Some(None), _) => return self.already_finished(true),
            (None, Fallback::Skip) => return self.already_finished(false),
            (None, Fallback::Read(position)) => position,
        };
        tracing::info!(?position, from_checkpoint, "reading shard");
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
            let called_at = Instant::now();
            let answer = timed(
                "GetRecords",
                self.shared
                    .api
                    .get_records(&settings.stream, &self.shard, &iterator, limit as i32),
            )
            .await;
            self.metrics.get_records_call(called_at.elapsed());
            let page = match answer {
                Ok(page) => page,
                Err(e) => {
                    drop(permit);
                    match e.kind() {
                        KinesisErrorKind::Throttled | KinesisErrorKind::Transient => {
                            if e.kind() == KinesisErrorKind::Throttled {
                                self.metrics.throttled();
                            }
                            let delay = self.backoff.next_delay();
                            tracing::warn!(error = %e, ?delay, "GetRecords failed; backing off");
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

            let mut batch = Batch::new(self.shard.clone(), page.records);
            batch.millis_behind_latest = page.millis_behind_latest;
            if !batch.is_empty() {
                batch.resume_after = resume_after.take();
            }
            match page.next_iterator {
                Some(next) => {
                    iterator = next;
                    if self.events.send(Event::Batch { batch, permit }).is_err() {
                        return Ok(());
                    }
                }
                None => {
                    tracing::info!("shard closed and fully read");
                    self.metrics.shard_read();
                    if !page.child_shards.is_empty() {
                        let _ = self.events.send(Event::Children(page.child_shards));
                    }
                    batch.end = Some(BatchEnd::ShardEnd);
                    let _ = self.events.send(Event::Batch { batch, permit });
                    return Ok(());
                }
            }
        }
    }

    fn already_finished(&self, read: bool) -> Result<(), Stop> {
        tracing::debug!(read, "shard needs no reading");
        let _ = self.events.send(Event::AlreadyFinished {
            shard: self.shard.clone(),
            read,
        });
        Ok(())
    }

    /// GetShardIterator, retrying throttling and transient errors with backoff.
    async fn iterator(&mut self, position: IteratorPosition) -> Result<(String, SystemTime), Stop> {
        loop {
            let opened_at = SystemTime::now();
            let answer = timed(
                "GetShardIterator",
                self.shared.api.get_shard_iterator(
                    &self.shared.settings.stream,
                    &self.shard,
                    position,
                ),
            )
            .await;
            match answer {
                Ok(iterator) => {
                    self.backoff.reset();
                    return Ok((iterator, opened_at));
                }
                Err(e) if e.is_retryable() => {
                    if e.kind() == KinesisErrorKind::Throttled {
                        self.metrics.throttled();
                    }
                    let delay = self.backoff.next_delay();
                    tracing::warn!(error = %e, ?delay, "GetShardIterator failed; backing off");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(self.stop(e)),
            }
        }
    }
}

/// Where to resume after a stored checkpoint; `None` when the shard has ended.
fn resume_position(checkpoint: Checkpoint) -> Option<IteratorPosition> {
    match checkpoint {
        Checkpoint::ShardEnd => None,
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
    }
}
