//! Smoke tests of the emulators and of the helpers in `tests/common`.
//! The kinesis-mock test needs the external emulator (`scripts/test` starts it).

mod common;

use std::collections::HashSet;

use aws_sdk_kinesis::types::ShardIteratorType;
use aws_sdk_kinesis::Client;

fn sample_records(n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| (format!("key-{i}"), format!("record-{i}").into_bytes()))
        .collect()
}

/// Creates a 2-shard stream, writes 20 records, lists the shards (with `page_size`), reads
/// everything back and deletes the stream.
async fn exercise(client: &Client, prefix: &str, page_size: Option<i32>) {
    let stream = common::unique_stream_name(prefix);
    common::create_stream(client, &stream, 2).await;

    let records = sample_records(20);
    let written = common::put_records(client, &stream, &records).await;
    assert_eq!(written.len(), records.len());

    let shards = common::list_all_shards_paged(client, &stream, page_size).await;
    let shard_ids: Vec<&str> = shards.iter().map(|s| s.shard_id()).collect();
    assert_eq!(shard_ids.len(), 2, "shards: {shard_ids:?}");
    assert_eq!(
        shard_ids.iter().collect::<HashSet<_>>().len(),
        2,
        "duplicate shards: {shard_ids:?}"
    );
    for (shard, _) in &written {
        assert!(
            shard_ids.contains(&shard.as_str()),
            "unknown shard {shard} in {shard_ids:?}"
        );
    }

    // Read every shard from TRIM_HORIZON: each record comes back once, in its shard's
    // sequence order, with the shard and sequence number PutRecords reported.
    let mut seen = Vec::new();
    for shard_id in &shard_ids {
        let mut iterator = client
            .get_shard_iterator()
            .stream_name(&stream)
            .shard_id(*shard_id)
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
            .expect("GetShardIterator")
            .shard_iterator()
            .map(str::to_string);
        let mut empty_reads = 0;
        while let Some(it) = iterator.take() {
            let out = client
                .get_records()
                .shard_iterator(it)
                .send()
                .await
                .expect("GetRecords");
            if out.records().is_empty() {
                empty_reads += 1;
                if empty_reads >= 2 {
                    break;
                }
            }
            for r in out.records() {
                seen.push((
                    shard_id.to_string(),
                    r.sequence_number().to_string(),
                    r.partition_key().unwrap_or_default().to_string(),
                    r.data().as_ref().to_vec(),
                ));
            }
            iterator = out.next_shard_iterator().map(str::to_string);
        }
    }
    assert_eq!(seen.len(), records.len());
    for ((key, data), (shard, seq)) in records.iter().zip(&written) {
        let found = seen
            .iter()
            .find(|(s, q, _, _)| s == shard && q == seq)
            .unwrap_or_else(|| panic!("record {key} ({shard}/{seq}) not read back"));
        assert_eq!(&found.2, key);
        assert_eq!(&found.3, data);
    }

    common::delete_stream(client, &stream).await;
    // Deleting again (or a stream that never existed) is not an error.
    common::delete_stream(client, &stream).await;
}

#[tokio::test]
async fn kinesis_mock_round_trip() {
    let client = common::kinesis_mock_client().await;
    // Page size 1: two ListShards pages, the second requested by NextToken alone.
    exercise(&client, "smoke-mock", Some(1)).await;
}

#[tokio::test]
async fn kinesis_mock_list_shards_paginates() {
    let client = common::kinesis_mock_client().await;
    let stream = common::unique_stream_name("smoke-pages");
    common::create_stream(&client, &stream, 3).await;
    let first = client
        .list_shards()
        .stream_name(&stream)
        .max_results(1)
        .send()
        .await
        .expect("ListShards");
    assert_eq!(first.shards().len(), 1);
    assert!(first.next_token().is_some(), "expected a NextToken");
    let all = common::list_all_shards_paged(&client, &stream, Some(1)).await;
    assert_eq!(all.len(), 3);
    assert_eq!(common::list_all_shards(&client, &stream).await, all);
    common::delete_stream(&client, &stream).await;
}

#[tokio::test]
async fn embedded_ferrokinesis_round_trip() {
    let kinesis = common::start_ferrokinesis().await;
    exercise(&kinesis.client, "smoke-ferro", None).await;
}

#[tokio::test]
async fn embedded_ferrokinesis_put_records_in_chunks() {
    let kinesis = common::start_ferrokinesis().await;
    let client = &kinesis.client;
    let stream = common::unique_stream_name("smoke-chunks");
    common::create_stream(client, &stream, 4).await;
    // 1_234 records: three PutRecords requests (500 + 500 + 234).
    let records = sample_records(1_234);
    let written = common::put_records(client, &stream, &records).await;
    assert_eq!(written.len(), records.len());
    let unique: HashSet<_> = written.iter().collect();
    assert_eq!(
        unique.len(),
        written.len(),
        "duplicate (shard, sequence) pairs"
    );
    // The same partition key always lands on the same shard.
    let again = common::put_records(client, &stream, &records[..10]).await;
    for (a, b) in written.iter().zip(&again) {
        assert_eq!(a.0, b.0);
        assert_ne!(a.1, b.1);
    }
    common::delete_stream(client, &stream).await;
}

#[tokio::test]
async fn unique_stream_names_differ() {
    let a = common::unique_stream_name("x");
    let b = common::unique_stream_name("x");
    assert_ne!(a, b);
    assert!(a.len() <= 128);
}
