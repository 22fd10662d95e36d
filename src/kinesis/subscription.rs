//! Enhanced fan-out types: a registered stream consumer and the events of a subscription.

use futures::stream::BoxStream;
use kinesis_tower_layers::Record;

use super::{ChildShard, KinesisError};

/// The state of a registered stream consumer: it can subscribe only when `Active`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConsumerStatus {
    /// Being registered.
    Creating,
    /// Ready: shards can be subscribed.
    Active,
    /// Being deregistered.
    Deleting,
}

/// An enhanced fan-out consumer registered on a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamConsumer {
    /// The name it was registered with.
    pub name: String,
    /// Its ARN, which SubscribeToShard takes.
    pub arn: String,
    /// Whether it can be used yet.
    pub status: ConsumerStatus,
}

/// One event of a SubscribeToShard subscription.
#[derive(Clone, Debug, Default)]
pub struct SubscriptionEvent {
    /// The records, in shard order (possibly none: Kinesis sends events on quiet shards too).
    pub records: Vec<Record>,
    /// Where the subscription has got to, as Kinesis reports it.
    pub continuation_sequence_number: Option<String>,
    /// How far behind the tip of the shard this event is.
    pub millis_behind_latest: Option<i64>,
    /// At the end of a closed shard: its children (the subscription ends after this event).
    pub child_shards: Vec<ChildShard>,
}

impl SubscriptionEvent {
    /// Whether this is the shard's last event: the shard is closed and read to its end.
    /// Kinesis marks it by listing the children (only the end of a shard does) and giving no
    /// continuation; an emulator that lists the children on every event of a closed shard ends
    /// it with an event without records.
    pub fn is_shard_end(&self) -> bool {
        !self.child_shards.is_empty()
            && (self.continuation_sequence_number.is_none() || self.records.is_empty())
    }
}

/// A live subscription: its events in order; the stream ends when the subscription does.
/// Dropping it cancels the subscription.
pub type Subscription = BoxStream<'static, Result<SubscriptionEvent, KinesisError>>;
