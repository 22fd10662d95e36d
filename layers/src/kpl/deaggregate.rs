//! Parsing KPL aggregates into user records.

use std::sync::Arc;

use std::ops::Range;

use bytes::Bytes;
use md5::{Digest as _, Md5};

use super::error::{Corruption, KplError};
use super::md5_lanes;
use super::wire::{Fields, ProtobufError, LEN, VARINT};
use crate::partition_key::PartitionKey;
use crate::record::Record;

/// The four bytes every KPL aggregate starts with.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];

/// Length of the MD5 digest that ends every KPL aggregate.
pub const DIGEST_LEN: usize = 16;

/// True when `data` starts with the KPL [`MAGIC`] and is long enough to hold the digest:
/// such records are parsed as aggregates; every other record is a plain record.
pub fn is_aggregate(data: &[u8]) -> bool {
    data.len() >= MAGIC.len() + DIGEST_LEN && data[..MAGIC.len()] == MAGIC
}

/// The user records of a Kinesis record.
///
/// For a KPL aggregate: one [`Record`] per user record, in order, with the aggregate's shard,
/// sequence number and arrival time, sub-sequence numbers `0..n`, and the user record's own
/// partition key, explicit hash key and data (the data shares the aggregate's buffer, no
/// copy). Any other record (no magic, or too short to be an aggregate) comes back unchanged,
/// as the only element.
///
/// # Errors
///
/// [`KplError`] when the record has the magic but is not a valid aggregate: checksum
/// mismatch, truncated or invalid protobuf, a missing required field, an index outside a key
/// table, a key that is not UTF-8, or no user record at all.
///
/// # Example
///
/// ```
/// use kinesis_tower_layers::{kpl::{deaggregate, Aggregator}};
/// use kinesis_tower_layers::{Record, SequenceNumber, ShardId};
///
/// let mut aggregator = Aggregator::new();
/// aggregator.add("user-1", None, "hello")?;
/// aggregator.add("user-2", None, "world")?;
/// let aggregate = aggregator.finish().expect("two user records");
///
/// let record = Record {
///     shard_id: ShardId::from("shardId-000000000000"),
///     sequence_number: "49590338271490256608559692538361571095921575989136588898".parse()?,
///     sub_sequence_number: None,
///     partition_key: aggregate.partition_key.as_str().into(),
///     explicit_hash_key: None,
///     data: aggregate.data,
///     approximate_arrival_timestamp: None,
/// };
/// let users = deaggregate(&record)?;
/// assert_eq!(users.len(), 2);
/// assert_eq!(users[1].sub_sequence_number, Some(1));
/// assert_eq!(&*users[1].partition_key, "user-2");
/// assert_eq!(users[1].data, "world");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn deaggregate(record: &Record) -> Result<Vec<Record>, KplError> {
    let mut out = Vec::new();
    if !deaggregate_into(record, &mut out)? {
        out.push(record.clone());
    }
    Ok(out)
}

/// Appends the user records of `record` to `out` when it is a KPL aggregate.
///
/// Returns `Ok(true)` when `record` was an aggregate (its user records were appended),
/// `Ok(false)` when it is a plain record (nothing appended: use it as it is). On error `out`
/// is left as it was. See [`deaggregate`].
///
/// # Errors
///
/// [`KplError`] when the record has the magic but is not a valid aggregate.
pub fn deaggregate_into(record: &Record, out: &mut Vec<Record>) -> Result<bool, KplError> {
    deaggregate_checked_into(record, Digest::Compute, out)
}

/// Whether an aggregate's digest is still to be computed, or was checked already (by
/// [`check_digests`], several aggregates at once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Digest {
    Compute,
    Matches,
    Differs,
}

/// [`deaggregate_into`] with the digest check given.
pub(super) fn deaggregate_checked_into(
    record: &Record,
    digest: Digest,
    out: &mut Vec<Record>,
) -> Result<bool, KplError> {
    if !is_aggregate(&record.data) {
        return Ok(false);
    }
    let start = out.len();
    match parse(record, digest, out) {
        Ok(()) => Ok(true),
        Err(problem) => {
            out.truncate(start);
            Err(KplError::new(
                record.shard_id.clone(),
                record.sequence_number,
                problem,
            ))
        }
    }
}

