//! KPL record aggregation: many user records packed in one Kinesis record.
//!
//! The Kinesis Producer Library (and the aggregation libraries of other languages) pack user
//! records into one Kinesis record: the four [`MAGIC`] bytes, a protobuf `AggregatedRecord`
//! ([`proto`]) and the MD5 of the protobuf bytes. Consumers read them back with
//! [`DeaggregateLayer`] (a `tower` layer over batches) or [`deaggregate`] (one record);
//! producers and tests build them with [`Aggregator`] or [`aggregate`].
//!
//! Each user record becomes a [`Record`](crate::Record) with the aggregate's sequence number
//! and its own sub-sequence number, so checkpoints can fall inside an aggregate; after a
//! restart, [`Batch::resume_after`](crate::Batch::resume_after) tells the layer which user
//! records were already processed.

mod aggregate;
mod deaggregate;
mod error;
mod layer;
mod md5_lanes;
#[cfg(test)]
mod props;
pub mod proto;
mod wire;

pub use aggregate::{aggregate, Aggregate, Aggregator, UserRecord, MAX_RECORD_SIZE};
pub use deaggregate::{deaggregate, deaggregate_into, is_aggregate, DIGEST_LEN, MAGIC};
pub use error::{AggregateError, Corruption, KplError};
pub use layer::{
    CorruptPolicy, DeaggregateFuture, DeaggregateLayer, DeaggregateService, CORRUPT_RECORDS_METRIC,
};
pub use wire::ProtobufError;
