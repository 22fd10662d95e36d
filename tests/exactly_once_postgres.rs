//! The `exactly_once_postgres` example, killed with SIGKILL again and again while it copies a
//! stream into a table: after it finally catches up, the table holds every record exactly once.
//!
//! The stream lives in an embedded ferrokinesis (this process, 127.0.0.1); the example runs as
//! a child process against it and against PostgreSQL on 127.0.0.1:5432 (`KT_POSTGRES_URL`
//! overrides). Records are put in waves, one before each run; each run is killed at a random
//! moment after it has copied something (so inside or between transactions). The kill points
//! are random; `KT_SEED` replays a run (the seed is printed).
#![cfg(feature = "postgres")]

mod common;

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use sqlx::postgres::PgPool;

const SHARDS: i32 = 2;
const WAVES: usize = 7;
const PER_WAVE: usize = 400;
const KILLS: usize = WAVES - 1;

fn url() -> String {
    std::env::var("KT_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

struct Tables {
    sink: String,
    checkpoints: String,
}

fn spawn(example: &PathBuf, endpoint: &str, stream: &str, tables: &Tables, log: &PathBuf) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open the child's log");
    common::example::command(example, endpoint)
        .args(["--stream", stream, "--app", "exactly-once-test", "--db"])
        .arg(url())
        .args(["--sink", &tables.sink, "--checkpoints", &tables.checkpoints])
        .args(["--from", "trim-horizon", "--max-records-per-call", "25"])
        .env("RUST_LOG", "kinesis_tower=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.try_clone().expect("clone log handle"))
        .spawn()
        .expect("start the example")
}

async fn sink_rows(pool: &PgPool, sink: &str) -> (i64, i64) {
    // Before the child's first transaction the table may not exist yet.
    sqlx::query_as(&format!(
        "SELECT count(*), count(DISTINCT (shard_id, sequence_number)) FROM \"{sink}\""
    ))
    .fetch_one(pool)
    .await
    .unwrap_or((0, 0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_repeatedly_then_every_record_is_in_the_sink_exactly_once() {
    let seed = std::env::var("KT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("KT_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);

    let example = common::example::build("exactly_once_postgres");
    let kinesis = common::start_ferrokinesis().await;
    let stream = common::unique_stream_name("exactly-once");
    common::create_stream(&kinesis.client, &stream, SHARDS).await;
    let pool = PgPool::connect(&url())
        .await
        .expect("PostgreSQL on 127.0.0.1:5432 (source scripts/env.sh; ensure_postgres)");
    let suffix = format!("{}_{}", std::process::id(), rng.u32(..));
    let tables = Tables {
        sink: format!("kt_eo_sink_{suffix}"),
        checkpoints: format!("kt_eo_cp_{suffix}"),
    };
    let log_dir = tempfile::tempdir().unwrap();
    let log = log_dir.path().join("child.log");

    let mut put = 0;
    let mut kills_mid_run = 0;
    for wave in 0..WAVES {
        let records: Vec<(String, Vec<u8>)> = (put..put + PER_WAVE)
            .map(|i| (format!("pk-{i}"), format!("record-{i}").into_bytes()))
            .collect();
        common::put_records(&kinesis.client, &stream, &records).await;
        put += PER_WAVE;

        let (before, _) = sink_rows(&pool, &tables.sink).await;
        let mut child = spawn(&example, &kinesis.endpoint, &stream, &tables, &log);
        let deadline = Instant::now() + Duration::from_secs(60);
        if wave < KILLS {
            // Wait for this run to copy something, then kill it a random moment later: in
            // the middle of a transaction or between two.
            loop {
                let (rows, _) = sink_rows(&pool, &tables.sink).await;
                if rows > before {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "run {wave} copied nothing in 60 s; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                if let Some(status) = child.try_wait().unwrap() {
                    panic!(
                        "the example exited with {status}; log:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(rng.u64(0..400))).await;
            child.kill().expect("SIGKILL the example");
            child.wait().unwrap();
            let (rows, distinct) = sink_rows(&pool, &tables.sink).await;
            assert_eq!(
                rows, distinct,
                "after kill {wave}: a record was copied twice"
            );
            if (rows as usize) < put {
                kills_mid_run += 1;
            }
            eprintln!("kill {wave}: {rows} of {put} records copied");
        } else {
            // The last run: let it catch up.
            loop {
                let (rows, distinct) = sink_rows(&pool, &tables.sink).await;
                assert_eq!(rows, distinct, "a record was copied twice");
                if rows as usize >= put {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the last run copied {rows} of {put} records in 60 s; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Anything still in flight would show up now.
            tokio::time::sleep(Duration::from_millis(300)).await;
            child.kill().expect("SIGKILL the example");
            child.wait().unwrap();
        }
    }
    assert!(
        kills_mid_run > 0,
        "at least one kill landed before the run caught up"
    );

    let (rows, distinct) = sink_rows(&pool, &tables.sink).await;
    assert_eq!(
        (rows as usize, distinct as usize),
        (put, put),
        "every record exactly once"
    );
    let (payloads,): (i64,) = sqlx::query_as(&format!(
        "SELECT count(DISTINCT data) FROM \"{}\"",
        tables.sink
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(payloads as usize, put, "every payload present");

    for table in [&tables.sink, &tables.checkpoints] {
        sqlx::query(&format!("DROP TABLE IF EXISTS \"{table}\""))
            .execute(&pool)
            .await
            .unwrap();
    }
    common::delete_stream(&kinesis.client, &stream).await;
}
