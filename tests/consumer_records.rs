//! `Consumer::records`: one merged stream of every shard's records, committed through its
//! checkpointer; its shutdown handle (which returns the error), `records_until`, its drop, and a
//! restart under LATEST. Time is paused: sleeps complete as soon as every task is idle.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kinesis_tower::kinesis::memory::{shard_name, MemoryKinesis};
use kinesis_tower::store::{BufferedStore, MemoryStore};
use kinesis_tower::testing::{builder, sequences, wait_for};
use kinesis_tower::{Checkpoint, CheckpointStore, Record, SequenceNumber, ShardId};
use kinesis_tower::{Error, StartPosition};

#[tokio::test(start_paused = true)]
async fn records_stream_merges_shards_and_commits_through_the_checkpointer() {
    let kinesis = MemoryKinesis::with_shards(3);
    kinesis.fill(40, 10);
    let store = Arc::new(MemoryStore::new());
    let consumer = builder(&kinesis).store_arc(store.clone()).build().unwrap();
    // As users write it: no borrow of the stream, the handle keeps shutdown reachable.
    let records = consumer.records();
    let (checkpointer, stop) = (records.checkpointer(), records.shutdown_handle());
    let mut chunks = Box::pin(tokio_stream::StreamExt::chunks_timeout(
        records,
        25,
        Duration::from_secs(1),
    ));
    let mut seen: HashMap<ShardId, Vec<SequenceNumber>> = HashMap::new();
    let mut total = 0;
    while total < 120 {
        let chunk: Vec<Record> = chunks.next().await.unwrap();
        assert!(chunk.len() <= 25);
        checkpointer.commit_all(&chunk).await.unwrap();
        for r in &chunk {
            seen.entry(r.shard_id.clone())
                .or_default()
                .push(r.sequence_number);
        }
        total += chunk.len();
    }
    for i in 0..3 {
        let shard = shard_name(i);
        assert_eq!(seen[shard.as_str()], sequences(&kinesis, &shard));
        assert_eq!(
            store.get(consumer.namespace(), &shard).await.unwrap(),
            Some(kinesis.records(&shard).last().unwrap().checkpoint())
        );
    }
    // Checkpoints never move backwards, even if an old chunk is committed late.
    let first = kinesis.records(&shard_name(0))[0].clone();
    checkpointer.commit(&first).await.unwrap();
    assert_eq!(
        store
            .get(consumer.namespace(), &shard_name(0))
            .await
            .unwrap(),
        Some(kinesis.records(&shard_name(0)).last().unwrap().checkpoint())
    );
    stop.shutdown().await.unwrap();
    assert!(stop.is_stopped());
    // The stream, still alive in `chunks`, has ended.
    assert!(chunks.next().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn records_stream_ends_and_the_handle_returns_the_error() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.delete_stream();
    let consumer = builder(&kinesis).build().unwrap();
    let mut stream = consumer.records();
    let stop = stream.shutdown_handle();
    assert!(stream.next().await.is_none());
    let outcome = stop.shutdown().await;
    assert!(
        matches!(outcome, Err(Error::StreamNotFound { .. })),
        "{outcome:?}"
    );
    // The outcome went to the first caller; later calls only flush.
    stop.shutdown().await.unwrap();
}

/// `records_until`: the stream ends once the signal completes; what the user committed after
/// that is flushed by the handle.
#[tokio::test(start_paused = true)]
async fn records_until_ends_the_stream_on_the_signal_and_the_handle_flushes() {
    let kinesis = MemoryKinesis::with_shards(2);
    kinesis.fill(10, 10);
    let store =
        Arc::new(BufferedStore::new(MemoryStore::new()).flush_interval(Duration::from_secs(3600)));
    let consumer = builder(&kinesis).store_arc(store.clone()).build().unwrap();
    let (signal_tx, signal_rx) = tokio::sync::oneshot::channel::<()>();
    let records = consumer.records_until(signal_rx);
    let (checkpointer, stop) = (records.checkpointer(), records.shutdown_handle());
    let mut records = Box::pin(records);
    let mut seen = Vec::new();
    while seen.len() < 20 {
        seen.push(records.next().await.unwrap());
    }
    signal_tx.send(()).unwrap();
    // Ends without the stream being dropped or shut down by hand.
    assert!(records.next().await.is_none());
    checkpointer.commit_all(&seen).await.unwrap();
    assert_eq!(store.pending(), 2, "commits after the end are buffered");
    stop.shutdown().await.unwrap();
    assert_eq!(store.pending(), 0, "flushed by the handle");
    assert_eq!(store.inner().snapshot(consumer.namespace()).len(), 2);
}

/// shutdown() with batches queued in the handoff channel and a half-consumed batch returns,
/// and drop() stops every task.
#[tokio::test(start_paused = true)]
async fn records_shutdown_and_drop_with_queued_batches() {
    let kinesis = MemoryKinesis::with_shards(4);
    kinesis.fill(500, 10);
    let consumer = builder(&kinesis).max_records_per_call(100).build().unwrap();
    let tasks_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let mut stream = consumer.records();
    for _ in 0..3 {
        stream.next().await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::time::timeout(Duration::from_secs(5), stream.shutdown())
        .await
        .expect("shutdown returns")
        .unwrap();
    let mut stream = consumer.records();
    for _ in 0..3 {
        stream.next().await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(stream);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tasks_after = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    assert_eq!(tasks_after, tasks_before);
}

/// records() under LATEST: after a split, a child record yielded but not committed is delivered
/// again after a restart (the parent, from which nothing was delivered, is marked SHARD_END, so
/// the child restarts at TRIM_HORIZON rather than LATEST).
#[tokio::test(start_paused = true)]
async fn records_stream_restart_under_latest_redelivers_uncommitted_child_records() {
    let kinesis = MemoryKinesis::default();
    kinesis.add_shard("p", &[]);
    let store = Arc::new(MemoryStore::new());
    let consumer = builder(&kinesis)
        .store_arc(store.clone())
        .start_position(StartPosition::Latest)
        .build()
        .unwrap();
    let mut stream = consumer.records();
    wait_for(Duration::from_secs(5), || {
        kinesis.get_records_calls("p") > 0
    })
    .await;
    kinesis.close_shard("p");
    kinesis.add_shard("c", &["p"]);
    let put = kinesis.put("c", "k", "v");
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.sequence_number, put);
    // The process stops before the record is processed and committed.
    stream.shutdown().await.unwrap();
    let stored = store.snapshot(consumer.namespace());
    assert_eq!(
        stored.get("p"),
        Some(&Checkpoint::ShardEnd),
        "nothing of p was delivered"
    );
    assert_eq!(stored.get("c"), None);

    let mut stream = consumer.records();
    let again = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
    let redelivered = matches!(&again, Ok(Some(r)) if r.sequence_number == put);
    drop(stream);
    assert!(
        redelivered,
        "uncommitted record of child c never delivered again; iterator requests: {:?}",
        kinesis.iterator_requests()
    );
}
