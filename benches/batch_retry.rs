//! The cost of BatchLayer and RetryLayer per record, on one core (current-thread runtime).
//!
//! 100,000 records of 100 bytes, delivered as 100 reader-sized batches of 1,000 records of one
//! shard, go through:
//! - `baseline`: a no-op handler called with each batch (the clone of the batch included);
//! - `batch`: `BatchLayer` (100 records per batch, the default) → no-op, so 1,000 handler calls;
//! - `batch_checkpoint`: `BatchLayer` → `CheckpointLayer` (MemoryStore) → no-op;
//! - `batch_checkpoint_retry`: `BatchLayer` → `CheckpointLayer` → `RetryLayer` → no-op, the
//!   recommended stack without metrics and deaggregation. `RetryLayer` clones each batch
//!   before its first attempt (it must keep a copy to retry with): one clone per record.
//!
//! Compare the three in the same run: `cargo bench --bench batch_retry`

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kinesis_tower::batch::BatchLayer;
use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::retry::RetryLayer;
use kinesis_tower::store::MemoryStore;
use kinesis_tower::{Batch, BoxError, Checkpointer, Record, SequenceNumber, ShardId};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

const BATCHES: usize = 100;
const PER_BATCH: usize = 1_000;

fn batches() -> Vec<Batch> {
    let shard = ShardId::from("shardId-000000000000");
    let data = Bytes::from(vec![b'x'; 100]);
    let key: kinesis_tower::PartitionKey = "pk".into();
    (0..BATCHES)
        .map(|b| {
            let records = (0..PER_BATCH)
                .map(|i| Record {
                    shard_id: shard.clone(),
                    sequence_number: SequenceNumber::from((b * PER_BATCH + i + 1) as u64),
                    sub_sequence_number: None,
                    partition_key: key.clone(),
                    explicit_hash_key: None,
                    data: data.clone(),
                    approximate_arrival_timestamp: None,
                })
                .collect();
            Batch::new(shard.clone(), records)
        })
        .collect()
}

async fn drive<S>(svc: &mut S, input: &[Batch])
where
    S: Service<Batch>,
    S::Error: std::fmt::Debug,
{
    for batch in input {
        let response = svc
            .ready()
            .await
            .unwrap()
            .call(batch.clone())
            .await
            .unwrap();
        black_box(response);
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let input = batches();
    let noop = || service_fn(|b: Batch| async move { Ok::<_, BoxError>(black_box(b.len())) });
    let mut group = c.benchmark_group("layers");
    group.throughput(Throughput::Elements((BATCHES * PER_BATCH) as u64));
    group.bench_function(BenchmarkId::from_parameter("baseline"), |b| {
        let mut svc = noop();
        b.iter(|| rt.block_on(drive(&mut svc, &input)));
    });
    group.bench_function(BenchmarkId::from_parameter("batch"), |b| {
        let mut svc = tower::Layer::layer(&BatchLayer::new(), noop());
        b.iter(|| rt.block_on(drive(&mut svc, &input)));
    });
    group.bench_function(BenchmarkId::from_parameter("batch_checkpoint"), |b| {
        let checkpointer = Checkpointer::new(MemoryStore::new(), "bench");
        let noop_unit = service_fn(|b: Batch| async move {
            black_box(b.len());
            Ok::<_, BoxError>(())
        });
        let mut svc = ServiceBuilder::new()
            .layer(BatchLayer::new())
            .layer(CheckpointLayer::new(checkpointer))
            .service(noop_unit);
        b.iter(|| rt.block_on(drive(&mut svc, &input)));
    });
    group.bench_function(BenchmarkId::from_parameter("batch_checkpoint_retry"), |b| {
        let checkpointer = Checkpointer::new(MemoryStore::new(), "bench");
        let noop_unit = service_fn(|b: Batch| async move {
            black_box(b.len());
            Ok::<_, BoxError>(())
        });
        let mut svc = ServiceBuilder::new()
            .layer(BatchLayer::new())
            .layer(CheckpointLayer::new(checkpointer))
            .layer(RetryLayer::new())
            .service(noop_unit);
        b.iter(|| rt.block_on(drive(&mut svc, &input)));
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
