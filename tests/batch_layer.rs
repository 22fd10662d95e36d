//! BatchLayer under `Consumer::run_until` over the in-memory Kinesis (feature `test-util`):
//! batch limits, heartbeat-driven max wait, shutdown and shard-end flushes, handler failure.
//! Time is paused: sleeps complete as soon as every task is idle.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kinesis_tower::batch::BatchLayer;
use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::kinesis::memory::{shard_name, MemoryKinesis};
use kinesis_tower::retry::{RetryLayer, Transient};
use kinesis_tower::store::MemoryStore;
use kinesis_tower::testing::{builder, sequences, wait_for, Running};
use kinesis_tower::Error;
use kinesis_tower::{Batch, BatchEnd, BoxError, Checkpoint, CheckpointStore, SequenceNumber};
use tower::{service_fn, ServiceBuilder};

/// Every batch the handler was called with.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<Vec<Batch>>>);

impl Calls {
    fn handler(
        &self,
        fail_on: Option<SequenceNumber>,
    ) -> impl tower::Service<Batch, Response = (), Error = BoxError, Future = impl Send> + Clone
    {
        let calls = self.clone();
        service_fn(move |batch: Batch| {
            let fail =
                fail_on.is_some_and(|s| batch.records.iter().any(|r| r.sequence_number == s));
            calls.0.lock().unwrap().push(batch);
            async move {
                if fail {
                    return Err::<(), BoxError>("cannot write to the sink".into());
                }
                Ok(())
            }
        })
    }

    fn all(&self) -> Vec<Batch> {
        self.0.lock().unwrap().clone()
    }

    fn records(&self, shard: &str) -> Vec<SequenceNumber> {
        self.all()
            .iter()
            .filter(|b| &*b.shard_id == shard)
            .flat_map(|b| b.records.iter().map(|r| r.sequence_number))
            .collect()
    }

    fn count(&self) -> usize {
        self.all().iter().map(Batch::len).sum()
    }
}

/// Reader answers of 250 records reach the handler as batches of at most 100; the last 50 of
/// each shard are handed over by a heartbeat once they waited max wait; everything is
/// checkpointed.
#[tokio::test(start_paused = true)]
async fn reads_are_cut_to_max_records_and_heartbeats_flush_after_max_wait() {
    let kinesis = MemoryKinesis::with_shards(2);
    kinesis.fill(250, 10);
    let store = Arc::new(MemoryStore::new());
    let consumer = builder(&kinesis)
        .store_arc(store.clone())
        .max_records_per_call(1_000)
        .heartbeat_interval(Duration::from_millis(250))
        .build()
        .unwrap();
    let calls = Calls::default();
    let service = ServiceBuilder::new()
        .layer(BatchLayer::new())
        .layer(CheckpointLayer::new(consumer.checkpointer()))
        .service(calls.handler(None));
    let started = tokio::time::Instant::now();
    let run = Running::start(&consumer, service);
    wait_for(Duration::from_secs(60), || calls.count() == 500).await;
    let elapsed = started.elapsed();
    // The remainders waited for max wait (1 s), and at most one heartbeat interval more.
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_millis(1_600),
        "{elapsed:?}"
    );
    for i in 0..2 {
        let shard = shard_name(i);
        assert_eq!(calls.records(&shard), sequences(&kinesis, &shard));
        let sizes: Vec<usize> = calls
            .all()
            .iter()
            .filter(|b| *b.shard_id == *shard)
            .map(Batch::len)
            .collect();
        assert_eq!(sizes, vec![100, 100, 50], "{shard}");
        assert_eq!(
            store.get(consumer.namespace(), &shard).await.unwrap(),
            Some(kinesis.records(&shard).last().unwrap().checkpoint())
        );
    }
    run.stop().await.unwrap();
}

/// Without heartbeats and with a long max wait, records stay buffered (and unchecked) until
/// shutdown, which hands them over and checkpoints the last one before `run_until` returns.
#[tokio::test(start_paused = true)]
async fn shutdown_flushes_the_buffer_and_checkpoints_the_last_record() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.fill(30, 10);
    let shard = shard_name(0);
    let store = Arc::new(MemoryStore::new());
    let consumer = builder(&kinesis)
        .store_arc(store.clone())
        .drain_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let calls = Calls::default();
    let service = ServiceBuilder::new()
        .layer(BatchLayer::new().max_wait(Duration::from_secs(3600)))
        .layer(CheckpointLayer::new(consumer.checkpointer()))
        .service(calls.handler(None));
    let run = Running::start(&consumer, service);
    wait_for(Duration::from_secs(10), || kinesis.records_served() == 30).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(calls.count(), 0, "buffered, not handed over");
    assert_eq!(store.get(consumer.namespace(), &shard).await.unwrap(), None);
    run.stop().await.unwrap();
    let all = calls.all();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].end, Some(BatchEnd::Shutdown));
    assert_eq!(calls.records(&shard), sequences(&kinesis, &shard));
    assert_eq!(
        store.get(consumer.namespace(), &shard).await.unwrap(),
        Some(kinesis.records(&shard).last().unwrap().checkpoint())
    );
}