/// The digest check of each of `records`: every aggregate's MD5 computed together with the
/// others' ([`md5_lanes`]); [`Digest::Compute`] for plain records, or for all when there are
/// too few aggregates for hashing side by side to pay.
pub(super) fn check_digests(records: &[Record]) -> Vec<Digest> {
    let messages: Vec<&[u8]> = records
        .iter()
        .filter(|r| is_aggregate(&r.data))
        .map(|r| &r.data[MAGIC.len()..r.data.len() - DIGEST_LEN])
        .collect();
    if messages.len() < md5_lanes::MIN_MESSAGES {
        return vec![Digest::Compute; records.len()];
    }
    let mut digests = md5_lanes::digests(&messages).into_iter();
    records
        .iter()
        .map(|r| {
            if !is_aggregate(&r.data) {
                return Digest::Compute;
            }
            match digests.next() {
                Some(digest) if digest[..] == r.data[r.data.len() - DIGEST_LEN..] => {
                    Digest::Matches
                }
                Some(_) => Digest::Differs,
                None => Digest::Compute,
            }
        })
        .collect()
}

/// The protobuf message of an aggregate, after checking its digest (unless checked already).
fn checked_message(data: &Bytes, digest: Digest) -> Result<Bytes, Corruption> {
    let end = data.len() - DIGEST_LEN;
    let message = data.slice(MAGIC.len()..end);
    let matches = match digest {
        Digest::Compute => Md5::digest(&message)[..] == data[end..],
        Digest::Matches => true,
        Digest::Differs => false,
    };
    if !matches {
        return Err(Corruption::ChecksumMismatch);
    }
    Ok(message)
}

/// Key tables kept per thread, so that deaggregating does not grow fresh vectors for every
/// aggregate. They are emptied after each use (no reference to an aggregate's buffer outlives
/// its parse) and shrunk when an unusually large aggregate grew them.
struct Scratch {
    partition_keys: Vec<PartitionKey>,
    explicit_hash_keys: Vec<Arc<str>>,
}

/// Capacity (keys) above which the scratch tables are given back.
const SCRATCH_KEEP: usize = 4096;

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = const {
        std::cell::RefCell::new(Scratch {
            partition_keys: Vec::new(),
            explicit_hash_keys: Vec::new(),
        })
    };
}

fn parse(record: &Record, digest: Digest, out: &mut Vec<Record>) -> Result<(), Corruption> {
    let message = checked_message(&record.data, digest)?;
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut scratch) => {
            let result = parse_with(record, &message, &mut scratch, out);
            scratch.clear();
            result
        }
        // Not reachable (nothing in a parse calls back into it), but never panic.
        Err(_) => parse_with(record, &message, &mut Scratch::new(), out),
    })
}

impl Scratch {
    fn new() -> Self {
        Self {
            partition_keys: Vec::new(),
            explicit_hash_keys: Vec::new(),
        }
    }

    fn clear(&mut self) {
        self.partition_keys.clear();
        self.explicit_hash_keys.clear();
        if self.partition_keys.capacity() > SCRATCH_KEEP
            || self.explicit_hash_keys.capacity() > SCRATCH_KEEP
        {
            *self = Self::new();
        }
    }
}

/// Field numbers of `AggregatedRecord` (see [`proto`](super::proto)).
const PARTITION_KEY_TABLE_FIELD: u32 = 1;
const EXPLICIT_HASH_KEY_TABLE_FIELD: u32 = 2;
const RECORDS_FIELD: u32 = 3;

