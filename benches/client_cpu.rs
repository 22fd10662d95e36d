//! Client CPU per record, each consumer in its own process, the emulator in another: the
//! floor (a bare aws-sdk-kinesis GetRecords loop, one task per shard) and the library's ways to
//! read, measured in the same run, interleaved, medians of the rounds.
//!
//! The bench binary plays three roles: the parent (this text) starts the emulator (the
//! embedded ferrokinesis, in a child process of its own on 127.0.0.1), puts the records, then
//! starts one consumer process per variant and round; each consumer reads every record from
//! `TRIM_HORIZON` (by polling; `run_checkpoint_fan_out` through enhanced fan-out) and reports
//! the CPU (user + system, from `/proc/self/stat`) it spent from
//! just before its first call to the last record, and its peak RSS (`VmHWM`).
//!
//! `cargo bench --bench client_cpu --features test-util` (`RECORDS`, default 1,000,000 of
//! 100 B over 4 shards; `ROUNDS`, default 5). With `PROFILE=<variant>` it runs that one
//! consumer under `perf record -g` instead and says where the profile is.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use kinesis_tower::batch::BatchLayer;
use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::kpl::DeaggregateLayer;
use kinesis_tower::retry::RetryLayer;
use kinesis_tower::store::MemoryStore;
use kinesis_tower::{Consumer, ConsumerBuilder, StartPosition};
use tower::ServiceBuilder;

const SHARDS: i32 = 4;
const VARIANTS: [&str; 5] = [
    "bare_sdk_loop",
    "run_checkpoint",
    "run_checkpoint_fan_out",
    "records_chunks",
    "full_stack",
];

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time (user + system) of this process so far, from `/proc/self/stat` (clock ticks of
/// 10 ms).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat[stat.rfind(')').expect("stat format") + 2..]
        .split(' ')
        .collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// Peak resident set of this process, in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn main() {
    match std::env::var("KT_ROLE").as_deref() {
        Ok("emulator") => emulator(),
        Ok("consumer") => consumer(),
        // `cargo bench` passes `--bench`; any other argument (a filter) is ignored.
        _ => parent(),
    }
}

/// Serves the embedded emulator on 127.0.0.1 and prints its endpoint; runs until killed.
fn emulator() {
    runtime().block_on(async {
        let kinesis = common::start_ferrokinesis().await;
        println!("{}", kinesis.endpoint);
        std::io::stdout().flush().unwrap();
        std::future::pending::<()>().await;
    });
}

/// Reads every record with `KT_VARIANT`, prints `cpu_us <n> rss_kib <n>`.
fn consumer() {
    let endpoint = std::env::var("KT_ENDPOINT").unwrap();
    let stream = std::env::var("KT_STREAM").unwrap();
    let variant = std::env::var("KT_VARIANT").unwrap();
    let records = env_or("RECORDS", 1_000_000);
    let spent = runtime().block_on(async {
        let client = common::kinesis_client(&endpoint).await;
        let builder_with = |configure: fn(ConsumerBuilder) -> ConsumerBuilder| {
            configure(Consumer::builder())
                .client(client.clone())
                .stream_name(&stream)
                .start_position(StartPosition::TrimHorizon)
                .store(MemoryStore::new())
                .min_get_records_interval(Duration::ZERO)
                .read_bytes_per_second(u64::MAX)
                .heartbeat_interval(Duration::from_millis(50))
                .build()
                .expect("valid configuration")
        };
        let builder = || builder_with(|b| b);
        let start = cpu_time();
        match variant.as_str() {
            "bare_sdk_loop" => assert_eq!(common::bare_sdk_loop(&client, &stream).await, records),
            "run_checkpoint" => support::run_until_handled(&builder(), records).await,
            "run_checkpoint_fan_out" => {
                let consumer = builder_with(|b| b.enhanced_fan_out("client-cpu"));
                support::run_until_handled(&consumer, records).await
            }
            "records_chunks" => {
                let stream_of_records = builder().records();
                let (checkpointer, stop) = (
                    stream_of_records.checkpointer(),
                    stream_of_records.shutdown_handle(),
                );
                let mut chunks = std::pin::pin!(tokio_stream::StreamExt::chunks_timeout(
                    stream_of_records,
                    500,
                    Duration::from_secs(2)
                ));
                let mut read = 0;
                while read < records {
                    let chunk = chunks.next().await.expect("records until all are read");
                    read += chunk.len() as u64;
                    checkpointer.commit_all(&chunk).await.expect("commit");
                }
                stop.shutdown().await.expect("clean stop");
            }
            "full_stack" => {
                support::run_stack_until_handled(&builder(), records, |checkpointer, handler| {
                    ServiceBuilder::new()
                        .layer(BatchLayer::new().max_records(100))
                        .layer(CheckpointLayer::new(checkpointer))
                        .layer(RetryLayer::new())
                        .layer(DeaggregateLayer::new())
                        .service(handler)
                })
                .await
            }
            other => panic!("unknown variant {other}"),
        }
        cpu_time() - start
    });
    println!("cpu_us {} rss_kib {}", spent.as_micros(), peak_rss_kib());
}

