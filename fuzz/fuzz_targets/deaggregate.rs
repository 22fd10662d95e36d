//! Feeds arbitrary bytes to the KPL parser: raw, and framed as an aggregate (magic, the bytes
//! as the protobuf message, their MD5) so that most inputs get past the checksum.
#![no_main]

use bytes::Bytes;
use kinesis_tower_layers::{kpl::{deaggregate, MAGIC}};
use kinesis_tower_layers::{Record, SequenceNumber, ShardId};
use libfuzzer_sys::fuzz_target;
use md5::{Digest, Md5};

fn record(data: Bytes) -> Record {
    Record {
        shard_id: ShardId::from("shardId-000000000000"),
        sequence_number: SequenceNumber::parse("49590338271490256608559692538361571095921575989136588898")
            .expect("a valid sequence number"),
        sub_sequence_number: None,
        partition_key: "pk".into(),
        explicit_hash_key: None,
        data,
        approximate_arrival_timestamp: None,
    }
}

fn check(data: Bytes) {
    let outer = record(data);
    if let Ok(users) = deaggregate(&outer) {
        assert!(!users.is_empty());
        let aggregated = users[0].sub_sequence_number.is_some();
        for (i, user) in users.iter().enumerate() {
            assert_eq!(user.sequence_number, outer.sequence_number);
            if aggregated {
                assert_eq!(user.sub_sequence_number, Some(i as u64));
                assert!(user.data.len() <= outer.data.len());
            } else {
                assert_eq!(user, &outer);
            }
        }
    }
}

fuzz_target!(|input: &[u8]| {
    check(Bytes::copy_from_slice(input));
    let mut framed = MAGIC.to_vec();
    framed.extend_from_slice(input);
    framed.extend_from_slice(&Md5::digest(input));
    check(Bytes::from(framed));
});