/// Two walks over the message: the first checks its outer structure, makes one key per key
/// table entry and counts the user records (user records may come before or between the
/// table entries); the second decodes each user record straight into a [`Record`] whose data
/// and key share the aggregate's buffer.
fn parse_with(
    record: &Record,
    message: &Bytes,
    scratch: &mut Scratch,
    out: &mut Vec<Record>,
) -> Result<(), Corruption> {
    let Scratch {
        partition_keys,
        explicit_hash_keys,
    } = scratch;
    let mut fields = Fields::new(message);
    let mut user_records = 0usize;
    while let Some((field, wire_type)) = fields.next_key()? {
        match (field, wire_type) {
            (PARTITION_KEY_TABLE_FIELD, LEN) => {
                let entry = message.slice(fields.bytes()?);
                let key = PartitionKey::from_utf8(entry).map_err(|_| Corruption::InvalidKey {
                    table: PARTITION_KEY_TABLE,
                    index: partition_keys.len(),
                })?;
                partition_keys.push(key);
            }
            (EXPLICIT_HASH_KEY_TABLE_FIELD, LEN) => {
                let entry = fields.bytes()?;
                let key =
                    std::str::from_utf8(&message[entry]).map_err(|_| Corruption::InvalidKey {
                        table: EXPLICIT_HASH_KEY_TABLE,
                        index: explicit_hash_keys.len(),
                    })?;
                explicit_hash_keys.push(Arc::from(key));
            }
            (RECORDS_FIELD, LEN) => {
                fields.bytes()?;
                user_records += 1;
            }
            (PARTITION_KEY_TABLE_FIELD | EXPLICIT_HASH_KEY_TABLE_FIELD | RECORDS_FIELD, _) => {
                return Err(fields.wrong_wire_type().into())
            }
            (field, wire_type) => fields.skip(field, wire_type)?,
        }
    }
    if user_records == 0 {
        return Err(Corruption::Empty);
    }

    out.reserve(user_records);
    let mut fields = Fields::new(message);
    let mut sub = 0u64;
    while let Some((field, wire_type)) = fields.next_key()? {
        if (field, wire_type) != (RECORDS_FIELD, LEN) {
            fields.skip(field, wire_type)?;
            continue;
        }
        let body = fields.bytes()?;
        let user = fields.nested(body)?.user_record()?;
        let index = user.partition_key_index.ok_or(Corruption::MissingField {
            record: sub,
            field: "partition_key_index",
        })?;
        let partition_key = lookup(partition_keys, PARTITION_KEY_TABLE, sub, index)?.clone();
        let explicit_hash_key = match user.explicit_hash_key_index {
            Some(index) => {
                Some(lookup(explicit_hash_keys, EXPLICIT_HASH_KEY_TABLE, sub, index)?.clone())
            }
            None => None,
        };
        let data = user.data.ok_or(Corruption::MissingField {
            record: sub,
            field: "data",
        })?;
        out.push(Record {
            shard_id: record.shard_id.clone(),
            sequence_number: record.sequence_number,
            sub_sequence_number: Some(sub),
            partition_key,
            explicit_hash_key,
            data: message.slice(data),
            approximate_arrival_timestamp: record.approximate_arrival_timestamp,
        });
        sub += 1;
    }
    Ok(())
}

/// The fields of one user record (`Record` in [`proto`](super::proto)), as read.
struct UserFields {
    partition_key_index: Option<u64>,
    explicit_hash_key_index: Option<u64>,
    data: Option<Range<usize>>,
}

impl Fields<'_> {
    /// Reads a `Record` message: the indexes and the data's place; tags are checked (each a
    /// `Tag` message whose strings are UTF-8) and dropped, as Kinesis does not use them.
    fn user_record(mut self) -> Result<UserFields, ProtobufError> {
        let mut user = UserFields {
            partition_key_index: None,
            explicit_hash_key_index: None,
            data: None,
        };
        while let Some((field, wire_type)) = self.next_key()? {
            match (field, wire_type) {
                (1, VARINT) => user.partition_key_index = Some(self.varint()?),
                (2, VARINT) => user.explicit_hash_key_index = Some(self.varint()?),
                (3, LEN) => user.data = Some(self.bytes()?),
                (4, LEN) => {
                    let body = self.bytes()?;
                    self.nested(body)?.tag()?;
                }
                (1..=4, _) => return Err(self.wrong_wire_type()),
                (field, wire_type) => self.skip(field, wire_type)?,
            }
        }
        Ok(user)
    }

    /// Checks a `Tag` message: key and value, when present, are UTF-8 strings.
    fn tag(mut self) -> Result<(), ProtobufError> {
        while let Some((field, wire_type)) = self.next_key()? {
            match (field, wire_type) {
                (1 | 2, LEN) => {
                    let range = self.bytes()?;
                    self.utf8(range)?;
                }
                (1 | 2, _) => return Err(self.wrong_wire_type()),
                (field, wire_type) => self.skip(field, wire_type)?,
            }
        }
        Ok(())
    }
}

const PARTITION_KEY_TABLE: &str = "partition_key_table";
const EXPLICIT_HASH_KEY_TABLE: &str = "explicit_hash_key_table";

