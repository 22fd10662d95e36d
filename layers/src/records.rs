//! [`Records`]: the records of a batch, shared copy-on-write.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use crate::record::Record;

/// The records of a [`Batch`](crate::Batch), in shard order: a `Vec<Record>` shared
/// copy-on-write.
///
/// Cloning a batch clones its records in O(1) (one reference count, however many records),
/// which is what [`RetryLayer`](crate::retry::RetryLayer) does with every batch it passes on,
/// so that it has the batch for another attempt. Reading goes through to the vector
/// (`Deref<Target = Vec<Record>>`: `len`, `iter`, indexing, `&batch.records` in a `for`
/// loop); changing it (`push`, `retain`, `drain`, ...) copies the vector first only when
/// another clone of it is alive, and taking the records out by value
/// ([`into_vec`](Records::into_vec), `for record in batch.records`) moves them out without a
/// copy when none is.
///
/// ```
/// use kinesis_tower_layers::{Batch, Record, SequenceNumber};
///
/// let record = |n: u64| Record {
///     shard_id: "shardId-000000000000".into(),
///     sequence_number: SequenceNumber::from(n),
///     sub_sequence_number: None,
///     partition_key: "key".into(),
///     explicit_hash_key: None,
///     data: "data".into(),
///     approximate_arrival_timestamp: None,
/// };
/// let batch = Batch::new("shardId-000000000000".into(), vec![record(1)]);
/// let kept = batch.clone(); // shares the records
/// let mut changed = batch;
/// changed.records.push(record(2)); // copies them first
/// assert_eq!(kept.records.len(), 1);
/// assert_eq!(changed.records.len(), 2);
/// let records: Vec<Record> = changed.records.into_vec();
/// assert_eq!(records.len(), 2);
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Records(Arc<Vec<Record>>);

impl Records {
    /// No record.
    pub fn new() -> Self {
        Self::default()
    }

    /// The records as a vector: moved out when no clone of them is alive, copied otherwise.
    pub fn into_vec(self) -> Vec<Record> {
        Arc::unwrap_or_clone(self.0)
    }
}

impl Deref for Records {
    type Target = Vec<Record>;

    fn deref(&self) -> &Vec<Record> {
        &self.0
    }
}

impl DerefMut for Records {
    /// The vector to change, copied first if another clone of it is alive.
    fn deref_mut(&mut self) -> &mut Vec<Record> {
        Arc::make_mut(&mut self.0)
    }
}

impl From<Vec<Record>> for Records {
    fn from(records: Vec<Record>) -> Self {
        Self(Arc::new(records))
    }
}

impl From<Records> for Vec<Record> {
    fn from(records: Records) -> Self {
        records.into_vec()
    }
}

impl FromIterator<Record> for Records {
    fn from_iter<I: IntoIterator<Item = Record>>(iter: I) -> Self {
        Self::from(iter.into_iter().collect::<Vec<_>>())
    }
}

impl Extend<Record> for Records {
    fn extend<I: IntoIterator<Item = Record>>(&mut self, iter: I) {
        (**self).extend(iter);
    }
}

impl IntoIterator for Records {
    type Item = Record;
    type IntoIter = std::vec::IntoIter<Record>;

    fn into_iter(self) -> Self::IntoIter {
        self.into_vec().into_iter()
    }
}

impl<'a> IntoIterator for &'a Records {
    type Item = &'a Record;
    type IntoIter = std::slice::Iter<'a, Record>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Debug for Records {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl PartialEq<Vec<Record>> for Records {
    fn eq(&self, other: &Vec<Record>) -> bool {
        **self == *other
    }
}

impl PartialEq<[Record]> for Records {
    fn eq(&self, other: &[Record]) -> bool {
        self.as_slice() == other
    }
}

impl PartialEq<Records> for Vec<Record> {
    fn eq(&self, other: &Records) -> bool {
        *self == **other
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::record;

    #[test]
    fn clones_share_until_one_changes() {
        let a = Records::from(vec![record("s", 1), record("s", 2)]);
        let mut b = a.clone();
        assert!(
            std::ptr::eq(a.as_ptr(), b.as_ptr()),
            "a clone shares the records"
        );
        b.push(record("s", 3));
        assert!(
            !std::ptr::eq(a.as_ptr(), b.as_ptr()),
            "a change copies them"
        );
        assert_eq!(a.len(), 2);
        assert_eq!(b.len(), 3);
    }

    #[test]
    fn taking_the_records_moves_them_when_not_shared() {
        let a = Records::from(vec![record("s", 1)]);
        let data = a[0].data.as_ptr();
        let buffer = a.as_ptr();
        let v = a.into_vec();
        assert!(std::ptr::eq(v.as_ptr(), buffer), "moved, not copied");
        assert_eq!(v[0].data.as_ptr(), data);

        let a = Records::from(vec![record("s", 1)]);
        let kept = a.clone();
        let v: Vec<Record> = a.into_iter().collect();
        assert_eq!(v, kept.to_vec());
        assert_eq!(kept, v);
    }
}
