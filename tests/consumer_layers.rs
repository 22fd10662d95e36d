//! tower's layers (ConcurrencyLimit, Timeout, RateLimit) and ours (BatchLayer, CheckpointLayer,
//! PerRecordLayer, KeyedConcurrencyLayer) stacked under `Consumer::run`. Time is paused: sleeps
//! complete as soon as every task is idle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kinesis_tower::batch::BatchLayer;
use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::kinesis::memory::{shard_name, MemoryKinesis};
use kinesis_tower::per_record::PerRecordLayer;
use kinesis_tower::store::MemoryStore;
use kinesis_tower::testing::{builder, sequences, wait_for, Running, Seen};
use kinesis_tower::Error;
use kinesis_tower::{Batch, BoxError, CheckpointStore, Processed, Record};
use tower::{service_fn, ServiceBuilder};

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

/// `BatchLayer(max_records 2) → CheckpointLayer → ConcurrencyLimit(1) → a 1 s handler`, two
/// shards: one read of 6 records on the first while the second gets one record (which only
/// buffers). The buffering call must not keep the limit's only permit: the first shard's three
/// pieces are handled one after another, about 3 s in all.
#[tokio::test(start_paused = true)]
async fn a_buffering_call_does_not_stall_another_shard_behind_a_concurrency_limit() {
    let kinesis = MemoryKinesis::with_shards(2);
    for i in 0..6 {
        kinesis.put(&shard_name(0), &format!("k{i}"), "v");
    }
    kinesis.put(&shard_name(1), "k", "v");
    let consumer = builder(&kinesis).build().unwrap();
    let seen = Seen::default();
    let slow = {
        let seen = seen.clone();
        service_fn(move |batch: Batch| {
            let seen = seen.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                seen.take(&batch);
                Ok::<_, BoxError>(())
            }
        })
    };
    let service = ServiceBuilder::new()
        // A long max wait: only size and shutdown flush, so nothing else frees the permit.
        .layer(
            BatchLayer::new()
                .max_records(2)
                .max_wait(Duration::from_secs(3600)),
        )
        .layer(CheckpointLayer::new(consumer.checkpointer()))
        .concurrency_limit(1)
        .service(slow);
    let run = Running::start(&consumer, service);
    let started = tokio::time::Instant::now();
    wait_for(Duration::from_secs(30), || {
        seen.of(&shard_name(0)).len() == 6
    })
    .await;
    let elapsed = started.elapsed();
    run.stop().await.unwrap();
    assert!(
        elapsed < Duration::from_secs(5),
        "6 records took {elapsed:?}"
    );
    assert_eq!(seen.of(&shard_name(1)).len(), 1, "flushed at shutdown");
}

/// `CheckpointLayer → KeyedConcurrencyLayer → handler` under `run`: a key that fails ends the
/// run with `Error::Handler` carrying a `PartialFailure`; the checkpoint stands at the last
/// record before the failed key's first record of the batch; a restart delivers from the
/// record after it, every key in order.
#[tokio::test(start_paused = true)]
async fn a_failed_key_checkpoints_the_prefix_and_a_restart_resumes_after_it() {
    use kinesis_tower::checkpoint::PartialFailure;
    use kinesis_tower::keyed::KeyedConcurrencyLayer;
    use std::collections::HashMap;
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;

    let kinesis = MemoryKinesis::with_shards(1);
    let shard = shard_name(0);
    for i in 0..30 {
        kinesis.put(&shard, &format!("k{}", i % 5), format!("{i}"));
    }
    let records = kinesis.records(&shard);
    let store = Arc::new(MemoryStore::new());
    // Record 17 (key k2) fails once: its key's first record in the batch of records 10..19
    // is 12, so the checkpoint may cover up to record 11.
    let failed_once = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<(String, usize)>>> = Arc::default();
    let handler = {
        let (failed_once, seen) = (failed_once.clone(), seen.clone());
        service_fn(move |batch: Batch| {
            let (failed_once, seen) = (failed_once.clone(), seen.clone());
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                let ids: Vec<usize> = batch
                    .records
                    .iter()
                    .map(|r| std::str::from_utf8(&r.data).unwrap().parse().unwrap())
                    .collect();
                if ids.contains(&17) && !failed_once.swap(true, Ordering::SeqCst) {
                    return Err::<(), BoxError>("record 17 failed".into());
                }
                let mut seen = seen.lock().unwrap();
                for (record, id) in batch.records.iter().zip(ids) {
                    seen.push((record.partition_key.to_string(), id));
                }
                Ok(())
            }
        })
    };
    let stack = |consumer: &kinesis_tower::Consumer| {
        ServiceBuilder::new()
            .layer(CheckpointLayer::new(consumer.checkpointer()))
            .layer(KeyedConcurrencyLayer::new())
            .service(handler.clone())
    };
    let consumer = builder(&kinesis)
        .store_arc(store.clone())
        .max_records_per_call(10)
        .build()
        .unwrap();
    let err = consumer.run(stack(&consumer)).await.unwrap_err();
    let Error::Handler { source, .. } = &err else {
        panic!("not a handler error: {err}");
    };
    let partial = PartialFailure::find(&**source).expect("a PartialFailure");
    assert_eq!(partial.checkpoint, Some(records[11].checkpoint()));
    assert_eq!(partial.first_failed, Some(records[12].checkpoint()));
    assert!(err.to_string().contains("record 17 failed"), "{err}");
    assert_eq!(
        store.get(consumer.namespace(), &shard).await.unwrap(),
        Some(records[11].checkpoint())
    );
    let first_run = seen.lock().unwrap().len();
    // The other keys of the failed batch finished: 10 records before it, 8 of the batch.
    assert_eq!(first_run, 18);

    let consumer = builder(&kinesis)
        .store_arc(store.clone())
        .max_records_per_call(10)
        .build()
        .unwrap();
    let run = Running::start(&consumer, stack(&consumer));
    wait_for(Duration::from_secs(60), || {
        seen.lock().unwrap().len() == first_run + 18
    })
    .await;
    run.stop().await.unwrap();
    let seen = seen.lock().unwrap().clone();
    let mut again: Vec<usize> = seen[first_run..].iter().map(|(_, id)| *id).collect();
    again.sort_unstable();
    assert_eq!(again, (12..30).collect::<Vec<_>>());
    let mut last: HashMap<&str, usize> = HashMap::new();
    for (key, id) in &seen[first_run..] {
        let key = key.as_str();
        if let Some(previous) = last.insert(key, *id) {
            assert!(previous < *id, "key {key}: {id} after {previous}");
        }
    }
    assert_eq!(
        store.get(consumer.namespace(), &shard).await.unwrap(),
        Some(records[29].checkpoint())
    );
}
