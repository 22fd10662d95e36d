//! Property tests: the parser never panics, and aggregation round-trips.

use bytes::Bytes;
use md5::{Digest, Md5};
use proptest::prelude::*;
use prost::encoding::encode_varint;

use super::deaggregate::tests::{frame, outer};
use super::{deaggregate, proto, Aggregator, Corruption, MAGIC};

fn check_never_panics(data: Vec<u8>) {
    let record = outer(data);
    match deaggregate(&record) {
        Ok(users) => {
            assert!(!users.is_empty());
            if users[0].sub_sequence_number.is_some() {
                for (i, user) in users.iter().enumerate() {
                    assert_eq!(user.sub_sequence_number, Some(i as u64));
                    assert_eq!(user.sequence_number, record.sequence_number);
                }
            } else {
                assert_eq!(users, vec![record]);
            }
        }
        Err(error) => assert_eq!(error.sequence_number(), record.sequence_number),
    }
}

/// A user record as (partition key, explicit hash key, data).
type UserFields = (String, Option<String>, Vec<u8>);

/// What the `proto` structs (prost's decoder) make of a message, validated as the format
/// requires: the user records as (partition key, explicit hash key, data), or `None` when it
/// is not a valid aggregate.
fn oracle(message: &[u8]) -> Option<Vec<UserFields>> {
    let aggregated = <proto::AggregatedRecord as prost::Message>::decode(message).ok()?;
    let table = |entries: &[Bytes]| -> Option<Vec<String>> {
        entries
            .iter()
            .map(|e| String::from_utf8(e.to_vec()).ok())
            .collect()
    };
    let pks = table(&aggregated.partition_key_table)?;
    let ehks = table(&aggregated.explicit_hash_key_table)?;
    if aggregated.records.is_empty() {
        return None;
    }
    aggregated
        .records
        .iter()
        .map(|r| {
            let pk = pks
                .get(usize::try_from(r.partition_key_index?).ok()?)?
                .clone();
            let ehk = match r.explicit_hash_key_index {
                Some(i) => Some(ehks.get(usize::try_from(i).ok()?)?.clone()),
                None => None,
            };
            Some((pk, ehk, r.data.as_ref()?.to_vec()))
        })
        .collect()
}

/// The hand-written decoder accepts what prost's does, with the same user records, and
/// refuses as invalid protobuf only what prost's refuses.
fn check_agrees_with_prost(message: &[u8]) {
    let ours = deaggregate(&outer(frame(message)));
    match (oracle(message), ours) {
        (Some(expected), Ok(users)) => {
            let got: Vec<_> = users
                .iter()
                .map(|u| {
                    (
                        u.partition_key.to_string(),
                        u.explicit_hash_key.as_deref().map(str::to_owned),
                        u.data.to_vec(),
                    )
                })
                .collect();
            assert_eq!(got, expected, "{message:02x?}");
        }
        (None, Err(error)) => {
            if let Corruption::InvalidProtobuf(_) = error.problem() {
                assert!(
                    <proto::AggregatedRecord as prost::Message>::decode(message).is_err(),
                    "{message:02x?}: {error}"
                );
            }
        }
        (expected, ours) => panic!("{message:02x?}: prost {expected:?}, ours {ours:?}"),
    }
}

/// Groups nested up to and past the decoders' depth limit, at the top of the message and
/// inside a user record: accepted and refused at the same depth as prost's decoder.
#[test]
fn nesting_limit_is_prost_s() {
    for depth in [97usize, 98, 99, 100, 101, 102] {
        let groups = |out: &mut Vec<u8>| {
            out.extend(std::iter::repeat_n(0x2B, depth)); // field 5, start group
            out.extend(std::iter::repeat_n(0x2C, depth)); // field 5, end group
        };
        // partition_key_table ["k"], then the groups, then record { pk 0, data "" }.
        let mut top = vec![0x0A, 0x01, b'k'];
        groups(&mut top);
        top.extend([0x1A, 0x04, 0x08, 0x00, 0x1A, 0x00]);
        check_agrees_with_prost(&top);
        // The groups inside the record.
        let mut body = vec![0x08, 0x00, 0x1A, 0x00];
        groups(&mut body);
        let mut inner = vec![0x0A, 0x01, b'k', 0x1A];
        encode_varint(body.len() as u64, &mut inner);
        inner.extend(body);
        check_agrees_with_prost(&inner);
    }
}

