//! What a restart resumes from: the checkpoint, the durable start position, the start
//! position's scope, a checkpoint inside a KPL aggregate, and what the store and the listing must
//! agree on. Time is paused: sleeps complete as soon as every task is idle.

mod faults;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::kinesis::memory::{shard_name, MemoryKinesis};
use kinesis_tower::store::{BufferedStore, MemoryStore};
use kinesis_tower::testing::{
    builder, closed_parent_with_child, sequences, wait_for, FaultyStore, Running, Seen,
};
use kinesis_tower::{Batch, BoxError, Checkpoint, CheckpointStore};
use kinesis_tower::{Error, StartPosition};
use tower::{service_fn, Layer, ServiceBuilder};

use faults::FaultyKinesis;

#[tokio::test(start_paused = true)]
async fn restart_resumes_after_the_checkpoint() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.fill(100, 10);
    let store = Arc::new(MemoryStore::new());
    let first = sequences(&kinesis, &shard_name(0));
    let checkpoint = first[41];
    store
        .set(
            "tests/test-stream",
            &shard_name(0),
            Checkpoint::at(checkpoint),
        )
        .await
        .unwrap();
    let consumer = builder(&kinesis).store_arc(store).build().unwrap();
    let seen = Seen::default();
    let run = Running::start(&consumer, seen.handler());
    wait_for(Duration::from_secs(10), || seen.count() == 58).await;
    run.stop().await.unwrap();
    assert_eq!(seen.of(&shard_name(0)), first[42..].to_vec());
}

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
    let outcome = tokio::time::timeout(Duration::from_secs(10), run.join())
        .await
        .expect("run ends");
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
    let api = FaultyKinesis::new(&kinesis);
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
    assert!(!run.is_finished(), "{:?}", run.join().await);
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
    run.abort().await;
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

/// run() + CheckpointLayer under LATEST: the parent ends with SHARD_END, so after a restart the
/// child is read from TRIM_HORIZON and its unfinished record is delivered again.
#[tokio::test(start_paused = true)]
async fn control_run_mode_redelivers_uncommitted_child_records_under_latest() {
    let kinesis = MemoryKinesis::default();
    kinesis.add_shard("p", &[]);
    let store = Arc::new(MemoryStore::new());
    let consumer = builder(&kinesis)
        .store_arc(store.clone())
        .start_position(StartPosition::Latest)
        .drain_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let hanging = service_fn(|batch: Batch| async move {
        if !batch.is_empty() {
            std::future::pending::<()>().await;
        }
        Ok::<_, BoxError>(())
    });
    let run = Running::start(
        &consumer,
        CheckpointLayer::new(consumer.checkpointer()).layer(hanging),
    );
    wait_for(Duration::from_secs(5), || {
        kinesis.get_records_calls("p") > 0
    })
    .await;
    kinesis.close_shard("p");
    kinesis.add_shard("c", &["p"]);
    let put = kinesis.put("c", "k", "v");
    wait_for(Duration::from_secs(10), || {
        kinesis.get_records_calls("c") > 0
    })
    .await;
    assert!(run.stop().await.is_err());
    let seen = Seen::default();
    let run = Running::start(
        &consumer,
        CheckpointLayer::new(consumer.checkpointer()).layer(seen.handler()),
    );
    wait_for(Duration::from_secs(10), || seen.count() == 1).await;
    run.stop().await.unwrap();
    assert_eq!(seen.of("c"), vec![put]);
}

/// Restarting from a checkpoint inside a KPL aggregate: the reader reads the aggregate again
/// and marks the first batch with records with the checkpoint, once; DeaggregateLayer then
/// drops the user records already processed.
#[tokio::test(start_paused = true)]
async fn restart_inside_an_aggregate_marks_the_first_batch_and_drops_processed_user_records() {
    use kinesis_tower::kpl::Aggregator;
    use kinesis_tower::kpl::DeaggregateLayer;

    let kinesis = MemoryKinesis::with_shards(1);
    let shard = shard_name(0);
    kinesis.put(&shard, "before", "plain");
    for a in 0..3 {
        let mut aggregator = Aggregator::new();
        for u in 0..10 {
            aggregator
                .add(&format!("k{u}"), None, format!("{a}-{u}"))
                .unwrap();
        }
        let aggregate = aggregator.finish().unwrap();
        kinesis.put(&shard, &aggregate.partition_key, aggregate.data);
    }
    let outer = sequences(&kinesis, &shard);
    let checkpoint = Checkpoint::Sequence {
        sequence_number: outer[2],
        sub_sequence_number: Some(3),
    };
    let store = Arc::new(MemoryStore::new());
    store
        .set("tests/test-stream", &shard, checkpoint)
        .await
        .unwrap();
    let consumer = builder(&kinesis)
        .store_arc(store)
        .max_records_per_call(1)
        .heartbeat_interval(Duration::from_millis(10))
        .build()
        .unwrap();

    let marks = Arc::new(Mutex::new(Vec::new()));
    let data = Arc::new(Mutex::new(Vec::new()));
    let handler = {
        let data = data.clone();
        service_fn(move |batch: Batch| {
            data.lock()
                .unwrap()
                .extend(batch.records.iter().map(|r| r.data.clone()));
            async { Ok::<_, BoxError>(()) }
        })
    };
    // What reaches the layer: records and marks, before deaggregation.
    let spy_marks = marks.clone();
    let spy = tower::layer::layer_fn(move |inner| {
        let marks = spy_marks.clone();
        tower::util::MapRequest::new(inner, move |batch: Batch| {
            marks
                .lock()
                .unwrap()
                .push((batch.len(), batch.resume_after));
            batch
        })
    });
    let service = ServiceBuilder::new()
        .layer(spy)
        .layer(DeaggregateLayer::new())
        .service(handler);
    let run = Running::start(&consumer, service);
    wait_for(Duration::from_secs(30), || data.lock().unwrap().len() == 16).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    run.stop().await.unwrap();

    let expected: Vec<String> = (4..10)
        .map(|u| format!("1-{u}"))
        .chain((0..10).map(|u| format!("2-{u}")))
        .collect();
    let got: Vec<String> = data
        .lock()
        .unwrap()
        .iter()
        .map(|d| String::from_utf8_lossy(d).into_owned())
        .collect();
    assert_eq!(got, expected);
    let marks = marks.lock().unwrap();
    let with_records: Vec<_> = marks.iter().filter(|(len, _)| *len > 0).collect();
    assert_eq!(with_records.len(), 2, "{marks:?}");
    assert_eq!(with_records[0].1, Some(checkpoint));
    assert_eq!(with_records[1].1, None);
    assert!(
        marks.iter().filter(|(_, mark)| mark.is_some()).count() == 1,
        "only the first batch with records is marked: {marks:?}"
    );
}
