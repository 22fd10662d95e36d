//! `Consumer::run` and `Consumer::process` over the in-memory Kinesis: every record once and in
//! shard order, the checkpoints (`process` writes them, `run` alone does not), the bounded
//! buffer, the pacing of GetRecords calls, heartbeats, ListShards pages, and the configuration
//! checks. Time is paused: sleeps complete as soon as every task is idle.

mod faults;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::kinesis::memory::{shard_name, MemoryKinesis, Operation};
use kinesis_tower::kinesis::KinesisErrorKind;
use kinesis_tower::store::MemoryStore;
use kinesis_tower::testing::{builder, sequences, wait_for, Running, Seen};
use kinesis_tower::{Batch, BoxError, Checkpoint, CheckpointStore, ShardId};
use kinesis_tower::{Consumer, ConsumerBuilder, Error};
use tower::{service_fn, Layer};

use faults::FaultyKinesis;

#[tokio::test(start_paused = true)]
async fn run_delivers_every_record_once_in_shard_order_and_checkpoints() {
    let kinesis = MemoryKinesis::with_shards(4);
    kinesis.fill(2_500, 10);
    let store = Arc::new(MemoryStore::new());
    let consumer = builder(&kinesis)
        .store_arc(store.clone())
        .max_records_per_call(1_000)
        .build()
        .unwrap();
    let seen = Seen::default();
    let service = CheckpointLayer::new(consumer.checkpointer()).layer(seen.handler());
    let run = Running::start(&consumer, service);
    wait_for(Duration::from_secs(60), || seen.count() == 10_000).await;
    run.stop().await.unwrap();
    for i in 0..4 {
        let shard = shard_name(i);
        assert_eq!(
            seen.of(&shard),
            sequences(&kinesis, &shard),
            "shard {shard}"
        );
        let last = *sequences(&kinesis, &shard).last().unwrap();
        assert_eq!(
            store.get(consumer.namespace(), &shard).await.unwrap(),
            Some(Checkpoint::at(last))
        );
    }
    // Every shard still being read was told about the shutdown.
    assert_eq!(seen.ends().len(), 4);
}

#[tokio::test(start_paused = true)]
async fn process_checkpoints_each_batch_after_the_handler_succeeded() {
    let kinesis = MemoryKinesis::with_shards(2);
    kinesis.fill(20, 10);
    let store = Arc::new(MemoryStore::new());
    let consumer = builder(&kinesis).store_arc(store.clone()).build().unwrap();
    let seen = Seen::default();
    let run = Running::checkpointed(&consumer, seen.handler());
    wait_for(Duration::from_secs(60), || seen.count() == 40).await;
    run.stop().await.unwrap();
    for i in 0..2 {
        let shard = shard_name(i);
        assert_eq!(
            store.get(consumer.namespace(), &shard).await.unwrap(),
            Some(kinesis.records(&shard).last().unwrap().checkpoint()),
            "{shard}"
        );
    }
}

/// The same handler under `run_until` checkpoints nothing: the trap `process` removes.
#[tokio::test(start_paused = true)]
async fn run_without_checkpoint_layer_writes_no_record_checkpoint() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.fill(5, 10);
    let store = Arc::new(MemoryStore::new());
    let consumer = builder(&kinesis).store_arc(store.clone()).build().unwrap();
    let seen = Seen::default();
    let run = Running::start(&consumer, seen.handler());
    wait_for(Duration::from_secs(60), || seen.count() == 5).await;
    run.stop().await.unwrap();
    assert_eq!(consumer.checkpointer().progress_writes(), 0);
}

