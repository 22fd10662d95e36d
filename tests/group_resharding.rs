//! A split and a merge while three group workers share a stream (kinesis-mock on
//! 127.0.0.1:4570, which reports child shards; leases in PostgreSQL on 127.0.0.1:5432): every
//! record is handled, and each child's first record is handled after every record of its
//! parents, whichever workers read them.
#![cfg(all(feature = "dynamodb", feature = "postgres"))]

mod common;
mod group_common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::Shard;
use group_common::Backend;
use kinesis_tower::group::{ConsumerGroup, PostgresLeases};
use kinesis_tower::{service_fn, Batch, BoxError, Consumer, StartPosition};

fn range(shard: &Shard) -> (u128, u128) {
    let r = shard.hash_key_range().unwrap();
    (
        r.starting_hash_key().parse().unwrap(),
        r.ending_hash_key().parse().unwrap(),
    )
}

/// (order of handling, worker, shard, sequence number), for every record handled.
type Log = Arc<Mutex<Vec<(u64, String, String, String)>>>;

/// A running group worker: its group and its run.
struct Worker {
    group: ConsumerGroup,
    run: common::Running,
}

impl Worker {
    /// Worker `name` of `group` (Postgres leases: lease 3 s, listing every 100 ms) reading
    /// `stream` from `start`, logging each record it handles in `log`.
    async fn start(
        client: &aws_sdk_kinesis::Client,
        stream: &str,
        group: &str,
        name: &'static str,
        start: StartPosition,
        log: &Log,
    ) -> Self {
        static ORDER: AtomicU64 = AtomicU64::new(0);
        let leases = PostgresLeases::connect(&common::postgres_url(), group)
            .await
            .unwrap();
        leases.create_table().await.unwrap();
        let group = ConsumerGroup::builder(leases, name)
            .lease_duration(Duration::from_secs(3))
            .poll_interval(Duration::from_millis(100))
            .build()
            .unwrap();
        let consumer = Consumer::builder()
            .client(client.clone())
            .stream_name(stream)
            .start_position(start)
            .poll_interval(Duration::from_millis(100))
            .shard_refresh_interval(Duration::from_secs(1))
            .group(group.clone())
            .build()
            .unwrap();
        let log = log.clone();
        let handler = service_fn(move |batch: Batch| {
            let log = log.clone();
            async move {
                let mut log = log.lock().unwrap();
                for record in &batch.records {
                    log.push((
                        ORDER.fetch_add(1, Ordering::SeqCst),
                        name.to_owned(),
                        batch.shard_id.to_string(),
                        record.sequence_number.to_string(),
                    ));
                }
                Ok::<_, BoxError>(())
            }
        });
        let run = common::Running::start(&consumer, handler);
        Worker { group, run }
    }