fn parent() {
    let records = env_or("RECORDS", 1_000_000);
    let rounds = env_or("ROUNDS", 5);
    let exe = std::env::current_exe().expect("current_exe");
    let mut emulator = Command::new(&exe)
        .env("KT_ROLE", "emulator")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the emulator process");
    let mut endpoint = String::new();
    BufReader::new(emulator.stdout.take().unwrap())
        .read_line(&mut endpoint)
        .expect("the emulator's endpoint");
    let endpoint = endpoint.trim().to_owned();
    let stream = common::unique_stream_name("client-cpu");
    runtime().block_on(async {
        let client = common::kinesis_client(&endpoint).await;
        common::create_stream(&client, &stream, SHARDS).await;
        let data: Vec<(String, Vec<u8>)> = (0..records)
            .map(|i| (format!("key-{}", i % 97), vec![b'x'; 100]))
            .collect();
        common::put_records(&client, &stream, &data).await;
    });

    if let Ok(variant) = std::env::var("PROFILE") {
        // One consumer of that variant under `perf record`, instead of the rounds.
        let data = format!("/tmp/client_cpu-{variant}.perf.data");
        let status = Command::new("perf")
            .args(["record", "-F", "999", "-g", "-o", &data, "--"])
            .arg(&exe)
            .env("KT_ROLE", "consumer")
            .env("KT_VARIANT", &variant)
            .env("KT_ENDPOINT", &endpoint)
            .env("KT_STREAM", &stream)
            .env("RECORDS", records.to_string())
            .status()
            .expect("run perf record (is perf installed?)");
        let _ = emulator.kill();
        let _ = emulator.wait();
        assert!(status.success(), "perf record failed");
        println!("profile of {variant} in {data}: perf report -i {data} --no-children");
        return;
    }

    let mut results: Vec<Vec<(f64, u64)>> = vec![Vec::new(); VARIANTS.len()];
    for round in 0..rounds {
        for (i, variant) in VARIANTS.iter().enumerate() {
            let out = Command::new(&exe)
                .env("KT_ROLE", "consumer")
                .env("KT_VARIANT", variant)
                .env("KT_ENDPOINT", &endpoint)
                .env("KT_STREAM", &stream)
                .env("RECORDS", records.to_string())
                .output()
                .expect("run a consumer process");
            assert!(
                out.status.success(),
                "{variant}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let line = String::from_utf8_lossy(&out.stdout);
            let mut parts = line.split_whitespace();
            let (_, cpu_us, _, rss) = (parts.next(), parts.next(), parts.next(), parts.next());
            let cpu_us: f64 = cpu_us.expect("cpu_us").parse().unwrap();
            let rss: u64 = rss.expect("rss").parse().unwrap();
            results[i].push((cpu_us * 1000.0 / records as f64, rss));
            eprintln!(
                "round {round} {variant}: {:.0} ns/record, peak RSS {} MiB",
                cpu_us * 1000.0 / records as f64,
                rss / 1024
            );
        }
    }
    let _ = emulator.kill();
    let _ = emulator.wait();

    let median = |values: &mut Vec<f64>| {
        values.sort_by(|a, b| a.total_cmp(b));
        values[values.len() / 2]
    };
    let medians: Vec<(f64, u64)> = results
        .iter()
        .map(|r| {
            let mut cpu: Vec<f64> = r.iter().map(|(c, _)| *c).collect();
            let mut rss: Vec<f64> = r.iter().map(|(_, m)| *m as f64).collect();
            (median(&mut cpu), median(&mut rss) as u64)
        })
        .collect();
    println!(
        "client_cpu: {records} records of 100 B over {SHARDS} shards, emulator in its own process, medians of {rounds} interleaved rounds"
    );
    println!("| consumer | client CPU per record | ratio to the bare loop | peak RSS |");
    println!("|---|---|---|---|");
    for (variant, (cpu, rss)) in VARIANTS.iter().zip(&medians) {
        println!(
            "| {variant} | {:.2} µs | {:.2}x | {} MiB |",
            cpu / 1000.0,
            cpu / medians[0].0,
            rss / 1024
        );
    }
}
