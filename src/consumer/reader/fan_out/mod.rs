//! The enhanced fan-out reader: one SubscribeToShard subscription per shard at a time, its
//! events into the shard's buffer, subscribed again after the last record delivered whenever a
//! subscription ends (Kinesis ends each after 5 minutes), breaks, or is cancelled because the
//! handler stalled.

mod registration;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use futures::StreamExt;
use kinesis_tower_layers::metric_names as names;
use kinesis_tower_layers::{BatchEnd, Record, ShardId};
use metrics::Counter;
use tokio::time::{timeout, Instant};

use super::buffer::{BufferPermit, ShardBuffer};
use super::context::{report, ShardContext, Stop};
use super::cursor::Cursor;
use super::{ReaderEvent, ReaderOutput, ShardReader};
use crate::consumer::assignment::ShardStart;
use crate::consumer::handle::Shared;
use crate::consumer::settings::EnhancedFanOut;
use crate::kinesis::{timed, ChildShard, KinesisErrorKind, Subscription, SubscriptionEvent};
use registration::Registration;

/// The longest a subscription may go without an event before it counts as broken (Kinesis
/// sends one at least every 5 seconds, records or not).
const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a caught-up subscription stays quiet before the reader checks, by polling once,
/// whether the shard has closed (Kinesis says so in the subscription's last event, but an
/// emulator may not); the check backs off, doubling up to [`END_CHECK_MAX`], while the shard
/// stays quiet.
const END_CHECK_FIRST: Duration = Duration::from_secs(5);
const END_CHECK_MAX: Duration = Duration::from_secs(300);

/// Reads shards through enhanced fan-out.
pub(crate) struct FanOutReader {
    shared: Arc<Shared>,
    registration: Arc<Registration>,
}

impl FanOutReader {
    pub(crate) fn new(shared: Arc<Shared>, fan_out: EnhancedFanOut) -> Self {
        Self {
            registration: Arc::new(Registration::new(shared.clone(), fan_out)),
            shared,
        }
    }
}

impl ShardReader for FanOutReader {
    fn read(
        &self,
        start: ShardStart,
        buffer: ShardBuffer,
        output: ReaderOutput,
    ) -> BoxFuture<'static, ()> {
        let shared = self.shared.clone();
        let registration = self.registration.clone();
        Box::pin(async move {
            let shard = start.shard_id.clone();
            let metrics = FanOutMetrics::new(shared.settings.stream.stream_name(), &shard);
            let mut reader = Reader {
                ctx: ShardContext::new(shared, shard, buffer, output.clone()),
                registration,
                metrics,
                end_check: EndCheck::new(),
            };
            report(&output, reader.run(start).await);
        })
    }

    fn finish(&self) -> BoxFuture<'static, ()> {
        let registration = self.registration.clone();
        Box::pin(async move { registration.finish().await })
    }
}

/// The fan-out reader's own counters (the read counters are the polling reader's).
struct FanOutMetrics {
    subscriptions: Counter,
    resubscriptions: Counter,
    events: Counter,
}

impl FanOutMetrics {
    fn new(stream: &str, shard: &ShardId) -> Self {
        let labels = names::labels(stream.to_owned(), shard);
        Self {
            subscriptions: metrics::counter!(names::SUBSCRIPTIONS_TOTAL, labels.clone()),
            resubscriptions: metrics::counter!(names::RESUBSCRIPTIONS_TOTAL, labels.clone()),
            events: metrics::counter!(names::SUBSCRIPTION_EVENTS_TOTAL, labels),
        }
    }
}

/// How one subscription ended, short of the shard's end.
enum Ended {
    /// Over (the server ended it, it broke, it was cut short): subscribe again at once.
    Resubscribe,
    /// The handler stalled: the subscription was cancelled; subscribe again when there is room.
    Stalled,
    /// The shard was read to its end, or the consumer stopped listening.
    Done,
}

