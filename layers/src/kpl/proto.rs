//! The protobuf messages of the KPL aggregated record format (proto2):
//!
//! ```proto
//! message AggregatedRecord {
//!   repeated string partition_key_table     = 1;
//!   repeated string explicit_hash_key_table = 2;
//!   repeated Record records                 = 3;
//! }
//! message Tag {
//!   required string key   = 1;
//!   optional string value = 2;
//! }
//! message Record {
//!   required uint64 partition_key_index     = 1;
//!   optional uint64 explicit_hash_key_index = 2;
//!   required bytes  data                    = 3;
//!   repeated Tag    tags                    = 4;
//! }
//! ```
//!
//! The [`Aggregator`](super::Aggregator) encodes with these structs. The deaggregator does
//! not decode into them: it reads the wire format straight from the aggregate's bytes (and a
//! property test checks that it accepts exactly what these structs accept). Two choices keep
//! them strict without changing the wire format:
//! - the key tables are `string` in the `.proto` but held as [`Bytes`] here (same wire type);
//!   the deaggregator checks UTF-8 once per table entry;
//! - `required` fields are held as `Option`s, so a message that lacks one is detected and
//!   reported instead of being read as a zero index or empty data.

use bytes::Bytes;

/// The outer message: key tables shared by the user records, and the user records.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AggregatedRecord {
    /// Partition keys (UTF-8), each once; user records refer to them by index.
    #[prost(bytes = "bytes", repeated, tag = "1")]
    pub partition_key_table: Vec<Bytes>,
    /// Explicit hash keys (decimal 128-bit numbers as UTF-8), each once.
    #[prost(bytes = "bytes", repeated, tag = "2")]
    pub explicit_hash_key_table: Vec<Bytes>,
    /// The user records, in order: the n-th has sub-sequence number n.
    #[prost(message, repeated, tag = "3")]
    pub records: Vec<Record>,
}

/// One user record inside an [`AggregatedRecord`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct Record {
    /// Index into [`AggregatedRecord::partition_key_table`] (required).
    #[prost(uint64, optional, tag = "1")]
    pub partition_key_index: Option<u64>,
    /// Index into [`AggregatedRecord::explicit_hash_key_table`], when the user record has one.
    #[prost(uint64, optional, tag = "2")]
    pub explicit_hash_key_index: Option<u64>,
    /// The user record's payload (required).
    #[prost(bytes = "bytes", optional, tag = "3")]
    pub data: Option<Bytes>,
    /// Tags (not used by Kinesis; kept for completeness).
    #[prost(message, repeated, tag = "4")]
    pub tags: Vec<Tag>,
}

/// A key/value tag of a user record.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Tag {
    /// The key (required).
    #[prost(string, optional, tag = "1")]
    pub key: Option<String>,
    /// The value.
    #[prost(string, optional, tag = "2")]
    pub value: Option<String>,
}
