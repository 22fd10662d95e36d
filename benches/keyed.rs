//! `KeyedConcurrencyLayer`: what it gains with a slow handler, and what it costs with a fast one.
//!
//! 1. A per-record handler that sleeps 10 ms per call (`PerRecordLayer` over it: one call per
//!    record), 1 shard of the in-memory Kinesis, 10,000 records over 100 partition keys (keys
//!    drawn at random, fixed seed), `run_until` with `CheckpointLayer` (`MemoryStore`) on one
//!    core: records/s of the plain stack (serial: one record after the other) next to the
//!    stack with `KeyedConcurrencyLayer` at 16 and 64 calls in flight, for batches of 100 and
//!    1,000 records (`max_records_per_call`). Timed once each (the sleeps dominate; the serial
//!    run alone takes about 100 s); printed as records/s and as the ratio to serial.
//! 2. The layer's own cost per record: the same 10,000 records in 100 batches of 100, handed
//!    one batch after the other (as the consumer does for one shard) to `CheckpointLayer` →
//!    [`KeyedConcurrencyLayer` (64)] → a no-op handler, per record (`PerRecordLayer`) and per
//!    batch, with and without the layer (criterion; throughput in records).
//!
//! `cargo bench --bench keyed --features test-util -- --warm-up-time 1 --measurement-time 5`

mod support;

use std::future::Ready;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use futures::future::BoxFuture;
use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::keyed::KeyedConcurrencyLayer;
use kinesis_tower::kinesis::memory::{shard_name, MemoryKinesis};
use kinesis_tower::per_record::PerRecordLayer;
use kinesis_tower::store::MemoryStore;
use kinesis_tower::{Batch, BoxError, Checkpointer, Processed, Record};
use support::memory::{consumer, runtime};
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceBuilder, ServiceExt};

const RECORDS: usize = 10_000;
const KEYS: usize = 100;
const RECORD_BYTES: usize = 100;
const WORK: Duration = Duration::from_millis(10);

fn keys() -> Vec<String> {
    let mut rng = fastrand::Rng::with_seed(14);
    (0..RECORDS)
        .map(|_| format!("key-{:03}", rng.usize(..KEYS)))
        .collect()
}

/// A per-record handler that sleeps `WORK` and counts; cancels `done` at `total`.
#[derive(Clone)]
struct Sleeper {
    handled: Arc<AtomicU64>,
    total: u64,
    done: CancellationToken,
}

impl Service<Record> for Sleeper {
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<(), BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _record: Record) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            tokio::time::sleep(WORK).await;
            if this.handled.fetch_add(1, Ordering::Relaxed) + 1 >= this.total {
                this.done.cancel();
            }
            Ok(())
        })
    }
}

/// `run_until` over one shard of `RECORDS` records until all were handled; `keyed`: the layer's
/// max in flight, or none.
async fn sleeping(keys: &[String], keyed: Option<usize>, per_call: usize) -> Duration {
    let kinesis = MemoryKinesis::with_shards(1);
    let data = vec![b'x'; RECORD_BYTES];
    for key in keys {
        kinesis.put(&shard_name(0), key, data.clone());
    }
    let consumer = consumer(&kinesis, |builder| builder.max_records_per_call(per_call));
    let done = CancellationToken::new();
    let handler = Sleeper {
        handled: Arc::default(),
        total: keys.len() as u64,
        done: done.clone(),
    };
    let handled = handler.handled.clone();
    let service = ServiceBuilder::new()
        .layer(CheckpointLayer::new(consumer.checkpointer()))
        .option_layer(keyed.map(|max| KeyedConcurrencyLayer::new().max_in_flight(max)))
        .layer(PerRecordLayer::new())
        .service(handler);
    let start = Instant::now();
    consumer
        .run_until(service, done.cancelled_owned())
        .await
        .expect("run succeeds");
    let elapsed = start.elapsed();
    assert_eq!(handled.load(Ordering::Relaxed), keys.len() as u64);
    elapsed
}

fn slow_handler_figures(keys: &[String]) {
    let rt = runtime();
    let rate = |d: Duration| RECORDS as f64 / d.as_secs_f64();
    let serial = rate(rt.block_on(sleeping(keys, None, 100)));
    println!(
        "keyed/slow_handler: {RECORDS} records, {KEYS} keys, {WORK:?} per record, 1 shard, one core"
    );
    println!("keyed/slow_handler: serial (plain stack): {serial:.0} records/s (1)");
    for per_call in [100, 1_000] {
        for max in [16, 64] {
            let keyed = rate(rt.block_on(sleeping(keys, Some(max), per_call)));
            println!(
                "keyed/slow_handler: batches of {per_call}, KeyedConcurrencyLayer {max}: {keyed:.0} records/s ({:.1})",
                keyed / serial
            );
        }
    }
}

