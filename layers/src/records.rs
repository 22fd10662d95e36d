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
#[derive(Clone, Default)]
pub struct Records(
    /// `None` while empty, so that empty batches (heartbeats, ends) allocate nothing.
    Option<Arc<Vec<Record>>>,
);

/// What an empty [`Records`] reads as.
static EMPTY: Vec<Record> = Vec::new();

impl Records {
    /// No record.
    pub fn new() -> Self {
        Self::default()
    }

    /// The records as a vector: moved out when no clone of them is alive, copied otherwise.
    pub fn into_vec(self) -> Vec<Record> {
        self.0.map(Arc::unwrap_or_clone).unwrap_or_default()
    }

    /// The records as a vector when no clone of them is alive (moved out, no copy); the
    /// records back otherwise, so the caller can read them without copying them.
    pub fn try_into_vec(self) -> Result<Vec<Record>, Self> {
        match self.0 {
            None => Ok(Vec::new()),
            Some(shared) => Arc::try_unwrap(shared).map_err(|shared| Self(Some(shared))),
        }
    }
}

impl Deref for Records {
    type Target = Vec<Record>;

    fn deref(&self) -> &Vec<Record> {
        self.0.as_deref().unwrap_or(&EMPTY)
    }
}

impl DerefMut for Records {
    /// The vector to change, copied first if another clone of it is alive.
    fn deref_mut(&mut self) -> &mut Vec<Record> {
        Arc::make_mut(self.0.get_or_insert_with(Default::default))
    }
}

impl PartialEq for Records {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Records {}

impl From<Vec<Record>> for Records {
    fn from(records: Vec<Record>) -> Self {
        Self(Some(Arc::new(records)))
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
        self.iter()
    }
}

impl<'a> IntoIterator for &'a mut Records {
    type Item = &'a mut Record;
    type IntoIter = std::slice::IterMut<'a, Record>;

    /// Copies the records first if another clone of them is alive.
    fn into_iter(self) -> Self::IntoIter {
        self.iter_mut()
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

    #[test]
    fn empty_records_read_as_an_empty_vector_and_grow_when_changed() {
        let mut empty = Records::new();
        assert!(empty.is_empty());
        assert_eq!(empty, Records::from(Vec::new()));
        assert_eq!(empty.clone().into_vec(), Vec::new());
        empty.push(record("s", 1));
        assert_eq!(empty.len(), 1);
        for r in &mut empty {
            r.sub_sequence_number = Some(3);
        }
        assert_eq!(empty[0].sub_sequence_number, Some(3));
    }

    #[test]
    fn try_into_vec_hands_shared_records_back() {
        let a = Records::from(vec![record("s", 1)]);
        let kept = a.clone();
        let back = a.try_into_vec().unwrap_err();
        assert!(std::ptr::eq(back.as_ptr(), kept.as_ptr()), "not copied");
        drop(kept);
        assert_eq!(back.try_into_vec().unwrap().len(), 1);
    }
}
