//! Crash tests: a consumer process (`examples/audit_consumer.rs`) reads 20,000 records from
//! kinesalite with checkpoints in a store and is killed with SIGKILL at three random points, then
//! restarted each time. Every record must be handled at least once, and every duplicate must be
//! a record last handled within the store's flush interval (plus a little slack) before a kill:
//! what was checkpointed and flushed is never handled again. The same test reads through
//! enhanced fan-out from kinesis-mock (kinesalite has no SubscribeToShard).

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{create_stream, delete_stream, kinesis_client, put_records, unique_stream_name};

const RECORDS: usize = 20_000;
const SHARDS: i32 = 4;
const KILLS: usize = 3;
/// Records per GetRecords call: with at most 5 calls/s/shard the consumer takes ~10 s for the
/// whole stream, so the kills land in the middle of it.
const RECORDS_PER_CALL: usize = 100;
/// Time between a record's handling and its checkpoint's write, beyond the flush interval: one
/// batch, a store round trip, a slow machine.
const SLACK: Duration = Duration::from_millis(1500);

fn kinesalite_endpoint() -> String {
    std::env::var("KINESALITE_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4567".to_owned())
}

/// Where the records come from and how the consumer reads them.
struct Source {
    endpoint: String,
    records: usize,
    shards: i32,
    /// How the consumer reads, beyond the common arguments.
    args: Vec<&'static str>,
    /// Lines handled after a start before the kill, chosen at random in this range.
    kill_after: std::ops::Range<usize>,
}

impl Source {
    /// kinesalite, polling.
    fn polling() -> Self {
        Self {
            endpoint: kinesalite_endpoint(),
            records: RECORDS,
            shards: SHARDS,
            args: Vec::new(),
            kill_after: 1_000..4_000,
        }
    }

    /// kinesis-mock (fewer records: its writes slow down as a stream grows), enhanced fan-out.
    /// Fan-out pushes records without pacing, so the handler takes 1 ms per record to leave
    /// the kills room to land mid-stream.
    fn fan_out() -> Self {
        Self {
            endpoint: common::kinesis_mock_endpoint(),
            records: 4_000,
            shards: 2,
            args: vec!["--fan-out", "crash-test", "--handler-ms", "1"],
            kill_after: 300..1_000,
        }
    }
}

/// Builds the example once (a no-op when `cargo test` already did) and returns its path.
fn audit_consumer() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "--example",
                "audit_consumer",
                "--all-features",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build --example audit_consumer");
        assert!(
            status.success(),
            "cargo build --example audit_consumer failed"
        );
        // <target>/debug/deps/<this test> → <target>/debug/examples/audit_consumer
        let exe = std::env::current_exe().expect("test executable path");
        let path = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .join("examples")
            .join("audit_consumer");
        assert!(path.exists(), "{} missing", path.display());
        path
    })
}

fn spawn(source: &Source, stream: &str, store: &str, log: &Path, flush: Duration) -> Child {
    Command::new(audit_consumer())
        .args(["--stream", stream, "--store", store, "--app", "crash-test"])
        .arg("--log")
        .arg(log)
        .args(["--flush-ms", &flush.as_millis().to_string()])
        .args(["--max-records-per-call", &RECORDS_PER_CALL.to_string()])
        .args(&source.args)
        .env("AWS_ENDPOINT_URL_KINESIS", &source.endpoint)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the audit consumer")
}

/// One handled record as the consumer logged it.
struct Line {
    key: (String, String, String),
    micros: u128,
}

fn read_log(path: &Path) -> Vec<Line> {
    common::audit_lines(path)
        .into_iter()
        .map(|mut f| Line {
            micros: f[3].parse().expect("micros"),
            key: (
                std::mem::take(&mut f[0]),
                std::mem::take(&mut f[1]),
                std::mem::take(&mut f[2]),
            ),
        })
        .collect()
}

fn line_count(path: &Path) -> usize {
    std::fs::read(path)
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .unwrap_or(0)
}

fn now_micros() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros()
}