fn lookup<'a, K>(
    keys: &'a [K],
    table: &'static str,
    record: u64,
    index: u64,
) -> Result<&'a K, Corruption> {
    usize::try_from(index)
        .ok()
        .and_then(|i| keys.get(i))
        .ok_or(Corruption::IndexOutOfRange {
            record,
            table,
            index,
            len: keys.len(),
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kpl::Aggregator;
    use crate::{SequenceNumber, ShardId};
    use std::time::{Duration, SystemTime};

    pub(crate) fn outer(data: impl Into<Bytes>) -> Record {
        Record {
            shard_id: ShardId::from("shardId-000000000001"),
            sequence_number: SequenceNumber::parse("4959000000000000000000001").unwrap(),
            sub_sequence_number: None,
            partition_key: "outer".into(),
            explicit_hash_key: None,
            data: data.into(),
            approximate_arrival_timestamp: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(7)),
        }
    }

    /// Magic + message + the message's MD5.
    pub(crate) fn frame(message: &[u8]) -> Vec<u8> {
        let mut data = MAGIC.to_vec();
        data.extend_from_slice(message);
        data.extend_from_slice(&Md5::digest(message));
        data
    }

    fn problem(record: &Record) -> Corruption {
        let err = deaggregate(record).unwrap_err();
        assert_eq!(err.shard_id(), &record.shard_id);
        assert_eq!(err.sequence_number(), record.sequence_number);
        err.problem().clone()
    }

    #[test]
    fn plain_records_come_back_unchanged() {
        for data in [
            &b""[..],
            b"hello",
            &MAGIC[..],
            // magic but shorter than magic + digest
            &[
                0xF3, 0x89, 0x9A, 0xC2, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
            ],
            &[
                0xF3, 0x89, 0x9A, 0xC3, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17,
            ],
        ] {
            let record = outer(Bytes::copy_from_slice(data));
            assert!(!is_aggregate(&record.data));
            assert_eq!(deaggregate(&record).unwrap(), vec![record.clone()]);
            let mut out = Vec::new();
            assert!(!deaggregate_into(&record, &mut out).unwrap());
            assert!(out.is_empty());
        }
    }

    #[test]
    fn user_records_carry_keys_sub_sequence_and_arrival_time() {
        let mut aggregator = Aggregator::new();
        aggregator.add("a", None, "zero").unwrap();
        aggregator.add("b", Some("42"), "one").unwrap();
        aggregator.add("a", Some("7"), "").unwrap();
        aggregator.add("b", Some("42"), vec![0u8, 255]).unwrap();
        let aggregate = aggregator.finish().unwrap();
        let record = outer(aggregate.data.clone());
        let users = deaggregate(&record).unwrap();
        let seen: Vec<_> = users
            .iter()
            .map(|r| {
                (
                    r.sub_sequence_number,
                    r.partition_key.to_string(),
                    r.explicit_hash_key.as_deref().map(str::to_owned),
                    r.data.to_vec(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                (Some(0), "a".into(), None, b"zero".to_vec()),
                (Some(1), "b".into(), Some("42".into()), b"one".to_vec()),
                (Some(2), "a".into(), Some("7".into()), vec![]),
                (Some(3), "b".into(), Some("42".into()), vec![0, 255]),
            ]
        );
        for user in &users {
            assert_eq!(user.shard_id, record.shard_id);
            assert_eq!(user.sequence_number, record.sequence_number);
            assert_eq!(
                user.approximate_arrival_timestamp,
                record.approximate_arrival_timestamp
            );
        }
        // The data and the keys point into the aggregate's buffer: one key per table entry,
        // no copy.
        let range = aggregate.data.as_ptr_range();
        assert!(range.contains(&users[0].data.as_ptr()));
        assert!(range.contains(&users[0].partition_key.as_ptr()));
        assert_eq!(
            users[0].partition_key.as_ptr(),
            users[2].partition_key.as_ptr()
        );
    }

    #[test]
    fn checksum_mismatch() {
        let mut aggregator = Aggregator::new();
        aggregator.add("a", None, "zero").unwrap();
        let mut data = aggregator.finish().unwrap().data.to_vec();
        let n = data.len();
        data[n - 1] ^= 1;
        assert_eq!(problem(&outer(data.clone())), Corruption::ChecksumMismatch);
        // A truncated aggregate: the last 16 bytes are no longer the digest.
        data.truncate(n - 3);
        assert_eq!(problem(&outer(data)), Corruption::ChecksumMismatch);
    }

    #[test]
    fn truncated_and_invalid_protobuf() {
        let mut aggregator = Aggregator::new();
        aggregator.add("a", None, "some data").unwrap();
        let data = aggregator.finish().unwrap().data;
        let message = &data[MAGIC.len()..data.len() - DIGEST_LEN];
        // The message cut short, with a digest that matches the cut message.
        let truncated = frame(&message[..message.len() - 2]);
        assert!(matches!(
            problem(&outer(truncated)),
            Corruption::InvalidProtobuf(_)
        ));
        // Wire type 7 does not exist.
        assert!(matches!(
            problem(&outer(frame(&[0x0F, 0x00]))),
            Corruption::InvalidProtobuf(_)
        ));
        // A string field declaring far more bytes than there are.
        let huge = [
            0x0A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F, b'x',
        ];
        assert!(matches!(
            problem(&outer(frame(&huge))),
            Corruption::InvalidProtobuf(_)
        ));
    }

    #[test]
    fn huge_declared_lengths_are_rejected_without_allocating() {
        // records = 3 holding a message declaring u64::MAX-ish bytes, and data = 3 inside a
        // well-formed record declaring 2^62 bytes.
        let mut nested = vec![0x08, 0x00, 0x1A];
        nested.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x40]);
        nested.push(0x01);
        let mut message = vec![0x0A, 0x01, b'k', 0x1A, nested.len() as u8];
        message.extend_from_slice(&nested);
        for m in [
            message,
            vec![
                0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01,
            ],
            vec![0x12, 0xFE, 0xFF, 0xFF, 0xFF, 0x0F, 0x00],
        ] {
            assert!(matches!(
                problem(&outer(frame(&m))),
                Corruption::InvalidProtobuf(_)
            ));
        }
    }

    #[test]
    fn index_outside_a_key_table() {
        // partition_key_table = ["k"], record { partition_key_index = 1, data = "" }
        let message = [0x0A, 0x01, b'k', 0x1A, 0x04, 0x08, 0x01, 0x1A, 0x00];
        assert_eq!(
            problem(&outer(frame(&message))),
            Corruption::IndexOutOfRange {
                record: 0,
                table: PARTITION_KEY_TABLE,
                index: 1,
                len: 1
            }
        );
        // explicit_hash_key_index = 0 with an empty table, in the second record
        let message = [
            0x0A, 0x01, b'k', 0x1A, 0x04, 0x08, 0x00, 0x1A, 0x00, 0x1A, 0x06, 0x08, 0x00, 0x10,
            0x00, 0x1A, 0x00,
        ];
        assert_eq!(
            problem(&outer(frame(&message))),
            Corruption::IndexOutOfRange {
                record: 1,
                table: EXPLICIT_HASH_KEY_TABLE,
                index: 0,
                len: 0
            }
        );
        // an index beyond usize
        let message = [
            0x0A, 0x01, b'k', 0x1A, 0x0D, 0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0xFF, 0x01, 0x1A, 0x00,
        ];
        assert!(matches!(
            problem(&outer(frame(&message))),
            Corruption::IndexOutOfRange {
                index: u64::MAX,
                ..
            }
        ));
    }

    #[test]
    fn missing_required_fields_and_bad_keys() {
        let message = [0x0A, 0x01, b'k', 0x1A, 0x02, 0x1A, 0x00];
        assert_eq!(
            problem(&outer(frame(&message))),
            Corruption::MissingField {
                record: 0,
                field: "partition_key_index"
            }
        );
        let message = [0x0A, 0x01, b'k', 0x1A, 0x02, 0x08, 0x00];
        assert_eq!(
            problem(&outer(frame(&message))),
            Corruption::MissingField {
                record: 0,
                field: "data"
            }
        );
        let message = [0x0A, 0x01, 0xFF, 0x1A, 0x04, 0x08, 0x00, 0x1A, 0x00];
        assert_eq!(
            problem(&outer(frame(&message))),
            Corruption::InvalidKey {
                table: PARTITION_KEY_TABLE,
                index: 0
            }
        );
    }

    #[test]
    fn empty_aggregate() {
        assert_eq!(problem(&outer(frame(&[]))), Corruption::Empty);
        // Key tables but no record.
        assert_eq!(
            problem(&outer(frame(&[0x0A, 0x01, b'k']))),
            Corruption::Empty
        );
    }

    #[test]
    fn errors_leave_the_output_as_it_was() {
        let message = [
            0x0A, 0x01, b'k', 0x1A, 0x04, 0x08, 0x00, 0x1A, 0x00, 0x1A, 0x04, 0x08, 0x05, 0x1A,
            0x00,
        ];
        let mut out = vec![outer("before")];
        assert!(deaggregate_into(&outer(frame(&message)), &mut out).is_err());
        assert_eq!(out, vec![outer("before")]);
    }

    #[test]
    fn unknown_fields_and_tags_are_accepted() {
        // record { pk 0, data "d", tags [{key "t", value "v"}], field 9 = 1 }; table field 15
        let message = [
            0x0A, 0x01, b'k', 0x7A, 0x01, b'z', 0x1A, 0x0F, 0x08, 0x00, 0x1A, 0x01, b'd', 0x22,
            0x06, 0x0A, 0x01, b't', 0x12, 0x01, b'v', 0x48, 0x01,
        ];
        let users = deaggregate(&outer(frame(&message))).unwrap();
        assert_eq!(users.len(), 1);
        assert_eq!(users[0].data, "d");
    }
}