struct Reader {
    ctx: ShardContext,
    registration: Arc<Registration>,
    metrics: FanOutMetrics,
    end_check: EndCheck,
}

/// When a quiet shard is next checked for its end.
struct EndCheck {
    at: Instant,
    interval: Duration,
}

impl EndCheck {
    fn new() -> Self {
        Self {
            at: Instant::now() + END_CHECK_FIRST,
            interval: END_CHECK_FIRST,
        }
    }

    /// Records arrived: the shard is not quiet.
    fn reset(&mut self) {
        *self = Self::new();
    }

    /// Whether a check is due; if so, the next one is twice as far.
    fn due(&mut self) -> bool {
        let now = Instant::now();
        if now < self.at {
            return false;
        }
        self.interval = (self.interval * 2).min(END_CHECK_MAX);
        self.at = now + self.interval;
        true
    }
}

impl Reader {
    async fn run(&mut self, start: ShardStart) -> Result<(), Stop> {
        let Some(mut cursor) = Cursor::open(&self.ctx, &start).await? else {
            return Ok(());
        };
        let consumer_arn = self.registration.consumer_arn().await?;
        let mut subscribed_before = false;
        loop {
            let opened_at = SystemTime::now();
            let subscription = self.subscribe(&consumer_arn, &cursor).await?;
            if std::mem::replace(&mut subscribed_before, true) {
                self.metrics.resubscriptions.increment(1);
            }
            self.metrics.subscriptions.increment(1);
            cursor.opened(&self.ctx, opened_at).await?;
            match self.read_subscription(subscription, &mut cursor).await? {
                Ended::Done => return Ok(()),
                Ended::Resubscribe => {}
                Ended::Stalled => {
                    // Wait, without a subscription, until the handler has made room.
                    drop(self.ctx.buffer.reserve_records(self.limit()).await);
                }
            }
        }
    }

    /// Records one event may bring: never more than the shard's buffer may hold.
    fn limit(&self) -> u32 {
        self.ctx.shared.settings.records_per_call()
    }

    /// SubscribeToShard at the cursor, retrying throttling, passing failures and
    /// ResourceInUse (a shard subscribed again within 5 seconds) with the shard's backoff, as
    /// long as it takes. A consumer that is gone is an error that says so.
    async fn subscribe(
        &mut self,
        consumer_arn: &str,
        cursor: &Cursor,
    ) -> Result<Subscription, Stop> {
        loop {
            let position = cursor.position();
            let shared = &self.ctx.shared;
            let answer = timed(
                "SubscribeToShard",
                shared
                    .api
                    .subscribe_to_shard(consumer_arn, &self.ctx.shard, position),
            )
            .await;
            match answer {
                Ok(subscription) => {
                    tracing::debug!(?position, "subscribed");
                    return Ok(subscription);
                }
                Err(e) if e.is_retryable() => {
                    let delay = self.ctx.backoff.next_delay();
                    self.ctx.backing_off("SubscribeToShard", &e, delay);
                    tokio::time::sleep(delay).await;
                }
                Err(e) if e.kind() == KinesisErrorKind::ResourceNotFound => {
                    // The shard expired (the consumer checks the listing), or the consumer was
                    // deregistered under us.
                    return Err(match self.registration.is_gone(consumer_arn).await {
                        Ok(true) => Stop::Failed(self.registration.error(
                            "it was deregistered while this consumer was reading through it: \
                             run again to register it anew, and deregister only when no \
                             worker runs",
                            Some(e),
                        )),
                        Ok(false) => self.ctx.stop(e),
                        Err(lookup) => {
                            tracing::warn!(error = %lookup, "could not check the stream consumer");
                            self.ctx.stop(e)
                        }
                    });
                }
                Err(e) if e.kind() == KinesisErrorKind::AccessDenied => {
                    return Err(Stop::Failed(
                        self.registration
                            .error("SubscribeToShard was refused", Some(e)),
                    ));
                }
                Err(e) => return Err(self.ctx.stop(e)),
            }
        }
    }

