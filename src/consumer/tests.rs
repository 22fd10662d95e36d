//! Consumer behaviour against the in-memory Kinesis, with faults no emulator produces.
//! Time is paused: sleeps complete as soon as every task is idle.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kinesis_tower_layers::checkpoint::CheckpointLayer;
use kinesis_tower_layers::per_record::PerRecordLayer;
use kinesis_tower_layers::{
    Batch, BatchEnd, BoxError, Checkpoint, CheckpointStore, MemoryStore, Processed, Record,
    SequenceNumber, ShardId,
};
use tokio_util::sync::CancellationToken;
use tower::{service_fn, Layer, ServiceBuilder};

use crate::kinesis::memory::{shard_name, MemoryKinesis, Operation};
use crate::kinesis::{IteratorPosition, KinesisErrorKind};
use crate::{Consumer, ConsumerBuilder, Error, StartPosition};

fn builder(kinesis: &MemoryKinesis) -> ConsumerBuilder {
    Consumer::builder()
        .kinesis_api(Arc::new(kinesis.clone()))
        .stream_name("test-stream")
        .app_name("tests")
        .start_position(StartPosition::TrimHorizon)
}

/// What a handler saw: every record per shard, and every batch marker.
#[derive(Clone, Default)]
struct Seen {
    records: Arc<Mutex<HashMap<ShardId, Vec<SequenceNumber>>>>,
    order: Arc<Mutex<Vec<(ShardId, SequenceNumber)>>>,
    ends: Arc<Mutex<Vec<(ShardId, BatchEnd)>>>,
    count: Arc<AtomicU64>,
}

impl Seen {
    fn take(&self, batch: &Batch) {
        let mut records = self.records.lock().unwrap();
        let mut order = self.order.lock().unwrap();
        for r in &batch.records {
            records
                .entry(r.shard_id.clone())
                .or_default()
                .push(r.sequence_number);
            order.push((r.shard_id.clone(), r.sequence_number));
        }
        if let Some(end) = batch.end {
            self.ends
                .lock()
                .unwrap()
                .push((batch.shard_id.clone(), end));
        }
        self.count.fetch_add(batch.len() as u64, Ordering::SeqCst);
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    fn of(&self, shard: &str) -> Vec<SequenceNumber> {
        self.records
            .lock()
            .unwrap()
            .get(shard)
            .cloned()
            .unwrap_or_default()
    }

    fn handler(
        &self,
    ) -> impl tower::Service<Batch, Response = (), Error = BoxError, Future = impl Send> + Clone
    {
        let seen = self.clone();
        service_fn(move |batch: Batch| {
            seen.take(&batch);
            async { Ok::<_, BoxError>(()) }
        })
    }
}

/// A consumer running in the background until [`Running::stop`].
struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), Error>>,
}

impl Running {
    fn start<S>(consumer: &Consumer, service: S) -> Self
    where
        S: tower::Service<Batch> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
    {
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (consumer, stop) = (consumer.clone(), stop.clone());
            async move { consumer.run_until(service, stop.cancelled_owned()).await }
        });
        Self { stop, task }
    }

    /// Runs `service` under a `CheckpointLayer` of the consumer's checkpointer.
    fn checkpointed<S>(consumer: &Consumer, service: S) -> Self
    where
        S: tower::Service<Batch, Response = ()> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
    {
        Self::start(
            consumer,
            CheckpointLayer::new(consumer.checkpointer()).layer(service),
        )
    }

    /// Asks for a graceful shutdown and returns what `run_until` returned.
    async fn stop(self) -> Result<(), Error> {
        self.stop.cancel();
        self.task.await.expect("run task")
    }
}

fn sequences(kinesis: &MemoryKinesis, shard: &str) -> Vec<SequenceNumber> {
    kinesis
        .records(shard)
        .iter()
        .map(|r| r.sequence_number)
        .collect()
}

/// Shard `p`, closed, with one record, and its child `c` with one record.
fn closed_parent_with_child() -> MemoryKinesis {
    let kinesis = MemoryKinesis::default();
    kinesis.add_shard("p", &[]);
    kinesis.put("p", "k", "parent");
    kinesis.close_shard("p");
    kinesis.add_shard("c", &["p"]);
    kinesis.put("c", "k", "child");
    kinesis
}

/// Polls `cond` every 10 ms of (paused) time until it holds; panics after `limit`.
async fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

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
    assert_eq!(seen.ends.lock().unwrap().len(), 4);
}

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

