//! KPL deaggregation: 10,000 aggregates of 100 user records of 100 bytes (1,000,000 user
//! records). Every figure is for the whole set, so the throughputs compare directly:
//!
//! - `md5` (the baseline): the MD5 of each aggregate's protobuf bytes, which any parser must
//!   compute to check the aggregate;
//! - `parse`: `kpl::deaggregate_into` over each aggregate into a reused vector (checksum,
//!   protobuf decode, key tables, one `Record` per user record, dropping them again);
//! - `layer`: `DeaggregateService::expand` over batches of 100 aggregates, as a consumer
//!   hands them over, each expanded batch dropped after it (cloning the input batches is
//!   excluded from the timing); it hashes the aggregates of a batch side by side.
//!
//! Every user record has its own partition key within its aggregate (100 keys per aggregate),
//! the costly case: one key is made per key table entry.
//!
//! `cargo bench --bench deaggregate --all-features`

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kinesis_tower::kpl::{deaggregate_into, Aggregator, DeaggregateService, DIGEST_LEN, MAGIC};
use kinesis_tower::{Batch, Record, SequenceNumber, ShardId};
use md5::{Digest, Md5};

const AGGREGATES: usize = 10_000;
const USER_RECORDS: usize = 100;
const USER_BYTES: usize = 100;
const BATCH_AGGREGATES: usize = 100;

fn aggregates() -> Vec<Record> {
    let shard = ShardId::from("shardId-000000000000");
    let mut rng = fastrand::Rng::with_seed(7);
    (0..AGGREGATES)
        .map(|a| {
            let mut aggregator = Aggregator::new();
            for u in 0..USER_RECORDS {
                let data: Vec<u8> = (0..USER_BYTES).map(|_| rng.u8(..)).collect();
                let key = format!("partition-key-{}", (a * USER_RECORDS + u) % 1_000);
                assert!(aggregator.add(&key, None, data).expect("fits").is_none());
            }
            let aggregate = aggregator.finish().expect("not empty");
            Record {
                shard_id: shard.clone(),
                sequence_number: SequenceNumber::parse(&format!("4959{a:040}")).expect("valid"),
                sub_sequence_number: None,
                partition_key: aggregate.partition_key.as_str().into(),
                explicit_hash_key: None,
                data: aggregate.data,
                approximate_arrival_timestamp: None,
            }
        })
        .collect()
}

fn deaggregate(c: &mut Criterion) {
    let records = aggregates();
    let bytes: usize = records.iter().map(|r| r.data.len()).sum();
    let messages: Vec<Bytes> = records
        .iter()
        .map(|r| r.data.slice(MAGIC.len()..r.data.len() - DIGEST_LEN))
        .collect();
    println!(
        "{AGGREGATES} aggregates, {} user records, {:.1} MB",
        AGGREGATES * USER_RECORDS,
        bytes as f64 / 1e6
    );

    let mut group = c.benchmark_group("deaggregate");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements((AGGREGATES * USER_RECORDS) as u64));

    group.bench_function("md5", |b| {
        b.iter(|| {
            for message in &messages {
                black_box(Md5::digest(black_box(message)));
            }
        })
    });

    let mut out = Vec::with_capacity(USER_RECORDS);
    group.bench_function("parse", |b| {
        b.iter(|| {
            for record in &records {
                out.clear();
                let aggregated = deaggregate_into(black_box(record), &mut out).expect("valid");
                assert!(aggregated && out.len() == USER_RECORDS);
            }
        })
    });

    let service = DeaggregateService::new(());
    let shard = records[0].shard_id.clone();
    let batches: Vec<Batch> = records
        .chunks(BATCH_AGGREGATES)
        .map(|chunk| Batch::new(shard.clone(), chunk.to_vec()))
        .collect();
    group.bench_function("layer", |b| {
        b.iter_batched(
            || batches.clone(),
            |batches| {
                // Each expanded batch is dropped once counted, as after a handler.
                let mut total = 0;
                for batch in batches {
                    total += service.expand(batch).expect("valid").records.len();
                }
                assert_eq!(total, AGGREGATES * USER_RECORDS);
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, deaggregate);
criterion_main!(benches);
