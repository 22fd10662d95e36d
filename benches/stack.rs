//! Records/s through the full recommended stack, on one core (current-thread runtime), over
//! the in-memory Kinesis, for 1 and 64 shards:
//!
//! `MetricsLayer` → `BatchLayer` (100 records) → `CheckpointLayer` (`MemoryStore`) →
//! `RetryLayer` → `DeaggregateLayer` → a no-op handler, driven by `Consumer::run_until`.
//!
//! No `metrics` recorder is installed: the facade's default no-op recorder, so the figures are
//! the layers' own cost, not an exporter's.
//!
//! In the same run, so that the figures compare as ratios:
//! - `baseline_get_records`: a bare loop of GetRecords calls on the same source (what the
//!   records cost to produce before any consumer work), as in the `pipeline` bench;
//! - `run_checkpoint_only`: `run` with only `CheckpointLayer` over the no-op handler (the
//!   `pipeline` bench's configuration).
//!
//! Two sources: `plain`, records of 100 bytes (1,000,000 with one shard, 15,600 per shard with
//! 64 so that every shard's records make whole batches of 100); `kpl`, KPL aggregates of 100
//! user records of 100 bytes built with `Aggregator` (10,000 aggregates with one shard, 160
//! per shard with 64), where the figures count user records.
//!
//! `GLIBC_TUNABLES=glibc.malloc.trim_threshold=268435456:glibc.malloc.mmap_threshold=33554432 cargo bench --bench stack --features test-util`
//!
//! The tunables keep glibc's `malloc` from adapting its thresholds to what the earlier benches
//! of the process freed: without them, the figures depend on the order the benches run in (the
//! bare loop first leaves the allocator giving the heap back to the system after every page and
//! faulting it in again, and the consumers run 2 to 3 times slower). See the README.

mod support;

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kinesis_tower::batch::BatchLayer;
use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::kinesis::memory::{shard_name, MemoryKinesis};
use kinesis_tower::kpl::{Aggregator, DeaggregateLayer};
use kinesis_tower::metrics::MetricsLayer;
use kinesis_tower::retry::RetryLayer;
use kinesis_tower::testing::STREAM;
use support::memory::{bare_get_records, consumer, runtime};
use tower::ServiceBuilder;

const RECORD_BYTES: usize = 100;
const USER_RECORDS_PER_AGGREGATE: usize = 100;
/// BatchLayer's `max_wait`; heartbeats come at half of it, as its docs advise.
const MAX_WAIT: Duration = Duration::from_millis(100);

/// What the shards hold.
#[derive(Clone, Copy, Debug)]
enum Source {
    /// Plain records of 100 bytes.
    Plain,
    /// KPL aggregates of 100 user records of 100 bytes.
    Kpl,
}

/// A filled in-memory Kinesis; returns it with the number of Kinesis records and of records a
/// handler sees (user records for aggregates).
fn source(source: Source, shards: usize) -> (MemoryKinesis, u64, u64) {
    let kinesis = MemoryKinesis::with_shards(shards);
    match source {
        Source::Plain => {
            // Whole batches of 100 per shard: 1,000,000 or 64 × 15,600.
            let per_shard = 1_000_000 / shards / 100 * 100;
            kinesis.fill(per_shard, RECORD_BYTES);
            let total = (per_shard * shards) as u64;
            (kinesis, total, total)
        }
        Source::Kpl => {
            // 10,000 aggregates or 64 × 200: whole batches of 100 aggregates per shard, so
            // that no run ends waiting for BatchLayer's time limit.
            let per_shard = if shards == 1 { 10_000 } else { 200 };
            let mut aggregator = Aggregator::new();
            let data = vec![b'x'; RECORD_BYTES];
            for a in 0..per_shard {
                for u in 0..USER_RECORDS_PER_AGGREGATE {
                    let key = format!("pk-{}", (a * USER_RECORDS_PER_AGGREGATE + u) % 64);
                    let full = aggregator.add(&key, None, data.clone()).expect("fits");
                    assert!(full.is_none(), "100 user records fit one aggregate");
                }
                let aggregate = aggregator.finish().expect("not empty");
                for shard in 0..shards {
                    kinesis.put(
                        &shard_name(shard),
                        &aggregate.partition_key,
                        aggregate.data.clone(),
                    );
                }
            }
            let kinesis_records = (per_shard * shards) as u64;
            (
                kinesis,
                kinesis_records,
                kinesis_records * USER_RECORDS_PER_AGGREGATE as u64,
            )
        }
    }
}

/// `run` with the full stack.
async fn full_stack(kinesis: &MemoryKinesis, total: u64) -> Duration {
    let consumer = consumer(kinesis, |builder| builder.heartbeat_interval(MAX_WAIT / 2));
    let start = Instant::now();
    support::run_stack_until_handled(&consumer, total, |checkpointer, handler| {
        ServiceBuilder::new()
            .layer(MetricsLayer::new(STREAM))
            .layer(BatchLayer::new().max_records(100).max_wait(MAX_WAIT))
            .layer(CheckpointLayer::new(checkpointer))
            .layer(RetryLayer::new())
            .layer(DeaggregateLayer::new())
            .service(handler)
    })
    .await;
    start.elapsed()
}

/// `run` with only `CheckpointLayer` (the `pipeline` bench's configuration).
async fn checkpoint_only(kinesis: &MemoryKinesis, total: u64) -> Duration {
    let consumer = consumer(kinesis, |builder| builder);
    let start = Instant::now();
    support::run_until_handled(&consumer, total).await;
    start.elapsed()
}

fn stack(c: &mut Criterion) {
    let rt = runtime();
    for (group_name, kind) in [("stack_plain", Source::Plain), ("stack_kpl", Source::Kpl)] {
        let mut group = c.benchmark_group(group_name);
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(10));
        for shards in [1usize, 64] {
            let (kinesis, kinesis_records, handled) = source(kind, shards);
            group.throughput(Throughput::Elements(handled));
            group.bench_with_input(
                BenchmarkId::new("baseline_get_records", shards),
                &shards,
                |b, _| {
                    b.iter_custom(|iters| {
                        (0..iters)
                            .map(|_| {
                                rt.block_on(bare_get_records(&kinesis, shards, kinesis_records))
                            })
                            .sum()
                    })
                },
            );
            if let Source::Plain = kind {
                // Without DeaggregateLayer the handler would see aggregates: plain only.
                group.bench_with_input(
                    BenchmarkId::new("run_checkpoint_only", shards),
                    &shards,
                    |b, _| {
                        b.iter_custom(|iters| {
                            (0..iters)
                                .map(|_| rt.block_on(checkpoint_only(&kinesis, handled)))
                                .sum()
                        })
                    },
                );
            }
            group.bench_with_input(
                BenchmarkId::new("run_full_stack", shards),
                &shards,
                |b, _| {
                    b.iter_custom(|iters| {
                        (0..iters)
                            .map(|_| rt.block_on(full_stack(&kinesis, handled)))
                            .sum()
                    })
                },
            );
        }
        group.finish();
    }
}

criterion_group!(benches, stack);
criterion_main!(benches);