/// A handler failure under `process`: the failed batch is not checkpointed.
#[tokio::test(start_paused = true)]
async fn process_leaves_a_failed_batch_unchecked() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.fill(3, 10);
    let store = Arc::new(MemoryStore::new());
    let consumer = builder(&kinesis).store_arc(store.clone()).build().unwrap();
    let failing = service_fn(|_batch: Batch| async { Err::<(), BoxError>("boom".into()) });
    let outcome = consumer
        .process_until(failing, std::future::pending::<()>())
        .await;
    assert!(matches!(outcome, Err(Error::Handler { .. })), "{outcome:?}");
    let stored = store
        .get(consumer.namespace(), &shard_name(0))
        .await
        .unwrap();
    assert!(
        stored.is_none_or(|c| !c.is_progress()),
        "a failed batch was checkpointed: {stored:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn slow_handler_stops_fetching_instead_of_growing_the_buffer() {
    const CAP: u64 = 100;
    let kinesis = MemoryKinesis::with_shards(2);
    kinesis.fill(5_000, 100);
    let consumer = builder(&kinesis)
        .buffer_records(CAP as usize)
        .max_records_per_call(30)
        .build()
        .unwrap();
    let processed = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let worst = Arc::new(AtomicU64::new(0));
    let handler = {
        let (kinesis, processed, gate, worst) = (
            kinesis.clone(),
            processed.clone(),
            gate.clone(),
            worst.clone(),
        );
        service_fn(move |batch: Batch| {
            let (kinesis, processed, gate, worst) = (
                kinesis.clone(),
                processed.clone(),
                gate.clone(),
                worst.clone(),
            );
            async move {
                gate.acquire().await.unwrap().forget();
                // Everything fetched and not yet handled, over both shards.
                let outstanding = kinesis.records_served() - processed.load(Ordering::SeqCst);
                worst.fetch_max(outstanding, Ordering::SeqCst);
                processed.fetch_add(batch.len() as u64, Ordering::SeqCst);
                Ok::<_, BoxError>(())
            }
        })
    };
    let run = Running::start(&consumer, handler);
    // The handler is blocked: the readers fill their buffers, then stop.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        kinesis.records_served() <= 2 * CAP,
        "fetched {}",
        kinesis.records_served()
    );
    assert!(
        kinesis.records_served() >= CAP,
        "readers did fill their buffers"
    );
    // Let it go slowly; the bound holds all the way.
    for _ in 0..400 {
        gate.add_permits(1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let outstanding = kinesis.records_served() - processed.load(Ordering::SeqCst);
        assert!(outstanding <= 2 * CAP, "outstanding {outstanding}");
    }
    gate.add_permits(100_000);
    wait_for(Duration::from_secs(120), || {
        processed.load(Ordering::SeqCst) == 10_000
    })
    .await;
    run.stop().await.unwrap();
    assert!(worst.load(Ordering::SeqCst) <= 2 * CAP);
}

/// A source that answers more records than asked cannot overrun the buffer: the reader keeps
/// what it asked for and reads on after it, losing nothing.
#[tokio::test(start_paused = true)]
async fn more_records_than_asked_are_clamped_and_nothing_is_lost() {
    let kinesis = MemoryKinesis::with_shards(1);
    for i in 0..100 {
        kinesis.put(&shard_name(0), &format!("k{i}"), "v");
    }
    let mut api = FaultyKinesis::new(&kinesis);
    api.ignores_limit = true;
    let consumer = api
        .consumer()
        .max_records_per_call(10)
        .buffer_records(10)
        .build()
        .unwrap();
    let seen = Seen::default();
    let run = Running::start(&consumer, seen.handler());
    wait_for(Duration::from_secs(60), || seen.count() == 100).await;
    run.stop().await.unwrap();
    assert_eq!(seen.of(&shard_name(0)), sequences(&kinesis, &shard_name(0)));
    assert!(
        seen.largest_batch() <= 10,
        "a batch of {} records",
        seen.largest_batch()
    );
}

