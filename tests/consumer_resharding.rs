//! Resharding: parents before children, a parent's end durable before its children start, and
//! shards that expire (retention) while they are read or listed. Time is paused: sleeps complete
//! as soon as every task is idle.

mod faults;

use std::sync::Arc;
use std::time::Duration;

use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::kinesis::memory::MemoryKinesis;
use kinesis_tower::per_record::PerRecordLayer;
use kinesis_tower::store::MemoryStore;
use kinesis_tower::testing::{at, builder, sequences, wait_for, Running, Seen};
use kinesis_tower::{
    Batch, BatchEnd, BoxError, Checkpoint, CheckpointStore, Processed, Record, ShardId,
};
use kinesis_tower::{Consumer, StartPosition};
use tower::{service_fn, Layer, ServiceBuilder};

use faults::{FaultyKinesis, SlowStore};

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
    let order = seen.order();
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
        .ends()
        .contains(&(ShardId::from("parent-b"), BatchEnd::ShardEnd)));
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
    let order = seen.order();
    let pos = |s: &str| order.iter().position(|(id, _)| &**id == s).unwrap();
    assert!(
        pos("b") < pos("m"),
        "child m handled (position {}) before its parent b (position {})",
        pos("m"),
        pos("b")
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
    let order = seen.order();
    assert_eq!(
        order.last().unwrap().0.as_str(),
        "c",
        "children after the parent"
    );
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
    let checkpointer = kinesis_tower::Checkpointer::new(
        SlowStore {
            set_delay: Duration::from_millis(100),
            flush_delay: Some(Duration::ZERO),
            ..SlowStore::default()
        },
        "ns",
    );
    let last = at(42);
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
    let api = FaultyKinesis::new(&kinesis);
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
    let api = FaultyKinesis::new(&kinesis);
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
    let order = seen.order();
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
    let mut api = FaultyKinesis::new(&kinesis);
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
    if run.is_finished() {
        let outcome = run.join().await;
        panic!("an expired shard ended the run: {outcome:?}");
    }
    run.stop().await.unwrap();
    assert_eq!(seen.of("new").len(), 1, "the expired shard's child is read");
}
