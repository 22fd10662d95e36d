//! The cost of `MetricsLayer` per call: the same service called bare and under the layer, on
//! one core, with batches of 1 and 100 records spread over 1 and 64 shards, in the same run.
//! The layer is measured with no recorder installed (the `metrics` no-op) and with the
//! Prometheus recorder (atomic counters and bucketed histograms), so the figures show what the
//! shard lookup, clock reads and atomic updates cost next to a service that does nothing.
//!
//! The inner service hands the batch back, so no iteration allocates: the figures are the
//! layer's own.
//!
//! `cargo bench --bench metrics_layer`

use std::future::Ready;
use std::task::{Context, Poll};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures::FutureExt;
use kinesis_tower::metrics::MetricsLayer;
use kinesis_tower::Batch;
use kinesis_tower::{Record, SequenceNumber, ShardId};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tower::{Layer, Service};

/// Returns the batch it was given: the cheapest service there is.
#[derive(Clone)]
struct Echo;

impl Service<Batch> for Echo {
    type Response = Batch;
    type Error = std::convert::Infallible;
    type Future = Ready<Result<Batch, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, batch: Batch) -> Self::Future {
        std::future::ready(Ok(batch))
    }
}

fn batches(shards: usize, records: usize) -> Vec<Batch> {
    (0..shards)
        .map(|s| {
            let shard = ShardId::from(format!("shardId-{s:012}"));
            let records = (0..records)
                .map(|i| Record {
                    shard_id: shard.clone(),
                    sequence_number: SequenceNumber::from(i as u64 + 1),
                    sub_sequence_number: None,
                    partition_key: "pk".into(),
                    explicit_hash_key: None,
                    data: Bytes::from_static(&[0; 100]),
                    approximate_arrival_timestamp: None,
                })
                .collect();
            Batch::new(shard, records)
        })
        .collect()
}

/// Calls `service` with each batch in turn (round robin over the shards), `iters` calls.
fn drive<S>(service: &mut S, batches: &mut [Option<Batch>], iters: u64)
where
    S: Service<Batch, Response = Batch, Error = std::convert::Infallible>,
{
    let n = batches.len();
    for i in 0..iters as usize {
        let slot = &mut batches[i % n];
        let batch = slot.take().expect("batch");
        let back = service
            .call(batch)
            .now_or_never()
            .expect("ready at once")
            .expect("infallible");
        *slot = Some(back);
    }
}

fn bench(c: &mut Criterion) {
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &[0.001, 0.01, 0.1, 1.0])
        .expect("buckets")
        .build_recorder();
    // The recorder keeps histogram samples until upkeep folds them into buckets (the exporter
    // does it every few seconds): done after each measurement, outside the timed part.
    let handle = prometheus.handle();
    for records in [1, 100] {
        let mut group = c.benchmark_group(format!("metrics_layer/{records}_records_per_call"));
        group.throughput(Throughput::Elements(1));
        for shards in [1, 64] {
            let mut input: Vec<Option<Batch>> =
                batches(shards, records).into_iter().map(Some).collect();
            group.bench_with_input(BenchmarkId::new("bare", shards), &shards, |b, _| {
                let mut service = Echo;
                b.iter_custom(|iters| {
                    let start = std::time::Instant::now();
                    drive(&mut service, &mut input, iters);
                    start.elapsed()
                })
            });
            group.bench_with_input(BenchmarkId::new("no_recorder", shards), &shards, |b, _| {
                let mut service = MetricsLayer::new("bench").layer(Echo);
                b.iter_custom(|iters| {
                    let start = std::time::Instant::now();
                    drive(&mut service, &mut input, iters);
                    start.elapsed()
                })
            });
            group.bench_with_input(BenchmarkId::new("prometheus", shards), &shards, |b, _| {
                // Handles are registered with the recorder current at a shard's first call.
                let mut service = MetricsLayer::new("bench").layer(Echo);
                metrics::with_local_recorder(&prometheus, || {
                    drive(&mut service, &mut input, shards as u64)
                });
                b.iter_custom(|iters| {
                    let start = std::time::Instant::now();
                    drive(&mut service, &mut input, iters);
                    let elapsed = start.elapsed();
                    handle.run_upkeep();
                    elapsed
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