#[tokio::test(start_paused = true)]
async fn throttling_backs_off_and_loses_nothing() {
    let kinesis = MemoryKinesis::with_shards(2);
    kinesis.fill(50, 10);
    kinesis.inject(
        Some(&shard_name(0)),
        Operation::GetRecords,
        KinesisErrorKind::Throttled,
        4,
    );
    let consumer = builder(&kinesis).max_records_per_call(10).build().unwrap();
    let seen = Seen::default();
    let started = tokio::time::Instant::now();
    let run = Running::start(&consumer, seen.handler());
    wait_for(Duration::from_secs(60), || seen.count() == 100).await;
    let elapsed = started.elapsed();
    run.stop().await.unwrap();
    assert_eq!(seen.of(&shard_name(0)), sequences(&kinesis, &shard_name(0)));
    // 4 throttles then 5 full reads: the throttled calls were retried, with backoff.
    assert!(kinesis.get_records_calls(&shard_name(0)) >= 9);
    assert!(
        elapsed >= Duration::from_millis(100 + 200 + 400 + 800),
        "{elapsed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn expired_iterator_resumes_after_the_last_record_read_not_the_checkpoint() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.fill(20, 10);
    let shard = shard_name(0);
    let all = sequences(&kinesis, &shard);
    // No CheckpointLayer: the checkpoint never moves, so a resume from the checkpoint would
    // replay from the start.
    let consumer = builder(&kinesis).max_records_per_call(5).build().unwrap();
    let seen = Seen::default();
    let kinesis_in_handler = kinesis.clone();
    let seen_in_handler = seen.clone();
    let handler = service_fn(move |batch: Batch| {
        seen_in_handler.take(&batch);
        if seen_in_handler.count() == 10 {
            kinesis_in_handler.expire_iterators();
        }
        async { Ok::<_, BoxError>(()) }
    });
    let run = Running::start(&consumer, handler);
    wait_for(Duration::from_secs(30), || seen.count() >= 20).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    run.stop().await.unwrap();
    assert_eq!(seen.of(&shard), all, "every record exactly once, in order");
    let requests = kinesis.iterator_requests();
    assert_eq!(requests[0].1, IteratorPosition::TrimHorizon);
    assert!(
        requests[1..].iter().any(
            |(_, p)| matches!(p, IteratorPosition::AfterSequenceNumber(s) if all[9..].contains(s))
        ),
        "renewed after a record read, not at the (empty) checkpoint: {requests:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn expired_latest_iterator_before_any_record_is_anchored_in_time() {
    let kinesis = MemoryKinesis::with_shards(1);
    let consumer = builder(&kinesis)
        .start_position(StartPosition::Latest)
        .build()
        .unwrap();
    let seen = Seen::default();
    let run = Running::start(&consumer, seen.handler());
    wait_for(Duration::from_secs(5), || {
        kinesis.get_records_calls(&shard_name(0)) > 0
    })
    .await;
    kinesis.expire_iterators();
    let put = kinesis.put(&shard_name(0), "k", "after the iterator was taken");
    wait_for(Duration::from_secs(5), || seen.count() == 1).await;
    run.stop().await.unwrap();
    assert_eq!(seen.of(&shard_name(0)), vec![put]);
    assert!(matches!(
        kinesis.iterator_requests()[1].1,
        IteratorPosition::AtTimestamp(_)
    ));
}

#[tokio::test(start_paused = true)]
async fn transient_failure_of_one_shard_does_not_stop_the_others() {
    let kinesis = MemoryKinesis::with_shards(3);
    kinesis.fill(30, 10);
    kinesis.inject(
        Some(&shard_name(1)),
        Operation::GetRecords,
        KinesisErrorKind::Transient,
        10,
    );
    let consumer = builder(&kinesis).build().unwrap();
    let seen = Seen::default();
    let run = Running::start(&consumer, seen.handler());
    wait_for(Duration::from_secs(5), || {
        seen.of(&shard_name(0)).len() == 30 && seen.of(&shard_name(2)).len() == 30
    })
    .await;
    assert!(
        seen.of(&shard_name(1)).is_empty(),
        "shard 1 is still failing"
    );
    // Shard 1 recovers once its faults are used up.
    wait_for(Duration::from_secs(120), || {
        seen.of(&shard_name(1)).len() == 30
    })
    .await;
    run.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn missing_stream_ends_run_with_a_clear_error() {
    let kinesis = MemoryKinesis::with_shards(2);
    kinesis.delete_stream();
    let consumer = builder(&kinesis).build().unwrap();
    let err = consumer.run(Seen::default().handler()).await.unwrap_err();
    assert!(matches!(err, Error::StreamNotFound { .. }), "{err:?}");
    assert!(!err.is_retryable());
    let message = err.to_string();
    assert!(
        message.contains("test-stream") && message.contains("create it"),
        "{message}"
    );
}

#[tokio::test(start_paused = true)]
async fn shard_not_found_while_still_listed_ends_run_naming_the_shard() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.fill(5, 10);
    let consumer = builder(&kinesis).build().unwrap();
    let seen = Seen::default();
    let kinesis_in_handler = kinesis.clone();
    let inner = seen.handler();
    let handler = tower::ServiceExt::map_request(inner, move |b: Batch| {
        if !b.is_empty() {
            kinesis_in_handler.inject(
                None,
                Operation::GetRecords,
                KinesisErrorKind::ResourceNotFound,
                1,
            );
        }
        b
    });
    let err = consumer.run(handler).await.unwrap_err();
    match &err {
        Error::ShardNotFound { shard, source, .. } => {
            assert_eq!(shard, &shard_name(0));
            assert_eq!(source.operation(), "GetRecords");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains(&shard_name(0)), "{err}");
    assert_eq!(seen.count(), 5);
}

#[tokio::test(start_paused = true)]
async fn stream_deleted_while_reading_ends_run_with_stream_not_found() {
    let kinesis = MemoryKinesis::with_shards(2);
    kinesis.fill(5, 10);
    let consumer = builder(&kinesis).build().unwrap();
    let seen = Seen::default();
    let kinesis_in_handler = kinesis.clone();
    let handler = tower::ServiceExt::map_request(seen.handler(), move |b: Batch| {
        if !b.is_empty() {
            kinesis_in_handler.delete_stream();
        }
        b
    });
    let err = consumer.run(handler).await.unwrap_err();
    assert!(matches!(&err, Error::StreamNotFound { .. }), "{err:?}");
    assert!(seen.count() >= 5);
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
    assert!(seen
        .ends
        .lock()
        .unwrap()
        .iter()
        .all(|(_, e)| *e == BatchEnd::Shutdown));
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

#[tokio::test(start_paused = true)]
async fn handler_error_ends_run_keeps_its_checkpoint_and_flushes_others() {
    let kinesis = MemoryKinesis::with_shards(2);
    kinesis.fill(20, 10);
    let store = Arc::new(MemoryStore::new());
    let consumer = builder(&kinesis)
        .store_arc(store.clone())
        .max_records_per_call(10)
        .build()
        .unwrap();
    let bad_shard = shard_name(1);
    let calls = Arc::new(AtomicU64::new(0));
    let handler = {
        let (bad_shard, calls) = (bad_shard.clone(), calls.clone());
        service_fn(move |batch: Batch| {
            let fail = *batch.shard_id == *bad_shard
                && !batch.is_empty()
                && calls.fetch_add(1, Ordering::SeqCst) == 1;
            async move {
                if fail {
                    return Err::<(), BoxError>("cannot write to the warehouse".into());
                }
                tokio::task::yield_now().await;
                Ok(())
            }
        })
    };
    let service = CheckpointLayer::new(consumer.checkpointer()).layer(handler);
    let err = consumer.run(service).await.unwrap_err();
    let records = kinesis.records(&bad_shard);
    match &err {
        Error::Handler {
            shard,
            first_sequence_number,
            last_sequence_number,
            ..
        } => {
            assert_eq!(shard, &bad_shard);
            assert_eq!(
                first_sequence_number.as_deref(),
                Some(records[10].sequence_number.to_string().as_str())
            );
            assert_eq!(
                last_sequence_number.as_deref(),
                Some(records[19].sequence_number.to_string().as_str())
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("cannot write to the warehouse"));
    // The failed batch is not checkpointed; the batch before it is.
    assert_eq!(
        store.get(consumer.namespace(), &bad_shard).await.unwrap(),
        Some(records[9].checkpoint())
    );
}

#[tokio::test(start_paused = true)]
async fn children_start_after_their_parents_and_parents_end_with_shard_end() {
    let kinesis = MemoryKinesis::default();
    kinesis.add_shard("parent-a", &[]);
    kinesis.add_shard("parent-b", &[]);
    for i in 0..30 {
        kinesis.put("parent-a", &format!("k{i}"), "a");
        kinesis.put("parent-b", &format!("k{i}"), "b");
    }
    kinesis.close_shard("parent-a");
    kinesis.close_shard("parent-b");
    // parent-a splits into two; both merge... into merged children of their own.
    kinesis.add_shard("child-a1", &["parent-a"]);
    kinesis.add_shard("merged", &["parent-a", "parent-b"]);
    for i in 0..10 {
        kinesis.put("child-a1", &format!("c{i}"), "c");
        kinesis.put("merged", &format!("m{i}"), "m");
    }
    let store = Arc::new(MemoryStore::new());
    let consumer = builder(&kinesis)
        .store_arc(store.clone())
        .max_records_per_call(7)
        .start_position(StartPosition::Latest)
        .build()
        .unwrap();
    // With LATEST, closed parents without checkpoints are skipped: only records put from now on.
    let seen = Seen::default();
    let service = CheckpointLayer::new(consumer.checkpointer()).layer(seen.handler());
    let run = Running::start(&consumer, service);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(seen.count(), 0, "LATEST: nothing old is read");
    run.stop().await.unwrap();

    // TRIM_HORIZON: parents first, in full, then children.
    let consumer = builder(&kinesis)
        .app_name("from-the-start")
        .store_arc(store.clone())
        .max_records_per_call(7)
        .build()
        .unwrap();
    let seen = Seen::default();
    let service = CheckpointLayer::new(consumer.checkpointer()).layer(seen.handler());
    let run = Running::start(&consumer, service);
    wait_for(Duration::from_secs(30), || seen.count() == 80).await;
    run.stop().await.unwrap();
    let order = seen.order.lock().unwrap().clone();
    let position = |shard: &str, first: bool| {
        let mut it = order
            .iter()
            .enumerate()
            .filter(|(_, (s, _))| &**s == shard)
            .map(|(i, _)| i);
        if first {
            it.next().unwrap()
        } else {
            it.next_back().unwrap()
        }
    };
    assert!(position("parent-a", false) < position("child-a1", true));
    assert!(position("parent-a", false) < position("merged", true));
    assert!(position("parent-b", false) < position("merged", true));
    for shard in ["parent-a", "parent-b", "child-a1", "merged"] {
        assert_eq!(seen.of(shard), sequences(&kinesis, shard), "{shard}");
    }
    assert_eq!(
        store.get(consumer.namespace(), "parent-a").await.unwrap(),
        Some(Checkpoint::ShardEnd)
    );
    assert!(seen
        .ends
        .lock()
        .unwrap()
        .contains(&(ShardId::from("parent-b"), BatchEnd::ShardEnd)));
}

#[tokio::test(start_paused = true)]
async fn tower_concurrency_limit_timeout_and_rate_limit_stack_with_ours() {
    let kinesis = MemoryKinesis::with_shards(4);
    kinesis.fill(25, 10);
    let store = Arc::new(MemoryStore::new());
    let consumer = builder(&kinesis)
        .store_arc(store.clone())
        .max_records_per_call(5)
        .build()
        .unwrap();
    let active = Arc::new(AtomicU64::new(0));
    let max_active = Arc::new(AtomicU64::new(0));
    let seen = Seen::default();
    let per_record = {
        let (active, max_active, seen) = (active.clone(), max_active.clone(), seen.clone());
        service_fn(move |record: Record| {
            let (active, max_active, seen) = (active.clone(), max_active.clone(), seen.clone());
            async move {
                let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                max_active.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
                seen.take(&Batch::new(record.shard_id.clone(), vec![record]));
                active.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, BoxError>(Processed::Checkpoint)
            }
        })
    };
    let service = ServiceBuilder::new()
        .layer(CheckpointLayer::new(consumer.checkpointer()))
        .concurrency_limit(2)
        .timeout(Duration::from_secs(5))
        .rate_limit(5, Duration::from_secs(1))
        .layer(PerRecordLayer::new())
        .service(per_record);
    let started = tokio::time::Instant::now();
    // `Running::start` spawns the run inside an async block: the run future is Send with
    // tower's layers in the stack.
    let run = Running::start(&consumer, service);
    wait_for(Duration::from_secs(60), || seen.count() == 100).await;
    let elapsed = started.elapsed();
    run.stop().await.unwrap();
    // ConcurrencyLimit(2): never more than two batches at once.
    assert!(max_active.load(Ordering::SeqCst) <= 2);
    // RateLimit(5 calls/s): 20 batches of 5 records need at least four windows.
    assert!(elapsed >= Duration::from_secs(3), "{elapsed:?}");
    for i in 0..4 {
        let shard = shard_name(i);
        assert_eq!(seen.of(&shard), sequences(&kinesis, &shard));
        assert_eq!(
            store.get(consumer.namespace(), &shard).await.unwrap(),
            Some(kinesis.records(&shard).last().unwrap().checkpoint())
        );
    }

    // Timeout: a handler that hangs ends the run with the timeout error, checkpoint unmoved.
    let hanging = service_fn(|batch: Batch| async move {
        if !batch.is_empty() {
            std::future::pending::<()>().await;
        }
        Ok::<_, BoxError>(())
    });
    let consumer = builder(&kinesis)
        .app_name("timeouts")
        .store_arc(store.clone())
        .build()
        .unwrap();
    let service = ServiceBuilder::new()
        .layer(CheckpointLayer::new(consumer.checkpointer()))
        .timeout(Duration::from_secs(1))
        .service(hanging);
    let err = consumer.run(service).await.unwrap_err();
    assert!(matches!(err, Error::Handler { .. }), "{err}");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(store.snapshot(consumer.namespace()).is_empty());
}

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
    let store = Arc::new(
        crate::store::BufferedStore::new(MemoryStore::new())
            .flush_interval(Duration::from_secs(3600)),
    );
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

#[tokio::test(start_paused = true)]
async fn unreachable_kinesis_at_start_is_an_error_but_later_listing_failures_are_not() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.inject(
        None,
        Operation::ListShards,
        KinesisErrorKind::Transient,
        1_000,
    );
    let consumer = builder(&kinesis).build().unwrap();
    let err = consumer.run(Seen::default().handler()).await.unwrap_err();
    assert!(
        matches!(&err, Error::Kinesis { shard: None, .. }),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert!(err.to_string().contains("ListShards"), "{err}");

    // Once the shards are known, a failing refresh leaves the readers alone.
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.fill(10, 10);
    let consumer = builder(&kinesis)
        .shard_refresh_interval(Duration::from_secs(1))
        .build()
        .unwrap();
    let seen = Seen::default();
    let run = Running::start(&consumer, seen.handler());
    wait_for(Duration::from_secs(5), || seen.count() == 10).await;
    kinesis.inject(
        None,
        Operation::ListShards,
        KinesisErrorKind::Transient,
        1_000,
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    kinesis.put(&shard_name(0), "k", "still read");
    wait_for(Duration::from_secs(5), || seen.count() == 11).await;
    run.stop().await.unwrap();
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

// Sources that fail in ways the in-memory Kinesis does not express.

/// A `KinesisApi` over the in-memory Kinesis with faults it cannot express by itself. Cheap to
/// clone (shared state).
#[derive(Clone, Default)]
struct Faulty {
    inner: MemoryKinesis,
    /// Expired shards: not listed any more; GetShardIterator and GetRecords answer
    /// ResourceNotFound.
    gone: Arc<Mutex<std::collections::HashSet<ShardId>>>,
    /// GetShardIterator on this shard panics.
    panics: Option<ShardId>,
    /// Kinesis's clock is this far behind ours (AT_TIMESTAMP is compared with its clock).
    server_clock_behind: Duration,
    /// ListShards answers this long after it took its snapshot (latency, many pages).
    list_delay: Duration,
    /// This many GetRecords calls, from the first, never answer.
    hanging_get_records: Arc<AtomicU64>,
    /// Records GetRecords returned, per shard.
    served: Arc<Mutex<HashMap<ShardId, u64>>>,
    /// GetRecords answers up to 10,000 records, whatever the limit asked.
    ignores_limit: bool,
}

impl Faulty {
    fn new(inner: &MemoryKinesis) -> Self {
        Self {
            inner: inner.clone(),
            ..Self::default()
        }
    }

    fn expire(&self, shard: &str) {
        self.gone.lock().unwrap().insert(shard.into());
    }

    fn is_gone(&self, shard: &ShardId) -> bool {
        self.gone.lock().unwrap().contains(shard)
    }

    fn served(&self, shard: &str) -> u64 {
        self.served.lock().unwrap().get(shard).copied().unwrap_or(0)
    }

    fn consumer(&self) -> ConsumerBuilder {
        Consumer::builder()
            .kinesis_api(Arc::new(self.clone()))
            .stream_name("test-stream")
            .start_position(StartPosition::TrimHorizon)
    }
}

fn not_found(operation: &'static str, shard: &ShardId) -> crate::kinesis::KinesisError {
    crate::kinesis::KinesisError::new(
        KinesisErrorKind::ResourceNotFound,
        operation,
        format!("Shard {shard} in stream test-stream does not exist"),
    )
}

impl crate::kinesis::KinesisApi for Faulty {
    fn list_shards<'a>(
        &'a self,
        stream: &'a crate::kinesis::StreamRef,
        next_token: Option<&'a str>,
        max_results: Option<i32>,
    ) -> futures::future::BoxFuture<
        'a,
        Result<crate::kinesis::ShardPage, crate::kinesis::KinesisError>,
    > {
        Box::pin(async move {
            let mut page = self
                .inner
                .list_shards(stream, next_token, max_results)
                .await?;
            page.shards.retain(|s| !self.is_gone(&s.shard_id));
            tokio::time::sleep(self.list_delay).await;
            Ok(page)
        })
    }

    fn get_shard_iterator<'a>(
        &'a self,
        stream: &'a crate::kinesis::StreamRef,
        shard_id: &'a ShardId,
        position: IteratorPosition,
    ) -> futures::future::BoxFuture<'a, Result<String, crate::kinesis::KinesisError>> {
        if self.is_gone(shard_id) {
            return Box::pin(async move { Err(not_found("GetShardIterator", shard_id)) });
        }
        if self.panics.as_ref() == Some(shard_id) {
            panic!("bug in a KinesisApi implementation");
        }
        let position = match position {
            // Our "now" is ahead of Kinesis's "now" by the skew.
            IteratorPosition::AtTimestamp(t) => {
                IteratorPosition::AtTimestamp(t + self.server_clock_behind)
            }
            other => other,
        };
        self.inner.get_shard_iterator(stream, shard_id, position)
    }

    fn get_records<'a>(
        &'a self,
        stream: &'a crate::kinesis::StreamRef,
        shard_id: &'a ShardId,
        iterator: &'a str,
        limit: i32,
    ) -> futures::future::BoxFuture<
        'a,
        Result<crate::kinesis::RecordsPage, crate::kinesis::KinesisError>,
    > {
        let hang = self
            .hanging_get_records
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        Box::pin(async move {
            if hang {
                std::future::pending::<()>().await;
            }
            if self.is_gone(shard_id) {
                return Err(not_found("GetRecords", shard_id));
            }
            let limit = if self.ignores_limit { 10_000 } else { limit };
            let page = self
                .inner
                .get_records(stream, shard_id, iterator, limit)
                .await?;
            *self
                .served
                .lock()
                .unwrap()
                .entry(shard_id.clone())
                .or_default() += page.records.len() as u64;
            Ok(page)
        })
    }
}

/// A store over `MemoryStore` whose writes and flushes take time, or never end.
#[derive(Default)]
struct SlowStore {
    inner: MemoryStore,
    /// Each write lands this long after it was issued (a network round trip).
    set_delay: Duration,
    /// How long a flush takes; `None`: it never returns (a hung back-end).
    flush_delay: Option<Duration>,
}

#[async_trait::async_trait]
impl CheckpointStore for SlowStore {
    async fn get(
        &self,
        namespace: &str,
        shard_id: &str,
    ) -> Result<Option<Checkpoint>, kinesis_tower_layers::StoreError> {
        self.inner.get(namespace, shard_id).await
    }

    async fn set(
        &self,
        namespace: &str,
        shard_id: &str,
        checkpoint: Checkpoint,
    ) -> Result<kinesis_tower_layers::checkpoint::SetOutcome, kinesis_tower_layers::StoreError>
    {
        tokio::time::sleep(self.set_delay).await;
        self.inner.set(namespace, shard_id, checkpoint).await
    }

    async fn flush(&self) -> Result<(), kinesis_tower_layers::StoreError> {
        match self.flush_delay {
            Some(delay) => tokio::time::sleep(delay).await,
            None => std::future::pending().await,
        }
        Ok(())
    }

    async fn list(
        &self,
        namespace: &str,
    ) -> Result<Vec<(String, Checkpoint)>, kinesis_tower_layers::StoreError> {
        self.inner.list(namespace).await
    }
}

/// Resharding between two listings (x splits into b and c, then a and b merge into m): a's
/// ChildShards names m with parents a and b; m waits until a listing shows b and b is read.
#[tokio::test(start_paused = true)]
async fn merge_child_waits_for_a_parent_created_after_the_last_listing() {
    let kinesis = MemoryKinesis::default();
    kinesis.add_shard("a", &[]);
    kinesis.add_shard("x", &[]);
    for i in 0..3 {
        kinesis.put("a", &format!("a{i}"), "a");
    }
    // x has a backlog, so it is still being read when a ends.
    for i in 0..2_000 {
        kinesis.put("x", &format!("x{i}"), "x");
    }
    let consumer = builder(&kinesis)
        .max_records_per_call(10)
        .shard_refresh_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let seen = Seen::default();
    let run = Running::start(
        &consumer,
        CheckpointLayer::new(consumer.checkpointer()).layer(seen.handler()),
    );
    wait_for(Duration::from_secs(5), || seen.of("a").len() == 3).await;
    // Between two listings: x splits into b and c; then a and b merge into m.
    kinesis.close_shard("x");
    kinesis.add_shard("b", &["x"]);
    kinesis.add_shard("c", &["x"]);
    kinesis.put("b", "key-1", "first");
    kinesis.close_shard("a");
    kinesis.close_shard("b");
    kinesis.add_shard("m", &["a", "b"]);
    kinesis.put("m", "key-1", "second");
    wait_for(Duration::from_secs(600), || {
        seen.of("b").len() == 1 && seen.of("m").len() == 1
    })
    .await;
    run.stop().await.unwrap();
    let order = seen.order.lock().unwrap().clone();
    let pos = |s: &str| order.iter().position(|(id, _)| &**id == s).unwrap();
    assert!(
        pos("b") < pos("m"),
        "child m handled (position {}) before its parent b (position {})",
        pos("m"),
        pos("b")
    );
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

/// A closed shard that expired (retention) between ListShards and GetShardIterator answers
/// ResourceNotFound and is no longer listed: it counts as finished, its child and the other
/// shards are read, and the run goes on.
#[tokio::test(start_paused = true)]
async fn a_trimmed_shard_does_not_stop_the_consumer() {
    let kinesis = MemoryKinesis::default();
    kinesis.add_shard("old", &[]);
    kinesis.close_shard("old");
    kinesis.add_shard("new", &["old"]);
    kinesis.add_shard("other", &[]);
    for i in 0..10 {
        kinesis.put("new", &format!("n{i}"), "n");
        kinesis.put("other", &format!("o{i}"), "o");
    }
    let api = Faulty::new(&kinesis);
    api.expire("old");
    let consumer = api.consumer().build().unwrap();
    let seen = Seen::default();
    let outcome = tokio::time::timeout(Duration::from_secs(30), consumer.run(seen.handler())).await;
    assert!(
        outcome.is_err() && seen.count() == 20,
        "run ended: {:?}; handled {} of 20",
        outcome.map(|r| r.map_err(|e| e.to_string())),
        seen.count()
    );
}

/// A panic in a reader task (here in the KinesisApi implementation) ends the run with
/// `Error::Task` instead of leaving its shard silently unread.
#[tokio::test(start_paused = true)]
async fn a_panicking_reader_ends_run_instead_of_silently_stalling_its_shard() {
    let kinesis = MemoryKinesis::with_shards(2);
    kinesis.fill(5, 10);
    let mut api = Faulty::new(&kinesis);
    api.panics = Some(shard_name(1).into());
    let consumer = api.consumer().build().unwrap();
    let seen = Seen::default();
    let outcome =
        tokio::time::timeout(Duration::from_secs(600), consumer.run(seen.handler())).await;
    assert!(
        matches!(outcome, Ok(Err(Error::Task { .. }))),
        "after 600 s: {:?}; shard 1 handled {} of 5 records",
        outcome.map(|r| r.map_err(|e| e.to_string())),
        seen.of(&shard_name(1)).len()
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

/// CheckpointLayer over PerRecordLayer over a per-record handler that answers SkipCheckpoint
/// for records whose data is `skip`.
fn skipping_handler(
    consumer: &Consumer,
    seen: &Seen,
) -> impl tower::Service<Batch, Error = BoxError, Future = impl Send> + Send + 'static {
    let seen = seen.clone();
    let per_record = service_fn(move |r: Record| {
        seen.take(&Batch::new(r.shard_id.clone(), vec![r.clone()]));
        async move {
            Ok::<_, BoxError>(if &r.data[..] == b"skip" {
                Processed::SkipCheckpoint
            } else {
                Processed::Checkpoint
            })
        }
    });
    ServiceBuilder::new()
        .layer(CheckpointLayer::new(consumer.checkpointer()))
        .layer(PerRecordLayer::new())
        .service(per_record)
}

/// A per-record handler that answers SkipCheckpoint for the last record of a closed shard: the
/// parent's end is not durable, so its children wait (as the KCL's do) until that record is
/// committed; then the parent becomes SHARD_END and the children start. A restart can never
/// read the parent's tail after its children's records.
#[tokio::test(start_paused = true)]
async fn skip_checkpoint_on_a_closed_shards_last_record_holds_the_children_until_committed() {
    let kinesis = MemoryKinesis::default();
    kinesis.add_shard("p", &[]);
    kinesis.put("p", "k", "checkpoint");
    let skipped = kinesis.put("p", "k", "skip");
    kinesis.close_shard("p");
    kinesis.add_shard("c", &["p"]);
    kinesis.put("c", "k", "child");
    let store = Arc::new(MemoryStore::new());
    let consumer = builder(&kinesis).store_arc(store.clone()).build().unwrap();
    let seen = Seen::default();
    let run = Running::start(&consumer, skipping_handler(&consumer, &seen));
    wait_for(Duration::from_secs(10), || seen.of("p").len() == 2).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(
        seen.of("c").is_empty(),
        "child started before its parent's end was durable"
    );
    let first = kinesis.records("p")[0].checkpoint();
    assert_eq!(store.snapshot(consumer.namespace()).get("p"), Some(&first));
    consumer
        .checkpointer()
        .set("p", Checkpoint::at(skipped))
        .await
        .unwrap();
    assert_eq!(
        store.snapshot(consumer.namespace()).get("p"),
        Some(&Checkpoint::ShardEnd)
    );
    wait_for(Duration::from_secs(10), || seen.of("c").len() == 1).await;
    run.stop().await.unwrap();
    let order = seen.order.lock().unwrap().clone();
    assert_eq!(
        order.last().unwrap().0.as_str(),
        "c",
        "children after the parent"
    );
}

/// An expired LATEST iterator, renewed before any record was read, starts a margin before our
/// clock: a Kinesis clock behind ours does not skip the records put in between.
#[tokio::test(start_paused = true)]
async fn expired_latest_iterator_with_clock_skew_loses_nothing() {
    let kinesis = MemoryKinesis::with_shards(1);
    let mut api = Faulty::new(&kinesis);
    api.server_clock_behind = Duration::from_secs(2);
    let consumer = api
        .consumer()
        .start_position(StartPosition::Latest)
        .build()
        .unwrap();
    let seen = Seen::default();
    let run = Running::start(&consumer, seen.handler());
    wait_for(Duration::from_secs(5), || {
        kinesis.get_records_calls(&shard_name(0)) > 0
    })
    .await;
    let put = kinesis.put(&shard_name(0), "k", "after the iterator was taken");
    kinesis.expire_iterators();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.count() == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let delivered = seen.count() == 1;
    run.stop().await.unwrap();
    assert!(
        delivered,
        "record {put:?} put after the LATEST iterator was never delivered"
    );
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

/// Idle shards do not use up tower's RateLimit budget: heartbeats are off by default.
#[tokio::test(start_paused = true)]
async fn idle_shard_heartbeats_do_not_eat_the_rate_limit() {
    let kinesis = MemoryKinesis::with_shards(10);
    for i in 0..500 {
        kinesis.put(&shard_name(0), &format!("k{i}"), "x");
    }
    let consumer = builder(&kinesis).max_records_per_call(10).build().unwrap();
    let seen = Seen::default();
    let heartbeats = Arc::new(AtomicU64::new(0));
    let handler = {
        let (seen, heartbeats) = (seen.clone(), heartbeats.clone());
        service_fn(move |batch: Batch| {
            if batch.is_empty() {
                heartbeats.fetch_add(1, Ordering::SeqCst);
            }
            seen.take(&batch);
            async { Ok::<_, BoxError>(()) }
        })
    };
    let service = ServiceBuilder::new()
        .rate_limit(5, Duration::from_secs(1))
        .service(handler);
    let started = tokio::time::Instant::now();
    let run = Running::start(&consumer, service);
    wait_for(Duration::from_secs(600), || seen.count() == 500).await;
    let elapsed = started.elapsed();
    run.stop().await.unwrap();
    // 50 batches at 5 calls/s: about 10 s.
    assert!(
        elapsed < Duration::from_secs(20),
        "50 batches took {elapsed:?} under a 5/s rate limit; {} heartbeat calls used the budget",
        heartbeats.load(Ordering::SeqCst)
    );
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

/// A closed shard expires (retention) while its first batch is in flight and its reader has
/// fetched more batches ahead. The fetched records still reach the handler, and the child
/// does not start before the parent's batches are done.
#[tokio::test(start_paused = true)]
async fn expired_shard_delivers_what_was_fetched_before_its_children_start() {
    let kinesis = MemoryKinesis::default();
    kinesis.add_shard("p", &[]);
    for i in 0..1_000 {
        kinesis.put("p", &format!("p{i}"), "p");
    }
    kinesis.close_shard("p");
    kinesis.add_shard("c", &["p"]);
    kinesis.put("c", "k", "child");
    let api = Faulty::new(&kinesis);
    let consumer = api.consumer().max_records_per_call(10).build().unwrap();
    let seen = Seen::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let handler = {
        let (seen, gate) = (seen.clone(), gate.clone());
        service_fn(move |batch: Batch| {
            let (seen, gate) = (seen.clone(), gate.clone());
            async move {
                if &*batch.shard_id == "p" && !batch.is_empty() {
                    gate.acquire().await.unwrap().forget();
                }
                seen.take(&batch);
                Ok::<_, BoxError>(())
            }
        })
    };
    let run = Running::start(
        &consumer,
        CheckpointLayer::new(consumer.checkpointer()).layer(handler),
    );
    // p's first batch is held in the handler; its reader fetches ahead; then p expires.
    wait_for(Duration::from_secs(10), || api.served("p") >= 50).await;
    api.expire("p");
    tokio::time::sleep(Duration::from_secs(5)).await;
    gate.add_permits(10_000);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let outcome = run.stop().await;
    let fetched = api.served("p") as usize;
    let order = seen.order.lock().unwrap().clone();
    let last_p = order.iter().rposition(|(s, _)| &**s == "p");
    let first_c = order.iter().position(|(s, _)| &**s == "c");
    assert!(outcome.is_ok(), "{outcome:?}");
    assert!(
        matches!((last_p, first_c), (Some(p), Some(c)) if p < c) && seen.of("p").len() == fetched,
        "child c handled at position {first_c:?}, parent p's last record at {last_p:?}; \
         {fetched} records of p were fetched before it expired, {} reached the handler",
        seen.of("p").len()
    );
}

/// A closed shard expires while a ListShards is in flight whose answer was taken before: that
/// stale answer still lists the shard, and does not turn an expiry into a fatal ShardNotFound.
#[tokio::test(start_paused = true)]
async fn shard_expiring_while_a_listing_is_in_flight_is_not_fatal() {
    let kinesis = MemoryKinesis::default();
    kinesis.add_shard("old", &[]);
    for i in 0..2_000 {
        kinesis.put("old", &format!("o{i}"), "o");
    }
    kinesis.close_shard("old");
    kinesis.add_shard("new", &["old"]);
    kinesis.add_shard("other", &[]);
    kinesis.put("new", "k", "n");
    kinesis.put("other", "k", "x");
    let mut api = Faulty::new(&kinesis);
    // Each listing answers 3 s after its snapshot; one is always in flight: 0-3 s, 3-6 s, ...
    api.list_delay = Duration::from_secs(3);
    let consumer = api
        .consumer()
        .max_records_per_call(10)
        .shard_refresh_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let seen = Seen::default();
    let run = Running::start(
        &consumer,
        CheckpointLayer::new(consumer.checkpointer()).layer(seen.handler()),
    );
    // At 4 s "old" (still being read, 10 records per 200 ms) expires; the listing taken at 3 s
    // that still shows it answers at 6 s.
    tokio::time::sleep(Duration::from_secs(4)).await;
    api.expire("old");
    tokio::time::sleep(Duration::from_secs(20)).await;
    if run.task.is_finished() {
        let outcome = run.task.await.unwrap();
        panic!("an expired shard ended the run: {outcome:?}");
    }
    run.stop().await.unwrap();
    assert_eq!(seen.of("new").len(), 1, "the expired shard's child is read");
}

/// Same as `skip_checkpoint_on_a_closed_shards_last_record_holds_the_children_until_committed`,
/// but the shard closes after its records were read, so its last batch is empty: the skipped
/// record stays uncheckpointed all the same, and the child waits.
#[tokio::test(start_paused = true)]
async fn skip_checkpoint_on_the_last_record_holds_when_the_shard_end_batch_is_empty() {
    let kinesis = MemoryKinesis::default();
    kinesis.add_shard("p", &[]);
    kinesis.put("p", "k", "checkpoint");
    let skipped = kinesis.put("p", "k", "skip");
    let store = Arc::new(MemoryStore::new());
    let consumer = builder(&kinesis).store_arc(store.clone()).build().unwrap();
    let seen = Seen::default();
    let run = Running::start(&consumer, skipping_handler(&consumer, &seen));
    // Both records are read while p is open; p closes afterwards: its last batch is empty.
    wait_for(Duration::from_secs(10), || seen.of("p").len() == 2).await;
    kinesis.close_shard("p");
    kinesis.add_shard("c", &["p"]);
    kinesis.put("c", "k", "child");
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(
        seen.of("c").is_empty(),
        "child started before its parent's end was durable"
    );
    run.stop().await.unwrap();
    let first = kinesis.records("p")[0].checkpoint();
    assert_eq!(
        store.snapshot(consumer.namespace()).get("p"),
        Some(&first),
        "record {skipped} answered SkipCheckpoint and was never committed"
    );
}

/// A stream user commits a closed shard's last record while the consumer records the shard's
/// end: the shard ends up at SHARD_END either way.
#[tokio::test(start_paused = true)]
async fn commit_racing_with_shard_ended_still_ends_the_shard() {
    let checkpointer = kinesis_tower_layers::Checkpointer::new(
        SlowStore {
            set_delay: Duration::from_millis(100),
            flush_delay: Some(Duration::ZERO),
            ..SlowStore::default()
        },
        "ns",
    );
    let last = Checkpoint::at("42".parse().unwrap());
    let commit = {
        let checkpointer = checkpointer.clone();
        tokio::spawn(async move { checkpointer.set("p", last).await.unwrap() })
    };
    // The commit has looked for an end and is writing.
    tokio::time::sleep(Duration::from_millis(10)).await;
    checkpointer.shard_ended("p", Some(last)).await.unwrap();
    commit.await.unwrap();
    assert_eq!(
        checkpointer.get("p").await.unwrap(),
        Some(Checkpoint::ShardEnd)
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

/// A Kinesis call that never answers (a hung connection) counts as a transient failure after
/// a timeout: the shard is read again, the run goes on.
#[tokio::test(start_paused = true)]
async fn a_hung_get_records_call_times_out_and_the_shard_goes_on() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.fill(5, 10);
    let api = Faulty::new(&kinesis);
    api.hanging_get_records.store(1, Ordering::SeqCst);
    let consumer = api.consumer().build().unwrap();
    let seen = Seen::default();
    let run = Running::start(&consumer, seen.handler());
    wait_for(Duration::from_secs(120), || seen.count() == 5).await;
    run.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn access_denied_ends_run_saying_which_permissions_to_grant() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.inject(
        None,
        Operation::ListShards,
        KinesisErrorKind::AccessDenied,
        1,
    );
    let consumer = builder(&kinesis).build().unwrap();
    let err = consumer.run(Seen::default().handler()).await.unwrap_err();
    assert!(matches!(&err, Error::AccessDenied { .. }), "{err:?}");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("kinesis:GetRecords"), "{err}");
}

/// Restarting from a checkpoint inside a KPL aggregate: the reader reads the aggregate again
/// and marks the first batch with records with the checkpoint, once; DeaggregateLayer then
/// drops the user records already processed.
#[tokio::test(start_paused = true)]
async fn restart_inside_an_aggregate_marks_the_first_batch_and_drops_processed_user_records() {
    use kinesis_tower_layers::kpl::Aggregator;
    use kinesis_tower_layers::kpl::DeaggregateLayer;

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

mod entry_points;
mod filter;
mod layers;
mod long_runs;
mod restarts;
