//! Graceful shutdown: in-flight batches finish, checkpoints are flushed, no task is left, and
//! the drain timeout holds, also with a store that hangs. Time is paused: sleeps complete as soon
//! as every task is idle.

mod faults;

use std::sync::Arc;
use std::time::Duration;

use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::kinesis::memory::{shard_name, MemoryKinesis};
use kinesis_tower::store::MemoryStore;
use kinesis_tower::testing::{builder, Seen};
use kinesis_tower::Error;
use kinesis_tower::{Batch, BatchEnd, BoxError, Checkpoint, CheckpointStore};
use tokio_util::sync::CancellationToken;
use tower::{service_fn, Layer};

use faults::SlowStore;

#[tokio::test(start_paused = true)]
async fn shutdown_finishes_in_flight_work_flushes_and_leaves_no_task() {
    let kinesis = MemoryKinesis::with_shards(2);
    kinesis.fill(10, 10);
    let store = Arc::new(MemoryStore::new());
    let consumer = builder(&kinesis)
        .store_arc(store.clone())
        .max_records_per_call(10)
        .build()
        .unwrap();
    let tasks_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let seen = Seen::default();
    let started = Arc::new(tokio::sync::Notify::new());
    let handler = {
        let (seen, started) = (seen.clone(), started.clone());
        service_fn(move |batch: Batch| {
            let (seen, started) = (seen.clone(), started.clone());
            async move {
                if !batch.is_empty() {
                    started.notify_one();
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                seen.take(&batch);
                Ok::<_, BoxError>(())
            }
        })
    };
    let service = CheckpointLayer::new(consumer.checkpointer()).layer(handler);
    let stop = CancellationToken::new();
    let run = {
        let (consumer, stop) = (consumer.clone(), stop.clone());
        async move { consumer.run_until(service, stop.cancelled_owned()).await }
    };
    let trigger = async {
        started.notified().await;
        stop.cancel();
    };
    let (result, ()) = tokio::join!(run, trigger);
    result.unwrap();
    // The batches in flight when shutdown came were finished and checkpointed.
    let handled: u64 = seen.count();
    assert!(handled >= 10, "in-flight batch finished: {handled}");
    let checkpoints = store.snapshot(consumer.namespace());
    assert!(!checkpoints.is_empty());
    for (shard, checkpoint) in checkpoints {
        let seen_last = *seen.of(&shard).last().unwrap();
        assert_eq!(checkpoint, Checkpoint::at(seen_last));
    }
    assert!(seen.ends().iter().all(|(_, e)| *e == BatchEnd::Shutdown));
    let tasks_after = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    assert_eq!(tasks_after, tasks_before, "no task outlives run");
}

#[tokio::test(start_paused = true)]
async fn drain_timeout_is_reported() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.fill(1, 10);
    let consumer = builder(&kinesis)
        .drain_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let handler = service_fn(|batch: Batch| async move {
        if !batch.is_empty() {
            std::future::pending::<()>().await;
        }
        Ok::<_, BoxError>(())
    });
    let err = consumer
        .run_until(handler, tokio::time::sleep(Duration::from_secs(2)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::DrainTimeout { shards, .. } if shards == &[shard_name(0)]),
        "{err}"
    );
}

/// The final store flush has a deadline: with a store that hangs, run_until still returns.
#[tokio::test(start_paused = true)]
async fn shutdown_returns_within_the_drain_timeout_even_if_the_store_hangs() {
    let kinesis = MemoryKinesis::with_shards(1);
    let consumer = builder(&kinesis)
        .store(SlowStore::default())
        .drain_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let run = consumer.run_until(
        Seen::default().handler(),
        tokio::time::sleep(Duration::from_secs(1)),
    );
    let outcome = tokio::time::timeout(Duration::from_secs(300), run).await;
    assert!(
        outcome.is_ok(),
        "run_until still running 300 s after shutdown"
    );
}

/// drain_timeout(0) means "do not wait for in-flight batches": with nothing in flight the stop
/// is still clean, and the store is still flushed (here one whose flush takes a round trip, like
/// any buffered network or file store).
#[tokio::test(start_paused = true)]
async fn zero_drain_timeout_with_nothing_in_flight_is_a_clean_shutdown_that_flushes() {
    let kinesis = MemoryKinesis::with_shards(1);
    let stores: [Arc<dyn CheckpointStore>; 2] = [
        Arc::new(MemoryStore::new()),
        Arc::new(SlowStore {
            flush_delay: Some(Duration::from_millis(1)),
            ..SlowStore::default()
        }),
    ];
    for store in stores {
        let consumer = builder(&kinesis)
            .store_arc(store)
            .drain_timeout(Duration::ZERO)
            .build()
            .unwrap();
        let outcome = consumer
            .run_until(
                Seen::default().handler(),
                tokio::time::sleep(Duration::from_secs(1)),
            )
            .await;
        assert!(outcome.is_ok(), "{outcome:?}");
    }
}
