//! The polling reader: one task per shard, GetRecords in a loop, into the shard's buffer.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use kinesis_tower_layers::{BatchEnd, Record};
use tokio::time::{sleep_until, Instant};

use super::buffer::ShardBuffer;
use super::context::{backing_off, report, ShardContext, Stop};
use super::cursor::Cursor;
use super::{ReaderEvent, ReaderOutput, ShardReader};
use crate::consumer::assignment::ShardStart;
use crate::consumer::handle::Shared;
use crate::kinesis::{timed, IteratorPosition, KinesisError, KinesisErrorKind};
use crate::retrying::retry;

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
            let shard = start.shard_id.clone();
            let mut reader = Reader {
                ctx: ShardContext::new(shared, shard, buffer, output.clone()),
            };
            report(&output, reader.run(start).await);
        })
    }
}

struct Reader {
    ctx: ShardContext,
}

impl Reader {
    async fn run(&mut self, start: ShardStart) -> Result<(), Stop> {
        let Some(mut cursor) = Cursor::open(&self.ctx, &start).await? else {
            return Ok(());
        };
        let (mut iterator, opened_at) = self.iterator(cursor.position()).await?;
        cursor.opened(&self.ctx, opened_at).await?;

        let shared = self.ctx.shared.clone();
        let settings = &shared.settings;
        let limit = settings.records_per_call();
        let mut next_call = Instant::now();
        loop {
            // The timer wheel has millisecond ticks: sleeping until a moment already past can
            // still wait for the next tick, so only sleep when there is time to wait.
            if next_call > Instant::now() {
                sleep_until(next_call).await;
            }
            let mut permit = self.ctx.buffer.reserve_records(limit).await;
            let reserved = limit as usize;
            let called_at = Instant::now();
            let answer = timed(
                "GetRecords",
                shared
                    .api
                    .get_records(&settings.stream, &self.ctx.shard, &iterator, limit as i32),
            )
            .await;
            self.ctx.metrics.get_records_call(called_at.elapsed());
            let mut page = match answer {
                Ok(page) => page,
                Err(e) => {
                    drop(permit);
                    match e.kind() {
                        // Retried by this loop: its next call waits out the backoff.
                        KinesisErrorKind::Throttled
                        | KinesisErrorKind::Transient
                        | KinesisErrorKind::ResourceInUse => {
                            let delay = self.ctx.backoff.next_delay();
                            self.ctx.backing_off("GetRecords", &e, delay);
                            next_call = (Instant::now() + delay)
                                .max(called_at + settings.min_get_records_interval);
                        }
                        KinesisErrorKind::ExpiredIterator => {
                            let position = cursor.position();
                            tracing::info!(?position, "shard iterator expired; renewing it");
                            iterator = self.iterator(position).await?.0;
                            self.ctx.metrics.iterator_refreshed();
                            // The failed call counted: keep to the per-shard call rate.
                            next_call = called_at + settings.min_get_records_interval;
                        }
                        _ => return Err(self.ctx.stop(e)),
                    }
                    continue;
                }
            };
            self.ctx.backoff.reset();
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
            self.ctx
                .metrics
                .read(count, bytes, page.millis_behind_latest);
            tracing::trace!(
                count,
                bytes,
                millis_behind_latest = page.millis_behind_latest,
                "GetRecords"
            );
            self.ctx.buffer.settle(&mut permit, count, bytes).await;

            // Pacing: never more than one call per min interval; stay under the per-shard read
            // rate after large answers; wait the poll interval only when caught up.
            let behind = count as u32 >= limit || page.millis_behind_latest.unwrap_or(0) > 0;
            let byte_pace =
                Duration::from_secs_f64(bytes as f64 / settings.read_bytes_per_second as f64);
            next_call = called_at + settings.min_get_records_interval.max(byte_pace);
            if !behind {
                next_call = next_call.max(Instant::now() + settings.poll_interval);
            }

            let mut batch = cursor
                .batch(&self.ctx, page.records, page.millis_behind_latest)
                .await?;
            match page.next_iterator {
                _ if clamped => {
                    iterator = self.iterator(cursor.position()).await?.0;
                    if !self.ctx.output.send(ReaderEvent::Batch { batch, permit }) {
                        return Ok(());
                    }
                }
                Some(next) => {
                    iterator = next;
                    if !self.ctx.output.send(ReaderEvent::Batch { batch, permit }) {
                        return Ok(());
                    }
                }
                None => {
                    tracing::info!("shard closed and fully read");
                    self.ctx.metrics.shard_read();
                    if !page.child_shards.is_empty() {
                        self.ctx
                            .output
                            .send(ReaderEvent::Children(page.child_shards));
                    }
                    batch.end = Some(BatchEnd::ShardEnd);
                    self.ctx.output.send(ReaderEvent::Batch { batch, permit });
                    return Ok(());
                }
            }
        }
    }

    /// GetShardIterator, retrying throttling and transient errors with the shard's backoff, as
    /// long as it takes.
    async fn iterator(&mut self, position: IteratorPosition) -> Result<(String, SystemTime), Stop> {
        let ctx = &mut self.ctx;
        let (shared, shard, metrics) = (&ctx.shared, &ctx.shard, &ctx.metrics);
        let answer = retry(
            &mut ctx.backoff,
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
        answer.map_err(|e| self.ctx.stop(e))
    }
}