/// A no-op per-record handler.
#[derive(Clone, Copy)]
struct NoopRecord;

impl Service<Record> for NoopRecord {
    type Response = ();
    type Error = BoxError;
    type Future = Ready<Result<(), BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, record: Record) -> Self::Future {
        std::hint::black_box(record);
        std::future::ready(Ok(()))
    }
}

/// A no-op batch handler.
#[derive(Clone, Copy)]
struct NoopBatch;

impl Service<Batch> for NoopBatch {
    type Response = ();
    type Error = BoxError;
    type Future = Ready<Result<(), BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, batch: Batch) -> Self::Future {
        std::hint::black_box(batch);
        std::future::ready(Ok(()))
    }
}

/// Hands `batches` to `service` one after the other.
async fn drive<S>(service: &mut S, batches: Vec<Batch>)
where
    S: Service<Batch, Response = Processed, Error = BoxError>,
{
    for batch in batches {
        service
            .ready()
            .await
            .expect("ready")
            .call(batch)
            .await
            .expect("handled");
    }
}

fn layer_cost(c: &mut Criterion, keys: &[String]) {
    let rt = runtime();
    let batches: Vec<Batch> = keys
        .chunks(100)
        .enumerate()
        .map(|(b, chunk)| {
            let records = chunk
                .iter()
                .enumerate()
                .map(|(i, key)| Record {
                    partition_key: key.as_str().into(),
                    data: vec![b'x'; RECORD_BYTES].into(),
                    ..kinesis_tower_layers::testing::record(
                        &shard_name(0),
                        (b * 100 + i + 1) as u64,
                    )
                })
                .collect();
            Batch::new(shard_name(0).into(), records)
        })
        .collect();
    let checkpointer = || Checkpointer::new(MemoryStore::new(), "bench");
    let mut group = c.benchmark_group("keyed_noop");
    group.throughput(Throughput::Elements(RECORDS as u64));
    group.sample_size(20);

    let plain_record = ServiceBuilder::new()
        .layer(CheckpointLayer::new(checkpointer()))
        .layer(PerRecordLayer::new())
        .service(NoopRecord);
    let keyed_record = ServiceBuilder::new()
        .layer(CheckpointLayer::new(checkpointer()))
        .layer(KeyedConcurrencyLayer::new())
        .layer(PerRecordLayer::new())
        .service(NoopRecord);
    let plain_batch = ServiceBuilder::new()
        .layer(CheckpointLayer::new(checkpointer()))
        .service(NoopBatch);
    let keyed_batch = ServiceBuilder::new()
        .layer(CheckpointLayer::new(checkpointer()))
        .layer(KeyedConcurrencyLayer::new())
        .service(NoopBatch);
    let input = || batches.clone();
    group.bench_function(BenchmarkId::new("per_record", "plain"), |b| {
        b.to_async(&rt).iter_batched(
            input,
            |batches| {
                let mut service = plain_record.clone();
                async move { drive(&mut service, batches).await }
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function(BenchmarkId::new("per_record", "keyed_64"), |b| {
        b.to_async(&rt).iter_batched(
            input,
            |batches| {
                let mut service = keyed_record.clone();
                async move { drive(&mut service, batches).await }
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function(BenchmarkId::new("per_batch", "plain"), |b| {
        b.to_async(&rt).iter_batched(
            input,
            |batches| {
                let mut service = plain_batch.clone();
                async move { drive(&mut service, batches).await }
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function(BenchmarkId::new("per_batch", "keyed_64"), |b| {
        b.to_async(&rt).iter_batched(
            input,
            |batches| {
                let mut service = keyed_batch.clone();
                async move { drive(&mut service, batches).await }
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn main() {
    let keys = keys();
    let mut criterion = Criterion::default().configure_from_args();
    layer_cost(&mut criterion, &keys);
    criterion.final_summary();
    // `cargo test --benches` runs benches once as tests: skip the 2-minute part there.
    if std::env::args().any(|a| a == "--bench") {
        slow_handler_figures(&keys);
    }
}
