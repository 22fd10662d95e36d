//! `KeyedConcurrencyLayer` across crashes, against kinesalite (127.0.0.1:4567, started by
//! `scripts/env.sh` `ensure_kinesalite`): a consumer process (`examples/audit_consumer.rs`
//! with `--keyed 64 --handler-ms 20`, checkpoints in SQLite) reads 2,000 records over 100
//! partition keys of one shard, is killed with SIGKILL twice at random points and restarted.
//!
//! Checked from its log (one line per record handled, written before the record's checkpoint
//! can be) and the checkpoint read after each kill: nothing is lost (every record is handled,
//! every record at or before a stored checkpoint was handled before it was stored); each run
//! hands each key's records over in order; a run delivers nothing at or before the checkpoint
//! it started from, so duplicates are only records after it.
//!
//! The kill points are random; set `KT_KEYED_CRASH_SEED` to replay a run (the seed is printed).
#![cfg(feature = "sqlite")]

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{create_stream, delete_stream, kinesis_client, put_records, unique_stream_name};
use kinesis_tower::store::SqliteStore;
use kinesis_tower::{Checkpoint, CheckpointStore, SequenceNumber};

const RECORDS: usize = 2_000;
const KEYS: usize = 100;
const KILLS: usize = 2;
const APP: &str = "keyed-crash";
/// Records per GetRecords call: 20 batches for the whole stream, so the kills land in it.
const RECORDS_PER_CALL: usize = 100;

fn kinesalite_endpoint() -> String {
    std::env::var("KINESALITE_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4567".to_owned())
}

fn spawn(example: &PathBuf, stream: &str, db: &Path, log: &Path) -> Child {
    common::example::command(example, &kinesalite_endpoint())
        .args(["--stream", stream, "--app", APP, "--from", "trim-horizon"])
        .arg("--store")
        .arg(format!("sqlite:{}", db.display()))
        .arg("--log")
        .arg(log)
        .args(["--max-records-per-call", &RECORDS_PER_CALL.to_string()])
        .args(["--keyed", "64", "--handler-ms", "20"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the audit consumer")
}

/// The sequence numbers of the log, in the order they were handled.
fn read_log(path: &Path) -> Vec<SequenceNumber> {
    common::audit_lines(path)
        .iter()
        .map(|fields| fields[1].parse().expect("a sequence number"))
        .collect()
}

/// Waits until the log has `lines` lines; panics if the child exits or after a minute.
fn wait_for_lines(child: &mut Child, log: &Path, lines: usize) {
    let start = Instant::now();
    while read_log(log).len() < lines {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("consumer exited early with {status}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "only {} of {lines} lines after 60 s",
            read_log(log).len()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

async fn stored(db: &Path, namespace: &str, shard: &str) -> Option<Checkpoint> {
    let store = SqliteStore::open(db).await.expect("open the SQLite file");
    store
        .get(namespace, shard)
        .await
        .expect("read the checkpoint")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_restart_loses_nothing_keeps_each_keys_order_and_redelivers_only_after_the_checkpoint(
) {
    let seed = std::env::var("KT_KEYED_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("KT_KEYED_CRASH_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let example = common::example::build("audit_consumer");
    let client = kinesis_client(&kinesalite_endpoint()).await;
    let stream = unique_stream_name("keyed-crash");
    create_stream(&client, &stream, 1).await;
    let records: Vec<(String, Vec<u8>)> = (0..RECORDS)
        .map(|i| {
            let key = format!("key-{:03}", rng.usize(..KEYS));
            (key, format!("record {i}").into_bytes())
        })
        .collect();
    let written = put_records(&client, &stream, &records).await;
    let shard = written[0].0.clone();
    assert!(written.iter().all(|(s, _)| *s == shard), "one shard");
    let key_of: HashMap<SequenceNumber, &str> = written
        .iter()
        .zip(&records)
        .map(|((_, seq), (key, _))| (seq.parse().expect("a sequence number"), key.as_str()))
        .collect();
    assert_eq!(key_of.len(), RECORDS);
    let namespace = format!("{APP}/{stream}");

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("checkpoints.sqlite");
    let log = dir.path().join("audit.log");
    // Per run: the log line it started at, and the checkpoint it started from.
    let mut runs: Vec<(usize, Option<Checkpoint>)> = Vec::new();
    for _ in 0..KILLS {
        let start = read_log(&log).len();
        runs.push((start, stored(&db, &namespace, &shard).await));
        let mut child = spawn(&example, &stream, &db, &log);
        wait_for_lines(&mut child, &log, start + rng.usize(200..600));
        // A random bit longer, so the kill can land anywhere in a batch.
        std::thread::sleep(Duration::from_millis(rng.u64(0..200)));
        child.kill().unwrap();
        child.wait().unwrap();
        let seen: HashSet<SequenceNumber> = read_log(&log).into_iter().collect();
        assert!(
            seen.len() < RECORDS,
            "the kill came after the whole stream was handled; nothing was tested"
        );
    }
    // The last run reads to the end.
    let start = read_log(&log).len();
    runs.push((start, stored(&db, &namespace, &shard).await));
    let mut child = spawn(&example, &stream, &db, &log);
    let started = Instant::now();
    loop {
        let seen: HashSet<SequenceNumber> = read_log(&log).into_iter().collect();
        if seen.len() == RECORDS {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("consumer exited early with {status}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{} of {RECORDS} records handled after 120 s",
            seen.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    delete_stream(&client, &stream).await;

    let lines = read_log(&log);
    let ends: Vec<usize> = runs
        .iter()
        .skip(1)
        .map(|r| r.0)
        .chain([lines.len()])
        .collect();
    let mut handled_before: HashSet<SequenceNumber> = HashSet::new();
    let mut duplicates = 0;
    for (run, ((begin, from), end)) in runs.iter().zip(ends).enumerate() {
        let from = from.and_then(|c| c.sequence_number());
        // What the checkpoint covered when this run started was handled in an earlier run.
        if let Some(from) = from {
            for seq in key_of.keys().filter(|seq| **seq <= from) {
                assert!(
                    handled_before.contains(seq),
                    "run {run}: record {seq} at or before checkpoint {from} was never handled"
                );
            }
        }
        let mut last_of_key: HashMap<&str, SequenceNumber> = HashMap::new();
        for seq in &lines[*begin..end] {
            let key = key_of[seq];
            assert!(
                from.is_none_or(|from| *seq > from),
                "run {run}: record {seq} delivered again although checkpoint {from:?} covers it"
            );
            if let Some(previous) = last_of_key.insert(key, *seq) {
                assert!(
                    previous < *seq,
                    "run {run}: key {key}: record {seq} handled after {previous}"
                );
            }
            duplicates += usize::from(handled_before.contains(seq));
        }
        handled_before.extend(&lines[*begin..end]);
    }
    assert_eq!(handled_before.len(), RECORDS);
    eprintln!(
        "{} lines for {RECORDS} records ({duplicates} delivered again after a kill), checkpoints at restart: {:?}",
        lines.len(),
        runs.iter().map(|r| r.1).collect::<Vec<_>>()
    );
}