/// A shard closed while its records sit in the buffer: its (empty) last batch hands them
/// over, the checkpoint becomes ShardEnd, and only then does the child start.
#[tokio::test(start_paused = true)]
async fn a_closed_shard_flushes_its_buffer_before_it_is_done_and_ends_with_shard_end() {
    let kinesis = MemoryKinesis::default();
    kinesis.add_shard("parent", &[]);
    for i in 0..30 {
        kinesis.put("parent", &format!("k{i}"), "p");
    }
    let store = Arc::new(MemoryStore::new());
    let consumer = builder(&kinesis).store_arc(store.clone()).build().unwrap();
    let calls = Calls::default();
    let service = ServiceBuilder::new()
        .layer(BatchLayer::new().max_wait(Duration::from_secs(3600)))
        .layer(CheckpointLayer::new(consumer.checkpointer()))
        .service(calls.handler(None));
    let run = Running::start(&consumer, service);
    wait_for(Duration::from_secs(10), || kinesis.records_served() == 30).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(calls.count(), 0);
    kinesis.close_shard("parent");
    kinesis.add_shard("child", &["parent"]);
    kinesis.put("child", "c", "c");
    // The child starts (and reads its record) only once the parent is done.
    wait_for(Duration::from_secs(60), || kinesis.records_served() == 31).await;
    // Parent: its 30 records in one batch marked ShardEnd; the child's record is buffered.
    let all = calls.all();
    assert_eq!(all.len(), 1);
    assert_eq!(&*all[0].shard_id, "parent");
    assert_eq!(all[0].len(), 30);
    assert_eq!(all[0].end, Some(BatchEnd::ShardEnd));
    assert_eq!(
        store.get(consumer.namespace(), "parent").await.unwrap(),
        Some(Checkpoint::ShardEnd)
    );
    run.stop().await.unwrap();
    let all = calls.all();
    assert_eq!(all.len(), 2);
    assert_eq!(all[1].end, Some(BatchEnd::Shutdown));
    assert_eq!(calls.records("child"), sequences(&kinesis, "child"));
    assert_eq!(
        store.get(consumer.namespace(), "child").await.unwrap(),
        Some(kinesis.records("child")[0].checkpoint())
    );
}

/// The handler fails on the second batch handed over: `run` ends with the error, and the
/// checkpoint covers the first batch only.
#[tokio::test(start_paused = true)]
async fn a_failing_batch_ends_run_and_is_not_checkpointed() {
    let kinesis = MemoryKinesis::with_shards(1);
    kinesis.fill(250, 10);
    let shard = shard_name(0);
    let records = kinesis.records(&shard);
    let store = Arc::new(MemoryStore::new());
    let consumer = builder(&kinesis)
        .store_arc(store.clone())
        .max_records_per_call(1_000)
        .build()
        .unwrap();
    let calls = Calls::default();
    let service = ServiceBuilder::new()
        .layer(BatchLayer::new())
        .layer(CheckpointLayer::new(consumer.checkpointer()))
        .service(calls.handler(Some(records[149].sequence_number)));
    let err = consumer.run(service).await.unwrap_err();
    match &err {
        Error::Handler { shard: s, .. } => assert_eq!(s, &shard),
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        err.to_string().contains("cannot write to the sink"),
        "{err}"
    );
    let sizes: Vec<usize> = calls.all().iter().map(Batch::len).collect();
    assert_eq!(sizes, vec![100, 100], "nothing after the failed batch");
    assert_eq!(
        store.get(consumer.namespace(), &shard).await.unwrap(),
        Some(records[99].checkpoint())
    );
    assert_eq!(store.snapshot(consumer.namespace()).len(), 1);
}

/// The recommended stack under `run`: Batch → Checkpoint → Retry → handler. A handler that
/// fails transiently now and then loses nothing, handles each batch in order (a failed batch
/// is retried before the next one), and the checkpoint ends at the last record.
#[tokio::test(start_paused = true)]
async fn batch_checkpoint_retry_stack_retries_transient_failures_and_checkpoints_once_done() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let kinesis = MemoryKinesis::with_shards(3);
    kinesis.fill(120, 10);
    let store = Arc::new(MemoryStore::new());
    let consumer = builder(&kinesis)
        .store_arc(store.clone())
        .max_records_per_call(50)
        .heartbeat_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let calls = Calls::default();
    let attempts = Arc::new(AtomicU32::new(0));
    let failed_once = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let handler = {
        let (calls, attempts) = (calls.clone(), attempts.clone());
        service_fn(move |batch: Batch| {
            attempts.fetch_add(1, Ordering::SeqCst);
            // The first attempt of every batch with records fails, transiently; only
            // successes are recorded.
            let fail = batch
                .records
                .first()
                .is_some_and(|r| failed_once.lock().unwrap().insert(r.checkpoint()));
            if !fail {
                calls.0.lock().unwrap().push(batch);
            }
            async move {
                if fail {
                    return Err::<(), BoxError>(Transient::new("sink busy").into());
                }
                Ok(())
            }
        })
    };
    let service = ServiceBuilder::new()
        .layer(
            BatchLayer::new()
                .max_records(40)
                .max_wait(Duration::from_millis(500)),
        )
        .layer(CheckpointLayer::new(consumer.checkpointer()))
        .layer(RetryLayer::new().max_attempts(3))
        .service(handler);
    let run = Running::start(&consumer, service);
    wait_for(Duration::from_secs(60), || calls.count() == 360).await;
    run.stop().await.unwrap();
    // Each batch with records: one failed attempt, one that succeeded.
    let with_records = calls.all().iter().filter(|b| !b.is_empty()).count() as u32;
    let markers = calls.all().len() as u32 - with_records;
    assert_eq!(attempts.load(Ordering::SeqCst), 2 * with_records + markers);
    for i in 0..3 {
        let shard = shard_name(i);
        assert_eq!(calls.records(&shard), sequences(&kinesis, &shard));
        assert!(calls.all().iter().all(|b| b.len() <= 40));
        assert_eq!(
            store.get(consumer.namespace(), &shard).await.unwrap(),
            Some(kinesis.records(&shard).last().unwrap().checkpoint())
        );
    }
}
