//! What a restart resumes from: the durable start position, the start position's scope, and
//! what the store and the listing must agree on.

use super::*;
use crate::store::BufferedStore;
use kinesis_tower_layers::testing::FaultyStore;

fn failing_first_batch(
    seen: &Seen,
) -> impl tower::Service<Batch, Response = (), Error = BoxError, Future = impl Send> + Clone {
    let seen = seen.clone();
    service_fn(move |batch: Batch| {
        seen.take(&batch);
        async move {
            if batch.is_empty() {
                Ok(())
            } else {
                Err::<(), BoxError>("the handler fails".into())
            }
        }
    })
}

/// A buffered store that writes only when flushed: what was not flushed is lost with the
/// process.
fn never_flushing_store() -> Arc<BufferedStore<MemoryStore>> {
    Arc::new(BufferedStore::new(MemoryStore::new()).flush_interval(Duration::from_secs(3600)))
}

/// `start` gives the start position at each start, as a program computes it when it starts.
async fn restart_resumes_where_the_first_run_started(start: impl Fn() -> StartPosition) {
    let kinesis = MemoryKinesis::default();
    kinesis.add_shard("p", &[]);
    let store = never_flushing_store();
    let consumer = builder(&kinesis)
        .store_arc(store.clone())
        .start_position(start())
        .build()
        .unwrap();
    let seen = Seen::default();
    let run = Running::checkpointed(&consumer, failing_first_batch(&seen));
    wait_for(Duration::from_secs(5), || {
        kinesis.get_records_calls("p") > 0
    })
    .await;
    let first = kinesis.put("p", "k", "first");
    let outcome = tokio::time::timeout(Duration::from_secs(10), run.task)
        .await
        .expect("run ends")
        .unwrap();
    assert!(matches!(outcome, Err(Error::Handler { .. })), "{outcome:?}");
    assert_eq!(seen.count(), 1, "the first record was delivered");
    // While nothing runs: more records, and the shard is split.
    let second = kinesis.put("p", "k", "second");
    kinesis.close_shard("p");
    kinesis.add_shard("c", &["p"]);
    let child = kinesis.put("c", "k", "child");

    let consumer = builder(&kinesis)
        .store_arc(store.clone())
        .start_position(start())
        .build()
        .unwrap();
    let seen = Seen::default();
    let run = Running::checkpointed(&consumer, seen.handler());
    wait_for(Duration::from_secs(20), || seen.of("c").len() == 1).await;
    run.stop().await.unwrap();
    assert_eq!(
        seen.of("p"),
        vec![first, second],
        "the parent from where it started"
    );
    assert_eq!(seen.of("c"), vec![child]);
}

/// A shard started at LATEST whose first batch failed: the restart resumes at the record the
/// first run started with, not at the new LATEST (which would lose every record of the test).
#[tokio::test(start_paused = true)]
async fn a_restart_at_latest_resumes_where_the_first_run_started() {
    restart_resumes_where_the_first_run_started(|| StartPosition::Latest).await;
}

/// The same for a timestamp that a program computes at each start ("the last minute").
#[tokio::test(start_paused = true)]
async fn a_restart_at_a_timestamp_resumes_where_the_first_run_started() {
    // Kinesis compares with its clock; the in-memory one stamps records with the wall clock,
    // which paused time does not move: step "now" by hand.
    let calls = AtomicU64::new(0);
    let now = || {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        StartPosition::AtTimestamp(std::time::SystemTime::now() + Duration::from_secs(60 * n))
    };
    restart_resumes_where_the_first_run_started(now).await;
}