    async fn stop(mut self) {
        self.run.stop().await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parents_are_read_before_children_across_workers() {
    let client = common::kinesis_mock_client().await;
    let stream = common::unique_stream_name("grp-reshard");
    common::create_stream(&client, &stream, 3).await;
    common::wait_for_stream_active(&client, &stream, Duration::from_secs(30)).await;
    let mut initial = common::list_all_shards(&client, &stream).await;
    initial.sort_by_key(|s| range(s).0);

    let group = common::unique_stream_name("kt-reshard");
    let log: Log = Arc::default();
    let mut workers = Vec::new();
    for name in ["a", "b", "c"] {
        let start = StartPosition::TrimHorizon;
        workers.push(Worker::start(&client, &stream, &group, name, start, &log).await);
    }

    // Records with twenty keys, all the time.
    let produced: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let producing = Arc::new(AtomicBool::new(true));
    let producer = tokio::spawn({
        let (client, stream, produced, producing) = (
            client.clone(),
            stream.clone(),
            produced.clone(),
            producing.clone(),
        );
        async move {
            let mut n = 0u64;
            while producing.load(Ordering::SeqCst) {
                for key in 0..20 {
                    let out = client
                        .put_record()
                        .stream_name(&stream)
                        .partition_key(format!("k{key}"))
                        .data(Blob::new(n.to_string()))
                        .send()
                        .await
                        .expect("put a record");
                    produced
                        .lock()
                        .unwrap()
                        .push((out.shard_id().to_owned(), out.sequence_number().to_owned()));
                    n += 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let handled_some = |log: &Log| log.lock().unwrap().len() > 50;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !handled_some(&log) {
        assert!(Instant::now() < deadline, "nothing handled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (start, end) = range(&initial[0]);
    client
        .split_shard()
        .stream_name(&stream)
        .shard_to_split(initial[0].shard_id())
        .new_starting_hash_key((start + (end - start) / 2 + 1).to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("SplitShard: {}", common::error_chain(e)));
    common::wait_for_stream_active(&client, &stream, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    client
        .merge_shards()
        .stream_name(&stream)
        .shard_to_merge(initial[1].shard_id())
        .adjacent_shard_to_merge(initial[2].shard_id())
        .send()
        .await
        .unwrap_or_else(|e| panic!("MergeShards: {}", common::error_chain(e)));
    common::wait_for_stream_active(&client, &stream, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    producing.store(false, Ordering::SeqCst);
    producer.await.unwrap();

    let produced = produced.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let handled: std::collections::HashSet<(String, String)> = log
            .lock()
            .unwrap()
            .iter()
            .map(|(_, _, shard, seq)| (shard.clone(), seq.clone()))
            .collect();
        let missing = produced.iter().filter(|r| !handled.contains(*r)).count();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} records never handled",
            produced.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for worker in workers {
        worker.stop().await;
    }

    let all = common::list_all_shards(&client, &stream).await;
    let log = log.lock().unwrap().clone();
    // The first time each record was handled; per shard, the first and last such moment.
    let mut first_seen: HashMap<(String, String), u64> = HashMap::new();
    for (at, _, shard, seq) in &log {
        first_seen
            .entry((shard.clone(), seq.clone()))
            .or_insert(*at);
    }
    let mut span: HashMap<String, (u64, u64)> = HashMap::new();
    for ((shard, _), at) in &first_seen {
        let entry = span.entry(shard.clone()).or_insert((u64::MAX, 0));
        entry.0 = entry.0.min(*at);
        entry.1 = entry.1.max(*at);
    }
    let mut children = 0;
    for child in &all {
        let parents: Vec<&str> = [child.parent_shard_id(), child.adjacent_parent_shard_id()]
            .into_iter()
            .flatten()
            .collect();
        let Some(&(child_first, _)) = span.get(child.shard_id()) else {
            continue;
        };
        for parent in parents {
            if let Some(&(_, parent_last)) = span.get(parent) {
                children += 1;
                assert!(
                    parent_last < child_first,
                    "child {} read (at {child_first}) before its parent {parent} was finished (last at {parent_last})",
                    child.shard_id()
                );
            }
        }
    }
    assert!(
        children >= 3,
        "two split children and one merged child were read: {span:?}"
    );
    let workers: std::collections::HashSet<&str> =
        log.iter().map(|(_, w, _, _)| w.as_str()).collect();
    eprintln!(
        "reshard across workers: {} records handled by {workers:?}",
        log.len()
    );
    Backend::Postgres.drop_leases(&group).await;
    common::delete_stream(&client, &stream).await;
}

/// At `LATEST`, a closed parent needs no reading: the group marks its lease finished, so its
/// children are claimable and read (a parent lease left unfinished would hold them forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_of_a_parent_skipped_at_latest_are_read() {
    let client = common::kinesis_mock_client().await;
    let stream = common::unique_stream_name("grp-latest");
    common::create_stream(&client, &stream, 1).await;
    common::wait_for_stream_active(&client, &stream, Duration::from_secs(30)).await;
    let parent = common::list_all_shards(&client, &stream).await.remove(0);
    let (start, end) = range(&parent);
    client
        .split_shard()
        .stream_name(&stream)
        .shard_to_split(parent.shard_id())
        .new_starting_hash_key((start + (end - start) / 2 + 1).to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("SplitShard: {}", common::error_chain(e)));
    common::wait_for_stream_active(&client, &stream, Duration::from_secs(30)).await;

    let group_name = common::unique_stream_name("kt-latest");
    let log: Log = Arc::default();
    let worker = Worker::start(
        &client,
        &stream,
        &group_name,
        "a",
        StartPosition::Latest,
        &log,
    )
    .await;
    let group = worker.group.clone();
    // Both children held (their starts at LATEST are durable once read), then records.
    let deadline = Instant::now() + Duration::from_secs(30);
    while group.held().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the children were never claimed: held {:?}",
            group.held()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut put = Vec::new();
    for n in 0..20 {
        let out = client
            .put_record()
            .stream_name(&stream)
            .partition_key(format!("k{n}"))
            .data(Blob::new(n.to_string()))
            .send()
            .await
            .unwrap();
        put.push(out.sequence_number().to_owned());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let missing = {
            let log = log.lock().unwrap();
            put.iter()
                .filter(|s| !log.iter().any(|(_, _, _, seq)| seq == *s))
                .count()
        };
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of 20 records never read"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.stop().await;
    Backend::Postgres.drop_leases(&group_name).await;
    common::delete_stream(&client, &stream).await;
}
