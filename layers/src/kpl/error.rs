//! Errors of KPL aggregation and deaggregation.

use super::wire::ProtobufError;
use crate::record::ShardId;
use crate::sequence::SequenceNumber;

/// A record carries the KPL magic but is not a valid aggregate.
///
/// What happens to such a record is the [`CorruptPolicy`](super::CorruptPolicy) of the
/// [`DeaggregateLayer`](super::DeaggregateLayer): passed through raw (the default), skipped
/// and counted, or the batch fails with this error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("record {} of shard {} has the KPL aggregate magic but is corrupt: {}; the producer wrote a bad aggregate or the data only looks like one (CorruptPolicy::PassThrough hands such records over raw)", .0.sequence_number, .0.shard_id, .0.problem)]
pub struct KplError(Box<Details>);

#[derive(Clone, Debug, PartialEq, Eq)]
struct Details {
    shard_id: ShardId,
    sequence_number: SequenceNumber,
    problem: Corruption,
}

impl KplError {
    /// The error for the record `sequence_number` of shard `shard_id`.
    pub fn new(shard_id: ShardId, sequence_number: SequenceNumber, problem: Corruption) -> Self {
        Self(Box::new(Details {
            shard_id,
            sequence_number,
            problem,
        }))
    }

    /// The shard the record was read from.
    pub fn shard_id(&self) -> &ShardId {
        &self.0.shard_id
    }

    /// The (outer) record's sequence number.
    pub fn sequence_number(&self) -> SequenceNumber {
        self.0.sequence_number
    }

    /// What is wrong with it.
    pub fn problem(&self) -> &Corruption {
        &self.0.problem
    }
}

/// What is wrong with a corrupt KPL aggregate.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Corruption {
    /// The MD5 at the end does not match the protobuf bytes (a truncated or altered record).
    #[error("the MD5 checksum does not match the protobuf message")]
    ChecksumMismatch,
    /// The protobuf message is truncated or not a valid `AggregatedRecord`.
    #[error("truncated or invalid protobuf message: {0}")]
    InvalidProtobuf(#[from] ProtobufError),
    /// A user record lacks a field the format requires.
    #[error("user record {record} lacks the required field `{field}`")]
    MissingField {
        /// The user record's index (its sub-sequence number).
        record: u64,
        /// The field's name.
        field: &'static str,
    },
    /// A user record refers to an entry past the end of a key table.
    #[error(
        "user record {record} refers to {table} entry {index}, but the table has {len} entries"
    )]
    IndexOutOfRange {
        /// The user record's index (its sub-sequence number).
        record: u64,
        /// `partition_key_table` or `explicit_hash_key_table`.
        table: &'static str,
        /// The index the user record carries.
        index: u64,
        /// The table's length.
        len: usize,
    },
    /// A key table entry is not UTF-8.
    #[error("{table} entry {index} is not UTF-8")]
    InvalidKey {
        /// `partition_key_table` or `explicit_hash_key_table`.
        table: &'static str,
        /// The entry's index.
        index: usize,
    },
    /// The aggregate holds no user record.
    #[error("the aggregate holds no user record")]
    Empty,
}

/// Why the [`Aggregator`](super::Aggregator) refused a user record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AggregateError {
    /// The user record alone, in an aggregate of its own, exceeds the size limit.
    #[error("a user record of {size} bytes (partition key {partition_key:?}) does not fit in an aggregate of at most {limit} bytes; split the payload or send it unaggregated if it fits a Kinesis record")]
    RecordTooLarge {
        /// The partition key of the refused record.
        partition_key: String,
        /// The size the aggregate would have with only this record.
        size: usize,
        /// The aggregator's limit.
        limit: usize,
    },
    /// Kinesis accepts partition keys of 1 to 256 characters.
    #[error("partition key {partition_key:?} has {chars} characters; Kinesis accepts 1 to 256")]
    InvalidPartitionKey {
        /// The refused key.
        partition_key: String,
        /// Its length in characters.
        chars: usize,
    },
    /// Kinesis accepts explicit hash keys that are decimal numbers from 0 to 2^128 - 1.
    #[error("explicit hash key {explicit_hash_key:?} is not a decimal number from 0 to 2^128 - 1")]
    InvalidExplicitHashKey {
        /// The refused key.
        explicit_hash_key: String,
    },
}
