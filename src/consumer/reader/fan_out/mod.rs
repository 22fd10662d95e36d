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
use tokio::time::timeout;

use super::buffer::ShardBuffer;
use super::context::{report, ShardContext, Stop};
use super::cursor::Cursor;
use super::{ReaderEvent, ReaderOutput, ShardReader};
use crate::consumer::assignment::ShardStart;
use crate::consumer::handle::Shared;
use crate::consumer::settings::EnhancedFanOut;
use crate::kinesis::{timed, KinesisErrorKind, Subscription, SubscriptionEvent};
use registration::Registration;

/// The longest a subscription may go without an event before it counts as broken (Kinesis
/// sends one at least every 5 seconds, records or not).
const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

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
                    // The shard expired, or the consumer was deregistered under us.
                    let api = &shared.api;
                    let stream = &shared.settings.stream;
                    let consumer_exists = match api.stream_arn(stream).await {
                        Ok(stream_arn) => api
                            .describe_stream_consumer(&stream_arn, self.registration.name())
                            .await
                            .map(|c| c.arn == consumer_arn)
                            .unwrap_or(false),
                        Err(_) => true,
                    };
                    if consumer_exists {
                        return Err(self.ctx.stop(e));
                    }
                    return Err(Stop::Failed(self.registration.error(
                        "it was deregistered while this consumer was reading through it: \
                         run again to register it anew, and deregister only when no worker runs",
                        Some(e),
                    )));
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

    /// Reads one subscription's events into the shard's buffer until it ends.
    async fn read_subscription(
        &mut self,
        mut subscription: Subscription,
        cursor: &mut Cursor,
    ) -> Result<Ended, Stop> {
        let limit = self.limit();
        let stall_timeout = self.registration.stall_timeout();
        loop {
            // Room first: while the buffer is full no event is pulled (the transport's flow
            // control holds the rest back); a handler stalled past the timeout cancels the
            // subscription rather than leaving it hanging.
            let mut permit =
                match timeout(stall_timeout, self.ctx.buffer.reserve_records(limit)).await {
                    Ok(permit) => permit,
                    Err(_) => {
                        drop(subscription);
                        tracing::info!(
                            ?stall_timeout,
                            "handler stalled; subscription cancelled until there is room"
                        );
                        return Ok(Ended::Stalled);
                    }
                };
            let event: SubscriptionEvent = match timeout(EVENT_TIMEOUT, subscription.next()).await {
                Err(_) => {
                    tracing::warn!(
                        ?EVENT_TIMEOUT,
                        "no event from the subscription; subscribing again"
                    );
                    return Ok(Ended::Resubscribe);
                }
                Ok(None) => {
                    tracing::debug!("subscription ended; subscribing again");
                    return Ok(Ended::Resubscribe);
                }
                Ok(Some(Err(e))) => {
                    if e.is_retryable() {
                        let delay = self.ctx.backoff.next_delay();
                        self.ctx.backing_off("SubscribeToShard", &e, delay);
                        tokio::time::sleep(delay).await;
                        return Ok(Ended::Resubscribe);
                    }
                    return Err(self.ctx.stop(e));
                }
                Ok(Some(Ok(event))) => event,
            };
            self.ctx.backoff.reset();
            self.metrics.events.increment(1);
            let shard_end = event.is_shard_end();
            let SubscriptionEvent {
                mut records,
                millis_behind_latest,
                child_shards,
                ..
            } = event;
            // An event larger than asked for must not overrun the buffer's caps: keep what fits
            // and subscribe again after it.
            let clamped = records.len() > limit as usize;
            if clamped {
                tracing::warn!(
                    room = limit,
                    answered = records.len(),
                    "a subscription event brought more records than the buffer has room for; keeping the first and subscribing again after them"
                );
                records.truncate(limit as usize);
            }
            let count = records.len();
            let bytes: usize = records.iter().map(Record::size).sum();
            self.ctx.metrics.read(count, bytes, millis_behind_latest);
            tracing::trace!(count, bytes, millis_behind_latest, "SubscribeToShard event");
            self.ctx.buffer.settle(&mut permit, count, bytes).await;
            let mut batch = cursor
                .batch(&self.ctx, records, millis_behind_latest)
                .await?;
            if shard_end && !clamped {
                tracing::info!("shard closed and fully read");
                self.ctx.metrics.shard_read();
                if !child_shards.is_empty() {
                    self.ctx.output.send(ReaderEvent::Children(child_shards));
                }
                batch.end = Some(BatchEnd::ShardEnd);
                self.ctx.output.send(ReaderEvent::Batch { batch, permit });
                return Ok(Ended::Done);
            }
            if !self.ctx.output.send(ReaderEvent::Batch { batch, permit }) {
                return Ok(Ended::Done);
            }
            if clamped {
                return Ok(Ended::Resubscribe);
            }
        }
    }
}
