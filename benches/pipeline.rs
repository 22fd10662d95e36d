//! Records/s through `Consumer::run` over the in-memory Kinesis, with a no-op handler under
//! `CheckpointLayer` and a `MemoryStore`, on one core (current-thread runtime), for 1, 4 and
//! 64 shards. The baseline, measured in the same run, is a bare loop of GetRecords calls on the
//! same in-memory source (what the records cost to produce before any consumer work).
//!
//! Two buffer settings are measured: the defaults (10,000 records per GetRecords, 20,000
//! buffered per shard) and small batches (1,000 per call, 2,000 buffered), which keep the
//! records in flight within the CPU caches.
//!
//! `cargo bench --bench pipeline --features test-util`

mod support;

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kinesis_tower::kinesis::memory::MemoryKinesis;
use support::memory::{bare_get_records, consumer, runtime};

const TOTAL_RECORDS: usize = 1_000_000;
const RECORD_BYTES: usize = 100;

/// Buffer settings under test.
#[derive(Clone, Copy, Debug)]
enum Tuning {
    /// The defaults: 10,000 records per call, 20,000 buffered per shard.
    Defaults,
    /// 1,000 records per call, 2,000 buffered per shard.
    SmallBatches,
}

/// Every record through the consumer: readers, buffers, dispatcher, CheckpointLayer, handler.
async fn through_run(kinesis: &MemoryKinesis, total: u64, tuning: Tuning) -> Duration {
    let consumer = consumer(kinesis, |builder| match tuning {
        Tuning::Defaults => builder,
        // Batches of 1,000 and a 2,000-record buffer per shard keep the working set in cache.
        Tuning::SmallBatches => builder.max_records_per_call(1_000).buffer_records(2_000),
    });
    let start = Instant::now();
    support::run_until_handled(&consumer, total).await;
    start.elapsed()
}

fn pipeline(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("pipeline");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(TOTAL_RECORDS as u64));
    for shards in [1usize, 4, 64] {
        let kinesis = MemoryKinesis::with_shards(shards);
        kinesis.fill(TOTAL_RECORDS / shards, RECORD_BYTES);
        let total = (TOTAL_RECORDS / shards * shards) as u64;
        group.bench_with_input(
            BenchmarkId::new("baseline_get_records", shards),
            &shards,
            |b, _| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| rt.block_on(bare_get_records(&kinesis, shards, total)))
                        .sum()
                })
            },
        );
        for (name, tuning) in [
            ("run_checkpoint_noop_defaults", Tuning::Defaults),
            ("run_checkpoint_noop_1k_batches", Tuning::SmallBatches),
        ] {
            group.bench_with_input(BenchmarkId::new(name, shards), &shards, |b, _| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| rt.block_on(through_run(&kinesis, total, tuning)))
                        .sum()
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
