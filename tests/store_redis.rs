//! `RedisStore` against real Redis servers on 127.0.0.1: the machine's Redis on 6379
//! (`REDIS_URL` overrides it) for the store's behaviour, and a `redis-server` child process on
//! a free port for the tests that stop the server.
//!
//! The conformance suite covers what every store promises (server-side monotonic across two
//! handles, 128-digit sequence numbers, sub-sequence order, shard end, concurrent writers); the
//! tests below cover what is Redis's own: the key layout, corrupt and wrong-type values, key
//! prefixes, an unreachable or restarted server, and a server killed under a running consumer.
//!
//! Every test writes under its own key prefix and deletes what it wrote.
#![cfg(feature = "redis")]

mod common;
mod conformance;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::store::RedisStore;
use kinesis_tower::{Batch, Checkpoint, Consumer, StartPosition};
use kinesis_tower::{BoxError, CheckpointStore, StoreError};
use kinesis_tower_layers::testing::{at, at_sub};
use tokio_util::sync::CancellationToken;
use tower::{service_fn, Layer};

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned())
}

/// A key prefix no other test (or test process) uses.
fn unique_prefix(test: &str) -> String {
    common::unique_stream_name(&format!("kt-test:{test}"))
}

async fn store(prefix: &str) -> RedisStore {
    RedisStore::connect_with_prefix(&redis_url(), prefix)
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", redis_url()))
}

/// Deletes every key under `prefix` (the tests' namespaces are few: SCAN is fine here).
async fn cleanup(prefix: &str) {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        redis::cmd("DEL")
            .arg(keys)
            .query_async::<i64>(&mut conn)
            .await
            .unwrap();
    }
}

conformance::suite!(
    redis_store,
    make = |scope: String| async move { Arc::new(store(&scope).await) as Arc<dyn CheckpointStore> },
    cleanup = |scope: String| async move { cleanup(&scope).await },
);

#[tokio::test]
async fn layout_is_one_hash_per_namespace_and_list_reads_it() {
    let prefix = unique_prefix("layout");
    let s = store(&prefix).await;
    s.set("app/a", "shardId-2", at(20)).await.unwrap();
    s.set("app/a", "shardId-1", at_sub(10, 3)).await.unwrap();
    s.set("app/b", "shardId-1", Checkpoint::ShardEnd)
        .await
        .unwrap();
    assert_eq!(
        s.list("app/a").await.unwrap(),
        vec![
            ("shardId-1".to_owned(), at_sub(10, 3)),
            ("shardId-2".to_owned(), at(20)),
        ]
    );
    assert_eq!(
        s.list("app/b").await.unwrap(),
        vec![("shardId-1".to_owned(), Checkpoint::ShardEnd)]
    );
    assert_eq!(s.list("app/none").await.unwrap(), vec![]);

    // What a user sees in redis-cli: HGET <prefix>:<namespace> <shard> is the sort key.
    let mut conn = s.connection().clone();
    let raw: String = redis::cmd("HGET")
        .arg(format!("{prefix}:app/a"))
        .arg("shardId-2")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(raw, at(20).sort_key());

    s.delete_namespace("app/a").await.unwrap();
    assert_eq!(s.list("app/a").await.unwrap(), vec![]);
    assert_eq!(
        s.get("app/b", "shardId-1").await.unwrap(),
        Some(Checkpoint::ShardEnd)
    );
    cleanup(&prefix).await;
}

#[tokio::test]
async fn a_value_not_written_by_the_store_is_corrupt_not_missing() {
    let prefix = unique_prefix("corrupt");
    let s = store(&prefix).await;
    let mut conn = s.connection().clone();
    redis::cmd("HSET")
        .arg(format!("{prefix}:ns"))
        .arg("shard")
        .arg("12345")
        .query_async::<i64>(&mut conn)
        .await
        .unwrap();
    let err = s.get("ns", "shard").await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    let err = s.list("ns").await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    cleanup(&prefix).await;
}

#[tokio::test]
async fn a_key_of_the_wrong_type_is_a_clear_error_that_is_not_retried() {
    let prefix = unique_prefix("wrongtype");
    let s = store(&prefix).await;
    let mut conn = s.connection().clone();
    redis::cmd("SET")
        .arg(format!("{prefix}:ns"))
        .arg("not a hash")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let err = s.set("ns", "shard", at(1)).await.unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("WRONGTYPE") && text.contains("shard"),
        "{text}"
    );
    cleanup(&prefix).await;
}

