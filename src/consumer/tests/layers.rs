//! The README's stack through `run`: tower's layers inside ours.

use super::*;
use kinesis_tower_layers::batch::BatchLayer;

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