    /// Waits for room for `records` more records in the shard's buffer; `None` when the
    /// handler has not made room within the stall timeout.
    async fn room(&self, records: u32) -> Option<BufferPermit> {
        let stall_timeout = self.registration.stall_timeout();
        match timeout(stall_timeout, self.ctx.buffer.reserve_records(records)).await {
            Ok(permit) => Some(permit),
            Err(_) => {
                tracing::info!(
                    ?stall_timeout,
                    "handler stalled; subscription cancelled until there is room"
                );
                None
            }
        }
    }

    /// Reads one subscription's events into the shard's buffer until it ends.
    async fn read_subscription(
        &mut self,
        mut subscription: Subscription,
        cursor: &mut Cursor,
    ) -> Result<Ended, Stop> {
        let limit = self.limit();
        let mut events = 0u64;
        loop {
            // Room first: while the buffer is full no event is pulled (the transport's flow
            // control holds the rest back); a handler stalled past the timeout cancels the
            // subscription (dropped on return) rather than leaving it hanging.
            let Some(permit) = self.room(limit).await else {
                return Ok(Ended::Stalled);
            };
            let (event, failure) = match timeout(EVENT_TIMEOUT, subscription.next()).await {
                Ok(Some(Ok(event))) => (Some(event), None),
                Ok(Some(Err(e))) if !e.is_retryable() => return Err(self.ctx.stop(e)),
                Ok(Some(Err(e))) => (None, Some(e)),
                Ok(None) => {
                    tracing::debug!("subscription ended; subscribing again");
                    (None, None)
                }
                Err(_) => {
                    tracing::warn!(
                        ?EVENT_TIMEOUT,
                        "no event from the subscription; subscribing again"
                    );
                    (None, None)
                }
            };
            let Some(event) = event else {
                drop(permit);
                // A failure, or a subscription that ended without a single event (a server
                // closing it at once must not make a busy loop), waits out the backoff.
                if failure.is_some() || events == 0 {
                    let delay = self.ctx.backoff.next_delay();
                    if let Some(e) = &failure {
                        self.ctx.backing_off("SubscribeToShard", e, delay);
                    }
                    tokio::time::sleep(delay).await;
                }
                return Ok(Ended::Resubscribe);
            };
            events += 1;
            self.ctx.backoff.reset();
            self.metrics.events.increment(1);
            let announced_end = event.is_shard_end();
            let SubscriptionEvent {
                mut records,
                millis_behind_latest,
                child_shards,
                ..
            } = event;
            // Sequence numbers only grow within a shard: a server that answers a subscription
            // from an earlier position than asked (an emulator replaying the shard) must not
            // make the consumer deliver a record twice.
            let before = records.len();
            records.retain(|r| !cursor.is_behind(r.sequence_number));
            if records.len() < before {
                tracing::warn!(
                    dropped = before - records.len(),
                    position = ?cursor.position(),
                    "the subscription sent records from before its starting position; dropped them"
                );
            }
            let bytes: usize = records.iter().map(Record::size).sum();
            self.ctx
                .metrics
                .read(records.len(), bytes, millis_behind_latest);
            tracing::trace!(
                count = records.len(),
                bytes,
                millis_behind_latest,
                "SubscribeToShard event"
            );
            // Nothing to deliver now (whatever the lag says: an emulator may report a closed
            // shard's age as lag).
            let quiet = records.is_empty();
            if !quiet {
                self.end_check.reset();
            }
            let mut shard_end = announced_end.then_some(child_shards);
            if shard_end.is_none() && quiet && self.end_check.due() {
                shard_end = self.closed_and_read(cursor).await;
            }
            // An event may bring more records than the buffer has room for at once: they go
            // out in parts, each when there is room for it (memory stays within the caps plus
            // one event).
            let mut parts = split_into_parts(records, limit as usize)
                .into_iter()
                .peekable();
            let mut permit = Some(permit);
            while let Some(part) = parts.next() {
                let mut permit = match permit.take() {
                    Some(permit) => permit,
                    None => match self.room(limit).await {
                        Some(permit) => permit,
                        // What is left of the event is read again after what went out.
                        None => return Ok(Ended::Stalled),
                    },
                };
                let part_bytes = part.iter().map(Record::size).sum();
                let stall_timeout = self.registration.stall_timeout();
                let settled = self.ctx.buffer.settle(&mut permit, part.len(), part_bytes);
                if timeout(stall_timeout, settled).await.is_err() {
                    // Stalled on the byte cap: this part and the rest are read again.
                    tracing::info!(
                        ?stall_timeout,
                        "handler stalled; subscription cancelled until there is room"
                    );
                    return Ok(Ended::Stalled);
                }
                let mut batch = cursor.batch(&self.ctx, part, millis_behind_latest).await?;
                if parts.peek().is_none() {
                    if let Some(child_shards) = shard_end.take() {
                        tracing::info!("shard closed and fully read");
                        self.ctx.metrics.shard_read();
                        if !child_shards.is_empty() {
                            self.ctx.output.send(ReaderEvent::Children(child_shards));
                        }
                        batch.end = Some(BatchEnd::ShardEnd);
                        self.ctx.output.send(ReaderEvent::Batch { batch, permit });
                        return Ok(Ended::Done);
                    }
                }
                if !self.ctx.output.send(ReaderEvent::Batch { batch, permit }) {
                    return Ok(Ended::Done);
                }
            }
        }
    }