/// Waits until the log has `lines` lines or the child exits; panics after `timeout`.
fn wait_for_lines(child: &mut Child, log: &Path, lines: usize, timeout: Duration) {
    let start = Instant::now();
    while line_count(log) < lines {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "consumer exited early with {status} at {} lines",
                line_count(log)
            );
        }
        assert!(
            start.elapsed() < timeout,
            "only {} of {lines} lines after {timeout:?}",
            line_count(log)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Consumes the stream with `store`, killing the consumer three times; checks at least once and
/// the duplicate bound `flush + SLACK`.
async fn crash_and_restart(store: &str, flush: Duration) {
    crash_and_restart_from(&Source::polling(), store, flush).await;
}

async fn crash_and_restart_from(source: &Source, store: &str, flush: Duration) {
    // One crash test at a time: the duplicate bound is about time, and five consumers, their
    // stores and kinesalite on two cores would stretch every flush.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = ONE_AT_A_TIME.lock().await;
    let client = kinesis_client(&source.endpoint).await;
    let stream = unique_stream_name("crash");
    create_stream(&client, &stream, source.shards).await;
    let records: Vec<(String, Vec<u8>)> = (0..source.records)
        .map(|i| (format!("key-{i}"), format!("record {i}").into_bytes()))
        .collect();
    let written: HashSet<(String, String)> = put_records(&client, &stream, &records)
        .await
        .into_iter()
        .collect();
    assert_eq!(written.len(), source.records);

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    let mut kills = Vec::new(); // (line count at the kill, kill time)
    for _ in 0..KILLS {
        let mut child = spawn(source, &stream, store, &log, flush);
        let target = line_count(&log) + fastrand::usize(source.kill_after.clone());
        wait_for_lines(&mut child, &log, target, Duration::from_secs(60));
        // Let it run a random bit longer, so the kill can land anywhere in a batch.
        std::thread::sleep(Duration::from_millis(fastrand::u64(0..300)));
        let at = now_micros();
        child.kill().unwrap();
        child.wait().unwrap();
        kills.push((line_count(&log), at));
    }
    // The last run reads to the end.
    let mut child = spawn(source, &stream, store, &log, flush);
    let start = Instant::now();
    loop {
        let seen: HashSet<(String, String)> = read_log(&log)
            .into_iter()
            .map(|l| (l.key.0, l.key.1))
            .collect();
        if written.is_subset(&seen) {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("consumer exited early with {status}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{} of {} records handled after 120 s",
            written.intersection(&seen).count(),
            source.records
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    delete_stream(&client, &stream).await;

    // Every run's records: a record handled again must have been handled last within
    // `flush + SLACK` before the kill that ended the run it was handled in. (That is not always
    // the kill just before the run that handles it again: a run in between may not have come to
    // its shard, e.g. while the killed process's fan-out subscription still held it.)
    let lines = read_log(&log);
    let bound = (flush + SLACK).as_micros();
    // When, and in which run, each record was last handled (a record may come again after each
    // of several kills, e.g. when its shard's first batch of a run was handled just before that
    // run's kill).
    let mut last_seen: HashMap<&(String, String, String), (u128, usize)> = HashMap::new();
    let mut duplicates = 0;
    let mut run_start = 0;
    for (run, end) in kills.iter().map(|k| k.0).chain([lines.len()]).enumerate() {
        let mut in_run = HashSet::new();
        for line in &lines[run_start..end] {
            assert!(
                in_run.insert(&line.key),
                "{:?} handled twice in run {run} (no crash between)",
                line.key
            );
            if let Some(&(last, last_run)) = last_seen.get(&line.key) {
                duplicates += 1;
                let (_, kill) = kills[last_run];
                assert!(
                    last + bound >= kill,
                    "{:?} handled again in run {run} after the kill at {kill} that ended run {last_run}: \
                     last handled {} ms before it, more than the flush interval {flush:?} + {SLACK:?} — \
                     its checkpoint should have been written",
                    line.key,
                    (kill - last) / 1000
                );
            }
            last_seen.insert(&line.key, (line.micros, run));
        }
        run_start = end;
    }
    let distinct: HashSet<(String, String)> = last_seen
        .keys()
        .map(|k| (k.0.clone(), k.1.clone()))
        .collect();
    assert_eq!(distinct, written, "every record handled at least once");
    eprintln!(
        "{store}: {} lines, {duplicates} duplicates over {KILLS} kills (bound {:?} each)",
        lines.len(),
        flush + SLACK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", dir.path().join("checkpoints.sqlite").display());
    crash_and_restart(&store, Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_survives_kill_9_over_fan_out() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", dir.path().join("checkpoints.sqlite").display());
    crash_and_restart_from(&Source::fan_out(), &store, Duration::ZERO).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_survives_kill_9() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned());
    crash_and_restart(&url, Duration::ZERO).await;
    // The checkpoints of this process's crash streams: `<prefix>:crash-test/crash-<pid>-...`.
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let pattern = format!(
        "kinesis-checkpoints:crash-test/crash-{}-*",
        std::process::id()
    );
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut conn)
        .await
        .unwrap();
    for key in keys {
        redis::cmd("DEL")
            .arg(key)
            .query_async::<i64>(&mut conn)
            .await
            .unwrap();
    }
}

#[cfg(feature = "dynamodb")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_buffered_survives_kill_9() {
    let table = unique_stream_name("crash-ddb");
    crash_and_restart(&format!("dynamodb:{table}"), Duration::from_secs(1)).await;
    let config = aws_config::load_from_env().await;
    aws_sdk_dynamodb::Client::new(&config)
        .delete_table()
        .table_name(&table)
        .send()
        .await
        .unwrap();
}

/// Runs the crash test with a SQL store on `server`, in a database of its own (so the store's
/// default table is created fresh), dropped afterwards with `DROP DATABASE <name><drop_options>`.
#[cfg(any(feature = "postgres", feature = "mysql"))]
async fn crash_in_scratch_database<DB: sqlx::Database>(server: &str, drop_options: &str)
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
{
    let admin = sqlx::Pool::<DB>::connect(&format!("{server}/test"))
        .await
        .unwrap_or_else(|e| {
            panic!("{server} (source scripts/env.sh; ensure_postgres / ensure_mariadb): {e}")
        });
    let database = format!("kt_crash_{}_{}", std::process::id(), fastrand::u32(..));
    sqlx::raw_sql(&format!("CREATE DATABASE {database}"))
        .execute(&admin)
        .await
        .unwrap();
    crash_and_restart(&format!("{server}/{database}"), Duration::from_secs(1)).await;
    sqlx::raw_sql(&format!("DROP DATABASE {database}{drop_options}"))
        .execute(&admin)
        .await
        .unwrap();
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_survives_kill_9() {
    crash_in_scratch_database::<sqlx::Postgres>(
        "postgres://postgres@127.0.0.1:5432",
        " WITH (FORCE)",
    )
    .await;
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_survives_kill_9() {
    crash_in_scratch_database::<sqlx::MySql>("mysql://root@127.0.0.1:3306", "").await;
}