/// One protobuf field, of the kinds an aggregate holds and the kinds it should skip.
#[derive(Clone, Debug)]
enum Field {
    Varint(u32, u64),
    Bytes(u32, Vec<u8>),
    Message(u32, Vec<Field>),
    Fixed32(u32),
    Fixed64(u32),
    Group(u32, Vec<Field>),
}

fn encode(fields: &[Field], out: &mut Vec<u8>) {
    for field in fields {
        match field {
            Field::Varint(n, v) => {
                encode_varint(u64::from(*n) << 3, out);
                encode_varint(*v, out);
            }
            Field::Bytes(n, b) => {
                encode_varint(u64::from(*n) << 3 | 2, out);
                encode_varint(b.len() as u64, out);
                out.extend_from_slice(b);
            }
            Field::Message(n, inner) => {
                let mut body = Vec::new();
                encode(inner, &mut body);
                encode(&[Field::Bytes(*n, body)], out);
            }
            Field::Fixed32(n) => {
                encode_varint(u64::from(*n) << 3 | 5, out);
                out.extend_from_slice(&[1, 2, 3, 4]);
            }
            Field::Fixed64(n) => {
                encode_varint(u64::from(*n) << 3 | 1, out);
                out.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
            }
            Field::Group(n, inner) => {
                encode_varint(u64::from(*n) << 3 | 3, out);
                encode(inner, out);
                encode_varint(u64::from(*n) << 3 | 4, out);
            }
        }
    }
}

/// Fields numbered 1 to 6 (the known ones and neighbours) of every wire type, nested up to
/// `depth`; byte strings short and sometimes not UTF-8.
fn field(depth: u32) -> impl Strategy<Value = Field> {
    let number = 1u32..7;
    let leaf = prop_oneof![
        (number.clone(), 0u64..4).prop_map(|(n, v)| Field::Varint(n, v)),
        (
            number.clone(),
            prop_oneof![
                "[a-c]{0,3}".prop_map(String::into_bytes),
                proptest::collection::vec(any::<u8>(), 0..4)
            ]
        )
            .prop_map(|(n, b)| Field::Bytes(n, b)),
        number.clone().prop_map(Field::Fixed32),
        number.clone().prop_map(Field::Fixed64),
    ];
    leaf.prop_recursive(depth, 24, 4, move |inner| {
        prop_oneof![
            (1u32..7, proptest::collection::vec(inner.clone(), 0..4))
                .prop_map(|(n, f)| Field::Message(n, f)),
            (1u32..7, proptest::collection::vec(inner, 0..3)).prop_map(|(n, f)| Field::Group(n, f)),
        ]
    })
}