/// The sequence-number start position applies only where a shard has no checkpoint: once its
/// shard was read (and has a checkpoint) and has expired, restarts go on.
#[tokio::test(start_paused = true)]
async fn a_sequence_start_position_is_not_checked_again_once_its_shard_has_a_checkpoint() {
    let kinesis = MemoryKinesis::default();
    kinesis.add_shard("p", &[]);
    let first = kinesis.put("p", "k", "a");
    kinesis.put("p", "k", "b");
    let api = Faulty::new(&kinesis);
    let store = Arc::new(MemoryStore::new());
    let consumer = api
        .consumer()
        .store_arc(store.clone())
        .start_position(StartPosition::AfterSequenceNumber {
            shard_id: "p".into(),
            sequence_number: first,
        })
        .build()
        .unwrap();
    let seen = Seen::default();
    let run = Running::checkpointed(&consumer, seen.handler());
    wait_for(Duration::from_secs(10), || seen.count() == 1).await;
    run.stop().await.unwrap();
    // The shard is split, and later expires.
    kinesis.close_shard("p");
    kinesis.add_shard("c", &["p"]);
    api.expire("p");
    let run = Running::checkpointed(&consumer, seen.handler());
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!run.task.is_finished(), "{:?}", run.task.await);
    run.stop().await.unwrap();
}

/// A stored SHARD_END for a shard the listing shows open (the stream was deleted and re-created
/// under the same name): an error naming the shard and namespace, never a silent skip.
#[tokio::test(start_paused = true)]
async fn a_stored_shard_end_for_an_open_shard_is_an_error_naming_it() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.put(&shard_name(0), "k", "v");
    let store = Arc::new(MemoryStore::new());
    let consumer = builder(&kinesis).store_arc(store.clone()).build().unwrap();
    store
        .set(consumer.namespace(), &shard_name(0), Checkpoint::ShardEnd)
        .await
        .unwrap();
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        consumer.run(Seen::default().handler()),
    )
    .await
    .expect("run ends");
    let error = outcome.unwrap_err();
    assert!(
        matches!(&error, Error::EndedShardIsOpen { shard, namespace, .. }
            if *shard == shard_name(0) && namespace == consumer.namespace()),
        "{error:?}"
    );
    assert!(!error.is_retryable());
    assert!(
        error.to_string().contains("app_name"),
        "says what to do: {error}"
    );
}

/// A store read that fails is retried by the store (once per failure), not again by the reader
/// around it.
#[tokio::test(start_paused = true)]
async fn a_failing_checkpoint_read_is_tried_once_by_the_consumer() {
    let kinesis = MemoryKinesis::with_shards(1);
    let store = Arc::new(FaultyStore::new());
    store.fail_reads(true);
    let consumer = builder(&kinesis).store_arc(store.clone()).build().unwrap();
    let outcome = tokio::time::timeout(
        Duration::from_secs(60),
        consumer.run(Seen::default().handler()),
    )
    .await
    .expect("run ends");
    assert!(matches!(outcome, Err(Error::Store { .. })), "{outcome:?}");
    assert_eq!(store.reads(), 1);
}

/// A source that answers more records than asked cannot overrun the buffer: the reader keeps
/// what it asked for and reads on after it, losing nothing.
#[tokio::test(start_paused = true)]
async fn more_records_than_asked_are_clamped_and_nothing_is_lost() {
    let kinesis = MemoryKinesis::with_shards(1);
    for i in 0..100 {
        kinesis.put(&shard_name(0), &format!("k{i}"), "v");
    }
    let mut api = Faulty::new(&kinesis);
    api.ignores_limit = true;
    let consumer = api
        .consumer()
        .max_records_per_call(10)
        .buffer_records(10)
        .build()
        .unwrap();
    let seen = Seen::default();
    let largest = Arc::new(AtomicU64::new(0));
    let handler = {
        let (seen, largest) = (seen.clone(), largest.clone());
        service_fn(move |batch: Batch| {
            largest.fetch_max(batch.len() as u64, Ordering::SeqCst);
            seen.take(&batch);
            async { Ok::<_, BoxError>(()) }
        })
    };
    let run = Running::start(&consumer, handler);
    wait_for(Duration::from_secs(60), || seen.count() == 100).await;
    run.stop().await.unwrap();
    assert_eq!(seen.of(&shard_name(0)), sequences(&kinesis, &shard_name(0)));
    assert!(
        largest.load(Ordering::SeqCst) <= 10,
        "a batch of {} records",
        largest.load(Ordering::SeqCst)
    );
}