#[tokio::test]
async fn invalid_key_prefixes_are_rejected_before_connecting() {
    for bad in ["", "a b", "a*", "{tag}", "-x", "a\nb"] {
        // Port 1 is never a Redis: a validation error must come first.
        let err = RedisStore::connect_with_prefix("redis://127.0.0.1:1/", bad)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidName { .. }),
            "{bad:?}: {err}"
        );
    }
    let manager = redis::aio::ConnectionManager::new(redis::Client::open(redis_url()).unwrap())
        .await
        .unwrap();
    let err = RedisStore::new(manager.clone(), "bad prefix").unwrap_err();
    assert!(matches!(err, StoreError::InvalidName { .. }), "{err}");
    RedisStore::new(manager, "good-prefix:v1.2_x").unwrap();
}

/// A `redis-server` child process on a free loopback port, with an append-only file fsynced on
/// every write in its own directory, so a SIGKILL loses nothing that was acknowledged. Killed
/// when dropped.
struct OwnRedis {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl OwnRedis {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut own = Self {
            child: None,
            port,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        own.spawn().await;
        own
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                // Answer BUSY after 100 ms of a running script (the default is 5 s).
                "--lua-time-limit",
                "100",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--logfile", "redis.log"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start redis-server (scripts/env.sh ensure_redis installs it)");
        self.child = Some(child);
        wait_until_serving(&self.url(), self.dir.path()).await;
    }

