//! `process`: the short, safe entry point checkpoints after success; `run` alone does not.

use super::*;

#[tokio::test(start_paused = true)]
async fn process_checkpoints_each_batch_after_the_handler_succeeded() {
    let kinesis = MemoryKinesis::with_shards(2);
    kinesis.fill(20, 10);
    let store = Arc::new(MemoryStore::new());
    let consumer = builder(&kinesis).store_arc(store.clone()).build().unwrap();
    let seen = Seen::default();
    let stop = CancellationToken::new();
    let run = tokio::spawn(consumer.process_until(seen.handler(), stop.clone().cancelled_owned()));
    wait_for(Duration::from_secs(60), || seen.count() == 40).await;
    stop.cancel();
    run.await.unwrap().unwrap();
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
    let stop = CancellationToken::new();
    let run = tokio::spawn(consumer.run_until(seen.handler(), stop.clone().cancelled_owned()));
    wait_for(Duration::from_secs(60), || seen.count() == 5).await;
    stop.cancel();
    run.await.unwrap().unwrap();
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