    /// Whether the shard is closed and read to its end at the cursor, asked with one
    /// GetRecords (Kinesis ends a closed shard's subscription with an event naming the
    /// children; an emulator that does not would leave the shard's children waiting for
    /// ever). Its children when it is; `None` when it is not, or the check failed (it is only
    /// a check: the next one comes later).
    async fn closed_and_read(&self, cursor: &Cursor) -> Option<Vec<ChildShard>> {
        let shared = &self.ctx.shared;
        let stream = &shared.settings.stream;
        let checked = async {
            let iterator = timed(
                "GetShardIterator",
                shared
                    .api
                    .get_shard_iterator(stream, &self.ctx.shard, cursor.position()),
            )
            .await?;
            timed(
                "GetRecords",
                shared
                    .api
                    .get_records(stream, &self.ctx.shard, &iterator, 1),
            )
            .await
        };
        match checked.await {
            Ok(page) if page.records.is_empty() && page.next_iterator.is_none() => {
                tracing::debug!("the quiet shard is closed and read to its end");
                Some(page.child_shards)
            }
            Ok(_) => None,
            Err(error) => {
                tracing::debug!(%error, "could not check whether the quiet shard has ended");
                None
            }
        }
    }
}

/// `records` in parts of at most `size` (one empty part when there are none: an event without
/// records still goes out, as a heartbeat).
fn split_into_parts(mut records: Vec<Record>, size: usize) -> Vec<Vec<Record>> {
    if records.len() <= size {
        return vec![records];
    }
    let mut parts = Vec::with_capacity(records.len().div_ceil(size));
    while records.len() > size {
        let rest = records.split_off(size);
        parts.push(std::mem::replace(&mut records, rest));
    }
    parts.push(records);
    parts
}

#[cfg(test)]
mod tests {
    use kinesis_tower_layers::testing::record;

    use super::split_into_parts;

    #[test]
    fn events_are_split_into_parts_in_order() {
        let records: Vec<_> = (0..25u64).map(|n| record("s", n)).collect();
        let parts = split_into_parts(records.clone(), 10);
        assert_eq!(parts.iter().map(Vec::len).collect::<Vec<_>>(), [10, 10, 5]);
        assert_eq!(parts.concat(), records);
        assert_eq!(split_into_parts(Vec::new(), 10), vec![Vec::new()]);
        assert_eq!(split_into_parts(records[..10].to_vec(), 10).len(), 1);
    }
}
