//! A long run that looks inside the consumer (the largest lineage it kept), over the in-memory
//! Kinesis; the consumer's other tests are in `tests/consumer_*.rs`. Time is paused: sleeps
//! complete as soon as every task is idle.

use std::time::Duration;

use crate::kinesis::memory::MemoryKinesis;
use crate::testing::{builder, wait_for, Running, Seen};

/// 10,000 generations of resharding (each shard split into one child, the closed ancestors
/// expiring as Kinesis's retention does): the lineage and the checkpointer keep a bounded
/// number of shards, and every record is delivered once, in order.
#[tokio::test(start_paused = true)]
async fn ten_thousand_generations_of_resharding_keep_memory_flat() {
    const GENERATIONS: usize = 10_000;
    let kinesis = MemoryKinesis::default();
    kinesis.add_shard("g0", &[]);
    let consumer = builder(&kinesis)
        .poll_interval(Duration::from_millis(1))
        .min_get_records_interval(Duration::ZERO)
        .build()
        .unwrap();
    let seen = Seen::default();
    let run = Running::checkpointed(&consumer, seen.handler());
    for g in 0..GENERATIONS {
        let (shard, child) = (format!("g{g}"), format!("g{}", g + 1));
        kinesis.put(&shard, "k", "v");
        kinesis.close_shard(&shard);
        kinesis.add_shard(child.as_str(), &[shard.as_str()]);
        if g >= 2 {
            kinesis.remove_shard(&format!("g{}", g - 2));
        }
        wait_for(Duration::from_secs(60), || seen.count() == g as u64 + 1).await;
    }
    wait_for(Duration::from_secs(60), || {
        kinesis.get_records_calls(&format!("g{GENERATIONS}")) > 0
    })
    .await;
    let pending_ends = consumer.checkpointer().pending_shard_ends();
    let lineage = consumer.probe().lineage_max();
    run.stop().await.unwrap();
    assert_eq!(seen.count(), GENERATIONS as u64);
    assert_eq!(
        pending_ends, 0,
        "ended shards still tracked by the checkpointer"
    );
    assert!(
        lineage > 0 && lineage <= 8,
        "the lineage kept {lineage} shards"
    );
}
