//! Against a local Kinesis emulator (ferrokinesis, embedded in the bench on 127.0.0.1):
//!
//! - throughput: records/s read by `Consumer::run` (CheckpointLayer with MemoryStore, no-op
//!   handler) next to a bare aws-sdk-kinesis GetRecords loop per shard over the same stream,
//!   measured in the same run;
//! - latency: from PutRecord to the handler, with the default polling settings.
//!
//! `cargo bench --bench emulator`

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::Client;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kinesis_tower::store::MemoryStore;
use kinesis_tower::{Batch, BoxError};
use kinesis_tower::{Consumer, StartPosition};
use tokio_util::sync::CancellationToken;
use tower::service_fn;

const SHARDS: usize = 4;
const RECORDS: usize = 200_000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Every record through the consumer.
async fn through_run(client: &Client, stream: &str, total: u64) {
    let consumer = Consumer::builder()
        .client(client.clone())
        .stream_name(stream)
        .start_position(StartPosition::TrimHorizon)
        .store(MemoryStore::new())
        .min_get_records_interval(Duration::ZERO)
        .read_bytes_per_second(u64::MAX)
        .build()
        .expect("valid configuration");
    support::run_until_handled(&consumer, total).await;
}

fn emulator(c: &mut Criterion) {
    let rt = runtime();
    let kinesis = rt.block_on(common::start_ferrokinesis());
    let client = kinesis.client.clone();
    let stream = common::unique_stream_name("bench");
    rt.block_on(async {
        common::create_stream(&client, &stream, SHARDS as i32).await;
        let records: Vec<(String, Vec<u8>)> = (0..RECORDS)
            .map(|i| (format!("key-{}", i % 97), vec![b'x'; 100]))
            .collect();
        common::put_records(&client, &stream, &records).await;
    });

    let mut group = c.benchmark_group("emulator");
    group.sample_size(10);
    group.throughput(Throughput::Elements(RECORDS as u64));
    group.bench_function("bare_sdk_get_records", |b| {
        b.iter(|| {
            assert_eq!(
                rt.block_on(common::bare_sdk_loop(&client, &stream)),
                RECORDS as u64
            )
        })
    });
    group.bench_function("run_checkpoint_noop", |b| {
        b.iter(|| rt.block_on(through_run(&client, &stream, RECORDS as u64)))
    });
    group.finish();

    // Put-to-handler latency with the default polling settings, on a consumer already running.
    let (tx, rx) = std::sync::mpsc::channel::<Instant>();
    let stop = CancellationToken::new();
    let latency_stream = common::unique_stream_name("latency");
    rt.block_on(common::create_stream(&client, &latency_stream, 1));
    let consumer = Consumer::builder()
        .client(client.clone())
        .stream_name(&latency_stream)
        .build()
        .expect("valid configuration");
    let handler = service_fn(move |batch: Batch| {
        if !batch.is_empty() {
            let _ = tx.send(Instant::now());
        }
        std::future::ready(Ok::<_, BoxError>(()))
    });
    let run = rt.spawn(consumer.run_until(handler, stop.clone().cancelled_owned()));
    // Let the reader open its LATEST iterator before the first put.
    std::thread::sleep(Duration::from_secs(1));
    let mut group = c.benchmark_group("emulator_latency");
    group.sample_size(10);
    group.sampling_mode(criterion::SamplingMode::Flat);
    group.measurement_time(Duration::from_secs(20));
    let mut latencies = Vec::new();
    group.bench_function("put_to_handler_default_polling", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // A fresh start in the poll cycle each time: uniform over the interval.
                std::thread::sleep(Duration::from_millis(fastrand::u64(0..200)));
                let put_at = Instant::now();
                rt.block_on(async {
                    client
                        .put_record()
                        .stream_name(&latency_stream)
                        .partition_key("k")
                        .data(Blob::new(b"ping".to_vec()))
                        .send()
                        .await
                        .expect("put");
                });
                let handled_at = rx.recv_timeout(Duration::from_secs(10)).expect("handled");
                total += handled_at - put_at;
                latencies.push(handled_at - put_at);
            }
            total
        })
    });
    group.finish();
    // Criterion reports means of samples; these are the individual puts (none when a
    // filter skipped the latency bench).
    if !latencies.is_empty() {
        latencies.sort();
        let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
        println!(
            "put-to-handler latency over {} puts: p50 {:?}, p90 {:?}, p99 {:?}",
            latencies.len(),
            at(0.5),
            at(0.9),
            at(0.99)
        );
    }
    stop.cancel();
    rt.block_on(async {
        run.await.expect("run task").expect("run succeeds");
        common::delete_stream(&client, &latency_stream).await;
        common::delete_stream(&client, &stream).await;
    });
}

criterion_group!(benches, emulator);
criterion_main!(benches);
