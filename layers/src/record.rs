//! Records and batches: what the consumer hands to a handler.

use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use bytes::Bytes;
use tokio::time::Instant;

use crate::checkpoint::Checkpoint;
use crate::partition_key::PartitionKey;
use crate::records::Records;
use crate::sequence::SequenceNumber;

/// A shard id such as `shardId-000000000003`; cheap to clone (shared).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(Arc<str>);

impl ShardId {
    /// Wraps a shard id.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        Self(id.into())
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for ShardId {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for ShardId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for ShardId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for ShardId {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<String> for ShardId {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl fmt::Debug for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// One Kinesis record, or one user record of a KPL aggregate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The shard the record was read from.
    pub shard_id: ShardId,
    /// The record's sequence number (for a user record of an aggregate: the aggregate's).
    pub sequence_number: SequenceNumber,
    /// For a user record taken out of a KPL aggregate: its index inside the aggregate.
    pub sub_sequence_number: Option<u64>,
    /// The partition key.
    pub partition_key: PartitionKey,
    /// The explicit hash key, when the producer set one.
    pub explicit_hash_key: Option<Arc<str>>,
    /// The payload.
    pub data: Bytes,
    /// When Kinesis accepted the record, as Kinesis reports it (millisecond precision).
    pub approximate_arrival_timestamp: Option<SystemTime>,
}

impl Record {
    /// The checkpoint that marks this record (and everything before it in its shard) processed.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint::Sequence {
            sequence_number: self.sequence_number,
            sub_sequence_number: self.sub_sequence_number,
        }
    }

    /// The size the record counts for in buffer limits: its data plus its partition key.
    pub fn size(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }
}

/// Why a shard's run of batches ended; the last batch of a shard carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BatchEnd {
    /// The shard is closed (split or merged) and every record of it has been read. Once this
    /// batch is handled successfully the shard's checkpoint becomes [`Checkpoint::ShardEnd`] and
    /// its children may start.
    ShardEnd,
    /// This worker no longer owns the shard (consumer groups): flush what is buffered, then stop.
    Revoked,
    /// The consumer is shutting down: flush what is buffered.
    Shutdown,
}

/// A run of one shard's records, in shard order, with the shard's metadata.
///
/// The consumer also delivers empty batches: a last batch marked with [`Batch::end`] when the
/// shard ends, is revoked, or the consumer shuts down; and an empty heartbeat when a poll of the
/// shard returned nothing and a layer asked for one through [`Batch::wake`] (so time-based
/// layers such as [`BatchLayer`](crate::batch::BatchLayer) flush without a background task), or
/// always, when the consumer's `heartbeat_interval` is set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// The shard every record of this batch comes from.
    pub shard_id: ShardId,
    /// The records, in shard order, shared copy-on-write ([`Records`]: reads go through to a
    /// `Vec<Record>`; cloning the batch does not copy them).
    pub records: Records,
    /// How far the shard's reader was behind the tip of the shard when it read these records.
    pub millis_behind_latest: Option<i64>,
    /// Set on the last batch of a shard.
    pub end: Option<BatchEnd>,
    /// Set on the first batch with records that the consumer delivers after resuming from a
    /// checkpoint inside a KPL aggregate (a checkpoint with a sub-sequence number): the
    /// aggregate is read again from its start, and its user records at or before this
    /// checkpoint were already processed.
    ///
    /// [`DeaggregateLayer`](crate::kpl::DeaggregateLayer) drops those user records and clears the
    /// field; without it they are delivered again (at least once). Layers that merge batches
    /// keep the first `Some` of the batches they merge; layers that split one keep it on the
    /// first part.
    pub resume_after: Option<Checkpoint>,
    /// Where a layer that holds this shard's records asks the consumer for a heartbeat (an
    /// empty batch) once a moment has passed; see [`Wake`].
    pub wake: Wake,
}

/// A shard's heartbeat request, shared between the consumer and the layers of one shard.
///
/// A layer that keeps records back until a deadline (like [`BatchLayer`](crate::batch::BatchLayer))
/// calls [`request`](Wake::request) with that deadline on the batches it receives; the consumer
/// then delivers an empty batch for the shard when a poll of it finds nothing at or after that
/// moment, so the layer is called again and can flush. Nothing asked, no heartbeat: services
/// that hold nothing never see empty batches they did not ask for.
///
/// A `Wake` made by [`Wake::default`] (as in [`Batch::new`]) is not connected to a consumer:
/// requests on it are ignored. Batches compare equal whatever their `Wake`.
#[derive(Clone, Default)]
pub struct Wake(Option<Arc<Mutex<Option<Instant>>>>);

impl Wake {
    /// A connected request, with nothing asked yet (the consumer makes one per shard).
    pub fn new() -> Self {
        Self(Some(Arc::default()))
    }

    /// Asks for a heartbeat once `at` has passed (`None`: no heartbeat needed), replacing what
    /// was asked before.
    pub fn request(&self, at: Option<Instant>) {
        if let Some(slot) = &self.0 {
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = at;
        }
    }

    /// When a heartbeat was asked for, if one was.
    pub fn requested(&self) -> Option<Instant> {
        self.0
            .as_ref()
            .and_then(|slot| *slot.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Whether a heartbeat is due at `now`.
    pub fn is_due(&self, now: Instant) -> bool {
        self.requested().is_some_and(|at| at <= now)
    }
}

impl fmt::Debug for Wake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Wake").field(&self.requested()).finish()
    }
}

impl PartialEq for Wake {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Wake {}

impl Batch {
    /// A batch of records of one shard.
    pub fn new(shard_id: ShardId, records: Vec<Record>) -> Self {
        Self {
            shard_id,
            records: records.into(),
            millis_behind_latest: None,
            end: None,
            resume_after: None,
            wake: Wake::default(),
        }
    }

    /// An empty batch: a heartbeat, or with `end` set, the last batch of a shard.
    pub fn empty(shard_id: ShardId, end: Option<BatchEnd>) -> Self {
        Self {
            shard_id,
            records: Records::new(),
            millis_behind_latest: None,
            end,
            resume_after: None,
            wake: Wake::default(),
        }
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when the batch carries no record.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Total [`Record::size`] of the records.
    pub fn size(&self) -> usize {
        self.records.iter().map(Record::size).sum()
    }

    /// The checkpoint that covers this batch once it has been handled: the last record's, or
    /// [`Checkpoint::ShardEnd`] for the last batch of a closed shard; `None` for an empty batch
    /// that ends nothing.
    pub fn checkpoint(&self) -> Option<Checkpoint> {
        if self.end == Some(BatchEnd::ShardEnd) {
            return Some(Checkpoint::ShardEnd);
        }
        self.records.last().map(Record::checkpoint)
    }
}
