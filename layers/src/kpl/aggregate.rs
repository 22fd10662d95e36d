//! Building KPL aggregates: many user records in one Kinesis record.

use std::collections::HashMap;

use bytes::Bytes;
use md5::{Digest, Md5};
use prost::encoding::encoded_len_varint;
use prost::Message;

use super::deaggregate::{DIGEST_LEN, MAGIC};
use super::error::AggregateError;
use super::proto;

/// The largest Kinesis record: data plus partition key, 1 MiB.
pub const MAX_RECORD_SIZE: usize = 1024 * 1024;

/// One finished aggregate, ready to be put as one Kinesis record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Aggregate {
    /// The partition key to put the record with: the first user record's (as the KPL does).
    pub partition_key: String,
    /// The explicit hash key to put the record with: the first user record's, if it had one.
    pub explicit_hash_key: Option<String>,
    /// Magic, protobuf message and MD5: the record's data.
    pub data: Bytes,
    /// How many user records it holds.
    pub user_records: usize,
}

impl Aggregate {
    /// The size Kinesis counts for the record: data plus partition key.
    pub fn size(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }
}

/// One user record to aggregate (for [`aggregate`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRecord {
    /// Its partition key (1 to 256 characters).
    pub partition_key: String,
    /// Its explicit hash key, a decimal number from 0 to 2^128 - 1.
    pub explicit_hash_key: Option<String>,
    /// Its payload.
    pub data: Bytes,
}

impl UserRecord {
    /// A user record without an explicit hash key.
    pub fn new(partition_key: impl Into<String>, data: impl Into<Bytes>) -> Self {
        Self {
            partition_key: partition_key.into(),
            explicit_hash_key: None,
            data: data.into(),
        }
    }
}

/// Packs user records into KPL aggregates of at most 1 MiB (or a smaller limit).
///
/// Partition keys and explicit hash keys are stored once per aggregate. [`Aggregator::add`]
/// returns the finished aggregate when the new user record no longer fits in the current one
/// (the new record then starts the next aggregate); [`Aggregator::finish`] returns what is
/// left. The size counted against the limit is what Kinesis counts: the aggregate's data plus
/// its partition key.
///
/// # Example
///
/// ```
/// use kinesis_tower_layers::kpl::Aggregator;
///
/// let mut aggregator = Aggregator::new();
/// let mut aggregates = Vec::new();
/// for i in 0..1000 {
///     let key = format!("device-{}", i % 10);
///     if let Some(full) = aggregator.add(&key, None, format!("reading {i}"))? {
///         aggregates.push(full);
///     }
/// }
/// aggregates.extend(aggregator.finish());
/// // Put each as one Kinesis record: partition key, explicit hash key (if any), data.
/// assert_eq!(aggregates.len(), 1);
/// assert_eq!(aggregates[0].partition_key, "device-0");
/// assert_eq!(aggregates[0].user_records, 1000);
/// # Ok::<(), kinesis_tower_layers::kpl::AggregateError>(())
/// ```
#[derive(Debug)]
pub struct Aggregator {
    limit: usize,
    message: proto::AggregatedRecord,
    partition_keys: HashMap<String, u64>,
    explicit_hash_keys: HashMap<String, u64>,
    /// Encoded length of `message`, kept up to date as records are added.
    encoded_len: usize,
    partition_key: String,
    explicit_hash_key: Option<String>,
}

impl Default for Aggregator {
    fn default() -> Self {
        Self::new()
    }
}

impl Aggregator {
    /// An aggregator making aggregates up to the Kinesis record limit, [`MAX_RECORD_SIZE`].
    pub fn new() -> Self {
        Self::with_limit(MAX_RECORD_SIZE)
    }

