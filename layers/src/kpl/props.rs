//! Property tests: the parser never panics, and aggregation round-trips.

use bytes::Bytes;
use md5::{Digest, Md5};
use proptest::prelude::*;

use super::deaggregate::tests::{frame, outer};
use super::{deaggregate, proto, Aggregator, MAGIC};

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
