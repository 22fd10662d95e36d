//! Client CPU per record, each consumer in its own process, the emulator in another: the
//! floor (a bare aws-sdk-kinesis GetRecords loop, one task per shard) and the library's ways to
//! read, measured in the same run, interleaved, medians of the rounds.
//!
//! The bench binary plays three roles: the parent (this text) starts the emulator (the
//! embedded ferrokinesis, in a child process of its own on 127.0.0.1), puts the records, then
//! starts one consumer process per variant and round; each consumer reads every record from
//! `TRIM_HORIZON` (by polling; `run_checkpoint_fan_out` through enhanced fan-out) and reports
//! the CPU (user + system, from `/proc/self/stat`), minor page faults and context switches it
//! spent from just before its first call to the last record, and its peak RSS (`VmHWM`).
//!
//! `cargo bench --bench client_cpu --features test-util` (`RECORDS`, default 1,000,000 of
//! 100 B over 4 shards; `ROUNDS`, default 5). With `PROFILE=<variant>` it runs that one
//! consumer under `perf record -g` instead (`PROFILER=callgrind`: under valgrind's callgrind,
//! instruction counts, repeatable; `PROFILER=strace`: system calls counted; `PROFILER=faults`:
//! where the page faults happen) and says where the profile is.

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

/// What this process has spent so far: CPU time (user and system, from `/proc/self/stat`, clock
/// ticks of 10 ms), minor page faults, and context switches of all its threads.
#[derive(Clone, Copy, Debug, Default)]
struct Spent {
    user: Duration,
    system: Duration,
    faults: u64,
    switches: u64,
}

impl Spent {
    fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
        // Fields after the command name (which is in parentheses and may hold spaces): minflt,
        // utime and stime are fields 10, 14 and 15 of the whole line, 7, 11 and 12 after it.
        let fields: Vec<&str> = stat[stat.rfind(')').expect("stat format") + 2..]
            .split(' ')
            .collect();
        let number = |i: usize| {
            fields[i]
                .parse::<u64>()
                .expect("a number in /proc/self/stat")
        };
        // Of the threads alive now: a thread that ended took its count with it (the runtime's
        // threads live as long as the consumer).
        let mut switches = 0;
        for task in std::fs::read_dir("/proc/self/task").expect("read /proc/self/task") {
            let status = std::fs::read_to_string(task.unwrap().path().join("status"));
            // A thread that ended between the listing and the read has nothing to add.
            for line in status.as_deref().unwrap_or_default().lines() {
                if let Some(n) = line
                    .strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
                {
                    switches += n.trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
        Spent {
            user: Duration::from_millis(number(11) * 10),
            system: Duration::from_millis(number(12) * 10),
            faults: number(7),
            switches,
        }
    }

    fn since(self, start: Spent) -> Spent {
        Spent {
            user: self.user - start.user,
            system: self.system - start.system,
            faults: self.faults - start.faults,
            switches: self.switches.saturating_sub(start.switches),
        }
    }
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

/// Reads every record with `KT_VARIANT`, prints what it spent (`user_us <n> system_us <n>
/// faults <n> switches <n> rss_kib <n>`).
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
        let start = Spent::now();
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
        Spent::now().since(start)
    });
    println!(
        "user_us {} system_us {} faults {} switches {} rss_kib {}",
        spent.user.as_micros(),
        spent.system.as_micros(),
        spent.faults,
        spent.switches,
        peak_rss_kib()
    );
}