    /// SIGKILL, like a crash: no shutdown save.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn wait_until_serving(url: &str, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let client = redis::Client::open(url).unwrap();
        if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
            if redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .is_ok()
            {
                return;
            }
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
            panic!("redis-server on {url} not serving after 20 s; its log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn reads_of_an_unreachable_server_are_errors_never_missing_checkpoints() {
    let mut server = OwnRedis::start().await;
    let s = RedisStore::connect(&server.url()).await.unwrap();
    s.set("ns", "shardId-7", at(42)).await.unwrap();
    server.kill();

    let started = Instant::now();
    let err = s.get("ns", "shardId-7").await.unwrap_err();
    eprintln!(
        "get after the kill failed in {:?}: {err}",
        started.elapsed()
    );
    assert!(err.is_retryable(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("redis") && text.contains("get") && text.contains("shardId-7"),
        "{text}"
    );
    let err = s.list("ns").await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    let err = s.set("ns", "shardId-7", at(43)).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");

    // Nothing listens on the port now: connecting is a retryable error too.
    let err = RedisStore::connect(&server.url()).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");

    // Back on the same port with its append-only file: the same handle reconnects and
    // finds the acknowledged checkpoint.
    server.spawn().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let value = loop {
        match s.get("ns", "shardId-7").await {
            Ok(value) => break value,
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("get after the restart: {e}"),
        }
    };
    assert_eq!(value, Some(at(42)));
}

#[tokio::test]
async fn a_server_busy_in_a_script_is_a_retryable_error_and_the_store_recovers() {
    let server = OwnRedis::start().await;
    let s = RedisStore::connect(&server.url()).await.unwrap();
    s.set("ns", "shardId-1", at(5)).await.unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let mut blocker = client.get_multiplexed_async_connection().await.unwrap();
    let mut killer = client.get_multiplexed_async_connection().await.unwrap();
    let busy = tokio::spawn(async move {
        // Never ends on its own; its reply (an error once killed, or a client-side timeout)
        // does not matter.
        let _ = redis::cmd("EVAL")
            .arg("while true do end")
            .arg(0)
            .query_async::<()>(&mut blocker)
            .await;
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let err = s.get("ns", "shardId-1").await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("BUSY") && text.contains("shardId-1"),
        "{text}"
    );
    let err = s.set("ns", "shardId-1", at(6)).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");

    redis::cmd("SCRIPT")
        .arg("KILL")
        .query_async::<()>(&mut killer)
        .await
        .unwrap();
    busy.await.unwrap();
    assert_eq!(s.get("ns", "shardId-1").await.unwrap(), Some(at(5)));
    assert_eq!(
        s.set("ns", "shardId-1", at(6)).await.unwrap(),
        kinesis_tower::checkpoint::SetOutcome::Advanced
    );
}

/// The fault test: Redis is killed (SIGKILL) in the middle of a consumer run and
/// restarted on the same port (with its append-only file, fsynced per write, so an
/// acknowledged checkpoint survives). Whichever way the run goes — the store's retries bridge
/// the gap and it continues, or a checkpoint write fails and the run ends with a retryable
/// Redis error naming the shard — the stored checkpoints never move backwards, and a second
/// run on the same store delivers every record that was not yet checkpointed, so every record
/// is seen.
#[tokio::test]
async fn redis_killed_for_a_moment_during_a_run_loses_no_checkpoint_and_no_record() {
    // A second's outage: the store's retries usually bridge it; either outcome is checked.
    kill_redis_during_a_run(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn redis_killed_for_longer_than_the_retries_ends_the_run_with_a_clear_error_and_a_restart_loses_nothing(
) {
    // Longer than the store's retries wait: a checkpoint write must fail and end the run.
    let failed = kill_redis_during_a_run(Duration::from_secs(8)).await;
    assert!(
        failed,
        "run 1 should have failed while Redis was down for 8 s"
    );
}

/// Returns whether run 1 failed.
async fn kill_redis_during_a_run(outage: Duration) -> bool {
    const TOTAL: usize = 4_000;
    const SHARDS: i32 = 3;
    let mut server = OwnRedis::start().await;
    let kinesis = common::start_ferrokinesis().await;
    let stream = common::unique_stream_name("redis-fault");
    common::create_stream(&kinesis.client, &stream, SHARDS).await;
    let records: Vec<(String, Vec<u8>)> = (0..TOTAL)
        .map(|i| (format!("pk-{i}"), format!("id-{i}").into_bytes()))
        .collect();
    common::put_records(&kinesis.client, &stream, &records).await;

    let seen: Arc<Mutex<Vec<usize>>> = Arc::new(Mutex::new(vec![0; TOTAL]));
    let distinct = Arc::new(AtomicUsize::new(0));
    let consumer_for = |store: RedisStore| {
        Consumer::builder()
            .client(kinesis.client.clone())
            .stream_name(&stream)
            .app_name("redis-fault")
            .start_position(StartPosition::TrimHorizon)
            .store(store)
            .max_records_per_call(25)
            .min_get_records_interval(Duration::from_millis(5))
            .poll_interval(Duration::from_millis(20))
            .drain_timeout(Duration::from_secs(30))
            .build()
            .expect("valid consumer configuration")
    };
    // Records each delivery; stops the run once `stop_at` distinct ids have been seen. A few
    // milliseconds per batch, so the run is still going when Redis is killed.
    let service_for = |consumer: &Consumer, stop: CancellationToken, stop_at: usize| {
        let seen = seen.clone();
        let distinct = distinct.clone();
        let handler = service_fn(move |batch: Batch| {
            let seen = seen.clone();
            let distinct = distinct.clone();
            let stop = stop.clone();
            async move {
                {
                    let mut seen = seen.lock().unwrap();
                    for record in &batch.records {
                        let id: usize = std::str::from_utf8(&record.data)
                            .ok()
                            .and_then(|s| s.strip_prefix("id-"))
                            .and_then(|s| s.parse().ok())
                            .ok_or("record without id")?;
                        if seen[id] == 0 {
                            distinct.fetch_add(1, Ordering::SeqCst);
                        }
                        seen[id] += 1;
                    }
                }
                if distinct.load(Ordering::SeqCst) >= stop_at {
                    stop.cancel();
                }
                tokio::time::sleep(Duration::from_millis(4)).await;
                Ok::<(), BoxError>(())
            }
        });
        CheckpointLayer::new(consumer.checkpointer()).layer(handler)
    };

    // A watcher on its own connection records every checkpoint it reads; reads fail while
    // Redis is down, and must never show a checkpoint behind an earlier one.
    let watcher_store = RedisStore::connect(&server.url()).await.unwrap();
    let consumer = consumer_for(RedisStore::connect(&server.url()).await.unwrap());
    let namespace = consumer.namespace().to_owned();
    let history: Arc<Mutex<BTreeMap<String, Vec<Checkpoint>>>> = Arc::default();
    let watching = CancellationToken::new();
    let watcher = tokio::spawn({
        let history = history.clone();
        let watching = watching.clone();
        let namespace = namespace.clone();
        async move {
            while !watching.is_cancelled() {
                if let Ok(all) = watcher_store.list(&namespace).await {
                    let mut history = history.lock().unwrap();
                    for (shard, checkpoint) in all {
                        let h = history.entry(shard).or_default();
                        if h.last() != Some(&checkpoint) {
                            h.push(checkpoint);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });

    // Run 1: kill Redis once a quarter of the records are handled, restart it `outage` later.
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let service = service_for(&consumer, stop.clone(), TOTAL);
        let stop = stop.clone();
        async move { consumer.run_until(service, stop.cancelled_owned()).await }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    while distinct.load(Ordering::SeqCst) < TOTAL / 4 {
        assert!(Instant::now() < deadline, "run 1 made no progress");
        assert!(!run.is_finished(), "run 1 ended before Redis was killed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before_kill = history.lock().unwrap().clone();
    server.kill();
    let killed_at = distinct.load(Ordering::SeqCst);
    tokio::time::sleep(outage).await;
    server.spawn().await;
    let result = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("run 1 ends")
        .expect("run 1 task");
    eprintln!(
        "killed Redis after {killed_at} records; run 1 ended with {:?} after {} distinct records",
        result.as_ref().map_err(|e| e.to_string()),
        distinct.load(Ordering::SeqCst)
    );
    if let Err(err) = &result {
        // A clear error: from the Redis store, retryable, naming the shard.
        let store_error =
            std::iter::successors(Some(err as &(dyn std::error::Error + 'static)), |e| {
                e.source()
            })
            .find_map(|e| e.downcast_ref::<StoreError>())
            .unwrap_or_else(|| panic!("run 1 failed, but not with a store error: {err}"));
        assert!(store_error.is_retryable(), "{store_error}");
        let text = err.to_string();
        assert!(
            text.contains("redis") && text.contains("shardId-"),
            "{text}"
        );
    }

    // Nothing acknowledged was lost across the kill: every checkpoint seen before it is
    // still covered.
    let after = RedisStore::connect(&server.url())
        .await
        .unwrap()
        .list(&namespace)
        .await
        .unwrap();
    let after: BTreeMap<String, Checkpoint> = after.into_iter().collect();
    for (shard, h) in &before_kill {
        let last = h.last().unwrap();
        assert!(
            after.get(shard).is_some_and(|now| now >= last),
            "shard {shard}: checkpoint {last} before the kill, {:?} after the restart",
            after.get(shard)
        );
    }

    // Run 2 on the restarted server: resumes from the checkpoints and sees everything.
    let consumer = consumer_for(RedisStore::connect(&server.url()).await.unwrap());
    let stop = CancellationToken::new();
    if distinct.load(Ordering::SeqCst) == TOTAL {
        stop.cancel();
    }
    let service = service_for(&consumer, stop.clone(), TOTAL);
    tokio::time::timeout(
        Duration::from_secs(120),
        consumer.run_until(service, stop.cancelled_owned()),
    )
    .await
    .expect("run 2 ends")
    .expect("run 2 ends cleanly");
    watching.cancel();
    watcher.await.unwrap();

    let missing: Vec<usize> = {
        let seen = seen.lock().unwrap();
        (0..TOTAL).filter(|&i| seen[i] == 0).collect()
    };
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    // No checkpoint ever moved backwards, as the watcher saw them.
    for (shard, h) in history.lock().unwrap().iter() {
        assert!(
            h.windows(2).all(|w| w[0] < w[1]),
            "shard {shard}: checkpoints went backwards: {h:?}"
        );
    }
    let shards: BTreeSet<String> = history.lock().unwrap().keys().cloned().collect();
    assert_eq!(
        shards.len(),
        SHARDS as usize,
        "checkpoints of every shard: {shards:?}"
    );
    RedisStore::connect(&server.url())
        .await
        .unwrap()
        .delete_namespace(&namespace)
        .await
        .unwrap();
    common::delete_stream(&kinesis.client, &stream).await;
    result.is_err()
}
