//! Interoperability of the KPL format with the reference Python implementation
//! (`aws-kinesis-agg`):
//!
//! * `python_vectors_decode_identically`: the aggregates in `tests/data/kpl/vectors.json`, made
//!   by the Python aggregator (`scripts/kpl_vectors.py`), decode into exactly the user records
//!   that went into them;
//! * `our_aggregates_decode_with_the_python_library`: aggregates made by [`Aggregator`] are
//!   deaggregated by the Python library (`scripts/kpl_check.py`, run with `$KT_PYTHON`) into the
//!   same user records as by ours. Needs `source scripts/env.sh && ensure_kpl_python`.

use std::path::{Path, PathBuf};
use std::process::Command;

use aws_smithy_types::base64;
use bytes::Bytes;
use kinesis_tower::kpl::{deaggregate, Aggregator};
use kinesis_tower::{Record, SequenceNumber, ShardId};
use serde_json::{json, Value};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn record(sequence: u64, partition_key: &str, data: Bytes) -> Record {
    Record {
        shard_id: ShardId::from("shardId-000000000000"),
        sequence_number: SequenceNumber::parse(&format!("4959{sequence:030}")).unwrap(),
        sub_sequence_number: None,
        partition_key: partition_key.into(),
        explicit_hash_key: None,
        data,
        approximate_arrival_timestamp: None,
    }
}

/// (partition key, explicit hash key, data) of a user record.
type User = (String, Option<String>, Vec<u8>);

fn users(records: &[Record]) -> Vec<User> {
    records
        .iter()
        .map(|r| {
            (
                r.partition_key.to_string(),
                r.explicit_hash_key.as_deref().map(str::to_owned),
                r.data.to_vec(),
            )
        })
        .collect()
}

fn str_or_null(value: &Value) -> Option<String> {
    value.as_str().map(str::to_owned)
}

#[test]
fn python_vectors_decode_identically() {
    let path = repo().join("tests/data/kpl/vectors.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let vectors: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert!(vectors.len() >= 7, "{} vectors", vectors.len());
    for (i, vector) in vectors.iter().enumerate() {
        let name = vector["name"].as_str().unwrap();
        let data = base64::decode(vector["data"].as_str().unwrap()).unwrap();
        let outer_key = vector["partition_key"].as_str().unwrap();
        let outer = record(i as u64, outer_key, Bytes::from(data));
        let decoded = deaggregate(&outer).unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected: Vec<User> = vector["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r[0].as_str().unwrap().to_owned(),
                    str_or_null(&r[1]),
                    base64::decode(r[2].as_str().unwrap()).unwrap(),
                )
            })
            .collect();
        assert_eq!(users(&decoded), expected, "vector {name:?}");
        let subs: Vec<_> = decoded.iter().map(|r| r.sub_sequence_number).collect();
        let want: Vec<_> = (0..expected.len() as u64).map(Some).collect();
        assert_eq!(subs, want, "vector {name:?}");
        // The outer keys the Python aggregator chose are the first user record's, as ours.
        assert_eq!(outer_key, expected[0].0, "vector {name:?}");
        assert_eq!(str_or_null(&vector["explicit_hash_key"]), expected[0].1);
    }
}

fn kt_python() -> PathBuf {
    const HOW: &str = "run `source scripts/env.sh && ensure_kpl_python` (a venv with aws-kinesis-agg; it exports KT_PYTHON)";
    let python =
        std::env::var_os("KT_PYTHON").unwrap_or_else(|| panic!("KT_PYTHON is not set: {HOW}"));
    let python = PathBuf::from(python);
    assert!(
        python.is_file(),
        "KT_PYTHON={} does not exist: {HOW}",
        python.display()
    );
    python
}

/// Aggregates of varied shapes, made by our Aggregator, plus a plain record.
fn our_records() -> Vec<Record> {
    let binary: Vec<u8> = (0..=255).collect();
    let cases: Vec<Vec<User>> = vec![
        vec![("only".into(), None, b"hello".to_vec())],
        (0..100)
            .map(|i| ("shared".into(), None, format!("r{i}").into_bytes()))
            .collect(),
        (0..100)
            .map(|i| (format!("k{i}"), None, vec![i as u8; i]))
            .collect(),
        // Every user record with an explicit hash key: the Python library reads a missing
        // index as 0, so aggregates mixing both are compared in the vectors test only.
        vec![
            ("a".into(), Some("0".into()), b"first".to_vec()),
            (
                "b".into(),
                Some("340282366920938463463374607431768211455".into()),
                binary.clone(),
            ),
            ("a".into(), Some("0".into()), vec![]),
        ],
        vec![
            ("clé-ü".into(), None, vec![]),
            ("日本語キー".into(), None, b"\xf3\x89\x9a\xc2".to_vec()),
            ("🎉🎉🎉".into(), None, binary),
        ],
        // A large aggregate: 200 records of 4 KiB.
        (0..200)
            .map(|i| (format!("big-{}", i % 7), None, vec![(i % 251) as u8; 4096]))
            .collect(),
    ];
    let mut records = Vec::new();
    for (i, case) in cases.into_iter().enumerate() {
        let mut aggregator = Aggregator::new();
        for (pk, ehk, data) in case {
            assert!(aggregator.add(&pk, ehk.as_deref(), data).unwrap().is_none());
        }
        let aggregate = aggregator.finish().unwrap();
        records.push(record(i as u64, &aggregate.partition_key, aggregate.data));
    }
    records.push(record(99, "plain", Bytes::from_static(b"not an aggregate")));
    records
}

fn python_deaggregate(python: &Path, records: &[Record]) -> Vec<Value> {
    let input: Vec<Value> = records
        .iter()
        .map(|r| {
            json!({
                "sequence_number": r.sequence_number.to_string(),
                "partition_key": &*r.partition_key,
                "data": base64::encode(&r.data),
            })
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("records.json");
    std::fs::write(&file, serde_json::to_vec(&input).unwrap()).unwrap();
    let output = Command::new(python)
        .arg(repo().join("scripts/kpl_check.py"))
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    assert!(
        output.status.success(),
        "kpl_check.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn our_aggregates_decode_with_the_python_library() {
    let python = kt_python();
    let records = our_records();
    let theirs = python_deaggregate(&python, &records);

    let mut ours = Vec::new();
    for record in &records {
        ours.extend(deaggregate(record).unwrap());
    }
    assert_eq!(ours.len(), theirs.len());
    assert_eq!(ours.len(), 1 + 100 + 100 + 3 + 3 + 200 + 1);
    for (mine, their) in ours.iter().zip(&theirs) {
        let context = format!("{} / {:?}", mine.sequence_number, mine.sub_sequence_number);
        assert_eq!(
            their["sequence_number"].as_str().unwrap(),
            mine.sequence_number.to_string(),
            "{context}"
        );
        assert_eq!(
            their["sub_sequence_number"].as_u64(),
            mine.sub_sequence_number,
            "{context}"
        );
        assert_eq!(
            their["aggregated"].as_bool().unwrap(),
            mine.sub_sequence_number.is_some(),
            "{context}"
        );
        assert_eq!(
            their["partition_key"].as_str().unwrap(),
            &*mine.partition_key,
            "{context}"
        );
        assert_eq!(
            str_or_null(&their["explicit_hash_key"]),
            mine.explicit_hash_key.as_deref().map(str::to_owned),
            "{context}"
        );
        assert_eq!(
            base64::decode(their["data"].as_str().unwrap()).unwrap(),
            mine.data.to_vec(),
            "{context}"
        );
    }
}