/// With `records()`, a closed shard's children come only after its last record was committed
/// (its SHARD_END durable): a restart can never read the parent's tail after the children.
#[tokio::test(start_paused = true)]
async fn records_children_wait_until_the_parents_last_record_is_committed() {
    let kinesis = MemoryKinesis::default();
    kinesis.add_shard("p", &[]);
    kinesis.put("p", "k", "p0");
    let last = kinesis.put("p", "k", "p1");
    kinesis.close_shard("p");
    kinesis.add_shard("c", &["p"]);
    kinesis.put("c", "k", "child");
    let store = Arc::new(MemoryStore::new());
    let consumer = builder(&kinesis).store_arc(store.clone()).build().unwrap();
    let mut stream = consumer.records();
    let mut records = Vec::new();
    for _ in 0..2 {
        records.push(stream.next().await.unwrap());
    }
    assert_eq!(records[1].sequence_number, last);
    let early = tokio::time::timeout(Duration::from_secs(60), stream.next()).await;
    assert!(
        early.is_err(),
        "a child record came before the parent's end was committed: {early:?}"
    );
    stream.checkpointer().commit_all(&records).await.unwrap();
    let child = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the child starts once the parent is committed")
        .unwrap();
    assert_eq!(child.shard_id.as_str(), "c");
    stream.shutdown().await.unwrap();
    assert_eq!(
        store.snapshot(consumer.namespace()).get("p"),
        Some(&Checkpoint::ShardEnd)
    );
}

/// A parent's SHARD_END that cannot be made durable (the flush fails) keeps its children from
/// starting and ends the run.
#[tokio::test(start_paused = true)]
async fn a_child_does_not_start_when_its_parents_end_cannot_be_flushed() {
    let kinesis = closed_parent_with_child();
    let store = FaultyStore::new();
    store.fail_flushes(true);
    let consumer = builder(&kinesis).store(store).build().unwrap();
    let seen = Seen::default();
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        consumer.run(CheckpointLayer::new(consumer.checkpointer()).layer(seen.handler())),
    )
    .await
    .expect("run ends");
    assert!(matches!(outcome, Err(Error::Store { .. })), "{outcome:?}");
    assert_eq!(seen.of("p").len(), 1);
    assert!(
        seen.of("c").is_empty(),
        "the child started before its parent's end was durable"
    );
}

/// A shard started at LATEST that read nothing before the process died: where it started is
/// durable all the same (in time), so the records put since, and the children of a split made
/// while nothing ran (after their parent), all come after the restart.
#[tokio::test(start_paused = true)]
async fn a_latest_start_that_read_nothing_before_a_crash_is_durable_too() {
    let kinesis = MemoryKinesis::default();
    kinesis.add_shard("p", &[]);
    let store = never_flushing_store();
    let consumer = builder(&kinesis)
        .store_arc(store.clone())
        .start_position(StartPosition::Latest)
        .build()
        .unwrap();
    let run = Running::checkpointed(&consumer, Seen::default().handler());
    wait_for(Duration::from_secs(5), || {
        kinesis.get_records_calls("p") > 1
    })
    .await;
    // The process dies: no drain, no final flush.
    run.task.abort();
    let _ = run.task.await;
    let put_while_down = kinesis.put("p", "k", "while down");
    kinesis.close_shard("p");
    kinesis.add_shard("c", &["p"]);
    let child = kinesis.put("c", "k", "child");

    let seen = Seen::default();
    let run = Running::checkpointed(&consumer, seen.handler());
    wait_for(Duration::from_secs(20), || seen.of("c").len() == 1).await;
    run.stop().await.unwrap();
    assert_eq!(seen.of("p"), vec![put_while_down]);
    assert_eq!(seen.of("c"), vec![child]);
}