/// Makes `command` (this binary, or a profiler running it) a consumer of `variant`.
fn consumer_role<'a>(
    command: &'a mut Command,
    variant: &str,
    endpoint: &str,
    stream: &str,
    records: u64,
) -> &'a mut Command {
    command
        .env("KT_ROLE", "consumer")
        .env("KT_VARIANT", variant)
        .env("KT_ENDPOINT", endpoint)
        .env("KT_STREAM", stream)
        .env("RECORDS", records.to_string())
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
        // One consumer of that variant under a profiler, instead of the rounds: `perf record`
        // by default; `PROFILER=callgrind` counts instructions (repeatable, user space only),
        // `PROFILER=strace` system calls, `PROFILER=faults` records where page faults happen.
        let profiler_name = std::env::var("PROFILER").unwrap_or_else(|_| "perf".to_owned());
        let data = format!("/tmp/client_cpu-{variant}.{profiler_name}.out");
        let (program, args, read_it): (&str, Vec<String>, String) = match profiler_name.as_str() {
            "callgrind" => (
                "valgrind",
                vec![
                    "--tool=callgrind".into(),
                    format!("--callgrind-out-file={data}"),
                ],
                format!("callgrind_annotate {data}"),
            ),
            "strace" => (
                "strace",
                ["-f", "-c", "-o", &data, "--"].map(String::from).into(),
                format!("cat {data}"),
            ),
            "perf" => (
                "perf",
                ["record", "-F", "999", "-g", "-o", &data, "--"]
                    .map(String::from)
                    .into(),
                format!("perf report -i {data} --no-children"),
            ),
            "faults" => (
                "perf",
                [
                    "record",
                    "-e",
                    "page-faults",
                    "--call-graph",
                    "dwarf",
                    "-o",
                    &data,
                    "--",
                ]
                .map(String::from)
                .into(),
                format!("perf report -i {data} --no-children"),
            ),
            other => panic!("PROFILER={other}: perf, faults, callgrind or strace"),
        };
        let mut profiler = Command::new(program);
        profiler.args(args).arg(&exe);
        let status = consumer_role(&mut profiler, &variant, &endpoint, &stream, records)
            .status()
            .expect("run the profiler (is perf, valgrind or strace installed?)");
        let _ = emulator.kill();
        let _ = emulator.wait();
        assert!(status.success(), "the profiler failed");
        println!("profile of {variant} in {data}: {read_it}");
        return;
    }

    // Per variant, per round: [CPU, user, system (ns per record), faults and switches per
    // 1,000 records, peak RSS (KiB)].
    let mut results: Vec<Vec<[f64; 6]>> = vec![Vec::new(); VARIANTS.len()];
    for round in 0..rounds {
        for (i, variant) in VARIANTS.iter().enumerate() {
            let out = consumer_role(
                &mut Command::new(&exe),
                variant,
                &endpoint,
                &stream,
                records,
            )
            .output()
            .expect("run a consumer process");
            assert!(
                out.status.success(),
                "{variant}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let line = String::from_utf8_lossy(&out.stdout);
            let values: Vec<f64> = line
                .split_whitespace()
                .skip(1)
                .step_by(2)
                .map(|v| v.parse().expect("a number"))
                .collect();
            let [user_us, system_us, faults, switches, rss] = values[..] else {
                panic!("{variant} printed {line}");
            };
            let per_record = |us: f64| us * 1000.0 / records as f64;
            let per_thousand = |n: f64| n * 1000.0 / records as f64;
            let row = [
                per_record(user_us + system_us),
                per_record(user_us),
                per_record(system_us),
                per_thousand(faults),
                per_thousand(switches),
                rss,
            ];
            eprintln!(
                "round {round} {variant}: {:.0} ns/record ({:.0} user, {:.0} system), {:.1} faults and {:.2} switches per 1,000 records, peak RSS {:.0} MiB",
                row[0], row[1], row[2], row[3], row[4], row[5] / 1024.0
            );
            results[i].push(row);
        }
    }
    let _ = emulator.kill();
    let _ = emulator.wait();

    let median = |mut values: Vec<f64>| {
        values.sort_by(|a, b| a.total_cmp(b));
        values[values.len() / 2]
    };
    // The median of each column, over the rounds.
    let medians: Vec<[f64; 6]> = results
        .iter()
        .map(|rows| {
            std::array::from_fn(|column| median(rows.iter().map(|row| row[column]).collect()))
        })
        .collect();
    // Each round's CPU against the bare loop's of the same round: the machine's speed drifts
    // from round to round, a ratio within one round much less.
    let ratios: Vec<Vec<f64>> = results
        .iter()
        .map(|rows| {
            rows.iter()
                .zip(&results[0])
                .map(|(row, bare)| row[0] / bare[0])
                .collect()
        })
        .collect();
    println!(
        "client_cpu: {records} records of 100 B over {SHARDS} shards, emulator in its own process, medians of {rounds} interleaved rounds"
    );
    println!("| consumer | client CPU per record | ratio to the bare loop of the same round: median (lowest – highest) | user / system | page faults per 1,000 records | context switches per 1,000 records | peak RSS |");
    println!("|---|---|---|---|---|---|---|");
    for ((variant, m), ratios) in VARIANTS.iter().zip(&medians).zip(ratios) {
        let (lowest, highest) = ratios
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &r| (lo.min(r), hi.max(r)));
        println!(
            "| {variant} | {:.2} µs | {:.2}x ({lowest:.2} – {highest:.2}) | {:.2} / {:.2} µs | {:.1} | {:.2} | {:.0} MiB |",
            m[0] / 1000.0,
            median(ratios),
            m[1] / 1000.0,
            m[2] / 1000.0,
            m[3],
            m[4],
            m[5] / 1024.0
        );
    }
}