#[tokio::test(start_paused = true)]
async fn pacing_no_wait_while_behind_poll_interval_when_caught_up_never_over_5_calls_per_second() {
    let kinesis = MemoryKinesis::with_shards(2);
    // Shard 0 has a long backlog; shard 1 is empty (caught up).
    for i in 0..10_000 {
        kinesis.put(&shard_name(0), &format!("k{i}"), "x");
    }
    kinesis.inject(
        Some(&shard_name(0)),
        Operation::GetRecords,
        KinesisErrorKind::Throttled,
        3,
    );
    let consumer = builder(&kinesis)
        .max_records_per_call(10)
        .poll_interval(Duration::from_secs(1))
        .build()
        .unwrap();
    let run = Running::start(&consumer, Seen::default().handler());
    tokio::time::sleep(Duration::from_secs(10)).await;
    run.stop().await.unwrap();
    let behind = kinesis.get_records_calls(&shard_name(0));
    let idle = kinesis.get_records_calls(&shard_name(1));
    // At most one call per 200 ms, throttled calls included; close to that while behind.
    assert!(behind <= 51, "behind: {behind} calls in 10 s");
    assert!(
        behind >= 40,
        "behind: {behind} calls in 10 s; a shard that is behind must not wait"
    );
    // Caught up: one call per poll interval.
    assert!((9..=11).contains(&idle), "idle: {idle} calls in 10 s");
}

#[tokio::test(start_paused = true)]
async fn heartbeats_when_enabled_reach_idle_shards_at_most_once_per_interval() {
    let kinesis = MemoryKinesis::with_shards(2);
    let consumer = builder(&kinesis)
        .heartbeat_interval(Duration::from_secs(1))
        .build()
        .unwrap();
    let heartbeats = Arc::new(Mutex::new(HashMap::<ShardId, u64>::new()));
    let handler = {
        let heartbeats = heartbeats.clone();
        service_fn(move |batch: Batch| {
            if batch.is_empty() && batch.end.is_none() {
                *heartbeats
                    .lock()
                    .unwrap()
                    .entry(batch.shard_id)
                    .or_default() += 1;
            }
            async { Ok::<_, BoxError>(()) }
        })
    };
    let run = Running::start(&consumer, handler);
    tokio::time::sleep(Duration::from_secs(10)).await;
    run.stop().await.unwrap();
    let heartbeats = heartbeats.lock().unwrap().clone();
    for i in 0..2 {
        let n = heartbeats.get(shard_name(i).as_str()).copied().unwrap_or(0);
        assert!((8..=11).contains(&n), "shard {i}: {n} heartbeats in 10 s");
    }
}

#[tokio::test(start_paused = true)]
async fn list_shards_pagination_reads_every_page() {
    let kinesis = MemoryKinesis::with_shards(25);
    kinesis.fill(1, 10);
    let consumer = builder(&kinesis).list_shards_page_size(10).build().unwrap();
    let seen = Seen::default();
    let run = Running::start(&consumer, seen.handler());
    wait_for(Duration::from_secs(10), || seen.count() == 25).await;
    run.stop().await.unwrap();
}

#[test]
fn invalid_configuration_names_the_field() {
    let kinesis = MemoryKinesis::with_shards(1);
    let cases: Vec<(ConsumerBuilder, &str)> = vec![
        (
            builder(&kinesis).max_records_per_call(10_001),
            "max_records_per_call",
        ),
        (
            builder(&kinesis).max_records_per_call(0),
            "max_records_per_call",
        ),
        (builder(&kinesis).buffer_records(0), "buffer_records"),
        (
            builder(&kinesis).read_bytes_per_second(0),
            "read_bytes_per_second",
        ),
        (builder(&kinesis).stream_name("bad name!"), "stream_name"),
        (builder(&kinesis).app_name(""), "app_name"),
        (builder(&kinesis).stream_arn("not-an-arn"), "stream_arn"),
        (
            builder(&kinesis).list_shards_page_size(0),
            "list_shards_page_size",
        ),
        (
            builder(&kinesis).shard_refresh_interval(Duration::ZERO),
            "shard_refresh_interval",
        ),
        (
            Consumer::builder().kinesis_api(Arc::new(kinesis.clone())),
            "stream_name",
        ),
    ];
    for (b, field) in cases {
        match b.build() {
            Err(Error::Config { field: f, reason }) => {
                assert_eq!(f, field, "{reason}");
                assert!(!reason.is_empty());
            }
            other => panic!("{field}: expected a config error, got {other:?}"),
        }
    }
    let consumer = builder(&kinesis)
        .stream_arn("arn:aws:kinesis:us-east-1:123456789012:stream/orders")
        .build()
        .unwrap();
    assert_eq!(consumer.stream_name(), "orders");
    assert_eq!(consumer.namespace(), "tests/orders");
}
