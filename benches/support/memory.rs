//! Shared by the benches over the in-memory Kinesis (feature `test-util`).

use std::time::{Duration, Instant};

use kinesis_tower::kinesis::memory::{shard_name, MemoryKinesis};
use kinesis_tower::kinesis::{IteratorPosition, KinesisApi, StreamRef};
use kinesis_tower::store::MemoryStore;
use kinesis_tower::testing::{builder, STREAM};
use kinesis_tower::{Consumer, ConsumerBuilder, ShardId};

/// A current-thread runtime: everything on one core.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A consumer of `kinesis` with the test settings of `kinesis_tower::testing::builder` (from the
/// trim horizon) and a `MemoryStore`, with the read limits that model the service's quotas
/// lifted (no wait between GetRecords calls, no byte rate limit, 1 ms poll interval), so the
/// consumer's own cost is what is measured. `tune` may change further settings.
pub fn consumer(
    kinesis: &MemoryKinesis,
    tune: impl FnOnce(ConsumerBuilder) -> ConsumerBuilder,
) -> Consumer {
    tune(builder(kinesis))
        .store(MemoryStore::new())
        .min_get_records_interval(Duration::ZERO)
        .read_bytes_per_second(u64::MAX)
        .poll_interval(Duration::from_millis(1))
        .build()
        .expect("valid configuration")
}

/// The baseline: GetRecords (10,000 records per call) on every shard of `kinesis` in a loop,
/// records dropped; checks that `total` records were read.
pub async fn bare_get_records(kinesis: &MemoryKinesis, shards: usize, total: u64) -> Duration {
    let stream = StreamRef::name(STREAM);
    let start = Instant::now();
    let mut seen = 0u64;
    for i in 0..shards {
        let shard = ShardId::from(shard_name(i));
        let mut iterator = kinesis
            .get_shard_iterator(&stream, &shard, IteratorPosition::TrimHorizon)
            .await
            .expect("iterator");
        loop {
            let page = kinesis
                .get_records(&stream, &shard, &iterator, 10_000)
                .await
                .expect("records");
            if page.records.is_empty() {
                break;
            }
            seen += page.records.len() as u64;
            iterator = page.next_iterator.expect("open shard");
        }
    }
    let elapsed = start.elapsed();
    assert_eq!(seen, total);
    elapsed
}
