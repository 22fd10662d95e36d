//! Put-to-handler latency, polling (default settings) against enhanced fan-out, in one run on
//! one emulator: a producer puts one record every 20 ms on a one-shard stream for `SECONDS`
//! (default 20); two consumers of the stream, one polling and one reading through fan-out, run
//! at the same time, each timing every record from just before its PutRecord call to its
//! handler. Prints p50, p90 and p99 of each, and their ratio.
//!
//! `cargo bench --bench latency --features test-util` runs it on three sources, one after the
//! other: the embedded ferrokinesis (it pushes new records to subscribers every 200 ms), the
//! in-memory Kinesis (its subscriptions look for new records every 5 ms, so what is measured
//! there is the readers' own latency), and kinesis-mock at 127.0.0.1:4570 when it runs (it
//! looks for new records once a second). `KT_EMULATOR=ferrokinesis|memory|kinesis-mock` runs
//! one.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kinesis_tower::kinesis::memory::{shard_name, MemoryKinesis};
use kinesis_tower::{
    service_fn, Batch, BoxError, Consumer, ConsumerBuilder, EnhancedFanOut, StartPosition,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// When each record (named by its data) was put.
type PutTimes = Arc<Mutex<HashMap<Vec<u8>, Instant>>>;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

/// Where the records go and come from.
enum Source {
    Ferrokinesis(Box<common::EmbeddedKinesis>),
    KinesisMock(aws_sdk_kinesis::Client),
    Memory(MemoryKinesis),
}

impl Source {
    fn name(&self) -> &'static str {
        match self {
            Source::Ferrokinesis(_) => "ferrokinesis (embedded)",
            Source::KinesisMock(_) => "kinesis-mock",
            Source::Memory(_) => "the in-memory Kinesis",
        }
    }

    fn builder(&self) -> ConsumerBuilder {
        match self {
            Source::Ferrokinesis(kinesis) => Consumer::builder().client(kinesis.client.clone()),
            Source::KinesisMock(client) => Consumer::builder().client(client.clone()),
            Source::Memory(kinesis) => Consumer::builder().kinesis_api(Arc::new(kinesis.clone())),
        }
    }

    async fn create_stream(&self, stream: &str) {
        match self {
            Source::Ferrokinesis(kinesis) => {
                common::create_stream(&kinesis.client, stream, 1).await
            }
            Source::KinesisMock(client) => common::create_stream(client, stream, 1).await,
            Source::Memory(_) => {}
        }
    }

    async fn put(&self, stream: &str, data: Vec<u8>) {
        let client = match self {
            Source::Ferrokinesis(kinesis) => &kinesis.client,
            Source::KinesisMock(client) => client,
            Source::Memory(kinesis) => {
                kinesis.put(&shard_name(0), "k", data);
                return;
            }
        };
        client
            .put_record()
            .stream_name(stream)
            .partition_key("k")
            .data(data.into())
            .send()
            .await
            .expect("PutRecord");
    }

    async fn delete_stream(&self, stream: &str) {
        match self {
            Source::Ferrokinesis(kinesis) => common::delete_stream(&kinesis.client, stream).await,
            Source::KinesisMock(client) => common::delete_stream(client, stream).await,
            Source::Memory(_) => {}
        }
    }
}

fn main() {
    let seconds: u64 = std::env::var("SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let only = std::env::var("KT_EMULATOR").ok();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        for name in ["ferrokinesis", "memory", "kinesis-mock"] {
            if only.as_deref().is_some_and(|only| only != name) {
                continue;
            }
            let source = match name {
                "ferrokinesis" => {
                    Source::Ferrokinesis(Box::new(common::start_ferrokinesis().await))
                }
                "memory" => Source::Memory(MemoryKinesis::with_shards(1)),
                _ => {
                    let client = common::kinesis_mock_client().await;
                    if client.list_streams().send().await.is_err() {
                        println!("kinesis-mock is not running on 127.0.0.1:4570: skipped");
                        continue;
                    }
                    Source::KinesisMock(client)
                }
            };
            measure(&source, seconds).await;
        }
    });
}

async fn measure(source: &Source, seconds: u64) {
    let stream = common::unique_stream_name("latency");
    source.create_stream(&stream).await;
    let put_times: PutTimes = Arc::default();
    let stop = CancellationToken::new();
    let mut readers = Vec::new();
    for fan_out in [false, true] {
        let mut builder = source
            .builder()
            .stream_name(&stream)
            .app_name(if fan_out {
                "latency-fan-out"
            } else {
                "latency-polling"
            })
            .start_position(StartPosition::TrimHorizon);
        if fan_out {
            builder = builder.enhanced_fan_out(
                EnhancedFanOut::new("latency-bench").deregister_on_shutdown(true),
            );
        }
        let consumer = builder.build().expect("valid configuration");
        let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let handler = {
            let (put_times, latencies) = (put_times.clone(), latencies.clone());
            service_fn(move |batch: Batch| {
                let now = Instant::now();
                let put_times = put_times.lock().unwrap();
                let mut latencies = latencies.lock().unwrap();
                for record in &batch.records {
                    if let Some(put) = put_times.get(record.data.as_ref()) {
                        latencies.push(now - *put);
                    }
                }
                async { Ok::<_, BoxError>(()) }
            })
        };
        let run = tokio::spawn(consumer.run_until(handler, stop.clone().cancelled_owned()));
        readers.push((fan_out, latencies, run));
    }
    // Both consumers subscribed or polling before the first put.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut n = 0u64;
    while Instant::now() < deadline {
        let data = format!("record-{n}").into_bytes();
        put_times
            .lock()
            .unwrap()
            .insert(data.clone(), Instant::now());
        source.put(&stream, data).await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    println!(
        "latency: {n} records put one every 20 ms on a one-shard stream of {}; put-to-handler",
        source.name()
    );
    println!("| reader | records | p50 | p90 | p99 |");
    println!("|---|---|---|---|---|");
    let mut p50s = Vec::new();
    for (fan_out, latencies, run) in readers {
        run.await.expect("the run task").expect("a clean run");
        let mut latencies = latencies.lock().unwrap().clone();
        latencies.sort();
        let name = if fan_out {
            "enhanced fan-out"
        } else {
            "polling (defaults)"
        };
        let (p50, p90, p99) = (
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.90),
            percentile(&latencies, 0.99),
        );
        p50s.push(p50);
        println!(
            "| {name} | {} | {:.0} ms | {:.0} ms | {:.0} ms |",
            latencies.len(),
            p50.as_secs_f64() * 1e3,
            p90.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
    }
    println!(
        "fan-out p50 / polling p50: {:.2}",
        p50s[1].as_secs_f64() / p50s[0].as_secs_f64()
    );
    source.delete_stream(&stream).await;
}
