//! At least once from every start position, against kinesis-mock: a consumer started at LATEST
//! (or at a timestamp) whose handler fails on its first batch, restarted after more records
//! were put and the shard was split while nothing ran, delivers every record, on the SQLite
//! store and on a buffered store.
//!
//! Without a durable start, the second run would start at LATEST again and skip all of them:
//! the first run checkpointed nothing, and the closed parent has no checkpoint.
#![cfg(feature = "sqlite")]

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_sdk_kinesis::Client;
use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::store::{BufferedStore, SqliteStore};
use kinesis_tower::{Batch, Consumer, Error, StartPosition};
use kinesis_tower::{BoxError, CheckpointStore};
use tokio_util::sync::CancellationToken;
use tower::{service_fn, Layer};

/// The data of every record handed to the handler.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<String>>>);

impl Seen {
    fn take(&self, batch: &Batch) {
        let mut seen = self.0.lock().unwrap();
        seen.extend(
            batch
                .records
                .iter()
                .map(|r| String::from_utf8_lossy(&r.data).into_owned()),
        );
    }

    fn distinct(&self) -> BTreeSet<String> {
        self.0.lock().unwrap().iter().cloned().collect()
    }
}

async fn put(client: &Client, stream: &str, names: &[&str]) {
    let records: Vec<(String, Vec<u8>)> = names
        .iter()
        .map(|n| (format!("key-{n}"), n.as_bytes().to_vec()))
        .collect();
    common::put_records(client, stream, &records).await;
}

/// How the first run ends.
#[derive(Clone, Copy, PartialEq)]
enum FirstRun {
    /// The handler fails on its first batch; `run` returns the error (and flushes).
    Fails,
    /// The handler hangs on its first batch and the process dies: nothing is flushed at the
    /// end, so only what was made durable before the first record went out survives.
    Crashes,
    /// The process dies before any record was put: only the start in time, made durable when
    /// the shard was opened, survives.
    DiesBeforeAnyRecord,
}

/// `start` gives the start position at each start, as a program computes it when it starts
/// (LATEST, or "now").
async fn scenario(
    store: Arc<dyn CheckpointStore>,
    start: impl Fn() -> StartPosition,
    first_run: FirstRun,
) {
    let client = common::kinesis_mock_client().await;
    let stream = common::unique_stream_name("durable-start");
    common::create_stream(&client, &stream, 1).await;
    let consumer_starting_at = |start: StartPosition| {
        Consumer::builder()
            .client(client.clone())
            .stream_name(&stream)
            .app_name("durable-start")
            .store_arc(store.clone())
            .start_position(start)
            .poll_interval(Duration::from_millis(50))
            .build()
            .unwrap()
    };
    let consumer = consumer_starting_at(start());

    // First run: the handler fails on the first batch with records.
    let seen = Seen::default();
    let failing = {
        let seen = seen.clone();
        service_fn(move |batch: Batch| {
            seen.take(&batch);
            async move {
                if batch.is_empty() {
                    Ok(())
                } else if first_run == FirstRun::Crashes {
                    std::future::pending().await
                } else {
                    Err::<(), BoxError>("the handler fails".into())
                }
            }
        })
    };
    let run = tokio::spawn({
        let consumer = consumer.clone();
        let service = CheckpointLayer::new(consumer.checkpointer()).layer(failing);
        async move { consumer.run(service).await }
    });
    // Records put once the first run is reading (LATEST starts at the tip).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    if first_run == FirstRun::DiesBeforeAnyRecord {
        // Reading, with nothing to read yet.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    while first_run != FirstRun::DiesBeforeAnyRecord && seen.distinct().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first run never got a record"
        );
        put(&client, &stream, &["a1", "a2", "a3"]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if first_run != FirstRun::Fails {
        run.abort();
        let _ = run.await;
    } else {
        let outcome = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("the first run ends")
            .unwrap();
        assert!(matches!(outcome, Err(Error::Handler { .. })), "{outcome:?}");
    }
    let delivered_first = seen.distinct();

    // While nothing runs: more records, then the shard is split, then records in the children.
    put(&client, &stream, &["b1", "b2"]).await;
    let shards = common::list_all_shards(&client, &stream).await;
    let parent = &shards[0];
    let range = parent.hash_key_range().unwrap();
    let (low, high): (u128, u128) = (
        range.starting_hash_key().parse().unwrap(),
        range.ending_hash_key().parse().unwrap(),
    );
    client
        .split_shard()
        .stream_name(&stream)
        .shard_to_split(parent.shard_id())
        .new_starting_hash_key((low + (high - low) / 2 + 1).to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("SplitShard: {}", common::error_chain(e)));
    common::wait_for_stream_active(&client, &stream, Duration::from_secs(30)).await;
    put(&client, &stream, &["c1", "c2", "c3", "c4"]).await;

    // Second run, same settings: everything the first run delivered but did not checkpoint,
    // and everything put since.
    let consumer = consumer_starting_at(start());
    let seen = Seen::default();
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let consumer = consumer.clone();
        let seen = seen.clone();
        let handler = service_fn(move |batch: Batch| {
            seen.take(&batch);
            async { Ok::<_, BoxError>(()) }
        });
        let service = CheckpointLayer::new(consumer.checkpointer()).layer(handler);
        let stop = stop.clone();
        async move { consumer.run_until(service, stop.cancelled_owned()).await }
    });
    let expected: BTreeSet<String> = delivered_first
        .iter()
        .cloned()
        .chain(["b1", "b2", "c1", "c2", "c3", "c4"].map(String::from))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !seen.distinct().is_superset(&expected) {
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    run.await.unwrap().unwrap();
    common::delete_stream(&client, &stream).await;
    let missing: Vec<_> = expected.difference(&seen.distinct()).cloned().collect();
    assert!(missing.is_empty(), "lost on restart: {missing:?}");
}

async fn sqlite(dir: &tempfile::TempDir) -> Arc<dyn CheckpointStore> {
    let store = SqliteStore::open(dir.path().join("checkpoints.db"))
        .await
        .unwrap();
    store.create_table().await.unwrap();
    Arc::new(store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_restart_on_sqlite_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    scenario(
        sqlite(&dir).await,
        || StartPosition::Latest,
        FirstRun::Fails,
    )
    .await;
}

/// The first run dies with its buffered checkpoints unflushed: the start was flushed before the
/// first record went out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_crash_and_restart_on_a_buffered_store_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let buffered = BufferedStore::new(sqlite(&dir).await).flush_interval(Duration::from_secs(3600));
    scenario(
        Arc::new(buffered),
        || StartPosition::Latest,
        FirstRun::Crashes,
    )
    .await;
}

/// The first run dies before any record arrived; records come while nothing runs, and the shard
/// is split: the restart (at a new LATEST) reads them all, the parent before its children.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_crash_before_any_record_on_a_buffered_store_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let buffered = BufferedStore::new(sqlite(&dir).await).flush_interval(Duration::from_secs(3600));
    scenario(
        Arc::new(buffered),
        || StartPosition::Latest,
        FirstRun::DiesBeforeAnyRecord,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamp_restart_on_sqlite_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let now = || StartPosition::AtTimestamp(SystemTime::now());
    scenario(sqlite(&dir).await, now, FirstRun::Fails).await;
}