/// A user record: partition key (1-20 chars, any Unicode), optional explicit hash key, data.
fn user_record() -> impl Strategy<Value = (String, Option<String>, Vec<u8>)> {
    (
        "\\PC{1,20}",
        proptest::option::of(any::<u128>().prop_map(|n| n.to_string())),
        proptest::collection::vec(any::<u8>(), 0..300),
    )
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        check_never_panics(data);
    }

    #[test]
    fn arbitrary_bytes_after_the_magic_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut data = MAGIC.to_vec();
        data.extend(tail);
        check_never_panics(data);
    }

    #[test]
    fn arbitrary_protobuf_with_a_valid_digest_never_panics(message in proptest::collection::vec(any::<u8>(), 0..512)) {
        check_never_panics(frame(&message));
    }

    /// Well-formed messages with arbitrary (often out-of-range) indexes and missing fields.
    #[test]
    fn arbitrary_messages_never_panic(
        pks in proptest::collection::vec("\\PC{0,5}", 0..4),
        ehks in proptest::collection::vec("[0-9]{0,5}", 0..3),
        records in proptest::collection::vec(
            (proptest::option::of(0u64..6), proptest::option::of(0u64..4), proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8))),
            0..6,
        ),
    ) {
        let message = proto::AggregatedRecord {
            partition_key_table: pks.into_iter().map(Bytes::from).collect(),
            explicit_hash_key_table: ehks.into_iter().map(Bytes::from).collect(),
            records: records
                .into_iter()
                .map(|(pk, ehk, data)| proto::Record {
                    partition_key_index: pk,
                    explicit_hash_key_index: ehk,
                    data: data.map(Bytes::from),
                    tags: Vec::new(),
                })
                .collect(),
        };
        check_never_panics(frame(&prost::Message::encode_to_vec(&message)));
    }

    /// Valid aggregates with extra fields put in at the top and inside user records: known
    /// fields with right and wrong wire types, unknown fields of every kind (groups too),
    /// tags, nested messages, strings that are not UTF-8.
    #[test]
    fn decoder_agrees_with_prost_on_messages(
        keys in proptest::collection::vec("[a-c]{1,3}", 1..4),
        records in proptest::collection::vec(
            (0u64..3, proptest::option::of(proptest::collection::vec(any::<u8>(), 0..4)),
             proptest::option::of(proptest::collection::vec(any::<u8>(), 0..3)),
             proptest::collection::vec((any::<proptest::sample::Index>(), field(2)), 0..2)),
            1..4,
        ),
        extras in proptest::collection::vec((any::<proptest::sample::Index>(), field(2)), 0..3),
    ) {
        let mut fields: Vec<Field> = keys.iter().map(|k| Field::Bytes(1, k.clone().into_bytes())).collect();
        for (index, data, tag, inner_extras) in records {
            let mut inner = vec![Field::Varint(1, index)];
            inner.extend(data.map(|d| Field::Bytes(3, d)));
            // A tag whose key is any bytes (often not UTF-8).
            inner.extend(tag.map(|key| Field::Message(4, vec![Field::Bytes(1, key)])));
            for (at, extra) in inner_extras {
                inner.insert(at.index(inner.len() + 1), extra);
            }
            fields.push(Field::Message(3, inner));
        }
        for (at, extra) in extras {
            fields.insert(at.index(fields.len() + 1), extra);
        }
        let mut message = Vec::new();
        encode(&fields, &mut message);
        check_agrees_with_prost(&message);
    }

    /// Valid aggregates with one byte changed (the digest recomputed, so the decoder sees it).
    #[test]
    fn decoder_agrees_with_prost_on_altered_aggregates(
        users in proptest::collection::vec(user_record(), 1..8),
        at in any::<proptest::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut aggregator = Aggregator::new();
        for (pk, ehk, data) in &users {
            prop_assert!(aggregator.add(pk, ehk.as_deref(), data.clone()).unwrap().is_none());
        }
        let data = aggregator.finish().unwrap().data;
        let mut message = data[MAGIC.len()..data.len() - 16].to_vec();
        check_agrees_with_prost(&message);
        let i = at.index(message.len());
        message[i] = byte;
        check_agrees_with_prost(&message);
    }

    #[test]
    fn decoder_agrees_with_prost_on_arbitrary_bytes(message in proptest::collection::vec(any::<u8>(), 0..256)) {
        check_agrees_with_prost(&message);
    }

    #[test]
    fn aggregate_then_deaggregate_round_trips(
        users in proptest::collection::vec(user_record(), 1..60),
        limit in 700usize..4000,
    ) {
        let mut aggregator = Aggregator::with_limit(limit);
        let mut aggregates = Vec::new();
        for (pk, ehk, data) in &users {
            if let Some(full) = aggregator.add(pk, ehk.as_deref(), data.clone()).unwrap() {
                aggregates.push(full);
            }
        }
        aggregates.extend(aggregator.finish());
        let mut back = Vec::new();
        for aggregate in &aggregates {
            prop_assert!(aggregate.size() <= limit);
            let data = &aggregate.data;
            prop_assert_eq!(&Md5::digest(&data[4..data.len() - 16])[..], &data[data.len() - 16..]);
            let decoded = deaggregate(&outer(aggregate.data.clone())).unwrap();
            prop_assert_eq!(decoded.len(), aggregate.user_records);
            prop_assert_eq!(&*decoded[0].partition_key, aggregate.partition_key.as_str());
            prop_assert_eq!(
                decoded[0].explicit_hash_key.as_deref(),
                aggregate.explicit_hash_key.as_deref()
            );
            for (i, user) in decoded.into_iter().enumerate() {
                prop_assert_eq!(user.sub_sequence_number, Some(i as u64));
                back.push((
                    user.partition_key.to_string(),
                    user.explicit_hash_key.as_deref().map(str::to_owned),
                    user.data.to_vec(),
                ));
            }
        }
        prop_assert_eq!(back, users);
    }
}