    /// An aggregator making aggregates of at most `limit` bytes (data plus partition key);
    /// limits above [`MAX_RECORD_SIZE`] are lowered to it.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            limit: limit.min(MAX_RECORD_SIZE),
            message: proto::AggregatedRecord::default(),
            partition_keys: HashMap::new(),
            explicit_hash_keys: HashMap::new(),
            encoded_len: 0,
            partition_key: String::new(),
            explicit_hash_key: None,
        }
    }

    /// Number of user records in the current aggregate.
    pub fn len(&self) -> usize {
        self.message.records.len()
    }

    /// True when the current aggregate holds no user record.
    pub fn is_empty(&self) -> bool {
        self.message.records.is_empty()
    }

    /// The size the current aggregate would have if finished now (data plus partition key);
    /// 0 when empty.
    pub fn size(&self) -> usize {
        if self.is_empty() {
            0
        } else {
            record_size(&self.partition_key, self.encoded_len)
        }
    }

    /// Adds a user record.
    ///
    /// Returns `Ok(None)` when it was added to the current aggregate, and
    /// `Ok(Some(aggregate))` when it did not fit: the current aggregate is finished and
    /// returned, and the record starts the next one.
    ///
    /// # Errors
    ///
    /// A partition key Kinesis would refuse (empty or over 256 characters), an explicit hash
    /// key that is not a decimal number below 2^128, or a record too large for an aggregate of
    /// its own. Nothing is added then, and the current aggregate is unchanged.
    pub fn add(
        &mut self,
        partition_key: &str,
        explicit_hash_key: Option<&str>,
        data: impl Into<Bytes>,
    ) -> Result<Option<Aggregate>, AggregateError> {
        let chars = partition_key.chars().count();
        if !(1..=256).contains(&chars) {
            return Err(AggregateError::InvalidPartitionKey {
                partition_key: partition_key.to_owned(),
                chars,
            });
        }
        if let Some(key) = explicit_hash_key {
            if key.is_empty()
                || !key.bytes().all(|b| b.is_ascii_digit())
                || key.parse::<u128>().is_err()
            {
                return Err(AggregateError::InvalidExplicitHashKey {
                    explicit_hash_key: key.to_owned(),
                });
            }
        }
        let data = data.into();

        // Alone in an aggregate of its own: does it fit at all?
        let alone_len = field_len(partition_key.len())
            + explicit_hash_key.map_or(0, |key| field_len(key.len()))
            + field_len(user_record_len(0, explicit_hash_key.map(|_| 0), data.len()));
        let alone = record_size(partition_key, alone_len);
        if alone > self.limit {
            return Err(AggregateError::RecordTooLarge {
                partition_key: partition_key.to_owned(),
                size: alone,
                limit: self.limit,
            });
        }

        let mut finished = None;
        if !self.is_empty() {
            let grown = record_size(
                &self.partition_key,
                self.encoded_len + self.extra_len(partition_key, explicit_hash_key, &data),
            );
            if grown > self.limit {
                finished = self.finish();
            }
        }
        self.push(partition_key, explicit_hash_key, data);
        Ok(finished)
    }

    /// Finishes the current aggregate and returns it (`None` when it is empty); the aggregator
    /// starts over, empty.
    pub fn finish(&mut self) -> Option<Aggregate> {
        if self.is_empty() {
            return None;
        }
        let message = std::mem::take(&mut self.message);
        debug_assert_eq!(message.encoded_len(), self.encoded_len);
        let mut data = Vec::with_capacity(MAGIC.len() + self.encoded_len + DIGEST_LEN);
        data.extend_from_slice(&MAGIC);
        // Encoding into a Vec with enough room cannot fail.
        message.encode_raw(&mut data);
        let digest = Md5::digest(&data[MAGIC.len()..]);
        data.extend_from_slice(&digest);
        let aggregate = Aggregate {
            partition_key: std::mem::take(&mut self.partition_key),
            explicit_hash_key: self.explicit_hash_key.take(),
            data: Bytes::from(data),
            user_records: message.records.len(),
        };
        self.partition_keys.clear();
        self.explicit_hash_keys.clear();
        self.encoded_len = 0;
        Some(aggregate)
    }

    /// How much the message grows when this user record is added.
    fn extra_len(
        &self,
        partition_key: &str,
        explicit_hash_key: Option<&str>,
        data: &Bytes,
    ) -> usize {
        let mut extra = 0;
        let pk_index = match self.partition_keys.get(partition_key) {
            Some(&i) => i,
            None => {
                extra += field_len(partition_key.len());
                self.partition_keys.len() as u64
            }
        };
        let ehk_index = explicit_hash_key.map(|key| match self.explicit_hash_keys.get(key) {
            Some(&i) => i,
            None => {
                extra += field_len(key.len());
                self.explicit_hash_keys.len() as u64
            }
        });
        extra + field_len(user_record_len(pk_index, ehk_index, data.len()))
    }

    fn push(&mut self, partition_key: &str, explicit_hash_key: Option<&str>, data: Bytes) {
        self.encoded_len += self.extra_len(partition_key, explicit_hash_key, &data);
        if self.is_empty() {
            self.partition_key = partition_key.to_owned();
            self.explicit_hash_key = explicit_hash_key.map(str::to_owned);
        }
        let partition_key_index = index_of(
            &mut self.partition_keys,
            &mut self.message.partition_key_table,
            partition_key,
        );
        let explicit_hash_key_index = explicit_hash_key.map(|key| {
            index_of(
                &mut self.explicit_hash_keys,
                &mut self.message.explicit_hash_key_table,
                key,
            )
        });
        self.message.records.push(proto::Record {
            partition_key_index: Some(partition_key_index),
            explicit_hash_key_index,
            data: Some(data),
            tags: Vec::new(),
        });
    }
}

