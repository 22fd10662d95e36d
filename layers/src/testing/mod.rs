//! Builders for tests of handlers, layers and checkpoint stores (feature `test-util`).
//!
//! Records, batches and checkpoints at small sequence numbers (any `u64` is a valid sequence
//! number), and [`FaultyStore`], a checkpoint store that fails when told to.

mod faulty_store;

pub use faulty_store::FaultyStore;

use bytes::Bytes;

use crate::{Batch, Checkpoint, Record, SequenceNumber};

/// The shard of the batches [`batch`] builds.
pub const SHARD: &str = "shard-0";

/// The checkpoint at sequence number `n`: record `n` and everything before it processed.
pub fn at(n: u64) -> Checkpoint {
    Checkpoint::at(SequenceNumber::from(n))
}

/// The checkpoint at user record `sub` of the KPL aggregate at sequence number `n`.
pub fn at_sub(n: u64, sub: u64) -> Checkpoint {
    Checkpoint::Sequence {
        sequence_number: SequenceNumber::from(n),
        sub_sequence_number: Some(sub),
    }
}

/// A record of `shard` at sequence number `n`, with partition key `pk` and data `x` (so its
/// [`size`](Record::size) is 3), no sub-sequence number, hash key or arrival time.
///
/// Other fields with struct update syntax: `Record { data, ..record(SHARD, 1) }`.
pub fn record(shard: &str, n: u64) -> Record {
    Record {
        shard_id: shard.into(),
        sequence_number: SequenceNumber::from(n),
        sub_sequence_number: None,
        partition_key: "pk".into(),
        explicit_hash_key: None,
        data: Bytes::from_static(b"x"),
        approximate_arrival_timestamp: None,
    }
}

/// A batch of [`SHARD`] with one [`record`] per sequence number, in the order given.
pub fn batch(seqs: impl IntoIterator<Item = u64>) -> Batch {
    batch_of(SHARD, seqs)
}

/// A batch of `shard` with one [`record`] per sequence number, in the order given.
pub fn batch_of(shard: &str, seqs: impl IntoIterator<Item = u64>) -> Batch {
    Batch::new(
        shard.into(),
        seqs.into_iter().map(|n| record(shard, n)).collect(),
    )
}
