//! The README's quick start (`examples/consumer_sqlite.rs`) and the `records_chunks` example,
//! run as users run them: a child process whose AWS configuration comes from the environment,
//! against an embedded emulator (this process, 127.0.0.1) holding a stream named `orders`
//! (the examples' default), with its checkpoints in a SQLite file in a fresh directory.
//!
//! Each example reads what is put after it started, checkpoints it, stops cleanly on SIGINT
//! (exit status 0) with every shard checkpointed at its last record, and after a restart
//! reads only what was put since.
#![cfg(feature = "sqlite")]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kinesis_tower::store::SqliteStore;
use kinesis_tower::{Checkpoint, CheckpointStore, SequenceNumber};

const STREAM: &str = "orders";
const SHARDS: i32 = 2;

/// A running example and the number of records it reported.
struct Running {
    child: Child,
    records: Arc<AtomicUsize>,
    log: PathBuf,
}

impl Running {
    fn start(example: &Path, endpoint: &str, dir: &Path, args: &[&str]) -> Self {
        let log = dir.join("stderr.log");
        let stderr = std::fs::File::create(&log).expect("create the child's log");
        let mut child = common::example::command(&example.to_path_buf(), endpoint)
            .args(args)
            .current_dir(dir)
            .env("RUST_LOG", "kinesis_tower=info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start the example");
        let records = Arc::new(AtomicUsize::new(0));
        let stdout = child.stdout.take().expect("piped stdout");
        let counted = records.clone();
        // Each line starts with the number of records handled: "<n> records ...".
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.split_whitespace().next().and_then(|n| n.parse().ok()) {
                    counted.fetch_add(n, Ordering::SeqCst);
                }
            }
        });
        Self {
            child,
            records,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_for_records(&mut self, expected: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.records.load(Ordering::SeqCst) < expected {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the example exited with {status}; log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "{} of {expected} records in 60 s; log:\n{}",
                self.records.load(Ordering::SeqCst),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGINT, as Ctrl-C sends it; the example must exit 0 within 30 s.
    async fn interrupt(mut self) -> usize {
        let status = std::process::Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -INT failed");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "no exit 30 s after SIGINT");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            status.success(),
            "exit {status} after SIGINT; log:\n{}",
            self.log()
        );
        self.records.load(Ordering::SeqCst)
    }
}

/// Waits until the example opened every shard: at `LATEST`, where each shard started is
/// recorded in the store before anything is read.
async fn wait_until_started(running: &mut Running, store: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if store.exists() {
            let store = SqliteStore::open(store)
                .await
                .expect("open the example's store");
            let shards = store.list(&format!("default/{STREAM}")).await.unwrap();
            if shards.len() == SHARDS as usize {
                return;
            }
        }
        if let Some(status) = running.child.try_wait().unwrap() {
            panic!("the example exited with {status}; log:\n{}", running.log());
        }
        assert!(
            Instant::now() < deadline,
            "shards not opened in 60 s; log:\n{}",
            running.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last record put in each shard.
type Last = HashMap<String, SequenceNumber>;

/// Every shard's checkpoint is its last record.
async fn assert_checkpointed_at_the_end(last: &Last, store: &Path) {
    let store = SqliteStore::open(store).await.unwrap();
    let checkpoints = store.list(&format!("default/{STREAM}")).await.unwrap();
    assert_eq!(checkpoints.len(), last.len(), "{checkpoints:?}");
    for (shard, checkpoint) in checkpoints {
        assert_eq!(
            checkpoint,
            Checkpoint::Sequence {
                sequence_number: last[&shard],
                sub_sequence_number: None
            },
            "{shard}"
        );
    }
}

async fn put(kinesis: &common::EmbeddedKinesis, last: &mut Last, from: usize, count: usize) {
    let records: Vec<(String, Vec<u8>)> = (from..from + count)
        .map(|i| (format!("customer-{i}"), format!("order-{i}").into_bytes()))
        .collect();
    for (shard, sequence) in common::put_records(&kinesis.client, STREAM, &records).await {
        let sequence = SequenceNumber::parse(&sequence).unwrap();
        let entry = last.entry(shard).or_insert(sequence);
        *entry = (*entry).max(sequence);
    }
}

async fn two_runs(example: &str, args: &[&str]) {
    let example = common::example::build(example);
    let kinesis = common::start_ferrokinesis().await;
    common::create_stream(&kinesis.client, STREAM, SHARDS).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("checkpoints.sqlite");
    let mut last = Last::new();

    let mut first = Running::start(&example, &kinesis.endpoint, dir.path(), args);
    wait_until_started(&mut first, &store).await;
    put(&kinesis, &mut last, 0, 300).await;
    first.wait_for_records(300).await;
    assert_eq!(first.interrupt().await, 300, "each record once");
    assert_checkpointed_at_the_end(&last, &store).await;

    // Put while it is down: the restart resumes after the checkpoints, not at LATEST.
    put(&kinesis, &mut last, 300, 40).await;
    let mut second = Running::start(&example, &kinesis.endpoint, dir.path(), args);
    second.wait_for_records(40).await;
    // Nothing before the checkpoints comes again (a re-read would show here).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(second.interrupt().await, 40, "only what was put since");
    assert_checkpointed_at_the_end(&last, &store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_start_checkpoints_stops_on_ctrl_c_and_resumes() {
    two_runs("consumer_sqlite", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_chunks_commits_each_chunk_stops_on_ctrl_c_and_resumes() {
    two_runs("records_chunks", &["--stream", STREAM]).await;
}

/// The README's quick start is the example, line for line (after the example's doc comment).
#[test]
fn readme_quick_start_is_the_example() {
    let readme = include_str!("../README.md");
    let section = readme
        .split("## Quick start")
        .nth(1)
        .expect("README has a Quick start");
    let code = section
        .split("```rust")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a rust block in the Quick start");
    let code = code.split_once('\n').map_or(code, |(_, body)| body);
    let example = include_str!("../examples/consumer_sqlite.rs");
    let example: String = example
        .lines()
        .filter(|line| !line.starts_with("//!"))
        .map(|line| format!("{line}\n"))
        .collect();
    assert_eq!(code.trim(), example.trim());
    let lines = code.trim().lines().count();
    assert!(lines <= 15, "the quick start has {lines} lines");
}

/// Without a client, the configuration comes from the environment; with no region there, the
/// quick start stops at once with an error that says what to set (instead of retrying).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_region_the_quick_start_stops_saying_what_to_set() {
    let example = common::example::build("consumer_sqlite");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let missing = dir.path().join("missing");
    let mut child = common::example::command(&example, "http://127.0.0.1:9")
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .env("AWS_CONFIG_FILE", &missing)
        .env("AWS_SHARED_CREDENTIALS_FILE", &missing)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the example");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("still running after 60 s without a region");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("AWS_REGION"), "{stderr}");
}