/// The key's index in the table, adding it when new.
fn index_of(index: &mut HashMap<String, u64>, table: &mut Vec<Bytes>, key: &str) -> u64 {
    if let Some(&i) = index.get(key) {
        return i;
    }
    let i = table.len() as u64;
    table.push(Bytes::copy_from_slice(key.as_bytes()));
    index.insert(key.to_owned(), i);
    i
}

/// Encoded length of a length-delimited field of `len` bytes (tags below 16: one byte).
fn field_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

/// Encoded length of a `Record` message.
fn user_record_len(pk_index: u64, ehk_index: Option<u64>, data_len: usize) -> usize {
    1 + encoded_len_varint(pk_index)
        + ehk_index.map_or(0, |i| 1 + encoded_len_varint(i))
        + field_len(data_len)
}

/// What Kinesis counts for an aggregate: partition key, magic, message, digest.
fn record_size(partition_key: &str, encoded_len: usize) -> usize {
    partition_key.len() + MAGIC.len() + encoded_len + DIGEST_LEN
}

/// Aggregates `records` in order into as few aggregates as the size limit allows.
///
/// # Errors
///
/// The first user record [`Aggregator::add`] refuses.
///
/// # Example
///
/// ```
/// use kinesis_tower_layers::{kpl::{aggregate, UserRecord}};
///
/// let aggregates = aggregate((0..100).map(|i| UserRecord::new(format!("k{i}"), "data")))?;
/// assert_eq!(aggregates.len(), 1);
/// assert_eq!(aggregates[0].user_records, 100);
/// # Ok::<(), kinesis_tower_layers::kpl::AggregateError>(())
/// ```
pub fn aggregate(
    records: impl IntoIterator<Item = UserRecord>,
) -> Result<Vec<Aggregate>, AggregateError> {
    let mut aggregator = Aggregator::new();
    let mut aggregates = Vec::new();
    for record in records {
        if let Some(full) = aggregator.add(
            &record.partition_key,
            record.explicit_hash_key.as_deref(),
            record.data,
        )? {
            aggregates.push(full);
        }
    }
    aggregates.extend(aggregator.finish());
    Ok(aggregates)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(aggregate: &Aggregate) -> proto::AggregatedRecord {
        let data = &aggregate.data;
        assert_eq!(data[..4], MAGIC);
        let body = &data[4..data.len() - DIGEST_LEN];
        assert_eq!(Md5::digest(body)[..], data[data.len() - DIGEST_LEN..]);
        proto::AggregatedRecord::decode(body).unwrap()
    }

    #[test]
    fn keys_are_stored_once_and_the_first_record_names_the_aggregate() {
        let mut aggregator = Aggregator::new();
        assert!(aggregator.finish().is_none());
        for (pk, ehk) in [("a", Some("5")), ("b", None), ("a", None), ("b", Some("5"))] {
            assert_eq!(aggregator.add(pk, ehk, "x").unwrap(), None);
        }
        assert_eq!(aggregator.len(), 4);
        let size = aggregator.size();
        let aggregate = aggregator.finish().unwrap();
        assert!(aggregator.is_empty());
        assert_eq!(aggregate.size(), size);
        assert_eq!(aggregate.partition_key, "a");
        assert_eq!(aggregate.explicit_hash_key.as_deref(), Some("5"));
        assert_eq!(aggregate.user_records, 4);
        let m = message(&aggregate);
        assert_eq!(
            m.partition_key_table,
            vec![Bytes::from("a"), Bytes::from("b")]
        );
        assert_eq!(m.explicit_hash_key_table, vec![Bytes::from("5")]);
        let indexes: Vec<_> = m
            .records
            .iter()
            .map(|r| (r.partition_key_index, r.explicit_hash_key_index))
            .collect();
        assert_eq!(
            indexes,
            vec![
                (Some(0), Some(0)),
                (Some(1), None),
                (Some(0), None),
                (Some(1), Some(0))
            ]
        );
        // The next aggregate starts from scratch.
        aggregator.add("c", None, "y").unwrap();
        let next = aggregator.finish().unwrap();
        assert_eq!(next.partition_key, "c");
        assert_eq!(next.explicit_hash_key, None);
        assert_eq!(message(&next).partition_key_table, vec![Bytes::from("c")]);
    }

    #[test]
    fn aggregates_stay_within_the_limit_and_lose_nothing() {
        for limit in [100, 1000, 4096] {
            let mut aggregator = Aggregator::with_limit(limit);
            let mut aggregates = Vec::new();
            let mut expected = Vec::new();
            for i in 0..500usize {
                let key = format!("key-{}", i % 37);
                let data = vec![b'd'; i % 50];
                expected.push((key.clone(), data.clone()));
                if let Some(full) = aggregator.add(&key, None, data).unwrap() {
                    aggregates.push(full);
                }
                assert!(aggregator.size() <= limit);
            }
            aggregates.extend(aggregator.finish());
            let mut seen = Vec::new();
            for aggregate in &aggregates {
                assert!(aggregate.size() <= limit, "{} > {limit}", aggregate.size());
                let m = message(aggregate);
                for r in m.records {
                    let pk = &m.partition_key_table[r.partition_key_index.unwrap() as usize];
                    seen.push((
                        String::from_utf8(pk.to_vec()).unwrap(),
                        r.data.unwrap().to_vec(),
                    ));
                }
            }
            assert_eq!(seen, expected);
            // Aggregates are filled: the next record would not have fitted.
            assert!(aggregates.len() > 1);
        }
    }

    #[test]
    fn full_size_aggregate_fits_a_kinesis_record() {
        let mut aggregator = Aggregator::new();
        let mut full = None;
        let mut i = 0;
        while full.is_none() {
            full = aggregator
                .add(&format!("k{i}"), None, vec![7u8; 1000])
                .unwrap();
            i += 1;
        }
        let full = full.unwrap();
        assert!(full.size() <= MAX_RECORD_SIZE);
        assert!(full.size() > MAX_RECORD_SIZE - 1100);
    }

    #[test]
    fn refuses_what_kinesis_would_refuse() {
        let mut aggregator = Aggregator::with_limit(1200);
        aggregator.add("ok", None, "x").unwrap();
        let long = "k".repeat(257);
        for (pk, ehk, data) in [
            ("", None, 1),
            (long.as_str(), None, 1),
            ("k", Some(""), 1),
            ("k", Some("12a"), 1),
            ("k", Some("-1"), 1),
            ("k", Some("340282366920938463463374607431768211456"), 1),
            ("k", None, 1200),
        ] {
            assert!(
                aggregator.add(pk, ehk, vec![0u8; data]).is_err(),
                "{pk:?} {ehk:?}"
            );
        }
        assert!(aggregator
            .add("k", Some("340282366920938463463374607431768211455"), "x")
            .is_ok());
        assert!(aggregator.add(&"é".repeat(256), None, "x").is_ok());
        assert_eq!(aggregator.len(), 3);
    }

    #[test]
    fn one_shot_aggregate_splits_at_the_limit() {
        let records = (0..3000).map(|i| UserRecord::new(format!("k{i}"), vec![1u8; 1000]));
        let aggregates = aggregate(records).unwrap();
        assert_eq!(aggregates.len(), 3);
        assert_eq!(
            aggregates.iter().map(|a| a.user_records).sum::<usize>(),
            3000
        );
    }
}
